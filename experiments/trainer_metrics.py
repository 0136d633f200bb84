"""Runs every trainer for a few steps with fixed seeds and records what it logged, so that two
versions of the library can be compared run for run (a refactor must not change behaviour).

    python -m experiments.trainer_metrics run --out /tmp/new          # this checkout
    PYTHONPATH=/path/to/other/checkout python experiments/trainer_metrics.py run --out /tmp/old
    python -m experiments.trainer_metrics compare /tmp/old /tmp/new

``run`` trains each case of `CASES` (SFT, reward models, the DPO family with several loss types,
prefix sharing, a precomputed reference and LoRA, KTO, PPO with a separate and a shared value
head and a reward-model reward, GRPO, RLOO, rejection sampling, export) on a tiny model and the
synthetic topic task, on 4 fake CPU devices, through the public ``train_<algo>(config)`` API
only, so the same file runs against any version. It writes ``<out>/metrics.json`` (every logged
metric row but the wall-clock ones, and each run summary) and ``<out>/<case>.npz`` (the final
checkpoint's trained arrays; for export, the written safetensors).

``compare`` prints, per case, the largest absolute and relative difference of the logged metrics
and of the final arrays, and fails (exit status 1) on a missing case, metric or step, or on a value
that differs by more than ``--atol + --rtol * |value|`` (defaults 1e-6 and 1e-4: float32
rounding carried through a few optimizer steps). The relative column ignores entries that differ
by less than ``--atol``.
"""

from __future__ import annotations

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import rlhf_jax  # noqa: E402
from rlhf_jax.train.config import (  # noqa: E402
    DataSpec,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
)
from rlhf_jax.train.dpo import DPOConfig, train_dpo  # noqa: E402
from rlhf_jax.train.export import ExportConfig, export_policy, read_checkpoint_state  # noqa: E402
from rlhf_jax.train.grpo import GRPOConfig, RLOOConfig, train_grpo, train_rloo  # noqa: E402
from rlhf_jax.train.loop import WALL_CLOCK_METRICS  # noqa: E402
from rlhf_jax.train.ppo import PPOConfig, train_ppo  # noqa: E402
from rlhf_jax.train.rejection_sampling import (  # noqa: E402
    RejectionSamplingConfig,
    train_rejection_sampling,
)
from rlhf_jax.train.rm import RMConfig, train_rm  # noqa: E402
from rlhf_jax.train.sft import SFTConfig, train_sft  # noqa: E402

TINY = ModelSpec(preset="tiny_gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                 max_position_embeddings=64)
QUIET = LoggingConfig(every_steps=1, tensorboard=False, progress="none")
OPT = OptimizerConfig(learning_rate=1e-3, warmup_steps=1)
OFFLINE_DATA = DataSpec(synthetic="topic", batch_size=8, max_length=48, max_prompt_length=24,
                        num_train=64, num_eval=16)
ONLINE_DATA = DataSpec(synthetic="topic", batch_size=8, max_length=16, max_prompt_length=16,
                       num_train=64)
STEPS = 3


def _common(out: str, name: str) -> dict[str, Any]:
    return dict(output_dir=os.path.join(out, name), seed=3, num_steps=STEPS, model=TINY,
                optimizer=OPT, logging=QUIET)


def _online(out: str, name: str) -> dict[str, Any]:
    # The online trainers take the tokenizer's vocabulary when vocab_size is unset.
    common = _common(out, name)
    common["model"] = dataclasses.replace(TINY, vocab_size=None)
    return dict(common, data=ONLINE_DATA)


def _dpo(**kw) -> Callable[[str, str], dict]:
    def run(out: str, name: str) -> dict:
        data = dataclasses.replace(OFFLINE_DATA, **kw.pop("data", {}))
        model = dataclasses.replace(TINY, **kw.pop("model", {}))
        return train_dpo(DPOConfig(**{**_common(out, name), "data": data, "model": model, **kw}))

    return run


def _rm(**kw) -> Callable[[str, str], dict]:
    def run(out: str, name: str) -> dict:
        data = dataclasses.replace(OFFLINE_DATA, **kw.pop("data", {}))
        return train_rm(RMConfig(**{**_common(out, name), "data": data, **kw}))

    return run


def _sft(**kw) -> Callable[[str, str], dict]:
    def run(out: str, name: str) -> dict:
        data = dataclasses.replace(OFFLINE_DATA, **kw.pop("data", {}))
        return train_sft(SFTConfig(**{**_common(out, name), "data": data, **kw}))

    return run


def _reward_model(out: str) -> dict[str, Any]:
    """The reward spec of the `rm` case's run (it runs first)."""
    return {"source": "model", "path": os.path.join(out, "rm_bradley_terry")}


def _ppo(**kw) -> Callable[[str, str], dict]:
    def run(out: str, name: str) -> dict:
        base = _online(out, name)
        reward = kw.pop("reward", None)
        if reward == "model":
            base["reward"] = type(PPOConfig().reward)(**_reward_model(out))
        rollout = dataclasses.replace(PPOConfig().rollout, **kw.pop("rollout", {}))
        return train_ppo(PPOConfig(**{**base, "rollout": rollout, **kw}))

    return run


def _grpo(config_cls, train_fn, **kw) -> Callable[[str, str], dict]:
    def run(out: str, name: str) -> dict:
        base = _online(out, name)
        return train_fn(config_cls(**{**base, **kw}))

    return run


def _rejection_sampling(out: str, name: str) -> dict:
    base = _online(out, name)
    base["reward"] = type(RejectionSamplingConfig().reward)(**_reward_model(out))
    return train_rejection_sampling(RejectionSamplingConfig(**base, num_samples=3,
                                                            sft_batch_size=4, sft_epochs=2))


def _export(out: str, name: str) -> dict:
    target = os.path.join(out, name)
    summaries = {}
    for run in ("sft_token", "dpo_lora_soft_labels"):
        summaries[run] = export_policy(ExportConfig(run_dir=os.path.join(out, run),
                                                    output_dir=os.path.join(target, run)))
    return summaries


CASES: dict[str, Callable[[str, str], dict]] = {
    "sft_token": _sft(),
    "sft_packed_sequence": _sft(data={"packing": True}, reduction="sequence"),
    "rm_bradley_terry": _rm(use_margin=True, center_rewards_coefficient=0.01, normalize=True),
    "rm_plackett_luce_prefix": _rm(loss="plackett_luce", data={"prefix_sharing": True}),
    "rm_two_heads": _rm(head_names=("helpful", "harmless"), train_heads=("helpful",),
                        label_smoothing=0.1),
    "dpo_sigmoid": _dpo(),
    "dpo_mixture_prefix": _dpo(loss_type=("sigmoid", "bco_pair", "sft"),
                               loss_weights=(0.8, 0.2, 0.5), rpo_alpha=0.1,
                               data={"prefix_sharing": True}),
    "dpo_robust_precomputed": _dpo(loss_type=("robust",), label_smoothing=0.1,
                                   reference="precomputed"),
    "dpo_ipo_fdiv_packed": _dpo(loss_type=("ipo",), f_divergence="js_divergence",
                                data={"packing": True}),
    "dpo_lora_soft_labels": _dpo(soft_labels=True, model={"lora_rank": 4}),
    "simpo": _dpo(algorithm="simpo", beta=2.0, label_smoothing=0.05),
    "orpo": _dpo(algorithm="orpo", beta=0.2),
    "cpo_simpo": _dpo(algorithm="cpo", loss_type=("simpo",), cpo_alpha=0.5),
    "kto": _dpo(algorithm="kto", desirable_weight=1.5),
    "kto_precomputed": _dpo(algorithm="kto", loss_type=("apo_zero_unpaired",),
                            reference="precomputed"),
    "ppo_gold": _ppo(num_minibatches=2),
    "ppo_shared_rm": _ppo(reward="model", value_head="shared", adaptive_kl=True,
                          whiten_rewards=True, entropy_coef=0.01,
                          rollout={"missing_eos_penalty": 0.5, "top_k": 20}),
    "ppo_rm_value_init": _ppo(reward="model", kl_estimator="k3", normalize_scores=True,
                              rollout={"temperature": 0.8, "top_p": 0.9}),
    "grpo_dapo": _grpo(GRPOConfig, train_grpo, num_generations=2),
    "grpo_gspo_beta": _grpo(GRPOConfig, train_grpo, num_generations=2, loss_type="gspo",
                            beta=0.04, num_iterations=2, scale_rewards="batch"),
    "grpo_cispo": _grpo(GRPOConfig, train_grpo, num_generations=2, loss_type="cispo",
                        beta=0.02),
    "rloo": _grpo(RLOOConfig, train_rloo, num_generations=2, normalize_advantages=True),
    "rejection_sampling": _rejection_sampling,
    "export": _export,
}


def _flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}/{i}"))
    elif tree is not None:
        arr = np.asarray(tree)
        if arr.dtype.kind in "fiub":
            out[prefix] = arr
    return out


def _final_arrays(out: str, name: str) -> dict[str, np.ndarray]:
    run_dir = os.path.join(out, name)
    if name == "export":
        arrays = {}
        for run in sorted(os.listdir(run_dir)):
            for fname in sorted(os.listdir(os.path.join(run_dir, run))):
                if fname.endswith(".safetensors"):
                    for k, v in load_file(os.path.join(run_dir, run, fname)).items():
                        arrays[f"{run}/{k}"] = v
        return arrays
    _, state = read_checkpoint_state(os.path.join(run_dir, "checkpoints"))
    # The trained values and the optimizer state; RNG key data and counters are compared too.
    return _flat(state)


def _metrics_rows(out: str, name: str) -> list[dict[str, Any]]:
    path = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_METRICS} for r in rows]


def run(out: str, only: list[str] | None) -> None:
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, "metrics.json")
    results: dict[str, Any] = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    print(f"rlhf_jax from {os.path.dirname(rlhf_jax.__file__)}", flush=True)
    for name, fn in CASES.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        summary = fn(out, name)
        summary = json.loads(json.dumps(summary, default=str))
        if isinstance(summary, dict):
            summary.pop("output_dir", None)
        results[name] = {"rows": _metrics_rows(out, name), "summary": summary}
        np.savez(os.path.join(out, f"{name}.npz"), **_final_arrays(out, name))
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)


def _diff(a: Any, b: Any, *, rtol: float, atol: float) -> tuple[float, float, int]:
    """``(max |a - b|, max |a - b| / max(|a|, |b|) over the entries that differ by more than
    atol, number of entries outside atol + rtol * max(|a|, |b|))``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf"), 1
    if a.size == 0:
        return 0.0, 0.0, 0
    d = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))
    d = np.where(np.isnan(d), np.inf, d)
    scale = np.maximum(np.abs(a), np.abs(b))
    significant = d > atol
    rel = float(np.max(d[significant] / scale[significant])) if significant.any() else 0.0
    return float(np.max(d)), rel, int(np.sum(d > atol + rtol * scale))


def compare(old: str, new: str, rtol: float, atol: float) -> int:
    with open(os.path.join(old, "metrics.json")) as f:
        a = json.load(f)
    with open(os.path.join(new, "metrics.json")) as f:
        b = json.load(f)
    failures = []
    print(f"{'case':26s} {'rows':>4s} {'metrics abs':>12s} {'metrics rel':>12s} "
          f"{'arrays abs':>12s} {'arrays rel':>12s}")
    for name in CASES:
        if name not in a or name not in b:
            failures.append(f"{name}: missing in {'old' if name not in a else 'new'}")
            continue
        rows_a, rows_b = a[name]["rows"], b[name]["rows"]
        m_abs = m_rel = 0.0
        bad = 0
        if [r.get("step") for r in rows_a] != [r.get("step") for r in rows_b]:
            failures.append(f"{name}: logged steps differ")
        for ra, rb in zip(rows_a, rows_b):
            if set(ra) != set(rb):
                failures.append(f"{name}: metric keys differ at step {ra.get('step')}: "
                                f"{sorted(set(ra) ^ set(rb))}")
            for k in set(ra) & set(rb):
                da, dr, n = _diff(ra[k], rb[k], rtol=rtol, atol=atol)
                m_abs, m_rel, bad = max(m_abs, da), max(m_rel, dr), bad + n
        sa, sb = a[name]["summary"], b[name]["summary"]
        if isinstance(sa, dict) and isinstance(sb, dict) and set(sa) != set(sb):
            failures.append(f"{name}: summary keys differ: {sorted(set(sa) ^ set(sb))}")
        with np.load(os.path.join(old, f"{name}.npz")) as fa, \
                np.load(os.path.join(new, f"{name}.npz")) as fb:
            if set(fa.files) != set(fb.files):
                failures.append(f"{name}: final arrays differ in names: "
                                f"{sorted(set(fa.files) ^ set(fb.files))[:6]}")
            w_abs = w_rel = 0.0
            for k in set(fa.files) & set(fb.files):
                da, dr, n = _diff(fa[k], fb[k], rtol=rtol, atol=atol)
                w_abs, w_rel, bad = max(w_abs, da), max(w_rel, dr), bad + n
        print(f"{name:26s} {len(rows_a):4d} {m_abs:12.3g} {m_rel:12.3g} {w_abs:12.3g} "
              f"{w_rel:12.3g}")
        if bad:
            failures.append(f"{name}: {bad} values differ by more than {atol} + {rtol} x value")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run every case and record its metrics")
    p_run.add_argument("--out", required=True)
    p_run.add_argument("--only", nargs="*", help="case names (default: all)")
    p_cmp = sub.add_parser("compare", help="compare two recorded directories")
    p_cmp.add_argument("old")
    p_cmp.add_argument("new")
    p_cmp.add_argument("--rtol", type=float, default=1e-4)
    p_cmp.add_argument("--atol", type=float, default=1e-6)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.out, args.only)
        return 0
    return compare(args.old, args.new, args.rtol, args.atol)


if __name__ == "__main__":
    sys.exit(main())
