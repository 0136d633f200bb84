"""Pieces of the demo pipeline: config, tokenization layout, best-of-n KL, eval schedule."""

import math

import numpy as np
import pytest

from experiments import demo
from experiments.demo_config import DemoConfig, config_from_mapping, parse_overrides
from rlhf_jax.data import synthetic


class TestBestOfNLogRatio:
    def test_hand_worked(self):
        ref = np.array([[0.0, 1.0, 2.0, 3.0]])
        # 2 of 4 below, none equal: F = (2 + 0.5) / 5 = 0.5; log 2 + 1 * log 0.5 = 0.
        np.testing.assert_allclose(demo.bon_log_ratio(np.array([[1.5]]), ref, 2), [[0.0]],
                                   atol=1e-12)
        # A tie counts half: F = (1 + 0.5 + 0.5) / 5 = 0.4; log 4 + 3 log 0.4.
        np.testing.assert_allclose(demo.bon_log_ratio(np.array([[1.0]]), ref, 4),
                                   [[math.log(4) + 3 * math.log(0.4)]], rtol=1e-12)

    def test_n_equal_one_is_zero(self):
        rng = np.random.default_rng(0)
        out = demo.bon_log_ratio(rng.normal(size=(3, 5)), rng.normal(size=(3, 7)), 1)
        np.testing.assert_array_equal(out, np.zeros((3, 5)))

    @pytest.mark.parametrize("n", [2, 4, 16])
    def test_mean_matches_closed_form_kl(self, n):
        # Continuous scores: E[log n + (n-1) log F(max of n)] = log n - (n-1)/n.
        rng = np.random.default_rng(n)
        prompts, groups, m = 40, 50, 4000
        ref = rng.uniform(size=(prompts, m))
        selected = rng.uniform(size=(prompts, groups, n)).max(-1)
        kl = demo.bon_log_ratio(selected, ref, n).mean()
        assert abs(kl - (math.log(n) - (n - 1) / n)) < 0.05


def test_eval_schedule():
    assert demo.eval_schedule(60, 3) == [20, 40, 60]
    assert demo.eval_schedule(8, 1) == [8]
    assert demo.eval_schedule(100, 4, power=2.0) == [6, 25, 56, 100]
    assert demo.eval_schedule(2, 5) == [1, 2]


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.build_tokenizer()


def _samples(tokenizer, prompts, responses, *, width=8, n=6):
    """Host `GenerationOutput` rows of `prompts` (left-padded) and `responses` + EOS."""
    enc = demo.encode_prompts(tokenizer, prompts, width=width)
    ids = np.full((len(responses), n), tokenizer.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(responses):
        toks = [*tokenizer(r, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        ids[i, :len(toks)], mask[i, :len(toks)] = toks, 1
    zeros = np.zeros(ids.shape, np.float32)
    return demo.GenerationOutput(
        ids, mask, zeros, zeros, np.concatenate([enc["prompt_ids"], ids], 1),
        np.concatenate([enc["prompt_mask"], mask], 1), np.ones(len(responses), bool), width)


class TestPrompts:
    def test_layout_is_the_trainers(self, tokenizer):
        enc = demo.encode_prompts(tokenizer, ["ab>", "abcab>"], width=8)
        ids = synthetic.VOCAB.index
        pad = tokenizer.pad_token_id
        assert enc["prompt_ids"].shape == (2, 8)
        # Left-padded characters, as the online trainers' prompt batches.
        assert enc["prompt_ids"][0].tolist() == [pad] * 5 + [ids("a"), ids("b"), ids(">")]
        assert enc["prompt_mask"][0].tolist() == [0] * 5 + [1] * 3
        assert enc["prompt_mask"][1].sum() == 6

    def test_gold_reward_matches_text_scoring(self, tokenizer):
        task = synthetic.get_task("topic")
        prompts = ["abcab>", "ddee>"]
        responses = ["abc", "dede"]
        s = _samples(tokenizer, prompts, responses)
        token_level = task.gold_reward_tokens(s.sequences[:, :8], s.tokens, s.mask)
        np.testing.assert_allclose(token_level, task.gold_reward(prompts, responses))

    def test_prompt_too_long(self, tokenizer):
        with pytest.raises(ValueError, match="records:0"):
            demo.encode_prompts(tokenizer, ["abcdefghij>"], width=8)


class TestConfig:
    def test_presets(self):
        assert DemoConfig.from_preset("quick").preset == "quick"
        assert DemoConfig.from_preset("default") == DemoConfig()
        with pytest.raises(ValueError, match="unknown preset 'big'"):
            DemoConfig.from_preset("big")

    def test_round_trip(self):
        cfg = DemoConfig.quick(seed=3)
        assert config_from_mapping(cfg.to_dict()) == cfg

    def test_overrides(self):
        assert parse_overrides(["rm_pairs=64,256", "seed=3", "overopt_kl_coef=0.01"]) == {
            "rm_pairs": (64, 256), "seed": 3, "overopt_kl_coef": 0.01}
        with pytest.raises(ValueError, match="no field 'bogus'"):
            parse_overrides(["bogus=1"])
        with pytest.raises(ValueError, match="FIELD=VALUE"):
            parse_overrides(["seed"])
        with pytest.raises(ValueError, match="cannot read 'x'"):
            parse_overrides(["seed=x"])

    @pytest.mark.parametrize("kw,needle", [
        (dict(rm_pairs=(256, 64)), "rm_pairs"),
        (dict(rm_pairs=(64,)), "rm_pairs"),
        (dict(bon_ns=(1, 64), bon_pool=32), "bon_pool"),
        (dict(ppo_rollout_batch=30, ppo_minibatches=4), "ppo_minibatches"),
        (dict(sft_steps=0), "sft_steps=0"),
        (dict(dpo_betas=()), "dpo_betas"),
        (dict(overopt_evals=2), "overopt_evals"),
        (dict(bon_prompts=512, eval_prompts=256), "bon_prompts=512"),
    ])
    def test_invalid(self, kw, needle):
        with pytest.raises(ValueError, match=needle):
            DemoConfig(**kw)

    def test_zero_kl_coef_allowed_for_overoptimisation(self):
        assert DemoConfig(overopt_kl_coef=0.0).overopt_kl_coef == 0.0

    def test_cli_rejects_bad_override(self, capsys):
        with pytest.raises(SystemExit) as e:
            demo.main(["--quick", "--set", "bogus=1"])
        assert e.value.code == 2
        assert "no field 'bogus'" in capsys.readouterr().err


def test_preference_ceiling_and_agreement(tokenizer):
    s = _samples(tokenizer, ["ab>"] * 3, ["a", "b", "ab"])
    q = np.array([0.9, 0.5, 0.2])
    records = [{"prompt": "ab>", "chosen": r, "rejected": "b"} for r in ("a", "b", "ab")]
    prefs = demo.Preferences(records, s, s, np.zeros(3), np.zeros(3), q, 0.7)
    assert prefs.oracle_accuracy == pytest.approx((0.9 + 0.5 + 0.8) / 3)
    assert prefs.inter_rater_agreement == pytest.approx((0.82 + 0.5 + 0.68) / 3)
    tail = prefs.split(1)
    assert tail.records == records[1:] and tail.chosen.sequences.shape[0] == 2
    np.testing.assert_array_equal(tail.chosen.tokens, s.tokens[1:])
    assert tail.oracle_accuracy == pytest.approx((0.5 + 0.8) / 2)
