"""Orbax checkpoints of a training run: train state, data-loader state and resolved config.

A checkpoint directory `output_dir/checkpoints/<step>/` holds three orbax items:

- `state`: the `TrainState` pytree (model variables, optimizer state, step, RNG key data),
  saved with `ocp.args.StandardSave`; restored onto whatever shardings the caller's target
  state has, so a checkpoint written on an 8-device mesh restores onto a (2, 4) mesh or a single
  device.
- `data`: the data loader's `get_state()` (JSON), taken after the batch of the last completed
  step was drawn, so a resumed run draws exactly the batches the uninterrupted run would have.
- `config`: the resolved run config (JSON of `config_to_dict`).

`Checkpointer` wraps `ocp.CheckpointManager` (keep the newest `keep_last`; saves are synchronous
so that a SIGTERM save has finished before the process exits). `restore_newest_intact` skips a
checkpoint that does not read back (recorded in `damaged`, replaced by the next save of its step).

The directory may be local or a ``gs://`` URI: orbax writes and reads buckets itself
(tensorstore's GCS driver for the arrays, etils.epath for the rest).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from rlhf_jax.storage import absolute
from rlhf_jax.train.state import TrainState

_log = logging.getLogger("rlhf_jax.train")


class CheckpointDamagedError(RuntimeError):
    """No checkpoint of a run could be restored."""


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
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"state": data_state}),
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
        return Restored(step=int(step), state=state, data_state=data.get("state"),
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


__all__ = ["CheckpointDamagedError", "Checkpointer", "Restored", "abstract_like"]
