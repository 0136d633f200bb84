"""Runs of the CLI as real processes: one process with 8 CPU devices, or `rlhf_jax.launch` with
N processes (gloo collectives), and the comparison of their metrics."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import yaml

from rlhf_jax.train.loop import WALL_CLOCK_METRICS

TINY_MODEL = {"preset": "tiny_gpt2", "vocab_size": 64, "hidden_size": 32, "num_layers": 1,
              "num_heads": 2, "max_position_embeddings": 64, "lora_targets": []}
QUIET = {"every_steps": 1, "tensorboard": False, "progress": "none"}


def write_config(path: pathlib.Path, config: dict) -> pathlib.Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cpu_env(devices: int) -> dict[str, str]:
    """This environment with `devices` CPU devices per process."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def launch_command(command: Sequence[str], *, processes: int, devices: int,
                   grace_seconds: float | None = None) -> list[str]:
    """`python -m rlhf_jax.launch ... -- command` (one process without the launcher)."""
    if processes == 1:
        return list(command)
    extra = [] if grace_seconds is None else ["--grace-seconds", str(grace_seconds)]
    return [sys.executable, "-m", "rlhf_jax.launch", "--num-processes", str(processes),
            "--devices-per-process", str(devices), *extra, "--", *command]


def run(command: Sequence[str], *, processes: int, devices: int, timeout: float = 600,
        cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Runs `command` on `processes` x `devices` CPU devices; stdout and stderr together."""
    return subprocess.run(launch_command(command, processes=processes, devices=devices),
                          env=cpu_env(devices), cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_jax", *args]


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """Every line of a metrics file, each of which must be one JSON object."""
    lines = path.read_text().splitlines()
    assert lines, f"{path} is empty"
    return [json.loads(line) for line in lines]


def assert_same_metrics(one: list[dict], other: list[dict], *, tol: float = 1e-5) -> None:
    """The same records (steps and names) with every scalar equal to `tol` (absolute and
    relative), wall-clock rates excepted."""
    assert [sorted(r) for r in one] == [sorted(r) for r in other]
    for a, b in zip(one, other, strict=True):
        assert a["step"] == b["step"]
        for name, value in a.items():
            if name in WALL_CLOCK_METRICS or not isinstance(value, int | float):
                continue
            np.testing.assert_allclose(b[name], value, rtol=tol, atol=tol,
                                       err_msg=f"step {a['step']} {name}")
