"""Rehearse a multi-host slice on one machine: start N processes of one command, as N hosts.

    python -m rlhf_jax.launch --num-processes 2 --devices-per-process 4 -- \\
        rlhf-jax dpo --config dpo.yaml --output-dir runs/dpo-2x4

Every process runs the same command (as every host of a TPU slice does) with the environment
that makes `rlhf_jax.sharding.initialize_distributed` join JAX's multi-process runtime:
`RLHF_JAX_DISTRIBUTED=1`, `JAX_COORDINATOR_ADDRESS=localhost:PORT` (process 0 serves it),
`RLHF_JAX_NUM_PROCESSES`, `RLHF_JAX_PROCESS_ID`, `RLHF_JAX_CPU_COLLECTIVES=gloo` (collectives
between the CPU devices of different processes) and `RLHF_JAX_HEARTBEAT_TIMEOUT`. Each process
sees `--devices-per-process` CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count`,
`JAX_PLATFORMS=cpu`), so 2 processes x 4 devices form the same 8-device mesh as one process with
8 devices, split over two hosts.

Each line a process prints is echoed with its index (`[0] ...`, `[1] ...`). The launcher exits
with 0 when every process does; when one fails it stops the others (SIGTERM, then SIGKILL after
`--grace-seconds`) and exits with the first failure's status (128 + N for a process killed by
signal N). SIGINT and SIGTERM sent to the launcher are passed on to every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from rlhf_jax.distributed_env import (
    COORDINATOR_ENV,
    CPU_COLLECTIVES_ENV,
    DISTRIBUTED_ENV,
    HEARTBEAT_TIMEOUT_ENV,
    NUM_PROCESSES_ENV,
    PROCESS_ID_ENV,
)

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on localhost that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def process_env(
    base: dict[str, str],
    *,
    process_id: int,
    num_processes: int,
    port: int,
    devices_per_process: int,
    heartbeat_timeout: int,
) -> dict[str, str]:
    """The environment of process `process_id`: `base` plus the multi-process settings."""
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    flags.append(f"{DEVICE_COUNT_FLAG}={devices_per_process}")
    env.update({
        "XLA_FLAGS": " ".join(flags),
        "JAX_PLATFORMS": "cpu",
        DISTRIBUTED_ENV: "1",
        COORDINATOR_ENV: f"localhost:{port}",
        NUM_PROCESSES_ENV: str(num_processes),
        PROCESS_ID_ENV: str(process_id),
        CPU_COLLECTIVES_ENV: "gloo",
        HEARTBEAT_TIMEOUT_ENV: str(heartbeat_timeout),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Launch:
    """N child processes of one command; see the module docstring."""

    def __init__(self, command: Sequence[str], *, num_processes: int, devices_per_process: int,
                 port: int | None = None, grace_seconds: float = 10.0,
                 heartbeat_timeout: int = 10, out=None):
        self.out = out or sys.stdout
        self.grace_seconds = grace_seconds
        self._lock = threading.Lock()
        port = port or free_port()
        self.procs: list[subprocess.Popen] = []
        self._readers: list[threading.Thread] = []
        for i in range(num_processes):
            env = process_env(dict(os.environ), process_id=i, num_processes=num_processes,
                              port=port, devices_per_process=devices_per_process,
                              heartbeat_timeout=heartbeat_timeout)
            try:
                proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, text=True, errors="replace")
            except OSError:
                self.signal_all(signal.SIGKILL)  # the processes already started
                raise
            self.procs.append(proc)
            reader = threading.Thread(target=self._echo, args=(i, proc), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _echo(self, index: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.say(f"[{index}] {line.rstrip(chr(10))}")

    def say(self, line: str) -> None:
        with self._lock:
            print(line, file=self.out, flush=True)

    def signal_all(self, signum: int) -> None:
        """Sends `signum` to every running process's process group."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """SIGTERM to every running process, SIGKILL to those still running after the grace."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        if any(p.poll() is None for p in self.procs):
            self.say(f"launch: processes still running {self.grace_seconds:g} s after SIGTERM "
                     "were killed")
            self.signal_all(signal.SIGKILL)

    def wait(self) -> int:
        """Waits for every process; returns the launcher's exit status (module docstring)."""
        failed: tuple[int, int] | None = None
        while True:
            codes = [p.poll() for p in self.procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                if any(c is None for c in codes):
                    self.say(f"launch: process {failed[0]} exited with status "
                             f"{_exit_status(failed[1])}; stopping the other processes")
                    self.stop()
            if all(c is not None for c in codes) or failed is not None:
                break
            time.sleep(0.1)
        for p in self.procs:
            p.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        if failed is None:
            return 0
        self.say(f"launch: process {failed[0]} failed with status {_exit_status(failed[1])}")
        return _exit_status(failed[1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jax.launch",
        description="Run COMMAND as N processes of one multi-process JAX run on this machine "
                    "(a local rehearsal of a multi-host slice).",
    )
    parser.add_argument("--num-processes", type=int, default=2,
                        help="processes (hosts) to start (default: 2)")
    parser.add_argument("--devices-per-process", type=int, default=4,
                        help="CPU devices each process sees (default: 4)")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on localhost (default: a free one)")
    parser.add_argument("--grace-seconds", type=float, default=10.0,
                        help="after a process fails, seconds between SIGTERM and SIGKILL of the "
                             "others (default: 10)")
    parser.add_argument("--heartbeat-timeout", type=int, default=10,
                        help="seconds without a heartbeat before JAX declares a process dead "
                             "(default: 10)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- COMMAND ARGS... (e.g. -- rlhf-jax dpo --config dpo.yaml)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m rlhf_jax.launch` (also `rlhf-jax-launch`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("give the command to run after --, e.g. -- rlhf-jax dpo --config dpo.yaml")
    if args.num_processes < 1:
        parser.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        parser.error(f"--devices-per-process must be >= 1, got {args.devices_per_process}")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    try:
        launch = Launch(command, num_processes=args.num_processes,
                        devices_per_process=args.devices_per_process, port=args.port,
                        grace_seconds=args.grace_seconds,
                        heartbeat_timeout=args.heartbeat_timeout)
    except OSError as e:
        print(f"launch: error: cannot start {command[0]!r}: {e}", file=sys.stderr)
        return 127

    def forward(signum, frame):
        launch.say(f"launch: received signal {signum}; passing it on to every process")
        launch.signal_all(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return launch.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    raise SystemExit(main())
