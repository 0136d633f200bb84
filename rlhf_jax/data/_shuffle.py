"""grain's global-shuffle permutation of `n` indices, computed for all of them at once.

`grain.MapDataset.range(n).shuffle(seed=s)` reads index `k` as `index_shuffle(k, max_index=n -
1, seed=s, rounds=4)`: a 4-round Simon-style Feistel cipher on a block of `B` bits (`B =
max(ceil(log2(n - 1)) rounded up to even, 16)`, words of `W = B / 2` bits; round keys from C++'s
`std::seed_seq{s}`), applied again ("cycle walking") until the result is below `n`. Its C++
walks each index on its own, so a small dataset pays for the whole block: with `n = 16` the
cycle walk takes about 65536 / 16 cipher rounds per index (about 2 ms an index, 35 ms an
epoch, whatever `n`).

`shuffle_permutation` computes the same permutation with NumPy: the cipher over every index
of the block at once when the block is much larger than `n` (then each index's walk is a
chain through the block, followed by pointer doubling: `log2(2**B)` array steps), else over
`[0, n)` walking only the indices still out of range. The result is the same array as grain's,
index for index (`tests/test_data_loader.py` compares them).
"""

from __future__ import annotations

import functools
import math

import numpy as np

ROUNDS = 4
"""The rounds grain's shuffle uses (`index_shuffle(..., rounds=4)`)."""

MIN_BLOCK_BITS = 16
"""grain's smallest cipher block (`kMinBlockSize`)."""

_MASK32 = 0xFFFFFFFF


def block_bits(max_index: int) -> int:
    """The cipher's block size `B` in bits for a permutation of `[0, max_index]` (grain's
    rule: `ceil(log2(max_index))`, rounded up to even, at least 16, at most 64)."""
    bits = math.ceil(math.log2(max_index))
    return min(max(bits + bits % 2, MIN_BLOCK_BITS), 64)


@functools.lru_cache(maxsize=4096)
def round_keys(seed: int, rounds: int = ROUNDS) -> tuple[int, ...]:
    """The round keys of `seed`: `std::seed_seq{seed}.generate` of `rounds` 32-bit words (the
    algorithm of the C++ standard, [rand.util.seedseq])."""
    n, v = rounds, [seed & _MASK32]
    s = len(v)
    out = [0x8B8B8B8B] * n
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p = (n - t) // 2
    q = p + t
    m = max(s + 1, n)

    def mix(x: int) -> int:
        return x ^ (x >> 27)

    for k in range(m):
        r1 = (1664525 * mix(out[k % n] ^ out[(k + p) % n] ^ out[(k - 1) % n])) & _MASK32
        if k == 0:
            r2 = r1 + s
        elif k <= s:
            r2 = r1 + k % n + v[k - 1]
        else:
            r2 = r1 + k % n
        r2 &= _MASK32
        out[(k + p) % n] = (out[(k + p) % n] + r1) & _MASK32
        out[(k + q) % n] = (out[(k + q) % n] + r2) & _MASK32
        out[k % n] = r2
    for k in range(m, m + n):
        r3 = (1566083941 * mix((out[k % n] + out[(k + p) % n] + out[(k - 1) % n]) & _MASK32)
              ) & _MASK32
        r4 = (r3 - k % n) & _MASK32
        out[(k + p) % n] ^= r3
        out[(k + q) % n] ^= r4
        out[k % n] = r4
    return tuple(out)


def _encrypt(x: np.ndarray, keys: tuple[int, ...], word: int) -> np.ndarray:
    """The Feistel cipher on blocks `x` (uint64) of `2 * word` bits: left word `x >> word`,
    right word the low bits; per pair of keys `(k1, k2)`: `left ^= f(right) ^ k1`, `right ^=
    f(left) ^ k2` with `f(v) = (rotl(v, 1) & rotl(v, 8)) ^ rotl(v, 2)` on `word` bits."""
    mask = np.uint64((1 << word) - 1)
    w = np.uint64(word)

    def rotl(v, r):
        r = np.uint64(r)
        return ((v << r) | (v >> (w - r))) & mask

    def f(v):
        return (rotl(v, 1) & rotl(v, 8)) ^ rotl(v, 2)

    left, right = (x >> w) & mask, x & mask
    for i in range(0, len(keys), 2):
        left ^= f(right) ^ (np.uint64(keys[i]) & mask)
        right ^= f(left) ^ (np.uint64(keys[i + 1]) & mask)
    return (left << w) | right


def shuffle_permutation(n: int, seed: int) -> np.ndarray:
    """`[n]` int64: `order[k]` is the index at position `k` of grain's shuffle of `range(n)`
    with `seed` (`grain.MapDataset.range(n).shuffle(seed=seed)[k]`), for `0 <= seed < 2**32`."""
    if n < 1:
        raise ValueError(f"shuffle_permutation: n={n} must be >= 1")
    if n == 1:
        return np.zeros(1, np.int64)
    max_index = n - 1
    bits = block_bits(max_index)
    keys = round_keys(int(seed))
    word = bits // 2
    if bits <= 22 and (1 << bits) > 8 * n:
        # Cycle walks are long: the cipher over the whole block, then each index's first
        # successor in range by pointer doubling over the block.
        ptr = _encrypt(np.arange(1 << bits, dtype=np.uint64), keys, word).astype(np.int64)
        # Invariant: index x's answer is ptr[x] when in range, else the answer of ptr[x].
        for _ in range(bits + 1):
            out = ptr > max_index
            if not out[:n].any():
                break
            ptr = np.where(out, ptr[ptr], ptr)
        order = ptr[:n]
    else:
        order = _encrypt(np.arange(n, dtype=np.uint64), keys, word)
        out = order > max_index
        while out.any():
            order[out] = _encrypt(order[out], keys, word)
            out = order > max_index
        order = order.astype(np.int64)
    return order
