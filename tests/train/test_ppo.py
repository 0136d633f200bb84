"""PPO: the per-token reward layout and GAE inputs (hand-worked), the minibatch loss against a
float64 NumPy reference, and short end-to-end runs on the synthetic topic task's gold reward."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.data.synthetic import build_tokenizer, get_task
from rlhf_jax.generation import TokenRewardFunction
from rlhf_jax.models import CausalLM
from rlhf_jax.train.builders import model_config
from rlhf_jax.train.config import DataSpec, LoggingConfig, ModelSpec, OptimizerConfig
from rlhf_jax.train.data import build_data
from rlhf_jax.train.loop import WALL_CLOCK_METRICS, PreemptionGuard
from rlhf_jax.train.ppo import (
    PPOConfig,
    PPOExperience,
    PPOHyperParams,
    PPOTrainer,
    ppo_minibatch_loss,
    ppo_policy_loss,
    ppo_rewards_and_advantages,
    ppo_value_loss,
)
from rlhf_jax.train.rollout import Rollout, RolloutConfig

# ---------------------------------------------------------------------------------------------
# Per-token reward layout and GAE inputs, worked by hand
# ---------------------------------------------------------------------------------------------

# Row 0 has 3 response tokens (the 4th is padding), row 1 has 4.
MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
# k1 = logp - ref_logp per token: row 0 [0.2, -0.1, 0.3, pad], row 1 [0.1, 0.1, 0.0, -0.2]
LOGPS = np.array([[-1.0, -2.0, -0.5, -7.0], [-1.0, -1.0, -1.0, -1.0]], np.float32)
REF = np.array([[-1.2, -1.9, -0.8, 3.0], [-1.1, -1.1, -1.0, -0.8]], np.float32)
SCORES = np.array([1.0, -0.5], np.float32)
VALUES = np.array([[0.5, 0.4, 0.3, 9.0], [0.1, 0.2, 0.3, 0.4]], np.float32)


def _gae_reference(rewards, values, mask, gamma, lam):
    """float64 loop: delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last real token)."""
    rewards, values, mask = (np.asarray(x, np.float64) for x in (rewards, values, mask))
    b, n = rewards.shape
    adv = np.zeros((b, n))
    for i in range(b):
        last = 0.0
        for t in reversed(range(n)):
            if mask[i, t] == 0:
                continue
            nxt = values[i, t + 1] if t + 1 < n and mask[i, t + 1] else 0.0
            delta = rewards[i, t] + gamma * nxt - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv, (adv + values) * mask


class TestRewardLayoutAndGAE:
    def test_score_on_last_real_token_kl_on_every_token(self):
        rewards, adv, returns, kl = ppo_rewards_and_advantages(
            jnp.asarray(SCORES), jnp.asarray(LOGPS), jnp.asarray(REF), jnp.asarray(VALUES),
            jnp.asarray(MASK), kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0,
            whiten_advantages=False,
        )
        # Worked by hand: r = -0.1 * kl, plus the score on the last real token.
        np.testing.assert_allclose(kl, [[0.2, -0.1, 0.3, 0.0], [0.1, 0.1, 0.0, -0.2]], atol=1e-6)
        np.testing.assert_allclose(
            rewards, [[-0.02, 0.01, 0.97, 0.0], [-0.01, -0.01, 0.0, -0.48]], atol=1e-6
        )
        # gamma = lam = 1: returns are reward-to-go, advantages returns - V (padding ignored).
        np.testing.assert_allclose(
            returns, [[0.96, 0.98, 0.97, 0.0], [-0.50, -0.49, -0.48, -0.48]], atol=1e-6
        )
        np.testing.assert_allclose(
            adv, [[0.46, 0.58, 0.67, 0.0], [-0.60, -0.69, -0.78, -0.88]], atol=1e-6
        )

    @pytest.mark.parametrize("estimator", ["k1", "k3"])
    def test_gae_inputs_match_float64_reference(self, estimator):
        gamma, lam, beta = 0.9, 0.95, 0.2
        rewards, adv, returns, kl = ppo_rewards_and_advantages(
            jnp.asarray(SCORES), jnp.asarray(LOGPS), jnp.asarray(REF), jnp.asarray(VALUES),
            jnp.asarray(MASK), kl_coef=beta, kl_estimator=estimator, gamma=gamma, lam=lam,
            whiten_advantages=False,
        )
        log_r = REF.astype(np.float64) - LOGPS
        kl_ref = -log_r if estimator == "k1" else np.expm1(log_r) - log_r
        kl_ref = kl_ref * MASK
        r_ref = -beta * kl_ref
        r_ref[0, 2] += SCORES[0]
        r_ref[1, 3] += SCORES[1]
        adv_ref, ret_ref = _gae_reference(r_ref, VALUES * MASK, MASK, gamma, lam)
        np.testing.assert_allclose(kl, kl_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rewards, r_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(returns, ret_ref, rtol=1e-5, atol=1e-6)

    def test_whitening(self):
        _, adv, returns, _ = ppo_rewards_and_advantages(
            jnp.asarray(SCORES), jnp.asarray(LOGPS), jnp.asarray(REF), jnp.asarray(VALUES),
            jnp.asarray(MASK), kl_coef=0.1, whiten_advantages=True,
        )
        real = np.asarray(adv)[MASK > 0]
        np.testing.assert_allclose(real.mean(), 0.0, atol=1e-6)
        np.testing.assert_allclose(real.std(ddof=1), 1.0, rtol=1e-4)
        assert np.all(np.asarray(adv)[MASK == 0] == 0)
        # returns are computed from the raw advantages
        raw = ppo_rewards_and_advantages(
            jnp.asarray(SCORES), jnp.asarray(LOGPS), jnp.asarray(REF), jnp.asarray(VALUES),
            jnp.asarray(MASK), kl_coef=0.1, whiten_advantages=False,
        )
        np.testing.assert_allclose(returns, raw[2], atol=1e-6)

    def test_whiten_rewards_keeps_the_mean(self):
        rewards, *_ = ppo_rewards_and_advantages(
            jnp.asarray(SCORES), jnp.asarray(LOGPS), jnp.asarray(REF), jnp.asarray(VALUES),
            jnp.asarray(MASK), kl_coef=0.1, whiten_rewards=True, whiten_advantages=False,
        )
        raw, *_ = ppo_rewards_and_advantages(
            jnp.asarray(SCORES), jnp.asarray(LOGPS), jnp.asarray(REF), jnp.asarray(VALUES),
            jnp.asarray(MASK), kl_coef=0.1, whiten_advantages=False,
        )
        real, raw_real = np.asarray(rewards)[MASK > 0], np.asarray(raw)[MASK > 0]
        np.testing.assert_allclose(real.mean(), raw_real.mean(), atol=1e-6)
        np.testing.assert_allclose(real.std(ddof=1), 1.0, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Minibatch loss against a float64 reference, with fake models that are plain callables
# ---------------------------------------------------------------------------------------------

P, N, V = 2, 4, 5


def _experience(rng):
    seq = rng.integers(1, V, size=(2, P + N)).astype(np.int32)
    seq_mask = np.ones((2, P + N), np.int32)
    seq_mask[0, P + 3:] = 0
    rollout = Rollout(
        sequences=jnp.asarray(seq), sequence_mask=jnp.asarray(seq_mask),
        response_ids=jnp.asarray(seq[:, P:]), response_mask=jnp.asarray(seq_mask[:, P:]),
        finished=jnp.asarray([True, False]),
    )
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return PPOExperience(
        rollout=rollout, scores=f(2), old_logps=f(2, N) - 1.5, ref_logps=f(2, N) - 1.5,
        old_values=f(2, N), rewards=f(2, N), advantages=f(2, N), returns=f(2, N),
    )


HP = PPOHyperParams(
    temperature=0.8, kl_estimator="k1", gamma=1.0, lam=0.95, whiten_rewards=False,
    whiten_advantages=True, normalize_scores=False, clip_range=0.2, clip_range_value=0.2,
    vf_coef=0.1, entropy_coef=0.01, num_epochs=1, num_minibatches=1,
)


class TestMinibatchLoss:
    def test_matches_float64_reference(self):
        rng = np.random.default_rng(0)
        exp = _experience(rng)
        logits = jnp.asarray(rng.normal(size=(2, P + N, V)), jnp.float32)
        values = jnp.asarray(rng.normal(size=(2, P + N)), jnp.float32)
        policy = lambda ids, attention_mask=None, positions=None: logits
        value_model = lambda ids, attention_mask=None, positions=None: values
        loss, metrics = ppo_minibatch_loss(policy, value_model, exp, hp=HP)

        lg = np.asarray(logits, np.float64)[:, P - 1:-1] / HP.temperature
        logz = np.log(np.exp(lg).sum(-1))
        ids = np.asarray(exp.rollout.response_ids)
        lp = np.take_along_axis(lg, ids[..., None], -1)[..., 0] - logz
        m = np.asarray(exp.rollout.response_mask, np.float64)
        a = np.asarray(exp.advantages, np.float64)
        ratio = np.exp(lp - np.asarray(exp.old_logps, np.float64))
        pg = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2))
        v = np.asarray(values, np.float64)[:, P - 1:-1]
        v_old = np.asarray(exp.old_values, np.float64)
        ret = np.asarray(exp.returns, np.float64)
        v_clip = v_old + np.clip(v - v_old, -0.2, 0.2)
        vf = 0.5 * np.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
        p = np.exp(lg - logz[..., None])
        ent = -(p * (lg - logz[..., None])).sum(-1)
        mean = lambda x: (x * m).sum() / m.sum()
        expected = mean(pg) + 0.1 * mean(vf) - 0.01 * mean(ent)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
        np.testing.assert_allclose(metrics["ppo/policy_loss"], mean(pg), rtol=1e-5)
        np.testing.assert_allclose(metrics["ppo/value_loss"], mean(vf), rtol=1e-5)
        np.testing.assert_allclose(metrics["ppo/entropy"], mean(ent), rtol=1e-5)
        np.testing.assert_allclose(metrics["ppo/approx_kl"],
                                   mean(0.5 * (lp - np.asarray(exp.old_logps)) ** 2), rtol=1e-4)
        active = (-a * np.clip(ratio, 0.8, 1.2)) > (-a * ratio)
        np.testing.assert_allclose(metrics["ppo/clipfrac"], mean(active), atol=1e-6)

    def test_policy_and_value_parts_sum_to_the_joint_loss(self):
        rng = np.random.default_rng(2)
        exp = _experience(rng)
        logits = jnp.asarray(rng.normal(size=(2, P + N, V)), jnp.float32)
        values = jnp.asarray(rng.normal(size=(2, P + N)), jnp.float32)
        policy = lambda ids, attention_mask=None, positions=None: logits
        value_model = lambda ids, attention_mask=None, positions=None: values
        joint, joint_metrics = ppo_minibatch_loss(policy, value_model, exp, hp=HP)
        pl, pm = ppo_policy_loss(policy, exp, hp=HP)
        vl, vm = ppo_value_loss(value_model, exp, hp=HP)
        np.testing.assert_allclose(pl + vl, joint, rtol=1e-6)
        assert {**pm, **vm}.keys() == joint_metrics.keys()

    def test_padded_tokens_get_exactly_zero_gradient(self):
        rng = np.random.default_rng(1)
        exp = _experience(rng)
        logits = jnp.asarray(rng.normal(size=(2, P + N, V)), jnp.float32)
        values = jnp.asarray(rng.normal(size=(2, P + N)), jnp.float32)

        def loss(lg, vals):
            return ppo_minibatch_loss(lambda *a, **k: lg, lambda *a, **k: vals, exp, hp=HP)[0]

        g_logits, g_values = jax.grad(loss, argnums=(0, 1))(logits, values)
        # response token 3 of row 0 is padding: it is predicted from column P - 1 + 3
        assert np.all(np.asarray(g_logits)[0, P + 2] == 0)
        assert np.all(np.asarray(g_values)[0, P + 2] == 0)
        assert np.any(np.asarray(g_logits)[1, P + 2] != 0)
        assert np.all(np.isfinite(np.asarray(g_logits)))


# ---------------------------------------------------------------------------------------------
# End-to-end runs on the topic task's gold reward (tiny model, 1-device mesh unless stated)
# ---------------------------------------------------------------------------------------------

TASK = get_task("topic")
TOKENIZER = build_tokenizer()
NUM_STEPS = 20
MODEL_SPEC = ModelSpec(preset="tiny_gpt2", vocab_size=len(TOKENIZER), hidden_size=32, num_layers=1,
                       num_heads=2)


def _config(tmp, **kw) -> PPOConfig:
    base = dict(
        output_dir=str(tmp),
        num_steps=NUM_STEPS,
        seed=0,
        data=DataSpec(synthetic="topic", batch_size=32, max_length=16, max_prompt_length=16),
        rollout=RolloutConfig(max_new_tokens=12),
        optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
        num_epochs=4,
        num_minibatches=2,
        kl_coef=0.01,
        logging=LoggingConfig(tensorboard=False, progress="none", every_steps=1),
    )
    base.update(kw)
    return PPOConfig(**base)


def _prompts(seed=0, batch_size=32):
    spec = DataSpec(synthetic="topic", batch_size=batch_size, max_length=16,
                    max_prompt_length=16, num_train=256, num_eval=0)
    return build_data(spec, format="prompt", tokenizer=TOKENIZER, seed=seed).train


def _mesh(n=1):
    return sharding.make_mesh(sharding.MeshConfig(data=n), devices=jax.devices()[:n])


def _trainer(config, *, mesh=None, policy=None, metric_fns=()):
    policy = policy or CausalLM(model_config(MODEL_SPEC), rngs=nnx.Rngs(config.seed))
    return PPOTrainer(
        config,
        policy=policy,
        reward=TokenRewardFunction(TASK.gold_reward_tokens, name="gold"),
        prompts=_prompts(config.seed),
        eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id,
        mesh=mesh or _mesh(1),
        metric_fns=metric_fns,
    )


REQUIRED = ("ppo/score_mean", "ppo/kl_ref", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl",
            "ppo/value_explained_variance", "ppo/response_length", "ppo/kl_coef")


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    trainer = _trainer(_config(tmp_path_factory.mktemp("learn")))
    return [trainer.iteration() for _ in range(NUM_STEPS)]


class TestEndToEnd:
    def test_score_rises_while_kl_stays_bounded(self, learning_run):
        scores = np.array([m["ppo/score_mean"] for m in learning_run])
        kls = np.array([m["ppo/kl_ref"] for m in learning_run])
        assert learning_run[0]["ppo/kl_ref"] == 0.0  # policy == reference before any update
        assert scores[-5:].mean() > scores[:3].mean() + 0.05, scores
        assert np.all(kls < 20.0), kls
        for m in learning_run:
            for key in REQUIRED:
                assert key in m and np.isfinite(m[key]), key
            assert m["ppo/nonfinite"] == 0.0
            assert 0.0 <= m["ppo/clipfrac"] <= 1.0
            assert m["ppo/kl_coef"] == pytest.approx(0.01)

    def test_fixed_seed_and_zero_kl_coef_reproduce_exactly(self, tmp_path):
        runs = []
        for _ in range(2):
            trainer = _trainer(_config(tmp_path, kl_coef=0.0))
            runs.append([trainer.iteration() for _ in range(3)])
        assert runs[0] == runs[1]
        assert all(m["ppo/kl_coef"] == 0.0 for m in runs[0])

    def test_interrupted_and_resumed_run_is_bit_exact(self, tmp_path):
        full = _trainer(_config(tmp_path / "full"))
        full.train()
        guard = PreemptionGuard(enabled=False)
        calls = []

        def preempt_at_7(experience, prompts):
            calls.append(1)
            if len(calls) == 7:  # a SIGTERM during iteration 7: saved after it, then exit
                guard.request()
            return {}

        interrupted = _trainer(_config(tmp_path / "resumed"), metric_fns=(preempt_at_7,))
        first = interrupted.train(guard=guard)
        assert first.preempted and first.step == 7
        resumed = _trainer(_config(tmp_path / "resumed"))
        second = resumed.train()
        assert second.step == NUM_STEPS

        def lines(path):
            with open(os.path.join(path, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            return [{k: v for k, v in r.items() if k not in WALL_CLOCK_METRICS} for r in rows]

        a, b = lines(tmp_path / "full"), lines(tmp_path / "resumed")
        assert len(a) == NUM_STEPS and a == b
        for x, y in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def test_eight_device_mesh_matches_one_device_first_iteration(self, learning_run, tmp_path):
        one = learning_run[0]  # the same config and seed on the 1-device mesh
        eight = _trainer(_config(tmp_path), mesh=_mesh(8)).iteration()
        assert set(one) == set(eight)
        for key in one:
            np.testing.assert_allclose(eight[key], one[key], rtol=2e-4, atol=2e-5, err_msg=key)

    def test_bad_config_raises_naming_the_field(self, tmp_path):
        with pytest.raises(ValueError, match="num_minibatches=5 must divide data.batch_size"):
            _trainer(_config(tmp_path, num_minibatches=5))
        with pytest.raises(ValueError, match="rollout.temperature"):
            _trainer(_config(tmp_path, rollout=RolloutConfig(temperature=0.0)))


@pytest.mark.slow
class TestSlow:
    def test_adaptive_controller_drives_kl_towards_target(self, tmp_path):
        target = 2.0
        config = _config(tmp_path, adaptive_kl=True, kl_coef=0.01, kl_target=target,
                         kl_horizon=200, num_steps=40)
        trainer = _trainer(config)
        runs = [trainer.iteration() for _ in range(40)]
        for prev, cur in zip(runs, runs[1:]):
            error = np.clip(prev["ppo/kl_ref"] / target - 1.0, -0.2, 0.2)
            expected = prev["ppo/kl_coef"] * (1.0 + error * 32 / 200)
            np.testing.assert_allclose(cur["ppo/kl_coef"], expected, rtol=1e-5)
        fixed = _trainer(dataclasses.replace(config, adaptive_kl=False))
        free = [fixed.iteration() for _ in range(40)]
        late = lambda rs: np.mean([m["ppo/kl_ref"] for m in rs[-10:]])
        assert abs(late(runs) - target) < abs(late(free) - target), (late(runs), late(free))
        assert runs[-1]["ppo/kl_coef"] > 0.01

    def test_lora_policy_reference_is_the_base_model(self, tmp_path):
        from rlhf_jax.models.lora import apply_lora

        policy = CausalLM(model_config(MODEL_SPEC), rngs=nnx.Rngs(0))
        apply_lora(policy, rank=4, alpha=8.0, targets=("q", "v"), rngs=nnx.Rngs(1))
        trainer = _trainer(_config(tmp_path), policy=policy)
        frozen_before = jax.tree.map(np.asarray, trainer.state.policy.frozen)
        metrics = [trainer.iteration() for _ in range(5)]
        assert metrics[0]["ppo/kl_ref"] == 0.0
        assert any(m["ppo/kl_ref"] != 0.0 for m in metrics[1:])
        for a, b in zip(jax.tree.leaves(frozen_before),
                        jax.tree.leaves(trainer.state.policy.frozen)):
            np.testing.assert_array_equal(a, np.asarray(b))

    def test_shared_value_head_trains(self, tmp_path):
        trainer = _trainer(_config(tmp_path, value_head="shared"))
        metrics = [trainer.iteration() for _ in range(4)]
        for m in metrics:
            assert np.isfinite(m["ppo/value_loss"]) and m["ppo/nonfinite"] == 0.0
        assert jax.tree.leaves(trainer.state.value.params) == []
        assert "value_head" in str(jax.tree_util.tree_structure(trainer.state.policy.params))
