"""Real multi-process runs on one machine (`python -m rlhf_jax.launch`, 2 processes x 4 CPU
devices, gloo collectives) against one process with 8 devices: every trainer's metrics (offline
and online), the data shares of the hosts, checkpoints across process counts, a killed process,
and the experiment pipeline with one shared output directory on the emulated bucket."""

import gzip
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import yaml
from etils import epath
from multihost_runs import (
    QUIET,
    TINY_MODEL,
    assert_same_metrics,
    cli,
    cpu_env,
    launch_command,
    read_jsonl,
    run,
    write_config,
)

from rlhf_jax import cli as rlhf_cli
from rlhf_jax.train.logging import read_metrics

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[2]
CONSTANT_LR = {"learning_rate": 1e-3, "schedule": "constant", "warmup_steps": 0}
OFFLINE_DATA = {"batch_size": 8, "max_length": 24, "max_prompt_length": 12, "num_train": 64,
                "num_eval": 16}
CONFIGS = {
    "sft": {"data": {"synthetic": "topic", **OFFLINE_DATA}},
    "rm": {"data": {"synthetic": "topic", **OFFLINE_DATA}},
    "dpo": {"data": {"synthetic": "topic", **OFFLINE_DATA}},
    "ppo": {"data": {"synthetic": "topic", "batch_size": 8, "max_length": 16,
                     "max_prompt_length": 16, "num_eval": 16},
            "num_minibatches": 1, "rollout": {"max_new_tokens": 6}},
    "grpo": {"data": {"synthetic": "topic", "batch_size": 8, "max_length": 16,
                      "max_prompt_length": 16},
             "num_generations": 2, "rollout": {"max_new_tokens": 6}},
    "rejection-sampling": {"data": {"synthetic": "topic", "batch_size": 8, "max_length": 16,
                                    "max_prompt_length": 16},
                           "num_samples": 2, "sft_batch_size": 8,
                           "rollout": {"max_new_tokens": 6}},
}


def _config(tmp_path, command: str, **overrides) -> pathlib.Path:
    config = {"num_steps": 3, "model": TINY_MODEL, "logging": QUIET, **CONFIGS[command],
              **overrides}
    return write_config(tmp_path / f"{command}.yaml", config)


def _launched(command: str, config: pathlib.Path, out: pathlib.Path, *extra: str):
    result = run(cli(command, "--config", str(config), "--output-dir", str(out), *extra),
                 processes=2, devices=4)
    assert result.returncode == 0, result.stdout[-4000:]
    return result


# (a) -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,extra", [("sft", {}), ("rm", {}), ("dpo", {}),
                                           ("dpo", {"reference": "precomputed"})],
                         ids=["sft", "rm", "dpo", "dpo-precomputed"])
def test_trainer_on_2x4_logs_the_metrics_of_1x8(tmp_path, command, extra):
    """With `reference: precomputed` each process stores the reference table of its own
    share."""
    config = _config(tmp_path, command, **extra)
    one, two = tmp_path / "one", tmp_path / "two"
    assert rlhf_cli.main([command, "--config", str(config), "--output-dir", str(one)]) == 0
    _launched(command, config, two)
    expected, got = read_metrics(one), read_jsonl(two / "metrics.jsonl")
    if command == "rm":
        # The Bradley-Terry loss sees reward differences only: the head's bias has a zero
        # gradient up to rounding, which Adam scales to a step of up to ~lr, so the absolute
        # rewards of the two runs may differ by one offset shared by chosen and rejected.
        for a, b in zip(expected, got, strict=True):
            for split in ("rm/", "rm/eval/"):
                names = [f"{split}chosen_reward", f"{split}rejected_reward"]
                if names[0] in a:
                    offsets = [b.pop(n) - a.pop(n) for n in names]
                    assert abs(offsets[0] - offsets[1]) < 1e-5 and abs(offsets[0]) < 1e-3
    assert_same_metrics(expected, got)
    if extra.get("reference") == "precomputed":
        assert sorted(p.name for p in two.glob("reference_logps*.npz")) == [
            "reference_logps.0-of-2.npz", "reference_logps.1-of-2.npz"]


@pytest.mark.parametrize("command,extra", [("ppo", {"eval_every": 2}), ("grpo", {}),
                                           ("rejection-sampling", {})],
                         ids=["ppo-eval", "grpo", "rejection-sampling"])
def test_online_trainer_on_2x4_logs_the_metrics_of_1x8(tmp_path, command, extra):
    """Every process reads the whole prompt batch, samples it on the global mesh and scores
    the gathered rollout on the host (the topic task's gold reward, and the gold-reward metric):
    the metrics of one process, the held-out evaluation and its sample table included."""
    config = _config(tmp_path, command, **extra)
    one, two = tmp_path / "one", tmp_path / "two"
    assert rlhf_cli.main([command, "--config", str(config), "--output-dir", str(one)]) == 0
    _launched(command, config, two)
    expected, got = read_metrics(one), read_jsonl(two / "metrics.jsonl")
    assert [r["step"] for r in got if "step" in r][-1] == 3
    assert_same_metrics(expected, got)
    def texts(records):  # the sample tables' prompts and responses
        return [[(row["prompt"], row["response"]) for row in value]
                for r in records for value in r.values() if isinstance(value, list)]

    assert texts(got) == texts(expected)
    assert len(texts(got)) == (2 if "eval_every" in extra else 0)
    summary = json.loads((two / "summary.json").read_text())
    assert [p["shard"] for p in summary["data_shares"]["train"]["per_process"]] == ["0/1", "0/1"]


def test_ppo_with_a_reward_model_on_2x4_logs_the_metrics_of_1x8(tmp_path):
    """`reward.source: model` with the value model from it: the reward model's parameters
    placed on the global mesh score the global rollout there, and the run logs the metrics of
    one process (proxy score and gold reward)."""
    rm = tmp_path / "rm"
    assert rlhf_cli.main(["rm", "--config", str(_config(tmp_path, "rm", num_steps=2)),
                          "--output-dir", str(rm)]) == 0
    config = _config(tmp_path, "ppo", reward={"source": "model", "path": str(rm)},
                     value_init="reward_model")
    one, two = tmp_path / "one", tmp_path / "two"
    assert rlhf_cli.main(["ppo", "--config", str(config), "--output-dir", str(one)]) == 0
    _launched("ppo", config, two)
    expected, got = read_metrics(one), read_jsonl(two / "metrics.jsonl")
    assert [r["step"] for r in got if "step" in r][-1] == 3
    assert "ppo/gold_reward" in got[-1] and got[-1]["ppo/score_std"] > 0
    assert_same_metrics(expected, got)


def test_best_of_n_on_2x4_selects_the_rows_and_scores_of_1x8(tmp_path):
    """`rlhf_jax.generation.best_of_n` with its sampler and reward model on the global mesh
    (and a host reward beside it): both processes get the samples, scores, selection and kept
    rows of one process with 8 devices."""
    script = str(REPO / "tests" / "multihost" / "best_of_n_run.py")
    for processes, devices, name in ((1, 8, "one"), (2, 4, "two")):
        result = run([sys.executable, script, str(tmp_path / name)], processes=processes,
                     devices=devices)
        assert result.returncode == 0, result.stdout[-4000:]
    one = dict(np.load(tmp_path / "one.0.npz"))
    assert int(one.pop("processes")) == 1
    assert len(np.unique(one["best_scores"])) > 1  # not a degenerate selection
    for process in (0, 1):
        got = dict(np.load(tmp_path / f"two.{process}.npz"))
        assert int(got.pop("processes")) == 2
        for name, expected in one.items():
            if "score" in name:
                np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6,
                                           err_msg=name)
            else:
                np.testing.assert_array_equal(got[name], expected, err_msg=name)


def test_rest_resumes_mid_improve_on_2_processes_from_their_own_grow_copies(tmp_path):
    """ReST on 2 processes with a local output dir: each process writes its own copy of the
    Grow set; stopped in the middle of an Improve step and resumed, each reads its copy back
    and the run logs the metrics of an uninterrupted run on one process."""
    config = write_config(tmp_path / "rest.yaml", {
        "model": TINY_MODEL, "logging": QUIET, "optimizer": CONSTANT_LR,
        "data": {"synthetic": "topic", "batch_size": 8, "max_length": 16,
                 "max_prompt_length": 16},
        "rollout": {"max_new_tokens": 6}, "num_samples": 2, "num_grow": 1,
        "thresholds": [25.0, 50.0], "steps_per_improve": 2, "improve_batch_size": 8,
        "checkpoint": {"every_steps": 1},
    })
    one, two = tmp_path / "one", tmp_path / "two"
    assert rlhf_cli.main(["rest", "--config", str(config), "--output-dir", str(one)]) == 0
    _launched("rest", config, two, "--num-steps", "2")  # Grow, then 1 of Improve 1's 2 steps
    copies = sorted(p.name for p in (two / "grow" / "00000").iterdir())
    assert copies == ["batch_00000.0-of-2.npz", "batch_00000.1-of-2.npz"]
    _launched("rest", config, two)
    records = read_jsonl(two / "metrics.jsonl")
    assert [r["step"] for r in records if "step" in r] == [1, 2, 3, 4, 5]
    assert_same_metrics(read_metrics(one), records)


# (b) -----------------------------------------------------------------------------------------

def test_hosts_read_disjoint_shares_that_cover_the_data(tmp_path):
    """One epoch of 64 pairs in 8 steps of 8 pairs: process 0 reads 32 pairs and process 1 the
    other 32 (counted by example index in the run summary)."""
    config = _config(tmp_path, "dpo", num_steps=8)
    out = tmp_path / "two"
    _launched("dpo", config, out)
    shares = json.loads((out / "summary.json").read_text())["data_shares"]["train"]
    assert shares["num_examples"] == 64
    assert [p["examples_read"] for p in shares["per_process"]] == [32, 32]
    assert [p["distinct_examples"] for p in shares["per_process"]] == [32, 32]
    assert shares["distinct_examples"] == 64
    assert shares["read_by_several_processes"] == 0


# (c) -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,first,then", [("dpo", 2, 1), ("dpo", 1, 2), ("ppo", 1, 2)])
def test_checkpoint_restores_on_another_process_count(tmp_path, command, first, then):
    """2 steps on `first` processes, resumed to 4 steps on `then`: the metrics of 4 steps on one
    process, the data order continued across the change (for PPO, whose every process reads
    the whole prompt batch, the one position of that stream)."""
    data = {**CONFIGS[command]["data"], "num_eval": 0}
    if command == "dpo":
        data = {"synthetic": "topic", **OFFLINE_DATA, "num_eval": 0}
    config = _config(tmp_path, command, num_steps=4, optimizer=CONSTANT_LR,
                     checkpoint={"every_steps": 2}, data=data)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert rlhf_cli.main([command, "--config", str(config), "--output-dir",
                          str(reference)]) == 0

    def part(processes: int, steps: int):
        if processes == 1:
            assert rlhf_cli.main([command, "--config", str(config), "--output-dir",
                                  str(resumed), "--num-steps", str(steps)]) == 0
        else:
            _launched(command, config, resumed, "--num-steps", str(steps))

    part(first, 2)
    part(then, 4)
    assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert_same_metrics(read_metrics(reference), read_jsonl(resumed / "metrics.jsonl"))


# (d) -----------------------------------------------------------------------------------------

def _child_with_id(launcher: subprocess.Popen, process_id: str) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("RLHF_JAX_PROCESS_ID") == process_id:
            return child
    raise AssertionError(f"no child process {process_id}")


def test_killed_process_stops_the_run_and_a_restart_resumes_bit_exactly(tmp_path):
    config = _config(tmp_path, "dpo", optimizer=CONSTANT_LR, checkpoint={"every_steps": 2})
    out, reference = tmp_path / "killed", tmp_path / "reference"
    args = cli("dpo", "--config", str(config), "--output-dir", str(out))
    launcher = subprocess.Popen(
        launch_command([*args, "--num-steps", "100000"], processes=2, devices=4,
                       grace_seconds=5),
        env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    _child_with_id(launcher, "1").kill()
    killed = time.monotonic()
    output, _ = launcher.communicate(timeout=120)
    stopped_after = time.monotonic() - killed
    assert launcher.returncode != 0
    assert "process 1 exited with status 137; stopping the other processes" in output
    assert stopped_after < 30, output[-3000:]

    # restart both processes: the run resumes from its last checkpoint and ends at step 8 with
    # the metrics of an uninterrupted 2-process run, bit for bit
    restarted = run([*args, "--num-steps", "8"], processes=2, devices=4)
    assert restarted.returncode == 0, restarted.stdout[-4000:]
    _launched("dpo", config, reference, "--num-steps", "8")
    assert_same_metrics(read_jsonl(reference / "metrics.jsonl"), read_jsonl(metrics), tol=0.0)


# (e) -----------------------------------------------------------------------------------------

def test_pipeline_chain_on_2_processes_with_one_output_dir_on_the_bucket(tmp_path, gcs_bucket):
    """experiments/configs/gpt2_small_hh_v4-8.yaml shrunk to the tiny GPT-2: SFT -> export ->
    RM -> DPO -> PPO (reward model and value model from the RM stage) on 2 processes by
    tpu_scripts/launch_local.sh, with one output directory on the emulated bucket: every stage
    finds the previous stage's outputs there, each metrics file written once."""
    sys.path.insert(0, str(REPO / "tests" / "experiments"))
    try:
        from test_pipeline_chain import CONFIG, _hh_rows, _shrink
    finally:
        sys.path.pop(0)
    from experiments import prepare_hh

    src = tmp_path / "train.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in _hh_rows(48, seed=0)) + "\n")
    data_dir = tmp_path / "data"
    for split in ("train", "test"):
        prepare_hh.convert([src], data_dir, split=split)
    config = _shrink(yaml.safe_load(CONFIG.read_text()), data_dir)
    assert [s["name"] for s in config["stages"]] == ["sft", "sft_hf", "rm", "dpo", "ppo"]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    out = f"{gcs_bucket}/runs/chain"
    result = subprocess.run(
        ["bash", str(REPO / "tpu_scripts" / "launch_local.sh"), "--run-name", "chain", "--",
         sys.executable, "-m", "experiments.pipeline", "--config", str(path),
         "--output-dir", out],
        env=cpu_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=1500)
    assert result.returncode == 0, result.stdout[-6000:]
    for stage in ("sft", "sft_hf", "rm", "dpo", "ppo"):
        for process in ("0", "1"):
            assert f"[{process}] === stage {stage} finished with status 0" in result.stdout
    run_dir = epath.Path(out)
    assert (run_dir / "sft_hf" / "config.json").is_file()
    for stage in ("sft", "rm", "dpo", "ppo"):
        rows = [json.loads(line)
                for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "step" in r][-1] == 2, stage
        assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows), stage
        assert (run_dir / stage / "checkpoints").is_dir(), stage
    last = rows[-1]
    assert np.isfinite(last["ppo/score_mean"]) and last["ppo/score_std"] > 0
