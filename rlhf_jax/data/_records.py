"""Record formats: raw dict records -> validated examples, with errors that name their origin.

Formats (field names follow TRL's dataset formats where TRL has one):

- ``"sft"``: ``{"prompt", "completion"}`` (strings or conversations), ``{"messages"}`` (a
  conversation; loss on assistant turns) or ``{"text"}`` (loss on every token).
- ``"preference"``: ``{"prompt", "chosen", "rejected"}`` as strings or conversations, or with an
  implicit prompt (no ``"prompt"``: the longest common prefix of chosen and rejected, by
  characters for strings and by whole messages for conversations). Optional ``"margin"`` (Llama 2
  preference strength; or ``"score_chosen"`` - ``"score_rejected"`` when both are given; or a
  rater's rating in another field, mapped by a `RatingMargins` passed to `parse_record`) and
  ``"label"`` (probability in [0, 1] that chosen is preferred; default 1.0).
- ``"hh"``: Anthropic HH-RLHF raw transcripts ``{"chosen", "rejected"}``, split by
  `split_hh_transcripts` into a preference example.
- ``"ranking"``: ``{"prompt", "responses": [K], "ranks": [K]}`` with integer ranks, 0 = best.
- ``"kto"``: ``{"prompt", "completion", "label"}`` with a boolean (or 0/1) label.
- ``"prompt"``: ``{"prompt", ...}``; other fields are kept as task fields.

Extra fields are ignored (except for ``"prompt"`` records, which keep them). A conversation is a
list of ``{"role", "content"}`` dicts with roles ``system``, ``user``, ``assistant``
(``"tool"`` is accepted too).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from rlhf_jax.data._examples import (
    Conversation,
    KTOExample,
    PreferenceExample,
    PromptExample,
    RankingExample,
    SFTExample,
    Text,
)
from rlhf_jax.data._hh import HHParseError, split_hh_transcripts

logger = logging.getLogger("rlhf_jax.data")

Format = Literal["sft", "preference", "hh", "ranking", "kto", "prompt"]
FORMATS: tuple[str, ...] = ("sft", "preference", "hh", "ranking", "kto", "prompt")
OnError = Literal["raise", "skip"]
ROLES = ("system", "user", "assistant", "tool")

# Stable reason keys used in errors and in `LoadReport.skipped`.
REASONS = (
    "undecodable",
    "missing_field",
    "bad_type",
    "bad_value",
    "empty_response",
    "identical_responses",
    "prompt_mismatch",
    "missing_assistant_turn",
    "overlong",
    "identical_after_tokenization",
)
TRUNCATIONS = ("prompt", "response", "conversation")
"""Keys of `LoadReport.truncated`: prompts cut to `max_prompt_length`, responses (completions,
chosen / rejected, ranked responses) cut to `max_completion_length` or to fit `max_length`,
and whole conversations (``messages`` SFT examples) cut to `max_length`."""


class RecordError(ValueError):
    """A bad record. `origin` names the file and line/row, `reason` is one of `REASONS`."""

    def __init__(self, origin: str, reason: str, problem: str):
        self.origin = origin
        self.reason = reason
        self.problem = problem
        super().__init__(f"{origin}: {problem} [{reason}]")


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What happened to every row of a source.

    `num_read` rows were read, `num_loaded` became examples and the rest were skipped, counted
    per reason in `skipped`; `first_skipped` lists up to 10 ``"origin: problem"`` strings.
    `truncated` counts the texts of the loaded examples that tokenisation cut, per kind
    (`TRUNCATIONS`: a pair whose chosen and rejected responses were both cut counts 2).
    """

    source: str
    num_read: int
    num_loaded: int
    skipped: Mapping[str, int]
    first_skipped: tuple[str, ...] = ()
    truncated: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_truncated(self) -> int:
        return sum(self.truncated.values())

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        cut = ", ".join(f"{k}={v}" for k, v in sorted(self.truncated.items()) if v) or "none"
        return (
            f"{self.source}: read {self.num_read} rows, loaded {self.num_loaded}, "
            f"skipped {self.num_skipped} ({reasons}), truncated {cut}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON data (for the run summary)."""
        return {
            "source": self.source,
            "read": self.num_read,
            "loaded": self.num_loaded,
            "skipped": dict(sorted(self.skipped.items())),
            "truncated": {k: int(self.truncated.get(k, 0)) for k in TRUNCATIONS},
            "first_skipped": list(self.first_skipped),
        }

    def merge(self, other: LoadReport) -> LoadReport:
        """The report of both steps: rows read here, examples left after `other`."""
        skipped = Counter(self.skipped)
        skipped.update(other.skipped)
        truncated = Counter(self.truncated)
        truncated.update(other.truncated)
        return LoadReport(
            source=self.source,
            num_read=self.num_read,
            num_loaded=other.num_loaded,
            skipped=dict(skipped),
            first_skipped=(self.first_skipped + other.first_skipped)[:10],
            truncated=dict(truncated),
        )


class ReportBuilder:
    """Accumulates a `LoadReport` while rows are processed, applying the `on_error` policy."""

    def __init__(self, source: str, on_error: OnError):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.source = source
        self.on_error = on_error
        self.num_read = 0
        self.num_loaded = 0
        self.skipped: Counter[str] = Counter()
        self.truncated: Counter[str] = Counter()
        self.first: list[str] = []

    def error(self, err: RecordError, *, skip: bool = False) -> None:
        """Raises `err`, or counts it as a skip (always when `skip`)."""
        if self.on_error == "raise" and not skip:
            raise err
        self.skipped[err.reason] += 1
        if len(self.first) < 10:
            self.first.append(f"{err.origin}: {err.problem}")

    def build(self, *, log: bool = True) -> LoadReport:
        report = LoadReport(
            source=self.source,
            num_read=self.num_read,
            num_loaded=self.num_loaded,
            skipped=dict(self.skipped),
            first_skipped=tuple(self.first),
            truncated=dict(self.truncated),
        )
        if log:
            log_report(report)
        return report


def log_report(report: LoadReport) -> None:
    """Logs `report` to the ``rlhf_jax.data`` logger (a warning when rows were skipped or
    texts truncated)."""
    if report.num_skipped:
        logger.warning("%s; first skipped: %s", report, "; ".join(report.first_skipped[:3]))
    elif report.num_truncated:
        logger.warning("%s", report)
    else:
        logger.info("%s", report)


# --------------------------------------------------------------------------------------------
# Field validation


def _require(record: Mapping[str, Any], key: str, origin: str, fmt: str) -> Any:
    if key not in record or record[key] is None:
        present = sorted(record)
        raise RecordError(
            origin,
            "missing_field",
            f"missing field {key!r} for format {fmt!r} (fields present: {present})",
        )
    return record[key]


def _conversation(value: Any, origin: str, field: str) -> Conversation:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise RecordError(origin, "bad_type", f"field {field!r} must be a list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise RecordError(
                origin,
                "bad_type",
                f"field {field!r} message {i} must be a dict with 'role' and 'content'",
            )
        if m["role"] not in ROLES:
            raise RecordError(
                origin,
                "bad_value",
                f"field {field!r} message {i} has role {m['role']!r}; allowed roles: {ROLES}",
            )
        if not isinstance(m["content"], str):
            raise RecordError(
                origin, "bad_type", f"field {field!r} message {i} content must be a string"
            )
        out.append({"role": str(m["role"]), "content": m["content"]})
    return tuple(out)


def _text(value: Any, origin: str, field: str) -> Text:
    """A string, or a conversation (list of messages)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(origin, "undecodable", f"field {field!r} is not UTF-8: {e}") from e
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return _conversation(value, origin, field)
    raise RecordError(
        origin,
        "bad_type",
        f"field {field!r} must be a string or a list of messages, got {type(value).__name__}",
    )


def _is_empty(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return not text or all(not m["content"].strip() for m in text)


def _response(record, key, origin, fmt) -> Text:
    value = _text(_require(record, key, origin, fmt), origin, key)
    if _is_empty(value):
        raise RecordError(origin, "empty_response", f"field {key!r} is empty")
    return value


def _number(value: Any, origin: str, field: str, *, low=-math.inf, high=math.inf) -> float:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(origin, "bad_type", f"field {field!r} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or not low <= x <= high:
        raise RecordError(
            origin, "bad_value", f"field {field!r} must be finite and in [{low}, {high}], got {x}"
        )
    return x


def _common_prefix(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, tuple) and isinstance(rejected, tuple):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    raise TypeError("chosen and rejected must both be strings or both be conversations")


def _same_kind(origin: str, **texts: Text) -> None:
    kinds = {k: isinstance(v, str) for k, v in texts.items()}
    if len(set(kinds.values())) > 1:
        raise RecordError(
            origin,
            "bad_type",
            "fields must all be strings or all be conversations, got "
            + ", ".join(f"{k}={'string' if s else 'conversation'}" for k, s in kinds.items()),
        )


def parse_sft(record: Mapping[str, Any], origin: str) -> SFTExample:
    if record.get("messages") is not None:
        messages = _conversation(record["messages"], origin, "messages")
        assistant = [m for m in messages if m["role"] == "assistant"]
        if not assistant:
            raise RecordError(
                origin, "missing_assistant_turn", "field 'messages' has no assistant turn"
            )
        if all(not m["content"].strip() for m in assistant):
            raise RecordError(origin, "empty_response", "every assistant turn is empty")
        return SFTExample(prompt=None, completion=None, messages=messages, origin=origin)
    if "completion" in record or "prompt" in record:
        prompt = _text(_require(record, "prompt", origin, "sft"), origin, "prompt")
        completion = _response(record, "completion", origin, "sft")
        _same_kind(origin, prompt=prompt, completion=completion)
        return SFTExample(prompt=prompt, completion=completion, messages=None, origin=origin)
    if "text" in record:
        text = _response(record, "text", origin, "sft")
        if not isinstance(text, str):
            raise RecordError(origin, "bad_type", "field 'text' must be a string")
        return SFTExample(prompt="", completion=text, messages=None, origin=origin)
    raise RecordError(
        origin,
        "missing_field",
        f"an 'sft' record needs 'prompt' and 'completion', 'messages' or 'text' "
        f"(fields present: {sorted(record)})",
    )


def parse_preference(record: Mapping[str, Any], origin: str) -> PreferenceExample:
    chosen = _response(record, "chosen", origin, "preference")
    rejected = _response(record, "rejected", origin, "preference")
    _same_kind(origin, chosen=chosen, rejected=rejected)
    if record.get("prompt") is not None:
        prompt = _text(record["prompt"], origin, "prompt")
        _same_kind(origin, prompt=prompt, chosen=chosen)
    else:
        prompt, chosen, rejected = _common_prefix(chosen, rejected)
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if _is_empty(value):
                raise RecordError(
                    origin,
                    "empty_response",
                    f"field {key!r} is empty after removing the implicit prompt",
                )
    if chosen == rejected:
        raise RecordError(origin, "identical_responses", "chosen and rejected are identical")
    margin = 0.0
    if record.get("margin") is not None:
        margin = _number(record["margin"], origin, "margin")
    elif record.get("score_chosen") is not None and record.get("score_rejected") is not None:
        margin = _number(record["score_chosen"], origin, "score_chosen") - _number(
            record["score_rejected"], origin, "score_rejected"
        )
    label = 1.0
    if record.get("label") is not None:
        label = _number(record["label"], origin, "label", low=0.0, high=1.0)
    return PreferenceExample(prompt, chosen, rejected, margin=margin, label=label, origin=origin)


def parse_hh(record: Mapping[str, Any], origin: str) -> PreferenceExample:
    chosen = _require(record, "chosen", origin, "hh")
    rejected = _require(record, "rejected", origin, "hh")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise RecordError(origin, "bad_type", "HH-RLHF 'chosen' and 'rejected' must be strings")
    try:
        prompt, c, r = split_hh_transcripts(chosen, rejected)
    except HHParseError as e:
        raise RecordError(origin, e.reason, str(e)) from None
    if not c.strip() or not r.strip():
        which = "chosen" if not c.strip() else "rejected"
        raise RecordError(origin, "empty_response", f"the final {which} Assistant turn is empty")
    if c == r:
        raise RecordError(origin, "identical_responses", "chosen and rejected are identical")
    return PreferenceExample(prompt, c, r, margin=0.0, label=1.0, origin=origin)


def parse_ranking(record: Mapping[str, Any], origin: str) -> RankingExample:
    prompt = _text(_require(record, "prompt", origin, "ranking"), origin, "prompt")
    responses = _require(record, "responses", origin, "ranking")
    ranks = _require(record, "ranks", origin, "ranking")
    if isinstance(responses, str | bytes) or not isinstance(responses, Sequence):
        raise RecordError(origin, "bad_type", "field 'responses' must be a list")
    if isinstance(ranks, str | bytes) or not isinstance(ranks, Sequence):
        raise RecordError(origin, "bad_type", "field 'ranks' must be a list of integers")
    responses = [_text(r, origin, f"responses[{i}]") for i, r in enumerate(responses)]
    ranks = list(ranks)
    if len(responses) < 2:
        raise RecordError(origin, "bad_value", "a ranking needs at least 2 responses")
    if len(ranks) != len(responses):
        raise RecordError(
            origin,
            "bad_value",
            f"'ranks' has {len(ranks)} entries but 'responses' has {len(responses)}",
        )
    k = len(responses)
    for i, r in enumerate(ranks):
        if (
            isinstance(r, bool)
            or not isinstance(r, int | float)
            or not float(r).is_integer()
            or not 0 <= r < k
        ):
            raise RecordError(
                origin, "bad_value", f"ranks[{i}]={r!r} must be an integer in [0, {k})"
            )
    for i, r in enumerate(responses):
        if _is_empty(r):
            raise RecordError(origin, "empty_response", f"responses[{i}] is empty")
    if len({repr(r) for r in responses}) < k:
        raise RecordError(origin, "identical_responses", "'responses' contains duplicates")
    _same_kind(origin, prompt=prompt, **{f"responses[{i}]": r for i, r in enumerate(responses)})
    return RankingExample(prompt, tuple(responses), tuple(int(r) for r in ranks), origin)


def parse_kto(record: Mapping[str, Any], origin: str) -> KTOExample:
    prompt = _text(_require(record, "prompt", origin, "kto"), origin, "prompt")
    completion = _response(record, "completion", origin, "kto")
    _same_kind(origin, prompt=prompt, completion=completion)
    label = _require(record, "label", origin, "kto")
    if isinstance(label, bool) or (isinstance(label, int | float) and label in (0, 1)):
        return KTOExample(prompt, completion, bool(label), origin)
    raise RecordError(origin, "bad_value", f"field 'label' must be a boolean or 0/1, got {label!r}")


def parse_prompt(record: Mapping[str, Any], origin: str) -> PromptExample:
    prompt = _text(_require(record, "prompt", origin, "prompt"), origin, "prompt")
    if _is_empty(prompt):
        raise RecordError(origin, "empty_response", "field 'prompt' is empty")
    fields = {k: v for k, v in record.items() if k != "prompt"}
    return PromptExample(prompt, fields, origin)


_PARSERS = {
    "sft": parse_sft,
    "preference": parse_preference,
    "hh": parse_hh,
    "ranking": parse_ranking,
    "kto": parse_kto,
    "prompt": parse_prompt,
}


def parse_record(record: Any, *, format: Format, origin: str, rating_margins: Any = None):
    """Validates one raw record of `format` into an example.

    `rating_margins` (a `rlhf_jax.data.RatingMargins`) sets a preference pair's `margin` from
    the rater's rating in the record (Llama 2), instead of the numeric ``"margin"`` field.

    Raises:
      RecordError: naming `origin`, the problem and its reason key.
      ValueError: for an unknown `format`.
    """
    if format not in _PARSERS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    if not isinstance(record, Mapping):
        raise RecordError(
            origin, "bad_type", f"a record must be a JSON object, got {type(record).__name__}"
        )
    example = _PARSERS[format](record, origin)
    if rating_margins is not None and isinstance(example, PreferenceExample):
        example = example._replace(margin=rating_margins.margin(record, origin))
    return example
