"""Shared configuration pieces for every trainer, and YAML + command-line parsing.

Every trainer's config is a frozen dataclass that extends `TrainConfig` (the fields every run
has) with its own hyper-parameters. A run's config is resolved in three layers, later ones
winning:

1. the dataclass defaults,
2. a YAML file (`--config FILE`) whose nested mappings mirror the dataclass fields,
3. command-line overrides parsed by tyro (`--optimizer.learning-rate 3e-4`, `--seed 1`).

`load_config(cls, argv)` does all three; `save_config(config, path)` writes the resolved config
as YAML (every run writes `config.yaml` into its output directory, and the file reads back to
the same config with `config_from_yaml`).

Every config dataclass checks its own fields in `__post_init__` (ranges, signs, allowed values);
an out-of-range value raises `FieldError` naming the field and the allowed range, whether the
config comes from YAML (the error also names the file and line), the command line (tyro prints
it) or Python. Checks that need the devices or the model (batch vs. mesh, sequence length vs.
the model's positions) run before any model is built, in `rlhf_jax.train.preflight`.

In YAML, PyYAML reads exponent floats without a dot (`1e-4`) as strings (YAML 1.1); float
fields accept such strings, as the command line does.

YAML example for `rlhf-jax dpo --config dpo.yaml`::

    output_dir: runs/dpo
    num_steps: 200
    model: {preset: tiny_gpt2, dtype: float32}
    data: {synthetic: preference, batch_size: 8}
    optimizer: {learning_rate: 1.0e-4, schedule: cosine, warmup_steps: 10}
    beta: 0.1
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import tyro
import yaml
from etils import epath

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.sharding import MeshConfig

DType = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A config file or mapping names an unknown field or holds a value of the wrong type.

    `path` is the dotted field path the error is about (used to find its line in a YAML file).
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class FieldError(ConfigError):
    """A config field holds a value outside its allowed range (raised by `__post_init__`).

    `detail` starts with the field's name (``"learning_rate must be a finite number > 0, got
    -0.001"``); the message prefixes it with `owner`, the field's parent in the run config
    (``"optimizer."``). `field` is the field's name inside its dataclass.
    """

    def __init__(self, detail: str, *, field: str, owner: str = "", path: str | None = None):
        super().__init__(owner + detail, path=path or field)
        self.detail = detail
        self.field = field


# ---------------------------------------------------------------------------------------------
# field checks (used by every config's __post_init__, here and in the trainer modules)
# ---------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def check_int(obj: Any, name: str, *, low: int | None = None, high: int | None = None,
              optional: bool = False, owner: str = "") -> None:
    """Raises `FieldError` unless `obj.<name>` is an int in `[low, high]` (or None if
    `optional`); the message names `owner + name` and the allowed range."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    ok = _is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        allowed = " ".join(filter(None, ("an integer", _interval(low, high, False, False))))
        raise FieldError(f"{name} must be {'None or ' if optional else ''}{allowed}, "
                         f"got {value!r}", field=name, owner=owner)


def check_number(obj: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False,
                 owner: str = "") -> None:
    """Raises `FieldError` unless `obj.<name>` is a finite number in the interval given by
    `low`/`high` (open ends with `low_open`/`high_open`), or None if `optional`."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        allowed = " ".join(filter(None, ("a finite number",
                                         _interval(low, high, low_open, high_open))))
        raise FieldError(f"{name} must be {'None or ' if optional else ''}{allowed}, "
                         f"got {value!r}", field=name, owner=owner)


def require(ok: bool, name: str, detail: str, *, owner: str = "") -> None:
    """Raises `FieldError(detail)` about field `name` unless `ok` (for checks that relate
    several fields); `detail` starts with the field's name."""
    if not ok:
        raise FieldError(detail, field=name, owner=owner)


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...], bool], ...]:
    """`(name, allowed values, None allowed)` of every `Literal` field of dataclass `cls`."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        optional = False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = len(args) < len(typing.get_args(tp))
            if len(args) != 1:
                continue
            tp = args[0]
        if typing.get_origin(tp) is Literal:
            out.append((name, typing.get_args(tp), optional))
    return tuple(out)


def check_literals(obj: Any, *, owner: str = "") -> None:
    """Raises `FieldError` for a `Literal`-typed field of dataclass `obj` holding another value
    (tyro and YAML parsing check these too; this covers configs built in Python)."""
    for name, allowed, optional in _literal_fields(type(obj)):
        value = getattr(obj, name)
        if value not in allowed and not (optional and value is None):
            raise FieldError(f"{name}={value!r} is not one of {list(allowed)}", field=name,
                             owner=owner)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to build: a preset from `rlhf_jax.models` or a local Hugging Face directory."""

    preset: str = "tiny_gpt2"
    """Name of a `rlhf_jax.models.ModelConfig` preset (used when `path` is unset)."""
    path: str | None = None
    """Local Hugging Face model directory (config.json + safetensors); overrides `preset`."""
    dtype: DType = "float32"
    """Compute dtype of activations. float32 is the CPU default (bf16 is emulated on most CPUs)."""
    param_dtype: DType = "float32"
    """Storage dtype of the parameters."""
    vocab_size: int | None = None
    """Override the preset's vocabulary size (random init only)."""
    num_layers: int | None = None
    """Override the preset's number of decoder layers (random init only)."""
    hidden_size: int | None = None
    """Override the preset's model width (random init only)."""
    num_heads: int | None = None
    """Override the preset's number of attention heads (random init only)."""
    intermediate_size: int | None = None
    """Override the preset's MLP width (random init only)."""
    max_position_embeddings: int | None = None
    """Override the preset's maximum sequence length (random init only)."""
    remat: Literal["none", "full", "dots", "dots_no_batch", "nothing_saveable"] | None = None
    """Override the preset's per-layer rematerialisation policy."""
    logits_chunk_size: int | None = None
    """Positions per chunk of the fused LM head and log-probs (`ModelConfig.logits_chunk_size`;
    unset keeps the model's, 128; 0 scores through the full `[B, T, V]` logits, same values).
    Applies to presets and `path` models alike; peak memory of scoring is O(B * chunk * V)."""
    logits_keep_bytes: int | None = None
    """Byte budget of the fused head's kept logits (`ModelConfig.logits_keep_bytes`; unset keeps
    the model's, 0: never keep them). A scoring call whose float32 logits (`B * T * V * 4`
    bytes) fit in it keeps them for the backward pass instead of recomputing them: one LM-head
    product per token less, for the unfused head's memory; same values."""
    logits_vocab_blocks: int | None = None
    """Strided vocabulary blocks of the fused head (`ModelConfig.logits_vocab_blocks`; unset
    keeps the model's, 0: the head chooses, 16 at Qwen2's vocabulary): 1 runs one pass over the
    whole vocabulary (faster at large chunks, one more `[V, E]` float32 buffer in the backward
    pass); a divisor of the vocabulary otherwise. Same values."""
    attention_impl: Literal["auto", "dense", "blockwise"] | None = None
    """Attention of training and scoring (`ModelConfig.attention_impl`; unset keeps the model's,
    "auto": on CPU, blockwise when a row is longer than one query tile): "blockwise" computes it in
    `[attention_block_q, attention_block_k]` tiles with an online softmax and keeps no
    `[rows, H, T, T]` scores for the backward pass (same values); "dense" materialises them.
    Applies to presets and `path` models alike."""
    attention_block_q: int | None = None
    """Blockwise attention: query positions per tile (unset keeps the model's, 128)."""
    attention_block_k: int | None = None
    """Blockwise attention: key positions per tile (unset keeps the model's, 128)."""
    lora_rank: int = 0
    """LoRA rank; 0 trains all parameters, > 0 trains only LoRA adapters."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (updates are scaled by alpha / rank)."""
    lora_targets: tuple[str, ...] = ()
    """Names of the projections that get adapters; empty means the models' default."""
    tokenizer_path: str | None = None
    """Local tokenizer directory (defaults to `path`); synthetic tasks need none."""
    freeze_layers: int = 0
    """Freeze the bottom N decoder layers of the trained model (the policy; PPO's separate value
    model trains all its layers): no gradient step, no optimizer state, no weight decay
    (`rlhf_jax.train.optimizer.freeze_bottom_layers`)."""
    freeze_embeddings: bool = False
    """Freeze the input embeddings (token and position; with tied embeddings also the LM
    head)."""

    def __post_init__(self):
        o = "model."
        check_literals(self, owner=o)
        if self.path is None:
            key = self.preset.replace("-", "_").replace(".", "_").lower()
            require(key in ModelConfig.preset_names(), "preset",
                    f"preset={self.preset!r} is not a model preset; allowed: "
                    f"{list(ModelConfig.preset_names())} (or set model.path)", owner=o)
        for name in ("vocab_size", "num_layers", "hidden_size", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            check_int(self, name, low=1, optional=True, owner=o)
        check_int(self, "logits_chunk_size", low=0, optional=True, owner=o)
        check_int(self, "logits_keep_bytes", low=0, optional=True, owner=o)
        check_int(self, "logits_vocab_blocks", low=0, optional=True, owner=o)
        check_int(self, "attention_block_q", low=1, optional=True, owner=o)
        check_int(self, "attention_block_k", low=1, optional=True, owner=o)
        check_int(self, "lora_rank", low=0, owner=o)
        check_int(self, "freeze_layers", low=0, owner=o)
        check_number(self, "lora_alpha", low=0, low_open=True, owner=o)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where training examples come from and how they are batched (see `rlhf_jax.data`)."""

    path: str | None = None
    """Training data: a JSONL / parquet file, an HF `datasets` directory or a TFDS directory."""
    source_type: Literal["jsonl", "parquet", "hf_disk", "hf_files", "tfds"] | None = None
    """How to read `path` (guessed from it when unset)."""
    format: Literal["sft", "preference", "hh", "ranking", "kto", "prompt"] | None = None
    """Record format (`rlhf_jax.data.FORMATS`); unset uses the trainer's default."""
    split: str = "train"
    """Split of an HF `datasets` / TFDS source used for training."""
    eval_path: str | None = None
    """Held-out data in the same format (default: `path` with `eval_split`, if that exists)."""
    eval_split: str | None = None
    """Held-out split of `path` / `eval_path` (e.g. "test"); unset: no held-out set from `path`
    unless `eval_path` is given."""
    synthetic: str | None = None
    """Synthetic task of `rlhf_jax.data.synthetic` ("topic", "progression", "harmful_topic"):
    its records are generated when `path` is unset, and its character tokenizer is used (also
    for `path` files written in that vocabulary)."""
    num_train: int = 512
    """Number of synthetic training examples (pairs, rankings, ...)."""
    num_eval: int = 128
    """Number of synthetic held-out examples."""
    num_responses: int = 4
    """Responses per prompt of synthetic ranking data."""
    batch_size: int = 8
    """Global batch size (examples or pairs) per optimizer step, over all hosts."""
    eval_batch_size: int | None = None
    """Global held-out batch size (default: `batch_size`); a final incomplete batch is dropped."""
    max_prompt_length: int | None = 64
    """Prompts are truncated (keeping their end) to this many tokens."""
    max_length: int = 128
    """Prompt + response are truncated to this many tokens; batches are padded to it."""
    overlong: Literal["truncate", "skip", "error"] = "truncate"
    """What happens to an example longer than `max_prompt_length` / `max_length`: `truncate`
    it (prompts keep their end, responses their start), `skip` it, or stop with an `error`
    naming its file and line. Truncated prompts and responses and skipped examples are counted
    per split in the run summary and `summary.json`. `max_length` may not exceed the model's
    `max_position_embeddings` (checked before the model is built)."""
    buckets: tuple[int, ...] = ()
    """Padded lengths to choose from per batch (fewer FLOPs on short batches, one compile per
    bucket); empty pads every batch to `max_length` (one compile)."""
    packing: bool = False
    """Pack several sequences per row of `max_length` tokens (SFT and preference data)."""
    prefix_sharing: bool = False
    """One row per example with the prompt once and the responses after it, each attending to
    the prompt and itself only (`rlhf_jax.data.collate_prefix_shared`): the same log-probs and
    rewards for less compute (a pair costs `p + c + r` tokens instead of `2p + c + r`). For
    preference pairs (DPO family, reward models) and K-way rankings (reward models). Rows are
    padded to the smallest fitting multiple of `max_length / 4` up to `2 * max_length`, then of
    `max_length / 2` up to `K * max_length` (or one of `buckets`). Not with `packing`."""
    shuffle: bool = True
    """Shuffle the training examples every epoch (from the run seed)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad records raise (naming file and line) or are skipped and counted in the run summary."""
    margin_field: str | None = None
    """Record field holding the rater's preference-strength rating ("significantly better",
    "better", "slightly better", "negligibly better / unsure"), mapped to each pair's `margin`
    by `rating_scale` or `rating_margins` (Llama 2; `rlhf_jax.data.RatingMargins`) instead of
    the numeric `margin` field. An unknown rating is a bad record. Preference data only."""
    rating_scale: Literal["llama2_small", "llama2_large"] = "llama2_small"
    """Rating -> margin scale of Llama 2's Table 27: small 1, 2/3, 1/3, 0; large 3, 2, 1, 0."""
    rating_margins: dict[str, float] = dataclasses.field(default_factory=dict)
    """Your own rating -> margin table (replaces `rating_scale` when non-empty)."""

    def __post_init__(self):
        o = "data."
        check_literals(self, owner=o)
        check_int(self, "num_train", low=1, owner=o)
        check_int(self, "num_eval", low=0, owner=o)
        check_int(self, "num_responses", low=2, owner=o)
        check_int(self, "batch_size", low=1, owner=o)
        check_int(self, "eval_batch_size", low=1, optional=True, owner=o)
        check_int(self, "max_prompt_length", low=1, optional=True, owner=o)
        check_int(self, "max_length", low=1, owner=o)
        require(all(_is_int(b) and b >= 1 for b in self.buckets), "buckets",
                f"buckets must be positive integers, got {list(self.buckets)}", owner=o)
        require(not (self.packing and self.prefix_sharing), "prefix_sharing",
                "prefix_sharing needs preference pairs or rankings in rows of their own; it "
                "cannot be combined with packing (choose one)", owner=o)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a warmup + decay schedule, global-norm clipping and gradient accumulation."""

    learning_rate: float = 1e-4
    """Peak learning rate."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warmup: constant, linear to `end_learning_rate`, or cosine to it."""
    warmup_steps: int = 0
    """Linear warmup from 0 to `learning_rate` over this many optimizer steps."""
    end_learning_rate: float = 0.0
    """Learning rate at the end of the decay (linear / cosine)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.999
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip gradients to this global norm; None disables clipping."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step: the batch is split into this many micro-batches whose
    gradients are averaged inside the jitted step (a `lax.scan`)."""

    def __post_init__(self):
        o = "optimizer."
        check_literals(self, owner=o)
        check_number(self, "learning_rate", low=0, low_open=True, owner=o)
        check_number(self, "end_learning_rate", low=0, owner=o)
        require(self.end_learning_rate <= self.learning_rate, "end_learning_rate",
                f"end_learning_rate={self.end_learning_rate} must be <= learning_rate="
                f"{self.learning_rate} (the decay ends there)", owner=o)
        check_int(self, "warmup_steps", low=0, owner=o)
        check_number(self, "weight_decay", low=0, owner=o)
        check_number(self, "b1", low=0, high=1, high_open=True, owner=o)
        check_number(self, "b2", low=0, high=1, high_open=True, owner=o)
        check_number(self, "eps", low=0, low_open=True, owner=o)
        check_number(self, "max_grad_norm", low=0, low_open=True, optional=True, owner=o)
        check_int(self, "grad_accum_steps", low=1, owner=o)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoint cadence and retention."""

    every_steps: int = 0
    """Save every this many steps (0: only at the end of the run and on SIGTERM)."""
    keep_last: int = 3
    """Keep the newest this many checkpoints."""
    resume: bool = True
    """Resume from the newest checkpoint in `output_dir/checkpoints` when one exists."""
    save_on_sigterm: bool = True
    """On SIGTERM (e.g. TPU preemption) save a checkpoint at the next step boundary and exit."""
    save_final: bool = True
    """Save a checkpoint when the run ends. False for runs held in memory (a sweep through
    `run_sft` / `run_rm` / `run_dpo`, which return the trained model): with `every_steps=0`
    and `save_on_sigterm=False` as well, the run writes no checkpoint at all (its config,
    metrics and summary are still written)."""

    def __post_init__(self):
        check_int(self, "every_steps", low=0, owner="checkpoint.")
        check_int(self, "keep_last", low=1, owner="checkpoint.")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go: metrics.jsonl always, plus TensorBoard, Weights & Biases, a console bar."""

    every_steps: int = 10
    """Write training metrics every this many steps (evaluation metrics whenever computed)."""
    tensorboard: bool = True
    """Write TensorBoard event files under `output_dir/tensorboard`."""
    wandb: bool = False
    """Log to Weights & Biases (needs `wandb` installed and configured)."""
    wandb_project: str = "rlhf_jax"
    """Weights & Biases project name."""
    progress: Literal["tqdm", "rich", "none"] = "tqdm"
    """Console progress bar."""

    def __post_init__(self):
        check_literals(self, owner="logging.")
        check_int(self, "every_steps", low=1, owner="logging.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fields every training run has. Trainer configs extend this dataclass."""

    output_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, tensorboard/ and checkpoints/ go here."""
    seed: int = 0
    """Seed of every PRNG key in the run (init, data order, sampling)."""
    num_steps: int = 100
    """Number of optimizer steps."""
    eval_every: int = 0
    """Evaluate on the held-out set every this many steps (0: only at the end)."""
    eval_batches: int | None = None
    """Number of held-out batches per evaluation (None: the whole held-out set)."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """On a non-finite loss or gradient: skip that update and count it, or stop the run with an
    error (no checkpoint of a poisoned state is ever written either way)."""
    max_consecutive_skips: int = 10
    """Under `nan_policy="skip"`, stop the run with an error after this many consecutive skipped
    (non-finite) updates."""
    overwrite: bool = False
    """Start over in a run directory that already holds checkpoints: delete them (and the old
    config.yaml, metrics.jsonl, summary.json) first. Without it, `--checkpoint.no-resume` into
    such a directory is refused."""
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    """Device mesh (`rlhf_jax.sharding.MeshConfig`): sizes of the data / fsdp / tensor axes."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    def __post_init__(self):
        check_literals(self)
        check_int(self, "seed", low=0, high=2**31 - 1)
        check_int(self, "num_steps", low=0)
        check_int(self, "eval_every", low=0)
        check_int(self, "max_consecutive_skips", low=1)
        check_int(self, "eval_batches", low=1, optional=True)
        for name, cls in (("model", ModelSpec), ("data", DataSpec),
                          ("optimizer", OptimizerConfig), ("mesh", MeshConfig),
                          ("checkpoint", CheckpointConfig), ("logging", LoggingConfig)):
            require(isinstance(getattr(self, name), cls), name,
                    f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain-Python dict (tuples as lists) of a config dataclass, for YAML/JSON."""

    def convert(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [convert(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        return value

    return convert(config)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks/converts a YAML value to the annotated field type, naming `where` on error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return config_from_dict(tp, value, where=where)
    if origin in (tuple, Sequence, list) or tp in (tuple, list):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-4` (an exponent without a dot) as a string; accept it
            # as a number, as the command line does.
            try:
                return float(value.strip().replace("_", ""))
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got the string {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def config_from_dict(cls: type, data: Mapping[str, Any], *, where: str = "config") -> Any:
    """Builds config dataclass `cls` from a (possibly partial) nested mapping.

    Fields missing from `data` keep their defaults; unknown keys and wrongly typed values raise
    `ConfigError` naming the dotted field path (`where.field`) and the allowed fields/values.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {unknown} for {cls.__name__}; allowed: {sorted(fields)}",
            path=f"{where}.{unknown[0]}",
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except FieldError as e:  # a field out of range: name it by its path from the top
        raise FieldError(e.detail, field=e.field, owner=f"{where}.",
                         path=f"{where}.{e.field}") from None
    except ConfigError:
        raise
    except ValueError as e:  # e.g. MeshConfig's own checks
        raise ConfigError(f"{where}: {e}", path=where) from None


# ---------------------------------------------------------------------------------------------
# YAML files
# ---------------------------------------------------------------------------------------------


def _key_lines(text: str) -> dict[str, int]:
    """Maps dotted key paths of a YAML mapping document to their 1-based line numbers."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key, val in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                lines[path] = key.start_mark.line + 1
                walk(val, path)

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return lines


def config_from_yaml(cls: type, path: str | os.PathLike) -> Any:
    """Reads config dataclass `cls` from a YAML file; errors name the file, line and field."""
    path = os.fspath(path)
    try:
        text = epath.Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        data = {}
    try:
        return config_from_dict(cls, data, where="config")
    except ConfigError as e:
        message = str(e)
        dotted = (e.path or message.split(":", 1)[0]).removeprefix("config.").split("[", 1)[0]
        line = _key_lines(text).get(dotted)
        location = f"{path}, line {line}" if line else path
        raise ConfigError(f"{location}: {message}") from None


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML (readable back with `config_from_yaml`); `path` is
    local or a ``gs://`` URI."""
    epath.Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def load_config(
    cls: type, argv: Sequence[str] | None = None, *, prog: str | None = None
) -> Any:
    """Parses `[--config FILE] [overrides...]` into config dataclass `cls` with tyro.

    The YAML file (if any) supplies the defaults that tyro shows in `--help` and that the
    command-line overrides replace.
    """

    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file name")
            config_path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
            i += 1
            continue
        rest.append(arg)
        i += 1
    default = config_from_yaml(cls, config_path) if config_path else cls()
    description = (cls.__doc__ or "").strip() + (
        "\n\nPass --config FILE (YAML) to set defaults; the options below override it."
    )
    return tyro.cli(cls, default=default, args=rest, prog=prog, description=description)


__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DType",
    "FieldError",
    "DataSpec",
    "LoggingConfig",
    "MeshConfig",
    "ModelSpec",
    "OptimizerConfig",
    "TrainConfig",
    "check_int",
    "check_literals",
    "check_number",
    "config_from_dict",
    "config_from_yaml",
    "config_to_dict",
    "load_config",
    "require",
    "save_config",
]
