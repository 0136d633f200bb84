"""The trainers score tokens through the fused LM head (`CausalLM.token_logps`, chunked per
`ModelConfig.logits_chunk_size`): SFT on packed rows, DPO on prefix-shared rows and the online
trainers' tempered response log-probs (with entropy) give the same losses, metrics and
gradients as the path through the full `[B, T, V]` logits (`logits_chunk_size=0`), and the
chunk size is reachable from a `ModelSpec`."""

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.data import TokenizedPreference, TokenizedSFT, collate_prefix_shared, pack_sft
from rlhf_jax.losses import masked_sum
from rlhf_jax.models import CausalLM, ModelConfig, positions_from_mask
from rlhf_jax.train.builders import model_config
from rlhf_jax.train.config import FieldError, ModelSpec
from rlhf_jax.train.dpo import DPOHyperParams, PolicyAndReference, preference_loss
from rlhf_jax.train.logprobs import (
    model_scores,
    model_token_logps,
    policy_response_logps,
    tempered_response_logps,
)
from rlhf_jax.train.rollout import Rollout
from rlhf_jax.train.sft import sft_loss
from rlhf_jax.train.value import PolicyWithValueHead, shared_forward


def _models(preset, seed=0):
    """The same weights with a fused head of 5-position chunks and with the unfused head."""
    fused = CausalLM(ModelConfig.preset(preset, logits_chunk_size=5), rngs=nnx.Rngs(seed))
    plain = CausalLM(ModelConfig.preset(preset, logits_chunk_size=0), rngs=nnx.Rngs(seed))
    return fused, plain


def _value_and_grad(model, loss_fn, batch):
    """`((loss, metrics), grads w.r.t. the nnx.Param)` of `loss_fn(model, batch)` under jit."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), batch)

    return jax.jit(jax.value_and_grad(f, has_aux=True))(params, batch)


def _assert_close(a, b, *, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _ids(rng, n, vocab=256):
    return rng.integers(3, vocab, size=n).astype(np.int32)


def test_sft_on_packed_rows_equals_the_full_logits_path():
    fused, plain = _models("tiny_gpt2")
    rng = np.random.default_rng(0)
    examples = []
    for n_prompt, n_response in ((3, 4), (2, 6), (4, 3), (2, 2)):
        ids = _ids(rng, n_prompt + n_response)
        loss_mask = np.concatenate([np.zeros(n_prompt), np.ones(n_response)]).astype(np.int32)
        examples.append(TokenizedSFT(ids, loss_mask, "t"))
    batch = pack_sft(examples, num_rows=2, row_length=16, pad_id=0)
    (loss_f, metrics_f), grads_f = _value_and_grad(fused, sft_loss, batch)
    (loss_p, metrics_p), grads_p = _value_and_grad(plain, sft_loss, batch)
    np.testing.assert_allclose(loss_f, loss_p, rtol=1e-6)
    _assert_close(metrics_f, metrics_p)
    _assert_close(grads_f, grads_p, rtol=1e-4)
    assert 0.0 <= float(metrics_f["sft/accuracy"]) <= 1.0
    # The loss is the mean NLL of the completion tokens under the materialised logits.
    logps, _ = model_token_logps(plain, batch)
    mask = batch["loss_mask"].astype(np.float32)
    np.testing.assert_allclose(loss_f, -np.sum(np.asarray(logps, np.float64) * mask) / mask.sum(),
                               rtol=1e-5)


@pytest.mark.slow
def test_dpo_on_prefix_shared_rows_equals_the_full_logits_path():
    policy_f, policy_p = _models("tiny_qwen2", seed=1)
    ref_f, ref_p = _models("tiny_qwen2", seed=2)
    rng = np.random.default_rng(1)
    pairs = [TokenizedPreference(_ids(rng, 4), _ids(rng, 5), _ids(rng, 3), 0.0, 1.0, "t"),
             TokenizedPreference(_ids(rng, 6), _ids(rng, 2), _ids(rng, 6), 0.0, 1.0, "t")]
    batch = collate_prefix_shared(pairs, pad_id=0, length=16)

    def loss_fn(model, batch):
        return preference_loss(model, batch, hp=DPOHyperParams(beta=0.1))

    (loss_f, metrics_f), grads_f = _value_and_grad(PolicyAndReference(policy_f, ref_f), loss_fn,
                                                   batch)
    (loss_p, metrics_p), grads_p = _value_and_grad(PolicyAndReference(policy_p, ref_p), loss_fn,
                                                   batch)
    np.testing.assert_allclose(loss_f, loss_p, rtol=1e-6)
    _assert_close(metrics_f, metrics_p, atol=1e-5)
    _assert_close(grads_f, grads_p, rtol=1e-4)


def _packed_and_prefix_shared(rng, *, length, second_prompt):
    """Model inputs of 2 packed SFT rows (3 sequences) and 2 prefix-shared preference rows (the
    second with a prompt of `second_prompt` tokens), each `length` tokens, in one batch."""
    packed = pack_sft([TokenizedSFT(_ids(rng, n), np.ones(n, np.int32), "t") for n in (5, 7, 3)],
                      num_rows=2, row_length=length, pad_id=0)
    shared = collate_prefix_shared(
        [TokenizedPreference(_ids(rng, 3), _ids(rng, 3), _ids(rng, 2), 0.0, 1.0, "t"),
         TokenizedPreference(_ids(rng, second_prompt), _ids(rng, 4), _ids(rng, 4), 0.0, 1.0,
                             "t")],
        pad_id=0, length=length)
    keys = ("input_ids", "attention_mask", "positions", "segment_ids")
    batch = {k: np.concatenate([packed[k], shared[k]]) for k in keys}
    batch["branch_ids"] = np.concatenate([np.zeros_like(packed["input_ids"]),
                                          shared["branch_ids"]])
    return batch


def test_model_scores_of_a_plain_callable_equal_the_fused_head():
    # A model without `token_logps` (any `model(ids, **kwargs) -> logits`) is scored from its
    # logits: same log-probs and argmax (-1 where a token has no context).
    fused, _ = _models("tiny_gpt2", seed=3)
    batch = _packed_and_prefix_shared(np.random.default_rng(3), length=10, second_prompt=0)

    def run(state, batch):
        m = nnx.merge(graphdef, state)
        return (model_scores(m, batch, with_argmax=True),
                model_scores(lambda ids, **kw: m(ids, **kw), batch, with_argmax=True))

    graphdef, state = nnx.split(fused)
    got, want = jax.jit(run)(state, batch)
    np.testing.assert_allclose(got.logps, want.logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax, want.argmax)
    assert got.entropy is None and want.entropy is None


def test_scoring_the_loss_tokens_only_on_packed_and_prefix_shared_rows():
    """`model_scores(where=mask)`: the masked tokens of packed and prefix-shared rows keep the
    values of the unmasked scoring, the others are 0 (argmax -1), for the fused head, the
    unfused one and a plain callable; and the gradient of a masked sum is the same."""
    fused, plain = _models("tiny_gpt2", seed=5)
    rng = np.random.default_rng(5)
    batch = _packed_and_prefix_shared(rng, length=12, second_prompt=2)
    where = rng.random(batch["input_ids"].shape) < 0.5
    batch = jax.tree.map(jax.numpy.asarray, batch)

    def scores(model, where):
        def run(params):
            m = nnx.merge(graphdef, params, rest)
            out = model_scores(m, batch, with_argmax=True, where=where)
            return jax.numpy.sum(out.logps * (1.0 if where is None else where)), out
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return jax.jit(jax.value_and_grad(run, has_aux=True))(params)

    (_, full), _ = scores(fused, None)
    assert np.any(full.logps[~where] != 0)
    # The gradient of the masked sum through the unmasked scoring.
    graphdef, params, rest = nnx.split(fused, nnx.Param, ...)
    want = jax.jit(jax.grad(lambda p: masked_sum(
        model_scores(nnx.merge(graphdef, p, rest), batch).logps, where)))(params)
    for model in (fused, plain):
        (masked_loss, got), masked_grads = scores(model, where)
        np.testing.assert_allclose(got.logps, np.where(where, full.logps, 0.0), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(got.argmax, np.where(where, full.argmax, -1))
        np.testing.assert_allclose(masked_loss, masked_sum(full.logps, where), rtol=1e-5)
        _assert_close(masked_grads, want, rtol=1e-4, atol=1e-6)
    # A callable without `token_logps` is masked the same way.
    callable_scores = jax.jit(lambda p: model_scores(
        lambda ids, **kw: nnx.merge(graphdef, p, rest)(ids, **kw), batch, with_argmax=True,
        where=where))(params)
    np.testing.assert_allclose(callable_scores.logps, np.where(where, full.logps, 0.0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(callable_scores.argmax, np.where(where, full.argmax, -1))


def test_response_logps_and_entropy_equal_the_full_logits_path():
    # The PPO / GRPO / RLOO updates and their old-log-prob and reference passes.
    fused, _ = _models("tiny_llama", seed=4)
    temperature = 0.7
    rng = np.random.default_rng(4)
    b, p, n = 3, 6, 5
    sequences = rng.integers(3, 256, size=(b, p + n)).astype(np.int32)
    mask = np.ones((b, p + n), np.int32)
    mask[1, :2] = 0  # a left-padded prompt
    mask[2, p + 3:] = 0  # a response that stopped early
    sequences[mask == 0] = 0
    rollout = Rollout(sequences, mask, sequences[:, p:], mask[:, p:], np.array([0, 0, 1], bool))
    graphdef, params, rest = nnx.split(fused, nnx.Param, ...)

    def loss(params, rollout, fused_head):
        m = nnx.merge(graphdef, params, rest)
        if fused_head:
            logps, entropy = policy_response_logps(m, rollout, temperature=temperature,
                                                   with_entropy=True)
        else:
            logits = m(rollout.sequences, attention_mask=rollout.sequence_mask,
                       positions=positions_from_mask(rollout.sequence_mask))
            logps, entropy = tempered_response_logps(logits, rollout, temperature=temperature,
                                                     with_entropy=True)
        w = rollout.response_mask.astype(np.float32)
        return masked_sum(logps + 0.1 * entropy, w), (logps, entropy)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)
    (value_f, (logps_f, ent_f)), grads_f = step(params, rollout, True)
    (value_p, (logps_p, ent_p)), grads_p = step(params, rollout, False)
    assert logps_f.shape == ent_f.shape == (b, n)
    m = rollout.response_mask > 0
    np.testing.assert_allclose(logps_f[m], logps_p[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent_f[m], ent_p[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value_f, value_p, rtol=1e-5)
    _assert_close(grads_f, grads_p, rtol=1e-4)


def test_model_spec_sets_the_chunk_size():
    assert model_config(ModelSpec(preset="tiny_gpt2")).logits_chunk_size == 128
    assert model_config(ModelSpec(preset="tiny_gpt2", logits_chunk_size=7)).logits_chunk_size == 7
    assert model_config(ModelSpec(preset="tiny_gpt2", logits_chunk_size=0)).logits_chunk_size == 0
    with pytest.raises(FieldError, match="logits_chunk_size"):
        ModelSpec(logits_chunk_size=-1)


def test_model_spec_sets_the_kept_logits_budget():
    assert model_config(ModelSpec(preset="tiny_gpt2")).logits_keep_bytes == 0
    spec = ModelSpec(preset="tiny_gpt2", logits_keep_bytes=1 << 30)
    assert model_config(spec).logits_keep_bytes == 1 << 30
    with pytest.raises(FieldError, match="logits_keep_bytes"):
        ModelSpec(logits_keep_bytes=-1)


def test_model_spec_sets_the_vocabulary_blocks():
    assert model_config(ModelSpec(preset="tiny_gpt2")).logits_vocab_blocks == 0
    assert model_config(ModelSpec(preset="tiny_gpt2", logits_vocab_blocks=4)) \
        .logits_vocab_blocks == 4
    with pytest.raises(FieldError, match="logits_vocab_blocks"):
        ModelSpec(logits_vocab_blocks=-1)
    with pytest.raises(ValueError, match="logits_vocab_blocks"):
        ModelConfig.preset("tiny_gpt2", logits_vocab_blocks=3)  # does not divide 256


def test_vocabulary_blocks_give_the_same_sft_loss_and_gradients():
    rng = np.random.default_rng(9)
    batch = pack_sft([TokenizedSFT(_ids(rng, n), np.ones(n, np.int32), "t") for n in (5, 7, 3)],
                     num_rows=2, row_length=10, pad_id=0)
    out = {}
    for blocks in (1, 4):
        model = CausalLM(ModelConfig.preset("tiny_gpt2", logits_chunk_size=4,
                                            logits_vocab_blocks=blocks), rngs=nnx.Rngs(9))
        out[blocks] = _value_and_grad(model, sft_loss, batch)
    _assert_close(out[4], out[1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # the model-level check runs by default: tests/models/test_token_logps.py
def test_dpo_with_the_vocabulary_sharded_over_tensor_equals_one_device():
    """data=2 x tensor=4 on the 8 host devices: the DPO loss, metrics and gradients of the
    fused head with the tied embedding's vocabulary over `tensor` equal the single-device ones."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=4))
    policy, _ = _models("tiny_qwen2", seed=5)
    ref, _ = _models("tiny_qwen2", seed=6)
    rng = np.random.default_rng(5)
    pairs = [TokenizedPreference(_ids(rng, 4), _ids(rng, 5), _ids(rng, 3), 0.0, 1.0, "t"),
             TokenizedPreference(_ids(rng, 2), _ids(rng, 6), _ids(rng, 6), 0.0, 1.0, "t")]
    batch = collate_prefix_shared(pairs, pad_id=0, length=16)
    model = PolicyAndReference(policy, ref)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, rest, batch):
        return preference_loss(nnx.merge(graphdef, params, rest), batch,
                               hp=DPOHyperParams(beta=0.1))

    step = jax.jit(jax.value_and_grad(f, has_aux=True))
    (loss, metrics), grads = step(params, rest, batch)
    (loss_s, metrics_s), grads_s = step(sharding.shard_state(params, mesh),
                                        sharding.shard_state(rest, mesh),
                                        sharding.shard_batch(batch, mesh))
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    _assert_close(metrics_s, metrics, atol=1e-5)
    _assert_close(grads_s, grads, rtol=1e-4)
    assert grads_s["policy"]["backbone"]["embed"]["embedding"][...].sharding.spec[0] == "tensor"


def test_shared_value_head_forward_equals_the_full_logits_path():
    # PPO with `value_head="shared"`: log-probs, entropy and values of one backbone pass.
    lm, _ = _models("tiny_gpt2", seed=7)
    model = PolicyWithValueHead(lm, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(7)
    b, p, n = 2, 5, 4
    sequences = rng.integers(3, 256, size=(b, p + n)).astype(np.int32)
    mask = np.ones((b, p + n), np.int32)
    mask[1, :2] = 0
    sequences[mask == 0] = 0
    rollout = Rollout(sequences, mask, sequences[:, p:], mask[:, p:], np.array([0, 1], bool))

    def run(state, rollout):
        m = nnx.merge(graphdef, state)
        logits, values = m.logits_and_values(rollout.sequences, rollout.sequence_mask,
                                             positions_from_mask(rollout.sequence_mask))
        want = tempered_response_logps(logits, rollout, temperature=0.7, with_entropy=True)
        return shared_forward(m, rollout, temperature=0.7), want, values[:, p - 1:-1]

    graphdef, state = nnx.split(model)
    (logps, entropy, values), (want_logps, want_entropy), want_values = jax.jit(run)(state,
                                                                                   rollout)
    np.testing.assert_allclose(logps, want_logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values, want_values, rtol=1e-6, atol=1e-6)
