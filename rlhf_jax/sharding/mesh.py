"""Device meshes with the axes `("data", "fsdp", "tensor")` and multi-host initialisation."""

from __future__ import annotations

import dataclasses
import inspect
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.distributed_env import (
    COORDINATOR_ENV,
    CPU_COLLECTIVES_ENV,
    HEARTBEAT_TIMEOUT_ENV,
    NUM_PROCESSES_ENV,
    PROCESS_ID_ENV,
)

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 ("all remaining devices").

    Attributes:
      data: data parallelism (replicated parameters, batch split).
      fsdp: fully sharded data parallelism (parameters sharded on their `embed` axis, batch
        split).
      tensor: tensor (model) parallelism over heads / MLP width / vocabulary.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.asdict(self)
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(f"mesh.{name} must be an integer >= 1 or -1 (all remaining "
                                 f"devices), got {size!r}")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1 (all remaining devices), got "
                             f"mesh.data={self.data}, mesh.fsdp={self.fsdp}, "
                             f"mesh.tensor={self.tensor}")

    def describe(self) -> str:
        """``"mesh (data=-1, fsdp=1, tensor=1)"``, as a message names it."""
        return f"mesh (data={self.data}, fsdp={self.fsdp}, tensor={self.tensor})"

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Axis sizes `(data, fsdp, tensor)` for `num_devices` devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"{self.describe()} cannot fill {num_devices} devices: the fixed axes "
                    f"multiply to {known}, which does not divide {num_devices}"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(
                f"{self.describe()} needs {int(np.prod(sizes))} devices, but {num_devices} "
                "are available"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices=None) -> jax.sharding.Mesh:
    """A `Mesh` with axes `("data", "fsdp", "tensor")` over `devices` (default: all devices)."""
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return jax.sharding.Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
                             axis_types=axis_types)


def _multihost_tpu_environment() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    force: bool = False,
) -> bool:
    """Initialises multi-process JAX (`jax.distributed.initialize`) where it is needed.

    Runs when an explicit `coordinator_address` is given, when `force` is set (e.g. on a SLURM
    cluster, where JAX finds the coordinator itself), or on a multi-host TPU slice (detected by
    more than one host in `TPU_WORKER_HOSTNAMES`). Otherwise (a single process) it does nothing.
    Call it once, before any other JAX call. Returns True when JAX runs multi-process.

    Arguments left None are read from the environment where set: `JAX_COORDINATOR_ADDRESS`,
    `RLHF_JAX_NUM_PROCESSES`, `RLHF_JAX_PROCESS_ID` (what `python -m rlhf_jax.launch` sets for
    each process it starts; on a TPU VM none of them is set and JAX reads the VM's metadata),
    `RLHF_JAX_CPU_COLLECTIVES` (`gloo`: CPU devices of different processes run collectives
    through gloo) and `RLHF_JAX_HEARTBEAT_TIMEOUT` (seconds without a heartbeat after which the
    coordinator declares a process dead and the others stop, also used as the shutdown
    time-out).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV) or None
    if num_processes is None:
        num_processes = _env_int(NUM_PROCESSES_ENV)
    if process_id is None:
        process_id = _env_int(PROCESS_ID_ENV)
    if coordinator_address is None and not force and not _multihost_tpu_environment():
        return False
    collectives = os.environ.get(CPU_COLLECTIVES_ENV, "").strip()
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    kwargs = {}
    heartbeat = _env_int(HEARTBEAT_TIMEOUT_ENV)
    if heartbeat is not None:
        accepted = inspect.signature(jax.distributed.initialize).parameters
        kwargs = {name: heartbeat for name in ("heartbeat_timeout_seconds",
                                               "shutdown_timeout_seconds") if name in accepted}
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **kwargs)
    return True


def sync_processes(name: str) -> None:
    """Waits until every process of a multi-process run reaches the barrier `name` (a no-op in
    a single process): e.g. after process 0 wrote files that the others read next."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
