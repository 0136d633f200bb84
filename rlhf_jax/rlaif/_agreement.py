"""Agreement between labelers: AI-labeler alignment, Cohen's kappa, Fleiss' kappa.

Host-side float64 NumPy; these summarise labels and are never traced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np


class Alignment(NamedTuple):
    """Agreement of AI preferences with human preferences.

    Attributes:
      alignment: fraction of compared examples on which the AI prefers the human's choice
        (an AI tie at exactly 0.5 counts half).
      num_compared: examples compared.
      num_skipped: examples skipped because the human label is a tie (0.5) or missing (NaN).
    """

    alignment: float
    num_compared: int
    num_skipped: int


def labeler_alignment(ai_preferences: Any, human_labels: Any) -> Alignment:
    """AI labeler alignment with human preferences (Lee et al. 2023, "RLAIF", section 3.1).

    The soft AI preference ``p`` = P(response 1 better) is first made binary (``p > 0.5`` means
    response 1), then scored 1 if it matches the human's choice and 0 otherwise; the alignment is
    the mean score. Human ties (0.5) and missing labels (NaN) are skipped and counted.

    Args:
      ai_preferences: ``[N]`` probabilities that response 1 is better.
      human_labels: ``[N]`` human outcomes: 1 (response 1 better), 0 (response 2 better), 0.5
        (tie) or NaN (no human label).

    Returns:
      An :class:`Alignment`.
    """
    ai = np.asarray(ai_preferences, dtype=np.float64)
    human = np.asarray(human_labels, dtype=np.float64)
    if ai.ndim != 1 or ai.shape != human.shape:
        raise ValueError(
            f"ai_preferences {ai.shape} and human_labels {human.shape} must be equal 1-D shapes"
        )
    if np.any(~np.isfinite(ai)) or np.any((ai < 0) | (ai > 1)):
        raise ValueError("ai_preferences must be probabilities in [0, 1]")
    known = ~np.isnan(human)
    bad = known & ~np.isin(human, (0.0, 0.5, 1.0))
    if np.any(bad):
        raise ValueError(
            f"human_labels must be 0, 0.5, 1 or NaN; got {human[bad][:5].tolist()} "
            f"at indices {np.flatnonzero(bad)[:5].tolist()}"
        )
    compared = known & (human != 0.5)
    num_compared = int(compared.sum())
    if num_compared == 0:
        raise ValueError("no example has a non-tie human label to compare with")
    ai_hard = np.where(ai > 0.5, 1.0, np.where(ai < 0.5, 0.0, 0.5))
    score = np.where(ai_hard == 0.5, 0.5, (ai_hard == human).astype(np.float64))
    return Alignment(
        alignment=float(score[compared].mean()),
        num_compared=num_compared,
        num_skipped=int(ai.size - num_compared),
    )


def cohens_kappa(
    labels_a: Sequence | Any,
    labels_b: Sequence | Any,
    *,
    categories: Sequence | None = None,
    weights: str | None = None,
) -> float:
    """Cohen's kappa between two raters (Cohen 1960; weighted, Cohen 1968).

    .. math::
        \\kappa = 1 - \\frac{\\sum_{ij} w_{ij} O_{ij}}{\\sum_{ij} w_{ij} E_{ij}},

    with ``O`` the observed joint distribution of the two raters' labels, ``E`` the product of
    its marginals, and ``w_ij = [i != j]`` (unweighted, where this equals
    ``(p_o - p_e) / (1 - p_e)``), ``|i - j|`` (``"linear"``) or ``(i - j)^2`` (``"quadratic"``),
    indices taken in the order of ``categories``. Matches ``sklearn.metrics.cohen_kappa_score``.

    Args:
      labels_a: ``[N]`` labels of rater A (any hashable values).
      labels_b: ``[N]`` labels of rater B.
      categories: the ordered category list; defaults to the sorted union of the labels.
      weights: None, ``"linear"`` or ``"quadratic"``.

    Returns:
      The kappa, or NaN when the expected disagreement is zero (both raters constant and equal).
    """
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b):
        raise ValueError(f"labels_a has {len(a)} labels but labels_b has {len(b)}")
    if not a:
        raise ValueError("labels are empty")
    if categories is None:
        categories = sorted(set(a) | set(b))
    categories = list(categories)
    index = {c: i for i, c in enumerate(categories)}
    for name, labels in (("labels_a", a), ("labels_b", b)):
        unknown = [x for x in labels if x not in index]
        if unknown:
            raise ValueError(f"{name} has labels {unknown[:5]} not in categories {categories}")
    k = len(categories)
    observed = np.zeros((k, k), dtype=np.float64)
    np.add.at(observed, ([index[x] for x in a], [index[x] for x in b]), 1.0)
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    i, j = np.indices((k, k))
    if weights is None:
        w = (i != j).astype(np.float64)
    elif weights == "linear":
        w = np.abs(i - j).astype(np.float64)
    elif weights == "quadratic":
        w = ((i - j) ** 2).astype(np.float64)
    else:
        raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
    denominator = np.sum(w * expected)
    if denominator == 0:
        return float("nan")
    return float(1.0 - np.sum(w * observed) / denominator)


def rating_table(labels: Any, *, categories: Sequence | None = None) -> np.ndarray:
    """Counts of raters per category for each item, the input of :func:`fleiss_kappa`.

    Args:
      labels: ``[N, R]`` the label each of ``R`` raters gave each of ``N`` items.
      categories: the category list; defaults to the sorted distinct labels.

    Returns:
      ``[N, C]`` int64 counts; ``table[n, c]`` raters put item ``n`` in ``categories[c]``.
    """
    labels = np.asarray(labels, dtype=object)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [N items, R raters], got shape {labels.shape}")
    if categories is None:
        categories = sorted(set(labels.ravel().tolist()))
    index = {c: i for i, c in enumerate(categories)}
    table = np.zeros((labels.shape[0], len(index)), dtype=np.int64)
    for n, row in enumerate(labels):
        for x in row:
            if x not in index:
                raise ValueError(f"labels[{n}] has {x!r}, not in categories {list(categories)}")
            table[n, index[x]] += 1
    return table


def fleiss_kappa(table: Any) -> float:
    """Fleiss' kappa for several raters (Fleiss 1971).

    With ``n`` raters per item, ``N`` items and counts ``n_ic``:

    .. math::
        P_i = \\frac{\\sum_c n_{ic}^2 - n}{n (n - 1)}, \\quad
        p_c = \\frac{\\sum_i n_{ic}}{N n}, \\quad
        \\kappa = \\frac{\\bar P - \\sum_c p_c^2}{1 - \\sum_c p_c^2}.

    Matches ``statsmodels.stats.inter_rater.fleiss_kappa(table, method="fleiss")``.

    Args:
      table: ``[N, C]`` non-negative integer counts with the same row sum ``n >= 2``
        (see :func:`rating_table`).

    Returns:
      The kappa, or NaN when all ratings fall in one category (chance agreement is 1).
    """
    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"table must be [N items, C categories] with N >= 1, got {t.shape}")
    if np.any(t < 0) or np.any(t != np.round(t)):
        raise ValueError("table must hold non-negative integer counts")
    raters = t.sum(axis=1)
    if np.any(raters != raters[0]):
        raise ValueError(
            f"every item needs the same number of ratings; row sums are {sorted(set(raters))}"
        )
    n = raters[0]
    if n < 2:
        raise ValueError(f"Fleiss' kappa needs at least 2 ratings per item, got {int(n)}")
    p_item = (np.sum(t * t, axis=1) - n) / (n * (n - 1))
    p_cat = t.sum(axis=0) / (t.shape[0] * n)
    p_e = np.sum(p_cat**2)
    if p_e == 1.0:
        return float("nan")
    return float((p_item.mean() - p_e) / (1.0 - p_e))
