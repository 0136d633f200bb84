"""Masked reductions and the loss aggregation modes of TRL's GRPOTrainer."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses._checks import as_mask, check_choice, check_rank, check_same_shape, f32

AGGREGATION_MODES = ("grpo", "bnpo", "dapo", "dr_grpo")


def _psum(x: chex.Array, axis_name: str | None) -> chex.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _global_value(local: chex.Array, axis_name: str | None) -> chex.Array:
    """Sum of ``local`` over ``axis_name`` whose gradient is this device's own term.

    The value is ``psum(local)`` (identical on every device); its derivative with respect to
    this device's inputs is ``d local``, so no transpose of a collective is involved and the
    gradient is the same under ``jax.pmap`` and ``jax.shard_map``.
    """
    if axis_name is None:
        return local
    return local + jax.lax.stop_gradient(jax.lax.psum(local, axis_name) - local)


def _masked(x: chex.Array, mask: chex.Array) -> tuple[chex.Array, chex.Array]:
    """float32 ``x`` with padded entries replaced by 0 (so NaN/inf there cannot leak), and the mask."""
    m = as_mask(mask)
    return jnp.where(m > 0, f32(x), 0.0) * m, m


def masked_sum(
    x: chex.Array, mask: chex.Array, *, axis: int | tuple[int, ...] | None = None,
    axis_name: str | None = None,
) -> chex.Array:
    r"""Sum of ``x`` over the entries where ``mask`` is 1: :math:`\sum_i m_i x_i`.

    Padded entries contribute exactly zero (value and gradient), even if they hold NaN/inf.

    Args:
      x: any shape.
      mask: same shape as ``x``, 1 on real entries (float or bool).
      axis: axes to reduce (keyword-only); ``None`` reduces everything.
      axis_name: if given, also sum across this mapped device axis (pmap / shard_map).

    Returns:
      float32 array with ``axis`` reduced.
    """
    check_same_shape(x=x, mask=mask)
    xm, _ = _masked(x, mask)
    return _global_value(jnp.sum(xm, axis=axis), axis_name)


def masked_mean(
    x: chex.Array, mask: chex.Array, *, axis: int | tuple[int, ...] | None = None,
    axis_name: str | None = None,
) -> chex.Array:
    r"""Mean of ``x`` over the entries where ``mask`` is 1.

    .. math:: \sum_i m_i x_i \,/\, \max(\sum_i m_i, 1)

    A fully masked reduction returns 0 (with zero gradient), not NaN.

    Args:
      x: any shape.
      mask: same shape as ``x``.
      axis: axes to reduce (keyword-only); ``None`` reduces everything.
      axis_name: if given, the mean is over all devices of this mapped axis (numerator and
        count summed across devices); the result is the same on every device.

    Returns:
      float32 array with ``axis`` reduced.
    """
    check_same_shape(x=x, mask=mask)
    xm, m = _masked(x, mask)
    count = _psum(jnp.sum(m, axis=axis), axis_name)
    return _global_value(jnp.sum(xm, axis=axis) / jnp.maximum(count, 1.0), axis_name)


def masked_var(
    x: chex.Array, mask: chex.Array, *, unbiased: bool = True, axis_name: str | None = None
) -> chex.Array:
    r"""Variance of the masked entries of ``x`` (all axes), unbiased by default.

    .. math::
        \mu = \frac{\sum m x}{\sum m}, \quad
        \sigma^2 = \frac{\sum m (x-\mu)^2}{\sum m} \cdot \frac{n}{n - 1}, \quad n = \sum m

    as TRL's / lm-human-preferences' ``masked_var`` (Bessel's correction; for ``n <= 1`` the
    correction factor is taken as 1 instead of raising).

    Returns:
      float32 scalar.
    """
    check_same_shape(x=x, mask=mask)
    xm, m = _masked(x, mask)
    mean = masked_mean(x, mask, axis_name=axis_name)
    # Centre the cleaned entries: NaN/inf in padding must not reach the gradient through `x - mean`.
    centered = xm - mean
    var = masked_mean(centered**2, mask, axis_name=axis_name)
    if unbiased:
        n = _psum(jnp.sum(m), axis_name)
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1.0, 1.0), 1.0)
    return var


def masked_whiten(
    x: chex.Array, mask: chex.Array, *, shift_mean: bool = True, axis_name: str | None = None
) -> chex.Array:
    r"""Whitens ``x`` with the mean and unbiased variance of its masked entries.

    .. math::
        w = (x - \mu) / \sqrt{\sigma^2 + 10^{-8}}, \qquad
        \text{shift\_mean=False: } w + \mu

    matching lm-human-preferences' ``whiten`` and TRL's ``masked_whiten`` (statistics over all
    real entries of the array, Bessel-corrected variance, ``1e-8`` inside the square root;
    ``shift_mean=False`` adds the mean back, as PPO does when whitening rewards). Padded entries
    of the output are 0.

    Args:
      x: any shape, e.g. ``[B, T]`` advantages.
      mask: same shape as ``x``.
      shift_mean: keep the output zero-mean (keyword-only).
      axis_name: if given, the statistics are over all devices of this mapped axis.

    Returns:
      float32 array shaped like ``x``.
    """
    check_same_shape(x=x, mask=mask)
    xm, m = _masked(x, mask)
    mean = masked_mean(x, mask, axis_name=axis_name)
    var = masked_var(x, mask, axis_name=axis_name)
    w = (xm - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        w = w + mean
    return jnp.where(m > 0, w, 0.0)


def aggregate_loss(
    per_token_loss: chex.Array,
    mask: chex.Array,
    *,
    mode: str,
    axis_name: str | None = None,
    max_completion_length: int | None = None,
) -> chex.Array:
    r"""Reduces a per-token loss ``[B, T]`` to a scalar as TRL's ``GRPOTrainer`` ``loss_type`` does.

    With :math:`\ell` the per-token loss and :math:`m` the mask:

    * ``"grpo"``: per-sequence mean, then batch mean,
      :math:`\frac{1}{B}\sum_b \frac{\sum_t m_{bt}\ell_{bt}}{\max(\sum_t m_{bt}, 1)}`
      (long sequences weigh less per token).
    * ``"bnpo"`` / ``"dapo"``: token mean over the whole batch,
      :math:`\sum_{b,t} m\ell \,/\, \max(\sum_{b,t} m, 1)` (DAPO's token-level loss).
      With ``axis_name`` the count is global over devices, as TRL's ``dapo`` divides by the
      global ``num_items_in_batch``. (TRL's ``bnpo`` divides by each process's own count;
      here both names use the global count.)
    * ``"dr_grpo"``: constant normaliser,
      :math:`\sum_{b,t} m\ell \,/\, (B \cdot L_{\max})` with
      :math:`L_{\max}` = ``max_completion_length`` (default ``T``), Dr. GRPO's unbiased form.

    With ``axis_name`` every mode is the reduction over the whole global batch (rows and counts
    summed across the mapped axis), so the value equals the single-device value on the
    concatenated batch, under ``jax.pmap`` and ``jax.shard_map`` alike. The gradient with
    respect to a device's inputs is that device's term of the global loss; sum parameter
    gradients across ``axis_name`` (``shard_map`` does this itself for replicated parameters).

    Args:
      per_token_loss: ``[B, T]``.
      mask: ``[B, T]`` 1 on real tokens.
      mode: one of ``"grpo"``, ``"bnpo"``, ``"dapo"``, ``"dr_grpo"`` (keyword-only).
      axis_name: optional mapped axis to reduce over.
      max_completion_length: ``dr_grpo``'s constant; defaults to ``T``.

    Returns:
      float32 scalar.
    """
    check_choice("mode", mode, AGGREGATION_MODES)
    check_rank("per_token_loss", per_token_loss, 2)
    check_same_shape(per_token_loss=per_token_loss, mask=mask)
    lm, m = _masked(per_token_loss, mask)
    b, t = per_token_loss.shape
    if mode == "grpo":
        seq_mean = jnp.sum(lm, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
        n_rows = _psum(jnp.asarray(b, jnp.float32), axis_name)
        local = jnp.sum(seq_mean) / n_rows
    elif mode in ("bnpo", "dapo"):
        count = _psum(jnp.sum(m), axis_name)
        local = jnp.sum(lm) / jnp.maximum(count, 1.0)
    else:  # dr_grpo
        length = t if max_completion_length is None else max_completion_length
        if length <= 0:
            raise ValueError(f"max_completion_length must be positive, got {length}")
        n_rows = _psum(jnp.asarray(b, jnp.float32), axis_name)
        local = jnp.sum(lm) / (n_rows * length)
    return _global_value(local, axis_name)
