"""Anthropic HH-RLHF raw transcripts -> (shared prompt, chosen response, rejected response)."""

from __future__ import annotations

from typing import NamedTuple

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


class HHParseError(ValueError):
    """A transcript pair that cannot be split; `reason` is a `LoadReport` reason key."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class HHSplit(NamedTuple):
    prompt: str
    chosen: str
    rejected: str


def _prompt_end(transcript: str, which: str) -> int:
    """Index just past the final ``"\\n\\nAssistant:"`` marker of `transcript`."""
    human = transcript.find(HUMAN)
    a = transcript.rfind(ASSISTANT)
    if a < 0:
        raise HHParseError(
            "missing_assistant_turn", f"the {which} transcript has no {ASSISTANT!r} turn"
        )
    if human < 0 or human > transcript.find(ASSISTANT):
        raise HHParseError(
            "bad_value", f"the {which} transcript does not open with a {HUMAN!r} turn"
        )
    if transcript.rfind(HUMAN) > a:
        raise HHParseError(
            "missing_assistant_turn",
            f"the {which} transcript ends with a Human turn, not a final Assistant turn",
        )
    return a + len(ASSISTANT)


def split_hh_transcripts(chosen: str, rejected: str) -> HHSplit:
    """Splits an HH-RLHF pair of full transcripts into the shared prompt and the two responses.

    Each transcript is a dialogue of ``"\\n\\nHuman: ..."`` and ``"\\n\\nAssistant: ..."`` turns;
    the two differ only in the final Assistant turn. The prompt is everything up to and
    including the final ``"\\n\\nAssistant:"`` marker; each response is the text after it,
    unchanged (so it usually starts with a space), as in the DPO reference implementation's
    HH-RLHF loader.

    Args:
      chosen: the preferred transcript.
      rejected: the dispreferred transcript.

    Returns:
      `HHSplit(prompt, chosen, rejected)` (a tuple `(prompt, chosen_response,
      rejected_response)`).

    Raises:
      HHParseError: with `reason` ``"missing_assistant_turn"`` when a transcript has no final
        Assistant turn, ``"bad_value"`` when it does not open with a Human turn, and
        ``"prompt_mismatch"`` when the two transcripts do not share the prompt (the message says
        where they first differ).
    """
    c_end = _prompt_end(chosen, "chosen")
    r_end = _prompt_end(rejected, "rejected")
    prompt, other = chosen[:c_end], rejected[:r_end]
    if prompt != other:
        i = next(
            (k for k, (x, y) in enumerate(zip(prompt, other)) if x != y),
            min(len(prompt), len(other)),
        )
        raise HHParseError(
            "prompt_mismatch",
            "chosen and rejected transcripts do not share a prompt: they first differ at "
            f"character {i} (chosen {prompt[i : i + 30]!r} vs rejected {other[i : i + 30]!r})",
        )
    return HHSplit(prompt, chosen[c_end:], rejected[r_end:])
