"""KL-divergence estimators (Schulman, "Approximating KL divergence", 2020) and exact KL."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses._checks import check_choice, check_rank, check_same_shape, check_value, f32

KL_ESTIMATORS = ("k1", "k2", "k3")


def _log_ratio(logps: chex.Array, ref_logps: chex.Array) -> chex.Array:
    check_same_shape(logps=logps, ref_logps=ref_logps)
    # log r = log pi_ref - log pi, with samples drawn from pi.
    return f32(ref_logps) - f32(logps)


def _clamp(x: chex.Array, clamp: float | None) -> chex.Array:
    check_value("clamp", clamp, low=0.0, low_open=True)
    return x if clamp is None else jnp.clip(x, -clamp, clamp)


def kl_k1(logps: chex.Array, ref_logps: chex.Array, *, clamp: float | None = None) -> chex.Array:
    r"""k1 estimator of :math:`\mathrm{KL}(\pi \,\|\, \pi_{\mathrm{ref}})` for samples from :math:`\pi`.

    .. math:: k_1 = -\log r = \log \pi(y) - \log \pi_{\mathrm{ref}}(y), \qquad
              r = \pi_{\mathrm{ref}}(y) / \pi(y)

    Unbiased, high variance, can be negative (Schulman 2020). This is the per-token KL of
    Ziegler et al. / TRL PPO ``kl_estimator="k1"``.

    Args:
      logps: ``[...]`` log-probs of the sampled tokens under the policy.
      ref_logps: same shape, under the reference policy.
      clamp: if set, the estimate is clipped to ``[-clamp, clamp]`` (keyword-only).

    Returns:
      float32, same shape.
    """
    return _clamp(-_log_ratio(logps, ref_logps), clamp)


def kl_k2(logps: chex.Array, ref_logps: chex.Array, *, clamp: float | None = None) -> chex.Array:
    r"""k2 estimator: :math:`k_2 = \tfrac12 (\log r)^2`, :math:`r = \pi_{\mathrm{ref}}/\pi`.

    Biased, low variance, always >= 0 (Schulman 2020); the ``approxkl`` of TRL PPO.

    Args:
      logps: ``[...]`` policy log-probs of sampled tokens.
      ref_logps: same shape, reference log-probs.
      clamp: optional clip of the estimate to ``[-clamp, clamp]``.

    Returns:
      float32, same shape.
    """
    return _clamp(0.5 * _log_ratio(logps, ref_logps) ** 2, clamp)


def kl_k3(logps: chex.Array, ref_logps: chex.Array, *, clamp: float | None = None) -> chex.Array:
    r"""k3 estimator: :math:`k_3 = (r - 1) - \log r`, :math:`r = \pi_{\mathrm{ref}}/\pi`.

    Unbiased, low variance, always >= 0 (Schulman 2020). Written in log-probs:
    :math:`k_3 = e^{\log\pi_{\mathrm{ref}} - \log\pi} - (\log\pi_{\mathrm{ref}} - \log\pi) - 1`,
    the per-token KL of TRL's GRPO (``beta`` term) and PPO ``kl_estimator="k3"``.

    Args:
      logps: ``[...]`` policy log-probs of sampled tokens.
      ref_logps: same shape, reference log-probs.
      clamp: optional clip of the log-ratio *and* the estimate to ``[-clamp, clamp]`` (the
        log-ratio clip keeps ``exp`` finite).

    Returns:
      float32, same shape.
    """
    log_r = _log_ratio(logps, ref_logps)
    if clamp is not None:
        log_r = jnp.clip(log_r, -clamp, clamp)
    return _clamp(jnp.expm1(log_r) - log_r, clamp)


def kl_estimate(
    logps: chex.Array, ref_logps: chex.Array, *, estimator: str = "k1", clamp: float | None = None
) -> chex.Array:
    """Dispatches to :func:`kl_k1`, :func:`kl_k2` or :func:`kl_k3` by name (``estimator``)."""
    check_choice("estimator", estimator, KL_ESTIMATORS)
    fn = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}[estimator]
    return fn(logps, ref_logps, clamp=clamp)


def kl_from_logits(logits: chex.Array, ref_logits: chex.Array) -> chex.Array:
    r"""Exact :math:`\mathrm{KL}(\pi \,\|\, \pi_{\mathrm{ref}})` per position, over the full vocabulary.

    .. math:: \mathrm{KL}[b, t] = \sum_v p_v (\log p_v - \log q_v), \quad
              p = \mathrm{softmax}(\mathrm{logits}), \; q = \mathrm{softmax}(\mathrm{ref\_logits})

    Args:
      logits: ``[B, T, V]`` policy logits.
      ref_logits: ``[B, T, V]`` reference logits.

    Returns:
      ``[B, T]`` float32, >= 0.
    """
    check_rank("logits", logits, {2, 3})
    check_same_shape(logits=logits, ref_logits=ref_logits)
    logp = jax.nn.log_softmax(f32(logits), axis=-1)
    logq = jax.nn.log_softmax(f32(ref_logits), axis=-1)
    p = jnp.exp(logp)
    diff = jnp.where(p > 0, logp - logq, 0.0)
    return jnp.sum(p * diff, axis=-1)
