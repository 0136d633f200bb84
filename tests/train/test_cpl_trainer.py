"""`rlhf-jax dpo --algorithm cpl`: CPL's objective through the DPO trainer, against a float64
NumPy reference on a lookup-table model and on the tiny model's own log-probs, on every pair
layout, with exact resume and errors that name the field."""

from __future__ import annotations

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from train_toys import write_easy_preferences

from rlhf_jax import cli
from rlhf_jax.data import TokenizedPreference, collate_preference, pack_preference
from rlhf_jax.train import DataSpec, ModelSpec, read_metrics
from rlhf_jax.train.builders import build_model, load_tokenizer_for
from rlhf_jax.train.config import FieldError
from rlhf_jax.train.data import build_data
from rlhf_jax.train.dpo import (
    CPLHyperParams,
    DPOConfig,
    preference_hyperparams,
    preference_loss,
)
from rlhf_jax.train.export import read_checkpoint_state
from rlhf_jax.train.pairs import pair_forward_batch, pair_token_segments

TINY = ModelSpec(preset="tiny_gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                 max_position_embeddings=64)


class TableLM:
    """logits[b, t] = table[input_ids[b, t]]: a causal LM whose outputs are known exactly."""

    def __init__(self, table):
        self.table = jnp.asarray(table, jnp.float32)

    def __call__(self, input_ids, **kwargs):
        return self.table[input_ids]


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_logsig(x):
    return -np.logaddexp(0.0, -x)


def _np_cpl(chosen, rejected, *, alpha, bias, discount, label=None, bc_coeff=0.0,
            bc_segments="preferred"):
    """float64 CPL per pair from lists of completion token log-probs (each in token order)."""
    def adv(seq):
        return alpha * sum(discount ** k * lp for k, lp in enumerate(seq))

    out = []
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        p = 1.0 if label is None else float(label[i])
        a_c, a_r = adv(c), adv(r)
        cpl = -p * _np_logsig(a_c - bias * a_r) - (1 - p) * _np_logsig(a_r - bias * a_c)
        if bc_segments == "preferred":
            bc = -(p * np.mean(c) + (1 - p) * np.mean(r))
        else:
            bc = -(np.sum(c) + np.sum(r)) / (len(c) + len(r))
        out.append(cpl + bc_coeff * bc)
    return np.asarray(out)


def _examples(rng, n=4):
    return [
        TokenizedPreference(
            prompt_ids=rng.integers(1, 9, size=rng.integers(2, 5)).astype(np.int32),
            chosen_ids=rng.integers(1, 9, size=rng.integers(1, 6)).astype(np.int32),
            rejected_ids=rng.integers(1, 9, size=rng.integers(1, 6)).astype(np.int32),
            margin=0.0, label=float(rng.uniform(0.5, 1.0)), origin=f"ex:{i}")
        for i in range(n)
    ]


def _np_completion_logps(table, example):
    """Token log-probs of the chosen and rejected completions given the prompt, float64."""
    lsm = _np_log_softmax(table)
    out = []
    for completion in (example.chosen_ids, example.rejected_ids):
        seq = np.concatenate([example.prompt_ids, completion])
        p = len(example.prompt_ids)
        out.append([lsm[seq[t - 1], seq[t]] for t in range(p, len(seq))])
    return out


class TestCPLObjective:
    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls):
        rng = np.random.default_rng(7)
        examples = _examples(rng)
        table = rng.normal(size=(10, 10)) * 2.0
        parts = [_np_completion_logps(table, ex) for ex in examples]
        label = np.asarray([ex.label for ex in examples])
        return examples, table, [c for c, _ in parts], [r for _, r in parts], label

    @pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
    def test_matches_numpy_on_every_layout(self, setup, layout):
        examples, table, chosen, rejected, label = setup
        if layout == "padded":
            batch = collate_preference(examples, pad_id=0, length=12)
        elif layout == "packed":
            batch = pack_preference(examples, num_rows=4, row_length=16, max_pairs=6, pad_id=0)
        else:
            batch = collate_preference(examples, pad_id=0, length=16, prefix_sharing=True)
        hp = CPLHyperParams(beta=0.3, cpl_conservative_bias=0.6, cpl_discount=0.8,
                            cpl_bc_coeff=0.5, cpl_bc_segments="both", soft_labels=True)
        loss, metrics = jax.jit(lambda b: preference_loss(TableLM(table), b, hp=hp))(batch)
        expected = _np_cpl(chosen, rejected, alpha=0.3, bias=0.6, discount=0.8, label=label,
                           bc_coeff=0.5, bc_segments="both")
        np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
        np.testing.assert_allclose(metrics["cpl/loss"], expected.mean(), rtol=1e-5)
        a_c = np.asarray([0.3 * sum(0.8 ** k * x for k, x in enumerate(c)) for c in chosen])
        a_r = np.asarray([0.3 * sum(0.8 ** k * x for k, x in enumerate(r)) for r in rejected])
        np.testing.assert_allclose(metrics["cpl/rewards_chosen"], a_c.mean(), rtol=1e-5)
        np.testing.assert_allclose(metrics["cpl/reward_margin"], (a_c - a_r).mean(), rtol=1e-4,
                                   atol=1e-6)

    def test_hard_labels_preferred_bc_and_unbiased(self, setup):
        examples, table, chosen, rejected, _ = setup
        batch = collate_preference(examples, pad_id=0, length=12)
        for bias, bc in ((1.0, 1.0), (0.5, 0.0)):
            hp = CPLHyperParams(beta=0.1, cpl_conservative_bias=bias, cpl_bc_coeff=bc)
            loss, metrics = jax.jit(functools.partial(preference_loss, TableLM(table), hp=hp))(batch)
            expected = _np_cpl(chosen, rejected, alpha=0.1, bias=bias, discount=1.0,
                               bc_coeff=bc)
            np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
            nll = -np.mean([np.mean(c) for c in chosen])
            np.testing.assert_allclose(metrics["cpl/bc_loss"], nll, rtol=1e-5)

    def test_token_segments_keep_token_order(self, setup):
        """Packed rows give each pair the same masked tokens, in order, as padded rows."""
        examples = setup[0]
        padded = collate_preference(examples, pad_id=0, length=12)
        packed = pack_preference(examples, num_rows=4, row_length=16, max_pairs=6, pad_id=0)
        for batch in (padded, packed):
            rows = pair_forward_batch(batch)
            values = jnp.asarray(rows["input_ids"], jnp.float32)
            c, r, cm, rm = pair_token_segments(values, rows, batch)
            for i, ex in enumerate(examples):
                np.testing.assert_array_equal(np.asarray(c[i])[np.asarray(cm[i]) > 0],
                                              ex.chosen_ids)
                np.testing.assert_array_equal(np.asarray(r[i])[np.asarray(rm[i]) > 0],
                                              ex.rejected_ids)

    def test_bad_values_name_the_field(self, capsys):
        for field, value in (("cpl_conservative_bias", 0.0), ("cpl_discount", 1.5),
                             ("cpl_bc_coeff", -1.0)):
            with pytest.raises(FieldError, match=field):
                DPOConfig(algorithm="cpl", **{field: value})
        with pytest.raises(FieldError, match="cpl_bc_segments='pos' is not one of"):
            DPOConfig(algorithm="cpl", cpl_bc_segments="pos")
        with pytest.raises(FieldError, match="beta"):
            DPOConfig(algorithm="cpl", beta=0.0)
        with pytest.raises(SystemExit):
            cli.main(["dpo", "--algorithm", "cpl", "--cpl-discount", "0"])
        assert "cpl_discount must be a finite number in (0, 1]" in capsys.readouterr().err

    def test_hyperparams_read_from_the_config(self):
        hp = preference_hyperparams(DPOConfig(algorithm="cpl", beta=0.2, cpl_discount=0.9,
                                              cpl_conservative_bias=1.0, cpl_bc_coeff=1.0,
                                              cpl_bc_segments="both", soft_labels=True))
        assert hp == CPLHyperParams(beta=0.2, cpl_conservative_bias=1.0, cpl_discount=0.9,
                                    cpl_bc_coeff=1.0, cpl_bc_segments="both", soft_labels=True)
        assert not hp.uses_reference


def _yaml_config(tmp_path, **extra) -> str:
    config = {
        "num_steps": 4, "algorithm": "cpl", "beta": 0.5, "cpl_conservative_bias": 0.7,
        "cpl_discount": 0.9, "cpl_bc_coeff": 0.3,
        "model": {k: v for k, v in TINY.__dict__.items() if v is not None and k != "lora_targets"},
        "data": {"synthetic": "topic", "num_train": 48, "num_eval": 16, "batch_size": 8,
                 "max_length": 40, "max_prompt_length": 20},
        "optimizer": {"learning_rate": 3e-3, "schedule": "constant"},
        "checkpoint": {"every_steps": 2},
        "logging": {"every_steps": 1, "progress": "none", "tensorboard": False},
    }
    config.update(extra)
    path = tmp_path / "cpl.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cpl_cli_first_step_loss_and_exact_resume(tmp_path):
    """`rlhf-jax dpo --algorithm cpl` from YAML: no reference is built or precomputed, the
    step-1 loss equals CPL on the initial model's own log-probs (float64 NumPy), and a run
    resumed from the step-2 checkpoint ends bit-identical to the uninterrupted one."""
    out = tmp_path / "run"
    path = _yaml_config(tmp_path)
    assert cli.main(["dpo", "--config", path, "--output-dir", str(out)]) == 0
    records = [r for r in read_metrics(out) if "cpl/loss" in r]
    assert len(records) == 4 and not (out / "reference_logps.npz").exists()
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["reference"] == "none"
    assert "cpl/eval/accuracy" in summary["eval_metrics"]

    # Step 1, independently: the initial weights (same seed) on the run's first batch.
    config = DPOConfig(model=TINY, data=DataSpec(synthetic="topic", num_train=48, num_eval=16,
                                                 batch_size=8, max_length=40,
                                                 max_prompt_length=20))
    tokenizer = load_tokenizer_for(config.data, config.model)
    batch = next(build_data(config.data, format="preference", tokenizer=tokenizer,
                            seed=0).train)
    model = build_model(TINY, seed=0)
    seqs = []
    for side in ("chosen", "rejected"):
        ids = batch[f"{side}_input_ids"]
        logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(batch[f"{side}_attention_mask"]),
                       positions=jnp.asarray(batch[f"{side}_positions"]))
        lsm = _np_log_softmax(np.asarray(logits))
        mask = np.asarray(batch[f"{side}_loss_mask"])
        seqs.append([[lsm[b, t - 1, ids[b, t]] for t in range(1, ids.shape[1]) if mask[b, t]]
                     for b in range(ids.shape[0])])
    expected = _np_cpl(*seqs, alpha=0.5, bias=0.7, discount=0.9, bc_coeff=0.3).mean()
    np.testing.assert_allclose(records[0]["cpl/loss"], expected, rtol=1e-4)

    _, final = read_checkpoint_state(str(out / "checkpoints"))
    shutil.rmtree(out / "checkpoints" / "4")
    assert cli.main(["dpo", "--config", path, "--output-dir", str(out)]) == 0
    _, again = read_checkpoint_state(str(out / "checkpoints"))
    flat_a, flat_b = jax.tree.leaves(final), jax.tree.leaves(again)
    assert len(flat_a) == len(flat_b) > 0
    for a, b in zip(flat_a, flat_b):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.slow
def test_cpl_learns_the_preferences(tmp_path):
    """40 steps of CPL with its BC regulariser: the loss falls and held-out pairs are ranked."""
    out = tmp_path / "learn"
    write_easy_preferences(tmp_path / "train.jsonl", n=192, seed=0)
    write_easy_preferences(tmp_path / "eval.jsonl", n=64, seed=1)
    path = _yaml_config(tmp_path, num_steps=40, cpl_discount=1.0, beta=0.1,
                        cpl_conservative_bias=0.5, cpl_bc_coeff=0.1,
                        data={"synthetic": "topic", "path": str(tmp_path / "train.jsonl"),
                              "eval_path": str(tmp_path / "eval.jsonl"), "batch_size": 8,
                              "max_length": 48, "max_prompt_length": 24},
                        optimizer={"learning_rate": 2e-3, "warmup_steps": 4},
                        checkpoint={"every_steps": 0})
    assert cli.main(["dpo", "--config", path, "--output-dir", str(out)]) == 0
    records = [r for r in read_metrics(out) if "cpl/loss" in r]
    first = np.mean([r["cpl/loss"] for r in records[:5]])
    last = np.mean([r["cpl/loss"] for r in records[-5:]])
    assert last < 0.97 * first, (first, last)
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["eval_metrics"]["cpl/eval/accuracy"] > 0.6
