"""Pieces every trainer shares: the optimizer and schedule from config, model building from a
`ModelSpec`, the mesh and shardings from a `MeshConfig`, and per-token log-probs from a model.

`setup_training(config, model, loss_fn)` is the one call a trainer needs between building its
model and calling `rlhf_jax.train.loop.fit`: it builds the mesh, the optimizer, the sharded
`TrainState` and the jitted, donated, sharded step::

    model = build_model(config.model, seed=config.seed)
    setup = setup_training(config, model, my_loss)
    result = fit(config, step_fn=setup.step_fn, state=setup.state,
                 train_batches=loader, put_batch=setup.put_batch)

Log-prob alignment (docs/ARCHITECTURE.md): trainers use per-token log-probs **aligned to the
token they score**, `logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`, `[B, T]`, with
`logps[:, 0] = 0`. They are computed with `rlhf_jax.losses.token_logps(logits[:, :-1],
input_ids[:, 1:])` padded with one zero column in front. In packed rows the first token of each
segment has no context inside its segment, so its log-prob is set to 0 too (and a loss mask never
selects it, since a segment's first token is a prompt token). In prefix-shared rows
(`branch_ids`, `rlhf_jax.data.collate_preference(prefix_sharing=True)`) the first token of every
branch after the first is scored by the logits of the prefix's last token, as it would be in its
own row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.losses import token_logps
from rlhf_jax.models import CausalLM, LoRAParam, ModelConfig, RewardModel, ValueModel
from rlhf_jax.train.config import DataSpec, ModelSpec, OptimizerConfig, TrainConfig
from rlhf_jax.train.loop import jit_train_step
from rlhf_jax.train.state import LossFn, TrainState, create_train_state, make_train_step

# ---------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------


def make_schedule(config: OptimizerConfig, num_steps: int) -> optax.Schedule:
    """Learning-rate schedule: linear warmup from 0, then constant / linear / cosine decay.

    Over `num_steps` optimizer steps: `warmup_steps` linear steps from 0 to `learning_rate`,
    then the decay reaches `end_learning_rate` at `num_steps` (constant stays at the peak).
    """
    peak = config.learning_rate
    warmup = max(int(config.warmup_steps), 0)
    decay_steps = max(int(num_steps) - warmup, 1)
    if config.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif config.schedule == "linear":
        main = optax.linear_schedule(peak, config.end_learning_rate, decay_steps)
    elif config.schedule == "cosine":
        alpha = config.end_learning_rate / peak if peak else 0.0
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=alpha)
    else:
        raise ValueError(
            f"optimizer.schedule={config.schedule!r}; allowed: 'constant', 'linear', 'cosine'"
        )
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _decay_mask(params):
    """Weight decay on matrices only (not on biases, norms or other vectors)."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(
    config: OptimizerConfig, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)`: global-norm clipping then AdamW with `make_schedule`.

    Gradient accumulation is not part of `tx`: `make_train_step` averages `grad_accum_steps`
    micro-batch gradients inside the step, so `num_steps` counts optimizer updates.
    """
    if config.grad_accum_steps < 1:
        raise ValueError(f"optimizer.grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
    schedule = make_schedule(config, num_steps)
    parts = []
    if config.max_grad_norm is not None and config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

MODEL_KINDS = ("causal_lm", "reward", "value")
_ARCH_OVERRIDES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                   "max_position_embeddings", "remat")


def model_config(spec: ModelSpec) -> ModelConfig:
    """The `ModelConfig` a `ModelSpec` describes (preset + overrides, or a local HF directory)."""
    if spec.path is not None:
        import json
        import pathlib

        from rlhf_jax.models import hf

        config_file = pathlib.Path(spec.path) / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"model.path={spec.path!r}: no config.json in that directory")
        config = hf.config_from_hf(json.loads(config_file.read_text()), where=str(config_file))
    else:
        overrides = {k: getattr(spec, k) for k in _ARCH_OVERRIDES if getattr(spec, k) is not None}
        num_heads = overrides.pop("num_heads", None)
        config = ModelConfig.preset(spec.preset, **overrides)
        if num_heads is not None:  # multi-head attention with the new head count
            config = config.replace(num_heads=num_heads, num_kv_heads=num_heads)
    return config.replace(dtype=spec.dtype, param_dtype=spec.param_dtype)


def build_model(
    spec: ModelSpec,
    *,
    kind: str = "causal_lm",
    head_names: Sequence[str] = ("reward",),
    seed: int = 0,
    load_weights: bool = True,
) -> nnx.Module:
    """Builds the model a `ModelSpec` describes, with LoRA adapters when `spec.lora_rank > 0`.

    Args:
      spec: the model spec (preset or local HF directory, dtypes, LoRA).
      kind: `"causal_lm"`, `"reward"` (a `RewardModel` with `head_names`) or `"value"`.
      head_names: reward heads (kind `"reward"` only).
      seed: initialisation seed (random init, fresh heads and LoRA adapters).
      load_weights: read the weights of ``spec.path``; with False only its ``config.json`` is
        read and the model is randomly initialised (a skeleton to restore a checkpoint into).

    A reward/value model built from a causal-LM directory copies its backbone and gets a fresh
    head.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r}; allowed: {MODEL_KINDS}")
    rngs = nnx.Rngs(seed)
    if spec.path is not None and load_weights:
        from rlhf_jax.models import hf

        lm = hf.from_pretrained(spec.path, dtype=spec.dtype, param_dtype=spec.param_dtype)
        if kind == "causal_lm":
            model = lm
        elif kind == "reward":
            model = RewardModel.from_causal_lm(lm, head_names=tuple(head_names), rngs=rngs)
        else:
            model = ValueModel.from_causal_lm(lm, rngs=rngs)
    else:
        config = model_config(spec)
        if kind == "causal_lm":
            model = CausalLM(config, rngs=rngs)
        elif kind == "reward":
            model = RewardModel(config, head_names=tuple(head_names), rngs=rngs)
        else:
            model = ValueModel(config, rngs=rngs)
    if spec.lora_rank > 0:
        from rlhf_jax.models.lora import apply_lora

        targets = spec.lora_targets or ("q", "v")
        apply_lora(model, rank=spec.lora_rank, alpha=spec.lora_alpha, targets=targets,
                   rngs=nnx.Rngs(seed + 1))
    return model


def trainable_filter(model: nnx.Module) -> Any:
    """Which variables the optimizer updates: every `nnx.Param`, or with LoRA adapters only the
    adapters plus any freshly initialised head (`score_head`, `value_head`)."""
    from rlhf_jax.models.lora import has_lora

    if not has_lora(model):
        return nnx.Param
    return nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.Any(nnx.PathContains("score_head"),
                                                         nnx.PathContains("value_head"))))


# ---------------------------------------------------------------------------------------------
# mesh, sharded state and jitted step
# ---------------------------------------------------------------------------------------------


class TrainSetup(NamedTuple):
    """What `setup_training` returns.

    Attributes:
      graphdef: the model's static graph definition (`nnx.merge(graphdef, state.params,
        state.frozen)` rebuilds it).
      state: the sharded initial `TrainState`.
      state_sharding: the `TrainState` pytree of `NamedSharding`s.
      mesh: the device mesh.
      tx: the optax transformation.
      schedule: the learning-rate schedule.
      step_fn: the jitted, sharded, state-donating `step(state, batch) -> (state, metrics)`.
      put_batch: host batch -> device batch sharded over `("data", "fsdp")`.
    """

    graphdef: nnx.GraphDef
    state: TrainState
    state_sharding: Any
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    step_fn: Callable
    put_batch: Callable


def shard_train_state(state: TrainState, mesh: jax.sharding.Mesh) -> tuple[TrainState, Any]:
    """`(sharded state, shardings)`: parameters and optimizer moments by their logical axis
    names (`rlhf_jax.sharding`), everything else replicated."""
    shardings = sharding.state_shardings(state, mesh)
    return jax.device_put(state, shardings), shardings


def setup_training(
    config: TrainConfig,
    model: nnx.Module,
    loss_fn: LossFn,
    *,
    trainable: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    num_steps: int | None = None,
    donate: bool = True,
) -> TrainSetup:
    """Mesh, optimizer, sharded train state and jitted step for `model` and `loss_fn`.

    Args:
      config: the run config (its `mesh`, `optimizer`, `seed` and `num_steps` are used).
      model: the NNX model to train (split here; do not use it afterwards).
      loss_fn: `loss_fn(model, batch, rng) -> (loss, metrics)`.
      trainable: variable filter for the optimizer (default: `trainable_filter(model)`).
      mesh: the device mesh (default: `sharding.make_mesh(config.mesh)`).
      num_steps: optimizer steps the schedule spans (default: `config.num_steps`).
      donate: donate the state to the step.
    """
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    tx, schedule = make_optimizer(config.optimizer, num_steps or config.num_steps)
    trainable = trainable if trainable is not None else trainable_filter(model)
    graphdef, state = create_train_state(model, tx, seed=config.seed, trainable=trainable)
    state, state_sharding = shard_train_state(state, mesh)
    step = make_train_step(loss_fn, tx, graphdef=graphdef,
                           grad_accum_steps=config.optimizer.grad_accum_steps,
                           schedule=schedule)
    step_fn = jit_train_step(step, state_sharding=state_sharding,
                             batch_sharding=sharding.batch_sharding(mesh), donate=donate)
    return TrainSetup(graphdef=graphdef, state=state, state_sharding=state_sharding, mesh=mesh,
                      tx=tx, schedule=schedule, step_fn=step_fn,
                      put_batch=lambda batch: sharding.shard_batch(batch, mesh))


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


class DataBundle(NamedTuple):
    """What `build_data` returns.

    Attributes:
      train: the training `rlhf_jax.data.DataLoader` (infinite, shuffled, resumable).
      eval_batches: `eval_batches()` -> a fresh iterator over the held-out batches (one pass),
        or None without a held-out set.
      tokenizer: the tokenizer used.
      pad_id: the pad token id of the batches.
      skipped: records skipped per reason (with `data.on_error="skip"`), train and held-out.
      reports: `{"train": LoadReport, "eval": LoadReport}` (eval only with a held-out set):
        rows read, loaded, skipped per reason and truncated prompts / responses per split.
    """

    train: Any
    eval_batches: Callable[[], Any] | None
    tokenizer: Any
    pad_id: int
    skipped: dict[str, int]
    reports: Mapping[str, Any] = {}


def synthetic_records(task_name: str, format: str, *, num: int, seed: int,
                      num_responses: int = 4) -> list[dict[str, Any]]:
    """Records of `format` from the synthetic task `task_name` (`rlhf_jax.data.synthetic`).

    `"kto"` records unpair synthetic preference pairs (chosen -> desirable, rejected ->
    undesirable), the way TRL converts paired data for KTO.
    """
    from rlhf_jax.data import synthetic

    task = synthetic.get_task(task_name)
    if format == "sft":
        return synthetic.make_sft_dataset(task, num_examples=num, seed=seed)
    if format == "preference":
        return synthetic.make_preference_dataset(task, num_pairs=num, seed=seed)[0]
    if format == "ranking":
        return synthetic.make_ranking_dataset(task, num_prompts=num,
                                              num_responses=num_responses, seed=seed)[0]
    if format == "kto":
        pairs = synthetic.make_preference_dataset(task, num_pairs=(num + 1) // 2, seed=seed)[0]
        records = []
        for r in pairs:
            records.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
            records.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
        return records[:num]
    if format == "prompt":
        return synthetic.make_prompt_dataset(task, num_prompts=num, seed=seed)
    raise ValueError(f"synthetic data has no format {format!r}; allowed: sft, preference, "
                     "ranking, kto, prompt")


def load_tokenizer_for(spec: DataSpec, model: ModelSpec) -> Any:
    """The tokenizer: the synthetic tasks' character tokenizer when `data.synthetic` is set,
    else `model.tokenizer_path` or the model directory's."""
    if spec.synthetic is not None:
        from rlhf_jax.data.synthetic import build_tokenizer

        return build_tokenizer()
    path = model.tokenizer_path or model.path
    if path is None:
        raise ValueError(
            "data.path is set but no tokenizer is known: set model.tokenizer_path or model.path"
        )
    from rlhf_jax.models.hf import load_tokenizer

    return load_tokenizer(path)


def check_vocab(model: nnx.Module, tokenizer: Any) -> None:
    """Raises if the tokenizer has more tokens than the model's vocabulary."""
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; "
            "use a larger model.vocab_size"
        )


def unpair_preferences(examples: Sequence[Any]) -> list[Any]:
    """KTO examples from preference pairs: each pair gives a desirable (chosen) and an
    undesirable (rejected) completion of its prompt, as TRL's `unpair_preference_dataset`."""
    from rlhf_jax.data import KTOExample

    out = []
    for e in examples:
        out.append(KTOExample(e.prompt, e.chosen, True, e.origin))
        out.append(KTOExample(e.prompt, e.rejected, False, e.origin))
    return out


def build_data(
    spec: DataSpec,
    *,
    format: str,
    tokenizer: Any,
    seed: int,
    kl_pairs: bool = False,
) -> DataBundle:
    """Training loader and held-out batches from a `DataSpec` (synthetic task or files).

    Args:
      spec: the data spec (`spec.format` overrides `format`).
      format: the trainer's record format (`"sft"`, `"preference"`, `"ranking"`, `"kto"`).
        A KTO trainer given preference data (`spec.format="preference"` or `"hh"`) unpairs
        it with `unpair_preferences`.
      tokenizer: a transformers tokenizer.
      seed: the run seed (shuffling; synthetic data uses `seed` for train, `seed + 1` held out).
      kl_pairs: add KTO's mismatched `kl_` pairs.

    Batches are padded to `spec.max_length` (or the smallest of `spec.buckets` that fits) with
    `spec.batch_size / jax.process_count()` rows per host.
    """
    from rlhf_jax import data as rdata
    from rlhf_jax.data import BatchConfig, DataLoader

    wanted = format
    format = spec.format or format
    # KTO on paired data: load the pairs, then unpair them (chosen desirable, rejected not).
    unpair = wanted == "kto" and format in ("preference", "hh")
    hosts = jax.process_count()
    if spec.batch_size % hosts:
        raise ValueError(f"data.batch_size={spec.batch_size} must be divisible by the "
                         f"{hosts} hosts")
    eval_bs = spec.eval_batch_size or spec.batch_size
    tok_config = rdata.TokenizeConfig(max_prompt_length=spec.max_prompt_length,
                                      max_length=spec.max_length, overlong=spec.overlong)
    pad_id = next((int(v) for v in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                   if v is not None), 0)

    if spec.prefix_sharing and (spec.packing or unpair
                                or format not in ("preference", "hh", "ranking")):
        raise ValueError("data.prefix_sharing needs preference pairs (DPO family, reward "
                         f"models) or rankings; got format {format!r} for {wanted!r} examples"
                         f"{' with packing' if spec.packing else ''}")

    def batch_config(batch_size, packing):
        if spec.prefix_sharing:
            branches = spec.num_responses if format == "ranking" else 2
            return BatchConfig(batch_size=batch_size // hosts, prefix_sharing=True,
                               num_responses=spec.num_responses if format == "ranking" else None,
                               length_buckets=prefix_shared_lengths(
                                   spec.max_length, spec.buckets, branches=branches))
        if spec.buckets and not packing:
            buckets = tuple(sorted(b for b in spec.buckets if b < spec.max_length))
            return BatchConfig(batch_size=batch_size // hosts,
                               length_buckets=buckets + (spec.max_length,),
                               num_responses=spec.num_responses if format == "ranking" else None,
                               kl_pairs=kl_pairs)
        return BatchConfig(batch_size=batch_size // hosts, length=spec.max_length,
                           packing=packing, kl_pairs=kl_pairs,
                           num_responses=spec.num_responses if format == "ranking" else None)

    skipped: dict[str, int] = {}
    reports: dict[str, Any] = {}

    def examples(source, *, split, synthetic_seed, num, role):
        if source is None:
            if spec.synthetic is None:
                raise ValueError("set data.path (a file or directory) or data.synthetic (a task "
                                 "name of rlhf_jax.data.synthetic)")
            source = synthetic_records(spec.synthetic, format, num=num, seed=synthetic_seed,
                                       num_responses=spec.num_responses)
            source_type = "records"
        else:
            source_type = spec.source_type
        raw, report = rdata.load_examples(source, format=format, on_error=spec.on_error,
                                          source_type=source_type, split=split)
        if unpair:
            raw = unpair_preferences(raw)
        tokenized, tok_report = rdata.tokenize_examples(raw, tokenizer, config=tok_config,
                                                        on_error=spec.on_error,
                                                        source=report.source)
        reports[role] = report.merge(tok_report)
        for reason, n in reports[role].skipped.items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
        return tokenized

    train_examples = examples(spec.path, split=spec.split, synthetic_seed=seed, num=spec.num_train,
                              role="train")
    train = DataLoader(train_examples, batch_config=batch_config(spec.batch_size, spec.packing),
                       pad_id=pad_id, seed=seed, shuffle=spec.shuffle)

    eval_source = spec.eval_path or (spec.path if spec.eval_split else None)
    eval_batches = None
    if eval_source is not None or (spec.path is None and spec.num_eval > 0):
        eval_examples = examples(eval_source, split=spec.eval_split or "test",
                                 synthetic_seed=seed + 1, num=spec.num_eval, role="eval")
        if len(eval_examples) < eval_bs:
            raise ValueError(f"the held-out set has {len(eval_examples)} examples, fewer than "
                             f"data.eval_batch_size={eval_bs}")
        eval_loader = DataLoader(eval_examples, batch_config=batch_config(eval_bs, False),
                                 pad_id=pad_id, seed=seed, shuffle=False, num_epochs=1)
        start = eval_loader.get_state()

        def eval_batches():
            eval_loader.set_state(start)
            return eval_loader

    return DataBundle(train=train, eval_batches=eval_batches, tokenizer=tokenizer, pad_id=pad_id,
                      skipped=skipped, reports=reports)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# a whole run
# ---------------------------------------------------------------------------------------------


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
    from rlhf_jax.train.loop import fit

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
    conversations; `summary["skipped_records"]` sums the skips of both splits.
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
    summary.update(extra)
    if jax.process_index() == 0:
        write_summary(summary, config.output_dir)
    return summary


def write_summary(summary: Mapping[str, Any], output_dir: str) -> None:
    """Writes `summary` as JSON to `<output_dir>/summary.json` (values that are not JSON become
    floats or strings), replacing the file in one rename."""
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

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, SUMMARY_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(plain(summary), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def prefix_shared_lengths(max_length: int, buckets: Sequence[int] = (), *,
                          branches: int = 2) -> tuple[int, ...]:
    """Row lengths for prefix-shared rows (`DataSpec.prefix_sharing`) of `branches` responses:
    multiples of `max_length / 4` from `max_length / 2` to `2 * max_length`, then of
    `max_length / 2` up to `branches * max_length` (each rounded up to 8), plus the given
    `buckets`. A row holds `p + r_1 + ... + r_K <= K * max_length` tokens."""
    def round8(x):
        return -(-x // 8) * 8

    quarter, half = -(-max_length // 4), -(-max_length // 2)
    cap = round8(max(2, branches) * max_length)
    lengths = {round8(k * quarter) for k in range(2, 9)}
    lengths |= {round8(k * half) for k in range(5, 2 * max(2, branches) + 1)}
    return tuple(sorted({min(b, cap) for b in (*lengths, *buckets)} | {cap}))


# ---------------------------------------------------------------------------------------------
# log-probs
# ---------------------------------------------------------------------------------------------


def aligned_token_logps(
    logits: jax.Array,
    input_ids: jax.Array,
    segment_ids: jax.Array | None = None,
    branch_ids: jax.Array | None = None,
) -> jax.Array:
    """Per-token log-probs aligned to the token they score (module docstring).

    Args:
      logits: `[B, T, V]` next-token logits of a causal LM over `input_ids`.
      input_ids: `[B, T]` int token ids.
      segment_ids: optional `[B, T]` packed-row segment ids; the first token of each segment
        gets log-prob 0.
      branch_ids: optional `[B, T]` prefix-shared rows (0 on the shared prefix at the start of
        the row and on padding, `k > 0` on continuation `k`). A token whose left neighbour is in
        another continuation starts its branch: it is scored by the logits of the prefix's last
        token (log-prob 0 when the prefix is empty, as at position 0 of its own row).

    Returns:
      `[B, T]` float32, `out[:, 0] = 0`, `out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`
      (with `branch_ids`: given the prefix and the earlier tokens of its branch).
    """
    lp = token_logps(logits[:, :-1], input_ids[:, 1:])
    lp = jnp.pad(lp, ((0, 0), (1, 0)))
    if segment_ids is not None:
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        same = jnp.pad(same, ((0, 0), (1, 0)), constant_values=False)
        lp = jnp.where(same, lp, 0.0)
    if branch_ids is not None:
        prev = jnp.pad(branch_ids[:, :-1], ((0, 0), (1, 0)))
        starts = (branch_ids > 0) & (prev > 0) & (prev != branch_ids)
        prefix_len = jnp.argmax(branch_ids > 0, axis=-1)  # [B]; the prefix is the row's start
        last = jnp.take_along_axis(
            logits, jnp.maximum(prefix_len - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, V]
        from_prefix = jnp.take_along_axis(
            jax.nn.log_softmax(last.astype(jnp.float32), axis=-1), input_ids, axis=1)
        from_prefix = jnp.where((prefix_len > 0)[:, None], from_prefix, 0.0)
        lp = jnp.where(starts, from_prefix, lp)
    return lp


def model_inputs(batch: Mapping[str, jax.Array], prefix: str = "") -> dict[str, Any]:
    """The model's keyword inputs from the batch keys `<prefix>attention_mask` etc."""
    out: dict[str, Any] = {}
    for key in ("attention_mask", "positions", "segment_ids", "branch_ids"):
        if prefix + key in batch:
            out[key] = batch[prefix + key]
    return out


def model_token_logps(
    model: Any, batch: Mapping[str, jax.Array], prefix: str = ""
) -> tuple[jax.Array, jax.Array]:
    """`(logps [B, T], logits [B, T, V])` of a causal LM on the batch's `<prefix>input_ids`."""
    input_ids = batch[prefix + "input_ids"]
    kwargs = model_inputs(batch, prefix)
    logits = model(input_ids, **kwargs)
    return aligned_token_logps(logits, input_ids, kwargs.get("segment_ids"),
                               kwargs.get("branch_ids")), logits


# ---------------------------------------------------------------------------------------------
# preference pairs: one fused forward over chosen and rejected
# ---------------------------------------------------------------------------------------------

_TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")


def is_packed_pairs(batch: Mapping[str, jax.Array]) -> bool:
    """True for a packed preference batch (`rlhf_jax.data.pack_preference` layout)."""
    return "chosen_index" in batch


def is_prefix_shared_pairs(batch: Mapping[str, jax.Array]) -> bool:
    """True for a prefix-shared preference batch (one row per pair: prompt, chosen, rejected;
    `rlhf_jax.data.collate_preference(prefix_sharing=True)`); a prefix-shared ranking batch
    (with `ranks`) is not one."""
    return "branch_ids" in batch and "ranks" not in batch


def pair_forward_batch(batch: Mapping[str, jax.Array], prefixes=("chosen_", "rejected_")
                       ) -> dict[str, jax.Array]:
    """The rows one forward pass runs on for a pairwise batch.

    Padded layout: `chosen_<k>` and `rejected_<k>` `[B, T]` concatenated along the batch axis
    into `<k>` `[2B, T]` (rows `:B` chosen, `B:` rejected), so chosen and rejected share one
    forward pass. Packed layout: the rows as they are (`[R, T]`, plus `sequence_ids`).
    Prefix-shared layout: the `[P, T]` rows as they are (plus `branch_ids`).
    """
    if is_prefix_shared_pairs(batch):
        return {k: batch[k] for k in (*_TOKEN_KEYS, "branch_ids")}
    if is_packed_pairs(batch):
        return {k: batch[k] for k in (*_TOKEN_KEYS, "sequence_ids") if k in batch}
    return {k: jnp.concatenate([batch[p + k] for p in prefixes], axis=0)
            for k in _TOKEN_KEYS if prefixes[0] + k in batch}


def pair_sequence_sums(
    values: jax.Array, rows: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
    *, average: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`(chosen [P], rejected [P], chosen_lengths [P], rejected_lengths [P])`.

    Sums (or, with `average`, means) of per-token `values [N, T]` (aligned log-probs) over the
    `loss_mask` tokens of each chosen / rejected sequence, for either layout of
    `pair_forward_batch` (`rows` is its output). Lengths are the loss-token counts.
    """
    from rlhf_jax.losses import masked_sum

    mask = rows["loss_mask"].astype(jnp.float32)
    if is_prefix_shared_pairs(batch):
        branch = rows["branch_ids"]
        c_mask, r_mask = mask * (branch == 1), mask * (branch == 2)
        c_sum, r_sum = masked_sum(values, c_mask, axis=-1), masked_sum(values, r_mask, axis=-1)
        c_len, r_len = jnp.sum(c_mask, axis=-1), jnp.sum(r_mask, axis=-1)
    elif is_packed_pairs(batch):
        num = 2 * batch["chosen_index"].shape[0] + 1
        ids = rows["sequence_ids"].reshape(-1)
        masked = jnp.where(mask > 0, values, 0.0).reshape(-1)
        sums = jax.ops.segment_sum(masked, ids, num_segments=num)
        counts = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=num)
        c_sum, r_sum = sums[batch["chosen_index"]], sums[batch["rejected_index"]]
        c_len, r_len = counts[batch["chosen_index"]], counts[batch["rejected_index"]]
    else:
        per_row = masked_sum(values, mask, axis=-1)
        counts = jnp.sum(mask, axis=-1)
        c_sum, r_sum = jnp.split(per_row, 2)
        c_len, r_len = jnp.split(counts, 2)
    if average:
        c_sum = c_sum / jnp.maximum(c_len, 1.0)
        r_sum = r_sum / jnp.maximum(r_len, 1.0)
    return c_sum, r_sum, c_len, r_len


def pair_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
    """`[P]` float weights of the pairs: `pair_mask` of a packed batch, else ones."""
    if is_packed_pairs(batch):
        return batch["pair_mask"].astype(jnp.float32)
    if is_prefix_shared_pairs(batch):
        return jnp.ones(batch["input_ids"].shape[:1], jnp.float32)
    return jnp.ones(batch["chosen_input_ids"].shape[:1], jnp.float32)


__all__ = [
    "MODEL_KINDS",
    "is_packed_pairs",
    "is_prefix_shared_pairs",
    "pair_forward_batch",
    "pair_sequence_sums",
    "pair_weights",
    "DataBundle",
    "build_data",
    "eval_metric_name",
    "load_tokenizer_for",
    "make_evaluator",
    "run_summary",
    "run_training",
    "write_summary",
    "synthetic_records",
    "unpair_preferences",
    "TrainSetup",
    "aligned_token_logps",
    "build_model",
    "check_vocab",
    "model_config",
    "setup_training",
    "shard_train_state",
    "trainable_filter",
    "make_optimizer",
    "make_schedule",
    "model_inputs",
    "model_token_logps",
]
