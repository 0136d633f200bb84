"""CausalLM.token_logps (the fused, chunked LM head) against the unfused path through the full
logits (`rlhf_jax.train.logprobs.aligned_token_logps`): values and gradients for tied and untied
heads, left-padded, packed and prefix-shared rows, LoRA, a temperature and a start offset, a
vocabulary sharded over `tensor` on 8 devices, and compiled memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.data import TokenizedPreference, TokenizedSFT, collate_prefix_shared, pack_sft
from rlhf_jax.losses import entropy_from_logits, masked_sum, token_logps
from rlhf_jax.models import CausalLM, LoRAParam, ModelConfig, apply_lora, scoring_states
from rlhf_jax.train.logprobs import aligned_token_logps

# Chunks of 5 positions: rows of 16 tokens run 4 balanced chunks (one partly padded).
CONFIGS = {
    "gpt2_tied": ModelConfig.tiny_gpt2(logits_chunk_size=5),
    "llama_untied": ModelConfig.tiny_llama(logits_chunk_size=5),
    "qwen2_tied": ModelConfig.tiny_qwen2(logits_chunk_size=5),
}


def _model(name):
    return CausalLM(CONFIGS[name], rngs=nnx.Rngs(0))


def _left_padded(vocab, b=3, t=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for i in range(b):
        mask[i, : 3 * i] = 0
    ids[mask == 0] = 0
    return ids, mask


def _right_padded(seqs, t=16):
    """`(ids, mask)` `[n, t]` of separate sequences, each in its own row."""
    ids = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def _unfused(model, ids, kwargs, *, start=0, temperature=1.0):
    """The trainers' path through the full logits, aligned, from token `start` on:
    `(logps, entropy, argmax)` of the distribution that scores each token."""
    logits = model(ids, **kwargs) / temperature
    lp = aligned_token_logps(logits, ids, kwargs.get("segment_ids"), kwargs.get("branch_ids"))
    ent = jnp.pad(entropy_from_logits(logits[:, :-1]), ((0, 0), (1, 0)))
    arg = jnp.pad(jnp.argmax(logits[:, :-1], -1), ((0, 0), (1, 0)), constant_values=-1)
    return lp[:, start:], ent[:, start:], arg[:, start:]


def _jit_apply(model, fn, *args):
    """`fn(model, *args)` under one `jax.jit` (one compile per test)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))(state, *args)


def _loss_grads(model, ids, kwargs, loss_mask, *, chunk_size=None, wrt=nnx.Param):
    """`jax.grad` of `sum(logps + 0.1 entropy)` over `loss_mask` w.r.t. the `wrt` variables, in
    the traced caller; fused, or not with `chunk_size=0`."""
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def loss(params):
        out = nnx.merge(graphdef, params, rest).token_logps(
            ids, **kwargs, with_entropy=True, chunk_size=chunk_size)
        return masked_sum(out.logps + 0.1 * out.entropy, loss_mask)

    return jax.grad(loss)(params)


def _assert_trees_close(a, b, **tol):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, **tol)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_values_and_gradients_equal_unfused(name):
    """Left-padded rows: log-probs, entropies, argmax and every parameter gradient equal the
    unfused path's (through `model(...)` logits and through `chunk_size=0`). The untied Llama
    carries LoRA adapters on every projection (with non-zero values, so that the adapters'
    gradients are not trivially the base ones)."""
    model = _model(name)
    if name == "llama_untied":
        apply_lora(model, rank=4, targets="all", rngs=nnx.Rngs(1))
        # LoRA adapts the projections inside the layers only: the head stays a plain matrix.
        assert model.lm_head.lora_scale is None
        for _, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
            var[...] = 0.05 * jnp.ones_like(var[...])
    ids, mask = _left_padded(model.config.vocab_size)
    loss_mask = mask.copy()
    loss_mask[:, :5] = 0
    kwargs = {"attention_mask": mask}

    def run(m, ids, mask, loss_mask):
        fused = m.token_logps(ids, mask, with_entropy=True, with_argmax=True)
        switch = m.token_logps(ids, mask, with_entropy=True, with_argmax=True, chunk_size=0)
        grads = (_loss_grads(m, ids, kwargs, loss_mask),
                 _loss_grads(m, ids, kwargs, loss_mask, chunk_size=0))
        return fused, switch, _unfused(m, ids, {"attention_mask": mask}), grads

    fused, switch, (lp, ent, arg), (g_fused, g_plain) = _jit_apply(model, run, ids, mask,
                                                                     loss_mask)
    assert fused.logps.shape == (3, 16) and fused.logps.dtype == jnp.float32
    np.testing.assert_allclose(fused.logps, lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.entropy, ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fused.argmax, arg)
    for a, b in zip(fused, switch):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Position 0 has no context: log-prob 0, entropy 0, argmax -1.
    np.testing.assert_array_equal(fused.logps[:, 0], 0.0)
    np.testing.assert_array_equal(fused.entropy[:, 0], 0.0)
    _assert_trees_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)


def _scores_grads_jaxpr(config, ids, mask, *, start=0, where=None):
    """`(token_logps output, gradients, jaxpr)` of a jitted `masked_sum(logps + 0.1 entropy)`
    over the real tokens from `start` on, for a fresh `CausalLM(config)` (seed 0)."""
    graphdef, params = nnx.split(CausalLM(config, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params, ids, mask):
        out = nnx.merge(graphdef, params).token_logps(ids, mask, start=start, with_entropy=True,
                                                      where=where)
        return masked_sum(out.logps + 0.1 * out.entropy, mask[:, start:]), out

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, out), grads = fn(params, ids, mask)
    return out, grads, str(jax.make_jaxpr(fn)(params, ids, mask))


@pytest.mark.parametrize("start", [0, 6])
def test_logits_within_the_keep_budget_give_the_same_values_and_gradients(start):
    """`logits_keep_bytes`: a call whose float32 logits fit the budget runs the head as one
    chunk with the logits kept for the backward pass (no recomputed product); one byte below,
    the chunked head runs as before. Same log-probs, entropies and gradients either way."""
    base = CONFIGS["qwen2_tied"]
    ids, mask = _left_padded(base.vocab_size)
    b, t = ids.shape
    logits_bytes = 4 * b * (t - start) * base.vocab_size
    kwargs = {"attention_mask": mask}

    def run(config):
        return _scores_grads_jaxpr(config, ids, mask, start=start)

    kept, kept_grads, kept_jaxpr = run(base.replace(logits_keep_bytes=logits_bytes))
    chunked, chunked_grads, chunked_jaxpr = run(base.replace(logits_keep_bytes=logits_bytes - 1))
    # Kept: one chunk of all the scored positions; chunked: the config's balanced chunks of at
    # most 5 positions, and no logits kept.
    kept_shape = f"[1,{b},{t - start},{base.vocab_size}]"
    n_chunks = -(-(t - start) // 5)
    assert kept_shape in kept_jaxpr and kept_shape not in chunked_jaxpr
    assert f"[{b},{-(-(t - start) // n_chunks)},{base.vocab_size}]" in chunked_jaxpr
    lp, ent, _ = _unfused(CausalLM(base, rngs=nnx.Rngs(0)), ids, kwargs, start=start)
    for out in (kept, chunked):
        np.testing.assert_allclose(out.logps, lp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.entropy, ent, rtol=1e-5, atol=1e-5)
    _assert_trees_close(kept_grads, chunked_grads, rtol=1e-4, atol=1e-6)


def test_kept_logits_with_a_scoring_mask_stay_in_chunks():
    """With `where` and logits within the keep budget, the kept logits are held per chunk (so
    the chunks with nothing to score are still skipped) and the values and gradients equal the
    chunked head's without the budget."""
    base = CONFIGS["qwen2_tied"]
    ids, mask = _left_padded(base.vocab_size)
    b, t = ids.shape
    where = np.asarray(mask, bool) & (np.arange(t) >= 3)

    def run(config):
        return _scores_grads_jaxpr(config, ids, mask, where=where)

    kept, kept_grads, kept_jaxpr = run(base.replace(logits_keep_bytes=4 * b * t * base.vocab_size))
    chunked, chunked_grads, _ = run(base)
    n_chunks = -(-t // 5)
    assert f"[{n_chunks},{b},{-(-t // n_chunks)},{base.vocab_size}]" in kept_jaxpr
    assert f"[1,{b},{t},{base.vocab_size}]" not in kept_jaxpr
    np.testing.assert_allclose(kept.logps, chunked.logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept.entropy, chunked.entropy, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(kept.logps)[~where], 0.0)
    _assert_trees_close(kept_grads, chunked_grads, rtol=1e-4, atol=1e-6)


def test_packed_rows_equal_unfused_and_separate_rows():
    model = _model("llama_untied")
    rng = np.random.default_rng(2)
    seqs = [rng.integers(3, 256, size=n).astype(np.int32) for n in (5, 7, 9, 4)]
    batch = pack_sft([TokenizedSFT(s, np.ones_like(s), "t") for s in seqs], num_rows=2,
                     row_length=16, pad_id=0)
    kwargs = {k: batch[k] for k in ("attention_mask", "positions", "segment_ids")}
    own_ids, own_mask = _right_padded(seqs)

    def run(m, ids, kwargs, own_ids, own_mask):
        hidden = m.hidden_states(ids, **kwargs)
        g_hidden = jax.grad(lambda h: m.token_logps_from_hidden(
            h, ids, kwargs["segment_ids"], with_entropy=True).logps.sum())(hidden)
        return (m.token_logps(ids, **kwargs, with_entropy=True), _unfused(m, ids, kwargs),
                m.token_logps(own_ids, own_mask), g_hidden)

    fused, (lp, ent, _), own, g_hidden = _jit_apply(model, run, batch["input_ids"], kwargs,
                                                    own_ids, own_mask)
    np.testing.assert_allclose(fused.logps, lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.entropy, ent * (lp != 0), rtol=1e-5, atol=1e-5)
    # Each sequence scores as in its own row; a segment's first token has no context.
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(fused.logps[batch["sequence_ids"] == i + 1],
                                   own.logps[i, :len(s)], rtol=1e-4, atol=1e-5)
    starts = (batch["segment_ids"] > 0) & (batch["positions"] == 0)
    np.testing.assert_array_equal(fused.logps[starts], 0.0)
    np.testing.assert_array_equal(fused.entropy[starts], 0.0)
    # A state followed by a token without context (a new segment, or the padding after the
    # last one) scores nothing: exactly zero gradient.
    seg = batch["segment_ids"]
    scores_nothing = np.ones_like(seg, bool)
    scores_nothing[:, :-1] = seg[:, 1:] != seg[:, :-1]
    np.testing.assert_array_equal(g_hidden[scores_nothing], 0.0)
    assert np.all(np.abs(g_hidden[~scores_nothing]).sum(-1) > 0)


def test_prefix_shared_rows_equal_unfused_and_own_rows():
    model = _model("qwen2_tied")
    rng = np.random.default_rng(3)

    def ids(n):
        return rng.integers(3, 256, size=n).astype(np.int32)

    pairs = [TokenizedPreference(ids(4), ids(5), ids(3), 0.0, 1.0, "t"),
             TokenizedPreference(ids(6), ids(2), ids(6), 0.0, 1.0, "t"),
             TokenizedPreference(ids(0), ids(4), ids(4), 0.0, 1.0, "t")]
    batch = collate_prefix_shared(pairs, pad_id=0, length=16)
    kwargs = {k: batch[k] for k in ("attention_mask", "positions", "segment_ids", "branch_ids")}
    own_ids, own_mask = _right_padded([np.concatenate([p.prompt_ids, r]) for p in pairs
                                       for r in (p.chosen_ids, p.rejected_ids)])

    def run(m, ids, kwargs, own_ids, own_mask):
        return (m.token_logps(ids, **kwargs), _unfused(m, ids, kwargs),
                m.token_logps(own_ids, own_mask))

    fused, (lp, _, _), own = _jit_apply(model, run, batch["input_ids"], kwargs, own_ids,
                                        own_mask)
    np.testing.assert_allclose(fused.logps, lp, rtol=1e-5, atol=1e-5)
    # Each response scores as in its own `prompt | response` row (the rejected one's first
    # token from the prompt's last state; without a prompt it has no context).
    for row, pair in enumerate(pairs):
        p = len(pair.prompt_ids)
        for branch, response in ((1, pair.chosen_ids), (2, pair.rejected_ids)):
            got = fused.logps[row][batch["branch_ids"][row] == branch]
            np.testing.assert_allclose(got, own.logps[2 * row + branch - 1, p:p + len(response)],
                                       rtol=1e-4, atol=1e-5)


def test_start_and_temperature_give_the_online_trainers_response_logps():
    # The online trainers score a response as token_logps(logits[:, P-1:-1] / tau,
    # response_ids) (TRL's tempered log-probs); start=P gives exactly those [B, N].
    model = _model("gpt2_tied")
    ids, mask = _left_padded(256, seed=4)
    p, tau = 9, 0.7

    def run(m, ids, mask):
        logits = m(ids, mask) / tau
        expected = (token_logps(logits[:, p - 1:-1], ids[:, p:]),
                    entropy_from_logits(logits[:, p - 1:-1]))
        return m.token_logps(ids, mask, start=p, temperature=tau, with_entropy=True), expected

    fused, (lp, ent) = _jit_apply(model, run, ids, mask)
    assert fused.logps.shape == (3, 16 - p)
    np.testing.assert_allclose(fused.logps, lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.entropy, ent, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute():
    model = CausalLM(ModelConfig.tiny_qwen2(logits_chunk_size=5, dtype="bfloat16"),
                     rngs=nnx.Rngs(0))
    ids, mask = _left_padded(256, seed=5)

    def run(m, ids, mask):
        return (m.token_logps(ids, mask, with_entropy=True),
                m.token_logps(ids, mask, with_entropy=True, chunk_size=0))

    fused, plain = _jit_apply(model, run, ids, mask)
    assert fused.logps.dtype == fused.entropy.dtype == jnp.float32
    np.testing.assert_allclose(fused.logps, plain.logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.entropy, plain.entropy, rtol=1e-5, atol=1e-5)


def test_scoring_states_by_hand():
    hidden = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1)  # hidden[t] = t
    states, ctx = scoring_states(hidden)
    np.testing.assert_array_equal(states[0, :, 0], [0, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ctx[0], [False, True, True, True, True, True])
    # Packed: segments [1 1 2 2 2 0]; token 2 starts a segment.
    _, ctx = scoring_states(hidden, segment_ids=jnp.array([[1, 1, 2, 2, 2, 0]]))
    np.testing.assert_array_equal(ctx[0], [False, True, False, True, True, False])
    # Prefix-shared: prompt of 2, branch 1 = tokens 2-3, branch 2 = tokens 4-5. Token 4 (the
    # rejected response's first) is scored from hidden[1], the prompt's last state.
    branch = jnp.array([[0, 0, 1, 1, 2, 2]])
    states, ctx = scoring_states(hidden, branch_ids=branch)
    np.testing.assert_array_equal(states[0, :, 0], [0, 0, 1, 2, 1, 4])
    np.testing.assert_array_equal(ctx[0], [False, True, True, True, True, True])
    states, ctx = scoring_states(hidden, branch_ids=branch, start=3)
    np.testing.assert_array_equal(states[0, :, 0], [2, 1, 4])
    # Without a prompt, the second branch's first token has no context.
    _, ctx = scoring_states(hidden, branch_ids=jnp.array([[1, 1, 1, 2, 2, 0]]))
    np.testing.assert_array_equal(ctx[0], [False, True, True, False, True, True])


def test_vocab_sharded_over_tensor_equals_one_device():
    """data=2 x tensor=4: the batch over `data`, the tied embedding's vocabulary over `tensor`
    (`tests/losses/test_fused_logprobs.py` shards both layouts); values and gradients equal the
    single-device ones, and the table's gradient stays sharded."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=4))
    model = _model("qwen2_tied")
    ids, mask = _left_padded(256, b=4, seed=9)
    graphdef, state = nnx.split(model)

    def value_and_grad(state, ids, mask):
        def loss(state):
            out = nnx.merge(graphdef, state).token_logps(ids, mask, with_entropy=True)
            return masked_sum(out.logps + 0.1 * out.entropy, mask), out.logps

        return jax.value_and_grad(loss, has_aux=True)(state)

    step = jax.jit(value_and_grad)
    (ref_loss, ref_logps), ref_grads = step(state, ids, mask)
    batch = sharding.shard_batch({"ids": ids, "mask": mask}, mesh)
    (loss, logps), grads = step(sharding.shard_state(state, mesh), batch["ids"], batch["mask"])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(logps, ref_logps, rtol=1e-5, atol=1e-5)
    _assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert grads["backbone"]["embed"]["embedding"][...].sharding.spec[0] == "tensor"


@pytest.mark.slow  # the same check on the bare function runs in tests/losses/test_fused_logprobs.py
def test_compiled_memory_holds_chunks_not_the_logits():
    """Temp bytes of a jitted forward + backward through `token_logps`: the unfused path holds
    [B, T, V] float32 arrays, the fused one a few [B, chunk, V / 16] blocks."""
    b, t, v, chunk = 2, 256, 32768, 16
    config = ModelConfig.tiny_llama(vocab_size=v, max_position_embeddings=t, num_layers=1)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp_bytes(chunk_size):
        model = nnx.eval_shape(lambda: CausalLM(config.replace(logits_chunk_size=chunk_size),
                                                rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)

        def grads(state, ids):
            def loss(state):
                return nnx.merge(graphdef, state).token_logps(ids).logps.sum()

            return jax.grad(loss)(state)

        compiled = jax.jit(grads).lower(state, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits = b * t * v * 4
    unfused, fused = temp_bytes(0), temp_bytes(chunk)
    assert unfused >= logits
    assert fused < logits / 2 and unfused - fused >= logits
    # The head's share shrinks with the chunk: 4x the chunk costs at least 2 more blocks (of
    # [B, chunk, V / 16]: the head runs over 16 strided vocabulary blocks at this vocabulary).
    assert temp_bytes(4 * chunk) - fused >= 2 * b * chunk * (v // 16) * 4


def test_bad_arguments_are_named():
    model = _model("llama_untied")
    ids, mask = _left_padded(256)
    with pytest.raises(ValueError, match="start"):
        model.token_logps(ids, mask, start=16)
    with pytest.raises(ValueError, match="chunk_size"):
        model.token_logps(ids, mask, chunk_size=-1)
    with pytest.raises(ValueError, match="hidden"):
        model.token_logps_from_hidden(jnp.zeros((3, 15, 64)), ids)
    with pytest.raises(ValueError, match="logits_chunk_size"):
        ModelConfig.tiny_llama(logits_chunk_size=-1)
    with pytest.raises(ValueError, match="logits_keep_bytes"):
        ModelConfig.tiny_llama(logits_keep_bytes=-1)
