"""Whole global arrays between the devices and the host, on any number of processes.

On a multi-host slice a global ``jax.Array`` is not fully addressable: each process holds only
its devices' shards, so ``np.asarray`` / ``jax.device_get`` of it fail there. Host code that
needs the whole array (a reward computed on the host, a metric, a file written by process 0)
goes through these two functions, which are plain copies in a single process:

- `gather_to_host(tree)`: every array of ``tree`` as one NumPy array holding the whole global
  value, on every process (a collective when an array spans processes: every process calls it,
  in the same order).
- `global_from_host(tree, sharding)`: the inverse. Every leaf is the whole global value, the
  same on every process (e.g. computed by every process from `gather_to_host`'s output); each
  process places its own devices' shards of it (`jax.make_array_from_callback`). A leaf that is
  already a global array is resharded instead.

`rlhf_jax.sharding.shard_batch` / `host_rows` are the per-host counterparts: there each process
holds only its own rows.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        # A collective: every process contributes its shards and receives the whole array.
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def gather_to_host(tree: Any) -> Any:
    """``tree`` with every array leaf (``jax.Array`` of any sharding, NumPy, scalars) replaced by
    a NumPy array of its whole global value, ``[*global_shape]``, on every process.

    In a multi-process run an array spanning processes is gathered with
    ``multihost_utils.process_allgather`` (a collective: every process must call this with the
    same tree structure); a fully replicated one is read from a local shard."""
    return jax.tree.map(_to_numpy, tree)


def global_from_host(tree: Any, sharding: Sharding) -> Any:
    """Global ``jax.Array``s of ``tree``'s leaves, placed with ``sharding``.

    Args:
      tree: a pytree whose leaves are the whole global values (NumPy arrays, host-readable
        ``jax.Array``s, or global ``jax.Array``s). A host value must be the same on every
        process: each process copies only the shards of its own devices, nothing is exchanged
        or checked.
      sharding: the target sharding of every leaf (e.g. `rlhf_jax.sharding.batch_sharding`:
        the leading axis over ``("data", "fsdp")``, the others replicated, for any rank).

    Returns:
      ``tree`` with every leaf a ``jax.Array`` of the same global shape and ``sharding``.
    """

    def put(x):
        if isinstance(x, jax.Array) and (jax.process_count() == 1
                                         or not x.is_fully_addressable):
            return jax.device_put(x, sharding)  # a reshard on the devices
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


__all__ = ["gather_to_host", "global_from_host"]
