"""Memory levers at the Qwen2-0.5B shape, sequence 1,024: peak memory and step time per lever,
and which set-up fits a full fine-tune in a memory budget (24 GiB by default).

    python -m rlhf_jax.bench memory [--model qwen2-0.5b] [--seq 1024] [--step dpo]
        [--batch 4] [--levers ...] [--budget-gib 24] [--compile-only] [--markdown FILE]

Every row is one configuration in its own process (`rlhf_jax.bench._realshape.run_isolated`)
and changes one lever from the baseline, the step as the trainers run it today (full logits,
`remat="dots"`, a second model as the DPO reference, float32, no accumulation); the last rows
combine levers. Levers:

- `remat`: the per-layer rematerialisation policy (`none`, `dots` (default), `dots_no_batch`,
  `full`);
- `chunk`: the fused LM head (`ModelConfig.logits_chunk_size`, positions per chunk; `0` is the
  unfused head through `[B, T, V]` float32 logits);
- `precomputed`: DPO reference log-probs computed beforehand (no reference model in the step);
- `lora`: rank-16 adapters on every projection, the reference being the base model (adapters
  off), so neither a second copy of the weights nor AdamW moments of the base;
- `accum`: gradient accumulation over 2 or 4 micro-batches (same batch per optimizer step);
- `freeze`: the bottom half of the layers frozen (`model.freeze_layers`: no AdamW moments for
  those rows; their gradients are still computed);
- `bf16`: bfloat16 parameters and compute (AdamW moments follow the parameters' dtype);
- `blockwise attention`: `ModelConfig.attention_impl="blockwise"` (no `[rows, H, T, T]`
  scores kept for the backward pass); the baseline and the other levers use the dense one.

Columns: "step GiB" is XLA's buffer assignment of the compiled step (arguments: parameters,
optimizer state, reference, batch; plus outputs and temporaries, minus donated aliases), the
device memory the step needs whatever the allocator, and it is what decides "fits"; "peak RSS"
is the worker process's high-water mark on the host (everything above plus the compiler and
the runtime; measured only when the step runs). `--compile-only` skips the timed steps (the
memory columns stay exact).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rlhf_jax.bench._machine import machine_description
from rlhf_jax.bench._realshape import MODELS, Case, gib, run_isolated, worker_main

LEVERS: dict[str, dict[str, Any]] = {
    "baseline (unfused head, remat dots, reference model, fp32)": {},
    "remat none": {"remat": "none"},
    "remat dots_no_batch": {"remat": "dots_no_batch"},
    "remat full": {"remat": "full"},
    "fused head, chunk 64": {"chunk": 64},
    "fused head, chunk 128": {"chunk": 128},
    "fused head, chunk 256": {"chunk": 256},
    "fused head, chunk 512": {"chunk": 512},
    "precomputed reference": {"reference": "precomputed"},
    "LoRA r16 (reference = base)": {"lora_rank": 16, "reference": "lora_base"},
    "grad accumulation 2": {"grad_accum": 2},
    "grad accumulation 4": {"grad_accum": 4},
    "bf16 parameters and compute": {"param_dtype": "bfloat16", "dtype": "bfloat16"},
    "freeze bottom 12 layers": {"freeze_layers": 12},
    "fused 128 + remat full + precomputed": {"chunk": 128, "remat": "full",
                                             "reference": "precomputed"},
    "fused 128 + remat full + precomputed + accum 4": {"chunk": 128, "remat": "full",
                                                       "reference": "precomputed",
                                                       "grad_accum": 4},
    "fused 128 + remat full + precomputed + freeze 12": {"chunk": 128, "remat": "full",
                                                         "reference": "precomputed",
                                                         "freeze_layers": 12},
    "fused 128 + remat full + reference model + bf16": {"chunk": 128, "remat": "full",
                                                        "param_dtype": "bfloat16",
                                                        "dtype": "bfloat16"},
    "blockwise attention": {"attention": "blockwise"},
    "fused 128 + blockwise attention": {"chunk": 128, "attention": "blockwise"},
    "fused 128 + blockwise attention + precomputed": {"chunk": 128, "attention": "blockwise",
                                                      "reference": "precomputed"},
}
"""Row label -> `Case` fields changed from the baseline."""

BASELINE = {"chunk": 0, "remat": "dots", "reference": "model", "attention": "dense"}


def lever_cases(model: str, step: str, seq: int, batch: int, levers: list[str]
                ) -> list[tuple[str, Case]]:
    out = []
    for label in levers:
        fields = {**BASELINE, **LEVERS[label]}
        if step != "dpo":
            if "reference" in LEVERS[label] and not fields.get("lora_rank"):
                continue  # a reference lever means nothing without a reference
            fields["reference"] = "model"
            if fields.get("lora_rank"):
                fields["reference"] = "lora_base"
        out.append((label, Case(model=model, step=step, seq=seq, batch=batch, **fields)))
    return out


def to_markdown(rows: list[tuple[str, dict]], info: dict, *, budget_gib: float) -> str:
    lines = [f"Machine: {info['machine']}. {info['what']}", "",
             f"| lever | head | step GiB | fits {budget_gib:g} GiB | peak RSS GiB | "
             "s/step (median) | CPU s/step | tokens/s | tokens/CPU s | compile s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    budget = budget_gib * 2**30
    for label, r in rows:
        if "error" in r:
            lines.append(f"| {label} | {r['head']} | failed: {r['error']} | | | | | | | |")
            continue
        total = r["memory"]["total"]
        seconds = r.get("seconds")
        tokens_s = "" if seconds is None else f"{r['tokens_per_s']:.0f}"
        cpu = r.get("cpu_seconds")
        tokens_cpu = "" if cpu is None else f"{r['tokens_per_cpu_s']:.0f}"
        lines.append(
            f"| {label} | {r['head']} | {gib(total)} | {'yes' if total <= budget else 'no'} | "
            f"{gib(r.get('peak_rss')) if seconds is not None else ''} | "
            f"{'' if seconds is None else f'{seconds:.3g}'} | "
            f"{'' if cpu is None else f'{cpu:.3g}'} | {tokens_s} | "
            f"{tokens_cpu} | "
            f"{r['compile_s']:.1f} |")
    fitting = [(r["memory"]["total"], label) for label, r in rows
               if "error" not in r and r["memory"]["total"] <= budget
               and not r["case"]["lora_rank"]]
    if fitting:
        lines += ["", f"Full fine-tunes (no LoRA) whose step fits {budget_gib:g} GiB: "
                  + "; ".join(f"{label} ({gib(total)} GiB)" for total, label in sorted(fitting))
                  + "."]
    else:
        lines += ["", f"No full fine-tune set-up measured here fits {budget_gib:g} GiB."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.bench memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2-0.5b", choices=sorted(MODELS))
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--step", default="dpo", choices=["sft", "dpo"])
    parser.add_argument("--batch", type=int, default=4,
                        help="pairs (DPO: twice as many rows) or rows (SFT) per optimizer step")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS),
                        metavar="LEVER", help=f"rows to measure, of: {list(LEVERS)}")
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile-only", action="store_true",
                        help="memory columns only (no timed steps, no RSS)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per row")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--json", help="also write the raw rows to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-heap-trim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, steps=args.steps if args.steps is not None else args.repeats,
                    warmup=args.warmup, run=not args.compile_only,
                    heap_trim=not args.no_heap_trim)
        return
    rows = []
    for label, case in lever_cases(args.model, args.step, args.seq, args.batch, args.levers):
        row = run_isolated("memory", case, steps=args.repeats, warmup=args.warmup,
                           run=not args.compile_only, timeout=args.timeout)
        rows.append((label, row))
        print(json.dumps({"lever": label, "step_gib": gib(row.get("memory", {}).get("total")),
                          "seconds": row.get("seconds"), "error": row.get("error")}), flush=True)
    rows_ = args.batch * (2 if args.step == "dpo" else 1)
    info = {"machine": machine_description(),
            "what": f"{args.step.upper()} at {args.model}, T = {args.seq}, {rows_} rows per "
                    f"optimizer step (AdamW)."}
    table = to_markdown(rows, info, budget_gib=args.budget_gib)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": [{"lever": label, **row} for label, row in rows]},
                      f, indent=1)


if __name__ == "__main__":
    main()


__all__ = ["BASELINE", "LEVERS", "lever_cases", "main", "to_markdown"]
