"""Hindsight Instruction Relabeling (HIR; Zhang, Liu, Wong, Abbeel, Gonzalez 2023, "The Wisdom of
Hindsight Makes Language Models Better Instruction Followers", ICML 2023; github.com/tianjunz/HIR).

HIR alternates an online sampling phase and an offline relabelled-training phase. Here one
round is one step of the shared loop (`rlhf_jax.train.loop.fit`), so checkpoints, exact resume,
the SIGTERM save, the NaN policy, metrics.jsonl and TensorBoard work at round granularity:

1. **Sample**: ``num_samples`` responses for each of the round's ``data.batch_size`` prompts
   from the current policy (`rlhf_jax.generation`), conditioned on the best-outcome
   instruction (the goal instruction of the paper's online phase).
2. **Relabel in hindsight**: score every response with the reward source (any of the online
   trainers'; scored against the original prompt, without the label) and rewrite its
   instruction to the one its outcome satisfies. The relabelling is pluggable (`Relabeller`:
   outcome -> label, label -> instruction); the default, `RewardBucketRelabeller`, encodes the
   reward outcome in the instruction as a label text per reward bucket (``label_texts``,
   lowest bucket first), after the prompt (``label_position="suffix"``, the default) or
   before it.
3. **Train** ``sft_epochs`` shuffled passes of ``sft_batch_size`` rows over the round's
   relabelled samples with `rlhf_jax.losses.hir_loss`: SFT on the output under its relabelled
   instruction, plus ``contrastive_coeff`` times HIR's contrastive term over the instructions
   (the released code's layout: each output scored under every label's instruction, its own
   label the positive), optional label smoothing and the optional entropy bonus
   (``entropy_coeff``).

At evaluation (``--eval-every``) the policy is conditioned on the best-outcome instruction, as
the paper evaluates with the goal instruction.

Where the paper is silent (its tasks have binary correctness), the choices made here:

- Outcomes are bucketed by their rank within the round (``len(label_texts)`` equal-size
  quantile buckets of the round's scores; equal scores share a bucket), so the relabelling
  needs no reward scale; the best bucket is "better than the rest of this round".
- Sequence log-probs of the contrastive term are sums over the response (the paper's
  likelihood; ``contrastive_average`` gives the code's token means). The SFT and entropy
  terms are token means over the minibatch, not per-example means (`hir_loss`'s, the code's
  one example at a time): in self-training the per-example mean weighs the EOS of short
  responses up, and on the synthetic task the sampled responses shrank from 11 to 3 tokens in
  10 rounds with it (they do not shrink with the token mean).
- **Replay buffer.** The paper's Algorithm 1 adds every round's relabelled samples to a buffer
  and trains on batches drawn from it. ``buffer_size > 0`` does that with a bounded buffer
  (`HirBuffer`): the newest ``buffer_size`` relabelled samples (first in, first out; each keeps
  the label of its own round), and each of the round's ``sft_epochs`` passes trains on
  ``data.batch_size * num_samples`` rows drawn from the whole buffer without replacement, so a
  round makes the same number of optimizer steps with or without it. The buffer is part of the
  trainer's state, so it is stored in every checkpoint and resume stays exact. The default,
  ``buffer_size=0``, keeps no buffer: each round trains on its own samples only (on-policy;
  the measurements in docs/experiments.md were taken this way).

Metrics per round (``hir/``): ``loss``, ``sft_loss``, ``contrastive_loss``, ``entropy`` (step
means), ``score_mean``, ``best_label_score_mean`` (samples relabelled with the best label),
``kl_ref`` (sequence KL of the round's samples to the reference), ``response_length``,
``eos_fraction``, ``buffer_rows`` (samples in the replay buffer, with ``buffer_size > 0``),
and ``gold_reward`` on a synthetic task. ``num_steps`` counts rounds.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import losses, sharding
from rlhf_jax.generation import RewardSource
from rlhf_jax.models import positions_from_mask
from rlhf_jax.train.builders import load_tokenizer_for
from rlhf_jax.train.config import DataSpec, TrainConfig, check_int, check_number, require
from rlhf_jax.train.logprobs import model_scores
from rlhf_jax.train.online import (
    ONLINE_DATA,
    HeldOut,
    MetricFn,
    OnlineTrainer,
    jit_mean_kl_to_reference,
    seed_key_data,
    train_online,
)
from rlhf_jax.train.rewards import RewardSpec
from rlhf_jax.train.rollout import Rollout, RolloutConfig
from rlhf_jax.train.state import TrainState, make_train_step


@dataclasses.dataclass(frozen=True)
class HirConfig(TrainConfig):
    """Hindsight instruction relabelling. ``num_steps`` = rounds; ``data.batch_size`` = prompts
    per round."""

    output_dir: str = "runs/hir"
    data: DataSpec = ONLINE_DATA
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardSpec = RewardSpec()
    num_samples: int = 4
    """Responses sampled per prompt and round."""
    label_texts: tuple[str, ...] = ("0", "1")
    """Instruction prefix of each reward bucket, worst first (at least 2): a response is
    relabelled with the prefix of its bucket; evaluation and sampling use the last one."""
    label_position: Literal["prefix", "suffix"] = "suffix"
    """Where the label text goes: before the prompt, or after it (right before the response,
    the nearest place for a small model to read it)."""
    sft_epochs: int = 1
    """Passes over a round's relabelled samples."""
    sft_batch_size: int = 8
    """Rows per optimizer step; must divide ``data.batch_size * num_samples``."""
    contrastive_coeff: float = 1.0
    """Weight of HIR's contrastive term over instructions (0: SFT on relabelled data only)."""
    label_smoothing: float = 0.0
    """Label smoothing of the contrastive term (the released code: 0.2)."""
    contrastive_average: bool = False
    """Score instructions by the response's summed log-prob (the paper's sequence likelihood)
    or, when true, its token-mean log-prob (the released code). On the synthetic topic task
    with a 1-layer model the mean left the contrastive term at log 2 for 40 rounds, the sum
    started to separate the labels."""
    entropy_coeff: float = 0.0
    """Weight of the entropy bonus over the response tokens (the released code: 0.001)."""
    buffer_size: int = 0
    """Relabelled samples kept in a replay buffer across rounds (the newest ones; at least
    ``data.batch_size * num_samples``), which every round trains on; 0 (the default): no
    buffer, a round trains on its own samples (module docstring)."""

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "num_samples", low=1)
        check_int(self, "sft_epochs", low=1)
        check_int(self, "sft_batch_size", low=1)
        check_number(self, "contrastive_coeff", low=0)
        check_number(self, "label_smoothing", low=0, high=1, high_open=True)
        check_number(self, "entropy_coeff", low=0)
        check_int(self, "buffer_size", low=0)
        require(len(self.label_texts) >= 2 and all(isinstance(t, str) and t
                                                   for t in self.label_texts)
                and len(set(self.label_texts)) == len(self.label_texts), "label_texts",
                f"label_texts must be at least 2 distinct non-empty strings, got "
                f"{list(self.label_texts)}")
        rows = self.data.batch_size * self.num_samples
        require(rows % self.sft_batch_size == 0, "sft_batch_size",
                f"sft_batch_size={self.sft_batch_size} must divide data.batch_size * "
                f"num_samples = {rows}")
        require(self.buffer_size == 0 or self.buffer_size >= rows, "buffer_size",
                f"buffer_size={self.buffer_size} must be 0 (no buffer) or hold a whole round's "
                f"samples, data.batch_size * num_samples = {rows}")


# ---------------------------------------------------------------------------------------------
# relabelling
# ---------------------------------------------------------------------------------------------


class Relabeller(Protocol):
    """How outcomes become instructions (pluggable).

    ``num_labels`` instructions; ``best_label`` is the one sampling and evaluation condition
    on. ``labels(scores)`` maps the round's ``[N]`` scores to ``[N]`` int labels in
    ``[0, num_labels)``; ``instruct(prompt_ids, prompt_mask, labels)`` rewrites left-padded
    prompts ``[N, P]`` into left-padded instructions ``[N, P']`` (``P'`` the same for every
    label, so the contrastive term can score an output under each of them).
    """

    num_labels: int
    best_label: int

    def labels(self, scores: np.ndarray) -> np.ndarray: ...

    def instruct(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, labels: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]: ...


def quantile_buckets(scores: np.ndarray, num_labels: int) -> np.ndarray:
    """``[N]`` int bucket of each score: its rank in the batch (equal scores share the lowest
    rank, so they get one label) cut into ``num_labels`` equal-size buckets, 0 the lowest."""
    scores = np.asarray(scores, np.float64)
    ranks = np.searchsorted(np.sort(scores), scores, side="left")
    return (ranks * num_labels) // max(len(scores), 1)


def prefix_prompts(prompt_ids: np.ndarray, prompt_mask: np.ndarray,
                   prefixes: Sequence[np.ndarray], *, pad_id: int, suffix: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``[N, P + L]`` rows ``pads | prefixes[i] | prompt`` (with ``suffix``: ``pads |
    prompt | prefixes[i]``; ``L`` the longest label), from left-padded ``[N, P]`` prompts."""
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    n, p = prompt_ids.shape
    width = p + max(len(x) for x in prefixes)
    ids = np.full((n, width), pad_id, np.int32)
    mask = np.zeros((n, width), np.int32)
    for i in range(n):
        label, prompt = np.asarray(prefixes[i], np.int32), prompt_ids[i][prompt_mask[i] > 0]
        row = np.concatenate([prompt, label] if suffix else [label, prompt]).astype(np.int32)
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


class RewardBucketRelabeller:
    """The default relabelling: the reward outcome's quantile bucket in the round
    (`quantile_buckets`), written as a label text (``label_ids[k]``, the tokenized
    ``label_texts[k]``) before the prompt, or after it with ``suffix``."""

    def __init__(self, label_ids: Sequence[Sequence[int]], *, pad_id: int, suffix: bool = False):
        self.suffix = bool(suffix)
        self.label_ids = [np.asarray(x, np.int32) for x in label_ids]
        self.num_labels = len(self.label_ids)
        self.best_label = self.num_labels - 1
        self.pad_id = int(pad_id)

    def labels(self, scores: np.ndarray) -> np.ndarray:
        return quantile_buckets(scores, self.num_labels)

    def instruct(self, prompt_ids, prompt_mask, labels):
        return prefix_prompts(prompt_ids, prompt_mask,
                              [self.label_ids[int(k)] for k in np.asarray(labels)],
                              pad_id=self.pad_id, suffix=self.suffix)


def check_labels(labels: Any, *, rows: int, num_labels: int) -> np.ndarray:
    """``labels`` as ``[rows]`` int64, or a ValueError naming what a `Relabeller` got wrong."""
    out = np.asarray(labels)
    if out.shape != (rows,) or not np.issubdtype(out.dtype, np.integer):
        raise ValueError(f"Relabeller.labels must return {rows} integer labels (one per sample), "
                         f"got shape {out.shape} dtype {out.dtype}")
    if rows and (out.min() < 0 or out.max() >= num_labels):
        raise ValueError(f"Relabeller.labels must lie in [0, {num_labels}) (num_labels), got "
                         f"values in [{out.min()}, {out.max()}]")
    return out.astype(np.int64)


def relabeller_from_config(config: HirConfig, tokenizer: Any, *, pad_id: int
                           ) -> RewardBucketRelabeller:
    """`RewardBucketRelabeller` of ``config.label_texts`` tokenized without special tokens, at
    ``config.label_position``."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in config.label_texts]
    for text, x in zip(config.label_texts, ids):
        if not x:
            raise ValueError(f"label_texts entry {text!r} tokenizes to no tokens")
    return RewardBucketRelabeller(ids, pad_id=pad_id, suffix=config.label_position == "suffix")


# ---------------------------------------------------------------------------------------------
# the loss of one minibatch
# ---------------------------------------------------------------------------------------------


def hir_batch(instructions: np.ndarray, instruction_masks: np.ndarray, rollout: Rollout,
              labels: np.ndarray) -> dict[str, np.ndarray]:
    """The training rows of relabelled samples, rows first (sharded over the batch axis).

    Args:
      instructions, instruction_masks: ``[N, K, P']`` each output's prompt under every label.
      rollout: the ``N`` sampled responses (``response_ids``, ``response_mask`` ``[N, R]``).
      labels: ``[N]`` int, each output's hindsight label.

    Returns:
      ``input_ids, attention_mask, positions, loss_mask`` ``[N, K, P' + R]`` and ``label [N]``.
    """
    n, k, _ = instructions.shape
    resp = np.broadcast_to(np.asarray(rollout.response_ids)[:, None], (n, k, rollout.response_ids.shape[1]))
    rmask = np.broadcast_to(np.asarray(rollout.response_mask)[:, None], resp.shape)
    ids = np.concatenate([instructions, resp], axis=-1).astype(np.int32)
    mask = np.concatenate([instruction_masks, rmask], axis=-1).astype(np.int32)
    loss_mask = np.concatenate([np.zeros_like(instruction_masks), rmask], axis=-1)
    return {"input_ids": ids, "attention_mask": mask,
            "positions": np.asarray(positions_from_mask(mask)).astype(np.int32),
            "loss_mask": loss_mask.astype(np.int32), "label": np.asarray(labels, np.int32)}


class HirHyperParams(NamedTuple):
    """The loss's hyper-parameters (the `HirConfig` fields of the same names)."""

    contrastive_coeff: float = 1.0
    label_smoothing: float = 0.0
    entropy_coeff: float = 0.0
    contrastive_average: bool = False


def hir_train_loss(model: nnx.Module, batch: Mapping[str, jax.Array], rng: Any = None, *,
                   hp: HirHyperParams | None = None):
    """``(loss, metrics)`` of `rlhf_jax.losses.hir_loss` on a `hir_batch` minibatch: one fused
    forward over the ``[N * K]`` (output, instruction) rows; the positive rows give the SFT term,
    the summed (``contrastive_average``: token-mean) log-probs under every instruction the
    contrastive term."""
    hp = HirHyperParams() if hp is None else hp
    n, k, t = batch["input_ids"].shape
    rows = {key: batch[key].reshape(n * k, t)
            for key in ("input_ids", "attention_mask", "positions", "loss_mask")}
    logps = model_scores(model, rows, where=rows["loss_mask"]).logps.reshape(n, k, t)
    mask = batch["loss_mask"].astype(jnp.float32)
    label = batch["label"]
    pos = jnp.take_along_axis(logps, label[:, None, None], axis=1)[:, 0]
    pos_mask = jnp.take_along_axis(mask, label[:, None, None], axis=1)[:, 0]
    seq = losses.masked_sum(logps, mask, axis=-1)
    if hp.contrastive_average:
        seq = seq / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    entropy = None
    if hp.entropy_coeff > 0:
        pick = lambda x: jnp.take_along_axis(x, label[:, None, None], axis=1)[:, 0]  # noqa: E731
        pos_ids = pick(batch["input_ids"])
        logits = model(pos_ids, attention_mask=pick(batch["attention_mask"]),
                       positions=pick(batch["positions"]))
        # The entropy of the distribution that predicts token t sits at column t - 1.
        ent = losses.entropy_from_logits(logits[:, :-1].astype(jnp.float32))
        entropy = jnp.concatenate([jnp.zeros_like(ent[:, :1]), ent], axis=1)
    out = losses.hir_loss(pos, pos_mask, seq, positive_index=label,
                          candidate_mask=jnp.ones_like(seq),
                          contrastive_coeff=hp.contrastive_coeff,
                          label_smoothing=hp.label_smoothing, token_entropy=entropy,
                          entropy_coeff=hp.entropy_coeff)
    # Token means over the minibatch for the per-token terms (module docstring).
    tokens = jnp.sum(pos_mask, axis=-1)
    total = jnp.maximum(jnp.sum(tokens), 1.0)
    sft = jnp.sum(out.sft * tokens) / total
    ent = jnp.sum(out.entropy * tokens) / total
    contrastive = jnp.mean(out.contrastive)
    loss = sft + hp.contrastive_coeff * contrastive
    if hp.entropy_coeff > 0:
        loss = loss - hp.entropy_coeff * ent
    return loss, {"hir/loss": loss, "hir/sft_loss": sft, "hir/contrastive_loss": contrastive,
                  "hir/entropy": ent}


# ---------------------------------------------------------------------------------------------
# the replay buffer
# ---------------------------------------------------------------------------------------------

BUFFER_FIELDS = ("input_ids", "attention_mask", "positions", "loss_mask", "label")
"""The `hir_batch` fields a `HirBuffer` holds."""


class HirBuffer(NamedTuple):
    """HIR's replay buffer of relabelled samples: a ring of ``S`` (``buffer_size``) `hir_batch`
    rows, ``input_ids, attention_mask, positions, loss_mask`` ``[S, K, T]`` and ``label [S]``
    (int32), and ``added`` (int32 scalar), the rows ever added. Rows ``0 .. min(added, S) - 1``
    are filled; the next row goes to slot ``added % S``, over the oldest."""

    input_ids: Any
    attention_mask: Any
    positions: Any
    loss_mask: Any
    label: Any
    added: Any


def empty_buffer(size: int, *, num_labels: int, width: int) -> HirBuffer:
    """An empty `HirBuffer` of ``size`` rows of ``num_labels`` instructions x ``width`` tokens
    (host arrays)."""
    rows = np.zeros((size, num_labels, width), np.int32)
    return HirBuffer(input_ids=rows, attention_mask=rows.copy(), positions=rows.copy(),
                     loss_mask=rows.copy(), label=np.zeros((size,), np.int32),
                     added=np.zeros((), np.int32))


def add_to_buffer(buffer: HirBuffer, batch: Mapping[str, np.ndarray], *, pad_id: int
                  ) -> HirBuffer:
    """``buffer`` (host arrays) with the rows of a `hir_batch` written at the ring's next slots
    (the oldest rows make way). Rows narrower than the buffer's ``T`` (a shorter prompt bucket)
    are left-padded (``pad_id``, mask 0, position 0: the real tokens keep their positions); a
    wider row, or more rows than the buffer holds, is a ValueError."""
    size, k, width = buffer.input_ids.shape
    n, k_in, t = batch["input_ids"].shape
    if k_in != k or t > width or n > size:
        raise ValueError(f"HIR replay buffer holds up to {size} rows of {k} instructions x "
                         f"{width} tokens (data.max_prompt_length + label + "
                         f"rollout.max_new_tokens); got {n} rows of {k_in} x {t}")
    pad = ((0, 0), (0, 0), (width - t, 0))
    rows = {
        "input_ids": np.pad(batch["input_ids"], pad, constant_values=pad_id),
        "attention_mask": np.pad(batch["attention_mask"], pad),
        "positions": np.pad(batch["positions"], pad),
        "loss_mask": np.pad(batch["loss_mask"], pad),
        "label": np.asarray(batch["label"]),
    }
    added = int(buffer.added)
    slots = (added + np.arange(n)) % size
    out = {}
    for name in BUFFER_FIELDS:
        arr = np.array(getattr(buffer, name), np.int32)
        arr[slots] = rows[name]
        out[name] = arr
    return HirBuffer(**out, added=np.asarray(added + n, np.int32))


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------


class HirState(NamedTuple):
    """Rounds completed, the policy's `TrainState` (its ``step`` counts updates), the RNG, and
    the replay buffer (`HirBuffer`, replicated; None without one)."""

    step: jax.Array
    policy: TrainState
    rng: jax.Array
    buffer: HirBuffer | None = None


@functools.lru_cache(maxsize=16)
def _jit_step(policy_graphdef, tx, schedule, hp):
    loss = functools.partial(hir_train_loss, hp=hp)
    return jax.jit(losses.unchecked(make_train_step(loss, tx, graphdef=policy_graphdef,
                                                    schedule=schedule)),
                   donate_argnums=(0,))


class _Samples(NamedTuple):
    """What per-round metric functions receive: the samples (original prompts), their scores."""

    rollout: Rollout
    scores: jax.Array


class HirTrainer(OnlineTrainer):
    """HIR held in memory; ``iteration()`` runs one round (module docstring).

    Args: as `rlhf_jax.train.rejection_sampling.RejectionSamplingTrainer`, plus ``relabeller``
    (a `Relabeller`; default `RewardBucketRelabeller` of ``config.label_texts``, which then
    needs ``tokenizer``).
    """

    algorithm = "hir"

    def __init__(
        self,
        config: HirConfig,
        *,
        policy: nnx.Module,
        reward: RewardSource,
        prompts: Iterator[Mapping[str, np.ndarray]],
        eos_token_id: int,
        pad_token_id: int,
        reference: nnx.Module | None = None,
        mesh: Any = None,
        metric_fns: Sequence[MetricFn] = (),
        relabeller: Relabeller | None = None,
        tokenizer: Any = None,
    ):
        if relabeller is None:
            if tokenizer is None:
                raise ValueError("HirTrainer needs a relabeller or a tokenizer (to encode "
                                 "config.label_texts)")
            relabeller = relabeller_from_config(config, tokenizer, pad_id=pad_token_id)
        self.relabeller = relabeller
        rows = config.data.batch_size * config.num_samples
        self.steps_per_round = config.sft_epochs * (rows // config.sft_batch_size)
        self.setup(
            config, policy=policy, reward=reward, prompts=prompts, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, reference=reference, mesh=mesh, metric_fns=metric_fns,
            samples_per_prompt=config.num_samples, update_rows=config.sft_batch_size,
            update_rows_name="sft_batch_size",
            num_updates=config.num_steps * self.steps_per_round,
        )
        hp = HirHyperParams(contrastive_coeff=float(config.contrastive_coeff),
                            label_smoothing=float(config.label_smoothing),
                            entropy_coeff=float(config.entropy_coeff),
                            contrastive_average=bool(config.contrastive_average))
        self._update = _jit_step(self.policy_graphdef, self.tx, self.schedule, hp)
        self._kl = jit_mean_kl_to_reference(self.policy_graphdef, self.reference,
                                            float(config.rollout.temperature))

    def initial_state(self, policy_state: TrainState) -> HirState:
        buffer = None
        if self.config.buffer_size:
            # Rows as wide as the widest prompt bucket's instructions plus the responses.
            p = self.config.data.max_prompt_length
            ids, _ = self.relabeller.instruct(
                np.full((1, p), self.pad_token_id, np.int32), np.ones((1, p), np.int32),
                np.asarray([self.relabeller.best_label]))
            buffer = empty_buffer(self.config.buffer_size, num_labels=self.relabeller.num_labels,
                                  width=ids.shape[1] + self.config.rollout.max_new_tokens)
        return HirState(step=jnp.zeros((), jnp.int32), policy=policy_state,
                        rng=seed_key_data(self.config.seed), buffer=self._replicate(buffer))

    def _replicate(self, buffer: HirBuffer | None) -> HirBuffer | None:
        if buffer is None:
            return None
        return sharding.global_from_host(buffer, NamedSharding(self.mesh, PartitionSpec()))

    def goal_prompts(self, prompts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``prompts`` with every prompt under the best-outcome instruction."""
        ids, mask = np.asarray(prompts["prompt_ids"]), np.asarray(prompts["prompt_mask"])
        best = np.full(ids.shape[0], self.relabeller.best_label)
        g_ids, g_mask = self.relabeller.instruct(ids, mask, best)
        return dict(prompts, prompt_ids=g_ids, prompt_mask=g_mask)

    def set_held_out(self, held_out: HeldOut) -> None:
        """Held-out prompts, evaluated under the best-outcome instruction."""
        batches = held_out.prompt_batches
        super().set_held_out(held_out._replace(
            prompt_batches=lambda: (self.goal_prompts(b) for b in batches())))

    def collect(self, state: HirState, prompts: Mapping[str, np.ndarray], rng: jax.Array):
        """Samples under the goal instruction, scores against the original prompts and
        relabels; returns the `hir_batch` of the round and its metrics."""
        rollout = self.rollout(state, self.goal_prompts(prompts), rng)
        n = self.samples_per_prompt
        host = sharding.gather_to_host(rollout)  # the whole rollout on every process
        orig_ids = np.repeat(np.asarray(prompts["prompt_ids"]), n, axis=0)
        orig_mask = np.repeat(np.asarray(prompts["prompt_mask"]), n, axis=0)
        plain = Rollout(
            sequences=np.concatenate([orig_ids, host.response_ids], axis=1).astype(np.int32),
            sequence_mask=np.concatenate([orig_mask, host.response_mask], axis=1).astype(np.int32),
            response_ids=host.response_ids, response_mask=host.response_mask,
            finished=host.finished)
        plain = sharding.global_from_host(plain, self.batch_sharding)
        scores = self.scores(plain, prompts)
        host_scores = sharding.gather_to_host(scores)
        k = self.relabeller.num_labels
        labels = check_labels(self.relabeller.labels(host_scores), rows=len(host_scores),
                              num_labels=k)
        per_label = [self.relabeller.instruct(orig_ids, orig_mask, np.full(len(labels), j))
                     for j in range(k)]
        batch = hir_batch(np.stack([x[0] for x in per_label], axis=1),
                          np.stack([x[1] for x in per_label], axis=1), host, labels)
        mask = host.response_mask.astype(np.float32)
        best = labels == self.relabeller.best_label
        metrics = {
            "hir/score_mean": float(host_scores.mean()),
            "hir/best_label_score_mean": float(host_scores[best].mean()) if best.any() else 0.0,
            "hir/kl_ref": self._kl(state.policy, self.reference.state, rollout),
            "hir/response_length": float(mask.sum(-1).mean()),
            "hir/eos_fraction": float(np.asarray(host.finished, np.float32).mean()),
        }
        metrics.update(self.extra_metrics(_Samples(rollout=plain, scores=scores), prompts))
        return batch, metrics

    def step(self, state: HirState, prompts: Mapping[str, np.ndarray]):
        """One round (the `fit` step function)."""
        key = jax.random.wrap_key_data(state.rng)
        rollout_key, shuffle_key, next_key = jax.random.split(key, 3)
        batch, metrics = self.collect(state, prompts, rollout_key)
        rows = batch["label"].shape[0]
        size = self.config.sft_batch_size
        policy = state.policy
        buffer, pool, source = state.buffer, rows, batch
        if buffer is not None:
            # The round's rows join the buffer; the updates draw from all of it.
            buffer = add_to_buffer(sharding.gather_to_host(buffer), batch,
                                   pad_id=self.pad_token_id)
            pool = min(int(buffer.added), len(buffer.label))
            source = {name: getattr(buffer, name) for name in BUFFER_FIELDS}
            metrics["hir/buffer_rows"] = pool
            buffer = self._replicate(buffer)
        step_metrics: list[dict[str, jax.Array]] = []
        for epoch in range(self.config.sft_epochs):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch),
                                                      pool))[:rows]
            for start in range(0, rows, size):
                idx = order[start:start + size]
                mb = sharding.global_from_host({k: v[idx] for k, v in source.items()},
                                               self.batch_sharding)
                policy, m = self._update(policy, mb)
                step_metrics.append(m)
        for name in ("hir/loss", "hir/sft_loss", "hir/contrastive_loss", "hir/entropy"):
            metrics[name] = jnp.mean(jnp.stack([m[name] for m in step_metrics]))
        metrics["train/nonfinite"] = jnp.max(jnp.stack([m["train/nonfinite"]
                                                        for m in step_metrics]))
        metrics["train/learning_rate"] = step_metrics[-1]["train/learning_rate"]
        return HirState(step=state.step + 1, policy=policy,
                        rng=jax.random.key_data(next_key), buffer=buffer), metrics


def train_hir(config: HirConfig) -> dict[str, Any]:
    """``rlhf-jax hir``: builds policy, reward, prompts and the default relabelling of
    ``config.label_texts`` and runs the rounds; returns the run summary."""
    tokenizer = load_tokenizer_for(config.data, config.model)
    return train_online(functools.partial(HirTrainer, tokenizer=tokenizer), config,
                        algorithm="hir")


__all__ = [
    "BUFFER_FIELDS",
    "HirBuffer",
    "HirConfig",
    "HirHyperParams",
    "HirState",
    "HirTrainer",
    "Relabeller",
    "RewardBucketRelabeller",
    "add_to_buffer",
    "empty_buffer",
    "hir_batch",
    "hir_train_loss",
    "prefix_prompts",
    "quantile_buckets",
    "check_labels",
    "relabeller_from_config",
    "train_hir",
]
