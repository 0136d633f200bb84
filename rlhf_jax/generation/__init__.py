"""Jitted KV-cache sampling for rollouts: prefill + decode loop, sampling filters, EOS handling,
the reward sources that score samples, best-of-n (rejection) sampling and
lm-human-preferences-style truncation helpers.

- :class:`SamplingParams`: response width, temperature, top-k / top-p / min-p, greedy, KV-cache
  segments; the one set of sampling parameters of :func:`generate`, :func:`generate_with_state`,
  :class:`Sampler`, :func:`best_of_n`, the trainers' ``RolloutConfig`` and the AI labelers.
- :class:`RewardSource`: ``source(responses, prompts) -> [B]``, the one reward interface of
  best-of-n, rejection sampling, the online trainers and the AI labelers
  (:class:`RewardModelSource`, :class:`TokenRewardFunction`, :class:`TextRewardFunction`,
  :class:`WeightedRewardSum`, :class:`SafetyGatedReward`; :func:`score_samples`; reward models
  placed on a mesh with :func:`place_reward_source`).

Layout of the outputs (see :class:`GenerationOutput`): responses ``[B * n, N]`` right-padded, with
``num_samples = n`` samples of each prompt in contiguous rows; ``logps`` are under the sampling
distribution (after temperature and filters), ``model_logps`` under the plain model.
"""

from rlhf_jax.generation._best_of_n import (
    BestOfNOutput,
    BestOfNSelection,
    best_of_n,
    select_best_of_n,
    take_rows,
)
from rlhf_jax.generation._rewards import (
    Responses,
    RewardModelSource,
    RewardSource,
    SafetyGatedReward,
    ScoreScale,
    TextRewardFunction,
    TokenRewardFunction,
    WeightedRewardSum,
    apply_missing_eos_penalty,
    check_scores,
    place_reward_source,
    repeat_rows,
    safety_gated_reward,
    score_samples,
    whiten_linear_scores,
)
from rlhf_jax.generation._sampler import (
    GenerationOutput,
    Sampler,
    SamplingParams,
    generate,
    generate_with_state,
)
from rlhf_jax.generation._sampling import (
    apply_temperature,
    categorical_inverse_cdf,
    filter_logits,
    min_p_filter,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)
from rlhf_jax.generation._truncation import (
    contains_stop_token,
    first_true_indices,
    penalize_missing_eos,
    response_mask,
    truncate_response,
)

__all__ = [
    "BestOfNOutput",
    "BestOfNSelection",
    "GenerationOutput",
    "Responses",
    "RewardModelSource",
    "RewardSource",
    "SafetyGatedReward",
    "Sampler",
    "ScoreScale",
    "SamplingParams",
    "TextRewardFunction",
    "TokenRewardFunction",
    "WeightedRewardSum",
    "apply_missing_eos_penalty",
    "apply_temperature",
    "best_of_n",
    "categorical_inverse_cdf",
    "check_scores",
    "contains_stop_token",
    "filter_logits",
    "first_true_indices",
    "generate",
    "generate_with_state",
    "min_p_filter",
    "penalize_missing_eos",
    "place_reward_source",
    "repeat_rows",
    "response_mask",
    "safety_gated_reward",
    "sample_tokens",
    "score_samples",
    "select_best_of_n",
    "take_rows",
    "top_k_filter",
    "top_p_filter",
    "truncate_response",
    "whiten_linear_scores",
]
