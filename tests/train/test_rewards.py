"""The reward source of a run from its config (`rlhf_jax.train.rewards`): the registry, the
built-in sources (gold, model, judge, gated, combined) against independent float64 references,
the component strings, the errors that name the field, the sources from YAML and the command
line of the online trainers, and the gold-reward metric. The source classes themselves are
tested in tests/generation/test_generation_rewards.py; `reward.source=model` end to end in
test_run_handoff.py."""

from __future__ import annotations

import json
import typing

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from rlhf_jax import cli
from rlhf_jax.data.synthetic import build_tokenizer, get_task
from rlhf_jax.generation import GenerationOutput, TokenRewardFunction, score_samples
from rlhf_jax.models import positions_from_mask
from rlhf_jax.train import rewards
from rlhf_jax.train.config import ConfigError, FieldError, config_from_yaml, load_config
from rlhf_jax.train.grpo import RLOOConfig
from rlhf_jax.train.model_source import load_lm
from rlhf_jax.train.ppo import PPOConfig
from rlhf_jax.train.rewards import (
    REWARD_SOURCES,
    JudgeScoreSpec,
    RewardContext,
    RewardSpec,
    build_reward_source,
    gold_reward_metric,
    parse_component,
    register_reward_source,
)
from rlhf_jax.train.rm import load_reward_model
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
        assert set(allowed) == set(REWARD_SOURCES) == {"gold", "model", "judge", "gated",
                                                       "combined"}

    def test_unknown_source_names_the_field_and_the_choices(self):
        with pytest.raises(ValueError, match=r"reward.source='rm'; allowed: 'gold', 'model', "
                                             r"'judge', 'gated', 'combined'"):
            build_reward_source(RewardSpec(source="rm"))

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


# ---------------------------------------------------------------------------------------------
# judge, gated and combined
# ---------------------------------------------------------------------------------------------

TINY = ["--model.hidden-size", "32", "--model.num-layers", "1", "--model.num-heads", "2",
        "--logging.progress", "none", "--logging.no-tensorboard", "--logging.every-steps", "1"]
MANY_PROMPTS = TASK.sample_prompts(3, 8)
MANY_RESPONSES = TASK.sample_responses(4, MANY_PROMPTS)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _whiten64(x):
    x = np.asarray(x, np.float64)
    return (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8)


@pytest.fixture(scope="module")
def rm_run(two_head_rm_run):
    """A tiny two-head reward model run (heads "helpful", "harmless"; tests/conftest.py)."""
    return str(two_head_rm_run)


def _heads(rm_dir, rows) -> np.ndarray:
    """``[B, 2]`` float64 head scores of the reward model, by a forward of its own."""
    model = load_reward_model(rm_dir)
    mask = rows.sequence_mask
    out = model(rows.sequences, attention_mask=mask, positions=positions_from_mask(mask))
    return np.asarray(out, np.float64)


class TestComponentStrings:
    JUDGE = JudgeScoreSpec(tokenizer="synthetic", principle="be kind")

    @pytest.mark.parametrize("text, source, path, head", [
        ("gold", "gold", None, None),
        (" model:runs/rm ", "model", "runs/rm", None),
        ("model:gs://bucket/rm#harmless", "model", "gs://bucket/rm", "harmless"),
        ("model:runs/rm#1", "model", "runs/rm", "1"),
        ("judge:preset:tiny_gpt2", "judge", "preset:tiny_gpt2", None),
        ("judge:runs/sft@20", "judge", "runs/sft@20", None),
    ])
    def test_parse(self, text, source, path, head):
        leaf = parse_component(text, RewardSpec(judge=self.JUDGE), field="reward.safety")
        assert (leaf.source, leaf.path, leaf.head) == (source, path, head)
        # a judge component takes the run's judge options
        assert leaf.judge == (self.JUDGE if source == "judge" else JudgeScoreSpec())

    @pytest.mark.parametrize("text, message", [
        ("", "reward.safety is empty"),
        ("rm:runs/rm", "must be one of gold, model, judge"),
        ("gold:x", "gold takes no path"),
        ("model:", "write model:PATH"),
        ("model:#harmless", "both parts"),
        ("model:runs/rm#", "both parts"),
    ])
    def test_errors_name_the_field(self, text, message):
        with pytest.raises(ValueError, match=message) as info:
            parse_component(text, RewardSpec(), field="reward.safety")
        assert "reward.safety" in str(info.value)


class TestSpecChecks:
    def test_field_errors(self):
        with pytest.raises(FieldError, match="components is empty"):
            RewardSpec(source="combined")
        with pytest.raises(FieldError, match="weights has 2 values for 1 components"):
            RewardSpec(source="combined", components=("gold",), weights=(1.0, 2.0))
        with pytest.raises(FieldError, match=r"safety_threshold must be a finite number in "):
            RewardSpec(safety_threshold=1.0)
        with pytest.raises(FieldError, match="weights must be finite"):
            RewardSpec(weights=(float("nan"),))
        with pytest.raises(FieldError, match="rationale_tokens"):
            JudgeScoreSpec(rationale_tokens=0)

    def test_yaml_errors_name_the_file_line_and_field(self, tmp_path):
        path = tmp_path / "ppo.yaml"
        path.write_text("num_steps: 1\nreward:\n  source: combined\n  components: [gold]\n"
                        "  weights: [1.0, 2.0]\n")
        with pytest.raises(ConfigError, match=r"ppo.yaml, line 5: config.reward.weights has 2"):
            config_from_yaml(PPOConfig, path)

    def test_missing_parts_name_the_field(self):
        with pytest.raises(ValueError, match="reward.source='gated' needs reward.helpfulness"):
            build_reward_source(RewardSpec(source="gated", safety="gold"))
        with pytest.raises(ValueError, match="reward.source='judge' needs reward.path"):
            build_reward_source(RewardSpec(source="judge"))
        spec = RewardSpec(source="combined", components=("gold", "model:/no/such/rm"))
        with pytest.raises(ValueError, match=r"reward.components\[1\]='model:/no/such/rm'"):
            build_reward_source(spec, RewardContext(task=TASK))


class TestRewardModelSources:
    def test_head_by_name_or_index(self, rm_run):
        rows = _rows(MANY_PROMPTS, MANY_RESPONSES)
        heads = _heads(rm_run, rows)
        for head in ("harmless", "1"):
            source = build_reward_source(RewardSpec(source="model", path=rm_run, head=head))
            np.testing.assert_allclose(source(rows, {}), heads[:, 1], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"reward.head: head='honest' is not one of"):
            build_reward_source(RewardSpec(source="model", path=rm_run, head="honest"))

    @pytest.mark.parametrize("whiten", [True, False])
    def test_gated_matches_a_float64_reference(self, rm_run, monkeypatch, whiten):
        """Llama 2: R_s when flagged or sigmoid(R_s) < tau, else R_h; then WHITEN(LOGIT(.))."""
        rows = _rows(MANY_PROMPTS, MANY_RESPONSES)
        heads = _heads(rm_run, rows)
        h, s = heads[:, 0], heads[:, 1]
        tau = float(_sigmoid(np.median(s)))  # half the rows fall below the threshold
        flag = np.array([1, 0, 0, 0, 0, 0, 0, 1])
        loads = []
        monkeypatch.setattr(rewards, "load_reward_model",
                            lambda path: loads.append(path) or load_reward_model(path))
        spec = RewardSpec(source="gated", helpfulness=f"model:{rm_run}#helpful",
                          safety=f"model:{rm_run}#harmless", safety_threshold=tau,
                          safety_flag="unsafe", whiten=whiten)
        source = build_reward_source(spec, RewardContext(task=TASK))
        assert loads == [rm_run]  # two heads of one model: loaded once
        use_safety = flag.astype(bool) | (_sigmoid(s) < tau)
        assert 2 < use_safety.sum() < 8
        gated = np.where(use_safety, s, h)
        expected = _whiten64(gated) if whiten else gated
        out = np.asarray(source(rows, {"unsafe": flag}))
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

    def test_combined_is_the_weighted_sum(self, rm_run):
        rows = _rows(MANY_PROMPTS, MANY_RESPONSES)
        heads = _heads(rm_run, rows)
        gold = TASK.gold_reward(MANY_PROMPTS, MANY_RESPONSES)
        spec = RewardSpec(source="combined", components=("gold", f"model:{rm_run}#helpful"),
                          weights=(0.5, -2.0))
        source = build_reward_source(spec, RewardContext(task=TASK))
        np.testing.assert_allclose(source(rows, {}), 0.5 * gold - 2.0 * heads[:, 0],
                                   rtol=1e-5, atol=1e-5)
        # weights default to 1
        spec = RewardSpec(source="combined", components=("gold", "gold"))
        np.testing.assert_allclose(build_reward_source(spec, RewardContext(task=TASK))(rows, {}),
                                   2 * gold, rtol=1e-6, atol=1e-6)


JUDGE = JudgeScoreSpec(tokenizer="synthetic", preamble="", query="{prompt}:{response}",
                       answer_prompt="=", score_tokens=tuple("123456789"), separator="",
                       min_bucket=16)


class TestJudgeSource:
    def test_expected_score_matches_a_float64_reference(self):
        """d-RLAIF: sum_k v_k softmax(logits[score ids])_k at the token after the rating prompt."""
        spec = RewardSpec(source="judge", path="preset:tiny_gpt2", judge=JUDGE)
        source = build_reward_source(spec, RewardContext(task=TASK, tokenizer=TOKENIZER))
        out = np.asarray(source(_rows(PROMPTS, RESPONSES), {}))
        lm = load_lm("preset:tiny_gpt2", tokenizer="synthetic")  # the same seed-0 weights
        score_ids = [TOKENIZER.convert_tokens_to_ids(c) for c in "123456789"]
        expected = []
        for prompt, response in zip(PROMPTS, RESPONSES):
            ids = jnp.asarray([TOKENIZER.encode(f"{prompt}:{response}=")])
            z = np.asarray(lm.model(ids)[0, -1], np.float64)[score_ids]
            p = np.exp(z - z.max())
            expected.append((p / p.sum()) @ np.arange(1, 10))
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
        assert source.name == "judge:preset:tiny_gpt2"

    def test_a_score_token_the_tokenizer_splits_names_the_field(self):
        spec = RewardSpec(source="judge", path="preset:tiny_gpt2",
                          judge=JudgeScoreSpec(tokenizer="synthetic"))  # "10" is two tokens
        with pytest.raises(ValueError, match=r"reward.judge .*'10' is not a single token"):
            build_reward_source(spec, RewardContext(task=TASK, tokenizer=TOKENIZER))


class TestFromConfigAndCommandLine:
    def test_command_line_sets_every_source(self):
        config = load_config(PPOConfig, ["--reward.source", "combined", "--reward.components",
                                         "gold", "model:runs/rm#helpful", "--reward.weights",
                                         "1", "0.5"])
        assert config.reward.components == ("gold", "model:runs/rm#helpful")
        assert config.reward.weights == (1.0, 0.5)
        config = load_config(PPOConfig, ["--reward.source", "gated", "--reward.helpfulness",
                                         "model:rm#helpful", "--reward.safety",
                                         "model:rm#harmless", "--reward.safety-threshold", "0.2",
                                         "--reward.no-whiten", "--reward.score-scale",
                                         "probability"])
        assert (config.reward.helpfulness, config.reward.safety) == ("model:rm#helpful",
                                                                     "model:rm#harmless")
        assert config.reward.safety_threshold == 0.2 and not config.reward.whiten
        assert config.reward.score_scale == "probability"
        config = load_config(PPOConfig, ["--reward.source", "judge", "--reward.path", "runs/j",
                                         "--reward.judge.score-tokens", "1", "2", "3",
                                         "--reward.judge.chain-of-thought"])
        assert config.reward.judge.score_tokens == ("1", "2", "3")
        assert config.reward.judge.chain_of_thought

    def test_rloo_with_the_gated_reward_from_yaml_and_the_command_line(self, rm_run, tmp_path,
                                                                        capsys):
        path = tmp_path / "rloo.yaml"
        path.write_text(yaml.safe_dump({"reward": {
            "source": "gated", "helpfulness": f"model:{rm_run}#helpful",
            "safety": f"model:{rm_run}#harmless", "safety_threshold": 0.3}}))
        assert config_from_yaml(RLOOConfig, path).reward.safety_threshold == 0.3
        out = tmp_path / "rloo"
        capsys.readouterr()
        assert cli.main(["rloo", "--config", str(path), "--output-dir", str(out), *TINY,
                         "--num-steps", "1", "--num-generations", "2",
                         "--reward.safety-threshold", "0.4"]) == 0
        printed = capsys.readouterr().out
        metrics = json.loads(printed[printed.index("{"):])["metrics"]
        saved = yaml.safe_load((out / "config.yaml").read_text())["reward"]
        assert saved["source"] == "gated" and saved["safety_threshold"] == 0.4
        # whitened over the batch: mean 0, population std sqrt((B - 1) / B)
        b = 8 * 2
        assert abs(metrics["rloo/score_mean"]) < 1e-5
        np.testing.assert_allclose(metrics["rloo/score_std"], np.sqrt((b - 1) / b), rtol=1e-3)

    @pytest.mark.slow
    @pytest.mark.parametrize("command, extra", [
        ("ppo", ["--num-minibatches", "1"]),
        ("grpo", ["--num-generations", "2"]),
        ("rejection-sampling", ["--sft-batch-size", "8"]),
    ])
    def test_online_trainers_with_judge_and_combined_sources(self, rm_run, tmp_path, capsys,
                                                             command, extra):
        judge = ["--reward.judge.tokenizer", "synthetic", "--reward.judge.preamble", "",
                 "--reward.judge.query", "{prompt}:{response}", "--reward.judge.answer-prompt",
                 "=", "--reward.judge.score-tokens", *"123456789", "--reward.judge.separator", "",
                 "--reward.judge.min-bucket", "16"]
        for source in (["--reward.source", "judge", "--reward.path", "preset:tiny_gpt2"],
                       ["--reward.source", "combined", "--reward.components", "gold",
                        f"model:{rm_run}#helpful", "judge:preset:tiny_gpt2",
                        "--reward.weights", "1", "0.5", "0.1"]):
            out = tmp_path / f"{command}-{source[1]}"
            capsys.readouterr()
            assert cli.main([command, "--output-dir", str(out), *TINY, "--num-steps", "1",
                             *extra, *source, *judge]) == 0
            printed = capsys.readouterr().out
            metrics = json.loads(printed[printed.index("{"):])["metrics"]
            name = "rs" if command == "rejection-sampling" else command
            score = metrics[f"{name}/score_mean"]
            if source[1] == "judge":
                assert 1.0 <= score <= 9.0  # an expected 1-9 rating
            assert np.isfinite(score)
