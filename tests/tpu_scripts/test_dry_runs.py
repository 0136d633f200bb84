"""Every tpu_scripts/*.sh dry run prints exactly the gcloud commands it would run."""

import os
import pathlib
import shlex
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tpu_scripts"
NAME, ZONE = "rlhf-v4", "us-central2-b"
LOC = ["--name", NAME, "--zone", ZONE]
CONFIG = "experiments/configs/gpt2_small_hh_v4-8.yaml"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An environment whose `gcloud` only records that it was called."""
    bin_dir = tmp_path_factory.mktemp("bin")
    marker = bin_dir / "gcloud-was-called"
    stub = bin_dir / "gcloud"
    stub.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    stub.chmod(0o755)
    out = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "GCP_", "DRY_RUN"))}
    out["PATH"] = f"{bin_dir}:{out['PATH']}"
    out["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    yield out
    assert not marker.exists(), "a dry run called gcloud"


def dry_run(env, script, *args):
    proc = subprocess.run(
        ["bash", str(SCRIPTS / script), "--dry-run", *args],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def fails(env, script, *args):
    proc = subprocess.run(
        ["bash", str(SCRIPTS / script), "--dry-run", *args],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    return proc.stderr


def remote_command(argv):
    """The --command=... of a `gcloud compute tpus tpu-vm ssh` argv, checked to parse as bash."""
    (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    syntax = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
    assert syntax.returncode == 0, (cmd, syntax.stderr)
    return cmd


def ssh_prefix(worker="all"):
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME, f"--zone={ZONE}", f"--worker={worker}"]


class TestCreate:
    def test_tpu_vm(self, env):
        lines = dry_run(env, "create.sh", *LOC, "--accelerator-type", "v4-8")
        assert lines == [
            ["gcloud", "compute", "tpus", "tpu-vm", "create", NAME, f"--zone={ZONE}",
             "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"],
            ["gcloud", "compute", "tpus", "tpu-vm", "describe", NAME, f"--zone={ZONE}",
             "--format=value(state)"],
        ]

    def test_queued_spot_with_project(self, env):
        lines = dry_run(env, "create.sh", "--name", "rlhf-v5e", "--zone", "us-west4-a",
                        "--project", "my-proj", "--accelerator-type", "v5litepod-8",
                        "--queued", "--spot", "--valid-until", "6h", "--no-wait")
        assert lines == [[
            "gcloud", "compute", "tpus", "queued-resources", "create", "rlhf-v5e-qr",
            "--node-id=rlhf-v5e", "--zone=us-west4-a", "--project=my-proj",
            "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite",
            "--spot", "--valid-until-duration=6h",
        ]]

    @pytest.mark.parametrize("tpu_type,version", [
        ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"), ("v4-32", "tpu-ubuntu2204-base"),
    ])
    def test_default_version_per_generation(self, env, tpu_type, version):
        (create, _) = dry_run(env, "create.sh", *LOC, "--accelerator-type", tpu_type)
        assert create[-1] == f"--version={version}"

    def test_environment_defaults(self, env):
        lines = dry_run({**env, "TPU_NAME": NAME, "TPU_ZONE": ZONE, "TPU_TYPE": "v4-8"},
                        "create.sh", "--no-wait")
        assert lines[0][5:8] == [NAME, f"--zone={ZONE}", "--accelerator-type=v4-8"]

    @pytest.mark.parametrize("args,needle", [
        (["--zone", ZONE, "--accelerator-type", "v4-8"], "--name"),
        (["--name", NAME, "--accelerator-type", "v4-8"], "--zone"),
        (["--name", NAME, "--zone", "central", "--accelerator-type", "v4-8"], "--zone 'central'"),
        (["--name", "Bad_Name", "--zone", ZONE, "--accelerator-type", "v4-8"], "--name 'Bad_Name'"),
        ([*LOC], "--accelerator-type"),
        ([*LOC, "--accelerator-type", "v9-8"], "v5litepod-N"),
        ([*LOC, "--accelerator-type", "v4-8", "--valid-until", "1h"], "--queued"),
        ([*LOC, "--accelerator-type", "v4-8", "--bogus"], "unknown argument '--bogus'"),
        ([*LOC, "--accelerator-type"], "--accelerator-type needs a value"),
    ])
    def test_bad_arguments_name_the_flag(self, env, args, needle):
        assert needle in fails(env, "create.sh", *args)


class TestSetup:
    def test_local_checkout(self, env):
        lines = dry_run(env, "setup.sh", *LOC, "--stage", "gs://my-bucket/hh-rlhf=data/hh-rlhf")
        archive = os.path.join(env["TMPDIR"], "rlhf_jax-src.tar.gz")
        pack = lines[0]
        assert pack[:3] == ["git", "-C", str(REPO)] and "|" in pack and pack[-1] == archive
        assert lines[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                            f"{NAME}:rlhf_jax-src.tar.gz", f"--zone={ZONE}", "--worker=all"]
        assert lines[2][:8] == ssh_prefix()
        assert "tar -xzf rlhf_jax-src.tar.gz -C rlhf_jax" in remote_command(lines[2])
        install = remote_command(lines[3])
        assert "python3 -m venv .venv" in install
        assert ".venv/bin/pip install --quiet 'jax[tpu]'" in install
        assert ".venv/bin/pip install --quiet -e ." in install
        stage = remote_command(lines[4])
        assert stage == ("cd rlhf_jax && mkdir -p data/hh-rlhf && gcloud storage rsync --recursive "
                         "gs://my-bucket/hh-rlhf data/hh-rlhf")
        assert len(lines) == 5

    def test_git_clone_with_extras(self, env):
        lines = dry_run(env, "setup.sh", *LOC, "--git", "https://example.com/rlhf_jax.git",
                        "--ref", "v0.1", "--extras", "test", "--jax-spec", "jax[tpu]==0.10.2")
        assert len(lines) == 2
        clone = remote_command(lines[0])
        assert "git clone --quiet https://example.com/rlhf_jax.git rlhf_jax" in clone
        assert "checkout --quiet v0.1" in clone
        install = remote_command(lines[1])
        assert "'jax[tpu]==0.10.2'" in install and "-e '.[test]'" in install

    @pytest.mark.parametrize("stage,needle", [
        ("data/hh", "gs://BUCKET/PREFIX=LOCAL_DIR"),
        ("gs://my-bucket/x=/abs", "relative path"),
        ("gs://my-bucket/x=../up", "relative path"),
    ])
    def test_bad_stage(self, env, stage, needle):
        assert needle in fails(env, "setup.sh", *LOC, "--stage", stage)


class TestLaunch:
    def test_config_on_all_hosts_in_background(self, env):
        (line,) = dry_run(env, "launch.sh", *LOC, "--run-name", "gpt2-hh",
                          "--bucket", "gs://my-bucket/rlhf", "--config", CONFIG)
        assert line[:8] == ssh_prefix()
        cmd = remote_command(line)
        assert cmd.startswith("set -eo pipefail; cd rlhf_jax;")
        assert "agent-worker-number" in cmd
        assert "export RLHF_JAX_DISTRIBUTED=1 RLHF_JAX_RUN_NAME=gpt2-hh;" in cmd
        assert (f"nohup python -m experiments.pipeline --config {CONFIG} "
                "--output-dir gs://my-bucket/rlhf/runs/gpt2-hh "
                '> "$HOME/runs/gpt2-hh/logs/host-$WORKER_ID.log" 2>&1 < /dev/null &') in cmd

    def test_command_in_foreground_on_one_worker(self, env):
        (line,) = dry_run(env, "launch.sh", *LOC, "--run-name", "dpo1", "--worker", "0",
                          "--foreground", "--env", "LIBTPU_INIT_ARGS=--xla_tpu_foo=1 --bar",
                          "--", "python", "-m", "rlhf_jax", "dpo", "--config", "my run.yaml")
        assert line[:8] == ssh_prefix("0")
        cmd = remote_command(line)
        assert "'LIBTPU_INIT_ARGS=--xla_tpu_foo=1 --bar'" in cmd
        assert cmd.endswith("python -m rlhf_jax dpo --config 'my run.yaml' 2>&1 | tee "
                            '"$HOME/runs/dpo1/logs/host-$WORKER_ID.log"')
        assert "nohup" not in cmd

    def test_default_output_dir_is_on_each_host(self, env):
        (line,) = dry_run(env, "launch.sh", *LOC, "--run-name", "r", "--config", CONFIG)
        assert '--output-dir "$HOME/runs/r"' in remote_command(line)

    @pytest.mark.parametrize("args,needle", [
        (["--config", CONFIG], "--run-name is required"),
        (["--run-name", "r"], "give --config FILE or -- COMMAND"),
        (["--run-name", "r", "--config", CONFIG, "--", "echo"], "not both"),
        (["--run-name", "a/b", "--config", CONFIG], "--run-name 'a/b'"),
        (["--run-name", "r", "--config", "missing.yaml"], "--config 'missing.yaml' not found"),
        (["--run-name", "r", "--config", CONFIG, "--bucket", "s3://x"], "--bucket 's3://x'"),
        (["--run-name", "r", "--config", CONFIG, "--worker", "w1"], "--worker 'w1'"),
        (["--run-name", "r", "--config", CONFIG, "--env", "1X=2"], "--env '1X=2'"),
    ])
    def test_bad_arguments(self, env, args, needle):
        assert needle in fails(env, "launch.sh", *LOC, *args)


class TestSync:
    def test_upload_and_download(self, env):
        lines = dry_run(env, "sync.sh", *LOC, "--run-name", "gpt2-hh",
                        "--bucket", "gs://my-bucket/rlhf/", "--download", "runs/")
        assert lines[0][:8] == ssh_prefix()
        assert ('gcloud storage rsync --recursive "$HOME/runs/gpt2-hh" '
                "gs://my-bucket/rlhf/runs/gpt2-hh") in remote_command(lines[0])
        assert lines[1] == ["gcloud", "storage", "rsync", "--recursive",
                            "gs://my-bucket/rlhf/runs/gpt2-hh", "runs/gpt2-hh"]

    def test_download_only(self, env):
        lines = dry_run(env, "sync.sh", *LOC, "--run-name", "r", "--bucket", "gs://my-bucket",
                        "--download", "out", "--no-upload")
        assert lines == [["gcloud", "storage", "rsync", "--recursive",
                          "gs://my-bucket/runs/r", "out/r"]]

    def test_requires_bucket(self, env):
        assert "--bucket is required" in fails(env, "sync.sh", *LOC, "--run-name", "r")


class TestDelete:
    def test_tpu_vm(self, env):
        assert dry_run(env, "delete.sh", *LOC) == [
            ["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME, f"--zone={ZONE}", "--quiet"]]

    def test_queued_resource_async(self, env):
        assert dry_run(env, "delete.sh", *LOC, "--queued", "--project", "p1", "--async") == [
            ["gcloud", "compute", "tpus", "queued-resources", "delete", f"{NAME}-qr",
             f"--zone={ZONE}", "--project=p1", "--force", "--quiet", "--async"]]


class TestRunExperiment:
    def test_round_trip_order(self, env):
        lines = dry_run(env, "run_experiment.sh", *LOC, "--accelerator-type", "v4-8",
                        "--bucket", "gs://my-bucket/rlhf", "--config", CONFIG,
                        "--stage", "gs://my-bucket/models/gpt2=models/gpt2")
        gcloud = [line for line in lines if line[0] == "gcloud"]
        verbs = [" ".join(line[1:5]) for line in gcloud]
        assert verbs == [
            "compute tpus tpu-vm create", "compute tpus tpu-vm describe",
            "compute tpus tpu-vm scp", "compute tpus tpu-vm ssh",  # copy, unpack
            "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh",  # install, stage
            "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh",  # launch, sync
            "compute tpus tpu-vm delete",
        ]
        launch = remote_command(gcloud[6])
        assert "RLHF_JAX_RUN_NAME=gpt2_small_hh_v4-8" in launch and "| tee" in launch
        assert "models/gpt2" in remote_command(gcloud[5])

    def test_keep_skips_delete(self, env):
        lines = dry_run(env, "run_experiment.sh", *LOC, "--accelerator-type", "v4-8", "--queued",
                        "--bucket", "gs://my-bucket/rlhf", "--config", CONFIG, "--keep")
        assert lines[0][3] == "queued-resources"
        assert not any("delete" in line for line in lines)

    def test_readme_example(self, env):
        """The README's exact command is accepted, and stages where the config reads and launch runs."""
        readme = (REPO / "README.md").read_text()
        start = readme.index("tpu_scripts/run_experiment.sh")
        args = shlex.split(readme[start:readme.index("```", start)].replace("\\\n", " "))
        assert args[0] == "tpu_scripts/run_experiment.sh" and "--dry-run" in args
        lines = dry_run(env, "run_experiment.sh", *[a for a in args[1:] if a != "--dry-run"])
        remote = [remote_command(line) for line in lines
                  if line[0] == "gcloud" and any(a.startswith("--command=") for a in line)]
        stages = [cmd for cmd in remote if "gcloud storage rsync --recursive gs://" in cmd]
        config = (REPO / args[args.index("--config") + 1]).read_text()
        dests = [a.split("=", 1)[1] for a, flag in zip(args[1:], args) if flag == "--stage"]
        assert len(stages) == len(dests) == 2
        for cmd, dest in zip(stages, dests):
            assert cmd.startswith("cd rlhf_jax && mkdir -p " + dest), cmd
            assert f"path: {dest}" in config, dest
        (launch,) = [cmd for cmd in remote if "experiments.pipeline" in cmd]
        assert "cd rlhf_jax" in launch
        bucket = args[args.index("--bucket") + 1]
        run_dir = f"{bucket}/runs/gpt2_small_hh_v4-8"
        assert f"--output-dir {run_dir} " in launch
        assert any(f'rsync --recursive "$HOME/runs/gpt2_small_hh_v4-8" {run_dir}' in cmd
                   for cmd in remote)


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.sh") if p.name != "lib.sh"))
def test_help_and_strict_mode(script):
    text = (SCRIPTS / script).read_text()
    assert "set -euo pipefail" in text
    assert os.access(SCRIPTS / script, os.X_OK)
    proc = subprocess.run(["bash", str(SCRIPTS / script), "--help"], capture_output=True,
                          text=True, check=False, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {script}")
