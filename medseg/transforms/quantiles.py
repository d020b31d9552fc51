"""Exact percentiles of a large float32 volume without copying it.

``np.percentile`` flattens and partitions a copy of its input: for the MR preset's 0.5 and
99.5 percentiles of a 512x512x600 float32 volume, a 0.63 GB copy (the run's peak went from
1.73 to 1.45 GB without it, ``benchmarks/memory.py --preset mr``).
:func:`percentiles` gives the same numbers (numpy's "linear" method, float64 results; bit
for bit, except that a zero may come back as -0.0 where numpy gives 0.0 or the reverse:
numpy's partition leaves either zero at a rank, this selection orders -0.0 first) from two
passes over the volume a slab at a time: the order statistics it needs are found by a radix
selection on the float32 values' bit patterns (a histogram of their top 16 bits, then of the
low 16 bits inside the bins that hold the wanted ranks), and numpy's interpolation
arithmetic is then applied to them. Extra memory: a few 2**16-bin histograms and one slab.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

# Elements per slab (16 MB of float32): the temporaries of one pass.
_SLAB_ELEMENTS = 2**22
_BINS = 2**16


def percentiles(x: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """``np.percentile(x, qs)`` (float64, one value per q in the sequence ``qs``) for a float32
    ``x`` of any shape and strides, without a copy of ``x``. NaN-free input (``checked``
    volumes are); other dtypes, and a ``qs`` that is not a sequence, are handed to numpy."""
    if x.dtype != np.float32 or x.size == 0 or np.ndim(qs) != 1:
        return np.percentile(x, qs)
    if not all(0 <= q <= 100 for q in qs):  # also refuses NaN
        raise ValueError(f"Percentiles must be in the range [0, 100], got {list(qs)}")
    n = x.size
    # numpy's "linear" method: the same operations in the same order and types.
    virtual = (n - 1) * np.true_divide(np.asarray(qs, dtype=np.float64), 100)
    previous = np.floor(virtual)
    following = previous + 1
    above, below = virtual >= n - 1, virtual < 0
    previous[above], following[above] = -1, -1
    previous[below], following[below] = 0, 0
    previous, following = previous.astype(np.intp), following.astype(np.intp)
    wanted = sorted({int(i) % n for i in (*previous, *following)})
    found = dict(zip(wanted, order_statistics(x, wanted)))
    a = np.array([found[int(i) % n] for i in previous], dtype=np.float32)
    b = np.array([found[int(i) % n] for i in following], dtype=np.float32)
    gamma = np.asanyarray(virtual - previous, dtype=virtual.dtype)
    difference = b - a
    result = np.add(a, difference * gamma)
    np.subtract(b, difference * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe", dtype=result.dtype)
    return result


def order_statistics(x: np.ndarray, ranks: Sequence[int]) -> list[np.float32]:
    """The ``ranks``-th smallest values (0-based) of float32 ``x``, exactly, in two passes."""
    counts = np.zeros(_BINS, dtype=np.int64)
    for keys in _key_slabs(x):
        counts += np.bincount(keys >> 16, minlength=_BINS)
    below = np.cumsum(counts)
    high = [int(np.searchsorted(below, r, side="right")) for r in ranks]
    low_counts = {h: np.zeros(_BINS, dtype=np.int64) for h in set(high)}
    for keys in _key_slabs(x):
        top = keys >> 16
        for h, histogram in low_counts.items():
            histogram += np.bincount(keys[top == h] & 0xFFFF, minlength=_BINS)
    values = []
    for rank, h in zip(ranks, high):
        within = rank - int(below[h] - counts[h])
        low = int(np.searchsorted(np.cumsum(low_counts[h]), within, side="right"))
        values.append(_value((h << 16) | low))
    return values


def _key_slabs(x: np.ndarray) -> Iterator[np.ndarray]:
    """uint32 keys of ``x``'s values, a slab at a time, ordered as the floats are: the sign
    bit flipped for positives, every bit for negatives (IEEE 754 sign-magnitude to an
    unsigned order)."""
    x = x.reshape(1) if x.ndim == 0 else x
    step = max(1, _SLAB_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))
    for start in range(0, x.shape[0], step):
        # A copy of one slab only (x may be any strided view: a reshape could copy it all).
        bits = np.ascontiguousarray(x[start : start + step]).view(np.uint32).ravel()
        yield np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))


def _value(key: int) -> np.float32:
    """The float32 whose key (:func:`_key_slabs`) is ``key``."""
    bits = key ^ 0x80000000 if key >= 0x80000000 else ~key & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]
