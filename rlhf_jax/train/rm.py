"""Reward-model training: pairwise Bradley–Terry (with Llama 2 margins, soft labels, label
smoothing and reward centering), K-wise ranking, Plackett–Luce and best-of-K losses, several
reward heads trained together or apart, and reward normalisation.

Model: `rlhf_jax.models.RewardModel` with `head_names` (e.g. `("helpful", "harmless")`) on a
shared backbone; `rewards [N, H]` are read at the last real token of each sequence (the last
token of each packed sequence for packed pairs).

Losses (all from `rlhf_jax.losses`, per pair / per prompt, then averaged):

- `bradley_terry` (pairwise, TRL `RewardTrainer`): `-p log σ(r_c - r_r - m) - (1-p) log σ(...)`
  with `m = margin_scale * margin` when `use_margin` (Llama 2), `p` the batch's soft `label`
  when `soft_labels`, smoothed by `label_smoothing`; plus `center_rewards_coefficient *
  (r_c + r_r)^2` (reward centering, Eisenstein et al. 2023).
- `kwise` (InstructGPT, all K-choose-2 pairs of a ranking weighted once per prompt),
  `plackett_luce` (full-ranking likelihood) and `best_of_k` (softmax cross-entropy against the
  best response, lm-human-preferences) on ranking batches (`input_ids [B, K, T]`, `ranks`).

Heads: every head in `train_heads` (default: all) gets the loss on every pair, unless the batch
carries `head_index [B]` (the head each pair's label belongs to; -1 = all trained heads), which
is how helpfulness and harmlessness heads are trained together on a mixed stream. Training heads
apart is one run per head with `train_heads=(name,)`.

Normalisation (`normalize=true`, lm-human-preferences): after training, each head's gain and
bias are set so that its rewards over a reference set (`normalization_set`: the held-out or
training responses, chosen and rejected alike) have mean 0 and standard deviation 1;
`RewardModel.set_normalization` stores them in the model (non-trainable variables, so in the
final checkpoint) and `reward_normalization.json` records them with the raw statistics.

Metrics (training; held-out as `rm/eval/<name>`):

- `rm/loss`: the total loss (including centering).
- `rm/accuracy`: fraction of pairs ranked as labelled (`r_c > r_r`; expected agreement with
  soft labels; for rankings, over all untied pairs).
- `rm/margin`: mean `r_c - r_r`; `rm/chosen_reward`, `rm/rejected_reward`: mean rewards.
- `rm/centering_loss`: the centering term (when its coefficient is > 0).
- `rm/<head>/accuracy`, `rm/<head>/margin`: per head, when there are several heads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from rlhf_jax import losses
from rlhf_jax.train.builders import TrainSetup, build_model, check_vocab, load_tokenizer_for
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.config import (
    DataSpec,
    ModelSpec,
    TrainConfig,
    check_int,
    check_number,
    config_from_dict,
    config_to_dict,
    require,
)
from rlhf_jax.train.data import TokenizedRecords, build_data
from rlhf_jax.train.export import read_checkpoint_state, read_run_config, restore_into
from rlhf_jax.train.logprobs import model_inputs
from rlhf_jax.train.loop import CHECKPOINT_DIR, CheckpointSaveError
from rlhf_jax.train.pairs import (
    is_packed_pairs,
    is_prefix_shared_pairs,
    pair_forward_batch,
    pair_weights,
)
from rlhf_jax.train.preflight import check_run_config
from rlhf_jax.train.run import (
    ModelEvalFn,
    TrainedRun,
    own_arrays,
    run_summary,
    run_training,
    trained_model,
)
from rlhf_jax.train.state import TrainState, bind_loss

RM_LOSSES = ("bradley_terry", "kwise", "plackett_luce", "best_of_k")
RANKING_LOSSES = ("kwise", "plackett_luce", "best_of_k")
NORMALIZATION_FILE = "reward_normalization.json"


@dataclasses.dataclass(frozen=True)
class RMConfig(TrainConfig):
    """Reward-model training (pairwise or K-wise) with optional reward normalisation."""

    output_dir: str = "runs/rm"
    data: DataSpec = DataSpec(synthetic="topic")
    loss: Literal["bradley_terry", "kwise", "plackett_luce", "best_of_k"] = "bradley_terry"
    """Reward-model loss; the three ranking losses need ranking data (`data.format=ranking`)."""
    head_names: tuple[str, ...] = ("reward",)
    """Names of the reward heads (one scalar each) on the shared backbone."""
    train_heads: tuple[str, ...] = ()
    """Heads that receive the loss (empty: all heads)."""
    use_margin: bool = False
    """Subtract the batch's preference-strength `margin` inside the sigmoid (Llama 2); the
    margins come from the records' `margin` field or, with `data.margin_field`, from the raters'
    ratings (`data.rating_scale`)."""
    margin_scale: float = 1.0
    """Multiplier of the batch margin."""
    soft_labels: bool = True
    """Use the batch's `label` (probability chosen is preferred) as the Bradley–Terry target."""
    label_smoothing: float = 0.0
    """Label smoothing ε of the Bradley–Terry target."""
    center_rewards_coefficient: float = 0.0
    """Weight of the reward-centering term (r_c + r_r)^2 (TRL `center_rewards_coefficient`)."""
    normalize: bool = True
    """After training, set gain/bias so rewards on the reference set have mean 0 and std 1."""
    normalization_set: Literal["eval", "train"] = "eval"
    """Reference set for normalisation: held-out or training responses."""
    normalization_batches: int = 16
    """Number of reference batches for the normalisation statistics."""

    def __post_init__(self):
        super().__post_init__()
        check_number(self, "margin_scale", low=0)
        check_number(self, "label_smoothing", low=0, high=0.5)
        check_number(self, "center_rewards_coefficient", low=0)
        check_int(self, "normalization_batches", low=1)
        require(len(self.head_names) >= 1 and len(set(self.head_names)) == len(self.head_names),
                "head_names", f"head_names must be one or more distinct names, got "
                f"{list(self.head_names)}")
        unknown = [h for h in self.train_heads if h not in self.head_names]
        require(not unknown, "train_heads", f"train_heads={list(self.train_heads)} names "
                f"{unknown}, not among head_names={list(self.head_names)}")


class RMHyperParams(NamedTuple):
    """The loss's hyper-parameters (`rm_loss`), the `RMConfig` fields of the same names."""

    loss: str = "bradley_terry"
    head_names: tuple[str, ...] = ("reward",)
    train_heads: tuple[str, ...] = ()
    use_margin: bool = False
    margin_scale: float = 1.0
    soft_labels: bool = True
    label_smoothing: float = 0.0
    center_rewards_coefficient: float = 0.0

    @classmethod
    def from_config(cls, config: RMConfig) -> RMHyperParams:
        """Every field read from the config field of the same name."""
        return cls(**{name: getattr(config, name) for name in cls._fields})

    def validate(self) -> None:
        """Raises naming the field when ``loss`` or ``train_heads`` is not allowed."""
        if self.loss not in RM_LOSSES:
            raise ValueError(f"loss={self.loss!r}; allowed: {RM_LOSSES}")
        unknown = [h for h in self.train_heads if h not in self.head_names]
        if unknown:
            raise ValueError(f"train_heads {unknown} are not among head_names "
                             f"{tuple(self.head_names)}")


def _head_weights(batch: Mapping[str, jax.Array], n: int, heads: jax.Array) -> jax.Array:
    """`[n, H]` weights: the trained heads, restricted to `head_index` when given."""
    w = jnp.broadcast_to(heads[None, :], (n, heads.shape[0]))
    if "head_index" in batch:
        idx = batch["head_index"].astype(jnp.int32)
        one_hot = jax.nn.one_hot(jnp.maximum(idx, 0), heads.shape[0], dtype=jnp.float32)
        w = jnp.where((idx >= 0)[:, None], one_hot * heads[None, :], w)
    return w


def pair_rewards(model: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """`(chosen [P, H], rejected [P, H])` rewards of a pairwise batch, in one forward pass."""
    rows = pair_forward_batch(batch)
    if is_prefix_shared_pairs(batch):
        rewards = branch_last_rewards(model, rows, 2)
        return rewards[:, 0], rewards[:, 1]
    if is_packed_pairs(batch):
        scores = model.token_scores(rows["input_ids"], **model_inputs(rows))
        flat = scores.reshape(-1, scores.shape[-1])
        return flat[batch["chosen_last_index"]], flat[batch["rejected_last_index"]]
    rewards = model(rows["input_ids"], **model_inputs(rows))
    return tuple(jnp.split(rewards, 2, axis=0))


def branch_last_rewards(model: Any, rows: Mapping[str, jax.Array], num_branches: int
                        ) -> jax.Array:
    """`[B, K, H]` rewards of prefix-shared rows (`prompt | response 1 | ... | response K`),
    each read at its response's last token (the prompt's last token for an empty response), as
    in the response's own row."""
    scores = model.token_scores(rows["input_ids"], **model_inputs(rows))  # [B, T, H]
    valid = rows["attention_mask"].astype(bool)
    counts = jnp.stack([jnp.sum(valid & (rows["branch_ids"] == k), axis=-1)
                        for k in range(num_branches + 1)], axis=-1)  # [B, K + 1]
    prompt = counts[:, :1]
    ends = prompt + jnp.cumsum(counts[:, 1:], axis=-1)  # one past each response
    last = jnp.maximum(jnp.where(counts[:, 1:] > 0, ends - 1, prompt - 1), 0)  # [B, K]
    return jnp.take_along_axis(scores, last[..., None], axis=1)


def is_ranking_batch(batch: Mapping[str, jax.Array]) -> bool:
    """True for a K-way ranking batch (`[B, K, T]` rows or prefix-shared rows with `ranks`)."""
    return "ranks" in batch


def ranking_rewards(model: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """`[B, K, H]` rewards of a ranking batch (`input_ids [B, K, T]`, or one prefix-shared row
    per example), in one forward pass."""
    if "branch_ids" in batch:
        return branch_last_rewards(model, batch, batch["ranks"].shape[1])
    b, k, t = batch["input_ids"].shape
    flat = {key: batch[key].reshape(b * k, t)
            for key in ("input_ids", "attention_mask", "positions", "segment_ids") if key in batch}
    rewards = model(flat["input_ids"], **model_inputs(flat))
    return rewards.reshape(b, k, -1)


def _weighted_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def rm_loss(
    model: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None = None,
    *,
    hp: RMHyperParams | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reward-model loss and metrics (module docstring) of `model` on a pairwise or ranking batch.

    Args:
      model: a `RewardModel` with heads `hp.head_names`.
      batch: a pairwise batch (`chosen_*`, `rejected_*`, `margin`, `label`; or packed) for
        `bradley_terry`, a ranking batch (`input_ids [B, K, T]`, `ranks`, `response_mask`) for
        the ranking losses; optional `head_index [B]`.
      rng: unused.
      hp: the loss and its hyper-parameters (`RMHyperParams`; default: its defaults).

    Returns:
      `(loss, metrics)`.
    """
    hp = RMHyperParams() if hp is None else hp
    hp.validate()
    loss, head_names, train_heads = hp.loss, tuple(hp.head_names), hp.train_heads
    trained = jnp.asarray([1.0 if (not train_heads or h in train_heads) else 0.0
                           for h in head_names], jnp.float32)
    metrics: dict[str, jax.Array] = {}
    if loss == "bradley_terry":
        if not ("chosen_input_ids" in batch or is_packed_pairs(batch)
                or is_prefix_shared_pairs(batch)):
            raise ValueError("loss='bradley_terry' needs a pairwise preference batch "
                             "(chosen_*/rejected_* keys, packed or prefix-shared rows)")
        chosen, rejected = pair_rewards(model, batch)  # [P, H]
        p, h = chosen.shape
        w = _head_weights(batch, p, trained) * pair_weights(batch)[:, None]
        margin = hp.margin_scale * batch["margin"] if hp.use_margin else None
        label = batch["label"] if hp.soft_labels else None
        per_head = []
        for i in range(h):
            per_head.append(losses.bradley_terry_loss(
                chosen[:, i], rejected[:, i], margin=margin, label=label,
                label_smoothing=hp.label_smoothing))
        pair_loss = jnp.stack(per_head, axis=-1)  # [P, H]
        total = _weighted_mean(pair_loss, w)
        if hp.center_rewards_coefficient > 0:
            centering = jnp.stack([losses.reward_centering_loss(chosen[:, i], rejected[:, i])
                                   for i in range(h)], axis=-1)
            centering_loss = hp.center_rewards_coefficient * _weighted_mean(centering, w)
            total = total + centering_loss
            metrics["rm/centering_loss"] = centering_loss
        acc = jnp.stack([losses.reward_accuracy(chosen[:, i], rejected[:, i], label=label)
                         for i in range(h)], axis=-1)
        margin_values = chosen - rejected
        chosen_mean = _weighted_mean(chosen, w)
        rejected_mean = _weighted_mean(rejected, w)
    else:
        if not is_ranking_batch(batch):
            raise ValueError(f"loss={loss!r} needs a ranking batch (input_ids [B, K, T] and "
                             "ranks [B, K], or prefix-shared rows with ranks)")
        rewards = ranking_rewards(model, batch)  # [B, K, H]
        b, k, h = rewards.shape
        ranks = batch["ranks"]
        mask = batch["response_mask"].astype(jnp.float32)
        w = _head_weights(batch, b, trained)
        per_head = []
        for i in range(h):
            r = rewards[..., i]
            if loss == "kwise":
                per_head.append(losses.kwise_ranking_loss(r, ranks, mask=mask))
            elif loss == "plackett_luce":
                per_head.append(losses.plackett_luce_loss(r, ranks, mask=mask))
            else:
                best = jnp.argmin(jnp.where(mask > 0, ranks, jnp.iinfo(jnp.int32).max), axis=-1)
                per_head.append(losses.best_of_k_loss(r, best, mask=mask))
        total = _weighted_mean(jnp.stack(per_head, axis=-1), w)
        # Pairwise diagnostics over untied valid pairs (i better than j).
        better = (ranks[:, :, None] < ranks[:, None, :]) & (mask[:, :, None] > 0) \
            & (mask[:, None, :] > 0)
        better = better.astype(jnp.float32)[..., None]  # [B, K, K, 1]
        diff = rewards[:, :, None, :] - rewards[:, None, :, :]  # [B, K, K, H]
        pw = better * w[:, None, None, :]
        n_pairs = jnp.maximum(jnp.sum(pw, axis=(1, 2)), 1.0)  # [B, H]
        acc = jnp.sum((diff > 0) * pw, axis=(1, 2)) / n_pairs
        margin_values = jnp.sum(diff * pw, axis=(1, 2)) / n_pairs
        best_mask = (ranks == jnp.min(jnp.where(mask > 0, ranks, 1 << 30), axis=-1,
                                      keepdims=True)) & (mask > 0)
        best_w = best_mask.astype(jnp.float32)[..., None] * w[:, None, :]
        worst_w = mask[..., None] * w[:, None, :] - best_w
        chosen_mean = _weighted_mean(rewards, best_w)
        rejected_mean = _weighted_mean(rewards, worst_w)
    metrics.update({
        "rm/loss": total,
        "rm/accuracy": _weighted_mean(acc, w),
        "rm/margin": _weighted_mean(margin_values, w),
        "rm/chosen_reward": chosen_mean,
        "rm/rejected_reward": rejected_mean,
    })
    if len(head_names) > 1:
        for i, name in enumerate(head_names):
            metrics[f"rm/{name}/accuracy"] = _weighted_mean(acc[:, i], w[:, i])
            metrics[f"rm/{name}/margin"] = _weighted_mean(margin_values[:, i], w[:, i])
    return total, metrics


def make_rm_loss(config: RMConfig):
    """`loss_fn(model, batch, rng)` for `make_train_step` from an `RMConfig`."""
    hp = RMHyperParams.from_config(config)
    hp.validate()
    return bind_loss(rm_loss, hp=hp)


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------


def reward_statistics(
    setup: TrainSetup, state: TrainState, batches, *, max_batches: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """`(mean [H], std [H], count)` of the rewards of every response in up to `max_batches`
    batches (chosen and rejected, or all K ranked responses), with the model's current
    normalisation."""

    def rewards_fn(params, frozen, batch):
        model = nnx.merge(setup.graphdef, params, frozen)
        if is_ranking_batch(batch):
            r = ranking_rewards(model, batch)
            m = batch["response_mask"].astype(jnp.float32)[..., None]
            r = r.reshape(-1, r.shape[-1])
            m = jnp.broadcast_to(m, (*batch["response_mask"].shape, r.shape[-1])
                                 ).reshape(-1, r.shape[-1])
        else:
            c, rj = pair_rewards(model, batch)
            r = jnp.concatenate([c, rj], axis=0)
            w = pair_weights(batch)
            m = jnp.broadcast_to(jnp.concatenate([w, w])[:, None], r.shape)
        return jnp.sum(r * m, 0), jnp.sum(r * r * m, 0), jnp.sum(m, 0)

    jitted = jax.jit(losses.unchecked(rewards_fn))
    s1 = s2 = n = 0.0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        a, b, c = jax.device_get(jitted(state.params, state.frozen, setup.put_batch(batch)))
        s1, s2, n = s1 + np.asarray(a, np.float64), s2 + np.asarray(b, np.float64), \
            n + np.asarray(c, np.float64)
    if np.all(np.asarray(n) == 0):
        raise ValueError("the reward normalisation set produced no responses")
    mean = s1 / np.maximum(n, 1)
    var = np.maximum(s2 / np.maximum(n, 1) - mean**2, 0.0)
    return mean, np.sqrt(var), int(np.max(n))


def normalize_rewards(
    setup: TrainSetup, state: TrainState, batches, *, max_batches: int = 16, eps: float = 1e-6
) -> tuple[TrainState, dict[str, Any]]:
    """Sets each head's gain/bias so its rewards on `batches` have mean 0 and std 1.

    With current normalisation `r = g * raw + b` and measured mean `μ`, std `σ` of `r`, the new
    normalisation is `g' = g / σ`, `b' = (b - μ) / σ` (`RewardModel.set_normalization`), so
    `g' raw + b' = (r - μ) / σ`. Returns the new state (frozen variables updated) and the
    statistics.
    """
    mean, std, count = reward_statistics(setup, state, batches, max_batches=max_batches)
    model = nnx.merge(setup.graphdef, state.params, state.frozen)
    gain = np.asarray(jax.device_get(model.norm_gain[...]), np.float64)
    bias = np.asarray(jax.device_get(model.norm_bias[...]), np.float64)
    std = np.maximum(std, eps)
    new_gain, new_bias = gain / std, (bias - mean) / std
    model.set_normalization(new_gain.astype(np.float32), new_bias.astype(np.float32))
    trainable = {tuple(p) for p, _ in nnx.to_flat_state(state.params)}
    frozen = nnx.state(model, lambda path, _value: tuple(path) not in trainable)
    frozen = jax.device_put(frozen, setup.state_sharding.frozen)
    stats = {"heads": list(model.head_names), "mean": mean.tolist(), "std": std.tolist(),
             "count": count, "gain": new_gain.tolist(), "bias": new_bias.tolist()}
    return state._replace(frozen=frozen), stats


def train_rm(config: RMConfig) -> dict[str, Any]:
    """Trains a reward model as configured; returns the run summary.

    With `normalize`, the final checkpoint holds the normalised model and
    `output_dir/reward_normalization.json` the statistics.
    """
    return run_rm(config).summary


def run_rm(
    config: RMConfig,
    *,
    model: nnx.Module | None = None,
    records: Sequence[Mapping[str, Any]] | TokenizedRecords | None = None,
    eval_records: Sequence[Mapping[str, Any]] | TokenizedRecords | None = None,
    eval_fn: ModelEvalFn | None = None,
) -> TrainedRun:
    """`train_rm` on in-memory inputs; returns the summary and the trained (normalised)
    reward model.

    Args:
      config: the run config (its `model` spec is what `config.yaml` records; with `model`
        given it should describe that model's architecture).
      model: the initial `RewardModel` with `config.head_names` (default: built from
        `config.model`; e.g. `RewardModel.from_causal_lm(sft_policy)`); it is split into the
        train state (its arrays copied first: it may share them with another model).
      records: preference (or ranking) records instead of `config.data.path` /
        `config.data.synthetic` (`rlhf_jax.train.data.build_data`), or the same records
        tokenized once for several runs (`rlhf_jax.train.tokenize_records` with this run's
        data spec and tokenizer: a sweep tokenizes them once).
      eval_records: held-out records, or `TokenizedRecords` (with `records`).
      eval_fn: an evaluation callback (`rlhf_jax.train.run.ModelEvalFn`) run every
        `config.eval_every` steps and at the end.
    """
    if config.loss not in RM_LOSSES:
        raise ValueError(f"loss={config.loss!r}; allowed: {RM_LOSSES}")
    check_run_config(config)
    fmt = "ranking" if config.loss in RANKING_LOSSES else "preference"
    if config.data.margin_field is not None and not (config.use_margin
                                                     and config.loss == "bradley_terry"):
        raise ValueError(f"data.margin_field={config.data.margin_field!r} reads rating margins, "
                         "which only the Bradley-Terry loss with use_margin=true uses; set "
                         "--use-margin (or unset data.margin_field)")
    tokenizer = load_tokenizer_for(config.data, config.model)
    data = build_data(config.data, format=fmt, tokenizer=tokenizer, seed=config.seed,
                      records=records, eval_records=eval_records)
    if model is None:
        model = build_model(config.model, kind="reward", head_names=config.head_names,
                            seed=config.seed)
    else:
        own_arrays(model)
    check_vocab(model, tokenizer)
    result, setup = run_training(config, model, make_rm_loss(config), data, eval_fn=eval_fn)
    extra: dict[str, Any] = {}
    if config.normalize and not result.preempted:
        if config.normalization_set == "eval" and data.eval_batches is not None:
            batches = data.eval_batches()
        else:
            batches = _reference_batches(data.train)
        state, stats = normalize_rewards(setup, result.state, batches,
                                         max_batches=config.normalization_batches)
        if jax.process_index() == 0:  # the same statistics on every process
            epath.Path(config.output_dir, NORMALIZATION_FILE).write_text(
                json.dumps(stats, indent=2))
        ckpt = Checkpointer(epath.Path(config.output_dir, CHECKPOINT_DIR),
                            keep_last=config.checkpoint.keep_last)
        written = ckpt.save(result.step, state,
                            data_state={"loader": data.train.get_state(),
                                        "skipped_steps": result.skipped_steps},
                            config=config_to_dict(config), overwrite=True)
        ckpt.close()
        if not written:
            raise CheckpointSaveError(f"the normalised reward model of step {result.step} was "
                                      f"not written under {ckpt.directory}")
        result = result._replace(state=state)
        extra["normalization"] = stats
    return TrainedRun(run_summary(result, config, data, **extra),
                      trained_model(setup, result.state))


def load_reward_model(run_dir: str, *, step: int | None = None) -> nnx.Module:
    """The trained `RewardModel` of an `rlhf-jax rm` run, with its normalisation and adapters.

    Reads the run's ``config.yaml`` (model spec and ``head_names``) and its checkpoint (the
    newest, or ``step``) onto the host, whatever mesh wrote it; the gain and bias set by
    normalisation are part of the checkpoint. This is what ``reward.source: model`` with
    ``reward.path: <run_dir>`` loads in the online trainers.

    Raises:
      FileNotFoundError: ``run_dir`` has no ``config.yaml`` or no checkpoint (for ``step``).
      ValueError: the run did not train a reward model, or the checkpoint does not fit the
        model its config describes (the message names the variable).
    """
    run_config = read_run_config(run_dir)
    spec = config_from_dict(ModelSpec, run_config.get("model", {}), where="config.model")
    head_names = tuple(run_config.get("head_names") or ("reward",))
    step, raw = read_checkpoint_state(epath.Path(run_dir, CHECKPOINT_DIR), step)
    params, frozen = raw.get("params", {}), raw.get("frozen", {})
    if "score_head" not in params and "score_head" not in frozen:
        raise ValueError(f"{run_dir} did not train a reward model (its checkpoint has no "
                         "score_head); reward.path must name an `rlhf-jax rm` run directory")
    return restore_into(
        lambda: build_model(spec, kind="reward", head_names=head_names, load_weights=False),
        params, frozen, where=f"{run_dir} (step {step})")


def _reference_batches(train_loader):
    """A one-pass copy of the training stream from its start (for normalisation)."""
    loader = copy.copy(train_loader)
    state = loader.get_state()
    loader.set_state({**state, "position": 0})
    return loader


__all__ = [
    "NORMALIZATION_FILE",
    "RANKING_LOSSES",
    "RMConfig",
    "RMHyperParams",
    "RM_LOSSES",
    "load_reward_model",
    "make_rm_loss",
    "normalize_rewards",
    "branch_last_rewards",
    "is_ranking_batch",
    "pair_rewards",
    "ranking_rewards",
    "reward_statistics",
    "rm_loss",
    "run_rm",
    "train_rm",
]
