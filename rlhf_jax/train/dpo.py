"""Direct preference optimisation and its family: DPO (every `loss_type` of
`rlhf_jax.losses.dpo_loss`, weighted mixtures such as MPO, label smoothing / soft labels, RPO's
NLL term), reference-free SimPO, ORPO, CPO and CPL, and unpaired KTO.

One forward pass per model and step: the chosen and rejected sequences of a pairwise batch are
concatenated along the batch axis (`rlhf_jax.train.pairs.pair_forward_batch`; packed rows are
used as they are) and their aligned token log-probs are summed over the completion tokens
(`pair_sequence_sums`). With `data.prefix_sharing` each pair is one row, `prompt | chosen |
rejected`, with tree attention (`rlhf_jax.data.collate_prefix_shared`): the same log-probs with
the prompt run once: 19-26% faster steps on the CPU benchmark's "small" shape (prompt as long
as the response; docs/benchmarks.md). All objectives come from `rlhf_jax.losses`.

The reference policy (`reference`):

- `"model"`: a frozen copy of the initial policy (or `ref_model`), held next to the policy in
  the train state (`PolicyAndReference`, so it is sharded and checkpointed with it) and run
  forward in the same jitted step, without gradients.
- `"precomputed"`: a pass before training runs the reference over exactly the batches training
  will draw (the loader is deterministic) and stores their sequence log-probs
  (`output_dir/reference_logps.npz`, reused on resume; in a multi-process run each process
  stores the table of its own share of the data, `reference_logps.<i>-of-<n>.npz`); the
  reference model is then dropped, so training holds only the policy and runs one forward per
  step. Runs that differ only outside `FINGERPRINT_FIELDS` (a sweep over β, label smoothing or
  the learning rate) can share one table: `dpo_reference_logps(config, ...)` computes it in
  memory and `run_dpo(..., reference_logps=table)` trains on it without running the reference.
- `"lora_base"` (automatic when `model.lora_rank > 0` and `reference="model"`): the policy with
  its LoRA adapters zeroed (`rlhf_jax.models.lora.lora_disabled`), i.e. the base model, with no
  second copy of the weights.
- SimPO, ORPO, CPO and CPL use no reference (no reference model is built and no table is
  computed).

CPL (Hejna et al. 2023, `rlhf_jax.losses.cpl_loss`) is the one per-token objective: its
discount γ (`cpl_discount`) weighs each completion token by `γ^k`, `k` its index in the
completion, so it reads the token log-probs of each segment (`pair_token_segments`) rather than
their sums. Its temperature α is `beta`, its conservative bias λ `cpl_conservative_bias` and its
behaviour-cloning regulariser `cpl_bc_coeff` times the NLL of `cpl_bc_segments`.

KTO batches are unpaired (`rlhf_jax.data.collate_kto`, with the mismatched `kl_` pairs of TRL's
KL reference point): the completion and its `kl_` twin run in one fused forward.

Metrics (`<algo>` is `dpo`, `simpo`, `orpo`, `cpo`, `cpl` or `kto`; held-out as `<algo>/eval/<name>`):

- `<algo>/loss`: the objective.
- `<algo>/rewards_chosen`, `<algo>/rewards_rejected`: mean implicit rewards. DPO:
  `β (log π - log π_ref)` (as TRL); SimPO / CPO / ORPO: `β log π` (length-averaged where the
  loss is); CPL: the segment advantages `A± = α Σ_k γ^k log π`; KTO: over desirable /
  undesirable completions.
- `<algo>/accuracy`: fraction of pairs with `rewards_chosen > rewards_rejected` (expected
  agreement with soft labels); `<algo>/reward_margin`: mean `rewards_chosen - rewards_rejected`.
- `<algo>/logps_chosen`, `<algo>/logps_rejected`: mean policy sequence log-probs.
- `<algo>/nll_loss`: the chosen completions' token-mean NLL (ORPO, CPO, `sft` in a DPO mixture,
  or `rpo_alpha > 0`).
- `cpl/cpl_loss`, `cpl/bc_loss`: CPL's contrastive term and its BC term (logged whatever
  `cpl_bc_coeff` is).
- `kto/kl`: KTO's reference point `z_0`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from rlhf_jax import losses, sharding
from rlhf_jax.models import LoRAParam, lora_disabled
from rlhf_jax.storage import ensure_dir
from rlhf_jax.train.builders import (
    build_model,
    check_vocab,
    load_tokenizer_for,
    shard_train_state,
    trainable_filter,
)
from rlhf_jax.train.config import (
    DataSpec,
    ModelSpec,
    TrainConfig,
    check_number,
    config_to_dict,
    require,
)
from rlhf_jax.train.data import TokenizedRecords, build_data
from rlhf_jax.train.logprobs import model_scores
from rlhf_jax.train.pairs import (
    pair_forward_batch,
    pair_sequence_sums,
    pair_token_segments,
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

ALGORITHMS = ("dpo", "simpo", "orpo", "cpo", "cpl", "kto")
REFERENCES = ("model", "precomputed")
REFERENCE_FILE = "reference_logps.npz"

_log = logging.getLogger("rlhf_jax.train")


@dataclasses.dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """Preference optimisation: DPO family, SimPO, ORPO, CPO, CPL, KTO."""

    output_dir: str = "runs/dpo"
    data: DataSpec = DataSpec(synthetic="topic")
    algorithm: Literal["dpo", "simpo", "orpo", "cpo", "cpl", "kto"] = "dpo"
    """Objective family."""
    loss_type: tuple[str, ...] = ()
    """Empty: the algorithm's default ("sigmoid" for dpo and cpo, "kto" for kto). dpo: one or more of `rlhf_jax.losses.DPO_LOSS_TYPES` plus "sft" (several = a weighted
    mixture, e.g. MPO "sigmoid bco_pair sft"); cpo: one of `CPO_LOSS_TYPES`; kto: one of
    `KTO_LOSS_TYPES`; ignored by simpo and orpo."""
    loss_weights: tuple[float, ...] = ()
    """Weights of the `loss_type` mixture (empty: all 1.0), as TRL's `loss_weights`."""
    beta: float = 0.1
    """Temperature β (SimPO: reward scale, ORPO: odds-ratio weight λ, CPL: temperature α)."""
    label_smoothing: float = 0.0
    """Label smoothing ε (cDPO / robust / EXO / AOT; SimPO and CPO sigmoid)."""
    soft_labels: bool = False
    """Use the batch's soft `label` p as ε = 1 - p per pair (needs a smoothing-aware loss)."""
    f_divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = (
        "reverse_kl")
    """f-divergence of the DPO implicit reward (f-DPO)."""
    f_alpha: float = 0.5
    """α of the alpha divergence."""
    discopop_tau: float = 0.05
    """τ of the discopop loss."""
    rpo_alpha: float = 0.0
    """Weight of the chosen completions' NLL added to the DPO loss (RPO; TRL `rpo_alpha`)."""
    simpo_gamma: float = 0.5
    """SimPO (and CPO simpo) target reward margin γ."""
    cpo_alpha: float = 1.0
    """Weight of the NLL term of CPO."""
    cpl_conservative_bias: float = 0.5
    """CPL's conservative bias λ in (0, 1] on the negative segment (1: the unbiased CPL
    objective; 0.5: the reference code's `cpl` configs)."""
    cpl_discount: float = 1.0
    """CPL's discount γ in (0, 1] over completion token positions (1: plain sums)."""
    cpl_bc_coeff: float = 0.0
    """Weight of CPL's behaviour-cloning regulariser (the reference code's `cpl_bc` configs
    use 1.0 with cpl_conservative_bias 1.0)."""
    cpl_bc_segments: Literal["preferred", "both"] = "preferred"
    """CPL's BC term on the preferred completion's NLL, or the token mean over both."""
    desirable_weight: float = 1.0
    """KTO λ_D."""
    undesirable_weight: float = 1.0
    """KTO λ_U."""
    reference: Literal["model", "precomputed"] = "model"
    """dpo / kto reference: a frozen model in the step, or log-probs precomputed before training
    (the reference model is then not kept in memory). With LoRA, the reference is the base
    model (adapters disabled) either way."""
    ref_model: ModelSpec | None = None
    """Reference model (default: the policy's initial weights)."""

    def __post_init__(self):
        super().__post_init__()
        check_number(self, "beta", low=0, low_open=True)
        check_number(self, "label_smoothing", low=0, high=0.5)
        check_number(self, "f_alpha")
        check_number(self, "discopop_tau", low=0, low_open=True)
        for name in ("rpo_alpha", "simpo_gamma", "cpo_alpha"):
            check_number(self, name, low=0)
        for name in ("desirable_weight", "undesirable_weight"):
            check_number(self, name, low=0, low_open=True)
        for name in ("cpl_conservative_bias", "cpl_discount"):
            check_number(self, name, low=0, high=1, low_open=True)
        check_number(self, "cpl_bc_coeff", low=0)
        require(all(isinstance(w, int | float) and 0 <= w < float("inf")
                    for w in self.loss_weights), "loss_weights",
                f"loss_weights must be finite numbers >= 0, got {list(self.loss_weights)}")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


class PolicyAndReference(nnx.Module):
    """The trained policy next to a frozen reference (only `policy` parameters are trained)."""

    def __init__(self, policy: nnx.Module, reference: nnx.Module):
        self.policy = policy
        self.reference = reference


def policy_only_filter(model: nnx.Module) -> Any:
    """Trainable filter of a `PolicyAndReference`: the policy's trainable variables."""
    return nnx.All(trainable_filter(model.policy), nnx.PathContains("policy"))


def base_model_of(policy: nnx.Module) -> nnx.Module:
    """The policy with LoRA adapters zeroed (the base model), sharing every other weight."""
    graphdef, lora, rest = nnx.split(policy, LoRAParam, ...)
    return nnx.merge(graphdef, lora_disabled(lora), rest)


# ---------------------------------------------------------------------------------------------
# sequence log-probs
# ---------------------------------------------------------------------------------------------


class PairLogps(NamedTuple):
    """The policy's sequence log-probs of a pairwise batch and what the losses weigh them by.

    Attributes:
      chosen, rejected: ``[P]`` summed completion log-probs.
      chosen_lengths, rejected_lengths: ``[P]`` completion token counts.
      weights: ``[P]`` pair weights (`rlhf_jax.train.pairs.pair_weights`).
      smoothing: the label smoothing ε, scalar or, with soft labels, ``1 - label`` ``[P]``.
      metric_label: the soft ``label [P]`` for the accuracy metric, or None (hard labels).
    """

    chosen: jax.Array
    rejected: jax.Array
    chosen_lengths: jax.Array
    rejected_lengths: jax.Array
    weights: jax.Array
    smoothing: Any
    metric_label: jax.Array | None

    def averages(self) -> tuple[jax.Array, jax.Array]:
        """Length-normalised (mean per completion token) chosen and rejected log-probs."""
        return (self.chosen / jnp.maximum(self.chosen_lengths, 1.0),
                self.rejected / jnp.maximum(self.rejected_lengths, 1.0))


def policy_pair_logps(
    policy: nnx.Module,
    batch: Mapping[str, jax.Array],
    *,
    soft_labels: bool = False,
    label_smoothing: float = 0.0,
) -> PairLogps:
    """One fused forward of the policy over a pairwise batch (any layout,
    `rlhf_jax.train.pairs.pair_forward_batch`) and the per-pair sums of its aligned log-probs.

    With ``soft_labels`` and a batch ``label`` p, the smoothing is ``1 - p`` per pair (and the
    accuracy metric uses p); otherwise ``label_smoothing``."""
    rows = pair_forward_batch(batch)
    logps = model_scores(policy, rows, where=rows["loss_mask"]).logps
    pc, pr, lc, lr = pair_sequence_sums(logps, rows, batch)
    label = batch["label"].astype(jnp.float32) if "label" in batch else None
    smoothing = (1.0 - label) if (soft_labels and label is not None) else label_smoothing
    return PairLogps(chosen=pc, rejected=pr, chosen_lengths=lc, rejected_lengths=lr,
                     weights=pair_weights(batch), smoothing=smoothing,
                     metric_label=label if soft_labels else None)


def reference_pair_logps(ref_model: nnx.Module, batch: Mapping[str, jax.Array]):
    """`(ref_chosen [P], ref_rejected [P])` sequence log-probs of a pairwise batch, no gradient."""
    rows = pair_forward_batch(batch)
    logps = model_scores(ref_model, rows, where=rows["loss_mask"]).logps
    rc, rr, _, _ = pair_sequence_sums(jax.lax.stop_gradient(logps), rows, batch)
    return rc, rr


def _kto_rows(batch):
    keys = ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")
    return {k: jnp.concatenate([batch[k], batch["kl_" + k]], axis=0) for k in keys}


def kto_sequence_logps(model: nnx.Module, batch: Mapping[str, jax.Array]):
    """`(logps [B], kl_logps [B])`: completion log-probs of the examples and of their `kl_`
    mismatched twins, in one fused forward."""
    rows = _kto_rows(batch)
    logps = model_scores(model, rows, where=rows["loss_mask"]).logps
    seq = losses.masked_sum(logps, rows["loss_mask"].astype(jnp.float32), axis=-1)
    return tuple(jnp.split(seq, 2))


def _chosen_nll(logps_sum: jax.Array, lengths: jax.Array, w: jax.Array) -> jax.Array:
    """Token-mean NLL over the chosen completions of the batch (TRL's `nll_loss`)."""
    return -jnp.sum(logps_sum * w) / jnp.maximum(jnp.sum(lengths * w), 1.0)


def _wmean(x, w):
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def _reward_metrics(prefix: str, chosen, rejected, pairs: PairLogps) -> dict[str, jax.Array]:
    w, label = pairs.weights, pairs.metric_label
    acc = losses.reward_accuracy(chosen, rejected, label=label)
    return {
        f"{prefix}/rewards_chosen": _wmean(chosen, w),
        f"{prefix}/rewards_rejected": _wmean(rejected, w),
        f"{prefix}/accuracy": _wmean(acc, w),
        f"{prefix}/reward_margin": _wmean(chosen - rejected, w),
        f"{prefix}/logps_chosen": _wmean(pairs.chosen, w),
        f"{prefix}/logps_rejected": _wmean(pairs.rejected, w),
    }


# ---------------------------------------------------------------------------------------------
# the objectives, one hyper-parameter set per family
# ---------------------------------------------------------------------------------------------


def _from_config(cls, config: DPOConfig):
    """``cls`` with every field read from the `DPOConfig` field of the same name; an empty
    ``loss_type`` takes the family's default."""
    values = {name: getattr(config, name) for name in cls._fields}
    if "loss_type" in values and not values["loss_type"]:
        values["loss_type"] = cls._field_defaults["loss_type"]
    return cls(**values)


def _check_loss_type(algorithm: str, loss_type: Sequence[str], allowed: Sequence[str], *,
                     several: bool) -> None:
    bad = [t for t in loss_type if t not in allowed]
    if bad or not loss_type or (not several and len(loss_type) != 1):
        raise ValueError(f"loss_type={tuple(loss_type)} for algorithm={algorithm!r}; allowed: "
                         f"{'one or more' if several else 'exactly one'} of {tuple(allowed)}")


class DPOHyperParams(NamedTuple):
    """DPO (Rafailov et al. 2023) and its loss-type mixtures: every
    `rlhf_jax.losses.DPO_LOSS_TYPES` entry plus ``"sft"`` (the chosen NLL), weighted by
    ``loss_weights`` (MPO: ``("sigmoid", "bco_pair", "sft")``), with label smoothing or soft
    labels, f-DPO divergences and RPO's NLL term (``rpo_alpha``). Needs a reference."""

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = ()
    beta: float = 0.1
    label_smoothing: float = 0.0
    soft_labels: bool = False
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    discopop_tau: float = 0.05
    rpo_alpha: float = 0.0

    algorithm = "dpo"
    uses_reference = True
    traced = ("beta", "label_smoothing", "discopop_tau")

    @classmethod
    def from_config(cls, config: DPOConfig) -> DPOHyperParams:
        return _from_config(cls, config)

    def validate(self) -> None:
        _check_loss_type(self.algorithm, self.loss_type, (*losses.DPO_LOSS_TYPES, "sft"),
                         several=True)
        if self.loss_weights and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights={tuple(self.loss_weights)} must have one weight per "
                             f"loss_type {tuple(self.loss_type)}")

    def loss(self, policy, reference, batch):
        """``(loss, metrics)``; ``reference`` None reads the batch's precomputed log-probs."""
        pairs = policy_pair_logps(policy, batch, soft_labels=self.soft_labels,
                                  label_smoothing=self.label_smoothing)
        if reference is None:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            rc, rr = reference_pair_logps(reference, batch)
        pc, pr, w = pairs.chosen, pairs.rejected, pairs.weights
        weights = tuple(self.loss_weights) or (1.0,) * len(self.loss_type)
        mixture = {t: wt for t, wt in zip(self.loss_type, weights) if t != "sft"}
        per = jnp.zeros_like(pc)
        if mixture:
            per = losses.mixed_dpo_loss(
                pc, pr, rc, rr, loss_weights=mixture, label_smoothing=pairs.smoothing,
                beta=self.beta, chosen_lengths=pairs.chosen_lengths,
                rejected_lengths=pairs.rejected_lengths, f_divergence=self.f_divergence,
                f_alpha=self.f_alpha, discopop_tau=self.discopop_tau)
        loss = _wmean(per, w)
        metrics: dict[str, jax.Array] = {}
        nll_weight = dict(zip(self.loss_type, weights)).get("sft", 0.0) + self.rpo_alpha
        if nll_weight:
            nll = _chosen_nll(pc, pairs.chosen_lengths, w)
            loss = loss + nll_weight * nll
            metrics["dpo/nll_loss"] = nll
        rm = losses.dpo_reward_metrics(pc, pr, rc, rr, beta=self.beta, label=pairs.metric_label)
        metrics.update(_reward_metrics("dpo", rm.chosen, rm.rejected, pairs))
        metrics["dpo/loss"] = loss
        return loss, metrics


class SimPOHyperParams(NamedTuple):
    """SimPO (Meng et al. 2024): reference-free, length-normalised log-probs, target margin
    ``simpo_gamma``; ``beta`` is the reward scale."""

    beta: float = 0.1
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    soft_labels: bool = False

    algorithm = "simpo"
    uses_reference = False
    traced = ("beta", "simpo_gamma", "label_smoothing")

    @classmethod
    def from_config(cls, config: DPOConfig) -> SimPOHyperParams:
        return _from_config(cls, config)

    def validate(self) -> None:
        pass

    def loss(self, policy, reference, batch):
        pairs = policy_pair_logps(policy, batch, soft_labels=self.soft_labels,
                                  label_smoothing=self.label_smoothing)
        avg_c, avg_r = pairs.averages()
        per = losses.simpo_loss(avg_c, avg_r, beta=self.beta, gamma=self.simpo_gamma,
                                label_smoothing=pairs.smoothing)
        loss = _wmean(per, pairs.weights)
        sg = jax.lax.stop_gradient
        metrics = _reward_metrics("simpo", self.beta * sg(avg_c), self.beta * sg(avg_r), pairs)
        metrics["simpo/loss"] = loss
        return loss, metrics


class ORPOHyperParams(NamedTuple):
    """ORPO (Hong et al. 2024): the chosen NLL plus ``beta`` (λ) times the odds-ratio loss of
    the length-normalised log-probs; reference-free."""

    beta: float = 0.1
    soft_labels: bool = False

    algorithm = "orpo"
    uses_reference = False
    traced = ("beta",)

    @classmethod
    def from_config(cls, config: DPOConfig) -> ORPOHyperParams:
        return _from_config(cls, config)

    def validate(self) -> None:
        pass

    def loss(self, policy, reference, batch):
        pairs = policy_pair_logps(policy, batch, soft_labels=self.soft_labels)
        avg_c, avg_r = pairs.averages()
        per = losses.orpo_loss(avg_c, avg_r, beta=self.beta)
        nll = _chosen_nll(pairs.chosen, pairs.chosen_lengths, pairs.weights)
        loss = nll + _wmean(per, pairs.weights)
        sg = jax.lax.stop_gradient
        metrics = {"orpo/nll_loss": nll}
        metrics.update(_reward_metrics("orpo", self.beta * sg(avg_c), self.beta * sg(avg_r),
                                       pairs))
        metrics["orpo/loss"] = loss
        return loss, metrics


class CPOHyperParams(NamedTuple):
    """CPO (Xu et al. 2024): one `rlhf_jax.losses.CPO_LOSS_TYPES` preference term
    (length-normalised for ``ipo`` and ``simpo``) plus ``cpo_alpha`` times the chosen NLL;
    reference-free."""

    loss_type: tuple[str, ...] = ("sigmoid",)
    beta: float = 0.1
    label_smoothing: float = 0.0
    soft_labels: bool = False
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0

    algorithm = "cpo"
    uses_reference = False
    traced = ("beta", "label_smoothing", "simpo_gamma", "cpo_alpha")

    @classmethod
    def from_config(cls, config: DPOConfig) -> CPOHyperParams:
        return _from_config(cls, config)

    def validate(self) -> None:
        _check_loss_type(self.algorithm, self.loss_type, losses.CPO_LOSS_TYPES, several=False)

    def loss(self, policy, reference, batch):
        pairs = policy_pair_logps(policy, batch, soft_labels=self.soft_labels,
                                  label_smoothing=self.label_smoothing)
        loss_type = self.loss_type[0]
        c, r = pairs.averages() if loss_type in ("ipo", "simpo") else (pairs.chosen,
                                                                        pairs.rejected)
        smoothing = pairs.smoothing if loss_type in ("sigmoid", "simpo") else 0.0
        per = losses.cpo_loss(c, r, beta=self.beta, loss_type=loss_type,
                              label_smoothing=smoothing, simpo_gamma=self.simpo_gamma)
        nll = _chosen_nll(pairs.chosen, pairs.chosen_lengths, pairs.weights)
        loss = _wmean(per, pairs.weights) + self.cpo_alpha * nll
        sg = jax.lax.stop_gradient
        metrics = {"cpo/nll_loss": nll}
        metrics.update(_reward_metrics("cpo", self.beta * sg(c), self.beta * sg(r), pairs))
        metrics["cpo/loss"] = loss
        return loss, metrics


class CPLHyperParams(NamedTuple):
    """CPL (Hejna et al. 2023, `rlhf_jax.losses.cpl_loss`): the contrastive loss of the
    segments' discounted, α-scaled log-probs (α = ``beta``, γ = ``cpl_discount``) with the
    conservative bias λ (``cpl_conservative_bias``) on the negative segment, plus
    ``cpl_bc_coeff`` times its BC term; soft labels are CPL's preference probabilities.
    Reference-free (the paper's CPL; ``cpl_loss``'s CPL-KL variant is not offered here)."""

    beta: float = 0.1
    cpl_conservative_bias: float = 0.5
    cpl_discount: float = 1.0
    cpl_bc_coeff: float = 0.0
    cpl_bc_segments: str = "preferred"
    soft_labels: bool = False

    algorithm = "cpl"
    uses_reference = False
    traced = ("beta", "cpl_conservative_bias", "cpl_bc_coeff")

    @classmethod
    def from_config(cls, config: DPOConfig) -> CPLHyperParams:
        return _from_config(cls, config)

    def validate(self) -> None:
        if self.cpl_bc_segments not in losses.CPL_BC_SEGMENTS:
            raise ValueError(f"cpl_bc_segments={self.cpl_bc_segments!r}; allowed: "
                             f"{losses.CPL_BC_SEGMENTS}")

    def loss(self, policy, reference, batch):
        rows = pair_forward_batch(batch)
        logps = model_scores(policy, rows, where=rows["loss_mask"]).logps
        pc, pr, lc, lr = pair_sequence_sums(logps, rows, batch)
        label = batch["label"].astype(jnp.float32) if "label" in batch else None
        pairs = PairLogps(chosen=pc, rejected=pr, chosen_lengths=lc, rejected_lengths=lr,
                          weights=pair_weights(batch), smoothing=0.0,
                          metric_label=label if self.soft_labels else None)
        c, r, c_mask, r_mask = pair_token_segments(logps, rows, batch)
        out = losses.cpl_loss(c, r, c_mask, r_mask, alpha=self.beta,
                              conservative_bias=self.cpl_conservative_bias,
                              discount=self.cpl_discount,
                              label=label if self.soft_labels else None,
                              bc_coeff=self.cpl_bc_coeff, bc_segments=self.cpl_bc_segments)
        w = pairs.weights
        loss = _wmean(out.loss, w)
        sg = jax.lax.stop_gradient
        metrics = {"cpl/cpl_loss": _wmean(out.cpl, w), "cpl/bc_loss": _wmean(out.bc, w)}
        metrics.update(_reward_metrics("cpl", sg(out.chosen_advantage),
                                       sg(out.rejected_advantage), pairs))
        metrics["cpl/loss"] = loss
        return loss, metrics


class KTOHyperParams(NamedTuple):
    """KTO (Ethayarajh et al. 2024) on unpaired examples: one `rlhf_jax.losses.KTO_LOSS_TYPES`
    loss against the batch's KL reference point ``z_0`` (TRL's mismatched ``kl_`` pairs), with
    ``desirable_weight`` λ_D and ``undesirable_weight`` λ_U. Needs a reference."""

    loss_type: tuple[str, ...] = ("kto",)
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    algorithm = "kto"
    uses_reference = True
    traced = ("beta", "desirable_weight", "undesirable_weight")

    @classmethod
    def from_config(cls, config: DPOConfig) -> KTOHyperParams:
        return _from_config(cls, config)

    def validate(self) -> None:
        _check_loss_type(self.algorithm, self.loss_type, losses.KTO_LOSS_TYPES, several=False)

    def loss(self, policy, reference, batch):
        """``(loss, metrics)``; ``reference`` None reads the batch's precomputed log-probs."""
        pol, kl_pol = kto_sequence_logps(policy, batch)
        if reference is None:
            ref, kl_ref = batch["ref_logps"], batch["ref_kl_logps"]
        else:
            ref, kl_ref = (jax.lax.stop_gradient(x) for x in kto_sequence_logps(reference, batch))
        z0 = losses.kto_reference_kl(kl_pol, kl_ref)
        label = batch["label"].astype(jnp.float32)
        per = losses.kto_loss(pol, ref, label, reference_kl=z0, beta=self.beta,
                              desirable_weight=self.desirable_weight,
                              undesirable_weight=self.undesirable_weight,
                              loss_type=self.loss_type[0])
        loss = jnp.mean(per)
        rewards = self.beta * jax.lax.stop_gradient(pol - ref)
        metrics = {
            "kto/loss": loss,
            "kto/kl": z0,
            "kto/rewards_chosen": _wmean(rewards, label),
            "kto/rewards_rejected": _wmean(rewards, 1.0 - label),
            "kto/reward_margin": _wmean(rewards, label) - _wmean(rewards, 1.0 - label),
            "kto/logps_chosen": _wmean(pol, label),
            "kto/logps_rejected": _wmean(pol, 1.0 - label),
        }
        return loss, metrics


PreferenceHyperParams = (DPOHyperParams | SimPOHyperParams | ORPOHyperParams | CPOHyperParams
                         | CPLHyperParams | KTOHyperParams)
"""The hyper-parameters of one preference objective; its type selects the family."""

FAMILIES: dict[str, type] = {hp.algorithm: hp for hp in (
    DPOHyperParams, SimPOHyperParams, ORPOHyperParams, CPOHyperParams, CPLHyperParams,
    KTOHyperParams)}
"""``DPOConfig.algorithm`` -> its hyper-parameter class."""


def preference_hyperparams(config: DPOConfig) -> PreferenceHyperParams:
    """The hyper-parameters of ``config.algorithm``, read from the config's fields of the same
    names and validated (errors name ``loss_type`` / ``loss_weights`` and the allowed values)."""
    if config.algorithm not in FAMILIES:
        raise ValueError(f"algorithm={config.algorithm!r}; allowed: {ALGORITHMS}")
    hp = FAMILIES[config.algorithm].from_config(config)
    hp.validate()
    if config.loss_weights and "loss_weights" not in hp._fields and "loss_type" in hp._fields \
            and len(config.loss_weights) != len(hp.loss_type):
        raise ValueError(f"loss_weights={tuple(config.loss_weights)} must have one weight per "
                         f"loss_type {tuple(hp.loss_type)}")
    return hp


def preference_loss(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None = None,
    *,
    hp: PreferenceHyperParams | None = None,
    reference: str = "model",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of a preference objective on a batch (module docstring).

    Args:
      model: the policy (`reference="precomputed"`, `"lora_base"` or reference-free
        families) or a `PolicyAndReference` (`reference="model"`).
      batch: a pairwise preference batch (padded, packed or prefix-shared; with
        `ref_chosen_logps` / `ref_rejected_logps` `[P]` when precomputed) or, for KTO, an
        unpaired batch with `kl_` keys and `label` (and `ref_logps` / `ref_kl_logps` when
        precomputed).
      rng: unused.
      hp: the family and its hyper-parameters (`DPOHyperParams`, `SimPOHyperParams`,
        `ORPOHyperParams`, `CPOHyperParams`, `CPLHyperParams`, `KTOHyperParams`; default:
        `DPOHyperParams()`).
      reference: where the reference log-probs of DPO / KTO come from: `"model"` (the
        `PolicyAndReference`'s frozen half), `"precomputed"` (the batch), `"lora_base"` (the
        policy with its adapters zeroed); ignored by reference-free families.

    Returns:
      `(loss, metrics)`.
    """
    hp = DPOHyperParams() if hp is None else hp
    hp.validate()
    policy = model.policy if isinstance(model, PolicyAndReference) else model
    ref_model = None
    if hp.uses_reference:
        if reference == "model":
            if not isinstance(model, PolicyAndReference):
                raise TypeError("reference='model' needs a PolicyAndReference model")
            ref_model = model.reference
        elif reference == "lora_base":
            ref_model = base_model_of(policy)
        elif reference != "precomputed":
            raise ValueError(f"reference={reference!r} for algorithm={hp.algorithm!r}; allowed: "
                             "'model', 'precomputed', 'lora_base'")
    return hp.loss(policy, ref_model, batch)


class PreferenceLoss(NamedTuple):
    """A preference objective as a loss function for `make_train_step`, hashable by value (so
    `rlhf_jax.train.builders.train_step_fn` reuses the compiled step of an equal one).

    ``loss(model, batch, rng)`` is `preference_loss` with ``hp`` and ``reference``;
    ``loss(model, batch, rng, hparams)`` first replaces the fields named in ``hparams`` (traced
    values, see `split_traced`).

    Attributes:
      hp: the family's hyper-parameters (`PreferenceHyperParams`).
      reference: as `preference_loss`'s ``reference``.
    """

    hp: Any
    reference: str = "model"

    def __call__(self, model, batch, rng=None, hparams=None):
        hp = self.hp if hparams is None else self.hp._replace(**hparams)
        return preference_loss(model, batch, rng, hp=hp, reference=self.reference)

    def split_traced(self) -> tuple[PreferenceLoss, dict[str, float]]:
        """``(loss, hparams)``: the family's numeric hyper-parameters that only scale or shift
        the objective (its ``traced`` fields: β, label smoothing, SimPO's γ, KTO's weights, ...)
        taken out as ``hparams`` (traced arguments of the jitted step, `setup_training`), the
        rest left in ``loss`` with those fields set to None. A field whose value is 0 stays a
        constant (the losses skip a term known to be zero at trace time). Runs that differ only
        in the traced values get equal losses and so share one compiled step; ``loss(model,
        batch, rng, hparams)`` computes what ``self(model, batch, rng)`` does, to float
        rounding."""
        values = {name: float(getattr(self.hp, name)) for name in self.hp.traced
                  if getattr(self.hp, name) != 0}
        static = self.hp._replace(**{name: None for name in values})
        return self._replace(hp=static), values


def make_preference_loss(config: DPOConfig, *, reference: str) -> PreferenceLoss:
    """`loss_fn(model, batch, rng)` for `make_train_step` from a `DPOConfig` (a
    `PreferenceLoss`; its `split_traced` gives the sweep-friendly form `run_dpo` trains
    with)."""
    return PreferenceLoss(preference_hyperparams(config), reference)


# ---------------------------------------------------------------------------------------------
# precomputed reference log-probs
# ---------------------------------------------------------------------------------------------


def precompute_reference_logps(
    ref_model: nnx.Module,
    loader: Any,
    *,
    num_batches: int,
    mesh: jax.sharding.Mesh,
    kto: bool = False,
) -> dict[str, np.ndarray]:
    """Reference sequence log-probs of the next `num_batches` batches of `loader`.

    `loader` is consumed (pass a copy positioned where training starts). Returns
    `{"ref_chosen_logps", "ref_rejected_logps"}` (or KTO's `{"ref_logps", "ref_kl_logps"}`),
    each `[num_batches, P]` float32, row `i` belonging to the `i`-th batch.
    """
    graphdef, state = nnx.split(ref_model)
    state, state_sharding = shard_train_state(state, mesh)

    def fn(st, batch):
        model = nnx.merge(graphdef, st)
        if kto:
            return kto_sequence_logps(model, batch)
        return reference_pair_logps(model, batch)

    jitted = jax.jit(losses.unchecked(fn), in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                     out_shardings=sharding.batch_sharding(mesh))
    names = ("ref_logps", "ref_kl_logps") if kto else ("ref_chosen_logps", "ref_rejected_logps")
    out: dict[str, list] = {n: [] for n in names}
    for _ in range(num_batches):
        try:
            batch = next(loader)
        except StopIteration:
            break
        # this process's rows: its table covers its own share of each batch
        values = sharding.host_rows(jitted(state, sharding.shard_batch(batch, mesh)), mesh)
        for n, v in zip(names, values):
            out[n].append(np.asarray(v, np.float32))
    return {n: np.stack(v) for n, v in out.items()}


class WithReferenceLogps:
    """Wraps a training loader: batch `i` of the run gets row `i` of the precomputed table.

    `get_state`/`set_state` cover the loader and the row counter, so resume stays exact.
    """

    def __init__(self, loader: Any, table: Mapping[str, np.ndarray], *, start: int = 0):
        self.loader = loader
        self.table = dict(table)
        self.index = start
        self.rows = min(len(v) for v in self.table.values())

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.rows:
            raise StopIteration
        batch = dict(next(self.loader))
        for name, values in self.table.items():
            batch[name] = values[self.index]
        self.index += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"loader": self.loader.get_state(), "index": self.index}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.loader.set_state(state["loader"])
        self.index = int(state["index"])


FINGERPRINT_KEY = "fingerprint"
"""Entry of `REFERENCE_FILE` holding the `reference_fingerprint` the tables were computed for."""

FINGERPRINT_FIELDS = ("seed", "algorithm", "model", "ref_model", "data")
"""Config fields that decide the reference tables (with the reference weights themselves)."""


def reference_fingerprint(config: DPOConfig, ref_model: nnx.Module) -> str:
    """SHA-256 (hex) of the reference weights, the data and tokenisation config and the seed.

    Hashes `FINGERPRINT_FIELDS` of the resolved config (data source, tokenizer, lengths,
    truncation policy, order) and every parameter of `ref_model` (bytes, shape, dtype); a
    parameter not addressable from this process (multi-host) contributes its shape and dtype.
    """
    resolved = config_to_dict(config)
    fields = {k: resolved.get(k) for k in FINGERPRINT_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    for leaf in jax.tree.leaves(nnx.state(ref_model, nnx.Param)):
        digest.update(f"{leaf.shape}{leaf.dtype}".encode())
        if getattr(leaf, "is_fully_addressable", True):
            digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()


class ReferenceLogps(NamedTuple):
    """The precomputed reference log-probs of a run (module docstring).

    Attributes:
      train: `{"ref_chosen_logps", "ref_rejected_logps"}` (KTO: `{"ref_logps",
        "ref_kl_logps"}`), each `[S, P]` float32: row `i` for the `i`-th training batch.
      eval: the same for one pass over the held-out batches, or None without them.
      fingerprint: the `reference_fingerprint` of the config and reference they were computed
        for; a run whose fingerprint differs refuses them.
    """

    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray] | None
    fingerprint: str

    def covers(self, num_steps: int, *, held_out: bool) -> bool:
        """True when the table has a row for each of `num_steps` batches (and held-out rows
        when `held_out`)."""
        rows = min((len(v) for v in self.train.values()), default=0)
        return bool(self.train) and rows >= num_steps and (self.eval is not None or not held_out)


def compute_reference_logps(config: DPOConfig, ref_model: nnx.Module, data: Any, mesh
                            ) -> ReferenceLogps:
    """The reference log-probs of the `config.num_steps` batches the run draws from the start
    of `data.train` and of one pass of `data.eval_batches()` (in memory; nothing stored)."""
    kto = config.algorithm == "kto"
    train = precompute_reference_logps(ref_model, copy.copy(data.train),
                                       num_batches=config.num_steps, mesh=mesh, kto=kto)
    evals = None
    if data.eval_batches is not None:
        evals = precompute_reference_logps(ref_model, data.eval_batches(),
                                           num_batches=1 << 30, mesh=mesh, kto=kto)
    return ReferenceLogps(train, evals, reference_fingerprint(config, ref_model))


def reference_tables(config: DPOConfig, ref_model: nnx.Module, data: Any, mesh
                     ) -> ReferenceLogps:
    """The run's precomputed reference log-probs (`compute_reference_logps`), stored in
    `output_dir/reference_logps.npz` with their `reference_fingerprint` and read back from it
    when the file covers the run and its fingerprint matches (otherwise recomputed, with a
    warning)."""
    path = epath.Path(config.output_dir, REFERENCE_FILE)
    if jax.process_count() > 1:  # each process's table covers its own share of the batches
        path = path.with_name(path.name.removesuffix(".npz")
                              + f".{jax.process_index()}-of-{jax.process_count()}.npz")
    fingerprint = reference_fingerprint(config, ref_model)
    if path.exists():
        with np.load(io.BytesIO(path.read_bytes())) as f:
            stored = {k: f[k] for k in f.files}
        if str(stored.pop(FINGERPRINT_KEY, "")) != fingerprint:
            _log.warning("%s was computed for other reference weights, data or tokenisation; "
                         "recomputing it", path)
            stored = {}
        table = ReferenceLogps(
            {k[6:]: v for k, v in stored.items() if k.startswith("train_")},
            {k[5:]: v for k, v in stored.items() if k.startswith("eval_")} or None,
            fingerprint)
        if table.covers(config.num_steps, held_out=data.eval_batches is not None):
            return table
    table = compute_reference_logps(config, ref_model, data, mesh)
    arrays = {f"train_{k}": v for k, v in table.train.items()}
    arrays.update({f"eval_{k}": v for k, v in (table.eval or {}).items()})
    arrays[FINGERPRINT_KEY] = np.asarray(fingerprint)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    ensure_dir(config.output_dir)
    path.write_bytes(buffer.getvalue())
    return table


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------


def train_dpo(config: DPOConfig) -> dict[str, Any]:
    """Trains with the configured preference objective; returns the run summary."""
    return run_dpo(config).summary


def _inputs(config: DPOConfig, model: nnx.Module | None, records, eval_records):
    """`(hyper-parameters, data, policy, reference model or None)` of a run: the data bundle,
    the initial policy (`model`'s arrays copied, or built) and, when the objective uses a
    reference that is not the LoRA base, the reference model (a copy of the initial policy
    unless `config.ref_model`)."""
    hp = preference_hyperparams(config)
    check_run_config(config)
    kto = hp.algorithm == "kto"
    tokenizer = load_tokenizer_for(config.data, config.model)
    data = build_data(config.data, format="kto" if kto else "preference", tokenizer=tokenizer,
                      seed=config.seed, kl_pairs=kto, records=records, eval_records=eval_records)
    given = model is not None
    policy = own_arrays(model) if given else build_model(config.model, seed=config.seed)
    check_vocab(policy, tokenizer)
    lora = config.model.lora_rank > 0
    if not hp.uses_reference or (lora and config.ref_model is None):
        return hp, data, policy, None
    ref_spec = config.ref_model or dataclasses.replace(config.model, lora_rank=0)
    if given and config.ref_model is None:
        ref = nnx.clone(policy)
    else:
        ref = build_model(ref_spec, seed=config.seed)
    if config.ref_model is None and not lora:
        # The initial policy's weights, as separate buffers (the state is donated).
        nnx.update(ref, jax.tree.map(jnp.copy, nnx.state(policy)))
    return hp, data, policy, ref


def dpo_reference_logps(
    config: DPOConfig,
    *,
    model: nnx.Module | None = None,
    records: Sequence[Mapping[str, Any]] | TokenizedRecords | None = None,
    eval_records: Sequence[Mapping[str, Any]] | TokenizedRecords | None = None,
) -> ReferenceLogps:
    """The reference log-probs a `reference="precomputed"` run of `config` trains on, computed
    in memory (nothing is written), for `run_dpo(..., reference_logps=...)`.

    The arguments are those of `run_dpo` (`model` is not changed). Every run whose
    `reference_fingerprint` is the same (the same seed, algorithm, model and reference specs,
    data and reference weights; β, label smoothing and the optimizer may differ) and whose
    `num_steps` is at most this config's can train on the result: a sweep runs the reference
    once instead of once per run.
    """
    if config.reference != "precomputed":
        raise ValueError(f"dpo_reference_logps: config.reference={config.reference!r}; the "
                         "tables are for reference='precomputed' runs")
    _, data, _, ref = _inputs(config, None if model is None else nnx.clone(model), records,
                              eval_records)
    if ref is None:
        raise ValueError(f"dpo_reference_logps: algorithm={config.algorithm!r} with "
                         f"model.lora_rank={config.model.lora_rank} uses no reference table "
                         "(reference-free objective, or the LoRA base as the reference)")
    return compute_reference_logps(config, ref, data, sharding.make_mesh(config.mesh))


def run_dpo(
    config: DPOConfig,
    *,
    model: nnx.Module | None = None,
    records: Sequence[Mapping[str, Any]] | TokenizedRecords | None = None,
    eval_records: Sequence[Mapping[str, Any]] | TokenizedRecords | None = None,
    eval_fn: ModelEvalFn | None = None,
    reference_logps: ReferenceLogps | None = None,
) -> TrainedRun:
    """`train_dpo` on in-memory inputs; returns the summary and the trained policy.

    Args:
      config: the run config (its `model` spec is what `config.yaml` records; with `model`
        given it should describe that model's architecture).
      model: the initial policy, a causal LM (default: `build_model(config.model)`); without
        `config.ref_model` the reference is a copy of it taken now. It is split into the train
        state (its arrays copied first: it may share them with another model).
      records: preference (or KTO) records instead of `config.data.path` /
        `config.data.synthetic` (`rlhf_jax.train.data.build_data`), or the same records
        tokenized once for several runs (`rlhf_jax.train.tokenize_records` with this run's
        data spec and tokenizer: a sweep tokenizes them once).
      eval_records: held-out records, or `TokenizedRecords` (with `records`).
      eval_fn: an evaluation callback (`rlhf_jax.train.run.ModelEvalFn`) on the policy, run
        every `config.eval_every` steps and at the end.
      reference_logps: with `config.reference="precomputed"`, the reference log-probs to train
        on (`dpo_reference_logps`, e.g. shared by the runs of a sweep) instead of computing
        them (and instead of `output_dir/reference_logps.npz`); they must have been computed
        for this run's `reference_fingerprint` and cover its `num_steps` batches.
    """
    if reference_logps is not None and config.reference != "precomputed":
        raise ValueError(f"run_dpo: reference_logps given with config.reference="
                         f"{config.reference!r}; set reference='precomputed'")
    hp, data, policy, ref = _inputs(config, model, records, eval_records)
    model, trainable, reference = policy, None, "none"
    if hp.uses_reference and ref is None:
        reference = "lora_base"
    elif ref is not None and config.reference == "precomputed":
        reference = "precomputed"
        held_out = data.eval_batches is not None
        if reference_logps is None:
            table = reference_tables(config, ref, data, sharding.make_mesh(config.mesh))
        elif reference_logps.fingerprint != reference_fingerprint(config, ref):
            raise ValueError("run_dpo: reference_logps were computed for another reference "
                             "(weights, data, tokenisation, seed or model spec: "
                             f"{', '.join(FINGERPRINT_FIELDS)})")
        elif not reference_logps.covers(config.num_steps, held_out=held_out):
            raise ValueError(f"run_dpo: reference_logps cover fewer than num_steps="
                             f"{config.num_steps} batches"
                             + (" or no held-out batches" if held_out else ""))
        else:
            table = reference_logps
        del ref  # training holds only the policy
        eval_batches = data.eval_batches
        if held_out:
            batches = data.eval_batches
            eval_batches = lambda: WithReferenceLogps(batches(), table.eval)
        data = data._replace(train=WithReferenceLogps(data.train, table.train),
                             eval_batches=eval_batches)
    elif ref is not None:
        reference = "model"
        model = PolicyAndReference(policy, ref)
        trainable = policy_only_filter(model)
    # β and the other scale-only hyper-parameters are traced arguments of the step: a sweep
    # over them compiles the step once.
    loss_fn, hparams = make_preference_loss(config, reference=reference).split_traced()
    trained_policy = (lambda m: m.policy) if reference == "model" else None
    result, setup = run_training(config, model, loss_fn, data, trainable=trainable,
                                 eval_fn=eval_fn, eval_model=trained_policy, hparams=hparams)
    trained = trained_model(setup, result.state)
    return TrainedRun(run_summary(result, config, data, reference=reference),
                      trained.policy if reference == "model" else trained)


__all__ = [
    "ALGORITHMS",
    "CPLHyperParams",
    "CPOHyperParams",
    "DPOConfig",
    "DPOHyperParams",
    "FAMILIES",
    "KTOHyperParams",
    "ORPOHyperParams",
    "PairLogps",
    "PolicyAndReference",
    "PreferenceHyperParams",
    "PreferenceLoss",
    "REFERENCES",
    "ReferenceLogps",
    "SimPOHyperParams",
    "WithReferenceLogps",
    "base_model_of",
    "compute_reference_logps",
    "dpo_reference_logps",
    "kto_sequence_logps",
    "make_preference_loss",
    "policy_only_filter",
    "policy_pair_logps",
    "precompute_reference_logps",
    "reference_fingerprint",
    "preference_hyperparams",
    "preference_loss",
    "reference_pair_logps",
    "reference_tables",
    "run_dpo",
    "train_dpo",
]
