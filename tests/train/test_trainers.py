"""End-to-end runs of the SFT, reward-model and DPO-family trainers on a tiny model, the CLI and
export, plus float64 NumPy references for the trainers' log-prob and pair helpers."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from train_toys import write_easy_preferences, write_easy_sft

from rlhf_jax import cli
from rlhf_jax.train import (
    CheckpointConfig,
    DataSpec,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
    read_metrics,
)
from rlhf_jax.train.builders import build_model, load_tokenizer_for, setup_training
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.data import build_data
from rlhf_jax.train.dpo import (
    CPLHyperParams,
    CPOHyperParams,
    DPOConfig,
    DPOHyperParams,
    ORPOHyperParams,
    PolicyAndReference,
    PreferenceLoss,
    SimPOHyperParams,
    preference_hyperparams,
    preference_loss,
    train_dpo,
)
from rlhf_jax.train.export import read_checkpoint_state
from rlhf_jax.train.logprobs import aligned_token_logps
from rlhf_jax.train.loop import WALL_CLOCK_METRICS
from rlhf_jax.train.pairs import pair_forward_batch, pair_sequence_sums
from rlhf_jax.train.rm import (
    RMConfig,
    RMHyperParams,
    make_rm_loss,
    reward_statistics,
    rm_loss,
    train_rm,
)
from rlhf_jax.train.sft import SFTConfig, sft_loss_mask, train_sft

TINY = ModelSpec(preset="tiny_gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                 max_position_embeddings=64)
QUIET = LoggingConfig(every_steps=1, tensorboard=False, progress="none")


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_easy_preferences(root / "pref_train.jsonl", n=192, seed=0)
    write_easy_preferences(root / "pref_eval.jsonl", n=64, seed=1)
    write_easy_sft(root / "sft_train.jsonl", n=192, seed=2)
    return root


def _pref_data(root, **kw) -> DataSpec:
    base = dict(synthetic="topic", path=str(root / "pref_train.jsonl"),
                eval_path=str(root / "pref_eval.jsonl"), batch_size=8, max_length=48,
                max_prompt_length=24)
    base.update(kw)
    return DataSpec(**base)


def _loss_falls(records, key, *, window=5, factor=0.8):
    values = [r[key] for r in records if key in r]
    first, last = np.mean(values[:window]), np.mean(values[-window:])
    assert last < factor * first, (key, first, last)


# ---------------------------------------------------------------------------------------------
# helpers against float64 NumPy references
# ---------------------------------------------------------------------------------------------


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class TestAlignedTokenLogps:
    def test_matches_numpy_and_alignment(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
        ids = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
        out = np.asarray(aligned_token_logps(jnp.asarray(logits), jnp.asarray(ids)))
        ref = np.zeros((2, 5))
        lsm = _np_log_softmax(logits)
        for b in range(2):
            for t in range(1, 5):  # token t is scored by the logits at t - 1
                ref[b, t] = lsm[b, t - 1, ids[b, t]]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        assert np.all(out[:, 0] == 0)

    def test_segment_starts_get_zero(self):
        rng = np.random.default_rng(1)
        logits = jnp.asarray(rng.normal(size=(1, 6, 5)), jnp.float32)
        ids = jnp.asarray([[1, 2, 3, 4, 1, 2]], jnp.int32)
        seg = jnp.asarray([[1, 1, 1, 2, 2, 0]], jnp.int32)
        plain = np.asarray(aligned_token_logps(logits, ids))
        packed = np.asarray(aligned_token_logps(logits, ids, seg))
        assert packed[0, 3] == 0 and packed[0, 5] == 0  # first of segment 2, padding
        np.testing.assert_array_equal(packed[0, [1, 2, 4]], plain[0, [1, 2, 4]])


def _pair_batch(rng, b=3, t=6):
    batch = {}
    for prefix in ("chosen_", "rejected_"):
        lengths = rng.integers(3, t + 1, size=b)
        att = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
        loss = att * (np.arange(t)[None] >= 2)
        batch[prefix + "input_ids"] = rng.integers(0, 9, size=(b, t)).astype(np.int32)
        batch[prefix + "attention_mask"] = att
        batch[prefix + "loss_mask"] = loss.astype(np.int32)
        batch[prefix + "positions"] = np.where(att > 0, np.arange(t)[None], 0).astype(np.int32)
        batch[prefix + "segment_ids"] = att.copy()
    return batch


class TestPairHelpers:
    def test_padded_sums_and_lengths(self):
        rng = np.random.default_rng(0)
        batch = _pair_batch(rng)
        rows = pair_forward_batch(batch)
        assert rows["input_ids"].shape == (6, 6)
        values = rng.normal(size=(6, 6))
        values[rows["loss_mask"] == 0] = np.nan  # masked entries never leak
        c, r, lc, lr = pair_sequence_sums(jnp.asarray(values, jnp.float32), rows, batch)
        mask = np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
        ref = np.where(mask > 0, values, 0.0).sum(-1)
        np.testing.assert_allclose(np.concatenate([c, r]), ref, rtol=1e-5)
        np.testing.assert_array_equal(np.concatenate([lc, lr]), mask.sum(-1))
        ca, ra, _, _ = pair_sequence_sums(jnp.asarray(values, jnp.float32), rows, batch,
                                          average=True)
        np.testing.assert_allclose(np.concatenate([ca, ra]), ref / mask.sum(-1), rtol=1e-5)

    def test_packed_layout_matches_padded(self):
        from rlhf_jax.data import TokenizedPreference, collate_preference, pack_preference

        rng = np.random.default_rng(3)
        examples = [
            TokenizedPreference(
                prompt_ids=rng.integers(1, 9, size=rng.integers(2, 5)).astype(np.int32),
                chosen_ids=rng.integers(1, 9, size=rng.integers(1, 5)).astype(np.int32),
                rejected_ids=rng.integers(1, 9, size=rng.integers(1, 5)).astype(np.int32),
                margin=0.0, label=1.0, origin=f"ex:{i}")
            for i in range(4)
        ]
        padded = collate_preference(examples, pad_id=0, length=12)
        packed = pack_preference(examples, num_rows=4, row_length=16, max_pairs=6, pad_id=0)
        table = rng.normal(size=(10,))

        def values_for(rows):  # a value that depends only on the token id
            return jnp.asarray(table[np.asarray(rows["input_ids"])], jnp.float32)

        rows_p = pair_forward_batch(padded)
        rows_k = pair_forward_batch(packed)
        a = pair_sequence_sums(values_for(rows_p), rows_p, padded)
        b = pair_sequence_sums(values_for(rows_k), rows_k, packed)
        for x, y in zip(a, b):
            np.testing.assert_allclose(np.asarray(y)[:4], np.asarray(x), rtol=1e-5)
            assert np.all(np.asarray(y)[4:] == 0)  # padding pairs

    def test_sft_loss_mask(self):
        batch = {"loss_mask": jnp.asarray([[0, 0, 1, 1, 0]]),
                 "attention_mask": jnp.asarray([[1, 1, 1, 1, 0]]),
                 "positions": jnp.asarray([[0, 1, 2, 3, 0]])}
        np.testing.assert_array_equal(sft_loss_mask(batch), [[0, 0, 1, 1, 0]])
        np.testing.assert_array_equal(sft_loss_mask(batch, completion_only=False),
                                      [[0, 1, 1, 1, 0]])


# ---------------------------------------------------------------------------------------------
# end-to-end runs
# ---------------------------------------------------------------------------------------------


def test_sft_cli_from_clean_dir_then_export(tmp_path, easy_data):
    """`rlhf-jax sft` on packed rows from a YAML file, then `rlhf-jax export`."""
    out = tmp_path / "sft"
    config = {
        "num_steps": 40,
        "model": dataclasses.asdict(TINY),
        "data": {"synthetic": "topic", "path": str(easy_data / "sft_train.jsonl"),
                 "batch_size": 8, "max_length": 48, "num_eval": 0, "packing": True},
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": 4},
        "logging": {"every_steps": 1, "progress": "none"},
    }
    config["model"]["lora_targets"] = []
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["sft", "--config", str(path), "--output-dir", str(out)]) == 0
    records = read_metrics(out)
    assert len(records) == 40
    _loss_falls(records, "sft/loss", factor=0.75)
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["output_dir"] == str(out) and written["num_steps"] == 40
    assert written["optimizer"]["learning_rate"] == 3e-3
    assert os.listdir(out / "checkpoints") == ["40"]
    assert any(f.startswith("events") for f in os.listdir(out / "tensorboard"))

    hf_dir = tmp_path / "hf"
    assert cli.main(["export", "--run-dir", str(out), "--output-dir", str(hf_dir)]) == 0
    from rlhf_jax.models.hf import from_pretrained

    exported = from_pretrained(hf_dir)
    _, raw = read_checkpoint_state(str(out / "checkpoints"))
    np.testing.assert_array_equal(
        np.asarray(exported.backbone.embed.embedding[...]),
        raw["params"]["backbone"]["embed"]["embedding"]["value"])
    assert (hf_dir / "tokenizer.json").exists()


def test_cli_errors(capsys, tmp_path):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    saved = dict(cli.COMMANDS)
    try:
        cli.COMMANDS["ghost"] = "rlhf_jax.train.ghost_trainer:GhostConfig:train_ghost"
        assert cli.main(["ghost"]) == 2
        err = capsys.readouterr().err
        assert "needs module rlhf_jax.train.ghost_trainer" in err
    finally:
        cli.COMMANDS.clear()
        cli.COMMANDS.update(saved)
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_steps: 3\nbeta: [1\n")
    assert cli.main(["dpo", "--config", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert cli.main([]) == 0
    assert "rejection-sampling" in capsys.readouterr().out


def test_cli_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["dpo", "--help"])
    out = capsys.readouterr().out
    for option in ("--beta", "--loss-type", "--reference", "--algorithm", "--model.lora-rank",
                   "--optimizer.grad-accum-steps", "--nan-policy", "--config"):
        assert option in out, option


def test_rm_learns_and_normalises(tmp_path, easy_data):
    config = RMConfig(
        output_dir=str(tmp_path / "rm"), num_steps=60, model=TINY, data=_pref_data(easy_data),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5), logging=QUIET,
        normalization_batches=8,
    )
    summary = train_rm(config)
    records = read_metrics(config.output_dir)
    _loss_falls(records, "rm/loss")
    assert summary["eval_metrics"]["rm/eval/accuracy"] > 0.7
    norm = json.loads((tmp_path / "rm" / "reward_normalization.json").read_text())
    assert norm == summary["normalization"]
    assert norm["count"] == 128  # 8 held-out batches of 8 pairs, chosen and rejected
    # Starting from gain 1 and bias 0: gain = 1 / std and bias = -mean / std.
    np.testing.assert_allclose(norm["gain"], 1.0 / np.asarray(norm["std"]), rtol=1e-12)
    np.testing.assert_allclose(norm["bias"], -np.asarray(norm["mean"]) / norm["std"],
                               rtol=1e-12)
    # The final checkpoint holds the normalised model.

    step, raw = read_checkpoint_state(str(tmp_path / "rm" / "checkpoints"))
    assert step == 60
    np.testing.assert_allclose(raw["frozen"]["norm_gain"]["value"], norm["gain"], rtol=1e-6)
    np.testing.assert_allclose(raw["frozen"]["norm_bias"]["value"], norm["bias"], rtol=1e-6)


@pytest.mark.slow
def test_rm_normalised_rewards_have_unit_statistics(tmp_path, easy_data):

    config = RMConfig(
        output_dir=str(tmp_path / "rm"), num_steps=10, model=TINY, data=_pref_data(easy_data),
        optimizer=OptimizerConfig(learning_rate=3e-3), logging=QUIET, normalization_batches=8,
        head_names=("helpful", "harmless"),
    )
    train_rm(config)
    mean, std, count = reward_statistics(*summary_state(config), max_batches=8)
    assert count == 128
    np.testing.assert_allclose(mean, 0.0, atol=1e-4)
    np.testing.assert_allclose(std, 1.0, rtol=1e-4)


def summary_state(config: RMConfig):
    """Rebuilds the RM run's setup, restores its final checkpoint and its held-out batches."""
    tok = load_tokenizer_for(config.data, config.model)
    data = build_data(config.data, format="preference", tokenizer=tok, seed=config.seed)
    model = build_model(config.model, kind="reward", head_names=config.head_names)
    setup = setup_training(config, model, make_rm_loss(config))
    ckpt = Checkpointer(os.path.join(config.output_dir, "checkpoints"))
    state = ckpt.restore(setup.state).state
    ckpt.close()
    return setup, state, data.eval_batches()


def test_dpo_learns(tmp_path, easy_data):
    config = DPOConfig(
        output_dir=str(tmp_path / "dpo"), num_steps=40, model=TINY,
        data=_pref_data(easy_data), beta=0.1, logging=QUIET,
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=4),
        checkpoint=CheckpointConfig(every_steps=0),
    )
    summary = train_dpo(config)
    records = read_metrics(config.output_dir)
    _loss_falls(records, "dpo/loss")
    assert summary["reference"] == "model"
    assert summary["eval_metrics"]["dpo/eval/accuracy"] > 0.7
    assert summary["eval_metrics"]["dpo/eval/reward_margin"] > 0
    # Step 1: the policy equals the reference, so every implicit reward is exactly 0.
    assert abs(records[0]["dpo/rewards_chosen"]) < 1e-5
    assert abs(records[0]["dpo/reward_margin"]) < 1e-5
    np.testing.assert_allclose(records[0]["dpo/loss"], np.log(2.0), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm, loss_type, extra",
    [
        ("dpo", ("ipo",), {}),
        ("dpo", ("sigmoid", "bco_pair", "sft"), {"loss_weights": (0.8, 0.2, 1.0)}),
        ("dpo", ("robust",), {"label_smoothing": 0.1}),
        ("simpo", (), {"beta": 2.0}),
        ("orpo", (), {"beta": 1.0}),
        ("cpo", ("sigmoid",), {}),
        ("kto", (), {"beta": 0.5}),
        ("kto", ("apo_zero_unpaired",), {"beta": 0.5}),
    ],
)
def test_preference_family_learns(tmp_path, easy_data, algorithm, loss_type, extra):
    data = _pref_data(easy_data, format="preference")  # KTO unpairs the pairs
    config = DPOConfig(
        output_dir=str(tmp_path / algorithm), num_steps=40, model=TINY,
        data=data, algorithm=algorithm, loss_type=loss_type, logging=QUIET,
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=4), **extra,
    )
    summary = train_dpo(config)
    records = read_metrics(config.output_dir)
    _loss_falls(records, f"{algorithm}/loss", factor=0.97)
    if algorithm == "kto":  # desirable completions gain implicit reward over undesirable ones
        assert summary["eval_metrics"]["kto/eval/reward_margin"] > 0
    else:
        assert summary["eval_metrics"][f"{algorithm}/eval/accuracy"] > 0.6


@pytest.mark.slow
def test_precomputed_reference_matches_model_reference(tmp_path, easy_data):
    runs = {}
    for reference in ("model", "precomputed"):
        config = DPOConfig(
            output_dir=str(tmp_path / reference), num_steps=5, model=TINY, reference=reference,
            data=_pref_data(easy_data), logging=QUIET,
            optimizer=OptimizerConfig(learning_rate=2e-3),
        )
        summary = train_dpo(config)
        assert summary["reference"] == reference
        runs[reference] = read_metrics(config.output_dir)
    assert (tmp_path / "precomputed" / "reference_logps.npz").exists()
    for a, b in zip(runs["model"], runs["precomputed"]):
        for key in ("dpo/loss", "dpo/rewards_chosen", "dpo/accuracy", "dpo/eval/accuracy"):
            if key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lora_dpo_reference_is_base_model(tmp_path, easy_data):
    spec = dataclasses.replace(TINY, lora_rank=4, lora_alpha=8.0,
                               lora_targets=("q", "v", "up", "down"))
    config = DPOConfig(
        output_dir=str(tmp_path / "lora"), num_steps=40, model=spec, data=_pref_data(easy_data),
        logging=QUIET, optimizer=OptimizerConfig(learning_rate=2e-2), beta=0.5,
    )
    summary = train_dpo(config)
    records = read_metrics(config.output_dir)
    assert summary["reference"] == "lora_base"
    # At step 1 the adapters are zero: the policy is the base model (reference), rewards are 0.
    assert abs(records[0]["dpo/reward_margin"]) < 1e-5
    _loss_falls(records, "dpo/loss", factor=0.97)
    assert summary["eval_metrics"]["dpo/eval/reward_margin"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kwise", "best_of_k", "plackett_luce"])
def test_rm_ranking_losses(tmp_path, loss):
    config = RMConfig(
        output_dir=str(tmp_path / loss), num_steps=30, model=TINY, loss=loss,
        data=DataSpec(synthetic="topic", num_train=128, num_eval=32, batch_size=8, max_length=48,
                      max_prompt_length=24, num_responses=3),
        optimizer=OptimizerConfig(learning_rate=3e-3), logging=QUIET, normalize=False,
    )
    train_rm(config)
    _loss_falls(read_metrics(config.output_dir), "rm/loss", factor=0.95)


@pytest.mark.slow
def test_sft_resume_and_devices(tmp_path, easy_data):
    """A preempted-then-resumed SFT run logs the same metrics as an uninterrupted one, and a
    1-device run matches the 8-device one."""
    import signal
    import threading

    from rlhf_jax.sharding import MeshConfig

    data = DataSpec(synthetic="topic", path=str(easy_data / "sft_train.jsonl"), batch_size=8,
                    max_length=48, num_eval=0)
    base = SFTConfig(num_steps=12, model=TINY, data=data, logging=QUIET,
                     optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
                     checkpoint=CheckpointConfig(every_steps=4))
    full = dataclasses.replace(base, output_dir=str(tmp_path / "full"))
    train_sft(full)
    interrupted = dataclasses.replace(base, output_dir=str(tmp_path / "cut"))

    def stop_when_started():
        path = os.path.join(interrupted.output_dir, "metrics.jsonl")
        while not (os.path.exists(path) and len(open(path).readlines()) >= 5):
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=stop_when_started, daemon=True)
    watcher.start()
    first = train_sft(interrupted)
    watcher.join()
    assert first["preempted"] and first["step"] < 12
    second = train_sft(interrupted)
    assert second["step"] == 12
    strip = lambda rs: [{k: v for k, v in r.items() if k not in WALL_CLOCK_METRICS} for r in rs]
    assert strip(read_metrics(interrupted.output_dir)) == strip(read_metrics(full.output_dir))

    single = dataclasses.replace(base, output_dir=str(tmp_path / "one"), num_steps=3,
                                 mesh=MeshConfig(data=1))
    # A 1-device mesh over the first device only (the run's preflight checks see one device).
    import rlhf_jax.sharding as sh

    original, count = sh.make_mesh, jax.device_count
    sh.make_mesh = lambda cfg=None, devices=None: original(cfg, devices=jax.devices()[:1])
    jax.device_count = lambda *a: 1
    try:
        train_sft(single)
    finally:
        sh.make_mesh, jax.device_count = original, count
    for a, b in zip(read_metrics(single.output_dir), read_metrics(full.output_dir)[:3]):
        np.testing.assert_allclose(a["sft/loss"], b["sft/loss"], rtol=1e-5)
        np.testing.assert_allclose(a["train/grad_norm"], b["train/grad_norm"], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# trainer losses on a lookup-table "model", against float64 NumPy references
# ---------------------------------------------------------------------------------------------


class TableLM:
    """logits[b, t] = table[input_ids[b, t]]: a causal LM whose outputs are known exactly."""

    def __init__(self, table):
        self.table = jnp.asarray(table, jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        return self.table[input_ids]


class TableRM:
    """rewards[b] = values[input_ids[b, last real token]] for H heads."""

    def __init__(self, values):
        self.values = jnp.asarray(values, jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        last = jnp.sum(attention_mask, axis=-1) - 1
        return self.values[jnp.take_along_axis(input_ids, last[:, None], axis=1)[:, 0]]


def _np_seq_logps(table, ids, loss_mask, *, average=False):
    lsm = _np_log_softmax(table)  # [V, V]: log p(next | current)
    out = np.zeros(ids.shape[0])
    for b in range(ids.shape[0]):
        total = sum(lsm[ids[b, t - 1], ids[b, t]] for t in range(1, ids.shape[1])
                    if loss_mask[b, t])
        out[b] = total / max(loss_mask[b].sum(), 1) if average else total
    return out


def _np_logsig(x):
    return -np.logaddexp(0.0, -x)


class TestPreferenceLossPlumbing:
    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls):
        rng = np.random.default_rng(5)
        batch = _pair_batch(rng, b=4, t=7)
        batch["label"] = np.asarray([1.0, 0.8, 0.6, 1.0], np.float32)
        pol, ref = rng.normal(size=(9, 9)), rng.normal(size=(9, 9))
        return batch, pol, ref

    def _np_parts(self, batch, pol, ref, average=False):
        parts = {}
        for name, table in (("p", pol), ("r", ref)):
            for side in ("chosen", "rejected"):
                parts[name + side[0]] = _np_seq_logps(table, batch[side + "_input_ids"],
                                                      batch[side + "_loss_mask"], average=average)
        return parts

    @pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
    def test_dpo_matches_numpy(self, setup, loss_type):
        batch, pol, ref = setup
        x = self._np_parts(batch, pol, ref)
        beta, eps = 0.3, (0.1 if loss_type == "robust" else 0.0)
        d = (x["pc"] - x["rc"]) - (x["pr"] - x["rr"])
        if loss_type == "sigmoid":
            expected = -_np_logsig(beta * d)
        elif loss_type == "hinge":
            expected = np.maximum(0.0, 1 - beta * d)
        elif loss_type == "ipo":
            lc, lr = batch["chosen_loss_mask"].sum(-1), batch["rejected_loss_mask"].sum(-1)
            nd = (x["pc"] - x["rc"]) / lc - (x["pr"] - x["rr"]) / lr
            expected = (nd - 1 / (2 * beta)) ** 2
        else:
            expected = (-(1 - eps) * _np_logsig(beta * d) + eps * _np_logsig(-beta * d)) \
                / (1 - 2 * eps)
        model = PolicyAndReference.__new__(PolicyAndReference)
        object.__setattr__(model, "policy", TableLM(pol))
        object.__setattr__(model, "reference", TableLM(ref))
        hp = DPOHyperParams(loss_type=(loss_type,), beta=beta, label_smoothing=eps)
        loss, metrics = jax.jit(lambda b: preference_loss(model, b, hp=hp))(batch)
        np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
        rc, rr = beta * (x["pc"] - x["rc"]), beta * (x["pr"] - x["rr"])
        np.testing.assert_allclose(metrics["dpo/rewards_chosen"], rc.mean(), rtol=1e-5)
        np.testing.assert_allclose(metrics["dpo/reward_margin"], (rc - rr).mean(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(metrics["dpo/accuracy"], (rc > rr).mean())

    def test_precomputed_equals_model_reference_and_mixture(self, setup):
        batch, pol, ref = setup
        x = self._np_parts(batch, pol, ref)
        model = PolicyAndReference.__new__(PolicyAndReference)
        object.__setattr__(model, "policy", TableLM(pol))
        object.__setattr__(model, "reference", TableLM(ref))
        pre = dict(batch, ref_chosen_logps=x["rc"].astype(np.float32),
                   ref_rejected_logps=x["rr"].astype(np.float32))
        hp = DPOHyperParams(loss_type=("sigmoid", "sft"), loss_weights=(0.7, 0.5), beta=0.2)
        a = preference_loss(model, batch, hp=hp)[0]
        b = preference_loss(TableLM(pol), pre, hp=hp, reference="precomputed")[0]
        d = (x["pc"] - x["rc"]) - (x["pr"] - x["rr"])
        nll = -x["pc"].sum() / batch["chosen_loss_mask"].sum()
        expected = 0.7 * np.mean(-_np_logsig(0.2 * d)) + 0.5 * nll
        np.testing.assert_allclose(a, expected, rtol=1e-5)
        np.testing.assert_allclose(b, expected, rtol=1e-5)

    def test_soft_labels_are_label_smoothing(self, setup):
        batch, pol, ref = setup
        x = self._np_parts(batch, pol, ref)
        pre = dict(batch, ref_chosen_logps=x["rc"].astype(np.float32),
                   ref_rejected_logps=x["rr"].astype(np.float32))
        loss = preference_loss(TableLM(pol), pre, reference="precomputed",
                               hp=DPOHyperParams(soft_labels=True, beta=0.5))[0]
        d = 0.5 * ((x["pc"] - x["rc"]) - (x["pr"] - x["rr"]))
        p = batch["label"].astype(np.float64)
        expected = np.mean(-p * _np_logsig(d) - (1 - p) * _np_logsig(-d))
        np.testing.assert_allclose(loss, expected, rtol=1e-5)

    def test_reference_free_losses(self, setup):
        batch, pol, _ = setup
        s = self._np_parts(batch, pol, pol)
        a = self._np_parts(batch, pol, pol, average=True)
        nll = -s["pc"].sum() / batch["chosen_loss_mask"].sum()
        simpo = preference_loss(TableLM(pol), batch,
                                hp=SimPOHyperParams(beta=2.0, simpo_gamma=0.5))[0]
        np.testing.assert_allclose(
            simpo, np.mean(-_np_logsig(2.0 * (a["pc"] - a["pr"]) - 0.5)), rtol=1e-5)
        orpo = preference_loss(TableLM(pol), batch, hp=ORPOHyperParams(beta=0.1))[0]
        log_odds = (a["pc"] - a["pr"]) - (np.log1p(-np.exp(a["pc"])) - np.log1p(-np.exp(a["pr"])))
        np.testing.assert_allclose(orpo, nll + np.mean(-0.1 * _np_logsig(log_odds)), rtol=1e-5)
        cpo = preference_loss(TableLM(pol), batch,
                              hp=CPOHyperParams(beta=0.1, cpo_alpha=1.0))[0]
        np.testing.assert_allclose(
            cpo, np.mean(-_np_logsig(0.1 * (s["pc"] - s["pr"]))) + nll, rtol=1e-5)

    @pytest.mark.parametrize("hp", [
        DPOHyperParams(loss_type=("sigmoid",), beta=0.3, label_smoothing=0.1, rpo_alpha=0.5),
        DPOHyperParams(loss_type=("robust", "sft"), loss_weights=(1.0, 0.3), beta=0.2,
                       label_smoothing=0.2),
        DPOHyperParams(loss_type=("discopop",), beta=0.4, discopop_tau=0.1),
        SimPOHyperParams(beta=2.0, simpo_gamma=0.5, label_smoothing=0.1),
        ORPOHyperParams(beta=0.1),
        CPOHyperParams(beta=0.1, cpo_alpha=0.7, label_smoothing=0.1),
        CPLHyperParams(beta=0.2, cpl_conservative_bias=0.7, cpl_bc_coeff=0.5),
    ], ids=lambda hp: hp.algorithm)
    def test_traced_hyperparameters_give_the_constant_result(self, setup, hp):
        """`PreferenceLoss.split_traced` (what `run_dpo` trains with: beta and the other
        scale-only values as arguments of the jitted step) computes the loss and metrics of the
        hyper-parameters compiled in as constants; the traced part leaves no value behind."""
        batch, pol, ref = setup
        model = PolicyAndReference.__new__(PolicyAndReference)
        object.__setattr__(model, "policy", TableLM(pol))
        object.__setattr__(model, "reference", TableLM(ref))
        constant = PreferenceLoss(hp, "model")
        traced, hparams = constant.split_traced()
        assert set(hparams) == {f for f in hp.traced if getattr(hp, f) != 0}
        assert "beta" in hparams and all(getattr(traced.hp, f) is None for f in hparams)
        # Sweep points differing only in traced values are the same (hashable) loss function.
        other, _ = PreferenceLoss(hp._replace(beta=hp.beta * 3), "model").split_traced()
        assert other == traced and hash(other) == hash(traced)
        want = jax.jit(lambda b: constant(model, b))(batch)
        got = jax.jit(lambda b, h: traced(model, b, None, h))(
            batch, {k: jnp.float32(v) for k, v in hparams.items()})
        assert set(got[1]) == set(want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        for k in want[1]:
            np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-6, atol=1e-7, err_msg=k)

    def test_bad_loss_type_names_allowed_values(self, setup):
        batch, pol, _ = setup
        with pytest.raises(ValueError, match="allowed: exactly one of"):
            preference_hyperparams(DPOConfig(algorithm="kto", loss_type=("sigmoid",)))
        with pytest.raises(ValueError, match="allowed: exactly one of"):
            preference_hyperparams(DPOConfig(algorithm="cpo", loss_type=("sigmoid", "ipo")))
        with pytest.raises(ValueError, match="one weight per loss_type"):
            preference_loss(TableLM(pol), batch,
                            hp=DPOHyperParams(loss_type=("sigmoid",), loss_weights=(1., 2.)))
        with pytest.raises(ValueError, match="one weight per loss_type"):
            preference_hyperparams(DPOConfig(algorithm="kto", loss_weights=(1., 2.)))
        with pytest.raises(ValueError, match=r"algorithm='ppo' is not one of \['dpo'"):
            preference_hyperparams(DPOConfig(algorithm="ppo"))

    def test_hyperparams_read_every_field_from_the_config(self):
        """Each family's hyper-parameters are the config fields of the same names (an empty
        loss_type takes the family's default)."""
        config = DPOConfig(algorithm="cpo", beta=0.3, simpo_gamma=0.7, cpo_alpha=0.2,
                           label_smoothing=0.05, soft_labels=True)
        hp = preference_hyperparams(config)
        assert hp == CPOHyperParams(loss_type=("sigmoid",), beta=0.3, label_smoothing=0.05,
                                    soft_labels=True, simpo_gamma=0.7, cpo_alpha=0.2)
        for algorithm, cls in (("dpo", DPOHyperParams), ("simpo", SimPOHyperParams),
                               ("orpo", ORPOHyperParams)):
            hp = preference_hyperparams(DPOConfig(algorithm=algorithm, rpo_alpha=0.5))
            assert type(hp) is cls and hp.algorithm == algorithm
            config = DPOConfig(algorithm=algorithm, rpo_alpha=0.5)
            for name in hp._fields:
                want = getattr(config, name)
                if name == "loss_type" and not want:
                    want = cls._field_defaults[name]
                assert getattr(hp, name) == want, name


class TestRewardLossPlumbing:
    def test_bradley_terry_margin_centering_heads(self):
        rng = np.random.default_rng(2)
        batch = _pair_batch(rng, b=5, t=6)
        batch["margin"] = rng.uniform(0, 1, size=5).astype(np.float32)
        batch["label"] = rng.uniform(0.5, 1, size=5).astype(np.float32)
        batch["head_index"] = np.asarray([0, 1, -1, 1, 0], np.int32)
        values = rng.normal(size=(9, 2))
        hp = RMHyperParams(head_names=("a", "b"), use_margin=True, margin_scale=2.0,
                           label_smoothing=0.1, center_rewards_coefficient=0.01)
        assert RMHyperParams.from_config(RMConfig(**hp._asdict())) == hp
        loss, metrics = rm_loss(TableRM(values), batch, hp=hp)

        def last(side):
            ids, att = batch[side + "_input_ids"], batch[side + "_attention_mask"]
            return values[ids[np.arange(5), att.sum(-1) - 1]]

        c, r = last("chosen"), last("rejected")  # [5, 2]
        p = batch["label"][:, None] * 0.9 + (1 - batch["label"][:, None]) * 0.1
        d = c - r - 2.0 * batch["margin"][:, None]
        per = -p * _np_logsig(d) - (1 - p) * _np_logsig(-d)
        w = np.zeros((5, 2))
        for i, h in enumerate(batch["head_index"]):
            w[i] = [1, 1] if h < 0 else np.eye(2)[h]
        expected = (per * w).sum() / w.sum() + 0.01 * (((c + r) ** 2) * w).sum() / w.sum()
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
        label = batch["label"][:, None]  # accuracy agrees with the unsmoothed soft label
        acc = label * (c > r) + (1 - label) * (c < r)
        np.testing.assert_allclose(metrics["rm/b/accuracy"],
                                   (acc[:, 1] * w[:, 1]).sum() / w[:, 1].sum(), rtol=1e-5)

    def test_ranking_losses(self):
        rng = np.random.default_rng(4)
        b, k, t = 3, 3, 5
        rows = _token_rows_k(rng, b, k, t)
        rows["ranks"] = np.asarray([[0, 1, 2], [2, 0, 1], [1, 0, -1]], np.int32)
        rows["response_mask"] = np.asarray([[1, 1, 1], [1, 1, 1], [1, 1, 0]], np.int32)
        values = rng.normal(size=(9, 1))
        ids = rows["input_ids"]
        rewards = values[ids[..., t - 1], 0]  # every row is full length
        loss, metrics = rm_loss(TableRM(values), rows, hp=RMHyperParams(loss="best_of_k"))
        expected = []
        for i in range(b):
            valid = rows["response_mask"][i] > 0
            logits = np.where(valid, rewards[i], -np.inf)
            best = np.argmin(np.where(valid, rows["ranks"][i], 99))
            expected.append(-(logits[best] - np.logaddexp.reduce(logits[valid])))
        np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
        kwise, _ = rm_loss(TableRM(values), rows, hp=RMHyperParams(loss="kwise"))
        per = []
        for i in range(b):
            terms = [-_np_logsig(rewards[i, x] - rewards[i, y])
                     for x in range(k) for y in range(k)
                     if rows["response_mask"][i, x] and rows["response_mask"][i, y]
                     and rows["ranks"][i, x] < rows["ranks"][i, y]]
            per.append(np.mean(terms))
        np.testing.assert_allclose(kwise, np.mean(per), rtol=1e-5)
        assert 0.0 <= float(metrics["rm/accuracy"]) <= 1.0


def _token_rows_k(rng, b, k, t):
    ids = rng.integers(0, 9, size=(b, k, t)).astype(np.int32)
    ones = np.ones((b, k, t), np.int32)
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones.copy(),
            "positions": np.broadcast_to(np.arange(t), (b, k, t)).astype(np.int32),
            "segment_ids": ones.copy()}
