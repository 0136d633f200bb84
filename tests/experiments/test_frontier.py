"""`python -m experiments.frontier`: aggregation over seeds, findings that follow the numbers,
the figure and the report (hand-made numbers), and (slow) the quick preset end to end."""

import json
import math
import os
import pathlib
import subprocess
import sys

import matplotlib.image as mpimg
import pytest

from experiments import frontier

REPO = pathlib.Path(__file__).resolve().parents[2]


def point(method, param, kl, gold, *, seed, se=0.01, step=None, length=None):
    p = {"method": method, "param_name": {"ppo": "kl_coef", "dpo": "beta", "best_of_n": "n",
                                          "rest": "grow", "hir": "round"}[method],
         "param": param, "kl": kl, "gold_reward": gold, "gold_reward_se": se,
         "proxy_reward": 0.0, "seed": seed}
    if step is not None:
        p["step"] = step
    if length is not None:
        p["response_length"] = length
    return p


def seed_result(seed, ref_gold, *, rest_gold, hir_gold, shift=0.0):
    """One seed: baselines that gain 0.1-0.2, ReST on the frontier, HIR below it."""
    pts = [point("ppo", 0.1, 2.0 + shift, ref_gold + 0.15, seed=seed, step=40),
           point("dpo", 0.1, 1.0 + shift, ref_gold + 0.10, seed=seed, step=100),
           point("best_of_n", 1, 0.0, ref_gold, seed=seed),
           point("best_of_n", 4, 0.6, ref_gold + 0.05, seed=seed),
           point("rest", 1, 1.0 + shift, ref_gold + rest_gold, seed=seed, step=1, length=11.0),
           point("hir", 4, 3.0 + shift, ref_gold + hir_gold, seed=seed, step=4, length=15.0)]
    return {"seed": seed, "reference": {"kl": 0.0, "gold_reward": ref_gold,
                                        "gold_reward_se": 0.01, "proxy_reward": 0.0,
                                        "response_length": 11.0},
            "points": pts, "stage_times_s": {"sft": 1.0}}


PER_SEED = [seed_result(0, 0.50, rest_gold=0.10, hir_gold=0.01, shift=0.0),
            seed_result(1, 0.60, rest_gold=0.11, hir_gold=-0.01, shift=0.2)]


def test_aggregate_pairs_gains_by_seed_and_averages_kl():
    agg = frontier.aggregate(PER_SEED)
    assert agg["reference"]["gold_reward"] == pytest.approx(0.55)
    assert agg["reference"]["gold_reward_se"] == pytest.approx(0.05)  # std 0.0707 / sqrt 2
    rest = [p for p in agg["points"] if p["method"] == "rest"]
    assert len(rest) == 1 and rest[0]["num_seeds"] == 2
    assert rest[0]["kl"] == pytest.approx(1.1)
    assert rest[0]["gain"] == pytest.approx(0.105)
    assert rest[0]["gain_se"] == pytest.approx(0.005)  # the seeds' gains differ by 0.01
    assert rest[0]["response_length"] == 11.0
    # best-of-n points have no step; methods come in a fixed order
    assert [p["method"] for p in agg["points"]] == [
        "ppo", "dpo", "best_of_n", "best_of_n", "rest", "hir"]


def test_findings_place_rest_and_hir_against_the_frontier():
    agg = frontier.aggregate(PER_SEED)
    text = frontier.findings(agg, num_seeds=2)
    joined = "\n".join(text)
    assert "mean over 2 seeds" in text[0]
    assert "ReST raised gold reward" in joined
    assert "HIR did not raise gold reward beyond noise" in joined
    rest = next(s for s in text if s.startswith("Against") and "ReST's" in s)
    assert "1 on the frontier within noise" in rest
    hir = next(s for s in text if s.startswith("Against") and "HIR's" in s)
    assert "1 below the frontier beyond noise" in hir and "vs PPO" in hir
    assert "The claim that HIR reaches the frontier does not hold in this run." in text
    assert not any("ReST reaches the frontier does not hold" in s for s in text)
    assert any("HIR's responses are 15.0 tokens long" in s for s in text)


def test_one_seed_uses_the_prompts_standard_error():
    agg = frontier.aggregate(PER_SEED[:1])
    hir = next(p for p in agg["points"] if p["method"] == "hir")
    assert hir["gain_se"] == pytest.approx(math.hypot(0.01, 0.01))
    assert "one seed" in frontier.findings(agg, num_seeds=1)[0]


def test_figure_and_report(tmp_path):
    agg = frontier.aggregate(PER_SEED)
    frontier.plot(agg, tmp_path / frontier.FIGURE, num_seeds=2)
    img = mpimg.imread(tmp_path / frontier.FIGURE)
    assert img.ndim == 3 and min(img.shape[:2]) > 300 and img[..., :3].std() > 0.01
    results = {"title": "t", "seeds": [0, 1], "wall_time_s": 12.0, "aggregate": agg,
               "findings": frontier.findings(agg, 2), "kl_estimator": frontier.KL_ESTIMATOR,
               "config": frontier.FrontierConfig.quick().to_dict(), "per_seed": PER_SEED}
    md = frontier.render(results)
    assert f"]({frontier.FIGURE})" in md
    for label in ("PPO", "DPO", "best-of-n", "ReST", "HIR", "SFT policy"):
        assert f"| {label} |" in md
    assert "kl_coef=0.1, step 40" in md and "| grow=1 |" in md
    json.dumps(results)


def test_config_checks_and_overrides():
    with pytest.raises(ValueError, match="hir_batch_size=5 must divide"):
        frontier.FrontierConfig(hir_batch_size=5)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        frontier.FrontierConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="hir_evals=9 must be <= hir_rounds=4"):
        frontier.FrontierConfig(hir_rounds=4, hir_evals=9)
    assert frontier.parse_overrides(["hir_rounds=30", "rest_thresholds=50,90"]) == {
        "hir_rounds": 30, "rest_thresholds": (50.0, 90.0)}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        frontier.parse_overrides(["nope=1"])
    cfg = frontier.FrontierConfig.default()
    assert cfg.demo_config(3).seed == 3 and cfg.demo_config(3).rm_pairs[-1] == 2048


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ)
    # One CPU device, as `make frontier` sees; the 8 fake test devices would only slow it down.
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.frontier", "--quick", "--output-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    methods = {p["method"] for p in results["aggregate"]["points"]}
    assert methods == set(frontier.METHODS)
    cfg = frontier.FrontierConfig.quick()
    rest = [p for p in results["aggregate"]["points"] if p["method"] == "rest"]
    hir = [p for p in results["aggregate"]["points"] if p["method"] == "hir"]
    assert [p["param"] for p in rest] == list(range(1, cfg.rest_grows + 1))
    assert len(hir) == cfg.hir_evals
    for p in results["aggregate"]["points"]:
        assert math.isfinite(p["kl"]) and 0.0 <= p["gold_reward"] <= 1.0
    md = (out / "report.md").read_text()
    assert "## Findings" in md and all(s in md for s in results["findings"])
    assert mpimg.imread(out / frontier.FIGURE).ndim == 3
