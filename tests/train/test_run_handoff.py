"""Runs that feed each other from the command line: `rlhf-jax rm` -> `rlhf-jax ppo` with
`reward.source=model` -> `rlhf-jax export`; `load_reward_model`; multi-host initialisation."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import cli
from rlhf_jax.train.export import load_policy, read_checkpoint_state
from rlhf_jax.train.rm import load_reward_model

TINY = ["--model.hidden-size", "32", "--model.num-layers", "1", "--model.num-heads", "2",
        "--logging.progress", "none", "--logging.no-tensorboard", "--logging.every-steps", "1"]


def _summary(capsys) -> dict:
    printed = capsys.readouterr().out
    return json.loads(printed[printed.index("{"):])


@pytest.fixture(scope="module")
def rm_run(two_head_rm_run):
    """`rlhf-jax rm` on a tiny model, heads "helpful" and "harmless" (tests/conftest.py)."""
    return two_head_rm_run


def test_load_reward_model_restores_weights_heads_and_normalisation(rm_run):
    model = load_reward_model(str(rm_run))
    assert model.head_names == ("helpful", "harmless")
    _, raw = read_checkpoint_state(str(rm_run / "checkpoints"))
    np.testing.assert_array_equal(np.asarray(model.score_head.kernel[...]),
                                  raw["params"]["score_head"]["kernel"]["value"])
    stats = json.loads((rm_run / "reward_normalization.json").read_text())
    np.testing.assert_allclose(np.asarray(model.norm_gain[...]), stats["gain"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model.norm_bias[...]), stats["bias"], rtol=1e-6)
    ids = jnp.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    rewards = model(ids, attention_mask=jnp.ones_like(ids))
    assert rewards.shape == (2, 2) and np.all(np.isfinite(np.asarray(rewards)))


def test_load_reward_model_errors_name_the_problem(rm_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml not found"):
        load_reward_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 999"):
        load_reward_model(str(rm_run), step=999)


def test_rm_then_ppo_with_the_reward_model_then_export(rm_run, tmp_path, capsys):
    capsys.readouterr()
    ppo = tmp_path / "ppo"
    status = cli.main(["ppo", "--output-dir", str(ppo), *TINY, "--num-steps", "1",
                       "--num-minibatches", "1", "--reward.source", "model",
                       "--reward.path", str(rm_run), "--reward.head", "harmless"])
    assert status == 0
    metrics = _summary(capsys)["metrics"]
    # the proxy score comes from the reward model, the gold reward from the synthetic task
    assert np.isfinite(metrics["ppo/score_mean"]) and np.isfinite(metrics["ppo/gold_reward"])

    with pytest.raises(ValueError, match="did not train a reward model"):
        load_reward_model(str(ppo))
    hf_dir = tmp_path / "hf"
    assert cli.main(["export", "--run-dir", str(ppo), "--output-dir", str(hf_dir)]) == 0
    from rlhf_jax.models.hf import from_pretrained

    exported = from_pretrained(hf_dir)
    policy, step, _ = load_policy(str(ppo))
    _, raw = read_checkpoint_state(str(ppo / "checkpoints"))
    want = raw["policy"]["params"]["backbone"]["embed"]["embedding"]["value"]
    assert step == 1
    np.testing.assert_array_equal(np.asarray(exported.backbone.embed.embedding[...]), want)
    np.testing.assert_array_equal(np.asarray(policy.backbone.embed.embedding[...]), want)
    # the run's config was written with the vocabulary the policy was built with
    assert want.shape[0] == exported.config.vocab_size
    with pytest.raises(ValueError, match="trained a reward or value model"):
        load_policy(str(rm_run))


def test_distributed_environment_initialises_jax_distributed(monkeypatch, tmp_path):
    import rlhf_jax.sharding as sharding
    import rlhf_jax.train.export as export

    events = []
    monkeypatch.setattr(sharding, "initialize_distributed",
                        lambda **kw: events.append(("init", kw)))
    monkeypatch.setattr(export, "export_policy", lambda config: events.append(("run", None)))
    argv = ["export", "--run-dir", str(tmp_path), "--output-dir", str(tmp_path / "hf")]
    monkeypatch.setenv(cli.DISTRIBUTED_ENV, "1")
    assert cli.main(argv) == 0
    assert events == [("init", {"force": True}), ("run", None)]  # initialised before the run
    events.clear()
    monkeypatch.setenv(cli.DISTRIBUTED_ENV, "0")
    assert cli.main(argv) == 0
    assert events == [("run", None)]
