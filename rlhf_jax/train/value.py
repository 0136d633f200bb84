"""The value function of PPO: a separate `rlhf_jax.models.ValueModel` or a value head on the
policy's own backbone (`PolicyWithValueHead`), read at the states before each response token,
and its diagnostics.

The value ``V(s_t)`` of response token ``t`` is the value head read at column ``P - 1 + t`` of
the rollout's sequence, i.e. at the state *before* token ``t`` is emitted (TRL /
lm-human-preferences), the same column whose logits predict token ``t``
(`rlhf_jax.train.logprobs.response_logits`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import losses
from rlhf_jax.generation import RewardModelSource
from rlhf_jax.models import ValueModel, positions_from_mask
from rlhf_jax.models.layers import Proj
from rlhf_jax.train.logprobs import response_logits
from rlhf_jax.train.rollout import Rollout
from rlhf_jax.train.state import TrainState


class PolicyWithValueHead(nnx.Module):
    """A causal LM with a scalar value head on its own final hidden state (shared backbone).

    ``model(...)`` is the LM's logits (so sampling works unchanged); `logits_and_values` runs
    the backbone once for both. The head's parameters are ordinary ``nnx.Param``s trained with
    the policy.
    """

    def __init__(self, lm: nnx.Module, *, rngs: nnx.Rngs):
        self.lm = lm
        self.config = lm.config
        self.value_head = Proj((lm.config.hidden_size,), (1,), in_names=("embed",),
                               out_names=(None,), use_bias=True, config=lm.config, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        return self.lm(input_ids, attention_mask, positions, segment_ids)

    def hidden_and_values(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        """``(hidden [B, T, E], values [B, T] float32)``: the LM's final hidden states and the
        value head on them, from one backbone pass."""
        hidden = self.lm.backbone(input_ids, attention_mask, positions, segment_ids)
        return hidden, self.value_head(hidden).astype(jnp.float32)[..., 0]

    def logits_and_values(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        hidden, values = self.hidden_and_values(input_ids, attention_mask, positions, segment_ids)
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
    """``(logps, entropy, values)`` ``[B, N]`` of a `PolicyWithValueHead` in one forward pass
    (the log-probs through the LM's fused head on the response tokens, no ``[B, T, V]``;
    0 at padding, like `rlhf_jax.train.logprobs.policy_response_logps`)."""
    hidden, values = model.hidden_and_values(rollout.sequences, rollout.sequence_mask,
                                             positions_from_mask(rollout.sequence_mask))
    out = model.lm.token_logps_from_hidden(
        hidden, rollout.sequences, start=rollout.prompt_length, temperature=temperature,
        with_entropy=with_entropy, where=rollout.response_mask)
    return out.logps, out.entropy, response_logits(values, rollout.prompt_length)


def default_value_model(policy: nnx.Module, reward: Any, *, init: str, seed: int) -> nnx.Module:
    """The PPO value model: from the reward model (Stiennon et al.) when ``init ==
    "reward_model"`` and ``reward`` is a `RewardModelSource`, else from the policy's backbone
    with a fresh head."""
    if init not in ("reward_model", "policy"):
        raise ValueError(f"value_init={init!r}; allowed: 'reward_model', 'policy'")
    if init == "reward_model" and isinstance(reward, RewardModelSource):
        rm = nnx.merge(reward.graphdef, reward.state)
        return ValueModel.from_reward_model(rm, head=rm.head_names[reward.head])
    return ValueModel.from_causal_lm(policy, rngs=nnx.Rngs(seed))


def empty_train_state() -> Any:
    """A `TrainState` with nothing to train (the value slot of a shared-head PPO run)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={},
        frozen={},
        opt_state=(),
        rng=jnp.zeros((2,), jnp.uint32),
    )


def unwrap_policy(model: nnx.Module) -> nnx.Module:
    """The causal LM inside a `PolicyWithValueHead` (or ``model`` itself)."""
    return model.lm if isinstance(model, PolicyWithValueHead) else model


def response_values(value_model: Any, rollout: Rollout) -> jax.Array:
    """``[B, N]`` float32 values ``V(s_t)`` of the states before each response token."""
    values = value_model(
        rollout.sequences,
        attention_mask=rollout.sequence_mask,
        positions=positions_from_mask(rollout.sequence_mask),
    )
    return response_logits(values, rollout.prompt_length).astype(jnp.float32)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """``1 - Var[returns - values] / Var[returns]`` over the masked entries (scalar float32).

    The value-function fit diagnostic of OpenAI Baselines / TRL (``val/var_explained``); 1 is a
    perfect fit, 0 no better than a constant, negative worse. ``NaN`` is avoided when the
    returns are constant (the denominator gets ``1e-8``).
    """
    var_returns = losses.masked_var(returns, mask, unbiased=False)
    var_error = losses.masked_var(returns - values, mask, unbiased=False)
    return 1.0 - var_error / (var_returns + 1e-8)


__all__ = [
    "PolicyWithValueHead",
    "default_value_model",
    "empty_train_state",
    "explained_variance",
    "response_values",
    "shared_forward",
    "unwrap_policy",
]
