"""Validated examples (text) and tokenized examples (token ids), one type per record format.

Validated examples hold text or conversations; tokenized examples hold 1-D int32 token arrays.
Every example carries `origin`, a human-readable location such as ``"data.jsonl:17"``, so
errors raised after loading (tokenization, over-long rows) still name the file and line.

A conversation is a tuple of ``{"role": str, "content": str}`` dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

Message = Mapping[str, str]
Conversation = tuple[Message, ...]
Text = str | Conversation


class SFTExample(NamedTuple):
    """Supervised fine-tuning example.

    Exactly one of (`prompt`, `completion`) or `messages` is set:
    - `prompt`/`completion`: loss on completion tokens only (prompt may be empty for plain text).
    - `messages`: a conversation; loss on assistant-turn tokens only.
    """

    prompt: Text | None
    completion: Text | None
    messages: Conversation | None
    origin: str


class PreferenceExample(NamedTuple):
    """Pairwise preference: `chosen` preferred to `rejected` after `prompt`.

    `margin` is the Llama 2 preference-strength margin (0.0 when absent); `label` is the
    probability that `chosen` is preferred (1.0 for hard labels; soft labels from AI judges or rater
    consensus lie in [0, 1]).
    """

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float
    label: float
    origin: str


class RankingExample(NamedTuple):
    """K-way ranking (InstructGPT): `ranks[k]` is the rank of `responses[k]`, 0 = best."""

    prompt: Text
    responses: tuple[Text, ...]
    ranks: tuple[int, ...]
    origin: str


class KTOExample(NamedTuple):
    """Unpaired labelled completion (KTO): `label` True for desirable, False for undesirable."""

    prompt: Text
    completion: Text
    label: bool
    origin: str


class PromptExample(NamedTuple):
    """Prompt-only example for RL; `fields` keeps the record's other (task) fields."""

    prompt: Text
    fields: Mapping[str, Any]
    origin: str


class TokenizedSFT(NamedTuple):
    """`input_ids [L]` int32, `loss_mask [L]` int32 (1 on tokens the loss is taken over)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    origin: str


class TokenizedPreference(NamedTuple):
    """`prompt_ids [P]`, `chosen_ids [C]`, `rejected_ids [R]` int32; scalars `margin`, `label`."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    margin: float
    label: float
    origin: str


class TokenizedRanking(NamedTuple):
    """`prompt_ids [P]`, `response_ids` (K arrays), `ranks [K]` int32 (0 = best)."""

    prompt_ids: np.ndarray
    response_ids: tuple[np.ndarray, ...]
    ranks: np.ndarray
    origin: str


class TokenizedKTO(NamedTuple):
    """`prompt_ids [P]`, `completion_ids [C]` int32; `label` True = desirable."""

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    label: bool
    origin: str


class TokenizedPrompt(NamedTuple):
    """`prompt_ids [P]` int32; `fields` are the numeric task fields passed through to batches."""

    prompt_ids: np.ndarray
    fields: Mapping[str, Any]
    origin: str
    index: int
