"""The reward source of a run from its config (`rlhf_jax.train.rewards`): the registry, the
built-in sources, the errors that name the field, and the gold-reward metric. The sources
themselves are tested in tests/generation/test_generation_rewards.py; `reward.source=model`
end to end in test_run_handoff.py."""

from __future__ import annotations

import typing

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data.synthetic import build_tokenizer, get_task
from rlhf_jax.generation import GenerationOutput, TokenRewardFunction, score_samples
from rlhf_jax.train import rewards
from rlhf_jax.train.rewards import (
    REWARD_SOURCES,
    RewardContext,
    RewardSpec,
    build_reward_source,
    gold_reward_metric,
    register_reward_source,
)
from rlhf_jax.train.rollout import Rollout, rollout_from_generation

TASK = get_task("topic")
TOKENIZER = build_tokenizer()


def _rows(prompts: list[str], responses: list[str]) -> GenerationOutput:
    """Left-padded prompts and right-padded responses (with EOS) as the sampler returns them."""
    p_ids = [TOKENIZER.encode(p) for p in prompts]
    r_ids = [TOKENIZER.encode(r) + [TOKENIZER.eos_token_id] for r in responses]
    pw, rw = max(map(len, p_ids)), max(map(len, r_ids)) + 1
    seq = np.zeros((len(prompts), pw + rw), np.int32)
    mask = np.zeros_like(seq)
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        seq[i, pw - len(p):pw], mask[i, pw - len(p):pw] = p, 1
        seq[i, pw:pw + len(r)], mask[i, pw:pw + len(r)] = r, 1
    zeros = jnp.zeros((len(prompts), rw))
    return GenerationOutput(
        tokens=jnp.asarray(seq[:, pw:]), mask=jnp.asarray(mask[:, pw:]), logps=zeros,
        model_logps=zeros, sequences=jnp.asarray(seq), sequence_mask=jnp.asarray(mask),
        finished=jnp.ones(len(prompts), bool), prompt_length=pw,
    )


PROMPTS = TASK.sample_prompts(0, 3)
RESPONSES = ["the sea is deep", "cats", ""]


class TestRegistry:
    def test_the_spec_literal_names_exactly_the_registered_sources(self):
        """A config can select every registered source and nothing else."""
        allowed = typing.get_args(typing.get_type_hints(RewardSpec)["source"])
        assert set(allowed) == set(REWARD_SOURCES) == {"gold", "model"}

    def test_unknown_source_names_the_field_and_the_choices(self):
        with pytest.raises(ValueError, match=r"reward.source='judge'; allowed: 'gold', 'model'"):
            build_reward_source(RewardSpec(source="judge"))

    def test_a_registered_builder_is_selected_by_name(self, monkeypatch):
        monkeypatch.setattr(rewards, "REWARD_SOURCES", dict(REWARD_SOURCES))
        seen = {}

        @register_reward_source("constant")
        def constant(spec, context):
            seen.update(spec=spec, context=context)
            return TokenRewardFunction(lambda p, r, m: np.full(len(p), 2.5), name="constant")

        context = RewardContext(task=TASK, tokenizer=TOKENIZER)
        source = build_reward_source(RewardSpec(source="constant"), context)
        assert seen["context"] is context and source.name == "constant"
        np.testing.assert_array_equal(source(_rows(PROMPTS, RESPONSES), {}), [2.5] * 3)
        with pytest.raises(ValueError, match="'constant' is already registered"):
            register_reward_source("constant")(constant)

    def test_context_decodes_with_the_policy_tokenizer(self):
        ids = TOKENIZER.encode("abc") + [TOKENIZER.eos_token_id]
        assert RewardContext(tokenizer=TOKENIZER).decode(ids) == "abc"
        with pytest.raises(ValueError, match="needs the policy's tokenizer"):
            RewardContext().decode(ids)


class TestBuiltInSources:
    def test_gold_is_the_tasks_token_reward(self):
        source = build_reward_source(RewardSpec(source="gold"), RewardContext(task=TASK))
        rows = _rows(PROMPTS, RESPONSES)
        expected = TASK.gold_reward(PROMPTS, RESPONSES)
        np.testing.assert_allclose(source(rows, {}), expected, rtol=1e-6, atol=1e-6)
        # the same through the scoring every consumer calls, on the trainers' layout
        rollout = rollout_from_generation(rows)
        assert isinstance(rollout, Rollout)
        np.testing.assert_allclose(score_samples(source, rollout, {}), expected, rtol=1e-6,
                                   atol=1e-6)

    def test_missing_inputs_name_the_field(self):
        with pytest.raises(ValueError, match="reward.source='gold' needs a synthetic task"):
            build_reward_source(RewardSpec(source="gold"))
        with pytest.raises(ValueError, match="reward.source='model' needs reward.path"):
            build_reward_source(RewardSpec(source="model"))


def test_gold_reward_metric_reads_the_experiences_rollout():
    rollout = rollout_from_generation(_rows(PROMPTS, RESPONSES))
    metric = gold_reward_metric(TASK, "ppo/gold_reward")
    out = metric(type("Experience", (), {"rollout": rollout})(), {})
    np.testing.assert_allclose(out["ppo/gold_reward"],
                               np.mean(TASK.gold_reward(PROMPTS, RESPONSES)), rtol=1e-6)
