"""KL-coefficient controllers as optax-style pure ``init`` / ``update`` pairs."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax.numpy as jnp

from rlhf_jax.losses._checks import check_value


class KLControllerState(NamedTuple):
    """The current KL coefficient (float32 scalar)."""

    kl_coef: chex.Array


class KLController(NamedTuple):
    """``init() -> state`` and ``update(state, current_kl, n_steps) -> state`` (both pure)."""

    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, chex.Array, chex.Array], KLControllerState]


def adaptive_kl_controller(init_kl_coef: float, target: float, horizon: float) -> KLController:
    r"""Adaptive KL coefficient of Ziegler et al. (2019), as lm-human-preferences and TRL.

    .. math::
        e = \mathrm{clip}\Big(\frac{\mathrm{KL}}{\mathrm{KL}_{\mathrm{target}}} - 1,\ -0.2,\ 0.2\Big),\qquad
        \beta \leftarrow \beta\,\Big(1 + e\,\frac{n_{\mathrm{steps}}}{H}\Big)

    ``update`` is pure and jittable: ``state = ctl.update(state, kl, n_steps)``.

    Args:
      init_kl_coef: initial :math:`\beta`.
      target: target KL :math:`\mathrm{KL}_{\mathrm{target}}` (> 0).
      horizon: :math:`H` (> 0), in the same unit as ``n_steps`` (typically samples).

    Returns:
      :class:`KLController`.
    """
    check_value("init_kl_coef", init_kl_coef, low=0.0)
    check_value("target", target, low=0.0, low_open=True)
    check_value("horizon", horizon, low=0.0, low_open=True)

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))

    def update(state: KLControllerState, current_kl, n_steps) -> KLControllerState:
        error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
        mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon
        return KLControllerState(kl_coef=state.kl_coef * mult)

    return KLController(init=init, update=update)


def fixed_kl_controller(kl_coef: float) -> KLController:
    """A controller whose coefficient never changes (``update`` returns the state unchanged)."""
    check_value("kl_coef", kl_coef, low=0.0)

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

    def update(state: KLControllerState, current_kl, n_steps) -> KLControllerState:
        del current_kl, n_steps
        return state

    return KLController(init=init, update=update)
