"""GRPO family: advantages and per-token losses against float64 references, and a short
end-to-end run on the topic task's gold reward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import losses, sharding
from rlhf_jax.data.synthetic import build_tokenizer, get_task
from rlhf_jax.generation import TokenRewardFunction
from rlhf_jax.models import CausalLM
from rlhf_jax.train.builders import model_config
from rlhf_jax.train.config import DataSpec, ModelSpec, OptimizerConfig
from rlhf_jax.train.data import build_data
from rlhf_jax.train.grpo import (
    GRPO_LOSS_TYPES,
    GRPOConfig,
    GRPOHyperParams,
    GRPOTrainer,
    RLOOConfig,
    aggregation_mode,
    complete_experience,
    grpo_per_token_loss,
    grpo_sequence_advantages,
    make_score_fn,
    make_update_fn,
)
from rlhf_jax.train.logprobs import policy_response_logps
from rlhf_jax.train.rollout import RolloutConfig


def _hp(**kw) -> GRPOHyperParams:
    base = dict(algorithm="grpo", temperature=1.0, num_generations=3, loss_type="grpo",
                scale_rewards="group", beta=0.0, epsilon=0.2, epsilon_high=None, delta=None,
                num_iterations=1, num_minibatches=1, normalize_advantages=False,
                max_completion_length=4)
    base.update(kw)
    return GRPOHyperParams(**base)


def _arrays(seed=0, rows=6, n=4):
    rng = np.random.default_rng(seed)
    logps = rng.normal(size=(rows, n)) - 1.0
    old = logps + 0.3 * rng.normal(size=(rows, n))
    ref = logps + 0.3 * rng.normal(size=(rows, n))
    mask = np.ones((rows, n))
    mask[0, 2:] = 0
    mask[3, 1:] = 0
    return logps, old, ref, mask


class TestAdvantages:
    @pytest.mark.parametrize("scale", ["group", "batch", "none"])
    def test_group_advantages_match_float64(self, scale):
        scores = np.array([1.0, 0.0, 0.5, 2.0, 2.0, -1.0])
        logps, old, ref, mask = _arrays()
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        rewards, adv = grpo_sequence_advantages(f32(scores), f32(old), f32(ref), f32(mask),
                                                hp=_hp(scale_rewards=scale))
        g = scores.reshape(2, 3)
        centred = (g - g.mean(1, keepdims=True)).ravel()
        if scale == "group":
            centred = centred / (np.repeat(g.std(1, ddof=1), 3) + 1e-4)
        elif scale == "batch":
            centred = centred / (scores.std(ddof=1) + 1e-4)
        np.testing.assert_allclose(rewards, scores, rtol=1e-6)
        np.testing.assert_allclose(adv, centred, rtol=1e-5, atol=1e-6)


class TestPerTokenLoss:
    def test_aggregation_modes(self):
        assert aggregation_mode("gspo") == "grpo"
        assert aggregation_mode("cispo") == "dapo"
        for name in ("grpo", "dr_grpo", "dapo", "bnpo"):
            assert aggregation_mode(name) == name
            assert name in losses.AGGREGATION_MODES

    def test_token_level_loss_with_k3_matches_float64(self):
        logps, old, ref, mask = _arrays(1)
        adv = np.linspace(-1, 1, 6)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        out = grpo_per_token_loss(f32(logps), f32(old), f32(ref), f32(adv), f32(mask),
                                  hp=_hp(beta=0.1, epsilon_high=0.28))
        ratio = np.exp(logps - old)
        a = adv[:, None]
        surrogate = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.28))
        k3 = np.exp(ref - logps) - (ref - logps) - 1
        np.testing.assert_allclose(out, (surrogate + 0.1 * k3) * mask, rtol=1e-5, atol=1e-6)

    def test_gspo_uses_the_sequence_ratio(self):
        logps, old, ref, mask = _arrays(2)
        adv = np.linspace(-1, 1, 6)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        out = grpo_per_token_loss(f32(logps), f32(old), f32(ref), f32(adv), f32(mask),
                                  hp=_hp(loss_type="gspo", epsilon=3e-4, epsilon_high=4e-4))
        s = np.exp(((logps - old) * mask).sum(1) / mask.sum(1))[:, None]
        a = adv[:, None]
        expected = np.maximum(-a * s, -a * np.clip(s, 1 - 3e-4, 1 + 4e-4)) * mask
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    def test_cispo_weights_are_clipped_and_stopped(self):
        logps, old, ref, mask = _arrays(3)
        adv = np.linspace(-1, 1, 6)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        hp = _hp(loss_type="cispo", epsilon_high=1.1)
        out = grpo_per_token_loss(f32(logps), f32(old), f32(ref), f32(adv), f32(mask), hp=hp)
        w = np.minimum(np.exp(logps - old), 1.1)
        np.testing.assert_allclose(out, -w * adv[:, None] * logps * mask, rtol=1e-5, atol=1e-6)
        grad = jax.grad(lambda lp: jnp.sum(grpo_per_token_loss(
            lp, f32(old), f32(ref), f32(adv), f32(mask), hp=hp)))(f32(logps))
        np.testing.assert_allclose(grad, -w * adv[:, None] * mask, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

TASK = get_task("topic")
TOKENIZER = build_tokenizer()
MODEL_SPEC = ModelSpec(preset="tiny_gpt2", vocab_size=len(TOKENIZER), hidden_size=32,
                       num_layers=1, num_heads=2)


def online_trainer(config_cls, tmp_path, reference=None, iterations=1, **kw) -> GRPOTrainer:
    """A `GRPOTrainer` (GRPO or RLOO by config class) on the topic task, 1-device mesh."""
    spec = DataSpec(synthetic="topic", batch_size=8, max_length=16, max_prompt_length=16,
                    num_train=128, num_eval=0)
    base = dict(output_dir=str(tmp_path), num_steps=iterations, data=spec,
                rollout=RolloutConfig(max_new_tokens=12), num_generations=4,
                num_iterations=2, num_minibatches=2,
                optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"))
    base.update(kw)
    config = config_cls(**base)
    trainer = GRPOTrainer(
        config,
        policy=CausalLM(model_config(MODEL_SPEC), rngs=nnx.Rngs(0)),
        reward=TokenRewardFunction(TASK.gold_reward_tokens, name="gold"),
        prompts=build_data(spec, format="prompt", tokenizer=TOKENIZER, seed=0).train,
        eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id,
        reference=reference,
        mesh=sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1]),
    )
    return trainer


def run_online(config_cls, tmp_path, iterations, **kw):
    """A short run of `online_trainer`: the trainer and each iteration's metrics."""
    trainer = online_trainer(config_cls, tmp_path, iterations=iterations, **kw)
    return trainer, [trainer.iteration() for _ in range(iterations)]


def one_step_both_ways(config_cls, tmp_path, **kw):
    """One rollout, scored and updated with one optimizer step per rollout twice: the trainer's
    way (no old-log-prob forward, ``reuse_update_logps``) and with the scoring's old-log-prob
    forward pass forced. Returns per way ``(experience, metrics, new_state)`` and the policy's
    log-probs of the rollout, with the hyper-parameters and the state before the update."""
    trainer = online_trainer(
        config_cls, tmp_path, num_iterations=1, num_minibatches=1,
        reference=CausalLM(model_config(MODEL_SPEC), rngs=nnx.Rngs(7)),
        optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"), **kw)
    assert trainer.hp.reuse_update_logps
    state, prompts = trainer.state, next(trainer.prompts)
    rollout = trainer.rollout(state, prompts, jax.random.key(3))
    scores = trainer.scores(rollout, prompts)
    ways = []
    for hp in (trainer.hp, trainer.hp._replace(reuse_update_logps=False)):
        score = jax.jit(make_score_fn(trainer.policy_graphdef, hp=hp, reference=trainer.reference))
        update = jax.jit(make_update_fn(trainer.policy_graphdef, trainer.tx, hp=hp,
                                        batch_sharding=trainer.batch_sharding,
                                        schedule=trainer.schedule))
        experience, metrics = score(state, trainer.reference.state, rollout, scores)
        new_state, update_metrics = update(state, experience)
        ways.append((experience, {**metrics, **update_metrics}, new_state))
    policy = nnx.merge(trainer.policy_graphdef, state.policy.params, state.policy.frozen)
    logps, _ = policy_response_logps(policy, rollout, temperature=trainer.hp.temperature)
    return trainer.hp, state, ways, logps


class TestEndToEnd:
    def test_short_run_updates_the_policy(self, tmp_path):
        trainer, runs = run_online(GRPOConfig, tmp_path, 4, loss_type="dapo", beta=0.04)
        assert runs[0]["grpo/kl_ref"] == 0.0
        assert runs[-1]["grpo/kl_ref"] > 0.0
        for m in runs:
            for key in ("grpo/score_mean", "grpo/kl_ref", "grpo/entropy", "grpo/clipfrac",
                        "grpo/approx_kl", "grpo/response_length", "grpo/loss"):
                assert np.isfinite(m[key]), key
            assert m["grpo/nonfinite"] == 0.0
            assert 0.0 <= m["grpo/frac_zero_std_groups"] <= 1.0
        # 2 iterations x 2 minibatches per rollout
        assert int(trainer.state.policy.step) == 4 * 4

    def test_unknown_loss_type_and_bad_group_raise(self, tmp_path):
        with pytest.raises(ValueError, match="loss_type='ppo'"):
            run_online(GRPOConfig, tmp_path, 0, loss_type="ppo")
        with pytest.raises(ValueError, match="num_minibatches=3 must divide"):
            run_online(GRPOConfig, tmp_path, 0, num_minibatches=3)
        assert set(GRPO_LOSS_TYPES) == {"grpo", "dr_grpo", "dapo", "bnpo", "cispo", "gspo"}


def check_one_step_both_ways(config_cls, tmp_path, **kw):
    hp, old, ((exp, metrics, new), (forced_exp, forced_metrics, forced_new)), logps = (
        one_step_both_ways(config_cls, tmp_path, **kw))
    # the scoring skipped the policy's forward; the update completes the buffer identically
    assert exp.old_logps is None and forced_exp.old_logps is not None
    completed = complete_experience(exp, logps, hp=hp)
    for field in ("old_logps", "rewards", "advantages", "ref_logps", "scores"):
        np.testing.assert_allclose(getattr(completed, field), getattr(forced_exp, field),
                                   rtol=1e-5, atol=1e-6, err_msg=field)
    assert metrics.keys() == forced_metrics.keys()
    name = hp.algorithm
    assert float(forced_metrics[f"{name}/kl_ref"]) != 0.0  # a reference unlike the policy
    for key in metrics:
        np.testing.assert_allclose(metrics[key], forced_metrics[key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    assert float(metrics[f"{name}/clipfrac"]) == 0.0
    assert float(metrics[f"{name}/approx_kl"]) == 0.0
    # atol 1e-2 x the learning rate: AdamW's first step moves a parameter by about
    # lr * g / (|g| + 1e-8), which turns a gradient that is only float32 rounding noise
    # (mathematically 0, e.g. a bias ahead of a normalisation) into a visible 1e-7..1e-6 step;
    # a real gradient of the other sign would move it by 2 * lr
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 new.policy.params, forced_new.policy.params)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                         new.policy.params, old.policy.params))
    assert max(moved) > 1e-4  # the step did update the policy


class TestOneStepPerRollout:
    """With ``num_iterations * num_minibatches == 1`` the scoring skips the old-log-prob
    forward pass and the update uses its own stopped log-probs: the same buffer, metrics and
    updated parameters as the pass that computes them."""

    def test_grpo_with_k3(self, tmp_path):
        check_one_step_both_ways(GRPOConfig, tmp_path, loss_type="grpo", beta=0.04)

    def test_rloo_kl_in_reward(self, tmp_path):
        check_one_step_both_ways(RLOOConfig, tmp_path, loss_type="dapo",
                                 normalize_advantages=True)

    def test_several_steps_keep_the_old_logps_pass(self, tmp_path):
        trainer = online_trainer(GRPOConfig, tmp_path, num_iterations=2, num_minibatches=1)
        assert not trainer.hp.reuse_update_logps
        prompts = next(trainer.prompts)
        rollout = trainer.rollout(trainer.state, prompts, jax.random.key(0))
        experience, _ = trainer.score(trainer.state, rollout, prompts)
        assert experience.old_logps.shape == rollout.response_mask.shape


@pytest.mark.slow
class TestSlow:
    @pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "gspo", "cispo"])
    def test_one_step_per_rollout_every_loss_type(self, tmp_path, loss_type):
        check_one_step_both_ways(GRPOConfig, tmp_path, loss_type=loss_type, beta=0.04)

    @pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "cispo", "gspo"])
    def test_every_loss_type_runs(self, tmp_path, loss_type):
        _, runs = run_online(GRPOConfig, tmp_path, 3, loss_type=loss_type)
        assert all(m["grpo/nonfinite"] == 0.0 for m in runs)

    def test_score_rises(self, tmp_path):
        _, runs = run_online(GRPOConfig, tmp_path, 30, loss_type="dapo")
        scores = np.array([m["grpo/score_mean"] for m in runs])
        assert scores[-8:].mean() > scores[:4].mean() + 0.03, scores
