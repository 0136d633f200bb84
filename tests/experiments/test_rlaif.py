"""`python -m experiments.rlaif`: the findings are computed from the measured numbers (each
verdict both ways on made-up results), the rank correlation, and the quick preset end to end
(slow)."""

import json

import numpy as np
import pytest

from experiments import rlaif


def _estimate(rate, half=0.05):
    return {"rate": rate, "lower": rate - half, "upper": rate + half, "num_examples": 10,
            "confidence": 0.95}


def _constitutional(harmless=(0.2, 0.5, 0.7), helpful=(0.6, 0.58, 0.57)):
    return {
        "policies": {n: {"harmless": _estimate(h), "helpfulness": _estimate(g, 0.02),
                         "gold_on_harmful": 0.5, "length_on_harmful": 9.5}
                     for n, h, g in zip(("helpful_sft", "sl_cai", "rl_cai"), harmless, helpful)},
        "num_eval_prompts": 10, "constitution": ["harm", "safety"], "demonstrations": 100,
        "sl_cai": {"prompts": 10, "records": 9, "revised_fraction": 0.9,
                   "initial_harmless": 0.2, "revision_harmless": 0.6, "helpful_records": 5},
        "rl_cai": {"pairs": 10, "ai_records": 9, "human_helpfulness_records": 5,
                   "ai_label_accuracy": 0.8, "ai_label_pairs_decided": 5,
                   "mean_position_bias": 0.01},
    }


def _results(*, debiased=(0.6, 0.7, 0.8), base=(0.55, 0.66, 0.77), win=(0.5, 0.55, 0.6, 0.62),
             h2h=(0.48, 0.40, 0.56), elo=(1000, 1010, 1020, 1030, 1040),
             harmless=(0.2, 0.5, 0.7)):
    judges = [f"judge_{k}l" for k in (1, 2, 4)]
    labellers = [*judges, "humans"]
    policies = ["sft", *(f"dpo_{n}" for n in labellers)]
    return {
        "preset": "quick", "config": {"seed": 0}, "seconds": 1.0,
        "alignment": {
            "judges": {n: {"base": b, "debiased": d, "few_shot": d, "position_bias": 0.01,
                           "chain_of_thought": None}
                       for n, b, d in zip(judges, base, debiased)},
            "simulated_humans": 0.9, "num_pairs": 10, "num_gold_ties": 0,
            "chain_of_thought": "not run"},
        "policies": {"label_alignment": dict(zip(labellers, (0.6, 0.7, 0.8, 0.9))),
                     "num_pairs": 10, "best_judge": "judge_4l"},
        "evaluation": {
            "win_rate_vs_sft": {f"dpo_{n}": {"rate": w, "lower": w - 0.1, "upper": w + 0.1,
                                             "num_examples": 10, "confidence": 0.95}
                                for n, w in zip(labellers, win)},
            "ai_vs_human": {"ai": "dpo_judge_4l", "human": "dpo_humans", "rate": h2h[0],
                            "lower": h2h[1], "upper": h2h[2], "num_examples": 10,
                            "confidence": 0.95},
            "ratings": {"elo": dict(zip(policies, elo)), "bradley_terry": dict(zip(policies, elo)),
                        "mean_gold": dict(zip(policies, (0.1, 0.2, 0.3, 0.4, 0.5))),
                        "spearman_elo_gold": rlaif.spearman(elo, (0.1, 0.2, 0.3, 0.4, 0.5)),
                        "spearman_bt_gold": rlaif.spearman(elo, (0.1, 0.2, 0.3, 0.4, 0.5)),
                        "num_matches": 50}},
        "constitutional": _constitutional(harmless),
    }


def test_spearman_and_gold_outcomes():
    assert rlaif.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rlaif.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take average ranks: x ranks (0.5, 0.5, 2), y ranks (0, 1, 2) -> r = 0.8660
    assert rlaif.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2)
    assert np.isnan(rlaif.spearman([1, 2], [1, 2]))
    assert np.isnan(rlaif.spearman([1, 1, 1], [1, 2, 3]))
    np.testing.assert_array_equal(rlaif.gold_outcomes(np.array([1.0, 0.0, 0.5]),
                                                      np.array([0.0, 1.0, 0.5])), [1, 0, 0.5])


def test_findings_follow_the_numbers():
    f = rlaif.compute_findings(_results())
    assert [f[k]["reproduced"] for k in "abcde"] == [True, True, True, True, True]
    assert "judge_4l 0.800" in f["a"]["text"] and "+0.040" in f["a"]["text"]
    # alignment falls with size, or debiasing hurts: (a) does not reproduce
    a = rlaif.compute_findings(_results(debiased=(0.8, 0.7, 0.6)))["a"]
    # the largest fall: 0.1 (twice; the first is named); p = 0.7 over 10 pairs: sqrt(0.021)
    assert not a["reproduced"]
    assert ("judge_2l is 0.100 below judge_1l, against a standard error of 0.145 per alignment "
            "figure (10 held-out pairs)") in a["text"]
    assert not rlaif.compute_findings(_results(base=(0.7, 0.8, 0.9)))["a"]["reproduced"]
    # win rates fall as alignment rises: (b) does not reproduce
    f = rlaif.compute_findings(_results(win=(0.6, 0.55, 0.5, 0.45)))
    assert not f["b"]["reproduced"] and "= -1.00" in f["b"]["text"]
    # the AI policy loses clearly to the human one: (c) does not reproduce
    f = rlaif.compute_findings(_results(h2h=(0.2, 0.1, 0.3)))
    assert not f["c"]["reproduced"] and "not within 0.05 of 50%" in f["c"]["text"]
    assert "AI 0.800, simulated humans 0.900" in f["c"]["text"]
    # ratings anti-correlated with gold: (d) does not reproduce
    assert not rlaif.compute_findings(_results(elo=(5, 4, 3, 2, 1)))["d"]["reproduced"]
    # rank differences (2, 0, 2, 1, 1): rho = 1 - 6 * 10 / (5 * 24) = 0.5, at the bar, not above
    results = _results(elo=(1020, 1010, 1000, 1040, 1030))
    results["evaluation"]["ratings"]["judge_gold_agreement"] = 0.61
    d = rlaif.compute_findings(results)["d"]
    assert not d["reproduced"]
    assert "Elo 0.50, Bradley-Terry 0.50 (50 judge matches), not above 0.5" in d["text"]
    assert "within 0.400 of each other" in d["text"]
    assert "picks the gold winner of a match 0.610 of the time" in d["text"]
    assert "rates dpo_judge_4l first, which the gold reward ranks 2 of 5" in d["text"]
    # harmlessness rises after SL-CAI (intervals apart) and after RL-CAI (they overlap)
    text = f["e"]["text"]
    assert "SL-CAI 0.500 [0.450, 0.550]" in text
    assert "rises after SL-CAI (+0.300; the 95% intervals are apart)" in text
    assert "rises after RL-CAI (+0.200; the 95% intervals are apart)" in text
    f = rlaif.compute_findings(_results(harmless=(0.2, 0.5, 0.55)))
    assert f["e"]["reproduced"] and "RL-CAI (+0.050; the 95% intervals overlap)" in f["e"]["text"]
    # RL-CAI lowers it: (e) does not reproduce
    f = rlaif.compute_findings(_results(harmless=(0.2, 0.5, 0.4)))
    assert not f["e"]["reproduced"] and "does not rise after RL-CAI (-0.100)" in f["e"]["text"]


def test_report_has_every_table_and_the_findings(tmp_path):
    results = _results()
    findings = rlaif.compute_findings(results)
    text = rlaif.render_markdown(results, findings)
    assert "| judge_4l | 0.770 | 0.800 | 0.800 | n/a | +0.010 | n/a |" in text
    assert "| dpo_humans | 0.900 | 0.620 | [0.520, 0.720] |" in text
    assert text.count("**reproduced**") == 5
    assert "| rl_cai | 0.700 | [0.650, 0.750] | 0.570 | [0.550, 0.590] | 0.500 | 9.5 |" in text
    assert rlaif._plots(results, tmp_path) == ["alignment.png", "win_rates.png", "ratings.png",
                                               "constitutional.png"]
    assert all((tmp_path / f).stat().st_size > 0 for f in ("alignment.png", "ratings.png"))


@pytest.mark.slow
def test_quick_preset_runs_end_to_end(tmp_path):
    results = rlaif.main(["--quick", "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["preset"] == "quick" and set(saved["findings"]) == set("abcde")
    report = (tmp_path / "report.md").read_text()
    assert "## Findings" in report and all(f"- ({k})" in report for k in "abcde")
    for name in results["figures"]:
        assert (tmp_path / name).stat().st_size > 0
    for row in results["alignment"]["judges"].values():
        assert all(0.0 <= row[k] <= 1.0
                   for k in ("base", "debiased", "few_shot", "chain_of_thought"))
    for est in results["evaluation"]["win_rate_vs_sft"].values():
        assert est["lower"] <= est["rate"] <= est["upper"]
    ratings = results["evaluation"]["ratings"]
    assert set(ratings["elo"]) == {"sft", "dpo_judge_1l", "dpo_judge_2l", "dpo_humans"}


def test_rationale_is_the_pairs_gold_scores_in_prompt_order():
    assert rlaif.score_digits(0.734) == "73"
    assert rlaif.score_digits(-0.2) == "00" and rlaif.score_digits(1.0) == "99"
    assert rlaif.rationale(0.05, 0.9) == "05,89"
    assert len(rlaif.rationale(0.5, 0.5)) == rlaif.RATIONALE_TOKENS
    # the judge reads its answer after the rationale, as it was trained
    context = rlaif.COT_TEMPLATE.render_context(prompt="ab>", response_1="ab", response_2="b")
    assert (rlaif.COT_TEMPLATE.render_answer(context, "73,58")
            == "ab> 1:ab 2:b\n?73,58\n=")


def test_findings_with_chain_of_thought_labels():
    results = _results()
    for n, cot in zip(results["alignment"]["judges"], (0.62, 0.75, 0.85)):
        results["alignment"]["judges"][n].update(chain_of_thought=cot,
                                                 rationale_score_error=0.1)
    results["alignment"]["labeller"] = "chain_of_thought"
    f = rlaif.compute_findings(results)
    assert f["a"]["reproduced"]
    assert "debiased + chain of thought" in f["a"]["text"] and "judge_4l 0.850" in f["a"]["text"]
    assert "chain of thought on top of debiasing by +0.040" in f["a"]["text"]
    text = rlaif.render_markdown(results, f)
    assert "| judge_4l | 0.770 | 0.800 | 0.800 | 0.850 | +0.010 | 0.100 |" in text
    # the size trend is read from the labelling technique: CoT falling with size fails (a)
    for n, cot in zip(results["alignment"]["judges"], (0.85, 0.75, 0.62)):
        results["alignment"]["judges"][n]["chain_of_thought"] = cot
    assert not rlaif.compute_findings(results)["a"]["reproduced"]
