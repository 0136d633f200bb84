"""Player ratings from pairwise outcomes: Elo and Bradley–Terry maximum likelihood.

A *match* is ``(winner, loser)``, or ``(player_a, player_b, score_a)`` with ``score_a`` in
``[0, 1]`` the outcome for ``player_a`` (1 win, 0 loss, 0.5 tie; a judge's soft label
P(a better than b) is also a valid score). Player ids are any hashable values; results are
``{player_id: rating}`` in order of first appearance.

Both ratings use the Elo scale: a rating difference ``d`` means an expected score of
``1 / (1 + base ** (-d / scale))`` (``base=10``, ``scale=400`` by default, as in chess and in
the LMSYS Chatbot Arena leaderboard).

These run on the host in float64 NumPy: they post-process judge outputs and are not traced.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np


class _Matches(NamedTuple):
    players: list[Hashable]
    first: np.ndarray  # [N] int, index of player_a
    second: np.ndarray  # [N] int, index of player_b
    score: np.ndarray  # [N] float64, outcome for player_a


def _parse_matches(matches: Sequence) -> _Matches:
    """Validates ``matches`` and maps player ids to dense indices."""
    if isinstance(matches, (str, bytes)):
        raise TypeError("matches must be a sequence of (winner, loser) or (a, b, score_a) tuples")
    matches = list(matches)
    if not matches:
        raise ValueError("matches is empty: at least one (winner, loser) pair is needed")
    index: dict[Hashable, int] = {}
    first, second, score = [], [], []
    for i, match in enumerate(matches):
        try:
            fields = tuple(match)
        except TypeError:
            raise TypeError(
                f"matches[{i}] = {match!r} is not a (winner, loser) or (a, b, score_a) tuple"
            ) from None
        if len(fields) == 2:
            a, b = fields
            s = 1.0
        elif len(fields) == 3:
            a, b, s = fields
            try:
                s = float(s)
            except (TypeError, ValueError):
                raise ValueError(f"matches[{i}]: score_a={fields[2]!r} is not a number") from None
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"matches[{i}]: score_a={s} must lie in [0, 1]")
        else:
            raise ValueError(
                f"matches[{i}] has {len(fields)} fields; expected (winner, loser) or "
                "(a, b, score_a)"
            )
        if a == b:
            raise ValueError(f"matches[{i}]: player {a!r} is matched against itself")
        for p in (a, b):
            try:
                if p not in index:
                    index[p] = len(index)
            except TypeError:
                raise TypeError(f"matches[{i}]: player id {p!r} is not hashable") from None
        first.append(index[a])
        second.append(index[b])
        score.append(s)
    return _Matches(
        players=list(index),
        first=np.asarray(first, dtype=np.int64),
        second=np.asarray(second, dtype=np.int64),
        score=np.asarray(score, dtype=np.float64),
    )


def elo_ratings(
    matches: Sequence,
    *,
    k: float = 4.0,
    initial: float = 1000.0,
    scale: float = 400.0,
    base: float = 10.0,
    num_shuffles: int = 100,
    seed: int = 0,
) -> dict[Hashable, float]:
    """Elo ratings, averaged over random orders of the matches.

    Every player starts at ``initial``. For each match (in order) with ratings ``r_a, r_b``
    and outcome ``s_a``:

    .. math::
        e_a = \\frac{1}{1 + base^{(r_b - r_a) / scale}}, \\qquad
        r_a \\leftarrow r_a + k (s_a - e_a), \\qquad r_b \\leftarrow r_b - k (s_a - e_a).

    Sequential Elo depends on the order of the matches; judge comparisons have no natural
    order, so the final ratings are averaged over ``num_shuffles`` random permutations (the
    "bootstrap Elo" of the Chatbot Arena notebook, without resampling). ``num_shuffles=0``
    processes the matches once, in the given order. The total rating is conserved, so the
    mean rating stays ``initial``.

    Args:
      matches: sequence of ``(winner, loser)`` or ``(a, b, score_a)``; see the module docstring.
      k: the K-factor (step size). Small K (4, as in the Chatbot Arena) suits many matches.
      initial: starting rating of every player.
      scale: rating difference for a ``base``-fold change in the odds.
      base: odds base.
      num_shuffles: number of random orders to average over; 0 for the given order only.
      seed: seed of the permutations.

    Returns:
      ``{player_id: rating}`` in order of first appearance.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    if scale <= 0 or base <= 1:
        raise ValueError(f"need scale > 0 and base > 1, got scale={scale}, base={base}")
    if num_shuffles < 0:
        raise ValueError(f"num_shuffles must be >= 0, got {num_shuffles}")
    m = _parse_matches(matches)
    num_matches, num_players = len(m.score), len(m.players)
    if num_shuffles == 0:
        orders = np.arange(num_matches)[None, :]
    else:
        rng = np.random.default_rng(seed)
        orders = np.stack([rng.permutation(num_matches) for _ in range(num_shuffles)])
    num_orders = orders.shape[0]
    rows = np.arange(num_orders)
    ratings = np.full((num_orders, num_players), float(initial), dtype=np.float64)
    first, second, score = m.first[orders], m.second[orders], m.score[orders]  # [S, N]
    for t in range(num_matches):
        a, b = first[:, t], second[:, t]
        ra, rb = ratings[rows, a], ratings[rows, b]
        expected = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        delta = k * (score[:, t] - expected)
        ratings[rows, a] = ra + delta
        ratings[rows, b] = rb - delta
    mean = ratings.mean(axis=0)
    return {p: float(mean[i]) for i, p in enumerate(m.players)}


def _strongly_connected(num_players: int, wins: np.ndarray) -> bool:
    """Whether every player beats (a chain to) every other: Zermelo/Ford's MLE condition."""
    adjacency = wins > 0  # adjacency[i, j]: i scored against j

    def reach(adj: np.ndarray) -> np.ndarray:
        seen = np.zeros(num_players, dtype=bool)
        seen[0] = True
        frontier = [0]
        while frontier:
            i = frontier.pop()
            for j in np.flatnonzero(adj[i] & ~seen):
                seen[j] = True
                frontier.append(int(j))
        return seen

    return bool(reach(adjacency).all() and reach(adjacency.T).all())


def bradley_terry_ratings(
    matches: Sequence,
    *,
    initial: float = 1000.0,
    scale: float = 400.0,
    base: float = 10.0,
    prior: float = 0.01,
    anchor: Hashable | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-10,
) -> dict[Hashable, float]:
    """Bradley–Terry maximum-likelihood ratings on the Elo scale.

    With strengths ``theta`` (natural-log odds units), the model is
    ``P(a beats b) = sigmoid(theta_a - theta_b)``. The fit maximises the (fractional-outcome)
    log-likelihood

    .. math::
        \\ell(\\theta) = \\sum_m s_m \\log\\sigma(\\theta_a - \\theta_b)
            + (1 - s_m) \\log\\sigma(\\theta_b - \\theta_a)
            + \\lambda \\sum_i [\\log\\sigma(\\theta_i) + \\log\\sigma(-\\theta_i)]

    by Newton's method with a backtracking line search. The last term is the prior: every
    player gets ``lambda = prior`` virtual wins and ``prior`` virtual losses against a
    reference player of strength 0. It keeps the estimate finite for undefeated (or winless)
    players and for disconnected comparison graphs, and moves well-determined strengths
    negligibly. With ``prior=0`` the plain MLE is returned, which exists only when the
    "scored against" graph is strongly connected (Zermelo 1929; Ford 1957); otherwise a
    ``ValueError`` is raised.

    Strengths are mapped to ratings as ``initial + scale * theta / ln(base)`` and shifted so
    that the mean rating is ``initial`` (or, with ``anchor`` set, that player's rating is
    ``initial``). A rating difference ``d`` then means ``P(win) = 1 / (1 + base^(-d/scale))``,
    the same scale as :func:`elo_ratings` and the Chatbot Arena's MLE Elo.

    Args:
      matches: sequence of ``(winner, loser)`` or ``(a, b, score_a)``; see the module docstring.
      initial: the mean rating (or the anchor player's rating).
      scale: rating difference for a ``base``-fold change in the odds.
      base: odds base.
      prior: number of virtual wins and of virtual losses per player against strength 0.
      anchor: optional player id whose rating is fixed at ``initial``.
      max_iterations: Newton iterations before giving up (with a warning).
      tolerance: stop when the largest strength update is below this.

    Returns:
      ``{player_id: rating}`` in order of first appearance.

    References:
      Bradley & Terry, "Rank analysis of incomplete block designs" (1952);
      Hunter, "MM algorithms for generalized Bradley–Terry models" (2004);
      Chiang et al., "Chatbot Arena" (2024).
    """
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    if scale <= 0 or base <= 1:
        raise ValueError(f"need scale > 0 and base > 1, got scale={scale}, base={base}")
    m = _parse_matches(matches)
    n = len(m.players)
    if anchor is not None and anchor not in m.players:
        raise ValueError(f"anchor={anchor!r} is not a player in matches")
    # wins[i, j]: total score of i against j; games[i, j]: number of games between them.
    wins = np.zeros((n, n), dtype=np.float64)
    np.add.at(wins, (m.first, m.second), m.score)
    np.add.at(wins, (m.second, m.first), 1.0 - m.score)
    games = wins + wins.T
    if prior == 0 and n > 1 and not _strongly_connected(n, wins):
        raise ValueError(
            "the Bradley-Terry MLE does not exist for these matches: some player is undefeated, "
            "winless, or the comparison graph is not strongly connected; set prior > 0"
        )
    total_wins = wins.sum(axis=1)

    def log_likelihood(theta: np.ndarray) -> float:
        diff = theta[:, None] - theta[None, :]
        ll = np.sum(wins * -np.logaddexp(0.0, -diff))
        ll += prior * np.sum(-np.logaddexp(0.0, -theta) - np.logaddexp(0.0, theta))
        return float(ll)

    theta = np.zeros(n, dtype=np.float64)
    current = log_likelihood(theta)
    converged = False
    for _ in range(max_iterations):
        sig = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # [n, n]
        sig_self = 1.0 / (1.0 + np.exp(-theta))
        grad = total_wins - np.sum(games * sig, axis=1) + prior * (1.0 - 2.0 * sig_self)
        curvature = games * sig * (1.0 - sig)
        hessian = curvature - np.diag(curvature.sum(axis=1) + 2.0 * prior * sig_self * (1 - sig_self))
        # Newton step; lstsq handles the gauge null space (constant shift) when prior == 0.
        step = np.linalg.lstsq(-hessian, grad, rcond=None)[0]
        if prior == 0:
            step -= step.mean()
        size = 1.0
        while size > 1e-12:
            candidate = theta + size * step
            value = log_likelihood(candidate)
            if value >= current - 1e-12 * abs(current):
                break
            size *= 0.5
        theta, current = candidate, value
        if np.max(np.abs(size * step)) < tolerance:
            converged = True
            break
    if not converged:
        warnings.warn(
            f"bradley_terry_ratings: Newton did not reach tolerance={tolerance} in "
            f"{max_iterations} iterations; ratings may be inaccurate",
            RuntimeWarning,
            stacklevel=2,
        )
    ratings = scale * theta / math.log(base)
    shift = ratings[m.players.index(anchor)] if anchor is not None else ratings.mean()
    ratings = initial + ratings - shift
    return {p: float(ratings[i]) for i, p in enumerate(m.players)}
