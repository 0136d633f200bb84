"""Flax NNX policy, value and reward models with Hugging Face interop.

One decoder implementation (`Decoder`) configured by `ModelConfig` covers the GPT-2, Llama and
Qwen2 families. On top of it:

- `CausalLM(config, *, rngs)`: `model(input_ids, attention_mask=None, positions=None,
  segment_ids=None, branch_ids=None) -> logits [B, T, V]` (float32 whatever the compute
  dtype); `model.token_logps(input_ids, ..., start=0, temperature=1.0, with_entropy=False,
  where=None)` -> `rlhf_jax.losses.FusedLogps` of per-token log-probs aligned to the token they
  score, through the fused, chunked LM head (never the `[B, T, V]` logits; chunk size
  `ModelConfig.logits_chunk_size`; `where`: score those tokens only); `model.hidden_states(...)`,
  `model.token_logps_from_hidden(hidden, input_ids, ...)` and `model.unembedding()` split it.
- `ValueModel(config, *, rngs)`: `-> values [B, T]`.
- `RewardModel(config, *, head_names=("reward",), rngs)`: `-> rewards [B, H]` at the last real
  token; `token_scores(...) -> [B, T, H]`; `set_normalization(gain, bias)`.

KV cache (see `CausalLM`): `cache = model.init_cache(batch_size, max_length)`;
`logits, cache = model.decode(input_ids [B, t], positions=..., cache=cache, cache_mask=[B, S])`.

Using a model inside `jax.jit` / `jax.lax.while_loop` (the pattern `rlhf_jax.generation`
uses): split it once into a static graph definition and a state pytree, and merge inside the
traced function::

    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, cache, tokens, positions, cache_mask):
        model = nnx.merge(graphdef, state)
        logits, cache = model.decode(tokens, positions=positions, cache=cache,
                                     cache_mask=cache_mask)
        return logits, cache

The cache is a plain pytree (`KVCache`), so it can be the carry of a `while_loop`.

From a local Hugging Face directory to a sharded LoRA policy and back::

    from rlhf_jax import models, sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    policy = models.from_pretrained("path/to/llama", dtype="bfloat16", mesh=mesh)
    models.apply_lora(policy, rank=8, alpha=16, targets="all", rngs=nnx.Rngs(0))
    sharding.shard_model(policy, mesh)                  # places the new adapters too
    graphdef, lora, frozen = nnx.split(policy, models.LoRAParam, ...)
    ...                                                 # train `lora` with optax
    reference = nnx.merge(graphdef, models.lora_disabled(lora), frozen)  # the base model
    models.save_pretrained(nnx.merge(graphdef, lora, frozen), "out/hf")  # adapters merged
    tokenizer = models.load_tokenizer("path/to/llama")
"""

from rlhf_jax.models.config import ModelConfig, RopeScaling
from rlhf_jax.models.heads import RewardModel, RewardNormalization, ValueModel, last_token_index
from rlhf_jax.models.hf import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
)
from rlhf_jax.models.layers import LoRAParam
from rlhf_jax.models.lora import (
    apply_lora,
    count_params,
    has_lora,
    lora_disabled,
    merge_lora,
    trainable_fraction,
)
from rlhf_jax.models.transformer import (
    CausalLM,
    Decoder,
    KVCache,
    Unembedding,
    default_positions,
    positions_from_mask,
    scoring_states,
)

__all__ = [
    "CausalLM",
    "CheckpointError",
    "Decoder",
    "KVCache",
    "LoRAParam",
    "ModelConfig",
    "RewardModel",
    "RewardNormalization",
    "RopeScaling",
    "ValueModel",
    "apply_lora",
    "config_from_hf",
    "config_to_hf",
    "count_params",
    "default_positions",
    "from_pretrained",
    "has_lora",
    "last_token_index",
    "load_tokenizer",
    "lora_disabled",
    "merge_lora",
    "positions_from_mask",
    "save_pretrained",
    "scoring_states",
    "trainable_fraction",
    "Unembedding",
]
