"""Real-shape train steps: SFT, DPO and a PPO iteration at the GPT-2 124M and Qwen2-0.5B shapes,
with the fused LM head or the full `[B, T, V]` logits, one configuration per process.

    python -m rlhf_jax.bench steps [--models gpt2 qwen2-0.5b] [--seq 512 2048]
        [--step sft dpo ppo] [--heads fused unfused] [--chunk 128] [--batch N]
        [--remat dots full] [--attention auto dense blockwise] [--reference model precomputed]
        [--repeats 3] [--warmup 1] [--trl [--trl-threads N]] [--rounds R] [--heap-trim on off]
        [--compile-only]
        [--markdown FILE] [--json FILE]
    python -m rlhf_jax.bench steps --plot-from FILE.json ... [--plot-dir docs/figures]

Shapes (`rlhf_jax.bench._realshape.MODELS`; random weights, nothing downloaded):

- `gpt2`: GPT-2 124M, V 50,257, 12 layers x 768, tied head;
- `qwen2-0.5b`: V 151,936, 24 layers x 896, GQA 14/2, tied head;
- `tiny-gpt2`, `tiny-qwen2`: smoke-test sizes on the same code paths.

Each row is measured in its own `python -m rlhf_jax.bench steps --worker ...` process: build,
compile (`jit(...).lower(...).compile()`, timed: "compile s"), `--warmup` untimed steps, then
`--repeats` timed steps (median; "best" is the least disturbed step on a shared machine).
`--rounds R` measures every row R times in turn, so that ours and TRL alternate (A B A B)
under the same conditions. Columns:

- CPU s/step: the worker's CPU seconds (user + system, every thread) per step, and
  tokens/CPU s: on a shared host the steadier time figure (a descheduled thread spends none);
- tokens/s: tokens of the batch (`T` x rows) per second of the median step; a PPO iteration's
  tokens/s divides the `B x T` rollout tokens by rollout + scoring + update;
- MFU: model FLOPs per second (`rlhf_jax.bench._realshape.forward_flops`: `2 W + 4 L T (H D)`
  per token forward, less the LM head's `2 E V` on the tokens the loss does not score (the
  prompts: the head runs on the loss tokens only), x3 for forward + backward, plus one forward
  of the reference for DPO; the fused head's recomputed logits are not counted) over the
  measured fp32 matmul peak
  (`rlhf_jax.bench.measure_matmul_peak`, best of three); a PPO row's MFU is its update's;
  "MFU (CPU s)" divides the model FLOPs per CPU second by the matmul's FLOPs per CPU second
  (`measure_matmul_peak_per_cpu_second`), which holds on a shared host where the wall MFU
  does not;
- peak RSS: the worker's resident-set high-water mark (`ru_maxrss`): model, optimizer state,
  compiler and the step itself. After compiling, the worker hands the memory the compiler freed
  back to the kernel (`rlhf_jax.host_memory.release_freed_memory`, as the train loop does after
  its first step); `--heap-trim off` leaves it in the process ("no heap trim"), `--heap-trim on
  off` measures both, each in its own process;
- step GiB: XLA's buffer assignment of the compiled step (arguments + outputs + temporaries -
  donated aliases), the memory the step needs on a device whatever the allocator; "device
  peak" is the backend's `peak_bytes_in_use` where it reports one (GPU, TPU).

With `--trl`, TRL's `DPOTrainer` (fp32, CPU; `rlhf_jax.bench.offline.bench_trl`) runs the same
DPO shape in its own process too (needs `pip install torch==2.13.0 trl`; the row is left out
without them); `--trl-threads` fixes its torch thread count (default: the faster of 1 and all,
each tried in the same process). TRL's process gets `OMP_WAIT_POLICY=PASSIVE` unless the
environment sets it (`TRL_ENV`): torch's OpenMP threads otherwise spin at their barriers, and
on a loaded host a spinning thread whose sibling was descheduled burns CPU seconds that are the
host's load, not TRL's work. With `--reference precomputed` our step takes precomputed
reference log-probs (no reference model in memory) and TRL runs with
`precompute_ref_log_probs=True` and no `ref_model` (likewise). A last table gives ours over TRL
per round: tokens/s, tokens per CPU second and the peak-RSS ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

from rlhf_jax.bench._machine import (
    machine_description,
    measure_matmul_peak,
    measure_matmul_peak_per_cpu_second,
)
from rlhf_jax.bench._realshape import (
    MODELS,
    RESULT_PREFIX,
    STEPS,
    Case,
    gib,
    run_isolated,
    worker_main,
)

DEFAULT_BATCH = {"sft": 8, "dpo": 4, "ppo": 8}
"""Rows (SFT), pairs (DPO: twice as many rows) and prompts (PPO) per step."""

TRL_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Environment defaults of TRL's process (the environment's own values win)."""


def cases(models, seqs, steps, heads, *, chunk: int, batch: int | None,
          remats=("dots",), attentions=("auto",), references=("model",)) -> list[Case]:
    """Every combination of the arguments as a `Case`; a reference other than `"model"`
    applies to DPO only (SFT and PPO rows are built once, with the default)."""
    out = []
    for model in models:
        for seq in seqs:
            for step in steps:
                for head in heads:
                    for remat in remats:
                        for attention in attentions:
                            for reference in (references if step == "dpo" else ("model",)):
                                out.append(Case(model=model, step=step, seq=seq,
                                                batch=batch or DEFAULT_BATCH[step],
                                                chunk=0 if head == "unfused" else chunk,
                                                remat=remat, attention=attention,
                                                reference=reference))
    return list(dict.fromkeys(out))


def trl_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of TRL's process: `environ` (default `os.environ`) over `TRL_ENV`."""
    return {**TRL_ENV, **(os.environ if environ is None else environ)}


def trl_row(case: Case, *, flops: float | None, repeats: int, warmup: int,
            timeout: float | None, threads: int | None = None) -> dict | None:
    """TRL's DPOTrainer at `case`'s DPO shape in its own process, or None without TRL (its MFU
    counts the same model `flops` per step as ours)."""
    config = case.model_config()
    if config.arch != "gpt2":
        return None  # TRL drives a transformers GPT-2 here; other families are not wired
    shape = {"name": case.model, "pairs": case.batch, "prompt": case.seq // 2,
             "response": case.seq // 2, "layers": config.num_layers,
             "width": config.hidden_size, "heads": config.num_heads,
             "vocab": config.vocab_size}
    if case.reference == "precomputed":
        shape["precompute_ref"] = True
    elif case.reference != "model":
        return None  # TRL's side of a LoRA-base reference is not wired
    cmd = [sys.executable, "-m", "rlhf_jax.bench", "offline", "--trl-worker", json.dumps(shape),
           "--steps", str(repeats), "--warmup", str(warmup)]
    if threads:
        cmd += ["--trl-threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=trl_env())
    except subprocess.TimeoutExpired:
        return {"case": dataclasses.asdict(case), "head": "TRL", "error": "timed out"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            row = json.loads(line[len(RESULT_PREFIX):])
            if row is None:
                return None
            ref = ", precomputed reference" if case.reference == "precomputed" else ""
            row.update(case=dataclasses.asdict(case),
                       head=f"TRL DPOTrainer (torch fp32, {row.pop('torch_threads')} threads"
                            f"{ref})")
            if flops:
                row["flops"] = flops
                row["flops_per_s"] = flops / row["seconds"]
            return row
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"case": dataclasses.asdict(case), "head": "TRL", "error": tail}


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def to_markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    peak = info["peak_flops"]
    cpu_peak = info.get("peak_flops_per_cpu_s")
    lines = [f"Machine: {info['machine']}; measured fp32 matmul peak "
             f"{peak / 1e9:.1f} GFLOP/s (wall), "
             f"{_fmt(cpu_peak and cpu_peak / 1e9, '.1f')} GFLOP per CPU second; "
             f"load average {_fmt(info.get('load_average'), '.1f')} at the start.", ""]
    offline = [r for r in rows if r["case"]["step"] != "ppo"]
    online = [r for r in rows if r["case"]["step"] == "ppo"]
    if offline:
        lines += ["| model | step | T | rows | head | s/step (median) | s/step (best) | "
                  "CPU s/step | tokens/s | tokens/CPU s | MFU | MFU (CPU s) | compile s | peak RSS GiB | "
                  "step GiB | device peak GiB | load |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in offline:
            c = r["case"]
            rows_ = c["batch"] * (2 if c["step"] == "dpo" else 1)
            head = f"| {c['model']} | {c['step']} | {c['seq']} | {rows_} | {_label(r)} |"
            if "error" in r:
                lines.append(head + f" failed: {r['error']} |" + " |" * 11)
                continue
            mfu = r["flops_per_s"] / peak if "flops_per_s" in r else None
            lines.append(
                head + f" {_fmt(r.get('seconds'), '.3g')} | {_fmt(r.get('best_seconds'), '.3g')}"
                f" | {_fmt(r.get('cpu_seconds'), '.3g')}"
                f" | {_fmt(r.get('tokens_per_s'), '.0f')} | "
                f"{_fmt(r.get('tokens_per_cpu_s'), '.0f')} | "
                f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"{_pct(_cpu_mfu(r, cpu_peak))} | "
                f"{_fmt(r.get('compile_s'), '.1f')} | {gib(r.get('peak_rss'))} | "
                f"{gib(r.get('memory', {}).get('total'))} | {gib(r.get('device_peak'))} | "
                f"{_fmt(r.get('load_average'), '.1f')} |")
    if online:
        lines += ["", "| model | T (P + N) | prompts | head | rollout s | scoring s | update s | "
                  "iteration s | iteration CPU s (rollout / scoring / update) | "
                  "tokens/s (iteration) | sampled tokens/s | update MFU | "
                  "compile s | peak RSS GiB | update step GiB | device peak GiB |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in online:
            c = r["case"]
            head = f"| {c['model']} | {c['seq']} | {c['batch']} | {_label(r)} |"
            if "error" in r:
                lines.append(head + f" failed: {r['error']} |" + " |" * 11)
                continue
            mfu = r["flops_per_s"] / peak if "flops_per_s" in r else None
            cpu = ("" if r.get("iteration_cpu_s") is None else
                   f"{r['iteration_cpu_s']:.3g} ({r['rollout_cpu_s']:.3g} / "
                   f"{r['scoring_cpu_s']:.3g} / {r['update_cpu_s']:.3g})")
            lines.append(
                head + f" {_fmt(r.get('rollout_s'), '.3g')} | {_fmt(r.get('scoring_s'), '.3g')}"
                f" | {_fmt(r.get('update_s'), '.3g')} | {_fmt(r.get('iteration_s'), '.3g')} | "
                f"{cpu} | "
                f"{_fmt(r.get('iteration_tokens_per_s'), '.0f')} | "
                f"{_fmt(r.get('sampled_tokens_per_s'), '.0f')} | "
                f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"{_fmt(r.get('compile_s'), '.1f')} | {gib(r.get('peak_rss'))} | "
                f"{gib(r.get('memory', {}).get('total'))} | {gib(r.get('device_peak'))} |")
    lines += _trl_ratios(rows)
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _cpu_mfu(row: dict, cpu_peak: float | None) -> float | None:
    """Model FLOPs per CPU second of the step over the matmul's FLOPs per CPU second."""
    if not cpu_peak or not row.get("cpu_seconds") or not row.get("flops"):
        return None
    return row["flops"] / row["cpu_seconds"] / cpu_peak


def _label(row: dict) -> str:
    remat = row["case"].get("remat", "dots")
    ours = not row["head"].startswith("TRL")
    reference = row["case"].get("reference", "model")
    return (row["head"] + ("" if remat == "dots" or not ours else f", remat {remat}")
            + (f", {reference} reference" if ours and reference != "model" else "")
            + (", no heap trim" if ours and row.get("heap_trim") is False else "")
            + (f" (round {row['round']})" if row.get("round") else ""))


def _trl_key(row: dict[str, Any]) -> tuple:
    c = row["case"]
    return (c["model"], c["seq"], c["batch"], c.get("reference", "model"), row.get("round"))


def _trl_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Ours (each fused DPO row) over TRL's row of the same shape, reference and round: wall and
    CPU-second throughput, and peak RSS. TRL runs once per shape, reference and round, right
    after the first of our rows it is compared with (A B A B across rounds)."""
    trl = {_trl_key(r): r for r in rows
           if r["head"].startswith("TRL") and "error" not in r and "seconds" in r}
    out = []
    for ours in rows:
        c = ours["case"]
        if (ours["head"].startswith("TRL") or "error" in ours or "seconds" not in ours
                or c["step"] != "dpo" or c["chunk"] == 0):
            continue
        r = trl.get(_trl_key(ours))
        if r is None:
            continue
        label = _label({**ours, "round": None})
        out.append(f"| {c['model']} | {c['seq']} | {c['batch'] * 2} | {r.get('round') or ''} | "
                   f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x | "
                   f"{ours['tokens_per_cpu_s'] / r['tokens_per_cpu_s']:.2f}x | "
                   f"{ours['peak_rss'] / r['peak_rss']:.2f} | {label} |")
    if not out:
        return []
    return ["", "| model | T | rows | round | tokens/s ours / TRL | tokens per CPU s ours / TRL "
            "| peak RSS ours / TRL | ours |", "|---|---:|---:|---:|---:|---:|---:|---|", *out]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.bench steps",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "qwen2-0.5b"],
                        choices=sorted(MODELS))
    parser.add_argument("--seq", nargs="+", type=int, default=[512, 2048],
                        help="tokens per row (prompt T/2 + response T/2 for DPO and PPO)")
    parser.add_argument("--step", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--heads", nargs="+", default=["fused", "unfused"],
                        choices=["fused", "unfused"])
    parser.add_argument("--chunk", type=int, default=128, help="fused head: positions per chunk")
    parser.add_argument("--remat", nargs="+", default=["dots"],
                        help="ModelConfig.remat policies, one row each")
    parser.add_argument("--attention", nargs="+", default=["auto"],
                        choices=["auto", "dense", "blockwise"],
                        help="ModelConfig.attention_impl, one row each")
    parser.add_argument("--reference", nargs="+", default=["model"],
                        choices=["model", "precomputed"],
                        help="DPO reference: a second model in the step, or precomputed "
                             "log-probs (TRL: precompute_ref_log_probs); one row each")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"rows / pairs / prompts per step (default {DEFAULT_BATCH})")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    parser.add_argument("--trl", action="store_true",
                        help="add TRL's DPOTrainer at each GPT-2 DPO shape (torch + trl)")
    parser.add_argument("--trl-threads", type=int, default=None,
                        help="torch threads for TRL (default: the faster of 1 and all)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every row this many times, in turn (A B A B on a shared "
                             "host: ours and TRL alternate)")
    parser.add_argument("--heap-trim", nargs="+", default=["on"], choices=["on", "off"],
                        help="hand the compiler's freed memory back to the kernel after "
                             "compiling (on, as the train loop does) or not (off); both: "
                             "each row twice, each in its own process")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile and report memory, no timed steps")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per row")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--json", help="also write the raw rows to this file")
    parser.add_argument("--plot-from", nargs="+", metavar="JSON",
                        help="only draw the step-time and memory plots against T from these "
                             "--json files (no measurement)")
    parser.add_argument("--plot-dir", default="docs/figures", help="where --plot-from writes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-heap-trim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, steps=args.steps if args.steps is not None else args.repeats,
                    warmup=args.warmup, run=not args.compile_only,
                    heap_trim=not args.no_heap_trim)
        return
    if args.plot_from:
        # Imported here, not at the top: matplotlib would add ~26 MiB to every worker's peak
        # RSS, which this benchmark measures.
        from rlhf_jax.bench import _plot

        for path in _plot.plot(_plot.load_rows(args.plot_from), args.plot_dir):
            print(path)
        return
    peak = max(measure_matmul_peak(repeats=10) for _ in range(3))
    info = {"machine": machine_description(), "peak_flops": peak,
            "peak_flops_per_cpu_s": measure_matmul_peak_per_cpu_second(),
            "load_average": os.getloadavg()[0]}
    rows = []
    for round_ in range(1, args.rounds + 1):
        trl_done = set()
        for case in cases(args.models, args.seq, args.step, args.heads, chunk=args.chunk,
                          batch=args.batch, remats=args.remat, attentions=args.attention,
                          references=args.reference):
            for trim in args.heap_trim:
                row = run_isolated("steps", case, steps=args.repeats, warmup=args.warmup,
                                   run=not args.compile_only, timeout=args.timeout,
                                   heap_trim=trim == "on")
                rows.append(row | ({"round": round_} if args.rounds > 1 else {}))
                print(json.dumps({k: row.get(k) for k in ("head", "seconds", "cpu_seconds",
                                                          "tokens_per_s", "compile_s",
                                                          "peak_rss", "heap_trim", "error")}
                                 | {"case": row["case"]}), flush=True)
            key = _trl_key(row | {"round": round_ if args.rounds > 1 else None})
            if (args.trl and case.step == "dpo" and case.chunk != 0 and not args.compile_only
                    and key not in trl_done):
                trl_done.add(key)
                trl = trl_row(case, flops=row.get("flops"), repeats=args.repeats,
                              warmup=args.warmup, timeout=args.timeout, threads=args.trl_threads)
                if trl is not None:
                    rows.append(trl | ({"round": round_} if args.rounds > 1 else {}))
                    print(json.dumps({k: trl.get(k) for k in ("head", "seconds", "cpu_seconds",
                                                              "peak_rss", "error")}), flush=True)
    table = to_markdown(rows, info)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()


__all__ = ["DEFAULT_BATCH", "TRL_ENV", "cases", "main", "to_markdown", "trl_env", "trl_row"]
