"""Held-out evaluation of an online trainer's policy (``--eval-every``): sample the current
policy on held-out prompts and report its rewards, its KL to the reference, its lengths and a
few sample responses.

`evaluate_held_out` is a function of the policy and reference states, so any online trainer
(`rlhf_jax.train.online.OnlineTrainer.evaluate` calls it) can use it. Per held-out prompt it
samples one response from the policy's own distribution (temperature 1, no top-k / top-p /
min-p filter, whatever the rollout's sampling parameters: the KL estimates below need samples
from the policy itself) with a fixed PRNG key, so successive evaluations differ only by the
policy. It reports, under ``<ns>/eval/`` (averaged over the held-out rows):

- ``reward``: the run's reward source (the proxy), without the missing-EOS penalty;
- ``gold_reward``: the synthetic task's gold reward, when the task has one;
- ``kl_ref_exact``: the exact sequence KL to the reference from the logits,
  ``sum_t KL(pi(. | y_<t) || pi_ref(. | y_<t))`` over the response tokens
  (`rlhf_jax.losses.kl_from_logits`);
- ``kl_ref_k1``, ``kl_ref_k3``: the k1 and k3 estimates of the same KL from the sampled tokens
  (Schulman 2020; k1 is the estimator of the trainers' ``<ns>/kl_ref`` on rollouts);
- ``response_length``: response tokens (the EOS included); ``eos_rate``: the share of responses
  that end with EOS; ``num_prompts``: how many held-out prompts were evaluated;
- ``samples``: a `rlhf_jax.train.logging.SampleTable` of the first ``table_rows`` prompts with
  their responses, proxy and gold rewards (None without a gold task) and exact KL
  (metrics.jsonl and TensorBoard's text tab).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import losses, sharding
from rlhf_jax.generation import RewardSource, score_samples
from rlhf_jax.models import positions_from_mask
from rlhf_jax.train.logging import SampleTable
from rlhf_jax.train.logprobs import response_logits
from rlhf_jax.train.rollout import Rollout, RolloutConfig, sample_rollout
from rlhf_jax.train.value import unwrap_policy

EVAL_SEED_OFFSET = 0x5EED
"""The evaluation's PRNG key is ``fold_in(key(seed + EVAL_SEED_OFFSET), batch index)``."""


class SequenceKL(NamedTuple):
    """Per-row sequence KL of a policy to its reference over a rollout's response tokens.

    Attributes:
      exact: ``[B]`` ``sum_t m_t KL(pi_t || pi_ref_t)`` from the full logits.
      k1: ``[B]`` ``sum_t m_t (log pi(y_t) - log pi_ref(y_t))``.
      k3: ``[B]`` ``sum_t m_t (r_t - 1 - log r_t)``, ``r_t = pi_ref(y_t) / pi(y_t)``.
    """

    exact: jax.Array
    k1: jax.Array
    k3: jax.Array


def sequence_kl(logits: jax.Array, ref_logits: jax.Array, rollout: Rollout) -> SequenceKL:
    """`SequenceKL` from the policy's and the reference's full-sequence logits.

    Args:
      logits: ``[B, P + N, V]`` policy logits over ``rollout.sequences``.
      ref_logits: ``[B, P + N, V]`` reference logits.
      rollout: the sampled responses (``response_ids``, ``response_mask`` ``[B, N]``).

    Returns:
      A `SequenceKL` of float32 ``[B]`` arrays.
    """
    p = rollout.prompt_length
    pol = response_logits(logits, p).astype(jnp.float32)
    ref = response_logits(ref_logits, p).astype(jnp.float32)
    mask = rollout.response_mask.astype(jnp.float32)
    logps = losses.token_logps(pol, rollout.response_ids)
    ref_logps = losses.token_logps(ref, rollout.response_ids)
    exact = losses.masked_sum(losses.kl_from_logits(pol, ref), mask, axis=-1)
    k1 = losses.masked_sum(losses.kl_k1(logps, ref_logps), mask, axis=-1)
    k3 = losses.masked_sum(losses.kl_k3(logps, ref_logps), mask, axis=-1)
    return SequenceKL(exact=exact, k1=k1, k3=k3)


def _forward(model: Any, rollout: Rollout) -> jax.Array:
    return unwrap_policy(model)(rollout.sequences, attention_mask=rollout.sequence_mask,
                                positions=positions_from_mask(rollout.sequence_mask))


@functools.lru_cache(maxsize=32)
def _jitted_kl(policy_graphdef: Any, reference: Any) -> Callable:
    """``kl(policy_state, ref_state, rollout) -> SequenceKL``, jitted once per graph and
    reference (``reference``: a `rlhf_jax.train.online.Reference`)."""

    def kl(policy_state: Any, ref_state: Any, rollout: Rollout) -> SequenceKL:
        policy = nnx.merge(policy_graphdef, policy_state.params, policy_state.frozen)
        ref_model = reference.model(policy_graphdef, policy_state, ref_state)
        return sequence_kl(_forward(policy, rollout), _forward(ref_model, rollout), rollout)

    return jax.jit(losses.unchecked(kl))


def policy_sampling(config: RolloutConfig) -> RolloutConfig:
    """`config` sampling the policy's own distribution: temperature 1, no filters, not greedy."""
    return dataclasses.replace(config, temperature=1.0, top_k=None, top_p=None, min_p=None,
                               greedy=False)


def _text(ids: np.ndarray, mask: np.ndarray, decode: Callable[[list[int]], str] | None) -> str:
    tokens = [int(t) for t, m in zip(ids, mask, strict=True) if m]
    return decode(tokens) if decode is not None else " ".join(map(str, tokens))


def evaluate_held_out(
    *,
    policy_graphdef: Any,
    policy_state: Any,
    reference: Any,
    ref_state: Any,
    reward: RewardSource,
    prompt_batches: Iterable[Mapping[str, np.ndarray]],
    rollout_config: RolloutConfig,
    eos_token_id: int,
    pad_token_id: int,
    namespace: str,
    seed: int = 0,
    max_batches: int | None = None,
    gold_task: Any = None,
    decode: Callable[[list[int]], str] | None = None,
    table_rows: int = 4,
    mesh: Any = None,
) -> dict[str, Any]:
    """The held-out metrics of the module docstring, ``{"<namespace>/eval/<name>": value}``.

    Args:
      policy_graphdef: the trained module's graph (a causal LM, or PPO's policy with a value
        head).
      policy_state: the policy's `rlhf_jax.train.state.TrainState`.
      reference: the trainer's `rlhf_jax.train.online.Reference`; ``ref_state`` its state.
      reward: the run's reward source (the proxy reward).
      prompt_batches: host prompt batches (``prompt_ids``, ``prompt_mask`` ``[B, P]`` and task
        fields), e.g. `rlhf_jax.train.data.DataBundle.eval_batches()`.
      rollout_config: the run's rollout config (its width and stop token; the sampling is
        `policy_sampling`'s).
      eos_token_id, pad_token_id: the tokenizer's ids.
      namespace: the metric prefix (``"ppo"``, ``"grpo"``, ...).
      seed: the run seed (the evaluation's key derives from it, the same at every call).
      max_batches: evaluate at most this many batches (None: all).
      gold_task: a synthetic task with ``gold_reward_tokens`` (None: no gold reward).
      decode: token ids -> text for the sample table (None: the ids).
      table_rows: rows of the sample table.
      mesh: the device mesh of the generation.
    """
    config = policy_sampling(rollout_config)
    kl_fn = _jitted_kl(policy_graphdef, reference)
    base = jax.random.key(seed + EVAL_SEED_OFFSET)
    columns: dict[str, list[np.ndarray]] = {}
    table: list[tuple] = []
    batches = prompt_batches if max_batches is None else itertools.islice(prompt_batches,
                                                                           max_batches)
    for index, prompts in enumerate(batches):
        rollout = sample_rollout(policy_graphdef, nnx.merge_state(policy_state.params,
                                                                   policy_state.frozen),
                                 prompts["prompt_ids"], prompts["prompt_mask"],
                                 rng=jax.random.fold_in(base, index), config=config,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                 num_samples=1, mesh=mesh)
        proxy = score_samples(reward, rollout, prompts, num_samples=1)
        kl = kl_fn(policy_state, ref_state, rollout)
        # The whole batch on every process (a collective on a multi-host slice): every process
        # computes the same metrics and table, process 0 logs them.
        host = sharding.gather_to_host({"rollout": rollout, "proxy": proxy, "kl": kl})
        r = host["rollout"]
        p = r.prompt_length
        sequences, seq_mask = np.asarray(r.sequences), np.asarray(r.sequence_mask)
        row = {
            "reward": np.asarray(host["proxy"], np.float64),
            "kl_ref_exact": np.asarray(host["kl"].exact, np.float64),
            "kl_ref_k1": np.asarray(host["kl"].k1, np.float64),
            "kl_ref_k3": np.asarray(host["kl"].k3, np.float64),
            "response_length": np.asarray(r.response_mask, np.float64).sum(axis=-1),
            "eos_rate": np.asarray(r.finished, np.float64),
        }
        if gold_task is not None:
            row["gold_reward"] = np.asarray(gold_task.gold_reward_tokens(
                sequences[:, :p], sequences[:, p:], seq_mask[:, p:]), np.float64)
        for name, values in row.items():
            columns.setdefault(name, []).append(values)
        for i in range(min(table_rows - len(table), sequences.shape[0])):
            table.append((
                _text(sequences[i, :p], seq_mask[i, :p], decode),
                _text(sequences[i, p:], seq_mask[i, p:], decode),
                float(row["reward"][i]),
                float(row["gold_reward"][i]) if gold_task is not None else None,
                float(row["kl_ref_exact"][i]),
            ))
    if not columns:
        raise ValueError("the held-out prompts produced no batch")
    prefix = f"{namespace}/eval/"
    metrics: dict[str, Any] = {prefix + name: float(np.mean(np.concatenate(values)))
                               for name, values in columns.items()}
    metrics[prefix + "num_prompts"] = float(sum(len(v) for v in columns["reward"]))
    metrics[prefix + "samples"] = SampleTable(
        columns=("prompt", "response", "reward", "gold_reward", "kl_ref_exact"),
        rows=tuple(table))
    return metrics


__all__ = [
    "EVAL_SEED_OFFSET",
    "SequenceKL",
    "evaluate_held_out",
    "policy_sampling",
    "sequence_kl",
]
