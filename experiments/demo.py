"""The RLHF pipeline on a synthetic task with a gold reward, on CPU, with a report.

    python -m experiments.demo [--quick] [--output-dir DIR] [--seed S] [--set FIELD=VALUE ...]

Stages (each prints a header and a progress bar):

1. SFT: a small Llama-style policy learns the task's noisy demonstrations; it is the reference
   policy pi_ref of everything below.
2. Preferences: pairs of responses sampled from pi_ref, each labelled by one simulated rater
   (Bradley-Terry on the gold reward with a per-rater temperature and lapses).
3. Reward models (Stiennon et al. 2020, Fig. 6): one per training-set size, initialised from
   the SFT policy, validated on held-out rater labels; the ceiling is the accuracy of an oracle
   that knows every rater's preference probability. The largest is the proxy reward.
4. Reward-vs-KL frontier (Rafailov et al. 2023, Fig. 2): PPO at several KL coefficients, DPO at
   several betas, best-of-n at several n; every point is gold reward against KL to pi_ref.
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

The training steps are built from `rlhf_jax.losses` (Bradley-Terry, DPO, PPO clip, clipped
value loss, GAE, KL-penalised rewards) with `rlhf_jax.train.make_train_step`; hyper-parameters
that vary between runs (beta, KL coefficient) are traced arguments, so every sweep reuses one
compiled step.
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.console import Console
from tqdm.auto import tqdm

from experiments import report as report_lib
from experiments.demo_config import DemoConfig, parse_overrides
from rlhf_jax import losses
from rlhf_jax.bench import cpu_model_name
from rlhf_jax.data import synthetic
from rlhf_jax.generation import SamplingParams, generate_with_state
from rlhf_jax.models import CausalLM, ModelConfig, RewardModel, ValueModel, positions_from_mask
from rlhf_jax.train import create_train_state, make_train_step
from rlhf_jax.train.logprobs import policy_response_logps
from rlhf_jax.train.rollout import Rollout
from rlhf_jax.train.value import response_values

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
console = Console(highlight=False)


# ---------------------------------------------------------------------------------------------
# Tokenization (prompt left-padded to P, response right-padded to N: one [B, P + N] layout)
# ---------------------------------------------------------------------------------------------


class Encoded(NamedTuple):
    """A batch in the rollout layout (numpy)."""

    sequences: np.ndarray  # [B, P + N] int32
    sequence_mask: np.ndarray  # [B, P + N] int32
    response_ids: np.ndarray  # [B, N] int32
    response_mask: np.ndarray  # [B, N] int32

    def rollout(self) -> Rollout:
        finished = (self.response_ids == EOS_ID).any(axis=1)
        return Rollout(jnp.asarray(self.sequences), jnp.asarray(self.sequence_mask),
                       jnp.asarray(self.response_ids), jnp.asarray(self.response_mask),
                       jnp.asarray(finished))


class Codec:
    """Character-level encoding of prompts and responses for one task."""

    def __init__(self, task: synthetic.SyntheticTask, *, prompt_width: int, response_width: int):
        self.tok = task.tokenizer()
        self.p = prompt_width
        self.n = response_width
        ids = synthetic.VOCAB
        assert (ids[PAD_ID], ids[BOS_ID], ids[EOS_ID]) == ("<pad>", "<bos>", "<eos>")

    def prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`([B, P], [B, P])` left-padded `BOS + prompt`."""
        ids = np.full((len(prompts), self.p), PAD_ID, np.int32)
        mask = np.zeros((len(prompts), self.p), np.int32)
        for i, toks in enumerate(self.tok(list(prompts), add_special_tokens=False)["input_ids"]):
            toks = [BOS_ID, *toks]
            if len(toks) > self.p:
                raise ValueError(f"prompt {prompts[i]!r} is longer than the prompt width {self.p}")
            ids[i, self.p - len(toks):] = toks
            mask[i, self.p - len(toks):] = 1
        return ids, mask

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> Encoded:
        """Prompt + `response + EOS` (responses longer than N - 1 are truncated, EOS kept)."""
        p_ids, p_mask = self.prompts(prompts)
        r_ids = np.full((len(responses), self.n), PAD_ID, np.int32)
        r_mask = np.zeros((len(responses), self.n), np.int32)
        for i, toks in enumerate(self.tok(list(responses), add_special_tokens=False)["input_ids"]):
            toks = [*toks[: self.n - 1], EOS_ID]
            r_ids[i, : len(toks)] = toks
            r_mask[i, : len(toks)] = 1
        return Encoded(np.concatenate([p_ids, r_ids], 1), np.concatenate([p_mask, r_mask], 1),
                       r_ids, r_mask)

    def decode(self, response_ids: np.ndarray, response_mask: np.ndarray) -> list[str]:
        out = []
        for ids, m in zip(np.asarray(response_ids), np.asarray(response_mask)):
            toks = [int(t) for t, k in zip(ids, m) if k and t != EOS_ID]
            out.append(self.tok.decode(toks))
        return out


# ---------------------------------------------------------------------------------------------
# Models and jitted functions
# ---------------------------------------------------------------------------------------------


def model_config(cfg: DemoConfig, codec: Codec) -> ModelConfig:
    return ModelConfig(
        arch="llama", vocab_size=len(synthetic.VOCAB), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=codec.p + codec.n, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def _rollout(batch: Mapping[str, jax.Array], prefix: str = "") -> Rollout:
    return Rollout(batch[prefix + "sequences"], batch[prefix + "sequence_mask"],
                   batch[prefix + "response_ids"], batch[prefix + "response_mask"],
                   jnp.zeros(batch[prefix + "sequences"].shape[0], bool))


def _seq_logps(model, batch, prefix=""):
    ro = _rollout(batch, prefix)
    logps, _ = policy_response_logps(model, ro)
    return losses.sequence_logps(logps, ro.response_mask)


def sft_loss(model, batch, rng):
    ro = _rollout(batch)
    logps, _ = policy_response_logps(model, ro)
    loss = -losses.masked_mean(logps, ro.response_mask)
    return loss, {"sft/loss": loss}


def rm_loss(model, batch, rng):
    seq = jnp.concatenate([batch["chosen_sequences"], batch["rejected_sequences"]])
    mask = jnp.concatenate([batch["chosen_sequence_mask"], batch["rejected_sequence_mask"]])
    r = model(seq, attention_mask=mask, positions=positions_from_mask(mask))[:, 0]
    chosen, rejected = jnp.split(r, 2)
    loss = jnp.mean(losses.bradley_terry_loss(chosen, rejected))
    acc = jnp.mean((chosen > rejected).astype(jnp.float32))
    return loss, {"rm/loss": loss, "rm/accuracy": acc}


def dpo_loss(model, batch, rng):
    pc = _seq_logps(model, batch, "chosen_")
    pr = _seq_logps(model, batch, "rejected_")
    per_pair = losses.dpo_loss(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                               beta=batch["beta"])
    loss = jnp.mean(per_pair)
    margin = batch["beta"] * ((pc - batch["ref_chosen_logps"]) - (pr - batch["ref_rejected_logps"]))
    return loss, {"dpo/loss": loss, "dpo/accuracy": jnp.mean((margin > 0).astype(jnp.float32))}


def ppo_policy_loss(model, batch, rng):
    ro = _rollout(batch)
    logps, _ = policy_response_logps(model, ro)
    mask = ro.response_mask
    pg = losses.ppo_clip_loss(logps, batch["old_logps"], batch["advantages"], clip_eps=0.2)
    loss = losses.masked_mean(pg, mask)
    approx = losses.masked_mean(0.5 * (logps - batch["old_logps"]) ** 2, mask)
    return loss, {"ppo/policy_loss": loss, "ppo/approx_kl": approx}


def ppo_value_loss(model, batch, rng):
    values = response_values(model, _rollout(batch))
    vf = losses.clipped_value_loss(values, batch["old_values"], batch["returns"], clip=0.2)
    loss = losses.masked_mean(vf, batch["response_mask"])
    return loss, {"ppo/value_loss": loss}


class Trainer:
    """A model, its optimizer state and one jitted step.

    `reset(model, seed)` starts a new run from `model` (same structure) and keeps the compiled
    step, so sweeps over traced hyper-parameters compile once.
    """

    def __init__(self, model, loss_fn, *, learning_rate: float, seed: int):
        self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))
        self.graphdef, self.state = create_train_state(model, self.tx, seed=seed)
        self.step_fn = jax.jit(make_train_step(loss_fn, self.tx, graphdef=self.graphdef))

    def reset(self, model, seed: int) -> None:
        _, self.state = create_train_state(model, self.tx, seed=seed)

    def step(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        self.state, metrics = self.step_fn(self.state, batch)
        return metrics

    def model(self):
        return nnx.merge(self.graphdef, self.state.params, self.state.frozen)


@jax.jit
def _forward_logps(graphdef, state, sequences, sequence_mask, response_ids, response_mask):
    model = nnx.merge(graphdef, state)
    ro = Rollout(sequences, sequence_mask, response_ids, response_mask,
                 jnp.zeros(sequences.shape[0], bool))
    logps, _ = policy_response_logps(model, ro)
    return logps * response_mask


@jax.jit
def _rm_scores(graphdef, state, sequences, sequence_mask):
    model = nnx.merge(graphdef, state)
    return model(sequences, attention_mask=sequence_mask,
                 positions=positions_from_mask(sequence_mask))[:, 0]


def _split(model):
    return nnx.split(model)


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


def token_logps(model, enc: Encoded) -> np.ndarray:
    """`[B, N]` per-token log-probs (0 on padding) of `enc`'s responses under `model`."""
    g, s = _split(model)
    return in_chunks(lambda i, *a: _forward_logps(g, s, *a), enc.sequences, enc.sequence_mask,
                     enc.response_ids, enc.response_mask)


def rm_scores(model, enc: Encoded) -> np.ndarray:
    g, s = _split(model)
    return in_chunks(lambda i, *a: _rm_scores(g, s, *a), enc.sequences, enc.sequence_mask)


class Samples(NamedTuple):
    enc: Encoded
    logps: np.ndarray  # [B, N] model log-probs of the sampled tokens (0 on padding)


def sample(model, prompt_ids, prompt_mask, *, rng, max_new_tokens, num_samples=1) -> Samples:
    """`num_samples` responses per prompt (rows `b * n .. b * n + n - 1` for prompt `b`),
    generated in chunks of `CHUNK_ROWS` rows (chunk `i` uses `fold_in(rng, i)`)."""
    g, s = _split(model)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)

    def gen(i, p_ids, p_mask):
        out = generate_with_state(g, s, jnp.asarray(p_ids), jnp.asarray(p_mask), sampling,
                                  rng=jax.random.fold_in(rng, i), eos_token_id=EOS_ID,
                                  pad_token_id=PAD_ID)
        return (out.sequences, out.sequence_mask, out.tokens, out.mask,
                out.model_logps * out.mask)

    seq, seq_mask, ids, mask, logps = in_chunks(
        gen, np.repeat(prompt_ids, num_samples, 0), np.repeat(prompt_mask, num_samples, 0))
    enc = Encoded(seq.astype(np.int32), seq_mask.astype(np.int32), ids.astype(np.int32),
                  mask.astype(np.int32))
    return Samples(enc, logps)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


class Context:
    """Shared state of one demo run."""

    def __init__(self, cfg: DemoConfig, out_dir: pathlib.Path):
        self.cfg = cfg
        self.out = out_dir
        self.task = synthetic.get_task(cfg.task)
        prompt_width = 2 + max(getattr(self.task, "max_prompt_length", 14), 14)
        self.codec = Codec(self.task, prompt_width=prompt_width, response_width=cfg.max_new_tokens)
        self.model_config = model_config(cfg, self.codec)
        self.seeds = {
            "data": cfg.seed, "raters": cfg.seed + 1, "init": cfg.seed + 2,
            "sampling": cfg.seed + 3, "eval": cfg.seed + 4,
        }
        self.np_rng = np.random.default_rng(self.seeds["data"])
        self.key = jax.random.key(self.seeds["sampling"])
        self.stage_times: dict[str, float] = {}
        prompts = self.task.sample_prompts(np.random.default_rng(self.seeds["eval"]),
                                           cfg.eval_prompts)
        self.eval_prompts = self.codec.prompts(prompts)
        self.eval_key = jax.random.key(self.seeds["eval"])
        self.num_evals = 0

    def next_key(self):
        self.key, k = jax.random.split(self.key)
        return k

    def gold(self, enc: Encoded) -> np.ndarray:
        p = self.codec.p
        return self.task.gold_reward_tokens(enc.sequences[:, :p], enc.response_ids,
                                            enc.response_mask)


def stage(ctx: Context, name: str, title: str):
    class _Stage:
        def __enter__(self):
            console.rule(f"[bold]{title}")
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            dt = time.perf_counter() - self.t0
            ctx.stage_times[name] = dt
            if exc[0] is None:
                console.print(f"[dim]{name} finished in {dt:.1f} s[/dim]")

    return _Stage()


def bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5,
                file=sys.stdout)


def train_sft(ctx: Context) -> CausalLM:
    cfg = ctx.cfg
    records = synthetic.make_sft_dataset(ctx.task, num_examples=cfg.sft_examples, seed=cfg.seed)
    enc = ctx.codec.encode([r["prompt"] for r in records], [r["completion"] for r in records])
    model = CausalLM(ctx.model_config, rngs=nnx.Rngs(ctx.seeds["init"]))
    trainer = Trainer(model, sft_loss, learning_rate=cfg.sft_learning_rate, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    with bar(cfg.sft_steps, "SFT") as pbar:
        for step in range(cfg.sft_steps):
            idx = rng.integers(0, len(records), cfg.sft_batch_size)
            m = trainer.step(_batch(enc, idx))
            if step % 20 == 0 or step == cfg.sft_steps - 1:
                pbar.set_postfix(loss=f"{float(m['sft/loss']):.3f}")
            pbar.update()
    console.print(f"SFT loss (last batch): {float(m['sft/loss']):.3f} nats/token")
    return trainer.model()


def _batch(enc: Encoded, idx, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: getattr(enc, k)[idx] for k in Encoded._fields}


def _pair_batch(chosen: Encoded, rejected: Encoded, idx) -> dict[str, np.ndarray]:
    return {**_batch(chosen, idx, "chosen_"), **_batch(rejected, idx, "rejected_")}


class Preferences(NamedTuple):
    prompts: list[str]
    chosen: Encoded
    rejected: Encoded
    gold_chosen: np.ndarray
    gold_rejected: np.ndarray
    chosen_probability: np.ndarray  # [N] q: probability that a random rater picks `chosen`
    rater_gold_agreement: float  # fraction of labels that pick the gold-better response

    def split(self, start: int, stop: int | None = None) -> Preferences:
        cut = lambda x: x[start:stop]
        return Preferences(self.prompts[start:stop],
                           Encoded(*map(cut, self.chosen)), Encoded(*map(cut, self.rejected)),
                           cut(self.gold_chosen), cut(self.gold_rejected),
                           cut(self.chosen_probability), self.rater_gold_agreement)

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
    p_ids, p_mask = ctx.codec.prompts(prompts)
    out = sample(policy, p_ids, p_mask, rng=jax.random.key(seed),
                 max_new_tokens=cfg.max_new_tokens, num_samples=2)
    texts = ctx.codec.decode(out.enc.response_ids, out.enc.response_mask)
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
    chosen = ctx.codec.encode(prompts, [r["chosen"] for r in records])
    rejected = ctx.codec.encode(prompts, [r["rejected"] for r in records])
    return Preferences(prompts, chosen, rejected, gold_c, gold_r, q,
                       rater_gold_agreement=float(stats.gold_agreement))


def _take(p: Preferences, n: int) -> tuple[Encoded, Encoded]:
    first = p.split(0, n)
    return first.chosen, first.rejected


def train_reward_model(ctx: Context, policy: CausalLM, prefs: Preferences, n: int,
                       seed: int) -> RewardModel:
    cfg = ctx.cfg
    chosen, rejected = _take(prefs, n)
    rm = RewardModel.from_causal_lm(policy, rngs=nnx.Rngs(seed))
    trainer = ctx.rm_trainer_cache.get("rm")
    if trainer is None:
        trainer = Trainer(rm, rm_loss, learning_rate=cfg.rm_learning_rate, seed=seed)
        ctx.rm_trainer_cache["rm"] = trainer
    else:  # same structure: reuse the compiled step with fresh parameters
        trainer.reset(rm, seed)
    steps = max(cfg.rm_min_steps, math.ceil(cfg.rm_epochs * n / cfg.rm_batch_size))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n) for _ in range(
        math.ceil(steps * cfg.rm_batch_size / n) + 1)])
    with bar(steps, f"RM on {n} pairs") as pbar:
        for step in range(steps):
            idx = order[step * cfg.rm_batch_size:(step + 1) * cfg.rm_batch_size]
            m = trainer.step(_pair_batch(chosen, rejected, idx))
            pbar.update()
            if step % 10 == 0:
                pbar.set_postfix(loss=f"{float(m['rm/loss']):.3f}")
    return trainer.model()


def rm_accuracy(rm: RewardModel, chosen: Encoded, rejected: Encoded) -> float:
    return float(np.mean(rm_scores(rm, chosen) > rm_scores(rm, rejected)))


class Evaluation(NamedTuple):
    kl: float
    gold_reward: float
    gold_reward_se: float
    proxy_reward: float


def evaluate(ctx: Context, policy, ref: CausalLM, proxy: RewardModel) -> Evaluation:
    """Fresh samples on the evaluation prompts: KL to `ref`, gold and proxy reward."""
    ctx.num_evals += 1
    key = jax.random.fold_in(ctx.eval_key, ctx.num_evals)
    s = sample(policy, *ctx.eval_prompts, rng=key, max_new_tokens=ctx.cfg.max_new_tokens)
    ref_logps = token_logps(ref, s.enc)
    kl = (s.logps - ref_logps).sum(axis=1)
    gold = ctx.gold(s.enc)
    proxy_scores = rm_scores(proxy, s.enc)
    return Evaluation(float(kl.mean()), float(gold.mean()),
                      float(gold.std(ddof=1) / math.sqrt(len(gold))), float(proxy_scores.mean()))


def normalize_reward_model(ctx: Context, rm: RewardModel, ref: CausalLM) -> tuple[float, float]:
    """Sets the RM's normalisation so that scores of reference samples have mean 0, std 1."""
    s = sample(ref, *ctx.eval_prompts, rng=jax.random.fold_in(ctx.eval_key, 10**6),
               max_new_tokens=ctx.cfg.max_new_tokens)
    raw = rm_scores(rm, s.enc)
    mean, std = float(raw.mean()), float(raw.std() + 1e-6)
    rm.set_normalization(1.0 / std, -mean / std)
    return mean, std


# ------------------------------------------------------------------------------------- PPO


@jax.jit
def _ppo_prepare(pg, ps, vg, vs, rg, rs, refg, refs, sequences, sequence_mask, response_ids,
                 response_mask, kl_coef):
    ro = Rollout(sequences, sequence_mask, response_ids, response_mask,
                 jnp.zeros(sequences.shape[0], bool))
    logps, _ = policy_response_logps(nnx.merge(pg, ps), ro)
    ref_logps, _ = policy_response_logps(nnx.merge(refg, refs), ro)
    values = response_values(nnx.merge(vg, vs), ro)
    rm = nnx.merge(rg, rs)
    scores = rm(sequences, attention_mask=sequence_mask,
                positions=positions_from_mask(sequence_mask))[:, 0]
    mask = response_mask
    pen = losses.kl_penalized_rewards(scores, logps, ref_logps, mask, kl_coef=kl_coef)
    adv = losses.gae(pen.rewards, values * mask, mask, gamma=1.0, lam=0.95)
    advantages = losses.masked_whiten(adv.advantages, mask)
    return {
        "old_logps": logps * mask, "old_values": values * mask, "returns": adv.returns,
        "advantages": advantages * mask,
    }, {"score": scores.mean(), "kl": losses.masked_sum(pen.kl, mask, axis=-1).mean()}


class PPORun:
    """PPO (Ziegler et al. 2019 / Stiennon et al. 2020) against the proxy reward model."""

    def __init__(self, ctx: Context, sft: CausalLM, proxy: RewardModel, *, seed: int):
        cfg = ctx.cfg
        self.ctx = ctx
        cache = ctx.ppo_cache
        policy = nnx.clone(sft)
        value = ValueModel.from_reward_model(proxy)
        if not cache:
            cache["policy"] = Trainer(policy, ppo_policy_loss,
                                      learning_rate=cfg.ppo_learning_rate, seed=seed)
            cache["value"] = Trainer(value, ppo_value_loss,
                                     learning_rate=cfg.ppo_learning_rate, seed=seed + 1)
        else:
            for name, model in (("policy", policy), ("value", value)):
                cache[name].reset(model, seed)
        self.policy, self.value = cache["policy"], cache["value"]
        self.ref = _split(sft)
        self.rm = _split(proxy)
        self.rng = np.random.default_rng(seed)
        self.key = jax.random.key(seed)

    def iteration(self, kl_coef: float) -> dict[str, float]:
        cfg = self.ctx.cfg
        prompts = self.ctx.task.sample_prompts(self.rng, cfg.ppo_rollout_batch)
        p_ids, p_mask = self.ctx.codec.prompts(prompts)
        self.key, k = jax.random.split(self.key)
        s = sample(self.policy.model(), p_ids, p_mask, rng=k, max_new_tokens=cfg.max_new_tokens)
        e = s.enc
        pg, ps = _split(self.policy.model())
        vg, vs = _split(self.value.model())
        extra, stats = _ppo_prepare(pg, ps, vg, vs, *self.rm, *self.ref, e.sequences,
                                    e.sequence_mask, e.response_ids, e.response_mask,
                                    jnp.float32(kl_coef))
        batch = {**{k: jnp.asarray(getattr(e, k)) for k in Encoded._fields}, **extra}
        size = cfg.ppo_rollout_batch // cfg.ppo_minibatches
        for _ in range(cfg.ppo_epochs):
            perm = self.rng.permutation(cfg.ppo_rollout_batch)
            for j in range(cfg.ppo_minibatches):
                idx = perm[j * size:(j + 1) * size]
                mb = {k: v[idx] for k, v in batch.items()}
                self.policy.step(mb)
                self.value.step(mb)
        return {k: float(v) for k, v in stats.items()}


def eval_schedule(total: int, evals: int, *, power: float = 1.0) -> list[int]:
    """`evals` iteration counts after which to evaluate, the last one `total`: evenly spaced for
    `power=1`, denser early for `power > 1` (`total * ((i + 1) / evals) ** power`)."""
    return sorted({max(1, round(total * ((i + 1) / evals) ** power)) for i in range(evals)})


def run_ppo_sweep(ctx, sft, proxy) -> list[dict[str, Any]]:
    cfg = ctx.cfg
    points = []
    for kl_coef in cfg.ppo_kl_coefs:
        run = PPORun(ctx, sft, proxy, seed=ctx.seeds["init"] + 100)
        at = eval_schedule(cfg.ppo_iterations, cfg.ppo_evals_per_run)
        with bar(cfg.ppo_iterations, f"PPO kl_coef={kl_coef:g}") as pbar:
            for it in range(1, cfg.ppo_iterations + 1):
                st = run.iteration(kl_coef)
                pbar.set_postfix(score=f"{st['score']:.2f}", kl=f"{st['kl']:.2f}")
                pbar.update()
                if it in at:
                    ev = evaluate(ctx, run.policy.model(), sft, proxy)
                    points.append({"method": "ppo", "param_name": "kl_coef", "param": kl_coef,
                                   "step": it, **ev._asdict()})
        console.print(f"PPO kl_coef={kl_coef:g}: KL {ev.kl:.2f}, gold {ev.gold_reward:.3f}, "
                      f"proxy {ev.proxy_reward:.2f}")
    return points


def run_overoptimization(ctx, sft, proxy) -> dict[str, Any]:
    cfg = ctx.cfg
    run = PPORun(ctx, sft, proxy, seed=ctx.seeds["init"] + 200)
    at = eval_schedule(cfg.overopt_iterations, cfg.overopt_evals, power=3.0)
    ev = evaluate(ctx, sft, sft, proxy)
    points = [{"step": 0, **ev._asdict()}]
    with bar(cfg.overopt_iterations, f"PPO kl_coef={cfg.overopt_kl_coef:g}") as pbar:
        for it in range(1, cfg.overopt_iterations + 1):
            st = run.iteration(cfg.overopt_kl_coef)
            pbar.set_postfix(score=f"{st['score']:.2f}", kl=f"{st['kl']:.2f}")
            pbar.update()
            if it in at:
                ev = evaluate(ctx, run.policy.model(), sft, proxy)
                points.append({"step": it, **ev._asdict()})
                console.print(f"  step {it}: KL {ev.kl:.2f}, proxy {ev.proxy_reward:.2f}, "
                              f"gold {ev.gold_reward:.3f}")
    return {"kl_coef": cfg.overopt_kl_coef, "points": points}


# ------------------------------------------------------------------------------------- DPO


def run_dpo_sweep(ctx, sft, proxy, prefs: Preferences) -> list[dict[str, Any]]:
    cfg = ctx.cfg
    chosen, rejected = _take(prefs, cfg.rm_pairs[-1])
    n = chosen.sequences.shape[0]
    ref_c = token_logps(sft, chosen).sum(axis=1)
    ref_r = token_logps(sft, rejected).sum(axis=1)
    points = []
    trainer = None
    for beta in cfg.dpo_betas:
        seed = ctx.seeds["init"] + 300
        if trainer is None:
            trainer = Trainer(nnx.clone(sft), dpo_loss, learning_rate=cfg.dpo_learning_rate,
                              seed=seed)
        else:
            trainer.reset(nnx.clone(sft), seed)
        rng = np.random.default_rng(seed)
        at = eval_schedule(cfg.dpo_steps, cfg.dpo_evals_per_run)
        with bar(cfg.dpo_steps, f"DPO beta={beta:g}") as pbar:
            for step in range(1, cfg.dpo_steps + 1):
                idx = rng.choice(n, cfg.dpo_batch_size, replace=False)
                batch = {**_pair_batch(chosen, rejected, idx), "ref_chosen_logps": ref_c[idx],
                         "ref_rejected_logps": ref_r[idx], "beta": np.float32(beta)}
                m = trainer.step(batch)
                pbar.set_postfix(loss=f"{float(m['dpo/loss']):.3f}")
                pbar.update()
                if step in at:
                    ev = evaluate(ctx, trainer.model(), sft, proxy)
                    points.append({"method": "dpo", "param_name": "beta", "param": beta,
                                   "step": step, **ev._asdict()})
        console.print(f"DPO beta={beta:g}: KL {ev.kl:.2f}, gold {ev.gold_reward:.3f}, "
                      f"proxy {ev.proxy_reward:.2f}")
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


def run_best_of_n(ctx, sft, proxy) -> list[dict[str, Any]]:
    cfg = ctx.cfg
    # The first `bon_prompts` evaluation prompts, so that n = 1 matches the reference point.
    p_ids, p_mask = (x[: cfg.bon_prompts] for x in ctx.eval_prompts)
    g = cfg.bon_pool
    pools = []
    for i in range(2):  # candidates, and an independent pool for the CDF
        s = sample(sft, p_ids, p_mask, rng=jax.random.fold_in(ctx.eval_key, 2 * 10**6 + i),
                   max_new_tokens=cfg.max_new_tokens, num_samples=g)
        pools.append(s.enc)
    cand, cdf_pool = pools
    proxy_c = rm_scores(proxy, cand).reshape(cfg.bon_prompts, g)
    gold_c = ctx.gold(cand).reshape(cfg.bon_prompts, g)
    proxy_ref = rm_scores(proxy, cdf_pool).reshape(cfg.bon_prompts, g)
    points = []
    for n in cfg.bon_ns:
        groups = g // n
        pr = proxy_c[:, : groups * n].reshape(cfg.bon_prompts, groups, n)
        go = gold_c[:, : groups * n].reshape(cfg.bon_prompts, groups, n)
        pick = pr.argmax(-1)
        sel_proxy = np.take_along_axis(pr, pick[..., None], -1)[..., 0]
        sel_gold = np.take_along_axis(go, pick[..., None], -1)[..., 0]
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


def run_demo(cfg: DemoConfig, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Runs the whole pipeline, writes the report into `output_dir` and returns the results."""
    t_start = time.perf_counter()
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, out)
    ctx.rm_trainer_cache = {}
    ctx.ppo_cache = {}
    console.print(f"[bold]rlhf_jax demo[/bold] (preset {cfg.preset}, seed {cfg.seed}) -> {out}")
    console.print(f"task: {cfg.task}; jax {jax.__version__} on {jax.default_backend()}")

    with stage(ctx, "sft", "1/6 Supervised fine-tuning of the base policy"):
        sft = train_sft(ctx)

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
            acc = rm_accuracy(rm, val.chosen, val.rejected)
            gold_acc = float(np.mean(
                (rm_scores(rm, val.chosen) > rm_scores(rm, val.rejected))
                == (val.gold_chosen > val.gold_rejected)))
            rm_points.append({"num_pairs": n, "val_accuracy": acc, "val_gold_accuracy": gold_acc})
            console.print(f"RM on {n:5d} pairs: validation accuracy {acc:.3f} "
                          f"(vs gold preference {gold_acc:.3f})")
            proxy = rm
        norm = normalize_reward_model(ctx, proxy, sft)
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
    results["wall_time_s"] = time.perf_counter() - t_start
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
