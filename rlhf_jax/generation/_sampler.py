"""Prefill + jitted decode loop over the KV cache.

The model is split once with ``nnx.split`` into a graph definition (static) and a state pytree
(traced); the whole rollout (prefill of the left-padded prompt, then one ``lax.while_loop`` of
single-token cached decodes per cache segment, with per-row EOS stop) is one jitted function of
that state, compiled once per (graph, rows, prompt length, ``max_new_tokens``, cache segments,
sampling structure) and cached by ``jax.jit``. The values of temperature, ``top_p``, ``min_p``
and the EOS/pad ids are traced, so changing them does not recompile; switching a filter (or EOS
stopping) on or off, ``top_k``, ``greedy`` and the mesh do. ``num_samples`` repeats the prompts
before the jitted loop, which sees only the ``B * n`` rows: best-of-``n`` over ``B`` prompts
and plain sampling of ``B * n`` prompts (e.g. an online trainer's rollout, an evaluation) share
one compiled program.

A ``CausalLM`` decodes to hidden states and the LM head runs in the loop on a ``[E, V]`` weight
(a tied embedding is transposed once per call): the prefill applies the head to the last prompt
position only (at ``B = 8``, 64 prompt tokens, ``V = 151,936`` it took 0.97 CPU s with the
logits of every position, 0.40 without), and the decode step's head product runs about 1.8x
faster on CPU in that layout. Together they cut a 128-token rollout of 8 rows at the
Qwen2-0.5B shape (4 layers) from 8.1 to 5.5 CPU s, with the same tokens.

Randomness: the token of step ``i`` is drawn with ``jax.random.fold_in(rng, i)`` over the whole
``[B * n, V]`` batch, so the draws depend only on the key and the global row index, never on how
the batch is sharded over devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from rlhf_jax.generation._limits import check_generation_ranges
from rlhf_jax.generation._sampling import sample_tokens, validate_sampling_args
from rlhf_jax.losses import unchecked
from rlhf_jax.models import positions_from_mask
from rlhf_jax.sharding import BATCH_AXES, batch_sharding

_CACHE_SEGMENT_TOKENS = 32
_MAX_CACHE_SEGMENTS = 4


class GenerationOutput(NamedTuple):
    """Sampled responses, ready for scoring and for PPO/GRPO.

    ``B' = B * num_samples`` rows: with ``num_samples = n`` each prompt is repeated ``n`` times
    contiguously, rows ``b * n .. b * n + n - 1`` belong to prompt ``b`` (GRPO groups rely on
    this order).

    Attributes:
      tokens: ``[B', N]`` int32 response tokens, ``pad_token_id`` after the first EOS.
      mask: ``[B', N]`` int32, 1 up to and including the first EOS, 0 after it.
      logps: ``[B', N]`` float32 log-probability of each sampled token under the distribution it
        was actually drawn from, ``log_softmax(filter(logits / T))[token]`` (temperature, then
        top-k, top-p, min-p); 0 where ``mask`` is 0. With ``temperature=1`` and no filters this is
        the policy's ``log pi(a|s)``, the old log-probs of PPO. With ``greedy=True`` it is the
        same formula at the argmax token (the mode of that distribution), not ``log 1 = 0``.
      model_logps: ``[B', N]`` float32 untempered, unfiltered model log-probability
        ``log_softmax(logits)[token]``; 0 where ``mask`` is 0. Equal to ``logps`` only when
        ``temperature=1`` and no filter is active. A trainer that recomputes log-probs with a
        plain forward pass reproduces ``model_logps``, not ``logps``.
      sequences: ``[B', P + N]`` int32 prompt (left-padded) followed by the response
        (right-padded), for reward/value/reference models.
      sequence_mask: ``[B', P + N]`` int32 ``concat(prompt_mask, mask)``.
      finished: ``[B']`` bool, whether the row produced ``eos_token_id``.
      prompt_length: ``P``, the (padded) prompt width; responses start at column ``P`` of
        ``sequences``.
    """

    tokens: jax.Array
    mask: jax.Array
    logps: jax.Array
    model_logps: jax.Array
    sequences: jax.Array
    sequence_mask: jax.Array
    finished: jax.Array
    prompt_length: int


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled: their width, the sampling distribution and the KV cache's
    growth. One value is shared by `generate`, `generate_with_state`, `Sampler`, `best_of_n`,
    the online trainers' ``RolloutConfig`` (which extends it) and the AI labelers' text model.

    The distribution is ``softmax(filter(logits / temperature))``, where ``filter`` applies
    top-k, then top-p, then min-p (Hugging Face ``generate``'s order); ``greedy`` takes its
    argmax instead. The values are checked where they are used (`generate_with_state`), with
    errors that name the field.
    """

    max_new_tokens: int
    """Response width ``N >= 1``: tokens sampled per prompt at most."""
    temperature: float = 1.0
    """Sampling temperature ``T > 0``."""
    top_k: int | None = None
    """Keep the ``top_k`` most likely tokens (None: off)."""
    top_p: float | None = None
    """Nucleus mass in ``(0, 1]`` (None: off)."""
    min_p: float | None = None
    """Min-p threshold in ``[0, 1]`` (None: off)."""
    greedy: bool = False
    """Argmax decoding instead of sampling (no key needed)."""
    cache_segments: int | None = None
    """The KV cache grows in this many segments, so that the decode steps of the first segments
    attend over a shorter buffer (``P + N/s``, ``P + 2N/s``, ...) instead of all ``P + N``
    slots; each segment is one more copy of the loop to compile. None: one segment per 32 new
    tokens, at most 4 (one buffer below 64 new tokens). The tokens and log-probs do not depend
    on it beyond float rounding of the attention sums."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static (compile-time) part of a generation call."""

    max_new_tokens: int
    greedy: bool
    top_k: int | None
    use_top_p: bool
    use_min_p: bool
    use_eos: bool
    batch_sharding: NamedSharding | None
    cache_segments: int = 1


def segment_ends(max_new_tokens: int, segments: int) -> tuple[int, ...]:
    """Response lengths at which the KV cache grows: ``segments`` near-equal parts of
    ``max_new_tokens``, the last one ending at ``max_new_tokens``."""
    n = max(1, min(segments, max_new_tokens))
    return tuple(round(max_new_tokens * (j + 1) / n) for j in range(n))


def auto_cache_segments(max_new_tokens: int) -> int:
    """The default number of cache segments: one per 32 new tokens, at most 4 (a single buffer
    below 64 new tokens). Each segment is one more copy of the decode loop to compile, and the
    cache read per step falls from ``P + N`` slots to about ``P + 5N/8`` with 4 segments."""
    return max(1, min(_MAX_CACHE_SEGMENTS, max_new_tokens // _CACHE_SEGMENT_TOKENS))


def grow_cache(cache: Any, extra: int) -> Any:
    """``cache`` with ``extra`` empty slots appended to every layer's key and value buffer (the
    copy is made once per segment, not per step); ``cache`` itself when ``extra`` is 0."""
    if extra == 0:
        return cache
    widths = ((0, 0), (0, 0), (0, extra), (0, 0))
    return cache._replace(k=tuple(jnp.pad(k, widths) for k in cache.k),
                          v=tuple(jnp.pad(v, widths) for v in cache.v))


class _Decoder(NamedTuple):
    """How the loop runs a model: ``decode(ids, positions, cache, cache_mask) -> (hidden,
    cache)`` and ``head(hidden [..., E]) -> float32 logits [..., V]``, so that the prefill
    applies the LM head to the last prompt position only."""

    decode: Any
    head: Any


def _decoder(model: Any, blocks: dict) -> _Decoder:
    """The `_Decoder` of ``model``.

    A ``CausalLM`` (``backbone.decode`` and ``unembedding()``) decodes to hidden states and
    the head runs here on a ``[E, V]`` weight: a tied embedding ``[V, E]`` is transposed once
    per call, outside the loop, because the decode step's ``[B, E] x [V, E]^T`` product (the
    whole step's largest read) runs about 1.8x slower on CPU than ``[B, E] x [E, V]`` (42 vs
    23 ms per step at ``B = 8``, ``V = 151,936``, ``E = 896``); the copy costs ``V * E``
    floats of memory while generating. Same formula as ``CausalLM.logits_from_hidden``
    (compute dtype, float32 accumulation). Any other model runs its ``decode`` (logits of
    every position) with an identity head."""
    if not (hasattr(model, "backbone") and hasattr(model, "unembedding")
            and hasattr(model, "config")):
        def decode_logits(ids, positions, cache, cache_mask):
            return model.decode(ids, positions=positions, cache=cache, cache_mask=cache_mask,
                                **blocks)
        return _Decoder(decode_logits, lambda logits: logits)

    dtype = jnp.dtype(model.config.dtype)
    weight, layout = model.unembedding()
    weight = weight.astype(dtype)
    if layout == "ve":
        weight = weight.T

    def decode_hidden(ids, positions, cache, cache_mask):
        return model.backbone.decode(ids, positions=positions, cache=cache,
                                     cache_mask=cache_mask, **blocks)

    def head(hidden):
        return jnp.einsum("...e,ev->...v", hidden.astype(dtype), weight,
                          preferred_element_type=jnp.float32)

    return _Decoder(decode_hidden, head)


def _generate_body(
    graphdef: Any,
    state: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    eos_token_id: jax.Array,
    pad_token_id: jax.Array,
    spec: _Spec,
) -> GenerationOutput:
    model = nnx.merge(graphdef, state)
    n_new = spec.max_new_tokens
    prompt_ids = prompt_ids.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    if spec.batch_sharding is not None:
        prompt_ids = jax.lax.with_sharding_constraint(prompt_ids, spec.batch_sharding)
        prompt_mask = jax.lax.with_sharding_constraint(prompt_mask, spec.batch_sharding)
    batch, prompt_len = prompt_ids.shape
    pad = pad_token_id.astype(jnp.int32)
    eos = eos_token_id.astype(jnp.int32)

    sample = functools.partial(
        sample_tokens,
        temperature=temperature,
        top_k=spec.top_k,
        top_p=top_p if spec.use_top_p else None,
        min_p=min_p if spec.use_min_p else None,
        greedy=spec.greedy,
    )

    # Per-layer parameter slices, taken once here so the decode loop does not copy them out of
    # the stacked arrays at every step (models without `layer_blocks` decode as they are).
    blocks = {"blocks": model.layer_blocks()} if hasattr(model, "layer_blocks") else {}
    decoder = _decoder(model, blocks)

    # The cache grows in segments: the loop over the steps of segment j attends over
    # `P + ends[j]` slots instead of all `P + N`, so a step reads less of the cache.
    ends = segment_ends(n_new, spec.cache_segments)

    def prompt_then_ones(end):
        return jnp.concatenate([prompt_mask, jnp.ones((batch, end), jnp.int32)], axis=1)

    # Prefill: the whole left-padded prompt in one cached forward.
    cache = model.init_cache(batch, prompt_len + ends[0])
    positions = positions_from_mask(prompt_mask)
    hidden, cache = decoder.decode(prompt_ids, positions, cache, prompt_then_ones(ends[0]))
    first_position = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # [B]
    token, logp, model_logp = sample(decoder.head(hidden[:, -1]), jax.random.fold_in(rng, 0))

    def is_eos(tok):
        if not spec.use_eos:
            return jnp.zeros(tok.shape, bool)
        return tok == eos

    tokens = jnp.full((batch, n_new), pad, jnp.int32).at[:, 0].set(token)
    logps = jnp.zeros((batch, n_new), jnp.float32).at[:, 0].set(logp)
    model_logps = jnp.zeros((batch, n_new), jnp.float32).at[:, 0].set(model_logp)
    done = is_eos(token)

    def decode_until(end, carry):
        # Grow the cache to `P + end` slots (a no-op for the first segment), then decode.
        step, token, done, cache, tokens, logps, model_logps = carry
        cache = grow_cache(cache, prompt_len + end - cache.max_length)
        carry = (step, token, done, cache, tokens, logps, model_logps)
        cache_mask = prompt_then_ones(end)

        def cond(carry):
            step, _, done, *_ = carry
            return (step < end) & ~jnp.all(done)

        def body(carry):
            step, token, done, cache, tokens, logps, model_logps = carry
            positions = (first_position + step - 1)[:, None]
            hidden, cache = decoder.decode(token[:, None], positions, cache, cache_mask)
            new, logp, model_logp = sample(decoder.head(hidden[:, 0]),
                                           jax.random.fold_in(rng, step))
            tokens = jax.lax.dynamic_update_slice(
                tokens, jnp.where(done, pad, new)[:, None], (0, step)
            )
            logps = jax.lax.dynamic_update_slice(
                logps, jnp.where(done, 0.0, logp)[:, None], (0, step)
            )
            model_logps = jax.lax.dynamic_update_slice(
                model_logps, jnp.where(done, 0.0, model_logp)[:, None], (0, step)
            )
            return step + 1, new, done | is_eos(new), cache, tokens, logps, model_logps

        return jax.lax.while_loop(cond, body, carry)

    carry = (jnp.int32(1), token, done, cache, tokens, logps, model_logps)
    for end in ends:
        carry = decode_until(end, carry)
    _, _, done, _, tokens, logps, model_logps = carry

    if not spec.use_eos:
        mask = jnp.ones((batch, n_new), jnp.int32)
    else:
        hits = tokens == eos
        first = jnp.min(jnp.where(hits, jnp.arange(n_new, dtype=jnp.int32), n_new), axis=1)
        mask = (jnp.arange(n_new, dtype=jnp.int32)[None, :] <= first[:, None]).astype(jnp.int32)
    return GenerationOutput(
        tokens=tokens,
        mask=mask,
        logps=logps * mask,
        model_logps=model_logps * mask,
        sequences=jnp.concatenate([prompt_ids, tokens], axis=1),
        sequence_mask=jnp.concatenate([prompt_mask, mask], axis=1),
        finished=done,
        prompt_length=prompt_len,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
@unchecked  # no checkify effect: JAX's C++ dispatch path
def _generate_jit(graphdef, state, prompt_ids, prompt_mask, rng, *scalars, spec):
    out = _generate_body(graphdef, state, prompt_ids, prompt_mask, rng, *scalars, spec)
    # ``prompt_length`` is static; return only arrays from the jitted function.
    return out._replace(prompt_length=0)


def _check_prompts(prompt_ids: Any, prompt_mask: Any) -> None:
    if np.ndim(prompt_ids) != 2 or np.shape(prompt_ids) != np.shape(prompt_mask):
        raise ValueError(
            "prompt_ids and prompt_mask must both be [batch, prompt_length]; got shapes "
            f"{np.shape(prompt_ids)} and {np.shape(prompt_mask)}"
        )
    if not jnp.issubdtype(jnp.asarray(prompt_ids).dtype, jnp.integer):
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {prompt_ids.dtype}")
    if 0 in np.shape(prompt_ids):
        raise ValueError(f"prompt_ids must be non-empty, got shape {np.shape(prompt_ids)}")
    try:
        if isinstance(prompt_mask, jax.Array) and not prompt_mask.is_fully_addressable:
            return  # multi-host global array: the rows live on other processes
        mask = np.asarray(prompt_mask).astype(bool)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return  # called under a trace: the values are not known here
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(
            f"prompt_mask rows {empty[:10].tolist()} are all padding; every prompt needs at least "
            "one real token (e.g. a BOS token)"
        )
    not_left = np.flatnonzero((mask[:, :-1] & ~mask[:, 1:]).any(axis=1))
    if not_left.size:
        raise ValueError(
            f"prompt_mask rows {not_left[:10].tolist()} are not left-padded (a 0 follows a 1); "
            "generation expects left-padded prompts"
        )


def generate_with_state(
    graphdef: Any,
    state: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    sampling: SamplingParams,
    *,
    rng: jax.Array | None = None,
    eos_token_id: int | None,
    pad_token_id: int,
    num_samples: int = 1,
    mesh: Mesh | None = None,
) -> GenerationOutput:
    """Samples responses from ``nnx.merge(graphdef, state)``; see :func:`generate`.

    For trainers, which hold the policy's state pytree rather than a module: ``graphdef`` comes
    from ``nnx.split(model)`` once, ``state`` is the current parameters (any sharding).

    Raises:
      ValueError: for prompt ids, ``eos_token_id`` or ``pad_token_id`` outside ``[0, V)``, or a
        prompt plus ``max_new_tokens`` longer than the model's ``max_position_embeddings``
        (checked on the host before the jitted loop; see `rlhf_jax.generation._limits`).
    """
    _check_prompts(prompt_ids, prompt_mask)
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    max_new_tokens, cache_segments = sampling.max_new_tokens, sampling.cache_segments
    temperature, top_k, top_p, min_p, greedy = (
        sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p, sampling.greedy
    )
    validate_sampling_args(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, greedy=greedy
    )
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if cache_segments is None:
        cache_segments = auto_cache_segments(max_new_tokens)
    elif (not isinstance(cache_segments, int) or isinstance(cache_segments, bool)
          or not 1 <= cache_segments <= max_new_tokens):
        raise ValueError(f"cache_segments must be an int in [1, max_new_tokens={max_new_tokens}] "
                         f"or None, got {cache_segments!r}")
    if eos_token_id is not None and not isinstance(eos_token_id, int | np.integer):
        raise ValueError(f"eos_token_id must be an int or None, got {eos_token_id!r}")
    if not isinstance(pad_token_id, int | np.integer):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    check_generation_ranges(nnx.merge(graphdef, state), prompt_ids, prompt_mask,
                            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id)
    if rng is None:
        if not greedy:
            raise ValueError("rng is required unless greedy=True")
        rng = jax.random.key(0)
    sharding = None
    if mesh is not None:
        sharding = batch_sharding(mesh, 2)
        n_shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
        if np.shape(prompt_ids)[0] % n_shards:
            raise ValueError(
                f"batch size {np.shape(prompt_ids)[0]} is not divisible by the {n_shards} "
                f"devices of the mesh's {BATCH_AXES} axes"
            )
    if num_samples > 1:  # rows b * n .. b * n + n - 1 are prompt b's (outside the jitted loop)
        repeat = lambda x: (np.repeat(x, num_samples, axis=0) if isinstance(x, np.ndarray)
                            else jnp.repeat(x, num_samples, axis=0))
        prompt_ids, prompt_mask = repeat(prompt_ids), repeat(prompt_mask)
    if sharding is not None:
        prompt_ids = jax.device_put(prompt_ids, sharding)
        prompt_mask = jax.device_put(prompt_mask, sharding)
    spec = _Spec(
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        top_k=top_k,
        use_top_p=top_p is not None,
        use_min_p=min_p is not None,
        use_eos=eos_token_id is not None,
        batch_sharding=sharding,
        cache_segments=cache_segments,
    )
    out = _generate_jit(
        graphdef,
        state,
        prompt_ids,
        prompt_mask,
        rng,
        jnp.float32(temperature),
        jnp.float32(1.0 if top_p is None else top_p),
        jnp.float32(0.0 if min_p is None else min_p),
        jnp.int32(-1 if eos_token_id is None else eos_token_id),
        jnp.int32(pad_token_id),
        spec=spec,
    )
    return out._replace(prompt_length=int(np.shape(prompt_ids)[1]))


class Sampler:
    """A policy split once into ``(graphdef, state)``, for repeated generation.

    ``Sampler(model)`` splits an NNX ``CausalLM``; ``Sampler.from_state(graphdef, state)`` wraps a
    trainer's state. ``sampler.state = new_state`` swaps the parameters (same structure) without
    recompiling.
    """

    def __init__(self, model: nnx.Module | None = None, *, mesh: Mesh | None = None):
        self.mesh = mesh
        if model is not None:
            self.graphdef, self.state = nnx.split(model)

    @classmethod
    def from_state(cls, graphdef: Any, state: Any, *, mesh: Mesh | None = None) -> Sampler:
        sampler = cls(mesh=mesh)
        sampler.graphdef, sampler.state = graphdef, state
        return sampler

    def generate(
        self,
        prompt_ids: jax.Array,
        prompt_mask: jax.Array,
        sampling: SamplingParams,
        *,
        state: Any = None,
        **kwargs: Any,
    ) -> GenerationOutput:
        """:func:`generate_with_state` with this sampler's graph, state (or ``state``) and mesh;
        ``kwargs`` are its keyword arguments (``rng``, ``eos_token_id``, ``pad_token_id``,
        ``num_samples``)."""
        kwargs.setdefault("mesh", self.mesh)
        return generate_with_state(
            self.graphdef,
            self.state if state is None else state,
            prompt_ids,
            prompt_mask,
            sampling,
            **kwargs,
        )


def generate(
    model: nnx.Module,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    sampling: SamplingParams,
    *,
    rng: jax.Array | None = None,
    eos_token_id: int | None,
    pad_token_id: int,
    num_samples: int = 1,
    mesh: Mesh | None = None,
) -> GenerationOutput:
    """Samples up to ``sampling.max_new_tokens`` tokens after each left-padded prompt.

    Prefills the prompt into a KV cache, then runs a jitted ``lax.while_loop`` of single-token
    cached decodes (one loop per cache segment, see ``cache_segments``) that stops as soon as
    every row has produced ``eos_token_id`` (or after ``max_new_tokens`` steps). Rows that
    stopped keep decoding with their outputs discarded: the tokens after the first EOS are
    ``pad_token_id`` and masked out.

    The sampling distribution is ``softmax(filter(logits / temperature))`` where ``filter`` applies
    top-k, then top-p, then min-p (Hugging Face ``generate`` order); ``sampling.greedy`` takes
    the argmax instead (no key needed). See :class:`SamplingParams` for every field.

    Args:
      model: an NNX causal LM with ``init_cache(batch_size, max_length)`` and
        ``decode(ids, *, positions, cache, cache_mask) -> (logits, cache)``. It is split with
        ``nnx.split`` on every call; use :class:`Sampler` or :func:`generate_with_state` to split
        once.
      prompt_ids: ``[B, P]`` int token ids, left-padded.
      prompt_mask: ``[B, P]`` 1 on real tokens; every row needs at least one real token.
      sampling: response width ``N``, temperature, filters, greedy, KV-cache segments.
      rng: PRNG key; the draw of step ``i`` uses ``fold_in(rng, i)``.
      eos_token_id: stop token; ``None`` never stops early (always ``N`` tokens).
      pad_token_id: written after the first EOS.
      num_samples: ``n`` responses per prompt; rows ``b * n .. b * n + n - 1`` are prompt ``b``'s.
      mesh: optional mesh; the batch is sharded over its ``("data", "fsdp")`` axes (``B`` must be
        divisible by their size). The result does not depend on the sharding.

    Returns:
      A :class:`GenerationOutput` with ``B * n`` rows.

    Raises:
      ValueError: for a prompt id (padding included), ``eos_token_id`` or ``pad_token_id``
        outside ``[0, V)``, or when the longest prompt plus ``max_new_tokens`` needs more
        positions than the model's ``max_position_embeddings`` (the embedding lookups would
        otherwise clip them to finite, wrong values). Checked on the host, before the loop.
    """
    graphdef, state = nnx.split(model)
    return generate_with_state(
        graphdef,
        state,
        prompt_ids,
        prompt_mask,
        sampling,
        rng=rng,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        num_samples=num_samples,
        mesh=mesh,
    )
