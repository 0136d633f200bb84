"""Token log-probabilities, sequence log-probabilities and entropy from logits.

Target ids out of ``[0, V)``: a call whose targets are known (eager, NumPy or concrete arrays)
raises ``ValueError`` naming the argument, the id and its index. Under ``jax.jit`` the ids are
not inspected on the host (no cost, no device-to-host copy); the log-prob at an out-of-range
target is NaN instead (never a finite number: ``-1`` would otherwise read the last vocabulary
entry), which a trainer's non-finite check catches, and
``checkify.checkify(f, errors=checkify.user_checks)`` reports the ids as an error.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses._checks import (
    as_mask,
    check_rank,
    check_same_shape,
    check_token_ids,
    f32,
)


def _check_logits_targets(logits: chex.Array, targets: chex.Array) -> None:
    check_rank("logits", logits, {2, 3})
    check_rank("targets", targets, logits.ndim - 1)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits.shape[:-1]={logits.shape[:-1]} must equal targets.shape={targets.shape}"
        )


def token_logps(logits: chex.Array, targets: chex.Array) -> chex.Array:
    r"""Log-probability of each target token under softmax(logits).

    The targets are **already shifted**:

    .. math::
        \mathrm{out}[b, t] = \mathrm{logits}[b, t, y_{b,t}]
            - \log \sum_v \exp \mathrm{logits}[b, t, v], \qquad y = \mathrm{targets}.

    Computed as ``take_along_axis(logits) - logsumexp(logits)``; no normalised ``[B, T, V]``
    log-softmax array is formed. For causal-LM inputs ``input_ids [B, T]`` use
    ``token_logps(logits[:, :-1], input_ids[:, 1:])``.

    Args:
      logits: ``[B, T, V]`` (or ``[B, V]``) unnormalised scores, any float dtype.
      targets: ``[B, T]`` (or ``[B]``) integer token ids in ``[0, V)``. Known ids out of range
        raise ``ValueError``; traced ones give NaN at their positions (module docstring).

    Returns:
      ``[B, T]`` (or ``[B]``) float32 log-probabilities.
    """
    _check_logits_targets(logits, targets)
    _check_targets(targets, logits.shape[-1])
    return _token_logps(logits, targets)


def _check_targets(targets: chex.Array, vocab_size: int) -> None:
    if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {jnp.result_type(targets)}")
    check_token_ids("targets", targets, vocab_size)


def _token_logps(logits: chex.Array, targets: chex.Array) -> chex.Array:
    """`token_logps` without the argument checks; NaN where a target is out of ``[0, V)``."""
    logits = f32(logits)
    vocab = logits.shape[-1]
    targets = targets.astype(jnp.int32)
    valid = (targets >= 0) & (targets < vocab)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked - jax.nn.logsumexp(logits, axis=-1), jnp.nan)


def chunked_token_logps(
    logits: chex.Array, targets: chex.Array, *, chunk_size: int = 128
) -> chex.Array:
    r"""``token_logps`` computed over time chunks, for large vocabularies.

    Same values as :func:`token_logps` (same per-position arithmetic), but the time axis is
    processed ``chunk_size`` positions at a time with ``lax.map`` and each chunk is
    rematerialised in the backward pass (``jax.checkpoint``), so the float32 intermediates and
    the softmax of the gradient exist for one ``[B, chunk_size, V]`` block at a time.

    Args:
      logits: ``[B, T, V]`` unnormalised scores.
      targets: ``[B, T]`` integer token ids in ``[0, V)`` (checked as by :func:`token_logps`).
      chunk_size: positions per chunk (keyword-only, > 0). ``T`` is padded up to a multiple.

    Returns:
      ``[B, T]`` float32 log-probabilities.
    """
    check_rank("logits", logits, 3)
    _check_logits_targets(logits, targets)
    _check_targets(targets, logits.shape[-1])
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, t, v = logits.shape
    n_chunks = -(-t // chunk_size)
    pad = n_chunks * chunk_size - t
    logits_p = jnp.pad(logits, ((0, 0), (0, pad), (0, 0)))
    targets_p = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)))
    # [n_chunks, B, c, V] and [n_chunks, B, c]
    logits_c = logits_p.reshape(b, n_chunks, chunk_size, v).swapaxes(0, 1)
    targets_c = targets_p.reshape(b, n_chunks, chunk_size).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        lg, tg = args
        return _token_logps(lg, tg)

    out = jax.lax.map(one_chunk, (logits_c, targets_c))  # [n_chunks, B, c]
    return out.swapaxes(0, 1).reshape(b, n_chunks * chunk_size)[:, :t]


def sequence_logps(
    token_logps: chex.Array, mask: chex.Array, *, average: bool = False
) -> chex.Array:
    r"""Sums (or averages) per-token log-probs over the real tokens of each sequence.

    .. math::
        \log \pi(y \mid x) = \sum_t m_t \ell_t, \qquad
        \text{average: } \sum_t m_t \ell_t \,/\, \max(\sum_t m_t, 1).

    The average is the length-normalised log-prob that SimPO, ORPO and CPO's ``simpo``/``ipo``
    use. Padded positions contribute exactly zero (value and gradient), even if they hold
    ``-inf`` or NaN.

    Args:
      token_logps: ``[B, T]`` per-token log-probs.
      mask: ``[B, T]`` 1 on the tokens to score, 0 elsewhere (float or bool).
      average: divide by the number of real tokens (keyword-only).

    Returns:
      ``[B]`` float32.
    """
    check_rank("token_logps", token_logps, 2)
    check_same_shape(token_logps=token_logps, mask=mask)
    m = as_mask(mask)
    total = jnp.sum(jnp.where(m > 0, f32(token_logps), 0.0) * m, axis=-1)
    if average:
        total = total / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return total


def entropy_from_logits(logits: chex.Array) -> chex.Array:
    r"""Entropy of softmax(logits) along the last axis.

    .. math::
        H[b, t] = -\sum_v p_v \log p_v, \qquad \log p = z - \log \sum_v e^{z_v}.

    Args:
      logits: ``[..., V]`` unnormalised scores (``[B, T, V]`` typically).

    Returns:
      ``[...]`` float32 entropies (``[B, T]``).
    """
    check_rank("logits", logits, {2, 3})
    z = f32(logits)
    logp = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
    p = jnp.exp(logp)
    # Entries with p == 0 (z = -inf) contribute exactly 0 to the value and the gradient.
    safe_logp = jnp.where(p > 0, logp, 0.0)
    return -jnp.sum(p * safe_logp, axis=-1)
