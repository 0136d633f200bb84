"""Jitted KV-cache sampling for rollouts: prefill + decode loop, sampling filters, EOS handling,
best-of-n (rejection) sampling and lm-human-preferences-style truncation helpers.

Layout of the outputs (see :class:`GenerationOutput`): responses ``[B * n, N]`` right-padded, with
``num_samples = n`` samples of each prompt in contiguous rows; ``logps`` are under the sampling
distribution (after temperature and filters), ``model_logps`` under the plain model.
"""

from rlhf_jax.generation._best_of_n import (
    BestOfNOutput,
    BestOfNSelection,
    best_of_n,
    reward_model_reward,
    select_best_of_n,
    take_rows,
    text_reward,
)
from rlhf_jax.generation._sampler import (
    GenerationOutput,
    Sampler,
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
    "Sampler",
    "apply_temperature",
    "best_of_n",
    "categorical_inverse_cdf",
    "contains_stop_token",
    "filter_logits",
    "first_true_indices",
    "generate",
    "generate_with_state",
    "min_p_filter",
    "penalize_missing_eos",
    "response_mask",
    "reward_model_reward",
    "sample_tokens",
    "select_best_of_n",
    "take_rows",
    "text_reward",
    "top_k_filter",
    "top_p_filter",
    "truncate_response",
]
