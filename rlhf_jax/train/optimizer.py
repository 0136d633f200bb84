"""The optimizer of a run from its `OptimizerConfig`: global-norm clipping, then AdamW with a
linear warmup and a constant / linear / cosine decay (`make_optimizer`, `make_schedule`).

Imports only optax and the config; every trainer (offline and online) builds its optimizer here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.train.config import OptimizerConfig


def make_schedule(config: OptimizerConfig, num_steps: int) -> optax.Schedule:
    """Learning-rate schedule: linear warmup from 0, then constant / linear / cosine decay.

    Over `num_steps` optimizer steps: `warmup_steps` linear steps from 0 to `learning_rate`,
    then the decay reaches `end_learning_rate` at `num_steps` (constant stays at the peak).
    """
    peak = config.learning_rate
    warmup = max(int(config.warmup_steps), 0)
    decay_steps = max(int(num_steps) - warmup, 1)
    if config.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif config.schedule == "linear":
        main = optax.linear_schedule(peak, config.end_learning_rate, decay_steps)
    elif config.schedule == "cosine":
        alpha = config.end_learning_rate / peak if peak else 0.0
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=alpha)
    else:
        raise ValueError(
            f"optimizer.schedule={config.schedule!r}; allowed: 'constant', 'linear', 'cosine'"
        )
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _decay_mask(params):
    """Weight decay on matrices only (not on biases, norms or other vectors)."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(
    config: OptimizerConfig, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)`: global-norm clipping then AdamW with `make_schedule`.

    Gradient accumulation is not part of `tx`: `make_train_step` averages `grad_accum_steps`
    micro-batch gradients inside the step, so `num_steps` counts optimizer updates.
    """
    if config.grad_accum_steps < 1:
        raise ValueError(f"optimizer.grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
    schedule = make_schedule(config, num_steps)
    parts = []
    if config.max_grad_norm is not None and config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


@functools.lru_cache(maxsize=64)
def cached_optimizer(
    config: OptimizerConfig, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer`, memoised on the (frozen, hashable) config so that trainers built twice
    from one config share their jitted functions' compilation cache (the online trainers key
    their jitted update on the optimizer)."""
    return make_optimizer(config, num_steps)


__all__ = ["cached_optimizer", "make_optimizer", "make_schedule"]
