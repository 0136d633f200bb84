"""best-of-n on the global mesh of the processes that run this script (one process with 8 CPU
devices, or `python -m rlhf_jax.launch` with 2 x 4): a sampler and a reward model on the
(2, 4) mesh, a host reward beside it. Every process writes what it got (the samples and kept rows
gathered to the host, the scores and the selection) to ``<prefix>.<process>.npz``.

    python tests/multihost/best_of_n_run.py PREFIX
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.generation import (
    RewardModelSource,
    Sampler,
    SamplingParams,
    TokenRewardFunction,
    WeightedRewardSum,
    best_of_n,
)
from rlhf_jax.models import CausalLM, ModelConfig, RewardModel


def even_tokens(prompt_ids, response_ids, response_mask):
    """The share of even response tokens (a host reward that needs the whole rows)."""
    return ((response_ids % 2 == 0) & (response_mask > 0)).sum(1) / response_ids.shape[1]


def main(prefix: str) -> None:
    sharding.initialize_distributed()
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    config = ModelConfig.tiny_gpt2(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2)
    policy = sharding.shard_model(CausalLM(config, rngs=nnx.Rngs(0)), mesh)
    reward = WeightedRewardSum(
        [RewardModelSource(RewardModel(config, rngs=nnx.Rngs(1)), mesh=mesh),
         TokenRewardFunction(even_tokens)], [1.0, 0.5])
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 7, size=8)
    ids = np.zeros((8, 6), np.int32)
    mask = np.zeros((8, 6), np.int32)
    for b, n in enumerate(lengths):
        ids[b, 6 - n:] = rng.integers(2, 64, size=n)
        mask[b, 6 - n:] = 1
    out = best_of_n(Sampler(policy, mesh=mesh), ids, mask,
                    SamplingParams(max_new_tokens=6, temperature=1.0), num_samples=2,
                    reward=reward, rng=jax.random.key(0), eos_token_id=1, pad_token_id=0,
                    return_worst=True, missing_eos_penalty=0.5)
    arrays = sharding.gather_to_host({"samples": out.samples.sequences,
                                      "best": out.best.sequences,
                                      "worst": out.worst.sequences})
    arrays.update(scores=np.asarray(out.scores),
                  best_indices=np.asarray(out.selection.best_indices),
                  worst_indices=np.asarray(out.selection.worst_indices),
                  best_scores=np.asarray(out.selection.best_scores),
                  processes=np.asarray(jax.process_count()))
    np.savez(f"{prefix}.{jax.process_index()}.npz", **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
