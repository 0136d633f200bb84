"""Per-token log-probs from a model, in the two alignments the trainers use.

**Aligned to the token they score** (offline trainers: SFT, reward models, DPO family;
docs/ARCHITECTURE.md): `logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`, `[B, T]`, with
`logps[:, 0] = 0`. They are `rlhf_jax.losses.token_logps(logits[:, :-1], input_ids[:, 1:])`
padded with one zero column in front (`aligned_token_logps`, `model_token_logps`). In packed
rows the first token of each segment has no context inside its segment, so its log-prob is set
to 0 too (and a loss mask never selects it, since a segment's first token is a prompt token).
In prefix-shared rows (`branch_ids`, `rlhf_jax.data.collate_preference(prefix_sharing=True)`)
the first token of every branch after the first is scored by the logits of the prefix's last
token, as it would be in its own row.

**Aligned to the response** (online trainers: PPO, GRPO, RLOO, rejection sampling): a forward
pass over a rollout's ``sequences`` ``[B, P + N]`` gives logits ``[B, P + N, V]``; the logits
that predict response token ``t`` sit at column ``P - 1 + t``, so every per-response-token array
``[B, N]`` (log-probs, values, rewards, advantages) is read from columns ``P - 1 .. P + N - 2``
(`response_logits`, `policy_response_logps`). Both are the same numbers: response token ``t``
of a rollout row is token ``P + t`` of its sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import losses
from rlhf_jax.models import positions_from_mask
from rlhf_jax.train.rollout import Rollout

# ---------------------------------------------------------------------------------------------
# aligned to the token they score
# ---------------------------------------------------------------------------------------------


def aligned_token_logps(
    logits: jax.Array,
    input_ids: jax.Array,
    segment_ids: jax.Array | None = None,
    branch_ids: jax.Array | None = None,
) -> jax.Array:
    """Per-token log-probs aligned to the token they score (module docstring).

    Args:
      logits: `[B, T, V]` next-token logits of a causal LM over `input_ids`.
      input_ids: `[B, T]` int token ids.
      segment_ids: optional `[B, T]` packed-row segment ids; the first token of each segment
        gets log-prob 0.
      branch_ids: optional `[B, T]` prefix-shared rows (0 on the shared prefix at the start of
        the row and on padding, `k > 0` on continuation `k`). A token whose left neighbour is in
        another continuation starts its branch: it is scored by the logits of the prefix's last
        token (log-prob 0 when the prefix is empty, as at position 0 of its own row).

    Returns:
      `[B, T]` float32, `out[:, 0] = 0`, `out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`
      (with `branch_ids`: given the prefix and the earlier tokens of its branch).
    """
    def from_prefix(last):  # [B, V] -> [B, T]: each token's log-prob under the prefix's logits
        return jnp.take_along_axis(jax.nn.log_softmax(last.astype(jnp.float32), axis=-1),
                                   input_ids, axis=1)

    return _align_to_scored(losses.token_logps(logits[:, :-1], input_ids[:, 1:]), logits,
                            segment_ids, branch_ids, fill=0.0, from_prefix=from_prefix)


def _align_to_scored(
    shifted: jax.Array,
    logits: jax.Array,
    segment_ids: jax.Array | None,
    branch_ids: jax.Array | None,
    *,
    fill: float | int,
    from_prefix: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """`[B, T]`: a per-token quantity of the distribution that scores each token, aligned as in
    `aligned_token_logps`.

    `shifted[b, t]` (`[B, T - 1]`) is the quantity of `logits[b, t]`, which scores token `t + 1`.
    Tokens with no context (position 0, a packed segment's first token, a branch start after an
    empty prefix) get `fill`; a branch start gets `from_prefix(last)`, with `last` `[B, V]` the
    logits of the prefix's last token.
    """
    out = jnp.pad(shifted, ((0, 0), (1, 0)), constant_values=fill)
    if segment_ids is not None:
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        same = jnp.pad(same, ((0, 0), (1, 0)), constant_values=False)
        out = jnp.where(same, out, fill)
    if branch_ids is not None:
        prev = jnp.pad(branch_ids[:, :-1], ((0, 0), (1, 0)))
        starts = (branch_ids > 0) & (prev > 0) & (prev != branch_ids)
        prefix_len = jnp.argmax(branch_ids > 0, axis=-1)  # [B]; the prefix is the row's start
        last = jnp.take_along_axis(
            logits, jnp.maximum(prefix_len - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, V]
        scored = jnp.where((prefix_len > 0)[:, None], from_prefix(last), fill)
        out = jnp.where(starts, scored, out)
    return out


def model_inputs(batch: Mapping[str, jax.Array], prefix: str = "") -> dict[str, Any]:
    """The model's keyword inputs from the batch keys `<prefix>attention_mask` etc."""
    out: dict[str, Any] = {}
    for key in ("attention_mask", "positions", "segment_ids", "branch_ids"):
        if prefix + key in batch:
            out[key] = batch[prefix + key]
    return out


def model_scores(
    model: Any, batch: Mapping[str, jax.Array], prefix: str = "", *, with_argmax: bool = False,
    where: jax.Array | None = None,
) -> losses.FusedLogps:
    """Aligned log-probs `[B, T]` (and argmax) of a causal LM on the batch's `<prefix>input_ids`,
    through the fused LM head: the `[B, T, V]` logits are never materialised.

    `where` (`[B, T]`, optional): the tokens to score, the loss mask of the trainers; the others
    get log-prob 0 and argmax -1 and no gradient, and the fused head spends no work on them
    (`CausalLM.token_logps(where=...)`).

    A model with `token_logps` (`rlhf_jax.models.CausalLM`, chunked per
    `ModelConfig.logits_chunk_size`) is scored by it; any other callable
    `model(input_ids, **kwargs) -> [B, T, V]` by `aligned_token_logps` on its logits (argmax
    from those logits, -1 where a token has no context). Same values either way.

    Returns:
      `rlhf_jax.losses.FusedLogps(logps [B, T] float32, None, argmax [B, T] int32 or None)`.
    """
    input_ids = batch[prefix + "input_ids"]
    kwargs = model_inputs(batch, prefix)
    if hasattr(model, "token_logps"):
        return model.token_logps(input_ids, **kwargs, with_argmax=with_argmax, where=where)
    logits = model(input_ids, **kwargs)
    logps = aligned_token_logps(logits, input_ids, kwargs.get("segment_ids"),
                                kwargs.get("branch_ids"))
    argmax = None
    if with_argmax:
        argmax = _align_to_scored(
            jnp.argmax(logits[:, :-1], axis=-1).astype(jnp.int32), logits,
            kwargs.get("segment_ids"), kwargs.get("branch_ids"), fill=-1,
            from_prefix=lambda last: jnp.argmax(last, axis=-1).astype(jnp.int32)[:, None])
    if where is not None:
        where = where.astype(bool)
        logps = jnp.where(where, logps, 0.0)
        argmax = None if argmax is None else jnp.where(where, argmax, -1)
    return losses.FusedLogps(logps, None, argmax)


def model_token_logps(
    model: Any, batch: Mapping[str, jax.Array], prefix: str = ""
) -> tuple[jax.Array, jax.Array]:
    """`(logps [B, T], logits [B, T, V])` of a causal LM on the batch's `<prefix>input_ids`
    (materialises the logits; the trainers use `model_scores`)."""
    input_ids = batch[prefix + "input_ids"]
    kwargs = model_inputs(batch, prefix)
    logits = model(input_ids, **kwargs)
    return aligned_token_logps(logits, input_ids, kwargs.get("segment_ids"),
                               kwargs.get("branch_ids")), logits

# ---------------------------------------------------------------------------------------------
# aligned to the response of a rollout
# ---------------------------------------------------------------------------------------------


def response_logits(logits: jax.Array, prompt_length: int) -> jax.Array:
    """The logits that predict the response tokens: ``logits[:, P - 1 : -1]``.

    Args:
      logits: ``[B, P + N, ...]`` outputs of a forward pass over ``Rollout.sequences`` (works for
        ``[B, P + N]`` values too).
      prompt_length: ``P >= 1``.

    Returns:
      ``[B, N, ...]``: row ``t`` is the output at the state before response token ``t``.
    """
    if prompt_length < 1:
        raise ValueError(f"prompt_length must be >= 1 (a prompt needs a token), got {prompt_length}")
    return logits[:, prompt_length - 1 : -1]


def policy_response_logps(
    model: Any,
    rollout: Rollout,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Per-response-token log-probs (and entropies) of ``rollout`` under a causal LM.

    ``logps[b, t] = log softmax(logits[b, P - 1 + t] / temperature)[response_ids[b, t]]``. The
    logits are divided by the sampling temperature as TRL's PPO/GRPO do, so that at the start of
    an update the ratio to the rollout log-probs is exactly 1. Padded positions (``response_mask``
    0) hold 0 with a model that has ``token_logps`` and whatever the logits give otherwise; every
    consumer masks them.

    Args:
      model: a causal LM; one with ``token_logps`` (``rlhf_jax.models.CausalLM``) runs the fused
        head on the response tokens only (``where=response_mask``: the chunks of the response
        past the longest response cost nothing) and never materialises the logits; any other
        ``model(input_ids, attention_mask=..., positions=...) -> [B, T, V]`` is scored from its
        logits.
      rollout: the sampled batch.
      temperature: sampling temperature ``> 0``.
      with_entropy: also return the per-token entropy of the tempered distribution.

    Returns:
      ``(logps [B, N] float32, entropy [B, N] float32 or None)``.
    """
    kwargs = {"attention_mask": rollout.sequence_mask,
              "positions": positions_from_mask(rollout.sequence_mask)}
    if hasattr(model, "token_logps"):
        if rollout.prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1 (a prompt needs a token), got "
                             f"{rollout.prompt_length}")
        out = model.token_logps(rollout.sequences, **kwargs, start=rollout.prompt_length,
                                temperature=temperature, with_entropy=with_entropy,
                                where=rollout.response_mask)
        return out.logps, out.entropy
    logits = model(rollout.sequences, **kwargs)
    return tempered_response_logps(logits, rollout, temperature=temperature,
                                   with_entropy=with_entropy)


def tempered_response_logps(
    logits: jax.Array, rollout: Rollout, *, temperature: float, with_entropy: bool
) -> tuple[jax.Array, jax.Array | None]:
    """Response log-probs (and entropies) ``[B, N]`` from full-sequence logits ``[B, P + N, V]``
    (`policy_response_logps` after its forward pass)."""
    logits = response_logits(logits, rollout.prompt_length).astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logps = losses.token_logps(logits, rollout.response_ids)
    entropy = losses.entropy_from_logits(logits) if with_entropy else None
    return logps, entropy


__all__ = [
    "aligned_token_logps",
    "model_inputs",
    "model_scores",
    "model_token_logps",
    "policy_response_logps",
    "response_logits",
    "tempered_response_logps",
]
