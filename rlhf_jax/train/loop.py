"""The generic training loop: jitted steps, logging, evaluation and checkpoint cadence, resume,
NaN policy and SIGTERM handling. Every trainer (SFT, RM, DPO, PPO, ...) runs through it.

Two levels:

- `train_loop(step_fn, state, batches, ...)` runs `num_steps - state.step` steps of an already
  jitted `step_fn(state, batch) -> (state, metrics)` over an iterator of host batches, and
  handles logging, evaluation, checkpoints, the NaN policy and preemption.
- `fit(config, step_fn=..., state=..., train_batches=...)` is what trainers call: it checks
  that `config.output_dir` holds this run (`check_run_identity`: a resume with a changed config
  that alters the math is refused, a fresh start into used checkpoints needs `overwrite`), then
  writes `config.yaml`, opens the `MetricsLogger` and the `Checkpointer` under `config.output_dir`,
  resumes from the newest checkpoint (train state onto the caller's shardings, data-loader state
  via `set_state`), installs the SIGTERM handler and runs `train_loop`.

Device work is dispatched asynchronously: the host reads a step's metrics only after it has
dispatched the next step, so the host never stalls the device except when it must (a log line,
an evaluation or a checkpoint).

Resume is exact: the checkpoint holds the train state (including the PRNG key) and the data
loader's state taken right after the batch of the last completed step was drawn, and
`metrics.jsonl` lines after the restored step are dropped before the run continues. An
interrupted-then-resumed run therefore logs bit-identical metrics to an uninterrupted one.

Non-finite values: `make_train_step` skips any update whose loss or gradient norm is not finite
(so the state is never poisoned) and reports `train/nonfinite`. With `nan_policy="skip"` the loop
counts such steps (`train/skipped_steps`, cumulative, in every log line) and raises
`NonFiniteError` after `max_consecutive_skips` in a row; with `"stop"` it raises
`NonFiniteError` naming the step, before any later checkpoint is written. No checkpoint is
written while the newest update was non-finite, nor of a state that holds a non-finite value (an
update with a finite loss and gradient can still overflow the parameters); the run's final save
of such a state raises `NonFiniteError`.

Host memory: after its first step (whose call compiles the step) the loop hands the memory the
compiler freed back to the kernel (`rlhf_jax.host_memory.release_freed_memory`, glibc only), so
that it does not stay resident under the steps' own buffers.

Metrics the loop adds to each training log line: `train/skipped_steps` (cumulative count of
skipped updates) and `train/steps_per_sec` (host wall-clock rate since the previous log line;
not part of the bit-exact comparison).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from etils import epath

from rlhf_jax import losses
from rlhf_jax.host_memory import release_freed_memory
from rlhf_jax.storage import ensure_dir
from rlhf_jax.train.checkpoint import Checkpointer, all_finite, whole_stream_state
from rlhf_jax.train.config import ConfigError, TrainConfig, config_to_dict, save_config
from rlhf_jax.train.logging import MetricsLogger, SampleTable
from rlhf_jax.train.state import TrainState

StepFn = Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
EvalFn = Callable[[TrainState], Mapping[str, Any]]
"""`eval_fn(state) -> {name: float or SampleTable}` (tables are logged, not returned)."""

_log = logging.getLogger("rlhf_jax.train")

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
WALL_CLOCK_METRICS = ("train/steps_per_sec",)
"""Metrics measured on the host clock (excluded when comparing runs for exactness)."""


class NonFiniteError(FloatingPointError):
    """Raised under `nan_policy="stop"` when a step's loss or gradient is not finite, and under
    `nan_policy="skip"` after `max_consecutive_skips` skipped updates in a row."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint that the loop asked for was not written."""


class LoopResult(NamedTuple):
    """What `train_loop` / `fit` return.

    Attributes:
      state: the final train state (on device).
      step: the number of completed steps.
      metrics: the last step's training metrics (host floats).
      eval_metrics: the last evaluation's metrics (empty if none ran).
      skipped_steps: number of updates skipped for non-finite loss/gradient.
      preempted: True when the loop stopped early on SIGTERM (after saving).
    """

    state: TrainState
    step: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]
    skipped_steps: int
    preempted: bool


def jit_train_step(
    step_fn: StepFn,
    *,
    state_sharding: Any = None,
    batch_sharding: Any = None,
    donate: bool = True,
    traced_hparams: bool = False,
) -> StepFn:
    """`jax.jit` of a pure step with explicit in/out shardings and the state donated.

    Args:
      step_fn: `step(state, batch) -> (state, metrics)`.
      state_sharding: a pytree of `jax.sharding.Sharding` matching the state (or a prefix of it;
        see `rlhf_jax.sharding`), or None to follow the inputs' shardings.
      batch_sharding: the batch's sharding (a pytree prefix, e.g. one `NamedSharding` for every
        key), or None.
      donate: donate the input state's buffers to the output state.
      traced_hparams: the step is `step(state, batch, hparams)` (`make_train_step`), the
        hyper-parameters placed as JAX chooses (scalars: replicated).
    """
    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if state_sharding is not None or batch_sharding is not None:
        kwargs["in_shardings"] = (state_sharding, batch_sharding) + ((None,) * traced_hparams)
        kwargs["out_shardings"] = (state_sharding, None)
    return jax.jit(losses.unchecked(step_fn), **kwargs)


class PreemptionGuard:
    """Context manager that turns SIGTERM into a flag the loop checks at each step boundary.

    `request()` sets the flag by hand (what the signal handler does). Outside the main thread
    (where signal handlers cannot be installed) only `request()` works. The previous handler is
    restored on exit.
    """

    def __init__(self, *, enabled: bool = True, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.enabled = enabled
        self.signals = signals
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, signum: int | None = None, frame: Any = None) -> None:
        self._event.set()

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self.request)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _host(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def _data_state(batches: Any) -> Any:
    get_state = getattr(batches, "get_state", None)
    return get_state() if callable(get_state) else None


def _log_eval(logger: MetricsLogger | None, step: int,
              results: Mapping[str, Any]) -> dict[str, Any]:
    """Logs an evaluation's scalars and its `SampleTable`s; returns the scalars."""
    scalars = {k: v for k, v in results.items() if not isinstance(v, SampleTable)}
    if logger is not None:
        logger.log(step, scalars)
        for name, table in results.items():
            if isinstance(table, SampleTable):
                logger.log_table(step, name, table)
    return scalars


def train_loop(
    step_fn: StepFn,
    state: TrainState,
    batches: Iterator[Mapping[str, np.ndarray]],
    *,
    num_steps: int,
    put_batch: Callable[[Mapping[str, np.ndarray]], Any] | None = None,
    eval_fn: EvalFn | None = None,
    eval_every: int = 0,
    logger: MetricsLogger | None = None,
    log_every: int = 1,
    checkpointer: Checkpointer | None = None,
    checkpoint_every: int = 0,
    run_config: Mapping[str, Any] | None = None,
    nan_policy: str = "skip",
    skipped_steps: int = 0,
    guard: PreemptionGuard | None = None,
    max_consecutive_skips: int | None = None,
    save_final: bool = True,
) -> LoopResult:
    """Runs steps until `state.step == num_steps` (see module docstring).

    Args:
      step_fn: jitted `step(state, batch) -> (state, metrics)`; donates its state.
      state: the (possibly restored) train state; the loop starts at `state.step`.
      batches: iterator of host batches; if it has `get_state()` that state is checkpointed.
      num_steps: total number of steps of the run.
      put_batch: host batch -> device batch (e.g. sharded `device_put`); identity if None.
      eval_fn: `eval_fn(state) -> {name: float}`, run every `eval_every` steps and at the end.
      eval_every: evaluation cadence (0: only at the end).
      logger: metric sink (None: nothing logged).
      log_every: training-metric cadence (the last step is always logged).
      checkpointer: where to save (None: never).
      checkpoint_every: checkpoint cadence (0: only at the end and on SIGTERM).
      run_config: the resolved config dict stored with each checkpoint.
      nan_policy: `"skip"` or `"stop"`.
      skipped_steps: skipped-update count carried over from a restored checkpoint.
      guard: a `PreemptionGuard`; when it is triggered the loop saves and returns.
      max_consecutive_skips: under `"skip"`, raise `NonFiniteError` after this many skipped
        updates in a row (None: never).
      save_final: save a checkpoint when the run ends (a preempted run saves whatever this
        says); False for runs whose caller keeps the final state in memory.

    No checkpoint is written while the newest update was non-finite, nor of a state holding a
    non-finite value (the newest checkpoint therefore always holds a finite state; the final
    save of such a state raises `NonFiniteError`); a save that does not happen raises
    `CheckpointSaveError`.
    """
    if nan_policy not in ("skip", "stop"):
        raise ValueError(f"nan_policy must be 'skip' or 'stop', got {nan_policy!r}")
    if log_every < 1:
        raise ValueError(f"logging.every_steps must be >= 1, got {log_every}")
    put_batch = put_batch or (lambda b: b)
    step = int(jax.device_get(state.step))
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    data_state = _data_state(batches)
    preempted = False
    last_saved = step if checkpointer is not None and step in checkpointer.all_steps() else None
    clock = [time.perf_counter(), step]
    consecutive_skips = 0
    compiled = False

    def drain(keep_last: int) -> None:
        nonlocal skipped_steps, last_metrics, consecutive_skips
        while len(pending) > keep_last:
            s, device_metrics = pending.pop(0)
            values = _host(device_metrics)
            if values.get("train/nonfinite", 0.0) > 0:
                if nan_policy == "stop":
                    raise NonFiniteError(
                        f"non-finite loss or gradient at step {s} (metrics: {values}); the "
                        f"update was skipped and the run stopped (nan_policy='stop'). The last "
                        f"checkpoint is step {last_saved}."
                    )
                skipped_steps += 1
                consecutive_skips += 1
                if max_consecutive_skips is not None and consecutive_skips >= max_consecutive_skips:
                    raise NonFiniteError(
                        f"{consecutive_skips} consecutive non-finite steps (up to step {s}); every "
                        f"one was skipped (nan_policy='skip', max_consecutive_skips="
                        f"{max_consecutive_skips}) and the run stopped. The last checkpoint is "
                        f"step {last_saved}; lower the learning rate or check the model weights."
                    )
            else:
                consecutive_skips = 0
            last_metrics = values
            if logger is not None and (s % log_every == 0 or s == num_steps):
                now = time.perf_counter()
                rate = (s - clock[1]) / max(now - clock[0], 1e-9)
                clock[0], clock[1] = now, s
                logged = {**values, "train/skipped_steps": skipped_steps,
                          "train/steps_per_sec": rate}
                logger.log(s, logged)
                logger.progress(s, {k: v for k, v in values.items() if k.endswith("loss")})

    def save(s: int, *, final: bool = False) -> None:
        nonlocal last_saved
        if checkpointer is None or last_saved == s:
            return
        drain(0)
        if consecutive_skips:
            _log.warning("no checkpoint at step %d: the newest update was non-finite "
                         "(%d in a row); the last checkpoint is step %s", s, consecutive_skips,
                         last_saved)
            return
        if not all_finite(state):
            message = (f"the train state after step {s} holds non-finite values although its "
                       f"update's loss and gradient were finite (e.g. a learning rate so large "
                       f"that the parameters overflow); it was not saved. The last checkpoint "
                       f"is step {last_saved}.")
            if final:
                raise NonFiniteError(message)
            _log.warning("no checkpoint at step %d: %s", s, message)
            return
        if logger is not None:
            logger.sync()  # a bucket's metrics.jsonl holds every line up to the checkpoint
        written = checkpointer.save(
            s,
            state,
            data_state={"loader": data_state, "skipped_steps": skipped_steps},
            config=run_config,
            finite=True,
        )
        if not written:
            raise CheckpointSaveError(
                f"the checkpoint of step {s} was not written under {checkpointer.directory} "
                f"(a checkpoint of that step already exists: {checkpointer.all_steps()})"
            )
        last_saved = s

    while step < num_steps:
        if guard is not None and guard.requested:
            preempted = True
            break
        try:
            batch = next(batches)
        except StopIteration:
            _log.warning("the training data ran out after %d of %d steps", step, num_steps)
            break
        data_state = _data_state(batches)
        state, metrics = step_fn(state, put_batch(batch))
        if not compiled:
            # The first call compiled the step; give the compiler's freed heap back before the
            # step's buffers fill up (rlhf_jax.host_memory: lowers the run's peak RSS).
            release_freed_memory()
            compiled = True
        step += 1
        pending.append((step, metrics))
        drain(1)
        if eval_fn is not None and eval_every > 0 and step % eval_every == 0 and step < num_steps:
            drain(0)
            eval_metrics = _log_eval(logger, step, eval_fn(state))
        if checkpoint_every > 0 and step % checkpoint_every == 0:
            save(step)

    drain(0)
    if eval_fn is not None and not preempted:
        eval_metrics = _log_eval(logger, step, eval_fn(state))
    if save_final or preempted:
        save(step, final=True)
    if logger is not None:
        logger.progress(step)
    return LoopResult(
        state=state,
        step=step,
        metrics=last_metrics,
        eval_metrics=eval_metrics,
        skipped_steps=skipped_steps,
        preempted=preempted,
    )


def restore_latest(
    checkpointer: Checkpointer, state: TrainState, batches: Any
) -> tuple[TrainState, int | None, int]:
    """Restores the newest intact checkpoint onto `state`'s shardings and `batches` (via
    `set_state`); a damaged newer one is skipped with a warning (`restore_newest_intact`).

    Returns `(state, restored_step or None, skipped_steps)`; with no checkpoint, `state` is
    returned unchanged.
    """
    if checkpointer.latest_step is None:
        return state, None, 0
    restored = checkpointer.restore_newest_intact(state)
    extra = restored.data_state or {}
    loader_state = extra.get("loader")
    if loader_state is not None:
        set_state = getattr(batches, "set_state", None)
        if not callable(set_state):
            raise TypeError(
                "the checkpoint holds a data-loader state but the training iterator has no "
                "set_state(); cannot resume the data order exactly"
            )
        if getattr(batches, "shard_count", None) == 1 and jax.process_count() > 1:
            # Every process reads the whole stream (the online trainers' prompts), whatever
            # share `reshard_data_state` gave this process of a checkpoint of another count.
            loader_state = whole_stream_state(loader_state)
        set_state(loader_state)
    return restored.state, restored.step, int(extra.get("skipped_steps", 0))


def prepare_output_dir(config: TrainConfig) -> str:
    """Creates `config.output_dir` (local or ``gs://``) and writes the resolved `config.yaml`
    into it (process 0 of a multi-process run writes the run files; the others only create the
    directory)."""
    directory = ensure_dir(config.output_dir)
    if jax.process_index() == 0:
        save_config(config, directory / CONFIG_FILE)
    return config.output_dir


# ---------------------------------------------------------------------------------------------
# Run identity: one run per output directory
# ---------------------------------------------------------------------------------------------

NEUTRAL_FIELDS = (
    "num_steps", "eval_every", "eval_batches", "output_dir", "overwrite", "nan_policy",
    "max_consecutive_skips", "checkpoint.", "logging.", "mesh.",
)
"""Config fields (dotted; a trailing dot means a whole section) that a resumed run may change:
they do not alter the math of the steps already taken. Every other field must match the
config stored with the checkpoint."""

CONFIG_HISTORY_FILE = "config_history.jsonl"
"""One JSON line per resume that changed a neutral field: `{"step", "changed": {field: [old,
new]}}`."""

STALE_RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "summary.json", CONFIG_HISTORY_FILE)
"""Files of a previous run that `overwrite` deletes along with its checkpoints."""


def record_config_change(output_dir: str, step: int, changed: Mapping[str, Any]) -> None:
    """Appends the neutral fields a resume at `step` changed to `CONFIG_HISTORY_FILE` (on
    process 0 only)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(output_dir, CONFIG_HISTORY_FILE)
    old = path.read_text() if path.exists() else ""
    path.write_text(old + json.dumps({"step": int(step), "changed": dict(changed)}) + "\n")


class RunIdentityError(ConfigError):
    """A run directory holds another run (a changed config on resume, or a fresh start without
    `overwrite`)."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _neutral(field: str) -> bool:
    return any(field == n or (n.endswith(".") and field.startswith(n)) for n in NEUTRAL_FIELDS)


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Splits the differing fields of two config dicts into `(math, neutral)`.

    Each maps a dotted field name to `(old, new)` (a field missing on one side reads
    `"<unset>"`); `neutral` holds the fields of `NEUTRAL_FIELDS`.
    """
    a, b = _flatten(old), _flatten(new)
    math: dict[str, tuple[Any, Any]] = {}
    neutral: dict[str, tuple[Any, Any]] = {}
    for field in sorted(set(a) | set(b)):
        va, vb = a.get(field, "<unset>"), b.get(field, "<unset>")
        if va != vb:
            (neutral if _neutral(field) else math)[field] = (va, vb)
    return math, neutral


def check_run_identity(config: TrainConfig, checkpointer: Checkpointer) -> dict[str, Any]:
    """Makes `config.output_dir` hold this run only; call before anything is written there.

    - `config.overwrite`: deletes every checkpoint and the stale run files (`STALE_RUN_FILES`).
    - otherwise, checkpoints present and `checkpoint.resume` off: raises `RunIdentityError`.
    - resuming: compares `config` with the config stored in the newest checkpoint; a differing
      field outside `NEUTRAL_FIELDS` raises `RunIdentityError` listing every such field as
      `old -> new`.

    Returns the neutral fields that changed (`{field: [old, new]}`, empty when none), which the
    caller records.
    """
    if config.overwrite:
        if checkpointer.all_steps():
            _log.warning("overwrite: deleting checkpoints %s under %s", checkpointer.all_steps(),
                         checkpointer.directory)
        checkpointer.delete_all()
        if jax.process_index() == 0:  # the run files are process 0's (`MetricsLogger`)
            for name in STALE_RUN_FILES:
                epath.Path(config.output_dir, name).unlink(missing_ok=True)
        return {}
    steps = checkpointer.all_steps()
    if not steps:
        return {}
    if not config.checkpoint.resume:
        raise RunIdentityError(
            f"{config.output_dir} already holds the checkpoints {steps} of another run; pass "
            f"--overwrite to delete them and start over, or pick another --output-dir",
            path="checkpoint.resume",
        )
    stored = checkpointer.stored_config()
    if not stored:
        return {}
    math, neutral = config_differences(stored, config_to_dict(config))
    if math:
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in math.items())
        raise RunIdentityError(
            f"cannot resume the run in {config.output_dir} (checkpoint step {steps[-1]}) with a "
            f"changed config; these fields alter the training math:\n{lines}\nUse the stored "
            f"values, or start over with --overwrite, or pick another --output-dir",
            path=next(iter(math)),
        )
    if neutral:
        _log.info("resuming with changed fields: %s", neutral)
    return {k: [old, new] for k, (old, new) in neutral.items()}


def fit(
    config: TrainConfig,
    *,
    step_fn: StepFn,
    state: TrainState,
    train_batches: Iterator[Mapping[str, np.ndarray]],
    put_batch: Callable[[Mapping[str, np.ndarray]], Any] | None = None,
    eval_fn: EvalFn | None = None,
    guard: PreemptionGuard | None = None,
) -> LoopResult:
    """Runs a whole training run under `config.output_dir` (see module docstring).

    Args:
      config: the resolved run config (any `TrainConfig` subclass).
      step_fn: the jitted step (see `jit_train_step`).
      state: the freshly initialised, sharded train state (restored onto if a checkpoint exists).
      train_batches: iterator of host batches (a loader with `get_state`/`set_state` for exact
        resume).
      put_batch: host batch -> device batch.
      eval_fn: held-out evaluation, `eval_fn(state) -> {name: float}`.
      guard: a preemption guard (default: one on SIGTERM when `checkpoint.save_on_sigterm`).
    """
    checkpointer = Checkpointer(
        epath.Path(config.output_dir, CHECKPOINT_DIR), keep_last=config.checkpoint.keep_last
    )
    try:
        changed = check_run_identity(config, checkpointer)
    except BaseException:
        checkpointer.close()
        raise
    prepare_output_dir(config)
    run_config = config_to_dict(config)
    resume_step = None
    skipped = 0
    if config.checkpoint.resume:
        state, resume_step, skipped = restore_latest(checkpointer, state, train_batches)
    logger = MetricsLogger(
        config.output_dir,
        config.logging,
        resume_step=resume_step,
        run_config=run_config,
        total_steps=config.num_steps,
    )
    if changed and resume_step is not None:
        record_config_change(config.output_dir, resume_step, changed)
    if guard is None:
        guard = PreemptionGuard(enabled=config.checkpoint.save_on_sigterm)
    with contextlib.ExitStack() as stack:
        stack.callback(checkpointer.close)
        stack.callback(logger.close)
        stack.enter_context(guard)
        return train_loop(
            step_fn,
            state,
            train_batches,
            num_steps=config.num_steps,
            put_batch=put_batch,
            eval_fn=eval_fn,
            eval_every=config.eval_every,
            logger=logger,
            log_every=config.logging.every_steps,
            checkpointer=checkpointer,
            checkpoint_every=config.checkpoint.every_steps,
            run_config=run_config,
            nan_policy=config.nan_policy,
            skipped_steps=skipped,
            guard=guard,
            max_consecutive_skips=(config.max_consecutive_skips
                                   if config.nan_policy == "skip" else None),
            save_final=config.checkpoint.save_final,
        )


__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "CONFIG_HISTORY_FILE",
    "CheckpointSaveError",
    "NEUTRAL_FIELDS",
    "RunIdentityError",
    "check_run_identity",
    "config_differences",
    "EvalFn",
    "LoopResult",
    "NonFiniteError",
    "PreemptionGuard",
    "StepFn",
    "WALL_CLOCK_METRICS",
    "fit",
    "jit_train_step",
    "prepare_output_dir",
    "restore_latest",
    "train_loop",
]
