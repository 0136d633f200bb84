"""Batch collation: keys, shapes, padding, buckets, and packed == unpacked sums and losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import data as D
from rlhf_jax.data import synthetic as S

PAD = 0


@pytest.fixture(scope="module")
def tok():
    return S.build_tokenizer()


@pytest.fixture(scope="module")
def pref_examples(tok):
    records, _ = S.make_preference_dataset(S.get_task("progression"), num_pairs=12, seed=5)
    examples = [D.parse_record(r, format="preference", origin=f"r:{i}") for i, r in enumerate(records)]
    tokenized, _ = D.tokenize_examples(examples, tok)
    return tokenized


@pytest.fixture(scope="module")
def sft_examples(tok):
    records = S.make_sft_dataset(S.get_task("topic"), num_examples=10, seed=2)
    examples = [D.parse_record(r, format="sft", origin=f"s:{i}") for i, r in enumerate(records)]
    tokenized, _ = D.tokenize_examples(examples, tok)
    return tokenized


def _sft(ids, loss):
    return D.TokenizedSFT(np.asarray(ids, np.int32), np.asarray(loss, np.int32), "x")


class TestBucketLength:
    def test_smallest_bucket_that_fits(self):
        assert D.bucket_length(1, length_buckets=(8, 16)) == 8
        assert D.bucket_length(8, length_buckets=(16, 8)) == 8
        assert D.bucket_length(9, length_buckets=(8, 16)) == 16
        assert D.bucket_length(9, length_buckets=None) == 9

    def test_too_long_names_length_and_bucket(self):
        with pytest.raises(ValueError, match="17 exceeds the largest length bucket 16"):
            D.bucket_length(17, length_buckets=(8, 16))

    def test_bounded_number_of_shapes(self, sft_examples):
        shapes = {
            D.collate_sft(sft_examples[i : i + 2], pad_id=PAD, length_buckets=(16, 32, 64))[
                "input_ids"
            ].shape
            for i in range(0, len(sft_examples), 2)
        }
        assert shapes <= {(2, 16), (2, 32), (2, 64)}


class TestCollateSFT:
    def test_hand_worked(self):
        batch = D.collate_sft(
            [_sft([5, 6, 7], [0, 1, 1]), _sft([8], [1])], pad_id=PAD, length_buckets=(4,)
        )
        assert set(batch) == set(D.TOKEN_KEYS)
        np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 0], [8, 0, 0, 0]])
        np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0], [1, 0, 0, 0]])
        np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0], [1, 0, 0, 0]])
        np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 0, 0, 0]])
        np.testing.assert_array_equal(batch["segment_ids"], batch["attention_mask"])
        assert all(v.dtype == np.int32 for v in batch.values())

    def test_fixed_length(self):
        batch = D.collate_sft([_sft([1, 2], [0, 1])], pad_id=9, length=5)
        np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 9, 9, 9]])
        with pytest.raises(ValueError, match="more than length=1"):
            D.collate_sft([_sft([1, 2], [0, 1])], pad_id=9, length=1)


class TestCollatePreference:
    def test_keys_and_masks(self, pref_examples):
        batch = D.collate_preference(pref_examples[:4], pad_id=PAD, length_buckets=(32, 64))
        for prefix in ("chosen_", "rejected_"):
            for k in D.TOKEN_KEYS:
                assert batch[prefix + k].shape == batch["chosen_input_ids"].shape
        assert batch["margin"].shape == batch["label"].shape == (4,)
        for i, e in enumerate(pref_examples[:4]):
            p, c = len(e.prompt_ids), len(e.chosen_ids)
            row = batch["chosen_input_ids"][i]
            np.testing.assert_array_equal(row[:p], e.prompt_ids)
            np.testing.assert_array_equal(row[p : p + c], e.chosen_ids)
            np.testing.assert_array_equal(
                batch["chosen_loss_mask"][i], np.r_[np.zeros(p), np.ones(c), np.zeros(len(row) - p - c)]
            )
            assert batch["label"][i] == np.float32(e.label)


class TestCollateOthers:
    def test_ranking(self):
        ex = [
            D.TokenizedRanking(np.array([1, 2]), (np.array([3]), np.array([4, 5])), np.array([1, 0]), "a"),
            D.TokenizedRanking(
                np.array([1]), (np.array([3]), np.array([4]), np.array([6])), np.array([2, 0, 1]), "b"
            ),
        ]
        batch = D.collate_ranking(ex, pad_id=PAD, length_buckets=(4, 8))
        assert batch["input_ids"].shape == (2, 3, 4)
        np.testing.assert_array_equal(batch["ranks"], [[1, 0, -1], [2, 0, 1]])
        np.testing.assert_array_equal(batch["response_mask"], [[1, 1, 0], [1, 1, 1]])
        np.testing.assert_array_equal(batch["input_ids"][0, 1], [1, 2, 4, 5])
        np.testing.assert_array_equal(batch["loss_mask"][0, 1], [0, 0, 1, 1])
        assert batch["attention_mask"][0, 2].sum() == 0

    def test_kto_with_kl_pairs(self):
        ex = [
            D.TokenizedKTO(np.array([1, 2]), np.array([7]), True, "a"),
            D.TokenizedKTO(np.array([3]), np.array([8, 9]), False, "b"),
        ]
        batch = D.collate_kto(ex, pad_id=PAD, length_buckets=(4,))
        np.testing.assert_array_equal(batch["label"], [1.0, 0.0])
        np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 7, 0], [3, 8, 9, 0]])
        # KL pairs: prompt i with the completion of example i + 1 (mod B).
        np.testing.assert_array_equal(batch["kl_input_ids"], [[1, 2, 8, 9], [3, 7, 0, 0]])
        np.testing.assert_array_equal(batch["kl_loss_mask"], [[0, 0, 1, 1], [0, 1, 0, 0]])

    def test_prompts_left_padded(self):
        ex = [
            D.TokenizedPrompt(np.array([4, 5, 6]), {"difficulty": 2, "name": "x"}, "a", 0),
            D.TokenizedPrompt(np.array([7]), {"difficulty": 1, "name": "y"}, "b", 1),
        ]
        batch = D.collate_prompts(ex, pad_id=PAD, length_buckets=(4,))
        np.testing.assert_array_equal(batch["prompt_ids"], [[0, 4, 5, 6], [0, 0, 0, 7]])
        np.testing.assert_array_equal(batch["prompt_mask"], [[0, 1, 1, 1], [0, 0, 0, 1]])
        np.testing.assert_array_equal(batch["prompt_positions"], [[0, 0, 1, 2], [0, 0, 0, 0]])
        np.testing.assert_array_equal(batch["prompt_segment_ids"], batch["prompt_mask"])
        np.testing.assert_array_equal(batch["prompt_index"], [0, 1])
        np.testing.assert_array_equal(batch["difficulty"], [2, 1])
        assert "name" not in batch  # only numeric task fields become arrays


# ----------------------------------------------------------------------------------------------
# Packing


def _toy_logps(ids: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for aligned per-token log-probs that depends on the previous
    token of the same sequence and on the position (float64)."""
    prev = np.concatenate([np.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)
    prev_seg = np.concatenate([np.zeros_like(segment_ids[:, :1]), segment_ids[:, :-1]], axis=1)
    same = (prev_seg == segment_ids) & (segment_ids > 0) & (positions > 0)
    value = -0.1 * ((ids * 7 + prev * 3 + positions * 5) % 11) - 0.01
    return np.where(same, value, 0.0)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


class TestFirstFit:
    def test_hand_worked(self):
        rows, offsets, n = D.first_fit([3, 3, 2, 4, 1], num_rows=2, row_length=5)
        # 3 -> row0@0, 3 -> row1@0, 2 -> row0@3, 4 -> no room: stop.
        np.testing.assert_array_equal(rows, [0, 1, 0])
        np.testing.assert_array_equal(offsets, [0, 0, 3])
        assert n == 3

    def test_too_long_sequence(self):
        with pytest.raises(ValueError, match="sequence 1 has 9 tokens, more than row_length=5"):
            D.first_fit([1, 9], num_rows=2, row_length=5)


class TestPackSFT:
    def test_hand_worked(self):
        batch = D.pack_sft(
            [_sft([1, 2, 3], [0, 1, 1]), _sft([4, 5], [0, 1]), _sft([6], [1])],
            num_rows=2,
            row_length=4,
            pad_id=PAD,
        )
        np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, 6], [4, 5, 0, 0]])
        np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2], [1, 1, 0, 0]])
        np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 1, 0, 0]])
        np.testing.assert_array_equal(batch["sequence_ids"], [[1, 1, 1, 3], [2, 2, 0, 0]])
        np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 1], [0, 1, 0, 0]])
        np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])

    def test_does_not_fit(self):
        with pytest.raises(ValueError, match="only 1 of 2 sequences fit"):
            D.pack_sft([_sft([1, 2], [0, 1]), _sft([3], [1])], num_rows=1, row_length=2, pad_id=0)

    def test_packed_sums_equal_unpacked(self, sft_examples):
        ex = sft_examples[:6]
        packed = D.pack_sft(ex, num_rows=3, row_length=64, pad_id=PAD)
        assert packed["segment_ids"].max() >= 2  # several sequences share a row
        plain = D.collate_sft(ex, pad_id=PAD, length_buckets=(64,))
        lp_packed = _toy_logps(packed["input_ids"], packed["segment_ids"], packed["positions"])
        lp_plain = _toy_logps(plain["input_ids"], plain["segment_ids"], plain["positions"])
        sums_packed = np.bincount(
            packed["sequence_ids"].ravel(),
            weights=(lp_packed * packed["loss_mask"]).ravel(),
            minlength=len(ex) + 1,
        )[1:]
        sums_plain = (lp_plain * plain["loss_mask"]).sum(axis=1)
        np.testing.assert_allclose(sums_packed, sums_plain, rtol=0, atol=1e-12)
        # Token-mean SFT loss is the same too.
        np.testing.assert_allclose(
            -(lp_packed * packed["loss_mask"]).sum() / packed["loss_mask"].sum(),
            -(lp_plain * plain["loss_mask"]).sum() / plain["loss_mask"].sum(),
            rtol=1e-12,
        )


class TestPackPreference:
    def test_index_keys(self):
        ex = [
            D.TokenizedPreference(np.array([1]), np.array([2, 3]), np.array([4]), 0.5, 1.0, "a"),
            D.TokenizedPreference(np.array([5]), np.array([6]), np.array([7, 8, 9]), 0.0, 0.7, "b"),
        ]
        batch = D.pack_preference(ex, num_rows=2, row_length=6, max_pairs=3, pad_id=PAD)
        # Sequences c0=[1,2,3] r0=[1,4] c1=[5,6] r1=[5,7,8,9] by first fit into 2 rows of 6.
        np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, 1, 4, 0], [5, 6, 5, 7, 8, 9]])
        np.testing.assert_array_equal(batch["sequence_ids"], [[1, 1, 1, 2, 2, 0], [3, 3, 4, 4, 4, 4]])
        np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2]])
        np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 0], [0, 1, 0, 1, 1, 1]])
        np.testing.assert_array_equal(batch["chosen_index"], [1, 3, 0])
        np.testing.assert_array_equal(batch["rejected_index"], [2, 4, 0])
        np.testing.assert_array_equal(batch["pair_mask"], [1, 1, 0])
        np.testing.assert_array_equal(batch["label"], np.float32([1.0, 0.7, 0.0]))
        np.testing.assert_array_equal(batch["margin"], np.float32([0.5, 0.0, 0.0]))
        flat = batch["input_ids"].ravel()
        assert flat[batch["chosen_last_index"][0]] == 3
        assert flat[batch["rejected_last_index"][0]] == 4
        assert flat[batch["chosen_last_index"][1]] == 6
        assert flat[batch["rejected_last_index"][1]] == 9

    def test_packed_dpo_and_bt_losses_equal_unpacked(self, pref_examples):
        ex = pref_examples[:6]
        max_pairs = 8
        packed = D.pack_preference(ex, num_rows=4, row_length=64, max_pairs=max_pairs, pad_id=PAD)
        assert packed["segment_ids"].max() >= 2
        plain = D.collate_preference(ex, pad_id=PAD, length_buckets=(64,))
        lp = _toy_logps(packed["input_ids"], packed["segment_ids"], packed["positions"])
        sums = np.bincount(
            packed["sequence_ids"].ravel(),
            weights=(lp * packed["loss_mask"]).ravel(),
            minlength=2 * max_pairs + 1,
        )
        c_packed, r_packed = sums[packed["chosen_index"]], sums[packed["rejected_index"]]

        def plain_sums(prefix):
            lpp = _toy_logps(
                plain[prefix + "input_ids"], plain[prefix + "segment_ids"], plain[prefix + "positions"]
            )
            return (lpp * plain[prefix + "loss_mask"]).sum(axis=1)

        c_plain, r_plain = plain_sums("chosen_"), plain_sums("rejected_")
        np.testing.assert_allclose(c_packed[: len(ex)], c_plain, atol=1e-12)
        np.testing.assert_allclose(r_packed[: len(ex)], r_plain, atol=1e-12)
        np.testing.assert_array_equal(c_packed[len(ex) :], 0.0)  # padding pairs sum to zero
        beta = 0.1
        dpo_packed = -_log_sigmoid(beta * (c_packed - r_packed)) * packed["pair_mask"]
        dpo_plain = -_log_sigmoid(beta * (c_plain - r_plain))
        np.testing.assert_allclose(dpo_packed.sum() / packed["pair_mask"].sum(), dpo_plain.mean())
        # Reward model: a per-token score read at each sequence's last token.
        score = lambda ids, pos: np.sin(ids * 1.3 + pos * 0.7)
        s_packed = score(packed["input_ids"], packed["positions"]).ravel()
        last_c = s_packed[packed["chosen_last_index"][: len(ex)]]
        last_r = s_packed[packed["rejected_last_index"][: len(ex)]]
        s_plain_c = score(plain["chosen_input_ids"], plain["chosen_positions"])
        s_plain_r = score(plain["rejected_input_ids"], plain["rejected_positions"])
        idx_c = plain["chosen_attention_mask"].sum(1) - 1
        idx_r = plain["rejected_attention_mask"].sum(1) - 1
        rows = np.arange(len(ex))
        np.testing.assert_allclose(last_c, s_plain_c[rows, idx_c])
        np.testing.assert_allclose(last_r, s_plain_r[rows, idx_r])
        np.testing.assert_allclose(
            -_log_sigmoid(last_c - last_r),
            -_log_sigmoid(s_plain_c[rows, idx_c] - s_plain_r[rows, idx_r]),
        )


def _aligned_logps(logits, ids):
    from rlhf_jax.losses import token_logps

    lp = token_logps(logits[:, :-1], ids[:, 1:])
    return jnp.concatenate([jnp.zeros_like(lp[:, :1]), lp], axis=1)


def _jitted(model, method=None):
    """`fn(rows)`: the model on a dict of token keys, jitted (one compile per shape)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state, ids, mask, positions, segment_ids):
        m = nnx.merge(graphdef, state)
        call = getattr(m, method) if method else m
        return call(ids, attention_mask=mask, positions=positions, segment_ids=segment_ids)

    keys = ("input_ids", "attention_mask", "positions", "segment_ids")
    return lambda rows, prefix="": fn(state, *(jnp.asarray(rows[prefix + k]) for k in keys))


class TestPackingWithModel:
    """The same equalities with tiny models that consume `segment_ids` and `positions`: packed
    and unpacked batches have the same shape `[8, 64]`, so each model compiles once."""

    def test_packed_sequence_logps_equal_unpacked(self, pref_examples, tok):
        from rlhf_jax.losses import dpo_loss
        from rlhf_jax.models import CausalLM, ModelConfig

        config = ModelConfig.tiny_llama(
            vocab_size=len(tok), max_position_embeddings=64, num_layers=1, hidden_size=32,
            intermediate_size=64,
        )
        forward = _jitted(CausalLM(config, rngs=nnx.Rngs(0)))
        ex = pref_examples[:4]
        max_pairs = 4
        packed = D.pack_preference(ex, num_rows=8, row_length=64, max_pairs=max_pairs, pad_id=PAD)
        assert packed["segment_ids"].max() >= 2
        ids = jnp.asarray(packed["input_ids"])
        lp = _aligned_logps(forward(packed), ids) * packed["loss_mask"]
        sums = jax.ops.segment_sum(
            lp.ravel(), jnp.asarray(packed["sequence_ids"]).ravel(), num_segments=2 * max_pairs + 1
        )
        c_packed = sums[packed["chosen_index"]][: len(ex)]
        r_packed = sums[packed["rejected_index"]][: len(ex)]

        plain = D.collate_preference(ex, pad_id=PAD, length_buckets=(64,))
        both = {k: np.concatenate([plain["chosen_" + k], plain["rejected_" + k]]) for k in D.TOKEN_KEYS}
        logits = forward(both)
        plain_sums = (_aligned_logps(logits, jnp.asarray(both["input_ids"])) * both["loss_mask"]).sum(1)
        c_plain, r_plain = plain_sums[: len(ex)], plain_sums[len(ex) :]
        np.testing.assert_allclose(c_packed, c_plain, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r_packed, r_plain, rtol=1e-4, atol=1e-4)
        ref_c, ref_r = c_plain - 1.0, r_plain + 0.5
        np.testing.assert_allclose(
            dpo_loss(c_packed, r_packed, ref_c, ref_r, beta=0.1),
            dpo_loss(c_plain, r_plain, ref_c, ref_r, beta=0.1),
            rtol=1e-4,
            atol=1e-5,
        )

    def test_packed_reward_scores_equal_unpacked(self, pref_examples, tok):
        from rlhf_jax.losses import bradley_terry_loss
        from rlhf_jax.models import ModelConfig, RewardModel

        config = ModelConfig.tiny_gpt2(
            vocab_size=len(tok), max_position_embeddings=64, num_layers=1, hidden_size=32
        )
        scores_fn = _jitted(RewardModel(config, rngs=nnx.Rngs(1)), "token_scores")
        ex = pref_examples[:4]
        packed = D.pack_preference(ex, num_rows=8, row_length=64, max_pairs=4, pad_id=PAD)
        assert packed["segment_ids"].max() >= 2
        scores = scores_fn(packed)[..., 0].reshape(-1)
        c_packed = scores[packed["chosen_last_index"]][: len(ex)]
        r_packed = scores[packed["rejected_last_index"]][: len(ex)]
        plain = D.collate_preference(ex, pad_id=PAD, length_buckets=(64,))
        both = {k: np.concatenate([plain["chosen_" + k], plain["rejected_" + k]]) for k in D.TOKEN_KEYS}
        plain_scores = scores_fn(both)[..., 0]
        last = both["attention_mask"].sum(1) - 1
        at_last = plain_scores[np.arange(2 * len(ex)), last]
        c_plain, r_plain = at_last[: len(ex)], at_last[len(ex) :]
        np.testing.assert_allclose(c_packed, c_plain, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r_packed, r_plain, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            bradley_terry_loss(c_packed, r_packed), bradley_terry_loss(c_plain, r_plain), rtol=1e-4, atol=1e-6
        )
