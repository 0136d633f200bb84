"""The train state pytree and the generic jittable optimizer step built around a loss function.

A model is split with `nnx.split(model, trainable, ...)` into a static graph definition and two
state pytrees: `params` (the variables the optimizer updates, by default every `nnx.Param`; for
LoRA only the adapters) and `frozen` (everything else: frozen base weights, reward-normalisation
gain/bias, buffers). `TrainState` holds those, the optax state, the step counter and the PRNG
key, and is what is jitted over, sharded, donated and checkpointed. The graph definition stays
on the host (`TrainState` never contains Python objects).

`make_train_step(loss_fn, tx, graphdef=...)` turns a trainer's loss
`loss_fn(model, batch, rng) -> (loss, metrics)` into a pure

    step(state, batch) -> (new_state, metrics)

that (1) splits the batch into `grad_accum_steps` micro-batches and averages their gradients
and metrics inside a `lax.scan`, (2) applies the optax update, and (3) skips the update when the
loss or the gradient norm is not finite, keeping parameters and optimizer state unchanged and
reporting `"train/nonfinite" = 1`. The step always adds these metrics:

- `train/grad_norm`: global L2 norm of the (accumulated, unclipped) gradient; of its trainable
  part only when the optimizer freezes some parameters and says which (a `tx` with a
  ``trainable(tree)`` attribute, e.g. `rlhf_jax.train.optimizer.freeze_bottom_layers`).
- `train/learning_rate`: the schedule's value at this step (when a schedule is given).
- `train/nonfinite`: 1.0 when the update was skipped for a non-finite loss/gradient, else 0.0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
"""`loss_fn(model, batch, rng) -> (scalar loss, {metric name: scalar})`."""


class BoundLoss(NamedTuple):
    """``fn(model, batch, rng, **kwargs)`` as a `LossFn` that hashes and compares by value (its
    function and keyword values), unlike ``functools.partial``: two runs whose losses are
    equal share one compiled step (`rlhf_jax.train.builders.train_step_fn`). Build it with
    `bind_loss`.

    Attributes:
      fn: the loss, ``fn(model, batch, rng, **kwargs) -> (loss, metrics)``.
      kwargs: ``((name, value), ...)``, sorted by name; the values must be hashable.
    """

    fn: Callable[..., tuple[jax.Array, dict]]
    kwargs: tuple[tuple[str, Any], ...]

    def __call__(self, model: nnx.Module, batch: Mapping[str, jax.Array],
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        return self.fn(model, batch, rng, **dict(self.kwargs))


def bind_loss(fn: Callable[..., tuple[jax.Array, dict]], **kwargs: Any) -> BoundLoss:
    """``fn`` with its keyword arguments fixed, as a `BoundLoss` (a hashable
    ``functools.partial``)."""
    return BoundLoss(fn, tuple(sorted(kwargs.items())))


class TrainState(NamedTuple):
    """Everything a training run updates, as one pytree of arrays.

    Attributes:
      step: int32 scalar, the number of completed steps (skipped updates included).
      params: `nnx.State` of the trainable variables.
      frozen: `nnx.State` of every other model variable (not updated by the optimizer).
      opt_state: the optax state of `params`.
      rng: uint32 raw PRNG key data (`jax.random.key_data`), split once per step.
    """

    step: jax.Array
    params: nnx.State
    frozen: nnx.State
    opt_state: optax.OptState
    rng: jax.Array


def split_model(model: nnx.Module, trainable: Any = nnx.Param):
    """`(graphdef, params, frozen)`: the trainable variables (filter `trainable`) and the rest."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    return graphdef, params, frozen


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """Rebuilds the NNX model from a graph definition and a train state."""
    return nnx.merge(graphdef, state.params, state.frozen)


def create_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    seed: int | jax.Array,
    trainable: Any = nnx.Param,
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits `model` and initialises the optimizer state. Returns `(graphdef, state)`.

    Args:
      model: the NNX model to train.
      tx: the optax transformation (see `rlhf_jax.train.optimizer.make_optimizer`).
      seed: int seed or PRNG key of the per-step randomness (`state.rng`).
      trainable: an `nnx` filter selecting the variables the optimizer updates.
    """
    graphdef, params, frozen = split_model(model, trainable)
    if isinstance(seed, int):
        key = jax.random.key(seed)
    else:
        key = seed
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=tx.init(params),
        rng=jnp.asarray(key, jnp.uint32),
    )
    return graphdef, state


def _split_microbatches(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
    def reshape(x):
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(
                f"grad_accum_steps={n} must divide the batch's leading axis; got shape {x.shape}"
            )
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(reshape, dict(batch))


def loss_and_grad(
    loss_fn: LossFn,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    grad_accum_steps: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array], nnx.State]:
    """`(loss, metrics, grads)` of `loss_fn`, averaged over `grad_accum_steps` micro-batches.

    The micro-batches are consecutive slices of the batch's leading axis; the loss, every metric
    and the gradient are the means of the per-micro-batch values.
    """

    def pure_loss(p, b, key):
        model = nnx.merge(graphdef, p, frozen)
        loss, metrics = loss_fn(model, b, key)
        return loss, metrics

    grad_fn = jax.value_and_grad(pure_loss, has_aux=True)
    if grad_accum_steps == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, metrics, grads

    micro = _split_microbatches(batch, grad_accum_steps)
    keys = jax.random.split(rng, grad_accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    (loss_shape, metrics_shape), _ = jax.eval_shape(grad_fn, params, first, keys[0])
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    init = (
        jnp.zeros(loss_shape.shape, jnp.float32),
        zeros(metrics_shape),
        jax.tree.map(jnp.zeros_like, params),
    )

    def body(carry, xs):
        b, key = xs
        (loss_i, metrics_i), grads_i = grad_fn(params, b, key)
        loss_acc, metrics_acc, grads_acc = carry
        return (
            loss_acc + loss_i,
            jax.tree.map(jnp.add, metrics_acc, metrics_i),
            jax.tree.map(jnp.add, grads_acc, grads_i),
        ), None

    (loss, metrics, grads), _ = jax.lax.scan(body, init, (micro, keys))
    scale = 1.0 / grad_accum_steps
    mean = lambda tree: jax.tree.map(lambda x: (x * scale).astype(x.dtype), tree)
    return loss * scale, mean(metrics), mean(grads)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    graphdef: nnx.GraphDef,
    grad_accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
    traced_hparams: bool = False,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Pure `step(state, batch) -> (state, metrics)` around a trainer's loss (see module doc).

    Args:
      loss_fn: `loss_fn(model, batch, rng) -> (loss, metrics)`; the model is the NNX module
        merged from the state, `rng` a fresh PRNG key for this step (or micro-batch). With
        `traced_hparams`, `loss_fn(model, batch, rng, hparams)`.
      tx: the optax transformation whose state is `state.opt_state`.
      graphdef: the graph definition returned by `create_train_state`.
      grad_accum_steps: micro-batches per step (must divide the batch size).
      schedule: the learning-rate schedule, reported as `train/learning_rate`.
      traced_hparams: the step is `step(state, batch, hparams)`, ``hparams`` a pytree of
        arrays (e.g. ``{"beta": 0.1}`` as float32 scalars) handed to `loss_fn`: numeric
        hyper-parameters that are arguments of the jitted step rather than constants of its
        program, so runs that differ only in them share one compiled step.

    Returns:
      A pure function, to be jitted (see `rlhf_jax.train.loop.jit_train_step`).
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    trainable_part = getattr(tx, "trainable", None)

    def step(state: TrainState, batch: Mapping[str, jax.Array], *hparams: Any):
        if len(hparams) != int(traced_hparams):
            raise TypeError(f"this step takes {2 + int(traced_hparams)} arguments "
                            f"(traced_hparams={traced_hparams}), got {2 + len(hparams)}")
        objective = ((lambda m, b, k: loss_fn(m, b, k, hparams[0])) if traced_hparams
                     else loss_fn)
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        loss, metrics, grads = loss_and_grad(
            objective,
            graphdef,
            state.params,
            state.frozen,
            batch,
            step_rng,
            grad_accum_steps=grad_accum_steps,
        )
        grad_norm = optax.tree.norm(grads if trainable_part is None else trainable_part(grads))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(params, opt_state):
            updates, new_opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        # A branch rather than an elementwise select of (new, old): with `where(finite, new,
        # old)` both the old and the new moments are live at once, so XLA copies every moment
        # (and parameter) buffer before updating it in place: a full extra copy of the
        # optimizer state in the step's temporaries.
        new_params, new_opt_state = jax.lax.cond(
            finite, apply, lambda params, opt_state: (params, opt_state),
            state.params, state.opt_state)
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            frozen=state.frozen,
            opt_state=new_opt_state,
            rng=jax.random.key_data(rng),
        )
        metrics = dict(metrics)
        metrics["train/grad_norm"] = grad_norm.astype(jnp.float32)
        metrics["train/nonfinite"] = (~finite).astype(jnp.float32)
        if schedule is not None:
            metrics["train/learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    return step


__all__ = [
    "BoundLoss",
    "LossFn",
    "TrainState",
    "bind_loss",
    "create_train_state",
    "loss_and_grad",
    "make_train_step",
    "merge_model",
    "split_model",
]
