"""The online trainers from the command line (`rlhf-jax ppo|grpo|rloo|rejection-sampling`)."""

from __future__ import annotations

import json
import os

import pytest

from rlhf_jax import cli

SMALL = ["--model.hidden-size", "32", "--model.num-layers", "1", "--model.num-heads", "2",
         "--logging.progress", "none", "--logging.no-tensorboard", "--logging.every-steps", "1",
         "--num-steps", "2"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, extra, metric",
    [
        ("ppo", ["--num-minibatches", "1"], "ppo/gold_reward"),
        ("grpo", ["--num-generations", "2"], "grpo/gold_reward"),
        ("rloo", ["--num-generations", "2"], "rloo/gold_reward"),
        ("rejection-sampling", ["--sft-batch-size", "8"], "rs/gold_reward"),
    ],
)
def test_command_runs_from_a_clean_directory(tmp_path, capsys, command, extra, metric):
    out = tmp_path / command
    status = cli.main([command, "--output-dir", str(out), *SMALL, *extra])
    assert status == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["step"] == 2 and not summary["preempted"]
    assert os.path.exists(out / "config.yaml")
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(metric in r for r in rows)
    assert os.path.isdir(out / "checkpoints")


def test_minibatch_smaller_than_the_mesh_raises(tmp_path):
    # 8 prompts in 2 minibatches of 4 rows cannot be split over the 8 test devices
    with pytest.raises(ValueError, match="4 rows, not divisible by the 8 batch shards"):
        cli.main(["ppo", "--output-dir", str(tmp_path), *SMALL, "--num-minibatches", "2"])
