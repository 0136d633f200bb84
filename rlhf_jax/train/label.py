"""`rlhf-jax label`: an AI-labelled preference dataset from prompts plus policy samples, or from
existing preference pairs ("distilled RLAIF", Lee et al. 2023).

    rlhf-jax label --input.path prompts.jsonl --policy.source runs/sft \\
        --judge.sources runs/judge_large hf/judge --output-dir runs/labels
    rlhf-jax rm --data.path runs/labels/preferences.jsonl ...   # or rlhf-jax dpo

Steps:

1. Input (`rlhf_jax.train.feedback_io.FeedbackInput`): prompts, each turned into a pair of two
   policy samples (`rlhf_jax.rlaif.sample_pairs`); or preference pairs (``preference`` / ``hh``
   records, or a synthetic task's pairs labelled by simulated raters), shown to the judges in a
   random order per pair (drawn from the seed), so that the agreement report is not confounded
   with position.
2. Labelers: every judge model under every principle (`principles`, plus the preference
   questions of `constitution`) is one labeler (a `rlhf_jax.rlaif.PairwiseJudge`). Each gives a
   soft preference P(response 1 better) from its answer-token probabilities, position-debiased
   over both presentation orders (`judge.position_debias`), optionally after few-shot exemplars
   and a chain-of-thought rationale (`judge.template`).
3. Consensus (`rlhf_jax.rlaif.combine_labelers`): the labelers' preferences are combined
   (`consensus`: mean, majority or logit mean, with `weights`), and each pair becomes a record
   whose chosen response is the preferred one and whose ``label`` is the consensus probability
   that it is preferred (soft labels; 1.0 with `hard_labels`).

Outputs in `output_dir`:

- ``preferences.jsonl``: ``{"prompt", "chosen", "rejected", "label"}`` records, the preference
  format `rlhf-jax rm` and `rlhf-jax dpo` read (``--data.path``).
- ``judgements.jsonl``: one line per pair: its origin, texts, status (``"record"`` or why it was
  skipped), the consensus and every labeler's preference in both orders, the human and gold
  outcomes (when known) and the rationales (with chain of thought).
- ``summary.json`` (also returned and printed): counts, skips per stage and reason (with the
  first few origins), labelers, position bias, and the agreement report.
- ``config.yaml``: the resolved config.

Skipped, counted per reason: bad input records (`rlhf_jax.data` reasons), conversation records,
prompts too long for the policy (``prompt_too_long``), pairs whose labeler prompt is too long for
a judge (``judge_prompt_too_long``) - these raise instead under ``input.on_error=raise`` - and
pairs whose responses are identical or empty or whose consensus confidence is below
`min_confidence` (``identical_responses``, ``empty_response``, ``low_confidence``).

Agreement report: for pairs with human labels (a pair input's chosen response, or its ``label``
field: > 0.5 chosen, 0.5 tie, < 0.5 rejected) and, with a synthetic task, gold labels (the task's
gold reward of the two responses): the AI labeler alignment (`rlhf_jax.rlaif.labeler_alignment`)
and Cohen's kappa of the consensus and of each labeler, over pairs whose reference is not a tie;
plus Fleiss' kappa among the labelers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
from etils import epath

from rlhf_jax import sharding
from rlhf_jax.data import PreferenceExample
from rlhf_jax.data.synthetic import SyntheticTask
from rlhf_jax.generation import SamplingParams
from rlhf_jax.rlaif import (
    JudgeOutput,
    LabelledPairs,
    PairwiseJudge,
    TextModel,
    combine_labelers,
    default_constitution,
    load_constitution,
    preference_records,
    sample_pairs,
    write_jsonl,
)
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.storage import check_storage
from rlhf_jax.train.feedback_io import (
    SUMMARY_FILE,
    FeedbackInput,
    SkipLog,
    load_input,
    prepare_outputs,
    write_json,
)
from rlhf_jax.train.judging import (
    JudgeSpec,
    SingleOrderJudge,
    agreement,
    judge_overflow,
    make_judges,
    token_count,
)
from rlhf_jax.train.model_source import LMSpec, LoadedLM, describe, load_lm

PREFERENCES_FILE = "preferences.jsonl"
JUDGEMENTS_FILE = "judgements.jsonl"


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How the policy samples each prompt's two responses."""

    max_new_tokens: int = 64
    """Tokens generated per response (at most)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float | None = None
    """Nucleus sampling threshold (None: off)."""
    stop_strings: tuple[str, ...] = ()
    """A response is cut before the first of these."""


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """Label preference pairs with AI judges (RLAIF): prompts plus policy samples, or existing
    pairs, into preferences.jsonl for `rlhf-jax rm` / `rlhf-jax dpo`."""

    output_dir: str = "runs/label"
    """Where preferences.jsonl, judgements.jsonl, summary.json and config.yaml go."""
    seed: int = 0
    """Seed of the policy's samples, rationales, the pairs' presentation order, synthetic data."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in `output_dir` (otherwise that is an error)."""
    input: FeedbackInput = FeedbackInput()
    policy: LMSpec = LMSpec()
    """The policy that samples the pairs (prompt inputs only)."""
    sampling: SamplingSpec = SamplingSpec()
    judge: JudgeSpec = JudgeSpec()
    principles: tuple[str, ...] = ()
    """Principles (or rubrics), each one more labeler per judge; the judge template needs
    {principle} (e.g. judge.template.preset=constitutional)."""
    constitution: str | None = None
    """A constitution file (YAML/JSON/JSONL), or "default" for the packaged one: the preference
    question of each of its principles is one more principle."""
    consensus: Literal["mean", "majority", "logit_mean"] = "mean"
    """How the labelers' soft preferences are combined (`rlhf_jax.rlaif.consensus`)."""
    weights: tuple[float, ...] = ()
    """Labeler weights, judges-major (judge 0 under every principle first); empty: equal."""
    hard_labels: bool = False
    """Write label 1.0 for the preferred response instead of the soft consensus probability."""
    min_confidence: float = 0.5
    """Skip pairs whose consensus confidence max(p, 1 - p) is below this (0.5 keeps all)."""
    human_labels: bool = True
    """Compare with the human labels of pair inputs (their chosen response) in the report."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh the models are sharded on (batches split over data x fsdp)."""


class PairSet(NamedTuple):
    """Response pairs to label.

    Attributes:
      prompts, responses_1, responses_2: ``N`` strings each.
      origins: where each pair came from (``file:line``).
      human: ``[N]`` human outcomes for response 1 (1, 0, 0.5 tie, NaN unknown) or None.
      gold: ``[N]`` gold outcomes for response 1 or None.
    """

    prompts: list[str]
    responses_1: list[str]
    responses_2: list[str]
    origins: list[str]
    human: np.ndarray | None
    gold: np.ndarray | None

    def subset(self, keep: Sequence[int]) -> PairSet:
        keep = list(keep)
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        arr = lambda x: None if x is None else np.asarray(x)[keep]  # noqa: E731
        return PairSet(pick(self.prompts), pick(self.responses_1), pick(self.responses_2),
                       pick(self.origins), arr(self.human), arr(self.gold))


class Labeler(NamedTuple):
    """One labeler: a judge (and its name) under a principle (or none)."""

    name: str
    judge: PairwiseJudge | SingleOrderJudge
    principle: str | None


class LabelResult(NamedTuple):
    """What `label_pair_set` returns.

    Attributes:
      labelled: the `rlhf_jax.rlaif.LabelledPairs` of the consensus (records, preferences,
        per-labeler preferences, report).
      outputs: each labeler's `JudgeOutput`.
      status: per pair, ``"record"`` or the reason it was skipped.
      report: the agreement and position-bias report (JSON-able).
    """

    labelled: LabelledPairs
    outputs: list[JudgeOutput]
    status: list[str]
    report: dict[str, Any]


def gold_outcomes(task: SyntheticTask, pairs_prompts: Sequence[str],
                  responses_1: Sequence[str], responses_2: Sequence[str]) -> np.ndarray:
    """``[N]`` 1 / 0 / 0.5 as the task's gold reward prefers response 1 / response 2 / neither."""
    diff = (task.gold_reward(pairs_prompts, responses_1)
            - task.gold_reward(pairs_prompts, responses_2))
    return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))


def make_labelers(judges: Sequence[PairwiseJudge | SingleOrderJudge], names: Sequence[str],
                  principles: Sequence[str]) -> list[Labeler]:
    """Every judge under every principle (or once without), judges-major."""
    if principles and not all(j.template.uses_principle for j in judges):
        raise ValueError("principles need a judge template with a {principle} placeholder: set "
                         "judge.template.preset=constitutional or put {principle} in "
                         "judge.template.preamble / query")
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # the same source twice gets "#2", "#3", ...
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return [Labeler(name if p is None else f"{name} | {p}", judge, p)
            for judge, name in zip(judges, unique) for p in (list(principles) or [None])]


def label_pair_set(
    labelers: Sequence[Labeler],
    pairs: PairSet,
    *,
    consensus: str = "mean",
    weights: Sequence[float] | None = None,
    hard: bool = False,
    min_confidence: float = 0.5,
    rng: jax.Array | None = None,
) -> LabelResult:
    """Judges every pair with every labeler, combines them and reports agreement.

    Args:
      labelers: the labelers (`make_labelers`).
      pairs: ``N >= 1`` pairs.
      consensus: `rlhf_jax.rlaif.consensus` method.
      weights: ``[J]`` labeler weights or None.
      hard: hard labels.
      min_confidence: skip pairs whose consensus confidence is below this.
      rng: PRNG key for sampled rationales; labeler ``j`` uses ``fold_in(rng, j)``.

    Returns:
      A `LabelResult`; ``labelled.records`` are in pair order (skipped pairs left out).
    """
    if not labelers:
        raise ValueError("no labeler: give at least one judge")
    outputs = []
    for j, lab in enumerate(labelers):
        key = None if rng is None else jax.random.fold_in(rng, j)
        outputs.append(lab.judge.judge(pairs.prompts, pairs.responses_1, pairs.responses_2,
                                       principles=lab.principle, rng=key))
    labelled = combine_labelers(outputs, pairs.prompts, pairs.responses_1, pairs.responses_2,
                                method=consensus, weights=list(weights) if weights else None,
                                hard=hard, min_confidence=min_confidence)
    status = pair_status(pairs.prompts, pairs.responses_1, pairs.responses_2,
                         labelled.preference, hard=hard, min_confidence=min_confidence)
    report: dict[str, Any] = {
        "labelers": [lab.name for lab in labelers],
        "fleiss_kappa": _finite_or_none(labelled.report.labeler_kappa),
        "mean_confidence": labelled.report.mean_confidence,
        "position": {lab.name: position_stats(out) for lab, out in zip(labelers, outputs)},
    }
    for kind, reference in (("human", pairs.human), ("gold", pairs.gold)):
        if reference is None:
            report[kind] = None
            continue
        report[kind] = {
            "consensus": agreement(labelled.preference, reference),
            "labelers": {lab.name: agreement(out.preference, reference)
                         for lab, out in zip(labelers, outputs)},
        }
    return LabelResult(labelled, outputs, status, report)


def _finite_or_none(x: float | None) -> float | None:
    """None for a missing or NaN statistic (summary.json stays strict JSON)."""
    return None if x is None or not np.isfinite(x) else float(x)


def pair_status(prompts: Sequence[str], responses_1: Sequence[str], responses_2: Sequence[str],
                preference: Any, *, hard: bool, min_confidence: float) -> list[str]:
    """Per pair, ``"record"`` or the reason `rlhf_jax.rlaif.preference_records` skips it."""
    status = []
    for i, q in enumerate(np.asarray(preference, np.float64)):
        records, skipped = preference_records([prompts[i]], [responses_1[i]], [responses_2[i]],
                                              [q], hard=hard, min_confidence=min_confidence)
        status.append("record" if records else next(iter(skipped)))
    return status


def label_skip_problem(reason: str) -> str:
    """The sentence a `pair_status` reason stands for."""
    return {"identical_responses": "the two responses are identical",
            "empty_response": "a response is empty",
            "low_confidence": "the consensus confidence is below min_confidence"}.get(reason,
                                                                                      reason)


def position_stats(out: JudgeOutput) -> dict[str, float]:
    """Mean first-slot bias, how often the two presentation orders pick different responses,
    and the mean probability mass on the answer tokens."""
    forward = np.asarray(out.forward, np.float64)
    reverse = np.asarray(out.reverse, np.float64)
    flips = np.sign(forward - 0.5) != np.sign(0.5 - reverse)
    return {"mean_bias": float(np.mean(out.position_bias)),
            "order_disagreement": float(np.mean(flips)),
            "mean_answer_mass": float(np.mean(out.answer_mass))}


def _human_outcome(example: PreferenceExample) -> float:
    """Outcome for the chosen response: its label's side (> 0.5 chosen, 0.5 tie, < 0.5 not)."""
    return 1.0 if example.label > 0.5 else (0.5 if example.label == 0.5 else 0.0)


def _pairs_from_examples(examples: Sequence[PreferenceExample], *, seed: int,
                         human_labels: bool) -> PairSet:
    """Pairs in a random presentation order per pair; human outcomes follow the order."""
    swap = np.random.default_rng(seed).uniform(size=len(examples)) < 0.5
    r1, r2, human = [], [], []
    for ex, s in zip(examples, swap):
        h = _human_outcome(ex)
        r1.append(ex.rejected if s else ex.chosen)
        r2.append(ex.chosen if s else ex.rejected)
        human.append(1.0 - h if s else h)
    return PairSet([ex.prompt for ex in examples], r1, r2, [ex.origin for ex in examples],
                   np.asarray(human) if human_labels else None, None)


def _sample(config: LabelConfig, policy: LoadedLM, examples: Sequence[Any], skips: SkipLog,
            mesh: jax.sharding.Mesh, rng: jax.Array) -> PairSet:
    """Two policy samples for every prompt that fits the policy's context."""
    spec, sampling = config.policy, config.sampling
    if sampling.max_new_tokens < 1:
        raise ValueError(f"sampling.max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
    lm = TextModel(policy.model, policy.tokenizer, batch_size=spec.batch_size, mesh=mesh,
                   max_length=spec.max_length, min_bucket=spec.min_bucket)
    kept = []
    for ex in examples:
        n = token_count(policy.tokenizer, ex.prompt)
        if lm.max_length is not None and n + sampling.max_new_tokens > lm.max_length:
            skips.error("sampling", "prompt_too_long", ex.origin,
                        f"the prompt has {n} tokens; with sampling.max_new_tokens="
                        f"{sampling.max_new_tokens} that exceeds the policy's max_length="
                        f"{lm.max_length}")
        else:
            kept.append(ex)
    prompts = [ex.prompt for ex in kept]
    if not prompts:
        return PairSet([], [], [], [], None, None)
    params = SamplingParams(max_new_tokens=sampling.max_new_tokens,
                            temperature=sampling.temperature, top_p=sampling.top_p)
    r1, r2 = sample_pairs(lm, prompts, params, rng=rng, stop_strings=sampling.stop_strings)
    return PairSet(prompts, r1, r2, [ex.origin for ex in kept], None, None)


def _principles(config: LabelConfig) -> list[str]:
    principles = list(config.principles)
    if config.constitution is not None:
        constitution = (default_constitution() if config.constitution == "default"
                        else load_constitution(config.constitution))
        principles += [p.preference_question for p in constitution.principles]
    return principles


def _judgement_lines(pairs: PairSet, status: Sequence[str], result: LabelResult | None,
                     labelers: Sequence[Labeler], judged: Sequence[int]) -> list[dict[str, Any]]:
    """One JSON-able line per pair (judged or not)."""
    where = {i: k for k, i in enumerate(judged)}
    lines = []
    for i in range(len(pairs.prompts)):
        line: dict[str, Any] = {
            "origin": pairs.origins[i], "prompt": pairs.prompts[i],
            "response_1": pairs.responses_1[i], "response_2": pairs.responses_2[i],
            "status": status[i],
        }
        for kind in ("human", "gold"):
            ref = getattr(pairs, kind)
            if ref is not None:
                line[kind] = None if np.isnan(ref[i]) else float(ref[i])
        k = where.get(i)
        if result is not None and k is not None:
            line["preference"] = float(result.labelled.preference[k])
            line["labelers"] = {
                lab.name: {"preference": float(out.preference[k]),
                           "forward": float(out.forward[k]), "reverse": float(out.reverse[k])}
                for lab, out in zip(labelers, result.outputs)
            }
            for lab, out in zip(labelers, result.outputs):
                if out.rationales is not None:
                    line["labelers"][lab.name]["rationales"] = [out.rationales[0][k],
                                                                out.rationales[1][k]]
        lines.append(line)
    return lines


def run_label(config: LabelConfig) -> dict[str, Any]:
    """Runs `rlhf-jax label` (module docstring); returns the summary (also in summary.json)."""
    check_storage(config)
    if not 0.5 <= config.min_confidence <= 1.0:
        raise ValueError(f"min_confidence must lie in [0.5, 1], got {config.min_confidence}")
    if not config.judge.sources:
        raise ValueError("judge.sources is empty: name at least one judge model (a run "
                         "directory, a Hugging Face directory or preset:NAME)")
    pairs_input = config.input.format != "prompt"
    if not pairs_input and config.policy.source is None:
        raise ValueError("input.format=prompt needs policy.source, the policy that samples the "
                         "pairs (or give pairs: input.format=preference or hh)")
    principles = _principles(config)
    num_labelers = len(config.judge.sources) * max(len(principles), 1)
    if config.weights and len(config.weights) != num_labelers:
        raise ValueError(f"weights has {len(config.weights)} entries for {num_labelers} "
                         f"labelers ({len(config.judge.sources)} judges x "
                         f"{max(len(principles), 1)} principles)")
    paths = prepare_outputs(config.output_dir, (PREFERENCES_FILE, JUDGEMENTS_FILE),
                            overwrite=config.overwrite, config=config)
    skips = SkipLog(config.input.on_error)
    data = load_input(config.input, skips=skips, seed=config.seed)
    mesh = sharding.make_mesh(config.mesh)
    k_sample, k_judge = jax.random.split(jax.random.key(config.seed))

    policy = None
    if pairs_input:
        pairs = _pairs_from_examples(data.examples, seed=config.seed,
                                     human_labels=config.human_labels)
    else:
        policy = load_lm(config.policy.source, tokenizer=config.policy.tokenizer,
                         dtype=config.policy.dtype, seed=config.seed, mesh=mesh,
                         field="policy.source")
        pairs = _sample(config, policy, data.examples, skips, mesh, k_sample)
    if data.task is not None and pairs.prompts:
        pairs = pairs._replace(gold=gold_outcomes(data.task, pairs.prompts, pairs.responses_1,
                                                  pairs.responses_2))

    same_load = (policy is not None and config.judge.tokenizer == config.policy.tokenizer
                 and config.judge.dtype == config.policy.dtype)
    judges, judge_models = make_judges(config.judge, mesh=mesh, seed=config.seed + 1,
                                       loaded=[policy] if same_load else ())
    labelers = make_labelers(judges, list(config.judge.sources), principles)

    status = ["judged"] * len(pairs.prompts)
    for lab in labelers if pairs.prompts else ():
        problems = judge_overflow(lab.judge, pairs.prompts, pairs.responses_1,
                                  pairs.responses_2, principle=lab.principle)
        for i, problem in enumerate(problems):
            if problem is not None and status[i] == "judged":
                skips.error("judging", "judge_prompt_too_long", pairs.origins[i],
                            f"{problem} (labeler {lab.name!r})")
                status[i] = "judge_prompt_too_long"
    judged = [i for i, s in enumerate(status) if s == "judged"]
    result = None
    records: list[dict[str, Any]] = []
    report: dict[str, Any] = {"labelers": [lab.name for lab in labelers]}
    if judged:
        subset = pairs.subset(judged)
        result = label_pair_set(labelers, subset, consensus=config.consensus,
                                weights=config.weights or None, hard=config.hard_labels,
                                min_confidence=config.min_confidence, rng=k_judge)
        records = result.labelled.records
        report = result.report
        for i, s in zip(judged, result.status):
            status[i] = s
            if s != "record":
                skips.skip("labels", s, pairs.origins[i], label_skip_problem(s))
    write_jsonl(records, paths[PREFERENCES_FILE])
    write_jsonl(_judgement_lines(pairs, status, result, labelers, judged),
                paths[JUDGEMENTS_FILE])
    summary = {
        "command": "label",
        "output_dir": config.output_dir,
        "files": {**paths, SUMMARY_FILE: os.fspath(epath.Path(config.output_dir, SUMMARY_FILE))},
        "num_read": data.num_read,
        "num_examples": len(data.examples),
        "num_pairs": len(pairs.prompts),
        "num_judged": len(judged),
        "num_records": len(records),
        "skipped": skips.total,
        "skipped_by_stage": skips.by_stage(),
        "first_skipped": list(skips.first),
        "policy": describe(policy) if policy is not None else None,
        "judges": [describe(m) for m in judge_models],
        "consensus": config.consensus,
        "position_debias": config.judge.position_debias,
        "mean_label": float(np.mean([r["label"] for r in records])) if records else None,
        **report,
    }
    write_json(summary, os.fspath(epath.Path(config.output_dir, SUMMARY_FILE)))
    return summary


__all__ = [
    "JUDGEMENTS_FILE",
    "LabelConfig",
    "LabelResult",
    "Labeler",
    "PREFERENCES_FILE",
    "PairSet",
    "SamplingSpec",
    "gold_outcomes",
    "label_pair_set",
    "label_skip_problem",
    "make_labelers",
    "pair_status",
    "position_stats",
    "run_label",
]
