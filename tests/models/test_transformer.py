"""Decoder forward, masks/positions/segments, the KV cache, stacking, remat and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import CausalLM, KVCache, ModelConfig, default_positions
from rlhf_jax.models.layers import LoRAParam, attention_weights_mask, dot_product_attention
from rlhf_jax.models.lora import apply_lora

CONFIGS = {"gpt2": ModelConfig.tiny_gpt2(), "llama": ModelConfig.tiny_llama()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return CausalLM(CONFIGS[request.param], rngs=nnx.Rngs(0))


def _left_padded(vocab, b=3, t=9, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for i in range(b):
        mask[i, : 2 * i] = 0
    ids[mask == 0] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


class TestPositions:
    def test_cumsum_minus_one_clipped(self):
        mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
        np.testing.assert_array_equal(default_positions(mask),
                                      [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])

    def test_segments_restart(self):
        seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
        np.testing.assert_array_equal(default_positions(seg > 0, seg),
                                      [[0, 1, 2, 0, 1, 0, 0, 0]])


class TestAttention:
    def test_matches_float64_reference_with_gqa(self):
        rng = np.random.default_rng(1)
        b, t, s, h, k, d = 2, 3, 5, 4, 2, 8
        q, kk, v = rng.normal(size=(b, t, h, d)), rng.normal(size=(b, s, k, d)), \
            rng.normal(size=(b, s, k, d))
        mask = rng.random((b, t, s)) > 0.3
        mask[..., 0] = True
        out = dot_product_attention(*(jnp.asarray(x, jnp.float32) for x in (q, kk, v)),
                                    jnp.asarray(mask), scale=d ** -0.5)
        ref = np.zeros((b, t, h, d))
        for bi in range(b):
            for hi in range(h):
                kv = hi // (h // k)
                scores = q[bi, :, hi] @ kk[bi, :, kv].T * d ** -0.5
                scores = np.where(mask[bi], scores, -np.inf)
                p = np.exp(scores - scores.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                ref[bi, :, hi] = p @ v[bi, :, kv]
        np.testing.assert_allclose(out, ref, atol=1e-5)

    def test_mask_by_hand(self):
        mask = attention_weights_mask(jnp.array([[0, 1, 2]]), jnp.arange(3),
                                      jnp.array([[0, 1, 1]]), jnp.array([[1, 1, 2]]),
                                      jnp.array([[1, 1, 2]]))
        np.testing.assert_array_equal(mask[0], [[0, 0, 0], [0, 1, 0], [0, 0, 1]])


class TestForward:
    def test_shapes_and_float32_logits(self, model, run):
        ids, mask = _left_padded(model.config.vocab_size)
        logits = run(model, ids, mask)
        assert logits.shape == ids.shape + (model.config.vocab_size,)
        assert logits.dtype == jnp.float32
        assert np.isfinite(np.asarray(logits)).all()

    def test_left_padding_equals_unpadded_rows(self, model, run):
        ids, mask = _left_padded(model.config.vocab_size)
        logits = run(model, ids, mask)
        start = 4  # the last row has 4 padding tokens
        alone = run(model, ids[2:, start:])
        np.testing.assert_allclose(logits[2, start:], alone[0], atol=1e-5)
        # Rows are independent: the other rows are not affected by the padded one.
        np.testing.assert_allclose(logits[:2], run(model, ids[:2], mask[:2]), atol=1e-5)

    def test_packed_segments_equal_separate_sequences(self, model, run):
        ids, _ = _left_padded(model.config.vocab_size, b=1, t=10, seed=3)
        seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
        packed = run(model, ids, segment_ids=seg)
        alone = run(model, jnp.concatenate([ids[:, :4], ids[:, 4:8]], axis=0))
        np.testing.assert_allclose(packed[0, :4], alone[0], atol=1e-5)
        np.testing.assert_allclose(packed[0, 4:8], alone[1], atol=1e-5)

    def test_padded_tokens_get_zero_gradient(self, model):
        """Token 0 appears only on padding: its embedding row gets exactly zero gradient from
        a loss on the real positions (class 0 is left out so a tied head does not read it)."""
        ids, mask = _left_padded(model.config.vocab_size)
        assert 0 not in set(np.asarray(ids)[np.asarray(mask) > 0].tolist())
        graphdef, emb, rest = nnx.split(model, nnx.PathContains("embed"), ...)

        def loss(emb):
            logits = nnx.merge(graphdef, emb, rest)(ids, mask)[..., 1:]
            return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2)

        grad = jax.jit(jax.grad(loss))(emb)["backbone"]["embed"]["embedding"][...]
        assert float(jnp.abs(grad[0]).max()) == 0.0
        assert float(jnp.abs(grad[np.asarray(ids[mask > 0])]).min(axis=-1).max()) > 0.0
        assert np.isfinite(np.asarray(grad)).all()

    def test_bfloat16_compute_keeps_float32_logits(self, run):
        config = CONFIGS["llama"].replace(dtype="bfloat16")
        lo = CausalLM(config, rngs=nnx.Rngs(0))
        hi = CausalLM(CONFIGS["llama"], rngs=nnx.Rngs(0))
        ids, mask = _left_padded(config.vocab_size)
        a, b = run(lo, ids, mask), run(hi, ids, mask)
        assert a.dtype == jnp.float32
        assert lo.backbone.layers.attn.q.kernel[...].dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=5e-2)

    def test_bfloat16_params(self, run):
        config = CONFIGS["gpt2"].replace(param_dtype="bfloat16")
        m = CausalLM(config, rngs=nnx.Rngs(0))
        assert m.backbone.layers.mlp.up.kernel[...].dtype == jnp.bfloat16
        ids, mask = _left_padded(config.vocab_size)
        assert run(m, ids, mask).dtype == jnp.float32


class TestStacking:
    def test_layers_are_stacked_and_scanned(self):
        def jaxpr_size(num_layers):
            config = ModelConfig.tiny_llama(num_layers=num_layers)
            m = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
            graphdef, state = nnx.split(m)
            ids = jnp.zeros((1, 4), jnp.int32)
            jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state)
            assert m.backbone.layers.attn.q.kernel.shape[0] == num_layers
            return len(jaxpr.jaxpr.eqns), str(jaxpr)

        (n2, text), (n6, _) = jaxpr_size(2), jaxpr_size(6)
        assert n2 == n6
        assert "scan" in text

    def test_unrolled_and_remat_give_same_values_and_grads(self):
        base = CONFIGS["llama"]
        ids, mask = _left_padded(base.vocab_size)
        outs = []
        assert base.remat == "dots"  # the default
        for config in (base.replace(remat="none"), base,
                       base.replace(scan_layers=False, remat="dots"),
                       base.replace(remat="full")):
            m = CausalLM(config, rngs=nnx.Rngs(0))
            graphdef, params = nnx.split(m)

            def loss(p, graphdef=graphdef):
                return jnp.mean(nnx.merge(graphdef, p)(ids, mask) ** 2)

            outs.append(jax.jit(jax.value_and_grad(loss))(params))
        (va, ga) = outs[0]
        for vb, gb in outs[1:]:
            np.testing.assert_allclose(va, vb, rtol=1e-5)
            for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
                np.testing.assert_allclose(x, y, atol=1e-6)


class TestKVCache:
    def test_cached_decode_equals_full_forward(self, model, run):
        ids, mask = _left_padded(model.config.vocab_size, t=9)
        b, t = ids.shape
        full = run(model, ids, mask)
        positions = default_positions(mask)
        cache = model.init_cache(b, t + 3)
        assert isinstance(cache, KVCache)
        cache_mask = jnp.concatenate([mask, jnp.zeros((b, 3), jnp.int32)], axis=1)
        prompt = 5
        logits, cache = run(model, ids[:, :prompt], positions=positions[:, :prompt],
                            cache=cache, cache_mask=cache_mask, method="decode")
        steps = [logits]
        for i in range(prompt, t, 2):  # chunks of 2 then 2
            logits, cache = run(model, ids[:, i : i + 2], positions=positions[:, i : i + 2],
                                cache=cache, cache_mask=cache_mask, method="decode")
            steps.append(logits)
        decoded = jnp.concatenate(steps, axis=1)
        assert int(cache.index) == t
        real = np.asarray(mask)[..., None] > 0
        np.testing.assert_allclose(np.where(real, decoded, 0), np.where(real, full, 0),
                                   atol=1e-5)

    def test_decode_loop_in_jit_and_while_loop(self, model, run):
        """Greedy decoding inside `jax.jit` + `lax.while_loop` via nnx.split/merge equals
        re-running the full forward on the growing sequence."""
        ids, mask = _left_padded(model.config.vocab_size, b=2, t=4)
        b, p = ids.shape
        n_new = 3
        graphdef, state = nnx.split(model)

        @jax.jit
        def generate(state, ids, mask):
            m = nnx.merge(graphdef, state)
            cache = m.init_cache(b, p + n_new)
            cache_mask = jnp.concatenate([mask, jnp.ones((b, n_new), jnp.int32)], axis=1)
            positions = default_positions(mask)
            logits, cache = m.decode(ids, positions=positions, cache=cache,
                                     cache_mask=cache_mask)
            tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            out = jnp.zeros((b, n_new), jnp.int32).at[:, 0].set(tok)

            def body(carry):
                i, tok, cache, out = carry
                pos = (positions[:, -1] + i)[:, None]
                logits, cache = nnx.merge(graphdef, state).decode(
                    tok[:, None], positions=pos, cache=cache, cache_mask=cache_mask)
                tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
                return i + 1, tok, cache, out.at[:, i].set(tok)

            _, _, _, out = jax.lax.while_loop(lambda c: c[0] < n_new, body,
                                              (jnp.int32(1), tok, cache, out))
            return out

        out = generate(state, ids, mask)
        seq, seq_mask = ids, mask
        for i in range(n_new):
            tok = jnp.argmax(run(model, seq, seq_mask)[:, -1], -1).astype(jnp.int32)
            np.testing.assert_array_equal(out[:, i], tok)
            seq = jnp.concatenate([seq, tok[:, None]], 1)
            seq_mask = jnp.concatenate([seq_mask, jnp.ones((b, 1), jnp.int32)], 1)

    def test_decode_with_presliced_blocks_equals_plain_decode(self, model):
        ids, mask = _left_padded(model.config.vocab_size, b=2, t=6)
        cache_mask = jnp.concatenate([mask, jnp.ones((2, 2), jnp.int32)], axis=1)
        positions = default_positions(mask)
        blocks = model.layer_blocks()
        assert len(blocks) == model.config.num_layers
        outs = []
        for kw in ({}, {"blocks": blocks}):
            cache = model.init_cache(2, 8)
            logits, cache = model.decode(ids, positions=positions, cache=cache,
                                         cache_mask=cache_mask, **kw)
            outs.append((logits, cache))
        np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="blocks were given"):
            model.decode(ids, positions=positions, cache=model.init_cache(2, 8),
                         cache_mask=cache_mask, blocks=blocks[:1])

    @pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
    def test_fused_qkv_blocks_match_separate_projections(self, name):
        # GPT-2 (q/k/v biases, MHA), Llama (GQA, RoPE, no bias), Qwen2 (GQA, RoPE, q/k/v bias).
        config = {"gpt2": ModelConfig.tiny_gpt2(), "llama": ModelConfig.tiny_llama(),
                  "qwen2": ModelConfig.tiny_qwen2()}[name]
        model = CausalLM(config, rngs=nnx.Rngs(3))
        ids, mask = _left_padded(config.vocab_size, b=2, t=5, seed=4)
        cache_mask = jnp.concatenate([mask, jnp.ones((2, 3), jnp.int32)], axis=1)
        positions = default_positions(mask)
        fused = model.layer_blocks()
        plain = model.layer_blocks(fuse_qkv=False)
        assert all(b.attn.fused_qkv is not None for b in fused)
        assert all(b.attn.fused_qkv is None for b in plain)
        h, k, d = config.num_heads, config.num_kv_heads, config.resolved_head_dim
        kernel, bias = fused[0].attn.fused_qkv
        assert kernel.shape == (config.hidden_size, (h + 2 * k) * d)
        assert (bias is not None) == config.qkv_bias
        outs = []
        for blocks in (plain, fused):
            cache = model.init_cache(2, 8)
            logits, cache = model.decode(ids, positions=positions, cache=cache,
                                         cache_mask=cache_mask, blocks=blocks)
            step, cache = model.decode(ids[:, :1], positions=positions[:, -1:] + 1, cache=cache,
                                       cache_mask=cache_mask, blocks=blocks)
            outs.append((logits, step, cache))
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def test_fused_qkv_folds_lora_adapters_in(self, model):
        lora_model = nnx.clone(model)
        apply_lora(lora_model, rank=2, targets=("q", "k", "v"), rngs=nnx.Rngs(1))
        # Non-zero B so that the adapters change the output.
        for path, var in nnx.iter_graph(lora_model):
            if isinstance(var, LoRAParam) and path[-1] == "lora_b":
                var[...] = 0.3 * jax.random.normal(jax.random.key(len(path)), var.shape)
        ids, mask = _left_padded(model.config.vocab_size, b=2, t=5, seed=2)
        cache_mask = jnp.concatenate([mask, jnp.ones((2, 1), jnp.int32)], axis=1)
        positions = default_positions(mask)
        outs = []
        for fuse in (False, True):
            logits, _ = lora_model.decode(ids, positions=positions,
                                          cache=lora_model.init_cache(2, 6),
                                          cache_mask=cache_mask,
                                          blocks=lora_model.layer_blocks(fuse_qkv=fuse))
            outs.append(logits)
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        plain, _ = model.decode(ids, positions=positions, cache=model.init_cache(2, 6),
                                cache_mask=cache_mask)
        assert float(jnp.max(jnp.abs(plain - outs[1]))) > 1e-3  # the adapters are in effect

    def test_bad_shapes_are_named(self, model):
        cache = model.init_cache(2, 8)
        ids = jnp.zeros((2, 1), jnp.int32)
        with pytest.raises(ValueError, match="cache_mask"):
            model.decode(ids, positions=jnp.zeros((2, 1), jnp.int32), cache=cache,
                         cache_mask=jnp.ones((2, 7), jnp.int32))
        with pytest.raises(ValueError, match="positions"):
            model.decode(ids, positions=jnp.zeros((2, 2), jnp.int32), cache=cache,
                         cache_mask=jnp.ones((2, 8), jnp.int32))
        with pytest.raises(ValueError, match="input_ids"):
            model(jnp.zeros((4,), jnp.int32))
