"""From a run's config to a runnable step: the model and tokenizer a `ModelSpec` / `DataSpec`
names, which variables train, and `setup_training` (mesh, optimizer, sharded `TrainState`,
jitted, donated, sharded step).

`setup_training(config, model, loss_fn)` is the one call a trainer needs between building its
model and calling `rlhf_jax.train.loop.fit`::

    model = build_model(config.model, seed=config.seed)
    setup = setup_training(config, model, my_loss)
    result = fit(config, step_fn=setup.step_fn, state=setup.state,
                 train_batches=loader, put_batch=setup.put_batch)

(`rlhf_jax.train.run.run_training` does exactly this plus the held-out evaluator.)
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.data.synthetic import build_tokenizer
from rlhf_jax.models import (
    CausalLM,
    LoRAParam,
    ModelConfig,
    RewardModel,
    ValueModel,
    apply_lora,
    config_from_hf,
    from_pretrained,
    has_lora,
    load_tokenizer,
)
from rlhf_jax.train.config import DataSpec, ModelSpec, TrainConfig
from rlhf_jax.train.loop import jit_train_step
from rlhf_jax.train.optimizer import cached_optimizer, is_stacked
from rlhf_jax.train.state import LossFn, TrainState, create_train_state, make_train_step

# ---------------------------------------------------------------------------------------------
# models and tokenizers
# ---------------------------------------------------------------------------------------------

MODEL_KINDS = ("causal_lm", "reward", "value")
_ARCH_OVERRIDES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                   "max_position_embeddings", "remat")


def model_config(spec: ModelSpec) -> ModelConfig:
    """The `ModelConfig` a `ModelSpec` describes (preset + overrides, or a Hugging Face
    directory, local or ``gs://``)."""
    if spec.path is not None:
        config_file = epath.Path(spec.path) / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"model.path={spec.path!r}: no config.json in that directory")
        config = config_from_hf(json.loads(config_file.read_text()), where=str(config_file))
    else:
        overrides = {k: getattr(spec, k) for k in _ARCH_OVERRIDES if getattr(spec, k) is not None}
        num_heads = overrides.pop("num_heads", None)
        config = ModelConfig.preset(spec.preset, **overrides)
        if num_heads is not None:  # multi-head attention with the new head count
            config = config.replace(num_heads=num_heads, num_kv_heads=num_heads)
    runtime = {k: getattr(spec, k) for k in ("logits_chunk_size", "logits_keep_bytes",
                                             "logits_vocab_blocks", "attention_impl",
                                             "attention_block_q", "attention_block_k")
               if getattr(spec, k) is not None}
    if runtime:
        config = config.replace(**runtime)
    return config.replace(dtype=spec.dtype, param_dtype=spec.param_dtype)


def build_model(
    spec: ModelSpec,
    *,
    kind: str = "causal_lm",
    head_names: Sequence[str] = ("reward",),
    seed: int = 0,
    load_weights: bool = True,
) -> nnx.Module:
    """Builds the model a `ModelSpec` describes, with LoRA adapters when `spec.lora_rank > 0`.

    Args:
      spec: the model spec (preset or local HF directory, dtypes, LoRA).
      kind: `"causal_lm"`, `"reward"` (a `RewardModel` with `head_names`) or `"value"`.
      head_names: reward heads (kind `"reward"` only).
      seed: initialisation seed (random init, fresh heads and LoRA adapters).
      load_weights: read the weights of ``spec.path``; with False only its ``config.json`` is
        read and the model is randomly initialised (a skeleton to restore a checkpoint into).

    A reward/value model built from a causal-LM directory copies its backbone and gets a fresh
    head.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r}; allowed: {MODEL_KINDS}")
    rngs = nnx.Rngs(seed)
    if spec.path is not None and load_weights:
        lm = from_pretrained(spec.path, dtype=spec.dtype, param_dtype=spec.param_dtype)
        if kind == "causal_lm":
            model = lm
        elif kind == "reward":
            model = RewardModel.from_causal_lm(lm, head_names=tuple(head_names), rngs=rngs)
        else:
            model = ValueModel.from_causal_lm(lm, rngs=rngs)
    else:
        config = model_config(spec)
        if kind == "causal_lm":
            model = CausalLM(config, rngs=rngs)
        elif kind == "reward":
            model = RewardModel(config, head_names=tuple(head_names), rngs=rngs)
        else:
            model = ValueModel(config, rngs=rngs)
    if spec.lora_rank > 0:
        targets = spec.lora_targets or ("q", "v")
        apply_lora(model, rank=spec.lora_rank, alpha=spec.lora_alpha, targets=targets,
                   rngs=nnx.Rngs(seed + 1))
    return model


def trainable_filter(model: nnx.Module) -> Any:
    """Which variables the optimizer updates: every `nnx.Param`, or with LoRA adapters only the
    adapters plus any freshly initialised head (`score_head`, `value_head`)."""
    if not has_lora(model):
        return nnx.Param
    return nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.Any(nnx.PathContains("score_head"),
                                                         nnx.PathContains("value_head"))))


EMBEDDINGS = nnx.Any(nnx.PathContains("embed"), nnx.PathContains("pos_embed"))
"""The input embeddings (token and learned position embeddings). With tied embeddings
(GPT-2, ``tie_word_embeddings``) the token embedding is also the LM head."""


def freeze_filter(trainable: Any, spec: ModelSpec) -> Any:
    """`trainable` without the embeddings when `spec.freeze_embeddings` (they join the train
    state's ``frozen`` part: no gradient step, no optimizer state). The bottom layers
    (`spec.freeze_layers`) are stacked with the others and frozen by the optimizer instead
    (`rlhf_jax.train.optimizer.freeze_bottom_layers`)."""
    if not spec.freeze_embeddings:
        return trainable
    return nnx.All(trainable, nnx.Not(EMBEDDINGS))


class TrainableCount(NamedTuple):
    """Parameter counts of a train state: `trainable` scalars (frozen layer rows excluded) of
    `total` (every `nnx.Param` in the state's ``params`` and ``frozen`` parts; for a DPO run
    with the reference in the graph, the reference's too)."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)


def count_trainable(state: TrainState, *, freeze_layers: int = 0) -> TrainableCount:
    """The `TrainableCount` of `state` when the optimizer freezes the bottom `freeze_layers`
    rows of every stacked layer parameter (`ModelSpec.freeze_layers`)."""
    is_var = lambda x: isinstance(x, nnx.Variable)

    def sizes(tree, frozen_rows):
        for leaf in jax.tree.leaves(tree, is_leaf=is_var):
            if not isinstance(leaf, nnx.Param):
                continue
            shape = leaf.get_value().shape
            rows = min(frozen_rows, shape[0]) if is_stacked(leaf) and shape else 0
            yield int(np.prod(shape)) - rows * int(np.prod(shape[1:]))

    trainable = sum(sizes(state.params, freeze_layers))
    total = sum(sizes(state.params, 0)) + sum(sizes(state.frozen, 0))
    return TrainableCount(trainable=trainable, total=total)


def report_trainable(count: TrainableCount, *, what: str = "model") -> None:
    """Prints ``trainable parameters of <what>: T of N (F%)`` to stderr (process 0), at a run's
    start, whatever freezes parameters (LoRA, `model.freeze_layers`, `model.freeze_embeddings`)."""
    if jax.process_index() == 0:
        print(f"trainable parameters of {what}: {count.trainable:,} of {count.total:,} "
              f"({count.fraction:.2%})", file=sys.stderr)


def load_tokenizer_for(spec: DataSpec, model: ModelSpec) -> Any:
    """The tokenizer: the synthetic tasks' character tokenizer when `data.synthetic` is set,
    else `model.tokenizer_path` or the model directory's."""
    if spec.synthetic is not None:
        return build_tokenizer()
    path = model.tokenizer_path or model.path
    if path is None:
        raise ValueError(
            "data.path is set but no tokenizer is known: set model.tokenizer_path or model.path"
        )
    return load_tokenizer(path)


def check_vocab(model: nnx.Module, tokenizer: Any) -> None:
    """Raises if the tokenizer has more tokens than the model's vocabulary."""
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; "
            "use a larger model.vocab_size"
        )

# ---------------------------------------------------------------------------------------------
# mesh, sharded state and jitted step
# ---------------------------------------------------------------------------------------------


class TrainSetup(NamedTuple):
    """What `setup_training` returns.

    Attributes:
      graphdef: the model's static graph definition (`nnx.merge(graphdef, state.params,
        state.frozen)` rebuilds it).
      state: the sharded initial `TrainState`.
      state_sharding: the `TrainState` pytree of `NamedSharding`s.
      mesh: the device mesh.
      tx: the optax transformation.
      schedule: the learning-rate schedule.
      step_fn: the jitted, sharded, state-donating `step(state, batch) -> (state, metrics)`.
      put_batch: host batch -> device batch sharded over `("data", "fsdp")`.
    """

    graphdef: nnx.GraphDef
    state: TrainState
    state_sharding: Any
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    step_fn: Callable
    put_batch: Callable


def shard_train_state(state: TrainState, mesh: jax.sharding.Mesh) -> tuple[TrainState, Any]:
    """`(sharded state, shardings)`: parameters and optimizer moments by their logical axis
    names (`rlhf_jax.sharding`), everything else replicated."""
    shardings = sharding.state_shardings(state, mesh)
    return jax.device_put(state, shardings), shardings


class _TreeKey:
    """A pytree (e.g. of shardings) as a cache key: equal when its leaves and structure are."""

    def __init__(self, tree: Any):
        self.tree = tree
        leaves, treedef = jax.tree.flatten(tree)
        self._key = (tuple(leaves), treedef)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TreeKey) and self._key == other._key


@functools.lru_cache(maxsize=32)
def _cached_step(loss_fn, tx, schedule, graphdef, grad_accum_steps, shardings: _TreeKey, mesh,
                 donate, traced_hparams) -> Callable:
    return _jitted_step(loss_fn, tx, schedule, graphdef, grad_accum_steps, shardings, mesh,
                        donate, traced_hparams)


def _jitted_step(loss_fn, tx, schedule, graphdef, grad_accum_steps, shardings: _TreeKey, mesh,
                 donate, traced_hparams) -> Callable:
    step = make_train_step(loss_fn, tx, graphdef=graphdef, grad_accum_steps=grad_accum_steps,
                           schedule=schedule, traced_hparams=traced_hparams)
    return jit_train_step(step, state_sharding=shardings.tree,
                          batch_sharding=sharding.batch_sharding(mesh), donate=donate,
                          traced_hparams=traced_hparams)


def train_step_fn(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    graphdef: nnx.GraphDef,
    state_sharding: Any,
    mesh: jax.sharding.Mesh,
    schedule: optax.Schedule | None = None,
    grad_accum_steps: int = 1,
    donate: bool = True,
    traced_hparams: bool = False,
) -> Callable:
    """The jitted, sharded step of `make_train_step` (`jit_train_step`), cached per graph.

    Two calls with equal arguments return the same jitted function, so a run whose step
    matches an earlier run's in this process (same loss function, optimizer object, model
    graph, shardings and options) reuses its compiled program instead of tracing and compiling
    again. ``loss_fn`` is compared by value when it is hashable by value (a `NamedTuple` or
    frozen dataclass with ``__call__``, e.g. `rlhf_jax.train.dpo.PreferenceLoss`), by identity
    otherwise (a ``functools.partial`` or closure: no reuse across runs); an unhashable one
    is not cached. Numeric hyper-parameters that are traced arguments (`traced_hparams`) are
    not part of the key, which is what lets a sweep over them share one executable.
    """
    args = (loss_fn, tx, schedule, graphdef, grad_accum_steps, _TreeKey(state_sharding), mesh,
            donate, traced_hparams)
    try:
        hash(args)
    except TypeError:
        return _jitted_step(*args)
    return _cached_step(*args)


def setup_training(
    config: TrainConfig,
    model: nnx.Module,
    loss_fn: LossFn,
    *,
    trainable: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    num_steps: int | None = None,
    donate: bool = True,
    hparams: Any = None,
) -> TrainSetup:
    """Mesh, optimizer, sharded train state and jitted step for `model` and `loss_fn`.

    The optimizer comes from `cached_optimizer` and the jitted step from `train_step_fn`, so
    runs of one process that build the same step (a sweep) compile it once.

    Args:
      config: the run config (its `mesh`, `optimizer`, `seed` and `num_steps` are used).
      model: the NNX model to train (split here; do not use it afterwards).
      loss_fn: `loss_fn(model, batch, rng) -> (loss, metrics)`, or with `hparams`
        `loss_fn(model, batch, rng, hparams)`.
      trainable: variable filter for the optimizer (default: `trainable_filter(model)`);
        `config.model.freeze_embeddings` removes the embeddings from it, and
        `config.model.freeze_layers` wraps the optimizer in `freeze_bottom_layers`.
      mesh: the device mesh (default: `sharding.make_mesh(config.mesh)`).
      num_steps: optimizer steps the schedule spans (default: `config.num_steps`).
      donate: donate the state to the step.
      hparams: a pytree of numbers (e.g. ``{"beta": 0.1}``) passed to `loss_fn` as traced
        float32 arrays: arguments of the compiled step, not constants in it, so runs that
        differ only in these values share one executable. ``step_fn(state, batch)`` supplies
        them.
    """
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    freeze_layers = config.model.freeze_layers
    tx, schedule = cached_optimizer(config.optimizer, num_steps or config.num_steps,
                                    freeze_layers=freeze_layers)
    trainable = trainable if trainable is not None else trainable_filter(model)
    trainable = freeze_filter(trainable, config.model)
    graphdef, state = create_train_state(model, tx, seed=config.seed, trainable=trainable)
    report_trainable(count_trainable(state, freeze_layers=freeze_layers),
                     what=type(model).__name__)
    state, state_sharding = shard_train_state(state, mesh)
    jitted = train_step_fn(loss_fn, tx, graphdef=graphdef, state_sharding=state_sharding,
                           mesh=mesh, schedule=schedule,
                           grad_accum_steps=config.optimizer.grad_accum_steps, donate=donate,
                           traced_hparams=hparams is not None)
    step_fn = jitted
    if hparams is not None:
        values = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), hparams)
        step_fn = lambda state, batch: jitted(state, batch, values)  # noqa: E731
    return TrainSetup(graphdef=graphdef, state=state, state_sharding=state_sharding, mesh=mesh,
                      tx=tx, schedule=schedule, step_fn=step_fn,
                      put_batch=lambda batch: sharding.shard_batch(batch, mesh))


__all__ = [
    "EMBEDDINGS",
    "MODEL_KINDS",
    "TrainSetup",
    "TrainableCount",
    "build_model",
    "check_vocab",
    "count_trainable",
    "freeze_filter",
    "load_tokenizer_for",
    "model_config",
    "report_trainable",
    "setup_training",
    "shard_train_state",
    "train_step_fn",
    "trainable_filter",
]
