"""`blockwise_attention` (flash-style tiles, online softmax, custom VJP) against a float64 NumPy
reference for values and gradients over every mask the decoder builds (padding, causal, packed
segments, prefix-sharing branches, GQA), and a model switched to it (`attention_impl=
"blockwise"`) against the dense path: logits, a DPO step, remat policies, 8-device sharding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from rlhf_jax import sharding
from rlhf_jax.data import TokenizedPreference, collate_prefix_shared
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.models.blockwise_attention import blockwise_attention
from rlhf_jax.models.layers import attention_weights_mask
from rlhf_jax.train.builders import model_config
from rlhf_jax.train.config import FieldError, ModelSpec
from rlhf_jax.train.dpo import DPOHyperParams, PolicyAndReference, preference_loss


def _np_attention(q, k, v, mask, scale):
    """float64 reference: softmax over the visible keys, 0 for a fully masked row."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            j = hi // (h // kv)
            s = q[bi, :, hi] @ k[bi, :, j].T * scale
            s = np.where(mask[bi], s, -np.inf)
            top = np.max(s, -1, keepdims=True)
            p = np.where(mask[bi], np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
            den = p.sum(-1, keepdims=True)
            out[bi, :, hi] = np.where(den > 0, p / np.where(den > 0, den, 1.0), 0.0) @ v[bi, :, j]
    return out


def _np_mask(valid, seg=None, branch=None):
    """[B, T, T] bool: causal, key valid, same segment, key in the prefix or the same branch."""
    t = valid.shape[1]
    m = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :].astype(bool)
    if seg is not None:
        m &= seg[:, :, None] == seg[:, None, :]
    if branch is not None:
        m &= (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    return m


# Rows of T = 11 (not a multiple of any tile below): left padding (two fully masked queries),
# right padding, two packed segments, and a prefix-shared pair (prefix 4, branches of 4 and 3).
_VALID = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
_SEG = np.array([[1] * 11, [1] * 8 + [0] * 3, [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0], [1] * 11])
_BRANCH = np.array([[0] * 11, [0] * 11, [0] * 11, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
MASKS = {
    "causal": _np_mask(np.ones_like(_VALID)),
    "padding": _np_mask(_VALID),
    "segments": _np_mask(_VALID, _SEG),
    "branches": _np_mask(_VALID, _SEG, _BRANCH),
}


def _qkv(rng, *, b=4, t=11, h=4, kv=2, d=8, scale=1.0, dtype=np.float32):
    return tuple((scale * rng.normal(size=shape)).astype(dtype)
                 for shape in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d)))


class BlockwiseAttentionTest(chex.TestCase):
    @chex.variants(with_jit=True)
    def test_values_against_float64_for_every_mask_and_tiling(self):
        rng = np.random.default_rng(0)
        q, k, v = _qkv(rng)
        # Tiles that divide nothing (4 x 3), one tile (16 x 16), rows of one query, no skipping.
        tilings = ((4, 3, True), (16, 16, True), (1, 5, True), (4, 3, False))
        for (name, mask), (bq, bk, causal) in zip(MASKS.items(), tilings):
            fn = self.variant(lambda q, k, v, m, bq=bq, bk=bk, causal=causal:
                              blockwise_attention(q, k, v, m, scale=0.4, block_q=bq,
                                                  block_k=bk, causal=causal))
            got = fn(q, k, v, jnp.asarray(mask))
            np.testing.assert_allclose(got, _np_attention(q, k, v, mask, 0.4), atol=2e-6,
                                       err_msg=f"{name} {bq}x{bk}")

    def test_gradients_against_float64_and_check_grads(self):
        rng = np.random.default_rng(1)
        with jax.enable_x64(True):
            q, k, v = _qkv(rng, dtype=np.float64)
            mask = jnp.asarray(MASKS["branches"])
            live = jnp.asarray(MASKS["branches"].any(-1))[:, :, None, None]
            w = jnp.asarray(rng.normal(size=q.shape)) * live

            def blockwise(q, k, v):
                return jnp.sum(w * blockwise_attention(q, k, v, mask, scale=0.4, block_q=4,
                                                       block_k=3, causal=True))

            def reference(q, k, v):  # plain autodiff of the float64 dense softmax
                g = q.shape[2] // k.shape[2]
                kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
                s = jnp.einsum("bthd,bshd->bhts", q, kr) * 0.4
                s = jnp.where(mask[:, None], s, -jnp.inf)
                p = jax.nn.softmax(s, axis=-1)
                out = jnp.einsum("bhts,bshd->bthd", jnp.where(mask[:, None], p, 0.0), vr)
                return jnp.sum(w * jnp.where(live, out, 0.0))

            args = tuple(jnp.asarray(x) for x in (q, k, v))
            np.testing.assert_allclose(jax.jit(blockwise)(*args), reference(*args), rtol=1e-12)
            got = jax.jit(jax.grad(blockwise, argnums=(0, 1, 2)))(*args)
            want = jax.grad(reference, argnums=(0, 1, 2))(*args)
            for g_, w_ in zip(got, want):
                np.testing.assert_allclose(g_, w_, atol=1e-12)
            check_grads(jax.jit(blockwise), args, order=1, modes=["rev"])

    def test_fully_masked_rows_give_zero_output_and_zero_gradient(self):
        rng = np.random.default_rng(2)
        q, k, v = _qkv(rng)
        mask = jnp.asarray(MASKS["padding"])  # row 0: queries 0 and 1 see no key

        def f(q, k, v):
            out = blockwise_attention(q, k, v, mask, scale=0.4, block_q=4, block_k=4,
                                      causal=True)
            return jnp.sum(out ** 2), out

        (_, out), (dq, dk, dv) = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        np.testing.assert_array_equal(out[0, :2], 0.0)
        np.testing.assert_array_equal(dq[0, :2], 0.0)
        np.testing.assert_array_equal(dk[0, :2], 0.0)  # padding keys get no gradient
        for g in (dq, dk, dv):
            self.assertTrue(np.isfinite(np.asarray(g)).all())

    def test_extreme_logits(self):
        # Scores of +-1e4 (q and k scaled by 100): the online maximum keeps every exp <= 1.
        rng = np.random.default_rng(3)
        q, k, v = _qkv(rng, scale=1.0)
        q, k = 100 * q, 100 * k
        mask = MASKS["segments"]
        got = blockwise_attention(q, k, v, jnp.asarray(mask), scale=0.4, block_q=4, block_k=3,
                                  causal=True)
        np.testing.assert_allclose(got, _np_attention(q.astype(np.float64), k.astype(np.float64),
                                                      v, mask, 0.4), atol=1e-4)
        grads = jax.grad(lambda q: jnp.sum(blockwise_attention(
            q, k, v, jnp.asarray(mask), scale=0.4, block_q=4, block_k=3, causal=True)))(q)
        self.assertTrue(np.isfinite(np.asarray(grads)).all())

    def test_bad_arguments_name_what_is_wrong(self):
        q, k, v = _qkv(np.random.default_rng(4))
        mask = jnp.asarray(MASKS["causal"])
        with pytest.raises(ValueError, match="mask must be"):
            blockwise_attention(q, k, v, mask[:, :5], scale=1.0)
        with pytest.raises(ValueError, match="block_k"):
            blockwise_attention(q, k, v, mask, scale=1.0, block_k=0)
        with pytest.raises(ValueError, match="causal=True needs T == S"):
            blockwise_attention(q[:, :5], k, v, mask[:, :5], scale=1.0, causal=True)
        with pytest.raises(ValueError, match="K must divide H"):
            blockwise_attention(q[:, :, :3], k, v, mask, scale=1.0)


def test_the_reference_masks_are_the_decoders():
    # The decoder's own mask builder gives `_np_mask`, so the cases above are the real ones.
    slots = jnp.arange(11)
    got = attention_weights_mask(jnp.broadcast_to(slots, (4, 11)), slots, jnp.asarray(_VALID),
                                 jnp.asarray(_SEG), jnp.asarray(_SEG), jnp.asarray(_BRANCH),
                                 jnp.asarray(_BRANCH))
    np.testing.assert_array_equal(got, MASKS["branches"])


# ------------------------------------------------------------------------------- models
def _pair(preset, seed, **kw):
    """The same weights with the dense and with the blockwise attention (tiles of 4 x 3)."""
    dense = CausalLM(ModelConfig.preset(preset, attention_impl="dense", **kw),
                     rngs=nnx.Rngs(seed))
    blockwise = CausalLM(ModelConfig.preset(preset, attention_impl="blockwise",
                                            attention_block_q=4, attention_block_k=3, **kw),
                         rngs=nnx.Rngs(seed))
    return dense, blockwise


def _ids(rng, n, vocab=256):
    return rng.integers(3, vocab, size=n).astype(np.int32)


def _prefix_shared_batch(seed, length=15):
    rng = np.random.default_rng(seed)
    pairs = [TokenizedPreference(_ids(rng, 4), _ids(rng, 5), _ids(rng, 3), 0.0, 1.0, "t"),
             TokenizedPreference(_ids(rng, 2), _ids(rng, 6), _ids(rng, 4), 0.0, 1.0, "t")]
    return collate_prefix_shared(pairs, pad_id=0, length=length)


def _value_and_grad(model, loss_fn, batch, mesh=None):
    """`((loss, aux), grads w.r.t. the nnx.Param)` of `loss_fn(model, batch)` under jit, on
    one device or with the state and batch placed on `mesh`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, rest, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), batch)

    args = (params, rest, batch)
    if mesh is not None:
        args = (sharding.shard_state(params, mesh), sharding.shard_state(rest, mesh),
                sharding.shard_batch(batch, mesh))
    return jax.jit(jax.value_and_grad(f, has_aux=True))(*args)


def _assert_close(a, b, *, rtol, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _logits_loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"],
                   segment_ids=batch["segment_ids"])
    real = batch["attention_mask"][..., None] > 0
    return jnp.sum(jnp.where(real, logits, 0.0) ** 2) * 1e-3, logits


def _packed_batch():
    """Four rows of T = 13: full, two packed segments + padding, left-padded, right-padded."""
    rng = np.random.default_rng(5)
    seg = np.array([[1] * 13, [1] * 6 + [2] * 5 + [0] * 2, [0] * 3 + [1] * 10,
                    [1] * 9 + [0] * 4])
    return {"input_ids": rng.integers(3, 256, size=seg.shape).astype(np.int32),
            "attention_mask": (seg > 0).astype(np.int32), "segment_ids": seg}


@pytest.mark.parametrize("remat", ["dots", pytest.param("full", marks=pytest.mark.slow),
                                   pytest.param("none", marks=pytest.mark.slow)])
def test_model_logits_and_gradients_equal_the_dense_path(remat):
    """GQA 4/2 model on packed, left- and right-padded rows: the blockwise model on a
    data=2 x fsdp=2 x tensor=2 mesh gives the dense model's logits (on real tokens; a left-padded
    row's padding queries see no key: 0 there, the mean of v in the dense path) and gradients."""
    dense, blockwise = _pair("tiny_qwen2", 0, remat=remat)
    batch = _packed_batch()
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    (loss_d, logits_d), grads_d = _value_and_grad(dense, _logits_loss, batch)
    (loss_b, logits_b), grads_b = _value_and_grad(blockwise, _logits_loss, batch, mesh)
    real = batch["attention_mask"] > 0
    np.testing.assert_allclose(np.asarray(logits_b)[real], np.asarray(logits_d)[real],
                               atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(loss_b, loss_d, rtol=1e-5)
    _assert_close(grads_b, grads_d, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # the model-level equality (same masks, sharded) runs by default above
def test_dpo_step_on_prefix_shared_rows_equals_dense():
    """DPO loss, metrics and gradients of a blockwise policy and reference on prefix-shared
    rows equal the dense ones."""
    policy_d, policy_b = _pair("tiny_qwen2", 1)
    ref_d, ref_b = _pair("tiny_qwen2", 2)
    batch = _prefix_shared_batch(1)

    def loss_fn(model, batch):
        return preference_loss(model, batch, hp=DPOHyperParams(beta=0.1))

    (loss_d, metrics_d), grads_d = _value_and_grad(PolicyAndReference(policy_d, ref_d), loss_fn,
                                                   batch)
    (loss_b, metrics_b), grads_b = _value_and_grad(PolicyAndReference(policy_b, ref_b), loss_fn,
                                                   batch)
    np.testing.assert_allclose(loss_b, loss_d, rtol=1e-5)
    _assert_close(metrics_b, metrics_d, rtol=1e-5, atol=1e-5)
    _assert_close(grads_b, grads_d, rtol=1e-4, atol=1e-6)


def test_config_and_model_spec_select_the_attention():
    config = model_config(ModelSpec(preset="tiny_gpt2", attention_impl="blockwise",
                                    attention_block_q=64, attention_block_k=32))
    assert (config.attention_impl, config.attention_block_q, config.attention_block_k) == \
        ("blockwise", 64, 32)
    default = model_config(ModelSpec(preset="tiny_gpt2"))
    assert default.attention_impl == "auto"  # on CPU, blockwise beyond one query tile
    assert not default.uses_blockwise_attention(128, "cpu")
    assert default.uses_blockwise_attention(129, "cpu")
    assert not default.uses_blockwise_attention(4096, "gpu")
    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="attention_block_q"):
        ModelConfig(attention_block_q=0)
    with pytest.raises(FieldError, match="attention_block_k"):
        ModelSpec(attention_block_k=0)
    with pytest.raises(FieldError, match="attention_impl"):
        ModelSpec(attention_impl="flash")
