"""Bad inputs are refused with a message that names them, and truncation is never silent.

Each test is one case of issue #22 (items 5, 7, 8, 9c, 9d), run as a user would: through the
command line, a YAML file, or the library call that takes the input.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.experimental import checkify

from rlhf_jax import cli, losses
from rlhf_jax.data import (
    PreferenceExample,
    RankingExample,
    SFTExample,
    TokenizeConfig,
    tokenize_examples,
)
from rlhf_jax.data.synthetic import build_tokenizer
from rlhf_jax.generation import SamplingParams, generate
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.train import (
    CheckpointConfig,
    DataSpec,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
    TrainConfig,
)
from rlhf_jax.train.config import ConfigError, FieldError, config_from_yaml, load_config
from rlhf_jax.train.data import build_data
from rlhf_jax.train.dpo import DPOConfig
from rlhf_jax.train.grpo import GRPOConfig, RLOOConfig
from rlhf_jax.train.ppo import PPOConfig
from rlhf_jax.train.preflight import check_run_config
from rlhf_jax.train.rejection_sampling import RejectionSamplingConfig
from rlhf_jax.train.rm import RMConfig
from rlhf_jax.train.rollout import RolloutConfig
from rlhf_jax.train.sft import SFTConfig

TINY = ModelSpec(preset="tiny_gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                 max_position_embeddings=64)
QUIET = LoggingConfig(every_steps=1, tensorboard=False, progress="none")
SMALL_CLI = ["--model.vocab-size", "64", "--model.hidden-size", "32", "--model.num-layers", "1",
             "--model.num-heads", "2", "--model.max-position-embeddings", "64",
             "--logging.progress", "none", "--logging.no-tensorboard"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# (5) token ids out of range: log-prob functions
# ---------------------------------------------------------------------------------------------


class TestTargetIds:
    V = 5

    def _logits(self):
        return jax.random.normal(jax.random.key(0), (2, 3, self.V))

    @pytest.mark.parametrize("fn", ["token_logps", "chunked_token_logps"])
    @pytest.mark.parametrize("bad, where", [(5, (0, 2)), (-1, (1, 0)), (-100, (1, 1))])
    def test_known_ids_raise_naming_the_id(self, fn, bad, where):
        targets = np.zeros((2, 3), np.int32)
        targets[where] = bad
        f = getattr(losses, fn)
        for t in (targets, jnp.asarray(targets)):
            with pytest.raises(ValueError, match=rf"targets must be token ids in \[0, 5\).*got "
                                                 rf"{bad} at index \({where[0]}, {where[1]}\)"):
                f(self._logits(), t)

    @pytest.mark.parametrize("bad", [5, 7, -1])
    def test_under_jit_out_of_range_is_nan_never_finite(self, bad):
        targets = jnp.asarray([[0, bad, 2], [1, 1, 1]])
        for f in (jax.jit(losses.token_logps),
                  jax.jit(lambda lg, t: losses.chunked_token_logps(lg, t, chunk_size=2))):
            out = np.asarray(f(self._logits(), targets))
            assert np.isnan(out[0, 1])
            assert np.isfinite(np.delete(out.ravel(), 1)).all()

    def test_in_range_values_unchanged_and_gradient_finite(self):
        logits = self._logits()
        targets = jnp.asarray([[0, 4, 2], [1, 3, 1]])
        z = np.asarray(logits, np.float64)
        ref = z - np.log(np.exp(z).sum(-1, keepdims=True))
        want = np.take_along_axis(ref, np.asarray(targets)[..., None], -1)[..., 0]
        np.testing.assert_allclose(losses.token_logps(logits, targets), want, rtol=1e-6)
        g = jax.jit(jax.grad(lambda lg: losses.token_logps(lg, jnp.asarray([[0, -1, 2],
                                                                           [1, 3, 1]]))[1].sum()))
        assert np.isfinite(np.asarray(g(logits))).all()

    def test_checkify_reports_traced_ids(self):
        checked = jax.jit(checkify.checkify(losses.token_logps, errors=checkify.user_checks))
        err, _ = checked(self._logits(), jnp.asarray([[0, 9, 2], [1, 1, 1]]))
        with pytest.raises(checkify.JaxRuntimeError, match=r"targets must be token ids in \[0, 5\)"):
            err.throw()
        err, _ = checked(self._logits(), jnp.asarray([[0, 4, 2], [1, 1, 1]]))
        assert err.get() is None


# ---------------------------------------------------------------------------------------------
# (5) token ids and lengths out of range: generation
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_lm():
    config = ModelConfig.tiny_gpt2(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                                   max_position_embeddings=12)
    return CausalLM(config, rngs=nnx.Rngs(0))


class TestGenerationRanges:
    def _call(self, model, ids, mask=None, **kw):
        ids = np.asarray(ids, np.int32)
        mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
        sampling = SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 2), greedy=True)
        kw = {"eos_token_id": 2, "pad_token_id": 0, **kw}
        return generate(model, ids, mask, sampling, **kw)

    @pytest.mark.parametrize("bad", [32, 1000, -1])
    def test_prompt_ids_out_of_vocabulary(self, small_lm, bad):
        with pytest.raises(ValueError, match=rf"prompt_ids\[1, 2\] = {bad} is not a token id of "
                                             r"the model: ids \(padding included\) must be in "
                                             r"\[0, 32\)"):
            self._call(small_lm, [[3, 4, 5], [3, 4, bad]])

    def test_padding_ids_are_checked_too(self, small_lm):
        with pytest.raises(ValueError, match=r"prompt_ids\[0, 0\] = -1"):
            self._call(small_lm, [[-1, 4, 5], [3, 4, 5]], mask=[[0, 1, 1], [1, 1, 1]])

    @pytest.mark.parametrize("name", ["eos_token_id", "pad_token_id"])
    def test_special_ids_out_of_vocabulary(self, small_lm, name):
        with pytest.raises(ValueError, match=rf"{name}=40 is not a token id of the model"):
            self._call(small_lm, [[3, 4, 5]], **{name: 40})

    def test_prompt_plus_response_past_the_positions(self, small_lm):
        # 10 real tokens + 3 new ones need position 12; the table has 12 (0 .. 11).
        with pytest.raises(ValueError, match=r"the longest prompt has 10 tokens; with "
                                             r"max_new_tokens=3 .* max_position_embeddings=12"):
            self._call(small_lm, [[3] * 10], max_new_tokens=3)

    def test_the_check_counts_real_tokens_not_padding(self, small_lm):
        out = self._call(small_lm, [[0] * 6 + [3] * 4], mask=[[0] * 6 + [1] * 4],
                         max_new_tokens=8)
        assert out.tokens.shape == (1, 8)


# ---------------------------------------------------------------------------------------------
# (8) loss arguments and masks
# ---------------------------------------------------------------------------------------------


class TestLossArguments:
    B = jnp.zeros(4)

    @pytest.mark.parametrize("kw, match", [
        (dict(label_smoothing=2.0), r"label_smoothing must be in \[0.0, 1.0\], got 2.0"),
        (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0.0, 1.0\]"),
        (dict(label_smoothing=jnp.asarray([0.1, 0.2, 1.5, 0.0])),
         r"label_smoothing must be in \[0.0, 1.0\], got an array holding 1.5"),
        (dict(beta=-0.1), r"beta must be > 0.0, got -0.1"),
        (dict(beta=float("nan")), r"beta must be > 0.0, got nan"),
        (dict(loss_type="robust", label_smoothing=0.5),
         r"loss_type='robust' needs 0 <= label_smoothing < 0.5, got 0.5"),
        (dict(loss_type="discopop", discopop_tau=0.0), r"discopop_tau must be > 0.0"),
    ])
    def test_dpo_loss(self, kw, match):
        with pytest.raises(ValueError, match=match):
            losses.dpo_loss(self.B, self.B, self.B, self.B, **kw)

    @pytest.mark.parametrize("kw, name", [(dict(gamma=2.0), "gamma"), (dict(lam=2.0), "lam"),
                                          (dict(gamma=2.0, lam=2.0), "gamma"),
                                          (dict(lam=-0.5), "lam")])
    def test_gae(self, kw, name):
        x = jnp.zeros((2, 3))
        with pytest.raises(ValueError, match=rf"{name} must be in \[0.0, 1.0\]"):
            losses.gae(x, x, jnp.ones((2, 3)), **kw)

    @pytest.mark.parametrize("call, match", [
        (lambda: losses.bradley_terry_loss(jnp.zeros(3), jnp.zeros(3), label_smoothing=2.0),
         "label_smoothing"),
        (lambda: losses.kto_loss(jnp.zeros(3), jnp.zeros(3), jnp.ones(3), reference_kl=0.0,
                                 beta=0.0), "beta must be > 0.0"),
        (lambda: losses.ppo_clip_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2),
                                      clip_eps=float("nan")), "clip_eps must be >= 0.0"),
        (lambda: losses.kl_penalized_rewards(jnp.zeros(2), jnp.zeros((2, 3)), jnp.zeros((2, 3)),
                                             jnp.ones((2, 3)), kl_coef=-1.0), "kl_coef"),
        (lambda: losses.adaptive_kl_controller(0.1, 6.0, float("inf")), "horizon"),
        (lambda: losses.kl_k3(jnp.zeros(2), jnp.zeros(2), clamp=-1.0), "clamp"),
    ])
    def test_other_losses_name_the_argument(self, call, match):
        with pytest.raises(ValueError, match=match):
            call()

    @pytest.mark.parametrize("fn", [losses.masked_sum, losses.masked_mean, losses.masked_var,
                                    losses.masked_whiten])
    def test_mask_values_other_than_0_1_are_refused(self, fn):
        x = jnp.ones((2, 3))
        mask = np.array([[1, 1, 0], [1, 2, 0]], np.float32)
        with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 .*got 2.0 at index "
                                             r"\(1, 1\)"):
            fn(x, mask)
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            fn(x, jnp.asarray(mask * 0.5))
        fn(x, mask > 0)  # bool masks are always 0/1
        fn(x, np.minimum(mask, 1))

    def test_mask_check_costs_nothing_under_jit_and_checkify_reports_it(self):
        x, mask = jnp.ones((2, 3)), jnp.asarray([[1, 1, 0], [1, 2, 0]], jnp.float32)
        assert float(jax.jit(losses.masked_sum)(x, mask)) == 5.0  # unchecked, as documented
        checked = jax.jit(checkify.checkify(losses.masked_sum, errors=checkify.user_checks))
        err, _ = checked(x, mask)
        with pytest.raises(checkify.JaxRuntimeError, match="mask must hold only 0 and 1"):
            err.throw()
        err, out = checked(x, jnp.minimum(mask, 1))
        assert err.get() is None and float(out) == 4.0

    def test_traced_checks_give_the_same_program_on_every_trace(self):
        # The checks' error codes come from their messages, not from a process-wide counter:
        # a function traced afresh lowers to the same program, which the persistent
        # compilation cache can serve.
        x, mask = jnp.ones((2, 3)), jnp.ones((2, 3))

        def lowered():
            return jax.jit(lambda a, m: losses.masked_sum(a, m)).lower(x, mask).as_text()

        assert lowered() == lowered()
        # Two different checks in one function still report their own messages.
        def both(logits, ids, m):
            return losses.masked_sum(losses.token_logps(logits, ids), m)

        checked = jax.jit(checkify.checkify(both, errors=checkify.user_checks))
        logits, ids = jnp.zeros((2, 3, 5)), jnp.asarray([[0, 4, 2], [1, 1, 1]])
        err, _ = checked(logits, ids, jnp.asarray([[1, 1, 0], [1, 2, 0]], jnp.float32))
        with pytest.raises(checkify.JaxRuntimeError, match="mask must hold only 0 and 1"):
            err.throw()
        err, _ = checked(logits, ids.at[0, 1].set(7), jnp.ones((2, 3)))
        with pytest.raises(checkify.JaxRuntimeError, match=r"targets must be token ids"):
            err.throw()

    def test_unchecked_functions_carry_no_checkify_effect(self):
        # A traced check is an effect (JAX then dispatches on its Python path); the library's
        # jitted steps trace without them (`losses.unchecked`), and checkify finds none there.
        x, bad = jnp.ones((2, 3)), jnp.asarray([[1, 2, 0], [1, 1, 1]], jnp.float32)
        assert jax.make_jaxpr(losses.masked_sum)(x, bad).effects
        assert not jax.make_jaxpr(losses.unchecked(losses.masked_sum))(x, bad).effects
        checked = checkify.checkify(losses.unchecked(losses.masked_sum),
                                    errors=checkify.user_checks)
        err, out = jax.jit(checked)(x, bad)
        assert err.get() is None and float(out) == 6.0  # the mask's 2 weighs its token twice
        with losses.traced_checks(False):
            assert not jax.make_jaxpr(lambda a, m: losses.masked_sum(a, m))(x, bad).effects

    def test_sequence_logps_and_gae_masks(self):
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            losses.sequence_logps(jnp.zeros((2, 3)), np.full((2, 3), 3.0))
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            losses.gae(jnp.zeros((2, 3)), jnp.zeros((2, 3)), np.full((2, 3), -1.0))


# ---------------------------------------------------------------------------------------------
# (8) hyper-parameters: every config field is checked where it is defined
# ---------------------------------------------------------------------------------------------


CONFIG_CASES = [
    (TrainConfig, dict(num_steps=-5), r"^num_steps must be an integer >= 0, got -5$"),
    (TrainConfig, dict(seed=-1), r"seed must be an integer in \[0, 2147483647\]"),
    (TrainConfig, dict(eval_every=-1), "eval_every"),
    (TrainConfig, dict(eval_batches=0), "eval_batches must be None or an integer >= 1"),
    (TrainConfig, dict(nan_policy="ignore"), r"nan_policy='ignore' is not one of \['skip', 'stop'\]"),
    (OptimizerConfig, dict(learning_rate=-1e-3),
     r"optimizer.learning_rate must be a finite number > 0, got -0.001"),
    (OptimizerConfig, dict(learning_rate=math.inf), "optimizer.learning_rate"),
    (OptimizerConfig, dict(end_learning_rate=1.0), r"optimizer.end_learning_rate=1.0 must be <= "
                                                   r"learning_rate=0.0001"),
    (OptimizerConfig, dict(b2=1.0), r"optimizer.b2 must be a finite number in \[0, 1\)"),
    (OptimizerConfig, dict(eps=0.0), "optimizer.eps"),
    (OptimizerConfig, dict(weight_decay=-0.1), "optimizer.weight_decay"),
    (OptimizerConfig, dict(max_grad_norm=0.0), "optimizer.max_grad_norm must be None or"),
    (OptimizerConfig, dict(grad_accum_steps=0), "optimizer.grad_accum_steps"),
    (OptimizerConfig, dict(warmup_steps=-1), "optimizer.warmup_steps"),
    (OptimizerConfig, dict(schedule="exp"), "optimizer.schedule='exp' is not one of"),
    (DataSpec, dict(batch_size=0), "data.batch_size must be an integer >= 1, got 0"),
    (DataSpec, dict(max_length=0), "data.max_length"),
    (DataSpec, dict(max_prompt_length=0), "data.max_prompt_length must be None or an integer"),
    (DataSpec, dict(num_responses=1), "data.num_responses"),
    (DataSpec, dict(buckets=(32, 0)), "data.buckets must be positive integers"),
    (DataSpec, dict(overlong="cut"), r"data.overlong='cut' is not one of \['truncate', 'skip', "
                                     r"'error'\]"),
    (DataSpec, dict(packing=True, prefix_sharing=True), "cannot be combined with packing"),
    (ModelSpec, dict(preset="gpt5"), "model.preset='gpt5' is not a model preset"),
    (ModelSpec, dict(lora_rank=-1), "model.lora_rank"),
    (ModelSpec, dict(lora_alpha=0.0), "model.lora_alpha"),
    (ModelSpec, dict(hidden_size=0), "model.hidden_size must be None or an integer >= 1"),
    (CheckpointConfig, dict(keep_last=0), "checkpoint.keep_last must be an integer >= 1"),
    (CheckpointConfig, dict(every_steps=-2), "checkpoint.every_steps"),
    (LoggingConfig, dict(every_steps=0), "logging.every_steps"),
    (DPOConfig, dict(beta=-0.1), r"^beta must be a finite number > 0, got -0.1$"),
    (DPOConfig, dict(label_smoothing=2.0), r"label_smoothing must be a finite number in \[0, 0.5\]"),
    (DPOConfig, dict(desirable_weight=0.0), "desirable_weight"),
    (DPOConfig, dict(loss_weights=(1.0, -1.0)), "loss_weights must be finite numbers >= 0"),
    (RMConfig, dict(train_heads=("x",)), r"train_heads=\['x'\] names \['x'\], not among"),
    (RMConfig, dict(head_names=()), "head_names must be one or more distinct names"),
    (RMConfig, dict(center_rewards_coefficient=-1.0), "center_rewards_coefficient"),
    (PPOConfig, dict(gamma=2.0), r"gamma must be a finite number in \[0, 1\], got 2.0"),
    (PPOConfig, dict(lam=2.0), r"lam must be a finite number in \[0, 1\]"),
    (PPOConfig, dict(clip_range=0.0), "clip_range must be a finite number > 0"),
    (PPOConfig, dict(num_minibatches=3), "num_minibatches=3 must divide data.batch_size=8"),
    (GRPOConfig, dict(epsilon=-0.2), "epsilon must be a finite number > 0"),
    (GRPOConfig, dict(delta=0.5), "delta must be None or a finite number > 1"),
    (GRPOConfig, dict(num_generations=0), "num_generations must be an integer >= 1"),
    (RLOOConfig, dict(num_generations=1), "num_generations must be >= 2 for RLOO"),
    (RejectionSamplingConfig, dict(sft_batch_size=3), "sft_batch_size=3 must divide"),
    (RolloutConfig, dict(max_new_tokens=0), "rollout.max_new_tokens must be an integer >= 1"),
    (RolloutConfig, dict(top_p=1.5), r"rollout.top_p must be None or a finite number in \(0, 1\]"),
    (RolloutConfig, dict(temperature=0.0), "rollout.temperature must be a finite number > 0"),
]


@pytest.mark.parametrize("cls, kwargs, match", CONFIG_CASES,
                         ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in CONFIG_CASES])
def test_config_fields_are_checked_where_defined(cls, kwargs, match):
    with pytest.raises(FieldError, match=match):
        cls(**kwargs)


def test_mesh_config_names_the_axis():
    with pytest.raises(ValueError, match=r"mesh.fsdp must be an integer >= 1 or -1"):
        MeshConfig(fsdp=0)
    with pytest.raises(ValueError, match="mesh.data must be"):
        MeshConfig(data=True)


def test_every_trainer_config_default_is_valid():
    for cls in (SFTConfig, RMConfig, DPOConfig, PPOConfig, GRPOConfig, RLOOConfig,
                RejectionSamplingConfig):
        cls()


@pytest.mark.parametrize("argv, match", [
    (["--num-steps", "-5"], "num_steps must be an integer >= 0, got -5"),
    (["--optimizer.learning-rate", "-1e-3"], "optimizer.learning_rate must be a finite number > 0"),
    (["--beta", "-0.1"], "beta must be a finite number > 0, got -0.1"),
    (["--data.overlong", "cut"], "cut"),
])
def test_cli_refuses_out_of_range_hyper_parameters(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dpo", "--output-dir", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    assert match in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


def test_yaml_out_of_range_names_file_line_and_field(tmp_path, capsys):
    path = tmp_path / "dpo.yaml"
    path.write_text("num_steps: 3\noptimizer:\n  warmup_steps: 2\n  learning_rate: -0.001\n")
    assert cli.main(["dpo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 4: config.optimizer.learning_rate must be a finite number > 0" in err


# ---------------------------------------------------------------------------------------------
# (9c) YAML floats written without a dot
# ---------------------------------------------------------------------------------------------


def test_yaml_exponent_float_is_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: {learning_rate: 1e-4, eps: 1E-6}\nbeta: 5e-2\n")
    assert yaml.safe_load(path.read_text())["optimizer"]["learning_rate"] == "1e-4"  # PyYAML
    config = config_from_yaml(DPOConfig, path)
    assert config.optimizer.learning_rate == 1e-4 and isinstance(config.beta, float)
    assert config.optimizer.eps == 1e-6 and config.beta == 0.05


def test_yaml_text_in_a_float_field_says_it_is_a_string(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  learning_rate: fast\n")
    with pytest.raises(ConfigError, match=r"line 2: config.optimizer.learning_rate: expected a "
                                          r"number, got the string 'fast'"):
        config_from_yaml(DPOConfig, path)


# ---------------------------------------------------------------------------------------------
# (9d, 5) checks before the model is built: batch vs. mesh, row length vs. positions
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_build(monkeypatch):
    """Fails the test if a trainer reaches model construction."""
    import rlhf_jax.train.dpo as dpo
    import rlhf_jax.train.sft as sft

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    for module in (sft, dpo):
        monkeypatch.setattr(module, "build_model", refuse)


def test_batch_not_divisible_by_the_mesh_names_batch_size_and_mesh(tmp_path, no_model_build):
    from rlhf_jax.train.sft import train_sft

    config = SFTConfig(output_dir=str(tmp_path), model=TINY, num_steps=1, logging=QUIET,
                       data=DataSpec(synthetic="topic", batch_size=12, max_length=32))
    with pytest.raises(ValueError, match=r"data.batch_size=12 is not divisible by the 8 batch "
                                         r"shards of the mesh \(data=-1, fsdp=1, tensor=1\) on 8 "
                                         r"devices: data=8 x fsdp=1"):
        train_sft(config)
    config = SFTConfig(output_dir=str(tmp_path), model=TINY, mesh=MeshConfig(data=2, tensor=4),
                       data=DataSpec(synthetic="topic", batch_size=6, eval_batch_size=3,
                                     max_length=32))
    with pytest.raises(ValueError, match=r"data.eval_batch_size=3 is not divisible by the 2"):
        train_sft(config)
    config = SFTConfig(output_dir=str(tmp_path), model=TINY,
                       data=DataSpec(synthetic="topic", max_length=32),
                       optimizer=OptimizerConfig(grad_accum_steps=3))
    with pytest.raises(ValueError, match="optimizer.grad_accum_steps=3 must divide "
                                         "data.batch_size=8"):
        train_sft(config)
    assert not any(tmp_path.iterdir())


def test_rows_longer_than_the_positions_are_refused_before_the_model(tmp_path, capsys,
                                                                     no_model_build):
    argv = ["sft", "--output-dir", str(tmp_path / "sft"), *SMALL_CLI, "--data.max-length", "256",
            "--num-steps", "1"]
    with pytest.raises(ValueError, match=r"data.max_length=256 allows rows of 256 tokens, but the "
                                         r"model \(model.preset='tiny_gpt2'\) has "
                                         r"max_position_embeddings=64: lower data.max_length "
                                         r"\(longer examples are then handled by "
                                         r"data.overlong='truncate'"):
        cli.main(argv)
    ref = dataclasses_replace(TINY, max_position_embeddings=32)
    config = DPOConfig(model=TINY, ref_model=ref, data=DataSpec(synthetic="topic", max_length=48))
    with pytest.raises(ValueError, match=r"the ref_model .* has max_position_embeddings=32"):
        check_run_config(config)


def test_online_prompt_plus_response_must_fit_the_positions():
    config = PPOConfig(model=TINY, rollout=RolloutConfig(max_new_tokens=60))
    with pytest.raises(ValueError, match=r"prompts of up to 16 tokens .* plus "
                                         r"rollout.max_new_tokens=60 need 76 positions, but the "
                                         r"model .* has max_position_embeddings=64"):
        check_run_config(config)
    check_run_config(PPOConfig(model=TINY, rollout=RolloutConfig(max_new_tokens=48)))


def test_host_divisibility_binds_the_offline_trainers_only(monkeypatch):
    """On 2 hosts an offline batch of 3 rows cannot be split between them; the online trainers
    read the whole prompt batch on every host, so theirs can be any size."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for config in (DPOConfig(model=TINY, data=DataSpec(synthetic="topic", batch_size=3,
                                                       max_length=32)),
                   SFTConfig(model=TINY, data=DataSpec(synthetic="topic", batch_size=8,
                                                       eval_batch_size=3, max_length=32))):
        with pytest.raises(ValueError, match=r"data\.(eval_)?batch_size=3 must be divisible by "
                                             r"the 2 hosts"):
            check_run_config(config)
    for config in (PPOConfig(model=TINY, data=DataSpec(synthetic="topic", batch_size=3,
                                                       max_length=16, max_prompt_length=16)),
                   GRPOConfig(model=TINY, data=DataSpec(synthetic="topic", batch_size=3,
                                                        max_length=16, max_prompt_length=16)),
                   RejectionSamplingConfig(model=TINY, sft_batch_size=3, data=DataSpec(
                       synthetic="topic", batch_size=3, max_length=16, max_prompt_length=16))):
        check_run_config(config)


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# ---------------------------------------------------------------------------------------------
# (7) truncation is counted; pairs made identical by truncation are skipped and counted
# ---------------------------------------------------------------------------------------------


class TestTruncationCounts:
    tok = build_tokenizer()

    def test_prompts_and_responses_are_counted(self):
        examples = [
            SFTExample("ab" * 10, "cd", None, "x:1"),            # prompt cut (20 > 8)
            SFTExample("ab", "cd" * 20, None, "x:2"),            # response cut (2 + 41 > 16)
            SFTExample("ab" * 10, "cd" * 20, None, "x:3"),       # both
            SFTExample("ab", "cd", None, "x:4"),                 # neither
            PreferenceExample("ab", "c" * 30, "d" * 30, 0.0, 1.0, "y:1"),  # two responses cut
        ]
        config = TokenizeConfig(max_prompt_length=8, max_length=16)
        out, report = tokenize_examples(examples, self.tok, config=config)
        assert len(out) == 5 and report.num_skipped == 0
        assert report.truncated == {"prompt": 2, "response": 4}
        assert "truncated prompt=2, response=4" in str(report)
        assert report.to_dict()["truncated"] == {"prompt": 2, "response": 4, "conversation": 0}

    def test_conversations_are_counted(self):
        messages = ({"role": "user", "content": "ab" * 10},
                    {"role": "assistant", "content": "cd" * 10})
        example = SFTExample(None, None, messages, "m:1")
        (full,), report = tokenize_examples([example], self.tok)
        assert report.truncated == {}
        (cut,), report = tokenize_examples(
            [example], self.tok, config=TokenizeConfig(max_length=len(full.input_ids) - 3))
        assert report.truncated == {"conversation": 1}
        assert len(cut.input_ids) == len(full.input_ids) - 3

    @pytest.mark.parametrize("overlong", ["skip", "error"])
    def test_other_policies_skip_or_raise_and_truncate_nothing(self, overlong):
        examples = [SFTExample("ab", "cd" * 20, None, "x:7"), SFTExample("ab", "cd", None, "x:8")]
        config = TokenizeConfig(max_length=16, overlong=overlong)
        if overlong == "error":
            with pytest.raises(ValueError, match=r"x:7: the sequence has 43 tokens, more than 16"):
                tokenize_examples(examples, self.tok, config=config)
            return
        out, report = tokenize_examples(examples, self.tok, config=config)
        assert len(out) == 1 and report.skipped == {"overlong": 1} and report.truncated == {}

    def test_pair_identical_after_truncation_is_skipped_and_counted(self):
        examples = [
            PreferenceExample("ab", "c" * 20 + "x", "c" * 20 + "y", 0.0, 1.0, "p.jsonl:1"),
            PreferenceExample("ab", "cx", "cy", 0.0, 1.0, "p.jsonl:2"),
            RankingExample("ab", ("c" * 20 + "x", "c" * 20 + "y", "d"), (0, 1, 2), "r.jsonl:1"),
        ]
        config = TokenizeConfig(max_length=12)
        out, report = tokenize_examples(examples, self.tok, config=config, on_error="raise")
        assert [e.origin for e in out] == ["p.jsonl:2"]
        assert report.skipped == {"identical_after_tokenization": 2}
        assert report.first_skipped[0].startswith(
            "p.jsonl:1: chosen and rejected are identical after truncation to max_length=12")
        assert report.truncated == {}  # a skipped example adds no truncation count

    def test_build_data_reports_train_and_eval_separately(self, tmp_path):
        # differs only past the cut: identical after truncation, skipped
        same = {"prompt": "ab" * 20, "chosen": "c" * 40 + "x", "rejected": "c" * 40 + "y"}
        # prompt and both responses cut, still different: kept, 1 + 2 truncations
        cut = {"prompt": "ab" * 20, "chosen": "x" + "c" * 40, "rejected": "y" + "c" * 40}
        ok_pair = {"prompt": "ab", "chosen": "cx", "rejected": "cy"}
        train = _write_jsonl(tmp_path / "train.jsonl", [same, cut, ok_pair] * 8)
        evals = _write_jsonl(tmp_path / "eval.jsonl", [ok_pair] * 8 + [same, cut])
        spec = DataSpec(synthetic="topic", path=str(train), eval_path=str(evals), batch_size=8,
                        max_prompt_length=16, max_length=24)
        bundle = build_data(spec, format="preference", tokenizer=self.tok, seed=0)
        train_report, eval_report = bundle.reports["train"], bundle.reports["eval"]
        assert train_report.skipped == {"identical_after_tokenization": 8}
        assert train_report.truncated == {"prompt": 8, "response": 16}
        assert eval_report.skipped == {"identical_after_tokenization": 1}
        assert eval_report.truncated == {"prompt": 1, "response": 2}
        assert bundle.skipped == {"identical_after_tokenization": 9}


def test_cli_overlong_policy_and_summary_json(tmp_path, capsys):
    """`--data.overlong` from the command line; the truncation counts reach the printed summary
    and `summary.json`, split into train and eval."""
    rows = [{"prompt": "ab" * 12, "completion": "cd"}, {"prompt": "ab", "completion": "cd" * 30},
            {"prompt": "ab", "completion": "cd"}, {"prompt": "ba", "completion": "dc"}]
    train = _write_jsonl(tmp_path / "train.jsonl", rows * 4)
    evals = _write_jsonl(tmp_path / "eval.jsonl", rows[1:] * 3)
    out = tmp_path / "run"
    argv = ["sft", "--output-dir", str(out), *SMALL_CLI, "--num-steps", "1",
            "--data.synthetic", "topic", "--data.path", str(train), "--data.eval-path", str(evals),
            "--data.max-prompt-length", "16", "--data.max-length", "32", "--data.batch-size", "8",
            "--data.eval-batch-size", "8"]
    assert load_config(SFTConfig, [*argv[1:], "--data.overlong", "skip"]).data.overlong == "skip"
    assert cli.main([*argv, "--data.overlong", "truncate"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary and summary["step"] == 1
    data = on_disk["data"]
    assert data["train"]["read"] == data["train"]["loaded"] == 16
    assert data["train"]["skipped"] == {}
    assert data["train"]["truncated"] == {"prompt": 4, "response": 4, "conversation": 0}
    assert data["eval"]["read"] == data["eval"]["loaded"] == 9
    assert data["eval"]["truncated"] == {"prompt": 0, "response": 3, "conversation": 0}
