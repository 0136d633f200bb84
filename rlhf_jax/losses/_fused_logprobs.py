"""Token log-probs (and entropies) straight from hidden states and the unembedding, without the
``[B, T, V]`` logits: the LM head fused with the log-softmax, chunked over time, with a custom
VJP that recomputes each chunk's logits in the backward pass.

The idea is the one of Liger-Kernel's fused linear cross-entropy and of MaxText's vocabulary
tiling: only one ``[B, chunk, V]`` block of logits ever exists, in the forward pass and in the
backward pass, and the only per-token residuals kept between the two are the log-normaliser
(and the entropy when it is asked for). Unlike a cross-entropy loss, the output here is the
unreduced per-token log-prob, so any loss (SFT, the DPO family, PPO/GRPO) can be built on it;
its gradient therefore cannot be formed in the forward pass (the upstream cotangent is not yet
known) and the backward pass pays one more ``[B, chunk, E] x [E, V]`` product per chunk, unless
the caller has the memory to keep the logits (``keep_logits``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses._checks import check_choice, check_rank

UNEMBEDDING_LAYOUTS = ("ev", "ve")


class FusedLogps(NamedTuple):
    """Per-token outputs of :func:`fused_token_logps` (fields not asked for are None).

    Attributes:
      logps: ``[B, T]`` float32 log-probabilities of the targets.
      entropy: ``[B, T]`` float32 entropies of the (tempered) next-token distributions, or None.
      argmax: ``[B, T]`` int32 most likely token ids (first on ties), or None; no gradient.
    """

    logps: chex.Array
    entropy: chex.Array | None = None
    argmax: chex.Array | None = None


class _Static(NamedTuple):
    layout: str
    temperature: float
    with_entropy: bool
    with_argmax: bool
    keep_logits: bool


def fused_token_logps(
    hidden: chex.Array,
    unembedding: chex.Array,
    targets: chex.Array,
    *,
    layout: str = "ev",
    bias: chex.Array | None = None,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
    with_argmax: bool = False,
    keep_logits: bool = False,
    where: chex.Array | None = None,
) -> FusedLogps:
    r"""Log-probs of ``targets`` under ``softmax((hidden @ W + bias) / temperature)``, chunked.

    With :math:`z_{b,t} = (h_{b,t} W + c) / \tau` (``W`` the unembedding, ``c`` the bias,
    :math:`\tau` the temperature) and targets **already shifted**:

    .. math::
        \mathrm{logps}[b, t] = z_{b,t,y_{b,t}} - \log \sum_v e^{z_{b,t,v}}, \qquad
        \mathrm{entropy}[b, t] = -\sum_v p_{b,t,v} \log p_{b,t,v}.

    The same values as ``token_logps(logits / temperature, targets)`` and
    ``entropy_from_logits(logits / temperature)`` on ``logits = hidden @ W + bias`` (the
    temperature divides the logits as TRL's PPO/GRPO and HF ``generate`` do), but the time axis
    is processed ``chunk_size`` positions at a time (``lax.scan``) and a custom VJP recomputes a
    chunk's logits in the backward pass (or, with ``keep_logits``, keeps them):

    .. math::
        \frac{\partial \mathrm{logps}}{\partial z_v} = [v = y] - p_v, \qquad
        \frac{\partial \mathrm{entropy}}{\partial z_v} = -p_v (\log p_v + \mathrm{entropy}),

    then :math:`dh = dz\, W^\top / \tau`, :math:`dW = \sum_{\text{chunks}} h^\top dz / \tau`
    (accumulated in float32) and :math:`dc = \sum dz / \tau`. Forward plus backward memory is
    therefore O(B · chunk_size · V) for the logits (per device: B is the local batch and V the
    local vocabulary shard when the unembedding is sharded over its vocabulary axis), plus the
    float32 ``dW`` accumulator (the size of ``W``) in the backward pass; nothing of size
    ``B · T · V`` is kept (unless ``keep_logits``). The batch axis is never chunked, so a batch
    sharded over devices stays sharded; the backward pass finds the target by comparing against
    an iota over the vocabulary, and the forward pass gathers the targets' columns of ``W`` as an
    embedding lookup does, which a vocabulary-sharded ``W`` partitions without gathering it.

    Precision: the products run in ``hidden.dtype`` (``W`` and ``bias`` are cast to it, as the
    model's own head does) with float32 accumulation; softmax, log-probs and entropies are
    float32. Gradients come back in the dtypes of ``hidden``, ``W`` and ``bias``.

    Targets outside ``[0, V)`` give NaN log-probs, as :func:`token_logps` does. Positions the
    caller masks out receive exactly zero gradient when their cotangent is zero (e.g. a
    ``where`` or a mask multiply in the loss).

    Scoring some tokens only (``where``): tokens where ``where`` is False get log-prob 0,
    entropy 0 and argmax -1, and receive no gradient (whatever their target, even an
    out-of-range one). The head then runs only on the chunks that hold a scored token: each
    row's scored tokens are first moved to the front of the row (a stable per-row permutation
    of ``hidden`` and ``targets``, so a batch sharded over its rows stays sharded), and a chunk
    past the fullest row's count is skipped in both passes (``lax.cond``): the head's products
    run on ``ceil(max_b count_b / c)`` chunks, not ``ceil(T / c)``. A trainer passes its loss
    mask, so prompt and padding positions cost nothing in the head (TRL's ``use_logits_to_keep``
    and Tunix's ``logits_to_keep`` skip the prompt only, and only a prefix common to the batch).
    Under ``vmap`` the skipped chunks run anyway (a batched ``cond`` runs both branches); the
    values are the same.

    Cost: the forward pass runs one ``[B, c, E] x [E, V]`` product per chunk, the backward pass
    three (the recomputed logits, ``dh`` and ``dW``), or two with ``keep_logits``, which stores
    every chunk's ``[B, c, V]`` float32 block between the passes instead (``exp(z - max z)``, so
    that the backward pass runs no ``exp`` either; the logits themselves when the entropy is
    asked for): ``B · T · V`` floats, the memory of the unfused head, for one head product per
    token less. The products are larger, and on CPU faster per FLOP, when a chunk holds more
    rows (``B · chunk_size``): a caller that keeps the logits gains most from a single chunk
    (``chunk_size >= T``), unless ``where`` leaves chunks to skip (then the skipped chunks'
    blocks are zeros and cost no product). The target logit is ``h · W[:, y] + c_y`` (a gather of ``B · c``
    columns of ``W``, the embedding lookup's pattern on a tied table) rather than a pass over
    the ``[B, c, V]`` block; since it rounds apart from the log-normaliser, the log-probs are
    capped at 0.

    Args:
      hidden: ``[B, T, E]`` final hidden states (after the final norm).
      unembedding: the LM head, ``[E, V]`` (``layout="ev"``: an untied head's kernel) or
        ``[V, E]`` (``layout="ve"``: a tied token-embedding table).
      targets: ``[B, T]`` integer token ids, already shifted (``targets[b, t]`` is scored by
        ``hidden[b, t]``).
      layout: ``"ev"`` or ``"ve"`` (keyword-only; there is no guessing from the shapes).
      bias: optional ``[V]`` output bias added to the logits.
      temperature: positive Python float dividing the logits (static).
      chunk_size: positions of the time axis per chunk (> 0). Chunks are balanced: ``T`` is cut
        into ``ceil(T / chunk_size)`` chunks of at most ``chunk_size`` positions and padded by
        less than one chunk.
      with_entropy: also return the per-token entropy (differentiable).
      with_argmax: also return the per-token argmax token id (int32, no gradient).
      keep_logits: keep each chunk's float32 ``[B, c, V]`` block for the backward pass instead
        of recomputing the logits (memory ``B · T · V`` floats; see "Cost").
      where: optional ``[B, T]`` bool (or 0/1) mask of the tokens to score (see above); None
        scores every token.

    Returns:
      :class:`FusedLogps` ``(logps [B, T], entropy [B, T] or None, argmax [B, T] or None)``.
    """
    check_rank("hidden", hidden, 3)
    check_rank("unembedding", unembedding, 2)
    check_rank("targets", targets, 2)
    check_choice("layout", layout, UNEMBEDDING_LAYOUTS)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
    b, t, e = hidden.shape
    if targets.shape != (b, t):
        raise ValueError(f"targets.shape={targets.shape} must equal hidden.shape[:2]={(b, t)}")
    w_e, v = unembedding.shape if layout == "ev" else unembedding.shape[::-1]
    if w_e != e:
        raise ValueError(
            f"unembedding of shape {unembedding.shape} (layout={layout!r}) has width {w_e}, "
            f"but hidden has width E={e}"
        )
    if bias is not None:
        check_rank("bias", bias, 1)
        if bias.shape != (v,):
            raise ValueError(f"bias.shape={bias.shape} must be (V,)={(v,)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) \
            or not float(temperature) > 0:
        raise ValueError(f"temperature must be a positive Python float, got {temperature!r}")
    if where is not None:
        check_rank("where", where, 2)
        if where.shape != (b, t):
            raise ValueError(f"where.shape={where.shape} must equal targets.shape={(b, t)}")
    static = _Static(layout, float(temperature), bool(with_entropy), bool(with_argmax),
                     bool(keep_logits))

    n_chunks = max(-(-t // chunk_size), 1)
    chunk = max(-(-t // n_chunks), 1)
    pad = n_chunks * chunk - t
    y = targets.astype(jnp.int32)
    h = hidden
    active = None
    if where is not None:
        where = where.astype(bool)
        # Each row's scored tokens first, in their order: [B, T] source position of each slot.
        order = jnp.argsort(~where, axis=1, stable=True)
        h = jnp.take_along_axis(h, order[..., None], axis=1)
        y = jnp.take_along_axis(y, order, axis=1)
        count = jnp.max(jnp.sum(where, axis=1, dtype=jnp.int32))
        active = jnp.arange(n_chunks, dtype=jnp.int32) * chunk < count  # [n]
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))) if pad else h
    y = jnp.pad(y, ((0, 0), (0, pad))) if pad else y
    # [n, B, c, E] and [n, B, c]: the scan runs over time chunks; the batch axis stays whole.
    h = h.reshape(b, n_chunks, chunk, e).swapaxes(0, 1)
    y = y.reshape(b, n_chunks, chunk).swapaxes(0, 1)
    logps, entropy, argmax = _fused(static, h, unembedding, bias, y, active)

    def unchunk(x):
        if x is None:
            return None
        x = x.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]
        if where is None:
            return x
        # Back to the token order (the inverse permutation), then the unscored tokens' fill.
        return jnp.take_along_axis(x, jnp.argsort(order, axis=1), axis=1)

    logps = unchunk(logps)
    invalid = (targets < 0) | (targets >= v)
    logps = jnp.where(invalid, jnp.nan, logps)
    entropy, argmax = unchunk(entropy), unchunk(argmax)
    if where is not None:
        logps = jnp.where(where, logps, 0.0)
        entropy = None if entropy is None else jnp.where(where, entropy, 0.0)
        argmax = None if argmax is None else jnp.where(where, argmax, -1)
    return FusedLogps(logps, entropy, argmax)


# ---------------------------------------------------------------------------------------------
# the custom VJP over chunked inputs: h [n, B, c, E], y [n, B, c]
# ---------------------------------------------------------------------------------------------


def _chunk_logits(static: _Static, h, w, bias):
    """float32 ``z = (h @ W + bias) / temperature`` for one chunk ``h [B, c, E]`` -> ``[B, c, V]``;
    ``w`` and ``bias`` already in the compute dtype."""
    spec = "bce,ev->bcv" if static.layout == "ev" else "bce,ve->bcv"
    z = jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + bias.astype(jnp.float32)
    if static.temperature != 1.0:
        z = z / static.temperature
    return z


def _target_logit(static: _Static, h, w, bias, y):
    """float32 ``z[..., y] = (h · W[:, y] + bias[y]) / temperature`` for ``h [B, c, E]``,
    ``y [B, c]`` -> ``[B, c]``: a gather of the targets' columns of ``W`` (rows of a ``[V, E]``
    table) and a dot over ``E``, not a pass over the ``[B, c, V]`` logits. ``w`` and ``bias``
    already in the compute dtype; out-of-range targets read garbage that the caller replaces
    by NaN."""
    axis = 1 if static.layout == "ev" else 0
    cols = jnp.take(w, y, axis=axis, mode="clip")  # "ev": [E, B, c]; "ve": [B, c, E]
    spec = "bce,ebc->bc" if static.layout == "ev" else "bce,bce->bc"
    z = jnp.einsum(spec, h, cols, preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + jnp.take(bias, y, mode="clip").astype(jnp.float32)
    if static.temperature != 1.0:
        z = z / static.temperature
    return z


def _is_target(y, v):
    """``[B, c, V]`` bool, True at each row's target id (an iota compare: no gather, so a
    vocabulary sharded over devices stays sharded)."""
    return jax.lax.broadcasted_iota(jnp.int32, (*y.shape, v), y.ndim) == y[..., None]


def _compute_operands(h, w, bias):
    """``W`` and the bias in the compute dtype (``hidden.dtype``), cast once outside the scan."""
    dtype = h.dtype
    return w.astype(dtype), None if bias is None else bias.astype(dtype)


def _forward(static: _Static, h, w, bias, y, active, *, keep: bool = False):
    """Outputs ``(logps, entropy, argmax)`` ``[n, B, c]`` and the per-token log-normaliser;
    with ``keep``, also what the backward pass needs instead of the recomputed logits: the
    unnormalised probabilities ``e = exp(z - max z)`` ``[n, B, c, V]`` and ``1 / sum(e)``
    ``[n, B, c]`` (``"probs"``, ``"inv_sum"``; then the backward pass runs no ``exp`` over the
    logits either), or, with the entropy, the logits ``z`` themselves (``"logits"``: its
    gradient needs ``log p``, which ``z - lse`` gives to float32 rounding and ``log(e / sum)``
    does not). ``active`` (``[n]`` bool or None): chunks where it is False run no head product
    and give zeros."""
    w_c, bias_c = _compute_operands(h, w, bias)

    def chunk_out(h_c, y_c):
        z = _chunk_logits(static, h_c, w_c, bias_c)
        picked = _target_logit(static, h_c, w_c, bias_c, y_c)
        if keep and not static.with_entropy:
            m = jnp.max(z, axis=-1)
            m = jnp.where(jnp.isfinite(m), m, 0.0)
            e = jnp.exp(z - m[..., None])
            total = jnp.sum(e, axis=-1)
            lse = m + jnp.log(total)
            out = {"probs": e, "inv_sum": 1.0 / total}
        else:
            lse = jax.nn.logsumexp(z, axis=-1)
            out = {"logits": z} if keep else {}
        # `picked` and `lse` round differently (a separate dot and the [B, c, V] pass), so a
        # target that holds nearly all the mass could come out a few ulps of the logits above 0;
        # a log-probability is at most 0 (its gradient comes from the custom VJP, not from this).
        out.update(logps=jnp.minimum(picked - lse, 0.0), lse=lse)
        if static.with_entropy:
            logp = z - lse[..., None]
            p = jnp.exp(logp)
            # Entries with p == 0 (z = -inf, or underflow) contribute exactly 0.
            out["entropy"] = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
        if static.with_argmax:
            out["argmax"] = jnp.argmax(z, axis=-1).astype(jnp.int32)
        return out

    def body(_, xs):
        if active is None:
            return None, chunk_out(*xs)
        h_c, y_c, on = xs
        return None, jax.lax.cond(on, chunk_out, _zeros_like_out(chunk_out), h_c, y_c)

    _, out = jax.lax.scan(body, None, (h, y) if active is None else (h, y, active))
    return out


def _zeros_like_out(fn):
    """A function with ``fn``'s signature that returns zeros shaped like ``fn``'s outputs: the
    branch of a skipped chunk."""
    def zeros(*args):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))
    return zeros


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static: _Static, h, w, bias, y, active):
    out = _forward(static, h, w, bias, y, active)
    return out["logps"], out.get("entropy"), out.get("argmax")


def _fused_fwd(static: _Static, h, w, bias, y, active):
    out = _forward(static, h, w, bias, y, active, keep=static.keep_logits)
    entropy = out.get("entropy")
    kept = {k: out[k] for k in ("probs", "inv_sum", "logits") if k in out}
    residuals = (h, w, bias, y, active, out["lse"], entropy, kept)
    return (out["logps"], entropy, out.get("argmax")), residuals


def _add_head_grad(layout: str, dw, h, dz):
    """``dw + h^T dz`` for one chunk (``h [B, c, E]``, ``dz [B, c, V]``), in ``dw``'s own layout:
    ``[E, V]`` for ``"ev"``, ``[V, E]`` for ``"ve"``, so a tied head's gradient never exists in
    the other layout (no ``[E, V]`` accumulator and no transposed copy at the end).

    For ``"ve"`` the product ``dz^T h`` is one 2-D dot over the ``B * c`` rows (reshapes of
    contiguous arrays, no copies) whose transposed operand the CPU matmul takes as is; the 3-D
    ``"bcv,bce->ve"`` einsum made XLA transpose every ``[B, c, V]`` block on CPU instead. The
    product is not split over the vocabulary: a loop over vocabulary blocks would keep only one
    block's product beside the accumulator, but its dynamic slices make GSPMD gather a
    vocabulary sharded over ``tensor``.
    """
    if layout == "ev":
        return dw + jnp.einsum("bce,bcv->ev", h, dz, preferred_element_type=jnp.float32)
    e, v = h.shape[-1], dz.shape[-1]
    return dw + jax.lax.dot_general(dz.reshape(-1, v), h.reshape(-1, e), (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)


def _fused_bwd(static: _Static, residuals, cotangents):
    h, w, bias, y, active, lse, entropy, kept = residuals
    g_logps, g_entropy, _ = cotangents
    w_c, bias_c = _compute_operands(h, w, bias)
    spec_h = "bcv,ev->bce" if static.layout == "ev" else "bcv,ve->bce"
    use_entropy = static.with_entropy and g_entropy is not None

    def chunk_grads(carry, xs):
        dw, dbias = carry
        h_c, y_c, lse_c, g_c = xs["h"], xs["y"], xs["lse"], xs["g"]
        if "probs" in xs:  # kept: p = e / sum(e), no head product and no exp
            p = xs["probs"] * xs["inv_sum"][..., None]
            logp = None
        else:
            z = xs["logits"] if "logits" in xs else _chunk_logits(static, h_c, w_c, bias_c)
            logp = z - lse_c[..., None]
            p = jnp.exp(logp)
        g = g_c.astype(jnp.float32)[..., None]
        dz = jnp.where(_is_target(y_c, p.shape[-1]), g, 0.0) - p * g
        if use_entropy:
            ent_c, ge_c = xs["entropy"], xs["g_entropy"]
            ge = ge_c.astype(jnp.float32)[..., None]
            dz = dz - ge * jnp.where(p > 0, p * (logp + ent_c[..., None]), 0.0)
        if static.temperature != 1.0:
            dz = dz / static.temperature
        dz_c = dz.astype(h_c.dtype)
        dh = jnp.einsum(spec_h, dz_c, w_c, preferred_element_type=jnp.float32)
        dw = _add_head_grad(static.layout, dw, h_c, dz_c)
        if dbias is not None:
            dbias = dbias + jnp.sum(dz, axis=(0, 1))
        return (dw, dbias), dh.astype(h.dtype)

    def skip(carry, xs):
        return carry, jnp.zeros(xs["h"].shape, h.dtype)

    def body(carry, xs):
        if active is None:
            return chunk_grads(carry, xs)
        xs = dict(xs)
        return jax.lax.cond(xs.pop("active"), chunk_grads, skip, carry, xs)

    xs = {"h": h, "y": y, "lse": lse, "g": g_logps}
    if active is not None:
        xs["active"] = active
    if use_entropy:
        xs.update(entropy=entropy, g_entropy=g_entropy)
    xs.update(kept)
    init = (jnp.zeros(w.shape, jnp.float32),
            None if bias is None else jnp.zeros(bias.shape, jnp.float32))
    (dw, dbias), dh = jax.lax.scan(body, init, xs)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dh, dw.astype(w.dtype), dbias, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
