"""Preference-strength ratings -> reward-model margins (Llama 2's margin loss).

Llama 2's annotators say how much better the chosen response is: "significantly better",
"better", "slightly better" or "negligibly better / unsure" (Touvron et al. 2023, sec. 3.2.1).
The reward model's ranking loss subtracts a margin ``m(r)``, a discrete function of that rating,
inside the sigmoid (sec. 3.2.2, eq. 2): ``-log σ(r_c - r_r - m(r))``. The paper gives two
scales (appendix A.3.3, Table 27; ablated in Table 28):

==================  ======================  ========  ================  ==========================
scale               significantly better    better    slightly better   negligibly better / unsure
==================  ======================  ========  ================  ==========================
``llama2_small``    1                       2/3       1/3               0
``llama2_large``    3                       2         1                 0
==================  ======================  ========  ================  ==========================

`RatingMargins` reads a record's rating field and looks the rating up in such a table (or in a
user's own table). Ratings are matched case-insensitively, with ``_`` and ``-`` read as spaces
and runs of whitespace collapsed; integer ratings are looked up by their decimal string (so a
table can map ``"3"`` for data that codes ratings as numbers). A missing field or an unknown
rating is a `RecordError` naming the record's origin (file and line), the field and the known
ratings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from rlhf_jax.data._records import RecordError

RATING_SCALES: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "llama2_small": MappingProxyType({
        "significantly better": 1.0,
        "better": 2.0 / 3.0,
        "slightly better": 1.0 / 3.0,
        "negligibly better / unsure": 0.0,
        "negligibly better": 0.0,
        "unsure": 0.0,
    }),
    "llama2_large": MappingProxyType({
        "significantly better": 3.0,
        "better": 2.0,
        "slightly better": 1.0,
        "negligibly better / unsure": 0.0,
        "negligibly better": 0.0,
        "unsure": 0.0,
    }),
})
"""Named rating -> margin scales: Llama 2's Table 27 (the combined "negligibly better / unsure"
rating is also accepted as either half)."""


def normalize_rating(rating: str) -> str:
    """The form ratings are compared in: lower case, ``_``/``-`` as spaces, single spaces."""
    return " ".join(rating.lower().replace("_", " ").replace("-", " ").split())


@dataclasses.dataclass(frozen=True)
class RatingMargins:
    """Maps the rating in a record's `field` to a margin.

    Attributes:
      field: the record field holding the rating.
      table: rating -> margin (keys are normalised with `normalize_rating`).
    """

    field: str
    table: Mapping[str, float]

    def __post_init__(self):
        if not isinstance(self.field, str) or not self.field:
            raise ValueError(f"RatingMargins.field must be a non-empty string, got {self.field!r}")
        if not self.table:
            raise ValueError("RatingMargins.table is empty: it needs at least one rating")
        table: dict[str, float] = {}
        for key, value in self.table.items():
            if not isinstance(key, str) or not normalize_rating(key):
                raise ValueError(f"rating {key!r} must be a non-empty string")
            margin = float(value)
            if not np.isfinite(margin):
                raise ValueError(f"the margin of rating {key!r} must be finite, got {value!r}")
            name = normalize_rating(key)
            if name in table and table[name] != margin:
                raise ValueError(f"ratings {key!r} and another spelling of {name!r} map to "
                                 f"different margins ({table[name]} and {margin})")
            table[name] = margin
        object.__setattr__(self, "table", MappingProxyType(table))

    @classmethod
    def from_scale(
        cls, field: str, *, scale: str = "llama2_small", table: Mapping[str, float] | None = None
    ) -> RatingMargins:
        """The named `scale` (a key of `RATING_SCALES`), or `table` when it is non-empty."""
        if table:
            return cls(field, dict(table))
        if scale not in RATING_SCALES:
            raise ValueError(f"unknown rating scale {scale!r}; allowed: {sorted(RATING_SCALES)}")
        return cls(field, dict(RATING_SCALES[scale]))

    def margin(self, record: Mapping[str, Any], origin: str) -> float:
        """The margin of `record`'s rating.

        Raises:
          RecordError: ``missing_field`` when the field is absent or null, ``bad_type`` when it is
            neither a string nor an integer, ``bad_value`` for a rating not in the table.
        """
        value = record.get(self.field)
        if value is None:
            raise RecordError(origin, "missing_field",
                              f"missing rating field {self.field!r} (fields present: "
                              f"{sorted(record)})")
        if isinstance(value, np.integer):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise RecordError(origin, "bad_type", f"field {self.field!r} must hold a rating "
                                                  f"string, got {value!r}")
        name = normalize_rating(str(value))
        if name not in self.table:
            raise RecordError(origin, "bad_value",
                              f"field {self.field!r} has rating {value!r}, which is not one of "
                              f"the known ratings {sorted(self.table)}")
        return self.table[name]


__all__ = ["RATING_SCALES", "RatingMargins", "normalize_rating"]
