"""Simulated human raters: a population labelling pairs and rankings from a task's gold reward.

Rater `m` prefers response `a` (shown first) to `b` with the Bradley–Terry probability

.. math::
  P_m(a \\succ b) = (1 - \\epsilon)\\, \\sigma\\Big(\\frac{g_a - g_b}{\\tau_m} + \\beta^{pos}_m
      + \\beta^{len}_m (n_a - n_b)\\Big) + \\frac{\\epsilon}{2}

where `g` is the gold reward, `n` the response length in characters, `tau_m` a per-rater
temperature (log-normal around `temperature`: inter-rater disagreement), `beta^pos_m` a position
bias towards the first-shown response, `beta^len_m` a length bias and `epsilon` a lapse rate
(random votes). Each item is labelled by `raters_per_item` raters drawn without replacement from
the pool; their votes are combined by majority (hard label, ties broken by a fair coin) or by mean
(soft label = fraction of votes). K-way rankings use the Plackett–Luce extension (Gumbel-max over
the same per-rater utilities) and a Borda (mean-rank) consensus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from rlhf_jax.data.synthetic._tasks import Rng, SyntheticTask, _rng


@dataclasses.dataclass(frozen=True)
class RaterConfig:
    """Rater population. See the module docstring for the model."""

    num_raters: int = 8
    raters_per_item: int = 3
    temperature: float = 0.1
    temperature_spread: float = 0.3
    position_bias_std: float = 0.0
    length_bias_mean: float = 0.0
    length_bias_std: float = 0.0
    lapse_rate: float = 0.0
    consensus: Literal["majority", "mean"] = "majority"

    def __post_init__(self):
        if self.num_raters < 1 or not 1 <= self.raters_per_item <= self.num_raters:
            raise ValueError(
                "need 1 <= raters_per_item <= num_raters, got "
                f"raters_per_item={self.raters_per_item}, num_raters={self.num_raters}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.lapse_rate <= 1.0:
            raise ValueError(f"lapse_rate must be in [0, 1], got {self.lapse_rate}")
        if self.consensus not in ("majority", "mean"):
            raise ValueError(f"consensus must be 'majority' or 'mean', got {self.consensus!r}")


class RaterPool(NamedTuple):
    """Per-rater parameters, each `[M]`, and the shared lapse rate."""

    temperature: np.ndarray
    position_bias: np.ndarray
    length_bias: np.ndarray
    lapse_rate: float


class RatingStats(NamedTuple):
    """How well the simulated labels track the gold reward.

    - `gold_agreement`: fraction of items whose consensus label picks the gold-preferred
      response (soft labels count `label`; gold ties excluded). This is the ceiling for a reward
      model's accuracy measured against these labels' gold preference.
    - `rater_gold_agreement`: the same for individual votes.
    - `inter_rater_agreement`: fraction of pairs of raters on the same item who agree.
    """

    num_items: int
    num_gold_ties: int
    gold_agreement: float
    rater_gold_agreement: float
    inter_rater_agreement: float


def make_rater_pool(config: RaterConfig, rng: Rng) -> RaterPool:
    """Samples `config.num_raters` raters."""
    rng = _rng(rng)
    m = config.num_raters
    return RaterPool(
        temperature=config.temperature * np.exp(config.temperature_spread * rng.standard_normal(m)),
        position_bias=config.position_bias_std * rng.standard_normal(m),
        length_bias=config.length_bias_mean + config.length_bias_std * rng.standard_normal(m),
        lapse_rate=float(config.lapse_rate),
    )


def _assign_raters(rng: np.random.Generator, n: int, pool: RaterPool, per_item: int) -> np.ndarray:
    m = len(pool.temperature)
    return np.argsort(rng.uniform(size=(n, m)), axis=1)[:, :per_item]


def preference_probability(
    pool: RaterPool,
    rater_ids: np.ndarray,
    *,
    gold_a: np.ndarray,
    gold_b: np.ndarray,
    length_a: np.ndarray,
    length_b: np.ndarray,
) -> np.ndarray:
    """`P_m(a > b)` `[N, J]` for raters `rater_ids [N, J]` and items with gold rewards `[N]`."""
    t = pool.temperature[rater_ids]
    diff = (np.asarray(gold_a) - np.asarray(gold_b))[:, None]
    dlen = (np.asarray(length_a) - np.asarray(length_b))[:, None].astype(np.float64)
    logit = diff / t + pool.position_bias[rater_ids] + pool.length_bias[rater_ids] * dlen
    sig = 0.5 * (1.0 + np.tanh(0.5 * logit))
    return (1.0 - pool.lapse_rate) * sig + 0.5 * pool.lapse_rate


def _consensus(votes: np.ndarray, method: str, rng: np.random.Generator) -> np.ndarray:
    """Probability that `a` is preferred `[N]` from boolean votes `[N, J]`."""
    mean = votes.mean(axis=1)
    if method == "mean":
        return mean
    coin = rng.uniform(size=len(mean)) < 0.5
    return np.where(mean > 0.5, 1.0, np.where(mean < 0.5, 0.0, coin.astype(np.float64)))


def _agreement(votes: np.ndarray) -> float:
    j = votes.shape[1]
    if j < 2:
        return 1.0
    k = votes.sum(axis=1)
    agree = k * (k - 1) / 2 + (j - k) * (j - k - 1) / 2
    return float(np.mean(agree / (j * (j - 1) / 2)))


def label_pairs(
    task: SyntheticTask,
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    *,
    pool: RaterPool,
    rng: Rng,
    raters_per_item: int = 3,
    consensus: Literal["majority", "mean"] = "majority",
) -> tuple[list[dict[str, Any]], RatingStats]:
    """Labels pairs with the rater pool; returns preference records and statistics.

    Records are ``{"prompt", "chosen", "rejected", "label", "margin", "gold_chosen",
    "gold_rejected"}``: `chosen` is the consensus-preferred response, `label >= 0.5` the
    consensus probability that it is preferred (1.0 under majority), and `margin` the agreement
    strength `|2 * mean_vote - 1|`.
    """
    rng = _rng(rng)
    n = len(prompts)
    if not len(responses_a) == len(responses_b) == n:
        raise ValueError(
            f"prompts, responses_a, responses_b differ in length: "
            f"{n}, {len(responses_a)}, {len(responses_b)}"
        )
    if raters_per_item > len(pool.temperature):
        raise ValueError(
            f"raters_per_item={raters_per_item} exceeds the pool size {len(pool.temperature)}"
        )
    gold_a = task.gold_reward(prompts, responses_a)
    gold_b = task.gold_reward(prompts, responses_b)
    len_a = np.asarray([len(r) for r in responses_a])
    len_b = np.asarray([len(r) for r in responses_b])
    raters = _assign_raters(rng, n, pool, raters_per_item)
    p = preference_probability(
        pool, raters, gold_a=gold_a, gold_b=gold_b, length_a=len_a, length_b=len_b
    )
    votes = rng.uniform(size=p.shape) < p
    prob_a = _consensus(votes, consensus, rng)
    strength = np.abs(2.0 * votes.mean(axis=1) - 1.0)
    records = []
    for i in range(n):
        a_wins = prob_a[i] >= 0.5
        chosen, rejected = (responses_a[i], responses_b[i]) if a_wins else (responses_b[i], responses_a[i])
        g_c, g_r = (gold_a[i], gold_b[i]) if a_wins else (gold_b[i], gold_a[i])
        records.append(
            {
                "prompt": prompts[i],
                "chosen": chosen,
                "rejected": rejected,
                "label": float(prob_a[i] if a_wins else 1.0 - prob_a[i]),
                "margin": float(strength[i]),
                "gold_chosen": float(g_c),
                "gold_rejected": float(g_r),
            }
        )
    gold_pref = np.sign(gold_a - gold_b)
    decided = gold_pref != 0
    gold_a_better = gold_pref[decided] > 0
    label_agree = np.where(gold_a_better, prob_a[decided], 1.0 - prob_a[decided])
    vote_agree = np.where(gold_a_better[:, None], votes[decided], ~votes[decided])
    stats = RatingStats(
        num_items=n,
        num_gold_ties=int((~decided).sum()),
        gold_agreement=float(label_agree.mean()) if decided.any() else float("nan"),
        rater_gold_agreement=float(vote_agree.mean()) if decided.any() else float("nan"),
        inter_rater_agreement=_agreement(votes),
    )
    return records, stats


ResponseSampler = Callable[[np.random.Generator, Sequence[str]], list[str]]


def make_preference_dataset(
    task: SyntheticTask,
    *,
    num_pairs: int,
    rater_config: RaterConfig = RaterConfig(),
    seed: int = 0,
    sample_responses: ResponseSampler | None = None,
) -> tuple[list[dict[str, Any]], RatingStats]:
    """Preference records for `num_pairs` fresh prompts, each with two sampled responses.

    Responses come from `sample_responses(rng, prompts)` (default: the task's base distribution);
    pairs with identical responses are resampled (up to 10 times) so chosen != rejected.
    """
    rng = np.random.default_rng(seed)
    sampler = sample_responses or task.sample_responses
    pool = make_rater_pool(rater_config, rng)
    prompts = task.sample_prompts(rng, num_pairs)
    resp_a = sampler(rng, prompts)
    resp_b = sampler(rng, prompts)
    for _ in range(10):
        same = [i for i in range(num_pairs) if resp_a[i] == resp_b[i]]
        if not same:
            break
        redo = sampler(rng, [prompts[i] for i in same])
        for i, r in zip(same, redo):
            resp_b[i] = r
    return label_pairs(
        task,
        prompts,
        resp_a,
        resp_b,
        pool=pool,
        rng=rng,
        raters_per_item=rater_config.raters_per_item,
        consensus=rater_config.consensus,
    )


def make_ranking_dataset(
    task: SyntheticTask,
    *,
    num_prompts: int,
    num_responses: int = 4,
    rater_config: RaterConfig = RaterConfig(),
    seed: int = 0,
    sample_responses: ResponseSampler | None = None,
) -> tuple[list[dict[str, Any]], RatingStats]:
    """K-way ranking records ``{"prompt", "responses", "ranks", "gold"}`` (rank 0 = best).

    Each of `raters_per_item` raters ranks the K responses by Plackett–Luce sampling (Gumbel-max)
    of utilities `g_k / tau_m + beta^len_m n_k` (+ `beta^pos_m` for the first response; a lapse
    gives a uniformly random ranking); the consensus is the Borda ranking by mean rank (ties broken
    at random). `gold_agreement` is the fraction of gold-ordered response pairs (gold ties
    excluded) that the consensus ranking orders the same way.
    """
    if num_responses < 2:
        raise ValueError(f"num_responses must be >= 2, got {num_responses}")
    rng = np.random.default_rng(seed)
    sampler = sample_responses or task.sample_responses
    pool = make_rater_pool(rater_config, rng)
    prompts = task.sample_prompts(rng, num_prompts)
    k = num_responses
    responses = [sampler(rng, prompts) for _ in range(k)]
    gold = np.stack([task.gold_reward(prompts, r) for r in responses], axis=1)  # [N, K]
    lengths = np.asarray([[len(r[i]) for r in responses] for i in range(num_prompts)], np.float64)
    raters = _assign_raters(rng, num_prompts, pool, rater_config.raters_per_item)  # [N, J]
    t = pool.temperature[raters][..., None]
    util = gold[:, None, :] / t + pool.length_bias[raters][..., None] * lengths[:, None, :]
    util[..., 0] += pool.position_bias[raters]
    util = util + rng.gumbel(size=util.shape)
    lapse = rng.uniform(size=raters.shape) < pool.lapse_rate
    util = np.where(lapse[..., None], rng.uniform(size=util.shape), util)
    rater_ranks = np.argsort(np.argsort(-util, axis=-1), axis=-1)  # [N, J, K]
    mean_rank = rater_ranks.mean(axis=1) + 1e-6 * rng.uniform(size=(num_prompts, k))
    ranks = np.argsort(np.argsort(mean_rank, axis=-1), axis=-1)
    concordant, total, rater_concordant, rater_total = 0, 0, 0, 0
    pair_votes = []
    for a in range(k):
        for b in range(a + 1, k):
            g = np.sign(gold[:, a] - gold[:, b])
            dec = g != 0
            prefers_a = ranks[:, a] < ranks[:, b]
            concordant += int(((prefers_a == (g > 0)) & dec).sum())
            total += int(dec.sum())
            r_pref = rater_ranks[:, :, a] < rater_ranks[:, :, b]
            rater_concordant += int(((r_pref == (g > 0)[:, None]) & dec[:, None]).sum())
            rater_total += int(dec.sum()) * raters.shape[1]
            pair_votes.append(r_pref)
    records = [
        {
            "prompt": prompts[i],
            "responses": [responses[j][i] for j in range(k)],
            "ranks": [int(x) for x in ranks[i]],
            "gold": [float(x) for x in gold[i]],
        }
        for i in range(num_prompts)
    ]
    stats = RatingStats(
        num_items=num_prompts,
        num_gold_ties=num_prompts * k * (k - 1) // 2 - total,
        gold_agreement=concordant / total if total else float("nan"),
        rater_gold_agreement=rater_concordant / rater_total if rater_total else float("nan"),
        inter_rater_agreement=float(np.mean([_agreement(v) for v in pair_votes])),
    )
    return records, stats


def make_prompt_dataset(task: SyntheticTask, *, num_prompts: int, seed: int = 0) -> list[dict]:
    """Prompt-only records ``{"prompt"}`` for RL."""
    return [{"prompt": p} for p in task.sample_prompts(np.random.default_rng(seed), num_prompts)]


def make_sft_dataset(task: SyntheticTask, *, num_examples: int, seed: int = 0) -> list[dict]:
    """SFT records ``{"prompt", "completion"}`` from the task's noisy base distribution."""
    return task.sft_records(np.random.default_rng(seed), num_examples)
