"""Throughput and model-FLOPs utilisation of the SFT, reward-model and DPO train steps on CPU,
side by side with TRL's DPOTrainer (fp32, PyTorch) when `trl` and `torch` are installed.

    python -m rlhf_jax.bench offline [--shapes tiny small] [--steps 10] [--no-trl]
                                     [--markdown FILE]

Shapes (random GPT-2, vocabulary 512, `P` pairs of prompt + response tokens):

- `tiny`: 4 pairs, 32 + 32 tokens, 2 layers, width 128, 2 heads.
- `small`: 8 pairs, 64 + 64 tokens, 4 layers, width 256, 4 heads.

Every step sees the same rows: DPO `2P` sequences (chosen and rejected in one batch), the reward
model the same `2P`, SFT `2P` sequences; `dpo_prefix_shared` and `rm_prefix_shared` the same
pairs as `P` prefix-shared rows of `prompt + 2 response` tokens (`DataSpec.prefix_sharing`: the
prompt runs once), whose MFU counts the FLOPs they execute and whose tokens/s counts the same
`2P` sequences as `dpo` and `rm`. Figures are the median and the best of `--steps` timed
steps after warm-up (compilation excluded), all in float32; on a shared machine the best step
is the least disturbed one.

Model FLOPs per step (what MFU divides by the measured fp32 matmul peak of
`rlhf_jax.bench.measure_matmul_peak`, best of three), with `N = 12 L d^2` the matmul parameters of the blocks,
`T` the sequence length and `n` the tokens of the batch:

- trained forward + backward: `n (6 (N + d V) + 12 L T d)` (`d V` only for an LM head; the
  reward model's head is negligible);
- a reference forward (DPO with `reference="model"`): `n (2 (N + d V) + 4 L T d)`.

TRL: `trl.DPOTrainer` (`bf16=False`, CPU, `per_device_train_batch_size=P`) on an identical
`transformers` GPT-2 over a dataset of exactly `T`-token rows; a trainer callback times each
optimizer step (`on_step_begin` to `on_step_end`: collation, forward of policy and reference,
backward, AdamW), the same work as our step plus the trainer's per-step overhead. TRL runs with
1 and with all torch intra-op threads and keeps the faster (on a busy shared CPU, torch's
spinning worker threads can make 2 threads many times slower than 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from rlhf_jax.bench._machine import machine_description, measure_matmul_peak
from rlhf_jax.bench._realshape import RESULT_PREFIX


class Shape(NamedTuple):
    name: str
    pairs: int
    prompt: int
    response: int
    layers: int
    width: int
    heads: int
    vocab: int = 512

    @property
    def seq(self) -> int:
        return self.prompt + self.response


SHAPES = {
    "tiny": Shape("tiny", pairs=4, prompt=32, response=32, layers=2, width=128, heads=2),
    "small": Shape("small", pairs=8, prompt=64, response=64, layers=4, width=256, heads=4),
    # GPT-2 124M (V 50,257, 12 x 768) at 256 + 256 tokens: the real-shape DPO row of TRL that
    # `python -m rlhf_jax.bench steps --trl` runs beside ours (each in its own process).
    "gpt2": Shape("gpt2", pairs=4, prompt=256, response=256, layers=12, width=768, heads=12,
                  vocab=50257),
}


def step_flops(shape: Shape, *, lm_head: bool = True, reference_forward: bool = False,
               prefix_shared: bool = False) -> float:
    """Model FLOPs of one step over `2 * pairs` sequences (module docstring), or with
    `prefix_shared` over `pairs` rows of `prompt + 2 * response` tokens."""
    n_tokens = 2 * shape.pairs * shape.seq
    d, layers, t = shape.width, shape.layers, shape.seq
    if prefix_shared:
        t = shape.prompt + 2 * shape.response
        n_tokens = shape.pairs * t
    n = 12 * layers * d * d + (d * shape.vocab if lm_head else 0)
    flops = n_tokens * (6 * n + 12 * layers * t * d)
    if reference_forward:
        flops += n_tokens * (2 * n + 4 * layers * t * d)
    return float(flops)


# The trainers are imported inside the functions that time them, not at the top: the TRL worker
# process (`trl_worker`) imports this module, and its peak RSS is measured without them.


def _model_spec(shape: Shape):
    from rlhf_jax.train.config import ModelSpec

    return ModelSpec(preset="tiny_gpt2", vocab_size=shape.vocab, hidden_size=shape.width,
                     num_layers=shape.layers, num_heads=shape.heads,
                     max_position_embeddings=max(shape.seq, 128))


def _token_rows(rng: np.random.Generator, shape: Shape, n: int) -> dict[str, np.ndarray]:
    t = shape.seq
    ids = rng.integers(3, shape.vocab, size=(n, t)).astype(np.int32)
    ones = np.ones((n, t), np.int32)
    loss = np.zeros((n, t), np.int32)
    loss[:, shape.prompt:] = 1
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": loss,
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy(),
            "segment_ids": ones.copy()}


def _pair_batch(rng, shape: Shape) -> dict[str, np.ndarray]:
    batch = {}
    for prefix in ("chosen_", "rejected_"):
        batch.update({prefix + k: v for k, v in _token_rows(rng, shape, shape.pairs).items()})
    batch["margin"] = np.zeros(shape.pairs, np.float32)
    batch["label"] = np.ones(shape.pairs, np.float32)
    return batch


def _prefix_shared_batch(pair_batch: dict[str, np.ndarray], shape: Shape) -> dict:
    """The pairs of `pair_batch` (with the chosen row's prompt) as prefix-shared rows of exactly
    `prompt + 2 * response` tokens."""
    from rlhf_jax.data import collate_prefix_shared
    from rlhf_jax.data._examples import TokenizedPreference

    p = shape.prompt
    examples = [TokenizedPreference(c[:p], c[p:], r[p:], 0.0, 1.0, "bench")
                for c, r in zip(pair_batch["chosen_input_ids"], pair_batch["rejected_input_ids"])]
    return collate_prefix_shared(examples, pad_id=0, length=p + 2 * shape.response)


def _time_steps(step_fn, state, batch, *, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return _summary(times)


def _summary(times: list[float]) -> tuple[float, float]:
    """`(median, best)` seconds: the median is the headline, the best the least disturbed step
    on a shared machine."""
    return statistics.median(times), min(times)


def bench_rlhf_jax(shape: Shape, *, steps: int) -> dict[str, tuple[float, float]]:
    """`(median, best)` seconds per step of the SFT, RM, DPO (reference model) and DPO
    (precomputed reference) steps."""
    from rlhf_jax.train.builders import build_model, setup_training
    from rlhf_jax.train.config import TrainConfig
    from rlhf_jax.train.dpo import (
        DPOConfig,
        PolicyAndReference,
        make_preference_loss,
        policy_only_filter,
    )
    from rlhf_jax.train.rm import RMConfig, make_rm_loss
    from rlhf_jax.train.sft import make_sft_loss

    spec = _model_spec(shape)
    rng = np.random.default_rng(0)
    config = TrainConfig(model=spec)
    pair_batch = _pair_batch(rng, shape)
    out = {}

    def run(name, model, loss_fn, batch, trainable=None):
        setup = setup_training(config, model, loss_fn, trainable=trainable)
        device_batch = setup.put_batch(batch)
        out[name] = _time_steps(setup.step_fn, setup.state, device_batch, steps=steps)

    run("sft", build_model(spec), make_sft_loss(), _token_rows(rng, shape, 2 * shape.pairs))
    run("rm", build_model(spec, kind="reward"), make_rm_loss(RMConfig()), pair_batch)
    shared_batch = _prefix_shared_batch(pair_batch, shape)
    run("rm_prefix_shared", build_model(spec, kind="reward"), make_rm_loss(RMConfig()),
        shared_batch)
    policy, ref = build_model(spec), build_model(spec)
    both = PolicyAndReference(policy, ref)
    run("dpo", both, make_preference_loss(DPOConfig(), reference="model"), pair_batch,
        trainable=policy_only_filter(both))
    policy, ref = build_model(spec), build_model(spec)
    both = PolicyAndReference(policy, ref)
    run("dpo_prefix_shared", both, make_preference_loss(DPOConfig(), reference="model"),
        shared_batch, trainable=policy_only_filter(both))
    pre = dict(pair_batch)
    pre["ref_chosen_logps"] = rng.normal(size=shape.pairs).astype(np.float32) - 100
    pre["ref_rejected_logps"] = rng.normal(size=shape.pairs).astype(np.float32) - 100
    run("dpo_precomputed", build_model(spec),
        make_preference_loss(DPOConfig(reference="precomputed"), reference="precomputed"), pre)
    return out


def bench_trl_best(shape: Shape, *, steps: int, threads: list[int]
                   ) -> tuple[tuple[float, float], int] | None:
    """TRL timed with each torch intra-op thread count in `threads`; the fastest (by median)
    and its thread count. On a busy shared CPU, torch's spinning worker threads can make 2
    threads far slower than 1, so TRL gets its best setting."""
    best = None
    for n in threads:
        times = bench_trl(shape, steps=steps, threads=n)
        if times is None:
            return None
        if best is None or times[0] < best[0][0]:
            best = (times, n)
    return best


def bench_trl(shape: Shape, *, steps: int, warmup: int = 2, threads: int | None = None,
              cpu_seconds: list[float] | None = None, precompute_ref: bool = False
              ) -> tuple[float, float] | None:
    """`(median, best)` seconds per `trl.DPOTrainer` optimizer step (fp32, CPU), or None
    without trl. Each timed step's process CPU seconds (user + system) are appended to
    `cpu_seconds` when it is given. With `precompute_ref` TRL computes the reference
    log-probs once before training (`precompute_ref_log_probs=True`, no `ref_model`: TRL
    then keeps no reference model in memory, and its steps run no reference forward)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub
    try:  # optional peers (the bench extra), imported only where they are measured
        import torch
        import trl
        from datasets import Dataset
        from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
    except ImportError:
        return None
    import tempfile

    from rlhf_jax.data.synthetic import build_tokenizer

    torch.manual_seed(0)
    if threads is not None:
        torch.set_num_threads(threads)
    tokenizer = build_tokenizer()
    letters = [t for t in tokenizer.get_vocab() if len(t) == 1 and t.isalpha()]
    rng = np.random.default_rng(0)

    def text(n):
        return "".join(rng.choice(letters, size=n))

    # The character tokenizer maps each letter to one token; TRL appends EOS to completions.
    rows = [{"prompt": text(shape.prompt), "chosen": text(shape.response - 1),
             "rejected": text(shape.response - 1)} for _ in range(shape.pairs * (steps + warmup))]
    model_config = GPT2Config(vocab_size=shape.vocab, n_embd=shape.width, n_layer=shape.layers,
                              n_head=shape.heads, n_positions=max(shape.seq, 128),
                              bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(model_config).float()
    ref_model = None
    if not precompute_ref:
        ref_model = GPT2LMHeadModel(model_config).float()
        ref_model.load_state_dict(model.state_dict())
    times: list[float] = []
    cpu: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.start_cpu)

    with tempfile.TemporaryDirectory() as tmp:
        args = trl.DPOConfig(
            output_dir=tmp, per_device_train_batch_size=shape.pairs, max_steps=steps + warmup,
            learning_rate=1e-4, bf16=False, fp16=False, use_cpu=True, report_to="none",
            logging_steps=10_000, save_strategy="no", dataloader_num_workers=0,
            max_length=shape.seq, disable_tqdm=True, seed=0,
            precompute_ref_log_probs=precompute_ref,
        )
        trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[Timer()])
        batch = next(iter(trainer.get_train_dataloader()))
        if batch["input_ids"].shape != (2 * shape.pairs, shape.seq):
            raise RuntimeError(f"TRL batch shape {tuple(batch['input_ids'].shape)} differs from "
                               f"{(2 * shape.pairs, shape.seq)}")
        trainer.train()
    if cpu_seconds is not None:
        cpu_seconds.extend(cpu[warmup:])
    return _summary(times[warmup:])


def trl_worker(shape_json: str, *, steps: int, warmup: int, threads: int | None = None) -> None:
    """Entry point of a child process (`python -m rlhf_jax.bench offline --trl-worker JSON`):
    times TRL at the `Shape` given as JSON (plus an optional `"precompute_ref": true`) and
    prints one result row (None without TRL) with this process's RSS high-water mark, for
    `rlhf_jax.bench.steps --trl`. With `threads` unset it tries 1 and all torch threads and
    keeps the faster; set, it runs that count once."""
    fields = json.loads(shape_json)
    precompute_ref = bool(fields.pop("precompute_ref", False))
    shape = Shape(**fields)
    best = None
    counts = [threads] if threads else sorted({1, os.cpu_count() or 1})
    for n in counts:
        cpu: list[float] = []
        times = bench_trl(shape, steps=steps, warmup=warmup, threads=n, cpu_seconds=cpu,
                          precompute_ref=precompute_ref)
        if times is None:
            print(RESULT_PREFIX + "null", flush=True)
            return
        if best is None or times[0] < best[0][0]:
            best = (times, n, statistics.median(cpu))
    (median, fastest), threads, cpu_median = best
    tokens = 2 * shape.pairs * shape.seq
    row = {"seconds": median, "best_seconds": fastest, "tokens_per_s": tokens / median,
           "cpu_seconds": cpu_median, "tokens_per_cpu_s": tokens / cpu_median,
           "torch_threads": threads, "load_average": os.getloadavg()[0],
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "peak_rss": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
    print(RESULT_PREFIX + json.dumps(row), flush=True)


def run(shapes: list[str], *, steps: int, with_trl: bool) -> tuple[list[dict[str, Any]], dict]:
    # The best of several peak measurements: the machine may be shared.
    peak = max(measure_matmul_peak(repeats=10) for _ in range(3))
    info: dict[str, Any] = {"machine": machine_description(), "peak_flops": peak}
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        ours = bench_rlhf_jax(shape, steps=steps)
        trl_s = None
        if with_trl:
            found = bench_trl_best(shape, steps=steps, threads=sorted({1, os.cpu_count() or 1}))
            if found is not None:
                trl_s, n_threads = found
                info.setdefault("torch_threads", {})[name] = n_threads
        tokens = 2 * shape.pairs * shape.seq
        flops = {
            "sft": step_flops(shape),
            "rm": step_flops(shape, lm_head=False),
            "rm_prefix_shared": step_flops(shape, lm_head=False, prefix_shared=True),
            "dpo": step_flops(shape, reference_forward=True),
            "dpo_prefix_shared": step_flops(shape, reference_forward=True, prefix_shared=True),
            "dpo_precomputed": step_flops(shape),
        }
        def row(step_name, times, step_flops_, name=name, tokens=tokens):
            median, best = times
            return {"shape": name, "step": step_name, "seconds": median, "best_seconds": best,
                    "tokens_per_s": tokens / median, "mfu": step_flops_ / median / peak,
                    "best_mfu": step_flops_ / best / peak}

        for step_name, times in ours.items():
            r = row(step_name, times, flops[step_name])
            if step_name in ("dpo", "dpo_prefix_shared") and trl_s is not None:
                r["speedup_vs_trl"] = trl_s[0] / times[0]
            rows.append(r)
        if trl_s is not None:
            rows.append(row("trl_dpo", trl_s, flops["dpo"]))
    return rows, info


def to_markdown(rows: list[dict[str, Any]], info: dict) -> str:
    lines = [
        f"Machine: {info['machine']}; measured fp32 matmul peak "
        f"{info['peak_flops'] / 1e9:.1f} GFLOP/s"
        + (f"; TRL's fastest torch thread count per shape {info['torch_threads']}"
           if info.get("torch_threads") else ""),
        "",
        "| shape | step | ms/step (median) | ms/step (best) | tokens/s | MFU (median) | "
        "MFU (best) | TRL time / ours |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r['speedup_vs_trl']:.2f}x" if "speedup_vs_trl" in r else ""
        lines.append(f"| {r['shape']} | {r['step']} | {1e3 * r['seconds']:.1f} | "
                     f"{1e3 * r['best_seconds']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{100 * r['mfu']:.1f}% | {100 * r['best_mfu']:.1f}% | {speed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.bench offline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "small"], choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--trl-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker, steps=args.steps, warmup=args.warmup,
                   threads=args.trl_threads)
        return
    rows, info = run(args.shapes, steps=args.steps, with_trl=not args.no_trl)
    table = to_markdown(rows, info)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()


__all__ = ["SHAPES", "Shape", "bench_rlhf_jax", "bench_trl", "bench_trl_best", "main", "run", "step_flops",
           "to_markdown", "trl_worker"]
