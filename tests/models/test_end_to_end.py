"""The user path: load a local HF checkpoint, shard it, attach LoRA, train a step, save as HF."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlhf_jax.models import (
    LoRAParam,
    apply_lora,
    from_pretrained,
    lora_disabled,
    save_pretrained,
    trainable_fraction,
)
from rlhf_jax.sharding import (
    MeshConfig,
    batch_sharding,
    make_mesh,
    shard_batch,
    shard_model,
    state_shardings,
)

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def test_load_shard_lora_train_save(tmp_path):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = from_pretrained(FIXTURES / "llama", mesh=mesh)
    apply_lora(model, rank=4, alpha=8, targets="all", rngs=nnx.Rngs(0))
    shard_model(model, mesh)
    assert 0 < trainable_fraction(model) < 0.2

    ref = np.load(FIXTURES / "llama" / "reference.npz")
    ids = np.concatenate([ref["input_ids"], ref["input_ids"][:1]])  # 4 rows over 4 shards
    mask = np.concatenate([ref["attention_mask"], ref["attention_mask"][:1]])
    batch = shard_batch({"ids": ids, "mask": mask}, mesh)

    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    tx = optax.adam(1e-2)
    opt_state = tx.init(lora)

    @jax.jit
    def step(lora, opt_state, frozen, ids, mask):
        def loss_fn(lora):
            logits = nnx.merge(graphdef, lora, frozen)(ids, mask)
            logps = jax.nn.log_softmax(logits[:, :-1])
            nll = -jnp.take_along_axis(logps, ids[:, 1:, None], -1)[..., 0]
            return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    losses = []
    for _ in range(3):
        lora, opt_state, loss = step(lora, opt_state, frozen, batch["ids"], batch["mask"])
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    # Parameters keep their mesh placement through the step.
    q_a = lora["backbone"]["layers"]["attn"]["q"]["lora_a"]
    expected = state_shardings(lora, mesh)["backbone"]["layers"]["attn"]["q"]["lora_a"]
    assert q_a[...].sharding.is_equivalent_to(expected.get_value(), 4)
    assert batch["ids"].sharding == batch_sharding(mesh, 2)

    # The reference (base) model is the same state with the adapters zeroed.
    forward = nnx.jit(lambda m, ids, mask: m(ids, mask))
    base_logits = forward(nnx.merge(graphdef, lora_disabled(lora), frozen), batch["ids"],
                          batch["mask"])
    real = mask[:3, :, None] > 0
    np.testing.assert_allclose(np.where(real, base_logits[:3], 0),
                               np.where(real, ref["logits"], 0), atol=1e-4)

    trained = nnx.merge(graphdef, lora, frozen)
    out = save_pretrained(trained, tmp_path / "export")
    reloaded = from_pretrained(out)
    np.testing.assert_allclose(forward(reloaded, ids, mask),
                               forward(trained, batch["ids"], batch["mask"]), atol=1e-5)
