"""Cost of the top-k and top-p sampling filters per decode step, by vocabulary size.

``rlhf_jax.generation.top_k_filter`` and ``top_p_filter`` find each row's cut-off by bisection
over the float order (32 reductions over ``[B, V]``) instead of sorting the vocabulary. This
benchmark times them against the sort-based formulation (``lax.top_k`` for top-k; a descending
sort and a cumulative sum for top-p), which keeps the same tokens, and, when ``torch`` and
``transformers`` are installed, against Hugging Face's ``TopKLogitsWarper`` and
``TopPLogitsWarper`` on the same logits. Vocabulary sizes: 512 (the sampler benchmark's model),
32,768 and 151,936 (Qwen2).

Usage: ``python -m rlhf_jax.bench filters [--vocab-sizes 512 32768 151936] [--batch-sizes 1 8]``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.bench._machine import machine_description, time_fn
from rlhf_jax.generation import top_k_filter, top_p_filter

TOP_K = 50
TOP_P = 0.9


def _sorted_top_k(logits, *, top_k):
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _sorted_top_p(logits, *, top_p):
    sorted_logits = -jnp.sort(-logits, axis=-1)
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
    keep = keep.at[..., 0].set(True)
    last = jnp.take_along_axis(sorted_logits, jnp.sum(keep, -1, keepdims=True) - 1, axis=-1)
    return jnp.where(logits < last, -jnp.inf, logits)


def _hf_warpers():
    try:  # optional peers (the bench extra), imported only where they are measured
        import torch
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    except ImportError:
        return None
    top_k, top_p = TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P)

    def timed(warper, logits: np.ndarray, repeats: int) -> float:
        scores = torch.from_numpy(logits)
        return time_fn(lambda: warper(None, scores.clone()), warmup=2, repeats=repeats)

    return functools.partial(timed, top_k), functools.partial(timed, top_p)


def run(*, vocab_sizes, batch_sizes, repeats: int) -> list[dict]:
    hf = _hf_warpers()
    rows = []
    for vocab in vocab_sizes:
        for batch in batch_sizes:
            logits_np = np.random.default_rng(0).normal(size=(batch, vocab)).astype(np.float32) * 3
            logits = jnp.asarray(logits_np)
            ours_k = jax.jit(functools.partial(top_k_filter, top_k=TOP_K))
            ours_p = jax.jit(functools.partial(top_p_filter, top_p=TOP_P))
            sort_k = jax.jit(functools.partial(_sorted_top_k, top_k=TOP_K))
            sort_p = jax.jit(functools.partial(_sorted_top_p, top_p=TOP_P))
            same = bool(
                np.array_equal(np.isfinite(ours_k(logits)), np.isfinite(sort_k(logits)))
                and np.array_equal(np.isfinite(ours_p(logits)), np.isfinite(sort_p(logits)))
            )
            row = dict(vocab=vocab, batch=batch, same_tokens=same)
            for name, fn in (("top_k", ours_k), ("top_p", ours_p), ("sort_top_k", sort_k),
                             ("sort_top_p", sort_p)):
                row[name] = time_fn(functools.partial(fn, logits), warmup=2, repeats=repeats) * 1e3
            if hf is not None:
                row["hf_top_k"] = hf[0](logits_np, repeats) * 1e3
                row["hf_top_p"] = hf[1](logits_np, repeats) * 1e3
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _format_row(row: dict) -> str:
    return (
        f"| {row['vocab']:,} | {row['batch']} | {_ms(row['top_k'])} | {_ms(row['sort_top_k'])} | "
        f"{_ms(row.get('hf_top_k'))} | {_ms(row['top_p'])} | {_ms(row['sort_top_p'])} | "
        f"{_ms(row.get('hf_top_p'))} | {row['same_tokens']} |"
    )


HEADER = (
    f"| vocab | batch | top-k {TOP_K} ms | sort-based top-k ms | HF top-k ms | top-p {TOP_P} ms | "
    "sort-based top-p ms | HF top-p ms | same kept tokens |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.bench filters")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[512, 32_768, 151_936])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    machine = machine_description()
    print(machine)
    print(HEADER)
    rows = run(vocab_sizes=args.vocab_sizes, batch_sizes=args.batch_sizes, repeats=args.repeats)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join([f"Machine: {machine}.", "", HEADER,
                               *(_format_row(r) for r in rows), ""]))


if __name__ == "__main__":
    main()
