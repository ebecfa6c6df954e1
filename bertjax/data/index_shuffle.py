"""grain's index shuffle, vectorised: the order of `grain.MapDataset.range(n).shuffle(seed).repeat()` for a whole batch at once.

The loader's order of instances is grain's: position g of the endless training stream holds instance
`index_shuffle(g % n, max_index=n - 1, seed=(seed + g // n) % 2**32, rounds=4)`, grain's C++ cycle-walking
Simon cipher (grain/_src/python/experimental/index_shuffle/index_shuffle.cc) with a new seed each epoch.
Asking grain's dataset for it costs ~20 us an element in Python (its shuffle, repeat, slice and batch layers,
each with a stats context), which was ~45% of a batch's assembly at length 128 and batch 256. Here the
same cipher runs on numpy uint64 arrays, a batch in one go.

The algorithm, as grain's C++ has it:
  - round keys: `std::seed_seq{seed}.generate(4 words)` (the C++ standard's seed_seq, [rand.util.seedseq]);
  - block size B = max(ceil(log2(max_index)) rounded up to even, 16) bits, word W = B / 2;
  - encrypt: left = value >> W, right = value mod 2**W; per key pair (k1, k2):
    left ^= F(right) ^ k1; right ^= F(left) ^ k2, with F(x) = (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2) on W bits
    (keys truncated to W bits); value = left << W | right;
  - cycle walking: encrypt again until the value is <= max_index.
`matches_grain()` checks this against grain's own function; `shuffle()` calls grain per element below
NUMPY_MIN instances (cycle walking is many passes there) and if they ever disagree (a grain release that changes its cipher), so the order is always grain's.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np

log = logging.getLogger(__name__)

ROUNDS = 4
_MASK32 = 0xFFFFFFFF
# Up to this many instances, an epoch's whole permutation is computed once (vectorised, ~0.3 s and 16 MB at the
# limit) and a batch is a gather from it; above it, each batch's positions are enciphered on their own.
# Cycle walking makes the per-batch path slow for small counts (the cipher's block is at least 16 bits, so
# at 1,000 instances ~65 encryptions an element), which is where the whole permutation is cheapest.
WHOLE_PERMUTATION_MAX = 1 << 22
# Below this many instances grain's C++ is called per element: the cipher's block is at least 16 bits, so
# cycle walking takes ~65,536 / n encryptions an element, which vectorised numpy would run as that many passes.
NUMPY_MIN = 1 << 14


def _grain_index_shuffle():
    from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

    return index_shuffle_module.index_shuffle


@functools.lru_cache(maxsize=64)
def round_keys(seed: int, rounds: int = ROUNDS) -> tuple[int, ...]:
    """`std::seed_seq{seed}.generate(rounds words)`: the C++ standard's algorithm, one 32-bit seed word."""
    n, s, v = rounds, 1, (seed & _MASK32,)
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p = (n - t) // 2
    q = p + t
    m = max(s + 1, n)
    out = [0x8B8B8B8B] * n

    def T(x: int) -> int:
        return x ^ (x >> 27)

    for k in range(m):
        r1 = (1664525 * T(out[k % n] ^ out[(k + p) % n] ^ out[(k - 1) % n])) & _MASK32
        extra = s if k == 0 else (k % n + v[k - 1]) if k <= s else k % n
        r2 = (r1 + extra) & _MASK32
        out[(k + p) % n] = (out[(k + p) % n] + r1) & _MASK32
        out[(k + q) % n] = (out[(k + q) % n] + r2) & _MASK32
        out[k % n] = r2
    for k in range(m, m + n):
        r3 = (1566083941 * T((out[k % n] + out[(k + p) % n] + out[(k - 1) % n]) & _MASK32)) & _MASK32
        r4 = (r3 - k % n) & _MASK32
        out[(k + p) % n] ^= r3
        out[(k + q) % n] ^= r4
        out[k % n] = r4
    return tuple(out)


def _word_bits(max_index: int) -> int:
    block = math.ceil(math.log2(max_index))
    block = max(block + block % 2, 16)
    return 32 if block > 62 else block // 2  # grain's C++ handles blocks up to 62 bits, then 64


def _encrypt(values: np.ndarray, keys: tuple[int, ...], w: int) -> np.ndarray:
    mask = np.uint64((1 << w) - 1)
    shift = np.uint64(w)

    def rotl(x, r):
        return ((x << np.uint64(r)) | (x >> np.uint64(w - r))) & mask

    def f(x):
        return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

    left = (values >> shift) & mask
    right = values & mask
    for i in range(0, len(keys), 2):
        left = left ^ f(right) ^ np.uint64(keys[i] & int(mask))
        right = right ^ f(left) ^ np.uint64(keys[i + 1] & int(mask))
    return (left << shift) | right


def _shuffle_numpy(index: np.ndarray, max_index: int, seed: int) -> np.ndarray:
    if max_index == 0:
        return np.zeros_like(index)
    keys = round_keys(seed % 2**32)
    w = _word_bits(max_index)
    values = index.astype(np.uint64)
    out = _encrypt(values, keys, w)
    walking = out > np.uint64(max_index)
    while walking.any():
        out[walking] = _encrypt(out[walking], keys, w)
        walking = out > np.uint64(max_index)
    return out.astype(np.int64)


@functools.lru_cache(maxsize=None)
def matches_grain() -> bool:
    """Whether this module gives grain's index_shuffle, on a few thousand indices over several sizes and seeds."""
    try:
        reference = _grain_index_shuffle()
    except ImportError:  # pragma: no cover - grain always ships it today
        return False
    for max_index in (NUMPY_MIN, 65535, 65536, 70001, 2**20 + 3, 2**33 + 1):
        for seed in (0, 1, 2**32 - 1):
            index = np.unique(np.linspace(0, max_index, 97).astype(np.int64))
            expected = [reference(int(i), max_index=max_index, seed=seed, rounds=ROUNDS) for i in index]
            if _shuffle_numpy(index, max_index, seed).tolist() != expected:
                log.warning("bertjax.data.index_shuffle differs from grain's index_shuffle (max_index=%d, seed=%d): "
                            "calling grain's per element (slower, same order)", max_index, seed)
                return False
    return True


def shuffle(index: np.ndarray, max_index: int, seed: int) -> np.ndarray:
    """`grain`'s `index_shuffle(i, max_index, seed, rounds=4)` for every i in `index` (int64 in [0, max_index])."""
    index = np.asarray(index, np.int64)
    if max_index >= NUMPY_MIN and matches_grain():
        return _shuffle_numpy(index, max_index, seed)
    reference = _grain_index_shuffle()
    return np.array([reference(int(i), max_index=max_index, seed=seed % 2**32, rounds=ROUNDS) for i in index.ravel()], np.int64).reshape(index.shape)


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def permutation(count: int, seed: int) -> np.ndarray:
    """The whole permutation of range(count) for one seed: `shuffle(arange(count), count - 1, seed)`."""
    order = shuffle(np.arange(count, dtype=np.int64), count - 1, seed)
    return order.astype(np.int32 if count <= np.iinfo(np.int32).max else np.int64)


def epoch_order(positions: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(instance ids, epochs) at these positions of `MapDataset.range(count).shuffle(seed).repeat()`.

    Each epoch is a new permutation (seed + epoch), as grain's repeat reshuffles each epoch.
    """
    positions = np.asarray(positions, np.int64)
    epochs, within = np.divmod(positions, count)
    ids = np.empty_like(positions)
    for epoch in (epochs[:1] if epochs.size and epochs[0] == epochs[-1] else np.unique(epochs)):
        where = epochs == epoch
        epoch_seed = (seed + int(epoch)) % 2**32
        if count <= WHOLE_PERMUTATION_MAX:
            ids[where] = permutation(count, epoch_seed)[within[where]]
        else:
            ids[where] = shuffle(within[where], count - 1, epoch_seed)
    return ids, epochs
