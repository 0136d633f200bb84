"""PPO with a KL-penalised reward (Ziegler et al. 2019, Stiennon et al. 2020, InstructGPT).

One PPO iteration:

1. **Rollout**: sample one response per prompt from the policy (`rlhf_jax.generation`, jitted),
   truncated after the stop token.
2. **Scoring** (jitted): the reward source scores each response (``[B]``; responses without EOS
   lose ``missing_eos_penalty``); one forward pass each of the policy, the frozen reference and
   the value model gives the rollout log-probs ``[B, N]``, the reference log-probs and the values
   ``V(s_t)``. The per-token reward is

   .. math:: r_t = -\\beta\\, \\mathrm{kl}_t + [t = T_b]\\, s_b

   (the KL penalty on every response token, the score on the last real token ``T_b``;
   `rlhf_jax.losses.kl_penalized_rewards`), optionally whitened; GAE (``gamma``, ``lam``) gives
   advantages (whitened) and returns.
3. **Update** (jitted, state donated): ``num_epochs`` passes over ``num_minibatches`` shuffled
   minibatches, each one optimizer step of the clipped policy loss + ``vf_coef`` x clipped value
   loss - ``entropy_coef`` x entropy (`rlhf_jax.losses`), gradients clipped by global norm.
4. The KL coefficient ``beta`` is fixed or adapted (`rlhf_jax.losses` adaptive controller,
   Ziegler et al.) from the measured sequence KL.

The value model has its own parameters, initialised from the reward model (Stiennon et al.) when
the reward source is a `RewardModelSource`, else from the policy; ``value_head="shared"`` puts a
value head on the policy's own backbone instead. With LoRA on the policy (``model.lora_rank >
0``) only the adapters train and the reference is the same network with the adapters switched
off (zeroed), so no second copy of the weights is held.

Metrics of every iteration (namespaced ``ppo/``): ``score_mean`` (after the EOS penalty),
``kl_ref`` (`rlhf_jax.train.online.sequence_kl_to_reference`, the same for every online trainer),
``entropy``, ``clipfrac``, ``approx_kl`` (policy change within the update), ``policy_loss``,
``value_loss``, ``value_explained_variance``, ``response_length``, ``kl_coef``,
``non_score_reward``, ``returns_mean``, ``advantages_std`` and ``eos_fraction``.

Programmatic use::

    trainer = PPOTrainer(config, policy=lm, reward=RewardModelSource(rm), prompts=loader,
                         eos_token_id=2, pad_token_id=0)
    for _ in range(10):
        metrics = trainer.iteration()      # host floats
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlhf_jax import losses
from rlhf_jax.generation import RewardSource
from rlhf_jax.train.config import DataSpec, TrainConfig, check_int, check_number, require
from rlhf_jax.train.logprobs import policy_response_logps
from rlhf_jax.train.online import (
    ONLINE_DATA,
    MetricFn,
    OnlineTrainer,
    Reference,
    create_sharded_state,
    seed_key_data,
    sequence_kl_to_reference,
    train_online,
)
from rlhf_jax.train.optimizer import cached_optimizer
from rlhf_jax.train.rewards import RewardSpec
from rlhf_jax.train.rollout import Rollout, RolloutConfig, minibatch_indices, take_minibatch
from rlhf_jax.train.state import TrainState, make_train_step
from rlhf_jax.train.value import (
    PolicyWithValueHead,
    default_value_model,
    empty_train_state,
    explained_variance,
    response_values,
    shared_forward,
)

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PPOConfig(TrainConfig):
    """PPO against a reward model or reward function with a KL penalty to the reference policy.

    ``num_steps`` counts PPO iterations (rollout + update); ``data.batch_size`` prompts are
    sampled per iteration. Defaults follow TRL's PPO / lm-human-preferences where they exist.
    """

    output_dir: str = "runs/ppo"
    data: DataSpec = ONLINE_DATA
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardSpec = RewardSpec()
    num_epochs: int = 4
    """PPO epochs over each rollout batch."""
    num_minibatches: int = 1
    """Minibatches per epoch (each is one optimizer step); must divide ``data.batch_size``."""
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    clip_range_value: float = 0.2
    """Value clip: new values stay within this distance of the rollout values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0: off)."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """Initial (or fixed) KL coefficient beta of the reward penalty."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward (k1: log-ratio, Ziegler et al.; k2: half the squared
    log-ratio, k3: ``r - 1 - log r``, Schulman 2020)."""
    adaptive_kl: bool = False
    """Adapt beta towards ``kl_target`` (Ziegler et al.'s proportional controller)."""
    kl_target: float = 6.0
    """Target sequence KL of the adaptive controller (nats)."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive controller."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (mean kept) before GAE (TRL ``whiten_rewards``)."""
    whiten_advantages: bool = True
    """Whiten the advantages over the batch's response tokens."""
    normalize_scores: bool = False
    """Standardise the scores over the rollout batch (mean 0, std 1) before the KL penalty."""
    value_head: Literal["separate", "shared"] = "separate"
    """``separate``: a value model with its own parameters; ``shared``: a value head on the
    policy's backbone (one forward, one optimizer)."""
    value_init: Literal["reward_model", "policy"] = "reward_model"
    """Backbone the separate value model starts from (``reward_model`` falls back to the policy
    when the reward is not a reward model)."""
    value_learning_rate: float | None = None
    """Peak learning rate of the value model (default: ``optimizer.learning_rate``); the other
    optimizer settings are shared."""

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "num_epochs", low=1)
        check_int(self, "num_minibatches", low=1)
        require(self.data.batch_size % self.num_minibatches == 0, "num_minibatches",
                f"num_minibatches={self.num_minibatches} must divide data.batch_size="
                f"{self.data.batch_size}")
        for name in ("clip_range", "clip_range_value", "kl_target"):
            check_number(self, name, low=0, low_open=True)
        for name in ("vf_coef", "entropy_coef", "kl_coef"):
            check_number(self, name, low=0)
        check_number(self, "gamma", low=0, high=1)
        check_number(self, "lam", low=0, high=1)
        check_int(self, "kl_horizon", low=1)
        check_number(self, "value_learning_rate", low=0, low_open=True, optional=True)
        require(self.value_learning_rate is None
                or self.value_learning_rate >= self.optimizer.end_learning_rate,
                "value_learning_rate", f"value_learning_rate={self.value_learning_rate} must be "
                f">= optimizer.end_learning_rate={self.optimizer.end_learning_rate}")


# ---------------------------------------------------------------------------------------------
# State and rollout buffer
# ---------------------------------------------------------------------------------------------


class PPOState(NamedTuple):
    """Everything a PPO run updates (jitted, donated and checkpointed as one pytree).

    Attributes:
      step: int32 scalar, completed PPO iterations.
      policy: the policy's `TrainState` (for LoRA only the adapters are in ``params``).
      value: the value model's `TrainState` (with ``value_head="shared"`` the value head lives in
        the policy and this state is empty).
      kl_ctl: the KL controller state (`rlhf_jax.losses.KLControllerState`, the current beta).
      rng: uint32 raw key data of the rollout / minibatch randomness.
    """

    step: jax.Array
    policy: TrainState
    value: TrainState
    kl_ctl: losses.KLControllerState
    rng: jax.Array


class PPOExperience(NamedTuple):
    """The rollout buffer of one PPO iteration (all ``[B, N]`` arrays aligned to response tokens).

    Attributes:
      rollout: the sampled `Rollout`.
      scores: ``[B]`` reward-source scores after the missing-EOS penalty (and normalisation).
      old_logps: ``[B, N]`` policy log-probs at rollout time (tempered).
      ref_logps: ``[B, N]`` reference log-probs (tempered the same way).
      old_values: ``[B, N]`` values ``V(s_t)`` at rollout time (0 on padding).
      rewards: ``[B, N]`` per-token rewards (KL penalty + score on the last real token).
      advantages: ``[B, N]`` GAE advantages (whitened if configured; 0 on padding).
      returns: ``[B, N]`` value targets ``advantages_raw + old_values``.
    """

    rollout: Rollout
    scores: jax.Array
    old_logps: jax.Array
    ref_logps: jax.Array
    old_values: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array


class PPOHyperParams(NamedTuple):
    """The numeric hyper-parameters the jitted functions close over (static)."""

    temperature: float
    kl_estimator: str
    gamma: float
    lam: float
    whiten_rewards: bool
    whiten_advantages: bool
    normalize_scores: bool
    clip_range: float
    clip_range_value: float
    vf_coef: float
    entropy_coef: float
    num_epochs: int
    num_minibatches: int

    @classmethod
    def from_config(cls, config: PPOConfig) -> PPOHyperParams:
        return cls(
            temperature=float(config.rollout.temperature),
            kl_estimator=config.kl_estimator,
            gamma=float(config.gamma),
            lam=float(config.lam),
            whiten_rewards=bool(config.whiten_rewards),
            whiten_advantages=bool(config.whiten_advantages),
            normalize_scores=bool(config.normalize_scores),
            clip_range=float(config.clip_range),
            clip_range_value=float(config.clip_range_value),
            vf_coef=float(config.vf_coef),
            entropy_coef=float(config.entropy_coef),
            num_epochs=int(config.num_epochs),
            num_minibatches=int(config.num_minibatches),
        )


# ---------------------------------------------------------------------------------------------
# Pure PPO math
# ---------------------------------------------------------------------------------------------


def ppo_rewards_and_advantages(
    scores: jax.Array,
    old_logps: jax.Array,
    ref_logps: jax.Array,
    old_values: jax.Array,
    response_mask: jax.Array,
    *,
    kl_coef: jax.Array | float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    whiten_advantages: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-token rewards, advantages and returns of a scored rollout.

    .. math::
        r_t = -\\beta\\, \\mathrm{kl}_t + [t = T_b]\\, s_b, \\qquad
        \\hat A = \\mathrm{GAE}_{\\gamma, \\lambda}(r, V), \\qquad R_t = \\hat A_t + V_t

    with ``kl_t`` the k1 (``log pi - log pi_ref``), k2 or k3 estimate and ``T_b`` the last real
    response token (`rlhf_jax.losses.kl_penalized_rewards`, `rlhf_jax.losses.gae`).
    ``whiten_rewards`` whitens ``r`` keeping its mean (TRL ``whiten_rewards``); the returns use
    the raw advantages, then ``whiten_advantages`` whitens the advantages (TRL, lm-human-prefs).

    Args:
      scores: ``[B]`` sequence scores.
      old_logps, ref_logps, old_values: ``[B, N]``.
      response_mask: ``[B, N]`` 1 on response tokens (right-padded).
      kl_coef: beta (scalar, may be traced).

    Returns:
      ``(rewards, advantages, returns, kl)``, each ``[B, N]`` float32, 0 on padding.
    """
    mask = response_mask.astype(jnp.float32)
    rewards, kl = losses.kl_penalized_rewards(
        scores, old_logps, ref_logps, mask, kl_coef=kl_coef, estimator=kl_estimator
    )
    if whiten_rewards:
        rewards = losses.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = losses.gae(rewards, old_values, mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = losses.masked_whiten(advantages, mask)
    return rewards * mask, advantages * mask, returns, kl


def ppo_minibatch_loss(
    policy: Any,
    value_model: Any,
    batch: PPOExperience,
    *,
    hp: PPOHyperParams,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO loss of one minibatch: clipped policy loss + vf_coef x clipped value loss - entropy.

    .. math::
        L = \\overline{\\max(-\\hat A\\rho, -\\hat A\\,\\mathrm{clip}(\\rho, 1\\pm\\epsilon))}
            + c_v\\, \\overline{\\tfrac12 \\max((V - R)^2, (V_{clip} - R)^2)}
            - c_e\\, \\overline{H}

    (token means over the minibatch's response tokens; `rlhf_jax.losses.ppo_clip_loss`,
    `rlhf_jax.losses.clipped_value_loss`).

    Args:
      policy: the causal LM (or the shared policy/value model).
      value_model: the value model, or None when the policy carries the value head.
      batch: a minibatch of the rollout buffer.
      hp: hyper-parameters.

    Returns:
      ``(loss, metrics)`` with ``ppo/policy_loss``, ``ppo/value_loss``, ``ppo/entropy``,
      ``ppo/clipfrac``, ``ppo/approx_kl``, ``ppo/value_clipfrac``, ``ppo/ratio_mean``.
    """
    rollout = batch.rollout
    if value_model is None:
        logps, entropy, values = shared_forward(policy, rollout, temperature=hp.temperature)
    else:
        logps, entropy = policy_response_logps(
            policy, rollout, temperature=hp.temperature, with_entropy=True
        )
        values = response_values(value_model, rollout)
    policy_total, policy_metrics = _policy_terms(logps, entropy, batch, hp=hp)
    value_total, value_metrics = _value_terms(values, batch, hp=hp)
    return policy_total + value_total, {**policy_metrics, **value_metrics}


def _policy_terms(logps, entropy, batch: PPOExperience, *, hp: PPOHyperParams):
    """``mean(clipped surrogate) - entropy_coef * mean(entropy)`` and the policy metrics."""
    mask = batch.rollout.response_mask.astype(jnp.float32)
    pg = losses.ppo_clip_loss(logps, batch.old_logps, batch.advantages, clip_eps=hp.clip_range)
    policy_loss = losses.masked_mean(pg, mask)
    mean_entropy = losses.masked_mean(entropy, mask)
    total = policy_loss - hp.entropy_coef * mean_entropy if hp.entropy_coef else policy_loss
    log_ratio = jax.lax.stop_gradient(logps - batch.old_logps)
    return total, {
        "ppo/policy_loss": policy_loss,
        "ppo/entropy": jax.lax.stop_gradient(mean_entropy),
        "ppo/clipfrac": losses.clip_fraction(
            logps, batch.old_logps, mask, clip_eps=hp.clip_range, advantages=batch.advantages
        ),
        "ppo/approx_kl": losses.approx_kl(logps, batch.old_logps, mask),
        "ppo/ratio_mean": losses.masked_mean(jnp.exp(log_ratio), mask),
    }


def _value_terms(values, batch: PPOExperience, *, hp: PPOHyperParams):
    """``vf_coef * mean(clipped value loss)`` and the value metrics."""
    mask = batch.rollout.response_mask.astype(jnp.float32)
    vf = losses.clipped_value_loss(
        values, batch.old_values, batch.returns, clip=hp.clip_range_value
    )
    value_loss = losses.masked_mean(vf, mask)
    clipped = jnp.abs(values - batch.old_values) > hp.clip_range_value
    return hp.vf_coef * value_loss, {
        "ppo/value_loss": value_loss,
        "ppo/value_clipfrac": losses.masked_mean(clipped.astype(jnp.float32), mask),
    }


def ppo_policy_loss(policy: Any, batch: PPOExperience, *, hp: PPOHyperParams):
    """The policy part of `ppo_minibatch_loss` (separate value model): clipped surrogate minus
    the entropy bonus. Its gradient equals the joint loss's gradient for the policy."""
    logps, entropy = policy_response_logps(
        policy, batch.rollout, temperature=hp.temperature, with_entropy=True
    )
    return _policy_terms(logps, entropy, batch, hp=hp)


def ppo_value_loss(value_model: Any, batch: PPOExperience, *, hp: PPOHyperParams):
    """The value part of `ppo_minibatch_loss`: ``vf_coef`` x clipped value loss."""
    return _value_terms(response_values(value_model, batch.rollout), batch, hp=hp)


# ---------------------------------------------------------------------------------------------
# Jitted pieces
# ---------------------------------------------------------------------------------------------


def make_score_fn(
    policy_graphdef: nnx.GraphDef,
    value_graphdef: nnx.GraphDef | None,
    *,
    hp: PPOHyperParams,
    reference: Reference,
) -> Callable[..., tuple[PPOExperience, dict[str, jax.Array]]]:
    """Pure ``score(state, ref_state, rollout, scores) -> (experience, metrics)`` (to be jitted).

    Runs the policy, reference and value forward passes over the rollout and builds the rollout
    buffer (`ppo_rewards_and_advantages`). ``value_graphdef=None`` means the policy is a
    `PolicyWithValueHead`.
    """

    def score(state: PPOState, ref_state: Any, rollout: Rollout, scores: jax.Array):
        mask = rollout.response_mask.astype(jnp.float32)
        policy = nnx.merge(policy_graphdef, state.policy.params, state.policy.frozen)
        if value_graphdef is None:
            old_logps, _, old_values = shared_forward(
                policy, rollout, temperature=hp.temperature, with_entropy=False
            )
        else:
            old_logps, _ = policy_response_logps(policy, rollout, temperature=hp.temperature)
            value_model = nnx.merge(value_graphdef, state.value.params, state.value.frozen)
            old_values = response_values(value_model, rollout)
        ref_model = reference.model(policy_graphdef, state.policy, ref_state)
        ref_logps, _ = policy_response_logps(ref_model, rollout, temperature=hp.temperature)
        old_logps = jax.lax.stop_gradient(old_logps) * mask
        ref_logps = jax.lax.stop_gradient(ref_logps) * mask
        old_values = jax.lax.stop_gradient(old_values) * mask
        raw_scores = scores
        if hp.normalize_scores:
            scores = (scores - jnp.mean(scores)) / (jnp.std(scores) + 1e-8)
        kl_coef = state.kl_ctl.kl_coef
        rewards, advantages, returns, kl = ppo_rewards_and_advantages(
            scores,
            old_logps,
            ref_logps,
            old_values,
            mask,
            kl_coef=kl_coef,
            kl_estimator=hp.kl_estimator,
            gamma=hp.gamma,
            lam=hp.lam,
            whiten_rewards=hp.whiten_rewards,
            whiten_advantages=hp.whiten_advantages,
        )
        experience = PPOExperience(
            rollout=rollout,
            scores=scores,
            old_logps=old_logps,
            ref_logps=ref_logps,
            old_values=old_values,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
        )
        metrics = {
            "ppo/score_mean": jnp.mean(raw_scores),
            "ppo/score_std": jnp.std(raw_scores),
            "ppo/kl_ref": jnp.mean(sequence_kl_to_reference(old_logps, ref_logps, mask)),
            "ppo/kl_penalty": jnp.mean(jnp.sum(kl, axis=-1)),
            "ppo/non_score_reward": -kl_coef * jnp.mean(jnp.sum(kl, axis=-1)),
            "ppo/kl_coef": kl_coef,
            "ppo/response_length": jnp.mean(jnp.sum(mask, axis=-1)),
            "ppo/eos_fraction": jnp.mean(rollout.finished.astype(jnp.float32)),
            "ppo/returns_mean": losses.masked_mean(returns, mask),
            "ppo/advantages_std": jnp.sqrt(losses.masked_var(advantages, mask)),
            "ppo/value_explained_variance": explained_variance(old_values, returns, mask),
        }
        return experience, metrics

    return score


def make_update_fn(
    policy_graphdef: nnx.GraphDef,
    value_graphdef: nnx.GraphDef | None,
    policy_tx: optax.GradientTransformation,
    value_tx: optax.GradientTransformation | None,
    kl_controller: losses.KLController,
    *,
    hp: PPOHyperParams,
    batch_sharding: Any = None,
    schedule: optax.Schedule | None = None,
) -> Callable[..., tuple[PPOState, dict[str, jax.Array]]]:
    """Pure ``update(state, experience, rng, kl) -> (state, metrics)`` (jit it, donate state).

    ``num_epochs`` x ``num_minibatches`` optimizer steps in one ``lax.scan``; each epoch is a
    fresh permutation of the rollout rows (`minibatch_indices`). Each step is
    `rlhf_jax.train.state.make_train_step` on the policy (clipped surrogate - entropy bonus) and,
    with a separate value model, on the value model (``vf_coef`` x clipped value loss): the two
    terms share no parameters, so this is the gradient of the joint loss. A step whose loss or
    gradient norm is not finite is skipped (``ppo/nonfinite`` counts them). Metrics are means
    over the steps. Then the KL controller moves beta given the rollout's sequence KL ``kl`` and
    ``B`` samples, the iteration counter advances and the next key is stored.
    """
    shared = value_graphdef is None
    if shared:
        policy_loss = lambda model, mb, rng: ppo_minibatch_loss(model, None, mb, hp=hp)
    else:
        policy_loss = lambda model, mb, rng: ppo_policy_loss(model, mb, hp=hp)
        value_step = make_train_step(
            lambda model, mb, rng: ppo_value_loss(model, mb, hp=hp),
            value_tx,
            graphdef=value_graphdef,
        )
    policy_step = make_train_step(policy_loss, policy_tx, graphdef=policy_graphdef,
                                  schedule=schedule)

    def update(state: PPOState, experience: PPOExperience, rng: jax.Array, kl: jax.Array):
        next_rng, perm_rng = jax.random.split(jax.random.wrap_key_data(rng))
        batch_size = experience.scores.shape[0]
        indices = minibatch_indices(
            perm_rng,
            batch_size=batch_size,
            num_minibatches=hp.num_minibatches,
            num_epochs=hp.num_epochs,
        )

        def body(carry, idx):
            policy_state, value_state = carry
            mb = take_minibatch(experience, idx)
            if batch_sharding is not None:
                mb = jax.lax.with_sharding_constraint(mb, batch_sharding)
            policy_state, metrics = policy_step(policy_state, mb)
            metrics = dict(metrics)
            metrics["ppo/policy_grad_norm"] = metrics.pop("train/grad_norm")
            if not shared:
                value_state, value_metrics = value_step(value_state, mb)
                metrics["ppo/value_grad_norm"] = value_metrics.pop("train/grad_norm")
                metrics["train/nonfinite"] = jnp.maximum(
                    metrics["train/nonfinite"], value_metrics.pop("train/nonfinite")
                )
                metrics.update(value_metrics)
            metrics["ppo/loss"] = (
                metrics["ppo/policy_loss"] + hp.vf_coef * metrics["ppo/value_loss"]
                - hp.entropy_coef * metrics["ppo/entropy"]
            )
            return (policy_state, value_state), metrics

        (policy_state, value_state), metrics = jax.lax.scan(
            body, (state.policy, state.value), indices
        )
        nonfinite = jnp.sum(metrics.pop("train/nonfinite"))
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        metrics["ppo/nonfinite"] = nonfinite
        metrics["train/nonfinite"] = jnp.minimum(nonfinite, 1.0)
        new_state = PPOState(
            step=state.step + 1,
            policy=policy_state,
            value=value_state,
            kl_ctl=kl_controller.update(state.kl_ctl, kl, batch_size),
            rng=jax.random.key_data(next_rng),
        )
        return new_state, metrics

    return update


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------

def kl_controller_from_config(config: Any) -> losses.KLController:
    """The adaptive (Ziegler et al.; ``kl_target``, ``kl_horizon``) or fixed KL controller of a
    config. Its ``update`` does not depend on the initial ``kl_coef`` (the state holds beta), so
    runs that differ only in ``kl_coef`` share one compiled update."""
    if config.adaptive_kl:
        return _kl_controller(True, float(config.kl_target), float(config.kl_horizon))
    return _kl_controller(False, 0.0, 0.0)


@functools.lru_cache(maxsize=64)
def _kl_controller(adaptive: bool, target: float, horizon: float) -> losses.KLController:
    if adaptive:
        return losses.adaptive_kl_controller(0.0, target, horizon)
    return losses.fixed_kl_controller(0.0)


@functools.lru_cache(maxsize=32)
def _jit_score(policy_graphdef, value_graphdef, hp, reference):
    return jax.jit(losses.unchecked(
        make_score_fn(policy_graphdef, value_graphdef, hp=hp, reference=reference)))


@functools.lru_cache(maxsize=32)
def _jit_update(policy_graphdef, value_graphdef, policy_tx, value_tx, kl_controller, hp,
                batch_sharding, schedule):
    update = make_update_fn(
        policy_graphdef,
        value_graphdef,
        policy_tx,
        value_tx,
        kl_controller,
        hp=hp,
        batch_sharding=batch_sharding,
        schedule=schedule,
    )
    return jax.jit(losses.unchecked(update), donate_argnums=(0,))


class PPOTrainer(OnlineTrainer):
    """A PPO run held in memory: ``iteration()`` does one rollout + scoring + update.

    Args:
      config: the run's `PPOConfig`.
      policy: the initial policy, an NNX ``CausalLM`` (with LoRA adapters attached for
        parameter-efficient training: then only the adapters train).
      reward: the reward source (`rlhf_jax.generation.RewardSource`; from a config:
        `rlhf_jax.train.rewards.build_reward_source`).
      prompts: iterator of host prompt batches (``prompt_ids``, ``prompt_mask`` ``[B, P]``
        left-padded, plus task fields), with ``get_state``/``set_state`` for exact resume (e.g.
        `rlhf_jax.data.PromptLoader`).
      eos_token_id, pad_token_id: token ids of the policy's tokenizer.
      reference: the frozen reference policy (default: a copy of ``policy`` taken now; unused
        with LoRA, where the reference is the policy with its adapters off).
      value_model: the value model (default: `default_value_model` per ``config.value_init``).
      mesh: device mesh (default: from ``config.mesh``).
      metric_fns: extra per-iteration metrics (`MetricFn`).

    The models passed in are placed on the mesh in place and must not be used afterwards; get
    the trained policy from `policy_model`.
    """

    algorithm = "ppo"

    def __init__(
        self,
        config: PPOConfig,
        *,
        policy: nnx.Module,
        reward: RewardSource,
        prompts: Iterator[Mapping[str, np.ndarray]],
        eos_token_id: int,
        pad_token_id: int,
        reference: nnx.Module | None = None,
        value_model: nnx.Module | None = None,
        mesh: Any = None,
        metric_fns: Sequence[MetricFn] = (),
    ):
        for name in ("num_epochs", "num_minibatches"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
        if config.data.batch_size % config.num_minibatches:
            raise ValueError(
                f"num_minibatches={config.num_minibatches} must divide data.batch_size="
                f"{config.data.batch_size}"
            )
        self.hp = PPOHyperParams.from_config(config)
        self._value_model = value_model
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
            samples_per_prompt=1,
            update_rows=config.data.batch_size // config.num_minibatches,
            update_rows_name="a PPO minibatch (data.batch_size / num_minibatches)",
            num_updates=config.num_steps * config.num_epochs * config.num_minibatches,
        )
        # Cached per graphs and hyper-parameters: a second trainer with the same config reuses
        # the compiled functions.
        self._score = _jit_score(
            self.policy_graphdef, self.value_graphdef, self.hp, self.reference
        )
        self._update = _jit_update(
            self.policy_graphdef,
            self.value_graphdef,
            self.tx,
            self.value_tx,
            self.kl_controller,
            self.hp,
            self.batch_sharding,
            self.schedule,
        )

    def trained_policy(self, policy: nnx.Module) -> nnx.Module:
        """With ``value_head="shared"`` the policy gains a value head (trained with it);
        otherwise the separate value model is built (`default_value_model`) unless given."""
        config = self.config
        if config.value_head == "shared":
            self._value_model = None
            return PolicyWithValueHead(policy, rngs=nnx.Rngs(config.seed + 1))
        if self._value_model is None:
            self._value_model = default_value_model(
                policy, self.reward, init=config.value_init, seed=config.seed + 1
            )
        return policy

    def initial_state(self, policy_state: TrainState) -> PPOState:
        """The policy's state beside the value model's (its own optimizer, an optional peak
        learning rate of its own) and the KL controller's initial coefficient."""
        config = self.config
        if self._value_model is None:
            self.value_tx, self.value_graphdef = None, None
            value_state = empty_train_state()
        else:
            total_updates = config.num_steps * config.num_epochs * config.num_minibatches
            value_opt = config.optimizer
            if config.value_learning_rate is not None:
                value_opt = dataclasses.replace(value_opt, learning_rate=config.value_learning_rate)
            self.value_tx, _ = cached_optimizer(value_opt, max(total_updates, 1))
            self.value_graphdef, value_state = create_sharded_state(
                self._value_model, self.value_tx, seed=config.seed, mesh=self.mesh
            )
            self._value_model = None  # split into the state above
        self.kl_controller = kl_controller_from_config(config)
        return PPOState(
            step=jnp.zeros((), jnp.int32),
            policy=policy_state,
            value=value_state,
            kl_ctl=losses.KLControllerState(kl_coef=jnp.asarray(config.kl_coef, jnp.float32)),
            rng=seed_key_data(config.seed),
        )

    # -- the three phases (separately callable for benchmarks; `rollout` is the base's) -----

    def score(
        self, state: PPOState, rollout: Rollout, prompts: Mapping[str, np.ndarray]
    ) -> tuple[PPOExperience, dict[str, jax.Array]]:
        """Reward-source scores, then the jitted forward passes that build the rollout buffer."""
        scores = self.scores(rollout, prompts)
        return self._score(state, self.reference.state, rollout, scores)

    def update(
        self, state: PPOState, experience: PPOExperience, rng: jax.Array, kl: jax.Array
    ) -> tuple[PPOState, dict[str, jax.Array]]:
        """The jitted PPO update (all epochs and minibatches); donates ``state``."""
        return self._update(state, experience, rng, kl)

    # -- one iteration ----------------------------------------------------------------------

    def step(
        self, state: PPOState, prompts: Mapping[str, np.ndarray]
    ) -> tuple[PPOState, dict[str, Any]]:
        """One PPO iteration from ``state`` on a host prompt batch (the `fit` step function)."""
        keys = jax.random.split(jax.random.wrap_key_data(state.rng))
        rollout = self.rollout(state, prompts, keys[0])
        experience, metrics = self.score(state, rollout, prompts)
        extra = self.extra_metrics(experience, prompts)
        state, update_metrics = self.update(
            state, experience, jax.random.key_data(keys[1]), metrics["ppo/kl_ref"]
        )
        return state, {**metrics, **update_metrics, **extra}


def train_ppo(config: PPOConfig) -> dict[str, Any]:
    """``rlhf-jax ppo``: builds the policy, reward and prompts from ``config`` and runs PPO.

    Returns a summary dict (output directory, iterations run, final metrics).
    """
    return train_online(PPOTrainer, config, algorithm="ppo")


__all__ = [
    "PPOConfig",
    "PPOExperience",
    "PPOHyperParams",
    "PPOState",
    "PPOTrainer",
    "kl_controller_from_config",
    "make_score_fn",
    "make_update_fn",
    "ppo_minibatch_loss",
    "ppo_policy_loss",
    "ppo_rewards_and_advantages",
    "ppo_value_loss",
    "train_ppo",
]
