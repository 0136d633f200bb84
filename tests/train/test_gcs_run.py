"""A run whose output directory is a bucket (the Cloud Storage emulator, tests/gcs_emulator.py):
the CLI writes every run file there, survives SIGTERM and resumes from the bucket bit-exactly,
exports an HF directory there; a bucket that is missing or does not answer fails at start-up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import gcsfs
import jax
import numpy as np
import pytest
import yaml
from etils import epath
from flax import nnx

from rlhf_jax import cli
from rlhf_jax.models.hf import from_pretrained
from rlhf_jax.storage import (
    STORAGE_TIMEOUT_ENV,
    StorageError,
    TextLog,
    check_storage,
    is_remote,
)
from rlhf_jax.train.config import LoggingConfig
from rlhf_jax.train.export import ExportConfig, load_policy
from rlhf_jax.train.logging import MetricsLogger, read_metrics
from rlhf_jax.train.loop import WALL_CLOCK_METRICS

SMALL = ["--model.vocab-size", "64", "--model.hidden-size", "32", "--model.num-layers", "1",
         "--model.num-heads", "2", "--model.max-position-embeddings", "64",
         "--logging.progress", "none", "--logging.every-steps", "1",
         "--data.synthetic", "topic", "--data.batch-size", "8", "--data.max-length", "48",
         "--data.num-eval", "0", "--num-steps", "10", "--checkpoint.every-steps", "1"]


def _strip(records):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_METRICS} for r in records]


@pytest.mark.slow  # 50-75 s: a CLI process, three runs checkpointing every step, an export
def test_cli_dpo_on_a_bucket_survives_sigterm_resumes_exactly_and_exports(gcs_bucket, tmp_path):
    run = f"{gcs_bucket}/runs/x"
    fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    # The interrupted run: a real `rlhf-jax dpo` process, stopped with SIGTERM once the
    # checkpoint of step 2 is in the bucket (every step is checkpointed, so it is mid-run).
    log = (tmp_path / "first.log").open("w")
    child = subprocess.Popen([sys.executable, "-m", "rlhf_jax", "dpo", "--output-dir", run,
                              *SMALL], stdout=log, stderr=subprocess.STDOUT)
    marker = f"{run.removeprefix('gs://')}/checkpoints/2/commit_success.txt"
    deadline = time.monotonic() + 120
    while not fs.exists(marker) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        fs.invalidate_cache()
    child.send_signal(signal.SIGTERM)
    status = child.wait(timeout=120)
    log.close()
    assert status == cli.EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    first = read_metrics(run)
    assert 2 <= first[-1]["step"] < 10  # stopped mid-run, its metrics on the bucket

    assert cli.main(["dpo", "--output-dir", run, *SMALL]) == 0  # resumes from the bucket
    full = f"{gcs_bucket}/runs/full"
    assert cli.main(["dpo", "--output-dir", full, *SMALL]) == 0
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert _strip(resumed) == _strip(read_metrics(full))

    root = epath.Path(run)
    assert yaml.safe_load((root / "config.yaml").read_text())["output_dir"] == run
    summary = yaml.safe_load((root / "summary.json").read_text())
    assert summary["step"] == 10 and not summary["preempted"]
    assert any(p.name.startswith("events.out.tfevents") for p in (root / "tensorboard").iterdir())
    steps = sorted(int(p.name) for p in (root / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [8, 9, 10]  # keep_last=3
    assert not any(p.name.startswith(".write-check") for p in root.iterdir())

    hf = f"{gcs_bucket}/hf"
    assert cli.main(["export", "--run-dir", run, "--output-dir", hf]) == 0
    model, step, _ = load_policy(run)
    assert step == 10
    loaded = from_pretrained(hf)
    expected = jax.tree.leaves(nnx.state(model, nnx.Param))
    got = jax.tree.leaves(nnx.state(loaded, nnx.Param))
    assert len(expected) == len(got) > 0
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_cli_dpo_writes_its_run_files_to_a_bucket_and_resumes_from_it(gcs_bucket, tmp_path):
    """The short form of the test above (default suite): in-process, SIGTERM sent to this
    process once the first checkpoint is in the bucket; the resumed run equals a local one."""
    run = f"{gcs_bucket}/runs/short"
    short = [*SMALL, "--num-steps", "3"]
    marker = epath.Path(run, "checkpoints", "1", "commit_success.txt")

    def stop_when_checkpointed():
        while not marker.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=stop_when_checkpointed, daemon=True)
    watcher.start()
    assert cli.main(["dpo", "--output-dir", run, *short]) == cli.EXIT_PREEMPTED
    watcher.join()
    root = epath.Path(run)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/1/state"):
        assert (root / name).exists(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (root / "tensorboard").iterdir())
    assert read_metrics(run)[-1]["step"] < 3
    assert cli.main(["dpo", "--output-dir", run, *short, "--logging.no-tensorboard"]) == 0
    local = tmp_path / "local"
    assert cli.main(["dpo", "--output-dir", str(local), *short, "--logging.no-tensorboard"]) == 0
    assert _strip(read_metrics(run)) == _strip(read_metrics(local))


def test_a_missing_bucket_fails_at_start_up_with_one_line(gcs_bucket, capsys):
    run = "gs://no-such-bucket-rlhf/runs/x"
    start = time.monotonic()
    assert cli.main(["dpo", "--output-dir", run, *SMALL]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"rlhf-jax dpo: error: output_dir={run}: bucket 'no-such-bucket-rlhf' does "
                   "not exist")
    assert time.monotonic() - start < 30

    missing = f"{gcs_bucket}/models/none"
    assert cli.main(["dpo", "--output-dir", f"{gcs_bucket}/runs/y", *SMALL,
                     "--model.path", missing]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"rlhf-jax dpo: error: model.path={missing}: no such file or directory"
    assert not epath.Path(gcs_bucket, "runs", "y").exists()  # nothing written


def test_an_endpoint_that_does_not_answer_fails_within_the_timeout(gcs_emulator, monkeypatch,
                                                                   capsys):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.setenv(STORAGE_TIMEOUT_ENV, "1")
    try:
        start = time.monotonic()
        assert cli.main(["dpo", "--output-dir", "gs://b/runs/x", *SMALL]) == 1
        took = time.monotonic() - start
    finally:
        silent.close()
    err = capsys.readouterr().err.strip()
    assert err == (f"rlhf-jax dpo: error: output_dir=gs://b/runs/x: no answer from {endpoint} "
                   f"within 1 s (set {STORAGE_TIMEOUT_ENV} to wait longer)")
    assert took < 15


def test_check_storage_names_nested_fields_and_ignores_local_paths(gcs_bucket, tmp_path,
                                                                   monkeypatch):
    config = ExportConfig(run_dir=f"{gcs_bucket}/runs/none", output_dir=str(tmp_path / "hf"))
    with pytest.raises(StorageError, match=r"^run_dir=gs://.*/runs/none: no such file"):
        check_storage(config)
    epath.Path(gcs_bucket, "runs", "none", "config.yaml").write_text("{}\n")
    check_storage(config)  # exists now; the local output_dir is not probed
    monkeypatch.setenv(STORAGE_TIMEOUT_ENV, "0")
    with pytest.raises(StorageError, match=f"{STORAGE_TIMEOUT_ENV}='0' must be > 0"):
        check_storage(config)


def test_text_log_uploads_on_its_cadence_and_on_close(gcs_bucket, tmp_path):
    remote = epath.Path(gcs_bucket, "log.jsonl")
    log = TextLog(remote, "a\n", sync_seconds=3600)
    assert remote.read_text() == "a\n"  # the initial text is uploaded at once
    log.write("b\n")
    log.flush()
    assert remote.read_text() == "a\n"  # within sync_seconds: not yet
    log.flush(force=True)
    assert remote.read_text() == "a\nb\n"
    log.write("c\n")
    log.close()
    assert remote.read_text() == "a\nb\nc\n" and log.closed

    local = tmp_path / "log.jsonl"
    log = TextLog(local, "a\n", sync_seconds=3600)
    log.write("b\n")
    log.flush()
    assert local.read_text() == "a\nb\n"  # a local file is flushed on every flush
    log.close()


@pytest.mark.parametrize("path, remote", [("gs://b/runs/x", True), ("gs://b", True),
                                          ("runs/x", False), ("/abs/x", False),
                                          ("preset:tiny_gpt2", False), ("synthetic", False)])
def test_is_remote_only_for_uris_with_a_bucket(path, remote):
    assert is_remote(path) is remote


def test_metrics_logger_sync_uploads_every_line_before_a_checkpoint(gcs_bucket):
    run = f"{gcs_bucket}/runs/sync"
    logger = MetricsLogger(run, LoggingConfig(progress="none", tensorboard=True))
    logger.log(1, {"a/x": 1.0})
    logger.log(2, {"a/x": 2.0})
    assert read_metrics(run) == []  # within TextLog.sync_seconds of the first upload
    logger.sync()  # what the loop calls before each checkpoint
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert any(p.name.startswith("events.out.tfevents")
               for p in epath.Path(run, "tensorboard").iterdir())
    logger.close()
