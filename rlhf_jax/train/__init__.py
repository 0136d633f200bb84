"""Training runs: the shared machinery and one trainer per algorithm.

Machinery (imported eagerly):

- `config`: `TrainConfig` and its pieces (`ModelSpec`, `DataSpec`, `OptimizerConfig`,
  `MeshConfig`, `CheckpointConfig`, `LoggingConfig`), YAML + tyro parsing (`load_config`).
- `state`: `TrainState` (params / frozen model state from `nnx.split`, optax state, step, RNG),
  `create_train_state`, `make_train_step` (gradient accumulation, NaN/inf skip, metrics).
- `loop`: `jit_train_step` (shardings, donation), `train_loop`, `fit` (config.yaml, resume,
  SIGTERM save, logging and checkpoint cadence), `NonFiniteError`.
- `checkpoint`: `Checkpointer` over orbax (state, data-loader state, config; restore onto any
  mesh).
- `logging`: `MetricsLogger` (metrics.jsonl, TensorBoard, optional W&B, progress bar),
  `SampleTable`.
- `optimizer`: the optimizer and learning-rate schedule of an `OptimizerConfig`, and
  `freeze_bottom_layers` (`ModelSpec.freeze_layers`).
- `builders`: the model and tokenizer a `ModelSpec` / `DataSpec` names, the trainable
  variables, and `setup_training` (mesh, optimizer, sharded state, jitted step).
- `data`: `build_data`, a run's training loader and held-out batches from its `DataSpec`.
- `run`: `run_training` (set-up, held-out evaluator, `fit`), `make_evaluator`, `run_summary`.
- `logprobs`: per-token log-probs from a model, aligned to the token they score (offline
  trainers) or to a rollout's response (online trainers).
- `pairs`: the one-forward layouts of preference pairs (padded, packed, prefix-shared).

Online machinery (imported by the online trainers):

- `rollout`: the `Rollout` layout, `RolloutConfig` (sampling parameters), sampling,
  minibatches.
- `rewards`: the reward source of a run from its `RewardSpec`, through a registry of builders
  (the sources and their interface are `rlhf_jax.generation`'s).
- `value`: PPO's value model or shared value head, and its diagnostics.
- `online_eval`: `evaluate_held_out`, an online policy on held-out prompts (`--eval-every`).
- `online`: `OnlineTrainer` (the one set-up sequence, sampling, scoring, the run through
  `fit`, held-out evaluation), the frozen `Reference`, mesh plumbing, the CLI path
  `train_online`.

Trainers: `sft` (`SFTConfig`, `train_sft`), `rm` (`RMConfig`, `train_rm`), `dpo` (DPO family,
SimPO/ORPO/CPO/CPL, KTO: `DPOConfig`, `train_dpo`), `export` (`ExportConfig`, `export_policy`),
re-exported here; the online trainers `ppo`, `grpo` (GRPO, RLOO), `rejection_sampling`, `rest`
(ReST) and `hir` (`HirConfig`, `train_hir`) are imported from their modules. Each trainer exposes
`<Algo>Config` and `train_<algo>(config) -> summary dict`; the offline trainers also
`run_<algo>(config, model=, records=, eval_records=, eval_fn=) -> TrainedRun` (an initial model
held in memory, Python records instead of files, an evaluation callback on the model, the trained
model returned), and the online trainers their in-memory `<Algo>Trainer` classes. The lower-level
pieces (loss function builders, `setup_training`, `fit`) are there for experiments that need more.
"""

from rlhf_jax.train.builders import TrainSetup, build_model, setup_training
from rlhf_jax.train.checkpoint import Checkpointer, Restored, abstract_like
from rlhf_jax.train.config import (
    CheckpointConfig,
    ConfigError,
    DataSpec,
    LoggingConfig,
    MeshConfig,
    ModelSpec,
    OptimizerConfig,
    TrainConfig,
    config_from_dict,
    config_from_yaml,
    config_to_dict,
    load_config,
    save_config,
)
from rlhf_jax.train.data import TokenizedRecords, build_data, tokenize_records
from rlhf_jax.train.dpo import (
    DPOConfig,
    DPOHyperParams,
    dpo_reference_logps,
    preference_loss,
    run_dpo,
    train_dpo,
)
from rlhf_jax.train.export import ExportConfig, export_policy
from rlhf_jax.train.logging import MetricsLogger, SampleTable, read_metrics
from rlhf_jax.train.logprobs import (
    aligned_token_logps,
    model_inputs,
    model_scores,
    model_token_logps,
)
from rlhf_jax.train.loop import (
    LoopResult,
    NonFiniteError,
    PreemptionGuard,
    fit,
    jit_train_step,
    prepare_output_dir,
    restore_latest,
    train_loop,
)
from rlhf_jax.train.optimizer import freeze_bottom_layers, make_optimizer, make_schedule
from rlhf_jax.train.rm import RMConfig, RMHyperParams, rm_loss, run_rm, train_rm
from rlhf_jax.train.run import ModelEvalFn, TrainedRun, make_evaluator, run_training
from rlhf_jax.train.sft import SFTConfig, run_sft, sft_loss, train_sft
from rlhf_jax.train.state import (
    TrainState,
    create_train_state,
    loss_and_grad,
    make_train_step,
    merge_model,
    split_model,
)

__all__ = [
    "DPOConfig",
    "DPOHyperParams",
    "ExportConfig",
    "RMConfig",
    "ModelEvalFn",
    "RMHyperParams",
    "SFTConfig",
    "TrainedRun",
    "TrainSetup",
    "TokenizedRecords",
    "build_data",
    "build_model",
    "dpo_reference_logps",
    "export_policy",
    "make_evaluator",
    "preference_loss",
    "rm_loss",
    "run_dpo",
    "run_rm",
    "run_sft",
    "run_training",
    "setup_training",
    "tokenize_records",
    "sft_loss",
    "train_dpo",
    "train_rm",
    "train_sft",
    "CheckpointConfig",
    "Checkpointer",
    "ConfigError",
    "DataSpec",
    "LoggingConfig",
    "LoopResult",
    "MeshConfig",
    "MetricsLogger",
    "ModelSpec",
    "NonFiniteError",
    "OptimizerConfig",
    "PreemptionGuard",
    "Restored",
    "SampleTable",
    "TrainConfig",
    "TrainState",
    "abstract_like",
    "aligned_token_logps",
    "config_from_dict",
    "config_from_yaml",
    "config_to_dict",
    "create_train_state",
    "fit",
    "freeze_bottom_layers",
    "jit_train_step",
    "load_config",
    "loss_and_grad",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "merge_model",
    "model_inputs",
    "model_scores",
    "model_token_logps",
    "prepare_output_dir",
    "read_metrics",
    "restore_latest",
    "save_config",
    "split_model",
    "train_loop",
]
