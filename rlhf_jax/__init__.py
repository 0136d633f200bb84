"""rlhf_jax: reinforcement learning from human and AI feedback in JAX/Flax.

Subpackages (imported on demand, so `import rlhf_jax.losses` pulls in nothing but jax/chex):

- `rlhf_jax.losses`: pure, jittable RLHF objectives.
- `rlhf_jax.models`: Flax NNX policy, value and reward models with Hugging Face interop.
- `rlhf_jax.sharding`: meshes and logical-axis partitioning.
- `rlhf_jax.generation`: a jitted KV-cache sampler for rollouts.
- `rlhf_jax.data`: datasets, batching and synthetic tasks.
- `rlhf_jax.train`: trainers (SFT, RM, DPO family, PPO, GRPO/RLOO, rejection sampling).
- `rlhf_jax.rlaif`: AI judges, constitutional data, Elo/BT ratings.
- `rlhf_jax.storage`: local paths and `gs://` URIs for every file a run reads or writes.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
