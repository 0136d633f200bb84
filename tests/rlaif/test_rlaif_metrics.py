"""Win rates, bootstrap intervals, labeler alignment, Cohen's and Fleiss' kappa."""

import math

import numpy as np
import pytest

from rlhf_jax.rlaif import (
    bootstrap_ci,
    cohens_kappa,
    fleiss_kappa,
    harmless_rate,
    labeler_alignment,
    rating_table,
    win_rate,
)


class TestWinRate:
    def test_soft_and_hard_by_hand(self):
        p = [0.9, 0.4, 0.5, 0.7]
        assert win_rate(p).rate == pytest.approx((0.9 + 0.4 + 0.5 + 0.7) / 4)
        # Hard: win, loss, tie (half), win.
        assert win_rate(p, soft=False).rate == pytest.approx((1 + 0 + 0.5 + 1) / 4)

    def test_interval_matches_normal_approximation(self):
        rng = np.random.default_rng(0)
        outcomes = (rng.random(400) < 0.7).astype(float)
        est = win_rate(outcomes, num_bootstrap=2000, seed=1)
        mean = outcomes.mean()
        half = 1.959964 * math.sqrt(mean * (1 - mean) / outcomes.size)
        assert est.lower < est.rate < est.upper
        assert est.lower == pytest.approx(mean - half, abs=0.01)
        assert est.upper == pytest.approx(mean + half, abs=0.01)
        assert est.num_examples == 400 and est.confidence == 0.95

    def test_constant_values_give_a_point_interval(self):
        est = win_rate([1.0] * 10)
        assert (est.rate, est.lower, est.upper) == (1.0, 1.0, 1.0)

    def test_wider_confidence_gives_wider_interval(self):
        x = np.random.default_rng(2).random(100)
        narrow = bootstrap_ci(x, confidence=0.5)
        wide = bootstrap_ci(x, confidence=0.99)
        assert wide.lower < narrow.lower < narrow.upper < wide.upper

    def test_seeded(self):
        x = np.random.default_rng(3).random(50)
        assert bootstrap_ci(x, seed=4) == bootstrap_ci(x, seed=4)
        assert bootstrap_ci(x, seed=4, chunk_size=7).rate == bootstrap_ci(x, seed=4).rate

    def test_harmless_rate(self):
        est = harmless_rate([True, False, True, True])
        assert est.rate == 0.75 and est.lower <= 0.75 <= est.upper

    @pytest.mark.parametrize(
        "values, message",
        [([], "empty"), ([[0.5]], "1-D"), ([1.2], r"\[0, 1\]"), ([float("nan")], r"\[0, 1\]")],
    )
    def test_bad_input(self, values, message):
        with pytest.raises(ValueError, match=message):
            win_rate(values)

    def test_bad_confidence(self):
        with pytest.raises(ValueError, match="confidence"):
            bootstrap_ci([0.1, 0.2], confidence=1.0)


class TestLabelerAlignment:
    def test_by_hand(self):
        ai = [0.9, 0.2, 0.5, 0.7, 0.1]
        human = [1, 1, 0, 0.5, float("nan")]
        # Compared: agree (1), disagree (0), AI tie (1/2); skipped: human tie and missing.
        out = labeler_alignment(ai, human)
        assert out.alignment == pytest.approx(0.5)
        assert (out.num_compared, out.num_skipped) == (3, 2)

    def test_bad_labels(self):
        with pytest.raises(ValueError, match="human_labels must be 0, 0.5, 1"):
            labeler_alignment([0.5, 0.5], [1, 2])
        with pytest.raises(ValueError, match="no example"):
            labeler_alignment([0.5], [0.5])
        with pytest.raises(ValueError, match="equal 1-D shapes"):
            labeler_alignment([0.5, 0.1], [1])


def _kappa_reference(a, b):
    """Unweighted kappa as (p_o - p_e) / (1 - p_e) in float64."""
    a, b = np.asarray(a), np.asarray(b)
    cats = np.union1d(a, b)
    p_o = np.mean(a == b)
    p_e = sum(np.mean(a == c) * np.mean(b == c) for c in cats)
    return (p_o - p_e) / (1 - p_e)


class TestCohensKappa:
    def test_by_hand_two_by_two(self):
        # 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5.
        a = ["y"] * 25 + ["n"] * 25
        b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
        assert cohens_kappa(a, b) == pytest.approx(0.4, abs=1e-12)

    def test_weighted_by_hand(self):
        # O has mass 1/3 at (0,0), (1,2), (2,2); worked out: linear 2/3, quadratic 4/5.
        a, b = [0, 1, 2], [0, 2, 2]
        assert cohens_kappa(a, b, weights="linear") == pytest.approx(2 / 3, abs=1e-12)
        assert cohens_kappa(a, b, weights="quadratic") == pytest.approx(0.8, abs=1e-12)

    def test_matches_reference(self):
        rng = np.random.default_rng(0)
        a = rng.integers(0, 4, 200)
        b = np.where(rng.random(200) < 0.6, a, rng.integers(0, 4, 200))
        assert cohens_kappa(a.tolist(), b.tolist()) == pytest.approx(_kappa_reference(a, b))

    def test_perfect_and_degenerate(self):
        assert cohens_kappa([1, 2, 1], [1, 2, 1]) == pytest.approx(1.0)
        assert math.isnan(cohens_kappa([1, 1], [1, 1]))

    def test_bad_input(self):
        with pytest.raises(ValueError, match="has 2 labels but labels_b has 1"):
            cohens_kappa([1, 2], [1])
        with pytest.raises(ValueError, match="not in categories"):
            cohens_kappa([1, 3], [1, 2], categories=[1, 2])
        with pytest.raises(ValueError, match="weights"):
            cohens_kappa([1, 2], [1, 2], weights="cubic")


class TestFleissKappa:
    def test_published_example(self):
        # Fleiss' kappa worked example (14 raters, 10 items, 5 categories): kappa = 0.210.
        table = [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
        assert fleiss_kappa(table) == pytest.approx(0.2099, abs=1e-4)

    def test_small_cases_by_hand(self):
        # Full agreement: P_bar = 1, P_e = 1/2 -> 1. Full split: P_bar = 0 -> -1.
        assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)
        assert fleiss_kappa([[1, 1], [1, 1]]) == pytest.approx(-1.0)
        assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))

    def test_two_raters_close_to_cohen(self):
        # With two raters, Fleiss' kappa is Scott's pi: equal to Cohen's kappa when both raters
        # have the same marginals.
        a = [0, 0, 1, 1, 2, 2, 0, 1]
        b = [0, 1, 1, 0, 2, 2, 0, 1]
        table = rating_table(np.stack([a, b], axis=1))
        assert fleiss_kappa(table) == pytest.approx(cohens_kappa(a, b), abs=1e-12)

    def test_rating_table(self):
        table = rating_table([["x", "y", "x"], ["y", "y", "y"]])
        np.testing.assert_array_equal(table, [[2, 1], [0, 3]])
        with pytest.raises(ValueError, match="not in categories"):
            rating_table([["x", "z"]], categories=["x", "y"])

    def test_bad_input(self):
        with pytest.raises(ValueError, match="same number of ratings"):
            fleiss_kappa([[2, 0], [1, 0]])
        with pytest.raises(ValueError, match="at least 2 ratings"):
            fleiss_kappa([[1, 0], [0, 1]])
        with pytest.raises(ValueError, match="integer counts"):
            fleiss_kappa([[1.5, 0.5]])
