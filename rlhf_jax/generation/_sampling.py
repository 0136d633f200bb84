"""Sampling filters over next-token logits: temperature, top-k, top-p (nucleus) and min-p.

Every filter takes logits ``[..., V]`` and returns logits of the same shape in which the removed
tokens are set to ``-inf``; kept tokens keep their value, so ``log_softmax`` of the result is the
renormalised distribution over the kept tokens. The composition order is Hugging Face
``generate``'s: temperature, then top-k, then top-p, then min-p (each filter sees the output of the
previous one). Each filter keeps at least one token (the most likely one).

Top-k and top-p never sort the vocabulary: each row's cut-off logit is found by bisection over
the order of float32 values (exact, since the keys are the values' bit patterns), which is what
makes them cheap enough for a 151,936-token vocabulary inside the decode loop.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of the float32 values ``x`` (``-0.0`` maps to ``+0.0``'s key;
    ``-inf`` and ``+inf`` are the lowest and highest keys of non-NaN values)."""
    x = jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = bits >> 31
    # Positive floats: set the top bit. Negative floats: flip every bit (larger magnitude first).
    return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_true(pred, *, hi: jax.Array) -> jax.Array:
    """Per row, the largest uint32 ``t`` in ``[0, hi)`` with ``pred(t)`` true, for a predicate that
    is true at 0, false at ``hi`` and monotone (true below some point, false above), by bisection
    in 32 steps. ``pred`` maps keys ``[...]`` to booleans ``[...]``; ``hi`` is ``[...]``.

    The top-k and top-p filters find their cut-off this way instead of sorting the vocabulary:
    32 fused reductions over ``[B, V]``, 30-40x faster on CPU than the sort-based formulation at
    ``V >= 32,768`` (``python -m rlhf_jax.bench filters``); on TPU and GPU they are plain
    reductions too."""
    lo = jnp.zeros_like(hi)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return lo


def apply_temperature(logits: jax.Array, *, temperature: float | jax.Array) -> jax.Array:
    """Divides the logits by the temperature: ``softmax(logits / T)``.

    Args:
      logits: ``[..., V]`` logits.
      temperature: positive scalar ``T``; ``T -> 0`` approaches greedy, ``T = 1`` is the model.

    Returns:
      ``[..., V]`` float32 logits ``logits / T``.
    """
    return logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


def top_k_filter(logits: jax.Array, *, top_k: int) -> jax.Array:
    """Keeps the ``top_k`` largest logits per row (ties with the k-th value are kept).

    Matches Hugging Face ``TopKLogitsWarper``: a token is removed iff its logit is strictly below
    the k-th largest logit of its row.

    Args:
      logits: ``[..., V]`` logits.
      top_k: number of tokens to keep, ``1 <= top_k``; values ``>= V`` keep everything.

    Returns:
      ``[..., V]`` logits with the removed tokens at ``-inf``.
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    vocab = logits.shape[-1]
    if top_k >= vocab:
        return logits
    keys = _order_keys(logits)
    # The k-th largest key: the largest t with #{keys >= t} >= k (true at t = 0).
    kth = _largest_true(lambda t: jnp.sum(keys >= t[..., None], axis=-1) >= top_k,
                        hi=jnp.max(keys, axis=-1) + 1)
    return jnp.where(keys < kth[..., None], _NEG_INF, logits)


def top_p_filter(logits: jax.Array, *, top_p: float | jax.Array) -> jax.Array:
    """Nucleus filter: keeps the smallest set of most likely tokens whose probability is >= ``top_p``.

    With the tokens sorted by decreasing probability ``p_(1) >= p_(2) >= ...``, token ``(i)`` is
    kept iff ``sum_{j < i} p_(j) < top_p`` (the mass strictly before it has not yet reached
    ``top_p``), so the most likely token is always kept. This is Hugging Face's
    ``TopPLogitsWarper`` rule (it removes tokens whose ascending cumulative mass is
    ``<= 1 - top_p``). Tokens tied with the last kept logit are kept too.

    Args:
      logits: ``[..., V]`` logits (``-inf`` entries count as probability 0).
      top_p: scalar in ``(0, 1]``; ``1`` keeps every token with non-zero probability.

    Returns:
      ``[..., V]`` logits with the removed tokens at ``-inf``.
    """
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _order_keys(logits)
    top_p = jnp.asarray(top_p, jnp.float32)
    # t_a: the largest t whose mass strictly above, M(t) = sum(p[keys > t]), is still >= top_p
    # (M falls as t rises). The kept tokens are those above t_a: the first sorted token whose
    # mass before it is < top_p, every token before it, and its ties.
    above = _largest_true(
        lambda t: jnp.sum(jnp.where(keys > t[..., None], probs, 0.0), axis=-1) >= top_p,
        hi=jnp.max(keys, axis=-1),
    )
    return jnp.where(keys > above[..., None], logits, _NEG_INF)


def min_p_filter(logits: jax.Array, *, min_p: float | jax.Array) -> jax.Array:
    """Min-p filter: keeps the tokens with ``p_i >= min_p * max_j p_j``.

    Computed in log space as ``logit_i - max_j logit_j >= log(min_p)``, which is Hugging Face's
    ``MinPLogitsWarper`` rule without the softmax round trip. ``min_p = 0`` keeps everything.

    Args:
      logits: ``[..., V]`` logits.
      min_p: scalar in ``[0, 1]``.

    Returns:
      ``[..., V]`` logits with the removed tokens at ``-inf``.
    """
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    log_min_p = jnp.log(jnp.asarray(min_p, jnp.float32))
    return jnp.where(logits - top < log_min_p, _NEG_INF, logits)


def validate_sampling_args(
    *,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    greedy: bool,
) -> None:
    """Raises ``ValueError`` naming the argument when a sampling hyper-parameter is out of range."""
    if temperature is not None and not isinstance(temperature, jax.Array):
        if not (float(temperature) > 0.0):
            raise ValueError(
                f"temperature must be > 0 (use greedy=True for argmax decoding), got {temperature!r}"
            )
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not isinstance(top_p, jax.Array):
        if not (0.0 < float(top_p) <= 1.0):
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if min_p is not None and not isinstance(min_p, jax.Array):
        if not (0.0 <= float(min_p) <= 1.0):
            raise ValueError(f"min_p must be None or in [0, 1], got {min_p!r}")
    if not isinstance(greedy, bool):
        raise ValueError(f"greedy must be a bool, got {greedy!r}")


def filter_logits(
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    min_p: float | jax.Array | None = None,
) -> jax.Array:
    """The sampling distribution's logits: temperature, then top-k, top-p and min-p (HF order).

    ``log_softmax(filter_logits(logits, ...))`` is the log-probability of each token under the
    distribution that :func:`sample_tokens` draws from.

    Args:
      logits: ``[..., V]`` model logits.
      temperature: positive scalar ``T``.
      top_k: keep the ``top_k`` most likely tokens, or ``None``.
      top_p: nucleus mass in ``(0, 1]``, or ``None``.
      min_p: relative probability floor in ``[0, 1]``, or ``None``.

    Returns:
      ``[..., V]`` float32 logits, ``-inf`` on removed tokens.
    """
    out = apply_temperature(logits, temperature=temperature)
    if top_k is not None:
        out = top_k_filter(out, top_k=top_k)
    if top_p is not None:
        out = top_p_filter(out, top_p=top_p)
    if min_p is not None:
        out = min_p_filter(out, min_p=min_p)
    return out


def _invert_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Index `i` with `cdf[i-1] < u * total <= cdf[i]` per row of `weights [B, n]` (>= 0), for
    `u [B]` in `(0, 1]`. Zero-weight entries are never chosen."""
    cdf = jnp.cumsum(weights, axis=-1)
    threshold = u[:, None] * cdf[:, -1:]
    return jnp.sum(cdf < threshold, axis=-1).astype(jnp.int32)


def categorical_inverse_cdf(rng: jax.Array, logits: jax.Array, *, block: int = 1024) -> jax.Array:
    """One draw per row from `softmax(logits)` (`[B, V]`, `-inf` = never) by inverting the CDF.

    Distributed as `jax.random.categorical`, but it needs two uniforms per row instead of `V`
    Gumbel variates, which makes it many times faster on CPU (where random bits are the cost:
    120 vs 26 us per step at B=8, V=512; 12 vs 0.6 ms at B=8, V=151,936). Two levels keep
    float32 accurate for large vocabularies: a block of `block` tokens is drawn from the block
    masses, then a token from within the block, so each token's probability is resolved relative
    to its block's mass rather than to a single running sum over all `V` (whose rounding would
    be about `1e-7` absolute per token). The block masses are reduced straight from the logits
    and only the chosen block is exponentiated again, so no `[B, V]` array is stored (at
    B=32, V=151,936 a stored copy made the draw 5x slower on CPU).

    Returns `[B]` int32 token ids.
    """
    b, v = logits.shape
    logits = logits.astype(jnp.float32)
    # (0, 1]: a threshold of exactly 0 would select a zero-probability first token.
    u = 1.0 - jax.random.uniform(rng, (2, b), jnp.float32)
    if v <= block:
        return _invert_cdf(jax.nn.softmax(logits, axis=-1), u[0])
    # Block masses straight from the logits (no [B, V] probability or padded copy is stored):
    # the full blocks as a `[B, V // block, block]` view, then the last partial block.
    top = jnp.max(logits, axis=-1, keepdims=True)
    full = v // block
    masses = [jnp.sum(jnp.exp(logits[:, : full * block].reshape(b, full, block) - top[:, :, None]),
                      axis=-1)]
    if v > full * block:
        masses.append(jnp.sum(jnp.exp(logits[:, full * block:] - top), axis=-1, keepdims=True))
    chosen = _invert_cdf(jnp.concatenate(masses, axis=1), u[0])
    # The chosen block's `block` logits; the last, partial block is read as the final `block`
    # ids with the ones that belong to the block before it masked out.
    start = jnp.minimum(chosen * block, v - block)
    window = jax.vmap(lambda row, s: jax.lax.dynamic_slice(row, (s,), (block,)))(logits, start)
    ids = start[:, None] + jnp.arange(block, dtype=jnp.int32)
    window = jnp.where(ids >= chosen[:, None] * block, window, -jnp.inf)
    # Relative to the block's own maximum, so that a block of tiny probabilities cannot underflow.
    within = jnp.exp(window - jnp.max(window, axis=-1, keepdims=True))
    return start + _invert_cdf(within, u[1])


def _token_log_softmax(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_softmax(logits)[b, tokens[b]]`` (``[B]``) without storing the ``[B, V]`` result:
    ``(x_t - max) - log(sum(exp(x - max)))``, the same float32 operations as ``log_softmax``."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    shifted = jnp.take_along_axis(logits, tokens[:, None], axis=-1) - top
    return (shifted - jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True)))[:, 0]


def sample_tokens(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    min_p: float | jax.Array | None = None,
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row and returns its log-probabilities.

    Args:
      logits: ``[B, V]`` model logits for the next token.
      rng: a PRNG key (unused when ``greedy``).
      temperature, top_k, top_p, min_p: see :func:`filter_logits`.
      greedy: take ``argmax(logits)`` instead of sampling.

    Returns:
      ``(tokens [B] int32, logps [B], model_logps [B])``: ``logps`` is
      ``log_softmax(filter_logits(logits))[token]``, the log-probability under the distribution
      sampled from (after temperature and filters; for ``greedy`` the same formula at the argmax
      token); ``model_logps`` is ``log_softmax(logits)[token]``, the untempered, unfiltered model
      log-probability.
    """
    chex.assert_rank(logits, 2)
    logits = logits.astype(jnp.float32)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        tokens = categorical_inverse_cdf(rng, filtered)
    tokens = tokens.astype(jnp.int32)
    return tokens, _token_log_softmax(filtered, tokens), _token_log_softmax(logits, tokens)
