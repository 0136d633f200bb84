"""The hosts' data shares: which examples a loader read, their count over processes, and loader
states carried between process counts (`reshard_data_state`)."""

import numpy as np
import pytest

from rlhf_jax import data as D
from rlhf_jax.data import synthetic as S
from rlhf_jax.train.checkpoint import (
    DataStateError,
    gather_host_states,
    reshard_data_state,
    whole_stream_state,
)
from rlhf_jax.train.data import data_shares

N = 24


@pytest.fixture(scope="module")
def sft():
    tok = S.build_tokenizer()
    records = S.make_sft_dataset(S.get_task("topic"), num_examples=N, seed=0)
    examples, _ = D.load_examples(records, format="sft")
    tokenized, _ = D.tokenize_examples(examples, tok)
    # the first token tags each example with its index, so a batch shows which were read
    return [D.TokenizedSFT(np.r_[np.int32(100 + i), t.input_ids], np.r_[np.int32(0), t.loss_mask],
                           t.origin) for i, t in enumerate(tokenized)]


def _loader(examples, *, shard_index=0, shard_count=1, batch_size=4):
    return D.DataLoader(examples, pad_id=0, seed=3, shard_index=shard_index,
                        shard_count=shard_count,
                        batch_config=D.BatchConfig(batch_size=batch_size, length=64))


def _read(loader, batches):
    return [int(x) - 100 for _ in range(batches) for x in next(loader)["input_ids"][:, 0]]


def test_read_indices_are_the_examples_of_the_batches(sft):
    for shard in (0, 1):
        loader = _loader(sft, shard_index=shard, shard_count=2, batch_size=2)
        assert loader.read_indices().tolist() == []
        seen = _read(loader, 15)  # 30 examples: past the end of the first epoch
        assert loader.read_indices().tolist() == seen


def test_two_shares_are_disjoint_and_cover_an_epoch(sft):
    shares = [_loader(sft, shard_index=i, shard_count=2, batch_size=2) for i in (0, 1)]
    read = [set(_read(loader, 6)) for loader in shares]
    assert read[0].isdisjoint(read[1]) and read[0] | read[1] == set(range(N))
    counts = data_shares(shares[0])  # one process here: the share of process 0 alone
    assert counts == {"num_examples": N, "distinct_examples": 12, "read_by_several_processes": 0,
                      "per_process": [{"process": 0, "shard": "0/2", "examples_read": 12,
                                       "distinct_examples": 12}]}


def test_loader_states_move_between_process_counts(sft):
    two = [_loader(sft, shard_index=i, shard_count=2, batch_size=2) for i in (0, 1)]
    one = _loader(sft, batch_size=4)
    for loader in (*two, one):
        _read(loader, 3)
    states = [{"loader": s.get_state(), "skipped_steps": 1} for s in two]
    assert reshard_data_state(states, 0, 1) == {"loader": one.get_state(), "skipped_steps": 1}
    back = [reshard_data_state([{"loader": one.get_state(), "skipped_steps": 1}], i, 2)
            for i in (0, 1)]
    assert back == states
    # the resharded state continues the single process's stream exactly
    fresh = _loader(sft, batch_size=4)
    fresh.set_state(reshard_data_state(states, 0, 1)["loader"])
    assert _read(fresh, 2) == _read(one, 2)
    assert reshard_data_state(states, 1, 2) == states[1]
    assert gather_host_states(states[0]) == [states[0]]


def test_unequal_positions_or_values_cannot_be_resharded(sft):
    a, b = (_loader(sft, shard_index=i, shard_count=2, batch_size=2) for i in (0, 1))
    _read(a, 2)
    _read(b, 3)
    with pytest.raises(DataStateError, match=r"at positions \[4, 6\]"):
        reshard_data_state([a.get_state(), b.get_state()], 0, 1)
    _read(a, 1)
    with pytest.raises(DataStateError, match="12 examples read so far divide between 5 hosts"):
        reshard_data_state([a.get_state(), b.get_state()], 0, 5)
    with pytest.raises(DataStateError, match="skipped_steps differs between processes"):
        reshard_data_state([{"skipped_steps": 0}, {"skipped_steps": 2}], 0, 1)


def test_a_whole_stream_loader_resumes_on_any_process_count(sft):
    """The online trainers' prompts: every process reads the whole stream (shard 0 of 1), so
    the checkpoint of 1 or 2 such processes resumes on 2 or 1 at the same position."""
    read = _loader(sft, batch_size=4)
    _read(read, 3)
    state = {"loader": read.get_state(), "skipped_steps": 0}
    for stored, processes in (([state], 2), ([state, state], 1), ([state, state], 2)):
        for i in range(processes):
            resumed = whole_stream_state(reshard_data_state(stored, i, processes)["loader"])
            fresh = _loader(sft, batch_size=4)
            fresh.set_state(resumed)
            assert _read(fresh, 2) == _read(_continued(sft, state["loader"]), 2)
    assert whole_stream_state({"skipped_steps": 1}) == {"skipped_steps": 1}


def _continued(examples, loader_state):
    loader = _loader(examples, batch_size=4)
    loader.set_state(loader_state)
    return loader
