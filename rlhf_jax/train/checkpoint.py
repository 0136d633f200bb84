"""Orbax checkpoints of a training run: train state, data-loader state and resolved config.

A checkpoint directory `output_dir/checkpoints/<step>/` holds three orbax items:

- `state`: the `TrainState` pytree (model variables, optimizer state, step, RNG key data),
  saved with `ocp.args.StandardSave`; restored onto whatever shardings the caller's target
  state has, so a checkpoint written on an 8-device mesh restores onto a (2, 4) mesh or a single
  device.
- `data`: the data loader's `get_state()` (JSON), taken after the batch of the last completed
  step was drawn, so a resumed run draws exactly the batches the uninterrupted run would have.
  Each process of a multi-process run reads its own share of the data, so the states of all
  processes are gathered and stored (`{"per_process": [state_0, ...]}`), and each process
  restores its own. A checkpoint of `M` processes restores on `N != M` processes when the
  loaders' shards are at one stream position `p` (padded batches: every host reads the same
  number of examples): the `M * p` examples read so far are `N * p'` on the new hosts
  (`reshard_data_state`); otherwise the restore raises.
- `config`: the resolved run config (JSON of `config_to_dict`).

Beside the items, once orbax has committed the step, `checksums.json` records the size and CRC32C
of every file of the step (and whether every floating-point leaf of the state was finite). A
restore verifies the files against it first, so a truncated, deleted or bit-flipped file is
found and named before orbax reads it (orbax's own metadata checks miss flipped bytes inside an
array). In a multi-process run each process reads a disjoint share of the files, balanced by
bytes (`verify_share`), and the processes agree on the outcome, so every host falls back to the
same step. A step without the manifest (a process killed between orbax's commit and the manifest's
write, or a checkpoint written before manifests existed) restores unverified, with a warning.

`Checkpointer` wraps `ocp.CheckpointManager` (saves are synchronous so that a SIGTERM save has
finished before the process exits) and rotates itself: it keeps the newest `keep_last` intact
steps and, always, the newest step whose state was finite. `restore_newest_intact` skips a
checkpoint that fails verification or does not read back (recorded in `damaged`, replaced by the
next save of its step).

The directory may be local or a ``gs://`` URI: orbax writes and reads buckets itself
(tensorstore's GCS driver for the arrays, etils.epath for the rest).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from rlhf_jax.storage import absolute
from rlhf_jax.train.state import TrainState

_log = logging.getLogger("rlhf_jax.train")


CHECKSUM_FILE = "checksums.json"
"""Per-step manifest: `{"algorithm": "crc32c", "finite": bool, "files": {relative path: {"size":
int, "crc32c": hex}}}`."""

_CHUNK = 16 << 20


class CheckpointDamagedError(RuntimeError):
    """A checkpoint fails verification, or no checkpoint of a run could be restored."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost bucket, no permission)."""


_EVENT_LOOP_CLOSED = "Event loop is closed"


class _SaveNoise(logging.Filter):
    """Holds back what a failing orbax save prints besides its error: the "Event loop is closed"
    errors of writes still in flight (dozens of tracebacks, raised at garbage collection) and
    orbax's logged tracebacks of its writer threads. The save's own error says what went wrong
    in one line; every other unraisable error still reaches the previous hook."""

    def __init__(self):
        super().__init__()
        self.held = 0
        self._previous = sys.unraisablehook

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "raised an exception" in record.getMessage():
            self.held += 1
            return False
        return True

    def _hook(self, unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == _EVENT_LOOP_CLOSED:
            self.held += 1
            return
        self._previous(unraisable)

    def __enter__(self):
        sys.unraisablehook = self._hook
        logging.getLogger("absl").addFilter(self)
        return self

    def __exit__(self, exc_type, *rest):
        logging.getLogger("absl").removeFilter(self)
        if exc_type is None:  # a failed save's stray errors arrive later: keep the hook
            sys.unraisablehook = self._previous


def _write_failure(error: BaseException) -> str:
    """One line for a failed write: the OS reason first when the message carries one."""
    text = " ".join(str(error).split())
    code = getattr(error, "errno", None)
    if code is None and "os_error_code='" in text:
        code = int(text.split("os_error_code='")[1].split("'")[0])
    reason = os.strerror(code) if code else type(error).__name__
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free space or pick another --output-dir)"
    return f"{reason}: {text[:400]}"


def file_crc32c(path: epath.Path) -> tuple[int, str]:
    """`(size in bytes, CRC32C as hex)` of a file, read in 16 MiB chunks (local or gs://)."""
    checksum = google_crc32c.Checksum()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            checksum.update(chunk)
            size += len(chunk)
    return size, checksum.digest().hex()


def _files_under(directory: epath.Path) -> list[epath.Path]:
    """Every file under `directory`, recursively (`iterdir`: gs:// paths have no `rglob`)."""
    files: list[epath.Path] = []
    for path in directory.iterdir():
        files.extend(_files_under(path) if path.is_dir() else [path])
    return files


def step_files(step_dir: epath.Path) -> list[epath.Path]:
    """Every file under a step directory except the manifest, sorted."""
    own = (CHECKSUM_FILE, CHECKSUM_FILE + ".partial")
    return sorted(p for p in _files_under(step_dir) if p.relative_to(step_dir).as_posix() not in own)


def verify_share(sizes: Mapping[str, int], *, process_index: int, process_count: int
                 ) -> list[str]:
    """The files of a manifest that process `process_index` of `process_count` verifies.

    `sizes` maps each file name to its size in bytes. Files go, largest first (ties by name), to
    the process with the fewest bytes so far (ties: the lowest index), so the shares are disjoint,
    together hold every file, and read about `total / process_count` bytes each (no share more
    than that plus the largest file). Every process computes the same split. Returns the names of
    `process_index`'s share, sorted.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    loads = [0] * process_count
    share: list[str] = []
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        owner = min(range(process_count), key=lambda i: (loads[i], i))
        loads[owner] += size
        if owner == process_index:
            share.append(name)
    return sorted(share)


def _check_file(step_dir: epath.Path, name: str, expected: Mapping[str, Any]
                ) -> tuple[str, str] | None:
    """`(name, reason)` when file `name` of a step does not match its manifest entry, else None
    (an unreadable file is a reason too, so no process stops before the others agree)."""
    path = step_dir / name
    try:
        if not path.exists():
            return name, f"{path} is missing"
        size, crc = file_crc32c(path)
    except Exception as e:  # a read error on one host must not leave the others waiting
        return name, f"{path} cannot be read ({type(e).__name__}: {_first_line(e)})"
    if size != expected["size"]:
        return name, f"{path} has {size} bytes, {expected['size']} were written"
    if crc != expected["crc32c"]:
        return name, (f"{path} fails its checksum (crc32c {crc}, {expected['crc32c']} was "
                      f"written): its bytes changed after the save")
    return None


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` is finite (one reduction per leaf)."""
    finite = True
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            finite = finite and bool(jnp.isfinite(leaf).all())
    return finite


class DataStateError(ValueError):
    """A checkpoint's data-loader states cannot continue on this number of processes."""


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, at most `limit` characters."""
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:limit]


class Restored(NamedTuple):
    """What `Checkpointer.restore` returns."""

    step: int
    state: TrainState
    data_state: Any
    config: dict[str, Any] | None


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct` tree (with each leaf's sharding) to restore a checkpoint onto."""

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


SHARD_KEYS = ("shard_index", "shard_count", "position")
"""Keys of a data loader's state that locate its host's share of the stream
(`rlhf_jax.data.DataLoader.get_state`)."""


def gather_host_states(state: Any) -> list[Any]:
    """The JSON-serialisable `state` of every process, in process order (a collective: every
    process calls it); `[state]` in a single-process run."""
    if jax.process_count() == 1:
        return [state]
    blob = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int32)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(blobs[i, : int(sizes[i, 0])].tobytes().decode())
            for i in range(jax.process_count())]


def reshard_data_state(states: list[Any], process_index: int, process_count: int) -> Any:
    """Process `process_index`'s data state on `process_count` processes, from the states of
    the `len(states)` processes that wrote a checkpoint (see the module docstring).

    Loader states (dicts with `SHARD_KEYS`) at one position `p` become position
    `len(states) * p / process_count` of shard `process_index`; every other value must be the
    same in all states.

    Raises:
      DataStateError: the shards are at different positions, the examples read so far do not divide
        between `process_count` hosts, or another value differs between the stored processes.
    """
    if len(states) == process_count:
        return states[process_index]

    def merge(values: list[Any], where: str) -> Any:
        first = values[0]
        if isinstance(first, dict) and all(k in first for k in SHARD_KEYS):
            positions = {int(v["position"]) for v in values}
            read = int(first["position"]) * int(first["shard_count"])
            if len(positions) != 1 or read % process_count:
                raise DataStateError(
                    f"cannot resume the data order of a {len(values)}-process checkpoint on "
                    f"{process_count} processes: the loader shards at {where or 'the top'} are "
                    f"at positions {sorted(positions)} (packed batches?), not one position "
                    f"whose {read} examples read so far divide between {process_count} hosts"
                )
            return {**first, "shard_index": process_index, "shard_count": process_count,
                    "position": read // process_count}
        if isinstance(first, dict) and all(isinstance(v, dict) and v.keys() == first.keys()
                                           for v in values):
            return {k: merge([v[k] for v in values], f"{where}.{k}".lstrip(".")) for k in first}
        if any(v != first for v in values):
            raise DataStateError(
                f"cannot resume a {len(values)}-process checkpoint on {process_count} "
                f"processes: its data state {where or 'value'} differs between processes "
                f"({values})"
            )
        return first

    return merge(list(states), "")


def whole_stream_state(state: Any) -> Any:
    """A loader state from `reshard_data_state` for a loader that reads the whole stream on
    every process (shard 0 of 1: the online trainers' prompts, `build_data(per_process=False)`):
    the examples its shard had read, ``position * shard_count``, become the position of shard
    0 of 1. So such a run resumes on any number of processes; a state that is not a loader's
    is returned as is."""
    if not isinstance(state, dict) or not all(k in state for k in SHARD_KEYS):
        return state
    return {**state, "shard_index": 0, "shard_count": 1,
            "position": int(state["position"]) * int(state["shard_count"])}


class Checkpointer:
    """Saves and restores checkpoints under `directory` (see module docstring).

    Args:
      directory: checkpoint root (created if missing), usually `output_dir/checkpoints`; a
        local path or a ``gs://`` URI.
      keep_last: number of newest checkpoints to keep (None keeps all).
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int | None = 3):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1 or None, got {keep_last}")
        self.directory = absolute(directory)
        self.keep_last = keep_last
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotation is `_rotate` (it keeps the newest finite step)
            create=True,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )
        self.damaged: dict[int, str] = {}
        """Steps found unreadable by `restore_newest_intact` -> what was wrong; `save` replaces
        them."""
        self._verified: set[int] = set()

    @property
    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        data_state: Any = None,
        config: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        finite: bool | None = None,
    ) -> bool:
        """Saves a checkpoint for `step` (blocking) with its checksum manifest, then rotates;
        returns whether one was written.

        An existing checkpoint of `step` is kept (returns False) unless `overwrite`. `finite`
        (whether every floating-point leaf of `state` is finite; computed when None) is recorded
        in the manifest for rotation.
        """
        if step in self._manager.all_steps():
            if not overwrite and step not in self.damaged:
                return False
            self._manager.delete(step)
            self.damaged.pop(step, None)
        self._verified.discard(step)
        if finite is None:
            finite = all_finite(state)
        if jax.process_count() == 1:
            # One process holds every shard: write host copies (no per-shard device slicing).
            state = jax.device_get(state)
        # Every process's own data state (orbax writes JSON items from process 0 only).
        data = {"per_process": gather_host_states(data_state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(dict(config or {})),
        )
        try:
            with _SaveNoise():
                saved = self._manager.save(step, args=args, force=True)
                self._manager.wait_until_finished()
            if not saved:
                return False
            if jax.process_index() == 0:
                self._write_manifest(step, finite=finite)
        except Exception as e:  # TensorStore / orbax / the filesystem raise many types
            raise CheckpointWriteError(
                f"the checkpoint of step {step} could not be written under {self.directory}: "
                f"{_write_failure(e)}"
            ) from e
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"rlhf_jax checksums {self.directory} {step}")
        self._verified.add(step)
        self._rotate()
        return True

    def step_dir(self, step: int) -> epath.Path:
        """The directory of checkpoint `step`."""
        return epath.Path(self.directory) / str(step)

    def _write_manifest(self, step: int, *, finite: bool) -> None:
        step_dir = self.step_dir(step)
        files = {}
        for path in step_files(step_dir):
            size, crc = file_crc32c(path)
            files[path.relative_to(step_dir).as_posix()] = {"size": size, "crc32c": crc}
        manifest = {"algorithm": "crc32c", "finite": finite, "files": files}
        partial = step_dir / (CHECKSUM_FILE + ".partial")
        partial.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        partial.replace(step_dir / CHECKSUM_FILE)

    def manifest(self, step: int) -> dict[str, Any] | None:
        """The checksum manifest of `step`, or None when it has none (or it does not parse)."""
        path = self.step_dir(step) / CHECKSUM_FILE
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return None
        return manifest if isinstance(manifest, dict) and "files" in manifest else None

    def verify(self, step: int) -> bool:
        """Checks every file of `step` against its checksum manifest.

        In a multi-process run each process reads only its share of the files
        (`verify_share`) and the processes then agree (a collective: every process calls it),
        so all of them return, or raise, the same. Returns True when verified, False when the
        step has no manifest (a warning says it is restored unverified); raises
        `CheckpointDamagedError` naming the first file (by name) that is missing, unreadable, of
        the wrong size or of the wrong CRC32C. A verified step is not read again.
        """
        if step in self._verified:
            return True
        manifest = self.manifest(step)
        step_dir = self.step_dir(step)
        if manifest is None:
            _log.warning("checkpoint %s has no readable %s (interrupted right after its commit, "
                         "or written by an older version); it is restored unverified",
                         step_dir, CHECKSUM_FILE)
            return False
        files = manifest["files"]
        mine = verify_share({name: int(f["size"]) for name, f in files.items()},
                            process_index=jax.process_index(), process_count=jax.process_count())
        damaged = next((found for name in mine
                        if (found := _check_file(step_dir, name, files[name]))), None)
        reports = [r for r in gather_host_states(damaged) if r]
        if reports:
            raise CheckpointDamagedError(min(reports)[1])
        self._verified.add(step)
        return True

    def finite(self, step: int) -> bool:
        """Whether the state of `step` was finite when saved (True when it has no manifest)."""
        manifest = self.manifest(step)
        return bool(manifest.get("finite", True)) if manifest is not None else True

    def _rotate(self) -> None:
        """Keeps the newest `keep_last` steps not known damaged, and the newest finite step."""
        if self.keep_last is None:
            return
        steps = self.all_steps()
        intact = [s for s in steps if s not in self.damaged]
        keep = set(intact[-self.keep_last:])
        newest_finite = next((s for s in reversed(intact) if self.finite(s)), None)
        if newest_finite is not None:
            keep.add(newest_finite)
        for s in steps:
            if s not in keep and s < max(keep):
                self._manager.delete(s)
                self.damaged.pop(s, None)
                self._verified.discard(s)

    def restore(self, target: TrainState, *, step: int | None = None) -> Restored:
        """Restores `step` (default: newest) onto the shapes, dtypes and shardings of `target`,
        after checking its files against the checksum manifest (`verify`).

        `target` is a `TrainState` of arrays (e.g. a freshly initialised, sharded state) or of
        `jax.ShapeDtypeStruct`s with shardings.
        """
        if step is None:
            step = self.latest_step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found under {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} under {self.directory}; "
                f"available steps: {self.all_steps()}"
            )
        self.verify(step)
        abstract = abstract_like(target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        state = restored["state"]
        if not isinstance(state, TrainState):
            state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(state))
        data = restored["data"] or {}
        states = data["per_process"] if "per_process" in data else [data.get("state")]
        data_state = reshard_data_state(states, jax.process_index(), jax.process_count())
        return Restored(step=int(step), state=state, data_state=data_state,
                        config=restored["config"])

    def restore_newest_intact(self, target: TrainState) -> Restored:
        """Restores the newest checkpoint that reads back, newest first (see `restore`).

        A checkpoint that fails verification or restore (a missing, truncated or bit-flipped
        file, a corrupt array) is skipped with a one-line warning naming the file or the error,
        and recorded in `damaged`; raises `CheckpointDamagedError` when none restores.
        """
        errors: list[str] = []
        for step in reversed(self.all_steps()):
            try:
                return self.restore(target, step=step)
            except DataStateError:  # the checkpoint is intact; this run cannot continue it
                raise
            except Exception as e:  # orbax / TensorStore raise many types for damaged files
                reason = f"{type(e).__name__}: {_first_line(e)}"
                self.damaged[step] = reason
                errors.append(f"step {step}: {reason}")
                _log.warning("checkpoint %s/%d is damaged and was skipped (%s)", self.directory,
                             step, reason)
        raise CheckpointDamagedError(
            f"no checkpoint under {self.directory} could be restored: " + "; ".join(errors)
        )

    def stored_config(self, step: int | None = None) -> dict[str, Any] | None:
        """The resolved run config stored with checkpoint `step` (default: newest), or None."""
        if step is None:
            step = self.latest_step
        if step is None:
            return None
        try:
            self.verify(step)
            restored = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )
        except Exception as e:  # a damaged checkpoint: try the next older one
            _log.warning("checkpoint %s/%d is damaged; its config is not used (%s: %s)", self.directory,
                         step, type(e).__name__, _first_line(e))
            older = [s for s in self.all_steps() if s < step]
            return self.stored_config(older[-1]) if older else None
        return restored["config"]

    def delete_all(self) -> None:
        """Deletes every checkpoint under `directory`."""
        for step in self.all_steps():
            self._manager.delete(step)
        self._manager.reload()
        self.damaged.clear()
        self._verified.clear()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = [
    "CHECKSUM_FILE",
    "CheckpointDamagedError",
    "CheckpointWriteError",
    "Checkpointer",
    "DataStateError",
    "Restored",
    "abstract_like",
    "all_finite",
    "file_crc32c",
    "gather_host_states",
    "reshard_data_state",
    "whole_stream_state",
    "step_files",
    "verify_share",
]
