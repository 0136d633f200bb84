"""Consensus of several labelers' soft preferences (several judges, or one judge under several
principles, as Constitutional AI ensembles over principles).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CONSENSUS_METHODS = ("mean", "majority", "logit_mean")


def consensus(
    preferences: Any,
    *,
    method: str = "mean",
    weights: Sequence[float] | None = None,
    eps: float = 1e-6,
) -> np.ndarray:
    """Combines ``J`` labelers' preferences P(response 1 better) into one soft label per pair.

    .. math::
        \\text{mean:}\\ \\ p = \\sum_j w_j p_j, \\qquad
        \\text{majority:}\\ \\ p = \\sum_j w_j \\big([p_j > \\tfrac12] +
            \\tfrac12 [p_j = \\tfrac12]\\big), \\qquad
        \\text{logit\\_mean:}\\ \\ p = \\sigma\\Big(\\sum_j w_j \\operatorname{logit} p_j\\Big)

    with weights normalised to sum to 1 (uniform by default). ``mean`` is the average of
    normalised probabilities that Bai et al. (2022, sec. 4.1) use over principles; ``majority``
    is the weighted vote share; ``logit_mean`` pools in log-odds (a product of experts), with
    ``p_j`` clipped to ``[eps, 1 - eps]``.

    Args:
      preferences: ``[J, N]`` probabilities in ``[0, 1]``.
      method: one of ``"mean"``, ``"majority"``, ``"logit_mean"``.
      weights: ``[J]`` non-negative labeler weights (not all zero).
      eps: clipping for ``logit_mean``.

    Returns:
      ``[N]`` float64 consensus P(response 1 better).
    """
    p = np.asarray(preferences, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"preferences must be [J labelers, N pairs] with J >= 1, got {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("preferences must be probabilities in [0, 1]")
    if weights is None:
        w = np.full(p.shape[0], 1.0 / p.shape[0])
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (p.shape[0],) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(
                f"weights must be {p.shape[0]} non-negative numbers, not all zero; got {weights}"
            )
        w = w / w.sum()
    if method == "mean":
        return w @ p
    if method == "majority":
        votes = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
        return w @ votes
    if method == "logit_mean":
        q = np.clip(p, eps, 1.0 - eps)
        return 1.0 / (1.0 + np.exp(-(w @ (np.log(q) - np.log1p(-q)))))
    raise ValueError(f"method must be one of {CONSENSUS_METHODS}, got {method!r}")
