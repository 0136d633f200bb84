"""The trainers' in-memory entry points (`run_sft`, `run_rm`, `run_dpo`): Python records instead
of files, an initial model held in memory, an evaluation callback on the model, and the trained
model returned; the same run as from a file and a freshly built model."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from train_toys import write_easy_preferences

from rlhf_jax.bench.compiles import CompileCounter
from rlhf_jax.data.synthetic import build_tokenizer
from rlhf_jax.models import RewardModel
from rlhf_jax.train import (
    CheckpointConfig,
    DataSpec,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
    TrainedRun,
    dpo_reference_logps,
    read_metrics,
    run_dpo,
    run_rm,
    run_sft,
    tokenize_records,
)
from rlhf_jax.train.builders import build_model
from rlhf_jax.train.data import build_data
from rlhf_jax.train.dpo import DPOConfig, train_dpo
from rlhf_jax.train.export import read_checkpoint_state
from rlhf_jax.train.loop import WALL_CLOCK_METRICS
from rlhf_jax.train.rm import RMConfig
from rlhf_jax.train.sft import SFTConfig

TINY = ModelSpec(preset="tiny_gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                 max_position_embeddings=64)
QUIET = LoggingConfig(every_steps=1, tensorboard=False, progress="none")
OPT = OptimizerConfig(learning_rate=1e-3)
DATA = DataSpec(synthetic="topic", batch_size=8, max_length=40, max_prompt_length=20,
                num_eval=0)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_easy_preferences(path, n=24, seed=0)
    return path, [json.loads(line) for line in path.read_text().splitlines()]


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


class TestRecords:
    def test_same_batches_as_the_file(self, pairs):
        path, records = pairs
        tok = build_tokenizer()
        from_file = build_data(DataSpec(**{**DATA.__dict__, "path": str(path)}),
                               format="preference", tokenizer=tok, seed=3)
        in_memory = build_data(DATA, format="preference", tokenizer=tok, seed=3,
                               records=records, eval_records=records[:16])
        for _ in range(3):
            a, b = next(from_file.train), next(in_memory.train)
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        assert in_memory.reports["train"].num_loaded == len(records)
        assert sum(1 for _ in in_memory.eval_batches()) == 2

    def test_bad_record_is_named_or_counted(self, pairs):
        _, records = pairs
        bad = [*records[:5], {"prompt": "ab>", "chosen": "", "rejected": "x"}]
        tok = build_tokenizer()
        with pytest.raises(ValueError, match="records:5"):
            build_data(DATA, format="preference", tokenizer=tok, seed=0, records=bad)
        skip = DataSpec(**{**DATA.__dict__, "on_error": "skip"})
        data = build_data(skip, format="preference", tokenizer=tok, seed=0, records=bad)
        assert data.skipped == {"empty_response": 1}

    def test_tokenized_once_gives_the_same_data(self, pairs):
        # Records tokenized once (`tokenize_records`) give the batches, reports and skip
        # counts of the records themselves, for runs that differ in batch size and seed.
        _, records = pairs
        bad = [*records, {"prompt": "ab>", "chosen": "", "rejected": "x"}]
        tok = build_tokenizer()
        skip = DataSpec(**{**DATA.__dict__, "on_error": "skip"})
        tokenized = tokenize_records(skip, bad, format="preference", tokenizer=tok)
        assert len(tokenized.examples) == len(records)
        for spec, seed in [(skip, 3), (DataSpec(**{**skip.__dict__, "batch_size": 4}), 7)]:
            plain = build_data(spec, format="preference", tokenizer=tok, seed=seed, records=bad,
                               eval_records=records[:16])
            once = build_data(spec, format="preference", tokenizer=build_tokenizer(), seed=seed,
                              records=tokenized, eval_records=records[:16])
            assert once.skipped == plain.skipped == {"empty_response": 1}
            assert ({k: r.to_dict() for k, r in once.reports.items()}
                    == {k: r.to_dict() for k, r in plain.reports.items()})
            for _ in range(4):
                a, b = next(plain.train), next(once.train)
                assert a.keys() == b.keys()
                for k in a:
                    np.testing.assert_array_equal(a[k], b[k])

    def test_tokenized_records_of_other_settings_are_refused(self, pairs):
        _, records = pairs
        tokenized = tokenize_records(DATA, records, format="preference",
                                     tokenizer=build_tokenizer())
        longer = DataSpec(**{**DATA.__dict__, "max_length": 48})
        with pytest.raises(ValueError, match="train TokenizedRecords.*max_length=40 vs 48"):
            build_data(longer, format="preference", tokenizer=build_tokenizer(), seed=0,
                       records=tokenized)
        with pytest.raises(ValueError, match="trainer_format='preference' vs 'kto'"):
            build_data(DATA, format="kto", tokenizer=build_tokenizer(), seed=0,
                       records=tokenized)

    def test_eval_records_need_records(self, pairs):
        with pytest.raises(ValueError, match="eval_records needs records"):
            build_data(DATA, format="preference", tokenizer=build_tokenizer(), seed=0,
                       eval_records=pairs[1])


def test_run_sft_returns_the_trained_model_and_calls_eval_fn(tmp_path):
    records = [{"prompt": "ab>", "completion": "ba"}, {"prompt": "cd>", "completion": "dc"}] * 4
    source = build_model(TINY, seed=1)
    start = _leaves(source)
    calls = []

    def eval_fn(model, step):
        calls.append(step)
        return {"demo/param_sum": float(sum(np.sum(x) for x in _leaves(model)))}

    config = SFTConfig(output_dir=str(tmp_path / "sft"), num_steps=4, eval_every=2, model=TINY,
                       data=DATA, optimizer=OPT, logging=QUIET)
    run = run_sft(config, model=nnx.clone(source), records=records, eval_fn=eval_fn)
    assert isinstance(run, TrainedRun)
    assert calls == [2, 4]
    # The source shares no buffer with the donated train state: it is intact.
    for a, b in zip(start, _leaves(source)):
        np.testing.assert_array_equal(a, b)
    # The returned model is the trained one: the final checkpoint's parameters.
    trained = _leaves(run.model)
    assert any(not np.array_equal(a, b) for a, b in zip(start, trained))
    _, state = read_checkpoint_state(str(tmp_path / "sft" / "checkpoints"))
    saved = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
    assert sorted(float(np.sum(x)) for x in saved) == pytest.approx(
        sorted(float(np.sum(x)) for x in trained), rel=1e-6)
    # The callback's metrics are logged and summarised beside the held-out ones.
    logged = [r for r in read_metrics(config.output_dir) if "demo/param_sum" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert run.summary["eval_metrics"]["demo/param_sum"] == logged[-1]["demo/param_sum"]
    assert run.summary["data"]["train"]["loaded"] == len(records)


@pytest.mark.slow  # the demo's quick run (tests/experiments/test_demo_quick.py) runs this path
def test_run_rm_from_a_policy(tmp_path, pairs):
    _, records = pairs
    lm = build_model(TINY, seed=2)
    before = _leaves(lm)
    rm = RewardModel.from_causal_lm(lm, rngs=nnx.Rngs(0))  # shares the backbone's arrays
    config = RMConfig(output_dir=str(tmp_path / "rm"), num_steps=3, model=TINY, data=DATA,
                      optimizer=OPT, logging=QUIET, normalize=False)
    run = run_rm(config, model=rm, records=records)
    assert isinstance(run.model, RewardModel) and run.summary["step"] == 3
    for a, b in zip(before, _leaves(lm)):
        np.testing.assert_array_equal(a, b)


def _rows(out_dir):
    """The training rows of a run's metrics (no wall-clock values, no evaluation rows)."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_METRICS}
            for r in read_metrics(out_dir) if "dpo/loss" in r]


@pytest.mark.slow  # the demo's quick run (tests/experiments/test_demo_quick.py) runs this path
def test_run_dpo_in_memory_matches_train_dpo(tmp_path, pairs):
    path, records = pairs
    common = dict(num_steps=3, model=TINY, optimizer=OPT, logging=QUIET, seed=4,
                  checkpoint=CheckpointConfig(every_steps=0))
    train_dpo(DPOConfig(output_dir=str(tmp_path / "file"),
                        data=DataSpec(**{**DATA.__dict__, "path": str(path)}), **common))
    seen = []
    run = run_dpo(DPOConfig(output_dir=str(tmp_path / "memory"), data=DATA, eval_every=3,
                            **common),
                  model=build_model(TINY, seed=4), records=records,
                  eval_fn=lambda model, step: seen.append(type(model).__name__) or {})
    # The same initial policy, reference and batches: the same run, to float rounding.
    a, b = _rows(str(tmp_path / "file")), _rows(str(tmp_path / "memory"))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The callback and the returned model see the policy, not the policy-and-reference pair.
    assert seen == ["CausalLM"] and type(run.model).__name__ == "CausalLM"


def test_a_beta_sweep_compiles_the_dpo_step_once_and_saves_nothing(tmp_path, pairs):
    """Runs that differ only in beta share one compiled step (beta is a traced argument, the
    step is cached per graph), and with `checkpoint.save_final=False` an in-memory run writes
    no checkpoint."""
    _, records = pairs
    # A learning rate no other test uses: the first run below compiles its own step.
    common = dict(num_steps=2, model=TINY, data=DATA, logging=QUIET, seed=4,
                  optimizer=OptimizerConfig(learning_rate=7.7e-4),
                  checkpoint=CheckpointConfig(save_final=False, save_on_sigterm=False))
    losses = {}
    with CompileCounter() as counter:
        for beta in (0.1, 0.5):
            out = tmp_path / f"beta{beta}"
            run = run_dpo(DPOConfig(output_dir=str(out), beta=beta, **common),
                          model=build_model(TINY, seed=4), records=records)
            losses[beta] = run.summary["metrics"]["dpo/loss"]
            assert run.summary["step"] == 2
            assert not list((out / "checkpoints").glob("*"))
            assert (out / "summary.json").exists()
    assert counter.compiles["jit(step)"] == 1
    assert losses[0.1] != losses[0.5]  # the traced beta is the one each run trained with


def test_a_sweep_trains_on_one_precomputed_reference_table(tmp_path, pairs):
    """`dpo_reference_logps` computes the reference log-probs once; runs that differ in beta
    train on them (`run_dpo(reference_logps=...)`) exactly as a run that computes its own, and
    a run they were not computed for refuses them."""
    _, records = pairs
    common = dict(num_steps=2, model=TINY, data=DATA, logging=QUIET, seed=4, optimizer=OPT,
                  reference="precomputed",
                  checkpoint=CheckpointConfig(save_final=False, save_on_sigterm=False))
    config = lambda out, **kw: DPOConfig(output_dir=str(tmp_path / out), **{**common, **kw})
    table = dpo_reference_logps(config("table", beta=0.1), model=build_model(TINY, seed=4),
                                records=records)
    assert set(table.train) == {"ref_chosen_logps", "ref_rejected_logps"}
    assert table.train["ref_chosen_logps"].shape == (2, DATA.batch_size) and table.eval is None
    shared = {beta: run_dpo(config(f"shared{beta}", beta=beta), model=build_model(TINY, seed=4),
                            records=records, reference_logps=table).summary
              for beta in (0.1, 0.5)}
    own = run_dpo(config("own", beta=0.5), model=build_model(TINY, seed=4), records=records)
    plain = lambda m: {k: v for k, v in m.items() if k not in WALL_CLOCK_METRICS}
    assert plain(shared[0.5]["metrics"]) == plain(own.summary["metrics"])
    assert shared[0.1]["metrics"]["dpo/loss"] != shared[0.5]["metrics"]["dpo/loss"]
    assert not (tmp_path / "shared0.5" / "reference_logps.npz").exists()
    # The records tokenized once train the same run.
    tokenized = tokenize_records(DATA, records, format="preference", tokenizer=build_tokenizer())
    once = run_dpo(config("tokenized", beta=0.5), model=build_model(TINY, seed=4),
                   records=tokenized, reference_logps=table)
    assert plain(once.summary["metrics"]) == plain(own.summary["metrics"])
    assert once.summary["data"] == own.summary["data"]
    assert (tmp_path / "own" / "reference_logps.npz").exists()
    with pytest.raises(ValueError, match="computed for another reference"):
        run_dpo(config("other_seed", seed=5), model=build_model(TINY, seed=4), records=records,
                reference_logps=table)
    with pytest.raises(ValueError, match="fewer than num_steps=3"):
        run_dpo(config("longer", num_steps=3), model=build_model(TINY, seed=4),
                records=records, reference_logps=table)
    with pytest.raises(ValueError, match="set reference='precomputed'"):
        run_dpo(config("model_ref", reference="model"), records=records, reference_logps=table)
