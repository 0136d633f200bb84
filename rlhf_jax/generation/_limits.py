"""Range checks at the sampler's public API: token ids against the vocabulary, and prompt plus
response lengths against the model's positions.

Both run on the host before the jitted loop, so the loop itself does not change. The prompt ids
and mask are copied to the host for this (``[B, P]`` integers; `_sampler` already reads the mask
to check the left padding). Under a trace, or for a global array with shards on other processes,
the ids are not known here: the id check is skipped and the length check uses the padded
prompt width ``P`` instead of the longest real prompt.

Why refuse instead of clamping: the embedding lookup clips out-of-range ids (an id ``>= V``
reads the last row, ``-1`` the first), and a learned position table clips positions past its
end, so both would give finite, wrong tokens and log-probs without a word.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def model_limits(model: Any) -> tuple[int | None, int | None]:
    """`(vocab_size, max_positions)` of a model with a `config`; None for what it does not say.

    `max_positions` is None when positions past `max_position_embeddings` are meant to work
    (dynamic NTK RoPE scaling, which stretches the frequencies to the sequence length).
    """
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    positions = getattr(config, "max_position_embeddings", None)
    scaling = getattr(config, "rope_scaling", None)
    if getattr(scaling, "rope_type", None) == "dynamic":
        positions = None
    return vocab, positions


def _host(x: Any) -> np.ndarray | None:
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def check_generation_ranges(
    model: Any,
    prompt_ids: Any,
    prompt_mask: Any,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
) -> None:
    """Raises ValueError when a prompt id, `eos_token_id` or `pad_token_id` is outside
    ``[0, vocab_size)``, or when the longest prompt plus `max_new_tokens` needs more positions
    than the model has (`max_position_embeddings`). Messages name the argument and the limit."""
    vocab, max_positions = model_limits(model)
    if vocab is not None:
        for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if value is not None and not 0 <= int(value) < vocab:
                raise ValueError(f"{name}={int(value)} is not a token id of the model: ids must "
                                 f"be in [0, {vocab}) (vocab_size={vocab})")
        ids = _host(prompt_ids)
        if ids is not None:
            bad = np.flatnonzero(((ids < 0) | (ids >= vocab)).reshape(-1))
            if bad.size:
                row, col = np.unravel_index(bad[0], ids.shape)
                raise ValueError(
                    f"prompt_ids[{row}, {col}] = {int(ids[row, col])} is not a token id of the "
                    f"model: ids (padding included) must be in [0, {vocab}) (vocab_size={vocab});"
                    f" {bad.size} id(s) out of range")
    if max_positions is not None:
        mask = _host(prompt_mask)
        if mask is not None:
            longest, what = int(np.max(np.sum(mask != 0, axis=1))), "the longest prompt has"
        else:
            longest, what = int(np.shape(prompt_ids)[1]), "the prompt width is"
        if longest + max_new_tokens > max_positions:
            raise ValueError(
                f"{what} {longest} tokens; with max_new_tokens={max_new_tokens} a response "
                f"would reach position {longest + max_new_tokens - 1}, but the model has "
                f"max_position_embeddings={max_positions}: shorten the prompts or "
                f"max_new_tokens")


__all__ = ["check_generation_ranges", "model_limits"]
