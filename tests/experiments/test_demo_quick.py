"""`python -m experiments.demo --quick` runs the whole pipeline and writes a consistent report."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import matplotlib.image as mpimg
import pytest

from experiments import demo, report

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    env = dict(os.environ)
    # One CPU device is what `make demo` sees; the 8 fake test devices would only slow it down.
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.demo", "--quick", "--output-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return out, results, (out / "report.md").read_text(), proc.stdout


def test_stages_and_progress_are_printed(quick_run):
    _, _, _, stdout = quick_run
    for header in ("1/6 Supervised fine-tuning", "2/6 Simulated raters", "3/6 Reward models",
                   "4a/6 PPO", "4b/6 DPO", "4c/6 Best-of-n", "5/6 Over-optimisation",
                   "6/6 Report", "Findings"):
        assert header in stdout
    assert "Report: " in stdout and "report.md" in stdout


def test_files_and_figures(quick_run):
    out, results, md, _ = quick_run
    for name in (report.RM_FIGURE, report.FRONTIER_FIGURE, report.OVEROPT_FIGURE):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 200
        assert img[..., :3].std() > 0.01
        assert f"]({name})" in md
    assert set(results["stage_times_s"]) == {
        "sft", "preferences", "reward_models", "ppo", "dpo", "best_of_n", "overoptimization"}
    assert results["wall_time_s"] > 0
    assert results["config"]["preset"] == "quick"
    # Compiles are counted per stage; the DPO sweep (two betas) compiles its train step once,
    # and the in-memory runs write no checkpoint.
    compiles = results["stage_compiles"]
    assert set(compiles) == set(results["stage_times_s"])
    assert compiles["dpo"]["compiles_by_name"].get("jit(step)") == 1
    assert len(results["config"]["dpo_betas"]) == 2
    assert not list((out / "runs").glob("*/checkpoints/*"))


def test_results_cover_every_run(quick_run):
    _, results, _, _ = quick_run
    cfg = results["config"]
    assert [p["num_pairs"] for p in results["rm_scaling"]["points"]] == cfg["rm_pairs"]
    pts = results["frontier"]["points"]
    assert sorted({p["param"] for p in pts if p["method"] == "ppo"}) == sorted(cfg["ppo_kl_coefs"])
    assert sorted({p["param"] for p in pts if p["method"] == "dpo"}) == sorted(cfg["dpo_betas"])
    assert [p["param"] for p in pts if p["method"] == "best_of_n"] == cfg["bon_ns"]
    over = results["overoptimization"]["points"]
    evals = demo.eval_schedule(cfg["overopt_iterations"], cfg["overopt_evals"], power=3.0)
    assert [p["step"] for p in over] == [0, *evals]
    for p in pts + over:
        for key in ("kl", "gold_reward", "proxy_reward"):
            assert math.isfinite(p[key])
    # The reference evaluated against itself has zero KL; best-of-1 is the reference policy.
    assert abs(results["frontier"]["reference"]["kl"]) < 1e-3
    bon1 = [p for p in pts if p["method"] == "best_of_n" and p["param"] == 1][0]
    assert bon1["kl"] == 0.0
    # Sanity of the simulated labels: better than chance, below perfect.
    rm = results["rm_scaling"]
    assert 0.5 < rm["ceiling"] < 1.0 and 0.5 < rm["label_gold_agreement"] < 1.0
    for p in rm["points"]:
        assert 0.0 <= p["val_accuracy"] <= 1.0


def _numbers(text):
    return [float(x) for x in re.findall(r"-?\d+\.\d+", text)]


def test_text_numbers_match_results(quick_run):
    _, results, md, _ = quick_run
    findings = results["findings"]
    # Every sentence of every finding is in the report, and is the one recomputed from the data.
    recomputed = report.compute_findings(results)
    for key, f in recomputed.items():
        assert findings[key]["sentences"] == f.sentences
        assert findings[key]["reproduced"] == f.reproduced
        for sentence in f.sentences:
            assert sentence in md
    # The RM sentence quotes the first and last accuracies and the ceiling.
    rm = results["rm_scaling"]
    pts = sorted(rm["points"], key=lambda p: p["num_pairs"])
    first = findings["rm_scaling"]["sentences"][0]
    for value in (pts[0]["val_accuracy"], pts[-1]["val_accuracy"], rm["ceiling"]):
        assert f"{value:.2f}" in first
    assert f"{pts[0]['num_pairs']} pairs" in first and f"{pts[-1]['num_pairs']} pairs" in first
    # The over-optimisation sentence quotes the measured gold rewards and KLs.
    over = sorted(results["overoptimization"]["points"], key=lambda p: p["step"])
    quoted = _numbers(findings["overoptimization"]["sentences"][0])
    golds = [round(p["gold_reward"], 2) for p in over]
    kls = [round(p["kl"], 2) for p in over]
    assert any(q in golds for q in quoted) and any(q in kls for q in quoted)
    # Tables carry the measured values.
    for p in results["frontier"]["points"]:
        assert f"| {report.fmt(p['kl'], 3)} | {report.fmt(p['gold_reward'], 3)} |" in md
    for p in over:
        row = [str(p["step"])] + [report.fmt(p[k], 3) for k in ("kl", "proxy_reward", "gold_reward")]
        assert "| " + " | ".join(row) + " |" in md
    assert f"Total wall time: {results['wall_time_s']:.1f} s" in md


def test_report_cli_rebuilds_the_same_text(quick_run, tmp_path):
    out, _, md, _ = quick_run
    report.main([str(out / "results.json"), "--output-dir", str(tmp_path)])
    assert (tmp_path / "report.md").read_text() == md
