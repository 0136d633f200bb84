"""Elo and Bradley–Terry ratings."""

import math

import numpy as np
import pytest

from rlhf_jax.rlaif import bradley_terry_ratings, elo_ratings


def _reference_elo(matches, order, *, k, initial, scale=400.0, base=10.0):
    """Sequential Elo in plain Python floats for one order of the matches."""
    ratings = {}
    for i in order:
        m = matches[i]
        a, b, s = (m[0], m[1], 1.0) if len(m) == 2 else m
        ra, rb = ratings.setdefault(a, initial), ratings.setdefault(b, initial)
        e = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        ratings[a] = ra + k * (s - e)
        ratings[b] = rb - k * (s - e)
    return ratings


def _simulate(strengths, num_games, seed):
    """Random pairings; outcomes from P(i beats j) = sigmoid(s_i - s_j)."""
    rng = np.random.default_rng(seed)
    n = len(strengths)
    matches = []
    for _ in range(num_games):
        i, j = rng.choice(n, size=2, replace=False)
        p = 1.0 / (1.0 + math.exp(-(strengths[i] - strengths[j])))
        matches.append((f"p{i}", f"p{j}") if rng.random() < p else (f"p{j}", f"p{i}"))
    return matches


class TestEloRatings:
    def test_single_match_by_hand(self):
        # Equal ratings: expected score 1/2, so the winner gains k/2 and the loser loses k/2.
        r = elo_ratings([("a", "b")], k=32, initial=1000, num_shuffles=0)
        assert r == {"a": 1016.0, "b": 984.0}

    def test_two_matches_by_hand(self):
        # After a beats b: 1016 / 984. Then b beats a: e_b = 1 / (1 + 10^(32/400)).
        r = elo_ratings([("a", "b"), ("b", "a")], k=32, initial=1000, num_shuffles=0)
        e_b = 1.0 / (1.0 + 10 ** (32 / 400))
        assert r["b"] == pytest.approx(984 + 32 * (1 - e_b), abs=1e-12)
        assert r["a"] == pytest.approx(1016 - 32 * (1 - e_b), abs=1e-12)

    def test_given_order_matches_reference(self):
        matches = _simulate([0.0, 1.0, 2.0], 40, seed=1)
        r = elo_ratings(matches, k=16, initial=1200, num_shuffles=0)
        ref = _reference_elo(matches, range(len(matches)), k=16, initial=1200)
        for p in ref:
            assert r[p] == pytest.approx(ref[p], abs=1e-9)

    def test_shuffle_average_matches_reference(self):
        matches = _simulate([0.0, 0.5, 1.5, 3.0], 30, seed=2)
        num_shuffles, seed = 7, 3
        r = elo_ratings(matches, k=8, num_shuffles=num_shuffles, seed=seed)
        rng = np.random.default_rng(seed)
        refs = [
            _reference_elo(matches, rng.permutation(len(matches)), k=8, initial=1000)
            for _ in range(num_shuffles)
        ]
        for p in r:
            assert r[p] == pytest.approx(np.mean([ref[p] for ref in refs]), abs=1e-9)

    def test_soft_outcomes_and_ties(self):
        # A tie between equals moves nothing; a soft 0.75 moves k/4.
        assert elo_ratings([("a", "b", 0.5)], num_shuffles=0) == {"a": 1000.0, "b": 1000.0}
        r = elo_ratings([("a", "b", 0.75)], k=8, num_shuffles=0)
        assert r == {"a": 1002.0, "b": 998.0}

    def test_recovers_ordering_and_conserves_mean(self):
        strengths = [-1.5, -0.5, 0.0, 0.7, 1.6]
        matches = _simulate(strengths, 2000, seed=0)
        r = elo_ratings(matches, k=4, num_shuffles=20, seed=0)
        order = sorted(r, key=r.get)
        assert order == [f"p{i}" for i in range(len(strengths))]
        assert np.mean(list(r.values())) == pytest.approx(1000.0, abs=1e-9)

    def test_order_robustness(self):
        matches = [("a", "b")] * 10 + [("b", "a")] * 10
        # In the given order the later wins of b leave b ahead; averaged over shuffles the
        # two players are close.
        r0 = elo_ratings(matches, k=32, num_shuffles=0)
        r = elo_ratings(matches, k=32, num_shuffles=200, seed=0)
        assert r0["b"] - r0["a"] > 100
        assert abs(r["b"] - r["a"]) < 0.25 * (r0["b"] - r0["a"])

    def test_seed_determinism(self):
        matches = _simulate([0.0, 1.0, 2.0], 50, seed=5)
        assert elo_ratings(matches, seed=3) == elo_ratings(matches, seed=3)

    @pytest.mark.parametrize(
        "matches, message",
        [
            ([], "empty"),
            ([("a", "a")], "against itself"),
            ([("a", "b", 1.5)], r"\[0, 1\]"),
            ([("a",)], "has 1 fields"),
            ([("a", "b", "x")], "not a number"),
            ([1], "matches\\[0\\]"),
        ],
    )
    def test_bad_matches(self, matches, message):
        with pytest.raises((ValueError, TypeError), match=message):
            elo_ratings(matches)

    def test_bad_hyperparameters(self):
        with pytest.raises(ValueError, match="k must be"):
            elo_ratings([("a", "b")], k=0)
        with pytest.raises(ValueError, match="num_shuffles"):
            elo_ratings([("a", "b")], num_shuffles=-1)


def _bt_mle_reference(matches, players, *, prior):
    """Gradient ascent on the same objective in float64 (independent of the Newton solver)."""
    idx = {p: i for i, p in enumerate(players)}
    n = len(players)
    a = np.array([idx[m[0]] for m in matches])
    b = np.array([idx[m[1]] for m in matches])
    s = np.array([1.0 if len(m) == 2 else m[2] for m in matches])
    theta = np.zeros(n)
    for _ in range(20000):
        p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
        g = np.zeros(n)
        np.add.at(g, a, s - p)
        np.add.at(g, b, -(s - p))
        g += prior * (1.0 - 2.0 / (1.0 + np.exp(-theta)))
        theta += 0.05 * g
    return theta


class TestBradleyTerryRatings:
    def test_two_players_closed_form(self):
        # Without a prior, the MLE of P(a beats b) is the win fraction 3/4, so the Elo-scale gap
        # is 400 * log10(3) and the mean stays at 1000.
        matches = [("a", "b")] * 3 + [("b", "a")]
        r = bradley_terry_ratings(matches, prior=0.0)
        gap = 400 * math.log10(3)
        assert r["a"] == pytest.approx(1000 + gap / 2, abs=1e-6)
        assert r["b"] == pytest.approx(1000 - gap / 2, abs=1e-6)

    def test_matches_gradient_ascent_reference(self):
        matches = _simulate([0.0, 0.8, -0.6, 1.5], 120, seed=7)
        matches += [("p0", "p1", 0.3), ("p2", "p3", 0.9)]
        r = bradley_terry_ratings(matches, prior=0.5, scale=1.0, base=math.e, initial=0.0)
        players = list(r)
        theta = _bt_mle_reference(matches, players, prior=0.5)
        theta -= theta.mean()
        np.testing.assert_allclose([r[p] for p in players], theta, atol=1e-6)

    def test_recovers_strengths(self):
        strengths = np.array([-1.2, -0.4, 0.0, 0.5, 1.1])
        matches = _simulate(strengths, 4000, seed=11)
        r = bradley_terry_ratings(matches, scale=1.0, base=math.e, initial=0.0)
        est = np.array([r[f"p{i}"] for i in range(len(strengths))])
        assert list(np.argsort(est)) == list(range(len(strengths)))
        np.testing.assert_allclose(est, strengths - strengths.mean(), atol=0.15)

    def test_undefeated_player_is_finite_with_prior(self):
        matches = [("a", "b"), ("a", "c"), ("b", "c"), ("c", "b")]
        r = bradley_terry_ratings(matches)
        assert all(math.isfinite(v) for v in r.values())
        assert r["a"] > r["b"] and r["a"] > r["c"]
        with pytest.raises(ValueError, match="MLE does not exist"):
            bradley_terry_ratings(matches, prior=0.0)

    def test_anchor(self):
        matches = _simulate([0.0, 1.0, 2.0], 200, seed=3)
        r = bradley_terry_ratings(matches, anchor="p1", initial=1114.0)
        free = bradley_terry_ratings(matches)
        assert r["p1"] == pytest.approx(1114.0)
        assert r["p2"] - r["p0"] == pytest.approx(free["p2"] - free["p0"], abs=1e-8)
        with pytest.raises(ValueError, match="anchor"):
            bradley_terry_ratings(matches, anchor="nobody")

    def test_elo_scale_consistency(self):
        # The fitted gap reproduces the empirical win probability on the Elo scale.
        matches = [("a", "b")] * 9 + [("b", "a")]
        r = bradley_terry_ratings(matches, prior=0.0)
        p = 1.0 / (1.0 + 10 ** (-(r["a"] - r["b"]) / 400))
        assert p == pytest.approx(0.9, abs=1e-9)

    def test_bad_input(self):
        with pytest.raises(ValueError, match="empty"):
            bradley_terry_ratings([])
        with pytest.raises(ValueError, match="prior"):
            bradley_terry_ratings([("a", "b")], prior=-1)
