"""Local JSONL -> a TFDS dataset in array_record files, readable without TensorFlow.

`build_tfds_dataset` validates every row against a record format (bad rows raise or are
counted skips, as in `load_examples`) and writes one array_record split per JSONL input with a
TFDS `GeneratorBasedBuilder`. Each TFDS example holds two text features: ``record`` (the row's
JSON object, unchanged) and ``origin`` (its source ``file:line``), so formats with optional
fields and conversations round-trip exactly and errors found later still name the original line.
Read it back with `tfds.data_source(name, data_dir=...)`, `tfds.builder(name,
data_dir=...).as_data_source()`, or `load_examples(..., source_type="tfds")`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from rlhf_jax.data._records import (
    Format,
    LoadReport,
    OnError,
    RecordError,
    ReportBuilder,
    parse_record,
)
from rlhf_jax.data._sources import read_jsonl

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _validated_rows(path: Path, fmt: str, builder: ReportBuilder):
    for origin, record in read_jsonl(path):
        builder.num_read += 1
        try:
            if isinstance(record, RecordError):
                raise record
            parse_record(record, format=fmt, origin=origin)
        except RecordError as e:
            builder.error(e)
            continue
        builder.num_loaded += 1
        yield origin, record


def build_tfds_dataset(
    splits: Mapping[str, str | os.PathLike] | str | os.PathLike,
    *,
    name: str,
    data_dir: str | os.PathLike,
    format: Format,
    on_error: OnError = "raise",
    version: str = "1.0.0",
) -> tuple[Path, dict[str, LoadReport]]:
    """Writes JSONL files as a TFDS dataset of array_record files.

    Args:
      splits: ``{split_name: jsonl_path}``, or one path for a ``"train"`` split.
      name: dataset name (lower snake case), the directory under `data_dir`.
      data_dir: TFDS data directory.
      format: the record format every row is validated against (one of `FORMATS`).
      on_error: ``"raise"`` or ``"skip"`` bad rows (counted per split in the reports).
      version: dataset version ``"X.Y.Z"``.

    Returns:
      `(dataset_dir, reports)`: ``<data_dir>/<name>/<version>`` and a `LoadReport` per split.
    """
    import tensorflow_datasets as tfds  # here: ~1 s to import, needed only to build one

    if not _NAME.match(name):
        raise ValueError(f"name must be lower snake case ([a-z][a-z0-9_]*), got {name!r}")
    if isinstance(splits, str | os.PathLike):
        splits = {"train": splits}
    paths = {split: Path(p) for split, p in splits.items()}
    for split, p in paths.items():
        if not p.is_file():
            raise FileNotFoundError(f"split {split!r}: {p} does not exist")
    reports: dict[str, LoadReport] = {}

    def generate(split: str):
        builder = ReportBuilder(str(paths[split]), on_error)
        for key, (origin, record) in enumerate(_validated_rows(paths[split], format, builder)):
            yield key, {"record": json.dumps(record, ensure_ascii=False), "origin": origin}
        reports[split] = builder.build()

    class _JsonlDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        # Built in memory: no source file next to it with checksums or metadata to look up.
        code_path = None
        url_infos = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"{name}: {format!r} records converted from JSONL.",
                # Keep the JSONL order (TFDS would otherwise shuffle by key while writing).
                disable_shuffling=True,
                features=tfds.features.FeaturesDict(
                    {"record": tfds.features.Text(), "origin": tfds.features.Text()}
                ),
            )

        def _split_generators(self, dl_manager):
            return {split: generate(split) for split in paths}

        def _generate_examples(self, **kwargs):  # pragma: no cover - splits come from generate()
            raise NotImplementedError

    _JsonlDataset.name = name
    builder = _JsonlDataset(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(max_examples_per_split=None)
    )
    return Path(builder.data_dir), reports
