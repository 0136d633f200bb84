"""Checks of a run's config against the devices and the model, before any model is built.

Remote paths come first: every ``gs://`` URI of the config (output directory, model, data) is
probed (`rlhf_jax.storage.check_storage`): a missing bucket, missing credentials or an endpoint
that does not answer fail here with one line naming the field, not after training.

A config dataclass checks each field on its own (`__post_init__`, `rlhf_jax.train.config`).
What it cannot know there is checked here, at the start of every `train_<algo>` function, so a
wrong setting fails in a second with a message that names the fields, not after minutes of
loading weights and compiling:

- the model spec resolves to a valid architecture (`model_config`: preset, overrides,
  `config.json` of a local directory);
- the longest row fits the model's positions: `data.max_length <= max_position_embeddings`
  (offline trainers; rows longer than `data.max_length` are then handled by the explicit, counted
  `data.overlong` policy), or for online trainers the longest prompt plus
  `rollout.max_new_tokens`. Learned position tables (GPT-2) clip positions past their end and
  RoPE models were not trained there, so either would be silently wrong. Dynamic NTK RoPE
  scaling, which is built to stretch past `max_position_embeddings`, is exempt;
- offline trainers: `data.batch_size` (and `data.eval_batch_size`) divide evenly over the
  hosts (each reads its own share of every batch) and over the mesh's batch shards
  (`mesh.data x mesh.fsdp`), and `optimizer.grad_accum_steps` divides `data.batch_size`. Online
  trainers read the whole prompt batch on every process, so no host count constrains their
  `data.batch_size`; they check their own rollout and update rows against the mesh.
"""

from __future__ import annotations

from typing import Any

import jax

from rlhf_jax.sharding import BATCH_AXES, MESH_AXES
from rlhf_jax.storage import check_storage
from rlhf_jax.train.builders import model_config
from rlhf_jax.train.config import ModelSpec, TrainConfig


def _positions(spec: ModelSpec) -> tuple[int | None, str]:
    """`(max positions or None when unbounded, a name for messages)` of a model spec."""
    config = model_config(spec)
    scaling = config.rope_scaling
    if config.position_embedding == "rope" and getattr(scaling, "rope_type", None) == "dynamic":
        return None, ""
    where = f"model.path={spec.path!r}" if spec.path else f"model.preset={spec.preset!r}"
    return config.max_position_embeddings, where


def check_sequence_lengths(config: TrainConfig) -> None:
    """Raises ValueError when the longest row of the run needs more positions than the model
    (or the DPO reference model) has; the message names the data fields and the model's limit."""
    data = config.data
    rollout = getattr(config, "rollout", None)
    if rollout is not None:  # online: a left-padded prompt, then the sampled response
        prompt = min(data.max_prompt_length or data.max_length, data.max_length)
        needed = prompt + rollout.max_new_tokens
        what = (f"prompts of up to {prompt} tokens (data.max_prompt_length / data.max_length) "
                f"plus rollout.max_new_tokens={rollout.max_new_tokens} need {needed} positions")
        fix = "shorten data.max_prompt_length or rollout.max_new_tokens"
    else:
        needed = data.max_length
        what = f"data.max_length={data.max_length} allows rows of {needed} tokens"
        fix = (f"lower data.max_length (longer examples are then handled by "
               f"data.overlong={data.overlong!r}: truncated, skipped or an error, and counted)")
    specs = [("model", config.model)]
    ref = getattr(config, "ref_model", None)
    if ref is not None:
        specs.append(("ref_model", ref))
    for role, spec in specs:
        limit, where = _positions(spec)
        if limit is not None and needed > limit:
            raise ValueError(
                f"{what}, but the {role} ({where}) has max_position_embeddings={limit}: "
                f"{fix}, or use a model with more positions")


def batch_shards(config: TrainConfig, num_devices: int | None = None) -> tuple[int, str]:
    """`(shards, description)`: how many ways the mesh splits a batch (its ``data x fsdp``
    axes) for `config.mesh` on `num_devices` devices (default: all)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = dict(zip(MESH_AXES, config.mesh.resolve(num_devices), strict=True))
    shards = 1
    for axis in BATCH_AXES:
        shards *= sizes[axis]
    axes = " x ".join(f"{a}={sizes[a]}" for a in BATCH_AXES)
    return shards, f"{config.mesh.describe()} on {num_devices} devices: {axes} batch shards"


def check_batch_layout(config: TrainConfig, *, num_devices: int | None = None,
                       num_hosts: int | None = None) -> None:
    """Raises ValueError when `data.batch_size` / `data.eval_batch_size` do not split evenly
    over the hosts and the mesh's batch shards, or `optimizer.grad_accum_steps` does not divide
    `data.batch_size`; the message names the field and the mesh."""
    hosts = jax.process_count() if num_hosts is None else num_hosts
    shards, mesh = batch_shards(config, num_devices)
    data = config.data
    sizes = [("data.batch_size", data.batch_size)]
    if data.eval_batch_size is not None:
        sizes.append(("data.eval_batch_size", data.eval_batch_size))
    for name, size in sizes:
        if size % hosts:
            raise ValueError(f"{name}={size} must be divisible by the {hosts} hosts (every host "
                             "loads the same number of rows)")
        if size % shards:
            raise ValueError(
                f"{name}={size} is not divisible by the {shards} batch shards of the {mesh}: "
                f"every step splits its rows evenly over the mesh's data and fsdp axes; use a "
                f"multiple of {shards}, or change mesh.data / mesh.fsdp")
    accum = config.optimizer.grad_accum_steps
    if data.batch_size % accum:
        raise ValueError(f"optimizer.grad_accum_steps={accum} must divide data.batch_size="
                         f"{data.batch_size} (each micro-batch has batch_size / "
                         "grad_accum_steps rows)")


def check_frozen_layers(config: TrainConfig) -> None:
    """Raises ValueError when `model.freeze_layers` exceeds the model's number of layers."""
    spec = config.model
    if spec.freeze_layers:
        layers = model_config(spec).num_layers
        if spec.freeze_layers > layers:
            raise ValueError(f"model.freeze_layers={spec.freeze_layers} exceeds the model's "
                             f"{layers} decoder layers")


def check_run_config(config: Any) -> None:
    """All the checks of this module for a trainer's config; call it first in `train_<algo>`.

    The remote paths of the config (``gs://`` output, model, data) are probed first
    (`rlhf_jax.storage.check_storage`), so an unreachable bucket fails before anything is read.
    """
    check_storage(config)
    check_sequence_lengths(config)
    check_frozen_layers(config)
    if getattr(config, "rollout", None) is None:
        check_batch_layout(config)
    # The online trainers (a `rollout` field) read the whole prompt batch on every process, so
    # their data.batch_size need not split over the hosts; what splits over the mesh (rollout
    # and update rows) is checked by the trainer (`rlhf_jax.train.online.check_rows_divide_mesh`).


__all__ = ["batch_shards", "check_batch_layout", "check_frozen_layers", "check_run_config",
           "check_sequence_lengths"]
