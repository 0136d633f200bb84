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
- `logging`: `MetricsLogger` (metrics.jsonl, TensorBoard, optional W&B, progress bar).
- `common`: optimizer/schedule from config, model and mesh building, aligned token log-probs.

Trainers: `sft` (`SFTConfig`, `train_sft`), `rm` (`RMConfig`, `train_rm`), `dpo` (DPO family,
SimPO/ORPO/CPO, KTO: `DPOConfig`, `train_dpo`), `export` (`ExportConfig`, `export_policy`),
re-exported here; the online trainers `ppo`, `grpo` (GRPO, RLOO) and `rejection_sampling` are
imported from their modules. Each trainer exposes `<Algo>Config` and
`train_<algo>(config) -> summary dict`, plus the lower-level pieces (loss function builders,
`setup_training`, `fit`) that experiments call directly without the CLI.
"""

from rlhf_jax.train.checkpoint import Checkpointer, Restored, abstract_like
from rlhf_jax.train.common import (
    TrainSetup,
    aligned_token_logps,
    build_data,
    build_model,
    make_evaluator,
    make_optimizer,
    make_schedule,
    model_inputs,
    model_token_logps,
    run_training,
    setup_training,
)
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
from rlhf_jax.train.dpo import DPOConfig, preference_loss, train_dpo
from rlhf_jax.train.export import ExportConfig, export_policy
from rlhf_jax.train.logging import MetricsLogger, read_metrics
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
from rlhf_jax.train.rm import RMConfig, rm_loss, train_rm
from rlhf_jax.train.sft import SFTConfig, sft_loss, train_sft
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
    "ExportConfig",
    "RMConfig",
    "SFTConfig",
    "TrainSetup",
    "build_data",
    "build_model",
    "export_policy",
    "make_evaluator",
    "preference_loss",
    "rm_loss",
    "run_training",
    "setup_training",
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
    "TrainConfig",
    "TrainState",
    "abstract_like",
    "aligned_token_logps",
    "config_from_dict",
    "config_from_yaml",
    "config_to_dict",
    "create_train_state",
    "fit",
    "jit_train_step",
    "load_config",
    "loss_and_grad",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "merge_model",
    "model_inputs",
    "model_token_logps",
    "prepare_output_dir",
    "read_metrics",
    "restore_latest",
    "save_config",
    "split_model",
    "train_loop",
]
