"""A deterministic, per-host sharded, checkpointable batch loader over grain.

The example stream is a `grain.MapDataset`: the tokenized examples, shuffled with a per-epoch
permutation derived from `seed` (grain's `shuffle` reseeds every epoch), repeated for
`num_epochs` (None: forever), and split between hosts by taking every `shard_count`-th element
starting at `shard_index` (default: `jax.process_index()` of `jax.process_count()`). Because the
stream is shuffled globally before it is strided, no example is dropped at epoch boundaries and
every host sees the same number of examples per `shard_count` consecutive elements.

The loader reads the stream through each epoch's order of example indices (grain's permutation
for that epoch, `_epoch_order`), computed once per epoch and kept, rather than element by
element through grain's dataset chain: the same elements, and grain's permutation of a small
dataset costs up to a millisecond or two an index (about 35 ms an epoch whatever its size),
which `read_indices` would otherwise pay again. The order itself comes from
`rlhf_jax.data._shuffle.shuffle_permutation`, grain's permutation computed with NumPy for the
whole epoch at once (2-5 ms an epoch up to 40,000 examples).

Batches are built from consecutive elements of a host's stream: `batch_size` examples per
padded batch, or as many as first-fit packing can place (`BatchConfig.packing`). The loader's
state is the position of the next unread element, so `get_state()` -> `set_state()` continues
with exactly the same batches. The state is a small JSON-serialisable dict, meant to be saved
with the model in the run's orbax checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np

from rlhf_jax.data._collate import (
    DEFAULT_LENGTH_BUCKETS,
    collate_kto,
    collate_preference,
    collate_prompts,
    collate_ranking,
    collate_sft,
    first_fit,
    pack_preference,
    pack_sft,
)
from rlhf_jax.data._examples import (
    TokenizedKTO,
    TokenizedPreference,
    TokenizedPrompt,
    TokenizedRanking,
    TokenizedSFT,
)
from rlhf_jax.data._records import Format, LoadReport, OnError, log_report
from rlhf_jax.data._shuffle import shuffle_permutation
from rlhf_jax.data._sources import SourceType, load_examples
from rlhf_jax.data._tokenize import TokenizeConfig, tokenize_examples

logger = logging.getLogger("rlhf_jax.data")

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Batch shape.

    Attributes:
      batch_size: examples per padded batch on this host (a global batch of `G` examples over
        `H` hosts is `batch_size = G // H`); rows `R` of a packed batch.
      length_buckets: allowed sequence lengths `T` (the smallest that fits is used), or None for
        the batch's longest row.
      length: a fixed `T` (overrides `length_buckets`); required for packing (the row length).
      packing: pack several sequences per row (SFT and preference examples only).
      max_pairs: pairs per packed preference batch (default `2 * batch_size`).
      num_responses: `K` for ranking batches (default: the largest K in each batch).
      kl_pairs: add KTO's mismatched ``kl_`` pairs to KTO batches.
      drop_remainder: drop a final incomplete padded batch of a finite stream (logged with its
        size); otherwise it is returned with fewer rows.
      prefix_sharing: preference and ranking examples: one row per example with the prompt
        once (`collate_prefix_shared`, `collate_ranking`); not with packing.
    """

    batch_size: int
    length_buckets: tuple[int, ...] | None = DEFAULT_LENGTH_BUCKETS
    length: int | None = None
    packing: bool = False
    max_pairs: int | None = None
    num_responses: int | None = None
    kl_pairs: bool = True
    drop_remainder: bool = True
    prefix_sharing: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.packing and self.length is None:
            raise ValueError("packing needs a fixed row length: set BatchConfig.length")
        if self.packing and self.prefix_sharing:
            raise ValueError("packing and prefix_sharing are two different preference row "
                             "layouts; choose one")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1, got {self.max_pairs}")


def _kind(example) -> str:
    for cls, kind in (
        (TokenizedSFT, "sft"),
        (TokenizedPreference, "preference"),
        (TokenizedRanking, "ranking"),
        (TokenizedKTO, "kto"),
        (TokenizedPrompt, "prompt"),
    ):
        if isinstance(example, cls):
            return kind
    raise TypeError(f"not a tokenized example: {type(example).__name__}")


def make_collate_fn(kind: str, config: BatchConfig, *, pad_id: int) -> Callable[[list], dict]:
    """The padded-batch collate function for examples of `kind` (``"sft"``, ``"preference"``,
    ``"ranking"``, ``"kto"``, ``"prompt"``)."""
    common = dict(pad_id=pad_id, length_buckets=config.length_buckets, length=config.length)
    if kind == "sft":
        return lambda xs: collate_sft(xs, **common)
    if kind == "preference":
        return lambda xs: collate_preference(xs, prefix_sharing=config.prefix_sharing,
                                             **common)
    if kind == "ranking":
        return lambda xs: collate_ranking(xs, num_responses=config.num_responses,
                                          prefix_sharing=config.prefix_sharing, **common)
    if kind == "kto":
        return lambda xs: collate_kto(xs, kl_pairs=config.kl_pairs, **common)
    if kind == "prompt":
        return lambda xs: collate_prompts(xs, **common)
    raise ValueError(f"unknown example kind {kind!r}")


class DataLoader:
    """Iterator of NumPy batch dicts; deterministic for a seed, sharded, resumable.

    Args:
      examples: tokenized examples (`Tokenized*`, all of one kind).
      batch_config: batch shape (`BatchConfig`).
      pad_id: the tokenizer's pad token id.
      seed: shuffling seed (epoch `e` uses grain's permutation for `seed + e`).
      shuffle: shuffle each epoch (otherwise dataset order).
      num_epochs: passes over the data; None repeats forever.
      shard_index, shard_count: this host's slice of the stream; default
        `jax.process_index()`, `jax.process_count()`. A `grain.sharding.ShardOptions` (e.g.
        `grain.sharding.ShardByJaxProcess()`) may be given as `shard_options` instead.

    Example::

      loader = DataLoader(tokenized, batch_config=BatchConfig(batch_size=8), pad_id=0, seed=1)
      batch = next(loader)
      state = loader.get_state()   # save with the checkpoint
      ...
      loader.set_state(state)      # continues with the same next batch
    """

    def __init__(
        self,
        examples: Sequence,
        *,
        batch_config: BatchConfig,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
        shard_options: Any = None,
    ):
        if len(examples) == 0:
            raise ValueError("DataLoader needs at least one example")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        if shard_options is not None:
            shard_index, shard_count = shard_options.shard_index, shard_options.shard_count
        if shard_index is None or shard_count is None:
            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
        self.kind = _kind(examples[0])
        for i, e in enumerate(examples):
            if _kind(e) != self.kind:
                raise TypeError(f"example {i} ({e.origin}) is {_kind(e)}, not {self.kind}")
        if batch_config.packing and self.kind not in ("sft", "preference"):
            raise ValueError(f"packing supports 'sft' and 'preference' examples, not {self.kind!r}")
        if batch_config.prefix_sharing and self.kind not in ("preference", "ranking"):
            raise ValueError("prefix_sharing supports 'preference' and 'ranking' examples, not "
                             f"{self.kind!r}")
        self.batch_config = batch_config
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_epochs = num_epochs
        self.shard_index = int(shard_index)
        self.shard_count = int(shard_count)
        self.num_examples = len(examples)
        self._examples = list(examples)
        ds = grain.MapDataset.source(self._examples)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed)
        ds = ds.repeat(num_epochs)
        self._length = len(ds[self.shard_index :: self.shard_count])
        self._orders: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._position = 0
        self._collate = make_collate_fn(self.kind, batch_config, pad_id=self.pad_id)

    # -- state ---------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": self.num_examples,
            "shard_index": self.shard_index,
            "shard_count": self.shard_count,
        }

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: the next stream position plus what it is valid for."""
        return {"version": STATE_VERSION, "position": self._position, **self._identity()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state from `get_state`; the next batch is the one that followed it.

        Raises:
          ValueError: if the state was saved by a loader with a different seed, shuffling,
            dataset size or shard.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown loader state version {state.get('version')!r}")
        mismatched = {
            k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v
        }
        if mismatched:
            raise ValueError(
                "loader state does not match this loader (saved, current): "
                + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in mismatched.items())
            )
        position = int(state["position"])
        if not 0 <= position <= self._length:
            raise ValueError(f"loader state position {position} out of range [0, {self._length}]")
        self._position = position

    @property
    def position(self) -> int:
        """Elements of this host's stream consumed so far."""
        return self._position

    def read_indices(self) -> np.ndarray:
        """`[position]` int64: the index into `examples` of each element this host has read so
        far, in reading order (the same shuffle, repeat and stride as the stream)."""
        g = self.shard_index + np.arange(self._position, dtype=np.int64) * self.shard_count
        epochs, within = np.divmod(g, self.num_examples)
        out = np.empty(self._position, np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            out[rows] = self._epoch_order(int(epoch))[within[rows]]
        return out

    _ORDER_CACHE_ENTRIES = 1 << 22
    """Example indices kept over all cached epoch orders (older epochs are recomputed)."""

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """`[num_examples]` int64: the example index at each position of pass `epoch` over the
        data: grain's `shuffle` permutation of that epoch (seed `seed + epoch`, as the repeated
        shuffled dataset reseeds; computed for the whole epoch at once by
        `shuffle_permutation`), or the identity without shuffling; kept for later reads."""
        order = self._orders.get(epoch)
        if order is not None:
            self._orders.move_to_end(epoch)
            return order
        n = self.num_examples
        if self.shuffle:
            order = shuffle_permutation(n, (self.seed + epoch) % 2**32)
        else:
            order = np.arange(n, dtype=np.int64)
        self._orders[epoch] = order
        while len(self._orders) > max(1, self._ORDER_CACHE_ENTRIES // n):
            self._orders.popitem(last=False)
        return order

    @property
    def epoch(self) -> float:
        """Passes over the dataset so far (on this host's share of the stream)."""
        return self._position * self.shard_count / self.num_examples

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self):
        return self

    def _get(self, i: int):
        """The `i`-th unread element of this host's stream."""
        epoch, within = divmod(self.shard_index + (self._position + i) * self.shard_count,
                               self.num_examples)
        return self._examples[int(self._epoch_order(epoch)[within])]

    def _remaining(self) -> int:
        return self._length - self._position

    def __next__(self) -> dict[str, np.ndarray]:
        if self._remaining() <= 0:
            raise StopIteration
        cfg = self.batch_config
        if not cfg.packing:
            n = min(cfg.batch_size, self._remaining())
            if n < cfg.batch_size and cfg.drop_remainder:
                logger.info("dropping a final incomplete batch of %d examples", n)
                self._position = self._length
                raise StopIteration
            batch = self._collate([self._get(i) for i in range(n)])
            self._position += n
            return batch
        if self.kind == "sft":
            return self._next_packed_sft()
        return self._next_packed_preference()

    def _check_fits(self, ex, length: int) -> None:
        if length > self.batch_config.length:
            raise ValueError(
                f"{ex.origin}: sequence of {length} tokens does not fit a packed row of "
                f"{self.batch_config.length} tokens; truncate it (TokenizeConfig.max_length)"
            )

    def _next_packed_sft(self) -> dict[str, np.ndarray]:
        cfg = self.batch_config
        rows, t = cfg.batch_size, cfg.length
        taken: list = []
        while len(taken) < self._remaining():
            ex = self._get(len(taken))
            self._check_fits(ex, len(ex.input_ids))
            lengths = [len(e.input_ids) for e in taken] + [len(ex.input_ids)]
            if first_fit(lengths, num_rows=rows, row_length=t)[2] < len(lengths):
                break
            taken.append(ex)
        batch = pack_sft(taken, num_rows=rows, row_length=t, pad_id=self.pad_id)
        self._position += len(taken)
        return batch

    def _next_packed_preference(self) -> dict[str, np.ndarray]:
        cfg = self.batch_config
        rows, t = cfg.batch_size, cfg.length
        max_pairs = cfg.max_pairs or 2 * rows
        taken: list = []
        lengths: list[int] = []
        while len(taken) < min(max_pairs, self._remaining()):
            ex = self._get(len(taken))
            c = len(ex.prompt_ids) + len(ex.chosen_ids)
            r = len(ex.prompt_ids) + len(ex.rejected_ids)
            self._check_fits(ex, max(c, r))
            if first_fit(lengths + [c, r], num_rows=rows, row_length=t)[2] < len(lengths) + 2:
                break
            taken.append(ex)
            lengths += [c, r]
        batch = pack_preference(
            taken, num_rows=rows, row_length=t, max_pairs=max_pairs, pad_id=self.pad_id
        )
        self._position += len(taken)
        return batch


def _pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (TRL's convention), else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def make_loader(
    source: Any,
    *,
    format: Format,
    tokenizer,
    batch_config: BatchConfig,
    tokenize_config: TokenizeConfig | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    on_error: OnError = "raise",
    source_type: SourceType | None = None,
    split: str | None = "train",
    data_dir: str | os.PathLike | None = None,
) -> tuple[DataLoader, LoadReport]:
    """Source -> validated examples -> tokens -> `DataLoader`, with one combined `LoadReport`.

    See `load_examples` for `source`, `format`, `on_error`, `source_type`, `split`, `data_dir`,
    `tokenize_examples` for `tokenize_config`, and `DataLoader` for the rest.
    """
    examples, report = load_examples(
        source,
        format=format,
        on_error=on_error,
        source_type=source_type,
        split=split,
        data_dir=data_dir,
        log=False,
    )
    tokenized, tok_report = tokenize_examples(
        examples,
        tokenizer,
        config=tokenize_config or TokenizeConfig(),
        on_error=on_error,
        source=report.source,
        log=False,
    )
    report = report.merge(tok_report)
    log_report(report)
    loader = DataLoader(
        tokenized,
        batch_config=batch_config,
        pad_id=_pad_id(tokenizer),
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    return loader, report
