"""Optimizer-state memory of frozen bottom layers and embeddings (`model.freeze_layers`,
`model.freeze_embeddings`), per model preset.

    python -m rlhf_jax.bench freezing [--models gpt2 qwen2-0.5b ...] [--fractions 0 0.25 0.5 0.75]
        [--step-model gpt2] [--seq 256] [--markdown FILE]

The optimizer state is built exactly as a run builds it (`rlhf_jax.train.optimizer.make_optimizer`
and the train state's trainable filter) under `jax.eval_shape`, so the byte counts are those of
the real state, with nothing allocated. The parameters are float32 and the optimizer is the
trainers' AdamW (two moments per trainable parameter). With ``--step-model`` the SFT step of
that preset is also compiled at each setting (batch 1, sequence ``--seq``) and XLA's buffer
assignment of the whole step (arguments, outputs and temporaries, minus donated aliases) is
reported: the device memory the step needs.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from rlhf_jax.bench._machine import machine_description
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.train.builders import EMBEDDINGS, count_trainable
from rlhf_jax.train.config import OptimizerConfig
from rlhf_jax.train.loop import jit_train_step
from rlhf_jax.train.optimizer import make_optimizer
from rlhf_jax.train.sft import sft_loss
from rlhf_jax.train.state import create_train_state, make_train_step

GIB = 1024**3


def _bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def state_shapes(config: ModelConfig, *, freeze_layers: int, freeze_embeddings: bool):
    """The abstract `TrainState` (shapes only) of a full fine-tune of `config` with freezing."""
    tx, _ = make_optimizer(OptimizerConfig(), 100, freeze_layers=freeze_layers)
    trainable = nnx.All(nnx.Param, nnx.Not(EMBEDDINGS)) if freeze_embeddings else nnx.Param

    def build():
        model = CausalLM(config, rngs=nnx.Rngs(0))
        return create_train_state(model, tx, seed=0, trainable=trainable)[1]

    return jax.eval_shape(build), tx


def step_bytes(config: ModelConfig, *, freeze_layers: int, freeze_embeddings: bool,
               seq: int) -> int:
    """XLA's buffer assignment of the compiled SFT step (batch 1, `seq` tokens)."""
    tx, _ = make_optimizer(OptimizerConfig(), 100, freeze_layers=freeze_layers)
    trainable = nnx.All(nnx.Param, nnx.Not(EMBEDDINGS)) if freeze_embeddings else nnx.Param
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, _, _ = nnx.split(model, trainable, ...)
    abstract, _ = state_shapes(config, freeze_layers=freeze_layers,
                               freeze_embeddings=freeze_embeddings)
    step = make_train_step(sft_loss, tx, graphdef=graphdef)
    batch = {k: jax.ShapeDtypeStruct((1, seq), jnp.int32)
             for k in ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")}
    compiled = jit_train_step(step, state_sharding=None, batch_sharding=None,
                              donate=True).lower(abstract, batch).compile()
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.bench freezing")
    parser.add_argument("--models", nargs="+",
                        default=["gpt2", "qwen2_0_5b", "llama_3_2_1b", "llama_3_1_8b"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0, 0.25, 0.5, 0.75])
    parser.add_argument("--step-model", default=None)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)

    lines = [f"Machine: {machine_description()}", "",
             "| model | frozen | trainable | optimizer state GiB | saved | step GiB |",
             "|---|---|---|---|---|---|"]
    for name in args.models:
        config = ModelConfig.preset(name).replace(remat="dots")
        layers = config.num_layers
        settings = [(round(f * layers), False) for f in args.fractions]
        settings.append((round(0.5 * layers), True))
        base = None
        for n, embeddings in settings:
            state, _ = state_shapes(config, freeze_layers=n, freeze_embeddings=embeddings)
            opt = _bytes(state.opt_state)
            base = opt if base is None else base
            count = count_trainable(state, freeze_layers=n)
            step = ""
            if args.step_model == name:
                size = step_bytes(config, freeze_layers=n, freeze_embeddings=embeddings,
                                  seq=args.seq)
                step = f"{size / GIB:.2f}"
            what = f"{n}/{layers} layers" + (" + embeddings" if embeddings else "")
            lines.append(f"| {name} | {what} | {count.fraction:.1%} | {opt / GIB:.3f} | "
                         f"{1 - opt / base:.1%} | {step} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.markdown:
        epath.Path(args.markdown).write_text(text)
    print(text)


__all__ = ["main", "state_shapes", "step_bytes"]


if __name__ == "__main__":
    main()
