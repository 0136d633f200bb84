"""Reward sources: one interface that scores sampled responses, for best-of-n, rejection sampling,
the online trainers (PPO, GRPO, RLOO) and the AI labelers.

A reward source is called as ``source(responses, prompts) -> [B]`` float32 (`RewardSource`):

- ``responses`` holds ``B`` sampled rows in the layout of `rlhf_jax.generation.generate`
  (`Responses`: ``sequences``/``sequence_mask`` ``[B, P + N]``, the prompt left-padded and the
  response right-padded and cut after the stop token, ``finished [B]`` and ``prompt_length``
  ``P``); a `GenerationOutput` is one, and so is the trainers' ``rlhf_jax.train.rollout.Rollout``.
- ``prompts`` is the host prompt batch (``prompt_ids``, ``prompt_mask`` and any task fields,
  e.g. a safety flag), every field already repeated to the ``B`` rows (`repeat_rows`).

The sources:

- `RewardModelSource`: one head of a trained ``rlhf_jax.models.RewardModel``, jitted, on device.
- `TokenRewardFunction`: a Python function of the token arrays, on the host (e.g. a synthetic
  task's gold reward ``task.gold_reward_tokens``).
- `TextRewardFunction`: a Python function of the decoded prompt and response strings (e.g. an
  AI labeler: ``rlhf_jax.rlaif.DirectScorer.reward_source``).
- `WeightedRewardSum`: a weighted sum of sources.
- `SafetyGatedReward`: Llama 2's gate between a helpfulness and a safety source
  (`safety_gated_reward`), optionally followed by Llama 2's ``WHITEN(LOGIT(.))`` of the gated
  score (`whiten_linear_scores`).

`score_samples` is how every consumer scores: the source, checked for shape and finiteness,
then the missing-EOS penalty. ``rlhf_jax.train.rewards`` builds sources from a run's config.

On several processes (a multi-host slice) the host sources gather the whole batch to every
process (`rlhf_jax.sharding.gather_to_host`) and every process scores all of it, rather than
each its own rows: a source may look at the whole batch (`whiten_linear_scores` normalises over
it), and so every process holds the scores a single process would compute. `RewardModelSource`
keeps its parameters on the devices: placed once on the mesh by their logical axis names
(`RewardModelSource.place_on_mesh`, the policy's sharding rules), it runs its jitted forward on
the global rollout arrays as they are and gathers only the ``[B]`` scores to the host. Every
source returns the whole ``[B]`` scores on every process, so the combining sources
(`WeightedRewardSum`, `SafetyGatedReward`) and `score_samples` work on host values;
`place_reward_source` places every reward model inside a combined source.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import losses, sharding
from rlhf_jax.losses import unchecked
from rlhf_jax.models import positions_from_mask
from rlhf_jax.sharding import gather_to_host

ScoreScale = Literal["probability", "logit"]
"""How a source's scores are expressed: ``probability`` on the sigmoid scale in ``[0, 1]`` (Llama
2's reward models), ``logit`` on the linear scale (``rlhf_jax.models.RewardModel`` heads, whose
sigmoid is the probability)."""


def _check_scale(scale: str) -> None:
    if scale not in ("probability", "logit"):
        raise ValueError(f"scale={scale!r}; allowed: 'probability', 'logit'")


class Responses(Protocol):
    """Sampled rows as a reward source reads them (`GenerationOutput` and the trainers'
    ``Rollout`` both are).

    Attributes:
      sequences: ``[B, P + N]`` int32 prompt (left-padded) then response (right-padded).
      sequence_mask: ``[B, P + N]`` 1 on real prompt tokens and on response tokens up to and
        including the first stop token.
      finished: ``[B]`` bool, whether the response produced the EOS token.
      prompt_length: ``P`` (static).
    """

    sequences: jax.Array
    sequence_mask: jax.Array
    finished: jax.Array

    @property
    def prompt_length(self) -> int: ...


class RewardSource(Protocol):
    """Scores sampled responses: ``source(responses, prompts) -> [B]`` float32.

    Attributes:
      name: the source's name, used in error messages and metrics.
    """

    name: str

    def __call__(self, responses: Responses, prompts: Mapping[str, np.ndarray]) -> jax.Array: ...


def repeat_rows(batch: Mapping[str, Any], num_samples: int) -> dict[str, np.ndarray]:
    """Repeats every field of a prompt batch ``num_samples`` times along axis 0 (contiguously,
    the row order of ``generate(..., num_samples=n)``)."""
    if num_samples == 1:
        return {k: np.asarray(v) for k, v in batch.items()}
    return {k: np.repeat(np.asarray(v), num_samples, axis=0) for k, v in batch.items()}


def check_scores(name: str, scores: Any, rows: int) -> jax.Array:
    """``scores`` as a ``[rows]`` float32 array; raises naming the source ``name`` when the shape
    is wrong or a score is not finite."""
    scores = np.asarray(scores, np.float32)
    if scores.shape != (rows,):
        raise ValueError(f"reward source {name!r} returned shape {scores.shape}, expected ({rows},)")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"reward source {name!r} returned non-finite scores at rows {bad[:10]}")
    return jnp.asarray(scores)


def apply_missing_eos_penalty(
    scores: jax.Array, finished: jax.Array, *, penalty: float | None
) -> jax.Array:
    """``scores - penalty`` on rows that did not produce EOS (TRL ``missing_eos_penalty``)."""
    scores = jnp.asarray(scores, jnp.float32)
    if penalty is None:
        return scores
    return jnp.where(finished, scores, scores - jnp.float32(penalty))


def score_samples(
    source: RewardSource,
    responses: Responses,
    prompts: Mapping[str, Any],
    *,
    num_samples: int = 1,
    missing_eos_penalty: float | None = None,
) -> jax.Array:
    """``[B]`` float32 scores of sampled responses: the reward source (its shape checked), then
    the missing-EOS penalty. The scores are the whole batch's on every process (a host value,
    not placed on a mesh: `rlhf_jax.sharding.global_from_host` places them).

    Args:
      source: a `RewardSource`.
      responses: ``B = B_prompts * num_samples`` rows (`Responses`).
      prompts: the host prompt batch with ``B_prompts`` rows (repeated here with `repeat_rows`).
      num_samples: samples per prompt.
      missing_eos_penalty: subtracted from rows without EOS (None: no penalty).
    """
    scores = jnp.asarray(gather_to_host(source(responses, repeat_rows(prompts, num_samples))),
                         jnp.float32)
    rows = responses.sequences.shape[0]
    if scores.shape != (rows,):
        name = getattr(source, "name", type(source).__name__)
        raise ValueError(f"reward source {name!r} returned shape {scores.shape}, expected ({rows},)")
    if missing_eos_penalty is None:
        return scores
    return apply_missing_eos_penalty(scores, gather_to_host(responses.finished),
                                     penalty=missing_eos_penalty)


def _host_arrays(responses: Responses) -> tuple[np.ndarray, np.ndarray, int]:
    """``(sequences, sequence_mask, P)`` on the host: the whole batch on every process of a
    multi-process run (`rlhf_jax.sharding.gather_to_host`, a collective), so every process
    computes the same scores of the whole batch, as one process would."""
    sequences, mask = gather_to_host((responses.sequences, responses.sequence_mask))
    return sequences, mask, int(responses.prompt_length)


@functools.partial(jax.jit, static_argnames=("graphdef", "head"))
@unchecked  # no checkify effect: JAX's C++ dispatch path
def _reward_model_scores(graphdef, state, sequences, sequence_mask, *, head):
    model = nnx.merge(graphdef, state)
    rewards = model(
        sequences, attention_mask=sequence_mask, positions=positions_from_mask(sequence_mask)
    )
    return jnp.asarray(rewards, jnp.float32)[:, head]


class RewardModelSource:
    """Scores with one head of a ``rlhf_jax.models.RewardModel``, read at the last real token.

    The model is split once; scoring is one jitted forward pass over ``responses.sequences``
    with positions `rlhf_jax.models.positions_from_mask` of the mask, on the arrays as they are
    (global arrays sharded over a mesh on a multi-host slice); only the ``[B]`` scores come back
    to the host (`rlhf_jax.sharding.gather_to_host`, on every process). The reward model must
    share the policy's tokenizer.

    With a ``mesh`` (or after `place_on_mesh`) the parameters live on the mesh, placed once by
    their logical axis names with the policy's rules (`rlhf_jax.sharding.state_shardings`);
    without one they stay where the model holds them (host arrays are then copied to the devices
    on every call). The online trainers place their reward source on their mesh
    (`place_reward_source`).

    Args:
      model: the reward model (its normalisation gain/bias apply).
      head: head index or name (``model.head_names``).
      name: name of this source.
      mesh: the mesh to place the parameters on (None: leave them where they are).
    """

    def __init__(self, model: nnx.Module, *, head: int | str = 0, name: str = "reward_model",
                 mesh: jax.sharding.Mesh | None = None):
        self.graphdef, self.state = nnx.split(model)
        if isinstance(head, str):
            names = tuple(getattr(model, "head_names", ()))
            if head not in names:
                raise ValueError(f"head={head!r} is not one of the reward model's heads {names}")
            head = names.index(head)
        self.head = int(head)
        self.name = name
        self.mesh = None
        if mesh is not None:
            self.place_on_mesh(mesh)

    def place_on_mesh(self, mesh: jax.sharding.Mesh) -> None:
        """Places the parameters on ``mesh`` by their logical axis names (once: parameters
        already placed so are kept, not copied, so sources built from one placed model share
        its arrays)."""
        if self.mesh == mesh:
            return
        self.state = sharding.shard_state(self.state, mesh)
        self.mesh = mesh

    def __call__(self, responses: Responses, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        scores = _reward_model_scores(
            self.graphdef, self.state, responses.sequences, responses.sequence_mask,
            head=self.head,
        )
        return check_scores(self.name, gather_to_host(scores), responses.sequences.shape[0])


def place_reward_source(source: RewardSource, mesh: jax.sharding.Mesh) -> RewardSource:
    """Places every reward model of ``source`` on ``mesh`` (`RewardModelSource.place_on_mesh`),
    through the combining sources (`WeightedRewardSum`, `SafetyGatedReward`) and any source
    with a ``place_on_mesh(mesh)`` method; other sources are left as they are. Returns
    ``source``."""
    place = getattr(source, "place_on_mesh", None)
    if place is not None:
        place(mesh)
    return source


class TokenRewardFunction:
    """A Python reward on token arrays, run on the host.

    ``fn(prompt_ids [B, P], response_ids [B, N], response_mask [B, N]) -> [B]`` on NumPy arrays
    (prompts left-padded, responses right-padded and cut after the stop token): the signature of
    the synthetic tasks' ``gold_reward_tokens``, so ``TokenRewardFunction(task.gold_reward_tokens)``
    scores with the gold reward.
    """

    def __init__(self, fn: Callable[..., Any], *, name: str = "reward_fn"):
        self.fn = fn
        self.name = name

    def __call__(self, responses: Responses, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        sequences, mask, p = _host_arrays(responses)
        scores = self.fn(sequences[:, :p], sequences[:, p:], mask[:, p:])
        return check_scores(self.name, scores, sequences.shape[0])


class TextRewardFunction:
    """A Python reward on decoded text: ``fn(prompts: list[str], responses: list[str]) -> [B]``.

    Prompts are decoded from their real tokens, responses from the tokens under the response
    mask (including a final EOS unless ``decode`` skips special tokens).

    Args:
      fn: the reward on strings.
      decode: token ids (list of int) -> string, e.g. ``functools.partial(tokenizer.decode,
        skip_special_tokens=True)``.
      name: name of this source.
    """

    def __init__(
        self,
        fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]],
        *,
        decode: Callable[[Sequence[int]], str],
        name: str = "text_reward",
    ):
        self.fn = fn
        self.decode = decode
        self.name = name

    def __call__(self, responses: Responses, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        seqs, mask, p = _host_arrays(responses)
        mask = mask.astype(bool)
        prompt_text = [self.decode(r[:p][m[:p]].tolist()) for r, m in zip(seqs, mask)]
        response_text = [self.decode(r[p:][m[p:]].tolist()) for r, m in zip(seqs, mask)]
        return check_scores(self.name, self.fn(prompt_text, response_text), seqs.shape[0])


class WeightedRewardSum:
    """``sum_i w_i * source_i(responses)``: several reward sources combined linearly."""

    def __init__(
        self, sources: Sequence[RewardSource], weights: Sequence[float], *, name: str = "weighted"
    ):
        if len(sources) != len(weights) or not sources:
            raise ValueError(
                f"WeightedRewardSum needs one weight per source; got {len(sources)} sources and "
                f"{len(weights)} weights"
            )
        self.sources = tuple(sources)
        self.weights = tuple(float(w) for w in weights)
        self.name = name

    def place_on_mesh(self, mesh: jax.sharding.Mesh) -> None:
        """`place_reward_source` of every summed source."""
        for source in self.sources:
            place_reward_source(source, mesh)

    def __call__(self, responses: Responses, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        total = 0.0
        for source, weight in zip(self.sources, self.weights):
            total = total + weight * jnp.asarray(source(responses, prompts), jnp.float32)
        return total


def safety_gated_reward(
    helpfulness: jax.Array,
    safety: jax.Array,
    safety_flag: jax.Array,
    *,
    threshold: float = 0.15,
    scale: ScoreScale = "probability",
) -> jax.Array:
    r"""Llama 2's combined reward (Touvron et al., 2023, section 3.2.2).

    .. math::
        R_c = \begin{cases} R_s & \text{if the prompt is safety-flagged or } p_s < \tau \\
                            R_h & \text{otherwise} \end{cases}

    with :math:`\tau` = ``threshold`` (0.15 in the paper) a probability: :math:`p_s = R_s` when
    the scores are probabilities (``scale="probability"``), :math:`p_s = \sigma(R_s)` when they
    are logits (``scale="logit"``, compared as :math:`R_s < \operatorname{logit}(\tau)`).

    Args:
      helpfulness: ``[B]`` helpfulness scores :math:`R_h`.
      safety: ``[B]`` safety scores :math:`R_s`, on the same scale.
      safety_flag: ``[B]`` bool/0-1, whether the prompt is tagged as possibly unsafe.
      threshold: probability in ``(0, 1)`` below which the safety reward is used (keyword-only).
      scale: ``"probability"`` or ``"logit"``, the scale of both scores (keyword-only).

    Returns:
      ``[B]`` float32 combined scores, on the input scale.
    """
    helpfulness = jnp.asarray(helpfulness, jnp.float32)
    safety = jnp.asarray(safety, jnp.float32)
    if helpfulness.shape != safety.shape or helpfulness.ndim != 1:
        raise ValueError(
            f"helpfulness and safety must both be [B]; got {helpfulness.shape} and {safety.shape}"
        )
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    _check_scale(scale)
    if scale == "probability":
        unsafe = safety < threshold
    else:
        unsafe = safety < jnp.float32(np.log(threshold) - np.log1p(-threshold))
    use_safety = jnp.asarray(safety_flag).astype(bool) | unsafe
    return jnp.where(use_safety, safety, helpfulness)


def whiten_linear_scores(
    scores: jax.Array, *, scale: ScoreScale = "probability", eps: float = 1e-6
) -> jax.Array:
    r"""Llama 2's ``WHITEN(LOGIT(R_c))`` (Touvron et al., 2023, section 3.2.2): the scores on
    the linear scale, whitened over the batch.

    .. math::
        z = \operatorname{logit}(\operatorname{clip}(R, \epsilon, 1 - \epsilon))
            \ (\text{probabilities}), \quad z = R \ (\text{logits}); \qquad
        \tilde R = (z - \bar z) / \sqrt{\widehat{\operatorname{Var}}(z) + 10^{-8}}

    (`rlhf_jax.losses.masked_whiten`: Bessel-corrected variance; one row gives 0).

    Args:
      scores: ``[B]`` scores.
      scale: ``"probability"`` (logit taken first) or ``"logit"`` (keyword-only).
      eps: probabilities are clipped to ``[eps, 1 - eps]`` before the logit (keyword-only).

    Returns:
      ``[B]`` float32 whitened scores.
    """
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim != 1:
        raise ValueError(f"scores must be [B], got shape {scores.shape}")
    _check_scale(scale)
    if scale == "probability":
        p = jnp.clip(scores, eps, 1.0 - eps)
        scores = jnp.log(p) - jnp.log1p(-p)
    return losses.masked_whiten(scores, jnp.ones_like(scores))


class SafetyGatedReward:
    """`safety_gated_reward` of a helpfulness and a safety source, then optionally
    `whiten_linear_scores` (Llama 2's full reward: ``WHITEN(LOGIT(R_c))``).

    Args:
      helpfulness: source of :math:`R_h`.
      safety: source of :math:`R_s`.
      threshold: the gate's :math:`\tau`, a probability.
      flag_key: the prompt-batch field (``[B]`` bool/0-1) marking safety prompts; when the batch
        has no such field no prompt is flagged and only the threshold gates.
      scale: ``"probability"`` or ``"logit"``, the scale of both sources' scores.
      whiten: return the gated score's whitened linear value instead of the score itself.
      name: name of this source.
    """

    def __init__(
        self,
        helpfulness: RewardSource,
        safety: RewardSource,
        *,
        threshold: float = 0.15,
        flag_key: str = "is_safety",
        scale: ScoreScale = "probability",
        whiten: bool = False,
        name: str = "safety_gated",
    ):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
        _check_scale(scale)
        self.helpfulness = helpfulness
        self.safety = safety
        self.threshold = float(threshold)
        self.flag_key = flag_key
        self.scale = scale
        self.whiten = bool(whiten)
        self.name = name

    def place_on_mesh(self, mesh: jax.sharding.Mesh) -> None:
        """`place_reward_source` of the helpfulness and the safety source."""
        place_reward_source(self.helpfulness, mesh)
        place_reward_source(self.safety, mesh)

    def __call__(self, responses: Responses, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        rows = responses.sequences.shape[0]
        flag = prompts.get(self.flag_key)
        flag = np.zeros((rows,), bool) if flag is None else np.asarray(flag).astype(bool)
        if flag.shape != (rows,):
            raise ValueError(f"prompt field {self.flag_key!r} has shape {flag.shape}, expected "
                             f"({rows},)")
        gated = safety_gated_reward(
            self.helpfulness(responses, prompts),
            self.safety(responses, prompts),
            flag,
            threshold=self.threshold,
            scale=self.scale,
        )
        return whiten_linear_scores(gated, scale=self.scale) if self.whiten else gated
