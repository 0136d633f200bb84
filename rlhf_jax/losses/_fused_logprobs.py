"""Token log-probs (and entropies) straight from hidden states and the unembedding, without the
``[B, T, V]`` logits: the LM head fused with the log-softmax, chunked over time, with a custom
VJP that recomputes each chunk's logits in the backward pass.

The idea is the one of Liger-Kernel's fused linear cross-entropy and of MaxText's vocabulary
tiling: only one ``[B, chunk, V]`` block of logits ever exists, in the forward pass and in the
backward pass (a ``[B, chunk, V / nb]`` one when the vocabulary is also cut into ``nb`` strided
blocks, the default for a large vocabulary), and the only per-token residuals kept between the
two are the log-normaliser (and the entropy when it is asked for). Unlike a cross-entropy
loss, the output here is the unreduced per-token log-prob, so any loss (SFT, the DPO family,
PPO/GRPO) can be built on it; its gradient therefore cannot be formed in the forward pass (the
upstream cotangent is not yet known) and the backward pass pays one more ``[B, chunk, E] x
[E, V]`` product per chunk, unless the caller has the memory to keep the logits
(``keep_logits``).
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
    vocab_blocks: int


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
    vocab_blocks: int | None = None,
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
    therefore O(B · chunk_size · V / nb) for the logits (per device: B is the local batch and V
    the local vocabulary shard when the unembedding is sharded over its vocabulary axis), plus
    the float32 ``dW`` (the size of ``W``) in the backward pass; nothing of size ``B · T · V``
    is kept (unless ``keep_logits``). The batch axis is never chunked, so a batch sharded over
    devices stays sharded; the backward pass finds the target by comparing against an iota over
    the vocabulary, and the forward pass gathers the targets' columns of ``W`` as an embedding
    lookup does, which a vocabulary-sharded ``W`` partitions without gathering it.

    Vocabulary blocks (``vocab_blocks = nb``): both passes run over ``nb`` **strided** blocks of
    the vocabulary, block ``j`` holding the ids ``j, j + nb, j + 2 nb, ...`` (the ``[V, E]``
    table viewed as ``[V / nb, nb, E]`` and indexed on its ``nb`` axis; ``[E, V]`` as
    ``[E, V / nb, nb]``). The forward pass is an online log-sum-exp over the blocks (running
    max, sum and, for the entropy, ``sum e (z - max)``); in the backward pass the saved
    log-normaliser makes each block's ``dz`` independent, and each block's ``dW`` is written in
    place into a float32 ``[V / nb, nb, E]`` buffer, which is ``dW`` ``[V, E]`` without a copy.
    So the backward pass holds one ``W``-sized float32 array and a few ``[V / nb, E]`` blocks;
    in a single pass (``nb = 1``) each chunk's ``[V, E]`` product ``h^T dz`` is a second
    ``W``-sized temporary beside the accumulator (XLA's CPU dot does not accumulate into its
    output). Strided, not contiguous, blocks: a vocabulary sharded over devices splits into a
    sharded ``V / nb`` axis and the unsharded ``nb`` axis the loop indexes, so nothing is
    gathered (a dynamic slice of contiguous rows of a sharded axis makes GSPMD gather it). The
    head's products and FLOPs are the same; each ``W`` block is copied out once per pass.

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

    Cost: the forward pass runs one ``[B, c, E] x [E, V]`` product per chunk (split into ``nb``
    block products), the backward pass three (the recomputed logits, ``dh`` and ``dW``), or two
    with ``keep_logits``, which stores every chunk's ``[B, c, V]`` float32 block between the
    passes instead (``exp(z - max z)``, so that the backward pass runs no ``exp`` either; the
    logits themselves when the entropy is asked for): ``B · T · V`` floats, the memory of the
    unfused head, for one head product per token less. The products are larger, and on CPU
    faster per FLOP, when a chunk holds more rows (``B · chunk_size``): a caller that keeps the
    logits gains most from a single chunk (``chunk_size >= T``), unless ``where`` leaves chunks
    to skip (then the skipped chunks' blocks are zeros and cost no product). The target logit
    is ``h · W[:, y] + c_y`` (a gather of ``B · c`` columns of ``W``, the embedding lookup's
    pattern on a tied table) rather than a pass over the ``[B, c, V]`` block; since it rounds
    apart from the log-normaliser, the log-probs are capped at 0.

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
      vocab_blocks: number of strided vocabulary blocks (a positive int that divides ``V``;
        see "Vocabulary blocks"); 1 runs each chunk over the whole vocabulary at once. None
        picks the smallest divisor of ``V`` from 16 to 64 that leaves blocks of at least 512
        ids, a multiple of 8 (or else the largest such from 2 to 15; or else 1): 16 for
        Qwen2's 151,936 and Llama 3's 128,256, 1 for GPT-2's odd 50,257 and below 1,024 ids.
        With the vocabulary sharded over more than 8 devices, or over a count that does not
        divide ``V / nb``, pass a count whose blocks the shards divide (otherwise GSPMD gathers
        the table). Ignored with ``keep_logits`` (the kept blocks span the vocabulary).

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
    if vocab_blocks is None:
        vocab_blocks = _default_vocab_blocks(v)
    elif isinstance(vocab_blocks, bool) or not isinstance(vocab_blocks, int) \
            or vocab_blocks <= 0 or v % vocab_blocks:
        raise ValueError(f"vocab_blocks must be a positive int that divides V={v}, "
                         f"got {vocab_blocks!r}")
    static = _Static(layout, float(temperature), bool(with_entropy), bool(with_argmax),
                     bool(keep_logits), vocab_blocks)

    n_chunks = max(-(-t // chunk_size), 1)
    chunk = max(-(-t // n_chunks), 1)
    pad = n_chunks * chunk - t
    y = targets.astype(jnp.int32)
    h = hidden
    active = inverse = None
    if where is not None:
        where = where.astype(bool)
        # Each row's scored tokens first, in their order: [B, T] source position of each slot,
        # and the slot of each position (the inverse permutation, for the outputs).
        order = jnp.argsort(~where, axis=1, stable=True)
        inverse = jnp.argsort(order, axis=1)
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
        # Back to the token order; the unscored tokens' fill comes after.
        return jnp.take_along_axis(x, inverse, axis=1)

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
    spec = "...e,e...->..." if static.layout == "ev" else "...e,...e->..."
    z = jnp.einsum(spec, h, cols, preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + jnp.take(bias, y, mode="clip").astype(jnp.float32)
    if static.temperature != 1.0:
        z = z / static.temperature
    return z


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
    if not keep and static.vocab_blocks > 1:
        return _forward_blocked(static, h, w_c, bias_c, y, active)

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


def _strided_blocks(static: _Static, w_c, bias_c):
    """Views of the unembedding and bias for ``static.vocab_blocks`` (``nb``) strided blocks:
    ``(take, vb)``, ``take(j)`` giving block ``j``'s ``(W_j, bias_j or None, ids [Vb])`` (ids
    ``j, j + nb, j + 2 nb, ...``; ``W_j`` ``[E, Vb]`` or ``[Vb, E]``), ``vb = V / nb``. The
    ``[V, E]`` table is viewed as ``[V / nb, nb, E]`` (``[E, V]`` as ``[E, V / nb, nb]``) and
    indexed on its ``nb`` axis: a vocabulary sharded over devices stays sharded on the
    ``V / nb`` axis, and the loop's dynamic index is on an unsharded one."""
    nb, ev = static.vocab_blocks, static.layout == "ev"
    e, v = w_c.shape if ev else w_c.shape[::-1]
    vb = v // nb
    axis = 2 if ev else 1
    w3 = w_c.reshape((e, vb, nb) if ev else (vb, nb, e))
    bias2 = None if bias_c is None else bias_c.reshape(vb, nb)

    def take(j):
        w_j = jax.lax.dynamic_index_in_dim(w3, j, axis, keepdims=False)
        bias_j = None if bias2 is None else jax.lax.dynamic_index_in_dim(bias2, j, 1,
                                                                         keepdims=False)
        return w_j, bias_j, jax.lax.broadcasted_iota(jnp.int32, (vb,), 0) * nb + j

    return take, vb


def _forward_blocked(static: _Static, h, w_c, bias_c, y, active):
    """:func:`_forward` (without ``keep``) over ``static.vocab_blocks`` strided vocabulary
    blocks: an online log-sum-exp. Per token it carries the running max ``m``, ``s = sum e``
    and ``u = sum e (z - m)`` over the blocks seen (``e = exp(z - m)``; both rescaled when
    ``m`` grows), and for the argmax the best logit and its id (the smaller id on ties, as
    ``argmax`` takes the first); then ``lse = m + log s`` and ``entropy = log s - u / s``
    (``-sum p log p`` with ``log p = z - m - log s``, no cancellation against ``lse``). Only
    ``[B, c, V / nb]`` blocks of logits exist."""
    take, vb = _strided_blocks(static, w_c, bias_c)
    n, b, c, _ = h.shape
    v = vb * static.vocab_blocks

    def block_stats(h_c, stats, w_j, bias_j, j):
        z = _chunk_logits(static, h_c, w_j, bias_j)  # [B, c, Vb]
        m_old = stats["m"]
        m = jnp.maximum(m_old, jnp.max(z, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        scale = jnp.exp(m_old - m_safe)  # 0 where nothing was seen yet (m_old = -inf)
        e = jnp.exp(z - m_safe[..., None])
        out = {"m": m, "s": stats["s"] * scale + jnp.sum(e, axis=-1)}
        if static.with_entropy:
            shift = jnp.where(jnp.isfinite(m_old), m_old - m_safe, 0.0)
            u_old = scale * (stats["u"] + stats["s"] * shift)
            out["u"] = u_old + jnp.sum(jnp.where(e > 0, e * (z - m_safe[..., None]), 0.0),
                                       axis=-1)
        if static.with_argmax:
            i = jnp.argmax(z, axis=-1).astype(jnp.int32)
            best = jnp.max(z, axis=-1)
            token = i * static.vocab_blocks + j  # block j's i-th id
            better = (best > stats["best"]) | ((best == stats["best"]) & (token < stats["id"]))
            out["best"] = jnp.where(better, best, stats["best"])
            out["id"] = jnp.where(better, token, stats["id"])
        return out

    def block(j, stats):
        w_j, bias_j, _ = take(j)

        def run(h_c, stats_c):
            return block_stats(h_c, stats_c, w_j, bias_j, j)

        def body(_, xs):
            if "active" not in xs:
                return None, run(xs["h"], xs["stats"])
            return None, jax.lax.cond(xs["active"], run, lambda _, st: st, xs["h"], xs["stats"])

        xs = {"h": h, "stats": stats}
        if active is not None:
            xs["active"] = active
        return jax.lax.scan(body, None, xs)[1]

    shape = (n, b, c)
    init = {"m": jnp.full(shape, -jnp.inf, jnp.float32), "s": jnp.zeros(shape, jnp.float32)}
    if static.with_entropy:
        init["u"] = jnp.zeros(shape, jnp.float32)
    if static.with_argmax:
        init.update(best=jnp.full(shape, -jnp.inf, jnp.float32),
                    id=jnp.full(shape, v, jnp.int32))
    stats = jax.lax.fori_loop(0, static.vocab_blocks, block, init)
    m = jnp.where(jnp.isfinite(stats["m"]), stats["m"], 0.0)
    log_s = jnp.log(stats["s"])
    lse = m + log_s
    # The target logits of all chunks at once: one gather of the targets' columns.
    picked = _target_logit(static, h, w_c, bias_c, y)
    out = {"logps": jnp.minimum(picked - lse, 0.0), "lse": lse}
    if static.with_entropy:
        out["entropy"] = log_s - stats["u"] / stats["s"]
    if static.with_argmax:
        out["argmax"] = stats["id"]
    if active is not None:  # skipped chunks give zeros, as the single pass's skipped chunks do
        on = active[:, None, None]
        out = {k: jnp.where(on, x, jnp.zeros_like(x)) for k, x in out.items()}
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
    ``"bcv,bce->ve"`` einsum made XLA transpose every ``[B, c, V]`` block on CPU instead.
    """
    if layout == "ev":
        return dw + jnp.einsum("bce,bcv->ev", h, dz, preferred_element_type=jnp.float32)
    e, v = h.shape[-1], dz.shape[-1]
    return dw + jax.lax.dot_general(dz.reshape(-1, v), h.reshape(-1, e), (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)


def _default_vocab_blocks(v: int) -> int:
    """The number of strided vocabulary blocks :func:`fused_token_logps` splits its passes into
    when ``vocab_blocks`` is None: the smallest divisor of ``V`` from 16 to 64 (or else the
    largest from 2 to 15) that leaves blocks of at least 512 vocabulary rows, a multiple of 8
    (so that a vocabulary sharded over up to 8 devices splits every block evenly: a block
    ``V / nb`` that the shards do not divide makes GSPMD gather the table); 1 (no split) when
    there is none. Qwen2's 151,936 gives 16 blocks of 9,496 rows, Llama 3's 128,256 16 of 8,016,
    Llama 2's 32,000 16 of 2,000; GPT-2's 50,257 (odd, which no even device count shards) 1."""
    divisors = [d for d in range(2, 65) if v % d == 0 and v // d >= 512 and (v // d) % 8 == 0]
    large = [d for d in divisors if d >= 16]
    return large[0] if large else (divisors[-1] if divisors else 1)


def _head_grads(static: _Static, h_dtype, w_c, bias_c, ids, xs, use_entropy: bool):
    """One pass of the head's backward over the time chunks, for the vocabulary columns ``ids``
    ``[Vb]`` of the logits whose weights are ``w_c`` (``[E, Vb]`` or ``[Vb, E]``) and bias
    ``bias_c`` ``[Vb]``: returns the float32 ``(dW [E, Vb] or [Vb, E], dbias [Vb] or None,
    dh [n, B, c, E])``, ``dh`` being this block's share (``dz_block W_block^T / tau``). ``xs``
    holds the per-chunk residuals (``h``, ``y``, ``lse``, ``g``; ``active``, ``entropy``,
    ``g_entropy`` and the kept ``probs``/``inv_sum`` or ``logits`` where present); ``lse``
    makes the block's ``dz`` independent of the other blocks."""
    spec_h = "bcv,ev->bce" if static.layout == "ev" else "bcv,ve->bce"

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
        # The target is found by comparing ids (an iota, no gather: a vocabulary sharded over
        # devices stays sharded).
        dz = jnp.where(ids == y_c[..., None], g, 0.0) - p * g
        if use_entropy:
            ent_c, ge_c = xs["entropy"], xs["g_entropy"]
            ge = ge_c.astype(jnp.float32)[..., None]
            dz = dz - ge * jnp.where(p > 0, p * (logp + ent_c[..., None]), 0.0)
        if static.temperature != 1.0:
            dz = dz / static.temperature
        dz_c = dz.astype(h_dtype)
        dh = jnp.einsum(spec_h, dz_c, w_c, preferred_element_type=jnp.float32)
        dw = _add_head_grad(static.layout, dw, h_c, dz_c)
        if dbias is not None:
            dbias = dbias + jnp.sum(dz, axis=(0, 1))
        return (dw, dbias), dh

    def skip(carry, xs):
        return carry, jnp.zeros(xs["h"].shape, jnp.float32)

    def body(carry, xs):
        if "active" not in xs:
            return chunk_grads(carry, xs)
        xs = dict(xs)
        return jax.lax.cond(xs.pop("active"), chunk_grads, skip, carry, xs)

    init = (jnp.zeros(w_c.shape, jnp.float32),
            None if bias_c is None else jnp.zeros(ids.shape, jnp.float32))
    (dw, dbias), dh = jax.lax.scan(body, init, xs)
    return dw, dbias, dh


def _fused_bwd(static: _Static, residuals, cotangents):
    """The head's backward. With the logits kept, one pass over the chunks. Otherwise the
    vocabulary is cut into ``nb = static.vocab_blocks`` **strided** blocks (block ``j`` holds
    the ids ``j, j + nb, j + 2 nb, ...``: the ``[V, E]`` table viewed as ``[V / nb, nb, E]``
    and indexed on its ``nb`` axis, or ``[E, V]`` as ``[E, V / nb, nb]``), each block running
    its own pass over the chunks (recomputed logits, ``dz``, ``dh`` and ``dW`` of its columns)
    and writing its ``dW`` into a ``[V / nb, nb, E]`` (``[E, V / nb, nb]``) float32 buffer in
    place (``dynamic_update_slice`` in a loop carry), whose reshape to ``[V, E]`` (``[E, V]``)
    is free. So the backward holds one ``[V, E]`` float32 array and a few ``[V / nb, E]`` and
    ``[B, c, V / nb]`` blocks, where a single pass holds the ``[V, E]`` accumulator and each
    chunk's ``[V, E]`` product beside it (XLA's CPU dot does not accumulate into its output).
    Strided, not contiguous, blocks: a vocabulary sharded over devices splits into a sharded
    ``V / nb`` axis and the unsharded ``nb`` axis that the loop slices, so nothing is gathered
    (a dynamic slice of contiguous rows of a sharded axis makes GSPMD gather it)."""
    h, w, bias, y, active, lse, entropy, kept = residuals
    g_logps, g_entropy, _ = cotangents
    w_c, bias_c = _compute_operands(h, w, bias)
    use_entropy = static.with_entropy and g_entropy is not None
    xs = {"h": h, "y": y, "lse": lse, "g": g_logps}
    if active is not None:
        xs["active"] = active
    if use_entropy:
        xs.update(entropy=entropy, g_entropy=g_entropy)
    xs.update(kept)
    ev = static.layout == "ev"
    v = w.shape[1] if ev else w.shape[0]
    nb = 1 if kept else static.vocab_blocks
    if nb == 1:
        dw, dbias, dh = _head_grads(static, h.dtype, w_c, bias_c, jnp.arange(v, dtype=jnp.int32),
                                    xs, use_entropy)
    else:
        take, vb = _strided_blocks(static, w_c, bias_c)
        axis = 2 if ev else 1  # the nb axis of the [E, V / nb, nb] or [V / nb, nb, E] views
        e = h.shape[-1]
        w3_shape = (e, vb, nb) if ev else (vb, nb, e)

        def block(j, carry):
            dw3, dbias2, dh = carry
            w_j, bias_j, ids = take(j)
            dw_j, db_j, dh_j = _head_grads(static, h.dtype, w_j, bias_j, ids, xs, use_entropy)
            dw3 = jax.lax.dynamic_update_index_in_dim(dw3, dw_j, j, axis)
            if dbias2 is not None:
                dbias2 = jax.lax.dynamic_update_index_in_dim(dbias2, db_j, j, 1)
            return dw3, dbias2, dh + dh_j

        init = (jnp.zeros(w3_shape, jnp.float32),
                None if bias is None else jnp.zeros((vb, nb), jnp.float32),
                jnp.zeros(h.shape, jnp.float32))
        dw3, dbias2, dh = jax.lax.fori_loop(0, nb, block, init)
        dw = dw3.reshape(w.shape)
        dbias = None if dbias2 is None else dbias2.reshape(v)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dh.astype(h.dtype), dw.astype(w.dtype), dbias, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
