"""`PromptLoader`: in-memory prompt batches for the online trainers, deterministic and resumable."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_jax.data import PromptLoader


class TestPromptLoader:
    def test_resume_continues_the_same_order(self):
        data = {"prompt_ids": np.arange(20).reshape(10, 2), "prompt_mask": np.ones((10, 2))}
        a = PromptLoader(data, batch_size=3, seed=5)
        first = [next(a)["prompt_ids"] for _ in range(4)]
        state = a.get_state()
        rest = [next(a)["prompt_ids"] for _ in range(3)]
        b = PromptLoader(data, batch_size=3, seed=5)
        b.set_state(state)
        for x, y in zip(rest, [next(b)["prompt_ids"] for _ in range(3)]):
            np.testing.assert_array_equal(x, y)
        # one epoch (3 full batches) covers 9 distinct rows
        assert len({int(r[0]) for batch in first[:3] for r in batch}) == 9

    def test_unshuffled_epochs_repeat_the_stored_order_and_drop_the_partial_batch(self):
        data = {"prompt_ids": np.arange(7)[:, None], "prompt_mask": np.ones((7, 1)),
                "tag": np.arange(7) * 10}
        loader = PromptLoader(data, batch_size=3, shuffle=False)
        batches = [next(loader) for _ in range(4)]
        assert [b["prompt_ids"][:, 0].tolist() for b in batches] == [
            [0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]
        np.testing.assert_array_equal(batches[1]["tag"], [30, 40, 50])

    def test_missing_field_raises(self):
        with pytest.raises(ValueError, match="missing 'prompt_mask'"):
            PromptLoader({"prompt_ids": np.zeros((4, 2))}, batch_size=2)

    def test_batch_larger_than_the_set_raises(self):
        with pytest.raises(ValueError, match=r"batch_size=5 must be in \[1, 4\]"):
            PromptLoader({"prompt_ids": np.zeros((4, 2)), "prompt_mask": np.ones((4, 2))},
                         batch_size=5)
