"""Rollouts for the online trainers (PPO, GRPO, RLOO, rejection sampling): sampling, scoring and
reward sources.

A rollout is one batch of prompts answered by the current policy with
`rlhf_jax.generation.generate_with_state`. Its layout (see `Rollout`): the prompt (left-padded,
``P`` columns) followed by the response (right-padded, ``N`` columns) in one ``[B, P + N]`` row,
so every model (policy, reference, value, reward) runs one forward pass over the same array.

Log-prob alignment: a forward pass over ``sequences`` gives logits ``[B, P + N, V]``; the logits
that predict response token ``t`` sit at column ``P - 1 + t``, so the per-response-token arrays
``[B, N]`` (log-probs, values, rewards, advantages) are all read from columns ``P - 1 .. P + N - 2``
(`response_logits`). The value ``V(s_t)`` of response token ``t`` is the value head read at the
same column, i.e. at the state *before* token ``t`` is emitted (TRL / lm-human-preferences).

Reward sources turn a rollout into one score per row (``[B]`` float32):

- `RewardModelSource`: a trained `RewardModel` head, jitted, on device.
- `TokenRewardFunction`: a Python function of the token arrays (e.g. a synthetic task's gold
  reward), on the host.
- `TextRewardFunction`: a Python function of the decoded prompt and response strings.
- `WeightedRewardSum`: a weighted sum of sources.
- `SafetyGatedReward`: Llama 2's combination of a helpfulness and a safety reward model
  (`safety_gated_reward`).

The KL to the reference reported by every online trainer (``"<algo>/kl_ref"``) is
`sequence_kl_to_reference`: the k1 estimate ``sum_t (log pi(y_t) - log pi_ref(y_t))`` over the
response tokens, averaged over rows, so curves of PPO, GRPO and RLOO compare directly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import losses
from rlhf_jax.generation import generate_with_state
from rlhf_jax.train.config import check_int, check_number

# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


class Rollout(NamedTuple):
    """Sampled responses in the layout every scoring model reads.

    ``B`` rows; with ``num_samples = n`` per prompt the rows of prompt ``b`` are
    ``b * n .. b * n + n - 1`` (contiguous groups, as `rlhf_jax.generation` returns them).

    Attributes:
      sequences: ``[B, P + N]`` int32 prompt (left-padded) then response (right-padded).
      sequence_mask: ``[B, P + N]`` int32, 1 on real prompt tokens and on response tokens up to
        and including the first stop token.
      response_ids: ``[B, N]`` int32 ``sequences[:, P:]`` (pad after the first stop token).
      response_mask: ``[B, N]`` int32 ``sequence_mask[:, P:]``.
      finished: ``[B]`` bool, whether the response produced the EOS token (for the missing-EOS
        penalty).
    """

    sequences: jax.Array
    sequence_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    finished: jax.Array

    @property
    def prompt_length(self) -> int:
        """``P``, the padded prompt width (static)."""
        return self.sequences.shape[1] - self.response_ids.shape[1]

    @property
    def prompt_ids(self) -> jax.Array:
        """``[B, P]`` left-padded prompt tokens."""
        return self.sequences[:, : self.prompt_length]

    @property
    def prompt_mask(self) -> jax.Array:
        """``[B, P]`` prompt mask."""
        return self.sequence_mask[:, : self.prompt_length]


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """``max(cumsum(mask) - 1, 0)``: positions of a left-padded row (first real token at 0);
    `rlhf_jax.models.default_positions`."""
    from rlhf_jax.models import default_positions

    return default_positions(mask)


def response_logits(logits: jax.Array, prompt_length: int) -> jax.Array:
    """The logits that predict the response tokens: ``logits[:, P - 1 : -1]``.

    Args:
      logits: ``[B, P + N, ...]`` outputs of a forward pass over ``Rollout.sequences`` (works for
        ``[B, P + N]`` values too).
      prompt_length: ``P >= 1``.

    Returns:
      ``[B, N, ...]``: row ``t`` is the output at the state before response token ``t``.
    """
    if prompt_length < 1:
        raise ValueError(f"prompt_length must be >= 1 (a prompt needs a token), got {prompt_length}")
    return logits[:, prompt_length - 1 : -1]


def policy_response_logps(
    model: Any,
    rollout: Rollout,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Per-response-token log-probs (and entropies) of ``rollout`` under a causal LM.

    ``logps[b, t] = log softmax(logits[b, P - 1 + t] / temperature)[response_ids[b, t]]``. The
    logits are divided by the sampling temperature as TRL's PPO/GRPO do, so that at the start of
    an update the ratio to the rollout log-probs is exactly 1. Padded positions hold whatever the
    model gives; every consumer masks them.

    Args:
      model: ``model(input_ids, attention_mask=..., positions=...) -> [B, T, V]`` logits.
      rollout: the sampled batch.
      temperature: sampling temperature ``> 0``.
      with_entropy: also return the per-token entropy of the tempered distribution.

    Returns:
      ``(logps [B, N] float32, entropy [B, N] float32 or None)``.
    """
    logits = model(
        rollout.sequences,
        attention_mask=rollout.sequence_mask,
        positions=positions_from_mask(rollout.sequence_mask),
    )
    return _tempered_logps(logits, rollout, temperature=temperature, with_entropy=with_entropy)


def _tempered_logps(
    logits: jax.Array, rollout: Rollout, *, temperature: float, with_entropy: bool
) -> tuple[jax.Array, jax.Array | None]:
    """Response log-probs (and entropies) from full-sequence logits ``[B, P + N, V]``."""
    logits = response_logits(logits, rollout.prompt_length).astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logps = losses.token_logps(logits, rollout.response_ids)
    entropy = losses.entropy_from_logits(logits) if with_entropy else None
    return logps, entropy


def response_values(value_model: Any, rollout: Rollout) -> jax.Array:
    """``[B, N]`` float32 values ``V(s_t)`` of the states before each response token."""
    values = value_model(
        rollout.sequences,
        attention_mask=rollout.sequence_mask,
        positions=positions_from_mask(rollout.sequence_mask),
    )
    return response_logits(values, rollout.prompt_length).astype(jnp.float32)


def sequence_kl_to_reference(
    logps: jax.Array, ref_logps: jax.Array, response_mask: jax.Array
) -> jax.Array:
    """``[B]`` sequence KL to the reference: ``sum_t m_t (log pi(y_t) - log pi_ref(y_t))`` (k1).

    The shared ``"<algo>/kl_ref"`` metric of every online trainer is the mean of this over rows.
    """
    return losses.masked_sum(losses.kl_k1(logps, ref_logps), response_mask, axis=-1)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """``1 - Var[returns - values] / Var[returns]`` over the masked entries (scalar float32).

    The value-function fit diagnostic of OpenAI Baselines / TRL (``val/var_explained``); 1 is a
    perfect fit, 0 no better than a constant, negative worse. ``NaN`` is avoided when the
    returns are constant (the denominator gets ``1e-8``).
    """
    var_returns = losses.masked_var(returns, mask, unbiased=False)
    var_error = losses.masked_var(returns - values, mask, unbiased=False)
    return 1.0 - var_error / (var_returns + 1e-8)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How responses are sampled and post-processed before scoring."""

    max_new_tokens: int = 16
    """Response width ``N`` (tokens sampled per prompt at most)."""
    temperature: float = 1.0
    """Sampling temperature (also applied to the log-probs used in the losses)."""
    top_k: int | None = None
    """Top-k filter at sampling time (None: off). The losses use the tempered, unfiltered
    policy log-probs (as TRL), so filters make the rollout slightly off-policy."""
    top_p: float | None = None
    """Nucleus filter at sampling time (None: off); see ``top_k``."""
    stop_token_id: int | None = None
    """Stop token that ends a response (defaults to the EOS token)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses without the EOS token (TRL's
    ``missing_eos_penalty``); None: no penalty."""
    cache_segments: int | None = None
    """The sampler's KV cache grows in this many segments (see
    ``rlhf_jax.generation.generate``); None: one per 32 new tokens, at most 4."""

    def __post_init__(self):
        o = "rollout."
        check_int(self, "max_new_tokens", low=1, owner=o)
        check_number(self, "temperature", low=0, low_open=True, owner=o)
        check_int(self, "top_k", low=1, optional=True, owner=o)
        check_number(self, "top_p", low=0, high=1, low_open=True, optional=True, owner=o)
        check_int(self, "stop_token_id", low=0, optional=True, owner=o)
        check_number(self, "missing_eos_penalty", optional=True, owner=o)
        check_int(self, "cache_segments", low=1, high=self.max_new_tokens, optional=True,
                  owner=o)


def rollout_from_generation(output: Any) -> Rollout:
    """`Rollout` view of a `rlhf_jax.generation.GenerationOutput`."""
    return Rollout(
        sequences=output.sequences,
        sequence_mask=output.sequence_mask,
        response_ids=output.tokens,
        response_mask=output.mask,
        finished=output.finished,
    )


def sample_rollout(
    graphdef: Any,
    state: Any,
    prompt_ids: Any,
    prompt_mask: Any,
    *,
    rng: jax.Array,
    config: RolloutConfig,
    eos_token_id: int,
    pad_token_id: int,
    num_samples: int = 1,
    mesh: Any = None,
) -> Rollout:
    """Samples ``num_samples`` responses per prompt from the policy ``nnx.merge(graphdef, state)``.

    Generation (one jitted prefill + decode loop) stops a row at ``config.stop_token_id``
    (default ``eos_token_id``); everything after it is ``pad_token_id`` and masked out.

    Returns:
      A `Rollout` with ``B * num_samples`` rows.
    """
    stop = eos_token_id if config.stop_token_id is None else config.stop_token_id
    output = generate_with_state(
        graphdef,
        state,
        prompt_ids,
        prompt_mask,
        max_new_tokens=config.max_new_tokens,
        rng=rng,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        eos_token_id=int(stop),
        pad_token_id=int(pad_token_id),
        num_samples=num_samples,
        mesh=mesh,
        cache_segments=config.cache_segments,
    )
    rollout = rollout_from_generation(output)
    if stop != eos_token_id:
        # Truncated at a stop token that is not EOS: "finished" still means "produced EOS".
        rollout = rollout._replace(
            finished=jnp.any((rollout.response_ids == eos_token_id) & (rollout.response_mask > 0),
                             axis=-1)
        )
    return rollout


def apply_missing_eos_penalty(
    scores: jax.Array, finished: jax.Array, *, penalty: float | None
) -> jax.Array:
    """``scores - penalty`` on rows that did not produce EOS (TRL ``missing_eos_penalty``)."""
    scores = jnp.asarray(scores, jnp.float32)
    if penalty is None:
        return scores
    return jnp.where(finished, scores, scores - jnp.float32(penalty))


# ---------------------------------------------------------------------------------------------
# Reward sources
# ---------------------------------------------------------------------------------------------


class RewardSource(Protocol):
    """Scores a rollout: ``source(rollout, prompts) -> [B]`` float32.

    ``prompts`` is the host prompt batch (``prompt_ids``, ``prompt_mask`` and any task fields),
    with every field already repeated to the rollout's ``B`` rows (`repeat_rows`).
    """

    name: str

    def __call__(self, rollout: Rollout, prompts: Mapping[str, np.ndarray]) -> jax.Array: ...


def repeat_rows(batch: Mapping[str, Any], num_samples: int) -> dict[str, np.ndarray]:
    """Repeats every field of a prompt batch ``num_samples`` times along axis 0 (contiguously)."""
    if num_samples == 1:
        return {k: np.asarray(v) for k, v in batch.items()}
    return {k: np.repeat(np.asarray(v), num_samples, axis=0) for k, v in batch.items()}


@functools.partial(jax.jit, static_argnames=("graphdef", "head"))
def _reward_model_scores(graphdef, state, sequences, sequence_mask, *, head):
    model = nnx.merge(graphdef, state)
    rewards = model(
        sequences, attention_mask=sequence_mask, positions=positions_from_mask(sequence_mask)
    )
    return jnp.asarray(rewards, jnp.float32)[:, head]


class RewardModelSource:
    """Scores with one head of a `rlhf_jax.models.RewardModel`, read at the last real token.

    The model is split once; scoring is one jitted forward pass over ``Rollout.sequences``.
    The reward model must share the policy's tokenizer.

    Args:
      model: the reward model (its normalisation gain/bias apply).
      head: head index or name (``model.head_names``).
      name: metric name of this source.
    """

    def __init__(self, model: nnx.Module, *, head: int | str = 0, name: str = "reward_model"):
        self.graphdef, self.state = nnx.split(model)
        if isinstance(head, str):
            names = tuple(getattr(model, "head_names", ()))
            if head not in names:
                raise ValueError(f"head={head!r} is not one of the reward model's heads {names}")
            head = names.index(head)
        self.head = int(head)
        self.name = name

    def __call__(self, rollout: Rollout, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        return _reward_model_scores(
            self.graphdef, self.state, rollout.sequences, rollout.sequence_mask, head=self.head
        )


def _check_scores(name: str, scores: Any, rows: int) -> jax.Array:
    scores = np.asarray(scores, np.float32)
    if scores.shape != (rows,):
        raise ValueError(f"reward source {name!r} returned shape {scores.shape}, expected ({rows},)")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"reward source {name!r} returned non-finite scores at rows {bad[:10]}")
    return jnp.asarray(scores)


class TokenRewardFunction:
    """A Python reward on token arrays, run on the host.

    ``fn(prompt_ids [B, P], response_ids [B, N], response_mask [B, N]) -> [B]`` on NumPy arrays
    (prompts left-padded, responses right-padded and cut after the stop token): the signature of
    the synthetic tasks' ``gold_reward_tokens``, so ``TokenRewardFunction(task.gold_reward_tokens)``
    scores with the gold reward.
    """

    def __init__(self, fn: Callable[..., Any], *, name: str = "reward_fn"):
        self.fn = fn
        self.name = name

    def __call__(self, rollout: Rollout, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        host = jax.device_get(rollout)
        p = host.sequences.shape[1] - host.response_ids.shape[1]
        scores = self.fn(
            np.asarray(host.sequences[:, :p]),
            np.asarray(host.response_ids),
            np.asarray(host.response_mask),
        )
        return _check_scores(self.name, scores, host.sequences.shape[0])


class TextRewardFunction:
    """A Python reward on decoded text: ``fn(prompts: list[str], responses: list[str]) -> [B]``.

    Prompts are decoded from their real tokens, responses from the tokens under the response
    mask (including a final EOS unless ``decode`` skips special tokens).

    Args:
      fn: the reward on strings.
      decode: token ids (list of int) -> string, e.g. ``functools.partial(tokenizer.decode,
        skip_special_tokens=True)``.
      name: metric name of this source.
    """

    def __init__(
        self,
        fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]],
        *,
        decode: Callable[[Sequence[int]], str],
        name: str = "text_reward",
    ):
        self.fn = fn
        self.decode = decode
        self.name = name

    def __call__(self, rollout: Rollout, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        host = jax.device_get(rollout)
        p = host.sequences.shape[1] - host.response_ids.shape[1]
        seqs = np.asarray(host.sequences)
        mask = np.asarray(host.sequence_mask).astype(bool)
        prompt_text = [self.decode(r[:p][m[:p]].tolist()) for r, m in zip(seqs, mask)]
        response_text = [self.decode(r[p:][m[p:]].tolist()) for r, m in zip(seqs, mask)]
        return _check_scores(self.name, self.fn(prompt_text, response_text), seqs.shape[0])


class WeightedRewardSum:
    """``sum_i w_i * source_i(rollout)``: several reward sources combined linearly."""

    def __init__(
        self, sources: Sequence[RewardSource], weights: Sequence[float], *, name: str = "weighted"
    ):
        if len(sources) != len(weights) or not sources:
            raise ValueError(
                f"WeightedRewardSum needs one weight per source; got {len(sources)} sources and "
                f"{len(weights)} weights"
            )
        self.sources = tuple(sources)
        self.weights = tuple(float(w) for w in weights)
        self.name = name

    def __call__(self, rollout: Rollout, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        total = 0.0
        for source, weight in zip(self.sources, self.weights):
            total = total + weight * jnp.asarray(source(rollout, prompts), jnp.float32)
        return total


def safety_gated_reward(
    helpfulness: jax.Array,
    safety: jax.Array,
    safety_flag: jax.Array,
    *,
    threshold: float = 0.15,
) -> jax.Array:
    r"""Llama 2's combined reward (Touvron et al., 2023, section 3.2.2).

    .. math::
        R_c = \begin{cases} R_s & \text{if the prompt is safety-flagged or } R_s < \tau \\
                            R_h & \text{otherwise} \end{cases}

    with :math:`\tau` = ``threshold`` (0.15 in the paper, on sigmoid-scale safety scores).

    Args:
      helpfulness: ``[B]`` helpfulness scores :math:`R_h`.
      safety: ``[B]`` safety scores :math:`R_s`.
      safety_flag: ``[B]`` bool/0-1, whether the prompt is tagged as possibly unsafe.
      threshold: safety score below which the safety reward is used (keyword-only).

    Returns:
      ``[B]`` float32 combined scores.
    """
    helpfulness = jnp.asarray(helpfulness, jnp.float32)
    safety = jnp.asarray(safety, jnp.float32)
    if helpfulness.shape != safety.shape or helpfulness.ndim != 1:
        raise ValueError(
            f"helpfulness and safety must both be [B]; got {helpfulness.shape} and {safety.shape}"
        )
    use_safety = jnp.asarray(safety_flag).astype(bool) | (safety < threshold)
    return jnp.where(use_safety, safety, helpfulness)


class SafetyGatedReward:
    """`safety_gated_reward` of a helpfulness and a safety source.

    Args:
      helpfulness: source of :math:`R_h`.
      safety: source of :math:`R_s`.
      threshold: the gate's :math:`\\tau`.
      flag_key: the prompt-batch field (``[B]`` bool/0-1) marking safety prompts; when the batch
        has no such field no prompt is flagged and only the threshold gates.
    """

    def __init__(
        self,
        helpfulness: RewardSource,
        safety: RewardSource,
        *,
        threshold: float = 0.15,
        flag_key: str = "is_safety",
        name: str = "safety_gated",
    ):
        self.helpfulness = helpfulness
        self.safety = safety
        self.threshold = float(threshold)
        self.flag_key = flag_key
        self.name = name

    def __call__(self, rollout: Rollout, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        rows = rollout.sequences.shape[0]
        flag = prompts.get(self.flag_key)
        flag = np.zeros((rows,), bool) if flag is None else np.asarray(flag).astype(bool)
        return safety_gated_reward(
            self.helpfulness(rollout, prompts),
            self.safety(rollout, prompts),
            flag,
            threshold=self.threshold,
        )


def score_rollout(
    source: RewardSource,
    rollout: Rollout,
    prompts: Mapping[str, Any],
    *,
    num_samples: int = 1,
    missing_eos_penalty: float | None = None,
) -> jax.Array:
    """``[B]`` float32 scores of a rollout: the reward source, then the missing-EOS penalty.

    Args:
      source: a `RewardSource`.
      rollout: ``B = B_prompts * num_samples`` rows.
      prompts: the host prompt batch with ``B_prompts`` rows (repeated here).
      num_samples: samples per prompt.
      missing_eos_penalty: see `RolloutConfig.missing_eos_penalty`.
    """
    scores = jnp.asarray(source(rollout, repeat_rows(prompts, num_samples)), jnp.float32)
    return apply_missing_eos_penalty(scores, rollout.finished, penalty=missing_eos_penalty)


# ---------------------------------------------------------------------------------------------
# Minibatches
# ---------------------------------------------------------------------------------------------


def minibatch_indices(
    rng: jax.Array, *, batch_size: int, num_minibatches: int, num_epochs: int
) -> jax.Array:
    """``[num_epochs * num_minibatches, batch_size // num_minibatches]`` int32 row indices.

    Each epoch is a fresh permutation of the ``batch_size`` rows (``fold_in(rng, epoch)``) cut
    into ``num_minibatches`` equal minibatches, as TRL's PPO epochs over ``np.random.permutation``.
    """
    if batch_size % num_minibatches:
        raise ValueError(
            f"num_minibatches={num_minibatches} must divide the rollout batch size {batch_size}"
        )
    size = batch_size // num_minibatches
    perms = [
        jax.random.permutation(jax.random.fold_in(rng, e), batch_size) for e in range(num_epochs)
    ]
    return jnp.stack(perms).reshape(num_epochs * num_minibatches, size).astype(jnp.int32)


def take_minibatch(tree: Any, indices: jax.Array) -> Any:
    """Rows ``indices`` of every ``[B, ...]`` leaf of ``tree``."""
    return jax.tree.map(lambda x: jnp.take(x, indices, axis=0), tree)


# ---------------------------------------------------------------------------------------------
# Plumbing shared by the online trainers: mesh, train states, reference, value head
# ---------------------------------------------------------------------------------------------


def resolve_mesh(mesh_config: Any, mesh: Any = None) -> Any:
    """``mesh`` if given, else the ``("data", "fsdp", "tensor")`` mesh of ``mesh_config``."""
    if mesh is not None:
        return mesh
    from rlhf_jax import sharding

    return sharding.make_mesh(
        sharding.MeshConfig(data=mesh_config.data, fsdp=mesh_config.fsdp, tensor=mesh_config.tensor)
    )


def check_rows_divide_mesh(rows: int, mesh: Any, *, what: str) -> None:
    """Raises unless ``rows`` splits evenly over the mesh's ``("data", "fsdp")`` batch shards."""
    shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names]))
    if rows % shards:
        raise ValueError(
            f"{what} has {rows} rows, not divisible by the {shards} batch shards of the mesh "
            "(data x fsdp); change the batch size or the mesh"
        )


def rollout_batch_sharding(mesh: Any) -> Any:
    """Sharding of ``[B, ...]`` rollout arrays: leading axis over ``("data", "fsdp")``."""
    from rlhf_jax import sharding

    return sharding.batch_sharding(mesh)


def uses_lora(model: nnx.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    from rlhf_jax.models.lora import has_lora

    return has_lora(model)


def create_sharded_state(
    model: nnx.Module, tx: Any, *, seed: int, mesh: Any
) -> tuple[nnx.GraphDef, Any]:
    """Splits ``model`` into a `rlhf_jax.train.state.TrainState` placed on ``mesh`` (parameters
    and optimizer moments by their logical axis names). The trainable variables are
    `rlhf_jax.train.common.trainable_filter`'s: every parameter, or with LoRA the adapters (and a
    fresh value head)."""
    from rlhf_jax.train.common import shard_train_state, trainable_filter
    from rlhf_jax.train.state import create_train_state

    graphdef, state = create_train_state(
        model, tx, seed=seed, trainable=trainable_filter(model)
    )
    # Own buffers: models built with nnx.clone share arrays with their source, and the state
    # is donated to the update.
    state, _ = shard_train_state(own_buffers(state), mesh)
    return graphdef, state


def own_buffers(tree: Any) -> Any:
    """``tree`` with every ``jax.Array`` copied into a fresh buffer (same sharding)."""
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


@functools.lru_cache(maxsize=64)
def cached_optimizer(config: Any, num_steps: int) -> tuple[Any, Any]:
    """`rlhf_jax.train.common.make_optimizer`, memoised on the (frozen, hashable) config so that
    trainers built twice from one config share their jitted functions' compilation cache."""
    from rlhf_jax.train.common import make_optimizer

    return make_optimizer(config, num_steps)


def commit_to_mesh(tree: Any, mesh: Any) -> Any:
    """Replicates over ``mesh`` every array of ``tree`` not yet placed with a mesh sharding (e.g.
    freshly created scalars), so that a jitted function sees the same input shardings on its
    first call as on later calls (no recompilation)."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if isinstance(x, jax.Array) and not isinstance(x.sharding, NamedSharding):
            return jax.device_put(x, replicated)
        return x

    return jax.tree.map(place, tree)


def merged_state(train_state: Any) -> nnx.State:
    """One ``nnx.State`` of a train state's trainable and frozen variables (for generation)."""
    return nnx.merge_state(train_state.params, train_state.frozen)


class Reference:
    """The frozen reference policy of an online trainer.

    Either a separate frozen network (``graphdef``, ``state``; the state is passed to the jitted
    scoring function as an argument) or, for a LoRA policy, the policy itself with every adapter
    zeroed (``lora=True``): ``y = W x + s (x A) B`` with ``A = B = 0`` is the base model, so no
    second copy of the weights exists.
    """

    def __init__(self, *, graphdef: Any = None, state: Any = None, lora: bool = False,
                 policy_graphdef: Any = None):
        self.graphdef = graphdef
        self.state = state
        self.lora = lora
        self.policy_graphdef = policy_graphdef

    @classmethod
    def build(
        cls, policy: nnx.Module, reference: nnx.Module | None, *, lora: bool, mesh: Any
    ) -> Reference:
        """The reference for ``policy``: adapters off for LoRA, else ``reference`` (default: a
        copy of the policy taken now), placed on ``mesh``."""
        if lora:
            return cls(lora=True)
        from rlhf_jax import sharding

        ref = nnx.clone(policy) if reference is None else reference
        sharding.shard_model(ref, mesh)
        graphdef, state = nnx.split(ref)
        return cls(graphdef=graphdef, state=own_buffers(state))

    def _key(self) -> tuple:
        return (self.lora, self.graphdef)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and self._key() == other._key()

    def __hash__(self) -> int:
        # Jitted scoring functions are cached per (graphs, hyper-parameters, reference graph).
        return hash(self._key())

    def model(self, policy_graphdef: Any, policy_state: Any, ref_state: Any) -> Any:
        """The reference as a module, inside a traced function."""
        if self.lora:
            from rlhf_jax.models.lora import lora_disabled

            return nnx.merge(
                policy_graphdef, lora_disabled(policy_state.params), policy_state.frozen
            )
        return nnx.merge(self.graphdef, ref_state)


class PolicyWithValueHead(nnx.Module):
    """A causal LM with a scalar value head on its own final hidden state (shared backbone).

    ``model(...)`` is the LM's logits (so sampling works unchanged); `logits_and_values` runs
    the backbone once for both. The head's parameters are ordinary ``nnx.Param``s trained with
    the policy.
    """

    def __init__(self, lm: nnx.Module, *, rngs: nnx.Rngs):
        from rlhf_jax.models.layers import Proj

        self.lm = lm
        self.config = lm.config
        self.value_head = Proj((lm.config.hidden_size,), (1,), in_names=("embed",),
                               out_names=(None,), use_bias=True, config=lm.config, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        return self.lm(input_ids, attention_mask, positions, segment_ids)

    def logits_and_values(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        hidden = self.lm.backbone(input_ids, attention_mask, positions, segment_ids)
        values = self.value_head(hidden).astype(jnp.float32)[..., 0]
        return self.lm.logits_from_hidden(hidden), values

    def init_cache(self, batch_size: int, max_length: int, dtype=None):
        return self.lm.init_cache(batch_size, max_length, dtype)

    def layer_blocks(self, *, fuse_qkv: bool = True):
        return self.lm.layer_blocks(fuse_qkv=fuse_qkv)

    def decode(self, input_ids, *, positions, cache, cache_mask, blocks=None):
        return self.lm.decode(input_ids, positions=positions, cache=cache, cache_mask=cache_mask,
                              blocks=blocks)


def shared_forward(
    model: PolicyWithValueHead, rollout: Rollout, *, temperature: float, with_entropy: bool = True
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """``(logps, entropy, values)`` ``[B, N]`` of a `PolicyWithValueHead` in one forward pass."""
    logits, values = model.logits_and_values(
        rollout.sequences,
        attention_mask=rollout.sequence_mask,
        positions=positions_from_mask(rollout.sequence_mask),
    )
    logps, entropy = _tempered_logps(
        logits, rollout, temperature=temperature, with_entropy=with_entropy
    )
    return logps, entropy, response_logits(values, rollout.prompt_length)


def default_value_model(policy: nnx.Module, reward: Any, *, init: str, seed: int) -> nnx.Module:
    """The PPO value model: from the reward model (Stiennon et al.) when ``init ==
    "reward_model"`` and ``reward`` is a `RewardModelSource`, else from the policy's backbone
    with a fresh head."""
    from rlhf_jax.models import ValueModel

    if init not in ("reward_model", "policy"):
        raise ValueError(f"value_init={init!r}; allowed: 'reward_model', 'policy'")
    if init == "reward_model" and isinstance(reward, RewardModelSource):
        rm = nnx.merge(reward.graphdef, reward.state)
        return ValueModel.from_reward_model(rm, head=rm.head_names[reward.head])
    return ValueModel.from_causal_lm(policy, rngs=nnx.Rngs(seed))


def empty_train_state() -> Any:
    """A `TrainState` with nothing to train (the value slot of a shared-head PPO run)."""
    from rlhf_jax.train.state import TrainState

    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={},
        frozen={},
        opt_state=(),
        rng=jnp.zeros((2,), jnp.uint32),
    )


def seed_key_data(seed: int) -> jax.Array:
    """uint32 raw key data of ``jax.random.key(seed)`` (what train states store)."""
    return jax.random.key_data(jax.random.key(seed))


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


class PromptLoader:
    """Deterministic, resumable iterator of prompt batches from an in-memory prompt set.

    Each epoch is a permutation of the rows drawn from ``seed`` and the epoch number; a partial
    last batch is dropped. ``get_state()`` / ``set_state()`` (the epoch and position) make a
    resumed run draw exactly the batches of an uninterrupted one.

    Args:
      data: ``{"prompt_ids": [M, P], "prompt_mask": [M, P], ...task fields [M, ...]}`` with
        left-padded prompts.
      batch_size: prompts per batch.
      seed: shuffling seed.
      shuffle: shuffle every epoch (else the stored order).
    """

    def __init__(self, data: Mapping[str, Any], *, batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        self.data = {k: np.asarray(v) for k, v in data.items()}
        for key in ("prompt_ids", "prompt_mask"):
            if key not in self.data:
                raise ValueError(f"prompt data is missing {key!r}; has {sorted(self.data)}")
        self.size = self.data["prompt_ids"].shape[0]
        if not 1 <= batch_size <= self.size:
            raise ValueError(f"batch_size={batch_size} must be in [1, {self.size}] (prompt count)")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position + self.batch_size > self.size:
            self.epoch += 1
            self.position = 0
        rows = self._order()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return {k: v[rows] for k, v in self.data.items()}

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def unwrap_policy(model: nnx.Module) -> nnx.Module:
    """The causal LM inside a `PolicyWithValueHead` (or ``model`` itself)."""
    return model.lm if isinstance(model, PolicyWithValueHead) else model


# ---------------------------------------------------------------------------------------------
# Building a run from its config (the CLI path)
# ---------------------------------------------------------------------------------------------


def _online_data():
    from rlhf_jax.train.config import DataSpec

    return DataSpec(synthetic="topic", batch_size=8, max_length=16, max_prompt_length=16)


ONLINE_DATA = _online_data()
"""Default prompts of the online trainers: the synthetic topic task, 8 prompts per iteration,
left-padded to 16 tokens."""


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """Where the scores of an online run come from (command-line runs)."""

    source: Literal["gold", "model"] = "gold"
    """``gold``: the synthetic task's programmatic gold reward (``data.synthetic``);
    ``model``: a trained reward model loaded from ``path``."""
    path: str | None = None
    """Directory of the reward model (``source="model"``), as written by ``rlhf-jax rm``."""
    head: str | None = None
    """Reward head to use (default: the first)."""


def check_online_config(config: Any) -> None:
    """Validates the fields every online trainer's config shares; errors name the field."""
    rollout = config.rollout
    if not isinstance(rollout.max_new_tokens, int) or rollout.max_new_tokens < 1:
        raise ValueError(f"rollout.max_new_tokens must be an int >= 1, got {rollout.max_new_tokens}")
    if not rollout.temperature > 0:
        raise ValueError(f"rollout.temperature must be > 0, got {rollout.temperature}")
    if config.data.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {config.data.batch_size}")
    if config.num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {config.num_steps}")


class OnlineSetup(NamedTuple):
    """What `setup_from_config` builds for a command-line online run."""

    policy: nnx.Module
    reward: Any
    prompts: Any
    eos_token_id: int
    pad_token_id: int
    metric_fns: tuple[Callable[..., Mapping[str, float]], ...]
    tokenizer: Any
    config: Any
    """The run's config with the model resolved (e.g. the vocabulary size taken from the
    tokenizer), as the trainer must write it so the checkpoint can be read back."""
    data: Any = None
    """The prompts' `rlhf_jax.train.common.DataBundle` (its load report goes into the run
    summary)."""


def gold_reward_metric(task: Any, name: str) -> Callable[..., dict[str, float]]:
    """A per-iteration metric: the mean gold reward of the rollout's responses (``name``)."""

    def metric(experience: Any, prompts: Mapping[str, np.ndarray]) -> dict[str, float]:
        rollout = jax.device_get(experience.rollout)
        p = rollout.sequences.shape[1] - rollout.response_ids.shape[1]
        gold = task.gold_reward_tokens(
            np.asarray(rollout.sequences[:, :p]),
            np.asarray(rollout.response_ids),
            np.asarray(rollout.response_mask),
        )
        return {name: float(np.mean(gold))}

    return metric


def load_reward_source(spec: RewardSpec, *, task: Any = None) -> Any:
    """The reward source a `RewardSpec` names (the synthetic task's gold reward, or the reward
    model of an `rlhf-jax rm` run directory, read by `rlhf_jax.train.rm.load_reward_model`)."""
    if spec.source == "gold":
        if task is None:
            raise ValueError("reward.source='gold' needs a synthetic task (set data.synthetic)")
        return TokenRewardFunction(task.gold_reward_tokens, name="gold")
    if spec.source == "model":
        if spec.path is None:
            raise ValueError("reward.source='model' needs reward.path (a reward model directory)")
        from rlhf_jax.train.rm import load_reward_model

        return RewardModelSource(load_reward_model(spec.path), head=spec.head or 0)
    raise ValueError(f"reward.source={spec.source!r}; allowed: 'gold', 'model'")


class OnlineTrainer:
    """What the online trainers (PPO, GRPO/RLOO, rejection sampling) share: one iteration on a
    prompt batch, the run through `rlhf_jax.train.loop.fit`, and the current policy.

    A subclass sets ``config``, ``state`` (with ``state.policy`` a `TrainState`), ``prompts``
    and ``policy_graphdef``, and defines ``step(state, prompts) -> (state, metrics)``.
    """

    config: Any
    state: Any
    prompts: Any
    policy_graphdef: Any

    def step(self, state: Any, prompts: Mapping[str, np.ndarray]) -> tuple[Any, dict]:
        raise NotImplementedError

    def iteration(self, prompts: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """One iteration on the next prompt batch (or ``prompts``); returns host metrics."""
        if prompts is None:
            prompts = next(self.prompts)
        self.state, metrics = self.step(self.state, prompts)
        return to_host(metrics)

    def train(self, *, guard: Any = None) -> Any:
        """Runs ``config.num_steps`` iterations through `rlhf_jax.train.loop.fit` (config.yaml,
        metrics.jsonl / TensorBoard, checkpoints, exact resume, SIGTERM). Returns its
        `LoopResult`. ``guard``: a `rlhf_jax.train.loop.PreemptionGuard` (default: SIGTERM)."""
        from rlhf_jax.train.loop import fit

        result = fit(self.config, step_fn=self.step, state=self.state, train_batches=self.prompts,
                     guard=guard)
        self.state = result.state
        return result

    def policy_model(self) -> nnx.Module:
        """The current policy as an NNX ``CausalLM`` (for evaluation or export)."""
        model = nnx.merge(self.policy_graphdef, self.state.policy.params, self.state.policy.frozen)
        return unwrap_policy(model)


def train_online(trainer_cls: type, config: Any, *, algorithm: str) -> dict[str, Any]:
    """A command-line online run: `setup_from_config`, then ``trainer_cls(...).train()``;
    returns the run summary (output directory, iterations run, final metrics)."""
    from rlhf_jax.train.common import run_summary

    setup = setup_from_config(config, algorithm=algorithm)
    trainer = trainer_cls(
        setup.config,
        policy=setup.policy,
        reward=setup.reward,
        prompts=setup.prompts,
        eos_token_id=setup.eos_token_id,
        pad_token_id=setup.pad_token_id,
        metric_fns=setup.metric_fns,
    )
    return run_summary(trainer.train(), setup.config, setup.data)


def setup_from_config(config: Any, *, algorithm: str) -> OnlineSetup:
    """Policy, reward source, prompt loader and gold-reward metric of a command-line run.

    Prompts come from ``config.data`` (`rlhf_jax.train.common.build_data` with the ``"prompt"``
    format: a synthetic task or prompt files), left-padded to ``data.max_length``. A randomly
    initialised policy without ``model.vocab_size`` gets the tokenizer's vocabulary size. With a
    synthetic task its gold reward of the sampled responses is logged every iteration as
    ``"<algorithm>/gold_reward"`` (beside the proxy score when the reward is a reward model).
    """
    from rlhf_jax.train.common import build_data, build_model, check_vocab, load_tokenizer_for
    from rlhf_jax.train.preflight import check_run_config

    check_run_config(config)
    tokenizer = load_tokenizer_for(config.data, config.model)
    data = build_data(config.data, format="prompt", tokenizer=tokenizer, seed=config.seed)
    spec = config.model
    if spec.path is None and spec.vocab_size is None:
        # A randomly initialised policy gets exactly the tokenizer's vocabulary, so it never
        # samples ids a reward function cannot read.
        spec = dataclasses.replace(spec, vocab_size=len(tokenizer))
    policy = build_model(spec, seed=config.seed)
    check_vocab(policy, tokenizer)
    task = None
    metric_fns: tuple = ()
    if config.data.path is None and config.data.synthetic is not None:
        from rlhf_jax.data.synthetic import get_task

        task = get_task(config.data.synthetic)
        metric_fns = (gold_reward_metric(task, f"{algorithm}/gold_reward"),)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; online trainers need one to stop")
    return OnlineSetup(
        policy=policy,
        reward=load_reward_source(config.reward, task=task),
        prompts=data.train,
        eos_token_id=int(eos),
        pad_token_id=int(data.pad_id),
        metric_fns=metric_fns,
        tokenizer=tokenizer,
        config=dataclasses.replace(config, model=spec),
        data=data,
    )


__all__ = [
    "ONLINE_DATA",
    "OnlineSetup",
    "OnlineTrainer",
    "PolicyWithValueHead",
    "PromptLoader",
    "Reference",
    "RewardModelSource",
    "RewardSource",
    "RewardSpec",
    "Rollout",
    "RolloutConfig",
    "SafetyGatedReward",
    "TextRewardFunction",
    "TokenRewardFunction",
    "WeightedRewardSum",
    "apply_missing_eos_penalty",
    "check_online_config",
    "check_rows_divide_mesh",
    "cached_optimizer",
    "commit_to_mesh",
    "create_sharded_state",
    "default_value_model",
    "empty_train_state",
    "explained_variance",
    "gold_reward_metric",
    "merged_state",
    "own_buffers",
    "minibatch_indices",
    "policy_response_logps",
    "positions_from_mask",
    "repeat_rows",
    "resolve_mesh",
    "response_logits",
    "response_values",
    "rollout_batch_sharding",
    "rollout_from_generation",
    "safety_gated_reward",
    "sample_rollout",
    "score_rollout",
    "seed_key_data",
    "sequence_kl_to_reference",
    "setup_from_config",
    "shared_forward",
    "take_minibatch",
    "to_host",
    "train_online",
    "load_reward_source",
    "unwrap_policy",
    "uses_lora",
]
