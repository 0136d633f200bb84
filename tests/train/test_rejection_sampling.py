"""Iterated rejection sampling: the SFT batch built from the kept samples, and short rounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.data.synthetic import build_tokenizer, get_task
from rlhf_jax.generation import TokenRewardFunction
from rlhf_jax.models import CausalLM
from rlhf_jax.train.builders import model_config
from rlhf_jax.train.config import DataSpec, ModelSpec, OptimizerConfig
from rlhf_jax.train.data import build_data
from rlhf_jax.train.rejection_sampling import (
    RejectionSamplingConfig,
    RejectionSamplingTrainer,
    best_of_n_sft_batch,
)
from rlhf_jax.train.rollout import Rollout, RolloutConfig


def test_sft_batch_layout_of_kept_rows():
    # 3 rows, P = 2, N = 3; keep rows 2 and 0.
    seq = jnp.array([[0, 5, 7, 2, 0], [4, 5, 8, 8, 8], [0, 6, 9, 2, 0]], jnp.int32)
    mask = jnp.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], jnp.int32)
    rollout = Rollout(sequences=seq, sequence_mask=mask, response_ids=seq[:, 2:],
                      response_mask=mask[:, 2:], finished=jnp.array([True, False, True]))
    batch = best_of_n_sft_batch(rollout, jnp.array([2, 0]))
    np.testing.assert_array_equal(batch["input_ids"], [[0, 6, 9, 2, 0], [0, 5, 7, 2, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[0, 1, 1, 1, 0], [0, 1, 1, 1, 0]])
    # loss on the response tokens (EOS included), never on the prompt or padding
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 0, 1, 2, 2], [0, 0, 1, 2, 2]])


TASK = get_task("topic")
TOKENIZER = build_tokenizer()


def _trainer(tmp_path, **kw):
    spec = DataSpec(synthetic="topic", batch_size=16, max_length=16, max_prompt_length=16,
                    num_train=128, num_eval=0)
    base = dict(output_dir=str(tmp_path), num_steps=3, data=spec,
                rollout=RolloutConfig(max_new_tokens=12), num_samples=4, sft_batch_size=8,
                sft_epochs=2, optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"))
    base.update(kw)
    config = RejectionSamplingConfig(**base)
    spec_model = ModelSpec(preset="tiny_gpt2", vocab_size=len(TOKENIZER), hidden_size=32,
                           num_layers=1, num_heads=2)
    return RejectionSamplingTrainer(
        config,
        policy=CausalLM(model_config(spec_model), rngs=nnx.Rngs(0)),
        reward=TokenRewardFunction(TASK.gold_reward_tokens, name="gold"),
        prompts=build_data(spec, format="prompt", tokenizer=TOKENIZER, seed=0).train,
        eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id,
        mesh=sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1]),
    )


def test_rounds_fine_tune_on_the_best_samples(tmp_path):
    trainer = _trainer(tmp_path)
    rounds = [trainer.iteration() for _ in range(3)]
    assert rounds[0]["rs/kl_ref"] == 0.0
    assert rounds[-1]["rs/kl_ref"] > 0.0
    for m in rounds:
        assert m["rs/best_score_mean"] >= m["rs/score_mean"]
        assert np.isfinite(m["rs/loss"]) and m["train/nonfinite"] == 0.0
    # 2 epochs x (16 prompts / 8 rows) SFT steps per round
    assert int(trainer.state.policy.step) == 3 * 4
    assert int(trainer.state.step) == 3


def test_bad_sft_batch_size_raises(tmp_path):
    with pytest.raises(ValueError, match="sft_batch_size=5 must divide data.batch_size=16"):
        _trainer(tmp_path, sft_batch_size=5)
