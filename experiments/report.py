"""Markdown + PNG report of an RLHF experiment, written from measured results.

Every sentence that describes a result is derived from the numbers passed in: when the expected
effect (more pairs -> higher reward-model accuracy; gold reward peaking and falling along an
over-optimised PPO run) does not appear, the text says so.

The results are a JSON-able dict:

```
{
  "title": str,                         # optional
  "config": {...},                      # resolved configuration (any JSON)
  "seeds": {...},                       # every seed used, by purpose
  "wall_time_s": float,
  "stage_times_s": {"sft": float, ...}, # optional
  "stage_compiles": {"sft": {"compiles": int, "compile_s": float, ...}, ...},  # optional
  "environment": {"jax": str, ...},     # optional
  "task": {"name": str, "description": str},          # optional
  "rm_scaling": {
    "ceiling": float,                   # rater agreement: the accuracy limit
    "ceiling_label": str,               # optional, e.g. "agreement between two raters"
    "num_val_pairs": int,               # size of the validation split
    "points": [{"num_pairs": int, "val_accuracy": float}, ...],
  },
  "frontier": {
    "reference": {"gold_reward": float, "gold_reward_se": float},   # the SFT policy, KL 0
    "kl_estimator": str,                # optional, how KL was measured
    "points": [{"method": "ppo"|"dpo"|"best_of_n"|..., "param_name": str, "param": float,
                "kl": float, "gold_reward": float, "gold_reward_se": float,
                "proxy_reward": float, "step": int}, ...],          # se/proxy/step optional
  },
  "overoptimization": {
    "kl_coef": float,
    "points": [{"step": int, "kl": float, "proxy_reward": float, "gold_reward": float,
                "gold_reward_se": float}, ...],                     # se optional
  },
}
```

`write_report(results, output_dir)` writes `report.md`, `results.json` and one PNG per figure and
returns their paths. `python -m experiments.report RESULTS.json [--output-dir DIR]` rebuilds a
report from a saved results file.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RM_FIGURE = "rm_accuracy_vs_pairs.png"
FRONTIER_FIGURE = "reward_vs_kl_frontier.png"
OVEROPT_FIGURE = "overoptimization.png"

METHOD_LABELS = {
    "ppo": "PPO",
    "dpo": "DPO",
    "best_of_n": "best-of-n",
    "grpo": "GRPO",
    "rejection_sampling": "rejection sampling",
}
_METHOD_STYLE = {
    "ppo": ("tab:blue", "o"),
    "dpo": ("tab:orange", "s"),
    "best_of_n": ("tab:green", "^"),
}
# A difference counts as a real effect when it exceeds this many standard errors.
NOISE_Z = 2.0


class ReportPaths(NamedTuple):
    """Files written by `write_report`."""

    report: pathlib.Path
    results: pathlib.Path
    figures: dict[str, pathlib.Path]


class Finding(NamedTuple):
    """A figure's verdict: whether the expected effect appeared, and the sentences saying so."""

    reproduced: bool
    sentences: list[str]
    headline: int = 0  # index of the sentence that summarises the figure


def fmt(x: float, digits: int = 2) -> str:
    """The one number format used in the text: fixed point with `digits` decimals."""
    if x is None or not math.isfinite(float(x)):
        return "n/a"
    s = f"{float(x):.{digits}f}"
    return "0." + "0" * digits if s == "-0." + "0" * digits else s


def fmt_param(x: float) -> str:
    """A hyper-parameter value as written in the text (no trailing zeros)."""
    return f"{float(x):g}"


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _require(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise KeyError(f"results[{where!r}] has no {key!r} (keys: {sorted(mapping)})")
    return mapping[key]


def _binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / max(n, 1))


# --------------------------------------------------------------------------------------------
# Findings: the sentences, computed from the numbers.
# --------------------------------------------------------------------------------------------


def rm_scaling_finding(rm: Mapping[str, Any]) -> Finding:
    """Did validation accuracy rise with the number of pairs, and how close to the ceiling?

    The rise from the smallest to the largest training set counts as real when it exceeds
    `NOISE_Z` standard errors of the difference of two binomial proportions measured on
    `num_val_pairs` validation pairs.
    """
    points = sorted(_require(rm, "points", "rm_scaling"), key=lambda p: p["num_pairs"])
    if len(points) < 2:
        raise ValueError(f"rm_scaling needs at least 2 points, got {len(points)}")
    ceiling = float(_require(rm, "ceiling", "rm_scaling"))
    ceiling_label = rm.get("ceiling_label", "rater agreement")
    n_val = int(_require(rm, "num_val_pairs", "rm_scaling"))
    first, last = points[0], points[-1]
    a0, a1 = float(first["val_accuracy"]), float(last["val_accuracy"])
    se = math.hypot(_binomial_se(a0, n_val), _binomial_se(a1, n_val))
    delta = a1 - a0
    span = (
        f"from {fmt(a0)} at {first['num_pairs']} pairs to {fmt(a1)} at {last['num_pairs']} pairs"
    )
    ceiling_text = f"against a ceiling of {fmt(ceiling)} ({ceiling_label})"
    sentences = []
    if delta > NOISE_Z * se:
        reproduced = True
        sentences.append(f"Reward-model validation accuracy rose {span}, {ceiling_text}.")
    elif delta > 0:
        reproduced = False
        sentences.append(
            f"Reward-model validation accuracy rose only slightly, {span}, {ceiling_text}; "
            f"the rise of {fmt(delta)} is within noise ({fmt(NOISE_Z)} standard errors = "
            f"{fmt(NOISE_Z * se)} on {n_val} validation pairs), so this run does not show "
            "accuracy improving with more data."
        )
    else:
        reproduced = False
        sentences.append(
            f"Reward-model validation accuracy did not rise with more data: it went {span}, "
            f"{ceiling_text}. The expected trend (more pairs, higher accuracy) did not appear "
            "in this run."
        )
    accs = [float(p["val_accuracy"]) for p in points]
    drops = [
        (points[i], points[i + 1])
        for i in range(len(points) - 1)
        if accs[i + 1] < accs[i] - NOISE_Z * math.sqrt(2) * _binomial_se(accs[i], n_val)
    ]
    if len(points) > 2:
        if all(b >= a for a, b in zip(accs, accs[1:])):
            sentences.append("Accuracy never decreased as pairs were added.")
        elif drops:
            lo, hi = drops[0]
            sentences.append(
                f"The curve is not monotone: accuracy fell from {fmt(float(lo['val_accuracy']))} "
                f"at {lo['num_pairs']} pairs to {fmt(float(hi['val_accuracy']))} at "
                f"{hi['num_pairs']} pairs, by more than the noise level."
            )
        else:
            sentences.append(
                "The curve wobbles between neighbouring sizes by no more than the noise level."
            )
    best = max(points, key=lambda p: p["val_accuracy"])
    gap = ceiling - float(best["val_accuracy"])
    if gap > NOISE_Z * _binomial_se(ceiling, n_val):
        sentences.append(
            f"The best model ({best['num_pairs']} pairs, {fmt(float(best['val_accuracy']))}) "
            f"stays {fmt(gap)} below the ceiling."
        )
    else:
        sentences.append(
            f"The best model ({best['num_pairs']} pairs, {fmt(float(best['val_accuracy']))}) "
            "is within noise of the ceiling."
        )
    return Finding(reproduced, sentences)


def _points_by_method(points: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        for key in ("method", "kl", "gold_reward"):
            _require(p, key, "frontier.points[]")
        out.setdefault(p["method"], []).append(p)
    return out


def frontier_finding(frontier: Mapping[str, Any]) -> Finding:
    """Per-method trends along the reward-vs-KL frontier and which method reaches the most
    gold reward within the KL range that all methods cover.

    `reproduced` is True when at least one method improves gold reward over the reference
    policy by more than `NOISE_Z` standard errors (the frontier exists at all).
    """
    ref = _require(frontier, "reference", "frontier")
    ref_gold = float(_require(ref, "gold_reward", "frontier.reference"))
    ref_se = float(ref.get("gold_reward_se", 0.0))
    by_method = _points_by_method(_require(frontier, "points", "frontier"))
    if not by_method:
        raise ValueError("frontier has no points")
    sentences = [f"The reference (SFT) policy scores a gold reward of {fmt(ref_gold)} at KL 0."]
    headline = 1
    improved = []
    for method, pts in by_method.items():
        pts = sorted(pts, key=lambda p: p["kl"])
        best = max(pts, key=lambda p: p["gold_reward"])
        se = math.hypot(float(best.get("gold_reward_se", 0.0)), ref_se)
        gain = float(best["gold_reward"]) - ref_gold
        where = f"KL {fmt(float(best['kl']))}"
        if "param_name" in best and "param" in best:
            where += f", {best['param_name']}={fmt_param(best['param'])}"
        if gain > NOISE_Z * se:
            improved.append(method)
            sentences.append(
                f"{method_label(method)} reached its best gold reward of "
                f"{fmt(float(best['gold_reward']))} ({where}), {fmt(gain)} above the reference."
            )
        else:
            sentences.append(
                f"{method_label(method)} did not improve gold reward beyond noise: its best was "
                f"{fmt(float(best['gold_reward']))} ({where}) against {fmt(ref_gold)} for the "
                "reference."
            )
        if len(pts) >= 2 and pts[-1] is not best and float(best["kl"]) < float(pts[-1]["kl"]):
            drop = float(best["gold_reward"]) - float(pts[-1]["gold_reward"])
            if drop > NOISE_Z * math.hypot(
                float(best.get("gold_reward_se", 0.0)), float(pts[-1].get("gold_reward_se", 0.0))
            ):
                sentences.append(
                    f"Beyond that, more KL cost {method_label(method)} gold reward: "
                    f"{fmt(float(pts[-1]['gold_reward']))} at KL {fmt(float(pts[-1]['kl']))}."
                )
    if len(by_method) >= 2:
        common_kl = min(max(float(p["kl"]) for p in pts) for pts in by_method.values())
        best_in_range = {}
        for method, pts in by_method.items():
            inside = [p for p in pts if float(p["kl"]) <= common_kl + 1e-9]
            if inside:
                best_in_range[method] = max(float(p["gold_reward"]) for p in inside)
        ranking = sorted(best_in_range.items(), key=lambda kv: -kv[1])
        listed = ", ".join(f"{method_label(m)} {fmt(g)}" for m, g in ranking)
        missing = [method_label(m) for m in by_method if m not in best_in_range]
        headline = len(sentences)
        sentences.append(
            f"Within the KL range every method covers (KL ≤ {fmt(common_kl)}), the best gold "
            f"rewards were: {listed}"
            + (f" ({' and '.join(missing)} had no point in this range)." if missing else ".")
        )
        if len(ranking) >= 2 and ranking[0][1] - ranking[1][1] > NOISE_Z * ref_se:
            sentences.append(
                f"{method_label(ranking[0][0])} gave the best reward-KL trade-off in this run."
            )
        elif len(ranking) >= 2:
            sentences.append(
                f"{method_label(ranking[0][0])} and {method_label(ranking[1][0])} are within noise "
                "of each other there; this run does not separate them."
            )
    return Finding(bool(improved), sentences, headline)


def overoptimization_finding(
    run: Mapping[str, Any], sweep: Sequence[Mapping[str, Any]] = ()
) -> Finding:
    """Did gold reward peak and then fall while the proxy reward kept rising?

    Without `sweep`, the points are the evaluations of the long run, in step order. With
    `sweep` (the PPO policies of the KL-coefficient sweep, `{"param", "step", "kl", ...}`), the
    points are every PPO policy, long run and sweep together, ordered by KL: gold reward
    against the degree of optimisation, as in Stiennon et al. (2020, Fig. 5, which varies the
    KL coefficient) and Gao et al. (2022).

    The peak is the maximum gold reward. The effect is reproduced when the peak is more than
    `NOISE_Z` standard errors above the first point (gold rose), the last point's gold reward is
    more than `NOISE_Z` standard errors below the peak (it fell), and the proxy's last value
    exceeds its value at the gold peak (the proxy kept rising).
    """
    run_points = _require(run, "points", "overoptimization")
    for p in [*run_points, *sweep]:
        for key in ("kl", "proxy_reward", "gold_reward"):
            _require(p, key, "overoptimization.points[]")
    kl_coef = run.get("kl_coef")
    small = f" with a small KL coefficient ({fmt_param(kl_coef)})" if kl_coef is not None else ""
    if sweep:
        points = [dict(p, where=f"the long run's step {p['step']}") for p in run_points]
        points += [dict(p, where=f"KL coefficient {fmt_param(_require(p, 'param', 'ppo'))}"
                        + (f", step {p['step']}" if "step" in p else ""))
                   for p in sweep]
        points.sort(key=lambda p: float(p["kl"]))
        intro = (f"Across the {len(points)} PPO policies ordered by KL (the KL-coefficient "
                 f"sweep and the long run{small})")
    else:
        points = [dict(p, where=f"step {p['step']}")
                  for p in sorted(run_points, key=lambda p: p["step"])]
        intro = "Along the PPO run" + small
    scope = "these policies" if sweep else "this run"
    if len(points) < 3:
        raise ValueError(f"overoptimization needs at least 3 points, got {len(points)}")
    first, last = points[0], points[-1]
    peak_i = max(range(len(points)), key=lambda i: points[i]["gold_reward"])
    peak = points[peak_i]
    proxy_rise = float(last["proxy_reward"]) - float(peak["proxy_reward"])
    proxy_total = float(last["proxy_reward"]) - float(first["proxy_reward"])
    se = math.hypot(float(peak.get("gold_reward_se", 0.0)), float(last.get("gold_reward_se", 0.0)))
    fall = float(peak["gold_reward"]) - float(last["gold_reward"])
    rise = float(peak["gold_reward"]) - float(first["gold_reward"])
    rise_se = math.hypot(float(peak.get("gold_reward_se", 0.0)),
                         float(first.get("gold_reward_se", 0.0)))
    sentences = []
    if 0 < peak_i < len(points) - 1 and rise <= NOISE_Z * rise_se and fall > NOISE_Z * se:
        reproduced = False
        sentences.append(
            f"{intro}, gold reward did not rise beyond noise before it fell: from "
            f"{fmt(float(first['gold_reward']))} at KL {fmt(float(first['kl']))} to at most "
            f"{fmt(float(peak['gold_reward']))} (KL {fmt(float(peak['kl']))}; a rise of "
            f"{fmt(rise)} against {fmt(NOISE_Z)} standard errors = {fmt(NOISE_Z * rise_se)}), "
            f"then down to {fmt(float(last['gold_reward']))} by KL {fmt(float(last['kl']))}. "
            f"The rise-then-fall of over-optimisation is not established by {scope}."
        )
    elif peak_i == 0 and fall > NOISE_Z * se:
        reproduced = False
        sentences.append(
            f"{intro}, gold reward never rose above its starting value "
            f"({fmt(float(first['gold_reward']))} at KL {fmt(float(first['kl']))}): it fell to "
            f"{fmt(float(last['gold_reward']))} by KL {fmt(float(last['kl']))}. The proxy was "
            "exploited from the first evaluation on, so the rise-then-fall of over-optimisation "
            f"was not observed in {scope}."
        )
    elif peak_i == len(points) - 1 or fall <= 0:
        reproduced = False
        sentences.append(
            f"{intro}, gold reward did not peak and fall: it was highest at the last evaluation "
            f"({fmt(float(last['gold_reward']))} at KL {fmt(float(last['kl']))}), so "
            f"over-optimisation of the proxy reward model was not observed in {scope}."
        )
    elif fall <= NOISE_Z * se:
        reproduced = False
        sentences.append(
            f"{intro}, gold reward peaked at {fmt(float(peak['gold_reward']))} at KL "
            f"{fmt(float(peak['kl']))} and then fell by only {fmt(fall)} by KL "
            f"{fmt(float(last['kl']))}, which is within noise ({fmt(NOISE_Z)} standard errors = "
            f"{fmt(NOISE_Z * se)}); over-optimisation is not established by {scope}."
        )
    else:
        reproduced = proxy_rise > 0
        sentences.append(
            f"{intro}, gold reward peaked at {fmt(float(peak['gold_reward']))} at KL "
            f"{fmt(float(peak['kl']))} ({peak['where']}) and fell by {fmt(fall)} to "
            f"{fmt(float(last['gold_reward']))} by KL {fmt(float(last['kl']))}."
        )
    if proxy_rise > 0:
        sentences.append(
            f"The proxy reward-model score kept rising past the gold peak, from "
            f"{fmt(float(peak['proxy_reward']))} to {fmt(float(last['proxy_reward']))} "
            f"({fmt(proxy_total)} over the whole {'range' if sweep else 'run'})."
        )
    else:
        sentences.append(
            f"The proxy reward-model score did not keep rising after the gold peak: it went from "
            f"{fmt(float(peak['proxy_reward']))} at the gold peak to "
            f"{fmt(float(last['proxy_reward']))} at the end."
        )
        if fall > NOISE_Z * se:
            sentences.append(
                "Gold and proxy fell together, which points to an unstable run rather than "
                "over-optimisation of the reward model."
            )
    return Finding(reproduced, sentences)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def plot_rm_scaling(rm: Mapping[str, Any], path: pathlib.Path) -> None:
    points = sorted(rm["points"], key=lambda p: p["num_pairs"])
    n_val = int(rm["num_val_pairs"])
    xs = [p["num_pairs"] for p in points]
    ys = [float(p["val_accuracy"]) for p in points]
    err = [NOISE_Z * _binomial_se(y, n_val) for y in ys]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"reward model (±{fmt_param(NOISE_Z)} s.e.)")
    short = rm.get("ceiling_label", "rater agreement").split(";")[0]
    ax.axhline(float(rm["ceiling"]), color="k", ls="--", label=f"ceiling: {short}")
    ax.axhline(0.5, color="gray", ls=":", label="chance")
    low = min([0.5, *(y - e for y, e in zip(ys, err))])
    ax.set_ylim(low - 0.12, max(float(rm["ceiling"]), *ys) + 0.04)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("preference pairs used to train the reward model")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Reward-model accuracy vs. data")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_frontier(frontier: Mapping[str, Any], path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ref = frontier["reference"]
    ax.scatter([0.0], [float(ref["gold_reward"])], color="k", marker="*", s=120, zorder=3,
               label="reference (SFT)")
    for method, pts in _points_by_method(frontier["points"]).items():
        pts = sorted(pts, key=lambda p: p["kl"])
        color, marker = _METHOD_STYLE.get(method, (None, "D"))
        xs = [float(p["kl"]) for p in pts]
        ys = [float(p["gold_reward"]) for p in pts]
        yerr = [2 * float(p.get("gold_reward_se", 0.0)) for p in pts]
        ax.errorbar(xs, ys, yerr=yerr, ls="none", marker=marker, color=color, capsize=2,
                    label=method_label(method))
        for p in pts:
            if "param" in p:
                ax.annotate(fmt_param(p["param"]), (float(p["kl"]), float(p["gold_reward"])),
                            textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    ax.set_xlabel("KL(π ‖ π_ref) per sequence (nats)")
    ax.set_ylabel("gold reward")
    ax.set_title("Gold reward vs. KL to the reference")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_overoptimization(
    run: Mapping[str, Any], path: pathlib.Path, sweep: Sequence[Mapping[str, Any]] = ()
) -> None:
    """The long run as lines (in step order); the KL-sweep policies, if any, as open markers."""
    points = sorted(run["points"], key=lambda p: p["step"])
    kl = [float(p["kl"]) for p in points]
    gold = [float(p["gold_reward"]) for p in points]
    proxy = [float(p["proxy_reward"]) for p in points]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(kl, proxy, marker="o", color="tab:red", label="proxy reward model")
    ax.set_xlabel("KL(π ‖ π_ref) per sequence (nats)")
    ax.set_ylabel("proxy reward-model score", color="tab:red")
    ax2 = ax.twinx()
    ax2.plot(kl, gold, marker="s", color="tab:blue", label="gold reward")
    ax2.set_ylabel("gold reward", color="tab:blue")
    all_kl, all_gold = list(kl), list(gold)
    if sweep:
        s_kl = [float(p["kl"]) for p in sweep]
        ax.scatter(s_kl, [float(p["proxy_reward"]) for p in sweep], marker="o",
                   facecolors="none", edgecolors="tab:red")
        s_gold = [float(p["gold_reward"]) for p in sweep]
        ax2.scatter(s_kl, s_gold, marker="s", facecolors="none", edgecolors="tab:blue",
                    label="PPO KL sweep (open markers)")
        all_kl += s_kl
        all_gold += s_gold
    i = max(range(len(all_gold)), key=all_gold.__getitem__)
    ax2.axvline(all_kl[i], color="tab:blue", ls=":", lw=1)
    handles = ax.get_lines()[:1] + ax2.get_lines()[:1] + ax2.collections[:1]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower center", fontsize=8,
              bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    coef = f"KL coef {fmt_param(run['kl_coef'])}" if run.get("kl_coef") is not None else ""
    if sweep:
        title = "Over-optimisation across PPO policies" + (f"\n(line: the {coef} run)"
                                                          if coef else "")
    else:
        title = "Over-optimisation along a PPO run" + (f" ({coef})" if coef else "")
    ax.set_title(title, pad=22)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _verdict(f: Finding) -> str:
    return "reproduced" if f.reproduced else "**not reproduced in this run**"


def render_markdown(results: Mapping[str, Any], findings: Mapping[str, Finding]) -> str:
    lines = [f"# {results.get('title', 'RLHF experiment report')}", ""]
    wall = float(_require(results, "wall_time_s", "<root>"))
    task = results.get("task", {})
    if task:
        lines += [f"Task: **{task.get('name', '?')}**. {task.get('description', '')}".rstrip(), ""]
    lines += [f"Total wall time: {fmt(wall, 1)} s ({fmt(wall / 60, 1)} min).", ""]
    lines += ["## Summary", ""]
    names = {"rm_scaling": "Reward-model accuracy vs. pairs (Stiennon et al. 2020, Fig. 6)",
             "frontier": "Gold reward vs. KL frontier (Rafailov et al. 2023, Fig. 2)",
             "overoptimization": "Over-optimisation (Stiennon et al. 2020, Fig. 5)"}
    for key, f in findings.items():
        lines.append(f"- {names[key]}: {_verdict(f)}. {f.sentences[f.headline]}")
    lines.append("")

    if "rm_scaling" in findings:
        rm = results["rm_scaling"]
        lines += ["## 1. Reward-model accuracy vs. number of preference pairs", "",
                  f"![reward-model accuracy]({RM_FIGURE})", ""]
        lines += [" ".join(findings["rm_scaling"].sentences), ""]
        n_val = int(rm["num_val_pairs"])
        rows = [[str(p["num_pairs"]), fmt(float(p["val_accuracy"]), 3),
                 fmt(2 * _binomial_se(float(p["val_accuracy"]), n_val), 3)]
                for p in sorted(rm["points"], key=lambda p: p["num_pairs"])]
        lines += _table(["pairs", "val accuracy", "± 2 s.e."], rows)
        lines += ["", f"Validation pairs: {n_val}. Ceiling: {fmt(float(rm['ceiling']), 3)} "
                  f"({rm.get('ceiling_label', 'rater agreement')}).", ""]

    if "frontier" in findings:
        fr = results["frontier"]
        lines += ["## 2. Gold reward vs. KL to the reference", "",
                  f"![reward vs KL frontier]({FRONTIER_FIGURE})", ""]
        lines += [" ".join(findings["frontier"].sentences), ""]
        if fr.get("kl_estimator"):
            lines += [f"KL measurement: {fr['kl_estimator']}", ""]
        rows = []
        for p in sorted(fr["points"], key=lambda p: (p["method"], p["kl"])):
            rows.append([method_label(p["method"]),
                         f"{p.get('param_name', '')}={fmt_param(p['param'])}" if "param" in p
                         else "", str(p.get("step", "")), fmt(float(p["kl"]), 3),
                         fmt(float(p["gold_reward"]), 3),
                         fmt(2 * float(p.get("gold_reward_se", 0.0)), 3),
                         fmt(float(p["proxy_reward"]), 3) if "proxy_reward" in p else ""])
        lines += _table(["method", "setting", "step", "KL", "gold reward", "± 2 s.e.",
                         "proxy RM"], rows)
        lines.append("")

    if "overoptimization" in findings:
        run = results["overoptimization"]
        lines += ["## 3. Over-optimisation of the proxy reward model", "",
                  f"![over-optimisation]({OVEROPT_FIGURE})", ""]
        lines += [" ".join(findings["overoptimization"].sentences), ""]
        rows = [[str(p["step"]), fmt(float(p["kl"]), 3), fmt(float(p["proxy_reward"]), 3),
                 fmt(float(p["gold_reward"]), 3)]
                for p in sorted(run["points"], key=lambda p: p["step"])]
        lines += _table(["step", "KL", "proxy RM", "gold reward"], rows)
        lines.append("")

    lines += ["## Run details", ""]
    seeds = results.get("seeds", {})
    if seeds:
        lines += ["Seeds: " + ", ".join(f"{k}={v}" for k, v in seeds.items()) + ".", ""]
    stage_times = results.get("stage_times_s", {})
    compiles = results.get("stage_compiles", {})
    if stage_times and compiles:
        lines += _table(
            ["stage", "wall time (s)", "XLA compiles", "compile time (s)"],
            [[k, fmt(float(v), 1), str(compiles.get(k, {}).get("compiles", "")),
              fmt(float(compiles.get(k, {}).get("compile_s", float("nan"))), 1)]
             for k, v in stage_times.items()])
        lines.append("")
    elif stage_times:
        lines += _table(["stage", "wall time (s)"],
                        [[k, fmt(float(v), 1)] for k, v in stage_times.items()])
        lines.append("")
    env = results.get("environment", {})
    if env:
        lines += ["Environment: " + "; ".join(f"{k}: {v}" for k, v in env.items()) + ".", ""]
    lines += ["Configuration:", "", "```json",
              json.dumps(results.get("config", {}), indent=2, sort_keys=True, default=str),
              "```", ""]
    return "\n".join(lines)


def _ppo_sweep(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The PPO policies of the frontier's KL-coefficient sweep (empty without a frontier)."""
    return [p for p in results.get("frontier", {}).get("points", ()) if p.get("method") == "ppo"]


def compute_findings(results: Mapping[str, Any]) -> dict[str, Finding]:
    """The findings for whichever of the three experiments the results contain."""
    findings: dict[str, Finding] = {}
    if "rm_scaling" in results:
        findings["rm_scaling"] = rm_scaling_finding(results["rm_scaling"])
    if "frontier" in results:
        findings["frontier"] = frontier_finding(results["frontier"])
    if "overoptimization" in results:
        findings["overoptimization"] = overoptimization_finding(results["overoptimization"],
                                                                _ppo_sweep(results))
    if not findings:
        raise ValueError(
            "results contain none of 'rm_scaling', 'frontier', 'overoptimization' "
            f"(keys: {sorted(results)})"
        )
    return findings


def write_report(results: Mapping[str, Any], output_dir: str | pathlib.Path) -> ReportPaths:
    """Write `report.md`, `results.json` and the PNG figures into `output_dir`."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    findings = compute_findings(results)
    figures: dict[str, pathlib.Path] = {}
    if "rm_scaling" in findings:
        figures["rm_scaling"] = out / RM_FIGURE
        plot_rm_scaling(results["rm_scaling"], figures["rm_scaling"])
    if "frontier" in findings:
        figures["frontier"] = out / FRONTIER_FIGURE
        plot_frontier(results["frontier"], figures["frontier"])
    if "overoptimization" in findings:
        figures["overoptimization"] = out / OVEROPT_FIGURE
        plot_overoptimization(results["overoptimization"], figures["overoptimization"],
                              _ppo_sweep(results))
    results_path = out / "results.json"
    with_findings = dict(results)
    with_findings["findings"] = {
        k: {"reproduced": f.reproduced, "sentences": f.sentences} for k, f in findings.items()
    }
    results_path.write_text(json.dumps(with_findings, indent=2, default=str))
    report_path = out / "report.md"
    report_path.write_text(render_markdown(results, findings))
    return ReportPaths(report_path, results_path, figures)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=pathlib.Path, help="results.json written by a run")
    parser.add_argument("--output-dir", type=pathlib.Path, default=None,
                        help="where to write the report (default: next to RESULTS)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"results file {str(args.results)!r} does not exist")
    results = json.loads(args.results.read_text())
    results.pop("findings", None)
    paths = write_report(results, args.output_dir or args.results.parent)
    print(paths.report)


if __name__ == "__main__":
    main()
