"""Building blocks of the decoder: projections (with optional LoRA), norms, attention, MLP.

Every parameter carries logical axis names in its `out_sharding` metadata (`"embed"`,
`"vocab"`, `"heads"`, `"kv_heads"`, `"head_dim"`, `"mlp"`, `"norm"`, `"layers"`,
`"lora_rank"`, `"reward_heads"`); `rlhf_jax.sharding.LOGICAL_AXIS_RULES` maps them to mesh axes.

Layer stacking: modules built with `stack=L` create every parameter with a leading layer axis
of size L (logical name `"layers"`). Such a module is only ever called on one layer's slice,
inside the `jax.lax.scan` of `rlhf_jax.models.transformer.Decoder`.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.blockwise_attention import blockwise_attention
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.rope import apply_rope

_NEG_INF = float(jnp.finfo(jnp.float32).min)


class LoRAParam(nnx.Param):
    """A low-rank adapter parameter (a subclass of `nnx.Param`).

    `nnx.state(model, LoRAParam)` selects the adapters only; the frozen base weights are
    `nnx.All(nnx.Param, nnx.Not(LoRAParam))`.
    """


def make_param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    names: Sequence[str | None],
    *,
    dtype,
    init: str = "normal",
    std: float = 0.02,
    stack: int | None = None,
    kind: type[nnx.Variable] = nnx.Param,
) -> nnx.Variable:
    """A parameter of `shape` (with a leading `stack` axis) annotated with logical `names`."""
    shape = tuple(int(s) for s in shape)
    names = tuple(names)
    if len(shape) != len(names):
        raise ValueError(f"shape {shape} and logical names {names} differ in rank")
    if stack is not None:
        shape = (int(stack),) + shape
        names = ("layers",) + names
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
        value = value.astype(dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown initialiser {init!r}")
    return kind(value, out_sharding=names, eager_sharding=False)


class Proj(nnx.Module):
    """A linear map `x[..., *in] -> y[..., *out]` as one `einsum` (plus optional bias and LoRA).

    kernel: `[*in_shape, *out_shape]`; bias: `[*out_shape]`. With LoRA attached
    (`rlhf_jax.models.lora.apply_lora`), `y += scale * (x @ lora_a) @ lora_b` with
    `lora_a [*in, r]`, `lora_b [r, *out]` and `scale = alpha / r`.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        in_names: Sequence[str | None],
        out_names: Sequence[str | None],
        use_bias: bool,
        config: ModelConfig,
        rngs: nnx.Rngs,
        stack: int | None = None,
        std: float | None = None,
    ):
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.in_names = tuple(in_names)
        self.out_names = tuple(out_names)
        self.stack = stack
        self.dtype = config.dtype
        self.lora_scale = None
        self.kernel = make_param(
            rngs, self.in_shape + self.out_shape, self.in_names + self.out_names,
            dtype=config.params_dtype, std=config.initializer_range if std is None else std,
            stack=stack,
        )
        self.bias = (
            make_param(None, self.out_shape, self.out_names, dtype=config.params_dtype,
                       init="zeros", stack=stack)
            if use_bias else None
        )

    def _spec(self, n_in: int, n_out: int) -> str:
        letters = string.ascii_lowercase
        ins, outs = letters[:n_in], letters[n_in:n_in + n_out]
        return f"...{ins},{ins}{outs}->...{outs}"

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        x = x.astype(dtype)
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        y = jnp.einsum(self._spec(n_in, n_out), x, self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if self.lora_scale is not None:
            a = self.lora_a[...].astype(dtype)
            b = self.lora_b[...].astype(dtype)
            h = jnp.einsum(self._spec(n_in, 1), x, a)
            y = y + (self.lora_scale * jnp.einsum(self._spec(1, n_out), h, b)).astype(dtype)
        return y


class Embed(nnx.Module):
    """A lookup table `[num, E]`; `attend` gives `x @ table.T` (the tied LM head)."""

    def __init__(self, num: int, features: int, *, names, config: ModelConfig, rngs: nnx.Rngs):
        self.dtype = config.dtype
        self.embedding = make_param(rngs, (num, features), names, dtype=config.params_dtype,
                                    std=config.initializer_range)

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding[...]
        return jnp.take(table, ids, axis=0, mode="clip").astype(jnp.dtype(self.dtype))

    def attend(self, x: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        return jnp.einsum("...e,ve->...v", x.astype(dtype), self.embedding[...].astype(dtype),
                          preferred_element_type=jnp.float32)


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32.

    LayerNorm: `(x - mean) / sqrt(var + eps) * scale + bias`.
    RMSNorm (Hugging Face Llama): `scale * (x / sqrt(mean(x^2) + eps))`.
    """

    def __init__(self, config: ModelConfig, *, stack: int | None = None):
        self.kind = config.norm
        self.eps = float(config.norm_eps)
        self.dtype = config.dtype
        e = config.hidden_size
        self.scale = make_param(None, (e,), ("norm",), dtype=config.params_dtype, init="ones",
                                stack=stack)
        self.bias = (
            make_param(None, (e,), ("norm",), dtype=config.params_dtype, init="zeros",
                       stack=stack)
            if config.norm == "layernorm" else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        if self.kind == "layernorm":
            mean = jnp.mean(xf, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
            y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        else:
            var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
            y = xf * jax.lax.rsqrt(var + self.eps)
            y = y * self.scale[...].astype(jnp.float32)
        return y.astype(jnp.dtype(self.dtype))


def activation_fn(name: str):
    return {
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
    }[name]


def attention_weights_mask(
    q_positions_slot: jax.Array,
    kv_slots: jax.Array,
    kv_valid: jax.Array,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
    q_branches: jax.Array | None = None,
    kv_branches: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask `[B, T, S]`: key slot j is visible from query i when
    `kv_slots[j] <= q_slot[i]`, `kv_valid[b, j]`, (packed rows) the segments agree, and
    (prefix-shared rows) key j is in the shared prefix (branch 0) or in query i's branch."""
    mask = kv_slots[None, None, :] <= q_positions_slot[:, :, None]
    mask = mask & kv_valid[:, None, :].astype(bool)
    if q_segments is not None:
        mask = mask & (q_segments[:, :, None] == kv_segments[:, None, :])
    if q_branches is not None:
        kv_b = kv_branches[:, None, :]
        mask = mask & ((kv_b == 0) | (kv_b == q_branches[:, :, None]))
    return mask


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float
) -> jax.Array:
    """Grouped-query attention with a float32 softmax.

    q: `[B, T, H, D]`; k, v: `[B, S, K, D]` with K dividing H; mask: `[B, T, S]` bool.
    `out = softmax(scale * q k^T + bias(mask)) v`, masked logits set to the float32 minimum
    (a fully masked row gives a uniform average instead of NaN). Returns `[B, T, H, D]`.
    """
    b, t, h, d = q.shape
    _, s, kv_heads, _ = k.shape
    g = h // kv_heads
    # Heads-major products: the transposes are explicit and each (batch, kv head) is one
    # `[G*T, D] x [D, S]` matmul. On CPU the forward takes about half the time of one einsum
    # over the token-major layout; the results agree to float32 rounding.
    qh = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv_heads, g, t, s) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh)
    return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def cached_attention(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array, *, scale: float
) -> jax.Array:
    """`dot_product_attention` over a KV cache stored as `[B, K, S, D]` (keys and values)."""
    b, t, h, d = q.shape
    kv_heads = k_cache.shape[1]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v_cache)
    return out.reshape(b, t, h, d)


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with q, k, v, o projections."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        e, h, kv, d = (config.hidden_size, config.num_heads, config.num_kv_heads,
                       config.resolved_head_dim)
        self.config = config
        common = dict(config=config, rngs=rngs, stack=stack)
        self.q = Proj((e,), (h, d), in_names=("embed",), out_names=("heads", "head_dim"),
                      use_bias=config.qkv_bias, **common)
        self.k = Proj((e,), (kv, d), in_names=("embed",), out_names=("kv_heads", "head_dim"),
                      use_bias=config.qkv_bias, **common)
        self.v = Proj((e,), (kv, d), in_names=("embed",), out_names=("kv_heads", "head_dim"),
                      use_bias=config.qkv_bias, **common)
        self.o = Proj((h, d), (e,), in_names=("heads", "head_dim"), out_names=("embed",),
                      use_bias=config.o_bias, **common)
        # Set by `fuse_qkv` on the per-layer blocks of a decoding loop; never a parameter.
        self.fused_qkv = None

    def fuse_qkv(self) -> None:
        """Concatenate the q, k, v kernels into one `[E, (H + 2K) * D]` projection (and the
        biases into one vector) for the calls that follow.

        A decoding loop calls this once, outside the loop, on each per-layer block of
        `Decoder.layer_blocks`: one skinny matmul per layer instead of three is ~20% faster
        per token at batch 8 on CPU. The result is a snapshot of the current weights in the
        compute dtype; LoRA adapters are folded in (`kernel + scale * lora_a @ lora_b`).
        """
        dtype = jnp.dtype(self.config.dtype)
        e = self.config.hidden_size

        def merged(p: Proj) -> jax.Array:
            w = p.kernel[...].reshape(e, -1).astype(jnp.float32)
            if p.lora_scale is not None:
                a = p.lora_a[...].reshape(e, -1).astype(jnp.float32)
                b = p.lora_b[...].reshape(a.shape[1], -1).astype(jnp.float32)
                w = w + p.lora_scale * (a @ b)
            return w.astype(dtype)

        projs = (self.q, self.k, self.v)
        kernel = jnp.concatenate([merged(p) for p in projs], axis=1)
        bias = (jnp.concatenate([p.bias[...].reshape(-1).astype(dtype) for p in projs])
                if self.config.qkv_bias else None)
        self.fused_qkv = nnx.data((kernel, bias))

    def project_qkv(self, x, rope):
        if self.fused_qkv is None:
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            kernel, bias = self.fused_qkv
            y = jnp.einsum("...e,ef->...f", x.astype(kernel.dtype), kernel)
            if bias is not None:
                y = y + bias
            shapes = (self.q.out_shape, self.k.out_shape, self.v.out_shape)
            sizes = [math.prod(shape) for shape in shapes]
            parts = jnp.split(y, [sizes[0], sizes[0] + sizes[1]], axis=-1)
            q, k, v = (part.reshape(*x.shape[:-1], *shape) for part, shape in zip(parts, shapes))
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def __call__(self, x, *, rope, mask, kv_cache=None, cache_index=None):
        """x `[B, T, E]` -> (`[B, T, E]`, kv_cache).

        With this layer's `kv_cache = (k, v)` (`[B, K, S, D]` each), the new keys and
        values are written in place at slots `cache_index .. cache_index + T - 1` and attention
        runs over the whole cache; the updated `(k, v)` is returned. Without a cache the mask is
        causal (`Decoder` builds it so) and `config.attention_impl` picks the dense or the
        blockwise attention (`ModelConfig.uses_blockwise_attention`)."""
        q, k, v = self.project_qkv(x, rope)
        config = self.config
        scale = config.resolved_head_dim ** -0.5
        if kv_cache is None:
            if config.uses_blockwise_attention(x.shape[1]):
                out = blockwise_attention(q, k, v, mask, scale=scale,
                                          block_q=config.attention_block_q,
                                          block_k=config.attention_block_k, causal=True)
            else:
                out = dot_product_attention(q, k, v, mask, scale=scale)
            return self.o(out), None
        ck, cv = kv_cache
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype).transpose(0, 2, 1, 3),
                                          (0, 0, cache_index, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype).transpose(0, 2, 1, 3),
                                          (0, 0, cache_index, 0))
        out = cached_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask, scale=scale)
        return self.o(out), (ck, cv)


class MLP(nnx.Module):
    """GPT-2: `down(act(up(x)))`. SwiGLU: `down(act(gate(x)) * up(x))`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        e, f = config.hidden_size, config.intermediate_size
        common = dict(config=config, rngs=rngs, stack=stack, use_bias=config.mlp_bias)
        self.kind = config.mlp
        self.act = config.activation
        if config.mlp == "swiglu":
            self.gate = Proj((e,), (f,), in_names=("embed",), out_names=("mlp",), **common)
        self.up = Proj((e,), (f,), in_names=("embed",), out_names=("mlp",), **common)
        self.down = Proj((f,), (e,), in_names=("mlp",), out_names=("embed",), **common)

    def __call__(self, x):
        act = activation_fn(self.act)
        if self.kind == "swiglu":
            h = act(self.gate(x)) * self.up(x)
        else:
            h = act(self.up(x))
        return self.down(h)


class Block(nnx.Module):
    """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        self.attn_norm = Norm(config, stack=stack)
        self.attn = Attention(config, rngs=rngs, stack=stack)
        self.mlp_norm = Norm(config, stack=stack)
        self.mlp = MLP(config, rngs=rngs, stack=stack)

    def __call__(self, x, *, rope, mask, kv_cache=None, cache_index=None):
        h, kv = self.attn(self.attn_norm(x), rope=rope, mask=mask, kv_cache=kv_cache,
                          cache_index=cache_index)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, kv
