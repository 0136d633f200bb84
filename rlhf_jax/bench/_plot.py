"""Plots of the real-shape steps against sequence length, from the rows that `python -m
rlhf_jax.bench steps --json FILE` writes (`python -m rlhf_jax.bench steps --plot-from FILE...
--plot-dir DIR`).

Two small PNGs, one line per (model, step, head):

- `steps_time_vs_seq.png`: process CPU seconds per 1,000 trained tokens (the steadier time
  figure on a shared host) and wall seconds per 1,000 tokens;
- `steps_memory_vs_seq.png`: XLA's step buffers (GiB) and the worker's peak RSS (GiB).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the non-interactive backend)

GIB = 2**30


def load_rows(paths: list[str]) -> list[dict[str, Any]]:
    """The successful, timed rows of our steps (not TRL's) in the `--json` files at `paths`."""
    rows = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows += [r for r in data["rows"] if "error" not in r and "seconds" in r
                 and not r["head"].startswith("TRL")]
    return rows


def series(rows: list[dict[str, Any]], key) -> dict[str, list[tuple[int, float]]]:
    """`{"model step head": [(T, key(row)), ...]}` sorted by T (a remat policy other than
    `dots` and a reference other than a model are named in the label); rows measured more than
    once at a T (rounds) keep the least value."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        c = r["case"]
        value = key(r)
        if value is None:
            continue
        label = f"{c['model']} {c['step']} {r['head']}"
        if c.get("remat", "dots") != "dots":
            label += f", remat {c['remat']}"
        if c.get("reference", "model") != "model":
            label += f", {c['reference']} reference"
        seq = int(c["seq"])
        out[label][seq] = min(value, out[label].get(seq, float("inf")))
    return {label: sorted(points.items()) for label, points in sorted(out.items())}


def _per_k_tokens(field: str):
    def value(r):
        x = r.get(field)
        return None if x is None else 1000.0 * x / r["tokens"]
    return value


def _panel(ax, data, *, title: str, ylabel: str) -> None:
    for label, points in data.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)


def plot(rows: list[dict[str, Any]], out_dir: str) -> list[Path]:
    """Writes the two PNGs under `out_dir` and returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        ("steps_time_vs_seq.png",
         (series(rows, _per_k_tokens("cpu_seconds")), "CPU seconds per 1k tokens",
          "CPU s / 1k tokens"),
         (series(rows, _per_k_tokens("seconds")), "wall seconds per 1k tokens (shared host)",
          "s / 1k tokens")),
        ("steps_memory_vs_seq.png",
         (series(rows, lambda r: r["memory"]["total"] / GIB), "XLA step buffers", "GiB"),
         (series(rows, lambda r: r.get("peak_rss") and r["peak_rss"] / GIB),
          "worker peak RSS", "GiB")),
    ]
    paths = []
    for name, *panels in figures:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
        for ax, (data, title, ylabel) in zip(axes, panels, strict=True):
            _panel(ax, data, title=title, ylabel=ylabel)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.16, 1, 1))
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
