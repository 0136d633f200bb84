"""`PromptLoader`: prompt batches for the online trainers from an in-memory prompt set
(e.g. a synthetic task's prompts, or prompts tokenized by hand), deterministic and resumable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class PromptLoader:
    """Deterministic, resumable iterator of prompt batches from an in-memory prompt set.

    Each epoch is a permutation of the rows drawn from ``seed`` and the epoch number; a partial
    last batch is dropped. ``get_state()`` / ``set_state()`` (the epoch and position) make a
    resumed run draw exactly the batches of an uninterrupted one.

    Args:
      data: ``{"prompt_ids": [M, P], "prompt_mask": [M, P], ...task fields [M, ...]}`` with
        left-padded prompts.
      batch_size: prompts per batch.
      seed: shuffling seed.
      shuffle: shuffle every epoch (else the stored order).
    """

    def __init__(self, data: Mapping[str, Any], *, batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        self.data = {k: np.asarray(v) for k, v in data.items()}
        for key in ("prompt_ids", "prompt_mask"):
            if key not in self.data:
                raise ValueError(f"prompt data is missing {key!r}; has {sorted(self.data)}")
        self.size = self.data["prompt_ids"].shape[0]
        if not 1 <= batch_size <= self.size:
            raise ValueError(f"batch_size={batch_size} must be in [1, {self.size}] (prompt count)")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position + self.batch_size > self.size:
            self.epoch += 1
            self.position = 0
        rows = self._order()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return {k: v[rows] for k, v in self.data.items()}

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


__all__ = ["PromptLoader"]
