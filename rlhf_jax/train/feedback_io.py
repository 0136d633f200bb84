"""Inputs, skip accounting and outputs of the data-making commands (`rlhf-jax label`,
`rlhf-jax cai`).

- `FeedbackInput`: prompts or preference pairs from a file (JSONL / parquet / HF `datasets` /
  TFDS, read by `rlhf_jax.data.load_examples`) or made by a synthetic task
  (`rlhf_jax.train.data.synthetic_records`); `load_input` validates them.
- `SkipLog`: what was skipped, per stage and reason, with the first few origins and problems;
  under ``on_error="raise"`` a data problem raises instead, naming its origin (file and line).
- `prepare_outputs` refuses to overwrite earlier outputs unless told to, and writes the resolved
  config; `write_json` writes the run summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from etils import epath

from rlhf_jax.data import PreferenceExample, PromptExample, load_examples
from rlhf_jax.data.synthetic import SyntheticTask, get_task
from rlhf_jax.storage import ensure_dir
from rlhf_jax.train.config import save_config
from rlhf_jax.train.data import synthetic_records
from rlhf_jax.train.loop import CONFIG_FILE

DEFAULT_SYNTHETIC_EXAMPLES = 64
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class FeedbackInput:
    """Where the prompts (or preference pairs) come from."""

    path: str | None = None
    """A JSONL / parquet file, an HF `datasets` directory or a TFDS directory."""
    source_type: Literal["jsonl", "parquet", "hf_disk", "hf_files", "tfds"] | None = None
    """How to read `path` (guessed from it when unset)."""
    format: Literal["prompt", "preference", "hh"] = "prompt"
    """"prompt": prompts whose responses the policy samples; "preference" / "hh": existing pairs
    (their chosen/rejected are the human labels the agreement report compares with)."""
    split: str = "train"
    """Split of an HF `datasets` or TFDS source."""
    synthetic: str | None = None
    """Synthetic task ("topic", "progression", "harmful_topic"): makes the prompts (or pairs
    labelled by simulated raters) when `path` is unset, and gives every pair its gold preference
    for the report."""
    num_examples: int | None = None
    """Use only the first this many examples (synthetic: make this many; default 64)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad records, conversation records and texts too long for a model raise (naming file and
    line) or are skipped and counted in summary.json."""


class SkipLog:
    """Counts skipped items per stage and reason; keeps the first `keep` ``"origin: problem"``.

    Args:
      on_error: ``"raise"``: `error` raises a ValueError naming the origin; ``"skip"``: it counts.
      keep: how many examples of skipped items to keep.
    """

    def __init__(self, on_error: str, *, keep: int = 10):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.keep = keep
        self.stages: dict[str, Counter] = {}
        self.first: list[str] = []

    def _note(self, text: str) -> None:
        if len(self.first) < self.keep:
            self.first.append(text)

    def error(self, stage: str, reason: str, origin: str, problem: str) -> None:
        """A data problem: raises under ``on_error="raise"``, else counts it."""
        if self.on_error == "raise":
            raise ValueError(f"{origin}: {problem} (set input.on_error=skip to skip and count "
                             "such items)")
        self.skip(stage, reason, origin, problem)

    def skip(self, stage: str, reason: str, origin: str, problem: str) -> None:
        """A skip that is never an error (e.g. a low-confidence label)."""
        self.stages.setdefault(stage, Counter())[reason] += 1
        self._note(f"{origin}: {problem}")

    def add_counts(self, stage: str, counts: Mapping[str, int], first: Sequence[str] = ()) -> None:
        """Counts skipped elsewhere (a `LoadReport`, `rlhf_jax.rlaif` pipelines)."""
        counter = self.stages.setdefault(stage, Counter())
        for reason, n in counts.items():
            if n:
                counter[reason] += int(n)
        for text in first:
            self._note(text)

    @property
    def total(self) -> dict[str, int]:
        """``{reason: count}`` over every stage."""
        out: Counter = Counter()
        for counter in self.stages.values():
            out.update(counter)
        return dict(sorted(out.items()))

    def by_stage(self) -> dict[str, dict[str, int]]:
        """``{stage: {reason: count}}`` (stages with skips only)."""
        return {stage: dict(sorted(c.items())) for stage, c in self.stages.items() if c}

    def count(self, stage: str) -> int:
        """Items skipped at `stage`."""
        return sum(self.stages.get(stage, Counter()).values())


class InputExamples(NamedTuple):
    """What `load_input` returns.

    Attributes:
      examples: validated `PromptExample`s or `PreferenceExample`s whose texts are strings.
      num_read: rows read (or made).
      task: the synthetic task, or None.
    """

    examples: list[Any]
    num_read: int
    task: SyntheticTask | None


def load_input(spec: FeedbackInput, *, skips: SkipLog, seed: int,
               formats: Sequence[str] = ("prompt", "preference", "hh")) -> InputExamples:
    """Reads and validates the input examples; bad rows and conversation records go to `skips`.

    Args:
      spec: the input spec.
      skips: the skip log (stage ``"input"``).
      seed: seed of synthetic examples.
      formats: the formats the command accepts.
    """
    if spec.format not in formats:
        raise ValueError(f"input.format={spec.format!r}; this command reads {list(formats)}")
    if spec.num_examples is not None and spec.num_examples < 1:
        raise ValueError(f"input.num_examples must be >= 1, got {spec.num_examples}")
    task = get_task(spec.synthetic) if spec.synthetic is not None else None
    if spec.path is not None:
        source, source_type = spec.path, spec.source_type
    elif task is not None:
        if spec.format == "hh":
            raise ValueError("input.synthetic makes 'prompt' or 'preference' records, not 'hh'")
        source = synthetic_records(spec.synthetic, spec.format,
                                   num=spec.num_examples or DEFAULT_SYNTHETIC_EXAMPLES, seed=seed)
        source_type = "records"
    else:
        raise ValueError("set input.path (a file or directory) or input.synthetic (a task name "
                         "of rlhf_jax.data.synthetic)")
    examples, report = load_examples(source, format=spec.format, on_error=spec.on_error,
                                     source_type=source_type, split=spec.split)
    skips.add_counts("input", report.skipped, report.first_skipped)
    if spec.num_examples is not None:
        examples = examples[: spec.num_examples]
    kept = []
    for ex in examples:
        texts = ((ex.prompt,) if isinstance(ex, PromptExample)
                 else (ex.prompt, ex.chosen, ex.rejected))
        if isinstance(ex, PreferenceExample | PromptExample) and all(isinstance(t, str)
                                                                     for t in texts):
            kept.append(ex)
        else:
            skips.error("input", "conversation", ex.origin,
                        "conversation (message list) records are not supported: the policy "
                        "and the judges read plain-text prompts and responses")
    return InputExamples(kept, report.num_read, task)


def prepare_outputs(output_dir: str, files: Sequence[str], *, overwrite: bool,
                    config: Any) -> dict[str, str]:
    """Creates `output_dir`, refuses to replace earlier outputs, writes ``config.yaml``.

    Returns:
      ``{file name: path}`` for `files`.

    Raises:
      FileExistsError: naming the files when any of them exists and `overwrite` is false.
    """
    paths = {name: os.fspath(epath.Path(output_dir, name)) for name in files}
    existing = [p for p in (*paths.values(), os.fspath(epath.Path(output_dir, SUMMARY_FILE)))
                if epath.Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds {existing}; choose another "
                              "output_dir or pass --overwrite")
    save_config(config, ensure_dir(output_dir) / CONFIG_FILE)
    return paths


def write_json(data: Mapping[str, Any], path: str) -> str:
    """Writes `data` as indented JSON (local or ``gs://``); returns the path."""
    epath.Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    return path


__all__ = [
    "DEFAULT_SYNTHETIC_EXAMPLES",
    "FeedbackInput",
    "InputExamples",
    "SUMMARY_FILE",
    "SkipLog",
    "load_input",
    "prepare_outputs",
    "write_json",
]
