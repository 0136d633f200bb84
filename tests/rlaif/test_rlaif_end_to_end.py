"""A full small distilled-RLAIF loop on CPU: sample pairs -> AI judge -> JSONL -> reward model.

The reward model is trained with `rlhf_jax.losses.bradley_terry_loss` on the soft labels and
optax directly, on the batches `rlhf_jax.data` builds from the written JSONL file.
"""

import jax
import numpy as np
import optax
from flax import nnx

from rlhf_jax.data import TokenizeConfig, collate_preference, load_examples, tokenize_examples
from rlhf_jax.data.synthetic import get_task
from rlhf_jax.generation import SamplingParams
from rlhf_jax.losses import bradley_terry_loss
from rlhf_jax.models import RewardModel
from rlhf_jax.rlaif import PairwiseJudge, TextModel, label_preferences, sample_pairs

# The judge likes the first six letters and dislikes everything else.
TASTE = {**{ch: 1.0 for ch in "abcdef"}, **{ch: -1.0 for ch in "ghijklmnopqrstuvwxyz0123456789"}}


def test_sample_judge_train_reward_model(tmp_path, tokenizer, tiny_config, tiny_lm, make_crafted,
                                         judge_template):
    prompts = get_task("topic").sample_prompts(0, 8)
    policy = TextModel(tiny_lm, tokenizer, batch_size=4, min_bucket=64)
    responses_1, responses_2 = sample_pairs(
        policy, prompts, SamplingParams(max_new_tokens=4), rng=jax.random.key(0)
    )
    judge = PairwiseJudge(make_crafted(TASTE, slot_bias=0.5), tokenizer,
                          template=judge_template, batch_size=8)
    path = tmp_path / "ai_prefs.jsonl"
    labelled = label_preferences(judge, prompts, responses_1, responses_2, path=path)
    report = labelled.report
    assert report.num_records + sum(report.skipped.values()) == len(prompts)
    assert report.num_records >= 4

    # The data module reads the records unchanged, soft labels included.
    examples, load_report = load_examples(str(path), format="preference")
    assert load_report.num_skipped == 0 and len(examples) == report.num_records
    np.testing.assert_allclose([e.label for e in examples],
                               [r["label"] for r in labelled.records], rtol=1e-6)
    tokenized, _ = tokenize_examples(examples, tokenizer, config=TokenizeConfig(max_length=64))
    batch = collate_preference(tokenized, pad_id=tokenizer.pad_token_id, length_buckets=(32, 64))
    assert np.all((batch["label"] >= 0.5) & (batch["label"] <= 1.0))

    reward_model = RewardModel(tiny_config, rngs=nnx.Rngs(2))
    optimizer = nnx.Optimizer(reward_model, optax.adam(3e-3), wrt=nnx.Param)

    def rewards(model, prefix):
        return model(
            batch[prefix + "input_ids"],
            attention_mask=batch[prefix + "attention_mask"],
            positions=batch[prefix + "positions"],
        )[:, 0]

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            chosen, rejected = rewards(model, "chosen_"), rewards(model, "rejected_")
            return bradley_terry_loss(chosen, rejected, label=batch["label"]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(reward_model, optimizer)) for _ in range(8)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses
