"""The report's sentences follow the numbers, including when the expected effect is absent."""

import json
import math
import re

import matplotlib.image as mpimg
import pytest

from experiments import report


def rm_results(accs, pairs=(64, 128, 256, 512), ceiling=0.78, n_val=400):
    return {
        "ceiling": ceiling,
        "ceiling_label": "rater agreement",
        "num_val_pairs": n_val,
        "points": [{"num_pairs": n, "val_accuracy": a} for n, a in zip(pairs, accs)],
    }


def overopt(gold, proxy, kl=None, se=0.01):
    kl = kl or [0.5 * i for i in range(len(gold))]
    return {
        "kl_coef": 0.001,
        "points": [
            {"step": 10 * i, "kl": k, "proxy_reward": p, "gold_reward": g, "gold_reward_se": se}
            for i, (k, p, g) in enumerate(zip(kl, proxy, gold))
        ],
    }


def frontier(points, ref=0.1, ref_se=0.01):
    return {"reference": {"gold_reward": ref, "gold_reward_se": ref_se}, "points": points}


def fp(method, param, kl, gold, se=0.01):
    return {"method": method, "param_name": "beta", "param": param, "kl": kl,
            "gold_reward": gold, "gold_reward_se": se, "proxy_reward": gold + 0.1}


class TestRmScaling:
    def test_rise_is_reported_with_ceiling(self):
        f = report.rm_scaling_finding(rm_results([0.58, 0.63, 0.68, 0.71]))
        assert f.reproduced
        assert f.sentences[0] == (
            "Reward-model validation accuracy rose from 0.58 at 64 pairs to 0.71 at 512 pairs, "
            "against a ceiling of 0.78 (rater agreement).")
        assert "Accuracy never decreased" in " ".join(f.sentences)
        assert "0.07 below the ceiling" in " ".join(f.sentences)

    def test_points_are_sorted_by_pairs(self):
        f = report.rm_scaling_finding(rm_results([0.71, 0.58], pairs=(512, 64)))
        assert "from 0.58 at 64 pairs to 0.71 at 512 pairs" in f.sentences[0]

    def test_fall_is_not_called_a_rise(self):
        f = report.rm_scaling_finding(rm_results([0.75, 0.62, 0.60, 0.55]))
        text = " ".join(f.sentences)
        assert not f.reproduced
        assert "did not rise" in text and "did not appear" in text
        assert "rose from" not in text
        assert "not monotone" in text

    def test_rise_within_noise_is_not_claimed(self):
        # 2 s.e. of the difference at p~0.6 on 100 pairs is ~0.14.
        f = report.rm_scaling_finding(rm_results([0.60, 0.62, 0.61, 0.64], n_val=100))
        text = " ".join(f.sentences)
        assert not f.reproduced
        assert "within noise" in text and "does not show accuracy improving" in text

    def test_at_ceiling(self):
        f = report.rm_scaling_finding(rm_results([0.60, 0.77], pairs=(64, 512), n_val=2000))
        assert "within noise of the ceiling" in f.sentences[-1]

    def test_bad_input(self):
        with pytest.raises(ValueError, match="at least 2 points"):
            report.rm_scaling_finding(rm_results([0.6], pairs=(64,)))
        bad = rm_results([0.6, 0.7])
        del bad["ceiling"]
        with pytest.raises(KeyError, match="'ceiling'"):
            report.rm_scaling_finding(bad)


class TestOveroptimization:
    def test_peak_and_fall_with_rising_proxy(self):
        gold = [0.1, 0.3, 0.52, 0.4, 0.12]
        proxy = [0.0, 0.5, 1.0, 1.4, 1.9]
        kl = [0.0, 1.5, 3.1, 4.5, 6.0]
        f = report.overoptimization_finding(overopt(gold, proxy, kl))
        assert f.reproduced
        assert f.sentences[0] == (
            "Along the PPO run with a small KL coefficient (0.001), gold reward peaked at 0.52 "
            "at KL 3.10 (step 20) and fell by 0.40 to 0.12 by KL 6.00.")
        assert "kept rising past the gold peak, from 1.00 to 1.90 (1.90 over the whole run)" in (
            f.sentences[1])

    def test_monotone_gold_is_not_overoptimisation(self):
        f = report.overoptimization_finding(overopt([0.1, 0.2, 0.3, 0.4], [0, 1, 2, 3]))
        text = " ".join(f.sentences)
        assert not f.reproduced
        assert "did not peak and fall" in text and "was not observed" in text
        assert "peaked at" not in text

    def test_small_fall_within_noise(self):
        f = report.overoptimization_finding(
            overopt([0.1, 0.5, 0.49, 0.48], [0, 1, 2, 3], se=0.05))
        text = " ".join(f.sentences)
        assert not f.reproduced
        assert "fell by only 0.02" in text and "within noise" in text
        assert "not established" in text

    def test_fall_from_the_start_is_not_a_peak(self):
        f = report.overoptimization_finding(overopt([0.55, 0.51, 0.41, 0.28], [0, 0.5, 0.8, 1.2]))
        text = " ".join(f.sentences)
        assert not f.reproduced
        assert "never rose above its starting value (0.55 at KL 0.00)" in text
        assert "fell to 0.28 by KL 1.50" in text and "was not observed" in text
        assert "peaked" not in text

    def test_rise_within_noise_then_fall_is_not_reproduced(self):
        f = report.overoptimization_finding(
            overopt([0.58, 0.59, 0.50, 0.41], [0, 0.4, 0.8, 1.2], se=0.01))
        text = " ".join(f.sentences)
        assert not f.reproduced
        assert "did not rise beyond noise before it fell" in text
        assert "a rise of 0.01 against 2.00 standard errors = 0.03" in text
        assert "then down to 0.41" in text and "not established" in text

    def test_gold_and_proxy_falling_together(self):
        f = report.overoptimization_finding(overopt([0.1, 0.5, 0.1], [0, 2, 0.5]))
        text = " ".join(f.sentences)
        assert not f.reproduced
        assert "did not keep rising" in text and "unstable run" in text

    def test_too_few_points(self):
        with pytest.raises(ValueError, match="at least 3 points"):
            report.overoptimization_finding(overopt([0.1, 0.2], [0, 1]))

    def test_sweep_points_are_ordered_by_kl_with_the_long_run(self):
        # The long run alone exploits the proxy at once (its gold never rises); the sweep's
        # strongly penalised policy sits at the gold peak (Stiennon et al. 2020, Fig. 5).
        run = overopt([0.60, 0.55, 0.40, 0.20], [0.0, 1.0, 2.0, 3.0], kl=[0.0, 3.0, 9.0, 30.0])
        assert not report.overoptimization_finding(run).reproduced
        sweep = [
            {"method": "ppo", "param": 0.3, "step": 60, "kl": 1.2, "proxy_reward": 0.7,
             "gold_reward": 0.68, "gold_reward_se": 0.01},
            {"method": "ppo", "param": 0.03, "step": 60, "kl": 20.0, "proxy_reward": 2.5,
             "gold_reward": 0.25, "gold_reward_se": 0.01},
        ]
        f = report.overoptimization_finding(run, sweep)
        assert f.reproduced
        assert f.sentences[0] == (
            "Across the 6 PPO policies ordered by KL (the KL-coefficient sweep and the long run "
            "with a small KL coefficient (0.001)), gold reward peaked at 0.68 at KL 1.20 "
            "(KL coefficient 0.3, step 60) and fell by 0.48 to 0.20 by KL 30.00.")
        assert "from 0.70 to 3.00 (3.00 over the whole range)" in f.sentences[1]

    def test_sweep_without_a_rise_is_not_reproduced(self):
        run = overopt([0.60, 0.55, 0.40, 0.20], [0.0, 1.0, 2.0, 3.0], kl=[0.0, 3.0, 9.0, 30.0])
        sweep = [{"method": "ppo", "param": 0.3, "step": 60, "kl": 1.2, "proxy_reward": 0.7,
                  "gold_reward": 0.59, "gold_reward_se": 0.01}]
        f = report.overoptimization_finding(run, sweep)
        assert not f.reproduced
        assert "never rose above its starting value" in f.sentences[0]
        assert "not observed in these policies" in f.sentences[0]

    def test_compute_findings_uses_the_frontier_ppo_sweep(self):
        run = overopt([0.60, 0.55, 0.40, 0.20], [0.0, 1.0, 2.0, 3.0], kl=[0.0, 3.0, 9.0, 30.0])
        ppo = {"method": "ppo", "param": 0.3, "step": 60, "kl": 1.2, "proxy_reward": 0.7,
               "gold_reward": 0.68, "gold_reward_se": 0.01}
        dpo = dict(ppo, method="dpo", gold_reward=0.99)  # not a PPO policy: ignored here
        results = {"overoptimization": run, "frontier": frontier([ppo, dpo], ref=0.6)}
        f = report.compute_findings(results)["overoptimization"]
        assert f.reproduced and "peaked at 0.68" in f.sentences[0]


class TestFrontier:
    def test_methods_ranked_in_common_range(self):
        pts = [fp("ppo", 0.1, 0.5, 0.2), fp("ppo", 0.01, 2.0, 0.35), fp("ppo", 0.001, 5.0, 0.25),
               fp("dpo", 0.5, 0.4, 0.25), fp("dpo", 0.1, 1.5, 0.45),
               fp("best_of_n", 4, 0.6, 0.3), fp("best_of_n", 16, 1.8, 0.4)]
        f = report.frontier_finding(frontier(pts))
        text = " ".join(f.sentences)
        assert f.reproduced
        assert text.startswith("The reference (SFT) policy scores a gold reward of 0.10 at KL 0.")
        assert "PPO reached its best gold reward of 0.35 (KL 2.00, beta=0.01), 0.25 above" in text
        assert "more KL cost PPO gold reward: 0.25 at KL 5.00" in text
        # Common range: KL <= min(5.0, 1.5, 1.8) = 1.5.
        assert "(KL ≤ 1.50), the best gold rewards were: DPO 0.45, best-of-n 0.30, PPO 0.20." in (
            text)
        assert "DPO gave the best reward-KL trade-off" in text

    def test_no_improvement_is_reported(self):
        pts = [fp("ppo", 0.1, 0.5, 0.105), fp("dpo", 0.1, 0.5, 0.09)]
        f = report.frontier_finding(frontier(pts))
        text = " ".join(f.sentences)
        assert not f.reproduced
        assert "PPO did not improve gold reward beyond noise" in text
        assert "DPO did not improve gold reward beyond noise" in text
        assert "within noise of each other" in text

    def test_missing_field(self):
        with pytest.raises(KeyError, match="'kl'"):
            report.frontier_finding(frontier([{"method": "ppo", "gold_reward": 0.1}]))


def full_results():
    return {
        "title": "test report",
        "config": {"preset": "unit", "lr": 1e-3},
        "seeds": {"data": 0, "policy": 1},
        "wall_time_s": 93.4,
        "stage_times_s": {"sft": 10.0, "rm": 20.0},
        "stage_compiles": {"sft": {"compiles": 3, "compile_s": 4.31},
                           "rm": {"compiles": 1, "compile_s": 2.0}},
        "environment": {"jax": "0.0", "devices": "cpu x1"},
        "task": {"name": "toy", "description": "A toy task."},
        "rm_scaling": rm_results([0.58, 0.63, 0.68, 0.71]),
        "frontier": frontier([fp("ppo", 0.1, 0.5, 0.2), fp("dpo", 0.1, 1.0, 0.3),
                              fp("best_of_n", 4, 0.6, 0.25)]),
        "overoptimization": overopt([0.1, 0.3, 0.52, 0.4, 0.12], [0, 0.5, 1, 1.4, 1.9]),
    }


def test_write_report_files_figures_and_numbers(tmp_path):
    results = full_results()
    paths = report.write_report(results, tmp_path / "out")
    md = paths.report.read_text()
    saved = json.loads(paths.results.read_text())
    assert set(paths.figures) == {"rm_scaling", "frontier", "overoptimization"}
    for name, fig in paths.figures.items():
        img = mpimg.imread(fig)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200, name
        assert f"]({fig.name})" in md
        assert img[..., :3].std() > 0.01  # not a blank canvas
    assert saved["rm_scaling"] == results["rm_scaling"]
    assert saved["findings"]["overoptimization"]["reproduced"] is True
    for f in saved["findings"].values():
        for sentence in f["sentences"]:
            assert sentence in md
    assert ("the best gold rewards were: PPO 0.20 (DPO and best-of-n had no point in this "
            "range).") in md
    assert "Fig. 2): reproduced. Within the KL range" in md
    assert "Total wall time: 93.4 s (1.6 min)." in md
    assert "Seeds: data=0, policy=1." in md
    assert "| sft | 10.0 | 3 | 4.3 |" in md and "| rm | 20.0 | 1 | 2.0 |" in md
    assert '"lr": 0.001' in md
    # Every accuracy in the table is a number from the results.
    section = md.split("## 1.")[1].split("## 2.")[0]
    table = re.findall(r"^\| (\d+) \| ([0-9.]+) \|", section, flags=re.M)
    assert [(int(n), float(a)) for n, a in table] == [
        (p["num_pairs"], p["val_accuracy"]) for p in results["rm_scaling"]["points"]]
    se = 2 * math.sqrt(0.58 * 0.42 / 400)
    assert f"| 64 | 0.580 | {se:.3f} |" in md


def test_not_reproduced_is_flagged_in_summary(tmp_path):
    results = full_results()
    results["overoptimization"] = overopt([0.1, 0.2, 0.3, 0.4], [0, 1, 2, 3])
    md = report.write_report(results, tmp_path).report.read_text()
    summary = md.split("## Summary")[1].split("## 1.")[0]
    assert "Over-optimisation (Stiennon et al. 2020, Fig. 5): **not reproduced in this run**" in (
        summary)
    assert "Fig. 6): reproduced." in summary


def test_partial_results_and_cli(tmp_path):
    results = {"wall_time_s": 1.0, "rm_scaling": rm_results([0.6, 0.7], pairs=(8, 16))}
    (tmp_path / "results.json").write_text(json.dumps(results))
    report.main([str(tmp_path / "results.json"), "--output-dir", str(tmp_path / "r")])
    assert (tmp_path / "r" / report.RM_FIGURE).is_file()
    assert not (tmp_path / "r" / report.FRONTIER_FIGURE).exists()
    with pytest.raises(ValueError, match="none of"):
        report.write_report({"wall_time_s": 1.0}, tmp_path / "x")


def test_fmt():
    assert report.fmt(0.5) == "0.50"
    assert report.fmt(-0.0001) == "0.00"
    assert report.fmt(float("nan")) == "n/a"
    assert report.fmt_param(0.0010) == "0.001"
