"""Metric sinks of a training run: `metrics.jsonl`, TensorBoard, Weights & Biases, a progress bar.

`MetricsLogger.log(step, metrics)` writes one JSON line per call to `output_dir/metrics.jsonl`
(`{"step": 10, "sft/loss": 1.23, ...}`), the same scalars under the same namespaced names to
TensorBoard (`output_dir/tensorboard`, via tensorboardX) and, when enabled and installed, to
Weights & Biases. Values are converted to Python floats with `float()`, so a value read back from
the JSONL file is bit-identical to the float32 the step computed.

`MetricsLogger.log_table(step, name, table)` writes a `SampleTable` (e.g. a held-out
evaluation's sample responses) as one JSON line ``{"step": s, name: [{column: value, ...},
...]}`` and as a Markdown table in TensorBoard's text tab, under the same name.

On resume, `MetricsLogger(..., resume_step=s)` drops the JSONL lines of steps after `s` (those
steps are re-run), so an interrupted-and-resumed run leaves the same file as an uninterrupted one.

`output_dir` may be a local directory or a ``gs://`` URI (`rlhf_jax.storage`). On a bucket
`metrics.jsonl` is a `TextLog`, uploaded at most every `TextLog.sync_seconds` and on `close`;
TensorBoard's event files are written to a local staging directory and mirrored to
`output_dir/tensorboard` with the same cadence (`rlhf_jax.storage.mirror_dir`; the staging
directory is removed on `close`); Weights & Biases keeps its local files in its default
directory.

In a multi-process run every process computes the same metrics and only process 0 writes them
(`write=None`, the default): hosts that share an output directory (a bucket) must not append to
one file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from etils import epath
from rich.progress import Progress
from tqdm.auto import tqdm

from rlhf_jax.storage import TextLog, ensure_dir, is_remote, mirror_dir
from rlhf_jax.train.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"


class SampleTable(NamedTuple):
    """A small table of text (sample responses with their scores) for `MetricsLogger.log_table`.

    Attributes:
      columns: the column names.
      rows: one tuple of values (str, int or float) per row, in column order.
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def records(self) -> list[dict[str, Any]]:
        """The rows as ``{column: value}`` dicts."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def markdown(self) -> str:
        """The table in Markdown (``|`` and newlines inside cells escaped)."""
        def cell(v):
            text = f"{v:.4g}" if isinstance(v, float) else str(v)
            return text.replace("|", "\\|").replace("\n", "\\n")

        lines = ["| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def _to_float(value: Any) -> float:
    return float(np.asarray(value))


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """Reads a `metrics.jsonl` file (or the run directory holding it) into a list of dicts."""
    path = epath.Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


class MetricsLogger:
    """Writes scalar metrics to every configured sink (see module docstring).

    Args:
      output_dir: the run directory.
      config: which sinks to use.
      resume_step: when resuming from a checkpoint at this step, JSONL lines with a larger step
        are dropped; None starts a fresh file.
      run_config: the resolved run config (dict), passed to Weights & Biases.
      total_steps: length of the progress bar.
      write: whether this process writes to the sinks (None: only process 0 of a multi-process
        run, `jax.process_index() == 0`); a logger that does not write accepts every call and
        writes nothing.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        config: LoggingConfig | None = None,
        *,
        resume_step: int | None = None,
        run_config: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
        write: bool | None = None,
    ):
        config = config or LoggingConfig()
        self.output_dir = os.fspath(output_dir)
        self.path = os.fspath(epath.Path(self.output_dir) / METRICS_FILE)
        self.writes = jax.process_index() == 0 if write is None else bool(write)
        self._file = None
        self._tb = None
        self._tb_remote = self._tb_staging = None
        self._tb_synced = time.monotonic()
        self._wandb = None
        self._bar = None
        if not self.writes:
            return
        path = ensure_dir(self.output_dir) / METRICS_FILE
        kept: list[str] = []
        if resume_step is not None and path.exists():
            for line in path.read_text().split("\n"):
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line + "\n")
        self._file = TextLog(path, "".join(kept))

        if config.tensorboard:
            # Imported here: tensorboardX (protobuf) takes ~1 s to import and a run without
            # TensorBoard never needs it.
            from tensorboardX import SummaryWriter

            tb_dir = os.fspath(epath.Path(self.output_dir) / "tensorboard")
            if is_remote(self.output_dir):
                self._tb_remote = tb_dir
                tb_dir = tempfile.mkdtemp(prefix="rlhf_jax-tensorboard-")
                self._tb_staging = tb_dir
            self._tb = SummaryWriter(tb_dir)

        if config.wandb:
            try:  # an optional package, needed only with logging.wandb
                import wandb
            except ImportError as e:
                raise ImportError(
                    "logging.wandb=true needs the `wandb` package; install it or set "
                    "--logging.wandb False"
                ) from e
            self._wandb = wandb.init(
                project=config.wandb_project,
                dir=None if is_remote(self.output_dir) else self.output_dir,
                config=dict(run_config or {}),
                resume="allow",
            )

        self._bar_kind = config.progress
        if config.progress != "none" and total_steps:
            initial = resume_step or 0
            if config.progress == "tqdm":
                self._bar = tqdm(total=total_steps, initial=initial, dynamic_ncols=True,
                                 file=sys.stderr)
            else:
                self._bar = Progress(transient=False)
                self._bar.start()
                self._task = self._bar.add_task("train", total=total_steps, completed=initial)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Writes `metrics` (namespaced name -> scalar) for `step`; returns them as floats."""
        values = {name: _to_float(v) for name, v in metrics.items()}
        record = {"step": int(step), **values}
        if self._file is None:
            return values
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(name, v, int(step))
            self._mirror_tensorboard()
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))
        return values

    def log_table(self, step: int, name: str, table: SampleTable) -> None:
        """Writes `table` for `step` under `name` to metrics.jsonl and TensorBoard (text)."""
        record = {"step": int(step), name: table.records()}
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.add_text(name, table.markdown(), int(step))
            self._mirror_tensorboard()

    def sync(self) -> None:
        """Writes everything logged so far to `output_dir` now (on a bucket: uploads
        `metrics.jsonl` and the TensorBoard events); the loop calls it before each checkpoint,
        so a resume never finds fewer lines than its checkpoint's step."""
        if self._file is None:  # a process that does not write the run files
            return
        self._file.flush(force=True)
        self._mirror_tensorboard(force=True)

    def _mirror_tensorboard(self, *, force: bool = False) -> None:
        """Copies the staged event files to the bucket (remote runs), at most every
        `TextLog.sync_seconds` unless `force`."""
        if self._tb_remote is None:
            return
        now = time.monotonic()
        if force or now - self._tb_synced >= self._file.sync_seconds:
            self._tb.flush()
            mirror_dir(self._tb_staging, self._tb_remote)
            self._tb_synced = now

    def progress(self, step: int, postfix: Mapping[str, float] | None = None) -> None:
        """Moves the console progress bar to `step` (showing a few metric values)."""
        if self._bar is None:
            return
        if self._bar_kind == "tqdm":
            self._bar.update(step - self._bar.n)
            if postfix:
                self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in postfix.items()},
                                      refresh=False)
        else:
            self._bar.update(self._task, completed=step)

    def close(self) -> None:
        if self._bar is not None:
            if self._bar_kind == "tqdm":
                self._bar.close()
            else:
                self._bar.stop()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            if self._tb_remote is not None:
                mirror_dir(self._tb_staging, self._tb_remote)
                shutil.rmtree(self._tb_staging, ignore_errors=True)
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._file is not None and not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["METRICS_FILE", "MetricsLogger", "SampleTable", "read_metrics"]
