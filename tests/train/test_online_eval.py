"""Held-out evaluation of the online trainers (`--eval-every`): the sequence KL against a float64
NumPy reference, `OnlineTrainer.evaluate` through the public API, and a PPO run from the command
line (with `--kl-estimator k2` and frozen bottom layers)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import cli, sharding
from rlhf_jax.data.synthetic import build_tokenizer, get_task
from rlhf_jax.generation import TokenRewardFunction
from rlhf_jax.models import CausalLM
from rlhf_jax.train.builders import build_model, model_config
from rlhf_jax.train.config import DataSpec, LoggingConfig, ModelSpec, OptimizerConfig
from rlhf_jax.train.data import build_data
from rlhf_jax.train.export import read_checkpoint_state
from rlhf_jax.train.grpo import GRPOConfig, GRPOTrainer
from rlhf_jax.train.logging import MetricsLogger, SampleTable, read_metrics
from rlhf_jax.train.online import HeldOut
from rlhf_jax.train.online_eval import sequence_kl
from rlhf_jax.train.rollout import Rollout, RolloutConfig

TOKENIZER = build_tokenizer()
TASK = get_task("topic")
KEYS = ("reward", "gold_reward", "kl_ref_exact", "kl_ref_k1", "kl_ref_k3", "response_length",
        "eos_rate", "num_prompts")


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class TestSequenceKL:
    def test_matches_numpy(self):
        rng = np.random.default_rng(0)
        b, p, n, v = 3, 2, 4, 7
        logits = rng.normal(size=(b, p + n, v)).astype(np.float32) * 2
        ref_logits = rng.normal(size=(b, p + n, v)).astype(np.float32) * 2
        response = rng.integers(0, v, size=(b, n)).astype(np.int32)
        mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.int32)
        seq = np.concatenate([np.zeros((b, p), np.int32), response], axis=1)
        seq_mask = np.concatenate([np.ones((b, p), np.int32), mask], axis=1)
        rollout = Rollout(sequences=jnp.asarray(seq), sequence_mask=jnp.asarray(seq_mask),
                          response_ids=jnp.asarray(response), response_mask=jnp.asarray(mask),
                          finished=jnp.zeros((b,), bool))
        out = jax.jit(sequence_kl)(jnp.asarray(logits), jnp.asarray(ref_logits), rollout)

        lp = _np_log_softmax(np.float64(logits[:, p - 1:-1]))
        lq = _np_log_softmax(np.float64(ref_logits[:, p - 1:-1]))
        exact = (np.exp(lp) * (lp - lq)).sum(-1)
        tok = lambda a: np.take_along_axis(a, response[..., None], -1)[..., 0]
        d = tok(lq) - tok(lp)  # log r
        np.testing.assert_allclose(out.exact, (exact * mask).sum(-1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.k1, (-d * mask).sum(-1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.k3, ((np.expm1(d) - d) * mask).sum(-1), rtol=1e-5,
                                   atol=1e-6)
        assert np.all(np.asarray(out.exact)[2:] == 0) and np.all(np.asarray(out.k1)[2:] == 0)
        assert np.all(np.asarray(out.exact)[:2] > 0)


def test_sample_table_in_jsonl_and_tensorboard(tmp_path):
    table = SampleTable(columns=("prompt", "response", "reward"),
                        rows=(("a|b", "line\none", 0.5), ("c", "d", None)))
    assert table.markdown().splitlines() == [
        "| prompt | response | reward |", "|---|---|---|",
        "| a\\|b | line\\none | 0.5 |", "| c | d | None |"]
    with MetricsLogger(tmp_path, LoggingConfig(progress="none")) as logger:
        logger.log(3, {"x/eval/reward": 1.0})
        logger.log_table(3, "x/eval/samples", table)
    rows = read_metrics(tmp_path)
    assert rows[1] == {"step": 3, "x/eval/samples": [
        {"prompt": "a|b", "response": "line\none", "reward": 0.5},
        {"prompt": "c", "response": "d", "reward": None}]}
    assert any(f.name.startswith("events") for f in (tmp_path / "tensorboard").iterdir())


def test_grpo_evaluate_through_the_api(tmp_path):
    """At the start the policy is the reference: every KL is exactly 0; the proxy reward is the
    gold reward here, so the two agree; evaluation is deterministic; a moved policy has a
    positive KL."""
    spec = DataSpec(synthetic="topic", batch_size=8, max_length=16, max_prompt_length=16,
                    num_train=64, num_eval=8)
    data = build_data(spec, format="prompt", tokenizer=TOKENIZER, seed=0)
    config = GRPOConfig(output_dir=str(tmp_path), num_steps=2, data=spec, eval_every=1,
                        rollout=RolloutConfig(max_new_tokens=8, temperature=0.7),
                        num_generations=2, num_iterations=1, num_minibatches=1,
                        optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"))
    model_spec = ModelSpec(preset="tiny_gpt2", vocab_size=len(TOKENIZER), hidden_size=32,
                           num_layers=1, num_heads=2)
    trainer = GRPOTrainer(
        config, policy=CausalLM(model_config(model_spec), rngs=nnx.Rngs(0)),
        reward=TokenRewardFunction(TASK.gold_reward_tokens, name="gold"), prompts=data.train,
        eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id,
        mesh=sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1]))
    with pytest.raises(ValueError, match="set_held_out"):
        trainer.evaluate()
    trainer.set_held_out(HeldOut(prompt_batches=data.eval_batches, gold_task=TASK,
                                 decode=TOKENIZER.decode))
    first = trainer.evaluate()
    assert set(first) == {f"grpo/eval/{k}" for k in KEYS} | {"grpo/eval/samples"}
    for k in ("kl_ref_exact", "kl_ref_k1", "kl_ref_k3"):
        assert first[f"grpo/eval/{k}"] == 0.0, k
    assert first["grpo/eval/num_prompts"] == 8.0
    assert first["grpo/eval/reward"] == pytest.approx(first["grpo/eval/gold_reward"], abs=1e-6)
    assert 1.0 <= first["grpo/eval/response_length"] <= 8.0
    assert 0.0 <= first["grpo/eval/eos_rate"] <= 1.0
    table = first["grpo/eval/samples"]
    assert isinstance(table, SampleTable) and len(table.rows) == 4
    assert all(isinstance(r[0], str) and isinstance(r[1], str) for r in table.rows)
    again = trainer.evaluate()
    assert {k: v for k, v in again.items() if k != "grpo/eval/samples"} == \
        {k: v for k, v in first.items() if k != "grpo/eval/samples"}
    # A moved policy (noise on its weights, no update compiled): every KL becomes positive.
    @jax.jit
    def move(params):
        keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
        return jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype),
                            params)

    moved = move(trainer.state.policy.params)
    trainer.state = trainer.state._replace(policy=trainer.state.policy._replace(params=moved))
    later = trainer.evaluate()
    assert later["grpo/eval/kl_ref_exact"] > 0.0 and later["grpo/eval/kl_ref_k3"] > 0.0


COMMON = ["--model.hidden-size", "32", "--model.num-layers", "2", "--model.num-heads", "2",
          "--logging.progress", "none", "--logging.every-steps", "1", "--num-steps", "2",
          "--rollout.max-new-tokens", "8"]
PPO_ARGS = [*COMMON, "--num-minibatches", "1", "--data.num-eval", "8"]


@pytest.mark.slow
def test_ppo_cli_eval_every_with_k2_and_frozen_layers(tmp_path):
    """`rlhf-jax ppo --eval-every 1 --kl-estimator k2 --model.freeze-layers 1`: held-out metrics
    and a sample table after each iteration in metrics.jsonl and TensorBoard; the bottom layer
    of the policy stays bit-identical."""
    out = tmp_path / "ppo"
    assert cli.main(["ppo", "--output-dir", str(out), *PPO_ARGS, "--eval-every", "1",
                     "--kl-estimator", "k2", "--model.freeze-layers", "1"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "ppo/eval/kl_ref_exact" in r]
    tables = [r for r in rows if "ppo/eval/samples" in r]
    assert [r["step"] for r in evals] == [1, 2] and [r["step"] for r in tables] == [1, 2]
    for r in evals:
        assert all(np.isfinite(r[f"ppo/eval/{k}"]) for k in KEYS)
        assert r["ppo/eval/kl_ref_exact"] >= 0.0 and r["ppo/eval/kl_ref_k3"] >= 0.0
        assert r["ppo/eval/num_prompts"] == 8.0
    assert set(tables[0]["ppo/eval/samples"][0]) == {"prompt", "response", "reward",
                                                      "gold_reward", "kl_ref_exact"}
    assert any(f.name.startswith("events") for f in (out / "tensorboard").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_metrics"]["ppo/eval/kl_ref_exact"] == evals[-1]["ppo/eval/kl_ref_exact"]

    spec = ModelSpec(hidden_size=32, num_layers=2, num_heads=2, vocab_size=len(TOKENIZER))
    init = nnx.state(build_model(spec, seed=0), nnx.Param)
    _, state = read_checkpoint_state(str(out / "checkpoints"))
    trained = state["policy"]["params"]["backbone"]["layers"]["mlp"]["up"]["kernel"]
    start = np.asarray(init["backbone"]["layers"]["mlp"]["up"]["kernel"].get_value())
    assert np.asarray(trained["value"])[0].tobytes() == start[0].tobytes()
    assert not np.array_equal(np.asarray(trained["value"])[1], start[1])


@pytest.mark.slow
@pytest.mark.parametrize("command, ns, extra", [
    ("rloo", "rloo", ["--num-generations", "2"]),
    ("rejection-sampling", "rs", ["--sft-batch-size", "8"]),
])
def test_cli_eval_every_other_online_trainers(tmp_path, command, ns, extra):
    out = tmp_path / command
    assert cli.main([command, "--output-dir", str(out), *COMMON, *extra,
                     "--data.num-eval", "8", "--eval-every", "2", "--logging.no-tensorboard"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if f"{ns}/eval/kl_ref_exact" in r]
    assert [r["step"] for r in evals] == [2]
    assert all(np.isfinite(evals[0][f"{ns}/eval/{k}"]) for k in KEYS)
    assert any(f"{ns}/eval/samples" in r for r in rows)


def test_eval_every_without_held_out_prompts_raises(tmp_path):
    with pytest.raises(ValueError, match="eval_every=1 needs held-out prompts"):
        cli.main(["grpo", "--output-dir", str(tmp_path), *COMMON, "--data.num-eval", "0",
                  "--eval-every", "1"])
    with pytest.raises(ValueError, match=r"held-out prompt batch \(data.eval_batch_size\) has 4"):
        cli.main(["grpo", "--output-dir", str(tmp_path), *COMMON, "--data.eval-batch-size", "4",
                  "--eval-every", "1"])
