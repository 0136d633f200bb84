"""Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections.

`apply_lora(model, rank=r, alpha=a, targets=("q", "v"), rngs=...)` adds to every chosen
projection `W [in, out]` (in every layer) two `LoRAParam`s, `A [in, r]` and `B [r, out]`, and
computes `y = x W + (a / r) (x A) B`. `A` starts like PEFT's (uniform in +-1/sqrt(in)) and `B` at
zero, so the adapted model starts equal to the base model.

Targets are projection names: `"q"`, `"k"`, `"v"`, `"o"` (attention), `"gate"`, `"up"`, `"down"`
(MLP; GPT-2 has `"up"` = c_fc and `"down"` = c_proj), or `"all"` for every one of them.

Training only the adapters::

    apply_lora(model, rank=8, alpha=16, targets="all", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=LoRAParam)
    # or functionally:
    graphdef, lora_state, frozen = nnx.split(model, LoRAParam, ...)

`trainable_fraction(model)` reports the share of parameters that are adapters.

The base model (the reference policy of DPO / the KL anchor of PPO) is the same weights with the
adapters switched off: `lora_disabled(state)` returns `state` with every `LoRAParam` zeroed, so
`nnx.merge(graphdef, lora_disabled(state))(...)` gives the base model's output (exactly: the
adapter term is `(x A) B` with `A = B = 0`). `merge_lora(model)` folds `(a / r) A B` into `W` and
removes the adapters, for export (`save_pretrained` merges a copy automatically).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models.layers import LoRAParam, Proj, make_param

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

__all__ = [
    "LORA_TARGETS",
    "LoRAParam",
    "apply_lora",
    "count_params",
    "has_lora",
    "lora_disabled",
    "merge_lora",
    "trainable_fraction",
]


def _target_projections(model: nnx.Module, targets: Sequence[str]):
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Proj) and path and path[-1] in targets and "layers" in path:
            yield path, module


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float | None = None,
    targets: str | Sequence[str] = ("q", "v"),
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Attaches rank-`rank` adapters with scale `alpha / rank` (alpha defaults to rank) to the
    projections named in `targets`, in place; returns `model`."""
    if isinstance(targets, str):
        targets = LORA_TARGETS if targets == "all" else (targets,)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; allowed: {LORA_TARGETS} or 'all'")
    if int(rank) <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    found = list(_target_projections(model, targets))
    if not found:
        raise ValueError(f"no projection named {targets} found in {type(model).__name__}")
    for _, proj in found:
        if proj.lora_scale is not None:
            raise ValueError("LoRA adapters are already attached; call merge_lora first")
        dtype = proj.kernel[...].dtype
        fan_in = int(np.prod(proj.in_shape))
        bound = 1.0 / math.sqrt(fan_in)
        a = make_param(rngs, proj.in_shape + (rank,), proj.in_names + ("lora_rank",),
                       dtype=dtype, init="zeros", stack=proj.stack, kind=LoRAParam)
        a_shape = a[...].shape
        a[...] = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound,
                                    bound).astype(dtype)
        b = make_param(None, (rank,) + proj.out_shape, ("lora_rank",) + proj.out_names,
                       dtype=dtype, init="zeros", stack=proj.stack, kind=LoRAParam)
        proj.lora_a = a
        proj.lora_b = b
        proj.lora_scale = alpha / rank
    return model


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(m, Proj) and m.lora_scale is not None
               for _, m in nnx.iter_graph(model))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel, `W <- W + (alpha / r) A B`, and removes it."""
    for _, proj in nnx.iter_graph(model):
        if not isinstance(proj, Proj) or proj.lora_scale is None:
            continue
        kernel = proj.kernel[...]
        a = proj.lora_a[...].astype(jnp.float32)
        b = proj.lora_b[...].astype(jnp.float32)
        n_in = len(proj.in_shape)
        stacked = kernel.ndim - n_in - len(proj.out_shape)
        a2 = a.reshape(a.shape[:stacked] + (-1, a.shape[-1]))
        b2 = b.reshape(b.shape[:stacked + 1] + (-1,))
        delta = jnp.einsum("...ir,...ro->...io", a2, b2) * proj.lora_scale
        proj.kernel[...] = (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(
            kernel.dtype)
        del proj.lora_a
        del proj.lora_b
        proj.lora_scale = None
    return model


def lora_disabled(state: Any) -> Any:
    """`state` (an `nnx.State`, or any tree of `nnx.Variable`s) with every `LoRAParam` set to
    zero: merged into the graph definition it computes the base model."""

    def zero(x):
        if isinstance(x, LoRAParam):
            return x.replace(jnp.zeros_like(x[...]))
        return x

    return jax.tree.map(zero, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def count_params(model_or_state: Any, filter: Any = nnx.Param) -> int:
    """Number of scalar parameters selected by the NNX `filter`."""
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, filter)
    else:
        state = nnx.filter_state(model_or_state, filter)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def trainable_fraction(model: nnx.Module) -> float:
    """`#LoRAParam / #Param` (adapters included in the total)."""
    total = count_params(model, nnx.Param)
    return count_params(model, LoRAParam) / max(total, 1)
