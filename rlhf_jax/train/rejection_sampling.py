"""Iterated rejection sampling (best-of-K fine-tuning), Llama 2's first RLHF stage.

Touvron et al. (2023, section 3.2.3): for each prompt sample ``K`` responses from the current
policy, score them with the reward, keep the best one, and fine-tune the policy on the kept
responses with the SFT loss; repeat for several rounds, each sampling from the policy the
previous round produced.

One round is one step of the shared loop (`rlhf_jax.train.loop.fit`), so checkpoints, exact
resume, metrics.jsonl and TensorBoard work at round granularity:

1. **Sample**: ``num_samples`` responses for each of the round's ``data.batch_size`` prompts
   (`rlhf_jax.generation`, jitted).
2. **Select**: score every response (reward source, missing-EOS penalty) and keep the best of
   each prompt (`rlhf_jax.generation.select_best_of_n`).
3. **Fine-tune**: ``sft_epochs`` shuffled passes of ``sft_batch_size`` rows over the kept
   (prompt, response) pairs with `rlhf_jax.train.sft.sft_loss` (completion-only token mean), each
   minibatch one jitted, donated optimizer step (`rlhf_jax.train.state.make_train_step`).

Metrics per round (``rs/``): ``score_mean`` (all samples), ``best_score_mean`` (kept samples),
``kl_ref`` (sequence KL of the round's samples to the reference, the estimator of every online
trainer), ``response_length``, ``eos_fraction``, and the SFT step means ``loss``, ``accuracy``.
``num_steps`` counts rounds.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import losses
from rlhf_jax.generation import RewardSource, select_best_of_n
from rlhf_jax.models import positions_from_mask
from rlhf_jax.train.config import DataSpec, TrainConfig, check_int, require
from rlhf_jax.train.online import (
    ONLINE_DATA,
    MetricFn,
    OnlineTrainer,
    jit_mean_kl_to_reference,
    seed_key_data,
    train_online,
)
from rlhf_jax.train.rewards import RewardSpec
from rlhf_jax.train.rollout import Rollout, RolloutConfig
from rlhf_jax.train.sft import make_sft_loss
from rlhf_jax.train.state import TrainState, make_train_step


@dataclasses.dataclass(frozen=True)
class RejectionSamplingConfig(TrainConfig):
    """Iterated best-of-K fine-tuning. ``num_steps`` = rounds; ``data.batch_size`` = prompts per
    round."""

    output_dir: str = "runs/rejection_sampling"
    data: DataSpec = ONLINE_DATA
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardSpec = RewardSpec()
    num_samples: int = 4
    """Responses sampled per prompt (K)."""
    sft_epochs: int = 1
    """Passes over a round's kept responses."""
    sft_batch_size: int = 8
    """Rows per SFT optimizer step; must divide ``data.batch_size``."""

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "num_samples", low=1)
        check_int(self, "sft_epochs", low=1)
        check_int(self, "sft_batch_size", low=1)
        require(self.data.batch_size % self.sft_batch_size == 0, "sft_batch_size",
                f"sft_batch_size={self.sft_batch_size} must divide data.batch_size="
                f"{self.data.batch_size}")


class RejectionSamplingState(NamedTuple):
    """Rounds completed, the policy's `TrainState` (its ``step`` counts SFT steps), the RNG."""

    step: jax.Array
    policy: TrainState
    rng: jax.Array


def best_of_n_sft_batch(rollout: Rollout, indices: jax.Array) -> dict[str, jax.Array]:
    """An SFT batch of the rows ``indices`` of a rollout: prompt + response with the loss on the
    response tokens (its EOS included).

    Returns ``input_ids, attention_mask, positions, loss_mask`` ``[K, P + N]`` (the prompt stays
    left-padded, so positions are ``cumsum(attention_mask) - 1``).
    """
    kept = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), rollout)
    p = kept.prompt_length
    loss_mask = jnp.concatenate(
        [jnp.zeros_like(kept.sequence_mask[:, :p]), kept.response_mask], axis=1
    )
    return {
        "input_ids": kept.sequences,
        "attention_mask": kept.sequence_mask,
        "positions": positions_from_mask(kept.sequence_mask),
        "loss_mask": loss_mask,
    }


@functools.lru_cache(maxsize=16)
def _jit_sft_step(policy_graphdef, tx, schedule):
    step = make_train_step(make_sft_loss(), tx, graphdef=policy_graphdef, schedule=schedule)
    return jax.jit(losses.unchecked(step), donate_argnums=(0,))


class RejectionSamplingTrainer(OnlineTrainer):
    """Iterated rejection sampling held in memory; ``iteration()`` runs one round.

    Args: as `rlhf_jax.train.ppo.PPOTrainer` (no value model); ``prompts`` yields one round's
    prompts per batch.
    """

    algorithm = "rs"

    def __init__(
        self,
        config: RejectionSamplingConfig,
        *,
        policy: nnx.Module,
        reward: RewardSource,
        prompts: Iterator[Mapping[str, np.ndarray]],
        eos_token_id: int,
        pad_token_id: int,
        reference: nnx.Module | None = None,
        mesh: Any = None,
        metric_fns: Sequence[MetricFn] = (),
    ):
        if config.num_samples < 1 or config.sft_epochs < 1:
            raise ValueError(
                f"num_samples and sft_epochs must be >= 1, got {config.num_samples} and "
                f"{config.sft_epochs}"
            )
        if config.sft_batch_size < 1 or config.data.batch_size % config.sft_batch_size:
            raise ValueError(
                f"sft_batch_size={config.sft_batch_size} must divide data.batch_size="
                f"{config.data.batch_size}"
            )
        self.steps_per_round = config.sft_epochs * (config.data.batch_size // config.sft_batch_size)
        self.setup(
            config,
            policy=policy,
            reward=reward,
            prompts=prompts,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            reference=reference,
            mesh=mesh,
            metric_fns=metric_fns,
            samples_per_prompt=config.num_samples,
            update_rows=config.sft_batch_size,
            update_rows_name="sft_batch_size",
            num_updates=config.num_steps * self.steps_per_round,
        )
        self._kl = jit_mean_kl_to_reference(self.policy_graphdef, self.reference,
                                            float(config.rollout.temperature))
        self._sft_step = _jit_sft_step(self.policy_graphdef, self.tx, self.schedule)

    def initial_state(self, policy_state: TrainState) -> RejectionSamplingState:
        return RejectionSamplingState(
            step=jnp.zeros((), jnp.int32), policy=policy_state,
            rng=seed_key_data(self.config.seed),
        )

    def collect(self, state: RejectionSamplingState, prompts: Mapping[str, np.ndarray],
                rng: jax.Array) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        """Samples K responses per prompt, keeps the best; returns the SFT batch and metrics."""
        rollout = self.rollout(state, prompts, rng)
        scores = self.scores(rollout, prompts)
        selection = select_best_of_n(scores, num_samples=self.samples_per_prompt)
        mask = rollout.response_mask.astype(jnp.float32)
        metrics = {
            "rs/score_mean": jnp.mean(scores),
            "rs/best_score_mean": jnp.mean(selection.best_scores),
            "rs/kl_ref": self._kl(state.policy, self.reference.state, rollout),
            "rs/response_length": jnp.mean(jnp.sum(mask, axis=-1)),
            "rs/eos_fraction": jnp.mean(rollout.finished.astype(jnp.float32)),
        }
        experience = _Kept(rollout=rollout, scores=scores, selection=selection)
        metrics.update(self.extra_metrics(experience, prompts))
        return best_of_n_sft_batch(rollout, selection.best_indices), metrics

    def step(self, state: RejectionSamplingState, prompts: Mapping[str, np.ndarray]):
        """One round (the `fit` step function)."""
        key = jax.random.wrap_key_data(state.rng)
        rollout_key, shuffle_key, next_key = jax.random.split(key, 3)
        batch, metrics = self.collect(state, prompts, rollout_key)
        n = self.config.data.batch_size
        size = self.config.sft_batch_size
        policy = state.policy
        sft_metrics: list[dict[str, jax.Array]] = []
        for epoch in range(self.config.sft_epochs):
            order = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n)
            for start in range(0, n, size):
                rows = order[start : start + size]
                mb = jax.device_put(
                    {k: jnp.take(v, rows, axis=0) for k, v in batch.items()},
                    self.batch_sharding,
                )
                policy, m = self._sft_step(policy, mb)
                sft_metrics.append(m)
        metrics["rs/loss"] = jnp.mean(jnp.stack([m["sft/loss"] for m in sft_metrics]))
        metrics["rs/accuracy"] = jnp.mean(jnp.stack([m["sft/accuracy"] for m in sft_metrics]))
        metrics["train/nonfinite"] = jnp.max(
            jnp.stack([m["train/nonfinite"] for m in sft_metrics])
        )
        metrics["train/learning_rate"] = sft_metrics[-1]["train/learning_rate"]
        new_state = RejectionSamplingState(
            step=state.step + 1, policy=policy, rng=jax.random.key_data(next_key)
        )
        return new_state, metrics


class _Kept(NamedTuple):
    """What per-round metric functions receive: all samples, their scores, the selection."""

    rollout: Rollout
    scores: jax.Array
    selection: Any


def train_rejection_sampling(config: RejectionSamplingConfig) -> dict[str, Any]:
    """``rlhf-jax rejection-sampling``: builds policy, reward and prompts and runs the rounds."""
    return train_online(RejectionSamplingTrainer, config, algorithm="rs")


__all__ = [
    "RejectionSamplingConfig",
    "RejectionSamplingState",
    "RejectionSamplingTrainer",
    "best_of_n_sft_batch",
    "train_rejection_sampling",
]
