"""Contrastive Preference Learning (CPL): preferences over segments under the regret model,
learned as a contrastive loss on the policy's own log-probs (no reward model, no RL)."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses._checks import (
    as_mask,
    check_choice,
    check_rank,
    check_same_shape,
    check_value,
    f32,
    is_static_zero,
    static_value,
)

CPL_BC_SEGMENTS = ("preferred", "both")


class CPLOutput(NamedTuple):
    """Per-pair CPL terms, all ``[B]`` float32.

    Attributes:
      loss: the objective per pair, ``cpl + bc_coeff * bc``.
      cpl: the (biased) contrastive term.
      bc: the behaviour-cloning term (mean negative log-likelihood), computed whatever
        ``bc_coeff`` is, so it can be logged.
      chosen_advantage: :math:`A^+`, the discounted sum of :math:`\\alpha` times the chosen
        segment's log-probs (log-ratios with a reference).
      rejected_advantage: :math:`A^-`, the same for the rejected segment. CPL's accuracy (the
        reference code's) is ``chosen_advantage > rejected_advantage``, without the bias.
    """

    loss: chex.Array
    cpl: chex.Array
    bc: chex.Array
    chosen_advantage: chex.Array
    rejected_advantage: chex.Array


def _discount_weights(mask: chex.Array, discount: float) -> chex.Array:
    """``discount ** k`` on real tokens, ``k`` the token's index among the row's real tokens
    (0 on the first), 0 on padding; so left padding or a masked prompt never shifts ``k``."""
    if static_value(discount) == 1.0:
        return mask
    k = jnp.cumsum(mask, axis=-1) - 1.0
    return jnp.where(mask > 0, jnp.power(jnp.float32(discount), jnp.maximum(k, 0.0)), 0.0)


def _masked_values(x: chex.Array, mask: chex.Array) -> chex.Array:
    """float32 ``x`` with padded entries replaced by 0 (NaN/inf there cannot leak)."""
    return jnp.where(mask > 0, f32(x), 0.0)


def _segment_advantage(token_logps, mask, ref_token_logps, *, alpha, discount) -> chex.Array:
    """:math:`\\alpha\\sum_t \\gamma^{k_t} m_t (\\log\\pi_t - \\log\\pi^{ref}_t)`, ``[B]``."""
    values = _masked_values(token_logps, mask)
    if ref_token_logps is not None:
        values = values - _masked_values(ref_token_logps, mask)
    return alpha * jnp.sum(values * _discount_weights(mask, discount), axis=-1)


def cpl_loss(
    chosen_token_logps: chex.Array,
    rejected_token_logps: chex.Array,
    chosen_mask: chex.Array,
    rejected_mask: chex.Array,
    *,
    alpha: float = 0.1,
    conservative_bias: float = 0.5,
    discount: float = 1.0,
    label: chex.Array | None = None,
    ref_chosen_token_logps: chex.Array | None = None,
    ref_rejected_token_logps: chex.Array | None = None,
    bc_coeff: float = 0.0,
    bc_segments: str = "preferred",
) -> CPLOutput:
    r"""Contrastive Preference Learning loss per preference pair (Hejna et al. 2023).

    Under the regret preference model with maximum-entropy RL, the optimal advantage is
    :math:`A^*(s, a) = \alpha \log \pi^*(a \mid s)`, so a preference between two segments
    becomes a contrastive loss on the policy's log-probs. With :math:`k_t` the index of token
    :math:`t` among its segment's real tokens (0 on the first, so prompt and padding positions
    never shift it):

    .. math::
        A^{\pm} = \alpha \sum_t \gamma^{k_t}\, m^{\pm}_t \log\pi(a^{\pm}_t \mid s^{\pm}_t)

        \mathcal{L}_{\mathrm{CPL}} = -p \log\sigma(A^+ - \lambda A^-)
            - (1 - p)\log\sigma(A^- - \lambda A^+)

    with :math:`\alpha` = ``alpha``, :math:`\gamma` = ``discount``, :math:`\lambda` =
    ``conservative_bias`` and :math:`p` = ``label`` (1 when the chosen segment is preferred, the
    default). :math:`\lambda = 1` is the paper's CPL objective; :math:`\lambda < 1` is its
    conservative (asymmetric) regulariser, which scales the negative segment's term: since log-probs are :math:`\le 0`, it asks more likelihood of the
    in-distribution positive segment than of a low-likelihood negative one. The reference code
    (github.com/jhejna/cpl, ``biased_bce_with_logits``) applies :math:`\lambda` to whichever
    segment the soft label makes negative, as here.

    With reference log-probs (``ref_chosen_token_logps`` and ``ref_rejected_token_logps``) the
    sums run over :math:`\log\pi - \log\pi_{\mathrm{ref}}` instead: the reference code's
    ``CPL_KL`` variant. With :math:`\lambda = 1`, :math:`\gamma = 1`, :math:`p = 1` this equals
    DPO's sigmoid loss with :math:`\beta = \alpha` on summed log-probs, and without a reference
    it equals CPO's sigmoid loss.

    **BC regulariser.** The paper pre-trains with behaviour cloning and its code adds a BC term
    ``loss = cpl + bc_coeff * bc`` (``bc_coeff``; the ``cpl_bc`` configs use ``bc_coeff=1`` with
    :math:`\lambda = 1`, the ``cpl`` configs ``bc_coeff=0`` with :math:`\lambda = 0.5`). It is an
    option of this function, as in the code, computed on the raw log-probs (never the
    log-ratios), undiscounted, as a mean negative log-likelihood per pair:

    * ``bc_segments="preferred"`` (the code's ``bc_data="pos"``):
      :math:`p\,\mathrm{NLL}^+ + (1-p)\,\mathrm{NLL}^-`,
      :math:`\mathrm{NLL} = -\sum_t m_t \log\pi_t / \max(\sum_t m_t, 1)`.
    * ``bc_segments="both"`` (the code's ``bc_data="all"``, the default of its configs): the
      token mean over both segments of the pair.

    The code averages over every token of the batch; with equal-length segments (the paper's
    setting) the batch mean of this ``bc`` is that same number. For a batch-level token mean
    over ragged segments, use ``masked_mean`` on the token log-probs yourself.

    The defaults :math:`\alpha = 0.1`, :math:`\lambda = 0.5` are the reference code's MetaWorld
    configs; :math:`\alpha` plays the role of DPO's :math:`\beta` on summed log-probs. Reduce
    ``loss`` with ``jnp.mean`` over pairs (the code's mean).

    Args:
      chosen_token_logps: ``[B, Tc]`` per-token log-probs of the chosen segments.
      rejected_token_logps: ``[B, Tr]`` per-token log-probs of the rejected segments.
      chosen_mask: ``[B, Tc]`` 1 on the chosen segment's scored tokens (float or bool).
      rejected_mask: ``[B, Tr]`` 1 on the rejected segment's scored tokens.
      alpha: temperature :math:`\alpha > 0`.
      conservative_bias: :math:`\lambda \in (0, 1]` (the code's ``contrastive_bias``).
      discount: :math:`\gamma \in (0, 1]` over segment positions (1: plain sums).
      label: optional ``[B]`` probability :math:`p \in [0, 1]` that the chosen segment is
        preferred (soft labels; 0.5 for ties). Default 1.
      ref_chosen_token_logps: optional ``[B, Tc]`` reference log-probs (CPL-KL).
      ref_rejected_token_logps: optional ``[B, Tr]``; both or neither.
      bc_coeff: weight of the BC term, :math:`\ge 0`.
      bc_segments: one of ``CPL_BC_SEGMENTS``.

    Returns:
      :class:`CPLOutput` of ``[B]`` float32 arrays; padded positions get exactly zero gradient.

    References:
      Hejna, Rafailov, Sikchi, Finn, Niekum, Knox, Sadigh 2023, "Contrastive Preference
      Learning: Learning from Human Feedback without RL" (ICLR 2024); github.com/jhejna/cpl.
    """
    check_value("alpha", alpha, low=0.0, low_open=True)
    check_value("conservative_bias", conservative_bias, low=0.0, high=1.0, low_open=True)
    check_value("discount", discount, low=0.0, high=1.0, low_open=True)
    check_value("bc_coeff", bc_coeff, low=0.0)
    check_choice("bc_segments", bc_segments, CPL_BC_SEGMENTS)
    if (ref_chosen_token_logps is None) != (ref_rejected_token_logps is None):
        raise ValueError(
            "pass both ref_chosen_token_logps and ref_rejected_token_logps (CPL-KL) or neither"
        )
    check_rank("chosen_token_logps", chosen_token_logps, 2)
    check_rank("rejected_token_logps", rejected_token_logps, 2)
    check_same_shape(chosen_token_logps=chosen_token_logps, chosen_mask=chosen_mask,
                     ref_chosen_token_logps=ref_chosen_token_logps)
    check_same_shape(rejected_token_logps=rejected_token_logps, rejected_mask=rejected_mask,
                     ref_rejected_token_logps=ref_rejected_token_logps)
    batch = chosen_token_logps.shape[0]
    if rejected_token_logps.shape[0] != batch:
        raise ValueError(
            f"chosen_token_logps and rejected_token_logps must have the same batch size, got "
            f"{chosen_token_logps.shape} and {rejected_token_logps.shape}"
        )
    if label is not None:
        check_rank("label", label, 1)
        if jnp.shape(label)[0] != batch:
            raise ValueError(f"label must have shape ({batch},), got {jnp.shape(label)}")

    mc, mr = as_mask(chosen_mask), as_mask(rejected_mask)
    a_c = _segment_advantage(chosen_token_logps, mc, ref_chosen_token_logps, alpha=alpha,
                             discount=discount)
    a_r = _segment_advantage(rejected_token_logps, mr, ref_rejected_token_logps, alpha=alpha,
                             discount=discount)
    lam = conservative_bias
    preferred_c = -jax.nn.log_sigmoid(a_c - lam * a_r)
    if label is None:
        p = jnp.ones((batch,), jnp.float32)
        cpl = preferred_c
    else:
        p = f32(label)
        cpl = p * preferred_c + (1.0 - p) * (-jax.nn.log_sigmoid(a_r - lam * a_c))

    sum_c = jnp.sum(_masked_values(chosen_token_logps, mc) * mc, axis=-1)
    sum_r = jnp.sum(_masked_values(rejected_token_logps, mr) * mr, axis=-1)
    n_c, n_r = jnp.sum(mc, axis=-1), jnp.sum(mr, axis=-1)
    if bc_segments == "preferred":
        bc = -(p * sum_c / jnp.maximum(n_c, 1.0) + (1.0 - p) * sum_r / jnp.maximum(n_r, 1.0))
    else:
        bc = -(sum_c + sum_r) / jnp.maximum(n_c + n_r, 1.0)
    loss = cpl if is_static_zero(bc_coeff) else cpl + bc_coeff * bc
    return CPLOutput(loss=loss, cpl=cpl, bc=bc, chosen_advantage=a_c,
                     rejected_advantage=a_r)
