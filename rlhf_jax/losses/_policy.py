"""Policy-gradient objectives: PPO, GRPO, GSPO, CISPO, the clipped value loss and diagnostics."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses._checks import (
    as_mask,
    check_choice,
    check_rank,
    check_same_shape,
    check_value,
    f32,
    is_static_zero,
)
from rlhf_jax.losses._kl import kl_estimate, kl_k3
from rlhf_jax.losses._reductions import masked_mean

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _token_advantages(advantages: chex.Array, logps: chex.Array) -> chex.Array:
    """``[B]`` or ``[B, T]`` advantages as float32 ``[B, T]``-broadcastable."""
    check_rank("advantages", advantages, {1, 2})
    a = f32(advantages)
    if a.ndim == 1:
        if a.shape[0] != logps.shape[0]:
            raise ValueError(f"advantages.shape={a.shape} must be ({logps.shape[0]},) or {logps.shape}")
        return a[:, None]
    check_same_shape(advantages=advantages, logps=logps)
    return a


def _clip_bounds(clip_eps: float, clip_eps_high: float | None) -> tuple[float, float]:
    check_value("clip_eps", clip_eps, low=0.0)
    check_value("clip_eps_high", clip_eps_high, low=0.0)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    return 1.0 - clip_eps, 1.0 + high


def _clipped_surrogate(
    ratio: chex.Array,
    advantages: chex.Array,
    *,
    clip_eps: float,
    clip_eps_high: float | None,
    dual_clip: float | None,
    ratio_cap: float | None = None,
) -> chex.Array:
    low, high = _clip_bounds(clip_eps, clip_eps_high)
    check_value("delta", ratio_cap, low=0.0, low_open=True)
    unclipped = ratio if ratio_cap is None else jnp.minimum(ratio, ratio_cap)
    loss = jnp.maximum(-advantages * unclipped, -advantages * jnp.clip(ratio, low, high))
    check_value("dual_clip", dual_clip, low=1.0, low_open=True)
    if dual_clip is not None:
        loss = jnp.where(advantages < 0, jnp.minimum(loss, -dual_clip * advantages), loss)
    return loss


def ppo_clip_loss(
    logps: chex.Array,
    old_logps: chex.Array,
    advantages: chex.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> chex.Array:
    r"""PPO clipped surrogate loss per token (Schulman et al. 2017), to be minimised.

    .. math::
        r = e^{\log\pi - \log\pi_{\mathrm{old}}},\qquad
        \mathcal{L} = \max\big(-A r,\ -A\,\mathrm{clip}(r, 1-\epsilon_{\mathrm{low}}, 1+\epsilon_{\mathrm{high}})\big)

    as TRL's PPO ``pg_loss_max``. ``clip_eps_high`` decouples the upper bound (DAPO's
    clip-higher, TRL ``epsilon_high``); by default :math:`\epsilon_{\mathrm{high}} = \epsilon_{\mathrm{low}}`.
    ``dual_clip`` :math:`c > 1` (Ye et al. 2020, as in Tunix) bounds the loss of negative
    advantages: :math:`\mathcal{L} \leftarrow \min(\mathcal{L}, -c A)` where :math:`A < 0`.
    Reduce with :func:`aggregate_loss` or :func:`masked_mean`.

    Args:
      logps: ``[B, T]`` log-probs of the sampled tokens under the current policy.
      old_logps: ``[B, T]`` under the sampling policy (treated as constants).
      advantages: ``[B, T]`` or ``[B]`` (broadcast over tokens).
      clip_eps: :math:`\epsilon_{\mathrm{low}}` (keyword-only).
      clip_eps_high: :math:`\epsilon_{\mathrm{high}}`; ``None`` means ``clip_eps``.
      dual_clip: :math:`c`, or ``None`` for no dual clip.

    Returns:
      ``[B, T]`` float32 per-token losses.
    """
    check_rank("logps", logps, 2)
    check_same_shape(logps=logps, old_logps=old_logps)
    a = _token_advantages(advantages, logps)
    ratio = jnp.exp(f32(logps) - jax.lax.stop_gradient(f32(old_logps)))
    return _clipped_surrogate(
        ratio, a, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip
    )


def clipped_value_loss(
    values: chex.Array, old_values: chex.Array, returns: chex.Array, *, clip: float = 0.2
) -> chex.Array:
    r"""PPO clipped value loss per token, as lm-human-preferences and TRL PPO.

    .. math::
        v^{\mathrm{clip}} = v_{\mathrm{old}} + \mathrm{clip}(v - v_{\mathrm{old}}, -c, c),\qquad
        \mathcal{L} = \tfrac12 \max\big((v - R)^2,\ (v^{\mathrm{clip}} - R)^2\big)

    Args:
      values: ``[B, T]`` current value predictions.
      old_values: ``[B, T]`` values at sampling time (constants).
      returns: ``[B, T]`` targets (e.g. from :func:`gae`, constants).
      clip: :math:`c` (TRL's ``cliprange_value``; keyword-only).

    Returns:
      ``[B, T]`` float32.
    """
    check_rank("values", values, 2)
    check_same_shape(values=values, old_values=old_values, returns=returns)
    check_value("clip", clip, low=0.0)
    v = f32(values)
    v_old = jax.lax.stop_gradient(f32(old_values))
    ret = jax.lax.stop_gradient(f32(returns))
    v_clipped = v_old + jnp.clip(v - v_old, -clip, clip)
    return 0.5 * jnp.maximum((v - ret) ** 2, (v_clipped - ret) ** 2)


def sequence_log_ratio(logps: chex.Array, old_logps: chex.Array, mask: chex.Array) -> chex.Array:
    r"""GSPO's sequence log importance ratio: mean token log-ratio over real tokens.

    .. math:: \log s_b = \frac{1}{|y_b|} \sum_t m_{bt}(\log\pi_{bt} - \log\pi^{\mathrm{old}}_{bt})

    i.e. :math:`s_b` is the geometric mean of the token ratios. ``[B]`` float32.
    """
    check_rank("logps", logps, 2)
    check_same_shape(logps=logps, old_logps=old_logps, mask=mask)
    m = as_mask(mask)
    diff = jnp.where(m > 0, f32(logps) - jax.lax.stop_gradient(f32(old_logps)), 0.0) * m
    return jnp.sum(diff, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def grpo_loss(
    logps: chex.Array,
    old_logps: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    *,
    ref_logps: chex.Array | None = None,
    kl_coef: float = 0.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
) -> chex.Array:
    r"""GRPO per-token objective (Shao et al. 2024), matching TRL ``GRPOTrainer``'s per-token loss.

    .. math::
        \mathcal{L}_t = \max\big(-A\,\min(w, \delta),\ -A\,\mathrm{clip}(w, 1-\epsilon_{\mathrm{low}}, 1+\epsilon_{\mathrm{high}})\big)
            + \beta\, k_3(\pi, \pi_{\mathrm{ref}})_t

    with importance weight :math:`w_t = \pi_t / \pi^{\mathrm{old}}_t` for
    ``importance_sampling_level="token"`` or the sequence ratio
    :math:`w_t = s_b = \exp(\mathrm{mean}_t \log(\pi/\pi^{\mathrm{old}}))` for ``"sequence"`` (GSPO,
    TRL ``importance_sampling_level="sequence"``), :math:`\delta` = ``delta`` (TRL's two-sided
    clipping upper bound, off when ``None``), :math:`\beta` = ``kl_coef``, and
    :math:`k_3 = e^{\log\pi_{\mathrm{ref}} - \log\pi} - (\log\pi_{\mathrm{ref}} - \log\pi) - 1`.
    Reduce with :func:`aggregate_loss` (``mode="grpo"``, ``"dapo"``, ...). Padded tokens are 0.

    Args:
      logps: ``[B, T]`` current policy log-probs of the sampled tokens.
      old_logps: ``[B, T]`` sampling-policy log-probs (constants; pass
        ``jax.lax.stop_gradient(logps)`` for a single update per batch).
      advantages: ``[B]`` (one per completion) or ``[B, T]``.
      mask: ``[B, T]`` completion mask.
      ref_logps: ``[B, T]`` reference log-probs; required when ``kl_coef != 0``.
      kl_coef: :math:`\beta` (TRL's ``beta``); a Python number or a traced scalar (a schedule).
      clip_eps: :math:`\epsilon_{\mathrm{low}}` (TRL ``epsilon``).
      clip_eps_high: :math:`\epsilon_{\mathrm{high}}` (TRL ``epsilon_high``); ``None`` = ``clip_eps``.
      importance_sampling_level: ``"token"`` or ``"sequence"``.
      delta: optional upper bound on the unclipped ratio.

    Returns:
      ``[B, T]`` float32 per-token losses (0 on padding).
    """
    check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    check_rank("logps", logps, 2)
    check_same_shape(logps=logps, old_logps=old_logps, mask=mask, ref_logps=ref_logps)
    check_value("kl_coef", kl_coef, low=0.0)
    static_zero = is_static_zero(kl_coef)
    if not static_zero and ref_logps is None:
        raise ValueError("grpo_loss: kl_coef != 0 needs ref_logps")
    a = _token_advantages(advantages, logps)
    m = as_mask(mask)
    if importance_sampling_level == "token":
        log_w = f32(logps) - jax.lax.stop_gradient(f32(old_logps))
    else:
        log_w = sequence_log_ratio(logps, old_logps, mask)[:, None]
    log_w = jnp.where(m > 0, log_w, 0.0)
    loss = _clipped_surrogate(
        jnp.exp(log_w), a, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=None,
        ratio_cap=delta,
    )
    if not static_zero:  # kl_coef may be traced (e.g. a schedule inside jit)
        safe_logps = jnp.where(m > 0, f32(logps), 0.0)
        safe_ref = jnp.where(m > 0, f32(ref_logps), 0.0)
        loss = loss + kl_coef * kl_k3(safe_logps, jax.lax.stop_gradient(safe_ref))
    return jnp.where(m > 0, loss, 0.0)


def gspo_loss(
    logps: chex.Array,
    old_logps: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    *,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    token_level: bool = False,
) -> chex.Array:
    r"""GSPO loss per token (Zheng et al. 2025), sequence-level clipped importance ratio.

    .. math::
        s_b = \exp\Big(\frac{1}{|y_b|}\sum_t \log\frac{\pi_{bt}}{\pi^{\mathrm{old}}_{bt}}\Big),\qquad
        \mathcal{L}_{bt} = \max\big(-A_b\,s_b,\ -A_b\,\mathrm{clip}(s_b, 1-\epsilon_{\mathrm{low}}, 1+\epsilon_{\mathrm{high}})\big)

    broadcast over the real tokens of sequence :math:`b` (reduce with
    ``aggregate_loss(mode="grpo")`` for the paper's sequence mean). With ``token_level=True``
    the ratio is GSPO-token's
    :math:`s_{bt} = \mathrm{sg}[s_b]\,\pi_{bt} / \mathrm{sg}[\pi_{bt}]` (same value as :math:`s_b`;
    same gradient when the advantage is per sequence), as TRL's ``gspo_token`` trainer. Defaults
    are the paper's :math:`\epsilon` (3e-4, 4e-4). Equals :func:`grpo_loss` with
    ``importance_sampling_level="sequence"`` and ``kl_coef=0``.

    Args:
      logps: ``[B, T]`` current policy log-probs.
      old_logps: ``[B, T]`` sampling-policy log-probs (constants).
      advantages: ``[B]`` or ``[B, T]``.
      mask: ``[B, T]``.
      clip_eps: :math:`\epsilon_{\mathrm{low}}`.
      clip_eps_high: :math:`\epsilon_{\mathrm{high}}` (``None`` = ``clip_eps``).
      token_level: use the GSPO-token stop-gradient ratio.

    Returns:
      ``[B, T]`` float32 (0 on padding).
    """
    check_rank("logps", logps, 2)
    check_same_shape(logps=logps, old_logps=old_logps, mask=mask)
    a = _token_advantages(advantages, logps)
    m = as_mask(mask)
    log_s = sequence_log_ratio(logps, old_logps, mask)[:, None]
    if token_level:
        lp = jnp.where(m > 0, f32(logps), 0.0)
        log_w = jax.lax.stop_gradient(log_s) + lp - jax.lax.stop_gradient(lp)
    else:
        log_w = jnp.broadcast_to(log_s, logps.shape)
    loss = _clipped_surrogate(
        jnp.exp(log_w), a, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=None
    )
    return jnp.where(m > 0, loss, 0.0)


def cispo_loss(
    logps: chex.Array,
    old_logps: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    *,
    max_ratio: float = 5.0,
) -> chex.Array:
    r"""CISPO loss per token (MiniMax-M1, 2025), matching TRL ``GRPOTrainer(loss_type="cispo")``.

    .. math::
        \mathcal{L}_t = -\,\mathrm{sg}\big[\min(r_t, \epsilon_{\max})\big]\, A\, \log\pi_t,\qquad
        r_t = \pi_t / \pi^{\mathrm{old}}_t

    The importance weight is clipped and its gradient stopped, so every token keeps a gradient
    (through :math:`\log\pi_t`) however large its ratio. ``max_ratio`` is TRL's
    ``epsilon_high`` for CISPO (:math:`\epsilon_{\max}`). TRL reduces it with the ``"dapo"`` mode
    of :func:`aggregate_loss`.

    Args:
      logps: ``[B, T]``.
      old_logps: ``[B, T]`` (constants).
      advantages: ``[B]`` or ``[B, T]``.
      mask: ``[B, T]``.
      max_ratio: :math:`\epsilon_{\max}` (keyword-only).

    Returns:
      ``[B, T]`` float32 (0 on padding).
    """
    check_rank("logps", logps, 2)
    check_same_shape(logps=logps, old_logps=old_logps, mask=mask)
    check_value("max_ratio", max_ratio, low=0.0, low_open=True)
    a = _token_advantages(advantages, logps)
    m = as_mask(mask)
    lp = jnp.where(m > 0, f32(logps), 0.0)
    log_r = jnp.where(m > 0, lp - f32(old_logps), 0.0)
    weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_r), max_ratio))
    return jnp.where(m > 0, -weight * a * lp, 0.0)


def clip_fraction(
    logps: chex.Array,
    old_logps: chex.Array,
    mask: chex.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    advantages: chex.Array | None = None,
    axis_name: str | None = None,
) -> chex.Array:
    r"""Fraction of real tokens whose PPO ratio is clipped (``"ppo/clipfrac"``).

    Without ``advantages``: :math:`\mathrm{mean}_m\,1[r < 1-\epsilon_{\mathrm{low}} \lor r > 1+\epsilon_{\mathrm{high}}]`.
    With ``advantages``: only the clips that are active in the loss,
    :math:`1[-A\,\mathrm{clip}(r) > -A r]`, TRL PPO's ``pg_clipfrac``. Gradient stopped.

    Args:
      logps, old_logps, mask: ``[B, T]``.
      clip_eps, clip_eps_high: as :func:`ppo_clip_loss`.
      advantages: optional ``[B]`` or ``[B, T]``.
      axis_name: optional mapped axis for a global mean.

    Returns:
      float32 scalar.
    """
    check_rank("logps", logps, 2)
    check_same_shape(logps=logps, old_logps=old_logps, mask=mask)
    low, high = _clip_bounds(clip_eps, clip_eps_high)
    m = as_mask(mask)
    ratio = jnp.exp(jnp.where(m > 0, f32(logps) - f32(old_logps), 0.0))
    ratio = jax.lax.stop_gradient(ratio)
    if advantages is None:
        clipped = (ratio < low) | (ratio > high)
    else:
        a = jax.lax.stop_gradient(_token_advantages(advantages, logps))
        clipped = (-a * jnp.clip(ratio, low, high)) > (-a * ratio)
    return jax.lax.stop_gradient(masked_mean(clipped.astype(jnp.float32), m, axis_name=axis_name))


def approx_kl(
    logps: chex.Array,
    old_logps: chex.Array,
    mask: chex.Array,
    *,
    estimator: str = "k2",
    axis_name: str | None = None,
) -> chex.Array:
    r"""Mean per-token KL estimate between the sampling and current policy (``"ppo/approx_kl"``).

    .. math:: \mathrm{mean}_m\, k(\log\pi, \log\pi_{\mathrm{old}})

    The default ``k2`` (:math:`\tfrac12(\log\pi - \log\pi_{\mathrm{old}})^2`) is TRL PPO's
    ``approxkl``; ``k1``/``k3`` as :func:`kl_k1`/:func:`kl_k3` with :math:`\pi_{\mathrm{ref}}`
    = the old policy. Gradient stopped.

    Returns:
      float32 scalar.
    """
    check_rank("logps", logps, 2)
    check_same_shape(logps=logps, old_logps=old_logps, mask=mask)
    m = as_mask(mask)
    lp = jnp.where(m > 0, f32(logps), 0.0)
    old = jnp.where(m > 0, f32(old_logps), 0.0)
    kl = kl_estimate(lp, old, estimator=estimator)
    return jax.lax.stop_gradient(masked_mean(kl, m, axis_name=axis_name))
