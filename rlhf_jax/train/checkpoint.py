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

`Checkpointer` wraps `ocp.CheckpointManager` (keep the newest `keep_last`; saves are synchronous
so that a SIGTERM save has finished before the process exits). `restore_newest_intact` skips a
checkpoint that does not read back (recorded in `damaged`, replaced by the next save of its step).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from rlhf_jax.train.state import TrainState

_log = logging.getLogger("rlhf_jax.train")


class CheckpointDamagedError(RuntimeError):
    """No checkpoint of a run could be restored."""


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


class Checkpointer:
    """Saves and restores checkpoints under `directory` (see module docstring).

    Args:
      directory: checkpoint root (created if missing), usually `output_dir/checkpoints`.
      keep_last: number of newest checkpoints to keep (None keeps all).
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int | None = 3):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1 or None, got {keep_last}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            create=True,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )
        self.damaged: dict[int, str] = {}
        """Steps found unreadable by `restore_newest_intact` -> what was wrong; `save` replaces
        them."""

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
    ) -> bool:
        """Saves a checkpoint for `step` (blocking); returns whether one was written.

        An existing checkpoint of `step` is kept (returns False) unless `overwrite`.
        """
        if step in self._manager.all_steps():
            if not overwrite and step not in self.damaged:
                return False
            self._manager.delete(step)
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
        saved = self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        return bool(saved)

    def restore(self, target: TrainState, *, step: int | None = None) -> Restored:
        """Restores `step` (default: newest) onto the shapes, dtypes and shardings of `target`.

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

        A checkpoint that fails to restore (a missing or truncated file, a corrupt array) is
        skipped with a one-line warning naming its step and the error, and recorded in
        `damaged`; raises `CheckpointDamagedError` when none restores.
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
            restored = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )
        except Exception as e:  # a damaged checkpoint: try the next older one
            _log.warning("checkpoint %s/%d: its config is unreadable (%s: %s)", self.directory,
                         step, type(e).__name__, _first_line(e))
            older = [s for s in self.all_steps() if s < step]
            return self.stored_config(older[-1]) if older else None
        return restored["config"]

    def delete_all(self) -> None:
        """Deletes every checkpoint under `directory`."""
        for step in self.all_steps():
            self._manager.delete(step)
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["CheckpointDamagedError", "Checkpointer", "DataStateError", "Restored", "abstract_like",
           "gather_host_states", "reshard_data_state"]
