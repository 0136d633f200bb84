"""`python -m rlhf_jax.launch`: real processes joined by JAX's distributed runtime (gloo CPU
collectives), the launcher's contract, and a DPO run on 2 processes x 4 devices that logs the
metrics of 1 process x 8 devices."""

import inspect
import json
import signal
import subprocess
import sys

import jax
import orbax.checkpoint as ocp
import pytest
from multihost_runs import (
    QUIET,
    TINY_MODEL,
    assert_same_metrics,
    cli,
    read_jsonl,
    run,
    write_config,
)

from rlhf_jax import cli as rlhf_cli
from rlhf_jax import launch, sharding
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.logging import read_metrics


class TestProcessEnv:
    def test_sets_the_distributed_environment_and_the_device_count(self):
        base = {"XLA_FLAGS": "--xla_dump_to=/x --xla_force_host_platform_device_count=8",
                "KEEP": "1"}
        env = launch.process_env(base, process_id=1, num_processes=2, port=1234,
                                 devices_per_process=4, heartbeat_timeout=7)
        assert env["XLA_FLAGS"] == "--xla_dump_to=/x --xla_force_host_platform_device_count=4"
        assert env["KEEP"] == "1" and env["JAX_PLATFORMS"] == "cpu"
        assert env["RLHF_JAX_DISTRIBUTED"] == "1"
        assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:1234"
        assert (env["RLHF_JAX_NUM_PROCESSES"], env["RLHF_JAX_PROCESS_ID"]) == ("2", "1")
        assert env["RLHF_JAX_CPU_COLLECTIVES"] == "gloo"
        assert env["RLHF_JAX_HEARTBEAT_TIMEOUT"] == "7"
        assert base["XLA_FLAGS"].endswith("=8")  # the caller's dict is not changed

    def test_rejects_a_missing_command_and_bad_counts(self, capsys):
        for argv in ([], ["--"], ["--num-processes", "0", "--", "true"],
                     ["--devices-per-process", "0", "--", "true"], ["--port", "0", "--", "true"]):
            with pytest.raises(SystemExit) as e:
                launch.main(argv)
            assert e.value.code == 2
        assert "--devices-per-process must be >= 1" in capsys.readouterr().err


def test_initialize_distributed_reads_the_launcher_environment(monkeypatch):
    calls, collectives = [], []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: collectives.append(a))
    env = launch.process_env({}, process_id=1, num_processes=2, port=4321,
                             devices_per_process=4, heartbeat_timeout=9)
    for name in ("JAX_COORDINATOR_ADDRESS", "RLHF_JAX_NUM_PROCESSES", "RLHF_JAX_PROCESS_ID",
                 "RLHF_JAX_CPU_COLLECTIVES", "RLHF_JAX_HEARTBEAT_TIMEOUT"):
        monkeypatch.setenv(name, env[name])
    assert sharding.initialize_distributed(force=True) is True
    assert collectives == [("jax_cpu_collectives_implementation", "gloo")]
    (call,) = calls
    assert (call["coordinator_address"], call["num_processes"], call["process_id"]) == (
        "localhost:4321", 2, 1)
    accepted = inspect.signature(jax.distributed.initialize).parameters
    for name in ("heartbeat_timeout_seconds", "shutdown_timeout_seconds"):
        assert call.get(name) == (9 if name in accepted else None)
    monkeypatch.setenv("RLHF_JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="RLHF_JAX_PROCESS_ID='one' must be an integer"):
        sharding.initialize_distributed()


class TestSupervision:
    """Plain commands (no JAX): output prefixes, exit statuses, the others stopped on a
    failure."""

    def _launch(self, code: str, *, processes: int = 2, timeout: float = 60, grace: str = "2"):
        return subprocess.run(
            [sys.executable, "-m", "rlhf_jax.launch", "--num-processes", str(processes),
             "--grace-seconds", grace, "--", sys.executable, "-c", code],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def test_prefixes_every_line_with_its_process(self):
        out = self._launch("import os; print('id', os.environ['RLHF_JAX_PROCESS_ID'], "
                           "os.environ['RLHF_JAX_NUM_PROCESSES'])", processes=3)
        assert out.returncode == 0, out.stdout
        assert sorted(line for line in out.stdout.splitlines() if " id " in line) == [
            "[0] id 0 3", "[1] id 1 3", "[2] id 2 3"]

    def test_a_failure_stops_the_others_and_sets_the_status(self):
        # process 1 fails at once; process 0 would sleep for 10 minutes
        code = ("import os, sys, time\n"
                "if os.environ['RLHF_JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
                "time.sleep(600)\n")
        out = self._launch(code, timeout=60)
        assert out.returncode == 3, out.stdout
        assert "process 1 exited with status 3; stopping the other processes" in out.stdout

    def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(self, tmp_path):
        # Process 0 dies only once process 1 ignores SIGTERM (a file says so): on a loaded host
        # process 1 could otherwise get the launcher's SIGTERM before its handler is set.
        ready = tmp_path / "ignoring"
        code = ("import os, signal, sys, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                f"ready = {str(ready)!r}\n"
                "if os.environ['RLHF_JAX_PROCESS_ID'] == '1': open(ready, 'w').close()\n"
                "while os.environ['RLHF_JAX_PROCESS_ID'] == '0' and not os.path.exists(ready):\n"
                "    time.sleep(0.05)\n"
                "if os.environ['RLHF_JAX_PROCESS_ID'] == '0': os.kill(os.getpid(), 9)\n"
                "time.sleep(600)\n")
        out = self._launch(code, timeout=60, grace="1")
        assert out.returncode == 128 + signal.SIGKILL, out.stdout
        assert "were killed" in out.stdout


def test_dpo_on_2_processes_x_4_devices_matches_1_process_x_8(tmp_path):
    """3 DPO steps: the same metrics to 1e-5, one well-formed metrics.jsonl, TensorBoard and
    summary.json written once, the loader states of both processes checkpointed."""
    config = write_config(tmp_path / "dpo.yaml", {
        "num_steps": 3, "model": TINY_MODEL,
        "data": {"synthetic": "topic", "batch_size": 8, "max_length": 24,
                 "max_prompt_length": 12, "num_train": 64, "num_eval": 0},
        "logging": {**QUIET, "tensorboard": True},
    })
    one, two = tmp_path / "one", tmp_path / "two"
    assert rlhf_cli.main(["dpo", "--config", str(config), "--output-dir", str(one)]) == 0

    out = run(cli("dpo", "--config", str(config), "--output-dir", str(two)), processes=2,
              devices=4)
    assert out.returncode == 0, out.stdout[-4000:]
    assert any(line.startswith("[0] ") for line in out.stdout.splitlines())
    assert any(line.startswith("[1] ") for line in out.stdout.splitlines())

    records = read_jsonl(two / "metrics.jsonl")  # every line parses: no interleaved writes
    assert [r["step"] for r in records] == [1, 2, 3]
    assert_same_metrics(read_metrics(one), records)
    assert len(list((two / "tensorboard").iterdir())) == 1
    assert sorted(p.name for p in two.iterdir() if p.is_file()) == [
        "config.yaml", "metrics.jsonl", "summary.json"]
    assert json.loads((two / "summary.json").read_text())["step"] == 3

    ckpt = Checkpointer(two / "checkpoints")
    try:
        assert ckpt.all_steps() == [3]
        data = ckpt._manager.restore(
            3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    finally:
        ckpt.close()
    loaders = [s["loader"] for s in data["per_process"]]
    assert [(s["shard_index"], s["shard_count"], s["position"]) for s in loaders] == [
        (0, 2, 12), (1, 2, 12)]
