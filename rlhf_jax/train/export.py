"""Export a trained policy from a run's checkpoint to a Hugging Face model directory.

    rlhf-jax export --run-dir runs/dpo --output-dir runs/dpo/hf [--step 200] [--dtype bfloat16]

The run's `config.yaml` says which model was trained (`model:`); the checkpoint's train state
is read onto the host without needing the mesh it was written on, the policy's variables are
located (the policy's train state of an online run, the `policy` half of a DPO
`PolicyAndReference` state, else the whole model), LoRA
adapters are merged, and `rlhf_jax.models.save_pretrained` writes `config.json` +
safetensors, plus the tokenizer when the run used one from a directory or a synthetic task.
Reward- and value-model runs are not causal LMs and are refused with a clear error.

A non-empty `output_dir` that is not a Hugging Face model directory is refused unless
`overwrite` is set (``--overwrite``); an earlier export there is replaced.

`run_dir` and `output_dir` may be local or ``gs://`` URIs (checked before anything is read,
`rlhf_jax.storage.check_storage`).

In a multi-process run every process reads the checkpoint, process 0 writes the directory and
all wait for it at a barrier, so each host can read the export as soon as the command returns.
On a multi-host slice the output directory must therefore be one the hosts share (a gs://
bucket): a local path would exist on host 0 only.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from etils import epath
from flax import nnx

from rlhf_jax.models.hf import save_pretrained
from rlhf_jax.sharding import sync_processes
from rlhf_jax.storage import absolute, check_storage
from rlhf_jax.train.builders import build_model, load_tokenizer_for
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.config import DataSpec, DType, ModelSpec, config_from_dict
from rlhf_jax.train.loop import CHECKPOINT_DIR, CONFIG_FILE


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Write a run's trained policy as a Hugging Face directory (config.json + safetensors)."""

    run_dir: str = "runs/sft"
    """The training run's output directory (holding config.yaml and checkpoints/)."""
    output_dir: str = "runs/sft/hf"
    """Where to write the Hugging Face model directory."""
    step: int | None = None
    """Checkpoint step to export (default: the newest)."""
    dtype: DType | None = None
    """Stored dtype of the weights (default: the model's parameter dtype)."""
    save_tokenizer: bool = True
    """Also save the run's tokenizer into the directory."""
    overwrite: bool = False
    """Write into a non-empty directory that is not a Hugging Face model directory (its other
    files are kept). Without it such a directory is refused; an earlier export is always
    replaced."""


def read_checkpoint_state(checkpoint_dir: str | os.PathLike, step: int | None = None
                          ) -> tuple[int, dict]:
    """`(step, state)`: a checkpoint's train state as nested dicts of NumPy arrays (host only,
    whatever mesh wrote it), after its files pass the checksum manifest (else
    `CheckpointDamagedError` naming the file)."""
    with Checkpointer(checkpoint_dir, keep_last=None) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {checkpoint_dir}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} under {checkpoint_dir}; "
                                    f"available steps: {steps}")
        ckpt.verify(step)  # a damaged file is named here, not shipped
    path = epath.Path(absolute(checkpoint_dir), str(step), "state")
    reader = ocp.PyTreeCheckpointer()
    tree = reader.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return step, reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _lookup(tree: dict, path: tuple) -> Any:
    node = tree
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(str(key), node.get(key)) if isinstance(key, int) else node.get(key)
        if node is None:
            return None
    return node


def read_run_config(run_dir: str) -> dict:
    """The resolved config (``config.yaml``) a training run wrote, as a dict."""
    config_path = epath.Path(run_dir, CONFIG_FILE)
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir!r} a training run?")
    return yaml.safe_load(config_path.read_text()) or {}


def restore_into(model_fn, params: dict, frozen: dict, *, where: str) -> nnx.Module:
    """Builds the model `model_fn` describes (abstractly) and fills every variable from the
    checkpoint's `params`/`frozen` trees; errors name missing variables and shape mismatches."""
    abstract = nnx.eval_shape(model_fn)
    graphdef, state = nnx.split(abstract)
    values = []
    missing = []
    for path, var in nnx.to_flat_state(state):
        leaf = _lookup(params, (*path, "value"))
        if leaf is None:
            leaf = _lookup(frozen, (*path, "value"))
        if leaf is None:
            missing.append("/".join(map(str, path)))
            continue
        if tuple(leaf.shape) != tuple(var.shape):
            raise ValueError(f"{where}: checkpoint variable {'/'.join(map(str, path))} has shape "
                             f"{leaf.shape}, the model expects {tuple(var.shape)}")
        values.append((path, var.replace(np.asarray(leaf))))
    if missing:
        raise ValueError(f"{where}: the checkpoint lacks model variables {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def load_policy(run_dir: str, *, step: int | None = None) -> tuple[nnx.Module, int, dict]:
    """`(model, step, run_config)`: the trained causal LM of a run, with its LoRA adapters.

    Works for every trainer that trains a policy: SFT, DPO (the ``policy`` half of the
    policy-and-reference state) and the online trainers (PPO's policy beside its value model,
    GRPO/RLOO, rejection sampling).
    """
    run_config = read_run_config(run_dir)
    spec = config_from_dict(ModelSpec, run_config.get("model", {}), where="config.model")
    step, raw = read_checkpoint_state(epath.Path(run_dir, CHECKPOINT_DIR), step)
    if "params" not in raw and isinstance(raw.get("policy"), dict):
        raw = raw["policy"]  # an online trainer's state: the policy's own train state
    params, frozen = raw.get("params", {}), raw.get("frozen", {})
    if "policy" in params:  # policy-and-reference or policy-and-value state: keep the policy
        params, frozen = params["policy"], frozen.get("policy", {})
    if "score_head" in params or "value_head" in params or "score_head" in frozen:
        raise ValueError(f"{run_dir} trained a reward or value model; export writes causal "
                         "language models only")
    model = restore_into(lambda: build_model(spec, load_weights=False), params, frozen,
                         where=run_dir)
    return model, step, run_config


def export_policy(config: ExportConfig) -> dict[str, Any]:
    """Exports the run's policy (see module docstring); returns a summary dict."""
    check_storage(config)
    model, step, run_config = load_policy(config.run_dir, step=config.step)
    tokenizer = None
    if config.save_tokenizer:
        data = config_from_dict(DataSpec, run_config.get("data", {}), where="config.data")
        spec = config_from_dict(ModelSpec, run_config.get("model", {}), where="config.model")
        try:
            tokenizer = load_tokenizer_for(data, spec)
        except (ValueError, FileNotFoundError):
            tokenizer = None
    try:
        path = save_pretrained(model, config.output_dir, dtype=config.dtype, tokenizer=tokenizer,
                               overwrite=config.overwrite)
    except FileExistsError as e:
        raise FileExistsError(
            f"output_dir={config.output_dir} is not empty and is not a Hugging Face model "
            "directory (no config.json); pick an empty or new directory, or pass --overwrite "
            "to write into it (its other files are kept)") from e
    # Process 0 writes the directory; every host reads it in the next stage, so none goes on
    # before it is complete (on a multi-host slice the directory must be shared: gs://).
    sync_processes(f"export {config.output_dir}")
    return {"output_dir": str(path), "step": step, "run_dir": config.run_dir,
            "tokenizer": tokenizer is not None}


__all__ = [
    "ExportConfig",
    "export_policy",
    "load_policy",
    "read_checkpoint_state",
    "read_run_config",
    "restore_into",
]
