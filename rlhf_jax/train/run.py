"""What a `train_<algo>` function does around `rlhf_jax.train.loop.fit`: `run_training` (set-up,
held-out evaluator, fit), `make_evaluator` (the loss function's metrics on held-out batches,
renamed `<ns>/eval/<name>`) and `run_summary` (the dict a trainer returns and the CLI prints).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from rlhf_jax import sharding
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
) -> Callable[[TrainState], dict[str, float]]:
    """`evaluate(state) -> {name: float}`: the loss function's metrics on the held-out batches.

    Each metric of the loss function (trainers report their loss as one, e.g. `"sft/loss"`)
    is averaged over batches and renamed with `eval_metric_name`. Runs without gradients, on the
    same mesh and shardings as training.
    """

    def metrics_fn(params, frozen, batch):
        model = nnx.merge(setup.graphdef, params, frozen)
        return loss_fn(model, batch, jax.random.key(0))[1]

    param_sharding = setup.state_sharding.params
    frozen_sharding = setup.state_sharding.frozen
    jitted = jax.jit(metrics_fn, in_shardings=(param_sharding, frozen_sharding,
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




def run_training(
    config: TrainConfig,
    model: nnx.Module,
    loss_fn: LossFn,
    data: DataBundle,
    *,
    trainable: Any = None,
    eval_loss_fn: LossFn | None = None,
) -> tuple[Any, TrainSetup]:
    """`setup_training` + held-out evaluator + `fit`; returns `(LoopResult, TrainSetup)`.

    `eval_loss_fn` (default `loss_fn`) gives the held-out metrics, evaluated every
    `config.eval_every` steps and at the end.
    """
    setup = setup_training(config, model, loss_fn, trainable=trainable)
    evaluate = None
    if data.eval_batches is not None:
        evaluate = make_evaluator(eval_loss_fn or loss_fn, setup, data.eval_batches,
                                  max_batches=config.eval_batches)
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
    "SUMMARY_FILE",
    "eval_metric_name",
    "make_evaluator",
    "run_summary",
    "run_training",
    "write_summary",
]
