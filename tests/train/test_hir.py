"""`rlhf-jax hir`: hindsight relabelling (buckets, instruction layout, a pluggable relabeller),
HIR's training loss against a float64 NumPy reference, the rounds on the synthetic task, and the
command line (YAML, --help, resume, export)."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from rlhf_jax import cli, sharding
from rlhf_jax.data.synthetic import build_tokenizer, get_task
from rlhf_jax.generation import TokenRewardFunction
from rlhf_jax.models import CausalLM
from rlhf_jax.train import CheckpointConfig, LoggingConfig, read_metrics
from rlhf_jax.train.builders import model_config
from rlhf_jax.train.config import DataSpec, FieldError, ModelSpec, OptimizerConfig
from rlhf_jax.train.data import build_data
from rlhf_jax.train.export import load_policy, read_checkpoint_state
from rlhf_jax.train.hir import (
    BUFFER_FIELDS,
    HirConfig,
    HirHyperParams,
    HirTrainer,
    RewardBucketRelabeller,
    add_to_buffer,
    check_labels,
    empty_buffer,
    hir_batch,
    hir_train_loss,
    prefix_prompts,
    quantile_buckets,
)
from rlhf_jax.train.online import HeldOut, OnlineTrainer
from rlhf_jax.train.rollout import Rollout, RolloutConfig
from rlhf_jax.train.sft import SFTConfig, train_sft

TASK = get_task("topic")
TOKENIZER = build_tokenizer()


# ---------------------------------------------------------------------------------------------
# relabelling and the batch layout
# ---------------------------------------------------------------------------------------------


def test_quantile_buckets_rank_the_round():
    scores = np.asarray([0.3, -1.0, 2.0, 0.3, 5.0, 0.0])
    np.testing.assert_array_equal(quantile_buckets(scores, 2), [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(quantile_buckets(scores, 3), [1, 0, 2, 1, 2, 0])


def test_relabeller_output_is_checked():
    np.testing.assert_array_equal(check_labels([0, 2, 1], rows=3, num_labels=3), [0, 2, 1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\) \(num_labels\), got values in"):
        check_labels(np.asarray([0, 2]), rows=2, num_labels=2)
    with pytest.raises(ValueError, match="must return 3 integer labels"):
        check_labels(np.asarray([0.0, 1.0, 1.0]), rows=3, num_labels=2)
    with pytest.raises(ValueError, match="must return 3 integer labels"):
        check_labels(np.asarray([0, 1]), rows=3, num_labels=2)


def test_prefix_prompts_stay_left_padded():
    ids = np.asarray([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = (ids > 0).astype(np.int32)
    labels = [np.asarray([40]), np.asarray([41, 42])]
    out, m = prefix_prompts(ids, mask, labels, pad_id=0)
    np.testing.assert_array_equal(out, [[0, 0, 0, 40, 5, 6], [41, 42, 7, 8, 9, 10]])
    np.testing.assert_array_equal(m, [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out, m = prefix_prompts(ids, mask, labels, pad_id=0, suffix=True)
    np.testing.assert_array_equal(out, [[0, 0, 0, 5, 6, 40], [7, 8, 9, 10, 41, 42]])
    np.testing.assert_array_equal(m, [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


class TableLM:
    """logits[b, t] = table[input_ids[b, t]]: a causal LM whose outputs are known exactly."""

    def __init__(self, table):
        self.table = jnp.asarray(table, jnp.float32)

    def __call__(self, input_ids, **kwargs):
        return self.table[input_ids]


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("average", [False, True])
def test_hir_train_loss_matches_numpy(average):
    """SFT under the relabelled instruction + the contrastive softmax over the K instructions
    of the token-mean log-probs + the entropy bonus, against float64 NumPy (label suffixed)."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(12, 12)) * 2.0
    prompts = np.asarray([[0, 3, 4], [5, 6, 7], [0, 0, 8]])
    relabel = RewardBucketRelabeller([[10], [11]], pad_id=0, suffix=True)
    labels = np.asarray([1, 0, 1])
    resp = np.asarray([[4, 2, 0], [6, 7, 2], [3, 3, 3]])
    rmask = np.asarray([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    rollout = Rollout(sequences=None, sequence_mask=None, response_ids=resp, response_mask=rmask,
                      finished=None)
    per = [relabel.instruct(prompts, (prompts > 0).astype(np.int32), np.full(3, k))
           for k in range(2)]
    batch = hir_batch(np.stack([p[0] for p in per], 1), np.stack([p[1] for p in per], 1),
                      rollout, labels)
    hp = HirHyperParams(contrastive_coeff=0.7, label_smoothing=0.1, entropy_coeff=0.05,
                        contrastive_average=average)
    loss, metrics = jax.jit(lambda b: hir_train_loss(TableLM(table), b, hp=hp))(batch)

    lsm = _np_log_softmax(table)
    own_lps, own_ents, contrastives = [], [], []
    for i in range(3):
        seq_means, own = [], None
        for k in range(2):
            instr = batch["input_ids"][i, k][batch["attention_mask"][i, k] > 0][:-rmask[i].sum()]
            full = np.concatenate([instr, resp[i][rmask[i] > 0]])
            start = len(instr)
            lps = [lsm[full[t - 1], full[t]] for t in range(start, len(full))]
            ents = [-(np.exp(lsm[full[t - 1]]) * lsm[full[t - 1]]).sum()
                    for t in range(start, len(full))]
            seq_means.append(np.mean(lps) if average else np.sum(lps))
            if k == labels[i]:
                own = (lps, ents)
        z = np.asarray(seq_means)
        log_q = z - np.log(np.exp(z).sum())
        j = labels[i]
        contrastives.append(-(0.9 * log_q[j] + 0.1 * log_q[1 - j]))
        own_lps += own[0]
        own_ents += own[1]
    # SFT and entropy: token means over the minibatch; the contrastive term: a mean over rows.
    expected = -np.mean(own_lps) + 0.7 * np.mean(contrastives) - 0.05 * np.mean(own_ents)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["hir/loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["hir/sft_loss"], -np.mean(own_lps), rtol=1e-5)
    np.testing.assert_allclose(metrics["hir/contrastive_loss"], np.mean(contrastives), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the replay buffer
# ---------------------------------------------------------------------------------------------


def _rows(n, width, first, k=2):
    """``n`` `hir_batch`-like rows whose tokens are ``first, first + 1, ...`` (row id), the
    left-most column padding."""
    ids = np.broadcast_to((first + np.arange(n))[:, None, None], (n, k, width)).astype(np.int32)
    mask = np.ones((n, k, width), np.int32)
    mask[..., 0] = 0
    return {"input_ids": ids.copy(), "attention_mask": mask,
            "positions": np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32),
            "loss_mask": mask.copy(), "label": (first + np.arange(n)).astype(np.int32) % k}


def test_buffer_keeps_the_newest_rows_first_in_first_out():
    buf = empty_buffer(5, num_labels=2, width=6)
    buf = add_to_buffer(buf, _rows(3, 6, first=10), pad_id=0)
    assert int(buf.added) == 3
    assert buf.input_ids[:3, 0, -1].tolist() == [10, 11, 12] and not buf.input_ids[3:].any()
    buf = add_to_buffer(buf, _rows(3, 6, first=20), pad_id=0)
    # slots 3, 4 then 0: the oldest row (10) made way
    assert int(buf.added) == 6
    assert buf.input_ids[:, 0, -1].tolist() == [22, 11, 12, 20, 21]
    assert buf.label.tolist() == [0, 1, 0, 0, 1]


def test_buffer_left_pads_narrower_rows_and_refuses_wider_ones():
    buf = add_to_buffer(empty_buffer(4, num_labels=2, width=6), _rows(2, 4, first=7), pad_id=99)
    assert buf.input_ids[0, 0].tolist() == [99, 99, 7, 7, 7, 7]
    assert buf.attention_mask[0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    # the real tokens keep their positions
    assert buf.positions[0, 0].tolist() == [0, 0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="up to 4 rows of 2 instructions x 6 tokens"):
        add_to_buffer(buf, _rows(2, 7, first=0), pad_id=0)
    with pytest.raises(ValueError, match="got 5 rows"):
        add_to_buffer(buf, _rows(5, 6, first=0), pad_id=0)


def test_rounds_train_on_the_buffer(tmp_path):
    """With a buffer of two rounds, the second round's updates draw from both rounds' rows
    (without one, the default, the state holds no buffer: the test above)."""
    trainer = _trainer(tmp_path, buffer_size=32, devices=8)
    rows = []
    for _ in range(2):
        m = trainer.iteration()
        rows.append(m["hir/buffer_rows"])
        assert np.isfinite(m["hir/loss"])
    assert rows == [16, 32]
    buf = trainer.state.buffer
    assert int(buf.added) == 32 and buf.input_ids.shape[:2] == (32, 2)
    assert buf.input_ids.sharding.is_fully_replicated
    assert int(trainer.state.policy.step) == 2 * 2  # the same updates per round as without


# ---------------------------------------------------------------------------------------------
# rounds on the synthetic task
# ---------------------------------------------------------------------------------------------


SPEC_MODEL = ModelSpec(preset="tiny_gpt2", vocab_size=len(TOKENIZER), hidden_size=32,
                       num_layers=1, num_heads=2)


def _trainer(tmp_path, relabeller=None, devices=1, **kw):
    spec = DataSpec(synthetic="topic", batch_size=8, max_length=16, max_prompt_length=16,
                    num_train=64, num_eval=0)
    base = dict(output_dir=str(tmp_path), num_steps=2, data=spec,
                rollout=RolloutConfig(max_new_tokens=10), num_samples=2, sft_batch_size=8,
                optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"))
    base.update(kw)
    config = HirConfig(**base)
    return HirTrainer(
        config,
        policy=CausalLM(model_config(SPEC_MODEL), rngs=nnx.Rngs(0)),
        reward=TokenRewardFunction(TASK.gold_reward_tokens, name="gold"),
        prompts=build_data(spec, format="prompt", tokenizer=TOKENIZER, seed=0).train,
        eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id,
        mesh=sharding.make_mesh(sharding.MeshConfig(data=devices),
                                devices=jax.devices()[:devices]),
        relabeller=relabeller,
        tokenizer=TOKENIZER,
    )


class RecordingRelabeller(RewardBucketRelabeller):
    """Three labels from fixed thresholds (not quantiles), recording what it was given."""

    def __init__(self):
        ids = TOKENIZER([":", ";", "="], add_special_tokens=False)["input_ids"]
        super().__init__(ids, pad_id=TOKENIZER.pad_token_id)
        self.seen = []

    def labels(self, scores):
        self.seen.append(np.asarray(scores))
        return np.digitize(scores, [0.1, 0.3])


def test_rounds_relabel_with_a_pluggable_relabeller_on_8_devices(tmp_path):
    relabel = RecordingRelabeller()
    trainer = _trainer(tmp_path, relabeller=relabel, devices=8)
    rounds = [trainer.iteration() for _ in range(2)]
    assert len(relabel.seen) == 2 and relabel.seen[0].shape == (16,)
    assert rounds[0]["hir/kl_ref"] == 0.0 and rounds[-1]["hir/kl_ref"] != 0.0
    for m in rounds:
        assert np.isfinite(m["hir/loss"]) and m["train/nonfinite"] == 0.0
        # three instructions: the contrastive term starts near log 3
        assert 0.0 < m["hir/contrastive_loss"] < 2.0
    np.testing.assert_allclose(rounds[0]["hir/score_mean"], relabel.seen[0].mean(), rtol=1e-5)
    assert int(trainer.state.policy.step) == 2 * 2
    assert trainer.state.buffer is None  # the default: no replay buffer


def test_bad_config_names_the_field():
    with pytest.raises(FieldError, match="sft_batch_size=3 must divide"):
        HirConfig(sft_batch_size=3)
    with pytest.raises(FieldError, match="label_texts must be at least 2 distinct"):
        HirConfig(label_texts=("1",))
    with pytest.raises(FieldError, match="label_smoothing"):
        HirConfig(label_smoothing=1.0)
    with pytest.raises(FieldError, match="buffer_size=16 must be 0 .* = 32"):
        HirConfig(buffer_size=16)  # 8 prompts x 4 samples per round


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def test_cli_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["hir", "--help"])
    out = capsys.readouterr().out
    for option in ("--label-texts", "--contrastive-coeff", "--entropy-coeff", "--num-samples",
                   "--buffer-size",
                   "--reward.source", "--rollout.max-new-tokens", "--config"):
        assert option in out, option


def _yaml(tmp_path, **extra) -> str:
    config = {
        "num_steps": 4, "num_samples": 2, "sft_batch_size": 8, "eval_every": 4,
        "entropy_coeff": 0.001, "label_smoothing": 0.2,
        "model": {k: v for k, v in dataclasses.asdict(SPEC_MODEL).items()
                  if v is not None and k != "lora_targets"},
        "data": {"synthetic": "topic", "batch_size": 8, "max_length": 16,
                 "max_prompt_length": 16, "num_train": 64, "num_eval": 8},
        "rollout": {"max_new_tokens": 10},
        "reward": {"source": "gold"},
        "optimizer": {"learning_rate": 3e-3, "schedule": "constant"},
        "checkpoint": {"every_steps": 2},
        "logging": {"every_steps": 1, "progress": "none", "tensorboard": False},
    }
    config.update(extra)
    path = tmp_path / "hir.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cli_yaml_run_resume_and_export(tmp_path):
    out = tmp_path / "run"
    path = _yaml(tmp_path)
    assert cli.main(["hir", "--config", path, "--output-dir", str(out)]) == 0
    records = read_metrics(out)
    train = [r for r in records if "hir/loss" in r]
    assert len(train) == 4
    assert all("hir/gold_reward" in r for r in train)
    evals = [r for r in records if "hir/eval/gold_reward" in r]
    assert evals, records[-1].keys()
    _, final = read_checkpoint_state(str(out / "checkpoints"))
    shutil.rmtree(out / "checkpoints" / "4")
    assert cli.main(["hir", "--config", path, "--output-dir", str(out)]) == 0
    _, again = read_checkpoint_state(str(out / "checkpoints"))
    a, b = jax.tree.leaves(final), jax.tree.leaves(again)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert cli.main(["export", "--run-dir", str(out), "--output-dir", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()


def test_cli_resume_with_a_replay_buffer_is_exact(tmp_path):
    """The buffer (wrapped around by round 4) is in the checkpoint: resuming from round 2
    reproduces round 4's state, buffer included, bit for bit."""
    out = tmp_path / "run"
    path = _yaml(tmp_path, buffer_size=24, eval_every=0)
    assert cli.main(["hir", "--config", path, "--output-dir", str(out)]) == 0
    rows = [r["hir/buffer_rows"] for r in read_metrics(out) if "hir/loss" in r]
    assert rows == [16, 24, 24, 24]
    _, final = read_checkpoint_state(str(out / "checkpoints"))
    assert set(BUFFER_FIELDS) < set(final["buffer"]) and int(final["buffer"]["added"]) == 64
    shutil.rmtree(out / "checkpoints" / "4")
    assert cli.main(["hir", "--config", path, "--output-dir", str(out)]) == 0
    _, again = read_checkpoint_state(str(out / "checkpoints"))
    a, b = jax.tree.leaves(final), jax.tree.leaves(again)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _sft_policy(tmp_path, steps):
    """A tiny policy fine-tuned on the topic task's noisy base demonstrations."""
    config = SFTConfig(output_dir=str(tmp_path / "sft"), num_steps=steps, model=SPEC_MODEL,
                       data=DataSpec(synthetic="topic", batch_size=16, max_length=32,
                                     num_train=512, num_eval=0),
                       optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5),
                       logging=LoggingConfig(every_steps=50, tensorboard=False, progress="none"),
                       checkpoint=CheckpointConfig(every_steps=0))
    train_sft(config)
    return load_policy(config.output_dir)[0]


@pytest.mark.slow
def test_hir_raises_the_gold_reward_over_the_sft_policy(tmp_path):
    """30 rounds of HIR from an SFT policy, the gold reward as the outcome: on 128 held-out
    prompts the policy conditioned on the best label beats the SFT policy on the plain prompts.
    Measured 0.477 -> 0.561 at seed 0; at seed 1 the gain was smaller, 0.535 -> 0.558 (the
    held-out gold of one policy moves by ~0.05 between sampling seeds)."""
    policy = _sft_policy(tmp_path, 200)
    data = DataSpec(synthetic="topic", batch_size=8, max_length=16, max_prompt_length=16,
                    num_train=256, num_eval=128)
    bundle = build_data(data, format="prompt", tokenizer=TOKENIZER, seed=0)
    config = HirConfig(output_dir=str(tmp_path / "hir"), num_steps=30, data=data,
                       rollout=RolloutConfig(max_new_tokens=16), num_samples=4,
                       sft_batch_size=16, sft_epochs=2, contrastive_coeff=5.0,
                       optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"))
    trainer = HirTrainer(
        config, policy=policy, reward=TokenRewardFunction(TASK.gold_reward_tokens, name="gold"),
        prompts=bundle.train, eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id, tokenizer=TOKENIZER,
        mesh=sharding.make_mesh(sharding.MeshConfig(data=8)))
    held_out = HeldOut(prompt_batches=bundle.eval_batches, gold_task=TASK)
    OnlineTrainer.set_held_out(trainer, held_out)  # plain prompts: the SFT policy as it is
    sft_gold = trainer.evaluate()["hir/eval/gold_reward"]
    trainer.set_held_out(held_out)  # HIR's evaluation: under the best-outcome label
    for _ in range(config.num_steps):
        trainer.iteration()
    hir_gold = trainer.evaluate()["hir/eval/gold_reward"]
    assert hir_gold > sft_gold + 0.05, (sft_gold, hir_gold)
