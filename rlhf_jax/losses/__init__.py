"""Pure, jittable RLHF objectives on arrays, composed in your own code like rlax and optax.

Every function is pure, works under ``jit``/``vmap``/``grad``, computes in float32 whatever the
input dtype, checks shapes at trace time, and returns **unreduced** per-token ``[B, T]`` or
per-example ``[B]`` values; reductions are separate named functions (:func:`masked_mean`,
:func:`aggregate_loss`), optionally across devices through ``axis_name``.

Log-prob convention
-------------------
:func:`token_logps` takes targets **already shifted**::

    out[b, t] = log_softmax(logits[b, t])[targets[b, t]]

computed as ``take_along_axis(logits) - logsumexp(logits)`` (no second ``[B, T, V]`` array).
For a causal LM over ``input_ids [B, T]`` the log-prob of token ``t + 1`` is
``token_logps(logits[:, :-1], input_ids[:, 1:])[:, t]``. The rest of rlhf_jax stores log-probs
aligned to the token they score, ``logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])``
with ``logps[:, 0] = 0``, i.e. the line above padded with one zero column in front; masks over
tokens then apply to log-probs unchanged. Everything in this package only needs log-probs and a
mask of the same shape, so either alignment works as long as the mask matches.

Masks are 1 on real tokens and 0 on padding (float or bool). Padded positions never affect a
value and receive exactly zero gradient.

Values that are known where a function is called (hyper-parameters, host masks and ids) are
checked at once; traced ones through ``checkify.debug_check``, which
``checkify.checkify(f, errors=checkify.user_checks)`` reports. A function jitted and run many
times is better traced without them (:func:`unchecked`, :func:`traced_checks`): a check is an
effect, and JAX dispatches a program with effects on its slower Python path.

Where TRL, lm-human-preferences or a paper define a convention, the docstring names it and the
tests pin it with an independent float64 NumPy reference.
"""

from rlhf_jax.losses._advantages import (
    GROUP_SCALES,
    GAEOutput,
    PenalizedRewards,
    gae,
    group_advantages,
    kl_penalized_rewards,
    last_token_index,
    rloo_advantages,
)
from rlhf_jax.losses._checks import traced_checks, unchecked
from rlhf_jax.losses._cpl import CPL_BC_SEGMENTS, CPLOutput, cpl_loss
from rlhf_jax.losses._dpo import (
    DPO_LOSS_TYPES,
    F_DIVERGENCES,
    BCORunningMean,
    bco_running_mean_init,
    bco_running_mean_update,
    dpo_loss,
    dpo_reward_metrics,
    mixed_dpo_loss,
)
from rlhf_jax.losses._fused_logprobs import UNEMBEDDING_LAYOUTS, FusedLogps, fused_token_logps
from rlhf_jax.losses._hindsight import HIRLoss, hir_contrastive_loss, hir_loss, vocab_mean_logps
from rlhf_jax.losses._kl import KL_ESTIMATORS, kl_estimate, kl_from_logits, kl_k1, kl_k2, kl_k3
from rlhf_jax.losses._kl_controller import (
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
)
from rlhf_jax.losses._logprobs import (
    chunked_token_logps,
    entropy_from_logits,
    sequence_logps,
    token_logps,
)
from rlhf_jax.losses._policy import (
    IMPORTANCE_SAMPLING_LEVELS,
    approx_kl,
    cispo_loss,
    clip_fraction,
    clipped_value_loss,
    grpo_loss,
    gspo_loss,
    ppo_clip_loss,
    sequence_log_ratio,
)
from rlhf_jax.losses._preference_free import (
    CPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    cpo_loss,
    kto_loss,
    kto_reference_kl,
    orpo_loss,
    simpo_loss,
)
from rlhf_jax.losses._reductions import (
    AGGREGATION_MODES,
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from rlhf_jax.losses._rest import (
    REST_WEIGHTINGS,
    ReSTLoss,
    VMPOOutput,
    gold_loss,
    rest_bc_loss,
    vmpo_loss,
)
from rlhf_jax.losses._reward import (
    RewardMetrics,
    best_of_k_loss,
    bradley_terry_loss,
    kwise_ranking_loss,
    plackett_luce_loss,
    reward_accuracy,
    reward_centering_loss,
    reward_margin,
    reward_metrics,
)

__all__ = [
    "traced_checks",
    "unchecked",
    "AGGREGATION_MODES",
    "BCORunningMean",
    "CPLOutput",
    "CPL_BC_SEGMENTS",
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "FusedLogps",
    "GAEOutput",
    "GROUP_SCALES",
    "HIRLoss",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KLController",
    "KLControllerState",
    "KL_ESTIMATORS",
    "KTO_LOSS_TYPES",
    "PenalizedRewards",
    "REST_WEIGHTINGS",
    "ReSTLoss",
    "RewardMetrics",
    "UNEMBEDDING_LAYOUTS",
    "VMPOOutput",
    "adaptive_kl_controller",
    "aggregate_loss",
    "approx_kl",
    "bco_running_mean_init",
    "bco_running_mean_update",
    "best_of_k_loss",
    "bradley_terry_loss",
    "chunked_token_logps",
    "cispo_loss",
    "clip_fraction",
    "clipped_value_loss",
    "cpl_loss",
    "cpo_loss",
    "dpo_loss",
    "dpo_reward_metrics",
    "entropy_from_logits",
    "fixed_kl_controller",
    "fused_token_logps",
    "gae",
    "gold_loss",
    "group_advantages",
    "grpo_loss",
    "gspo_loss",
    "hir_contrastive_loss",
    "hir_loss",
    "kl_estimate",
    "kl_from_logits",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_rewards",
    "kto_loss",
    "kto_reference_kl",
    "kwise_ranking_loss",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mixed_dpo_loss",
    "orpo_loss",
    "plackett_luce_loss",
    "ppo_clip_loss",
    "rest_bc_loss",
    "reward_accuracy",
    "reward_centering_loss",
    "reward_margin",
    "reward_metrics",
    "rloo_advantages",
    "sequence_log_ratio",
    "sequence_logps",
    "simpo_loss",
    "token_logps",
    "vmpo_loss",
    "vocab_mean_logps",
]
