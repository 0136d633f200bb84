"""Configuration of the CPU demo (`python -m experiments.demo`): one frozen dataclass, two presets.

`DemoConfig.default()` finishes well inside 15 minutes on 2 CPU cores (about 2.5 minutes when
they are idle); `DemoConfig.quick()` runs the same pipeline at toy size in a minute or two (for CI). Every field can be overridden on
the command line (`--set rm_pairs=64,256 ppo_iterations=40`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo pipeline.

    Model: a small Llama-style decoder over the synthetic task's character tokenizer.
    Stages: SFT on the task's noisy demonstrations -> preference pairs sampled from the SFT policy
    and labelled by simulated raters -> reward models on the first `n` pairs for each `n` in
    `rm_pairs` (the largest is the proxy for RL) -> PPO for each `ppo_kl_coefs`, DPO for each
    `dpo_betas`, best-of-n for each `bon_ns` -> one long PPO run at `overopt_kl_coef`.
    """

    preset: str = "default"
    seed: int = 0
    task: str = "topic"
    # Model (policy, reward and value models share the architecture).
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_new_tokens: int = 24
    # Supervised fine-tuning of the base policy.
    sft_examples: int = 4096
    sft_steps: int = 400
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    # Simulated raters (one rater per pair, drawn from the pool).
    num_raters: int = 8
    rater_temperature: float = 0.1
    rater_temperature_spread: float = 0.3
    rater_lapse_rate: float = 0.05
    # Reward models.
    rm_pairs: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    rm_val_pairs: int = 1024
    rm_epochs: int = 2
    rm_min_steps: int = 40
    rm_batch_size: int = 32
    rm_learning_rate: float = 1e-3
    # Evaluation of a policy: KL to the reference, gold reward and proxy score on fresh samples.
    eval_prompts: int = 256
    # PPO.
    ppo_kl_coefs: tuple[float, ...] = (0.3, 0.1, 0.03)
    ppo_iterations: int = 60
    ppo_rollout_batch: int = 64
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    ppo_learning_rate: float = 5e-4
    ppo_evals_per_run: int = 3
    # DPO (on the largest preference set).
    dpo_betas: tuple[float, ...] = (0.5, 0.1, 0.03)
    dpo_steps: int = 150
    dpo_batch_size: int = 32
    dpo_learning_rate: float = 3e-4
    dpo_evals_per_run: int = 3
    # Best-of-n against the proxy reward model.
    bon_ns: tuple[int, ...] = (1, 2, 4, 8, 16)
    bon_prompts: int = 128
    bon_pool: int = 32
    # Over-optimisation: one long PPO run with a small KL penalty.
    overopt_kl_coef: float = 0.002
    overopt_iterations: int = 150
    overopt_evals: int = 14

    def __post_init__(self):
        non_positive = [
            f.name for f in dataclasses.fields(self)
            if f.type in ("int", "float") and f.name not in ("seed", "overopt_kl_coef")
            and not getattr(self, f.name) > 0
        ]
        if self.seed < 0 or self.overopt_kl_coef < 0:
            non_positive += [n for n in ("seed", "overopt_kl_coef") if getattr(self, n) < 0]
        if non_positive:
            raise ValueError(
                "DemoConfig fields must be positive (seed and overopt_kl_coef >= 0): "
                + ", ".join(f"{n}={getattr(self, n)!r}" for n in non_positive)
            )
        for name in ("rm_pairs", "ppo_kl_coefs", "dpo_betas", "bon_ns"):
            values = getattr(self, name)
            if not values or any(not v > 0 for v in values):
                raise ValueError(f"DemoConfig.{name} must be non-empty and positive, got {values}")
        if len(self.rm_pairs) < 2 or list(self.rm_pairs) != sorted(set(self.rm_pairs)):
            raise ValueError(
                f"DemoConfig.rm_pairs must hold at least 2 increasing sizes, got {self.rm_pairs}"
            )
        if max(self.bon_ns) > self.bon_pool:
            raise ValueError(
                f"DemoConfig.bon_pool={self.bon_pool} must be >= max(bon_ns)={max(self.bon_ns)}"
            )
        if self.bon_prompts > self.eval_prompts:
            raise ValueError(
                f"DemoConfig.bon_prompts={self.bon_prompts} must be <= "
                f"eval_prompts={self.eval_prompts} (best-of-n uses the evaluation prompts)"
            )
        if self.ppo_rollout_batch % self.ppo_minibatches:
            raise ValueError(
                f"DemoConfig.ppo_minibatches={self.ppo_minibatches} must divide "
                f"ppo_rollout_batch={self.ppo_rollout_batch}"
            )
        if self.overopt_evals < 3:
            raise ValueError(f"DemoConfig.overopt_evals must be >= 3, got {self.overopt_evals}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DemoConfig.hidden_size={self.hidden_size} must be divisible by "
                f"num_heads={self.num_heads}"
            )

    @classmethod
    def default(cls, **overrides: Any) -> DemoConfig:
        """Well inside 15 minutes on 2 CPU cores (about 2.5 minutes when they are idle)."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """The same pipeline at toy size: a minute or two on 2 CPU cores (CI)."""
        base = dict(
            preset="quick",
            sft_examples=1024,
            sft_steps=150,
            sft_batch_size=32,
            rm_pairs=(32, 256),
            rm_val_pairs=256,
            rm_epochs=1,
            rm_min_steps=20,
            eval_prompts=64,
            ppo_kl_coefs=(0.1, 0.01),
            ppo_iterations=8,
            ppo_rollout_batch=32,
            ppo_epochs=1,
            ppo_evals_per_run=1,
            dpo_betas=(0.3, 0.05),
            dpo_steps=20,
            dpo_evals_per_run=1,
            bon_ns=(1, 4, 8),
            bon_prompts=32,
            bon_pool=16,
            overopt_iterations=12,
            overopt_evals=3,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        return ("default", "quick")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DemoConfig:
        if name not in cls.preset_names():
            raise ValueError(f"unknown preset {name!r}; choose one of {cls.preset_names()}")
        return getattr(cls, name)(**overrides)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in
                dataclasses.asdict(self).items()}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["rm_pairs=64,256", "seed=3"]` -> `{"rm_pairs": (64, 256), "seed": 3}`, typed by field."""
    hints = typing.get_type_hints(DemoConfig)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must read FIELD=VALUE")
        key, value = item.split("=", 1)
        if key not in hints:
            raise ValueError(
                f"override {item!r}: DemoConfig has no field {key!r}; fields: {sorted(hints)}"
            )
        tp = hints[key]
        try:
            if typing.get_origin(tp) is tuple:
                (elem, _) = typing.get_args(tp)
                out[key] = tuple(elem(v) for v in value.split(",") if v)
            else:
                out[key] = tp(value)
        except ValueError as e:
            raise ValueError(f"override {item!r}: cannot read {value!r} as {tp}: {e}") from None
    return out


def config_from_mapping(data: Mapping[str, Any]) -> DemoConfig:
    """A `DemoConfig` from a dict (e.g. the `config` of a saved results.json)."""
    hints = typing.get_type_hints(DemoConfig)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"unknown DemoConfig fields {unknown}")
    return DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
