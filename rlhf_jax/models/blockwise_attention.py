"""Blockwise (flash-style) attention: no `[B, H, T, S]` scores in the forward or the backward.

`blockwise_attention(q, k, v, mask, scale=..., block_q=..., block_k=...)` computes what
`rlhf_jax.models.layers.dot_product_attention` computes,

    out = softmax(scale * q k^T + bias(mask)) v,

one `[block_q, block_k]` tile of scores per (row, head) at a time, with an online softmax
(a running row maximum `m` and sum `l`, float32; Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax"; Dao et al. 2022, "FlashAttention"). A `jax.custom_vjp` stores only
the output and the per-row log-sum-exp `lse = m + log(l)` for the backward pass, which
recomputes each tile's probabilities `p = exp(scale * q k^T - lse)` and accumulates

    dv += p^T do,   ds = p * (do v^T - rowsum(do * out)),   dq += scale * ds k,
    dk += scale * ds^T q

(FlashAttention-2's backward; one pass over the key tiles, each visiting the query tiles).

Structure (the same as the Pallas flash kernels and maxtext's, written with `jax.lax` loops so
that it runs on every backend): the forward scans over query tiles and, inside, loops over key
tiles; the backward scans over key tiles and, inside, loops over query tiles. With
`causal=True` (the caller promises that key slot j is never visible from query slot i < j, as in
every no-cache decoder mask) tiles strictly above the diagonal are skipped, which halves the
work at long T. T and S that are not multiples of the tile are padded (masked) inside.

Fully masked rows (a left-padded row's padding queries) give an output of exactly 0 and zero
gradients (the dense path gives the mean of `v` there); no real token ever attends to them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_NEG = float(jnp.finfo(jnp.float32).min)

SAVED_NAMES = ("attention_out", "attention_lse")
"""`checkpoint_name`s of the custom VJP's residuals: `[B, K, G, T, D]` output and `[B, K, G, T]`
float32 log-sum-exp per layer. A `jax.checkpoint` policy that saves these names
(`jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)`) keeps the backward pass from
recomputing the forward loop."""


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    block_q: int = 128,
    block_k: int = 128,
    causal: bool = False,
) -> jax.Array:
    """Grouped-query attention computed tile by tile, float32 softmax statistics.

    Args:
      q: `[B, T, H, D]` queries.
      k, v: `[B, S, K, D]` keys and values; K divides H (query head h reads kv head
        `h // (H // K)`).
      mask: `[B, T, S]` bool, True where query i may attend to key j (padding, causal,
        packing segments and prefix-sharing branches folded in, as
        `rlhf_jax.models.layers.attention_weights_mask` builds it).
      scale: multiplies `q k^T` (usually `D ** -0.5`).
      block_q, block_k: tile sizes along T and S (clipped to T and S). Memory for scores is
        `O(B * H * block_q * block_k)` float32, forward and backward.
      causal: skip the key tiles that lie wholly after a query tile's last slot (needs
        `T == S` and a mask that never shows a key j > i to query i; the mask is still applied).

    Returns:
      `[B, T, H, D]` in q's dtype: `softmax(scale * q k^T + bias(mask)) v`, with the rows whose
      mask is all False set to 0.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"blockwise_attention: q must be [B, T, H, D] and k, v [B, S, K, D]; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or h % kv_heads:
        raise ValueError(f"blockwise_attention: k, v {k.shape} do not match q {q.shape} "
                         f"(batch and head_dim must agree, K must divide H)")
    if mask.shape != (b, t, s):
        raise ValueError(f"blockwise_attention: mask must be [B, T, S] = {(b, t, s)}, "
                         f"got {mask.shape}")
    if causal and t != s:
        raise ValueError(f"blockwise_attention: causal=True needs T == S, got T={t}, S={s}")
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"blockwise_attention: {name} must be a positive int, got {value!r}")
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    g = h // kv_heads
    # Heads-major layout: q [B, K, G, T, D], k and v [B, K, S, D].
    qh = _pad_axis(q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4), 3, tp)
    kh = _pad_axis(k.transpose(0, 2, 1, 3), 2, sp)
    vh = _pad_axis(v.transpose(0, 2, 1, 3), 2, sp)
    m = _pad_axis(_pad_axis(mask.astype(bool), 1, tp), 2, sp)
    out = _flash(qh, kh, vh, m, float(scale), bq, bk, bool(causal))
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _kv_tiles(i: int | jax.Array, bq: int, bk: int, nk: int, causal: bool):
    """Key tiles [0, hi) visible from query tile i."""
    if not causal:
        return nk
    return jnp.minimum(((i + 1) * bq + bk - 1) // bk, nk)


def _q_start(j: int | jax.Array, bq: int, bk: int, causal: bool):
    """First query tile that can see key tile j."""
    if not causal:
        return 0
    return (j * bk) // bq


def _tile(x: jax.Array, axis: int, start, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _acc_dtype(x: jax.Array) -> jnp.dtype:
    """float32 statistics and accumulators (float64 for float64 inputs)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _scores(q_t, k_t, m_t, scale):
    """q_t [B, K, G, bq, D], k_t [B, K, bk, D], m_t [B, bq, bk] -> scaled float32 scores and
    the broadcast mask, both [B, K, G, bq, bk]."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_t, k_t, preferred_element_type=_acc_dtype(q_t))
    return s * scale, m_t[:, None, None, :, :]


def _forward(qh, kh, vh, mask, scale, bq, bk, causal):
    b, kv_heads, g, tp, d = qh.shape
    nq, nk = tp // bq, kh.shape[2] // bk
    acc_dtype = _acc_dtype(qh)

    def q_tile(_, i):
        q_t = _tile(qh, 3, i * bq, bq)
        m_q = _tile(mask, 1, i * bq, bq)
        stats = jnp.full((b, kv_heads, g, bq), _NEG, acc_dtype)

        def k_step(j, carry):
            acc, row_max, row_sum = carry
            s, m_t = _scores(q_t, _tile(kh, 2, j * bk, bk), _tile(m_q, 2, j * bk, bk), scale)
            new_max = jnp.maximum(row_max, jnp.max(jnp.where(m_t, s, _NEG), axis=-1))
            p = jnp.where(m_t, jnp.exp(s - new_max[..., None]), 0.0)
            alpha = jnp.exp(row_max - new_max)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vh.dtype), _tile(vh, 2, j * bk, bk),
                            preferred_element_type=acc_dtype)
            return acc * alpha[..., None] + pv, new_max, row_sum * alpha + p.sum(-1)

        init = (jnp.zeros((b, kv_heads, g, bq, d), acc_dtype), stats, jnp.zeros_like(stats))
        acc, row_max, row_sum = jax.lax.fori_loop(0, _kv_tiles(i, bq, bk, nk, causal), k_step,
                                                  init)
        live = row_sum > 0
        safe_sum = jnp.where(live, row_sum, 1.0)
        out = jnp.where(live[..., None], acc / safe_sum[..., None], 0.0)
        lse = jnp.where(live, row_max + jnp.log(safe_sum), 0.0)
        return None, (out.astype(qh.dtype), lse)

    _, (out, lse) = jax.lax.scan(q_tile, None, jnp.arange(nq))
    # [nq, B, K, G, bq, ...] -> [B, K, G, T, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv_heads, g, tp, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv_heads, g, tp)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(qh, kh, vh, mask, scale, bq, bk, causal):
    return _forward(qh, kh, vh, mask, scale, bq, bk, causal)[0]


def _flash_fwd(qh, kh, vh, mask, scale, bq, bk, causal):
    out, lse = _forward(qh, kh, vh, mask, scale, bq, bk, causal)
    # Named so that a remat policy can keep them (`SAVED_NAMES`; `ModelConfig.remat="dots"`
    # does) instead of running the whole forward loop again in the backward pass.
    out = checkpoint_name(out, "attention_out")
    lse = checkpoint_name(lse, "attention_lse")
    return out, (qh, kh, vh, mask, out, lse)


def _flash_bwd(scale, bq, bk, causal, residuals, d_out):
    qh, kh, vh, mask, out, lse = residuals
    b, kv_heads, g, tp, d = qh.shape
    nq, nk = tp // bq, kh.shape[2] // bk
    acc = _acc_dtype(qh)
    # delta_i = rowsum(do_i * out_i) = sum_j p_ij dp_ij, the softmax backward's row term.
    delta = jnp.einsum("bkgqd,bkgqd->bkgq", d_out.astype(acc), out.astype(acc))

    def k_tile(dq, j):
        k_t, v_t = _tile(kh, 2, j * bk, bk), _tile(vh, 2, j * bk, bk)
        m_k = _tile(mask, 2, j * bk, bk)

        def q_step(i, carry):
            dq, dk, dv = carry
            q_t = _tile(qh, 3, i * bq, bq)
            do_t = _tile(d_out, 3, i * bq, bq)
            s, m_t = _scores(q_t, k_t, _tile(m_k, 1, i * bq, bq), scale)
            p = jnp.where(m_t, jnp.exp(s - _tile(lse, 3, i * bq, bq)[..., None]), 0.0)
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(do_t.dtype), do_t,
                                 preferred_element_type=acc)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_t, v_t, preferred_element_type=acc)
            ds = (p * (dp - _tile(delta, 3, i * bq, bq)[..., None]) * scale).astype(qh.dtype)
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, q_t, preferred_element_type=acc)
            dq_t = jnp.einsum("bkgqs,bksd->bkgqd", ds, k_t, preferred_element_type=acc)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, _tile(dq, 3, i * bq, bq) + dq_t, i * bq, axis=3)
            return dq, dk, dv

        zeros = jnp.zeros((b, kv_heads, bk, d), acc)
        dq, dk, dv = jax.lax.fori_loop(_q_start(j, bq, bk, causal), nq, q_step,
                                       (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(k_tile, jnp.zeros(qh.shape, acc), jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 2).reshape(kh.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(vh.shape)
    return (dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)
