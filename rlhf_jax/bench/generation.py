"""Sampling throughput: ``rlhf_jax.generation`` against Hugging Face ``generate`` (torch, CPU).

New tokens per second for 64-token prompts and 128 new tokens, no filter and no early stop, on a
random GPT-2 (vocabulary 512, 4 layers, width 256), a tiny GPT-2 and the GPT-2 124M shape
(``gpt2-124m``: vocabulary 50,257, 12 layers x 768), at batch 1, 8 and 32, sampling at
temperature 1 (``sampled``) and/or greedy (``greedy``). Each call is timed in wall seconds and in
process CPU seconds (user + system of every thread: the steadier figure on a shared host); rows
give medians. Both sides use the same weights: the NNX model is written with ``save_pretrained``
and read back by ``transformers.GPT2LMHeadModel.from_pretrained``; a 16-token greedy run (the
timed greedy run itself in ``greedy`` mode) checks that they produce the same tokens. torch is
optional (the HF columns are left out when it is not importable).

Usage: ``python -m rlhf_jax.bench generation [--configs gpt2-124m] [--modes greedy sampled]
[--batch-sizes 1 8 32] [--markdown FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.bench._machine import machine_description
from rlhf_jax.bench._realshape import process_cpu_seconds
from rlhf_jax.generation import Sampler, SamplingParams
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.models.hf import save_pretrained

CONFIGS = {
    "gpt2-v512-l4-e256": lambda: ModelConfig.gpt2_family(
        vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, max_position_embeddings=256
    ),
    "tiny-gpt2": lambda: ModelConfig.tiny_gpt2(max_position_embeddings=256),
    "gpt2-124m": ModelConfig.gpt2,  # V 50,257, 12 x 768, tied head
}
MODES = ("sampled", "greedy")


def _load() -> str:
    try:
        return "(" + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + ")"
    except OSError:
        return "unknown"


def _hf_model(model: CausalLM):
    try:  # optional peers (the bench extra), imported only where they are measured
        import torch
        import transformers
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    gc = hf.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = 0
    gc.do_sample = True
    gc.temperature = 1.0
    gc.top_k = None
    gc.top_p = None
    torch.manual_seed(0)
    return hf


def _hf_generate(hf, ids: np.ndarray, new_tokens: int, *, greedy: bool = False):
    import torch  # an optional peer, present when `_hf_model` built `hf`

    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=not greedy,
        )
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"HF generate stopped early: {out.shape}")
    return out[:, ids.shape[1] :].numpy()


def _timed_calls(fn, *, repeats: int) -> tuple[float, float, object]:
    """Median wall and process CPU seconds of ``repeats`` calls of ``fn`` (after one untimed
    warm-up call), and the last call's output."""
    jax.block_until_ready(fn())
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), process_cpu_seconds()
        out = jax.block_until_ready(fn())
        wall.append(time.perf_counter() - start)
        cpu.append(process_cpu_seconds() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu)), out


def run(
    *, batch_sizes, prompt_len: int, new_tokens: int, repeats: int, configs, with_hf: bool,
    modes=("sampled",),
) -> list[dict]:
    """One row per (config, mode, batch): new tokens per wall and per CPU second of ours and
    (``with_hf`` and torch importable) of HF ``generate`` on the same weights and prompts."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {MODES}")
    rows = []
    for name in configs:
        config = CONFIGS[name]()
        model = CausalLM(config, rngs=nnx.Rngs(0))
        sampler = Sampler(model)
        hf = _hf_model(model) if with_hf else None
        rng = np.random.default_rng(0)
        for mode in modes:
            greedy = mode == "greedy"
            for batch in batch_sizes:
                ids = rng.integers(0, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
                mask = np.ones_like(ids)
                ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
                params = SamplingParams(max_new_tokens=new_tokens, greedy=greedy)
                kw = dict(eos_token_id=None, pad_token_id=0)
                start = time.perf_counter()
                jax.block_until_ready(
                    sampler.generate(ids_j, mask_j, params, rng=jax.random.key(0), **kw).tokens)
                compile_s = time.perf_counter() - start
                seconds, cpu_seconds, out = _timed_calls(
                    functools.partial(
                        lambda s, i, m, p, k: s.generate(i, m, p, rng=jax.random.key(1),
                                                         **k).tokens,
                        sampler, ids_j, mask_j, params, kw,
                    ),
                    repeats=repeats,
                )
                new = batch * new_tokens
                row = dict(
                    config=name,
                    mode=mode,
                    batch=batch,
                    jax_tok_s=new / seconds,
                    jax_tok_cpu_s=new / cpu_seconds,
                    jax_first_call_s=compile_s,
                    load=_load(),
                )
                if hf is not None:
                    if greedy:
                        ours = np.asarray(out)
                    else:
                        ours = np.asarray(sampler.generate(
                            ids_j, mask_j, SamplingParams(max_new_tokens=16, greedy=True),
                            **kw).tokens)
                    hf_seconds, hf_cpu, hf_out = _timed_calls(
                        functools.partial(_hf_generate, hf, ids, new_tokens, greedy=greedy),
                        repeats=repeats,
                    )
                    theirs = hf_out if greedy else _hf_generate(hf, ids, 16, greedy=True)
                    row["greedy_match"] = bool(np.array_equal(ours, theirs))
                    row["greedy_match_fraction"] = float(np.mean(ours == theirs))
                    row["hf_tok_s"] = new / hf_seconds
                    row["hf_tok_cpu_s"] = new / hf_cpu
                    row["speedup"] = row["jax_tok_s"] / row["hf_tok_s"]
                    row["cpu_speedup"] = row["jax_tok_cpu_s"] / row["hf_tok_cpu_s"]
                    row["load"] = _load()
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    hf = row.get("hf_tok_s")
    hf_part = (
        f" | {hf:,.0f} | {row['hf_tok_cpu_s']:,.0f} | {row['speedup']:.2f}x | "
        f"{row['cpu_speedup']:.2f}x | {row['greedy_match_fraction']:.0%}"
        if hf else " | - | - | - | - | -"
    )
    return (
        f"| {row['config']} | {row.get('mode', 'sampled')} | {row['batch']} | "
        f"{row['jax_tok_s']:,.0f} | {row['jax_tok_cpu_s']:,.0f}{hf_part} | "
        f"{row['jax_first_call_s']:.1f} | {row['load']} |"
    )


HEADER = (
    "| config | mode | batch | rlhf_jax new tok/s | rlhf_jax new tok/CPU s | HF generate new "
    "tok/s | HF new tok/CPU s | speed-up (wall) | speed-up (CPU s) | greedy tokens equal | "
    "rlhf_jax first call (compile) s | load avg (1, 5, 15 min) |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.bench generation")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["gpt2-v512-l4-e256", "tiny-gpt2"],
                        choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=["sampled"], choices=list(MODES))
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers column")
    parser.add_argument("--markdown", default=None, help="write the table to this file")
    args = parser.parse_args(argv)

    # torch's OpenMP threads spin at their barriers by default; on a shared host a spinning
    # thread whose sibling was descheduled burns its core (10x the CPU seconds of one GPT-2
    # 124M forward at load 8 on 2 cores), so HF runs with passive waits unless told otherwise.
    # Set before torch loads its OpenMP runtime, which reads it once.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    machine = machine_description()
    try:  # an optional peer
        import torch

        machine += (f", torch {torch.__version__} ({torch.get_num_threads()} threads, "
                    f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})")
    except ImportError:
        pass
    print(machine)
    print(HEADER)
    rows = run(
        batch_sizes=args.batch_sizes,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        configs=args.configs,
        with_hf=not args.no_hf,
        modes=args.modes,
    )
    if args.markdown:
        try:
            uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        except OSError:
            uptime = _load()
        lines = [
            f"Machine: {machine}.",
            f"Prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
            f"{' and '.join(args.modes)} (sampled: temperature 1, no filter), no early stop; "
            f"median of {args.repeats} runs after one warm-up. `uptime` at the end: "
            f"{uptime}.",
            "",
            HEADER,
            *(_format_row(r) for r in rows),
            "",
        ]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
