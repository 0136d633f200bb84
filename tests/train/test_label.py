"""The labelling library behind `rlhf-jax label`: consensus over judges and principles, the
agreement report against human and gold labels, position debiasing and skip counting, with
crafted judges whose preferences are computed exactly in float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from feedback_models import CraftedJudgeLM, char_score, compact_template, sigmoid

from rlhf_jax.data import PreferenceExample
from rlhf_jax.rlaif import PairwiseJudge
from rlhf_jax.train.feedback_io import FeedbackInput, SkipLog, load_input
from rlhf_jax.train.judging import (
    JudgeTemplateSpec,
    SingleOrderJudge,
    agreement,
    build_template,
    judge_overflow,
)
from rlhf_jax.train.label import PairSet, label_pair_set, make_labelers

TASTE_A = {"a": 1.0, "b": 0.5, "c": -1.0}
TASTE_B = {"a": -0.5, "b": 1.0, "c": 0.25}
PROMPTS = ["ab>", "cc>", "ba>", "ac>", "bb>", "ca>"]
R1 = ["aab", "c", "bbb", "ca", "abc", "x"]
R2 = ["c", "aa", "ab", "ac", "cba", "y"]
HUMAN = np.array([1.0, 0.0, 0.5, np.nan, 1.0, 0.0])


def _judge(taste, slot_bias=0.0, **kwargs):
    return PairwiseJudge(CraftedJudgeLM(taste, slot_bias=slot_bias), _tok(),
                         template=kwargs.pop("template", compact_template()), batch_size=8,
                         **kwargs)


def _tok():
    from rlhf_jax.data.synthetic import build_tokenizer

    return build_tokenizer()


def _expected(taste, slot_bias, r1=R1, r2=R2):
    """(debiased, forward, reverse) preferences in float64."""
    s1 = np.array([char_score(x, taste) for x in r1])
    s2 = np.array([char_score(x, taste) for x in r2])
    forward = sigmoid(s1 + slot_bias - s2)
    reverse = sigmoid(s2 + slot_bias - s1)
    return 0.5 * (forward + 1.0 - reverse), forward, reverse


def _pairs(human=HUMAN, gold=None):
    return PairSet(list(PROMPTS), list(R1), list(R2), [f"p.jsonl:{i + 1}" for i in range(6)],
                   human, gold)


def _kappa(a, b, cats):
    """Cohen's kappa from its definition, float64."""
    idx = {c: i for i, c in enumerate(cats)}
    o = np.zeros((len(cats), len(cats)))
    for x, y in zip(a, b):
        o[idx[x], idx[y]] += 1
    o /= o.sum()
    pe = o.sum(1) @ o.sum(0)
    return (np.trace(o) - pe) / (1 - pe)


class TestAgreement:
    def test_hand_worked(self):
        out = agreement([0.9, 0.2, 0.5, 0.7], [1.0, 1.0, 0.0, 0.5])
        # compared: pairs 0-2 (pair 3's reference is a tie); AI tie counts half
        assert out["num_compared"] == 3 and out["num_skipped"] == 1
        assert out["alignment"] == pytest.approx((1 + 0 + 0.5) / 3)
        # AI: r1, r2, tie; reference: r1, r1, r2. p_o = 1/3; p_e = 1/3*2/3 + 1/3*1/3 = 1/3 -> 0
        assert out["cohens_kappa"] == pytest.approx(0.0, abs=1e-12)

    def test_perfect_and_none(self):
        assert agreement([0.8, 0.1], [1.0, 0.0])["cohens_kappa"] == pytest.approx(1.0)
        assert agreement([0.8, 0.1], [0.5, np.nan]) is None


class TestLabelPairSet:
    @pytest.mark.parametrize("method", ["mean", "majority", "logit_mean"])
    def test_consensus_over_judges_and_agreement(self, method):
        judges = [_judge(TASTE_A, 0.7), _judge(TASTE_B, -0.3)]
        labelers = make_labelers(judges, ["big", "small"], [])
        gold = np.array([1.0, 1.0, 0.0, 0.0, 0.5, 1.0])
        result = label_pair_set(labelers, _pairs(gold=gold), consensus=method,
                                weights=[3.0, 1.0])
        pa, fa, ra = _expected(TASTE_A, 0.7)
        pb, _, _ = _expected(TASTE_B, -0.3)
        np.testing.assert_allclose(result.outputs[0].preference, pa, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.outputs[0].forward, fa, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.outputs[0].reverse, ra, rtol=1e-5, atol=1e-6)
        w = np.array([0.75, 0.25])
        if method == "mean":
            expected = w[0] * pa + w[1] * pb
        elif method == "majority":
            vote = lambda p: np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))  # noqa: E731
            expected = w[0] * vote(pa) + w[1] * vote(pb)
        else:
            logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
            expected = sigmoid(w[0] * logit(pa) + w[1] * logit(pb))
        np.testing.assert_allclose(result.labelled.preference, expected, rtol=1e-5, atol=1e-6)

        # pair 5 ("x" vs "y") scores 0 under both tastes: an exact tie, identical-weight pair
        report = result.report
        human = report["human"]["consensus"]
        compared = ~np.isnan(HUMAN) & (HUMAN != 0.5)
        ai = np.where(expected > 0.5, 1.0, np.where(expected < 0.5, 0.0, 0.5))[compared]
        ref = HUMAN[compared]
        assert human["num_compared"] == int(compared.sum())
        assert human["alignment"] == pytest.approx(
            np.mean(np.where(ai == 0.5, 0.5, (ai == ref).astype(float))))
        names = {1.0: "r1", 0.0: "r2", 0.5: "tie"}
        kappa = _kappa([names[x] for x in ai], [names[x] for x in ref], ["r1", "r2", "tie"])
        if np.isfinite(kappa):
            assert human["cohens_kappa"] == pytest.approx(kappa)
        big = report["human"]["labelers"]["big"]
        ai_big = np.where(pa > 0.5, 1.0, np.where(pa < 0.5, 0.0, 0.5))[compared]
        assert big["alignment"] == pytest.approx(
            np.mean(np.where(ai_big == 0.5, 0.5, (ai_big == ref).astype(float))))
        gold_report = report["gold"]["consensus"]
        assert gold_report["num_compared"] == 5  # pair 4's gold is a tie
        assert report["fleiss_kappa"] is not None
        assert set(report["position"]) == {"big", "small"}
        assert report["position"]["big"]["mean_bias"] == pytest.approx(
            np.mean(0.5 * (fa + ra) - 0.5), abs=1e-6)

    def test_principles_are_labelers_and_records_follow_consensus(self):
        template = compact_template(preamble="{principle}")
        judge = _judge(TASTE_A, 0.0, template=template)
        labelers = make_labelers([judge, judge], ["j", "j"], ["be brief", "be kind"])
        assert [lab.name for lab in labelers] == ["j | be brief", "j | be kind",
                                                 "j#2 | be brief", "j#2 | be kind"]
        result = label_pair_set(labelers, _pairs(), hard=False)
        # a principle outside the crafted segments does not change this judge's scores
        pa, _, _ = _expected(TASTE_A, 0.0)
        np.testing.assert_allclose(result.labelled.per_labeler, np.tile(pa, (4, 1)), rtol=1e-5,
                                   atol=1e-6)
        for record in result.labelled.records:
            i = PROMPTS.index(record["prompt"])
            first = pa[i] >= 0.5
            assert record["chosen"] == (R1[i] if first else R2[i])
            assert record["label"] == pytest.approx(max(pa[i], 1 - pa[i]), rel=1e-5)
        with pytest.raises(ValueError, match=r"needs? a judge template with a \{principle\}"):
            make_labelers([_judge(TASTE_A)], ["j"], ["be brief"])

    def test_single_order_judge_keeps_the_given_order(self):
        judge = SingleOrderJudge(_judge(TASTE_A, 2.0))
        result = label_pair_set(make_labelers([judge], ["j"], []), _pairs())
        _, forward, reverse = _expected(TASTE_A, 2.0)
        np.testing.assert_allclose(result.labelled.preference, forward, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.outputs[0].reverse, reverse, rtol=1e-5, atol=1e-6)
        flips = np.sign(forward - 0.5) != np.sign(0.5 - reverse)
        assert result.report["position"]["j"]["order_disagreement"] == pytest.approx(
            flips.mean())

    def test_skip_counting(self):
        prompts = ["a>", "b>", "c>", "d>", "e>"]
        r1 = ["aaa", "ab", "aa", "a", "c"]
        r2 = ["c", "ab", "", "b", "ccc"]
        pairs = PairSet(prompts, r1, r2, [f"f:{i}" for i in range(5)], None, None)
        judge = _judge({"a": 1.0, "b": 0.95, "c": -1.0})
        result = label_pair_set(make_labelers([judge], ["j"], []), pairs, min_confidence=0.6)
        # pair 1 identical, pair 2 empty, pair 3 ("a" vs "b") confidence sigmoid(0.05) < 0.6
        assert result.status == ["record", "identical_responses", "empty_response",
                                 "low_confidence", "record"]
        assert result.labelled.report.skipped == {"identical_responses": 1,
                                                  "empty_response": 1, "low_confidence": 1}
        assert [r["prompt"] for r in result.labelled.records] == ["a>", "e>"]
        assert result.report["human"] is None and result.report["gold"] is None

    def test_judge_overflow(self):
        judge = _judge(TASTE_A, max_length=16)
        problems = judge_overflow(judge, ["a>", "a>"], ["ab", "a" * 12], ["c", "b"])
        assert problems[0] is None
        assert "more than the judge's max_length=16" in problems[1]
        cot = _judge(TASTE_A, max_length=28, rationale_tokens=20,
                     template=compact_template(cot_prompt="?"))
        problems = judge_overflow(cot, ["a>"], ["ab"], ["c"])
        # 10 prompt tokens ("a>", markers, "ab", "c", "?", "=") plus 20 rationale tokens > 28
        assert "10 tokens plus 20 rationale tokens" in problems[0]


class TestTemplates:
    def test_presets_cot_and_exemplars(self, tmp_path):
        path = tmp_path / "shots.jsonl"
        path.write_text('{"prompt": "p", "response_1": "x", "response_2": "y", "preferred": 2, '
                        '"rationale": "y is better"}\n'
                        '{"prompt": "q", "response_1": "u", "response_2": "v", "preferred": 1}\n')
        t = build_template(JudgeTemplateSpec(chain_of_thought=True, exemplars=str(path),
                                             num_exemplars=1))
        assert t.cot_prompt is not None and len(t.exemplars) == 1
        context = t.render_context(prompt="P", response_1="A", response_2="B")
        assert "y is better" in context and "Preferred Response=2" in context
        c = build_template(JudgeTemplateSpec(preset="constitutional", chain_of_thought=True))
        assert c.uses_principle and c.answer_tokens == ("A", "B") and c.cot_prompt
        with pytest.raises(ValueError, match="chain_of_thought is false"):
            build_template(JudgeTemplateSpec(cot_prompt="why?"))
        with pytest.raises(ValueError, match="judge.template: .*missing required"):
            build_template(JudgeTemplateSpec(query="{prompt} only"))

    def test_bad_exemplar_file_names_line(self, tmp_path):
        path = tmp_path / "shots.jsonl"
        path.write_text('{"prompt": "p", "response_1": "x", "response_2": "y", "preferred": 3}\n')
        with pytest.raises(ValueError, match=r"shots\.jsonl:1: field 'preferred' must be 1 or 2"):
            build_template(JudgeTemplateSpec(exemplars=str(path)))


class TestInput:
    def test_conversation_records_are_counted_or_raise(self, tmp_path):
        path = tmp_path / "p.jsonl"
        path.write_text('{"prompt": "ab>"}\n'
                        '{"prompt": [{"role": "user", "content": "hi"}]}\n'
                        '{"nope": 1}\n')
        skips = SkipLog("skip")
        data = load_input(FeedbackInput(path=str(path), on_error="skip"), skips=skips, seed=0)
        assert [ex.prompt for ex in data.examples] == ["ab>"] and data.num_read == 3
        assert skips.by_stage() == {"input": {"conversation": 1, "missing_field": 1}}
        with pytest.raises(ValueError, match=r"p\.jsonl:3: missing field 'prompt'"):
            load_input(FeedbackInput(path=str(path)), skips=SkipLog("raise"), seed=0)
        path.write_text('{"prompt": "ab>"}\n{"prompt": [{"role": "user", "content": "hi"}]}\n')
        with pytest.raises(ValueError, match=r"p\.jsonl:2: conversation"):
            load_input(FeedbackInput(path=str(path)), skips=SkipLog("raise"), seed=0)

    def test_synthetic_pairs_keep_their_labels(self):
        data = load_input(FeedbackInput(synthetic="topic", format="preference", num_examples=5),
                          skips=SkipLog("raise"), seed=3)
        assert len(data.examples) == 5 and data.task is not None
        assert all(isinstance(ex, PreferenceExample) for ex in data.examples)
        with pytest.raises(ValueError, match="this command reads"):
            load_input(FeedbackInput(synthetic="topic", format="preference"),
                       skips=SkipLog("raise"), seed=0, formats=("prompt",))
