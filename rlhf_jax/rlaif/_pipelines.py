"""Labelling pipelines: AI preference datasets, consensus, win rates and tournaments.

"Distilled RLAIF" (Lee et al. 2023): sample response pairs from a policy, label them with an AI
judge as soft preferences, and train a reward model (or DPO) on them. The records written here
are the pairwise preference format of ``rlhf_jax.data`` (TRL's ``prompt``/``chosen``/
``rejected``, plus ``label`` = probability that chosen is preferred), so the RM and DPO trainers
read them unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from etils import epath

from rlhf_jax.generation import SamplingParams
from rlhf_jax.rlaif._agreement import Alignment, fleiss_kappa, labeler_alignment
from rlhf_jax.rlaif._consensus import consensus
from rlhf_jax.rlaif._judge import JudgeOutput, PairwiseJudge, broadcast_principles, check_texts
from rlhf_jax.rlaif._text_model import TextModel
from rlhf_jax.rlaif._winrate import RateEstimate, win_rate
from rlhf_jax.storage import is_remote

SKIP_REASONS = ("identical_responses", "empty_response", "low_confidence")


@dataclasses.dataclass(frozen=True)
class LabellingReport:
    """What a labelling run produced.

    Attributes:
      num_pairs: pairs judged.
      num_records: preference records produced.
      skipped: ``{reason: count}`` of pairs not turned into records (reasons in
        ``SKIP_REASONS``: the data loader rejects identical or empty responses).
      num_labelers: judges x principles combined by consensus.
      mean_confidence: mean of ``max(p, 1 - p)`` over the pairs.
      mean_position_bias: mean first-slot bias over labelers and pairs.
      labeler_kappa: Fleiss' kappa of the labelers' hard votes (response 1 / 2 / tie), or None
        with one labeler.
      alignment: agreement with human labels, or None without them.
    """

    num_pairs: int
    num_records: int
    skipped: dict[str, int]
    num_labelers: int
    mean_confidence: float
    mean_position_bias: float
    labeler_kappa: float | None
    alignment: Alignment | None


class LabelledPairs(NamedTuple):
    """Result of :func:`label_preferences`.

    Attributes:
      records: preference records ``{"prompt", "chosen", "rejected", "label"}``.
      preference: ``[N]`` consensus P(response 1 better) of every input pair.
      per_labeler: ``[J, N]`` each labeler's P(response 1 better).
      report: a :class:`LabellingReport`.
    """

    records: list[dict[str, Any]]
    preference: np.ndarray
    per_labeler: np.ndarray
    report: LabellingReport


def preference_records(
    prompts: Sequence[str],
    responses_1: Sequence[str],
    responses_2: Sequence[str],
    preference: Any,
    *,
    hard: bool = False,
    min_confidence: float = 0.5,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Turns soft preferences into ``rlhf_jax.data`` pairwise preference records.

    For each pair with ``p`` = P(response 1 better), the chosen response is the more probable one
    (response 1 on an exact tie) and ``label = max(p, 1 - p)`` (or 1.0 with ``hard=True``).
    Pairs whose responses are identical or empty (which the data loader rejects) or whose
    confidence ``max(p, 1 - p)`` is below ``min_confidence`` are skipped and counted.

    Args:
      prompts: ``N`` prompts.
      responses_1: ``N`` first responses.
      responses_2: ``N`` second responses.
      preference: ``[N]`` P(response 1 better).
      hard: write hard labels (1.0) instead of soft ones.
      min_confidence: confidence threshold in ``[0.5, 1]``; 0.5 keeps every pair.

    Returns:
      ``(records, skipped)`` with ``skipped`` a ``{reason: count}`` dict.
    """
    n = check_texts(prompts=prompts, responses_1=responses_1, responses_2=responses_2)
    p = np.asarray(preference, dtype=np.float64)
    if p.shape != (n,):
        raise ValueError(f"preference has shape {p.shape}, expected ({n},)")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("preference must hold probabilities in [0, 1]")
    if not 0.5 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must lie in [0.5, 1], got {min_confidence}")
    records: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    for prompt, a, b, q in zip(prompts, responses_1, responses_2, p):
        if not a.strip() or not b.strip():
            skipped["empty_response"] += 1
            continue
        if a == b:
            skipped["identical_responses"] += 1
            continue
        confidence = max(q, 1.0 - q)
        if confidence < min_confidence:
            skipped["low_confidence"] += 1
            continue
        chosen, rejected = (a, b) if q >= 0.5 else (b, a)
        records.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "label": 1.0 if hard else float(confidence),
            }
        )
    return records, dict(skipped)


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Writes records as JSON Lines (UTF-8, one object per line); returns the path."""
    path = os.fspath(path)
    target = epath.Path(path)
    if not is_remote(path):
        target.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    target.write_text(text, encoding="utf-8")
    return path


def _as_judges(judges: PairwiseJudge | Sequence[PairwiseJudge]) -> list[PairwiseJudge]:
    judges = [judges] if isinstance(judges, PairwiseJudge) else list(judges)
    if not judges:
        raise ValueError("judges is empty: at least one PairwiseJudge is needed")
    return judges


def label_preferences(
    judges: PairwiseJudge | Sequence[PairwiseJudge],
    prompts: Sequence[str],
    responses_1: Sequence[str],
    responses_2: Sequence[str],
    *,
    principles: Sequence[str] | None = None,
    method: str = "mean",
    weights: Sequence[float] | None = None,
    hard: bool = False,
    min_confidence: float = 0.5,
    human_labels: Any | None = None,
    rng: jax.Array | None = None,
    path: str | os.PathLike | None = None,
) -> LabelledPairs:
    """Labels response pairs with one or more AI judges and builds a preference dataset.

    Every judge is run under every principle (or once, without principles); each
    (judge, principle) is one labeler, and the labelers' position-debiased soft labels are
    combined with :func:`consensus`. With two or more labelers the report carries Fleiss' kappa
    of their hard votes; with ``human_labels`` it carries the AI labeler alignment
    (:func:`labeler_alignment`).

    Args:
      judges: a judge or a sequence of judges.
      prompts: ``N`` prompts.
      responses_1: ``N`` first responses.
      responses_2: ``N`` second responses.
      principles: optional principles, each a separate labeler (templates need
        ``{principle}``).
      method: consensus method (``"mean"``, ``"majority"``, ``"logit_mean"``).
      weights: ``[J]`` labeler weights, judges-major (judge 0 under every principle first).
      hard: write hard labels.
      min_confidence: skip pairs whose consensus confidence is below this.
      human_labels: optional ``[N]`` human outcomes (1, 0, 0.5 tie, NaN missing) for alignment.
      rng: PRNG key for sampled rationales; labeler ``j`` uses ``fold_in(rng, j)``.
      path: if given, the records are also written there as JSONL.

    Returns:
      A :class:`LabelledPairs`.
    """
    judges = _as_judges(judges)
    check_texts(prompts=prompts, responses_1=responses_1, responses_2=responses_2)
    labelers = list(itertools.product(judges, list(principles) if principles else [None]))
    outputs = []
    for j, (judge, principle) in enumerate(labelers):
        key = None if rng is None else jax.random.fold_in(rng, j)
        outputs.append(
            judge.judge(prompts, responses_1, responses_2, principles=principle, rng=key)
        )
    return combine_labelers(
        outputs,
        prompts,
        responses_1,
        responses_2,
        method=method,
        weights=weights,
        hard=hard,
        min_confidence=min_confidence,
        human_labels=human_labels,
        path=path,
    )


def combine_labelers(
    outputs: Sequence[JudgeOutput],
    prompts: Sequence[str],
    responses_1: Sequence[str],
    responses_2: Sequence[str],
    *,
    method: str = "mean",
    weights: Sequence[float] | None = None,
    hard: bool = False,
    min_confidence: float = 0.5,
    human_labels: Any | None = None,
    path: str | os.PathLike | None = None,
) -> LabelledPairs:
    """Consensus, agreement statistics and records from several labelers' judge outputs.

    The second half of :func:`label_preferences`, for labelers run elsewhere; arguments as there,
    with ``outputs`` one :class:`JudgeOutput` per labeler over the same ``N`` pairs.
    """
    n = check_texts(prompts=prompts, responses_1=responses_1, responses_2=responses_2)
    if not outputs:
        raise ValueError("outputs is empty: at least one labeler is needed")
    per_labeler = np.stack([np.asarray(o.preference) for o in outputs]).astype(np.float64)
    if per_labeler.shape[1] != n:
        raise ValueError(f"labeler outputs cover {per_labeler.shape[1]} pairs, expected {n}")
    preference = consensus(per_labeler, method=method, weights=weights)
    kappa = None
    if len(outputs) > 1:
        votes = np.where(per_labeler > 0.5, 0, np.where(per_labeler < 0.5, 1, 2))  # [J, N]
        table = np.stack([(votes == c).sum(axis=0) for c in range(3)], axis=1)
        kappa = fleiss_kappa(table)
    alignment = None
    if human_labels is not None:
        human = np.asarray(human_labels, dtype=np.float64)
        if human.shape != (n,):
            raise ValueError(f"human_labels has shape {human.shape}, expected ({n},)")
        alignment = labeler_alignment(preference, human)
    records, skipped = preference_records(
        prompts, responses_1, responses_2, preference, hard=hard, min_confidence=min_confidence
    )
    if path is not None:
        write_jsonl(records, path)
    report = LabellingReport(
        num_pairs=n,
        num_records=len(records),
        skipped=skipped,
        num_labelers=len(outputs),
        mean_confidence=float(np.mean(np.maximum(preference, 1 - preference))),
        mean_position_bias=float(np.mean([np.mean(o.position_bias) for o in outputs])),
        labeler_kappa=kappa,
        alignment=alignment,
    )
    return LabelledPairs(records, preference, per_labeler, report)


def sample_pairs(
    policy: TextModel,
    prompts: Sequence[str],
    sampling: SamplingParams,
    *,
    rng: jax.Array,
    stop_strings: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """Two independent samples of the policy per prompt (the pairs to be labelled).

    Args:
      policy: the policy as a :class:`TextModel`.
      prompts: ``N`` prompts.
      sampling: response width, temperature, filters (``SamplingParams``).
      rng: PRNG key (split into one key per sample).
      stop_strings: each sample is cut before the first of these.

    Returns:
      ``(responses_1, responses_2)``, ``N`` each.
    """
    check_texts(prompts=prompts)
    first, second = jax.random.split(rng)
    return (
        policy.generate(prompts, sampling, rng=first, stop_strings=stop_strings),
        policy.generate(prompts, sampling, rng=second, stop_strings=stop_strings),
    )


def judge_win_rate(
    judge: PairwiseJudge,
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    *,
    principles: str | Sequence[str | None] | None = None,
    soft: bool = True,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    rng: jax.Array | None = None,
) -> RateEstimate:
    """Win rate of policy A's responses over policy B's under a judge, with a bootstrap CI.

    The judge's position-debiased P(A better) on each prompt is averaged (``soft=True``) or
    thresholded (wins 1, ties 1/2, losses 0), see :func:`win_rate`.
    """
    out = judge.judge(prompts, responses_a, responses_b, principles=principles, rng=rng)
    return win_rate(
        out.preference, soft=soft, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed
    )


def tournament(
    judge: PairwiseJudge,
    prompts: Sequence[str],
    responses: Mapping[Hashable, Sequence[str]],
    *,
    principles: str | Sequence[str | None] | None = None,
    rng: jax.Array | None = None,
) -> list[tuple[Hashable, Hashable, float]]:
    """Round-robin judge comparisons of several players' responses, as rating matches.

    Every pair of players is compared on every prompt, all in one batched judge call.

    Args:
      judge: the pairwise judge.
      prompts: ``N`` prompts.
      responses: ``{player: N responses}`` (at least two players).
      principles: as for :meth:`PairwiseJudge.judge`, per prompt.
      rng: PRNG key for sampled rationales.

    Returns:
      ``(player_a, player_b, P(a better))`` matches for :func:`elo_ratings` and
      :func:`bradley_terry_ratings`.
    """
    players = list(responses)
    if len(players) < 2:
        raise ValueError(f"a tournament needs at least two players, got {players}")
    n = check_texts(prompts=prompts)
    for name in players:
        if len(responses[name]) != n:
            raise ValueError(f"player {name!r} has {len(responses[name])} responses for {n} prompts")
    per_prompt = broadcast_principles(principles, n)
    pairs = list(itertools.combinations(players, 2))
    ps, r1, r2, pr = [], [], [], []
    for a, b in pairs:
        ps += list(prompts)
        r1 += list(responses[a])
        r2 += list(responses[b])
        pr += per_prompt
    use_principles = None if all(x is None for x in pr) else pr
    p = judge.judge(ps, r1, r2, principles=use_principles, rng=rng).preference
    matches = []
    for k, (a, b) in enumerate(pairs):
        for i in range(n):
            matches.append((a, b, float(p[k * n + i])))
    return matches
