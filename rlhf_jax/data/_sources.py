"""Record sources: JSONL, parquet, HF `datasets` (saved to disk or local data files), TFDS.

Every reader yields ``(origin, record)`` pairs, where `origin` names the file and the 1-based
line (JSONL) or 0-based row (parquet, `datasets`, TFDS), and `record` is a dict or, for a row that
cannot be decoded, a `RecordError`. `load_examples` validates the rows into examples under the
``on_error`` policy and returns a `LoadReport`. Blank JSONL lines are not rows and are passed
over; a source with no rows at all is an error that names it.

File paths are `etils.epath.Path`s: a JSONL or parquet file, and the directory a source type is
told from, may be local or a ``gs://`` URI. JSONL is streamed one line at a time, so memory
holds one line, never the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

from etils import epath

from rlhf_jax.data._records import (
    Format,
    LoadReport,
    OnError,
    RecordError,
    ReportBuilder,
    parse_record,
)

SourceType = Literal["records", "jsonl", "parquet", "hf_disk", "hf_files", "tfds"]
SOURCE_TYPES: tuple[str, ...] = ("records", "jsonl", "parquet", "hf_disk", "hf_files", "tfds")
Row = tuple[str, Any]


def read_jsonl(path: str | os.PathLike) -> Iterator[Row]:
    """Rows of a JSON-lines file (local or ``gs://``), read one line at a time; undecodable
    lines yield a `RecordError` naming the line."""
    path = epath.Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            origin = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield origin, RecordError(origin, "undecodable", f"line is not valid UTF-8 ({e})")
                continue
            if not line.strip():
                continue
            try:
                yield origin, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield origin, RecordError(
                    origin, "undecodable", f"invalid JSON: {e.msg} at column {e.colno}"
                )


def read_parquet(path: str | os.PathLike, *, batch_size: int = 1024) -> Iterator[Row]:
    """Rows of a parquet file (local or ``gs://``, via pyarrow), origins
    ``"file.parquet:row N"``."""
    import pyarrow.parquet as pq  # here: ~0.4 s to import, needed for parquet files only

    path = epath.Path(path)
    i = 0
    with path.open("rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                yield f"{path}:row {i}", row
                i += 1


def _hf_rows(ds, name: str) -> Iterator[Row]:
    for i, row in enumerate(ds):
        yield f"{name}:row {i}", row


def read_hf_disk(path: str | os.PathLike, *, split: str | None = "train") -> Iterator[Row]:
    """Rows of a `datasets.Dataset` / `DatasetDict` saved with `save_to_disk`."""
    import datasets  # an optional package (~3 s to import), needed for HF datasets only

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: split {split!r} not found; available: {sorted(ds)}")
        ds = ds[split]
        name = f"{path}[{split}]"
    else:
        name = str(path)
    yield from _hf_rows(ds, name)


_HF_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_hf_files(
    data_files: str | os.PathLike | Sequence[str | os.PathLike], *, split: str | None = "train"
) -> Iterator[Row]:
    """Rows of local data files loaded with `datasets.load_dataset` (json, parquet or csv)."""
    import datasets  # an optional package (~3 s to import), needed for HF datasets only

    files = [str(data_files)] if isinstance(data_files, str | os.PathLike) else [str(f) for f in data_files]
    suffixes = {epath.Path(f).suffix for f in files}
    builders = {_HF_BUILDERS.get(s) for s in suffixes}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"data files must share one of the suffixes {sorted(_HF_BUILDERS)}, got {sorted(suffixes)}"
        )
    ds = datasets.load_dataset(builders.pop(), data_files=files, split=split or "train")
    yield from _hf_rows(ds, ",".join(files))


def read_tfds(
    name_or_dir: str | os.PathLike, *, split: str = "train", data_dir: str | os.PathLike | None = None
) -> Iterator[Row]:
    """Rows of a TFDS dataset written by `build_tfds_dataset` (array_record, no TensorFlow).

    `name_or_dir` is a dataset name (found under `data_dir`) or a prepared dataset directory
    (``<data_dir>/<name>/<version>``). Origins read ``"tfds:<name>/<split>:row N (<source
    file>:<line>)"``.
    """
    import tensorflow_datasets as tfds  # here: ~1 s to import, needed for TFDS sources only

    path = epath.Path(name_or_dir)
    if path.is_dir():
        source = tfds.builder_from_directory(str(path)).as_data_source(split=split)
        name = path.parent.name
    else:
        source = tfds.data_source(str(name_or_dir), split=split, data_dir=data_dir)
        name = str(name_or_dir)
    for i in range(len(source)):
        item = source[i]
        origin = f"tfds:{name}/{split}:row {i}"
        src = item.get("origin", b"")
        src = src.decode("utf-8") if isinstance(src, bytes) else str(src)
        if src:
            origin = f"{origin} ({src})"
        raw = item["record"]
        try:
            yield origin, json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            yield origin, RecordError(origin, "undecodable", f"stored record is not JSON: {e}")


def _records(records: Iterable[Mapping[str, Any]], name: str = "records") -> Iterator[Row]:
    for i, r in enumerate(records):
        yield f"{name}:{i}", r


def detect_source_type(source: Any) -> str:
    """Guesses the source type from a path (suffix or directory contents) or a Python list."""
    if isinstance(source, Sequence) and not isinstance(source, str | bytes):
        return "records"
    path = epath.Path(source)
    if path.is_dir():
        if (path / "features.json").exists():
            return "tfds"
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "hf_disk"
        raise ValueError(
            f"{path}: directory is neither a `datasets` save_to_disk directory nor a prepared "
            "TFDS dataset; pass source_type explicitly"
        )
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    raise ValueError(
        f"{path}: cannot tell the source type from the suffix {suffix!r}; pass source_type, "
        f"one of {SOURCE_TYPES}"
    )


def read_rows(
    source: Any,
    *,
    source_type: SourceType | None = None,
    split: str | None = "train",
    data_dir: str | os.PathLike | None = None,
) -> Iterator[Row]:
    """Rows ``(origin, record)`` of any supported source (see `SOURCE_TYPES`)."""
    kind = source_type or detect_source_type(source)
    if kind == "records":
        return _records(source)
    if kind == "jsonl":
        return read_jsonl(source)
    if kind == "parquet":
        return read_parquet(source)
    if kind == "hf_disk":
        return read_hf_disk(source, split=split)
    if kind == "hf_files":
        return read_hf_files(source, split=split)
    if kind == "tfds":
        return read_tfds(source, split=split or "train", data_dir=data_dir)
    raise ValueError(f"unknown source_type {kind!r}; choose one of {SOURCE_TYPES}")


def load_examples(
    source: Any,
    *,
    format: Format,
    on_error: OnError = "raise",
    source_type: SourceType | None = None,
    split: str | None = "train",
    data_dir: str | os.PathLike | None = None,
    log: bool = True,
    rating_margins: Any = None,
) -> tuple[list, LoadReport]:
    """Reads and validates every row of `source` into examples of `format`.

    Args:
      source: a path (JSONL, parquet, `datasets` directory, TFDS directory or name), a list of
        data files (with ``source_type="hf_files"``) or a list of dict records.
      format: one of `FORMATS`.
      on_error: ``"raise"`` (the first bad row raises a `RecordError` naming its file and
        line/row and the problem) or ``"skip"`` (bad rows are counted per reason in the report).
      source_type: one of `SOURCE_TYPES`; guessed from `source` when None.
      split: the split of a `datasets` dict or TFDS dataset.
      data_dir: TFDS data directory when `source` is a dataset name.
      log: log the report to the ``rlhf_jax.data`` logger.
      rating_margins: a `RatingMargins`: preference pairs take their `margin` from the rater's
        rating in its field (an unknown or missing rating is a bad row).

    Returns:
      `(examples, report)`.
    """
    name = "records" if not isinstance(source, str | os.PathLike) else str(source)
    builder = ReportBuilder(name, on_error)
    examples = []
    kind = source_type or detect_source_type(source)
    for origin, record in read_rows(source, source_type=kind, split=split, data_dir=data_dir):
        builder.num_read += 1
        try:
            if isinstance(record, RecordError):
                raise record
            examples.append(parse_record(record, format=format, origin=origin,
                                         rating_margins=rating_margins))
        except RecordError as e:
            builder.error(e)
            continue
        builder.num_loaded += 1
    if builder.num_read == 0:
        raise ValueError(f"{name}: no rows to read (the source is empty"
                         + (", or holds only blank lines)" if kind == "jsonl" else ")"))
    return examples, builder.build(log=log)
