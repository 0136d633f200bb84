"""`shuffle_permutation`: grain's global-shuffle permutation, index for index."""

import grain
import numpy as np
import pytest

from rlhf_jax import data as D


def _grain(n: int, seed: int) -> np.ndarray:
    ds = grain.MapDataset.range(n).shuffle(seed=seed)
    return np.asarray([ds[k] for k in range(n)], np.int64)


# Sizes around grain's block boundaries (16-bit minimum block, powers of two, odd bit counts)
# and seeds at both ends of the 32-bit range; both code paths (whole block, walk in range).
@pytest.mark.parametrize("n, seed", [
    (1, 0), (2, 5), (3, 7), (16, 0), (17, 2**32 - 1), (100, 18), (1024, 3), (1025, 12345),
    (5000, 2**31), (9000, 1), (65536, 4), (65537, 9), (70000, 2**32 - 2),
])
def test_matches_grains_shuffle(n, seed):
    order = D.shuffle_permutation(n, seed)
    assert order.dtype == np.int64 and order.shape == (n,)
    np.testing.assert_array_equal(order, _grain(n, seed))


def test_is_a_permutation_that_depends_on_the_seed():
    a, b = D.shuffle_permutation(300, 1), D.shuffle_permutation(300, 2)
    assert sorted(a.tolist()) == list(range(300)) and not np.array_equal(a, b)


def test_rejects_an_empty_range():
    with pytest.raises(ValueError, match="n=0"):
        D.shuffle_permutation(0, 1)
