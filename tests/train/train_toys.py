"""Shared helpers for the trainer tests: a toy regression model and a resumable toy loader."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ToyModel(nnx.Module):
    """y = x @ W + b, with a non-trainable scale variable (to exercise the frozen state)."""

    def __init__(self, *, din: int = 4, dout: int = 2, seed: int = 0):
        self.linear = nnx.Linear(din, dout, rngs=nnx.Rngs(seed))
        self.scale = nnx.Variable(jnp.ones((), jnp.float32))

    def __call__(self, x):
        return self.linear(x) * self.scale[...]


def toy_loss(model, batch, rng):
    """Mean squared error; the rng adds a tiny key-dependent term so the RNG stream matters."""
    pred = model(batch["x"])
    noise = 1e-3 * jnp.mean(jax.random.normal(rng, pred.shape) * pred)
    loss = jnp.mean((pred - batch["y"]) ** 2) + noise
    return loss, {"toy/loss": loss, "toy/pred_mean": jnp.mean(pred)}


class ToyLoader:
    """Deterministic infinite batches with get_state/set_state (like rlhf_jax.data loaders)."""

    def __init__(self, *, batch_size: int = 8, din: int = 4, dout: int = 2, seed: int = 0):
        self.batch_size, self.din, self.dout, self.seed = batch_size, din, dout, seed
        self.index = 0
        self.true_w = np.random.default_rng(1234).normal(size=(din, dout)).astype(np.float32)

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        x = rng.normal(size=(self.batch_size, self.din)).astype(np.float32)
        return {"x": x, "y": x @ self.true_w}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def write_easy_preferences(path, *, n: int, seed: int) -> None:
    """JSONL preference pairs of the synthetic topic task that a tiny model learns quickly:
    chosen is the task's reference answer, rejected a noisy base-distribution sample."""
    import json

    from rlhf_jax.data.synthetic import get_task

    task = get_task("topic")
    rng = np.random.default_rng(seed)
    prompts = task.sample_prompts(rng, n)
    rejected = task.sample_responses(rng, prompts)
    with open(path, "w") as f:
        for prompt, bad in zip(prompts, rejected):
            good = task.reference_response(prompt)
            f.write(json.dumps({"prompt": prompt, "chosen": good, "rejected": bad}) + "\n")


def write_easy_sft(path, *, n: int, seed: int) -> None:
    """JSONL prompt/completion records whose completion is the topic task's reference answer."""
    import json

    from rlhf_jax.data.synthetic import get_task

    task = get_task("topic")
    prompts = task.sample_prompts(np.random.default_rng(seed), n)
    with open(path, "w") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": prompt, "completion": task.reference_response(prompt)})
                    + "\n")
