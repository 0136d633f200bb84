"""DPO side by side with Tunix (`google-tunix`, an optional peer: `pip install
google-tunix==0.1.7`) on the same Qwen2-shaped weights, each configuration in its own process.

    python -m rlhf_jax.bench tunix [--model qwen2-0.5b] [--seq 512] [--pairs 4]
        [--remat none decoder] [--keep-gib 1] [--rounds 1] [--repeats 3] [--warmup 1]
        [--markdown FILE]

The weights: our random `CausalLM` is written with `rlhf_jax.models.save_pretrained` (Hugging
Face Qwen2 layout, safetensors) and Tunix loads the same files with
`tunix.models.qwen2.params.create_model_from_safe_tensors`, twice (policy and reference); the
row states both parameter counts, which must be equal. The batch: `pairs` pairs of a `T/2`-token
prompt and `T/2`-token chosen / rejected responses (`tunix.sft.dpo.dpo_trainer.TrainingInput`), random tokens.

The graphs differ, and the rows say how:

- Tunix runs the reference forward every step, in a separate jitted call before the train step
  (`DPOTrainer._prepare_inputs`), materialising `[2P, T, V]` logits there and in the policy's
  loss, and builds a `[2P, T, T]` attention mask; its Qwen2 defaults to no remat
  (`RematConfig.NONE`) and runs the layers as a Python loop (unrolled, no `scan`).
- Ours (`rlhf_jax.bench._realshape`, `step="dpo"`, reference model in the step) runs the
  reference inside the one jitted step, `scan`s the layers with `remat="dots"` and scores with
  the fused head.
- The like-for-like rows: Tunix with `RematConfig.DECODER` (each decoder layer
  rematerialised; its `BLOCK` remats the attention only) against ours with `remat="full"`
  (each layer rematerialised), both heads of ours. `--remat` picks the Tunix configurations
  (each followed by our rows beside it, `OURS_LIKE`: `dots` and `none` beside `none`, `full`
  beside `decoder`).
- Our head in those rows: fused over chunks of 128 positions (the default), unfused (the full
  logits), or fused with the logits kept for the backward pass (`ModelConfig.
  logits_keep_bytes` = `--keep-gib`: one head product per token less, for the unfused
  head's memory). Every row of ours scores the loss tokens only, as `DPOTrainer` does
  (`where=loss_mask`: the fused head skips the prompt's chunks), which is what Tunix's
  `logits_to_keep` asks for; Tunix's graph still runs its head on every position (XLA does not
  push the slice of the logits into the matmul). One more row beside `none` keeps the logits
  of the response columns only (`token_logps(start=T/2)`, a static slice: one chunk of half
  the positions).
- `--rounds R` runs the whole list R times in turn (A B A B), so that both sides see the same
  load.

Tunix's step time is the wall time of its `train()` loop over the timed steps (it keeps up to
two steps in flight), divided by their number, after `--warmup` untimed steps (compilation
included there).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.bench._machine import machine_description
from rlhf_jax.bench._realshape import (
    MODELS,
    RESULT_PREFIX,
    Case,
    gib,
    peak_rss_bytes,
    process_cpu_seconds,
    run_isolated,
)
from rlhf_jax.models import CausalLM, save_pretrained

QWEN2_MODELS = [name for name in MODELS if "qwen2" in name]
"""The `MODELS` keys Tunix's Qwen2 can load."""


def tunix_mesh():
    """The 1 x 1 ("fsdp", "tp") mesh on the first device that the Tunix models are loaded on
    (Tunix's Qwen2 shards by those axis names). One device, as our side of each comparison
    runs; splitting "tp" over several would also need the KV heads (2 in Qwen2-0.5B) to
    divide by their count."""
    return jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def tunix_qwen2_copies(config, *, remat: str, mesh, copies: int) -> tuple[list, dict]:
    """`copies` Tunix Qwen2 models holding the weights of our `CausalLM(config,
    rngs=nnx.Rngs(0))` (written with `save_pretrained`, read by Tunix's
    `create_model_from_safe_tensors`), with Tunix's `RematConfig` named `remat`, and the check
    that they are the same model: `{"params": Tunix's parameter count, "our_params": ours,
    "max_logit_diff": max |logits| difference on a 16-token probe row}`. Needs Tunix (the
    caller imports it first)."""
    from tunix.models.qwen2 import model as tunix_qwen2  # optional peer, imported by the caller
    from tunix.models.qwen2 import params as tunix_params

    if config.arch != "qwen2":
        raise SystemExit(f"the Tunix comparison needs a Qwen2-family model, got {config.arch}")
    ours = CausalLM(config, rngs=nnx.Rngs(0))
    probe = jnp.asarray(np.random.default_rng(1).integers(3, config.vocab_size, size=(1, 16)),
                        jnp.int32)
    our_logits = np.asarray(ours(probe))
    ours_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    tunix_config = tunix_qwen2.ModelConfig(
        num_layers=config.num_layers, vocab_size=config.vocab_size,
        embed_dim=config.hidden_size, hidden_dim=config.intermediate_size,
        num_heads=config.num_heads, head_dim=config.resolved_head_dim,
        num_kv_heads=config.num_kv_heads, rope_theta=int(config.rope_theta),
        norm_eps=config.norm_eps, use_tied_embedding=config.tie_word_embeddings,
        remat_config=getattr(tunix_qwen2.RematConfig, remat.upper()))
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        del ours
        with mesh:
            models = [tunix_params.create_model_from_safe_tensors(tmp, tunix_config, mesh)
                      for _ in range(copies)]
    tunix_count = sum(int(np.prod(x.shape))
                      for x in jax.tree.leaves(nnx.state(models[0], nnx.Param)))
    # Same weights: Tunix's logits on a probe row equal ours (float32 rounding).
    positions = jnp.arange(16, dtype=jnp.int32)[None]
    causal = jnp.tril(jnp.ones((1, 16, 16), bool))
    with mesh:
        tunix_logits = np.asarray(models[0](probe, positions, None, causal)[0])
    return models, {"params": tunix_count, "our_params": ours_count,
                    "max_logit_diff": float(np.max(np.abs(tunix_logits - our_logits)))}


def tunix_worker(spec_json: str, *, steps: int, warmup: int) -> None:
    """Child process: times Tunix's DPOTrainer on `spec` and prints one result row (None
    without Tunix)."""
    spec = json.loads(spec_json)
    try:  # an optional peer, imported only where it is measured
        import optax
        import tunix
        from tunix.sft.dpo.dpo_trainer import TrainingInput
    except ImportError:
        print(RESULT_PREFIX + "null", flush=True)
        return
    case = Case(model=spec["model"], step="dpo", seq=spec["seq"], batch=spec["pairs"])
    config = case.model_config()
    mesh = tunix_mesh()
    (policy, reference), check = tunix_qwen2_copies(config, remat=spec["remat"], mesh=mesh,
                                                    copies=2)
    p, half = spec["pairs"], spec["seq"] // 2
    rng = np.random.default_rng(0)

    def batch():
        ids = lambda: rng.integers(3, config.vocab_size, size=(p, half)).astype(np.int32)  # noqa: E731
        ones = np.ones((p, half), np.int32)
        return TrainingInput(prompt_ids=ids(), prompt_mask=ones, chosen_ids=ids(),
                                   chosen_mask=ones, rejected_ids=ids(), rejected_mask=ones)

    pulls: list[float] = []
    pull_cpu: list[float] = []

    def batches():
        for _ in range(warmup + steps):
            pulls.append(time.perf_counter())
            pull_cpu.append(process_cpu_seconds())
            yield batch()

    trainer = tunix.DPOTrainer(
        model=policy, ref_model=reference, optimizer=optax.adamw(1e-6),
        training_config=tunix.DPOTrainingConfig(eval_every_n_steps=10**9,
                                                max_steps=warmup + steps, beta=0.1,
                                                pbar_description=None))
    with mesh:
        trainer.train(batches())
        jax.block_until_ready(nnx.state(policy))
    end, end_cpu = time.perf_counter(), process_cpu_seconds()
    seconds = (end - pulls[warmup]) / steps
    cpu_seconds = (end_cpu - pull_cpu[warmup]) / steps
    tokens = 2 * p * spec["seq"]
    row = {"seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_seconds": cpu_seconds,
           "tokens_per_cpu_s": tokens / cpu_seconds, **check,
           "warmup_s": pulls[warmup] - pulls[0], "peak_rss": peak_rss_bytes(),
           "load_average": os.getloadavg()[0]}
    print(RESULT_PREFIX + json.dumps(row), flush=True)


def error_line(stderr: str) -> str:
    """The line of a failed child's stderr that names the error: the last one that starts with
    an exception's name (`ValueError: ...`), else the last line."""
    lines = stderr.strip().splitlines() or ["no output"]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", line)]
    return (named or lines)[-1]


def _tunix_row(spec: dict, *, steps: int, warmup: int, timeout: float | None) -> dict | None:
    cmd = [sys.executable, "-m", "rlhf_jax.bench", "tunix", "--worker", json.dumps(spec),
           "--steps", str(steps), "--warmup", str(warmup)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return {"error": f"exit code {proc.returncode}: {error_line(proc.stderr)}"}


def _sci(x) -> str:
    return "" if x is None else f"{x:.1e}"


def to_markdown(rows: list[tuple[str, dict]], info: dict) -> str:
    """The result table: per implementation, wall and CPU seconds per step, tokens per wall and
    per CPU second, peak RSS, the compile figure (ours: the step's `compile_s`; Tunix: the wall
    seconds of its untimed warm-up steps, which compile), the 1-minute load average and the
    logit check."""
    lines = [f"Machine: {info['machine']}. {info['what']}", "",
             "| implementation | graph | parameters | s/step (load) | CPU s/step | tokens/s | "
             "tokens/CPU s | peak RSS GiB | compile s | max logit diff to ours |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows:
        if "error" in r:
            lines.append(f"| {label} | {r.get('graph', '')} | | failed: {r['error']} "
                         "| | | | | | |")
            continue
        cpu = r.get("cpu_seconds")
        load = r.get("load_average")
        compile_s = r.get("compile_s", r.get("warmup_s"))
        lines.append(f"| {label} | {r['graph']} | {r.get('params', '')} | {r['seconds']:.3g}"
                     f"{'' if load is None else f' ({load:.1f})'} | "
                     f"{'' if cpu is None else f'{cpu:.3g}'} | {r['tokens_per_s']:.0f} | "
                     f"{'' if cpu is None else format(r['tokens_per_cpu_s'], '.0f')} | "
                     f"{gib(r.get('peak_rss'))} | "
                     f"{'' if compile_s is None else f'{compile_s:.1f}'} | "
                     f"{_sci(r.get('max_logit_diff'))} |")
    return "\n".join(lines) + "\n"


OURS_LIKE = {
    "none": ({"remat": "dots"}, {"remat": "none"}, {"remat": "dots", "keep": True},
             {"remat": "dots", "keep": True, "response_only": True}),
    "decoder": ({"remat": "full"}, {"remat": "full", "chunk": 0},
                {"remat": "full", "keep": True}),
}
"""Our rows run beside each Tunix `RematConfig`: remat, `chunk` (`ModelConfig.
logits_chunk_size`, default 128; 0: unfused head), `keep` (the fused head keeps its logits:
`logits_keep_bytes` = `--keep-gib`) and `response_only` (`Case.response_only`)."""


def our_cases(remat: str, *, model: str, seq: int, pairs: int, keep_bytes: int) -> list[Case]:
    """Our `Case`s run beside Tunix's `RematConfig` `remat` (`OURS_LIKE`)."""
    return [Case(model=model, step="dpo", seq=seq, batch=pairs, remat=o["remat"],
                 chunk=o.get("chunk", 128), keep_bytes=keep_bytes if o.get("keep") else 0,
                 response_only=o.get("response_only", False))
            for o in OURS_LIKE[remat]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.bench tunix",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2-0.5b", choices=QWEN2_MODELS)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--remat", nargs="+", default=["none", "decoder"],
                        choices=list(OURS_LIKE),
                        help="Tunix RematConfig(s) to run, each followed by our like-for-like "
                             "row(s): remat dots and none (fused head) beside none, remat full "
                             "(fused and unfused heads) beside decoder")
    parser.add_argument("--keep-gib", type=float, default=1.0,
                        help="ModelConfig.logits_keep_bytes of our kept-logits rows, in GiB")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times in turn (A B A B)")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--markdown")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        tunix_worker(args.worker, steps=args.steps, warmup=args.warmup)
        return
    rows: list[tuple[str, dict[str, Any]]] = []
    keep_bytes = int(args.keep_gib * 2**30)
    for round_ in range(1, args.rounds + 1):
        suffix = f", round {round_}" if args.rounds > 1 else ""
        for remat in args.remat:
            spec = {"model": args.model, "seq": args.seq, "pairs": args.pairs, "remat": remat}
            row = _tunix_row(spec, steps=args.repeats, warmup=args.warmup,
                             timeout=args.timeout)
            if row is None:
                print("Tunix is not installed (pip install google-tunix==0.1.7); no Tunix rows.")
            else:
                row["graph"] = (f"reference recomputed in a separate call, layers unrolled, "
                                f"remat {remat}, full logits")
                rows.append((f"Tunix DPOTrainer (remat {remat}{suffix})", row))
                print(json.dumps({"row": rows[-1][0], "seconds": row.get("seconds"),
                                  "cpu_seconds": row.get("cpu_seconds"),
                                  "error": row.get("error")}), flush=True)
            for case in our_cases(remat, model=args.model, seq=args.seq, pairs=args.pairs,
                                  keep_bytes=keep_bytes):
                row = run_isolated("steps", case, steps=args.repeats, warmup=args.warmup,
                                   timeout=args.timeout)
                row["graph"] = (f"reference in the step, layers scanned, remat {case.remat}, "
                                f"{'unfused head' if case.chunk == 0 else 'fused head'} "
                                f"({case.head})")
                rows.append((f"rlhf_jax ({case.head}, remat {case.remat}{suffix})", row))
                print(json.dumps({"row": rows[-1][0], "seconds": row.get("seconds"),
                                  "cpu_seconds": row.get("cpu_seconds"),
                                  "error": row.get("error")}), flush=True)
    info = {"machine": machine_description(),
            "what": f"DPO at {args.model}, {args.pairs} pairs of {args.seq} tokens "
                    f"({args.seq // 2} prompt + {args.seq // 2} response), float32, AdamW."}
    table = to_markdown(rows, info)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()


__all__ = ["OURS_LIKE", "error_line", "main", "our_cases", "to_markdown", "tunix_mesh", "tunix_qwen2_copies", "tunix_worker"]
