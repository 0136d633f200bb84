"""The grain-backed loader: determinism, epochs, sharding, exact resume, packing."""

import collections
import json

import grain
import numpy as np
import pytest

from rlhf_jax import data as D
from rlhf_jax.data import synthetic as S

N = 24


@pytest.fixture(scope="module")
def tok():
    return S.build_tokenizer()


@pytest.fixture(scope="module")
def sft(tok):
    records = S.make_sft_dataset(S.get_task("topic"), num_examples=N, seed=0)
    # Tag each example by its index in the first token so batches reveal the order.
    examples, _ = D.load_examples(records, format="sft")
    tokenized, _ = D.tokenize_examples(examples, tok)
    return [
        D.TokenizedSFT(np.r_[np.int32(100 + i), t.input_ids], np.r_[np.int32(0), t.loss_mask], t.origin)
        for i, t in enumerate(tokenized)
    ]


@pytest.fixture(scope="module")
def prefs(tok):
    records, _ = S.make_preference_dataset(S.get_task("progression"), num_pairs=N, seed=0)
    examples, _ = D.load_examples(records, format="preference")
    return D.tokenize_examples(examples, tok)[0]


def _ids(batch):
    return [int(x) - 100 for x in batch["input_ids"][:, 0]]


def _loader(examples, **kw):
    kw.setdefault("batch_config", D.BatchConfig(batch_size=4, length_buckets=(32, 64)))
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return D.DataLoader(examples, pad_id=0, **kw)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class TestOrder:
    def test_deterministic_for_a_seed(self, sft):
        a, b, c = (_loader(sft, seed=s) for s in (3, 3, 4))
        first = [_ids(next(a)) for _ in range(8)]
        assert first == [_ids(next(b)) for _ in range(8)]
        assert first != [_ids(next(c)) for _ in range(8)]

    def test_epochs_cover_every_example_once_in_new_orders(self, sft):
        loader = _loader(sft, seed=1, num_epochs=3)
        seen = [i for batch in loader for i in _ids(batch)]
        assert len(seen) == 3 * N
        epochs = [seen[e * N : (e + 1) * N] for e in range(3)]
        assert all(sorted(e) == list(range(N)) for e in epochs)
        assert epochs[0] != epochs[1] != epochs[2]
        assert loader.epoch == 3.0

    @pytest.mark.parametrize("shard_index, shard_count", [(0, 1), (1, 3)])
    def test_stream_is_grains_shuffled_repeated_strided_dataset(self, sft, shard_index,
                                                                 shard_count):
        # The loader reads through cached per-epoch orders; element for element they are
        # grain's `source.shuffle(seed).repeat()[shard_index::shard_count]`, and
        # `read_indices` names the same examples.
        loader = _loader(sft, seed=2**32 - 2, shard_index=shard_index, shard_count=shard_count)
        seen = [i for _ in range(10) for i in _ids(next(loader))]
        stream = grain.MapDataset.range(N).shuffle(seed=2**32 - 2).repeat()
        assert seen == [stream[shard_index + j * shard_count] for j in range(len(seen))]
        assert loader.read_indices().tolist() == seen

    def test_no_shuffle_keeps_order(self, sft):
        loader = _loader(sft, shuffle=False, num_epochs=1)
        assert [i for b in loader for i in _ids(b)] == list(range(N))

    def test_drop_remainder(self, sft):
        cfg = D.BatchConfig(batch_size=5, length_buckets=(64,))
        assert len(list(_loader(sft, batch_config=cfg, num_epochs=1))) == N // 5
        keep = D.BatchConfig(batch_size=5, length_buckets=(64,), drop_remainder=False)
        batches = list(_loader(sft, batch_config=keep, num_epochs=1))
        assert [len(b["input_ids"]) for b in batches] == [5, 5, 5, 5, 4]

    def test_shapes_come_from_buckets(self, sft):
        loader = _loader(sft, batch_config=D.BatchConfig(batch_size=3, length_buckets=(16, 32, 64)))
        shapes = {next(loader)["input_ids"].shape for _ in range(30)}
        assert shapes <= {(3, 16), (3, 32), (3, 64)}


class TestSharding:
    def test_hosts_see_disjoint_complete_streams(self, sft):
        hosts = [_loader(sft, seed=2, shard_index=h, shard_count=3) for h in range(3)]
        per_host = [[i for _ in range(3) for i in _ids(next(host))] for host in hosts]
        # Three hosts x 3 batches of 4 = 36 elements: the first 1.5 epochs of the global stream.
        single = _loader(sft, seed=2, batch_config=D.BatchConfig(batch_size=1, length_buckets=(64,)))
        global_stream = [_ids(next(single))[0] for _ in range(36)]
        for h in range(3):
            assert per_host[h] == global_stream[h::3][: len(per_host[h])]
        # The hosts' first N / 3 elements together are the first epoch: every example once.
        counts = collections.Counter(i for h in range(3) for i in per_host[h][: N // 3])
        assert set(counts) == set(range(N)) and max(counts.values()) == 1

    def test_grain_shard_options(self, sft):
        a = _loader(sft, seed=2, shard_index=None, shard_count=None, shard_options=grain.sharding.ShardOptions(1, 2))
        b = _loader(sft, seed=2, shard_index=1, shard_count=2)
        _same(next(a), next(b))
        default = _loader(sft, seed=2, shard_index=None, shard_count=None)
        assert (default.shard_index, default.shard_count) == (0, 1)


class TestResume:
    @pytest.mark.parametrize("packing", [False, True])
    def test_resume_continues_exact_batches(self, sft, packing):
        cfg = (
            D.BatchConfig(batch_size=2, length=64, packing=True)
            if packing
            else D.BatchConfig(batch_size=4, length_buckets=(32, 64))
        )
        loader = _loader(sft, seed=7, batch_config=cfg)
        for _ in range(5):
            next(loader)
        state = json.loads(json.dumps(loader.get_state()))  # through JSON, as in a checkpoint
        expected = [next(loader) for _ in range(12)]  # crosses epoch boundaries
        resumed = _loader(sft, seed=7, batch_config=cfg)
        resumed.set_state(state)
        for a, b in zip(expected, [next(resumed) for _ in range(12)]):
            _same(a, b)

    def test_resume_packed_preferences(self, prefs):
        cfg = D.BatchConfig(batch_size=3, length=64, packing=True, max_pairs=4)
        loader = _loader(prefs, seed=1, batch_config=cfg)
        next(loader), next(loader)
        state = loader.get_state()
        expected = [next(loader) for _ in range(6)]
        resumed = _loader(prefs, seed=1, batch_config=cfg)
        resumed.set_state(state)
        for a, b in zip(expected, [next(resumed) for _ in range(6)]):
            _same(a, b)

    def test_state_must_match_loader(self, sft):
        state = _loader(sft, seed=1).get_state()
        with pytest.raises(ValueError, match=r"seed=1 vs 2"):
            _loader(sft, seed=2).set_state(state)
        with pytest.raises(ValueError, match=r"shard_index=0 vs 1"):
            _loader(sft, seed=1, shard_index=1, shard_count=2).set_state(state)


class TestPackedLoader:
    def test_packed_sft_batches_use_every_example_once(self, sft):
        cfg = D.BatchConfig(batch_size=2, length=64, packing=True)
        loader = _loader(sft, seed=0, batch_config=cfg, num_epochs=1)
        seen = []
        for batch in loader:
            assert batch["input_ids"].shape == (2, 64)
            starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
            seen += [int(x) - 100 for x in batch["input_ids"][starts]]
            assert batch["segment_ids"].max() >= 1
        assert sorted(seen) == list(range(N))

    def test_packed_preferences_fixed_shapes(self, prefs):
        cfg = D.BatchConfig(batch_size=3, length=64, packing=True, max_pairs=4)
        loader = _loader(prefs, seed=0, batch_config=cfg, num_epochs=1)
        pairs = 0
        for batch in loader:
            assert batch["input_ids"].shape == (3, 64)
            assert batch["chosen_index"].shape == (4,)
            pairs += int(batch["pair_mask"].sum())
        assert pairs == N

    def test_sequence_longer_than_row(self, sft):
        cfg = D.BatchConfig(batch_size=2, length=8, packing=True)
        with pytest.raises(ValueError, match=r"records:\d+: sequence of \d+ tokens does not fit"):
            next(_loader(sft, batch_config=cfg))

    def test_packing_rejects_other_kinds(self, tok):
        ex = [D.TokenizedKTO(np.array([1]), np.array([2]), True, "a")]
        with pytest.raises(ValueError, match="packing supports"):
            _loader(ex, batch_config=D.BatchConfig(batch_size=1, length=8, packing=True))

    def test_packing_needs_length(self):
        with pytest.raises(ValueError, match="packing needs a fixed row length"):
            D.BatchConfig(batch_size=2, packing=True)
