"""Command-line interface: `rlhf-jax <command> --config FILE [overrides]` (or `python -m rlhf_jax`).

Each command maps to `"module:ConfigClass:run_function"` in `COMMANDS`; the module is imported
only when its command runs, so `rlhf-jax --help` is fast and a command whose module is missing
fails with a clear message instead of breaking the others. The config class is parsed by
`rlhf_jax.train.config.load_config` (YAML defaults, then tyro command-line overrides), and the
run function is called with it and returns a summary dict, printed as JSON.

    rlhf-jax dpo --config dpo.yaml --optimizer.learning-rate 5e-5 --output-dir runs/dpo1
    rlhf-jax sft --help            # every option with its default and documentation

On a multi-host slice every host runs the same command with ``RLHF_JAX_DISTRIBUTED=1``
(`tpu_scripts/launch.sh` sets it), which initialises `jax.distributed` first.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from rlhf_jax.distributed_env import DISTRIBUTED_ENV

COMMANDS: dict[str, str] = {
    "sft": "rlhf_jax.train.sft:SFTConfig:train_sft",
    "rm": "rlhf_jax.train.rm:RMConfig:train_rm",
    "dpo": "rlhf_jax.train.dpo:DPOConfig:train_dpo",
    "ppo": "rlhf_jax.train.ppo:PPOConfig:train_ppo",
    "grpo": "rlhf_jax.train.grpo:GRPOConfig:train_grpo",
    "rloo": "rlhf_jax.train.grpo:RLOOConfig:train_rloo",
    "rejection-sampling": (
        "rlhf_jax.train.rejection_sampling:RejectionSamplingConfig:train_rejection_sampling"
    ),
    "rest": "rlhf_jax.train.rest:ReSTConfig:train_rest",
    "hir": "rlhf_jax.train.hir:HirConfig:train_hir",
    "export": "rlhf_jax.train.export:ExportConfig:export_policy",
    "label": "rlhf_jax.train.label:LabelConfig:run_label",
    "cai": "rlhf_jax.train.cai:CAIConfig:run_cai",
}
"""Command name -> "module:ConfigClass:run_function"."""

EXIT_PREEMPTED = 143
"""Exit status after a SIGTERM-triggered save (128 + SIGTERM), so schedulers see the preemption."""


class CommandError(RuntimeError):
    """A command's module, config class or run function cannot be loaded."""


def resolve_command(name: str) -> tuple[type, Any]:
    """`(ConfigClass, run_function)` of a registered command, importing its module lazily."""
    if name not in COMMANDS:
        raise CommandError(f"unknown command {name!r}; available: {', '.join(COMMANDS)}")
    module_name, class_name, func_name = COMMANDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise CommandError(
                f"command {name!r} needs module {module_name}, which is not available in this "
                f"installation ({e})"
            ) from e
        raise
    missing = [n for n in (class_name, func_name) if not hasattr(module, n)]
    if missing:
        raise CommandError(f"command {name!r}: module {module_name} does not define {missing}")
    return getattr(module, class_name), getattr(module, func_name)


def _usage() -> str:
    lines = [
        "usage: rlhf-jax <command> [--config FILE] [options]",
        "",
        "commands:",
        *(f"  {name:<20} {target}" for name, target in COMMANDS.items()),
        "",
        "Run `rlhf-jax <command> --help` for a command's options.",
    ]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rlhf-jax`; returns the process exit status."""
    # The library is imported here, not at the top: `import rlhf_jax.cli` and `rlhf-jax --help`
    # stay fast (the config module imports jax, ~3 s).
    from rlhf_jax.train.config import ConfigError, load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    try:
        config_cls, run = resolve_command(name)
        config = load_config(config_cls, rest, prog=f"rlhf-jax {name}")
    except (CommandError, ConfigError) as e:
        print(f"rlhf-jax: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get(DISTRIBUTED_ENV) == "1":
        # Multi-host run (set by tpu_scripts/launch.sh): every process joins JAX's distributed
        # runtime before the first JAX computation, so the mesh spans all hosts. (Imported
        # here for the reason above.)
        from rlhf_jax.sharding import initialize_distributed

        initialize_distributed(force=True)
    # Imported here like the config above: `rlhf-jax --help` stays fast (no jax import).
    from rlhf_jax.storage import StorageError
    from rlhf_jax.train.checkpoint import CheckpointDamagedError, CheckpointWriteError
    from rlhf_jax.train.loop import CheckpointSaveError, NonFiniteError, RunIdentityError

    try:
        summary = run(config)
    except (RunIdentityError, NonFiniteError, CheckpointSaveError, CheckpointWriteError,
            CheckpointDamagedError, StorageError) as e:
        print(f"rlhf-jax {name}: error: {e}", file=sys.stderr)
        return 1
    except FileExistsError as e:  # a directory the command must not write into
        print(f"rlhf-jax {name}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"rlhf-jax {name}: error: {os.strerror(e.errno)} writing "
              f"{e.filename or config.output_dir}; free space or pick another --output-dir",
              file=sys.stderr)
        return 1
    if summary is not None:
        print(json.dumps(_jsonable(summary), indent=2, sort_keys=True))
        if isinstance(summary, dict) and summary.get("preempted"):
            return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
