"""The RLHF pipeline on a synthetic task with a gold reward, on CPU, with a report.

    python -m experiments.demo [--quick] [--output-dir DIR] [--seed S] [--set FIELD=VALUE ...]

Every stage trains with the library's own trainers, on models and records held in memory
(the SFT, reward-model and DPO runs also write their `config.yaml`, `metrics.jsonl` and
`summary.json` under `<output dir>/runs/<run>`; no checkpoint: `checkpoint.save_final=False`). Compiled programs are kept
in `runs/.jax_cache` (JAX's persistent compilation cache; `JAX_COMPILATION_CACHE_DIR` overrides
it), so the runs of a sweep, and later demo runs, reuse them. Stages (each prints a header and a
progress bar):

1. SFT (`rlhf_jax.train.run_sft`): a small Llama-style policy learns the task's noisy
   demonstrations; it is the reference policy pi_ref of everything below.
2. Preferences: pairs of responses sampled from pi_ref, each labelled by one simulated rater
   (Bradley-Terry on the gold reward with a per-rater temperature and lapses).
3. Reward models (`rlhf_jax.train.run_rm`; Stiennon et al. 2020, Fig. 6): one per training-set
   size, initialised from the SFT policy, validated on held-out rater labels; the ceiling is
   the accuracy of an oracle that knows every rater's preference probability. The largest is
   the proxy reward.
4. Reward-vs-KL frontier (Rafailov et al. 2023, Fig. 2): PPO (`rlhf_jax.train.ppo.PPOTrainer`)
   at several KL coefficients, DPO (`rlhf_jax.train.run_dpo`) at several betas, best-of-n
   (`rlhf_jax.generation.best_of_n`) at several n; every point is gold reward against KL to
   pi_ref.
5. Over-optimisation (Stiennon et al. 2020, Fig. 5): one PPO run with a small KL penalty,
   tracking the proxy score and the gold reward against KL.
6. Report: `report.md`, `results.json` and PNG figures in the output directory.

KL to the reference is measured the same way for every method: on fresh samples `y ~ pi(.|x)`
for a fixed set of evaluation prompts, the mean over samples of the sequence log-ratio
`sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)` (response tokens and EOS). For best-of-n
the policy's log-probability has the closed form `log pi_bon(y|x) = log pi_ref(y|x) + log n +
(n - 1) log F_x(r(y))` (continuous proxy scores, `F_x` their CDF under `pi_ref(.|x)`, estimated
per prompt from an independent pool of reference samples), so its log-ratio is
`log n + (n - 1) log F_x(r(y))`, averaged over the selected samples in the same way.

Prompts are encoded as the trainers encode them (`rlhf_jax.data`: the task's character
tokenizer, left-padded to the prompt width). The DPO runs evaluate the policy through the
trainer's evaluation callback (`eval_fn`); the PPO runs are driven one iteration at a time and
log the gold reward of every rollout through a metric function (`metric_fns`).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from tqdm.auto import tqdm

from experiments import report as report_lib
from experiments.demo_config import DemoConfig, parse_overrides
from rlhf_jax import data as rdata
from rlhf_jax import losses, sharding
from rlhf_jax.bench import cpu_model_name
from rlhf_jax.bench.compiles import CompileCounter
from rlhf_jax.data import synthetic
from rlhf_jax.generation import (
    GenerationOutput,
    RewardModelSource,
    Sampler,
    SamplingParams,
    best_of_n,
    select_best_of_n,
)
from rlhf_jax.host_memory import keep_freed_memory
from rlhf_jax.models import CausalLM, RewardModel
from rlhf_jax.train import (
    CheckpointConfig,
    DataSpec,
    DPOConfig,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
    RMConfig,
    SFTConfig,
    dpo_reference_logps,
    run_dpo,
    run_rm,
    run_sft,
    tokenize_records,
)
from rlhf_jax.train.logprobs import policy_response_logps
from rlhf_jax.train.ppo import PPOConfig, PPOTrainer
from rlhf_jax.train.rewards import gold_reward_metric
from rlhf_jax.train.rollout import Rollout, RolloutConfig

console = Console(highlight=False)


# ---------------------------------------------------------------------------------------------
# Prompts, samples and scores (fixed-size row chunks: one compile per jitted function)
# ---------------------------------------------------------------------------------------------

# Every jitted evaluation function sees batches of exactly this many rows (one compile each).
CHUNK_ROWS = 64


def in_chunks(fn: Callable[..., Any], *arrays: np.ndarray, chunk: int = CHUNK_ROWS) -> Any:
    """`fn` over row chunks of exactly `chunk` rows (the last one padded by repeating its last
    row), outputs trimmed and concatenated on the host (a pytree of arrays is fine)."""
    n = arrays[0].shape[0]
    out = []
    for i, start in enumerate(range(0, n, chunk)):
        parts = [a[start:start + chunk] for a in arrays]
        rows = parts[0].shape[0]
        if rows < chunk:
            parts = [np.concatenate([p, np.repeat(p[-1:], chunk - rows, 0)]) for p in parts]
        out.append(jax.tree.map(lambda x, r=rows: np.asarray(x)[:r], fn(i, *parts)))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *out)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, width: int) -> dict[str, np.ndarray]:
    """`{"prompt_ids", "prompt_mask"}` `[B, width]`: the prompts as the trainers encode them
    (`rlhf_jax.data` prompt records, tokenized and left-padded); a prompt longer than `width`
    tokens is an error naming it."""
    raw, _ = rdata.load_examples([{"prompt": p} for p in prompts], format="prompt",
                                 source_type="records", log=False)
    config = rdata.TokenizeConfig(max_prompt_length=width, max_length=width, overlong="error")
    tokenized, _ = rdata.tokenize_examples(raw, tokenizer, config=config, log=False)
    batch = rdata.collate_prompts(tokenized, pad_id=tokenizer.pad_token_id, length=width)
    return {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"]}


def to_rollout(samples: GenerationOutput) -> Rollout:
    return Rollout(samples.sequences, samples.sequence_mask, samples.tokens, samples.mask,
                   samples.finished)


def take(samples: GenerationOutput, rows: np.ndarray) -> GenerationOutput:
    """Rows `rows` of host samples."""
    return samples._replace(**{k: np.asarray(getattr(samples, k))[rows]
                               for k in GenerationOutput._fields if k != "prompt_length"})


def on_mesh(model: nnx.Module, mesh: jax.sharding.Mesh | None) -> Sampler:
    """A `Sampler` of `model` with its state placed on `mesh` by its logical axes, as the
    trainers place theirs (`rlhf_jax.sharding.shard_state`): its calls then run the program
    that a trainer's rollouts of the same shapes run."""
    if mesh is None:
        return Sampler(model)
    graphdef, state = nnx.split(model)
    return Sampler.from_state(graphdef, sharding.shard_state(state, mesh), mesh=mesh)


def replicated(x: jax.Array, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """`x` replicated over `mesh` (unchanged without one)."""
    if mesh is None:
        return x
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def sample(model: nnx.Module, prompts: Mapping[str, np.ndarray], *, rng: jax.Array,
           max_new_tokens: int, eos_token_id: int, pad_token_id: int,
           num_samples: int = 1, mesh: jax.sharding.Mesh | None = None) -> GenerationOutput:
    """`num_samples` responses per prompt from `model` at temperature 1 (rows `b * n .. b * n +
    n - 1` for prompt `b`; `rlhf_jax.generation.Sampler` on `mesh`), in chunks of `CHUNK_ROWS`
    rows (chunk `i` uses `fold_in(rng, i)`); host arrays."""
    sampler = on_mesh(model, mesh)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)

    def gen(i, ids, mask):
        out = sampler.generate(jnp.asarray(ids), jnp.asarray(mask), sampling,
                               rng=replicated(jax.random.fold_in(rng, i), mesh),
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        return tuple(out)[:-1]

    ids = np.repeat(prompts["prompt_ids"], num_samples, 0)
    arrays = in_chunks(gen, ids, np.repeat(prompts["prompt_mask"], num_samples, 0))
    return GenerationOutput(*arrays, prompt_length=ids.shape[1])


@jax.jit
@losses.unchecked  # no checkify effect: JAX's C++ dispatch path
def _response_logps(graphdef, state, sequences, sequence_mask, response_ids, response_mask):
    model = nnx.merge(graphdef, state)
    ro = Rollout(sequences, sequence_mask, response_ids, response_mask,
                 jnp.zeros(sequences.shape[0], bool))
    logps, _ = policy_response_logps(model, ro)
    return logps * response_mask


def token_logps(model: nnx.Module, samples: GenerationOutput) -> np.ndarray:
    """`[B, N]` per-token log-probs (0 on padding) of the sampled responses under `model`."""
    g, s = nnx.split(model)
    return in_chunks(lambda i, *a: _response_logps(g, s, *a), samples.sequences,
                     samples.sequence_mask, samples.tokens, samples.mask)


def rm_scores(source: RewardModelSource, samples: GenerationOutput,
              mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """`[B]` scores of the sampled responses by a reward-model source (the rows split over
    `mesh` as a trainer's rollouts are, so that the scoring program is the one PPO runs)."""
    def score(i, *arrays):
        if mesh is not None:
            arrays = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in arrays]
        return source(Rollout(*arrays), {})

    return in_chunks(score, samples.sequences, samples.sequence_mask, samples.tokens,
                     samples.mask, samples.finished)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


class Context:
    """Shared state of one demo run: the task, its tokenizer, the model and run settings every
    trainer gets, the seeds and the evaluation prompts."""

    def __init__(self, cfg: DemoConfig, out_dir: pathlib.Path):
        self.cfg = cfg
        self.out = out_dir
        self.task = synthetic.get_task(cfg.task)
        self.tokenizer = synthetic.build_tokenizer()
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.prompt_width = 2 + max(getattr(self.task, "max_prompt_length", 14), 14)
        self.model_spec = ModelSpec(
            preset="tiny_llama", vocab_size=len(self.tokenizer), hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers, num_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=self.prompt_width + cfg.max_new_tokens)
        self.seeds = {
            "data": cfg.seed, "raters": cfg.seed + 1, "init": cfg.seed + 2,
            "sampling": cfg.seed + 3, "eval": cfg.seed + 4,
        }
        # The trainers' default mesh: sampling on it, the evaluations and best-of-n run the
        # program the PPO rollouts run (64 rows a call), compiled once; the reward models are
        # placed on it as the trainers place theirs (`RewardModelSource(mesh=...)`), so every
        # scoring call runs PPO's scoring program.
        self.mesh = sharding.make_mesh(sharding.MeshConfig())
        self.stage_times: dict[str, float] = {}
        self.stage_cpu: dict[str, float] = {}  # CPU seconds (user + sys) of this process
        self.stage_compiles: dict[str, dict[str, Any]] = {}
        prompts = self.task.sample_prompts(np.random.default_rng(self.seeds["eval"]),
                                           cfg.eval_prompts)
        self.eval_prompts = self.prompts(prompts)
        self.eval_key = jax.random.key(self.seeds["eval"])
        self.num_evals = 0

    def prompts(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        return encode_prompts(self.tokenizer, prompts, width=self.prompt_width)

    def sample(self, model, prompts, *, rng, num_samples: int = 1) -> GenerationOutput:
        return sample(model, prompts, rng=rng, max_new_tokens=self.cfg.max_new_tokens,
                      eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                      num_samples=num_samples, mesh=self.mesh)

    def gold(self, samples: GenerationOutput) -> np.ndarray:
        p = samples.prompt_length
        return self.task.gold_reward_tokens(np.asarray(samples.sequences)[:, :p],
                                            np.asarray(samples.tokens), np.asarray(samples.mask))

    def decode(self, samples: GenerationOutput) -> list[str]:
        out = []
        for ids, m in zip(np.asarray(samples.tokens), np.asarray(samples.mask)):
            out.append(self.tokenizer.decode([int(t) for t, k in zip(ids, m)
                                              if k and t != self.eos_id]))
        return out

    def data(self, batch_size: int, **kw: Any) -> DataSpec:
        """The data spec of a run: the task's tokenizer, prompt + response widths. Records the
        trainers reject (a pair with an empty response: the policy stopped at once) are
        skipped and counted in the run's summary."""
        return DataSpec(synthetic=self.cfg.task, batch_size=batch_size, num_eval=0,
                        max_prompt_length=self.prompt_width,
                        max_length=self.prompt_width + self.cfg.max_new_tokens,
                        on_error="skip", **kw)

    def run(self, name: str, *, steps: int, learning_rate: float, seed: int) -> dict[str, Any]:
        """The fields every trainer config of the demo shares: `<out>/runs/<name>`, the model
        spec, Adam at a constant learning rate with gradients clipped to norm 1, no
        TensorBoard, no checkpoint (the trained models stay in memory)."""
        return dict(
            output_dir=str(self.out / "runs" / name), seed=seed, num_steps=steps,
            overwrite=True, model=self.model_spec,
            optimizer=OptimizerConfig(learning_rate=learning_rate, schedule="constant",
                                      max_grad_norm=1.0),
            logging=LoggingConfig(every_steps=10, tensorboard=False, progress="tqdm"),
            checkpoint=CheckpointConfig(keep_last=1, save_on_sigterm=False, save_final=False),
        )


def stage(ctx: Context, name: str, title: str):
    class _Stage:
        def __enter__(self):
            console.rule(f"[bold]{title}")
            self.counter = CompileCounter().__enter__()
            self.t0 = time.perf_counter()
            self.c0 = time.process_time()

        def __exit__(self, *exc):
            dt = time.perf_counter() - self.t0
            ctx.stage_cpu[name] = time.process_time() - self.c0
            self.counter.__exit__(*exc)
            ctx.stage_times[name] = dt
            ctx.stage_compiles[name] = self.counter.summary()
            if exc[0] is None:
                c = self.counter
                console.print(f"[dim]{name} finished in {dt:.1f} s ({c.num_compiles} compiles, "
                              f"{c.cache_hits} from the cache; {c.trace_s + c.lower_s:.1f} s "
                              f"tracing, {c.compile_s:.1f} s compiling)[/dim]")

    return _Stage()


def bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5,
                file=sys.stdout)


def train_policy(ctx: Context) -> CausalLM:
    """SFT on the task's demonstrations (`make_sft_dataset`, through `run_sft`)."""
    cfg = ctx.cfg
    config = SFTConfig(**ctx.run("sft", steps=cfg.sft_steps, learning_rate=cfg.sft_learning_rate,
                                 seed=ctx.seeds["init"]),
                       data=ctx.data(cfg.sft_batch_size, num_train=cfg.sft_examples))
    records = synthetic.make_sft_dataset(ctx.task, num_examples=cfg.sft_examples, seed=cfg.seed)
    run = run_sft(config, records=records)
    console.print(f"SFT loss (last logged batch): {run.summary['metrics']['sft/loss']:.3f} "
                  "nats/token")
    return run.model


class Preferences(NamedTuple):
    records: list[dict[str, str]]  # {"prompt", "chosen", "rejected"}: what the trainers read
    chosen: GenerationOutput
    rejected: GenerationOutput
    gold_chosen: np.ndarray
    gold_rejected: np.ndarray
    chosen_probability: np.ndarray  # [N] q: probability that a random rater picks `chosen`
    rater_gold_agreement: float  # fraction of labels that pick the gold-better response

    def split(self, start: int, stop: int | None = None) -> Preferences:
        rows = np.arange(len(self.records))[start:stop]
        return Preferences(self.records[start:stop], take(self.chosen, rows),
                           take(self.rejected, rows), self.gold_chosen[rows],
                           self.gold_rejected[rows], self.chosen_probability[rows],
                           self.rater_gold_agreement)

    @property
    def oracle_accuracy(self) -> float:
        """Accuracy of an oracle that knows `q`: mean of `max(q, 1 - q)` (the ceiling)."""
        q = self.chosen_probability
        return float(np.mean(np.maximum(q, 1 - q)))

    @property
    def inter_rater_agreement(self) -> float:
        """Probability that two random raters agree on a pair, averaged: mean `q² + (1 - q)²`."""
        q = self.chosen_probability
        return float(np.mean(q ** 2 + (1 - q) ** 2))


def collect_preferences(ctx: Context, policy: CausalLM, num_pairs: int, seed: int) -> Preferences:
    """Two samples from `policy` per fresh prompt, one simulated rater's label per pair."""
    cfg = ctx.cfg
    rng = np.random.default_rng(seed)
    prompts = ctx.task.sample_prompts(rng, num_pairs)
    out = ctx.sample(policy, ctx.prompts(prompts), rng=jax.random.key(seed), num_samples=2)
    texts = ctx.decode(out)
    a, b = texts[0::2], texts[1::2]
    rater_cfg = synthetic.RaterConfig(
        num_raters=cfg.num_raters, raters_per_item=1, temperature=cfg.rater_temperature,
        temperature_spread=cfg.rater_temperature_spread, lapse_rate=cfg.rater_lapse_rate)
    pool = synthetic.make_rater_pool(rater_cfg, np.random.default_rng(ctx.seeds["raters"]))
    records, stats = synthetic.label_pairs(ctx.task, prompts, a, b, pool=pool, rng=rng,
                                           raters_per_item=1)
    # The labels' own noise: q = P(a random rater prefers the chosen response).
    gold_c = np.asarray([r["gold_chosen"] for r in records])
    gold_r = np.asarray([r["gold_rejected"] for r in records])
    len_c = np.asarray([len(r["chosen"]) for r in records])
    len_r = np.asarray([len(r["rejected"]) for r in records])
    everyone = np.broadcast_to(np.arange(cfg.num_raters), (num_pairs, cfg.num_raters))
    q = synthetic.preference_probability(pool, everyone, gold_a=gold_c, gold_b=gold_r,
                                         length_a=len_c, length_b=len_r).mean(axis=1)
    first_chosen = np.asarray([r["chosen"] == x for r, x in zip(records, a)])
    rows = 2 * np.arange(num_pairs)
    chosen = take(out, np.where(first_chosen, rows, rows + 1))
    rejected = take(out, np.where(first_chosen, rows + 1, rows))
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
             for r in records]
    return Preferences(pairs, chosen, rejected, gold_c, gold_r, q,
                       rater_gold_agreement=float(stats.gold_agreement))


def train_reward_model(ctx: Context, policy: CausalLM, prefs: Preferences, n: int,
                       seed: int) -> RewardModel:
    """A Bradley-Terry reward model on the first `n` pairs, initialised from `policy`
    (`run_rm`); at least `rm_min_steps` steps, else `rm_epochs` passes."""
    cfg = ctx.cfg
    steps = max(cfg.rm_min_steps, math.ceil(cfg.rm_epochs * n / cfg.rm_batch_size))
    # With fewer pairs than a batch, every step sees all of them: a batch of whole passes over
    # them when n divides the batch size (the same mean gradient as a batch of n, and the
    # compiled step of the larger sets), else a batch of n.
    batch = cfg.rm_batch_size if n >= cfg.rm_batch_size or cfg.rm_batch_size % n == 0 else n
    config = RMConfig(**ctx.run(f"rm_{n}", steps=steps, learning_rate=cfg.rm_learning_rate,
                                seed=seed),
                      data=ctx.data(batch), normalize=False)
    rm = RewardModel.from_causal_lm(policy, rngs=nnx.Rngs(seed))
    run = run_rm(config, model=rm, records=prefs.records[:n])
    skipped = sum(run.summary["skipped_records"].values())
    if skipped:
        console.print(f"RM on {n} pairs: {skipped} pairs skipped "
                      f"({run.summary['skipped_records']})")
    return run.model


class Evaluation(NamedTuple):
    kl: float
    gold_reward: float
    gold_reward_se: float
    proxy_reward: float

    def metrics(self) -> dict[str, float]:
        return {"demo/kl": self.kl, "demo/gold_reward": self.gold_reward,
                "demo/proxy_reward": self.proxy_reward}


def evaluate(ctx: Context, policy, ref: CausalLM, proxy: RewardModelSource) -> Evaluation:
    """Fresh samples on the evaluation prompts: KL to `ref`, gold and proxy reward."""
    ctx.num_evals += 1
    key = jax.random.fold_in(ctx.eval_key, ctx.num_evals)
    s = ctx.sample(policy, ctx.eval_prompts, rng=key)
    kl = (np.asarray(s.model_logps) - token_logps(ref, s)).sum(axis=1)
    gold = ctx.gold(s)
    proxy_scores = rm_scores(proxy, s, ctx.mesh)
    return Evaluation(float(kl.mean()), float(gold.mean()),
                      float(gold.std(ddof=1) / math.sqrt(len(gold))), float(proxy_scores.mean()))


def normalize_reward_model(ctx: Context, rm: RewardModel, ref: CausalLM) -> tuple[float, float]:
    """Sets the RM's normalisation so that scores of reference samples have mean 0, std 1."""
    s = ctx.sample(ref, ctx.eval_prompts, rng=jax.random.fold_in(ctx.eval_key, 10**6))
    raw = rm_scores(RewardModelSource(rm, mesh=ctx.mesh), s, ctx.mesh)
    mean, std = float(raw.mean()), float(raw.std() + 1e-6)
    rm.set_normalization(1.0 / std, -mean / std)
    return mean, std


# ------------------------------------------------------------------------------------- PPO


def fresh_prompts(ctx: Context, *, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """An endless stream of `ppo_rollout_batch` fresh task prompts per batch."""
    rng = np.random.default_rng(seed)
    while True:
        yield ctx.prompts(ctx.task.sample_prompts(rng, ctx.cfg.ppo_rollout_batch))


def ppo_trainer(ctx: Context, sft: CausalLM, proxy: RewardModelSource, *, kl_coef: float,
                seed: int, name: str) -> PPOTrainer:
    """PPO (Ziegler et al. 2019 / Stiennon et al. 2020) from the SFT policy against the proxy:
    a fixed KL coefficient, GAE (gamma 1, lambda 0.95) with whitened advantages, clipped policy
    and value losses, the value model initialised from the proxy with its own Adam, the gold
    reward of every rollout logged as `ppo/gold_reward`."""
    cfg = ctx.cfg
    # Every PPO run of the demo gets the same schedule length (the learning rate is constant,
    # so it changes nothing), so all of them share one compiled update.
    longest = max(cfg.ppo_iterations, cfg.overopt_iterations)
    config = PPOConfig(
        **ctx.run(name, steps=longest, learning_rate=cfg.ppo_learning_rate, seed=seed),
        data=DataSpec(synthetic=cfg.task, batch_size=cfg.ppo_rollout_batch,
                      max_prompt_length=ctx.prompt_width, max_length=ctx.prompt_width),
        rollout=RolloutConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0),
        kl_coef=kl_coef, num_epochs=cfg.ppo_epochs, num_minibatches=cfg.ppo_minibatches,
        vf_coef=1.0, gamma=1.0, lam=0.95, clip_range=0.2, clip_range_value=0.2)
    return PPOTrainer(config, policy=nnx.clone(sft), reward=proxy,
                      prompts=fresh_prompts(ctx, seed=seed), eos_token_id=ctx.eos_id,
                      pad_token_id=ctx.pad_id,
                      metric_fns=(gold_reward_metric(ctx.task, "ppo/gold_reward"),))


def eval_schedule(total: int, evals: int, *, power: float = 1.0) -> list[int]:
    """`evals` iteration counts after which to evaluate, the last one `total`: evenly spaced for
    `power=1`, denser early for `power > 1` (`total * ((i + 1) / evals) ** power`)."""
    return sorted({max(1, round(total * ((i + 1) / evals) ** power)) for i in range(evals)})


def run_ppo(ctx: Context, trainer: PPOTrainer, *, iterations: int, at: Sequence[int],
            desc: str, on_eval: Callable[[int, PPOTrainer], None]) -> None:
    """`iterations` PPO iterations, `on_eval(iteration, trainer)` after each of `at`."""
    with bar(iterations, desc) as pbar:
        for it in range(1, iterations + 1):
            m = trainer.iteration()
            pbar.set_postfix(score=f"{m['ppo/score_mean']:.2f}", kl=f"{m['ppo/kl_ref']:.2f}",
                             gold=f"{m['ppo/gold_reward']:.2f}")
            pbar.update()
            if it in at:
                on_eval(it, trainer)


def run_ppo_sweep(ctx, sft, proxy) -> list[dict[str, Any]]:
    cfg = ctx.cfg
    points = []
    for kl_coef in cfg.ppo_kl_coefs:
        trainer = ppo_trainer(ctx, sft, proxy, kl_coef=kl_coef, seed=ctx.seeds["init"] + 100,
                              name=f"ppo_kl{kl_coef:g}")

        def on_eval(it, trainer, kl_coef=kl_coef):
            ev = evaluate(ctx, trainer.policy_model(), sft, proxy)
            points.append({"method": "ppo", "param_name": "kl_coef", "param": kl_coef,
                           "step": it, **ev._asdict()})

        run_ppo(ctx, trainer, iterations=cfg.ppo_iterations,
                at=eval_schedule(cfg.ppo_iterations, cfg.ppo_evals_per_run),
                desc=f"PPO kl_coef={kl_coef:g}", on_eval=on_eval)
        ev = points[-1]
        console.print(f"PPO kl_coef={kl_coef:g}: KL {ev['kl']:.2f}, gold "
                      f"{ev['gold_reward']:.3f}, proxy {ev['proxy_reward']:.2f}")
    return points


def run_overoptimization(ctx, sft, proxy) -> dict[str, Any]:
    cfg = ctx.cfg
    trainer = ppo_trainer(ctx, sft, proxy, kl_coef=cfg.overopt_kl_coef,
                          seed=ctx.seeds["init"] + 200, name="ppo_overoptimization")
    ev = evaluate(ctx, sft, sft, proxy)
    points = [{"step": 0, **ev._asdict()}]

    def on_eval(it, trainer):
        ev = evaluate(ctx, trainer.policy_model(), sft, proxy)
        points.append({"step": it, **ev._asdict()})
        console.print(f"  step {it}: KL {ev.kl:.2f}, proxy {ev.proxy_reward:.2f}, "
                      f"gold {ev.gold_reward:.3f}")

    run_ppo(ctx, trainer, iterations=cfg.overopt_iterations,
            at=eval_schedule(cfg.overopt_iterations, cfg.overopt_evals, power=3.0),
            desc=f"PPO kl_coef={cfg.overopt_kl_coef:g}", on_eval=on_eval)
    return {"kl_coef": cfg.overopt_kl_coef, "points": points}


# ------------------------------------------------------------------------------------- DPO


def run_dpo_sweep(ctx, sft, proxy, prefs: Preferences) -> list[dict[str, Any]]:
    """DPO (sigmoid loss, the SFT policy as reference) on the largest preference set, one run
    per beta (`run_dpo`), evaluated through the trainer's `eval_fn` every `dpo_steps /
    dpo_evals_per_run` steps and at the end. The runs differ only in beta, so they draw the
    same batches: the records are tokenized once (`tokenize_records`), the reference's
    log-probs of them are computed once (`dpo_reference_logps`) and every run trains on that
    table."""
    cfg = ctx.cfg

    def config(beta: float) -> DPOConfig:
        return DPOConfig(
            **ctx.run(f"dpo_beta{beta:g}", steps=cfg.dpo_steps,
                      learning_rate=cfg.dpo_learning_rate, seed=ctx.seeds["init"] + 300),
            data=ctx.data(cfg.dpo_batch_size),
            eval_every=max(1, cfg.dpo_steps // cfg.dpo_evals_per_run), beta=beta,
            reference="precomputed")

    records = tokenize_records(ctx.data(cfg.dpo_batch_size), prefs.records[:cfg.rm_pairs[-1]],
                               format="preference", tokenizer=ctx.tokenizer)
    reference = dpo_reference_logps(config(cfg.dpo_betas[0]), model=sft, records=records)
    points = []
    for beta in cfg.dpo_betas:

        def on_eval(model, step, beta=beta):
            ev = evaluate(ctx, model, sft, proxy)
            points.append({"method": "dpo", "param_name": "beta", "param": beta,
                           "step": step, **ev._asdict()})
            return ev.metrics()

        print(f"DPO beta={beta:g}", flush=True)
        run = run_dpo(config(beta), model=nnx.clone(sft), records=records, eval_fn=on_eval,
                      reference_logps=reference)
        ev = points[-1]
        console.print(f"DPO beta={beta:g}: KL {ev['kl']:.2f}, gold {ev['gold_reward']:.3f}, "
                      f"proxy {ev['proxy_reward']:.2f} (loss "
                      f"{run.summary['metrics']['dpo/loss']:.3f})")
    return points


# ------------------------------------------------------------------------------- best-of-n


def bon_log_ratio(selected: np.ndarray, reference_scores: np.ndarray, n: int) -> np.ndarray:
    """`log n + (n - 1) log F(r)` per selected sample (module docstring).

    Args:
      selected: `[E, G]` proxy scores of the selected samples (G groups per prompt).
      reference_scores: `[E, M]` proxy scores of independent reference samples per prompt,
        which define the empirical CDF `F` (mid-rank for ties, add-one smoothing).
      n: the number of candidates per selection.
    """
    below = (reference_scores[:, None, :] < selected[:, :, None]).sum(-1)
    equal = (reference_scores[:, None, :] == selected[:, :, None]).sum(-1)
    m = reference_scores.shape[1]
    cdf = (below + 0.5 * equal + 0.5) / (m + 1)
    return math.log(n) + (n - 1) * np.log(cdf)



def bon_pool(ctx: Context, policy: CausalLM, proxy: RewardModelSource,
             prompts: Mapping[str, np.ndarray], *, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """`([E, g] proxy scores, [E, g] gold rewards)` of `g = bon_pool` samples per prompt from
    `policy`, drawn and scored by `rlhf_jax.generation.best_of_n` (`CHUNK_ROWS` rows a call)."""
    g = ctx.cfg.bon_pool
    sampler = on_mesh(policy, ctx.mesh)
    sampling = SamplingParams(max_new_tokens=ctx.cfg.max_new_tokens, temperature=1.0)

    def draw(i, ids, mask):
        out = best_of_n(sampler, jnp.asarray(ids), jnp.asarray(mask), sampling, num_samples=g,
                        reward=proxy, rng=replicated(jax.random.fold_in(key, i), ctx.mesh),
                        eos_token_id=ctx.eos_id,
                        pad_token_id=ctx.pad_id)
        return out.scores, ctx.gold(out.samples).reshape(-1, g)

    return in_chunks(draw, prompts["prompt_ids"], prompts["prompt_mask"],
                     chunk=max(1, CHUNK_ROWS // g))


def run_best_of_n(ctx, sft, proxy) -> list[dict[str, Any]]:
    cfg = ctx.cfg
    # The first `bon_prompts` evaluation prompts, so that n = 1 matches the reference point.
    prompts = {k: v[: cfg.bon_prompts] for k, v in ctx.eval_prompts.items()}
    g = cfg.bon_pool
    # Candidates, and an independent pool for the CDF.
    proxy_c, gold_c = bon_pool(ctx, sft, proxy, prompts,
                               key=jax.random.fold_in(ctx.eval_key, 2 * 10**6))
    proxy_ref, _ = bon_pool(ctx, sft, proxy, prompts,
                            key=jax.random.fold_in(ctx.eval_key, 2 * 10**6 + 1))
    points = []
    for n in cfg.bon_ns:
        groups = g // n
        # The best of each group of n candidates (`select_best_of_n`: first on ties).
        pick = select_best_of_n(jnp.asarray(proxy_c[:, : groups * n].reshape(-1)),
                                num_samples=n)
        sel_proxy = np.asarray(pick.best_scores).reshape(cfg.bon_prompts, groups)
        sel_gold = gold_c[:, : groups * n].reshape(-1)[np.asarray(pick.best_indices)]
        sel_gold = sel_gold.reshape(cfg.bon_prompts, groups)
        kl = bon_log_ratio(sel_proxy, proxy_ref, n)
        per_prompt_gold = sel_gold.mean(axis=1)
        points.append({
            "method": "best_of_n", "param_name": "n", "param": n, "kl": float(kl.mean()),
            "kl_analytic": math.log(n) - (n - 1) / n,
            "gold_reward": float(sel_gold.mean()),
            "gold_reward_se": float(per_prompt_gold.std(ddof=1) / math.sqrt(cfg.bon_prompts)),
            "proxy_reward": float(sel_proxy.mean()),
        })
        console.print(f"best-of-{n}: KL {kl.mean():.2f} (analytic {math.log(n) - (n - 1) / n:.2f}),"
                      f" gold {sel_gold.mean():.3f}, proxy {sel_proxy.mean():.2f}")
    return points


# ------------------------------------------------------------------------------------ main


def environment() -> dict[str, str]:
    cpu = cpu_model_name()
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": str(jax.device_count()), "cpu": cpu, "cpu_count": str(os.cpu_count()),
            "python": platform.python_version()}


COMPILATION_CACHE = pathlib.Path("runs") / ".jax_cache"
"""Where the demo keeps compiled XLA programs (unless `JAX_COMPILATION_CACHE_DIR` is set)."""


def use_compilation_cache(directory: pathlib.Path) -> None:
    """Keeps every compiled XLA program in `directory` (JAX's persistent compilation cache),
    unless `JAX_COMPILATION_CACHE_DIR` names another: the runs of a sweep build their jitted
    steps afresh, and a step whose program was compiled before (same shapes and constants, in
    this run or an earlier one) is read back instead of compiled again."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_demo(cfg: DemoConfig, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Runs the whole pipeline, writes the report into `output_dir` and returns the results."""
    t_start = time.perf_counter()
    keep_freed_memory()  # fewer page faults: ~6 s less system time (rlhf_jax.host_memory)
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    use_compilation_cache(COMPILATION_CACHE)
    ctx = Context(cfg, out)
    console.print(f"[bold]rlhf_jax demo[/bold] (preset {cfg.preset}, seed {cfg.seed}) -> {out}")
    console.print(f"task: {cfg.task}; jax {jax.__version__} on {jax.default_backend()}")

    with stage(ctx, "sft", "1/6 Supervised fine-tuning of the base policy"):
        sft = train_policy(ctx)

    with stage(ctx, "preferences", "2/6 Simulated raters label pairs sampled from the policy"):
        total = cfg.rm_pairs[-1] + cfg.rm_val_pairs
        prefs = collect_preferences(ctx, sft, total, seed=ctx.seeds["raters"])
        console.print(
            f"{total} pairs labelled; labels pick the gold-better response "
            f"{prefs.rater_gold_agreement:.1%} of the time; inter-rater agreement "
            f"{prefs.inter_rater_agreement:.1%}; oracle accuracy (ceiling) "
            f"{prefs.oracle_accuracy:.1%}")

    val = prefs.split(cfg.rm_pairs[-1])
    with stage(ctx, "reward_models", "3/6 Reward models vs. number of preference pairs"):
        rm_points = []
        proxy = None
        for n in cfg.rm_pairs:
            rm = train_reward_model(ctx, sft, prefs, n, seed=ctx.seeds["init"] + n)
            source = RewardModelSource(rm, mesh=ctx.mesh)
            better = (rm_scores(source, val.chosen, ctx.mesh)
                      > rm_scores(source, val.rejected, ctx.mesh))
            acc = float(np.mean(better))
            gold_acc = float(np.mean(better == (val.gold_chosen > val.gold_rejected)))
            rm_points.append({"num_pairs": n, "val_accuracy": acc, "val_gold_accuracy": gold_acc})
            console.print(f"RM on {n:5d} pairs: validation accuracy {acc:.3f} "
                          f"(vs gold preference {gold_acc:.3f})")
            proxy = rm
        norm = normalize_reward_model(ctx, proxy, sft)
        proxy = RewardModelSource(proxy, name="proxy", mesh=ctx.mesh)
        ev0 = evaluate(ctx, sft, sft, proxy)
        console.print(f"reference policy: gold reward {ev0.gold_reward:.3f}, "
                      f"proxy {ev0.proxy_reward:.2f}, KL {ev0.kl:.3f}")

    with stage(ctx, "ppo", "4a/6 PPO at several KL coefficients"):
        ppo_points = run_ppo_sweep(ctx, sft, proxy)
    with stage(ctx, "dpo", "4b/6 DPO at several betas"):
        dpo_points = run_dpo_sweep(ctx, sft, proxy, prefs)
    with stage(ctx, "best_of_n", "4c/6 Best-of-n against the proxy reward model"):
        bon_points = run_best_of_n(ctx, sft, proxy)
    with stage(ctx, "overoptimization", "5/6 Over-optimisation: PPO with a small KL penalty"):
        overopt = run_overoptimization(ctx, sft, proxy)

    results = {
        "title": f"rlhf_jax CPU demo ({cfg.preset} preset)",
        "task": {"name": cfg.task, "description": _task_description(ctx.task)},
        "config": cfg.to_dict(),
        "seeds": ctx.seeds,
        "environment": environment(),
        "rm_scaling": {
            "ceiling": val.oracle_accuracy,
            "ceiling_label": (f"oracle accuracy under the raters' noise; inter-rater agreement "
                              f"{val.inter_rater_agreement:.2f}"),
            "inter_rater_agreement": val.inter_rater_agreement,
            "num_val_pairs": cfg.rm_val_pairs,
            "label_gold_agreement": prefs.rater_gold_agreement,
            "points": rm_points,
        },
        "proxy_normalization": {"mean": norm[0], "std": norm[1]},
        "frontier": {
            "reference": {"gold_reward": ev0.gold_reward, "gold_reward_se": ev0.gold_reward_se,
                          "proxy_reward": ev0.proxy_reward, "kl": ev0.kl},
            "kl_estimator": (
                "mean over fresh samples (one per evaluation prompt) of the sequence log-ratio "
                "sum_t log pi(y_t) - log pi_ref(y_t); for best-of-n, log pi_bon - log pi_ref = "
                "log n + (n-1) log F(r(y)) with F the per-prompt CDF of proxy scores under "
                "pi_ref (kl_analytic = log n - (n-1)/n for comparison)."),
            "points": ppo_points + dpo_points + bon_points,
        },
        "overoptimization": overopt,
    }
    console.rule("[bold]6/6 Report")
    results["stage_times_s"] = dict(ctx.stage_times)
    results["stage_cpu_s"] = dict(ctx.stage_cpu)
    results["stage_compiles"] = dict(ctx.stage_compiles)
    results["wall_time_s"] = time.perf_counter() - t_start
    results["cpu_time_s"] = time.process_time()  # the whole process, start-up included
    paths = report_lib.write_report(results, out)
    findings = report_lib.compute_findings(results)
    console.rule("[bold]Findings")
    for key, f in findings.items():
        mark = "[green]reproduced[/green]" if f.reproduced else "[red]not reproduced[/red]"
        console.print(f"{key}: {mark}. {f.sentences[f.headline]}")
    console.print(f"\nReport: {paths.report}")
    for fig in paths.figures.values():
        console.print(f"Figure: {fig}")
    console.print(f"Total wall time: {results['wall_time_s']:.1f} s")
    return results


def _task_description(task) -> str:
    doc = (type(task).__doc__ or "").strip().split("\n")[0]
    return doc


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.demo",
        description="The RLHF pipeline on a synthetic task with a gold reward (CPU), with a "
                    "markdown + PNG report.")
    parser.add_argument("--quick", action="store_true",
                        help="toy-size preset for CI (a minute or two on 2 cores)")
    parser.add_argument("--output-dir", default=None,
                        help="where to write the report (default: runs/demo-<timestamp>)")
    parser.add_argument("--seed", type=int, default=None, help="master seed (default 0)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override DemoConfig fields, e.g. --set rm_pairs=64,256 "
                             "ppo_iterations=40")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        if args.seed is not None:
            overrides["seed"] = args.seed
        cfg = DemoConfig.from_preset("quick" if args.quick else "default", **overrides)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    out = args.output_dir or os.path.join(
        "runs", "demo-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return run_demo(cfg, out)


if __name__ == "__main__":
    main()
