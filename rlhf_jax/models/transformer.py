"""The decoder stack, the causal LM and its KV cache.

`Decoder` embeds tokens, runs the L pre-norm blocks (parameters stacked on a leading layer axis
and applied with one `jax.lax.scan`, so compile time does not grow with depth; optional
`jax.checkpoint` per layer) and applies the final norm. `CausalLM` adds the LM head.

Masks and positions (docs/ARCHITECTURE.md): `attention_mask [B, T]` is 1 on real tokens;
`positions` default to `cumsum(attention_mask) - 1` clipped at 0 (a left-padded row's first real
token has position 0), or restart at 0 in each segment when `segment_ids [B, T]` are given
(packed rows; attention never crosses a segment).
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

    Attributes:
      k, v: `[L, B, S, K, D]` in the compute dtype (S = max_length, K = num_kv_heads).
      index: int32 scalar, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array


def default_positions(
    attention_mask: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Positions `[B, T]` int32.

    Without segments: `max(cumsum(mask) - 1, 0)`. With `segment_ids`: the offset of each token
    from the first token of its segment (0 on padding).
    """
    if segment_ids is None:
        mask = attention_mask.astype(jnp.int32)
        return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
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

    def _run_layers(self, x, *, rope, mask, cache: KVCache | None = None):
        config = self.config
        graphdef, state = nnx.split(self.layers)
        index = None if cache is None else cache.index

        # The cache (all layers) is part of the scan carry and updated in place, one layer
        # slice per step, so a decode step does not copy it.
        def body(carry, xs):
            h, kv = carry
            layer_state, layer = xs
            block = nnx.merge(graphdef, layer_state)
            h, kv = block(h, rope=rope, mask=mask, kv_cache=kv, cache_index=index, layer=layer)
            return (h, kv), None

        policy = config.remat_policy
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=not config.scan_layers)
        carry = (x, None if cache is None else (cache.k, cache.v))
        layers = jnp.arange(config.num_layers, dtype=jnp.int32)
        if config.scan_layers:
            carry, _ = jax.lax.scan(body, carry, (state, layers))
        else:
            for i in range(config.num_layers):
                carry, _ = body(carry, jax.tree.map(lambda a, i=i: a[i], (state, layers)))
        x, kv = carry
        if cache is None:
            return x, None
        return x, KVCache(k=kv[0], v=kv[1], index=cache.index + x.shape[1])

    # ------------------------------------------------------------------ public
    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        """Final hidden states `[B, T, E]` (compute dtype)."""
        _check_tokens(input_ids)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = (segment_ids > 0) if segment_ids is not None \
                else jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask, segment_ids)
        x, rope = self._embed(input_ids, positions)
        slots = jnp.arange(t, dtype=jnp.int32)
        mask = attention_weights_mask(jnp.broadcast_to(slots, (b, t)), slots, attention_mask,
                                      segment_ids, segment_ids)
        x, _ = self._run_layers(x, rope=rope, mask=mask)
        return self.final_norm(x)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.num_layers, batch_size, max_length, c.num_kv_heads, c.resolved_head_dim)
        dtype = jnp.dtype(dtype or c.dtype)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                       jnp.zeros((), jnp.int32))

    def decode(self, input_ids, *, positions, cache: KVCache, cache_mask):
        """Hidden states `[B, t, E]` of `t` new tokens and the updated cache (see CausalLM)."""
        _check_tokens(input_ids)
        b, t = input_ids.shape
        if positions.shape != (b, t):
            raise ValueError(f"positions must be [B, t] = {(b, t)}, got {positions.shape}")
        s = cache.k.shape[2]
        if cache_mask.shape != (b, s):
            raise ValueError(f"cache_mask must be [B, S] = {(b, s)}, got {cache_mask.shape}")
        x, rope = self._embed(input_ids, positions)
        q_slots = cache.index + jnp.arange(t, dtype=jnp.int32)
        mask = attention_weights_mask(jnp.broadcast_to(q_slots, (b, t)),
                                      jnp.arange(s, dtype=jnp.int32), cache_mask)
        x, cache = self._run_layers(x, rope=rope, mask=mask, cache=cache)
        return self.final_norm(x), cache


class CausalLM(nnx.Module):
    """Decoder + LM head: `model(input_ids, attention_mask, positions, segment_ids)` ->
    logits `[B, T, V]` float32.

    KV-cache decoding (used by `rlhf_jax.generation`):

    - `cache = model.init_cache(batch_size, max_length)`: a `KVCache` pytree
      (`k, v [L, B, S, K, D]`, `index` int32 scalar).
    - `logits, cache = model.decode(input_ids [B, t], positions=[B, t], cache=cache,
      cache_mask=[B, S])` writes the new keys/values at slots `index .. index + t - 1`; query
      `i` attends to the slots `j <= index + i` whose `cache_mask` is 1 (so `cache_mask` must
      already mark the `t` new slots). Prefill is a `decode` of the whole prompt into an empty
      cache. The cached decode of token t equals the full forward at position t.
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

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        hidden = self.backbone(input_ids, attention_mask, positions, segment_ids)
        return self.logits_from_hidden(hidden)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        return self.backbone.init_cache(batch_size, max_length, dtype)

    def decode(self, input_ids, *, positions, cache: KVCache, cache_mask):
        hidden, cache = self.backbone.decode(input_ids, positions=positions, cache=cache,
                                             cache_mask=cache_mask)
        return self.logits_from_hidden(hidden), cache
