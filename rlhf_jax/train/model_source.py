"""Causal LMs for inference, named by one string: a training run, a Hugging Face directory or a
preset. The data-making commands (`rlhf-jax label`, `rlhf-jax cai`) load their policies and
judges this way.

A model source is one of:

- a training run's output directory (it holds ``config.yaml`` and ``checkpoints/``): the policy
  of its newest checkpoint, or of step ``N`` with ``DIR@N``, rebuilt by
  `rlhf_jax.train.export.load_policy` (SFT, DPO family, PPO, GRPO/RLOO, rejection sampling). Its
  tokenizer is the run's (`rlhf_jax.train.builders.load_tokenizer_for` on the run's config), and it
  keeps the dtypes it was trained with;
- a Hugging Face model directory (``config.json`` + safetensors), built by
  `rlhf_jax.train.builders.build_model`; its tokenizer is the directory's;
- ``preset:NAME``: a randomly initialised `rlhf_jax.models.ModelConfig` preset (smoke tests),
  its vocabulary grown to the tokenizer's when smaller.

A tokenizer reference (``"synthetic"``: the synthetic tasks' character tokenizer; or a
tokenizer directory) replaces the run's or directory's tokenizer and is required for a preset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
from etils import epath
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.data.synthetic import build_tokenizer
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.hf import load_tokenizer
from rlhf_jax.train.builders import build_model, check_vocab, load_tokenizer_for
from rlhf_jax.train.config import DataSpec, DType, ModelSpec, config_from_dict
from rlhf_jax.train.export import load_policy
from rlhf_jax.train.loop import CONFIG_FILE

PRESET_PREFIX = "preset:"
SYNTHETIC_TOKENIZER = "synthetic"


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How a model is loaded and batched for inference."""

    tokenizer: str | None = None
    """"synthetic" (the synthetic tasks' character tokenizer) or a tokenizer directory (local or
    gs://); default: the run's tokenizer (a run directory) or the model directory's (required
    for a preset)."""
    dtype: DType = "float32"
    """Compute and parameter dtype of a Hugging Face directory or preset (a run keeps its own)."""
    batch_size: int = 8
    """Rows per jitted forward or sampling call (a multiple of the mesh's data x fsdp size)."""
    max_length: int | None = None
    """Longest text in tokens, generated tokens included (default: the model's context length)."""
    min_bucket: int = 64
    """Shortest padded length: texts are padded to powers of two >= this, so fewer shapes
    compile."""


@dataclasses.dataclass(frozen=True)
class LMSpec(InferenceOptions):
    """A causal LM to sample from: a training run directory (``DIR`` or ``DIR@STEP``), a Hugging
    Face model directory, or ``preset:NAME``."""

    source: str | None = None
    """Model source: a training run's output directory (optionally @STEP), a Hugging Face model
    directory (config.json + safetensors) or preset:NAME (random weights, for smoke tests)."""


class LoadedLM(NamedTuple):
    """A loaded model source.

    Attributes:
      model: the causal LM (on the mesh when one was given).
      tokenizer: its tokenizer.
      source: the source string as given.
      kind: ``"run"``, ``"hf"`` or ``"preset"``.
      step: the checkpoint step of a run, else None.
    """

    model: nnx.Module
    tokenizer: Any
    source: str
    kind: str
    step: int | None


def parse_source(source: str, *, field: str = "source") -> tuple[str, str, int | None]:
    """``(kind, path_or_preset, step)`` of a model source string (module docstring).

    Raises:
      ValueError: naming `field` when the string is empty or names neither a run directory, a
        Hugging Face directory nor a preset.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{field} is empty: name a run directory, a Hugging Face model "
                         "directory or preset:NAME")
    if source.startswith(PRESET_PREFIX):
        name = source[len(PRESET_PREFIX):]
        if not name:
            raise ValueError(f"{field}={source!r}: name the preset after 'preset:'")
        return "preset", name, None
    path, step = source, None
    head, sep, tail = source.rpartition("@")
    if sep and tail.isdigit() and not epath.Path(source).exists():
        path, step = head, int(tail)
    if (epath.Path(path) / CONFIG_FILE).is_file():
        return "run", path, step
    if step is not None:
        raise ValueError(f"{field}={source!r}: @{step} selects a checkpoint of a training run, "
                         f"but {path!r} has no {CONFIG_FILE}")
    if (epath.Path(path) / "config.json").is_file():
        return "hf", path, None
    raise ValueError(f"{field}={source!r} is neither a training run directory (with "
                     f"{CONFIG_FILE}), a Hugging Face model directory (with config.json) nor "
                     f"{PRESET_PREFIX}NAME")


def load_tokenizer_ref(ref: str, *, field: str = "tokenizer") -> Any:
    """The tokenizer a reference names: ``"synthetic"`` or a tokenizer directory (local or
    ``gs://``)."""
    if ref == SYNTHETIC_TOKENIZER:
        return build_tokenizer()
    if not epath.Path(ref).is_dir():
        raise ValueError(f"{field}={ref!r} is neither {SYNTHETIC_TOKENIZER!r} nor a tokenizer "
                         "directory")
    return load_tokenizer(ref)


def load_lm(
    source: str,
    *,
    tokenizer: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    field: str = "source",
) -> LoadedLM:
    """Loads a model source (module docstring) and its tokenizer.

    Args:
      source: the model source string.
      tokenizer: a tokenizer reference replacing the source's own (required for a preset).
      dtype: compute and parameter dtype of a Hugging Face directory or preset.
      seed: initialisation seed of a preset.
      mesh: place the model's state on this mesh by its logical axes.
      field: the config field the source came from, for error messages.

    Raises:
      ValueError: naming `field` for a bad source, a preset without a tokenizer, a reward- or
        value-model run, or a tokenizer larger than the model's vocabulary.
    """
    kind, path, step = parse_source(source, field=field)
    tok_field = field.rpartition(".")[0] + ".tokenizer" if "." in field else "tokenizer"
    tok = load_tokenizer_ref(tokenizer, field=tok_field) if tokenizer is not None else None
    if kind == "run":
        model, step, run_config = load_policy(path, step=step)
        if tok is None:
            data = config_from_dict(DataSpec, run_config.get("data", {}), where="config.data")
            spec = config_from_dict(ModelSpec, run_config.get("model", {}), where="config.model")
            tok = load_tokenizer_for(data, spec)
    elif kind == "hf":
        if tok is None:
            has_tokenizer = any((epath.Path(path) / f).exists()
                                for f in ("tokenizer.json", "tokenizer_config.json"))
            if not has_tokenizer:
                raise ValueError(f"{field}={source!r} has no tokenizer files; set {tok_field}")
            tok = load_tokenizer_ref(path, field=field)
        model = build_model(ModelSpec(path=path, dtype=dtype, param_dtype=dtype), seed=seed)
    else:
        if tok is None:
            raise ValueError(f"{field}={source!r} is a preset: set {tok_field} ('synthetic' or a "
                             "tokenizer directory)")
        vocab = ModelConfig.preset(path).vocab_size
        spec = ModelSpec(preset=path, dtype=dtype, param_dtype=dtype,
                         vocab_size=max(vocab, len(tok)))
        model = build_model(spec, seed=seed)
    check_vocab(model, tok)
    if mesh is not None:
        sharding.shard_model(model, mesh)
    return LoadedLM(model=model, tokenizer=tok, source=source, kind=kind, step=step)


def describe(loaded: LoadedLM) -> dict[str, Any]:
    """A JSON-able description of a loaded source (for run summaries)."""
    config = loaded.model.config
    return {"source": loaded.source, "kind": loaded.kind, "step": loaded.step,
            "num_layers": config.num_layers, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "tokenizer_size": len(loaded.tokenizer)}


__all__ = [
    "InferenceOptions",
    "LMSpec",
    "LoadedLM",
    "PRESET_PREFIX",
    "SYNTHETIC_TOKENIZER",
    "describe",
    "load_lm",
    "load_tokenizer_ref",
    "parse_source",
]
