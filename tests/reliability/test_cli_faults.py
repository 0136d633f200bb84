"""Faults through the CLI: a full disk, a bit-flipped newest checkpoint, NaN weights in a Hugging
Face model directory, and `kill -9` during a save (then a resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from rlhf_jax import cli
from rlhf_jax.models import CausalLM, ModelConfig, save_pretrained
from rlhf_jax.train.checkpoint import CHECKSUM_FILE
from rlhf_jax.train.loop import WALL_CLOCK_METRICS

MODEL = ["--model.vocab-size", "64", "--model.hidden-size", "32", "--model.num-layers", "1",
         "--model.num-heads", "2", "--model.max-position-embeddings", "64"]
REST = ["--logging.progress", "none", "--logging.no-tensorboard", "--logging.every-steps", "1",
        "--data.synthetic", "topic", "--data.batch-size", "8", "--data.max-length", "48",
        "--data.num-eval", "0"]


def _sft(out, *extra, model=MODEL):
    return cli.main(["sft", "--output-dir", str(out), *model, *REST, *extra])


def _metrics(out):
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_METRICS} for r in records]


def _tmpfs(path, size):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("disk", ["tmpfs", "patched"])
def test_a_full_disk_is_one_clear_line_and_exit_1(tmp_path, capsys, monkeypatch, disk):
    root = tmp_path / "small"
    if disk == "tmpfs":
        if not _tmpfs(root, "60k"):
            pytest.skip("mounting a tmpfs needs root (the 'patched' case covers the message)")
    else:  # a writer that fails the way TensorStore does on a full disk
        def full(*args, **kwargs):
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 4096 '
                             "bytes to file 14: No space left on device [os_error_code='28']")
        monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    try:
        assert _sft(root / "run", "--num-steps", "1") == 1
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(root)], check=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rlhf-jax sft: error:")]
    assert len(lines) == 1, err
    assert "the checkpoint of step 1 could not be written" in lines[0]
    assert "No space left on device (free space or pick another --output-dir)" in lines[0]
    assert "Event loop is closed" not in err and "Traceback" not in err


@pytest.mark.slow
def test_a_bit_flipped_newest_checkpoint_falls_back_at_the_cli(tmp_path, caplog):
    out = tmp_path / "run"
    assert _sft(out, "--num-steps", "2", "--checkpoint.every-steps", "1") == 0
    reference = _metrics(out)
    manifest = json.loads((out / "checkpoints" / "2" / CHECKSUM_FILE).read_text())
    name = max(manifest["files"], key=lambda k: manifest["files"][k]["size"])
    victim = out / "checkpoints" / "2" / name
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    assert _sft(out, "--num-steps", "2", "--checkpoint.every-steps", "1") == 0
    assert f"{name} fails its checksum" in caplog.text
    assert "/2 is damaged and was skipped" in caplog.text
    # Resumed from step 1: step 2 retrained and saved again, with the same metrics.
    assert _metrics(out) == reference
    assert json.loads((out / "checkpoints" / "2" / CHECKSUM_FILE).read_text())["files"]


def test_nan_weights_in_a_model_directory_stop_the_run_and_save_nothing(tmp_path, capsys):
    config = ModelConfig.tiny_gpt2(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                   max_position_embeddings=64)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    embedding = model.backbone.embed.embedding
    embedding[...] = embedding[...].at[3].set(np.nan)
    save_pretrained(model, tmp_path / "hf")
    out = tmp_path / "run"
    rc = _sft(out, "--num-steps", "4", "--max-consecutive-skips", "2",
              "--checkpoint.every-steps", "1", model=["--model.path", str(tmp_path / "hf")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "2 consecutive non-finite steps" in err and "The last checkpoint is step None" in err
    assert not list((out / "checkpoints").glob("[0-9]*"))


_KILL_DURING_SAVE = """
import os, signal, sys
import orbax.checkpoint as ocp
from rlhf_jax import cli
save = ocp.CheckpointManager.save
def save_then_die(self, step, *args, **kwargs):
    if step == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-save: nothing of this step is committed
    return save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_a_save_then_resume_matches_an_uninterrupted_run(tmp_path):
    argv = [*MODEL, *REST, "--num-steps", "4", "--checkpoint.every-steps", "2"]
    assert _sft(tmp_path / "whole", *argv) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "KILL_AT": "4"}
    done = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, "sft", "--output-dir",
                           str(out), *argv], env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert _sft(out, *argv) == 0
    assert _metrics(out) == _metrics(tmp_path / "whole")


def test_export_into_a_non_hf_directory_needs_overwrite(tmp_path, capsys):
    run, hf = tmp_path / "run", tmp_path / "hf"
    assert _sft(run, "--num-steps", "1") == 0
    hf.mkdir()
    (hf / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["export", "--run-dir", str(run), "--output-dir", str(hf)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"rlhf-jax export: error: output_dir={hf} is not empty and is not a Hugging "
                   "Face model directory (no config.json); pick an empty or new directory, or "
                   "pass --overwrite to write into it (its other files are kept)")
    assert sorted(os.listdir(hf)) == ["notes.txt"]
    assert cli.main(["export", "--run-dir", str(run), "--output-dir", str(hf), "--overwrite"]) == 0
    assert (hf / "config.json").exists() and (hf / "notes.txt").read_text() == "mine"
    # an earlier export is a Hugging Face directory: exporting again replaces it without the flag
    assert cli.main(["export", "--run-dir", str(run), "--output-dir", str(hf)]) == 0
