"""Constitutional AI data: critique -> revision (SL-CAI) and AI preference pairs (RL-CAI).

Bai et al. (2022, "Constitutional AI"):

- SL-CAI (sec. 3): for each red-team prompt the model writes a response; then, for ``n``
  rounds, a principle is drawn at random from the constitution, the model critiques its current
  response under the principle's critique request and revises it under the revision request.
  The final revisions are supervised fine-tuning targets.
- RL-CAI (sec. 4): a feedback model compares two responses under a principle's multiple-choice
  question; the normalised answer probabilities are the soft preference labels of a preference
  model (averaged over several principles).

Here each round critiques and revises the *current* response in a fresh transcript
(conversation, response, critique request, critique, revision request, revision), so the
context stays short; all prompts of a round are generated in batches.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from rlhf_jax.generation import SamplingParams
from rlhf_jax.rlaif._judge import PairwiseJudge, check_texts
from rlhf_jax.rlaif._pipelines import LabelledPairs, combine_labelers, write_jsonl
from rlhf_jax.rlaif._principles import Constitution
from rlhf_jax.rlaif._templates import CritiqueTemplate
from rlhf_jax.rlaif._text_model import TextModel


class CritiqueRevision(NamedTuple):
    """The critique -> revision history of one prompt.

    Attributes:
      prompt: the red-team prompt.
      conversation: the rendered conversation the responses continue.
      initial_response: the model's first response.
      principles: the name of the principle drawn in each round.
      critiques: the critique of each round.
      revisions: the revision of each round.
    """

    prompt: str
    conversation: str
    initial_response: str
    principles: tuple[str, ...]
    critiques: tuple[str, ...]
    revisions: tuple[str, ...]

    @property
    def final_response(self) -> str:
        """The last revision, or the initial response when no round ran."""
        return self.revisions[-1] if self.revisions else self.initial_response


DEFAULT_SAMPLING = SamplingParams(max_new_tokens=64)
"""`critique_revision`'s default: 64 tokens per response, critique and revision, temperature 1."""


def critique_revision(
    policy: TextModel,
    prompts: Sequence[str],
    *,
    constitution: Constitution,
    rng: jax.Array,
    num_rounds: int = 1,
    template: CritiqueTemplate | None = None,
    sampling: SamplingParams = DEFAULT_SAMPLING,
    critique_tokens: int | None = None,
) -> list[CritiqueRevision]:
    """Runs ``num_rounds`` of principle-guided critique and revision for every prompt.

    Randomness: principles come from ``constitution.sample_indices(k0, (N, num_rounds))``; the
    initial responses use ``k1``, and round ``r``'s critiques and revisions use
    ``fold_in(k2, 2r)`` and ``fold_in(k2, 2r + 1)``, where ``k0, k1, k2 = split(rng, 3)``.

    Args:
      policy: the model that responds, critiques and revises (a :class:`TextModel`).
      prompts: ``N`` red-team prompts.
      constitution: the principles (non-empty, checked when it was built).
      rng: PRNG key.
      num_rounds: critique -> revision rounds (>= 0).
      template: transcript layout (default :class:`CritiqueTemplate`).
      sampling: how responses, critiques and revisions are sampled (``SamplingParams``;
        ``max_new_tokens`` is the width of a response and of a revision).
      critique_tokens: tokens per critique (default ``sampling.max_new_tokens``).

    Returns:
      One :class:`CritiqueRevision` per prompt.
    """
    if not isinstance(constitution, Constitution):
        raise TypeError(f"constitution must be a Constitution, got {type(constitution).__name__}")
    if not isinstance(num_rounds, int) or num_rounds < 0:
        raise ValueError(f"num_rounds must be an int >= 0, got {num_rounds!r}")
    n = check_texts(prompts=prompts)
    template = template or CritiqueTemplate()
    critique_sampling = dataclasses.replace(
        sampling, max_new_tokens=critique_tokens or sampling.max_new_tokens)
    k_principles, k_response, k_rounds = jax.random.split(rng, 3)
    drawn = constitution.sample_indices(k_principles, (n, num_rounds))
    stop = template.stop_strings

    conversations = [template.render_conversation(p) for p in prompts]
    initial = [
        r.strip()
        for r in policy.generate(conversations, sampling, rng=k_response, stop_strings=stop)
    ]
    current = list(initial)
    critiques: list[list[str]] = [[] for _ in range(n)]
    revisions: list[list[str]] = [[] for _ in range(n)]
    for r in range(num_rounds):
        principles = [constitution[int(i)] for i in drawn[:, r]]
        critique_contexts = [
            template.render_critique_request(c, resp, pr.critique_request)
            for c, resp, pr in zip(conversations, current, principles)
        ]
        round_critiques = [
            x.strip()
            for x in policy.generate(
                critique_contexts,
                critique_sampling,
                rng=jax.random.fold_in(k_rounds, 2 * r),
                stop_strings=stop,
            )
        ]
        revision_contexts = [
            template.render_revision_request(ctx, crit, pr.revision_request)
            for ctx, crit, pr in zip(critique_contexts, round_critiques, principles)
        ]
        round_revisions = [
            x.strip()
            for x in policy.generate(
                revision_contexts,
                sampling,
                rng=jax.random.fold_in(k_rounds, 2 * r + 1),
                stop_strings=stop,
            )
        ]
        for i in range(n):
            critiques[i].append(round_critiques[i])
            revisions[i].append(round_revisions[i])
        current = round_revisions
    return [
        CritiqueRevision(
            prompt=prompts[i],
            conversation=conversations[i],
            initial_response=initial[i],
            principles=tuple(constitution[int(j)].name for j in drawn[i]),
            critiques=tuple(critiques[i]),
            revisions=tuple(revisions[i]),
        )
        for i in range(n)
    ]


def sl_cai_records(
    results: Sequence[CritiqueRevision],
    *,
    template: CritiqueTemplate | None = None,
    path: str | os.PathLike | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """SL-CAI supervised data: ``{"prompt": conversation, "completion": final revision}``.

    The SFT record format of ``rlhf_jax.data``; ``prompt + completion`` is the transcript the
    policy would produce (the completion starts with ``template.response_separator``). Rows
    whose final response is empty are skipped and counted (``{"empty_response": k}``).

    Returns:
      ``(records, skipped)``.
    """
    template = template or CritiqueTemplate()
    records, skipped = [], Counter()
    for r in results:
        final = r.final_response
        if not final.strip():
            skipped["empty_response"] += 1
            continue
        records.append(
            {"prompt": r.conversation, "completion": template.response_separator + final}
        )
    if path is not None:
        write_jsonl(records, path)
    return records, dict(skipped)


def constitutional_preferences(
    judge: PairwiseJudge,
    prompts: Sequence[str],
    responses_1: Sequence[str],
    responses_2: Sequence[str],
    *,
    constitution: Constitution,
    rng: jax.Array,
    num_principles: int = 1,
    hard: bool = False,
    min_confidence: float = 0.5,
    path: str | os.PathLike | None = None,
) -> LabelledPairs:
    """RL-CAI preference data: the judge compares two responses under drawn principles.

    For each of ``num_principles`` draws, every pair gets one principle, drawn uniformly with
    ``constitution.sample_indices(split(rng)[0], (num_principles, N))``; the judge answers the
    principle's preference question (its template needs ``{principle}``, e.g.
    :meth:`PairwiseTemplate.constitutional`); the position-debiased probabilities of the draws are
    averaged (Bai et al. 2022, sec. 4.1). Use responses (initial, final revision) from
    :func:`critique_revision`, or two policy samples from :func:`sample_pairs`.

    Returns:
      A :class:`LabelledPairs` with one labeler per principle draw.
    """
    if not isinstance(constitution, Constitution):
        raise TypeError(f"constitution must be a Constitution, got {type(constitution).__name__}")
    if not judge.template.uses_principle:
        raise ValueError(
            "the judge's template has no {principle} placeholder; use "
            "PairwiseTemplate.constitutional() or add one"
        )
    if not isinstance(num_principles, int) or num_principles < 1:
        raise ValueError(f"num_principles must be an int >= 1, got {num_principles!r}")
    n = check_texts(prompts=prompts, responses_1=responses_1, responses_2=responses_2)
    k_draw, k_judge = jax.random.split(rng)
    drawn = constitution.sample_indices(k_draw, (num_principles, n))
    outputs = []
    for d in range(num_principles):
        questions = [constitution[int(i)].preference_question for i in drawn[d]]
        outputs.append(
            judge.judge(
                prompts, responses_1, responses_2, principles=questions,
                rng=jax.random.fold_in(k_judge, d),
            )
        )
    return combine_labelers(
        outputs,
        prompts,
        responses_1,
        responses_2,
        hard=hard,
        min_confidence=min_confidence,
        path=path,
    )


def rl_cai_pairs(
    judge: PairwiseJudge,
    results: Sequence[CritiqueRevision],
    *,
    constitution: Constitution,
    rng: jax.Array,
    num_principles: int = 1,
    hard: bool = False,
    min_confidence: float = 0.5,
    path: str | os.PathLike | None = None,
) -> LabelledPairs:
    """RL-CAI pairs from critique -> revision results: initial response vs final revision.

    The judge compares each prompt's initial response (response 1) with its final revision
    (response 2) under drawn principles; see :func:`constitutional_preferences`. Pairs whose
    revision equals the initial response, or is empty, are skipped and counted in the report.
    """
    return constitutional_preferences(
        judge,
        [r.conversation for r in results],
        [r.initial_response for r in results],
        [r.final_response for r in results],
        constitution=constitution,
        rng=rng,
        num_principles=num_principles,
        hard=hard,
        min_confidence=min_confidence,
        path=path,
    )
