"""Rotary position embeddings (RoPE) with the scaling variants Hugging Face implements.

The inverse frequencies follow `transformers.modeling_rope_utils` exactly:

- default: `inv_freq[i] = theta ** (-2i / D)`, `i = 0 .. D/2 - 1`.
- linear: `inv_freq / factor`.
- dynamic (NTK): with `s = max(max_position + 1, P)` over the batch (P = max_position_embeddings),
  `theta' = theta * (factor * s / P - (factor - 1)) ** (D / (D - 2))`; equal to default while the
  sequence fits in P.
- llama3: wavelengths `2 pi / inv_freq` above `P0 / low_freq_factor` are divided by `factor`,
  those below `P0 / high_freq_factor` are kept, the band between is interpolated smoothly
  (P0 = original_max_position_embeddings).
- yarn: a ramp between interpolated (`/factor`) and extrapolated frequencies over the
  correction range given by `beta_fast`/`beta_slow`, and cos/sin multiplied by
  `attention_factor = 0.1 ln(factor) + 1` (or the mscale ratio).

Rotation uses the "rotate half" layout of Hugging Face Llama checkpoints:
`x' = x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))


def static_inv_freq(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies `[D/2]` (float32) and the cos/sin attention factor.

    For `"dynamic"` scaling this is the unscaled table; `rope_tables` rescales it at run time.
    """
    dim = config.resolved_head_dim
    theta = float(config.rope_theta)
    scaling = config.rope_scaling
    inv_freq = _default_inv_freq(theta, dim).astype(np.float32)
    if scaling is None or scaling.rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32), 1.0
    if scaling.rope_type == "llama3":
        factor = scaling.factor
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        old_len = scaling.original_max_position_embeddings or config.max_position_embeddings
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        inv_llama = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, inv_llama).astype(np.float32), 1.0
    if scaling.rope_type == "yarn":
        original = scaling.original_max_position_embeddings or config.max_position_embeddings
        factor = scaling.factor
        if factor is None:
            factor = config.max_position_embeddings / original

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.attention_factor
        if attention_factor is None:
            if scaling.mscale and scaling.mscale_all_dim:
                attention_factor = float(
                    get_mscale(factor, scaling.mscale) / get_mscale(factor, scaling.mscale_all_dim)
                )
            else:
                attention_factor = get_mscale(factor)
        beta_fast = scaling.beta_fast or 32
        beta_slow = scaling.beta_slow or 1

        def correction_dim(rotations):
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
        pos_freqs = theta ** (np.arange(0, dim, 2).astype(np.float32) / dim)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (factor * pos_freqs)
        extra_factor = 1 - ramp
        inv = interpolation * (1 - extra_factor) + extrapolation * extra_factor
        return inv.astype(np.float32), float(attention_factor)
    raise ValueError(f"unsupported rope_type {scaling.rope_type!r}")


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, T, D]` (float32) for integer `positions [B, T]`."""
    inv_freq, attention_factor = static_inv_freq(config)
    inv = jnp.asarray(inv_freq)
    scaling = config.rope_scaling
    if scaling is not None and scaling.rope_type == "dynamic":
        dim = config.resolved_head_dim
        max_pos = config.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        base = config.rope_theta * (
            (scaling.factor * seq_len / max_pos) - (scaling.factor - 1)
        ) ** (dim / (dim - 2))
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        inv = 1.0 / (base**exponents)
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x [B, T, N, D]` by `cos, sin [B, T, D]`; math in float32, result in x.dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
