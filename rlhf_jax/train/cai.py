"""`rlhf-jax cai`: Constitutional AI data from a constitution: critique -> revision (SL-CAI)
supervised records and AI-labelled preference pairs (RL-CAI) (Bai et al. 2022).

    rlhf-jax cai --input.path red_team_prompts.jsonl --policy.source runs/helpful_sft \\
        --constitution my_constitution.yaml --num-rounds 2 --output-dir runs/cai
    rlhf-jax sft --data.path runs/cai/sl_cai.jsonl ...        # SL-CAI
    rlhf-jax rm  --data.path runs/cai/rl_cai.jsonl ...        # RL-CAI preference model (or dpo)

Steps:

1. Prompts (`rlhf_jax.train.feedback_io.FeedbackInput`, format ``prompt``) are rendered as
   conversations (`transcript`, a `rlhf_jax.rlaif.CritiqueTemplate`).
2. SL-CAI (``num_rounds >= 1``, `rlhf_jax.rlaif.critique_revision`): the policy (the "helpful"
   model) responds; then in each round a principle drawn from the constitution (a YAML / JSON /
   JSONL file, `rlhf_jax.rlaif.load_constitution`; the packaged one when unset) asks it to
   critique its current response and to revise it. The final revisions become supervised
   records ``{"prompt": conversation, "completion": separator + revision}``
   (`rlhf_jax.rlaif.sl_cai_records`), the ``sft`` format `rlhf-jax sft` reads.
3. RL-CAI (`rl_pairs`): a feedback model (`judge`, default: the policy itself) compares two
   responses under `num_principles` principles drawn per pair, each asked as the principle's
   multiple-choice preference question, position-debiased, and the draws' probabilities are
   averaged into a soft label (`rlhf_jax.rlaif.constitutional_preferences`). The pairs are the
   initial response and the final revision (``revision``, `rlhf_jax.rlaif.rl_cai_pairs`), or two
   fresh policy samples per prompt (``samples``, as Bai et al. do with the SL-CAI model: run the
   command on that model with ``num_rounds=0``). Records are the ``preference`` format
   `rlhf-jax rm` and `rlhf-jax dpo` read; their responses start with the transcript's separator,
   as the SL-CAI completions do, so ``prompt + response`` is the transcript either way.

Outputs in `output_dir`: ``sl_cai.jsonl`` and/or ``rl_cai.jsonl``; ``transcripts.jsonl`` (per
prompt: origin, conversation, initial response, drawn principles, critiques, revisions, the RL
pair and its preference, and why anything was skipped); ``summary.json`` (also returned and
printed: counts, skips per stage and reason with the first few origins, the constitution, the
models, position bias); ``config.yaml``.

Skipped, counted per reason: bad input records, conversation records, prompts whose transcript
cannot fit the policy's context (``prompt_too_long``: the longest critique and revision requests
plus `max_new_tokens` twice and `critique_tokens`) or the feedback model's
(``judge_prompt_too_long``, the longest preference question) - these raise instead under
``input.on_error=raise`` -; SL records whose final revision is empty (``empty_response``); RL
pairs whose responses are identical (e.g. a revision that changed nothing) or empty, or whose
confidence is below `min_confidence`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np
from etils import epath

from rlhf_jax import sharding
from rlhf_jax.generation import SamplingParams
from rlhf_jax.rlaif import (
    Constitution,
    CritiqueRevision,
    CritiqueTemplate,
    LabelledPairs,
    TextModel,
    constitutional_preferences,
    critique_revision,
    default_constitution,
    load_constitution,
    rl_cai_pairs,
    sample_pairs,
    sl_cai_records,
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
    JudgeTemplateSpec,
    judge_overflow,
    make_judges,
    token_count,
)
from rlhf_jax.train.label import label_skip_problem, pair_status
from rlhf_jax.train.model_source import LMSpec, describe, load_lm

SL_FILE = "sl_cai.jsonl"
RL_FILE = "rl_cai.jsonl"
TRANSCRIPTS_FILE = "transcripts.jsonl"


@dataclasses.dataclass(frozen=True)
class CAIConfig:
    """Constitutional AI data: critique -> revision from a constitution into SL-CAI records
    (sl_cai.jsonl, for `rlhf-jax sft`) and RL-CAI preference pairs (rl_cai.jsonl, for
    `rlhf-jax rm` / `rlhf-jax dpo`)."""

    output_dir: str = "runs/cai"
    """Where sl_cai.jsonl, rl_cai.jsonl, transcripts.jsonl, summary.json and config.yaml go."""
    seed: int = 0
    """Seed of the drawn principles, the samples and synthetic prompts."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in `output_dir` (otherwise that is an error)."""
    input: FeedbackInput = FeedbackInput()
    constitution: str | None = None
    """Constitution file (YAML / JSON / JSONL; principles with critique_request,
    revision_request and optionally name and preference); unset: the packaged default."""
    policy: LMSpec = LMSpec()
    """The model that responds, critiques and revises."""
    num_rounds: int = 1
    """Critique -> revision rounds per prompt (0: no SL-CAI data; for rl_pairs=samples)."""
    max_new_tokens: int = 64
    """Tokens per response and per revision (at most)."""
    critique_tokens: int | None = None
    """Tokens per critique (default: max_new_tokens)."""
    temperature: float = 1.0
    """Sampling temperature of responses, critiques and revisions."""
    top_p: float | None = None
    """Nucleus sampling threshold (None: off)."""
    greedy: bool = False
    """Decode responses, critiques and revisions greedily."""
    transcript: CritiqueTemplate = CritiqueTemplate()
    """Transcript layout: conversation (with {prompt}), critique and revision requests,
    separator, stop strings."""
    rl_pairs: Literal["revision", "samples", "none"] = "revision"
    """RL-CAI pairs: initial response vs final revision, two fresh policy samples per prompt,
    or none."""
    judge: JudgeSpec = JudgeSpec(template=JudgeTemplateSpec(preset="constitutional"))
    """The feedback model (judge.sources: at most one; empty: the policy) and its prompt (needs
    {principle})."""
    num_principles: int = 1
    """Principles drawn per RL-CAI pair; their preferences are averaged."""
    hard_labels: bool = False
    """Write label 1.0 instead of the soft preference probability."""
    min_confidence: float = 0.5
    """Skip RL-CAI pairs whose confidence max(p, 1 - p) is below this."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh the models are sharded on (batches split over data x fsdp)."""


def transcript_overflow(
    tokenizer: Any,
    conversations: Sequence[str],
    *,
    template: CritiqueTemplate,
    constitution: Constitution,
    num_rounds: int,
    max_new_tokens: int,
    critique_tokens: int,
    max_length: int | None,
) -> list[str | None]:
    """For each conversation, None if every generation of `critique_revision` fits
    `max_length`, else the problem.

    A round generates after ``conversation + response + critique request`` (`critique_tokens`)
    and after that plus the critique and the revision request (`max_new_tokens`), each round in a
    fresh transcript, so the bound is the longest principle's requests plus ``2 *
    max_new_tokens + critique_tokens`` (``max_new_tokens`` alone without rounds). Texts are
    counted piece by piece, which is exact for character tokenizers and a close bound for
    subword ones.
    """
    if max_length is None:
        return [None] * len(conversations)
    requests = 0
    if num_rounds > 0:
        requests = max(
            token_count(tokenizer, template.critique.format(critique_request=p.critique_request)
                        + template.revision.format(revision_request=p.revision_request))
            + 2 * token_count(tokenizer, template.response_separator)
            for p in constitution.principles)
    generated = max_new_tokens + (critique_tokens + max_new_tokens if num_rounds > 0 else 0)
    problems: list[str | None] = []
    for conversation in conversations:
        needed = token_count(tokenizer, conversation) + requests + generated
        if needed > max_length:
            problems.append(f"the transcript needs up to {needed} tokens (conversation, "
                            f"critique and revision requests, {generated} generated tokens), "
                            f"more than the policy's max_length={max_length}")
        else:
            problems.append(None)
    return problems


def _with_separator(records: list[dict[str, Any]], separator: str) -> list[dict[str, Any]]:
    """Preference records whose responses start with the transcript's separator, like SL-CAI
    completions (``prompt + response`` is then the transcript)."""
    return [{**r, "chosen": separator + r["chosen"], "rejected": separator + r["rejected"]}
            for r in records]


def _sampling(config: CAIConfig, *, greedy: bool | None = None) -> SamplingParams:
    """How responses, critiques and revisions are sampled (RL-CAI's two fresh samples per
    prompt are never greedy: they would be the same response twice)."""
    return SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                          top_p=config.top_p,
                          greedy=config.greedy if greedy is None else greedy)


def run_cai(config: CAIConfig) -> dict[str, Any]:
    """Runs `rlhf-jax cai` (module docstring); returns the summary (also in summary.json)."""
    check_storage(config)
    if config.policy.source is None:
        raise ValueError("policy.source is unset: name the model that responds, critiques and "
                         "revises (a run directory, a Hugging Face directory or preset:NAME)")
    if not isinstance(config.num_rounds, int) or config.num_rounds < 0:
        raise ValueError(f"num_rounds must be an int >= 0, got {config.num_rounds}")
    if config.rl_pairs == "revision" and config.num_rounds == 0:
        raise ValueError("rl_pairs=revision compares the initial response with its revision and "
                         "needs num_rounds >= 1 (or use rl_pairs=samples)")
    if config.num_rounds == 0 and config.rl_pairs == "none":
        raise ValueError("num_rounds=0 with rl_pairs=none produces nothing")
    if len(config.judge.sources) > 1:
        raise ValueError(f"judge.sources names {len(config.judge.sources)} models; RL-CAI uses "
                         "one feedback model (or none: the policy)")
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
    if not 0.5 <= config.min_confidence <= 1.0:
        raise ValueError(f"min_confidence must lie in [0.5, 1], got {config.min_confidence}")
    constitution = (default_constitution() if config.constitution is None
                    else load_constitution(config.constitution))
    outputs = ((SL_FILE,) if config.num_rounds > 0 else ()) + \
        ((RL_FILE,) if config.rl_pairs != "none" else ()) + (TRANSCRIPTS_FILE,)
    paths = prepare_outputs(config.output_dir, outputs, overwrite=config.overwrite,
                            config=config)
    skips = SkipLog(config.input.on_error)
    data = load_input(config.input, skips=skips, seed=config.seed, formats=("prompt",))
    mesh = sharding.make_mesh(config.mesh)
    k_revise, k_sample, k_judge = jax.random.split(jax.random.key(config.seed), 3)
    template = config.transcript
    spec = config.policy
    policy = load_lm(spec.source, tokenizer=spec.tokenizer, dtype=spec.dtype, seed=config.seed,
                     mesh=mesh, field="policy.source")
    lm = TextModel(policy.model, policy.tokenizer, batch_size=spec.batch_size, mesh=mesh,
                   max_length=spec.max_length, min_bucket=spec.min_bucket)

    examples = data.examples
    conversations = [template.render_conversation(ex.prompt) for ex in examples]
    critique_tokens = config.critique_tokens or config.max_new_tokens
    problems = transcript_overflow(
        policy.tokenizer, conversations, template=template, constitution=constitution,
        num_rounds=config.num_rounds, max_new_tokens=config.max_new_tokens,
        critique_tokens=critique_tokens, max_length=lm.max_length)
    keep = []
    for i, problem in enumerate(problems):
        if problem is None:
            keep.append(i)
        else:
            skips.error("sampling", "prompt_too_long", examples[i].origin, problem)
    examples = [examples[i] for i in keep]
    conversations = [conversations[i] for i in keep]
    origins = [ex.origin for ex in examples]
    lines: list[dict[str, Any]] = [{"origin": ex.origin, "prompt": ex.prompt,
                                    "conversation": c} for ex, c in zip(examples, conversations)]

    results: list[CritiqueRevision] = []
    sl_records: list[dict[str, Any]] = []
    if examples and (config.num_rounds > 0 or config.rl_pairs == "revision"):
        results = critique_revision(
            lm, [ex.prompt for ex in examples], constitution=constitution, rng=k_revise,
            num_rounds=config.num_rounds, template=template,
            sampling=_sampling(config), critique_tokens=critique_tokens)
        for line, r in zip(lines, results):
            line.update(initial_response=r.initial_response, principles=list(r.principles),
                        critiques=list(r.critiques), revisions=list(r.revisions))
    if config.num_rounds > 0:
        sl_records, _ = sl_cai_records(results, template=template)
        for line, r in zip(lines, results):
            empty = not r.final_response.strip()
            line["sl_status"] = "empty_response" if empty else "record"
            if empty:
                skips.skip("sl_cai", "empty_response", line["origin"], "the final revision is "
                                                                         "empty")
        write_jsonl(sl_records, paths[SL_FILE])

    rl_summary: dict[str, Any] = {}
    rl_records: list[dict[str, Any]] = []
    if config.rl_pairs != "none":
        rl_summary, rl_records = _rl_cai(config, constitution, policy, mesh, lm, conversations,
                                         origins, results, lines, skips, k_sample, k_judge)
        write_jsonl(rl_records, paths[RL_FILE])
    write_jsonl(lines, paths[TRANSCRIPTS_FILE])

    changed = [r.final_response != r.initial_response for r in results] if config.num_rounds \
        else []
    summary = {
        "command": "cai",
        "output_dir": config.output_dir,
        "files": {**paths, SUMMARY_FILE: os.fspath(epath.Path(config.output_dir, SUMMARY_FILE))},
        "constitution": {"name": constitution.name, "source": config.constitution or "default",
                         "principles": [p.name for p in constitution.principles]},
        "num_read": data.num_read,
        "num_prompts": len(data.examples),
        "num_transcripts": len(results),
        "num_sl_records": len(sl_records),
        "num_rl_pairs": rl_summary.get("num_pairs", 0),
        "num_rl_records": len(rl_records),
        "revised_fraction": float(np.mean(changed)) if changed else None,
        "skipped": skips.total,
        "skipped_by_stage": skips.by_stage(),
        "first_skipped": list(skips.first),
        "policy": describe(policy),
        **rl_summary,
    }
    write_json(summary, os.fspath(epath.Path(config.output_dir, SUMMARY_FILE)))
    return summary


def _rl_cai(config: CAIConfig, constitution: Constitution, policy, mesh, lm: TextModel,
            conversations: list[str], origins: list[str], results: list[CritiqueRevision],
            lines: list[dict[str, Any]], skips: SkipLog, k_sample: jax.Array,
            k_judge: jax.Array) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """RL-CAI pairs, judged under drawn principles; fills the transcripts' RL fields."""
    sources = config.judge.sources or (config.policy.source,)
    same_load = (config.judge.tokenizer == config.policy.tokenizer
                 and config.judge.dtype == config.policy.dtype)
    (judge,), (judge_model,) = make_judges(config.judge, mesh=mesh, seed=config.seed + 1,
                                           sources=sources, loaded=[policy] if same_load else ())
    if not judge.template.uses_principle:
        raise ValueError("RL-CAI asks the judge each principle's preference question: the judge "
                         "template needs {principle} (judge.template.preset=constitutional)")
    if config.rl_pairs == "revision":
        r1 = [r.initial_response for r in results]
        r2 = [r.final_response for r in results]
    else:
        r1, r2 = ([], []) if not conversations else sample_pairs(
            lm, conversations, _sampling(config, greedy=False), rng=k_sample,
            stop_strings=config.transcript.stop_strings)
    status = ["judged"] * len(conversations)
    for principle in constitution.principles:
        problems = judge_overflow(judge, conversations, r1, r2,
                                  principle=principle.preference_question) if conversations \
            else []
        for i, problem in enumerate(problems):
            if problem is not None and status[i] == "judged":
                skips.error("judging", "judge_prompt_too_long", origins[i],
                            f"{problem} (principle {principle.name!r})")
                status[i] = "judge_prompt_too_long"
    judged = [i for i, s in enumerate(status) if s == "judged"]
    records: list[dict[str, Any]] = []
    labelled: LabelledPairs | None = None
    if judged:
        pick = lambda xs: [xs[i] for i in judged]  # noqa: E731
        kwargs = dict(constitution=constitution, rng=k_judge,
                      num_principles=config.num_principles, hard=config.hard_labels,
                      min_confidence=config.min_confidence)
        if config.rl_pairs == "revision":
            labelled = rl_cai_pairs(judge, pick(results), **kwargs)
        else:
            labelled = constitutional_preferences(judge, pick(conversations), pick(r1), pick(r2),
                                                  **kwargs)
        records = labelled.records
        if config.rl_pairs == "revision":
            records = _with_separator(records, config.transcript.response_separator)
        judged_status = pair_status(pick(conversations), pick(r1), pick(r2),
                                    labelled.preference, hard=config.hard_labels,
                                    min_confidence=config.min_confidence)
        for k, i in enumerate(judged):
            status[i] = judged_status[k]
            lines[i]["rl_preference"] = float(labelled.preference[k])
            if status[i] != "record":
                skips.skip("rl_cai", status[i], origins[i], label_skip_problem(status[i]))
    for i, line in enumerate(lines):
        line.update(rl_response_1=r1[i], rl_response_2=r2[i], rl_status=status[i])
    summary = {
        "rl_pairs": config.rl_pairs,
        "num_pairs": len(conversations),
        "judge": describe(judge_model),
        "num_principles": config.num_principles,
        "mean_confidence": labelled.report.mean_confidence if labelled else None,
        "mean_position_bias": labelled.report.mean_position_bias if labelled else None,
        "mean_label": float(np.mean([r["label"] for r in records])) if records else None,
    }
    return summary, records


__all__ = ["CAIConfig", "RL_FILE", "SL_FILE", "TRANSCRIPTS_FILE", "run_cai",
           "transcript_overflow"]
