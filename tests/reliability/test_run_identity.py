"""A run directory holds one run: fresh starts need --overwrite, a resume with a changed config is
refused (fields that alter the math) or recorded (fields that don't), and non-finite streaks stop
the run without checkpointing a poisoned state."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from typing import NamedTuple

import numpy as np
import pytest
import yaml
from flax import nnx

from rlhf_jax import cli
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.config import (
    CheckpointConfig,
    OptimizerConfig,
    TrainConfig,
    config_to_dict,
)
from rlhf_jax.train.dpo import (
    FINGERPRINT_KEY,
    REFERENCE_FILE,
    DPOConfig,
    reference_fingerprint,
)
from rlhf_jax.train.loop import (
    NEUTRAL_FIELDS,
    CheckpointSaveError,
    NonFiniteError,
    RunIdentityError,
    check_run_identity,
    config_differences,
    train_loop,
)

SMALL = ["--model.vocab-size", "64", "--model.hidden-size", "32", "--model.num-layers", "1",
         "--model.num-heads", "2", "--model.max-position-embeddings", "64",
         "--logging.progress", "none", "--logging.no-tensorboard", "--logging.every-steps", "1",
         "--data.synthetic", "topic", "--data.batch-size", "8", "--data.max-length", "48",
         "--data.num-eval", "0"]


def _dpo(out, *extra):
    return cli.main(["dpo", "--output-dir", str(out), *SMALL, *extra])


def _stored(out):
    with Checkpointer(out / "checkpoints") as ckpt:
        return ckpt.all_steps(), ckpt.stored_config()


def _params(out):
    files = sorted((out / "checkpoints").rglob("*"))
    return {f.relative_to(out): f.read_bytes() for f in files if f.is_file()}


@pytest.mark.slow
def test_no_resume_into_a_used_run_dir_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    out = tmp_path / "x"
    assert _dpo(out, "--num-steps", "2", "--seed", "0") == 0
    before = _params(out)
    config_before = (out / "config.yaml").read_text()
    assert _dpo(out, "--num-steps", "2", "--seed", "1", "--checkpoint.no-resume") == 1
    err = capsys.readouterr().err
    assert "already holds the checkpoints [2]" in err and "--overwrite" in err
    assert _params(out) == before  # nothing touched: weights, config and metrics of seed 0
    assert (out / "config.yaml").read_text() == config_before

    assert _dpo(out, "--num-steps", "2", "--seed", "1", "--checkpoint.no-resume",
                "--overwrite") == 0
    steps, stored = _stored(out)
    assert steps == [2] and stored["seed"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    assert _params(out) != before
    # metrics.jsonl was started over, not appended to.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "dpo/loss" in r] == [1, 2]


@pytest.mark.slow
def test_changed_config_resume_is_refused_listing_the_fields(tmp_path, capsys):
    out = tmp_path / "x"
    assert _dpo(out, "--num-steps", "2", "--loss-type", "sigmoid") == 0
    config_before = (out / "config.yaml").read_text()
    capsys.readouterr()

    assert _dpo(out, "--num-steps", "3", "--loss-type", "ipo") == 1
    err = capsys.readouterr().err
    assert "loss_type: ['sigmoid'] -> ['ipo']" in err
    assert "num_steps" not in err  # allowed fields are not listed as conflicts
    assert (out / "config.yaml").read_text() == config_before

    assert _dpo(out, "--num-steps", "3", "--loss-type", "sigmoid", "--model.hidden-size", "64",
                "--seed", "5") == 1
    err = capsys.readouterr().err
    assert "model.hidden_size: 32 -> 64" in err and "seed: 0 -> 5" in err
    assert "Traceback" not in err and len(err) < 2000
    assert _stored(out)[0] == [2]

    # A neutral change (num_steps, logging cadence) resumes and is recorded.
    assert _dpo(out, "--num-steps", "3", "--loss-type", "sigmoid",
                "--logging.every-steps", "2") == 0
    steps, stored = _stored(out)
    assert steps == [2, 3] and stored["num_steps"] == 3
    history = [json.loads(x) for x in (out / "config_history.jsonl").read_text().splitlines()]
    assert history == [{"step": 2, "changed": {"num_steps": [2, 3],
                                               "logging.every_steps": [1, 2]}}]
    assert yaml.safe_load((out / "config.yaml").read_text())["num_steps"] == 3


def test_config_differences_split_math_from_neutral_fields():
    old = {"seed": 0, "num_steps": 2, "model": {"hidden_size": 32}, "logging": {"wandb": False},
           "checkpoint": {"keep_last": 3}}
    new = {"seed": 0, "num_steps": 9, "model": {"hidden_size": 64}, "logging": {"wandb": True},
           "checkpoint": {"keep_last": 3}, "beta": 0.2}
    math, neutral = config_differences(old, new)
    assert math == {"model.hidden_size": (32, 64), "beta": ("<unset>", 0.2)}
    assert neutral == {"num_steps": (2, 9), "logging.wandb": (False, True)}
    assert "seed" not in NEUTRAL_FIELDS


@pytest.mark.slow
def test_a_nonfinite_streak_stops_with_an_error_and_keeps_the_finite_checkpoint(tmp_path,
                                                                                  capsys):
    out = tmp_path / "x"
    rc = _dpo(out, "--num-steps", "8", "--optimizer.learning-rate", "1e30",
              "--optimizer.warmup-steps", "0", "--checkpoint.every-steps", "1",
              "--checkpoint.keep-last", "2", "--max-consecutive-skips", "3")
    assert rc == 1
    err = capsys.readouterr().err
    assert "3 consecutive non-finite steps" in err and "max_consecutive_skips=3" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/nonfinite" in r]
    bad = [r["step"] for r in train if r["train/nonfinite"] > 0]
    good = [r["step"] for r in train if r["train/nonfinite"] == 0]
    assert len(bad) >= 2  # the third of the streak raises before it is logged
    steps, _ = _stored(out)
    # Only states after a finite update were saved; rotation never removed the newest of them.
    assert steps and steps[-1] == max(good) and all(s in good for s in steps)


def test_max_consecutive_skips_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dpo", "--output-dir", str(tmp_path / "run"), "--max-consecutive-skips", "0"])
    assert exit_info.value.code == 2
    assert "max_consecutive_skips must be an integer >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# library level (cheap: no model, a plain pytree as the checkpointed state)
# ---------------------------------------------------------------------------------------------


def _config(out, **kw):
    return TrainConfig(output_dir=str(out), **kw)


def _save(out, step, config):
    with Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.save(step, {"w": np.arange(3.0)}, config=config_to_dict(config))


def test_check_run_identity_library(tmp_path):
    out = tmp_path / "run"
    first = _config(out, seed=0, num_steps=2)
    _save(out, 2, first)
    (out / "metrics.jsonl").write_text("{}\n")
    with Checkpointer(out / "checkpoints") as ckpt:
        assert check_run_identity(first, ckpt) == {}
        assert check_run_identity(_config(out, seed=0, num_steps=5), ckpt) == {
            "num_steps": [2, 5]}
        with pytest.raises(RunIdentityError, match=r"optimizer.learning_rate: 0.0001 -> 0.001\n  seed: 0 -> 1\n"):
            check_run_identity(_config(out, seed=1, optimizer=OptimizerConfig(
                learning_rate=1e-3)), ckpt)
        no_resume = _config(out, seed=1, checkpoint=CheckpointConfig(resume=False))
        with pytest.raises(RunIdentityError, match="already holds the checkpoints"):
            check_run_identity(no_resume, ckpt)
        assert ckpt.all_steps() == [2]
        check_run_identity(dataclasses.replace(no_resume, overwrite=True), ckpt)
        assert ckpt.all_steps() == [] and not (out / "metrics.jsonl").exists()


class _State(NamedTuple):
    step: np.ndarray


class _FakeCheckpointer:
    directory = "ckpt"

    def __init__(self, written=True):
        self.saved: list[int] = []
        self.written = written

    def all_steps(self):
        return list(self.saved)

    def save(self, step, state, **kw):
        if self.written:
            self.saved.append(step)
        return self.written


def _run_loop(nonfinite_steps, *, checkpointer, max_consecutive_skips=3, num_steps=8):
    def step_fn(state, batch):
        step = int(state.step) + 1
        return _State(np.asarray(step)), {"loss": np.float32(1.0),
                                          "train/nonfinite": np.float32(step in nonfinite_steps)}

    return train_loop(step_fn, _State(np.asarray(0)), iter([{}] * num_steps),
                      num_steps=num_steps, checkpointer=checkpointer, checkpoint_every=1,
                      max_consecutive_skips=max_consecutive_skips)


def test_loop_stops_after_consecutive_skips_and_never_saves_a_nonfinite_update():
    ckpt = _FakeCheckpointer()
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite steps \(up to step 6\)"
                                             r".* The last checkpoint is step 3"):
        _run_loop({2, 4, 5, 6}, checkpointer=ckpt)
    assert ckpt.saved == [1, 3]  # steps 2 and 4, 5 were not saved
    ckpt = _FakeCheckpointer()
    result = _run_loop({2, 4, 5, 8}, checkpointer=ckpt)  # never 3 in a row: finishes
    assert result.skipped_steps == 4 and ckpt.saved == [1, 3, 6, 7]


def test_a_save_that_does_not_happen_is_an_error():
    with pytest.raises(CheckpointSaveError, match="step 1 was not written"):
        _run_loop(set(), checkpointer=_FakeCheckpointer(written=False))


# ---------------------------------------------------------------------------------------------
# precomputed reference tables carry a fingerprint
# ---------------------------------------------------------------------------------------------


def test_reference_fingerprint_follows_weights_and_data():
    config = ModelConfig.tiny_gpt2(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                                   max_position_embeddings=12)
    a, b = CausalLM(config, rngs=nnx.Rngs(0)), CausalLM(config, rngs=nnx.Rngs(1))
    run = DPOConfig(reference="precomputed")
    assert reference_fingerprint(run, a) == reference_fingerprint(run, a)
    assert reference_fingerprint(run, a) != reference_fingerprint(run, b)
    other_data = dataclasses.replace(run, data=dataclasses.replace(run.data, max_length=64))
    assert reference_fingerprint(other_data, a) != reference_fingerprint(run, a)
    # Fields that do not change the reference log-probs keep the table.
    assert reference_fingerprint(dataclasses.replace(run, beta=0.5, num_steps=7), a) == \
        reference_fingerprint(run, a)


@pytest.mark.slow
def test_a_stale_reference_table_is_recomputed(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert _dpo(first, "--num-steps", "1", "--reference", "precomputed", "--seed", "0") == 0
    second.mkdir()
    shutil.copy(first / REFERENCE_FILE, second / REFERENCE_FILE)
    assert _dpo(second, "--num-steps", "1", "--reference", "precomputed", "--seed", "1") == 0
    records = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    # At step 1 the policy equals the reference: the DPO loss is ln 2 exactly.
    assert records[0]["step"] == 1
    np.testing.assert_allclose(records[0]["dpo/loss"], math.log(2), rtol=1e-5)
    with np.load(first / REFERENCE_FILE) as a, np.load(second / REFERENCE_FILE) as b:
        assert str(a[FINGERPRINT_KEY]) != str(b[FINGERPRINT_KEY])


# ---------------------------------------------------------------------------------------------
# a damaged newest checkpoint falls back to the newest intact one
# ---------------------------------------------------------------------------------------------


def _two_checkpoints(root):
    with Checkpointer(root) as ckpt:
        for step in (1, 2):
            assert ckpt.save(step, {"w": np.full(64, float(step))}, config={"seed": 0})


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, caplog, damage):
    root = tmp_path / "checkpoints"
    _two_checkpoints(root)
    files = sorted(f for f in (root / "2" / "state").rglob("*") if f.is_file()
                   and f.stat().st_size > 0 and "metadata" not in f.name.lower())
    assert files
    for f in files:
        if damage == "delete":
            f.unlink()
        else:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with Checkpointer(root) as ckpt:
        restored = ckpt.restore_newest_intact({"w": np.zeros(64)})
        assert restored.step == 1
        np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.full(64, 1.0))
        assert list(ckpt.damaged) == [2]
        assert "checkpoint" in caplog.text and "/2 is damaged" in caplog.text
        assert max(len(line) for line in caplog.text.splitlines()) < 600
        # The damaged step is replaced by the next save of that step.
        assert ckpt.save(2, {"w": np.full(64, 5.0)}, config={"seed": 0})
        assert ckpt.restore_newest_intact({"w": np.zeros(64)}).step == 2
