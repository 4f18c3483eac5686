"""The ``count`` smallest magnitudes over many weights, found without holding them all (radix select).

A global magnitude threshold ranks every selected weight at once.  Concatenating their magnitudes
holds a copy of all of them (a 6 GB model needs 6 GB more); here the weights are read one at a time,
a few times over: the magnitudes' bit patterns (non-negative floats order like unsigned integers)
are histogrammed 16 bits at a time, from the top, narrowing to the bin that holds the ``count``-th
smallest, until its exact value is known; the last pass keeps each weight's digits in that bin and
its count below the bin, which give the magnitudes below the value and the ties per weight.  The result is what ``masks._smallest`` picks from the concatenation: ties go to the
earlier position (earlier weight, then earlier index), and NaN sorts after everything.

Memory: one weight and one histogram of 2^16 counts at a time, plus the last pass's digits under
the known prefix (a small slice of the weights, at most 2^24 of them).  Time: ``bits / 16`` reads
of every weight (2 for float32; one more when that slice is larger), each a few numpy passes over
one weight.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["LazyWeights", "smallest_counts", "IN_MEMORY_LIMIT"]

# Below this many weights in total the magnitudes are concatenated (one partition, faster than
# three reads); above it they are streamed.
IN_MEMORY_LIMIT = 2**24

_DIGIT_BITS = 16
_KEEP_LIMIT = 2**24  # digits kept by the last pass (32 MB) before it falls back to a counting pass
_BUFFER = 2**22  # digits of small weights are histogrammed together: one bincount per 4M, not per weight
_SMALL = 2**16  # weights below this many items are keyed together, up to _GATHER items at once
_GATHER = 2**20


@dataclasses.dataclass(frozen=True)
class LazyWeights:
    """Weights read on demand.

    Attributes:
        sizes: element count of each weight.
        dtypes: numpy dtype of each weight (floating).
        load: index -> the weight's values (any shape); called once per pass, so it may read from disk.
        owned: ``load`` returns a fresh array each call, which the selection may overwrite (one
            layer-sized temporary fewer per pass: each costs page faults, most of a pass's CPU time);
            an array it returns read-only (one it hands out again) is never overwritten.
    """

    sizes: Sequence[int]
    dtypes: Sequence[np.dtype]
    load: Callable[[int], np.ndarray]
    owned: bool = False

    @classmethod
    def of(cls, arrays: Sequence[np.ndarray]) -> "LazyWeights":
        return cls([a.size for a in arrays], [a.dtype for a in arrays], arrays.__getitem__)


def smallest_counts(weights: LazyWeights, layers: Sequence[int], count: int,
                    in_memory_limit: Optional[int] = None) -> List[int]:
    """For the ``count`` smallest magnitudes over ``layers`` (concatenated in that order, ties to
    the earlier position), how many lie in each of those layers."""
    sizes = [int(weights.sizes[i]) for i in layers]
    total = sum(sizes)
    if count <= 0:
        return [0] * len(layers)
    if count >= total:
        return sizes
    if total <= (IN_MEMORY_LIMIT if in_memory_limit is None else in_memory_limit):
        return _in_memory(weights, layers, sizes, count)
    # float16 and float32 compare exactly as the widest float among them: one key width for all.
    dtype = np.result_type(*[weights.dtypes[i] for i in layers])
    if dtype not in (np.float16, np.float32, np.float64):
        return _in_memory(weights, layers, sizes, count)
    bits = dtype.itemsize * 8
    levels = bits // _DIGIT_BITS
    prefix, rank = 0, count  # the known top bits of the count-th key; its rank among keys with them
    kept: Optional[List[Tuple[int, np.ndarray]]] = None
    for level in range(levels):
        shift = bits - _DIGIT_BITS * (level + 1)
        # The last pass keeps each layer's digits under the known prefix (a small slice of the
        # weights) and its count below the prefix: the per-layer counts then need no further read.
        kept = [] if level == levels - 1 and level else None
        hist = _digit_histogram(weights, layers, dtype, prefix, level, shift, kept)
        cumulative = np.cumsum(hist)
        digit = int(np.searchsorted(cumulative, rank))  # first bin whose cumulative count reaches rank
        rank -= int(cumulative[digit - 1]) if digit else 0
        prefix = (prefix << _DIGIT_BITS) | digit
    below, tied = [], []
    if kept is not None and len(kept) == len(layers):
        low = np.uint16(prefix & (2**_DIGIT_BITS - 1))
        for under_prefix, digits in kept:
            below.append(under_prefix + int(np.count_nonzero(digits < low)))
            tied.append(int(np.count_nonzero(digits == low)))
        del kept
    else:  # float16 (one pass), or the slice under the prefix was too large to keep
        threshold = _unsigned(dtype).type(prefix)
        for i in layers:
            keys = _keys(weights.load(i), dtype, weights.owned)
            below.append(int(np.count_nonzero(keys < threshold)))
            tied.append(int(np.count_nonzero(keys == threshold)))
            del keys
    counts, ties_left = [], count - sum(below)
    for under, equal in zip(below, tied):
        take = min(equal, ties_left)  # ties to the earlier layer, as in the concatenation's order
        ties_left -= take
        counts.append(under + take)
    return counts


def _in_memory(weights: LazyWeights, layers: Sequence[int], sizes: List[int], count: int) -> List[int]:
    from graphprune.sparsity.masks import _smallest

    magnitudes = np.concatenate([np.abs(weights.load(i)).ravel() for i in layers])
    chosen = _smallest(magnitudes, count)
    del magnitudes  # as large as all the weights: freed before the per-layer counts
    ends = np.cumsum(sizes)
    return [int(np.count_nonzero(chosen[end - size:end])) for size, end in zip(sizes, ends)]


def _unsigned(dtype: np.dtype) -> np.dtype:
    return np.dtype(f"u{dtype.itemsize}")


def _keys(weight: np.ndarray, dtype: np.dtype, owned: bool = False) -> np.ndarray:
    """Unsigned integers that order as the magnitudes of ``weight`` (every NaN equal and last); a
    new array, or ``weight``'s own memory when ``owned`` and of ``dtype``."""
    weight = np.asarray(weight)
    if owned and weight.dtype == dtype and weight.flags.writeable and weight.flags.c_contiguous:
        magnitudes = np.abs(weight, out=weight).ravel()
    else:
        magnitudes = np.abs(weight.astype(dtype, copy=False)).ravel()
    keys = magnitudes.view(_unsigned(dtype))
    if np.isnan(magnitudes.max(initial=0)):  # max propagates NaN: no mask built when there is none
        keys[np.isnan(magnitudes)] = np.iinfo(keys.dtype).max
    return keys


def _digit_histogram(weights: LazyWeights, layers: Sequence[int], dtype: np.dtype, prefix: int,
                     level: int, shift: int, kept: Optional[List[Tuple[int, np.ndarray]]] = None) -> np.ndarray:
    """Counts of each 16-bit digit at ``shift`` among the keys whose higher bits equal ``prefix``.

    With ``kept`` (a list, at levels > 0) each layer's (count of keys whose higher bits are below
    ``prefix``, its digits) is appended, up to ``_KEEP_LIMIT`` digits in all; past it the list is
    emptied and left short of the layers.

    Small weights (below ``_SMALL`` items) are gathered into one buffer and their digits found
    together: a few numpy calls per weight cost more than its arithmetic (a 20,000-node graph's
    10,000 weights of 2,048: half of the ranking's time).
    """
    hist = np.zeros(2**_DIGIT_BITS, dtype=np.int64)
    state = {"pending": [], "buffered": 0, "keeping": kept is not None, "kept_size": 0}

    def add(digit_groups: List[Tuple[int, np.ndarray]]) -> None:
        nonlocal hist
        for under, digits in digit_groups:
            if state["keeping"]:
                kept.append((under, digits))
                state["kept_size"] += digits.size
                if state["kept_size"] > _KEEP_LIMIT:
                    kept.clear()
                    state["keeping"] = False
            state["pending"].append(digits)
            state["buffered"] += digits.size
        if state["buffered"] >= _BUFFER:
            hist += _bincount(state["pending"])
            state["pending"], state["buffered"] = [], 0

    batch: List[np.ndarray] = []  # small weights waiting, at most _GATHER items in all
    batched = 0
    for i in layers:
        size = int(weights.sizes[i])
        if size >= _SMALL:
            if batch:
                add(_digits(batch, dtype, prefix, level, shift, state["keeping"]))
                batch, batched = [], 0
            add(_digits([weights.load(i)], dtype, prefix, level, shift, state["keeping"], weights.owned))
            continue
        if batch and batched + size > _GATHER:
            add(_digits(batch, dtype, prefix, level, shift, state["keeping"]))
            batch, batched = [], 0
        batch.append(weights.load(i))
        batched += size
    if batch:
        add(_digits(batch, dtype, prefix, level, shift, state["keeping"]))
    if state["pending"]:
        hist += _bincount(state["pending"])
    return hist


def _digits(arrays: List[np.ndarray], dtype: np.dtype, prefix: int, level: int, shift: int, counting: bool,
            owned: bool = False) -> List[Tuple[int, np.ndarray]]:
    """For each array: (its count of keys whose bits above this digit are below ``prefix`` when
    ``counting`` at levels > 0, else 0; its digits at ``shift`` among the keys with bits ``prefix``
    above).  Several arrays are keyed as one (their magnitudes gathered into one buffer)."""
    udtype = _unsigned(dtype)
    if len(arrays) == 1:
        keys = _keys(arrays[0], dtype, owned)
    else:
        magnitudes = np.empty(sum(int(a.size) for a in arrays), dtype=dtype)
        at = 0
        for a in arrays:
            np.abs(np.asarray(a).reshape(-1), out=magnitudes[at:at + a.size])  # casts (float16 up) as _keys does
            at += a.size
        keys = _keys(magnitudes, dtype, owned=True)
    sizes = [int(a.size) for a in arrays]
    unders = [0] * len(arrays)
    if level:
        high = keys >> udtype.type(shift + _DIGIT_BITS)
        if counting:
            unders = _per_array(high < udtype.type(prefix), sizes)
        selected = high == udtype.type(prefix)
        del high
        sizes = _per_array(selected, sizes)  # each array's share of the selected keys, in order
        keys = keys[selected]
        del selected
    np.right_shift(keys, udtype.type(shift), out=keys)  # keys are ours: no second array
    digits = keys.astype(np.uint16)  # the cast drops the higher bits
    del keys
    if len(arrays) == 1:
        return [(unders[0], digits)]
    ends = np.cumsum(sizes)
    return [(under, digits[end - size:end]) for under, size, end in zip(unders, sizes, ends.tolist())]


def _per_array(flags: np.ndarray, sizes: List[int]) -> List[int]:
    """How many of ``flags`` are set within each consecutive run of ``sizes`` items (a count per
    run: faster than a cumulative sum or ``reduceat`` over the whole batch)."""
    counts, at = [], 0
    for size in sizes:
        counts.append(int(np.count_nonzero(flags[at:at + size])))
        at += size
    return counts


def _bincount(digits: List[np.ndarray]) -> np.ndarray:
    joined = digits[0] if len(digits) == 1 else np.concatenate(digits)
    hist = np.zeros(2**_DIGIT_BITS, dtype=np.int64)
    for start in range(0, joined.size, _BUFFER):  # bincount casts to intp: 8 bytes an item, so in slices
        hist += np.bincount(joined[start:start + _BUFFER], minlength=2**_DIGIT_BITS)
    return hist
