"""Labeler prompt templates: pairwise preference, direct score, critique and revision.

A template is plain text with ``str.format`` placeholders (write literal braces as ``{{``
and ``}}``). Each template kind has required placeholders, which must all appear, and optional
ones; any other placeholder is an error. Templates are validated when they are built, so a bad
template fails before any model runs.

The pairwise layout follows Lee et al. (2023, "RLAIF", appendix): a preamble, optional
few-shot exemplars, the sample to annotate, then either the answer prompt directly
("Preferred Response=") or first a chain-of-thought request ("... Rationale:"), a generated
rationale, and then the answer prompt.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterable

_FORMATTER = string.Formatter()


def placeholders(text: str) -> tuple[str, ...]:
    """The distinct ``{name}`` placeholders of a format string, in order of appearance.

    Raises:
      ValueError: on a malformed format string, or a positional (``{}``/``{0}``) or
        attribute/index (``{a.b}``, ``{a[0]}``) placeholder.
    """
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as e:
        raise ValueError(f"malformed template {text!r}: {e} (write literal braces as {{{{ }}}})") from e
    names: list[str] = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit() or not field.isidentifier():
            raise ValueError(
                f"template placeholder {{{field}}} in {text!r} must be a plain name like {{prompt}}"
            )
        if field not in names:
            names.append(field)
    return tuple(names)


def check_placeholders(
    name: str,
    text: str,
    *,
    required: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> tuple[str, ...]:
    """Validates the placeholders of the template field ``name``.

    Args:
      name: the field's name, used in error messages (e.g. ``"PairwiseTemplate.query"``).
      text: the format string.
      required: placeholders that must appear.
      optional: placeholders that may appear.

    Returns:
      The placeholders found.

    Raises:
      ValueError: naming the field, the missing or unknown placeholders and the allowed ones.
    """
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string, got {type(text).__name__}")
    found = placeholders(text)
    required, optional = tuple(required), tuple(optional)
    missing = [p for p in required if p not in found]
    unknown = [p for p in found if p not in required and p not in optional]
    if missing or unknown:
        problems = []
        if missing:
            problems.append("missing required placeholder(s) " + ", ".join(f"{{{p}}}" for p in missing))
        if unknown:
            problems.append("unknown placeholder(s) " + ", ".join(f"{{{p}}}" for p in unknown))
        allowed = ", ".join(f"{{{p}}}" for p in required + optional) or "none"
        raise ValueError(f"{name}: {'; '.join(problems)} (allowed: {allowed})")
    return found


def _fill(text: str, values: dict[str, str | None], field: str) -> str:
    needed = placeholders(text)
    for p in needed:
        if values.get(p) is None:
            raise ValueError(f"{field} uses {{{p}}} but no {p} was given")
    return text.format_map({p: values[p] for p in needed})


@dataclasses.dataclass(frozen=True)
class Exemplar:
    """A few-shot example for the pairwise judge.

    Attributes:
      prompt: the context/prompt text.
      response_1: the first response.
      response_2: the second response.
      preferred: 1 or 2, the better response.
      rationale: an optional worked rationale, shown when the template uses chain of thought.
      principle: the principle the example is judged under, for templates with ``{principle}``.
    """

    prompt: str
    response_1: str
    response_2: str
    preferred: int
    rationale: str | None = None
    principle: str | None = None

    def __post_init__(self):
        if self.preferred not in (1, 2):
            raise ValueError(f"Exemplar.preferred must be 1 or 2, got {self.preferred!r}")


class _AnswerPrompt:
    """Rendering shared by the labeler templates: an optional chain-of-thought prompt, then the
    answer prompt whose next token is read (fields ``cot_prompt``, ``separator``,
    ``answer_prompt``)."""

    def render_answer(self, context: str, rationale: str | None = None) -> str:
        """The text whose next token is the answer (or score): context, [CoT + rationale],
        answer prompt."""
        if self.cot_prompt is not None:
            if rationale is None:
                raise ValueError("this template uses chain of thought; a rationale is required")
            context = self.render_cot(context) + rationale
        return context + self.separator + self.answer_prompt

    def render_cot(self, context: str) -> str:
        """The text after which the rationale is generated."""
        if self.cot_prompt is None:
            raise ValueError("this template has no cot_prompt")
        return context + self.separator + self.cot_prompt


@dataclasses.dataclass(frozen=True)
class PairwiseTemplate(_AnswerPrompt):
    """Labeler prompt for a pairwise preference between two responses.

    The rendered context is ``preamble + exemplars + query``, each piece separated by
    ``separator``. Without chain of thought the judge reads the next-token distribution after
    ``context + separator + answer_prompt``; with it, the judge first samples a rationale after
    ``context + separator + cot_prompt`` and then reads the answer after
    ``... + rationale + separator + answer_prompt``.

    Attributes:
      preamble: task description; optional ``{principle}``.
      query: the sample; requires ``{prompt}``, ``{response_1}``, ``{response_2}``; optional
        ``{principle}``.
      answer_prompt: text right before the answer token (no placeholders), e.g.
        ``"Preferred Response="``.
      answer_tokens: the two answer strings, for response 1 and response 2; each must be a single
        token of the judge's tokenizer (checked when a judge is built).
      cot_prompt: chain-of-thought request (no placeholders) or None for no chain of thought.
      exemplars: few-shot examples rendered like the query, followed by their rationale (when
        ``cot_prompt`` is set) and their answer.
      separator: text between the pieces.
    """

    preamble: str
    query: str
    answer_prompt: str
    answer_tokens: tuple[str, str] = ("1", "2")
    cot_prompt: str | None = None
    exemplars: tuple[Exemplar, ...] = ()
    separator: str = "\n\n"

    def __post_init__(self):
        object.__setattr__(self, "answer_tokens", tuple(self.answer_tokens))
        object.__setattr__(self, "exemplars", tuple(self.exemplars))
        check_placeholders("PairwiseTemplate.preamble", self.preamble, optional=("principle",))
        check_placeholders(
            "PairwiseTemplate.query",
            self.query,
            required=("prompt", "response_1", "response_2"),
            optional=("principle",),
        )
        check_placeholders("PairwiseTemplate.answer_prompt", self.answer_prompt)
        if self.cot_prompt is not None:
            check_placeholders("PairwiseTemplate.cot_prompt", self.cot_prompt)
        if len(self.answer_tokens) != 2 or not all(
            isinstance(t, str) and t for t in self.answer_tokens
        ):
            raise ValueError(
                f"PairwiseTemplate.answer_tokens must be two non-empty strings such as ('1', '2') "
                f"or ('A', 'B'), got {self.answer_tokens!r}"
            )
        if self.answer_tokens[0] == self.answer_tokens[1]:
            raise ValueError(f"PairwiseTemplate.answer_tokens are equal: {self.answer_tokens!r}")
        for i, ex in enumerate(self.exemplars):
            if not isinstance(ex, Exemplar):
                raise TypeError(f"PairwiseTemplate.exemplars[{i}] must be an Exemplar")

    @property
    def uses_principle(self) -> bool:
        """Whether the template has a ``{principle}`` placeholder."""
        return "principle" in placeholders(self.preamble) + placeholders(self.query)

    def _sample(self, prompt, response_1, response_2, principle) -> str:
        values = dict(
            prompt=prompt, response_1=response_1, response_2=response_2, principle=principle
        )
        return _fill(self.query, values, "PairwiseTemplate.query")

    def render_context(
        self, *, prompt: str, response_1: str, response_2: str, principle: str | None = None
    ) -> str:
        """The preamble, exemplars and the sample, without the answer or CoT prompt."""
        if principle is not None and not self.uses_principle:
            raise ValueError(
                "a principle was given but the template has no {principle} placeholder"
            )
        parts = [_fill(self.preamble, {"principle": principle}, "PairwiseTemplate.preamble")]
        for ex in self.exemplars:
            shot = self._sample(
                ex.prompt, ex.response_1, ex.response_2, ex.principle or principle
            )
            if self.cot_prompt is not None and ex.rationale is not None:
                shot += self.separator + self.cot_prompt + " " + ex.rationale
            shot += self.separator + self.answer_prompt + self.answer_tokens[ex.preferred - 1]
            parts.append(shot)
        parts.append(self._sample(prompt, response_1, response_2, principle))
        return self.separator.join(p for p in parts if p)

    @classmethod
    def default(cls, *, chain_of_thought: bool = False, **overrides) -> PairwiseTemplate:
        """A general helpfulness/harmlessness preference prompt with answers "1"/"2"."""
        fields = dict(
            preamble=(
                "A good response to a user is helpful, honest and harmless: it answers the "
                "request accurately and clearly and does not cause harm. Given a prompt and "
                "two responses, decide which response is better."
            ),
            query="Prompt: {prompt}\n\nResponse 1: {response_1}\n\nResponse 2: {response_2}",
            answer_prompt="Preferred Response=",
            answer_tokens=("1", "2"),
            cot_prompt=(
                "Consider the helpfulness, accuracy and harmlessness of each response and "
                "explain which one is better.\n\nRationale:"
                if chain_of_thought
                else None
            ),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def constitutional(cls, **overrides) -> PairwiseTemplate:
        """A principle-conditioned multiple-choice prompt with answers "A"/"B".

        The layout of Bai et al. (2022, "Constitutional AI", section 4.1): the conversation,
        the principle as a question, two options, and the answer.
        """
        fields = dict(
            preamble="Consider the following conversation between a human and an assistant:",
            query=(
                "{prompt}\n\n{principle}\n\nOptions:\n(A) {response_1}\n(B) {response_2}"
            ),
            answer_prompt="The answer is: (",
            answer_tokens=("A", "B"),
        )
        fields.update(overrides)
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class ScoreTemplate(_AnswerPrompt):
    """Labeler prompt for a direct rating of one response.

    The judge reads the next-token distribution after ``preamble + query + answer_prompt``
    (or after a generated rationale, as in :class:`PairwiseTemplate`) restricted to
    ``score_tokens``; the score is the expectation of ``score_values`` under it.

    Attributes:
      preamble: rating instructions; optional ``{principle}``.
      query: the sample; requires ``{prompt}`` and ``{response}``; optional ``{principle}``.
      answer_prompt: text right before the score token (no placeholders).
      score_tokens: the score strings; each must be a single token of the judge's tokenizer.
      score_values: the value of each score token; defaults to ``float(token)``.
      cot_prompt: chain-of-thought request (no placeholders) or None.
      separator: text between the pieces.
    """

    preamble: str
    query: str
    answer_prompt: str
    score_tokens: tuple[str, ...] = tuple(str(i) for i in range(1, 11))
    score_values: tuple[float, ...] | None = None
    cot_prompt: str | None = None
    separator: str = "\n\n"

    def __post_init__(self):
        object.__setattr__(self, "score_tokens", tuple(self.score_tokens))
        check_placeholders("ScoreTemplate.preamble", self.preamble, optional=("principle",))
        check_placeholders(
            "ScoreTemplate.query",
            self.query,
            required=("prompt", "response"),
            optional=("principle",),
        )
        check_placeholders("ScoreTemplate.answer_prompt", self.answer_prompt)
        if self.cot_prompt is not None:
            check_placeholders("ScoreTemplate.cot_prompt", self.cot_prompt)
        if len(self.score_tokens) < 2:
            raise ValueError(f"ScoreTemplate.score_tokens needs >= 2 tokens, got {self.score_tokens}")
        if len(set(self.score_tokens)) != len(self.score_tokens):
            raise ValueError(f"ScoreTemplate.score_tokens has duplicates: {self.score_tokens}")
        if self.score_values is None:
            try:
                values = tuple(float(t) for t in self.score_tokens)
            except ValueError:
                raise ValueError(
                    "ScoreTemplate.score_values is required when score_tokens are not numbers "
                    f"({self.score_tokens})"
                ) from None
        else:
            values = tuple(float(v) for v in self.score_values)
            if len(values) != len(self.score_tokens):
                raise ValueError(
                    f"ScoreTemplate.score_values has {len(values)} values for "
                    f"{len(self.score_tokens)} score_tokens"
                )
        object.__setattr__(self, "score_values", values)

    @property
    def uses_principle(self) -> bool:
        """Whether the template has a ``{principle}`` placeholder."""
        return "principle" in placeholders(self.preamble) + placeholders(self.query)

    def render_context(self, *, prompt: str, response: str, principle: str | None = None) -> str:
        """The preamble and the sample, without the answer or CoT prompt."""
        if principle is not None and not self.uses_principle:
            raise ValueError(
                "a principle was given but the template has no {principle} placeholder"
            )
        values = dict(prompt=prompt, response=response, principle=principle)
        parts = [
            _fill(self.preamble, values, "ScoreTemplate.preamble"),
            _fill(self.query, values, "ScoreTemplate.query"),
        ]
        return self.separator.join(p for p in parts if p)

    @classmethod
    def default(cls, *, chain_of_thought: bool = False, **overrides) -> ScoreTemplate:
        """A 1-10 quality rating prompt."""
        fields = dict(
            preamble=(
                "Rate the response to the prompt on a scale from 1 (very poor) to 10 "
                "(excellent), considering helpfulness, accuracy and harmlessness."
            ),
            query="Prompt: {prompt}\n\nResponse: {response}",
            answer_prompt="Rating=",
            cot_prompt=(
                "Explain the strengths and weaknesses of the response.\n\nRationale:"
                if chain_of_thought
                else None
            ),
        )
        fields.update(overrides)
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class CritiqueTemplate:
    """Transcript layout for constitutional critique and revision (Bai et al. 2022, sec. 3).

    The model generates after ``conversation`` (the response), after
    ``conversation + response_separator + response + critique`` (the critique) and after
    ``... + response_separator + critique_text + revision`` (the revision). Generated text is cut
    before the first of ``stop_strings`` (so a model that runs on into the next turn is
    truncated) and stripped of surrounding whitespace.

    Attributes:
      conversation: requires ``{prompt}``; ends where the assistant's response begins.
      critique: requires ``{critique_request}``; ends where the critique begins.
      revision: requires ``{revision_request}``; ends where the revision begins.
      response_separator: text between a context and the generated text that follows it.
      stop_strings: generation is cut before the first of these.
    """

    conversation: str = "Human: {prompt}\n\nAssistant:"
    critique: str = "\n\nCritiqueRequest: {critique_request}\n\nCritique:"
    revision: str = "\n\nRevisionRequest: {revision_request}\n\nRevision:"
    response_separator: str = " "
    stop_strings: tuple[str, ...] = (
        "\n\nHuman:",
        "\n\nCritiqueRequest:",
        "\n\nRevisionRequest:",
    )

    def __post_init__(self):
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        check_placeholders("CritiqueTemplate.conversation", self.conversation, required=("prompt",))
        check_placeholders(
            "CritiqueTemplate.critique", self.critique, required=("critique_request",)
        )
        check_placeholders(
            "CritiqueTemplate.revision", self.revision, required=("revision_request",)
        )
        if any(not isinstance(x, str) or not x for x in self.stop_strings):
            raise ValueError(
                f"CritiqueTemplate.stop_strings must be non-empty strings, got {self.stop_strings}"
            )

    def render_conversation(self, prompt: str) -> str:
        """Text after which the initial response is generated."""
        return self.conversation.format(prompt=prompt)

    def render_critique_request(self, conversation: str, response: str, request: str) -> str:
        """Text after which the critique is generated."""
        return (
            conversation + self.response_separator + response
            + self.critique.format(critique_request=request)
        )

    def render_revision_request(self, critique_context: str, critique: str, request: str) -> str:
        """Text after which the revision is generated."""
        return (
            critique_context + self.response_separator + critique
            + self.revision.format(revision_request=request)
        )
