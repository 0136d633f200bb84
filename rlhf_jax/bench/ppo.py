"""PPO iteration benchmark: wall time split into rollout, scoring and update; tokens/s; MFU.

``python -m rlhf_jax.bench ppo [--configs tiny,small] [--iterations 5] [--markdown FILE]``

Each configuration is a random GPT-2 (vocabulary 512) policy, a frozen reference, a separate
value model and a reward model of the same shape, trained with `rlhf_jax.train.ppo.PPOTrainer`
(fp32, every device of the default mesh). One iteration is timed in three phases, each blocked
on its outputs:

- **rollout**: sampling up to ``N`` response tokens for ``B`` prompts of ``P`` tokens (prefill +
  KV-cache decode, jitted; the random policy rarely samples the stop token, so almost every row
  decodes all ``N`` steps; "sampled tokens/s" counts the real response tokens);
- **scoring**: the reward-model forward pass plus the jitted policy / reference / value forward
  passes, rewards and GAE;
- **update**: ``num_epochs x num_minibatches`` optimizer steps (forward + backward of policy and
  value model) in one jitted, donated call.

Model FLOPs of the update (per token, forward + backward = 3 x forward): ``6 * W + 12 * L * T *
E`` for each of the policy (``W`` = its matmul weights, LM head included) and the value model
(``W`` = matmul weights of its backbone and head), with ``T = P + N`` and ``E`` the width, over
``num_epochs`` passes of the ``B x T`` rollout tokens. MFU is those FLOPs per second divided by
`rlhf_jax.bench.measure_matmul_peak` (fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np
from flax import nnx

from rlhf_jax.bench._machine import machine_description, measure_matmul_peak
from rlhf_jax.generation import RewardModelSource
from rlhf_jax.models import CausalLM, ModelConfig, RewardModel
from rlhf_jax.train.config import DataSpec, OptimizerConfig
from rlhf_jax.train.ppo import PPOConfig, PPOTrainer
from rlhf_jax.train.rollout import RolloutConfig


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark shape."""

    name: str
    batch_size: int
    prompt_length: int
    response_length: int
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int = 512
    num_epochs: int = 4
    num_minibatches: int = 2


CONFIGS = {
    "tiny": BenchConfig("tiny", batch_size=8, prompt_length=32, response_length=32,
                        num_layers=2, hidden_size=128, num_heads=4),
    "small": BenchConfig("small", batch_size=8, prompt_length=64, response_length=64,
                         num_layers=4, hidden_size=256, num_heads=4),
}


def _matmul_weights(model: nnx.Module, *, lm_head: bool) -> int:
    """Weights that take part in a matmul per token: every projection ``kernel`` plus, for a
    causal LM, the LM head (the token embedding when it is tied). Lookups (token and position
    embeddings) and biases / norms are not counted."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if str(path[-1]) == "kernel":
            total += int(value.size)
    if lm_head and getattr(model, "lm_head", None) is None:
        total += int(model.backbone.embed.embedding.get_value().size)
    return total


def update_flops(cfg: BenchConfig, policy_weights: int, value_weights: int) -> float:
    """Model FLOPs of one PPO update call (all epochs and minibatches, policy + value)."""
    seq = cfg.prompt_length + cfg.response_length
    attention = 12 * cfg.num_layers * seq * cfg.hidden_size
    per_token = (6 * policy_weights + attention) + (6 * value_weights + attention)
    tokens_per_pass = cfg.batch_size * seq
    return float(per_token * tokens_per_pass * cfg.num_epochs)


def _block(tree):
    return jax.block_until_ready(tree)


def run(cfg: BenchConfig, *, iterations: int = 5, warmup: int = 2) -> dict:
    """Times ``iterations`` PPO iterations of ``cfg`` after ``warmup`` (compilation) ones."""
    model_cfg = ModelConfig.gpt2_family(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, max_position_embeddings=cfg.prompt_length + cfg.response_length,
    )
    policy = CausalLM(model_cfg, rngs=nnx.Rngs(0))
    reward_model = RewardModel(model_cfg, rngs=nnx.Rngs(1))
    config = PPOConfig(
        num_steps=warmup + iterations,
        data=DataSpec(batch_size=cfg.batch_size),
        rollout=RolloutConfig(max_new_tokens=cfg.response_length),
        optimizer=OptimizerConfig(learning_rate=1e-5, schedule="constant"),
        num_epochs=cfg.num_epochs,
        num_minibatches=cfg.num_minibatches,
    )
    eos = cfg.vocab_size - 1
    rng = np.random.default_rng(0)
    prompts = {
        "prompt_ids": rng.integers(0, eos, size=(cfg.batch_size, cfg.prompt_length),
                                   dtype=np.int32),
        "prompt_mask": np.ones((cfg.batch_size, cfg.prompt_length), np.int32),
    }
    trainer = PPOTrainer(config, policy=policy, reward=RewardModelSource(reward_model),
                         prompts=iter(()), eos_token_id=eos, pad_token_id=0)
    policy_weights = _matmul_weights(trainer.policy_model(), lm_head=True)
    value_model = nnx.merge(trainer.value_graphdef, trainer.state.value.params,
                            trainer.state.value.frozen)
    value_weights = _matmul_weights(value_model, lm_head=False)

    times = {"rollout": [], "scoring": [], "update": [], "total": []}
    response_tokens = []
    state = trainer.state
    for i in range(warmup + iterations):
        keys = jax.random.split(jax.random.wrap_key_data(state.rng))
        t0 = time.perf_counter()
        rollout = _block(trainer.rollout(state, prompts, keys[0]))
        t1 = time.perf_counter()
        experience, metrics = _block(trainer.score(state, rollout, prompts))
        t2 = time.perf_counter()
        state, update_metrics = _block(trainer.update(
            state, experience, jax.random.key_data(keys[1]), metrics["ppo/kl_ref"]))
        t3 = time.perf_counter()
        if i >= warmup:
            times["rollout"].append(t1 - t0)
            times["scoring"].append(t2 - t1)
            times["update"].append(t3 - t2)
            times["total"].append(t3 - t0)
            response_tokens.append(int(np.asarray(rollout.response_mask).sum()))
    med = {k: statistics.median(v) for k, v in times.items()}
    seq = cfg.prompt_length + cfg.response_length
    flops = update_flops(cfg, policy_weights, value_weights)
    return {
        "config": cfg.name,
        "shape": (f"B={cfg.batch_size} P={cfg.prompt_length} N={cfg.response_length} "
                  f"L={cfg.num_layers} E={cfg.hidden_size} V={cfg.vocab_size}"),
        "rollout_s": med["rollout"],
        "scoring_s": med["scoring"],
        "update_s": med["update"],
        "iteration_s": med["total"],
        "iteration_tokens_per_s": cfg.batch_size * seq / med["total"],
        "sampled_tokens_per_s": statistics.median(response_tokens) / med["rollout"],
        "update_tokens_per_s": cfg.batch_size * seq * cfg.num_epochs / med["update"],
        "update_flops": flops,
        "update_flops_per_s": flops / med["update"],
    }


def _table(rows: list[dict], peak: float) -> str:
    header = ("| config | shape | rollout s | scoring s | update s | iteration s | tokens/s "
              "(iteration) | sampled tokens/s | update tokens/s | update GFLOP/s | update MFU |")
    sep = "|" + "---|" * 11
    lines = [header, sep]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['shape']} | {r['rollout_s']:.3f} | {r['scoring_s']:.3f} | "
            f"{r['update_s']:.3f} | {r['iteration_s']:.3f} | {r['iteration_tokens_per_s']:.0f} | "
            f"{r['sampled_tokens_per_s']:.0f} | {r['update_tokens_per_s']:.0f} | "
            f"{r['update_flops_per_s'] / 1e9:.1f} | {100 * r['update_flops_per_s'] / peak:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.bench ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,small",
                        help=f"comma-separated subset of {sorted(CONFIGS)}")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations (compile)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {sorted(CONFIGS)}")
    peak = measure_matmul_peak()
    rows = [run(CONFIGS[n], iterations=args.iterations, warmup=args.warmup) for n in names]
    text = (f"Machine: {machine_description()}\n\nMeasured fp32 matmul peak: "
            f"{peak / 1e9:.1f} GFLOP/s\n\n{_table(rows, peak)}\n")
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
