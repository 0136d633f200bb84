"""Real-shape steps for the `steps` and `memory` benchmarks: one configuration (`Case`) is built,
compiled, timed and measured in its own process (`run_isolated`), so that the host RSS
high-water mark is that configuration's.

Every step is built from the public model API and `rlhf_jax.losses`, with the LM head switched
by `Case.chunk` (`ModelConfig.logits_chunk_size`: `0` materialises the `[B, T, V]` logits, `c`
runs the fused head over chunks of `c` positions), and trained through the trainers' own
`rlhf_jax.train.builders.setup_training` (AdamW with clipping, sharded state, donated jitted step,
gradient accumulation):

- `sft`: token-mean NLL over the response tokens (`loss_mask`), plus the argmax accuracy;
- `dpo`: sigmoid DPO over `batch` pairs run as `2 * batch` rows of `T` tokens (prompt `T/2`,
  response `T/2`) in one forward, with the reference as a second model (`reference="model"`),
  the LoRA base (`"lora_base"`: the policy with its adapters off, no second copy) or
  precomputed sequence log-probs (`"precomputed"`);
- `ppo`: one iteration split into **rollout** (`rlhf_jax.generation`, `T/2` new tokens after
  `T/2`-token prompts, no stop token so every row decodes all of them), **scoring** (policy and
  reference log-probs at temperature 1, values, reward-model scores, KL-penalised rewards, GAE;
  one jitted call) and **update** (`epochs x minibatches` optimizer steps of the PPO clip loss
  plus the clipped value loss on a policy + value-model pair).

Random weights (`CausalLM(config, rngs=nnx.Rngs(0))`), random tokens, nothing downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import losses
from rlhf_jax.generation import SamplingParams, generate_with_state
from rlhf_jax.host_memory import release_freed_memory
from rlhf_jax.models import (
    CausalLM,
    LoRAParam,
    ModelConfig,
    RewardModel,
    ValueModel,
    apply_lora,
    lora_disabled,
)
from rlhf_jax.train.builders import setup_training, trainable_filter
from rlhf_jax.train.config import ModelSpec, OptimizerConfig, TrainConfig

STEPS = ("sft", "dpo", "ppo")
REFERENCES = ("model", "precomputed", "lora_base")


def _tiny_gpt2(**kw) -> ModelConfig:
    return ModelConfig.gpt2_family(vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4,
                                   **kw)


def _tiny_qwen2(**kw) -> ModelConfig:
    return ModelConfig.tiny_qwen2(vocab_size=4096, **kw)


MODELS: dict[str, Callable[..., ModelConfig]] = {
    "gpt2": ModelConfig.gpt2,  # 124M: V 50,257, 12 x 768, tied head
    "qwen2-0.5b": ModelConfig.qwen2_0_5b,  # V 151,936, 24 x 896, GQA 14/2, tied head
    # The Qwen2-0.5B vocabulary and width with fewer layers (the peer comparisons that do not
    # fit this host's memory at 24 layers).
    **{f"qwen2-0.5b-l{n}": functools.partial(ModelConfig.qwen2_0_5b, num_layers=n)
       for n in (2, 4, 8, 12)},
    # Smoke-test sizes (same code paths, seconds per step).
    "tiny-gpt2": _tiny_gpt2,
    "tiny-qwen2": _tiny_qwen2,
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration.

    Attributes:
      model: a key of `MODELS`.
      step: `"sft"`, `"dpo"` or `"ppo"`.
      seq: T, tokens per row (prompt T/2 + response T/2 for DPO and PPO).
      batch: rows (SFT), pairs (DPO: 2 * batch rows) or prompts (PPO).
      chunk: `ModelConfig.logits_chunk_size` (0: unfused head through the full logits).
      keep_bytes: `ModelConfig.logits_keep_bytes` (the fused head keeps logits within this
        budget for its backward pass; 0: never). Named in `head` when set.
      response_only: DPO only: score from the first response column on
        (`token_logps(start=T/2)`, a static slice, as Tunix's `logits_to_keep` asks), which
        every row of this benchmark allows (prompts of exactly `T/2` tokens). Without it the
        step scores the loss tokens (`where=loss_mask`), as `DPOTrainer` does, and the fused
        head skips the prompt's chunks at run time: the same head work, with any prompt
        lengths. Named in `head`.
      remat: `ModelConfig.remat`.
      attention: `ModelConfig.attention_impl` (`"auto"`, the model's default, `"dense"` or
        `"blockwise"`; default tiles). Named in `head` unless `"auto"`.
      dtype, param_dtype: compute and parameter dtypes.
      reference: DPO reference, one of `REFERENCES`.
      lora_rank: LoRA adapters of this rank on every projection (0: full fine-tune).
      grad_accum: micro-batches per optimizer step.
      freeze_layers: bottom layers of the policy the optimizer leaves alone
        (`ModelSpec.freeze_layers`: no AdamW moments for those rows).
      epochs, minibatches: PPO update passes over the rollout.
    """

    model: str
    step: str
    seq: int
    batch: int
    chunk: int = 128
    keep_bytes: int = 0
    response_only: bool = False
    remat: str = "dots"
    attention: str = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"
    reference: str = "model"
    lora_rank: int = 0
    grad_accum: int = 1
    freeze_layers: int = 0
    epochs: int = 1
    minibatches: int = 1

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}; allowed: {sorted(MODELS)}")
        if self.step not in STEPS:
            raise ValueError(f"step={self.step!r}; allowed: {STEPS}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference={self.reference!r}; allowed: {REFERENCES}")
        if self.reference == "lora_base" and not self.lora_rank:
            raise ValueError("reference='lora_base' needs lora_rank > 0")
        if self.response_only and self.step != "dpo":
            raise ValueError(f"response_only applies to step='dpo', not {self.step!r}")
        if self.seq < 4 or self.seq % 2:
            raise ValueError(f"seq must be an even number >= 4, got {self.seq}")

    @property
    def head(self) -> str:
        head = "unfused" if self.chunk == 0 else f"fused/{self.chunk}"
        if self.chunk and self.keep_bytes:
            head += f", keep {self.keep_bytes / 2**30:g} GiB"
        if self.response_only:
            head += ", response only"
        return head if self.attention == "auto" else f"{head}, {self.attention} attention"

    def model_config(self) -> ModelConfig:
        base = MODELS[self.model]()
        return base.replace(logits_chunk_size=self.chunk, logits_keep_bytes=self.keep_bytes,
                            remat=self.remat,
                            attention_impl=self.attention, dtype=self.dtype,
                            param_dtype=self.param_dtype,
                            max_position_embeddings=max(base.max_position_embeddings,
                                                        self.seq))


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def matmul_weights(model: nnx.Module) -> int:
    """Weights in a matmul per token: every projection `kernel`, plus the LM head (the tied
    token embedding when there is no `lm_head`) of a causal LM. Lookups, biases and norms are
    not counted."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if str(path[-1]) == "kernel":
            total += int(np.prod(var.shape))
    if isinstance(model, CausalLM) and model.lm_head is None:
        total += int(np.prod(model.backbone.embed.embedding.shape))
    return total


def forward_flops_per_token(config: ModelConfig, weights: int, seq: int) -> float:
    """`2 W + 4 L T (H D)`: the matmul weights plus the attention scores and mixing (PaLM's
    model-FLOPs convention; causal masking and rematerialisation are not discounted/added)."""
    return 2.0 * weights + 4.0 * config.num_layers * seq * config.num_heads \
        * config.resolved_head_dim


def forward_flops(config: ModelConfig, weights: int, seq: int, *, tokens: int,
                  scored: int) -> float:
    """One forward pass over `tokens` tokens of which `scored` go through the LM head: the
    scoring runs the head (`2 E V` per token) on the scored tokens only (a loss mask's tokens,
    `CausalLM.token_logps(where=...)`, or the columns from `start` on), so the FLOPs of the
    head on the others are not model FLOPs of the step."""
    head = 2.0 * config.hidden_size * config.vocab_size
    return forward_flops_per_token(config, weights, seq) * tokens - head * (tokens - scored)


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------


def _rows(rng: np.random.Generator, n: int, t: int, vocab: int, *, prompt: int) -> dict:
    ids = rng.integers(3, vocab, size=(n, t)).astype(np.int32)
    ones = np.ones((n, t), np.int32)
    loss = np.zeros((n, t), np.int32)
    loss[:, prompt:] = 1
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": loss,
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy(),
            "segment_ids": ones.copy()}


def _model_kwargs(batch: dict) -> dict:
    return {k: batch[k] for k in ("attention_mask", "positions", "segment_ids") if k in batch}


# ---------------------------------------------------------------------------------------------
# losses built from the model API (the head switched by the model's logits_chunk_size)
# ---------------------------------------------------------------------------------------------


def sft_loss(model, batch, rng=None):
    ids = batch["input_ids"]
    mask = batch["loss_mask"].astype(jnp.float32)
    out = model.token_logps(ids, **_model_kwargs(batch), with_argmax=True, where=mask)
    loss = losses.masked_mean(-out.logps, mask)
    accuracy = losses.masked_mean((out.argmax == ids).astype(jnp.float32), mask)
    return loss, {"sft/loss": loss, "sft/accuracy": accuracy}


class PolicyAndReference(nnx.Module):
    """The trained policy and a frozen reference (a second model)."""

    def __init__(self, policy: nnx.Module, reference: nnx.Module):
        self.policy = policy
        self.reference = reference


def _pair_sums(model, batch, start=0):
    ids = batch["input_ids"]
    mask = batch["loss_mask"][:, start:].astype(jnp.float32)
    logps = model.token_logps(ids, **_model_kwargs(batch), start=start, where=mask).logps
    sums = losses.masked_sum(logps, mask, axis=-1)
    return jnp.split(sums, 2)


def make_dpo_loss(reference: str, *, start: int = 0):
    """The sigmoid DPO loss (beta 0.1) on `2P` rows; `start`: score the tokens from column
    `start` on only (the rows' `loss_mask` must be 0 before it)."""
    def loss_fn(model, batch, rng=None):
        policy = model.policy if isinstance(model, PolicyAndReference) else model
        pc, pr = _pair_sums(policy, batch, start)
        if reference == "precomputed":
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            if reference == "model":
                ref = model.reference
            else:  # the LoRA base: the policy with its adapters zeroed
                graphdef, lora, rest = nnx.split(policy, LoRAParam, ...)
                ref = nnx.merge(graphdef, lora_disabled(lora), rest)
            rc, rr = (jax.lax.stop_gradient(x) for x in _pair_sums(ref, batch, start))
        per = losses.dpo_loss(pc, pr, rc, rr, beta=0.1)
        loss = jnp.mean(per)
        return loss, {"dpo/loss": loss, "dpo/reward_margin": jnp.mean(0.1 * (pc - rc - pr + rr))}

    return loss_fn


class PolicyAndValue(nnx.Module):
    """PPO's trained pair: the policy and a separate value model."""

    def __init__(self, policy: nnx.Module, value: nnx.Module):
        self.policy = policy
        self.value = value


def make_ppo_loss(p: int):
    """PPO clip loss + 0.1 x clipped value loss on responses starting at column `p`."""
    return lambda model, batch, rng=None: _ppo_loss(model, batch, p)


def _ppo_loss(model, batch, p):
    seqs, mask = batch["sequences"], batch["sequence_mask"]
    kwargs = {"attention_mask": mask, "positions": batch["positions"]}
    rmask = batch["response_mask"].astype(jnp.float32)
    logps = model.policy.token_logps(seqs, **kwargs, start=p, where=rmask).logps
    values = model.value(seqs, **kwargs)[:, p - 1:-1].astype(jnp.float32)
    pg = losses.masked_mean(losses.ppo_clip_loss(logps, batch["old_logps"],
                                                 batch["advantages"], clip_eps=0.2), rmask)
    vf = losses.masked_mean(losses.clipped_value_loss(values, batch["old_values"],
                                                      batch["returns"], clip=0.2), rmask)
    loss = pg + 0.1 * vf
    return loss, {"ppo/policy_loss": pg, "ppo/value_loss": vf}


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (`ru_maxrss`, KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first device where the backend reports it (GPU, TPU); None on
    CPU."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def compiled_bytes(compiled) -> dict[str, int]:
    """XLA's buffer assignment of a compiled step: arguments, outputs, temporaries (minus the
    donated aliases), and their total: what the step needs on the device, independent of the
    allocator."""
    m = compiled.memory_analysis()
    out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its waited-for children so far: every
    thread of the XLA CPU runtime counts, so on a shared host it moves far less with the load
    than wall seconds do."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn, *, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """`(wall seconds, process CPU seconds)` of each of `steps` calls after `warmup` ones."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), process_cpu_seconds()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        cpu.append(process_cpu_seconds() - start_cpu)
    return times, cpu


def _train_config(case: Case, num_steps: int):
    return TrainConfig(num_steps=max(num_steps, 1), optimizer=OptimizerConfig(
        learning_rate=1e-6, schedule="constant", grad_accum_steps=case.grad_accum),
        model=ModelSpec(freeze_layers=case.freeze_layers))


def _with_lora(model: CausalLM, case: Case) -> CausalLM:
    if case.lora_rank:
        apply_lora(model, rank=case.lora_rank, targets="all", rngs=nnx.Rngs(7))
    return model


def measure(case: Case, *, steps: int = 3, warmup: int = 1, run: bool = True,
            heap_trim: bool = True) -> dict[str, Any]:
    """Builds, compiles and (with `run`) times `case` in this process; returns one result row
    (seconds are medians and bests of `steps` timed steps after `warmup` untimed ones). With
    `heap_trim` the memory the compiler freed goes back to the kernel after compiling
    (`rlhf_jax.host_memory.release_freed_memory`, as the train loop does)."""
    if case.step == "ppo":
        return _measure_ppo(case, steps=steps, warmup=warmup, run=run, heap_trim=heap_trim)
    config = case.model_config()
    rng = np.random.default_rng(0)
    half = case.seq // 2
    policy = _with_lora(CausalLM(config, rngs=nnx.Rngs(0)), case)
    weights = matmul_weights(policy)
    trainable = None
    if case.step == "sft":
        model, loss_fn = policy, sft_loss
        batch = _rows(rng, case.batch, case.seq, config.vocab_size, prompt=half)
        tokens = case.batch * case.seq
        fwd = forward_flops(config, weights, case.seq, tokens=tokens,
                            scored=int(batch["loss_mask"].sum()))
        flops = 3 * fwd
    else:
        batch = _rows(rng, 2 * case.batch, case.seq, config.vocab_size, prompt=half)
        tokens = 2 * case.batch * case.seq
        fwd = forward_flops(config, weights, case.seq, tokens=tokens,
                            scored=int(batch["loss_mask"].sum()))
        flops = 3 * fwd
        if case.reference == "model":
            model = PolicyAndReference(policy, CausalLM(config, rngs=nnx.Rngs(0)))
            trainable = nnx.All(nnx.Param, nnx.PathContains("policy"))
            flops += fwd
        elif case.reference == "lora_base":
            model = policy
            flops += fwd
        else:
            model = policy
            batch["ref_chosen_logps"] = rng.normal(-50, 1, case.batch).astype(np.float32)
            batch["ref_rejected_logps"] = rng.normal(-50, 1, case.batch).astype(np.float32)
        loss_fn = make_dpo_loss(case.reference, start=half if case.response_only else 0)
    if case.lora_rank and trainable is None:
        trainable = trainable_filter(model)
    elif case.lora_rank:
        trainable = nnx.All(LoRAParam, nnx.PathContains("policy"))
    setup = setup_training(_train_config(case, warmup + steps), model, loss_fn,
                           trainable=trainable)
    device_batch = setup.put_batch(batch)
    start = time.perf_counter()
    compiled = setup.step_fn.lower(setup.state, device_batch).compile()
    compile_s = time.perf_counter() - start
    row = _row_base(case, config, weights, tokens=tokens, flops=flops, compile_s=compile_s,
                    memory=compiled_bytes(compiled))
    row["heap_trim"] = heap_trim and release_freed_memory()
    if run:
        holder = {"state": setup.state}

        def one():
            holder["state"], metrics = compiled(holder["state"], device_batch)
            return metrics

        times, cpu = _timed(one, steps=steps, warmup=warmup)
        row.update(_time_fields(times, tokens=tokens, flops=flops, cpu=cpu))
    row.update(peak_rss=peak_rss_bytes(), device_peak=device_peak_bytes(),
               load_average=os.getloadavg()[0])
    return row


def _row_base(case, config, weights, *, tokens, flops, compile_s, memory) -> dict[str, Any]:
    return {"case": dataclasses.asdict(case), "head": case.head, "params": _param_count(config),
            "matmul_weights": weights, "tokens": tokens, "flops": flops,
            "compile_s": compile_s, "memory": memory}


def _param_count(config: ModelConfig) -> int:
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _time_fields(times: list[float], *, tokens: int, flops: float,
                 cpu: list[float] | None = None) -> dict[str, float]:
    """Medians and bests of wall `times`; with `cpu` (process CPU seconds per step) also
    `cpu_seconds` and `tokens_per_cpu_s`, the steadier figures on a shared host."""
    median, best = statistics.median(times), min(times)
    out = {"seconds": median, "best_seconds": best, "tokens_per_s": tokens / median,
           "flops_per_s": flops / median, "best_flops_per_s": flops / best}
    if cpu:
        cpu_median = statistics.median(cpu)
        out.update(cpu_seconds=cpu_median, tokens_per_cpu_s=tokens / cpu_median)
    return out


def _measure_ppo(case: Case, *, steps: int, warmup: int, run: bool,
                 heap_trim: bool) -> dict[str, Any]:
    config = case.model_config()
    p = n = case.seq // 2
    b = case.batch
    policy = _with_lora(CausalLM(config, rngs=nnx.Rngs(0)), case)
    reference = CausalLM(config, rngs=nnx.Rngs(0))
    value = ValueModel(config, rngs=nnx.Rngs(1))
    reward = RewardModel(config, rngs=nnx.Rngs(2))
    weights = matmul_weights(policy)
    value_weights = matmul_weights(value)
    tokens = b * case.seq
    # The policy's head runs on the N response columns; the value model has no LM head.
    fwd_policy = forward_flops(config, weights, case.seq, tokens=tokens, scored=b * n)
    fwd_value = forward_flops_per_token(config, value_weights, case.seq) * tokens
    update_flops = case.epochs * 3 * (fwd_policy + fwd_value)
    scoring_flops = 2 * fwd_policy + 2 * fwd_value

    pair = PolicyAndValue(policy, value)
    trainable = nnx.Param
    if case.lora_rank:
        trainable = nnx.Any(LoRAParam, nnx.PathContains("value"))
    setup = setup_training(_train_config(case, (warmup + steps) * case.epochs
                                         * case.minibatches), pair, make_ppo_loss(p),
                           trainable=trainable)
    ref_graphdef, ref_state = nnx.split(reference)
    rm_graphdef, rm_state = nnx.split(reward)
    ref_state = jax.device_put(ref_state)
    rm_state = jax.device_put(rm_state)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, size=(b, p)), jnp.int32)
    prompt_mask = jnp.ones((b, p), jnp.int32)
    graphdef = setup.graphdef

    def policy_graph_state(state):
        pair = nnx.merge(graphdef, state.params, state.frozen)
        return nnx.split(pair.policy)

    @jax.jit
    def score(state, ref_state, rm_state, sequences, sequence_mask, response_mask):
        pair = nnx.merge(graphdef, state.params, state.frozen)
        ref = nnx.merge(ref_graphdef, ref_state)
        rm = nnx.merge(rm_graphdef, rm_state)
        positions = jnp.maximum(jnp.cumsum(sequence_mask, axis=-1) - 1, 0).astype(jnp.int32)
        kwargs = {"attention_mask": sequence_mask, "positions": positions}
        old = pair.policy.token_logps(sequences, **kwargs, start=p).logps
        ref_logps = ref.token_logps(sequences, **kwargs, start=p).logps
        values = pair.value(sequences, **kwargs)[:, p - 1:-1].astype(jnp.float32)
        scores = rm(sequences, **kwargs)[:, 0].astype(jnp.float32)
        rewards = losses.kl_penalized_rewards(scores, old, ref_logps, response_mask,
                                              kl_coef=0.05)
        adv = losses.gae(rewards.rewards, values, response_mask, gamma=1.0, lam=0.95)
        return {"sequences": sequences, "sequence_mask": sequence_mask, "positions": positions,
                "response_mask": response_mask, "old_logps": old, "old_values": values,
                "advantages": adv.advantages, "returns": adv.returns}

    keys = iter(jax.random.split(jax.random.key(0), 1000))

    def rollout(state):
        pg, ps = policy_graph_state(state)
        return generate_with_state(pg, ps, prompts, prompt_mask, SamplingParams(max_new_tokens=n),
                                   rng=next(keys), eos_token_id=None, pad_token_id=0)

    # Compile every phase once (the rollout's jit compiles on its first call).
    start = time.perf_counter()
    out = jax.block_until_ready(rollout(setup.state))
    rollout_first = time.perf_counter() - start
    start = time.perf_counter()
    score_compiled = score.lower(setup.state, ref_state, rm_state, out.sequences,
                                 out.sequence_mask, out.mask).compile()
    experience = jax.block_until_ready(score_compiled(setup.state, ref_state, rm_state,
                                                      out.sequences, out.sequence_mask,
                                                      out.mask))
    mb = b // case.minibatches
    minibatch = setup.put_batch({k: v[:mb] for k, v in experience.items()})
    update_compiled = setup.step_fn.lower(setup.state, minibatch).compile()
    compile_s = time.perf_counter() - start
    row = _row_base(case, config, weights, tokens=tokens, flops=update_flops,
                    compile_s=compile_s, memory=compiled_bytes(update_compiled))
    row["scoring_memory"] = compiled_bytes(score_compiled)
    row["heap_trim"] = heap_trim and release_freed_memory()
    if run:
        state = setup.state
        phases: dict[str, list[float]] = {"rollout": [], "scoring": [], "update": []}
        cpu: dict[str, list[float]] = {"rollout": [], "scoring": [], "update": []}
        sampled = []
        for i in range(warmup + steps):
            t0, c0 = time.perf_counter(), process_cpu_seconds()
            out = jax.block_until_ready(rollout(state))
            t1, c1 = time.perf_counter(), process_cpu_seconds()
            experience = jax.block_until_ready(score_compiled(
                state, ref_state, rm_state, out.sequences, out.sequence_mask, out.mask))
            t2, c2 = time.perf_counter(), process_cpu_seconds()
            for _ in range(case.epochs):
                for j in range(case.minibatches):
                    part = setup.put_batch({k: v[j * mb:(j + 1) * mb]
                                            for k, v in experience.items()})
                    state, metrics = update_compiled(state, part)
            jax.block_until_ready((state, metrics))
            t3, c3 = time.perf_counter(), process_cpu_seconds()
            if i >= warmup:
                phases["rollout"].append(t1 - t0)
                phases["scoring"].append(t2 - t1)
                phases["update"].append(t3 - t2)
                cpu["rollout"].append(c1 - c0)
                cpu["scoring"].append(c2 - c1)
                cpu["update"].append(c3 - c2)
                sampled.append(int(np.asarray(out.mask).sum()))
        med = {k: statistics.median(v) for k, v in phases.items()}
        cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
        total = sum(med.values())
        row.update(_time_fields(phases["update"], tokens=case.epochs * tokens,
                                flops=update_flops, cpu=cpu["update"]))
        row.update(rollout_s=med["rollout"], scoring_s=med["scoring"], update_s=med["update"],
                   rollout_cpu_s=cpu_med["rollout"], scoring_cpu_s=cpu_med["scoring"],
                   update_cpu_s=cpu_med["update"], iteration_cpu_s=sum(cpu_med.values()),
                   iteration_s=total, iteration_tokens_per_s=tokens / total,
                   sampled_tokens_per_s=statistics.median(sampled) / med["rollout"],
                   scoring_flops_per_s=scoring_flops / med["scoring"],
                   rollout_compile_s=max(rollout_first - med["rollout"], 0.0))
    row.update(peak_rss=peak_rss_bytes(), device_peak=device_peak_bytes(),
               load_average=os.getloadavg()[0])
    return row


# ---------------------------------------------------------------------------------------------
# one configuration per process
# ---------------------------------------------------------------------------------------------

RESULT_PREFIX = "RLHF_JAX_BENCH_RESULT "


def worker_main(case_json: str, *, steps: int, warmup: int, run: bool,
                heap_trim: bool = True) -> None:
    """Entry point of the child process: measures one case and prints its row as JSON."""
    case = Case(**json.loads(case_json))
    row = measure(case, steps=steps, warmup=warmup, run=run, heap_trim=heap_trim)
    print(RESULT_PREFIX + json.dumps(row), flush=True)


def run_isolated(bench: str, case: Case, *, steps: int, warmup: int, run: bool = True,
                 timeout: float | None = None, heap_trim: bool = True) -> dict[str, Any]:
    """Measures `case` in a fresh `python -m rlhf_jax.bench <bench> --worker ...` process, so
    that its RSS high-water mark is this configuration's alone (`heap_trim=False` passes
    `--no-heap-trim`: the compiler's freed memory stays in the process). A failed or killed
    child (e.g. out of memory) gives a row with `error` set instead of numbers."""
    cmd = [sys.executable, "-m", "rlhf_jax.bench", bench, "--worker",
           json.dumps(dataclasses.asdict(case)), "--steps", str(steps), "--warmup", str(warmup)]
    if not run:
        cmd.append("--compile-only")
    if not heap_trim:
        cmd.append("--no-heap-trim")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"case": dataclasses.asdict(case), "head": case.head,
                "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    reason = f"exit code {proc.returncode}" + (" (killed: out of memory?)"
                                               if proc.returncode in (-9, 137) else "")
    return {"case": dataclasses.asdict(case), "head": case.head, "error": f"{reason}: {tail}"}


def gib(x: float | None) -> str:
    return "" if x is None else f"{x / 2**30:.2f}"
