"""Sampling throughput: ``rlhf_jax.generation`` against Hugging Face ``generate`` (torch, CPU).

New tokens per second for 64-token prompts and 128 new tokens, sampling at temperature 1 with no
filter and no early stop, on a random GPT-2 (vocabulary 512, 4 layers, width 256) and on a tiny
GPT-2, at batch 1, 8 and 32. Both sides use the same weights: the NNX model is written with
``save_pretrained`` and read back by ``transformers.GPT2LMHeadModel.from_pretrained``; a greedy
run checks that they produce the same tokens. torch is optional (the HF column is left out when it
is not importable).

Usage: ``python -m rlhf_jax.bench generation [--batch-sizes 1 8 32] [--markdown FILE]``.
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

from rlhf_jax.bench._machine import machine_description, time_fn
from rlhf_jax.generation import Sampler
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.models.hf import save_pretrained

CONFIGS = {
    "gpt2-v512-l4-e256": lambda: ModelConfig.gpt2_family(
        vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, max_position_embeddings=256
    ),
    "tiny-gpt2": lambda: ModelConfig.tiny_gpt2(max_position_embeddings=256),
}


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


def run(
    *, batch_sizes, prompt_len: int, new_tokens: int, repeats: int, configs, with_hf: bool
) -> list[dict]:
    rows = []
    for name in configs:
        config = CONFIGS[name]()
        model = CausalLM(config, rngs=nnx.Rngs(0))
        sampler = Sampler(model)
        hf = _hf_model(model) if with_hf else None
        rng = np.random.default_rng(0)
        for batch in batch_sizes:
            ids = rng.integers(0, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
            mask = np.ones_like(ids)
            ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
            kw = dict(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
            start = time.perf_counter()
            jax.block_until_ready(sampler.generate(ids_j, mask_j, rng=jax.random.key(0), **kw))
            compile_s = time.perf_counter() - start
            seconds = time_fn(
                functools.partial(
                    lambda s, i, m, k: s.generate(i, m, rng=jax.random.key(1), **k).tokens,
                    sampler, ids_j, mask_j, kw,
                ),
                warmup=1,
                repeats=repeats,
            )
            row = dict(
                config=name,
                batch=batch,
                jax_tok_s=batch * new_tokens / seconds,
                jax_first_call_s=compile_s,
                load=_load(),
            )
            if hf is not None:
                greedy_jax = np.asarray(
                    sampler.generate(ids_j, mask_j, greedy=True, **{**kw, "max_new_tokens": 16})
                    .tokens
                )
                row["greedy_match"] = bool(
                    np.array_equal(greedy_jax, _hf_generate(hf, ids, 16, greedy=True))
                )
                _hf_generate(hf, ids, new_tokens)  # warm-up
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    _hf_generate(hf, ids, new_tokens)
                    times.append(time.perf_counter() - start)
                row["hf_tok_s"] = batch * new_tokens / float(np.median(times))
                row["speedup"] = row["jax_tok_s"] / row["hf_tok_s"]
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    hf = row.get("hf_tok_s")
    hf_part = (
        f" | {hf:,.0f} | {row['speedup']:.1f}x | {row['greedy_match']}" if hf else " | - | - | -"
    )
    return (
        f"| {row['config']} | {row['batch']} | {row['jax_tok_s']:,.0f}{hf_part} | "
        f"{row['jax_first_call_s']:.1f} | {row['load']} |"
    )


HEADER = (
    "| config | batch | rlhf_jax new tok/s | HF generate new tok/s | speed-up | greedy tokens "
    "equal | rlhf_jax first call (compile) s | load avg (1, 5, 15 min) |\n"
    "|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.bench generation")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers column")
    parser.add_argument("--markdown", default=None, help="write the table to this file")
    args = parser.parse_args(argv)

    machine = machine_description()
    try:  # an optional peer
        import torch

        machine += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
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
    )
    if args.markdown:
        try:
            uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        except OSError:
            uptime = _load()
        lines = [
            f"Machine: {machine}.",
            f"Prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, temperature 1, no "
            f"filter, no early stop; median of {args.repeats} runs. `uptime` at the end: "
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
