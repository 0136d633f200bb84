"""The environment variables that make a process join a multi-process run.

`rlhf_jax.sharding.initialize_distributed` reads them; `python -m rlhf_jax.launch` sets them for
each process it starts; on a TPU VM `tpu_scripts/launch.sh` sets `RLHF_JAX_DISTRIBUTED=1` only
and JAX reads the rest from the VM's metadata. This module imports nothing, so the launcher starts
fast.
"""

DISTRIBUTED_ENV = "RLHF_JAX_DISTRIBUTED"
"""With this set to ``1`` a command first calls
`rlhf_jax.sharding.initialize_distributed(force=True)` (multi-host TPU slices, SLURM, the local
launcher)."""
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
"""`host:port` of process 0's coordinator (JAX reads the same variable itself)."""
NUM_PROCESSES_ENV = "RLHF_JAX_NUM_PROCESSES"
"""Number of processes of a run started outside a detected cluster (`python -m rlhf_jax.launch`)."""
PROCESS_ID_ENV = "RLHF_JAX_PROCESS_ID"
"""This process's index in `[0, RLHF_JAX_NUM_PROCESSES)`."""
CPU_COLLECTIVES_ENV = "RLHF_JAX_CPU_COLLECTIVES"
"""Cross-process collectives of CPU devices (`gloo`); set by the local launcher."""
HEARTBEAT_TIMEOUT_ENV = "RLHF_JAX_HEARTBEAT_TIMEOUT"
"""Seconds after which the coordinator declares a silent process dead (JAX's default: 100)."""

__all__ = [
    "COORDINATOR_ENV",
    "CPU_COLLECTIVES_ENV",
    "DISTRIBUTED_ENV",
    "HEARTBEAT_TIMEOUT_ENV",
    "NUM_PROCESSES_ENV",
    "PROCESS_ID_ENV",
]
