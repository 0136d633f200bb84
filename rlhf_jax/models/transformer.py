"""The decoder stack, the causal LM and its KV cache.

`Decoder` embeds tokens, runs the L pre-norm blocks (parameters stacked on a leading layer axis
and applied with one `jax.lax.scan`, so compile time does not grow with depth; optional
`jax.checkpoint` per layer) and applies the final norm. `CausalLM` adds the LM head. Cached
decoding (`decode`) unrolls the layers instead, so that each layer's cache buffers are
updated in place inside a sampler's `while_loop`.

Masks and positions (docs/ARCHITECTURE.md): `attention_mask [B, T]` is 1 on real tokens;
`positions` default to `cumsum(attention_mask) - 1` clipped at 0 (a left-padded row's first real
token has position 0), or restart at 0 in each segment when `segment_ids [B, T]` are given
(packed rows; attention never crosses a segment). Prefix-shared rows (one preference pair per
row: the prompt once, then each response) add `branch_ids [B, T]`: 0 on the shared prefix,
`k > 0` on the tokens of continuation `k`; a token attends to the prefix and to earlier tokens of
its own branch only, and the caller passes `positions` (each branch continues from the prefix's
length).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import Block, Embed, Norm, Proj, attention_weights_mask
from rlhf_jax.models.rope import rope_tables


class KVCache(NamedTuple):
    """Keys and values of every layer, written slot by slot during decoding.

    One buffer per layer, in the layout the attention reads without a transpose, so that in a
    `while_loop` carry each decode step updates every buffer in place (one slot) and reads it
    once: no copy of the cache per step.

    Attributes:
      k, v: tuples of L arrays `[B, K, S, D]` in the compute dtype (K = num_kv_heads,
        S = max_length, D = head_dim).
      index: int32 scalar, the next slot to write.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    index: jax.Array

    @property
    def max_length(self) -> int:
        """S, the number of slots."""
        return self.v[0].shape[2]


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions `[B, T]` int32 of rows whose real tokens are marked by `mask [B, T]`:
    `max(cumsum(mask) - 1, 0)`, so a left-padded row's first real token has position 0 and
    every later token counts the real tokens before it (docs/ARCHITECTURE.md). The one formula
    the models, the sampler, the trainers and the AI labelers use."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0).astype(jnp.int32)


def default_positions(
    attention_mask: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Positions `[B, T]` int32.

    Without segments: `positions_from_mask(attention_mask)`. With `segment_ids`: the offset of
    each token from the first token of its segment (0 on padding).
    """
    if segment_ids is None:
        return positions_from_mask(attention_mask)
    seg = segment_ids.astype(jnp.int32)
    t = seg.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(seg[:, :1], dtype=bool), seg[:, 1:] != seg[:, :-1]], axis=-1
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=seg.ndim - 1)
    return jnp.where(seg > 0, idx - start_idx, 0).astype(jnp.int32)


def _check_tokens(input_ids, name="input_ids"):
    if input_ids.ndim != 2:
        raise ValueError(f"{name} must be [B, T], got shape {input_ids.shape}")


class Decoder(nnx.Module):
    """Token (+ learned position) embedding, L stacked blocks, final norm."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(config.vocab_size, config.hidden_size, names=("vocab", "embed"),
                           config=config, rngs=rngs)
        if config.position_embedding == "learned":
            self.pos_embed = Embed(config.max_position_embeddings, config.hidden_size,
                                   names=(None, "embed"), config=config, rngs=rngs)
        else:
            self.pos_embed = None
        self.layers = Block(config, rngs=rngs, stack=config.num_layers)
        self.final_norm = Norm(config)

    # ------------------------------------------------------------------ internals
    def _embed(self, input_ids, positions):
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        rope = rope_tables(self.config, positions) if self.config.position_embedding == "rope" \
            else None
        return x, rope

    def _run_layers(self, x, *, rope, mask, cache: KVCache | None = None, blocks=None):
        config = self.config
        if cache is not None:
            return self._run_layers_cached(x, rope=rope, mask=mask, cache=cache,
                                           blocks=self.layer_blocks() if blocks is None
                                           else blocks)
        graphdef, state = nnx.split(self.layers)

        def body(h, layer_state):
            h, _ = nnx.merge(graphdef, layer_state)(h, rope=rope, mask=mask)
            return h, None

        policy = config.remat_policy
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=not config.scan_layers)
        if config.scan_layers:
            x, _ = jax.lax.scan(body, x, state)
        else:
            for i in range(config.num_layers):
                x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], state))
        return x, None

    def _run_layers_cached(self, x, *, rope, mask, cache, blocks):
        # Decoding unrolls the layers so that each layer's cache buffer is updated in place
        # (a scan would take the stacked cache as xs and write a full copy as ys every step).
        if len(cache.k) != self.config.num_layers or len(blocks) != self.config.num_layers:
            raise ValueError(f"the cache has {len(cache.k)} layers and {len(blocks)} blocks were "
                             f"given; the model has {self.config.num_layers}")
        ks, vs = [], []
        for i, block in enumerate(blocks):
            x, (k, v) = block(x, rope=rope, mask=mask, kv_cache=(cache.k[i], cache.v[i]),
                              cache_index=cache.index)
            ks.append(k)
            vs.append(v)
        return x, KVCache(k=tuple(ks), v=tuple(vs), index=cache.index + x.shape[1])

    # ------------------------------------------------------------------ public
    def layer_blocks(self, *, fuse_qkv: bool = True) -> tuple[Block, ...]:
        """The L stacked layers as L separate `Block`s (slices of the stacked parameters).

        A decoding loop calls this once, outside the loop, and passes the result to every
        `decode(..., blocks=...)`: the per-layer parameter slices are then loop invariants
        instead of being copied out of the stacked arrays at every step. With `fuse_qkv`
        (default) each block's q, k, v kernels are also concatenated once
        (`Attention.fuse_qkv`), so that a decoded token costs one projection matmul per layer
        instead of three.
        """
        graphdef, state = nnx.split(self.layers)
        blocks = tuple(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                       for i in range(self.config.num_layers))
        if fuse_qkv:
            for block in blocks:
                block.attn.fuse_qkv()
        return blocks

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 branch_ids=None):
        """Final hidden states `[B, T, E]` (compute dtype)."""
        _check_tokens(input_ids)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = (segment_ids > 0) if segment_ids is not None \
                else jnp.ones((b, t), jnp.int32)
        if positions is None:
            if branch_ids is not None:
                raise ValueError("branch_ids (prefix-shared rows) need explicit positions")
            positions = default_positions(attention_mask, segment_ids)
        if branch_ids is not None and branch_ids.shape != (b, t):
            raise ValueError(f"branch_ids must be [B, T] = {(b, t)}, got {branch_ids.shape}")
        x, rope = self._embed(input_ids, positions)
        slots = jnp.arange(t, dtype=jnp.int32)
        mask = attention_weights_mask(jnp.broadcast_to(slots, (b, t)), slots, attention_mask,
                                      segment_ids, segment_ids, branch_ids, branch_ids)
        x, _ = self._run_layers(x, rope=rope, mask=mask)
        return self.final_norm(x)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        c = self.config
        shape = (batch_size, c.num_kv_heads, max_length, c.resolved_head_dim)
        dtype = jnp.dtype(dtype or c.dtype)
        return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)),
                       tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)),
                       jnp.zeros((), jnp.int32))

    def decode(self, input_ids, *, positions, cache: KVCache, cache_mask, blocks=None):
        """Hidden states `[B, t, E]` of `t` new tokens and the updated cache (see CausalLM)."""
        _check_tokens(input_ids)
        b, t = input_ids.shape
        if positions.shape != (b, t):
            raise ValueError(f"positions must be [B, t] = {(b, t)}, got {positions.shape}")
        s = cache.max_length
        if cache_mask.shape != (b, s):
            raise ValueError(f"cache_mask must be [B, S] = {(b, s)}, got {cache_mask.shape}")
        x, rope = self._embed(input_ids, positions)
        q_slots = cache.index + jnp.arange(t, dtype=jnp.int32)
        mask = attention_weights_mask(jnp.broadcast_to(q_slots, (b, t)),
                                      jnp.arange(s, dtype=jnp.int32), cache_mask)
        x, cache = self._run_layers(x, rope=rope, mask=mask, cache=cache, blocks=blocks)
        return self.final_norm(x), cache


class CausalLM(nnx.Module):
    """Decoder + LM head: `model(input_ids, attention_mask, positions, segment_ids,
    branch_ids)` -> logits `[B, T, V]` float32.

    KV-cache decoding (used by `rlhf_jax.generation`):

    - `cache = model.init_cache(batch_size, max_length)`: a `KVCache` pytree
      (`k`, `v`: one `[B, K, S, D]` buffer per layer; `index` int32 scalar).
    - `logits, cache = model.decode(input_ids [B, t], positions=[B, t], cache=cache,
      cache_mask=[B, S])` writes the new keys/values at slots `index .. index + t - 1`; query
      `i` attends to the slots `j <= index + i` whose `cache_mask` is 1 (so `cache_mask` must
      already mark the `t` new slots). Prefill is a `decode` of the whole prompt into an empty
      cache. The cached decode of token t equals the full forward at position t.
    - `blocks = model.layer_blocks()` once before a decoding loop, then
      `model.decode(..., blocks=blocks)` in it, keeps the per-layer parameter slices out of the
      loop body.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = Decoder(config, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Proj((config.hidden_size,), (config.vocab_size,),
                                in_names=("embed",), out_names=("vocab",), use_bias=False,
                                config=config, rngs=rngs)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """`[..., E]` -> float32 logits `[..., V]`."""
        if self.lm_head is None:
            return self.backbone.embed.attend(hidden)
        dtype = jnp.dtype(self.config.dtype)
        return jnp.einsum("...e,ev->...v", hidden.astype(dtype),
                          self.lm_head.kernel[...].astype(dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 branch_ids=None):
        hidden = self.backbone(input_ids, attention_mask, positions, segment_ids, branch_ids)
        return self.logits_from_hidden(hidden)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        return self.backbone.init_cache(batch_size, max_length, dtype)

    def layer_blocks(self, *, fuse_qkv: bool = True) -> tuple[Block, ...]:
        """Per-layer blocks for `decode(..., blocks=...)` in a loop (see `Decoder.layer_blocks`)."""
        return self.backbone.layer_blocks(fuse_qkv=fuse_qkv)

    def decode(self, input_ids, *, positions, cache: KVCache, cache_mask, blocks=None):
        hidden, cache = self.backbone.decode(input_ids, positions=positions, cache=cache,
                                             cache_mask=cache_mask, blocks=blocks)
        return self.logits_from_hidden(hidden), cache
