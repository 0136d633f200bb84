"""The peer benchmarks (`python -m rlhf_jax.bench generation`, `tunix`, `tunix_grpo`) at smoke-test sizes:
our side of each measured in-process, the tables from result rows, and the helpers that make
the peers see the same inputs. The peers themselves (torch, Tunix) are optional: their runs are
slow tests that skip without them. No timing is asserted."""

import json

import numpy as np
import pytest

from rlhf_jax.bench import generation, tunix, tunix_grpo
from rlhf_jax.bench._realshape import MODELS, RESULT_PREFIX


def test_generation_rows_time_ours_in_both_modes():
    rows = generation.run(batch_sizes=[2], prompt_len=4, new_tokens=4, repeats=1,
                          configs=["tiny-gpt2"], with_hf=False, modes=("greedy", "sampled"))
    assert [(r["mode"], r["batch"]) for r in rows] == [("greedy", 2), ("sampled", 2)]
    for row in rows:
        assert row["jax_tok_s"] > 0 and row["jax_tok_cpu_s"] > 0 and row["jax_first_call_s"] > 0
        assert "hf_tok_s" not in row
        line = generation._format_row(row)
        assert line.count("|") == generation.HEADER.splitlines()[0].count("|")
    with pytest.raises(ValueError, match="mode='beam'"):
        generation.run(batch_sizes=[1], prompt_len=4, new_tokens=4, repeats=1,
                       configs=["tiny-gpt2"], with_hf=False, modes=("beam",))


def test_real_vocabulary_models_with_fewer_layers():
    config = MODELS["qwen2-0.5b-l4"]()
    full = MODELS["qwen2-0.5b"]()
    assert config.num_layers == 4 and full.num_layers == 24
    assert (config.vocab_size, config.hidden_size) == (full.vocab_size, full.hidden_size)


def test_grpo_iteration_phases_and_table():
    spec = {"model": "tiny-qwen2", "prompts": 2, "group": 4, "prompt_len": 4, "new_tokens": 4,
            "remat": "none", "remat_ours": "dots", "chunk": 4}
    row = tunix_grpo.measure_ours(spec, steps=1, warmup=1)
    for phase in ("rollout", "scoring", "update"):
        assert row[f"{phase}_s"] > 0 and row[f"{phase}_cpu_s"] >= 0
    assert row["iteration_s"] == pytest.approx(
        row["rollout_s"] + row["scoring_s"] + row["update_s"])
    assert 0 < row["response_tokens"] <= 2 * 4 * 4  # rows x new tokens (EOS may stop a row)
    row["graph"] = "ours"
    table = tunix_grpo.to_markdown(
        [("ours", row), ("Tunix", {"error": "exit code -9", "graph": "theirs"})],
        {"machine": "test", "what": "tiny"})
    assert "| ours | ours |" in table and "failed: exit code -9" in table
    assert " / - / - |" in table  # no sync or other phase on our side


def test_grpo_ratio_line_reads_ours_over_tunix():
    tunix_row = {"iteration_cpu_s": 30.0, "iteration_s": 20.0, "peak_rss": 4 * 2**30}
    ours = {"iteration_cpu_s": 10.0, "iteration_s": 8.0, "peak_rss": 2**30}
    line = tunix_grpo.ratio_line("remat none", tunix_row, ours)
    assert "3.00x Tunix per CPU second, 2.50x in wall" in line and "Tunix 0.25" in line
    assert tunix_grpo.ratio_line("remat none", {"error": "exit code -9"}, ours) == ""


def test_dpo_table_has_compile_and_load_and_failed_rows():
    ours = {"graph": "ours", "params": 10, "seconds": 2.0, "cpu_seconds": 3.0,
            "tokens_per_s": 512.0, "tokens_per_cpu_s": 341.0, "peak_rss": 2**30,
            "compile_s": 12.34, "load_average": 3.21}
    theirs = {"graph": "theirs", "params": 10, "seconds": 4.0, "cpu_seconds": 6.0,
              "tokens_per_s": 256.0, "tokens_per_cpu_s": 171.0, "peak_rss": 2**31,
              "warmup_s": 45.6, "load_average": 2.0, "max_logit_diff": 1e-5}
    table = tunix.to_markdown(
        [("ours", ours), ("Tunix", theirs), ("Tunix big", {"error": "exit code -9"})],
        {"machine": "test", "what": "tiny"})
    lines = table.splitlines()
    assert lines[-3] == "| ours | ours | 10 | 2 (3.2) | 3 | 512 | 341 | 1.00 | 12.3 |  |"
    assert lines[-2] == "| Tunix | theirs | 10 | 4 (2.0) | 6 | 256 | 171 | 2.00 | 45.6 | 1.0e-05 |"
    assert "failed: exit code -9" in lines[-1]
    assert len({line.count("|") for line in lines[2:]}) == 1  # every row has every column


def test_dpo_rows_beside_each_tunix_remat():
    """Beside Tunix's remat none: our default, remat none, kept logits and kept logits scoring
    the responses only; beside decoder: remat full with the fused, unfused and kept heads."""
    heads = {remat: [(c.remat, c.head) for c in tunix.our_cases(
        remat, model="qwen2-0.5b-l4", seq=512, pairs=1, keep_bytes=2**30)]
        for remat in tunix.OURS_LIKE}
    assert heads["none"] == [("dots", "fused/128"), ("none", "fused/128"),
                             ("dots", "fused/128, keep 1 GiB"),
                             ("dots", "fused/128, keep 1 GiB, response only")]
    assert heads["decoder"] == [("full", "fused/128"), ("full", "unfused"),
                                ("full", "fused/128, keep 1 GiB")]


def test_failed_child_reports_the_exception_line():
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
              "flax.errors.TraceContextError: Cannot mutate Param\n"
              "For simplicity, JAX has removed its internal frames")
    assert tunix.error_line(stderr) == "flax.errors.TraceContextError: Cannot mutate Param"
    assert tunix.error_line("killed\n") == "killed"
    assert tunix.error_line("") == "no output"


def test_tunix_sees_the_same_prompt_ids_and_reward():
    tok = tunix_grpo.IdTokenizer()
    ids = tunix_grpo.prompt_batches({"prompts": 2, "prompt_len": 5}, 100, 1)[0]
    assert ids.shape == (2, 5) and ids.min() >= 3  # never the pad or EOS id
    text = tok.decode(ids[0])
    assert tok.encode(np.str_(text)) == ids[0].tolist()
    assert not tok.bos_id()  # Tunix's sampler prepends no BOS
    np.testing.assert_allclose(
        tunix_grpo.even_fraction(np.array([[2, 3, 4, 5], [1, 1, 1, 1]]),
                                 np.array([[1, 1, 1, 0], [0, 0, 0, 0]])), [2 / 3, 0.0])


@pytest.mark.slow
def test_tunix_grpo_learner_runs_on_our_weights():
    pytest.importorskip("tunix")
    spec = {"model": "tiny-qwen2", "prompts": 2, "group": 4, "prompt_len": 8, "new_tokens": 8,
            "remat": "none", "remat_ours": "dots", "chunk": 4}
    row = tunix_grpo.tunix_worker(spec, steps=1, warmup=1)
    assert row["params"] == row["our_params"]
    assert row["max_logit_diff"] < 1e-4
    assert row["rollout_s"] > 0 and row["update_s"] > 0 and row["iteration_s"] > 0


@pytest.mark.slow
def test_tunix_dpo_trainer_runs_on_our_weights_with_decoder_remat(capsys):
    pytest.importorskip("tunix")
    spec = {"model": "tiny-qwen2", "seq": 16, "pairs": 1, "remat": "decoder"}
    tunix.tunix_worker(json.dumps(spec), steps=1, warmup=1)
    out = capsys.readouterr().out.splitlines()[-1]
    row = json.loads(out[len(RESULT_PREFIX):])
    assert out.startswith(RESULT_PREFIX)
    assert row["params"] == row["our_params"] and row["max_logit_diff"] < 1e-4
    assert row["seconds"] > 0 and row["tokens_per_cpu_s"] > 0 and row["warmup_s"] > 0
