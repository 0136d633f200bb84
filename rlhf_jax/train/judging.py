"""AI judges from config: the pairwise judge's prompt template, its models and options, and the
checks and statistics the data-making commands (`rlhf-jax label`, `rlhf-jax cai`) share.

- `JudgeTemplateSpec` -> `rlhf_jax.rlaif.PairwiseTemplate` (`build_template`): a preset (Lee et
  al.'s "Preferred Response=" prompt, or Bai et al.'s principle-conditioned multiple choice),
  chain of thought, few-shot exemplars from a file (`rlhf_jax.rlaif.load_exemplars`), and
  overrides of every template field.
- `JudgeSpec` -> one `rlhf_jax.rlaif.PairwiseJudge` per model source (`make_judges`), loaded by
  `rlhf_jax.train.model_source.load_lm`.
- `SingleOrderJudge`: a judge without position debiasing (the preference read from the given
  presentation order only; the swapped order is still scored, for the position-bias report).
- `judge_overflow`: which pairs' labeler prompts do not fit a judge's context.
- `agreement`: alignment and Cohen's kappa of soft AI preferences with reference outcomes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np

from rlhf_jax.rlaif import (
    JudgeOutput,
    PairwiseJudge,
    PairwiseTemplate,
    cohens_kappa,
    labeler_alignment,
    load_exemplars,
)
from rlhf_jax.train.model_source import InferenceOptions, LoadedLM, load_lm


@dataclasses.dataclass(frozen=True)
class JudgeTemplateSpec:
    """The pairwise judge's prompt: a preset, chain of thought, few-shot exemplars, overrides."""

    preset: Literal["default", "constitutional"] = "default"
    """"default": helpfulness/harmlessness preamble, "Preferred Response=" and answers 1/2 (Lee
    et al. 2023); "constitutional": the conversation, a principle's question and options (A)/(B)
    (Bai et al. 2022; needs a principle per pair)."""
    chain_of_thought: bool = False
    """Generate a rationale before reading the answer (Lee et al. 2023, sec. 2.1.2)."""
    cot_prompt: str | None = None
    """Chain-of-thought request (default: the default preset's)."""
    preamble: str | None = None
    """Override of the preamble (may hold {principle})."""
    query: str | None = None
    """Override of the sample layout; needs {prompt}, {response_1}, {response_2}."""
    answer_prompt: str | None = None
    """Override of the text right before the answer token."""
    answer_tokens: tuple[str, str] | None = None
    """Override of the two answer strings (each one token of every judge's tokenizer)."""
    separator: str | None = None
    """Override of the text between the prompt's pieces."""
    exemplars: str | None = None
    """Few-shot exemplar file (.jsonl, .yaml or .json; fields prompt, response_1, response_2,
    preferred, optional rationale and principle)."""
    num_exemplars: int | None = None
    """Use only the first this many exemplars of the file."""


@dataclasses.dataclass(frozen=True)
class JudgeSpec(InferenceOptions):
    """The AI judges: model sources, their prompt, position debiasing, chain-of-thought
    sampling."""

    sources: tuple[str, ...] = ()
    """Judge models: training run directories (DIR or DIR@STEP), Hugging Face model directories
    or preset:NAME. Several judges are combined by consensus."""
    template: JudgeTemplateSpec = JudgeTemplateSpec()
    position_debias: bool = True
    """Average the preferences of both presentation orders (Lee et al. 2023, sec. 2.1.1); off:
    use the given order's alone (both are still scored, for the position-bias report)."""
    rationale_tokens: int = 64
    """Tokens generated for a chain-of-thought rationale."""
    rationale_temperature: float = 0.0
    """Rationale sampling temperature; 0 decodes greedily."""


def build_template(spec: JudgeTemplateSpec) -> PairwiseTemplate:
    """The `PairwiseTemplate` a spec describes.

    Raises:
      ValueError: naming the field for a `cot_prompt` without chain of thought, a bad
        `num_exemplars`, or a template the overrides make invalid.
    """
    if spec.cot_prompt is not None and not spec.chain_of_thought:
        raise ValueError("judge.template.cot_prompt is set but judge.template.chain_of_thought "
                         "is false")
    if spec.preset == "default":
        base = PairwiseTemplate.default(chain_of_thought=spec.chain_of_thought)
    elif spec.preset == "constitutional":
        base = PairwiseTemplate.constitutional()
    else:
        raise ValueError(f"judge.template.preset={spec.preset!r}; allowed: default, "
                         "constitutional")
    fields: dict[str, Any] = {
        name: getattr(spec, name)
        for name in ("preamble", "query", "answer_prompt", "answer_tokens", "separator")
        if getattr(spec, name) is not None
    }
    if spec.chain_of_thought:
        fields["cot_prompt"] = (spec.cot_prompt or base.cot_prompt
                                or PairwiseTemplate.default(chain_of_thought=True).cot_prompt)
    if spec.exemplars is not None:
        exemplars = load_exemplars(spec.exemplars)
        if spec.num_exemplars is not None:
            if spec.num_exemplars < 0:
                raise ValueError(f"judge.template.num_exemplars must be >= 0, got "
                                 f"{spec.num_exemplars}")
            exemplars = exemplars[: spec.num_exemplars]
        fields["exemplars"] = exemplars
    elif spec.num_exemplars:
        raise ValueError("judge.template.num_exemplars is set but judge.template.exemplars "
                         "names no file")
    try:
        return dataclasses.replace(base, **fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"judge.template: {e}") from e


def make_judges(
    spec: JudgeSpec,
    *,
    mesh: jax.sharding.Mesh | None,
    seed: int = 0,
    sources: Sequence[str] | None = None,
    loaded: Sequence[LoadedLM] = (),
) -> tuple[list[PairwiseJudge], list[LoadedLM]]:
    """One `PairwiseJudge` per source of `spec` (or of `sources`), plus the loaded models.

    `loaded` lists models already loaded (e.g. the policy) that a judge of the same source
    reuses instead of loading it again.
    """
    template = build_template(spec.template)
    if spec.rationale_tokens < 1:
        raise ValueError(f"judge.rationale_tokens must be >= 1, got {spec.rationale_tokens}")
    judges, models = [], []
    reuse = {m.source: m for m in loaded}
    for i, source in enumerate(spec.sources if sources is None else sources):
        lm = reuse.get(source)
        if lm is None:
            lm = load_lm(source, tokenizer=spec.tokenizer, dtype=spec.dtype, seed=seed + i,
                         mesh=mesh, field=f"judge.sources[{i}]")
        try:
            judge = PairwiseJudge(lm.model, lm.tokenizer, template=template,
                                  batch_size=spec.batch_size, mesh=mesh,
                                  max_length=spec.max_length, min_bucket=spec.min_bucket,
                                  rationale_tokens=spec.rationale_tokens,
                                  rationale_temperature=spec.rationale_temperature)
        except ValueError as e:
            raise ValueError(f"judge.sources[{i}]={source!r}: {e}") from e
        judges.append(judge if spec.position_debias else SingleOrderJudge(judge))
        models.append(lm)
    return judges, models


class SingleOrderJudge:
    """A `PairwiseJudge` whose preference is the given presentation order's alone.

    Both orders are still scored (the `JudgeOutput` keeps `forward`, `reverse` and
    `position_bias`), so a run without debiasing still reports the judge's position bias; only
    `preference` changes, from ``(forward + 1 - reverse) / 2`` to ``forward``. Every other
    attribute is the wrapped judge's.
    """

    def __init__(self, judge: PairwiseJudge):
        self.inner = judge

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def judge(self, *args: Any, **kwargs: Any) -> JudgeOutput:
        out = self.inner.judge(*args, **kwargs)
        return out._replace(preference=out.forward)


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens of `text` as `rlhf_jax.rlaif.TextModel` encodes it (special tokens included)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=True)
    except TypeError:
        ids = tokenizer.encode(text)
    return len(ids.ids if hasattr(ids, "ids") else ids)


def judge_overflow(
    judge: PairwiseJudge | SingleOrderJudge,
    prompts: Sequence[str],
    responses_1: Sequence[str],
    responses_2: Sequence[str],
    *,
    principle: str | None = None,
) -> list[str | None]:
    """For each pair, None if its labeler prompts fit the judge's `max_length`, else the problem.

    Both presentation orders are checked; with chain of thought the rationale's
    `rationale_tokens` are counted in (the answer is read after the generated rationale).
    """
    limit = judge.lm.max_length
    if limit is None:
        return [None] * len(prompts)
    forward, reverse = judge.prompts(prompts, responses_1, responses_2, principles=principle)
    cot = judge.template.cot_prompt is not None
    extra = judge.rationale_tokens if cot else 0
    tokenizer = judge.lm.tokenizer
    problems: list[str | None] = []
    for f, r in zip(forward, reverse):
        needed = extra + max(token_count(tokenizer, judge.template.render_answer(c, "" if cot
                                                                                 else None))
                             for c in (f, r))
        if needed > limit:
            what = f"{needed - extra} tokens plus {extra} rationale tokens" if cot else \
                f"{needed} tokens"
            problems.append(f"the judge prompt has {what}, more than the judge's max_length="
                            f"{limit}")
        else:
            problems.append(None)
    return problems


def outcome_labels(preference: Any) -> np.ndarray:
    """Soft P(response 1 better) -> outcomes 1 (response 1), 0 (response 2), 0.5 (exact tie);
    NaN stays NaN."""
    p = np.asarray(preference, np.float64)
    return np.where(np.isnan(p), np.nan, np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5)))


def agreement(preference: Any, reference: Any) -> dict[str, Any] | None:
    """Agreement of soft AI preferences with reference outcomes (human or gold labels).

    Args:
      preference: ``[N]`` P(response 1 better).
      reference: ``[N]`` outcomes: 1 (response 1 better), 0 (response 2), 0.5 (tie) or NaN (no
        label).

    Returns:
      ``{"alignment", "num_compared", "num_skipped", "cohens_kappa"}``: the AI labeler alignment
      of Lee et al. 2023 (`rlhf_jax.rlaif.labeler_alignment`; an AI tie counts half) and Cohen's
      kappa between the AI's hard choice (response 1 / response 2 / tie) and the reference's, both
      over the pairs whose reference is not a tie or missing; None when there is no such pair.
    """
    p = np.asarray(preference, np.float64)
    ref = np.asarray(reference, np.float64)
    compared = ~np.isnan(ref) & (ref != 0.5)
    if not compared.any():
        return None
    aligned = labeler_alignment(p, ref)
    names = {1.0: "response_1", 0.0: "response_2", 0.5: "tie"}
    ai = [names[x] for x in outcome_labels(p[compared])]
    ref_names = [names[x] for x in ref[compared]]
    kappa = cohens_kappa(ai, ref_names, categories=["response_1", "response_2", "tie"])
    return {"alignment": aligned.alignment, "num_compared": aligned.num_compared,
            "num_skipped": aligned.num_skipped,
            "cohens_kappa": None if np.isnan(kappa) else kappa}


__all__ = [
    "JudgeSpec",
    "JudgeTemplateSpec",
    "SingleOrderJudge",
    "agreement",
    "build_template",
    "judge_overflow",
    "make_judges",
    "outcome_labels",
    "token_count",
]
