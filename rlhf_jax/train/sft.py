"""Supervised fine-tuning with a completion-only loss, optionally on packed rows.

The loss is the negative log-likelihood of the tokens selected by the batch's `loss_mask`
(completion / assistant tokens; `rlhf_jax.data` builds it), with per-token log-probs aligned to
the token they score (`rlhf_jax.train.logprobs.model_scores`):

    token reduction (TRL's default):  L = sum_{b,t} m[b,t] * (-logp[b,t]) / max(sum m, 1)
    sequence reduction:               L = mean over sequences s of (sum_{t in s} -m logp / n_s)

Packed rows (`data.packing=true`) carry `segment_ids` (attention stays inside a sequence) and
positions restarting per sequence; the first token of each packed sequence gets log-prob 0 and
is never in the loss mask. With `completion_only=False` the loss covers every real token that
has context (`attention_mask` and `positions > 0`).

Metrics (training; held-out as `sft/eval/<name>`):

- `sft/loss`: the loss above.
- `sft/accuracy`: fraction of loss tokens where the argmax prediction equals the token.
- `sft/perplexity`: `exp` of the token-mean NLL.
- `sft/num_tokens`: number of loss tokens in the batch.

Programmatic use: `run_sft(config, model=..., records=..., eval_fn=...)` trains a model held
in memory on Python records and returns the summary with the trained model (`TrainedRun`); the
lower-level pieces are::

    model = build_model(config.model, seed=config.seed)
    loss_fn = make_sft_loss(completion_only=True, reduction="token")
    result, setup = run_training(config, model, loss_fn, build_data(...))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.losses import masked_mean
from rlhf_jax.train.builders import build_model, check_vocab, load_tokenizer_for
from rlhf_jax.train.config import DataSpec, TrainConfig
from rlhf_jax.train.data import build_data
from rlhf_jax.train.logprobs import model_scores
from rlhf_jax.train.preflight import check_run_config
from rlhf_jax.train.run import (
    ModelEvalFn,
    TrainedRun,
    own_arrays,
    run_summary,
    run_training,
    trained_model,
)
from rlhf_jax.train.state import bind_loss

REDUCTIONS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: completion-only negative log-likelihood."""

    output_dir: str = "runs/sft"
    data: DataSpec = DataSpec(synthetic="topic")
    completion_only: bool = True
    """Loss on completion / assistant tokens only (`loss_mask`); False: on every real token."""
    reduction: Literal["token", "sequence"] = "token"
    """Average the NLL over all loss tokens of the batch, or per sequence then over sequences."""


def sft_loss_mask(batch: Mapping[str, jax.Array], *, completion_only: bool = True) -> jax.Array:
    """`[B, T]` float mask of the tokens the SFT loss covers (see module docstring)."""
    if completion_only:
        return batch["loss_mask"].astype(jnp.float32)
    mask = batch["attention_mask"].astype(jnp.float32)
    return mask * (batch["positions"] > 0)


def _sequence_mean(values: jax.Array, mask: jax.Array, sequence_ids: jax.Array) -> jax.Array:
    """Mean over sequences of each sequence's masked mean (`sequence_ids` 0 = padding)."""
    num = sequence_ids.size + 1
    ids = sequence_ids.reshape(-1)
    sums = jax.ops.segment_sum((values * mask).reshape(-1), ids, num_segments=num)
    counts = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=num)
    valid = (counts > 0) & (jnp.arange(num) > 0)
    per_seq = jnp.where(valid, sums / jnp.maximum(counts, 1.0), 0.0)
    return jnp.sum(per_seq) / jnp.maximum(jnp.sum(valid), 1)


def sft_loss(
    model: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None = None,
    *,
    completion_only: bool = True,
    reduction: str = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SFT loss and metrics of `model` on an SFT batch (module docstring).

    Args:
      model: a causal LM, `model(input_ids, attention_mask=, positions=, segment_ids=)`.
      batch: SFT batch keys `input_ids, attention_mask, loss_mask, positions, segment_ids`
        `[B, T]` (plus `sequence_ids` for packed rows).
      rng: unused (deterministic loss); part of the trainer loss signature.
      completion_only: loss on `loss_mask` tokens only.
      reduction: `"token"` or `"sequence"`.

    Returns:
      `(loss, metrics)` with scalar float32 values.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; allowed: {REDUCTIONS}")
    mask = sft_loss_mask(batch, completion_only=completion_only)
    scores = model_scores(model, batch, with_argmax=True, where=mask)
    logps = scores.logps
    nll = -logps
    token_mean = masked_mean(nll, mask)
    if reduction == "token":
        loss = token_mean
    else:
        if "sequence_ids" in batch:
            seq_ids = batch["sequence_ids"]
        else:
            rows = jnp.arange(1, mask.shape[0] + 1, dtype=jnp.int32)[:, None]
            seq_ids = jnp.where(batch["attention_mask"] > 0, rows, 0)
        loss = _sequence_mean(nll, mask, seq_ids)
    correct = scores.argmax == batch["input_ids"]  # argmax is -1 where there is no context
    metrics = {
        "sft/loss": loss,
        "sft/accuracy": masked_mean(correct.astype(jnp.float32), mask),
        "sft/perplexity": jnp.exp(jax.lax.stop_gradient(token_mean)),
        "sft/num_tokens": jnp.sum(mask),
    }
    return loss, metrics


def make_sft_loss(*, completion_only: bool = True, reduction: str = "token"):
    """`loss_fn(model, batch, rng) -> (loss, metrics)` for `make_train_step`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; allowed: {REDUCTIONS}")
    return bind_loss(sft_loss, completion_only=completion_only, reduction=reduction)


def train_sft(config: SFTConfig) -> dict[str, Any]:
    """Runs SFT as configured; returns the run summary (see `rlhf_jax.train.run.run_summary`).

    Writes `config.yaml`, `metrics.jsonl`, TensorBoard events and `checkpoints/` under
    `config.output_dir`, and resumes from its newest checkpoint.
    """
    return run_sft(config).summary


def run_sft(
    config: SFTConfig,
    *,
    model: nnx.Module | None = None,
    records: Sequence[Mapping[str, Any]] | None = None,
    eval_records: Sequence[Mapping[str, Any]] | None = None,
    eval_fn: ModelEvalFn | None = None,
) -> TrainedRun:
    """`train_sft` on in-memory inputs; returns the summary and the trained model.

    Args:
      config: the run config (its `model` spec is what `config.yaml` records; with `model`
        given it should describe that model).
      model: the initial causal LM (default: `build_model(config.model)`); it is split into the
        train state (its arrays copied first: it may share them with another model).
      records: SFT records (`{"prompt", "completion"}` or `{"messages"}` dicts) instead of
        `config.data.path` / `config.data.synthetic` (`rlhf_jax.train.data.build_data`).
      eval_records: held-out records (with `records`).
      eval_fn: an evaluation callback (`rlhf_jax.train.run.ModelEvalFn`) run every
        `config.eval_every` steps and at the end.
    """
    check_run_config(config)
    tokenizer = load_tokenizer_for(config.data, config.model)
    data = build_data(config.data, format="sft", tokenizer=tokenizer, seed=config.seed,
                      records=records, eval_records=eval_records)
    model = build_model(config.model, seed=config.seed) if model is None else own_arrays(model)
    check_vocab(model, tokenizer)
    loss_fn = make_sft_loss(completion_only=config.completion_only, reduction=config.reduction)
    result, setup = run_training(config, model, loss_fn, data, eval_fn=eval_fn)
    return TrainedRun(run_summary(result, config, data), trained_model(setup, result.state))


__all__ = ["REDUCTIONS", "SFTConfig", "make_sft_loss", "run_sft", "sft_loss", "sft_loss_mask",
           "train_sft"]
