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
- ``judge``: direct RLAIF ("d-RLAIF", Lee et al. 2023, sec. 2.2): an LM judge (``reward.path``,
  a model source of `rlhf_jax.train.model_source`) rates each decoded response 1-10, and the
  reward is the expected score under its distribution over the score tokens
  (`rlhf_jax.rlaif.DirectScorer`; prompt and options in ``reward.judge``).
- ``gated``: Llama 2's reward (Touvron et al. 2023, sec. 3.2.2): a helpfulness and a safety
  source (``reward.helpfulness``, ``reward.safety``; e.g. two heads of one reward model); the
  safety score is used when the prompt is flagged (prompt field ``reward.safety_flag``) or the
  safety probability is below ``reward.safety_threshold``, then the chosen score is taken to the
  linear scale and whitened over the batch (``reward.whiten``,
  `rlhf_jax.generation.SafetyGatedReward`).
- ``combined``: ``sum_i reward.weights[i] * reward.components[i]``
  (`rlhf_jax.generation.WeightedRewardSum`).

The sources that ``gated`` and ``combined`` build on are written as one string each, so that
they are set the same way in YAML and on the command line (`parse_component`):
``gold``, ``model:RUN_DIR`` (``model:RUN_DIR#HEAD`` for a named or numbered head) and
``judge:MODEL_SOURCE`` (with the options of ``reward.judge``)::

    reward:                                  # --reward.source gated
      source: gated                          # --reward.helpfulness model:runs/rm#helpful
      helpfulness: "model:runs/rm#helpful"   # --reward.safety model:runs/rm#harmless
      safety: "model:runs/rm#harmless"
    reward: {source: combined, components: ["model:runs/rm", "judge:runs/judge"],
             weights: [1.0, 0.2]}           # --reward.components model:runs/rm judge:runs/judge
                                             # --reward.weights 1.0 0.2

Adding a source is one builder, ``(spec, context) -> RewardSource``, registered under its name
with `register_reward_source`, plus its name in ``RewardSpec.source`` (and any fields it reads in
`RewardSpec`) so that configs can select it; a builder can call `build_reward_source` on nested
specs (a weighted combination) and read the policy's tokenizer from the `RewardContext` (a
text-level judge)::

    @register_reward_source("constant")
    def constant_source(spec, context):
        return TokenRewardFunction(lambda p, r, m: np.ones(len(p)), name="constant")
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from rlhf_jax import sharding
from rlhf_jax.generation import (
    RewardModelSource,
    RewardSource,
    SafetyGatedReward,
    ScoreScale,
    TokenRewardFunction,
    WeightedRewardSum,
)
from rlhf_jax.rlaif import DirectScorer, ScoreTemplate
from rlhf_jax.train.config import check_int, check_number, require
from rlhf_jax.train.model_source import InferenceOptions, load_lm
from rlhf_jax.train.rm import load_reward_model

COMPONENT_KINDS = ("gold", "model", "judge")
"""The sources a ``gated`` or ``combined`` component string may name."""


@dataclasses.dataclass(frozen=True)
class JudgeScoreSpec(InferenceOptions):
    """The direct scorer of ``reward.source: judge`` (and of ``judge:`` components): its prompt
    (`rlhf_jax.rlaif.ScoreTemplate.default` with these overrides), chain of thought and
    inference options. A character-level tokenizer needs single-character ``score_tokens``."""

    chain_of_thought: bool = False
    """Generate a greedy rationale before reading the score (Lee et al. 2023, sec. 2.1.2)."""
    rationale_tokens: int = 64
    """Tokens generated for a chain-of-thought rationale."""
    principle: str | None = None
    """Principle filled into a template's {principle} placeholder."""
    preamble: str | None = None
    """Override of the rating instructions (may hold {principle})."""
    query: str | None = None
    """Override of the sample layout; needs {prompt} and {response}."""
    answer_prompt: str | None = None
    """Override of the text right before the score token."""
    score_tokens: tuple[str, ...] | None = None
    """Override of the score strings (default "1".."10"; each one token of the judge's
    tokenizer)."""
    score_values: tuple[float, ...] | None = None
    """Value of each score token (default: the token read as a number)."""
    separator: str | None = None
    """Override of the text between the prompt's pieces."""

    def __post_init__(self):
        check_int(self, "rationale_tokens", low=1)

    def template(self) -> ScoreTemplate:
        """The `ScoreTemplate` these options describe (errors name ``reward.judge``)."""
        overrides: dict[str, Any] = {
            name: getattr(self, name)
            for name in ("preamble", "query", "answer_prompt", "score_tokens", "score_values",
                         "separator")
            if getattr(self, name) is not None
        }
        try:
            return ScoreTemplate.default(chain_of_thought=self.chain_of_thought, **overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"reward.judge: {e}") from e


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """Where the scores of an online run come from (the registered sources, module docstring)."""

    source: Literal["gold", "model", "judge", "gated", "combined"] = "gold"
    """``gold``: the synthetic task's programmatic gold reward (``data.synthetic``);
    ``model``: a trained reward model loaded from ``path``; ``judge``: an LM judge's expected
    1-10 score (``path``, ``judge``); ``gated``: Llama 2's safety-gated, whitened reward
    (``helpfulness``, ``safety``); ``combined``: a weighted sum (``components``, ``weights``)."""
    path: str | None = None
    """``model``: the reward model's directory, as written by ``rlhf-jax rm``; ``judge``: the
    judge model (a training run directory, optionally @STEP, a Hugging Face model directory or
    preset:NAME)."""
    head: str | None = None
    """Reward head to use, by name or index (default: the first)."""
    judge: JudgeScoreSpec = JudgeScoreSpec()
    """The judge's prompt and options (``judge`` and every ``judge:`` component)."""
    helpfulness: str | None = None
    """``gated``: the helpfulness source, a component string (module docstring)."""
    safety: str | None = None
    """``gated``: the safety source, a component string."""
    safety_threshold: float = 0.15
    """``gated``: the safety score is used when its probability is below this (Llama 2: 0.15)."""
    safety_flag: str = "is_safety"
    """``gated``: the prompt field (0/1 per prompt) marking safety prompts; prompts without the
    field are not flagged."""
    score_scale: ScoreScale = "logit"
    """``gated``: the scale of both sources' scores: ``logit`` (reward-model heads, whose sigmoid
    is the probability) or ``probability`` (scores in [0, 1])."""
    whiten: bool = True
    """``gated``: whiten the gated score's linear value over the batch (Llama 2's
    WHITEN(LOGIT(R_c)))."""
    components: tuple[str, ...] = ()
    """``combined``: the summed sources, component strings."""
    weights: tuple[float, ...] = ()
    """``combined``: one weight per component (default: 1 each)."""

    def __post_init__(self):
        object.__setattr__(self, "components", tuple(self.components))
        object.__setattr__(self, "weights", tuple(self.weights))
        check_number(self, "safety_threshold", low=0.0, high=1.0, low_open=True, high_open=True)
        require(all(isinstance(w, int | float) and math.isfinite(w) for w in self.weights),
                "weights", f"weights must be finite numbers, got {list(self.weights)}")
        if self.source == "combined":
            require(bool(self.components), "components",
                    "components is empty: reward.source='combined' sums at least one source")
            require(not self.weights or len(self.weights) == len(self.components), "weights",
                    f"weights has {len(self.weights)} values for {len(self.components)} "
                    "components (give one per component, or none for 1 each)")


class RewardContext(NamedTuple):
    """What a reward builder may use besides its spec.

    Attributes:
      task: the synthetic task of ``data.synthetic`` (`rlhf_jax.data.synthetic.get_task`), or
        None when the prompts come from files.
      tokenizer: the policy's tokenizer, or None.
      models: loaded models by source string, shared by the sources of one build (two heads of
        one reward model load it once); None: nothing is shared.
      mesh: the run's mesh: a reward model is placed on it once, as it is loaded, by the
        policy's sharding rules (`rlhf_jax.sharding.shard_model`); None: left on the host until
        a trainer places it (`rlhf_jax.generation.place_reward_source`).
    """

    task: Any = None
    tokenizer: Any = None
    models: dict[str, Any] | None = None
    mesh: Any = None

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


def _loaded(context: RewardContext, key: str, load: Callable[[], Any]) -> Any:
    """``load()``, or the model already loaded under ``key`` in this build."""
    if context.models is None:
        return load()
    if key not in context.models:
        context.models[key] = load()
    return context.models[key]


def _head(head: str | None) -> int | str:
    """A head given by index (digits) or by name; the first when None."""
    if head is None:
        return 0
    return int(head) if head.isdigit() else head


@register_reward_source("model")
def reward_model_source(spec: RewardSpec, context: RewardContext) -> RewardSource:
    """``reward.source: model``: head ``reward.head`` (default: the first) of the reward model in
    the run directory ``reward.path``, placed on ``context.mesh`` when there is one (the heads
    of one model share its placed parameters)."""
    if spec.path is None:
        raise ValueError("reward.source='model' needs reward.path (a reward model directory)")
    def load() -> Any:
        model = load_reward_model(spec.path)
        return model if context.mesh is None else sharding.shard_model(model, context.mesh)

    model = _loaded(context, f"rm:{spec.path}", load)
    name = "reward_model" if spec.head is None else f"reward_model#{spec.head}"
    try:
        return RewardModelSource(model, head=_head(spec.head), name=name, mesh=context.mesh)
    except ValueError as e:
        raise ValueError(f"reward.head: {e}") from e


@register_reward_source("judge")
def judge_reward_source(spec: RewardSpec, context: RewardContext) -> RewardSource:
    """``reward.source: judge``: the expected 1-10 score of the LM judge ``reward.path`` under
    the prompt of ``reward.judge`` (`rlhf_jax.rlaif.DirectScorer`). Responses are decoded with
    the policy's tokenizer when the context has one (else the judge's), so judge and policy may
    have different tokenizers."""
    if spec.path is None:
        raise ValueError("reward.source='judge' needs reward.path (the judge model: a training "
                         "run directory, a Hugging Face model directory or preset:NAME)")
    options = spec.judge
    template = options.template()
    lm = _loaded(context, f"lm:{spec.path}:{options.tokenizer}:{options.dtype}",
                 lambda: load_lm(spec.path, tokenizer=options.tokenizer, dtype=options.dtype,
                                 field="reward.path"))
    try:
        scorer = DirectScorer(
            lm.model, lm.tokenizer, template=template, batch_size=options.batch_size,
            max_length=options.max_length, min_bucket=options.min_bucket,
            rationale_tokens=options.rationale_tokens, principle=options.principle,
        )
    except ValueError as e:
        raise ValueError(f"reward.judge (judge {spec.path!r}): {e}") from e
    decode = context.decode if context.tokenizer is not None else None
    return scorer.reward_source(decode=decode, name=f"judge:{spec.path}")


def parse_component(text: str, spec: RewardSpec, *, field: str) -> RewardSpec:
    """The leaf `RewardSpec` a component string names: ``gold``, ``model:RUN_DIR[#HEAD]`` or
    ``judge:MODEL_SOURCE`` (the judge with ``spec.judge``'s options).

    Raises:
      ValueError: naming ``field`` when the string names no such source or lacks its path.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{field} is empty: write gold, model:RUN_DIR[#HEAD] or "
                         "judge:MODEL_SOURCE")
    kind, sep, rest = text.strip().partition(":")
    if kind not in COMPONENT_KINDS:
        raise ValueError(f"{field}={text!r}: the source before ':' must be one of "
                         f"{', '.join(COMPONENT_KINDS)}")
    if kind == "gold":
        if rest:
            raise ValueError(f"{field}={text!r}: gold takes no path")
        return RewardSpec(source="gold")
    if not rest:
        raise ValueError(f"{field}={text!r}: write {kind}:PATH")
    if kind == "judge":
        return RewardSpec(source="judge", path=rest, judge=spec.judge)
    path, hash_, head = rest.rpartition("#") if "#" in rest else (rest, "", "")
    if hash_ and (not path or not head):
        raise ValueError(f"{field}={text!r}: write model:RUN_DIR#HEAD with both parts")
    return RewardSpec(source="model", path=path, head=head or None)


def _component(spec: RewardSpec, context: RewardContext, text: str, field: str) -> RewardSource:
    leaf = parse_component(text, spec, field=field)
    try:
        return build_reward_source(leaf, context)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{field}={text!r}: {e}") from e


def _shared(context: RewardContext) -> RewardContext:
    """``context`` with a model cache (kept if it has one)."""
    return context if context.models is not None else context._replace(models={})


@register_reward_source("gated")
def gated_reward_source(spec: RewardSpec, context: RewardContext) -> RewardSource:
    """``reward.source: gated``: Llama 2's safety-gated reward of ``reward.helpfulness`` and
    ``reward.safety`` (`rlhf_jax.generation.SafetyGatedReward`)."""
    for name in ("helpfulness", "safety"):
        if getattr(spec, name) is None:
            raise ValueError(f"reward.source='gated' needs reward.{name} (a source: "
                             "model:RUN_DIR#HEAD, judge:MODEL_SOURCE or gold)")
    context = _shared(context)
    return SafetyGatedReward(
        _component(spec, context, spec.helpfulness, "reward.helpfulness"),
        _component(spec, context, spec.safety, "reward.safety"),
        threshold=spec.safety_threshold, flag_key=spec.safety_flag, scale=spec.score_scale,
        whiten=spec.whiten, name="gated",
    )


@register_reward_source("combined")
def combined_reward_source(spec: RewardSpec, context: RewardContext) -> RewardSource:
    """``reward.source: combined``: ``sum_i reward.weights[i] * reward.components[i]``
    (`rlhf_jax.generation.WeightedRewardSum`; weights default to 1)."""
    if not spec.components:
        raise ValueError("reward.source='combined' needs reward.components (one or more sources)")
    weights = spec.weights or (1.0,) * len(spec.components)
    if len(weights) != len(spec.components):
        raise ValueError(f"reward.weights has {len(weights)} values for "
                         f"{len(spec.components)} reward.components")
    context = _shared(context)
    sources = [_component(spec, context, text, f"reward.components[{i}]")
               for i, text in enumerate(spec.components)]
    return WeightedRewardSum(sources, weights, name="combined")


def gold_reward_metric(task: Any, name: str) -> Callable[..., dict[str, float]]:
    """A per-iteration metric function (`rlhf_jax.train.online.MetricFn`): the mean gold reward
    of the rollout's responses under the synthetic ``task``, logged as ``name`` (beside the
    proxy score when the reward is a reward model: over-optimisation curves)."""

    def metric(experience: Any, prompts: Mapping[str, np.ndarray]) -> dict[str, float]:
        # The whole rollout on every process (a collective on a multi-host slice).
        sequences, mask = sharding.gather_to_host(
            (experience.rollout.sequences, experience.rollout.sequence_mask))
        p = experience.rollout.prompt_length
        gold = task.gold_reward_tokens(sequences[:, :p], sequences[:, p:], mask[:, p:])
        return {name: float(np.mean(gold))}

    return metric


__all__ = [
    "COMPONENT_KINDS",
    "JudgeScoreSpec",
    "REWARD_SOURCES",
    "RewardBuilder",
    "RewardContext",
    "RewardSpec",
    "build_reward_source",
    "combined_reward_source",
    "gated_reward_source",
    "gold_reward_metric",
    "gold_reward_source",
    "judge_reward_source",
    "parse_component",
    "register_reward_source",
    "reward_model_source",
]
