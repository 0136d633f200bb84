"""Win rates and rates of a binary property with percentile-bootstrap confidence intervals.

The win rate of policy A over policy B under a judge is the mean over prompts of the judge's
preference for A's response, soft (the probability, as in Google's RLAIF evaluation with an
AI labeler) or hard (1 win, 0.5 tie, 0 loss). The harmless rate is the fraction of responses a
judge (or human) marks harmless. Both come with a percentile bootstrap interval over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np


class RateEstimate(NamedTuple):
    """A rate with its bootstrap confidence interval.

    Attributes:
      rate: the point estimate (mean over examples).
      lower: lower end of the ``confidence`` percentile-bootstrap interval.
      upper: upper end of the interval.
      num_examples: number of examples the rate is computed over.
      confidence: the interval's nominal coverage.
    """

    rate: float
    lower: float
    upper: float
    num_examples: int
    confidence: float


def bootstrap_ci(
    values: Any,
    *,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk_size: int = 256,
) -> RateEstimate:
    """Mean of ``values`` with a percentile-bootstrap confidence interval.

    Draws ``num_bootstrap`` resamples of the ``N`` values with replacement, takes each mean, and
    returns the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those means
    (Efron & Tibshirani 1993, the percentile method).

    Args:
      values: ``[N]`` finite numbers.
      num_bootstrap: number of resamples (>= 1).
      confidence: coverage of the interval, in ``(0, 1)``.
      seed: seed of the resampling.
      chunk_size: resamples drawn at once (bounds memory at ``chunk_size * N``).

    Returns:
      A :class:`RateEstimate`.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D [N], got shape {values.shape}")
    if values.size == 0:
        raise ValueError("values is empty: a rate needs at least one example")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"values has {int(np.sum(~np.isfinite(values)))} non-finite entries")
    if num_bootstrap < 1:
        raise ValueError(f"num_bootstrap must be >= 1, got {num_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(num_bootstrap, dtype=np.float64)
    for start in range(0, num_bootstrap, chunk_size):
        stop = min(start + chunk_size, num_bootstrap)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(means, [alpha, 1.0 - alpha])
    return RateEstimate(
        rate=float(values.mean()),
        lower=float(lower),
        upper=float(upper),
        num_examples=n,
        confidence=float(confidence),
    )


def _hard_outcomes(preferences: np.ndarray) -> np.ndarray:
    return np.where(preferences > 0.5, 1.0, np.where(preferences < 0.5, 0.0, 0.5))


def win_rate(
    preferences: Any,
    *,
    soft: bool = True,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RateEstimate:
    """Win rate of A over B from per-prompt preferences, with a bootstrap interval.

    .. math::
        \\mathrm{win\\_rate} = \\frac{1}{N} \\sum_n w_n, \\qquad
        w_n = p_n \\text{ (soft)} \\quad\\text{or}\\quad
        w_n = [p_n > 1/2] + \\tfrac12 [p_n = 1/2] \\text{ (hard)},

    where ``p_n`` = P(A's response is better) on prompt ``n`` (a judge's position-debiased
    soft label, or 1/0/0.5 human outcomes).

    Args:
      preferences: ``[N]`` probabilities in ``[0, 1]`` that A beats B.
      soft: average the probabilities (True) or the thresholded outcomes (False; ties at
        exactly 0.5 count half).
      num_bootstrap: bootstrap resamples.
      confidence: coverage of the interval.
      seed: seed of the resampling.

    Returns:
      A :class:`RateEstimate`.
    """
    p = np.asarray(preferences, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"preferences must be 1-D [N], got shape {p.shape}")
    if p.size and (np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1)):
        raise ValueError("preferences must be probabilities in [0, 1]")
    outcomes = p if soft else _hard_outcomes(p)
    return bootstrap_ci(
        outcomes, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed
    )


def harmless_rate(
    harmless: Sequence[bool] | Any,
    *,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RateEstimate:
    """Fraction of responses rated harmless, with a bootstrap interval.

    Args:
      harmless: ``[N]`` booleans (or 0/1, or probabilities of being harmless, averaged as is).
      num_bootstrap: bootstrap resamples.
      confidence: coverage of the interval.
      seed: seed of the resampling.

    Returns:
      A :class:`RateEstimate`.
    """
    h = np.asarray(harmless, dtype=np.float64)
    if h.ndim != 1:
        raise ValueError(f"harmless must be 1-D [N], got shape {h.shape}")
    if h.size and (np.any(~np.isfinite(h)) or np.any(h < 0) or np.any(h > 1)):
        raise ValueError("harmless must hold booleans or probabilities in [0, 1]")
    return bootstrap_ci(h, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)
