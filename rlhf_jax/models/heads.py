"""Scalar heads on the decoder: `ValueModel` (per token) and `RewardModel` (per sequence).

- `ValueModel(config, *, rngs)(input_ids, attention_mask, positions, segment_ids)` ->
  values `[B, T]` float32: `v_t = h_t . w + b` on the final hidden state of every token.
- `RewardModel(config, *, head_names=("reward",), rngs)(...)` -> rewards `[B, H]` float32, read
  at the last real token of each row (the last index where `attention_mask` is 1).
  `token_scores(...)` gives `[B, T, H]` at every token (for packed rows, read the last token of
  each segment). Several named heads (e.g. `("helpfulness", "harmlessness")`, as in Llama 2).
  Each head is normalised, `r = gain * raw + bias`, with `gain`/`bias` stored in the model as
  non-trainable `RewardNormalization` variables, set by `set_normalization(gain, bias)`
  (e.g. so the SFT data has mean 0 and std 1, as in Stiennon et al. 2020).

Initialisation from other models (weights copied, the source model is left unchanged):

- `ValueModel.from_causal_lm(lm, rngs=...)`, `RewardModel.from_causal_lm(lm, rngs=...)`:
  backbone copied from a causal LM (SFT model), fresh head.
- `ValueModel.from_reward_model(rm, head=...)`: backbone and the chosen head (with its
  normalisation folded in) copied from a reward model, as Stiennon et al. (2020) initialise the
  value function from the reward model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import Proj
from rlhf_jax.models.transformer import CausalLM, Decoder


class RewardNormalization(nnx.Variable):
    """Non-trainable per-head normalisation (gain or bias) of a reward model."""


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index `[B]` of the last position where `attention_mask [B, T]` is 1 (0 if none)."""
    mask = attention_mask.astype(bool)
    t = mask.shape[-1]
    idx = jnp.arange(t, dtype=jnp.int32)
    return jnp.max(jnp.where(mask, idx, 0), axis=-1)


def _copy_backbone(backbone: Decoder) -> Decoder:
    return nnx.clone(backbone)


class ValueModel(nnx.Module):
    """Decoder + scalar value head; `model(...) -> values [B, T]` float32."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, backbone: Decoder | None = None):
        self.config = config
        self.backbone = backbone if backbone is not None else Decoder(config, rngs=rngs)
        self.value_head = Proj((config.hidden_size,), (1,), in_names=("embed",),
                               out_names=(None,), use_bias=True, config=config, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 branch_ids=None):
        hidden = self.backbone(input_ids, attention_mask, positions, segment_ids, branch_ids)
        return self.value_head(hidden).astype(jnp.float32)[..., 0]

    @classmethod
    def from_causal_lm(cls, lm: CausalLM, *, rngs: nnx.Rngs) -> ValueModel:
        """A value model whose backbone is a copy of `lm`'s; the head is freshly initialised."""
        return cls(lm.config, rngs=rngs, backbone=_copy_backbone(lm.backbone))

    @classmethod
    def from_reward_model(cls, rm: RewardModel, *, head: str | None = None) -> ValueModel:
        """A value model copying `rm`'s backbone and head `head` (default: the first), with the
        reward normalisation folded in: `w = gain * w_head`, `b = gain * b_head + bias`."""
        names = rm.head_names
        head = names[0] if head is None else head
        if head not in names:
            raise ValueError(f"head={head!r} is not one of the reward model's heads {names}")
        i = names.index(head)
        vm = cls(rm.config, rngs=nnx.Rngs(0), backbone=_copy_backbone(rm.backbone))
        gain = rm.norm_gain[...][i].astype(jnp.float32)
        bias = rm.norm_bias[...][i].astype(jnp.float32)
        w = rm.score_head.kernel[...][:, i:i + 1].astype(jnp.float32) * gain
        b = rm.score_head.bias[...][i:i + 1].astype(jnp.float32) * gain + bias
        vm.value_head.kernel[...] = w.astype(vm.value_head.kernel[...].dtype)
        vm.value_head.bias[...] = b.astype(vm.value_head.bias[...].dtype)
        return vm


class RewardModel(nnx.Module):
    """Decoder + `H` named scalar heads; `model(...) -> rewards [B, H]` at the last real token."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        head_names: Sequence[str] = ("reward",),
        rngs: nnx.Rngs,
        backbone: Decoder | None = None,
    ):
        head_names = tuple(head_names)
        if not head_names or len(set(head_names)) != len(head_names):
            raise ValueError(f"head_names must be non-empty and unique, got {head_names}")
        self.config = config
        self.head_names = head_names
        self.backbone = backbone if backbone is not None else Decoder(config, rngs=rngs)
        n = len(head_names)
        self.score_head = Proj((config.hidden_size,), (n,), in_names=("embed",),
                               out_names=("reward_heads",), use_bias=True, config=config,
                               rngs=rngs)
        self.norm_gain = RewardNormalization(jnp.ones((n,), jnp.float32),
                                             out_sharding=("reward_heads",),
                                             eager_sharding=False)
        self.norm_bias = RewardNormalization(jnp.zeros((n,), jnp.float32),
                                             out_sharding=("reward_heads",),
                                             eager_sharding=False)

    def token_scores(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                     branch_ids=None):
        """Normalised scores at every token, `[B, T, H]` float32 (for prefix-shared rows with
        `branch_ids`, read the last token of each branch)."""
        hidden = self.backbone(input_ids, attention_mask, positions, segment_ids, branch_ids)
        raw = self.score_head(hidden).astype(jnp.float32)
        return raw * self.norm_gain[...] + self.norm_bias[...]

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        scores = self.token_scores(input_ids, attention_mask, positions, segment_ids)
        if attention_mask is None:
            if segment_ids is not None:
                attention_mask = segment_ids > 0
            else:
                return scores[:, -1, :]
        idx = last_token_index(attention_mask)
        return jnp.take_along_axis(scores, idx[:, None, None], axis=1)[:, 0, :]

    def set_normalization(self, gain, bias) -> None:
        """Sets the per-head normalisation `r = gain * raw + bias` (`gain`, `bias`: `[H]`)."""
        n = len(self.head_names)
        gain = jnp.broadcast_to(jnp.asarray(gain, jnp.float32), (n,))
        bias = jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (n,))
        self.norm_gain[...] = gain
        self.norm_bias[...] = bias

    @classmethod
    def from_causal_lm(cls, lm: CausalLM, *, head_names: Sequence[str] = ("reward",),
                       rngs: nnx.Rngs) -> RewardModel:
        """A reward model whose backbone is a copy of `lm`'s; heads freshly initialised."""
        return cls(lm.config, head_names=head_names, rngs=rngs,
                   backbone=_copy_backbone(lm.backbone))
