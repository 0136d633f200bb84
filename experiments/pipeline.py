"""Run a multi-stage experiment (SFT -> export -> reward model -> DPO / PPO) from one YAML file.

    python -m experiments.pipeline --config experiments/configs/gpt2_small_hh_v4-8.yaml \
        [--output-dir DIR] [--stages sft,rm] [--dry-run]

The file names the stages in order; each stage is one `rlhf-jax <command>` run whose config is
the file's `defaults` deep-merged with the stage's `config` (the stage wins), with
`output_dir = <output dir>/<stage name>`. Strings may refer to other stages' directories as
`{stage:NAME}` and to the run directory as `{output_dir}`:

    name: gpt2-small-hh
    output_dir: runs/gpt2-small-hh
    defaults: {seed: 0, mesh: {data: 1, fsdp: -1, tensor: 1}}
    stages:
      - {name: sft, command: sft, config: {model: {path: models/gpt2}, ...}}
      - {name: sft_hf, command: export, inherit_defaults: false,
         config: {run_dir: "{stage:sft}"}}
      - {name: rm, command: rm, config: {model: {path: "{stage:sft_hf}"}, ...}}

Every resolved stage config is written to `<output dir>/pipeline/<stage>.yaml` before it runs,
so a stage can be re-run by hand with `rlhf-jax <command> --config` that file. On a multi-host
TPU slice (`RLHF_JAX_DISTRIBUTED=1`, set by `tpu_scripts/launch.sh`, or on one machine by
`python -m rlhf_jax.launch`) JAX's multi-process runtime is initialised once, before the first
stage, and every process waits for the others at the end of each stage. The output directory
must be shared by the hosts (a gs:// bucket on a real slice).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import yaml

_PLACEHOLDER = re.compile(r"\{(output_dir|stage:[A-Za-z0-9_]+)\}")
_STAGE_KEYS = {"name", "command", "config", "inherit_defaults"}
_TOP_KEYS = {"name", "description", "hardware", "output_dir", "defaults", "stages"}


class PipelineError(ValueError):
    """A pipeline file that cannot be run; the message names the file and the field."""


class Stage(NamedTuple):
    name: str
    command: str
    config: dict[str, Any]


class Pipeline(NamedTuple):
    name: str
    output_dir: str
    stages: list[Stage]
    meta: dict[str, Any]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`, recursively for nested mappings (`override` wins)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _substitute(value: Any, dirs: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):
        def repl(m):
            key = m.group(1)
            if key not in dirs:
                raise PipelineError(f"{where}: {m.group(0)} names no earlier stage "
                                    f"(known: {sorted(k for k in dirs if k != 'output_dir')})")
            return dirs[key]
        return _PLACEHOLDER.sub(repl, value)
    if isinstance(value, Mapping):
        return {k: _substitute(v, dirs, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, dirs, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def load_pipeline(path: str | os.PathLike, *, output_dir: str | None = None) -> Pipeline:
    """Reads and resolves a pipeline file (placeholders, defaults, per-stage output dirs)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, Mapping):
        raise PipelineError(f"{path}: the top level must be a mapping")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PipelineError(f"{path}: unknown top-level keys {sorted(unknown)}; "
                            f"allowed: {sorted(_TOP_KEYS)}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PipelineError(f"{path}: 'stages' must be a non-empty list")
    out_dir = str(output_dir or data.get("output_dir") or f"runs/{path.stem}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise PipelineError(f"{path}: 'defaults' must be a mapping")
    dirs = {"output_dir": out_dir}
    resolved = []
    for i, stage in enumerate(stages):
        where = f"{path}: stages[{i}]"
        if not isinstance(stage, Mapping) or not {"name", "command"} <= set(stage):
            raise PipelineError(f"{where} must be a mapping with 'name' and 'command'")
        extra = set(stage) - _STAGE_KEYS
        if extra:
            raise PipelineError(f"{where}: unknown keys {sorted(extra)}; allowed: "
                                f"{sorted(_STAGE_KEYS)}")
        name = str(stage["name"])
        if not re.fullmatch(r"[A-Za-z0-9_]+", name) or f"stage:{name}" in dirs:
            raise PipelineError(f"{where}: name {name!r} must be unique letters, digits or '_'")
        inherit = stage.get("inherit_defaults", True)
        if not isinstance(inherit, bool):
            raise PipelineError(f"{where}: inherit_defaults must be true or false")
        config = deep_merge(defaults if inherit else {}, stage.get("config") or {})
        config["output_dir"] = f"{out_dir}/{name}"
        config = _substitute(config, dirs, f"{where}.config")
        resolved.append(Stage(name, str(stage["command"]), config))
        dirs[f"stage:{name}"] = f"{out_dir}/{name}"
    meta = {k: data[k] for k in ("name", "description", "hardware") if k in data}
    return Pipeline(str(data.get("name", path.stem)), out_dir, resolved, meta)


def validate(pipeline: Pipeline) -> None:
    """Parses every stage config with its command's config class (errors name the stage)."""
    from rlhf_jax.cli import CommandError, resolve_command
    from rlhf_jax.train.config import config_from_dict

    for stage in pipeline.stages:
        try:
            cls, _ = resolve_command(stage.command)
            config_from_dict(cls, stage.config, where=f"stage {stage.name!r}")
        except (CommandError, ValueError, TypeError) as e:
            raise PipelineError(f"pipeline {pipeline.name!r}, stage {stage.name!r} "
                                f"({stage.command}): {e}") from e


def select(pipeline: Pipeline, names: str | None) -> list[Stage]:
    if not names:
        return list(pipeline.stages)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [s.name for s in pipeline.stages]
    missing = [n for n in wanted if n not in known]
    if missing:
        raise PipelineError(f"--stages: unknown stages {missing}; the pipeline has {known}")
    return [s for s in pipeline.stages if s.name in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.pipeline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="pipeline YAML file")
    parser.add_argument("--output-dir", default=None, help="run directory (default: the file's)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of stages to run")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print the resolved stage configs, run nothing")
    args = parser.parse_args(argv)
    try:
        pipeline = load_pipeline(args.config, output_dir=args.output_dir)
        stages = select(pipeline, args.stages)
        validate(pipeline)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for stage in stages:
            print(f"# stage {stage.name}: rlhf-jax {stage.command} --config "
                  f"{pipeline.output_dir}/pipeline/{stage.name}.yaml")
            print(yaml.safe_dump(stage.config, sort_keys=False))
        return 0

    if os.environ.get("RLHF_JAX_DISTRIBUTED") == "1":
        from rlhf_jax.sharding import initialize_distributed

        initialize_distributed(force=True)
    from rlhf_jax import cli
    from rlhf_jax.sharding import sync_processes

    config_dir = pathlib.Path(pipeline.output_dir) / "pipeline"
    if not pipeline.output_dir.startswith("gs://"):
        config_dir.mkdir(parents=True, exist_ok=True)
    else:  # configs travel with the run on the local disk when outputs go to a bucket
        config_dir = pathlib.Path("runs") / pipeline.name / "pipeline"
        config_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        stage_file = config_dir / f"{stage.name}.yaml"
        # Every process writes the same file (hosts with a local config_dir need their own
        # copy): into a private name, then renamed, so no process reads a half-written one.
        private = config_dir / f".{stage.name}.yaml.{os.getpid()}"
        private.write_text(yaml.safe_dump(stage.config, sort_keys=False))
        os.replace(private, stage_file)
        print(f"=== stage {stage.name}: rlhf-jax {stage.command} --config {stage_file}",
              flush=True)
        t0 = time.perf_counter()
        status = cli.main([stage.command, "--config", str(stage_file)])
        print(f"=== stage {stage.name} finished with status {status} in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        if status != 0:
            return status
        # No host starts a stage before every host has finished the previous one (whose outputs,
        # written by process 0 or collectively, it reads).
        sync_processes(f"pipeline stage {stage.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
