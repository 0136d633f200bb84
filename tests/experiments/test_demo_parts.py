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
def codec():
    return demo.Codec(synthetic.get_task("topic"), prompt_width=8, response_width=6)


class TestCodec:
    def test_layout(self, codec):
        enc = codec.encode(["ab>", "abcab>"], ["ba", "abcabcabc"])
        bos, eos, pad = demo.BOS_ID, demo.EOS_ID, demo.PAD_ID
        ids = synthetic.VOCAB.index
        assert enc.sequences.shape == (2, 14) and enc.response_ids.shape == (2, 6)
        # Prompt left-padded after BOS; response right-padded with EOS.
        assert enc.sequences[0, :8].tolist() == [pad] * 4 + [bos, ids("a"), ids("b"), ids(">")]
        assert enc.sequence_mask[0, :8].tolist() == [0] * 4 + [1] * 4
        assert enc.response_ids[0].tolist() == [ids("b"), ids("a"), eos, pad, pad, pad]
        assert enc.response_mask[0].tolist() == [1, 1, 1, 0, 0, 0]
        # Too long: truncated to N - 1 characters, EOS kept.
        assert enc.response_ids[1, -1] == eos and enc.response_mask[1].sum() == 6
        np.testing.assert_array_equal(enc.sequences[:, 8:], enc.response_ids)
        assert codec.decode(enc.response_ids, enc.response_mask) == ["ba", "abcab"]

    def test_gold_reward_matches_text_scoring(self, codec):
        task = synthetic.get_task("topic")
        prompts = ["abcab>", "ddee>"]
        responses = ["abc", "dede"]
        enc = codec.encode(prompts, responses)
        token_level = task.gold_reward_tokens(enc.sequences[:, :8], enc.response_ids,
                                              enc.response_mask)
        np.testing.assert_allclose(token_level, task.gold_reward(prompts, responses))

    def test_prompt_too_long(self, codec):
        with pytest.raises(ValueError, match="longer than the prompt width 8"):
            codec.prompts(["abcdefghij>"])


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


def test_preference_ceiling_and_agreement(codec):
    enc = codec.encode(["ab>"] * 3, ["a", "b", "ab"])
    q = np.array([0.9, 0.5, 0.2])
    prefs = demo.Preferences(["ab>"] * 3, enc, enc, np.zeros(3), np.zeros(3), q, 0.7)
    assert prefs.oracle_accuracy == pytest.approx((0.9 + 0.5 + 0.8) / 3)
    assert prefs.inter_rater_agreement == pytest.approx((0.82 + 0.5 + 0.68) / 3)
    tail = prefs.split(1)
    assert tail.prompts == ["ab>"] * 2 and tail.chosen.sequences.shape[0] == 2
    assert tail.oracle_accuracy == pytest.approx((0.5 + 0.8) / 2)
