"""The batched forms of the pruning pass's steps give the one-by-one forms' results bit for bit.

Scores, selections, masks and the removal record are computed over stacks of groups or weights
(one numpy call for thousands of small ones); the pass's written model must not change, so each
batched step is compared here with the per-item computation it replaces, on awkward inputs
(ties, NaN, zero means, mixed shapes and dtypes, non-contiguous weights).
"""

import json

import numpy as np
import pytest

from graphprune.dependency import DimKey, Group
from graphprune.dependency.dims import DimInfo
from graphprune.dependency.group import Member
from graphprune.pruning.apply import _removal_json, removal_masks
from graphprune.pruning.importance import _aggregate, _aggregate_all, _AxisNorms
from graphprune.pruning.selection import _lowest, _lowest_of_each


class _Consts:
    """What ``_AxisNorms`` asks of a dependency graph: constants, their shapes and known axes;
    counts the reads."""

    def __init__(self, values):
        self.values = values
        self.shapes = {name: value.shape for name, value in values.items()}
        self.reads = {}

    def const(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return self.values.get(name)

    def known(self, dim):
        return DimInfo(size=self.values[dim.tensor].shape[dim.axis])


def _weights(rng):
    shapes = [(32, 64), (64, 32), (17,), (8, 3, 3, 3), (16, 8, 3, 3), (5, 7, 9), (2, 300), (4096, 8)]
    values = {}
    for s, shape in enumerate(shapes):
        for k in range(7):
            spread = 10.0 ** rng.uniform(-20, 20, size=shape) if k % 2 else 1.0  # w^2 overflows some
            values[f"w{s}_{k}"] = (rng.standard_normal(shape) * spread).astype(np.float32)
    values["half"] = rng.standard_normal((32, 64)).astype(np.float16)
    values["double"] = rng.standard_normal((32, 64))
    values["fortran"] = np.asfortranarray(rng.standard_normal((32, 64)).astype(np.float32))
    return values


@pytest.mark.parametrize("power", [1, 2])
def test_prefetched_norms_equal_one_at_a_time(power):
    rng = np.random.default_rng(0)
    values = _weights(rng)
    dims = [DimKey(name, axis) for name, v in values.items() for axis in range(v.ndim)]
    alone, graph = _AxisNorms(_Consts(values), power), _Consts(values)
    batched = _AxisNorms(graph, power)
    with np.errstate(over="ignore"):
        batched.prefetch(dims)
        stacked = set(batched._cache)
        large = {"w7_" + str(k) for k in range(7)}  # 128 KiB each: sized, neither read nor stacked ahead
        assert {d.tensor for d in dims} - {d.tensor for d in stacked} == large and not large & graph.reads.keys()
        for dim in dims:
            assert batched(dim).tobytes() == alone(dim).tobytes(), dim
    assert max(graph.reads.values()) == 1  # each weight read once: the large ones are sized, not read, ahead
    if power == 2:
        assert any(not np.isfinite(batched(d)).all() for d in stacked)  # w^2 overflowed: inf, as alone


def _group(gid, channels, members):
    return Group(gid, channels, members, [])


def _member(name, channels, rng, identity=True):
    info = DimInfo(size=channels, param=True, role="weight")
    if identity:
        idx = np.arange(channels)
        return Member(DimKey(name, 0), info, idx, idx, True)
    positions = rng.permutation(channels)
    return Member(DimKey(name, 0), info, positions, np.arange(channels) % max(1, channels // 2))


def test_aggregate_all_equals_aggregate():
    rng = np.random.default_rng(1)
    scores, groups, members = {}, [], []
    for gid in range(60):
        channels = int(rng.choice([4, 16, 64]))
        count = int(rng.integers(0, 4))
        identity = gid % 7 != 3
        ms = []
        for j in range(count):
            name = f"g{gid}m{j}"
            kind = rng.integers(0, 6)
            vec = rng.random(channels).astype(np.float32) * 10.0 ** rng.uniform(-3, 3)
            if kind == 0:
                vec[:] = 0.0  # mean 0: the member is skipped
            elif kind == 1:
                vec[0] = np.nan  # mean NaN: skipped too
            elif kind == 2:
                vec[1] = np.inf
            scores[DimKey(name, 0)] = vec
            ms.append(_member(name, channels, rng, identity))
        groups.append(_group(gid, channels // 2 if not identity and ms else channels, ms))
        members.append(ms)
    with np.errstate(invalid="ignore", divide="ignore"):
        batched = _aggregate_all(groups, members, scores.get)
        alone = [_aggregate(g, ms, scores.get) for g, ms in zip(groups, members)]
    assert sum(r is None for r in alone) > 3 and sum(r is not None for r in alone) > 30
    for a, b in zip(alone, batched):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_lowest_of_each_equals_lowest():
    rng = np.random.default_rng(2)
    items = []
    for k in range(200):
        size = int(rng.choice([2, 8, 64]))
        scores = rng.integers(0, 4, size).astype(np.float64)  # many ties: lower index first
        if k % 9 == 0:
            scores[rng.integers(0, size)] = np.nan
        if k % 11 == 0:
            scores = scores.astype(np.float32)
        items.append((scores, int(rng.integers(-1, size + 2))))
    items.append(([3.0, 1.0, 2.0], 1))  # not an array: one at a time
    for (scores, count), mask in zip(items, _lowest_of_each(items)):
        expected = _lowest(np.asarray(scores), count)
        assert mask.dtype == bool and np.array_equal(mask, expected)


def test_removal_json_is_json_dumps():
    rng = np.random.default_rng(3)
    names = ["w", "\u00fc\u00e9x", 'q"uote\\', "tab\tx", "emoji\U0001f600", "10", "2", "", "conv.weight"]
    for _ in range(200):
        record = {}
        for name in rng.choice(names, size=rng.integers(0, len(names)), replace=False):
            axes = rng.choice([0, 1, 2, 3, 10], size=rng.integers(1, 4), replace=False)
            record[str(name)] = [(int(a), rng.random(int(rng.integers(0, 40))) < rng.random()) for a in axes]
        if len(record) > 2:  # members of one group share their mask (the text is made once)
            first, *_, last = record
            record[last] = [(a, record[first][0][1].copy()) for a, _ in record[last]]
        expected = {n: {str(a): np.flatnonzero(m).tolist() for a, m in axes} for n, axes in record.items()}
        assert _removal_json(record) == (json.dumps(expected, sort_keys=True) if expected else "")


def _reference_masks(groups, selected):
    """``removal_masks`` as written before its identity fast path."""
    by_id = {g.id: g for g in groups}
    masks = {}
    for gid, removed in selected.items():
        if not removed.any():
            continue
        for m in by_id[gid].members:
            mask = masks.get(m.dim)
            if mask is None:
                mask = masks[m.dim] = np.zeros(m.info.size, dtype=bool)
            mask[m.positions[removed[m.atoms]]] = True
    return masks


def test_removal_masks_fast_path():
    rng = np.random.default_rng(4)
    shared = DimInfo(size=8, param=False)
    groups = [
        _group(0, 8, [_member("a", 8, rng), _member("b", 8, rng)]),
        # a dim shared by two groups (a Concat's output): each adds its indices to one mask
        _group(1, 4, [_member("a", 8, rng, identity=False)]),
        _group(2, 4, [Member(DimKey("cat", 0), shared, np.arange(4), np.arange(4))]),
        _group(3, 4, [Member(DimKey("cat", 0), shared, np.arange(4, 8), np.arange(4))]),
    ]
    selected = {g.id: rng.random(g.channels) < 0.5 for g in groups}
    masks = removal_masks(groups, selected)
    assert masks.keys() == _reference_masks(groups, selected).keys()
    for dim, mask in _reference_masks(groups, selected).items():
        assert np.array_equal(masks[dim], mask)
    assert masks[DimKey("a", 0)] is not selected[0]  # its own array: group 1 added to it
