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

from rlhf_jax.losses import FusedLogps, entropy_from_logits, fused_token_logps, token_logps
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


def scoring_states(
    hidden: jax.Array,
    segment_ids: jax.Array | None = None,
    branch_ids: jax.Array | None = None,
    *,
    start: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """The hidden state that predicts each token, and whether the token has any context.

    For a causal LM over `input_ids [B, T]` with final hidden states `hidden [B, T, E]`, token
    `t` is scored by `hidden[:, t - 1]`, except (prefix-shared rows) the first token of a branch
    whose left neighbour is in another branch, scored by the prefix's last state
    (`hidden[:, P - 1]`, `P` the prefix length), as it would be in its own row. A token has no
    context at position 0, at the first token of a packed segment (`segment_ids` differ from the
    left neighbour's) and at a branch start after an empty prefix.

    Args:
      hidden: `[B, T, E]`.
      segment_ids, branch_ids: optional `[B, T]` (docs/ARCHITECTURE.md).
      start: first token to score (static, `0 <= start < T`).

    Returns:
      `(states [B, T - start, E], has_context [B, T - start] bool)` for tokens `start .. T-1`;
      `states` at a token without context is an arbitrary row of `hidden`.
    """
    b, t, _ = hidden.shape
    if start > 0:
        states = hidden[:, start - 1:t - 1]
    else:
        states = jnp.pad(hidden[:, :t - 1], ((0, 0), (1, 0), (0, 0)))
    idx = jnp.arange(start, t)
    prev_idx = jnp.maximum(idx - 1, 0)
    has_context = jnp.broadcast_to(idx > 0, (b, t - start))
    if segment_ids is not None:
        has_context = has_context & (segment_ids[:, idx] == segment_ids[:, prev_idx])
    if branch_ids is not None:
        branch = branch_ids[:, idx]
        prev = jnp.where(idx > 0, branch_ids[:, prev_idx], 0)
        starts = (branch > 0) & (prev > 0) & (prev != branch)
        prefix_len = jnp.argmax(branch_ids > 0, axis=-1)  # [B]; the prefix is the row's start
        last = jnp.take_along_axis(hidden, jnp.maximum(prefix_len - 1, 0)[:, None, None],
                                   axis=1)  # [B, 1, E]
        states = jnp.where(starts[..., None], last, states)
        has_context = jnp.where(starts, (prefix_len > 0)[:, None], has_context)
    return states, has_context


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


class Unembedding(NamedTuple):
    """The LM head's weight as `rlhf_jax.losses.fused_token_logps` takes it.

    Attributes:
      weight: `[E, V]` (an untied head's kernel, `layout == "ev"`) or `[V, E]` (the tied token
        embedding, `layout == "ve"`), as stored (parameter dtype).
      layout: `"ev"` or `"ve"`.
    """

    weight: jax.Array
    layout: str


class CausalLM(nnx.Module):
    """Decoder + LM head: `model(input_ids, attention_mask, positions, segment_ids,
    branch_ids)` -> logits `[B, T, V]` float32.

    Scoring without the `[B, T, V]` logits (what trainers use):

    - `model.token_logps(input_ids, attention_mask, positions, segment_ids, branch_ids, *,
      start=0, temperature=1.0, with_entropy=False, with_argmax=False, chunk_size=None)` ->
      `rlhf_jax.losses.FusedLogps` of `[B, T - start]` arrays **aligned to the token they
      score** (docs/ARCHITECTURE.md, "Log-probs"): `logps[b, t] = log p(input_ids[b, start + t] |
      earlier tokens)`, 0 where a token has no context (position 0, the first token of a
      packed segment); prefix-shared rows (`branch_ids`) score a branch's first token from the
      prefix's last state. The LM head and the log-softmax are fused and chunked over time
      (`config.logits_chunk_size`, `losses.fused_token_logps`); `chunk_size=0` (or
      `logits_chunk_size=0`) takes the unfused path through the full logits, same values.
    - `hidden = model.hidden_states(...)` (`[B, T, E]`, after the final norm) and
      `model.token_logps_from_hidden(hidden, input_ids, segment_ids, branch_ids, ...)` split
      the two, for a caller that also needs the hidden states (a value head on the same
      backbone); `model.unembedding()` gives the head's weight and layout.

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

    def unembedding(self) -> Unembedding:
        """The LM head's weight: the tied embedding `[V, E]` or the head's kernel `[E, V]`.

        The head has no bias and no logit scaling in any supported family (GPT-2, Llama,
        Qwen2), and LoRA never targets it (`rlhf_jax.models.lora` adapts the projections
        inside the layers only).
        """
        if self.lm_head is None:
            return Unembedding(self.backbone.embed.embedding[...], "ve")
        if self.lm_head.lora_scale is not None:
            raise NotImplementedError("LoRA adapters on the LM head are not supported")
        return Unembedding(self.lm_head.kernel[...], "ev")

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """`[..., E]` -> float32 logits `[..., V]`."""
        dtype = jnp.dtype(self.config.dtype)
        weight, layout = self.unembedding()
        spec = "...e,ev->...v" if layout == "ev" else "...e,ve->...v"
        return jnp.einsum(spec, hidden.astype(dtype), weight.astype(dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 branch_ids=None):
        hidden = self.backbone(input_ids, attention_mask, positions, segment_ids, branch_ids)
        return self.logits_from_hidden(hidden)

    def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                      branch_ids=None) -> jax.Array:
        """Final hidden states `[B, T, E]` (compute dtype, after the final norm): the input of
        `token_logps_from_hidden` and `logits_from_hidden`."""
        return self.backbone(input_ids, attention_mask, positions, segment_ids, branch_ids)

    def token_logps(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                    branch_ids=None, *, start: int = 0, temperature: float = 1.0,
                    with_entropy: bool = False, with_argmax: bool = False,
                    chunk_size: int | None = None, where=None) -> FusedLogps:
        """Aligned per-token log-probs (and entropies, argmax) without the `[B, T, V]` logits.

        `hidden_states(...)` then `token_logps_from_hidden(...)`; see there.
        """
        hidden = self.hidden_states(input_ids, attention_mask, positions, segment_ids,
                                    branch_ids)
        return self.token_logps_from_hidden(
            hidden, input_ids, segment_ids, branch_ids, start=start, temperature=temperature,
            with_entropy=with_entropy, with_argmax=with_argmax, chunk_size=chunk_size,
            where=where)

    def token_logps_from_hidden(self, hidden, input_ids, segment_ids=None, branch_ids=None, *,
                                start: int = 0, temperature: float = 1.0,
                                with_entropy: bool = False, with_argmax: bool = False,
                                chunk_size: int | None = None, where=None) -> FusedLogps:
        """Per-token log-probs of `input_ids[:, start:]` aligned to the token they score.

        `out.logps[b, t] = log softmax(z / temperature)[input_ids[b, start + t]]` where `z` are
        the logits of the state that predicts that token: `hidden[b, start + t - 1]`, or, for
        the first token of a branch that follows another branch (`branch_ids`), the prefix's
        last state. Tokens without context (position 0; the first token of a packed segment;
        a branch start after an empty prefix) get log-prob 0, entropy 0 and argmax -1, and
        receive no gradient. The same values as
        `rlhf_jax.train.logprobs.aligned_token_logps(model(...), ...)[:, start:]` (and, with a
        temperature, the tempered response log-probs of the online trainers:
        `token_logps(sequences, ..., start=P, temperature=tau).logps` is `[B, N]`).

        Args:
          hidden: `[B, T, E]` from `hidden_states` (same batch as `input_ids`).
          input_ids: `[B, T]` token ids.
          segment_ids: optional `[B, T]` packed-row segment ids.
          branch_ids: optional `[B, T]` prefix-shared branch ids.
          start: score tokens `start .. T - 1` only (static; `0 <= start < T`). The head then
            runs on `T - start` positions: an RL scorer passes the prompt length.
          temperature: positive float dividing the logits (static).
          with_entropy: also return the entropy of each scoring distribution `[B, T - start]`.
          with_argmax: also return each scoring distribution's argmax token id (int32; an
            accuracy metric is `argmax == input_ids[:, start:]`).
          chunk_size: positions per chunk of the fused head; None uses
            `config.logits_chunk_size`, 0 the unfused path through the full logits.
            When the float32 logits fit in `config.logits_keep_bytes`, the fused head keeps
            them for its backward pass, as one chunk (without `where`) or in these chunks.
          where: optional `[B, T - start]` mask of the tokens to score (a trainer's loss mask):
            the others get log-prob 0, entropy 0 and argmax -1 and no gradient, and the fused
            head skips the chunks that hold none of them after moving each row's scored tokens
            to its front (`losses.fused_token_logps(where=...)`), so prompt and padding
            positions cost no LM-head work.

        Returns:
          `rlhf_jax.losses.FusedLogps(logps, entropy or None, argmax or None)`, each
          `[B, T - start]`; log-probs and entropies float32.
        """
        _check_tokens(input_ids)
        b, t = input_ids.shape
        if hidden.shape[:2] != (b, t) or hidden.ndim != 3:
            raise ValueError(f"hidden must be [B, T, E] with [B, T] = {(b, t)}, got "
                             f"{hidden.shape}")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < t:
            raise ValueError(f"start must be an int in [0, T) = [0, {t}), got {start!r}")
        chunk_size = self.config.logits_chunk_size if chunk_size is None else chunk_size
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size must be an int >= 0 (0: unfused), got {chunk_size!r}")
        if where is not None and tuple(where.shape) != (b, t - start):
            raise ValueError(f"where must be [B, T - start] = {(b, t - start)}, got "
                             f"{tuple(where.shape)}")
        states, has_context = scoring_states(hidden, segment_ids, branch_ids, start=start)
        states = states.astype(jnp.dtype(self.config.dtype))
        targets = input_ids[:, start:]
        if where is not None:
            has_context = has_context & where.astype(bool)
        if chunk_size == 0:
            logits = self.logits_from_hidden(states)
            if temperature != 1.0:
                logits = logits / temperature
            out = FusedLogps(token_logps(logits, targets),
                             entropy_from_logits(logits) if with_entropy else None,
                             jnp.argmax(logits, axis=-1).astype(jnp.int32) if with_argmax
                             else None)
        else:
            weight, layout = self.unembedding()
            # Logits within the config's byte budget are kept for the backward pass: in one
            # chunk (the largest products), or, when `where` selects the tokens to score, in
            # the usual chunks, so that the chunks with none of them are still skipped.
            keep = 4 * b * (t - start) * self.config.vocab_size <= self.config.logits_keep_bytes
            out = fused_token_logps(states, weight, targets, layout=layout,
                                    temperature=temperature,
                                    chunk_size=t - start if keep and where is None
                                    else chunk_size,
                                    with_entropy=with_entropy, with_argmax=with_argmax,
                                    keep_logits=keep,
                                    where=None if where is None else has_context,
                                    vocab_blocks=self.config.logits_vocab_blocks or None)
        return FusedLogps(
            jnp.where(has_context, out.logps, 0.0),
            None if out.entropy is None else jnp.where(has_context, out.entropy, 0.0),
            None if out.argmax is None else jnp.where(has_context, out.argmax, -1),
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        return self.backbone.init_cache(batch_size, max_length, dtype)

    def layer_blocks(self, *, fuse_qkv: bool = True) -> tuple[Block, ...]:
        """Per-layer blocks for `decode(..., blocks=...)` in a loop (see `Decoder.layer_blocks`)."""
        return self.backbone.layer_blocks(fuse_qkv=fuse_qkv)

    def decode(self, input_ids, *, positions, cache: KVCache, cache_mask, blocks=None):
        hidden, cache = self.backbone.decode(input_ids, positions=positions, cache=cache,
                                             cache_mask=cache_mask, blocks=blocks)
        return self.logits_from_hidden(hidden), cache
