"""GRPO side by side with Tunix (`google-tunix`, an optional peer: `pip install
google-tunix==0.1.7`): Tunix's `GRPOLearner` against our `GRPOTrainer` on the same Qwen2-shaped
weights, prompts and reward, each in its own process.

    python -m rlhf_jax.bench tunix_grpo [--model qwen2-0.5b-l4] [--prompts 2] [--group 4]
        [--prompt-len 64] [--new-tokens 64] [--repeats 2] [--warmup 1] [--markdown FILE]

One iteration on both sides: `prompts` random-token prompts of `prompt_len` tokens, `group`
sampled responses of `new_tokens` tokens each at temperature 1 (no top-k / top-p), the reward
(the fraction of even token ids in a response: a host function, cheap, the same on both sides),
group-normalised advantages, the reference's log-probs (KL coefficient `beta` = 0.04, k3), and
one AdamW step (learning rate 1e-6) of the clipped GRPO loss (epsilon 0.2) over all
`prompts * group` rows (`num_iterations` = 1, one minibatch). The EOS id (1) is a token the
random prompts never hold; a response that samples it stops there on both sides.

The weights: our random `CausalLM` is written with `save_pretrained` and Tunix loads the files
twice (policy, reference; `rlhf_jax.bench.tunix.tunix_qwen2_copies`, which also checks that the
logits agree). Tunix reads prompts as text: a tokenizer that maps the string "12 7 9" to the ids
[12, 7, 9] and back (no BOS), so both sides see the same prompt ids.

The phases, timed in wall and process CPU seconds (the medians over the timed iterations after
`--warmup` untimed ones, which compile):

- ours (`GRPOTrainer.rollout`, `.score`, the jitted update it runs in `.step`): **rollout**
  (`rlhf_jax.generation`, one jitted prefill + `while_loop` decode over the KV cache),
  **scoring** (the reward, then one jitted call: the reference's log-probs and the advantages;
  with one update per rollout the old-policy log-probs are the update's own, stopped, as in
  TRL and Tunix, so no policy forward here), **update** (one jitted optimizer step);
- Tunix (`RLCluster.generate`, `.get_ref_per_token_logps`, `.update_actor`, `.sync_weights`,
  wrapped): **rollout** (its vanilla sampler, which the actor's weights back: the rollout and
  the actor share one mesh, so no second copy), **scoring** (the reference's log-probs; the
  reward and advantages are host code inside its data preparation, counted in "other"; with
  `num_iterations` = 1 it computes no old-policy log-probs: its loss stops the gradient of the
  current ones), **update** (`update_actor`, blocked on the new parameters) and the weight
  **sync** to the sampler. "iteration" is the wall time of its `train()` loop per iteration.

Tunix 0.1.7 runs this with `RematConfig.NONE` only: with `DECODER` or `BLOCK` its Qwen2 wraps
the layer in `nnx.remat`, which raises flax's `TraceContextError` ("Cannot mutate Param from a
different trace level") when the vanilla sampler's jitted decode step
(`tunix/generate/sampler.py`, `_sample_step`) calls the model (`tunix/models/qwen2/model.py`,
`DecoderLayer.__call__`); the rollout shares the actor's model, so the actor's remat reaches it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.bench._machine import machine_description
from rlhf_jax.bench._realshape import (
    MODELS,
    RESULT_PREFIX,
    gib,
    peak_rss_bytes,
    process_cpu_seconds,
)
from rlhf_jax.bench.tunix import QWEN2_MODELS, error_line, tunix_mesh, tunix_qwen2_copies
from rlhf_jax.generation import TokenRewardFunction
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.train.config import OptimizerConfig
from rlhf_jax.train.grpo import GRPOConfig, GRPOTrainer
from rlhf_jax.train.rollout import RolloutConfig

EOS_ID = 1
PAD_ID = 0
BETA = 0.04
EPSILON = 0.2
LEARNING_RATE = 1e-6
PHASES = ("rollout", "scoring", "update", "sync", "other")
OURS_CHUNK = 128
"""Positions per chunk of our fused LM head + log-probs (`ModelConfig.logits_chunk_size`)."""


def model_config(spec: dict) -> ModelConfig:
    """The model of `spec` (a `MODELS` key) with our head and remat settings and room for the
    prompt plus the response."""
    base = MODELS[spec["model"]]()
    return base.replace(logits_chunk_size=spec.get("chunk", OURS_CHUNK),
                        remat=spec.get("remat_ours", "dots"),
                        max_position_embeddings=max(base.max_position_embeddings,
                                                    spec["prompt_len"] + spec["new_tokens"]))


def prompt_batches(spec: dict, vocab_size: int, count: int) -> list[np.ndarray]:
    """`count` batches of `[prompts, prompt_len]` random prompt ids in `[3, V)` (never the
    EOS or pad id), the same on both sides."""
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab_size, size=(spec["prompts"], spec["prompt_len"]))
            .astype(np.int32) for _ in range(count)]


def even_fraction(response_ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
    """`[B]` the fraction of even token ids among each response's tokens (the benchmark's
    reward)."""
    mask = np.asarray(response_mask, np.float32)
    even = (np.asarray(response_ids) % 2 == 0).astype(np.float32)
    return (even * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)


def _summary(phases: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in phases:
        if phases[name]:
            out[f"{name}_s"] = statistics.median(phases[name])
            out[f"{name}_cpu_s"] = statistics.median(cpu[name])
    return out


# ---------------------------------------------------------------------------------------------
# ours
# ---------------------------------------------------------------------------------------------


def measure_ours(spec: dict, *, steps: int, warmup: int) -> dict[str, Any]:
    """Times our `GRPOTrainer` on `spec` in this process: rollout, scoring and update per
    iteration (medians of `steps` after `warmup`)."""
    config = model_config(spec)
    b, g = spec["prompts"], spec["group"]
    batches = prompt_batches(spec, config.vocab_size, warmup + steps)
    with tempfile.TemporaryDirectory() as tmp:
        grpo = GRPOConfig(
            output_dir=tmp, num_steps=warmup + steps, num_generations=g, num_iterations=1,
            num_minibatches=1, beta=BETA, epsilon=EPSILON, loss_type="grpo",
            rollout=RolloutConfig(max_new_tokens=spec["new_tokens"], temperature=1.0),
            optimizer=OptimizerConfig(learning_rate=LEARNING_RATE, schedule="constant"))
        grpo = dataclasses.replace(grpo, data=dataclasses.replace(grpo.data, batch_size=b))
        policy = CausalLM(config, rngs=nnx.Rngs(0))
        params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(policy, nnx.Param)))
        trainer = GRPOTrainer(
            grpo, policy=policy,
            reward=TokenRewardFunction(lambda p, r, m: even_fraction(r, m), name="even"),
            prompts=iter(()), eos_token_id=EOS_ID, pad_token_id=PAD_ID,
            mesh=sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1]))
        # The trainer holds its own copies (train state, reference): the module's arrays would
        # be a third copy of the weights for the whole run, which a training script that builds
        # the policy inline does not keep.
        del policy
    phases: dict[str, list[float]] = {k: [] for k in ("rollout", "scoring", "update")}
    cpu: dict[str, list[float]] = {k: [] for k in phases}
    state = trainer.state
    start = time.perf_counter()
    first_iteration = None
    for i, ids in enumerate(batches):
        prompts = {"prompt_ids": ids, "prompt_mask": np.ones_like(ids)}
        marks = [(time.perf_counter(), process_cpu_seconds())]
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
        rollout = jax.block_until_ready(trainer.rollout(state, prompts, key))
        marks.append((time.perf_counter(), process_cpu_seconds()))
        experience, _ = jax.block_until_ready(trainer.score(state, rollout, prompts))
        marks.append((time.perf_counter(), process_cpu_seconds()))
        state, metrics = jax.block_until_ready(trainer._update(state, experience))
        marks.append((time.perf_counter(), process_cpu_seconds()))
        if i == 0:
            first_iteration = marks[-1][0] - start
        if i >= warmup:
            for name, (t0, c0), (t1, c1) in zip(phases, marks, marks[1:]):
                phases[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
    if not np.isfinite(float(metrics["grpo/loss"])):
        raise RuntimeError(f"our GRPO loss is not finite: {float(metrics['grpo/loss'])}")
    row = _summary(phases, cpu)
    row.update(iteration_s=sum(row[f"{k}_s"] for k in phases),
               iteration_cpu_s=sum(row[f"{k}_cpu_s"] for k in phases),
               first_iteration_s=first_iteration, params=params,
               response_tokens=float(np.asarray(rollout.response_mask).sum()),
               peak_rss=peak_rss_bytes(), load_average=os.getloadavg()[0])
    return row


# ---------------------------------------------------------------------------------------------
# Tunix
# ---------------------------------------------------------------------------------------------


class IdTokenizer:
    """A tokenizer for Tunix on random token ids: the text "12 7 9" is the ids [12, 7, 9]."""

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(x) for x in str(text).split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(x)) for x in ids)

    def bos_id(self) -> int:
        return 0  # falsy: Tunix's sampler prepends no BOS

    def eos_id(self) -> int:
        return EOS_ID

    def pad_id(self) -> int:
        return PAD_ID


def _timed_method(obj: Any, name: str, phases: dict, cpu: dict, phase: str,
                  block: Callable[[Any], Any]) -> None:
    """Wraps `obj.name` so that each call's wall and process CPU seconds are appended to
    `phases[phase]` / `cpu[phase]`, after `block(output)` waits for its device work."""
    method = getattr(obj, name)

    def timed(*args, **kwargs):
        t0, c0 = time.perf_counter(), process_cpu_seconds()
        out = method(*args, **kwargs)
        block(out)
        phases[phase].append(time.perf_counter() - t0)
        cpu[phase].append(process_cpu_seconds() - c0)
        return out

    setattr(obj, name, timed)


def tunix_worker(spec: dict, *, steps: int, warmup: int) -> dict[str, Any] | None:
    """Times Tunix's `GRPOLearner` on `spec` in this process (None without Tunix)."""
    try:  # an optional peer, imported only where it is measured
        import optax
        from tunix.rl import rl_cluster as rl_cluster_lib
        from tunix.rl.grpo import grpo_learner
        from tunix.rl.rollout import base_rollout
    except ImportError:
        return None
    config = model_config(spec)
    mesh = tunix_mesh()
    (policy, reference), check = tunix_qwen2_copies(config, remat=spec["remat"], mesh=mesh,
                                                    copies=2)
    b, g, p, n = spec["prompts"], spec["group"], spec["prompt_len"], spec["new_tokens"]
    roles = rl_cluster_lib.Role
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adamw(LEARNING_RATE), eval_every_n_steps=10**9,
            max_steps=warmup + steps, mini_batch_size=b, train_micro_batch_size=b,
            pbar_description=None),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=n, max_prompt_length=p, kv_cache_size=p + n + 8,
            temperature=1.0, top_p=1.0, top_k=None, eos_tokens=[EOS_ID]))
    with mesh:
        cluster = rl_cluster_lib.RLCluster(actor=policy, reference=reference,
                                           tokenizer=IdTokenizer(),
                                           cluster_config=cluster_config)

    def reward(prompts, completions, **kwargs):
        rows = [[int(x) for x in c.split()] for c in completions]
        return [float(np.mean([x % 2 == 0 for x in r])) if r else 0.0 for r in rows]

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster,
        algo_config=grpo_learner.GRPOConfig(num_generations=g, num_iterations=1, beta=BETA,
                                            epsilon=EPSILON),
        reward_fns=reward)
    phases: dict[str, list[float]] = {k: [] for k in PHASES[:4]}
    cpu: dict[str, list[float]] = {k: [] for k in PHASES[:4]}
    params_ready = lambda _: jax.block_until_ready(nnx.state(cluster.actor_trainer.model))  # noqa: E731
    _timed_method(cluster, "generate", phases, cpu, "rollout", jax.block_until_ready)
    _timed_method(cluster, "get_ref_per_token_logps", phases, cpu, "scoring",
                  jax.block_until_ready)
    _timed_method(cluster, "update_actor", phases, cpu, "update", params_ready)
    _timed_method(cluster, "sync_weights", phases, cpu, "sync", params_ready)
    pulls: list[tuple[float, float]] = []
    batches = prompt_batches(spec, config.vocab_size, warmup + steps)

    def data():
        for ids in batches:
            pulls.append((time.perf_counter(), process_cpu_seconds()))
            # An array, not a list: Tunix repeats every leaf of the batch G times.
            yield {"prompts": np.array([" ".join(str(int(x)) for x in row) for row in ids])}

    with mesh:
        learner.train(data())
    end, end_cpu = time.perf_counter(), process_cpu_seconds()
    if len(pulls) < warmup + steps or len(phases["update"]) < warmup + steps:
        raise RuntimeError(f"Tunix ran {len(phases['update'])} updates on {len(pulls)} batches, "
                           f"expected {warmup + steps}")
    timed = {k: v[warmup:] for k, v in phases.items()}
    timed_cpu = {k: v[warmup:] for k, v in cpu.items()}
    row = _summary(timed, timed_cpu)
    row["iteration_s"] = (end - pulls[warmup][0]) / steps
    row["iteration_cpu_s"] = (end_cpu - pulls[warmup][1]) / steps
    # "other": the loop's time outside the wrapped calls, from the means (the phases above
    # are medians, whose sum can exceed the mean iteration).
    row["other_s"] = row["iteration_s"] - sum(sum(v) for v in timed.values()) / steps
    row["other_cpu_s"] = row["iteration_cpu_s"] - sum(sum(v) for v in timed_cpu.values()) / steps
    row.update(check, first_iteration_s=pulls[1][0] - pulls[0][0] if len(pulls) > 1 else None,
               peak_rss=peak_rss_bytes(), load_average=os.getloadavg()[0])
    return row


# ---------------------------------------------------------------------------------------------
# one configuration per process
# ---------------------------------------------------------------------------------------------


def _isolated(side: str, spec: dict, *, steps: int, warmup: int,
              timeout: float | None) -> dict | None:
    cmd = [sys.executable, "-m", "rlhf_jax.bench", "tunix_grpo", "--worker", side,
           "--spec", json.dumps(spec), "--repeats", str(steps), "--warmup", str(warmup)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = error_line(proc.stderr)
    reason = f"exit code {proc.returncode}" + (" (killed: out of memory?)"
                                               if proc.returncode in (-9, 137) else "")
    return {"error": f"{reason}: {tail}"}


def _f(row: dict, key: str, fmt: str = ".3g") -> str:
    value = row.get(key)
    return "" if value is None else format(value, fmt)


def to_markdown(rows: list[tuple[str, dict]], info: dict) -> str:
    """The result table: per implementation, the CPU seconds of each phase and of the
    iteration, wall seconds, sampled tokens per CPU second, peak RSS and the load."""
    lines = [f"Machine: {info['machine']}. {info['what']}", "",
             "| implementation | graph | CPU s: rollout / scoring / update / sync / other | "
             "iteration CPU s | iteration wall s (load) | first iteration s (compile) | "
             "peak RSS GiB | parameters | max logit diff to ours |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows:
        if "error" in r:
            lines.append(f"| {label} | {r.get('graph', '')} | failed: {r['error']} "
                         "| | | | | | |")
            continue
        split = " / ".join(_f(r, f"{k}_cpu_s") or "-" for k in PHASES)
        lines.append(
            f"| {label} | {r['graph']} | {split} | {_f(r, 'iteration_cpu_s')} | "
            f"{_f(r, 'iteration_s')} ({_f(r, 'load_average', '.1f')}) | "
            f"{_f(r, 'first_iteration_s', '.1f')} | {gib(r.get('peak_rss'))} | "
            f"{r.get('params', '')} | {_f(r, 'max_logit_diff', '.1e')} |")
    return "\n".join(lines) + "\n"


OURS_LIKE = {"none": ("dots", "none"), "decoder": ("full",)}
"""Our remat policies run beside each Tunix `RematConfig`: our default (`dots`) and the
like-for-like one (`none`: every intermediate kept; `full`: each layer rematerialised, as
Tunix's `DECODER`)."""


def ratio_line(label: str, tunix: dict, ours: dict) -> str:
    """One line: Tunix's iteration seconds over ours (CPU and wall, > 1 means ours is faster)
    and our peak RSS over Tunix's; empty where either row failed."""
    if "error" in tunix or "error" in ours:
        return ""
    return (f"- {label}: ours is {tunix['iteration_cpu_s'] / ours['iteration_cpu_s']:.2f}x "
            f"Tunix per CPU second, {tunix['iteration_s'] / ours['iteration_s']:.2f}x in wall "
            f"seconds; peak RSS ours / Tunix {ours['peak_rss'] / tunix['peak_rss']:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.bench tunix_grpo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2-0.5b-l4", choices=QWEN2_MODELS)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--remat", nargs="+", default=["none"], choices=["none", "decoder"],
                        help="Tunix RematConfig(s) to run; ours runs remat dots and none beside "
                             "none, full beside decoder (the like-for-like pairs). Tunix 0.1.7's "
                             "decoder (and block) remat fails in its vanilla sampler's decode "
                             "step (flax TraceContextError), so only none runs there")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--markdown")
    parser.add_argument("--worker", choices=["ours", "tunix"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec)
        measure = measure_ours if args.worker == "ours" else tunix_worker
        row = measure(spec, steps=args.repeats, warmup=args.warmup)
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        return
    base = {"model": args.model, "prompts": args.prompts, "group": args.group,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    rows: list[tuple[str, dict[str, Any]]] = []
    ratios: list[str] = []
    for remat in args.remat:
        spec = {**base, "remat": remat}
        row = _isolated("tunix", spec, steps=args.repeats, warmup=args.warmup,
                        timeout=args.timeout)
        tunix_row = row
        if row is None:
            print("Tunix is not installed (pip install google-tunix==0.1.7); no Tunix rows.")
        else:
            row["graph"] = (f"vanilla sampler on the actor's weights, reference log-probs in a "
                            f"separate call, layers unrolled, remat {remat}, full logits")
            rows.append((f"Tunix GRPOLearner (remat {remat})", row))
            print(json.dumps({"row": rows[-1][0], **{k: v for k, v in row.items()
                                                     if k.endswith("_s")}}), flush=True)
        for ours_remat in OURS_LIKE[remat]:
            row = _isolated("ours", {**spec, "remat_ours": ours_remat, "chunk": OURS_CHUNK},
                            steps=args.repeats, warmup=args.warmup, timeout=args.timeout)
            row["graph"] = (f"rlhf_jax.generation rollout, reference log-probs in the "
                            f"scoring call (old log-probs from the update's forward), layers "
                            f"scanned, remat {ours_remat}, fused head ({OURS_CHUNK})")
            rows.append((f"rlhf_jax GRPOTrainer (remat {ours_remat})", row))
            print(json.dumps({"row": rows[-1][0], **{k: v for k, v in row.items()
                                                     if k.endswith("_s")}}), flush=True)
            if tunix_row is not None:
                ratios.append(ratio_line(f"Tunix remat {remat}, ours remat {ours_remat}",
                                         tunix_row, row))
    info = {"machine": machine_description(),
            "what": f"GRPO at {args.model}, {args.prompts} prompts x {args.group} responses, "
                    f"{args.prompt_len} prompt + {args.new_tokens} new tokens, float32, AdamW, "
                    f"one update per iteration; medians of {args.repeats} iterations after "
                    f"{args.warmup} untimed."}
    table = to_markdown(rows, info) + "".join(f"\n{line}" for line in ratios if line)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()


__all__ = ["IdTokenizer", "even_fraction", "main", "measure_ours", "ratio_line", "to_markdown",
           "tunix_worker"]
