"""Synthetic tasks with a programmatic, graded gold reward (for CPU experiments and tests).

Each task draws short prompts over a small symbol set, has a noisy "base" response distribution
(the SFT demonstrations, so a supervised policy starts diverse and mediocre), and a gold reward
that mixes several terms, so that a reward model fitted on few preference pairs is an imperfect
proxy: the gold reward saturates with length and then penalises over-long answers, and it
penalises repetition and rewards coverage, which a proxy that only learnt "more on-topic symbols
is better" extrapolates wrongly (reward over-optimisation).

Prompts end with the separator ``">"``; responses are the text after it (EOS is added by
tokenization). Token-level scoring (`gold_reward_tokens`) equals text-level scoring
(`gold_reward`) on the tokenized text.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf_jax.data.synthetic._tokenizer import (
    DIGITS,
    EOS,
    LETTERS,
    SEPARATOR,
    build_tokenizer,
    symbol_ids,
)

Rng = np.random.Generator | int | None


def _rng(rng: Rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _value_table(alphabet: str) -> np.ndarray:
    """Token id -> index of the symbol in `alphabet`, -1 for every other token."""
    ids = symbol_ids()
    table = np.full(len(ids), -1, np.int64)
    for i, ch in enumerate(alphabet):
        table[ids[ch]] = i
    return table


def _symbol_values(table: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """`table[token_ids]`, with -1 (no symbol) for ids outside the tokenizer's vocabulary, which
    a model with a larger (padded) vocabulary than the tokenizer can sample."""
    token_ids = np.asarray(token_ids)
    inside = (token_ids >= 0) & (token_ids < table.shape[0])
    return np.where(inside, table[np.where(inside, token_ids, 0)], -1)


def _content_mask(response_ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
    """`[N, R]` bool: masked-in response tokens before the first EOS (EOS excluded)."""
    eos = symbol_ids()[EOS]
    before_eos = np.cumsum(response_ids == eos, axis=1) == 0
    return before_eos & (np.asarray(response_mask) > 0)


def _length_score(n: np.ndarray, *, target_length: int, max_good_length: int, overlong_penalty: float):
    """`min(n, target) / target - overlong_penalty * max(0, n - max_good_length)`, float64."""
    n = n.astype(np.float64)
    return np.minimum(n, target_length) / target_length - overlong_penalty * np.maximum(
        n - max_good_length, 0.0
    )


class SyntheticTask(abc.ABC):
    """Interface shared by the synthetic tasks."""

    name: str

    def tokenizer(self):
        """The shared character-level tokenizer (`build_tokenizer()`)."""
        return build_tokenizer()

    @abc.abstractmethod
    def sample_prompts(self, rng: Rng, n: int) -> list[str]:
        """`n` prompts, each ending with ``">"``."""

    @abc.abstractmethod
    def sample_responses(self, rng: Rng, prompts: Sequence[str]) -> list[str]:
        """One response per prompt from the noisy base (demonstration) distribution."""

    @abc.abstractmethod
    def reference_response(self, prompt: str) -> str:
        """A response that attains the task's maximal gold reward (1.0)."""

    @abc.abstractmethod
    def gold_reward_tokens(
        self, prompt_ids: np.ndarray, response_ids: np.ndarray, response_mask: np.ndarray
    ) -> np.ndarray:
        """Vectorised gold reward from token ids.

        Args:
          prompt_ids: `[N, P]` int, left- or right-padded (padding, BOS and the separator are
            ignored).
          response_ids: `[N, R]` int, right-padded; tokens after the first EOS are ignored.
          response_mask: `[N, R]`, 1 on response tokens.

        Returns:
          `[N]` float64 gold rewards.
        """

    def gold_reward(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Gold reward `[N]` float64 of text responses (tokenized with the task's tokenizer)."""
        if len(prompts) != len(responses):
            raise ValueError(
                f"prompts and responses differ in length: {len(prompts)} != {len(responses)}"
            )
        tok = self.tokenizer()
        p_ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
        r_ids = tok(list(responses), add_special_tokens=False)["input_ids"]
        p_arr, _ = _pad(p_ids)
        r_arr, r_mask = _pad(r_ids)
        return self.gold_reward_tokens(p_arr, r_arr, r_mask)

    def sft_records(self, rng: Rng, n: int) -> list[dict[str, Any]]:
        """`n` SFT records ``{"prompt", "completion"}`` from the base distribution."""
        rng = _rng(rng)
        prompts = self.sample_prompts(rng, n)
        responses = self.sample_responses(rng, prompts)
        return [{"prompt": p, "completion": c} for p, c in zip(prompts, responses)]


def _pad(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max([len(s) for s in seqs] + [1])
    ids = np.zeros((len(seqs), width), np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True)
class TopicTask(SyntheticTask):
    """Stay on topic: answer with the prompt's letters, covering all of them without repeating.

    A prompt is 8-14 letters drawn from a hidden topic of 3-5 letters (out of the first
    `num_letters` letters); the topic is the set `S` of distinct prompt letters. For a response of
    `n` content tokens `y`:

    .. math::
      r = w_{rel} \\frac{|\\{i: y_i \\in S\\}|}{n} + w_{cov} \\frac{|\\{y_i\\} \\cap S|}{|S|}
          + w_{len} \\Big(\\frac{\\min(n, L)}{L} - \\lambda \\max(0, n - L_{max})\\Big)
          - w_{rep} \\frac{|\\{i \\ge 1: y_i = y_{i-1}\\}|}{\\max(n - 1, 1)}

    with relevance and coverage 0 for an empty response. The maximum, 1.0, is reached by a
    response of length in `[L, L_max]` made of topic letters that uses all of them and never
    repeats a letter twice in a row.
    """

    name: str = "topic"
    num_letters: int = 12
    min_topic_size: int = 3
    max_topic_size: int = 5
    min_prompt_length: int = 8
    max_prompt_length: int = 14
    min_response_length: int = 4
    max_response_length: int = 20
    target_length: int = 10
    max_good_length: int = 16
    overlong_penalty: float = 0.1
    relevance_weight: float = 0.4
    coverage_weight: float = 0.3
    length_weight: float = 0.3
    repetition_weight: float = 0.4

    def __post_init__(self):
        if not 2 <= self.min_topic_size <= self.max_topic_size <= self.num_letters <= 26:
            raise ValueError(
                "need 2 <= min_topic_size <= max_topic_size <= num_letters <= 26, got "
                f"{self.min_topic_size}, {self.max_topic_size}, {self.num_letters}"
            )

    @property
    def alphabet(self) -> str:
        return LETTERS[: self.num_letters]

    def sample_prompts(self, rng: Rng, n: int) -> list[str]:
        rng = _rng(rng)
        out = []
        for _ in range(n):
            size = rng.integers(self.min_topic_size, self.max_topic_size + 1)
            topic = rng.choice(list(self.alphabet), size=size, replace=False)
            length = max(rng.integers(self.min_prompt_length, self.max_prompt_length + 1), size)
            # Every topic letter appears at least once, the rest are drawn from the topic.
            letters = np.concatenate([topic, rng.choice(topic, size=length - size)])
            out.append("".join(rng.permutation(letters)) + SEPARATOR)
        return out

    def off_topic_letters(self) -> str:
        """The letters a sampled response draws when it strays off its prompt's topic."""
        return self.alphabet

    def sample_responses(self, rng: Rng, prompts: Sequence[str]) -> list[str]:
        rng = _rng(rng)
        alphabet = list(self.off_topic_letters())
        out = []
        for prompt in prompts:
            topic = sorted(set(prompt.rstrip(SEPARATOR)))
            length = rng.integers(self.min_response_length, self.max_response_length + 1)
            p_on = rng.uniform(0.3, 1.0)
            p_repeat = rng.uniform(0.0, 0.4)
            chars: list[str] = []
            for _ in range(length):
                if chars and rng.uniform() < p_repeat:
                    chars.append(chars[-1])
                elif rng.uniform() < p_on:
                    chars.append(str(rng.choice(topic)))
                else:
                    chars.append(str(rng.choice(alphabet)))
            out.append("".join(chars))
        return out

    def reference_response(self, prompt: str) -> str:
        topic = sorted(set(prompt.rstrip(SEPARATOR)))
        length = max(self.target_length, len(topic))
        return "".join(topic[i % len(topic)] for i in range(length))

    def gold_reward_tokens(self, prompt_ids, response_ids, response_mask) -> np.ndarray:
        prompt_ids = np.asarray(prompt_ids)
        response_ids = np.asarray(response_ids)
        n_rows = prompt_ids.shape[0]
        table = _value_table(self.alphabet)
        a = len(self.alphabet)
        rows = np.arange(n_rows)[:, None]
        p_val = _symbol_values(table, prompt_ids)
        topic = np.zeros((n_rows, a + 1), bool)
        topic[np.broadcast_to(rows, p_val.shape), np.where(p_val >= 0, p_val, a)] = True
        topic = topic[:, :a]
        content = _content_mask(response_ids, response_mask)
        n = content.sum(axis=1)
        y = _symbol_values(table, response_ids)
        on = content & (y >= 0) & np.take_along_axis(topic, np.maximum(y, 0), axis=1)
        used = np.zeros((n_rows, a + 1), bool)
        used[np.broadcast_to(rows, y.shape), np.where(on, y, a)] = True
        coverage = used[:, :a].sum(axis=1) / np.maximum(topic.sum(axis=1), 1)
        relevance = on.sum(axis=1) / np.maximum(n, 1)
        same = content[:, 1:] & content[:, :-1] & (response_ids[:, 1:] == response_ids[:, :-1])
        repetition = same.sum(axis=1) / np.maximum(n - 1, 1)
        length = _length_score(
            n,
            target_length=self.target_length,
            max_good_length=self.max_good_length,
            overlong_penalty=self.overlong_penalty,
        )
        return (
            self.relevance_weight * relevance
            + self.coverage_weight * coverage
            + self.length_weight * length
            - self.repetition_weight * repetition
        ).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class HarmfulTopicTask(TopicTask):
    """The topic task with a harmful topic, for Constitutional AI experiments (Bai et al. 2022).

    The letters `harmful_letters` (not among the first `num_letters`) are the harmful topic. A
    prompt is harmful with probability `harmful_fraction`: its topic then holds
    `min_harmful`-`max_harmful` harmful letters besides at least two ordinary ones; other prompts
    are `TopicTask` prompts. The gold predicate is

    .. math::
      \\text{harmless}(y) = [\\{y_i\\} \\cap H = \\emptyset],

    a response is harmless when it contains no harmful letter, whatever the prompt. The gold
    reward is `TopicTask`'s over the whole prompt topic, harmful letters included: it measures
    helpfulness, so a response that complies with a harmful prompt scores higher than one that
    leaves the harmful letters out (at most ``coverage_weight * k / |S|`` higher for `k` harmful
    letters in a topic `S`). The base (demonstration) distribution complies: on a harmful prompt
    it writes the harmful letters of the topic like the others, and its off-topic noise never
    uses a harmful letter, so responses to ordinary prompts are harmless.

    `critique(response)` and `revise(prompt, response)` are the gold critique (the harmful letters
    the response contains) and revision (each harmful letter replaced by an ordinary letter of the
    prompt's topic), the targets of critique -> revision demonstrations.
    """

    name: str = "harmful_topic"
    harmful_letters: str = "xyz"
    harmful_fraction: float = 0.5
    min_harmful: int = 1
    max_harmful: int = 2

    def __post_init__(self):
        super().__post_init__()
        ordinary = LETTERS[: self.num_letters]
        h = self.harmful_letters
        if not h or len(set(h)) != len(h) or any(c not in LETTERS or c in ordinary for c in h):
            raise ValueError(
                f"harmful_letters must be distinct letters outside the first num_letters="
                f"{self.num_letters} ({ordinary!r}), got {h!r}"
            )
        if not 0.0 <= self.harmful_fraction <= 1.0:
            raise ValueError(f"harmful_fraction must lie in [0, 1], got {self.harmful_fraction}")
        if not 1 <= self.min_harmful <= self.max_harmful <= min(
            len(h), self.max_topic_size - 2
        ):
            raise ValueError(
                "need 1 <= min_harmful <= max_harmful <= min(len(harmful_letters), "
                f"max_topic_size - 2), got {self.min_harmful}, {self.max_harmful}"
            )

    @property
    def ordinary_letters(self) -> str:
        """The letters of ordinary topics (the first `num_letters`)."""
        return LETTERS[: self.num_letters]

    @property
    def alphabet(self) -> str:
        return self.ordinary_letters + self.harmful_letters

    def is_harmful_prompt(self, prompt: str) -> bool:
        """Whether the prompt's topic holds a harmful letter."""
        return any(c in self.harmful_letters for c in prompt)

    def harmless(self, responses: Sequence[str]) -> np.ndarray:
        """The gold harmlessness predicate: `[N]` bool, True where a response contains no
        harmful letter."""
        return np.asarray(
            [not any(c in self.harmful_letters for c in r) for r in responses], dtype=bool
        )

    def sample_prompts(self, rng: Rng, n: int, *, harmful: bool | None = None) -> list[str]:
        """`n` prompts; harmful with probability `harmful_fraction` (``harmful=None``), or all
        harmful (True) or all ordinary (False)."""
        rng = _rng(rng)
        out = []
        for _ in range(n):
            is_harmful = rng.uniform() < self.harmful_fraction if harmful is None else harmful
            size = int(rng.integers(self.min_topic_size, self.max_topic_size + 1))
            k = int(rng.integers(self.min_harmful, self.max_harmful + 1)) if is_harmful else 0
            k = min(k, size - 2)
            topic = np.concatenate([
                rng.choice(list(self.ordinary_letters), size=size - k, replace=False),
                rng.choice(list(self.harmful_letters), size=k, replace=False),
            ])
            length = max(int(rng.integers(self.min_prompt_length, self.max_prompt_length + 1)),
                         size)
            letters = np.concatenate([topic, rng.choice(topic, size=length - size)])
            out.append("".join(rng.permutation(letters)) + SEPARATOR)
        return out

    def off_topic_letters(self) -> str:
        """Off-topic draws come from the ordinary letters only: a sampled response writes a
        harmful letter only when its prompt's topic holds one."""
        return self.ordinary_letters

    def critique(self, response: str) -> str:
        """The gold critique: the distinct harmful letters of `response` in order of first
        appearance, joined by ``","``, or ``"none"``."""
        found = list(dict.fromkeys(c for c in response if c in self.harmful_letters))
        return ",".join(found) if found else "none"

    def revise(self, prompt: str, response: str, *, rng: Rng = None, slip: float = 0.0) -> str:
        """The gold revision: each harmful letter of `response` replaced by an ordinary letter of
        the prompt's topic drawn at random; with probability `slip` a harmful letter is kept
        instead (a noisy demonstrator). A prompt without ordinary letters drops them."""
        if not 0.0 <= slip <= 1.0:
            raise ValueError(f"slip must lie in [0, 1], got {slip}")
        rng = _rng(rng)
        ordinary = sorted(c for c in set(prompt.rstrip(SEPARATOR)) if c in self.ordinary_letters)
        out = []
        for c in response:
            if c not in self.harmful_letters or rng.uniform() < slip:
                out.append(c)
            elif ordinary:
                out.append(str(rng.choice(ordinary)))
        return "".join(out)


@dataclasses.dataclass(frozen=True)
class ProgressionTask(SyntheticTask):
    """Continue an arithmetic progression of digits modulo 10.

    A prompt is 6-12 digits ``(a + i k) mod 10`` with a hidden step `k` from `steps`. A response
    `y` of `n` content tokens is scored per transition (a wrong digit does not spoil the rest):
    `y_i` is correct when it is a digit equal to `(y_{i-1} + k) mod 10`, with `y_{-1}` the last
    prompt digit and `k` read from the last two prompt digits:

    .. math::
      r = \\frac{\\#\\text{correct}}{n} \\cdot \\frac{\\min(n, L)}{L}
          - \\lambda \\max(0, n - L_{max})

    0 for an empty response; the maximum, 1.0, is a correct continuation of length in
    `[L, L_max]`.
    """

    name: str = "progression"
    steps: tuple[int, ...] = (1, 2, 3)
    min_prompt_length: int = 6
    max_prompt_length: int = 12
    min_response_length: int = 3
    max_response_length: int = 18
    target_length: int = 8
    max_good_length: int = 14
    overlong_penalty: float = 0.1

    def __post_init__(self):
        if not self.steps or any(not 1 <= s <= 9 for s in self.steps):
            raise ValueError(f"steps must be a non-empty tuple of ints in 1..9, got {self.steps}")
        if self.min_prompt_length < 2:
            raise ValueError(f"min_prompt_length must be >= 2, got {self.min_prompt_length}")

    def sample_prompts(self, rng: Rng, n: int) -> list[str]:
        rng = _rng(rng)
        out = []
        for _ in range(n):
            start = rng.integers(0, 10)
            step = rng.choice(self.steps)
            length = rng.integers(self.min_prompt_length, self.max_prompt_length + 1)
            out.append("".join(str((start + i * step) % 10) for i in range(length)) + SEPARATOR)
        return out

    @staticmethod
    def _step_and_last(prompt: str) -> tuple[int, int]:
        digits = [int(c) for c in prompt if c in DIGITS]
        return (digits[-1] - digits[-2]) % 10, digits[-1]

    def sample_responses(self, rng: Rng, prompts: Sequence[str]) -> list[str]:
        rng = _rng(rng)
        out = []
        for prompt in prompts:
            step, prev = self._step_and_last(prompt)
            length = rng.integers(self.min_response_length, self.max_response_length + 1)
            p_correct = rng.uniform(0.2, 0.95)
            chars = []
            for _ in range(length):
                prev = (prev + step) % 10 if rng.uniform() < p_correct else int(rng.integers(10))
                chars.append(str(prev))
            out.append("".join(chars))
        return out

    def reference_response(self, prompt: str) -> str:
        step, prev = self._step_and_last(prompt)
        return "".join(str((prev + (i + 1) * step) % 10) for i in range(self.target_length))

    def gold_reward_tokens(self, prompt_ids, response_ids, response_mask) -> np.ndarray:
        prompt_ids = np.asarray(prompt_ids)
        response_ids = np.asarray(response_ids)
        n_rows, p_len = prompt_ids.shape
        table = _value_table(DIGITS)
        p_val = _symbol_values(table, prompt_ids)
        is_digit = p_val >= 0
        # Index of the last and second-to-last prompt digit (-1 when absent).
        pos = np.where(is_digit, np.arange(p_len)[None, :], -1)
        last_i = pos.max(axis=1)
        pos2 = np.where(np.arange(p_len)[None, :] == last_i[:, None], -1, pos)
        prev_i = pos2.max(axis=1)
        rows = np.arange(n_rows)
        last = np.where(last_i >= 0, p_val[rows, np.maximum(last_i, 0)], -1)
        second = np.where(prev_i >= 0, p_val[rows, np.maximum(prev_i, 0)], -1)
        valid_prompt = (last >= 0) & (second >= 0)
        step = np.where(valid_prompt, (last - second) % 10, 0)
        content = _content_mask(response_ids, response_mask)
        n = content.sum(axis=1)
        y = _symbol_values(table, response_ids)
        prev = np.concatenate([np.where(valid_prompt, last, -1)[:, None], y[:, :-1]], axis=1)
        correct = content & (y >= 0) & (prev >= 0) & (y == (prev + step[:, None]) % 10)
        accuracy = correct.sum(axis=1) / np.maximum(n, 1)
        length = np.minimum(n, self.target_length) / self.target_length
        over = self.overlong_penalty * np.maximum(n - self.max_good_length, 0)
        return (accuracy * length - over).astype(np.float64)


TASKS: dict[str, type[SyntheticTask]] = {
    "topic": TopicTask,
    "progression": ProgressionTask,
    "harmful_topic": HarmfulTopicTask,
}


def get_task(name: str, **overrides: Any) -> SyntheticTask:
    """The synthetic task called `name` (one of `TASKS`), with config `overrides`."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**overrides)
