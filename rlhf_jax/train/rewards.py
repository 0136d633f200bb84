"""The reward source of a run, built from its config (`RewardSpec`, ``reward:`` in YAML and
``--reward.*`` on the command line), through a small registry of named builders.

The sources themselves, and the one interface every consumer calls (``source(responses,
prompts) -> [B]``, `rlhf_jax.generation.RewardSource`), live in `rlhf_jax.generation`, next to
best-of-n: a source built here scores best-of-n samples, rejection-sampling rounds and PPO /
GRPO / RLOO rollouts alike.

Registered sources (``reward.source``):

- ``gold``: the synthetic task's programmatic gold reward (``data.synthetic``).
- ``model``: the reward model of an ``rlhf-jax rm`` run directory (``reward.path``, optionally
  ``reward.head``), loaded with `rlhf_jax.train.rm.load_reward_model`.

Adding a source is one builder, ``(spec, context) -> RewardSource``, registered under its name
with `register_reward_source`, plus its name in ``RewardSpec.source`` (and any fields it reads in
`RewardSpec`) so that configs can select it; a builder can call `build_reward_source` on nested
specs (a weighted combination) and read the policy's tokenizer from the `RewardContext` (a
text-level judge)::

    @register_reward_source("judge")
    def judge_source(spec, context):
        scorer = DirectScorer(load_judge(spec.path), ...)
        return scorer.reward_source(decode=context.decode)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from rlhf_jax.generation import RewardModelSource, RewardSource, TokenRewardFunction
from rlhf_jax.train.rm import load_reward_model


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """Where the scores of an online run come from (the registered sources, module docstring)."""

    source: Literal["gold", "model"] = "gold"
    """``gold``: the synthetic task's programmatic gold reward (``data.synthetic``);
    ``model``: a trained reward model loaded from ``path``."""
    path: str | None = None
    """Directory of the reward model (``source="model"``), as written by ``rlhf-jax rm``."""
    head: str | None = None
    """Reward head to use (default: the first)."""


class RewardContext(NamedTuple):
    """What a reward builder may use besides its spec.

    Attributes:
      task: the synthetic task of ``data.synthetic`` (`rlhf_jax.data.synthetic.get_task`), or
        None when the prompts come from files.
      tokenizer: the policy's tokenizer, or None.
    """

    task: Any = None
    tokenizer: Any = None

    def decode(self, ids: Sequence[int]) -> str:
        """The policy tokenizer's text of ``ids``, special tokens skipped (for text sources)."""
        if self.tokenizer is None:
            raise ValueError("this reward source decodes text and needs the policy's tokenizer")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


RewardBuilder = Callable[[RewardSpec, RewardContext], RewardSource]
"""``builder(spec, context) -> RewardSource``."""

REWARD_SOURCES: dict[str, RewardBuilder] = {}
"""Registered builders by ``reward.source`` name."""


def register_reward_source(name: str) -> Callable[[RewardBuilder], RewardBuilder]:
    """Decorator registering a builder as ``reward.source: <name>``; a name is registered once."""

    def register(builder: RewardBuilder) -> RewardBuilder:
        if name in REWARD_SOURCES:
            raise ValueError(f"a reward source named {name!r} is already registered")
        REWARD_SOURCES[name] = builder
        return builder

    return register


def build_reward_source(spec: RewardSpec, context: RewardContext | None = None) -> RewardSource:
    """The reward source ``spec`` names, built by its registered builder.

    Raises:
      ValueError: naming ``reward.source`` and the registered names when ``spec.source`` is not
        one of them, or naming the field a builder is missing.
    """
    builder = REWARD_SOURCES.get(spec.source)
    if builder is None:
        raise ValueError(f"reward.source={spec.source!r}; allowed: "
                         f"{', '.join(repr(n) for n in REWARD_SOURCES)}")
    return builder(spec, RewardContext() if context is None else context)


@register_reward_source("gold")
def gold_reward_source(spec: RewardSpec, context: RewardContext) -> RewardSource:
    """``reward.source: gold``: the synthetic task's ``gold_reward_tokens``."""
    if context.task is None:
        raise ValueError("reward.source='gold' needs a synthetic task (set data.synthetic)")
    return TokenRewardFunction(context.task.gold_reward_tokens, name="gold")


@register_reward_source("model")
def reward_model_source(spec: RewardSpec, context: RewardContext) -> RewardSource:
    """``reward.source: model``: head ``reward.head`` (default: the first) of the reward model in
    the run directory ``reward.path``."""
    if spec.path is None:
        raise ValueError("reward.source='model' needs reward.path (a reward model directory)")
    return RewardModelSource(load_reward_model(spec.path), head=spec.head or 0)


def gold_reward_metric(task: Any, name: str) -> Callable[..., dict[str, float]]:
    """A per-iteration metric function (`rlhf_jax.train.online.MetricFn`): the mean gold reward
    of the rollout's responses under the synthetic ``task``, logged as ``name`` (beside the
    proxy score when the reward is a reward model: over-optimisation curves)."""

    def metric(experience: Any, prompts: Mapping[str, np.ndarray]) -> dict[str, float]:
        rollout = jax.device_get(experience.rollout)
        p = rollout.prompt_length
        sequences = np.asarray(rollout.sequences)
        gold = task.gold_reward_tokens(
            sequences[:, :p], sequences[:, p:], np.asarray(rollout.sequence_mask)[:, p:]
        )
        return {name: float(np.mean(gold))}

    return metric


__all__ = [
    "REWARD_SOURCES",
    "RewardBuilder",
    "RewardContext",
    "RewardSpec",
    "build_reward_source",
    "gold_reward_metric",
    "gold_reward_source",
    "register_reward_source",
    "reward_model_source",
]
