"""The pure array functions of the model code, traced and eager, against NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import default_positions, last_token_index, positions_from_mask
from rlhf_jax.models.layers import attention_weights_mask, dot_product_attention
from rlhf_jax.models.rope import apply_rope


def _np_positions(mask, seg=None):
    b, t = mask.shape
    out = np.zeros((b, t), np.int64)
    for i in range(b):
        if seg is None:
            out[i] = np.maximum(np.cumsum(mask[i]) - 1, 0)
        else:
            for j in range(t):
                if seg[i, j] == 0:
                    continue
                k = j
                while k > 0 and seg[i, k - 1] == seg[i, j]:
                    k -= 1
                out[i, j] = j - k
    return out


def _np_attention(q, k, v, mask, scale):
    b, t, h, d = q.shape
    kv = k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            j = hi // (h // kv)
            s = q[bi, :, hi] @ k[bi, :, j].T * scale
            s = np.where(mask[bi], s, -1e300)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, j]
    return out


class FunctionsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_default_positions(self):
        rng = np.random.default_rng(0)
        mask = (rng.random((4, 9)) > 0.3).astype(np.int32)
        got = self.variant(default_positions)(jnp.asarray(mask))
        np.testing.assert_array_equal(got, _np_positions(mask))
        seg = np.array([[1, 1, 2, 2, 2, 0, 0, 0, 0], [1, 2, 3, 3, 3, 3, 4, 4, 0],
                        [0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
        got = self.variant(default_positions)(jnp.asarray(seg > 0), jnp.asarray(seg))
        np.testing.assert_array_equal(got, _np_positions(seg > 0, seg))

    @chex.variants(with_jit=True, without_jit=True)
    def test_positions_from_mask(self):
        # Hand-worked: a left-padded row, a full row, an all-padding row (all 0).
        mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
        expected = [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
        for dtype in (np.int32, np.float32, bool):  # masks come as int, float or bool
            got = self.variant(positions_from_mask)(jnp.asarray(mask.astype(dtype)))
            chex.assert_type(got, jnp.int32)
            np.testing.assert_array_equal(got, expected)
        rng = np.random.default_rng(2)
        mask = (rng.random((5, 11)) > 0.4).astype(np.int32)
        np.testing.assert_array_equal(self.variant(positions_from_mask)(jnp.asarray(mask)),
                                      _np_positions(mask))

    @chex.variants(with_jit=True, without_jit=True)
    def test_last_token_index(self):
        rng = np.random.default_rng(1)
        mask = (rng.random((6, 7)) > 0.5).astype(np.int32)
        mask[0] = 0
        expected = [max([j for j in range(7) if mask[i, j]], default=0) for i in range(6)]
        np.testing.assert_array_equal(self.variant(last_token_index)(jnp.asarray(mask)),
                                      expected)

    @chex.variants(with_jit=True, without_jit=True)
    def test_attention_against_float64(self):
        rng = np.random.default_rng(2)
        q, k, v = (rng.normal(size=s) for s in ((2, 4, 6, 8), (2, 7, 3, 8), (2, 7, 3, 8)))
        seg = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0]])
        slots = np.arange(7)
        mask = attention_weights_mask(jnp.asarray(slots[3:])[None].repeat(2, 0),
                                      jnp.asarray(slots), jnp.asarray(seg > 0),
                                      jnp.asarray(seg[:, 3:]), jnp.asarray(seg))
        np_mask = ((slots[None, :] <= slots[3:, None])[None] & (seg > 0)[:, None, :]
                   & (seg[:, 3:, None] == seg[:, None, :]))
        np.testing.assert_array_equal(mask, np_mask)
        fn = self.variant(lambda q, k, v, m: dot_product_attention(q, k, v, m, scale=0.3))
        got = fn(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask)
        np.testing.assert_allclose(got, _np_attention(q, k, v, np_mask, 0.3), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fully_masked_rows_stay_finite_with_finite_grads(self):
        q = jnp.ones((1, 2, 2, 4))
        k = v = jnp.ones((1, 3, 1, 4))
        mask = jnp.zeros((1, 2, 3), bool)
        fn = self.variant(lambda q: jnp.sum(dot_product_attention(q, k, v, mask, scale=1.0)))
        self.assertTrue(np.isfinite(fn(q)))
        self.assertTrue(np.isfinite(np.asarray(jax.grad(fn)(q))).all())

    @chex.variants(with_jit=True, without_jit=True)
    def test_rope_rotation(self):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(2, 3, 2, 6))
        ang = rng.normal(size=(2, 3, 3))
        emb = np.concatenate([ang, ang], -1)
        got = self.variant(apply_rope)(jnp.asarray(x, jnp.float32),
                                       jnp.asarray(np.cos(emb), jnp.float32),
                                       jnp.asarray(np.sin(emb), jnp.float32))
        c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
        x1, x2 = x[..., :3], x[..., 3:]
        np.testing.assert_allclose(got, np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], -1),
                                   atol=1e-5)
