"""Prefix-shared rows (`DataSpec.prefix_sharing`): one row per preference pair or K-way ranking,
the prompt once.

The layout is checked by hand; the tree attention against the unshared rows (the same logits for
every response token, GPT-2 and RoPE models); the log-prob alignment against a float64 NumPy
reference; the DPO-family losses, metrics and gradients, and the reward model's pairwise and
K-way rewards, losses and gradients, against the padded layouts; the config errors; and DPO and
reward-model runs on the 8-device mesh against the same runs without sharing.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_toys import write_easy_preferences

from rlhf_jax.data import (
    BatchConfig,
    DataLoader,
    TokenizedPreference,
    TokenizedRanking,
    TokenizedSFT,
    collate_preference,
    collate_prefix_shared,
    collate_ranking,
)
from rlhf_jax.data.synthetic import build_tokenizer
from rlhf_jax.models import CausalLM, ModelConfig, RewardModel
from rlhf_jax.train import (
    CheckpointConfig,
    DataSpec,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
    read_metrics,
)
from rlhf_jax.train.data import build_data, prefix_shared_lengths
from rlhf_jax.train.dpo import (
    DPOConfig,
    PolicyAndReference,
    preference_hyperparams,
    preference_loss,
    train_dpo,
)
from rlhf_jax.train.logprobs import aligned_token_logps, model_token_logps
from rlhf_jax.train.pairs import pair_forward_batch, pair_sequence_sums, pair_weights
from rlhf_jax.train.rm import (
    RMConfig,
    RMHyperParams,
    pair_rewards,
    ranking_rewards,
    rm_loss,
    train_rm,
)


def _example(prompt, chosen, rejected, label=1.0):
    as_ids = lambda x: np.asarray(x, np.int32)  # noqa: E731
    return TokenizedPreference(as_ids(prompt), as_ids(chosen), as_ids(rejected), 0.5, label,
                               "test")


def _random_examples(seed, lengths, vocab=60):
    rng = np.random.default_rng(seed)
    return [_example(rng.integers(3, vocab, p), rng.integers(3, vocab, c),
                     rng.integers(3, vocab, r), label=float(rng.uniform(0.6, 1.0)))
            for p, c, r in lengths]


# Prompt, chosen, rejected lengths: different prompts, an empty prompt, an empty chosen response.
LENGTHS = [(5, 3, 4), (1, 6, 2), (0, 2, 3), (7, 0, 1), (4, 4, 4), (2, 1, 6), (3, 5, 2), (6, 2, 2)]


class TestLayout:
    def test_hand_worked_rows(self):
        batch = collate_prefix_shared(
            [_example([11, 12, 13], [21, 22], [31, 32, 33]), _example([14], [23, 24, 25], [34])],
            pad_id=0, length=9)
        np.testing.assert_array_equal(batch["input_ids"], [[11, 12, 13, 21, 22, 31, 32, 33, 0],
                                                           [14, 23, 24, 25, 34, 0, 0, 0, 0]])
        np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 1, 1, 1, 1, 0],
                                                                [1, 1, 1, 1, 1, 0, 0, 0, 0]])
        np.testing.assert_array_equal(batch["segment_ids"], batch["attention_mask"])
        np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 0, 1, 1, 1, 1, 1, 0],
                                                           [0, 1, 1, 1, 1, 0, 0, 0, 0]])
        # Each response continues from the prompt's length, as in its own row.
        np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 4, 3, 4, 5, 0],
                                                           [0, 1, 2, 3, 1, 0, 0, 0, 0]])
        np.testing.assert_array_equal(batch["branch_ids"], [[0, 0, 0, 1, 1, 2, 2, 2, 0],
                                                            [0, 1, 1, 1, 2, 0, 0, 0, 0]])
        np.testing.assert_allclose(batch["margin"], [0.5, 0.5])
        np.testing.assert_allclose(batch["label"], [1.0, 1.0])
        assert all(v.dtype == np.int32 for k, v in batch.items() if k not in ("margin", "label"))

    def test_buckets_and_too_long(self):
        examples = [_example([1] * 5, [2] * 6, [3] * 7)]  # 18 tokens
        assert collate_preference(examples, pad_id=0, prefix_sharing=True,
                                  length_buckets=(16, 24, 32))["input_ids"].shape == (1, 24)
        with pytest.raises(ValueError, match="18 tokens, more than length=16"):
            collate_prefix_shared(examples, pad_id=0, length=16)

    def test_row_lengths(self):
        # max_length 48: multiples of 12 from 24 to 96, each rounded up to a multiple of 8.
        assert prefix_shared_lengths(48) == (24, 40, 48, 64, 72, 88, 96)
        assert prefix_shared_lengths(48, (30, 200)) == (24, 30, 40, 48, 64, 72, 88, 96)
        assert prefix_shared_lengths(128)[-1] == 256

    def test_loader_and_batch_config(self):
        examples = _random_examples(0, LENGTHS)
        loader = DataLoader(examples, batch_config=BatchConfig(batch_size=4, prefix_sharing=True,
                                                               length_buckets=(32,)),
                            pad_id=0, seed=0, shuffle=False)
        batch = next(iter(loader))
        assert batch["input_ids"].shape == (4, 32)
        np.testing.assert_array_equal(batch["input_ids"],
                                      collate_prefix_shared(examples[:4], pad_id=0,
                                                            length=32)["input_ids"])
        with pytest.raises(ValueError, match="packing and prefix_sharing"):
            BatchConfig(batch_size=4, length=32, packing=True, prefix_sharing=True)
        sft = [TokenizedSFT(np.arange(1, 5, dtype=np.int32), np.ones(4, np.int32), "x")] * 4
        with pytest.raises(ValueError, match="prefix_sharing supports 'preference' and 'ranking' examples, not 'sft'"):
            DataLoader(sft, batch_config=BatchConfig(batch_size=2, prefix_sharing=True),
                       pad_id=0)


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("variant", ["jit", "eager"])
def test_aligned_logps_with_branches_match_numpy(variant):
    """Branch starts after the first are scored from the prefix's last logits (0 without a
    prefix); every other token from its left neighbour; float64 NumPy reference."""
    batch = collate_prefix_shared(_random_examples(1, LENGTHS[:4]), pad_id=0, length=16)
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 16, 60)).astype(np.float32) * 3
    fn = aligned_token_logps if variant == "eager" else jax.jit(aligned_token_logps)
    out = np.asarray(fn(jnp.asarray(logits), jnp.asarray(batch["input_ids"]),
                        jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["branch_ids"])))
    lsm = _np_log_softmax(logits)
    ref = np.zeros((4, 16))
    for b, (p, c, r) in enumerate(LENGTHS[:4]):
        ids = batch["input_ids"][b]
        for t in range(1, 16):
            source = t - 1
            if t == p + c + r:  # the first padding token starts segment 0
                continue
            if t == p + c and c > 0 and r > 0:  # first rejected token after a chosen one
                if p == 0:
                    continue
                source = p - 1
            ref[b, t] = lsm[b, source, ids[t]]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny_gpt2", "tiny_llama"])
def test_shared_rows_give_the_unshared_logits(preset):
    """Tree attention: every response token's logits (and so every log-prob) in the shared row
    equal those of its own row."""
    config = getattr(ModelConfig, preset)(vocab_size=64)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    examples = _random_examples(3, LENGTHS[:6])
    padded = collate_preference(examples, pad_id=0, length=16)
    shared = collate_prefix_shared(examples, pad_id=0, length=24)
    kw = lambda b, pre="": {k: jnp.asarray(b[pre + k])  # noqa: E731
                            for k in ("attention_mask", "positions", "segment_ids")}
    logits_c = np.asarray(model(jnp.asarray(padded["chosen_input_ids"]), **kw(padded, "chosen_")))
    logits_r = np.asarray(model(jnp.asarray(padded["rejected_input_ids"]),
                                **kw(padded, "rejected_")))
    logits_s = np.asarray(model(jnp.asarray(shared["input_ids"]), **kw(shared),
                                branch_ids=jnp.asarray(shared["branch_ids"])))
    for b, (p, c, r) in enumerate(LENGTHS[:6]):
        np.testing.assert_allclose(logits_s[b, :p + c], logits_c[b, :p + c], atol=2e-5)
        np.testing.assert_allclose(logits_s[b, p + c:p + c + r], logits_r[b, p:p + r], atol=2e-5)


def test_model_input_errors():
    model = CausalLM(ModelConfig.tiny_gpt2(vocab_size=64), rngs=nnx.Rngs(0))
    ids = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="need explicit positions"):
        model(ids, branch_ids=jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match=r"branch_ids must be \[B, T\]"):
        model(ids, positions=jnp.zeros((2, 5), jnp.int32), branch_ids=jnp.zeros((2, 4), jnp.int32))


class TestPreferenceLosses:
    """The DPO family on prefix-shared rows equals the padded layout: loss, metrics, gradients."""

    @pytest.fixture(scope="class")
    @classmethod
    def models(cls):
        config = ModelConfig.tiny_gpt2(vocab_size=64)
        return CausalLM(config, rngs=nnx.Rngs(1)), CausalLM(config, rngs=nnx.Rngs(2))

    # The default suite keeps one family per way of reading the shared rows: the reference model
    # and the SFT term (DPO sigmoid + sft), length-normalised sums without a reference (SimPO) and
    # the odds ratio (ORPO). The others recompile the same reads with another formula on top.
    @pytest.mark.parametrize("algorithm, loss_type", [
        pytest.param("dpo", ("sigmoid",), marks=pytest.mark.slow),
        pytest.param("dpo", ("ipo",), marks=pytest.mark.slow),
        ("dpo", ("sigmoid", "sft")), ("simpo", ()), ("orpo", ()),
        pytest.param("cpo", ("sigmoid",), marks=pytest.mark.slow),
    ])
    def test_loss_metrics_and_grads(self, models, algorithm, loss_type):
        policy, ref = models
        examples = _random_examples(4, LENGTHS)
        padded = {k: jnp.asarray(v) for k, v in collate_preference(examples, pad_id=0,
                                                                   length=16).items()}
        shared = {k: jnp.asarray(v) for k, v in collate_prefix_shared(examples, pad_id=0,
                                                                      length=24).items()}
        kw = dict(hp=preference_hyperparams(DPOConfig(algorithm=algorithm, loss_type=loss_type,
                                                      beta=0.3)),
                  reference="model" if algorithm == "dpo" else "none")

        def loss_and_grads(batch):
            graphdef, params, rest = nnx.split(policy, nnx.Param, ...)

            def f(p):
                pol = nnx.merge(graphdef, p, rest)
                model = PolicyAndReference(pol, ref) if algorithm == "dpo" else pol
                return preference_loss(model, batch, **kw)

            return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

        (loss_p, metrics_p), grads_p = loss_and_grads(padded)
        (loss_s, metrics_s), grads_s = loss_and_grads(shared)
        np.testing.assert_allclose(loss_s, loss_p, rtol=1e-5)
        assert metrics_s.keys() == metrics_p.keys()
        for key in metrics_p:
            np.testing.assert_allclose(metrics_s[key], metrics_p[key], rtol=1e-4, atol=1e-5,
                                       err_msg=key)
        for gs, gp in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_p)):
            np.testing.assert_allclose(gs, gp, rtol=1e-4, atol=1e-6)

    def test_padding_is_inert_and_sums_match(self, models):
        policy, _ = models
        examples = _random_examples(5, LENGTHS)
        padded = collate_preference(examples, pad_id=0, length=16)
        shared = collate_prefix_shared(examples, pad_id=0, length=24)
        junk = dict(shared)
        junk["input_ids"] = np.where(shared["attention_mask"] > 0, shared["input_ids"], 63)
        sums = []
        for batch in (padded, shared, junk):
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            rows = pair_forward_batch(batch)
            logps, _ = model_token_logps(policy, rows)
            sums.append([np.asarray(x) for x in pair_sequence_sums(logps, rows, batch)])
        for x, y, z in zip(*sums):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(z, y)
        np.testing.assert_array_equal(sums[1][2], [c for _, c, _ in LENGTHS])  # chosen lengths
        np.testing.assert_array_equal(pair_weights({"branch_ids": jnp.zeros((8, 3)),
                                                    "input_ids": jnp.zeros((8, 3))}), np.ones(8))


TINY = ModelSpec(preset="tiny_gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                 max_position_embeddings=128)
QUIET = LoggingConfig(every_steps=1, tensorboard=False, progress="none")


@pytest.fixture(scope="module")
def pref_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    write_easy_preferences(root / "train.jsonl", n=48, seed=0)
    write_easy_preferences(root / "eval.jsonl", n=16, seed=1)
    return root


def _data(root, **kw):
    return DataSpec(synthetic="topic", path=str(root / "train.jsonl"),
                    eval_path=str(root / "eval.jsonl"), batch_size=8, max_length=48,
                    max_prompt_length=24, **kw)


def _runs_with_and_without(tmp_path, train, config_cls, data, loss_key, **kw):
    """`{sharing: (train-step records, held-out metrics)}` of two 3-step runs on the 8-device
    mesh, without and with prefix sharing (`data(sharing)` gives the `DataSpec`)."""
    runs = {}
    for sharing in (False, True):
        config = config_cls(output_dir=str(tmp_path / str(sharing)), num_steps=3, model=TINY,
                            data=data(sharing), logging=QUIET,
                            optimizer=OptimizerConfig(learning_rate=2e-3),
                            checkpoint=CheckpointConfig(every_steps=0), **kw)
        summary = train(config)
        runs[sharing] = ([r for r in read_metrics(config.output_dir) if loss_key in r],
                         summary["eval_metrics"])
    return runs


# A whole run on the mesh: test-slow. The default suite keeps the RM run's comparison (test_rm_run_matches_unshared) and the DPO loss on shared rows.
@pytest.mark.slow
def test_dpo_run_on_the_mesh_matches_unshared(tmp_path, pref_files):
    """A DPO run with prefix sharing on the 8-device mesh logs the same metrics as without."""
    assert jax.device_count() == 8
    runs = _runs_with_and_without(
        tmp_path, train_dpo, DPOConfig, lambda s: _data(pref_files, prefix_sharing=s), "dpo/loss")
    (plain, plain_eval), (shared, shared_eval) = runs[False], runs[True]
    assert len(plain) == len(shared) == 3
    for a, b in zip(plain, shared):
        for key in ("dpo/loss", "dpo/reward_margin", "dpo/logps_chosen", "dpo/logps_rejected",
                    "dpo/accuracy"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for key in plain_eval:
        np.testing.assert_allclose(shared_eval[key], plain_eval[key], rtol=1e-4, atol=1e-5)


def test_config_errors(tmp_path, pref_files):
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="prefix_sharing needs preference pairs.*with packing"):
        build_data(_data(pref_files, prefix_sharing=True, packing=True), format="preference",
                   tokenizer=tokenizer, seed=0)
    with pytest.raises(ValueError, match="prefix_sharing needs preference pairs.*'kto'"):
        build_data(_data(pref_files, prefix_sharing=True), format="kto", tokenizer=tokenizer,
                   seed=0)
    with pytest.raises(ValueError, match="prefix_sharing needs preference pairs.*'sft'"):
        build_data(_data(pref_files, prefix_sharing=True, format="sft"), format="sft",
                   tokenizer=tokenizer, seed=0)


# The tree attention of both presets is checked above; reading the last token of each branch does
# not depend on the architecture (the ranking test below reads them on tiny_llama).
@pytest.mark.parametrize("preset", ["tiny_gpt2", pytest.param("tiny_llama", marks=pytest.mark.slow)])
def test_reward_model_reads_each_response_last_token(preset):
    """Pairwise rewards from prefix-shared rows equal those of the unshared rows (empty prompt
    and empty chosen response included), and so does the Bradley-Terry loss and its gradient."""
    config = getattr(ModelConfig, preset)(vocab_size=64)
    model = RewardModel(config, head_names=("a", "b"), rngs=nnx.Rngs(0))
    examples = _random_examples(6, LENGTHS)
    padded = {k: jnp.asarray(v) for k, v in collate_preference(examples, pad_id=0,
                                                               length=16).items()}
    shared = {k: jnp.asarray(v) for k, v in collate_prefix_shared(examples, pad_id=0,
                                                                  length=24).items()}
    for x, y in zip(pair_rewards(model, padded), pair_rewards(model, shared)):
        assert x.shape == y.shape == (8, 2)
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=2e-5)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, batch):
        return rm_loss(nnx.merge(graphdef, p, rest), batch,
                       hp=RMHyperParams(head_names=("a", "b"), use_margin=True))[0]

    (lp, gp), (ls, gs) = (jax.value_and_grad(loss)(params, b) for b in (padded, shared))
    np.testing.assert_allclose(ls, lp, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gp)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rm_run_matches_unshared(tmp_path, pref_files):
    runs = _runs_with_and_without(
        tmp_path, train_rm, RMConfig, lambda s: _data(pref_files, prefix_sharing=s), "rm/loss")
    (plain, plain_eval), (shared, shared_eval) = runs[False], runs[True]
    assert len(plain) == len(shared) == 3
    # Bradley-Terry is invariant to a common shift of the rewards, so the head's bias has a zero
    # true gradient and Adam turns its rounding noise into +-lr steps: the chosen and rejected
    # rewards may move together by ~1e-3, while everything the loss sees agrees.
    for a, b in zip(plain, shared):
        for key in ("rm/loss", "rm/accuracy", "rm/margin"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(b["rm/chosen_reward"], a["rm/chosen_reward"], atol=5e-3)
    for key in ("rm/eval/loss", "rm/eval/accuracy", "rm/eval/margin"):
        np.testing.assert_allclose(shared_eval[key], plain_eval[key], rtol=1e-4, atol=1e-5)


def test_hh_transcripts_share_their_prompt(tmp_path):
    """HH-RLHF records (chosen and rejected transcripts with one prompt) load as prefix-shared
    rows: the prompt once, then each response, in one of the row lengths."""
    human, assistant = "\n\nHuman:", "\n\nAssistant:"
    with open(tmp_path / "hh.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"chosen": f"{human} hi there {i}{assistant} hello friend",
                                "rejected": f"{human} hi there {i}{assistant} go away"}) + "\n")
    spec = DataSpec(path=str(tmp_path / "hh.jsonl"), format="hh", batch_size=4, max_length=48,
                    max_prompt_length=32, prefix_sharing=True, num_eval=0, shuffle=False)
    data = build_data(spec, format="preference", tokenizer=build_tokenizer(), seed=0)
    batch = next(iter(data.train))
    assert batch["input_ids"].shape[1] in prefix_shared_lengths(48)
    for att, branch in zip(batch["attention_mask"], batch["branch_ids"], strict=True):
        n = int(att.sum())
        p, c, r = (int(((branch == k) & (att > 0)).sum()) for k in (0, 1, 2))
        assert p + c + r == n and c > 0 and r > 0
        np.testing.assert_array_equal(branch[:n], [0] * p + [1] * c + [2] * r)


class TestRanking:
    """K-way rankings as prefix-shared rows: `prompt | response 1 | ... | response K`."""

    def test_hand_worked_rows(self):
        as_ids = lambda x: np.asarray(x, np.int32)  # noqa: E731
        examples = [
            TokenizedRanking(as_ids([11, 12]), (as_ids([21]), as_ids([31, 32]), as_ids([41])),
                             as_ids([1, 0, 2]), "a"),
            TokenizedRanking(as_ids([13]), (as_ids([22, 23]), as_ids([33])), as_ids([1, 0]),
                             "b"),
        ]
        batch = collate_ranking(examples, pad_id=0, length=8, prefix_sharing=True)
        np.testing.assert_array_equal(batch["input_ids"], [[11, 12, 21, 31, 32, 41, 0, 0],
                                                           [13, 22, 23, 33, 0, 0, 0, 0]])
        np.testing.assert_array_equal(batch["branch_ids"], [[0, 0, 1, 2, 2, 3, 0, 0],
                                                            [0, 1, 1, 2, 0, 0, 0, 0]])
        np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 2, 3, 2, 0, 0],
                                                           [0, 1, 2, 1, 0, 0, 0, 0]])
        np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 1, 0, 0],
                                                           [0, 1, 1, 1, 0, 0, 0, 0]])
        np.testing.assert_array_equal(batch["ranks"], [[1, 0, 2], [1, 0, -1]])
        np.testing.assert_array_equal(batch["response_mask"], [[1, 1, 1], [1, 1, 0]])

    @pytest.mark.parametrize("loss", ["kwise", "plackett_luce", "best_of_k"])
    def test_rewards_losses_and_grads_match_unshared(self, loss):
        rng = np.random.default_rng(7)
        examples = []
        for i, k in enumerate([3, 2, 3, 1]):  # ragged K; one empty response in example 2
            lengths = [int(rng.integers(1, 5)) for _ in range(k)]
            if i == 2:
                lengths[1] = 0
            examples.append(TokenizedRanking(
                rng.integers(3, 60, int(rng.integers(1, 6))).astype(np.int32),
                tuple(rng.integers(3, 60, n).astype(np.int32) for n in lengths),
                rng.permutation(k).astype(np.int32), f"ex{i}"))
        padded = {k: jnp.asarray(v) for k, v in collate_ranking(examples, pad_id=0,
                                                                length=12).items()}
        shared = {k: jnp.asarray(v) for k, v in collate_ranking(
            examples, pad_id=0, length=24, prefix_sharing=True).items()}
        model = RewardModel(ModelConfig.tiny_llama(vocab_size=64), head_names=("a", "b"),
                            rngs=nnx.Rngs(0))
        mask = np.asarray(padded["response_mask"]) > 0
        r_p, r_s = np.asarray(ranking_rewards(model, padded)), np.asarray(
            ranking_rewards(model, shared))
        assert r_s.shape == r_p.shape == (4, 3, 2)
        np.testing.assert_allclose(r_s[mask], r_p[mask], rtol=1e-5, atol=2e-5)

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(p, batch):
            return rm_loss(nnx.merge(graphdef, p, rest), batch,
                           hp=RMHyperParams(loss=loss, head_names=("a", "b")))

        (lp, mp), gp = jax.value_and_grad(f, has_aux=True)(params, padded)
        (ls, ms), gs = jax.value_and_grad(f, has_aux=True)(params, shared)
        np.testing.assert_allclose(ls, lp, rtol=1e-5)
        for key in mp:
            np.testing.assert_allclose(ms[key], mp[key], rtol=1e-4, atol=1e-5, err_msg=key)
        for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gp)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    def test_ranking_rows_are_not_pairs(self):
        """Bradley-Terry on a prefix-shared ranking batch is refused (not read as branches 1 and
        2), as on a padded ranking batch."""
        as_ids = lambda x: np.asarray(x, np.int32)  # noqa: E731
        example = TokenizedRanking(as_ids([11, 12]), (as_ids([21]), as_ids([31]), as_ids([41])),
                                   as_ids([1, 0, 2]), "a")
        model = RewardModel(ModelConfig.tiny_gpt2(vocab_size=64), rngs=nnx.Rngs(0))
        for sharing in (False, True):
            batch = {k: jnp.asarray(v) for k, v in collate_ranking(
                [example], pad_id=0, length=8, prefix_sharing=sharing).items()}
            with pytest.raises(ValueError, match="needs a pairwise preference batch"):
                rm_loss(model, batch)

    # A whole ranking run: test-slow. The default suite keeps the ranking losses and gradients on shared rows.
    @pytest.mark.slow
    def test_synthetic_ranking_run(self, tmp_path):
        """A Plackett-Luce reward-model run on synthetic rankings with prefix sharing logs the
        same losses as without; the rows fit the K-response lengths."""
        spec = DataSpec(synthetic="topic", format="ranking", num_train=32, num_eval=8,
                        batch_size=8, max_length=48, max_prompt_length=24, num_responses=3,
                        prefix_sharing=True)
        data = build_data(spec, format="ranking", tokenizer=build_tokenizer(), seed=0)
        batch = next(iter(data.train))
        assert batch["input_ids"].ndim == 2 and batch["ranks"].shape == (8, 3)
        assert batch["input_ids"].shape[1] in prefix_shared_lengths(48, branches=3)
        runs = _runs_with_and_without(
            tmp_path, train_rm, RMConfig,
            lambda s: DataSpec(**{**spec.__dict__, "prefix_sharing": s}), "rm/loss",
            loss="plackett_luce", normalize=False)
        (plain, _), (shared, _) = runs[False], runs[True]
        assert len(plain) == len(shared) == 3
        for a, b in zip(plain, shared):
            for key in ("rm/loss", "rm/accuracy", "rm/margin"):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
