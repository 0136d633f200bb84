"""The real-shape benchmarks (`python -m rlhf_jax.bench steps` / `memory`) at smoke-test sizes:
one configuration measured in-process (the same function each worker process runs), the
markdown tables from result rows, and the named errors. No timing is asserted."""

import dataclasses
import json

import pytest
from flax import nnx

from rlhf_jax.bench import _plot, memory, steps
from rlhf_jax.bench._realshape import (
    Case,
    forward_flops,
    forward_flops_per_token,
    matmul_weights,
    measure,
    run_isolated,
)
from rlhf_jax.models import CausalLM, ModelConfig


@pytest.mark.parametrize("chunks", [
    (8,), pytest.param((0, 8), marks=pytest.mark.slow)], ids=["fused", "fused_and_unfused"])
def test_measure_a_dpo_step(chunks):
    rows = {}
    for chunk in chunks:
        case = Case(model="tiny-gpt2", step="dpo", seq=16, batch=4, chunk=chunk)
        rows[chunk] = measure(case, steps=1, warmup=0)
    for chunk, row in rows.items():
        assert row["head"] == ("unfused" if chunk == 0 else "fused/8")
        assert row["tokens"] == 2 * 4 * 16  # 8 rows: one per test device
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0 and row["compile_s"] > 0
        assert row["cpu_seconds"] > 0 and row["tokens_per_cpu_s"] > 0
        assert row["peak_rss"] > 0 and row["device_peak"] is None  # CPU reports no peak
        assert row["heap_trim"] is True  # the compiler's freed memory went back (glibc)
        memory_ = row["memory"]
        assert memory_["total"] == (memory_["argument"] + memory_["output"] + memory_["temp"]
                                    - memory_["alias"])
    # Same model FLOPs whichever head computes them (recomputation is not model FLOPs).
    assert len({row["flops"] for row in rows.values()}) == 1
    json.dumps(rows)  # a worker prints its row as JSON


def test_dpo_step_with_kept_logits_scoring_the_responses_only():
    """The levers of the Tunix comparison: logits kept for the backward pass and the response
    columns scored alone; the row names both and counts the same model FLOPs."""
    base = Case(model="tiny-gpt2", step="dpo", seq=16, batch=4, chunk=8)
    case = dataclasses.replace(base, keep_bytes=2**20, response_only=True)
    row = measure(case, steps=1, warmup=0)
    assert row["head"] == "fused/8, keep 0.000976562 GiB, response only"
    assert row["cpu_seconds"] > 0 and row["flops"] == measure(base, run=False)["flops"]
    with pytest.raises(ValueError, match="response_only"):
        Case(model="tiny-gpt2", step="sft", seq=16, batch=4, response_only=True)


@pytest.mark.slow
def test_measure_a_ppo_iteration_and_memory_levers():
    row = measure(Case(model="tiny-qwen2", step="ppo", seq=16, batch=8, chunk=4,
                       epochs=2), steps=1, warmup=0)
    for key in ("rollout_s", "scoring_s", "update_s", "iteration_s", "sampled_tokens_per_s"):
        assert row[key] > 0
    assert row["scoring_memory"]["total"] > 0
    for label, case in memory.lever_cases("tiny-qwen2", "dpo", 16, 2, list(memory.LEVERS)):
        assert dataclasses.replace(case) == case  # every lever is a valid Case
        if "LoRA" in label:
            assert case.reference == "lora_base" and case.lora_rank == 16


def test_flops_count_the_tied_head_and_attention():
    config = ModelConfig.tiny_qwen2()
    model = CausalLM(config, rngs=nnx.Rngs(0))
    e, v, f = config.hidden_size, config.vocab_size, config.intermediate_size
    h, k, d = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    per_layer = e * h * d + 2 * e * k * d + h * d * e + 3 * e * f
    assert matmul_weights(model) == config.num_layers * per_layer + v * e
    assert forward_flops_per_token(config, 1000, 32) == 2000 + 4 * config.num_layers * 32 * h * d
    # The head's FLOPs count on the scored tokens only: 10 tokens, 4 scored.
    per_token = forward_flops_per_token(config, 1000, 32)
    assert forward_flops(config, 1000, 32, tokens=10, scored=4) == 10 * per_token - 6 * 2 * e * v


def _row(step, head="fused/128", **extra):
    case = Case(model="gpt2", step=step, seq=512, batch=4)
    base = {"case": dataclasses.asdict(case), "head": head, "tokens": 4096, "flops": 4e12,
            "compile_s": 9.0, "memory": {"argument": 2**30, "output": 2**30, "temp": 2**31,
                                         "alias": 2**30, "total": 3 * 2**30},
            "peak_rss": 7 * 2**30, "device_peak": None, "seconds": 100.0, "best_seconds": 90.0,
            "tokens_per_s": 40.96, "flops_per_s": 4e10}
    base.update(extra)
    return base


def test_steps_markdown():
    info = {"machine": "test machine", "peak_flops": 5e10, "peak_flops_per_cpu_s": 2.5e10,
            "load_average": 3.0}
    ppo = _row("ppo", rollout_s=1.0, scoring_s=2.0, update_s=3.0, iteration_s=6.0,
               iteration_tokens_per_s=500.0, sampled_tokens_per_s=100.0, rollout_cpu_s=2.0,
               scoring_cpu_s=4.0, update_cpu_s=6.0, iteration_cpu_s=12.0)
    failed = {"case": _row("sft")["case"], "head": "unfused", "error": "exit code -9 (killed)"}
    dpo = _row("dpo", cpu_seconds=200.0, tokens_per_cpu_s=20.48, load_average=2.5)
    table = steps.to_markdown([dpo, failed, ppo], info)
    assert "measured fp32 matmul peak 50.0 GFLOP/s (wall), 25.0 GFLOP per CPU second" in table
    # CPU seconds beside wall seconds; MFU against the wall peak and against the CPU-second peak.
    assert ("| gpt2 | dpo | 512 | 8 | fused/128 | 100 | 90 | 200 | 41 | 20 | 80.0% | 80.0% | 9.0 "
            "| 7.00 | 3.00 |  | 2.5 |") in table
    assert "failed: exit code -9 (killed)" in table
    assert "| gpt2 | 512 | 4 | fused/128 | 1 | 2 | 3 | 6 | 12 (2 / 4 / 6) | 500 | 100 | 80.0% |" \
        in table


def test_steps_markdown_gives_the_ratio_to_trl_per_round():
    info = {"machine": "m", "peak_flops": 5e10}
    rows = []
    for round_, (ours_s, trl_s) in enumerate([(100.0, 150.0), (120.0, 120.0)], start=1):
        rows.append(_row("dpo", round=round_, seconds=ours_s, tokens_per_s=4096 / ours_s,
                         cpu_seconds=200.0, tokens_per_cpu_s=4096 / 200.0))
        rows.append(_row("dpo", head="TRL DPOTrainer (torch fp32, 2 threads)", round=round_,
                         seconds=trl_s, tokens_per_s=4096 / trl_s, cpu_seconds=300.0,
                         tokens_per_cpu_s=4096 / 300.0, peak_rss=14 * 2**30))
    table = steps.to_markdown(rows, info)
    assert "| fused/128 (round 2) |" in table
    assert "| gpt2 | 512 | 8 | 1 | 1.50x | 1.50x | 0.50 |" in table
    assert "| gpt2 | 512 | 8 | 2 | 1.00x | 1.50x | 0.50 |" in table


def test_steps_pairs_each_of_our_rows_with_trl_of_the_same_reference():
    info = {"machine": "m", "peak_flops": 5e10}
    rows = []
    for reference, trl_cpu in (("model", 400.0), ("precomputed", 300.0)):
        case = dataclasses.asdict(Case(model="gpt2", step="dpo", seq=512, batch=4,
                                       reference=reference))
        for remat, cpu in (("dots", 200.0), ("full", 250.0)):
            rows.append(_row("dpo", case={**case, "remat": remat}, cpu_seconds=cpu,
                             tokens_per_cpu_s=4096 / cpu))
        rows.insert(len(rows) - 1, _row(
            "dpo", head="TRL DPOTrainer (torch fp32, 2 threads)", case=case,
            cpu_seconds=trl_cpu, tokens_per_cpu_s=4096 / trl_cpu, peak_rss=14 * 2**30))
    table = steps.to_markdown(rows, info)
    assert "| 1.00x | 2.00x | 0.50 | fused/128 |" in table
    assert "| 1.00x | 1.60x | 0.50 | fused/128, remat full |" in table
    assert "| 1.00x | 1.50x | 0.50 | fused/128, precomputed reference |" in table
    assert "| 1.00x | 1.20x | 0.50 | fused/128, remat full, precomputed reference |" in table


def test_steps_rows_without_the_heap_trim_are_labelled_and_compared_with_trl():
    info = {"machine": "m", "peak_flops": 5e10}
    cpu = {"cpu_seconds": 200.0, "tokens_per_cpu_s": 4096 / 200.0}
    rows = [_row("dpo", heap_trim=True, peak_rss=6 * 2**30, **cpu),
            _row("dpo", heap_trim=False, peak_rss=7 * 2**30, **cpu),
            _row("dpo", head="TRL DPOTrainer (torch fp32, 2 threads)", peak_rss=14 * 2**30,
                 **cpu)]
    table = steps.to_markdown(rows, info)
    assert "| 0.43 | fused/128 |" in table
    assert "| 0.50 | fused/128, no heap trim |" in table


def test_steps_cases_cross_the_reference_for_dpo_only():
    out = steps.cases(["gpt2"], [512], ["sft", "dpo"], ["fused"], chunk=128, batch=1,
                      references=("model", "precomputed"))
    assert [(c.step, c.reference) for c in out] == [
        ("sft", "model"), ("dpo", "model"), ("dpo", "precomputed")]


def test_trl_runs_with_passive_openmp_waits_unless_told_otherwise():
    assert steps.trl_env({"PATH": "/bin"})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert steps.trl_env({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"


def test_memory_markdown_says_what_fits():
    info = {"machine": "m", "what": "DPO."}
    small = _row("dpo", memory={"total": 20 * 2**30})
    big = _row("dpo", head="unfused", memory={"total": 30 * 2**30})
    lora = _row("dpo", memory={"total": 5 * 2**30})
    lora["case"]["lora_rank"] = 16
    table = memory.to_markdown([("fused", small), ("baseline", big), ("lora", lora)], info,
                               budget_gib=24)
    assert "| fused | fused/128 | 20.00 | yes | 7.00 | 100 |" in table
    assert "| baseline | unfused | 30.00 | no |" in table
    assert "whose step fits 24 GiB: fused (20.00 GiB)." in table  # LoRA is not a full fine-tune


def test_bad_cases_are_named():
    with pytest.raises(ValueError, match="model="):
        Case(model="gpt5", step="sft", seq=16, batch=1)
    with pytest.raises(ValueError, match="step="):
        Case(model="gpt2", step="kto", seq=16, batch=1)
    with pytest.raises(ValueError, match="lora_base"):
        Case(model="gpt2", step="dpo", seq=16, batch=1, reference="lora_base")
    with pytest.raises(ValueError, match="even"):
        Case(model="gpt2", step="dpo", seq=15, batch=1)


def test_a_failed_worker_gives_an_error_row():
    # A child that dies without printing a result (here: an unknown benchmark name) is
    # reported, not lost.
    row = run_isolated("no-such-bench", Case(model="tiny-gpt2", step="sft", seq=16, batch=1),
                       steps=1, warmup=0)
    assert "error" in row and "unknown benchmark" in row["error"]


def test_freezing_lever_drops_the_frozen_rows_moments():
    # Compile only: XLA's buffer assignment is exact, so the arguments lose AdamW's two
    # float32 moments of the frozen layer's rows and nothing else.
    base = Case(model="tiny-gpt2", step="sft", seq=16, batch=8)
    frozen = dataclasses.replace(base, freeze_layers=1)
    assert ("freeze bottom 12 layers", dataclasses.replace(
        base, model="qwen2-0.5b", seq=1024, step="dpo", batch=4, chunk=0,
        attention="dense", freeze_layers=12)) in memory.lever_cases("qwen2-0.5b", "dpo", 1024, 4,
                                                 ["freeze bottom 12 layers"])
    rows = [measure(case, run=False) for case in (base, frozen)]
    config = base.model_config()
    layer = CausalLM(config, rngs=nnx.Rngs(0)).backbone
    stacked = sum(x.size for path, x in nnx.to_flat_state(nnx.state(layer, nnx.Param))
                  if "layers" in map(str, path))
    saved = rows[0]["memory"]["argument"] - rows[1]["memory"]["argument"]
    assert saved == 2 * 4 * stacked // config.num_layers


def test_plots_against_sequence_length(tmp_path):
    rows = [_row("dpo", case=dataclasses.asdict(Case(model="gpt2", step="dpo", seq=seq,
                                                     batch=1)),
                 tokens=2 * seq, cpu_seconds=seq / 100, seconds=seq / 50)
            for seq in (512, 2048)]
    rows.append({"case": rows[0]["case"], "head": "unfused", "error": "killed"})
    (tmp_path / "rows.json").write_text(json.dumps({"info": {}, "rows": rows}))
    loaded = _plot.load_rows([str(tmp_path / "rows.json")])
    assert len(loaded) == 2  # the failed row is left out
    # CPU seconds per 1k tokens: 1000 * (T / 100) / (2 T) = 5 at every T.
    assert _plot.series(loaded, _plot._per_k_tokens("cpu_seconds")) == {
        "gpt2 dpo fused/128": [(512, 5.0), (2048, 5.0)]}
    full = dataclasses.replace(Case(model="gpt2", step="dpo", seq=512, batch=1), remat="full",
                               reference="precomputed")
    loaded.append(_row("dpo", case=dataclasses.asdict(full), tokens=1024, cpu_seconds=1.0))
    assert _plot.series(loaded, _plot._per_k_tokens("cpu_seconds"))[
        "gpt2 dpo fused/128, remat full, precomputed reference"] == [(512, 1000 / 1024)]
    steps.main(["--plot-from", str(tmp_path / "rows.json"), "--plot-dir", str(tmp_path / "f")])
    for name in ("steps_time_vs_seq.png", "steps_memory_vs_seq.png"):
        assert (tmp_path / "f" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
