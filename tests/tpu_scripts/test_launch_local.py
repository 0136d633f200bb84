"""tpu_scripts/launch_local.sh runs launch.sh's command through `python -m rlhf_jax.launch`."""

import os
import pathlib
import shlex
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tpu_scripts"
CONFIG = "experiments/configs/gpt2_small_hh_v4-8.yaml"


def _run(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRY_RUN")}
    return subprocess.run(["bash", str(SCRIPTS / "launch_local.sh"), "--dry-run", *args],
                          env=env, capture_output=True, text=True, check=False, timeout=60)


def _launch_sh_program(*args):
    """The program that launch.sh's dry run runs on every host (after `export ...;`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "GCP_", "DRY_RUN"))}
    proc = subprocess.run(["bash", str(SCRIPTS / "launch.sh"), "--dry-run", "--name", "rlhf-v4",
                           "--zone", "us-central2-b", "--foreground", *args],
                          env=env, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (cmd,) = [a[len("--command="):] for a in shlex.split(proc.stdout)
              if a.startswith("--command=")]
    return shlex.split(cmd.rsplit("; ", 1)[1].split(" 2>&1 |")[0])


def test_runs_the_pipeline_command_of_launch_sh_on_local_processes():
    args = ["--run-name", "gpt2-hh", "--bucket", "gs://my-bucket/rlhf", "--config", CONFIG]
    proc = _run(*args, "--num-processes", "4", "--devices-per-process", "2")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    argv = shlex.split(line)
    split = argv.index("--")
    assert argv[:split] == ["env", "RLHF_JAX_RUN_NAME=gpt2-hh", "python", "-m", "rlhf_jax.launch",
                            "--num-processes", "4", "--devices-per-process", "2"]
    program = argv[split + 1:]
    assert program == ["python", "-m", "experiments.pipeline", "--config", CONFIG,
                       "--output-dir", "gs://my-bucket/rlhf/runs/gpt2-hh"]
    assert program == _launch_sh_program(*args)


def test_default_output_dir_and_a_command():
    proc = _run("--run-name", "r", "--config", CONFIG)
    assert proc.stdout.split(" -- ")[1].endswith("--output-dir runs/r\n")
    proc = _run("--run-name", "d", "--env", "A=b c", "--", "python", "-m", "rlhf_jax", "dpo",
                "--config", "my run.yaml")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == [
        "env", "RLHF_JAX_RUN_NAME=d", "A=b c", "python", "-m", "rlhf_jax.launch",
        "--num-processes", "2", "--devices-per-process", "4", "--",
        "python", "-m", "rlhf_jax", "dpo", "--config", "my run.yaml"]


@pytest.mark.parametrize("args,needle", [
    (["--config", CONFIG], "--run-name is required"),
    (["--run-name", "r"], "give --config FILE or -- COMMAND"),
    (["--run-name", "r", "--config", CONFIG, "--", "echo"], "not both"),
    (["--run-name", "r", "--config", "missing.yaml"], "--config 'missing.yaml' not found"),
    (["--run-name", "r", "--config", CONFIG, "--bucket", "s3://x"], "--bucket 's3://x'"),
    (["--run-name", "r", "--config", CONFIG, "--num-processes", "0"], "--num-processes '0'"),
    (["--run-name", "r", "--config", CONFIG, "--devices-per-process", "x"],
     "--devices-per-process 'x'"),
    (["--run-name", "r", "--config", CONFIG, "--env", "1X=2"], "--env '1X=2'"),
    (["--run-name", "r", "--name", "vm"], "unknown argument '--name'"),
])
def test_bad_arguments_name_the_flag(args, needle):
    proc = _run(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert needle in proc.stderr
