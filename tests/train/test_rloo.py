"""RLOO: KL-in-reward leave-one-out advantages against float64, and a short end-to-end run."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.train.grpo import GRPOHyperParams, RLOOConfig, grpo_sequence_advantages


def _hp(**kw) -> GRPOHyperParams:
    base = dict(algorithm="rloo", temperature=1.0, num_generations=3, loss_type="dapo",
                scale_rewards="group", beta=0.05, epsilon=0.2, epsilon_high=None, delta=None,
                num_iterations=1, num_minibatches=1, normalize_advantages=False,
                max_completion_length=4)
    base.update(kw)
    return GRPOHyperParams(**base)


@pytest.mark.parametrize("normalize", [False, True])
def test_leave_one_out_with_kl_in_reward(normalize):
    rng = np.random.default_rng(0)
    scores = np.array([1.0, 0.0, 0.5, 2.0, 2.0, -1.0])
    old = rng.normal(size=(6, 4)) - 1
    ref = old + 0.2 * rng.normal(size=(6, 4))
    mask = np.ones((6, 4))
    mask[1, 3:] = 0
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    rewards, adv = grpo_sequence_advantages(f32(scores), f32(old), f32(ref), f32(mask),
                                            hp=_hp(normalize_advantages=normalize))
    r = scores - 0.05 * ((old - ref) * mask).sum(1)
    g = r.reshape(2, 3)
    baseline = (g.sum(1, keepdims=True) - g) / 2
    expected = (g - baseline).ravel()
    if normalize:
        expected = (expected - expected.mean()) / (expected.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(rewards, r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv, expected, rtol=1e-4, atol=1e-5)


def test_short_run(tmp_path):
    from test_grpo import run_online

    trainer, runs = run_online(RLOOConfig, tmp_path, 3, loss_type="dapo")
    assert trainer.algorithm == "rloo"
    assert runs[0]["rloo/kl_ref"] == 0.0
    for m in runs:
        # reward = score - beta * KL(seq), averaged over the rollout
        np.testing.assert_allclose(m["rloo/reward_mean"],
                                   m["rloo/score_mean"] - 0.05 * m["rloo/kl_ref"], atol=1e-5)
        assert m["rloo/nonfinite"] == 0.0


def test_rloo_needs_two_generations(tmp_path):
    from test_grpo import run_online

    with pytest.raises(ValueError, match="num_generations must be >= 2 for RLOO"):
        run_online(RLOOConfig, tmp_path, 0, num_generations=1)
