"""RoPE frequencies against Hugging Face's, and the rotation against a NumPy reference."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig, RopeScaling
from rlhf_jax.models.rope import apply_rope, rope_tables, static_inv_freq

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
HF_FREQS = np.load(FIXTURES / "rope_inv_freq.npz")
HF_META = json.loads((FIXTURES / "rope_inv_freq.json").read_text())


def _config(params):
    params = dict(params)
    return ModelConfig.tiny_llama(hidden_size=64, num_heads=4, num_kv_heads=4,
                                  max_position_embeddings=64, rope_theta=10000.0,
                                  rope_scaling=RopeScaling(**params))


@pytest.mark.parametrize("case", sorted(HF_META))
def test_inverse_frequencies_match_hugging_face(case):
    meta = HF_META[case]
    config = _config(meta["params"])
    if meta["seq_len"] is None:
        inv, factor = static_inv_freq(config)
        np.testing.assert_allclose(inv, HF_FREQS[case], rtol=1e-6)
        assert factor == pytest.approx(meta["attention_factor"])
    # Through rope_tables (dynamic NTK rescales with the longest position in the batch).
    seq_len = meta["seq_len"] or 16
    positions = jnp.arange(seq_len)[None, :]
    cos, sin = rope_tables(config, positions)
    freqs = np.arange(seq_len)[:, None] * HF_FREQS[case].astype(np.float64)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    np.testing.assert_allclose(cos[0], np.cos(emb) * meta["attention_factor"], atol=2e-4)
    np.testing.assert_allclose(sin[0], np.sin(emb) * meta["attention_factor"], atol=2e-4)


def test_dynamic_ntk_is_default_within_the_context():
    config = _config({"rope_type": "dynamic", "factor": 2.0})
    plain = ModelConfig.tiny_llama(hidden_size=64, num_heads=4, num_kv_heads=4,
                                   max_position_embeddings=64)
    positions = jnp.arange(64)[None]
    for a, b in zip(rope_tables(config, positions), rope_tables(plain, positions)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_default_frequencies_by_hand():
    config = ModelConfig.tiny_llama(hidden_size=16, num_heads=2, num_kv_heads=2,
                                    rope_theta=100.0)
    inv, factor = static_inv_freq(config)  # D = 8: theta^(-0/8), theta^(-2/8), ...
    np.testing.assert_allclose(inv, [1.0, 100 ** -0.25, 0.1, 100 ** -0.75], rtol=1e-6)
    assert factor == 1.0


def test_apply_rope_matches_numpy_rotate_half():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8))
    theta = rng.normal(size=(2, 5, 4))
    emb = np.concatenate([theta, theta], -1)
    out = apply_rope(jnp.asarray(x, jnp.float32), jnp.cos(jnp.asarray(emb, jnp.float32)),
                     jnp.sin(jnp.asarray(emb, jnp.float32)))
    x1, x2 = x[..., :4], x[..., 4:]
    c, s = np.cos(theta)[:, :, None], np.sin(theta)[:, :, None]
    ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # A rotation keeps the norm of every pair.
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)
