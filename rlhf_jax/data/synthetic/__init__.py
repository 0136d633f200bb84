"""Synthetic tasks with a programmatic gold reward, a local tokenizer and simulated raters.

Tasks (`TopicTask`, `ProgressionTask`, and `HarmfulTopicTask` - the topic task with a harmful
topic and a gold harmlessness predicate, for Constitutional AI - by name through `get_task`) share a character-level
Hugging Face tokenizer (`build_tokenizer`, 54 tokens, no download). Each exposes
`sample_prompts(rng, n)`, `sample_responses(rng, prompts)` (noisy base distribution),
`sft_records(rng, n)`, `reference_response(prompt)`, `gold_reward(prompts, responses)` and the
vectorised `gold_reward_tokens(prompt_ids, response_ids, response_mask)`.

Simulated raters (`RaterConfig`, `make_rater_pool`, `label_pairs`) turn gold rewards into
Bradley–Terry preference labels with per-rater temperature, position and length biases, lapses
and majority / mean consensus; `make_preference_dataset`, `make_ranking_dataset`,
`make_prompt_dataset` and `make_sft_dataset` write records in the formats `rlhf_jax.data` loads.
"""

from rlhf_jax.data.synthetic._raters import (
    RaterConfig,
    RaterPool,
    RatingStats,
    label_pairs,
    make_preference_dataset,
    make_prompt_dataset,
    make_ranking_dataset,
    make_rater_pool,
    make_sft_dataset,
    preference_probability,
)
from rlhf_jax.data.synthetic._tasks import (
    TASKS,
    HarmfulTopicTask,
    ProgressionTask,
    SyntheticTask,
    TopicTask,
    get_task,
)
from rlhf_jax.data.synthetic._tokenizer import SEPARATOR, VOCAB, build_tokenizer

__all__ = [
    "SEPARATOR",
    "TASKS",
    "VOCAB",
    "HarmfulTopicTask",
    "ProgressionTask",
    "RaterConfig",
    "RaterPool",
    "RatingStats",
    "SyntheticTask",
    "TopicTask",
    "build_tokenizer",
    "get_task",
    "label_pairs",
    "make_preference_dataset",
    "make_prompt_dataset",
    "make_ranking_dataset",
    "make_rater_pool",
    "make_sft_dataset",
    "preference_probability",
]
