"""Labelling pipelines, consensus, win rates and tournaments, with the crafted stand-in LM."""

import json

import numpy as np
import pytest
from conftest import char_score, sigmoid

from rlhf_jax.data import parse_record
from rlhf_jax.rlaif import (
    PairwiseJudge,
    bradley_terry_ratings,
    consensus,
    elo_ratings,
    judge_win_rate,
    label_preferences,
    preference_records,
    tournament,
    win_rate,
)

WEIGHTS = {"c": 1.0, "d": -0.5, "e": 2.0, "f": 0.25, "g": -1.5}
PROMPTS = ["xyz>", "q>", "kk>", "lm>", "n>", "op>"]
RESP_1 = ["c", "cc", "d", "ee", "fg", "same"]
RESP_2 = ["d", "e", "e", "", "g", "same"]


def _pref(a, b, *, bias=0.0):
    """Debiased crafted-judge label: (sigmoid(d + bias) + 1 - sigmoid(-d + bias)) / 2."""
    d = char_score(a, WEIGHTS) - char_score(b, WEIGHTS)
    return 0.5 * (sigmoid(d + bias) + 1.0 - sigmoid(-d + bias))


class TestConsensus:
    P = np.array([[0.9, 0.2], [0.6, 0.4], [0.3, 0.5]])

    def test_methods_by_hand(self):
        np.testing.assert_allclose(consensus(self.P), [0.6, 1.1 / 3], atol=1e-12)
        np.testing.assert_allclose(consensus(self.P, method="majority"), [2 / 3, 0.5 / 3])
        logit = np.log(self.P / (1 - self.P)).mean(0)
        np.testing.assert_allclose(consensus(self.P, method="logit_mean"), sigmoid(logit))
        np.testing.assert_allclose(
            consensus(self.P, weights=[2, 1, 1]), [(1.8 + 0.6 + 0.3) / 4, (0.4 + 0.4 + 0.5) / 4]
        )

    def test_bad_input(self):
        with pytest.raises(ValueError, match="method must be one of"):
            consensus(self.P, method="vote")
        with pytest.raises(ValueError, match="weights must be 3"):
            consensus(self.P, weights=[1, 1])
        with pytest.raises(ValueError, match=r"\[J labelers, N pairs\]"):
            consensus([0.5, 0.5])
        with pytest.raises(ValueError, match="probabilities"):
            consensus([[1.5]])


class TestPreferenceRecords:
    def test_records_and_skips(self):
        p = np.array([0.8, 0.3, 0.5, 0.9, 0.55, 0.7])
        records, skipped = preference_records(PROMPTS, RESP_1, RESP_2, p, min_confidence=0.6)
        # Pair 3 has an empty response, pair 5 identical responses, pairs 2 and 4 low confidence.
        assert skipped == {"empty_response": 1, "identical_responses": 1, "low_confidence": 2}
        assert records == [
            {"prompt": "xyz>", "chosen": "c", "rejected": "d", "label": 0.8},
            {"prompt": "q>", "chosen": "e", "rejected": "cc", "label": pytest.approx(0.7)},
        ]
        hard, _ = preference_records(PROMPTS, RESP_1, RESP_2, p, hard=True)
        assert [r["label"] for r in hard] == [1.0, 1.0, 1.0, 1.0]
        for i, record in enumerate(records):
            example = parse_record(record, format="preference", origin=f"r:{i}")
            assert example.label == record["label"] and example.chosen == record["chosen"]

    def test_bad_input(self):
        with pytest.raises(ValueError, match="shape"):
            preference_records(PROMPTS, RESP_1, RESP_2, [0.5])
        with pytest.raises(ValueError, match="min_confidence"):
            preference_records(PROMPTS, RESP_1, RESP_2, np.full(6, 0.5), min_confidence=0.2)


class TestLabelPreferences:
    def test_single_judge_soft_labels_and_jsonl(
        self, tmp_path, tokenizer, make_crafted, judge_template
    ):
        judge = PairwiseJudge(make_crafted(WEIGHTS, slot_bias=0.7), tokenizer,
                              template=judge_template, batch_size=8)
        path = tmp_path / "out" / "prefs.jsonl"
        human = np.array([1, 0, 0, np.nan, 1, 0.5])
        out = label_preferences(judge, PROMPTS, RESP_1, RESP_2, path=path, human_labels=human)
        expected = np.array([_pref(a, b, bias=0.7) for a, b in zip(RESP_1, RESP_2)])
        np.testing.assert_allclose(out.preference, expected, atol=1e-6)
        assert out.per_labeler.shape == (1, 6)
        rep = out.report
        assert (rep.num_pairs, rep.num_records, rep.num_labelers) == (6, 4, 1)
        assert rep.skipped == {"empty_response": 1, "identical_responses": 1}
        assert rep.labeler_kappa is None
        # AI prefers: pair 0 -> 1 (c > d), pair 1 tie (cc = e, counts 1/2), pair 2 -> 2 (e > d),
        # pair 4 -> 1 (fg > g); the human agrees on 0, 2, 4: alignment 3.5 / 4, 2 skipped.
        assert rep.alignment.alignment == pytest.approx(0.875)
        assert (rep.alignment.num_compared, rep.alignment.num_skipped) == (4, 2)
        lines = path.read_text().splitlines()
        assert [json.loads(x) for x in lines] == out.records
        for i, line in enumerate(lines):
            example = parse_record(json.loads(line), format="preference", origin=f"{path}:{i + 1}")
            assert 0.5 <= example.label <= 1.0
        first = out.records[0]
        assert (first["chosen"], first["rejected"]) == ("c", "d")
        assert first["label"] == pytest.approx(_pref("c", "d", bias=0.7), abs=1e-6)

    def test_judges_times_principles_consensus_and_kappa(
        self, tokenizer, make_crafted, principle_template
    ):
        # Judge B has the opposite taste of judge A: for every pair the four labelers split
        # 2-2, so the mean consensus is exactly 1/2 and Fleiss' kappa is
        # (P_bar - P_e) / (1 - P_e) = (1/3 - 1/2) / (1/2) = -1/3.
        opposite = {k: -v for k, v in WEIGHTS.items()}
        judge_a = PairwiseJudge(make_crafted(WEIGHTS), tokenizer, template=principle_template)
        judge_b = PairwiseJudge(make_crafted(opposite), tokenizer, template=principle_template)
        prompts, r1, r2 = PROMPTS[:3], ["c", "c", "d"], ["d", "e", "e"]
        out = label_preferences(
            [judge_a, judge_b], prompts, r1, r2, principles=["be kind", "be honest"],
            min_confidence=0.55,
        )
        assert out.per_labeler.shape == (4, 3)
        np.testing.assert_allclose(out.per_labeler[0], out.per_labeler[1])
        np.testing.assert_allclose(out.per_labeler[0] + out.per_labeler[2], 1.0, atol=1e-6)
        np.testing.assert_allclose(out.preference, 0.5, atol=1e-6)
        assert out.report.labeler_kappa == pytest.approx(-1 / 3, abs=1e-9)
        assert out.report.skipped == {"low_confidence": 3} and out.records == []
        # Weighting judge A alone recovers its labels.
        weighted = label_preferences(
            [judge_a, judge_b], prompts, r1, r2, principles=["be kind", "be honest"],
            weights=[1, 1, 0, 0],
        )
        np.testing.assert_allclose(weighted.preference, out.per_labeler[0], atol=1e-6)

    def test_empty_judges(self):
        with pytest.raises(ValueError, match="judges is empty"):
            label_preferences([], PROMPTS, RESP_1, RESP_2)


class TestWinRateAndTournament:
    PLAYERS = {"worst": "ddd", "low": "f", "mid": "c", "best": "e"}

    def test_judge_win_rate(self, tokenizer, make_crafted, judge_template):
        judge = PairwiseJudge(make_crafted(WEIGHTS), tokenizer, template=judge_template)
        a, b = RESP_1[:3], RESP_2[:3]
        est = judge_win_rate(judge, PROMPTS[:3], a, b, num_bootstrap=200)
        expected = [_pref(x, y) for x, y in zip(a, b)]
        assert est.rate == pytest.approx(np.mean(expected), abs=1e-6)
        assert est == win_rate(judge(PROMPTS[:3], a, b), num_bootstrap=200)

    def test_tournament_recovers_order(self, tokenizer, make_crafted, judge_template):
        judge = PairwiseJudge(make_crafted(WEIGHTS), tokenizer, template=judge_template)
        prompts = ["p>", "q>", "r>", "s>"]
        responses = {name: [text] * len(prompts) for name, text in self.PLAYERS.items()}
        matches = tournament(judge, prompts, responses)
        assert len(matches) == 6 * len(prompts)
        for a, b, p in matches:
            assert p == pytest.approx(_pref(self.PLAYERS[a], self.PLAYERS[b]), abs=1e-6)
        order = ["worst", "low", "mid", "best"]
        bt = bradley_terry_ratings(matches)
        assert sorted(bt, key=bt.get) == order
        elo = elo_ratings(matches, k=16)
        assert sorted(elo, key=elo.get) == order
        # BT recovers the crafted judge's logit gaps (natural-log scale).
        bt_nat = bradley_terry_ratings(matches, scale=1.0, base=np.e, initial=0.0, prior=0.0)
        gap = char_score("e", WEIGHTS) - char_score("ddd", WEIGHTS)
        assert bt_nat["best"] - bt_nat["worst"] == pytest.approx(gap, abs=1e-4)

    def test_tournament_bad_input(self, tokenizer, make_crafted, judge_template):
        judge = PairwiseJudge(make_crafted(WEIGHTS), tokenizer, template=judge_template)
        with pytest.raises(ValueError, match="at least two players"):
            tournament(judge, ["p"], {"a": ["x"]})
        with pytest.raises(ValueError, match="player 'b' has 2 responses for 1 prompts"):
            tournament(judge, ["p"], {"a": ["x"], "b": ["y", "z"]})
