"""What a `train_<algo>` function does around `rlhf_jax.train.loop.fit`: `run_training` (set-up,
held-out evaluator, a model evaluation callback, fit), `make_evaluator` (the loss function's
metrics on held-out batches, renamed `<ns>/eval/<name>`), `run_summary` (the dict a trainer
returns and the CLI prints) and `TrainedRun` (a summary with the trained model, what the
trainers' in-memory entry points `run_sft`, `run_rm` and `run_dpo` return).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from flax import nnx

from rlhf_jax import losses, sharding
from rlhf_jax.storage import ensure_dir, write_text_atomic
from rlhf_jax.train.builders import TrainSetup, setup_training
from rlhf_jax.train.config import TrainConfig
from rlhf_jax.train.data import DataBundle, data_shares
from rlhf_jax.train.loop import fit
from rlhf_jax.train.state import LossFn, TrainState


def eval_metric_name(name: str) -> str:
    """`"dpo/accuracy"` -> `"dpo/eval/accuracy"` (held-out metrics of a training metric)."""
    head, _, tail = name.partition("/")
    return f"{head}/eval/{tail}" if tail else f"eval/{head}"


def make_evaluator(
    loss_fn: LossFn,
    setup: TrainSetup,
    eval_batches: Callable[[], Any],
    *,
    max_batches: int | None = None,
    hparams: Any = None,
) -> Callable[[TrainState], dict[str, float]]:
    """`evaluate(state) -> {name: float}`: the loss function's metrics on the held-out batches.

    Each metric of the loss function (trainers report their loss as one, e.g. `"sft/loss"`)
    is averaged over batches and renamed with `eval_metric_name`. Runs without gradients, on the
    same mesh and shardings as training. With `hparams` (`setup_training`) the loss function is
    `loss_fn(model, batch, rng, hparams)`.
    """

    def metrics_fn(params, frozen, batch):
        model = nnx.merge(setup.graphdef, params, frozen)
        if hparams is not None:
            return loss_fn(model, batch, jax.random.key(0), hparams)[1]
        return loss_fn(model, batch, jax.random.key(0))[1]

    param_sharding = setup.state_sharding.params
    frozen_sharding = setup.state_sharding.frozen
    jitted = jax.jit(losses.unchecked(metrics_fn), in_shardings=(param_sharding, frozen_sharding,
                                               sharding.batch_sharding(setup.mesh)))

    def evaluate(state: TrainState) -> dict[str, float]:
        totals: dict[str, float] = {}
        n = 0
        for i, batch in enumerate(eval_batches()):
            if max_batches is not None and i >= max_batches:
                break
            metrics = jax.device_get(jitted(state.params, state.frozen, setup.put_batch(batch)))
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n += 1
        if n == 0:
            raise ValueError("the held-out set produced no batch")
        return {eval_metric_name(k): v / n for k, v in totals.items()}

    return evaluate




ModelEvalFn = Callable[[nnx.Module, int], Mapping[str, float]]
"""``eval_fn(model, step) -> {name: value}``: an evaluation of the model being trained (e.g. the
gold reward of its samples on a synthetic task), called with the held-out evaluation every
``config.eval_every`` steps and at the end of the run; its metrics are logged (``metrics.jsonl``)
and returned with the held-out ones. The model is only valid during the call."""


class TrainedRun(NamedTuple):
    """What a trainer's in-memory entry point (`run_sft`, `run_rm`, `run_dpo`) returns.

    Attributes:
      summary: the run summary (`run_summary`; also written to ``summary.json``).
      model: the trained model (NNX module, on the host's devices), ready for sampling,
        scoring or further training.
    """

    summary: dict[str, Any]
    model: nnx.Module


def own_arrays(model: nnx.Module) -> nnx.Module:
    """`model` with every array copied into a buffer of its own (in place; returned): a model
    that shares arrays with another (`nnx.clone`, `RewardModel.from_causal_lm`) can then be
    trained with a donated state without deleting the other's arrays."""
    nnx.update(model, jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x,
                                   nnx.state(model)))
    return model


def trained_model(setup: TrainSetup, state: TrainState) -> nnx.Module:
    """The NNX model of a train state of `setup` (e.g. `run_training`'s final state)."""
    return nnx.merge(setup.graphdef, state.params, state.frozen)


def with_model_eval(
    evaluate: Callable[[TrainState], dict[str, float]] | None,
    eval_fn: ModelEvalFn | None,
    setup: TrainSetup,
    *,
    eval_model: Callable[[nnx.Module], nnx.Module] | None = None,
) -> Callable[[TrainState], dict[str, float]] | None:
    """The `fit` evaluation of a run: the held-out `evaluate` (or none) followed by
    ``eval_fn(eval_model(model), step)`` (`ModelEvalFn`; ``eval_model`` picks the module the
    callback sees, e.g. the policy of a policy-and-reference pair)."""
    if eval_fn is None:
        return evaluate

    def evaluate_all(state: TrainState) -> dict[str, float]:
        metrics = dict(evaluate(state)) if evaluate is not None else {}
        model = trained_model(setup, state)
        if eval_model is not None:
            model = eval_model(model)
        extra = eval_fn(model, int(jax.device_get(state.step)))
        metrics.update({k: float(v) for k, v in extra.items()})
        return metrics

    return evaluate_all


def run_training(
    config: TrainConfig,
    model: nnx.Module,
    loss_fn: LossFn,
    data: DataBundle,
    *,
    trainable: Any = None,
    eval_loss_fn: LossFn | None = None,
    eval_fn: ModelEvalFn | None = None,
    eval_model: Callable[[nnx.Module], nnx.Module] | None = None,
    hparams: Any = None,
) -> tuple[Any, TrainSetup]:
    """`setup_training` + held-out evaluator + `fit`; returns `(LoopResult, TrainSetup)`.

    `eval_loss_fn` (default `loss_fn`) gives the held-out metrics, evaluated every
    `config.eval_every` steps and at the end; `eval_fn` (`ModelEvalFn`) runs beside it on the
    model (`eval_model(model)` when given). `hparams`: the loss functions' traced
    hyper-parameters (`setup_training`).
    """
    setup = setup_training(config, model, loss_fn, trainable=trainable, hparams=hparams)
    evaluate = None
    if data.eval_batches is not None:
        evaluate = make_evaluator(eval_loss_fn or loss_fn, setup, data.eval_batches,
                                  max_batches=config.eval_batches, hparams=hparams)
    evaluate = with_model_eval(evaluate, eval_fn, setup, eval_model=eval_model)
    result = fit(config, step_fn=setup.step_fn, state=setup.state, train_batches=data.train,
                 put_batch=setup.put_batch, eval_fn=evaluate)
    return result, setup


SUMMARY_FILE = "summary.json"


def run_summary(result: Any, config: TrainConfig, data: DataBundle | None = None,
                **extra: Any) -> dict[str, Any]:
    """The summary dict a `train_<algo>` function returns (and the CLI prints), also written to
    `<output_dir>/summary.json` (by process 0).

    With `data`, `summary["data"]` holds one `LoadReport.to_dict()` per split (``"train"``,
    ``"eval"``): rows read and loaded, skipped rows per reason, truncated prompts / responses /
    conversations; `summary["skipped_records"]` sums the skips of both splits, and
    `summary["data_shares"]["train"]` counts the examples each process read (`data_shares`; a
    collective, so every process calls `run_summary`).
    """
    summary = {
        "output_dir": config.output_dir,
        "step": result.step,
        "preempted": result.preempted,
        "skipped_steps": result.skipped_steps,
        "metrics": result.metrics,
        "eval_metrics": result.eval_metrics,
    }
    if data is not None:
        summary["skipped_records"] = dict(data.skipped)
        summary["data"] = {role: report.to_dict() for role, report in data.reports.items()}
        shares = data_shares(data.train)
        if shares is not None:
            summary["data_shares"] = {"train": shares}
    summary.update(extra)
    if jax.process_index() == 0:
        write_summary(summary, config.output_dir)
    return summary


def write_summary(summary: Mapping[str, Any], output_dir: str) -> None:
    """Writes `summary` as JSON to `<output_dir>/summary.json` (values that are not JSON become
    floats or strings), replacing the file at once (`write_text_atomic`; local or ``gs://``)."""
    def plain(value):
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, bool | int | float | str) or value is None:
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            return str(value)

    text = json.dumps(plain(summary), indent=2, sort_keys=True) + "\n"
    write_text_atomic(ensure_dir(output_dir) / SUMMARY_FILE, text)


__all__ = [
    "ModelEvalFn",
    "SUMMARY_FILE",
    "TrainedRun",
    "eval_metric_name",
    "make_evaluator",
    "own_arrays",
    "run_summary",
    "run_training",
    "trained_model",
    "with_model_eval",
    "write_summary",
]
