"""Reinforced Self-Training (ReST; Gulcehre et al. 2023): Grow a dataset by sampling from the
policy, then Improve the policy offline on ever stricter reward-filtered subsets of it.

The algorithm (the paper's Algorithm 1), for ``g = 1 .. G`` (``num_grow``):

1. **Grow**: for ``grow_batches`` batches of ``data.batch_size`` prompts, sample
   ``num_samples`` (``N``) responses per prompt from the current policy (the project's jitted
   sampler, ``rollout``) and score each with the run's reward source (any of the online
   trainers': ``gold``, ``model``, ``judge``, ``gated``, ``combined``; minus the missing-EOS
   penalty). The Grow set ``D_g`` (token rows, rewards, per-prompt advantages) is written to
   ``<output_dir>/grow/<g>/batch_<k>.npz`` through ``etils.epath`` (local or ``gs://``). On
   several processes every process holds the same Grow set (it scores the whole rollout): on a
   bucket process 0 writes it once; in a local directory, which another host may not see, each
   process writes its own copy, ``batch_<k>.<i>-of-<n>.npz`` (`grow_copy_suffix`), and reads it
   back on resume.
2. **Improve**: for each threshold ``tau_1 < tau_2 < ... < tau_I`` (``thresholds``, one Improve
   step each) keep the samples of ``D_g`` whose reward is strictly above ``tau_i`` and run
   ``steps_per_improve`` optimizer steps of ``improve_batch_size`` rows drawn from the kept set
   (shuffled, an epoch at a time) with the offline loss:

   * ``loss="bc"`` (the default, the paper's best): behaviour cloning, the token-mean NLL of the
     kept responses (`rlhf_jax.losses.rest_bc_loss`; ``weighting="reward"`` / ``"exp"`` weight
     each sample by its reward, ReST-EM's and reward-weighted regression's variants);
   * ``loss="gold"``: GOLD's importance-weighted likelihood with the reward as the return
     (`rlhf_jax.losses.gold_loss`);
   * ``loss="vmpo"``: BVMPO, V-MPO's top-half exponentiated-advantage weights over the minibatch
     with the advantage ``R - mean_N(R)`` of the sample's prompt in the Grow set
     (`rlhf_jax.losses.vmpo_loss`).

What the paper leaves open, and what is chosen here:

- **Thresholds.** The paper's experiments use fixed thresholds that rise with every Improve
  step on a reward scaled to ``[0, 1]``; its Algorithm 1 asks ``tau_1`` above the Grow set's
  mean reward. ``threshold_type="fixed"`` takes ``thresholds`` as reward values;
  ``"percentile"`` (the default, scale-free, so it works with any reward source) takes them as
  percentiles of ``D_g``'s rewards, computed again at every Grow. The default ``(50, 75, 90)``
  keeps the better half, quarter and tenth: ``tau_1`` is the median, near the mean the
  algorithm asks ``tau_1`` to exceed.
- **Improve continues** from the policy of the previous Improve step (and each Grow samples
  from the newest policy), as ReST does; ReST-EM's restart from the base model is not done.
  The optimizer state (AdamW moments, learning-rate schedule over all optimizer steps of the
  run) carries on too.
- **No human data is mixed in**: ReST's Grow set adds the original supervised dataset ``D``;
  the online trainers here take prompts only, so ``D_g`` holds model samples only (start from
  an SFT policy, ``model.path``).
- **A fixed number of optimizer steps** per Improve step (``steps_per_improve``) instead of the
  paper's "while the reward improves on D_eval" (held-out evaluation runs with
  ``eval_every``); the run's length is known up front, as the loop needs.
- **The reference policy** (the starting policy; with LoRA the adapters switched off) enters no
  loss: it only measures the KL of the Grow samples (``rest/kl_ref``) and of the held-out
  responses.
- **An empty filtered set** (no sample above ``tau_i``) skips that Improve step's updates and
  counts it (``rest/empty_filter``), with a warning.

The run is one `rlhf_jax.train.loop.fit` loop whose steps are the Grow batches and the Improve
optimizer steps, in order: a Grow takes ``grow_batches + len(thresholds) * steps_per_improve``
loop steps, and ``num_steps=0`` (the default) runs ``num_grow`` of them. Checkpoints, SIGTERM
saves, the NaN policy and exact resume therefore work at the granularity of one Grow batch or one
optimizer step: the checkpoint's data state records the schedule position (``grow``,
``phase``, ``improve``, ``step``) and the prompt loader's state, and a run resumed in the middle
of an Improve step reads its Grow set back from the run directory.

Metrics (``rest/``): on Grow steps ``grow_reward_mean``, ``grow_reward_std``, ``kl_ref``,
``response_length``, ``eos_fraction`` (and ``gold_reward`` on a synthetic task); on Improve
steps ``threshold`` (``tau_i``), ``kept_fraction`` (of the Grow set), ``filtered_reward`` (the
mean reward of the kept samples), ``loss``, ``nll`` (token-mean NLL of the minibatch),
``improve`` (``i``, from 1), ``empty_filter``; every step has ``grow`` (``g``, from 1).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from rlhf_jax import losses, sharding, storage
from rlhf_jax.generation import RewardSource
from rlhf_jax.train.config import DataSpec, TrainConfig, check_int, check_number, require
from rlhf_jax.train.logprobs import model_scores
from rlhf_jax.train.online import (
    ONLINE_DATA,
    MetricFn,
    OnlineTrainer,
    jit_mean_kl_to_reference,
    seed_key_data,
    train_online,
)
from rlhf_jax.train.rejection_sampling import best_of_n_sft_batch
from rlhf_jax.train.rewards import RewardSpec
from rlhf_jax.train.rollout import Rollout, RolloutConfig
from rlhf_jax.train.state import TrainState, make_train_step

_log = logging.getLogger("rlhf_jax.train")

REST_LOSSES = ("bc", "gold", "vmpo")
GROW_DIR = "grow"
"""Sub-directory of the run directory that holds the Grow sets."""


@dataclasses.dataclass(frozen=True)
class ReSTConfig(TrainConfig):
    """Reinforced Self-Training: Grow (sample, score) then Improve (filter, fine-tune offline).
    ``data.batch_size`` = prompts per Grow batch; ``num_steps`` counts Grow batches plus Improve
    optimizer steps (0: ``num_grow`` whole Grow + Improve cycles)."""

    output_dir: str = "runs/rest"
    num_steps: int = 0
    """Loop steps (Grow batches + Improve optimizer steps); 0: ``num_grow`` whole cycles."""
    data: DataSpec = ONLINE_DATA
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardSpec = RewardSpec()
    num_grow: int = 2
    """Grow steps (G) of the run when ``num_steps`` is 0."""
    grow_batches: int = 1
    """Prompt batches (of ``data.batch_size`` prompts) sampled per Grow step."""
    num_samples: int = 4
    """Responses sampled per prompt (N)."""
    thresholds: tuple[float, ...] = (50.0, 75.0, 90.0)
    """One reward threshold per Improve step, strictly increasing (tau_1 < tau_2 < ...); a
    sample is kept when its reward is strictly above."""
    threshold_type: Literal["percentile", "fixed"] = "percentile"
    """``percentile``: thresholds are percentiles in [0, 100) of the Grow set's rewards;
    ``fixed``: reward values."""
    steps_per_improve: int = 4
    """Optimizer steps per Improve step."""
    improve_batch_size: int = 8
    """Rows (kept samples) per Improve optimizer step."""
    loss: Literal["bc", "gold", "vmpo"] = "bc"
    """Offline loss of the Improve steps: behaviour cloning, GOLD or BVMPO."""
    weighting: Literal["none", "reward", "exp"] = "none"
    """``bc``: per-sample weight of the NLL (``rest_bc_loss``)."""
    weight_temperature: float = 1.0
    """``bc`` with ``weighting="exp"``: temperature of the reward weights."""
    gold_min_weight: float = 0.2
    """``gold``: lower bound u of the per-token importance weight."""
    vmpo_temperature: float = 1.0
    """``vmpo``: the (fixed) temperature eta of the exponentiated advantages."""
    vmpo_top_fraction: float = 0.5
    """``vmpo``: fraction of a minibatch's samples (by advantage) that get weight."""

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(self.thresholds))
        super().__post_init__()
        for name in ("num_grow", "grow_batches", "num_samples", "steps_per_improve",
                     "improve_batch_size"):
            check_int(self, name, low=1)
        require(len(self.thresholds) >= 1, "thresholds",
                "thresholds must hold at least one value (one per Improve step)")
        require(all(isinstance(t, int | float) and not isinstance(t, bool) and np.isfinite(t)
                    for t in self.thresholds), "thresholds",
                f"thresholds must be finite numbers, got {list(self.thresholds)}")
        require(all(a < b for a, b in zip(self.thresholds, self.thresholds[1:])), "thresholds",
                f"thresholds must be strictly increasing (tau_1 < tau_2 < ...), got "
                f"{list(self.thresholds)}")
        if self.threshold_type == "percentile":
            require(all(0.0 <= t < 100.0 for t in self.thresholds), "thresholds",
                    f"percentile thresholds must lie in [0, 100), got {list(self.thresholds)}")
        check_number(self, "weight_temperature", low=0.0, low_open=True)
        require(self.weighting == "exp" or self.weight_temperature == 1.0, "weight_temperature",
                f"weight_temperature is only used by weighting='exp', not {self.weighting!r}")
        require(self.loss == "bc" or self.weighting == "none", "weighting",
                f"weighting={self.weighting!r} applies to loss='bc' only, not {self.loss!r}")
        check_number(self, "gold_min_weight", low=0.0, high=1.0)
        check_number(self, "vmpo_temperature", low=0.0, low_open=True)
        check_number(self, "vmpo_top_fraction", low=0.0, high=1.0, low_open=True)
        if self.num_steps == 0:
            object.__setattr__(self, "num_steps", self.num_grow * self.steps_per_grow)

    @property
    def steps_per_grow(self) -> int:
        """Loop steps of one Grow + Improve cycle."""
        return self.grow_batches + len(self.thresholds) * self.steps_per_improve


# ---------------------------------------------------------------------------------------------
# The schedule: which loop step is which Grow batch or Improve optimizer step
# ---------------------------------------------------------------------------------------------


class Position(NamedTuple):
    """Where loop step ``index`` (from 0) falls: Grow ``grow`` (from 0), ``phase`` ``"grow"``
    (``step`` = the Grow batch) or ``"improve"`` (``improve`` = the Improve step, ``step`` = its
    optimizer step)."""

    index: int
    grow: int
    phase: str
    improve: int
    step: int


def locate(index: int, *, grow_batches: int, num_improve: int, steps_per_improve: int
           ) -> Position:
    """The `Position` of loop step ``index`` (0-based)."""
    cycle = grow_batches + num_improve * steps_per_improve
    grow, k = divmod(int(index), cycle)
    if k < grow_batches:
        return Position(index=int(index), grow=grow, phase="grow", improve=-1, step=k)
    improve, step = divmod(k - grow_batches, steps_per_improve)
    return Position(index=int(index), grow=grow, phase="improve", improve=improve, step=step)


def count_updates(num_steps: int, *, grow_batches: int, num_improve: int,
                  steps_per_improve: int) -> int:
    """Number of Improve optimizer steps among the first ``num_steps`` loop steps."""
    cycle = grow_batches + num_improve * steps_per_improve
    full, rest = divmod(int(num_steps), cycle)
    return full * num_improve * steps_per_improve + max(rest - grow_batches, 0)


class Work(NamedTuple):
    """One loop step's work: its `Position` and, on Grow steps, the host prompt batch."""

    position: Position
    prompts: Mapping[str, np.ndarray] | None


class ReSTSchedule:
    """Iterator of the run's `Work` items over a prompt loader: a Grow step draws the next
    prompt batch, an Improve step draws none. ``get_state`` / ``set_state`` hold the position
    (with its grow / phase / improve / step, for the reader) and the loader's state, so a
    checkpoint restores the schedule exactly."""

    def __init__(self, prompts: Iterator[Mapping[str, np.ndarray]], *, grow_batches: int,
                 num_improve: int, steps_per_improve: int):
        self.prompts = prompts
        self.shape = dict(grow_batches=grow_batches, num_improve=num_improve,
                          steps_per_improve=steps_per_improve)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> Work:
        position = locate(self.index, **self.shape)
        prompts = next(self.prompts) if position.phase == "grow" else None
        self.index += 1
        return Work(position=position, prompts=prompts)

    def get_state(self) -> dict[str, Any]:
        get = getattr(self.prompts, "get_state", None)
        last = locate(max(self.index - 1, 0), **self.shape)
        return {"index": self.index, "grow": last.grow, "phase": last.phase,
                "improve": last.improve, "step": last.step,
                "prompts": get() if callable(get) else None}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.index = int(state["index"])
        if state.get("prompts") is not None:
            set_state = getattr(self.prompts, "set_state", None)
            if not callable(set_state):
                raise TypeError("the checkpoint holds a prompt-loader state but the prompt "
                                "iterator has no set_state(); cannot resume exactly")
            set_state(state["prompts"])


# ---------------------------------------------------------------------------------------------
# Thresholds, the Grow set on disk, the kept rows
# ---------------------------------------------------------------------------------------------


def resolve_thresholds(rewards: np.ndarray, thresholds: Sequence[float], *,
                       threshold_type: str) -> np.ndarray:
    """``[I]`` float64 reward thresholds of a Grow set: ``thresholds`` themselves (``fixed``) or
    their percentiles of ``rewards`` (``percentile``, linear interpolation)."""
    if threshold_type == "fixed":
        return np.asarray(thresholds, np.float64)
    if threshold_type != "percentile":
        raise ValueError(f"threshold_type={threshold_type!r}; allowed: ['percentile', 'fixed']")
    return np.percentile(np.asarray(rewards, np.float64), np.asarray(thresholds, np.float64))


def improve_rows(kept: np.ndarray, *, step: int, batch_size: int, seed: int, grow: int,
                 improve: int) -> np.ndarray:
    """Row indices of optimizer step ``step`` of an Improve step: the kept rows ``kept`` in
    epochs, each a fresh permutation drawn from ``(seed, grow, improve, epoch)``, read
    ``batch_size`` at a time (a kept set smaller than a batch repeats within it)."""
    k = len(kept)
    if k == 0:
        raise ValueError("no kept rows to draw from")
    slots = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(slots, k)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, grow, improve, int(epoch)]).permutation(kept)
        where = epochs == epoch
        out[where] = order[offsets[where]]
    return out


GROW_FIELDS = ("input_ids", "attention_mask", "positions", "loss_mask", "rewards", "advantages")
"""Arrays of a Grow set: the SFT rows ``[M, P + N]`` (prompt, response, loss on the response)
and per row ``[M]`` the reward and its advantage over the mean reward of the prompt's N
samples."""


def grow_copy_suffix(output_dir: str) -> str:
    """The part of a Grow batch's file name that names this process's copy: ``""`` when one
    file serves every process (one process, or a bucket every host reads), else
    ``".<i>-of-<n>"`` (several processes and a local directory, which other hosts may not see:
    each process writes and reads its own copy, as DPO's ``reference_logps.<i>-of-<n>.npz``)."""
    if jax.process_count() == 1 or storage.is_remote(output_dir):
        return ""
    return f".{jax.process_index()}-of-{jax.process_count()}"


def writes_grow_sets(output_dir: str) -> bool:
    """Whether this process writes the Grow batches: every process into a local directory (its
    own copy, `grow_copy_suffix`), process 0 alone into a bucket."""
    return jax.process_index() == 0 or bool(grow_copy_suffix(output_dir))


def grow_batch_path(output_dir: str, grow: int, batch: int, *, suffix: str = "") -> epath.Path:
    """``<output_dir>/grow/<grow>/batch_<batch><suffix>.npz`` (0-based indices; ``suffix`` a
    process's copy, `grow_copy_suffix`)."""
    return (epath.Path(output_dir) / GROW_DIR / f"{grow:05d}"
            / f"batch_{batch:05d}{suffix}.npz")


def write_grow_batch(path: epath.Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes one Grow batch's arrays (`GROW_FIELDS`) as an ``.npz`` (via a temporary name, so
    a killed write leaves no truncated file under ``path``)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(arrays[k]) for k in GROW_FIELDS})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)  # a resumed run rewrites the batches grown after its checkpoint


def _stored_batch(output_dir: str, grow: int, batch: int, suffix: str) -> epath.Path:
    """The file of Grow batch ``batch`` this process reads: its own copy (``suffix``), else the
    one shared file, else any process's copy (every copy holds the same rows: a run resumed on
    another number of processes). Raises FileNotFoundError naming its own copy."""
    own = grow_batch_path(output_dir, grow, batch, suffix=suffix)
    candidates = [own, grow_batch_path(output_dir, grow, batch)]
    folder = own.parent
    if folder.exists():
        candidates += sorted(folder.glob(f"batch_{batch:05d}.*-of-*.npz"))
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"{own}: the Grow set's batch {batch} is missing; the run "
                            "directory does not hold the data its checkpoint needs")


def read_grow_set(output_dir: str, grow: int, num_batches: int, *, suffix: str = ""
                  ) -> dict[str, np.ndarray]:
    """The Grow set ``grow`` of a run: its ``num_batches`` batches concatenated (each from this
    process's copy ``suffix`` where there is one, `grow_copy_suffix`); an error names a missing
    file or field."""
    parts = []
    for k in range(num_batches):
        path = _stored_batch(output_dir, grow, k, suffix)
        with np.load(io.BytesIO(path.read_bytes())) as f:
            missing = [name for name in GROW_FIELDS if name not in f.files]
            if missing:
                raise ValueError(f"{path} lacks the arrays {missing}")
            parts.append({name: f[name] for name in GROW_FIELDS})
    return {name: np.concatenate([p[name] for p in parts]) for name in GROW_FIELDS}


def remove_grow_sets(output_dir: str) -> None:
    """Deletes the Grow sets of an earlier run in ``output_dir`` (``overwrite``): the whole
    ``grow/`` folder from process 0 when one file serves every process; with per-process copies
    each process its own (and process 0 the shared files), so processes sharing one local
    directory do not delete under each other."""
    grow_dir = epath.Path(output_dir) / GROW_DIR
    suffix = grow_copy_suffix(output_dir)
    if not grow_dir.exists():
        return
    if not suffix:
        if jax.process_index() == 0:
            grow_dir.rmtree()
        return
    patterns = [f"*/batch_*{suffix}.npz*"]
    if jax.process_index() == 0:
        patterns.append("*/batch_?????.npz")
    for pattern in patterns:
        for path in grow_dir.glob(pattern):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The Improve loss
# ---------------------------------------------------------------------------------------------


class ReSTHyperParams(NamedTuple):
    """The Improve step's loss and its options (the `ReSTConfig` fields of the same names)."""

    loss: str = "bc"
    weighting: str = "none"
    weight_temperature: float = 1.0
    gold_min_weight: float = 0.2
    vmpo_temperature: float = 1.0
    vmpo_top_fraction: float = 0.5

    @classmethod
    def from_config(cls, config: ReSTConfig) -> ReSTHyperParams:
        return cls(**{f: getattr(config, f) for f in cls._fields})


def rest_improve_loss(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None = None,
                      *, hp: ReSTHyperParams) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The offline loss of an Improve minibatch of kept samples (module docstring).

    Args:
      model: the policy (a causal LM).
      batch: ``input_ids, attention_mask, positions, loss_mask`` ``[B, T]`` (prompt and response;
        the loss on the response tokens), ``rewards, advantages`` ``[B]``.
      rng: unused (part of the trainer loss signature).
      hp: `ReSTHyperParams`.

    Returns:
      ``(loss, metrics)``: ``bc`` and ``gold`` reduce per token over the batch (the SFT token
      mean), ``vmpo`` is the mean over samples of V-MPO's weighted sequence NLL.
    """
    logps = model_scores(model, batch, where=batch["loss_mask"]).logps
    mask = batch["loss_mask"].astype(jnp.float32)
    rewards = batch["rewards"]
    if hp.loss == "bc":
        out = losses.rest_bc_loss(logps, mask, rewards, weighting=hp.weighting,
                                  temperature=hp.weight_temperature)
        loss = losses.aggregate_loss(out.loss, out.mask, mode="bnpo")
    elif hp.loss == "gold":
        loss = losses.aggregate_loss(
            losses.gold_loss(logps, mask, rewards, min_importance_weight=hp.gold_min_weight),
            mask, mode="bnpo")
    elif hp.loss == "vmpo":
        out = losses.vmpo_loss(losses.masked_sum(logps, mask, axis=-1), batch["advantages"],
                               hp.vmpo_temperature, top_fraction=hp.vmpo_top_fraction)
        loss = jnp.mean(out.policy_loss)
    else:
        raise ValueError(f"loss={hp.loss!r}; allowed: {list(REST_LOSSES)}")
    metrics = {"rest/loss": loss,
               "rest/nll": jax.lax.stop_gradient(losses.masked_mean(-logps, mask))}
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class ReSTState(NamedTuple):
    """Loop steps completed, the policy's `TrainState` (its ``step`` counts Improve optimizer
    steps), the RNG of the Grow samples."""

    step: jax.Array
    policy: TrainState
    rng: jax.Array


@functools.lru_cache(maxsize=16)
def _jit_improve_step(policy_graphdef, tx, schedule, hp):
    loss_fn = functools.partial(rest_improve_loss, hp=hp)
    step = make_train_step(loss_fn, tx, graphdef=policy_graphdef, schedule=schedule)
    return jax.jit(step, donate_argnums=(0,))


class _Grown(NamedTuple):
    """What per-step metric functions receive on a Grow step: the samples and their scores."""

    rollout: Rollout
    scores: jax.Array


class ReSTTrainer(OnlineTrainer):
    """ReST held in memory; ``iteration()`` runs one loop step (a Grow batch or an Improve
    optimizer step, module docstring).

    Args: as `rlhf_jax.train.rejection_sampling.RejectionSamplingTrainer`; ``prompts`` yields
    one Grow batch's prompts per batch. The Grow sets go under ``config.output_dir``.
    """

    algorithm = "rest"

    def __init__(
        self,
        config: ReSTConfig,
        *,
        policy: nnx.Module,
        reward: RewardSource,
        prompts: Iterator[Mapping[str, np.ndarray]],
        eos_token_id: int,
        pad_token_id: int,
        reference: nnx.Module | None = None,
        mesh: Any = None,
        metric_fns: Sequence[MetricFn] = (),
    ):
        shape = dict(grow_batches=config.grow_batches, num_improve=len(config.thresholds),
                     steps_per_improve=config.steps_per_improve)
        self.hp = ReSTHyperParams.from_config(config)
        self.setup(
            config,
            policy=policy,
            reward=reward,
            prompts=ReSTSchedule(prompts, **shape),
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            reference=reference,
            mesh=mesh,
            metric_fns=metric_fns,
            samples_per_prompt=config.num_samples,
            update_rows=config.improve_batch_size,
            update_rows_name="improve_batch_size",
            num_updates=count_updates(config.num_steps, **shape),
        )
        self._kl = jit_mean_kl_to_reference(self.policy_graphdef, self.reference,
                                            float(config.rollout.temperature))
        self._improve_step = _jit_improve_step(self.policy_graphdef, self.tx, self.schedule,
                                               self.hp)
        self._grow_sets: dict[int, dict[str, np.ndarray]] = {}
        self._grow_parts: dict[int, dict[int, dict[str, np.ndarray]]] = {}
        self._thresholds: dict[int, np.ndarray] = {}

    def initial_state(self, policy_state: TrainState) -> ReSTState:
        return ReSTState(step=jnp.zeros((), jnp.int32), policy=policy_state,
                         rng=seed_key_data(self.config.seed))

    def step(self, state: ReSTState, work: Work) -> tuple[ReSTState, dict[str, Any]]:
        """One loop step (the `fit` step function): a Grow batch or an Improve optimizer step."""
        if work.position.phase == "grow":
            state, metrics = self.grow(state, work.position, work.prompts)
        else:
            state, metrics = self.improve(state, work.position)
        metrics["rest/grow"] = work.position.grow + 1
        return state, metrics

    def train(self, *, guard: Any = None) -> Any:
        """`OnlineTrainer.train`; with ``config.overwrite`` the old Grow sets are deleted with
        the old checkpoints."""
        if self.config.overwrite:
            remove_grow_sets(self.config.output_dir)
        return super().train(guard=guard)

    # -- Grow --------------------------------------------------------------------------------

    def grow(self, state: ReSTState, position: Position, prompts: Mapping[str, np.ndarray]
             ) -> tuple[ReSTState, dict[str, Any]]:
        """Samples and scores one prompt batch, adds it to Grow set ``position.grow`` (in memory
        and on disk)."""
        rollout_key, next_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        rollout = self.rollout(state, prompts, rollout_key)
        scores = self.scores(rollout, prompts)
        mask = rollout.response_mask.astype(jnp.float32)
        metrics: dict[str, Any] = {
            "rest/grow_reward_mean": jnp.mean(scores),
            "rest/grow_reward_std": jnp.std(scores),
            "rest/kl_ref": self._kl(state.policy, self.reference.state, rollout),
            "rest/response_length": jnp.mean(jnp.sum(mask, axis=-1)),
            "rest/eos_fraction": jnp.mean(rollout.finished.astype(jnp.float32)),
            "train/nonfinite": jnp.zeros((), jnp.float32),
        }
        metrics.update(self.extra_metrics(_Grown(rollout=rollout, scores=scores), prompts))
        rows = best_of_n_sft_batch(rollout, jnp.arange(rollout.sequences.shape[0]))
        arrays = sharding.gather_to_host(dict(rows))
        rewards = sharding.gather_to_host(scores).astype(np.float32)
        groups = rewards.reshape(-1, self.samples_per_prompt)
        arrays["rewards"] = rewards
        arrays["advantages"] = (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)
        if writes_grow_sets(self.config.output_dir):
            write_grow_batch(grow_batch_path(self.config.output_dir, position.grow,
                                             position.step,
                                             suffix=grow_copy_suffix(self.config.output_dir)),
                             arrays)
        self._grow_parts.setdefault(position.grow, {})[position.step] = arrays
        self._grow_sets.pop(position.grow, None)
        self._thresholds.pop(position.grow, None)
        new_state = ReSTState(step=state.step + 1, policy=state.policy,
                              rng=jax.random.key_data(next_key))
        return new_state, metrics

    def grow_set(self, grow: int) -> dict[str, np.ndarray]:
        """Grow set ``grow`` (0-based) as host arrays `GROW_FIELDS`: from memory when this
        process grew it, else read back from the run directory (a resumed run)."""
        if grow not in self._grow_sets:
            parts = self._grow_parts.get(grow, {})
            if all(k in parts for k in range(self.config.grow_batches)):
                data = {name: np.concatenate([parts[k][name]
                                              for k in range(self.config.grow_batches)])
                        for name in GROW_FIELDS}
            else:
                data = read_grow_set(self.config.output_dir, grow, self.config.grow_batches,
                                     suffix=grow_copy_suffix(self.config.output_dir))
            self._grow_sets = {grow: data}  # only the newest Grow set is kept
            self._grow_parts = {g: p for g, p in self._grow_parts.items() if g > grow}
        return self._grow_sets[grow]

    def thresholds(self, grow: int) -> np.ndarray:
        """``[I]`` the reward thresholds of Grow set ``grow``."""
        if grow not in self._thresholds:
            self._thresholds = {grow: resolve_thresholds(
                self.grow_set(grow)["rewards"], self.config.thresholds,
                threshold_type=self.config.threshold_type)}
        return self._thresholds[grow]

    # -- Improve -----------------------------------------------------------------------------

    def improve(self, state: ReSTState, position: Position) -> tuple[ReSTState, dict[str, Any]]:
        """One optimizer step of Improve step ``position.improve`` on the Grow set's samples
        above its threshold."""
        data = self.grow_set(position.grow)
        tau = float(self.thresholds(position.grow)[position.improve])
        rewards = data["rewards"]
        kept = np.flatnonzero(rewards > tau)
        metrics: dict[str, Any] = {
            "rest/improve": position.improve + 1,
            "rest/threshold": tau,
            "rest/kept_fraction": len(kept) / len(rewards),
            "rest/filtered_reward": float(np.mean(rewards[kept])) if len(kept) else 0.0,
            "rest/empty_filter": float(len(kept) == 0),
        }
        policy = state.policy
        if len(kept) == 0:
            if position.step == 0:
                _log.warning("ReST Grow %d, Improve %d: no sample has a reward above the "
                             "threshold %.6g; its %d optimizer steps are skipped",
                             position.grow + 1, position.improve + 1, tau,
                             self.config.steps_per_improve)
            metrics.update({"rest/loss": 0.0, "rest/nll": 0.0, "train/nonfinite": 0.0})
        else:
            rows = improve_rows(kept, step=position.step,
                                batch_size=self.config.improve_batch_size,
                                seed=self.config.seed, grow=position.grow,
                                improve=position.improve)
            batch = sharding.global_from_host({k: data[k][rows] for k in GROW_FIELDS},
                                              self.batch_sharding)
            policy, step_metrics = self._improve_step(policy, batch)
            metrics.update(step_metrics)
        new_state = ReSTState(step=state.step + 1, policy=policy, rng=state.rng)
        return new_state, metrics


def train_rest(config: ReSTConfig) -> dict[str, Any]:
    """``rlhf-jax rest``: builds policy, reward and prompts and runs Grow and Improve steps."""
    return train_online(ReSTTrainer, config, algorithm="rest")


__all__ = [
    "GROW_DIR",
    "GROW_FIELDS",
    "REST_LOSSES",
    "Position",
    "ReSTConfig",
    "ReSTHyperParams",
    "ReSTSchedule",
    "ReSTState",
    "ReSTTrainer",
    "Work",
    "count_updates",
    "grow_batch_path",
    "grow_copy_suffix",
    "improve_rows",
    "locate",
    "read_grow_set",
    "remove_grow_sets",
    "resolve_thresholds",
    "rest_improve_loss",
    "train_rest",
    "write_grow_batch",
    "writes_grow_sets",
]
