"""Channel importance: one score per channel of a group, aggregated over every member it touches."""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from graphprune.dependency import DependencyGraph, DimKey, Group

__all__ = ["CRITERIA", "DATA_CRITERIA", "group_scores", "wanda_norms"]

CRITERIA = ("l1", "l2", "bn", "activation", "output", "wanda")
# Criteria that measure the model on calibration samples.
DATA_CRITERIA = ("activation", "output", "wanda")
# Constants whose magnitude says how much a channel matters (not biases, statistics, divisors).
_MAGNITUDE_ROLES = ("weight", "norm_scale")


# Constants up to this many bytes are reduced in stacks of one shape (a numpy call per stack, not
# four per constant: 10,000 small weights cost 0.25 s one by one); larger ones one at a time,
# where the arithmetic dominates anyway.
_STACK_BYTES = 2**16
# Bytes of one stack: bounds the temporary copy (and its |w| or w^2 in place) whatever the model.
_CHUNK_BYTES = 2**21
_FLOAT32 = np.dtype(np.float32)


class _AxisNorms:
    """Per-index magnitude of constants along their channel axes, cached per (tensor, axis).

    The elementwise |w| (or w^2) of a tensor is computed once and reduced for every axis of it the
    graph knows, then dropped: memory stays O(channels), not a second copy of every weight.
    ``prefetch`` computes the axes asked for ahead, the small constants stacked by shape.
    """

    def __init__(self, dep: DependencyGraph, power: int):
        self.dep = dep
        self.power = power
        self._cache: Dict[DimKey, np.ndarray] = {}

    def _magnitude(self, w: np.ndarray, out=None) -> np.ndarray:
        return np.abs(w, out=out) if self.power == 1 else np.square(w, out=out)

    def __call__(self, dim: DimKey) -> np.ndarray:
        if dim not in self._cache:
            self._norms(dim.tensor, self.dep.const(dim.tensor), (dim.axis,))
        return self._cache[dim]

    def _norms(self, name: str, value, required) -> None:
        """Cache the norms of constant ``name`` (its ``value``) along the ``required`` axes and every
        other axis the graph knows as prunable."""
        mag = self._magnitude(np.asarray(value, dtype=np.float32))
        for axis in range(mag.ndim):
            key = DimKey(name, axis)
            info = self.dep.known(key)  # blocked axes are never scored: not summed
            if axis in required or (info is not None and not info.fixed and not info.reasons):
                other = tuple(a for a in range(mag.ndim) if a != axis)
                self._cache[key] = mag.sum(axis=other) if other else mag

    def prefetch(self, dims: Iterable[DimKey]) -> None:
        """Compute the norms of ``dims`` now: each small C-ordered constant joins a stack of the
        constants of its shape asking for the same axes, reduced at once when full.  Each row of a
        stack's sum is bit for bit the sum of that constant alone (the same additions in the same
        order: the stack axis only repeats the loop), so the scores do not depend on the batching."""
        wanted: Dict[str, List[int]] = {}
        for dim in dims:
            if dim not in self._cache:
                axes = wanted.setdefault(dim.tensor, [])
                if dim.axis not in axes:
                    axes.append(dim.axis)
        if not wanted:
            return
        scratch = np.empty(_CHUNK_BYTES // 4, dtype=np.float32)  # every stack's place: pages touched once
        stacks: Dict[tuple, List[Tuple[str, np.ndarray]]] = {}
        small: Dict[Optional[tuple], bool] = {}  # shape -> whether it is stacked (judged once a shape)
        for name, axes in wanted.items():
            shape = self.dep.shapes.get(name)  # sized before reading: a large weight is read once, when asked
            stacked = small.get(shape)
            if stacked is None:
                stacked = small[shape] = shape is not None and all(isinstance(d, int) for d in shape) and (
                    math.prod(shape) * 4 <= _STACK_BYTES)
            if not stacked:
                continue
            w = self.dep.const(name)
            if w is None:
                continue  # one at a time when asked: it fails there, as before
            if w.dtype is not _FLOAT32:  # (``!=`` against the type costs a microsecond a weight)
                w = np.asarray(w, dtype=np.float32)
            if w.nbytes > _STACK_BYTES or not w.ndim or not w.flags.c_contiguous:  # laid out otherwise: alone
                self._norms(name, w, axes)
                continue
            key = (w.shape, tuple(axes) if len(axes) == 1 else tuple(sorted(axes)))
            stack = stacks.setdefault(key, [])
            stack.append((name, w))
            if (len(stack) + 1) * w.size > scratch.size:  # full: reduced now (copies held only this long)
                self._reduce(key, stacks.pop(key), scratch)
        for key, stack in stacks.items():
            self._reduce(key, stack, scratch)

    def _reduce(self, key: tuple, stack: List[Tuple[str, np.ndarray]], scratch: np.ndarray) -> None:
        """The norms of the constants of ``stack`` (one shape) along ``key``'s axes, from one array."""
        shape, axes = key
        # joined along axis 0 into the scratch: the layout of a stack, without np.stack's view per array
        flat = scratch[: len(stack) * math.prod(shape)]
        np.concatenate([w for _, w in stack], axis=0, out=flat.reshape(len(stack) * shape[0], *shape[1:]))
        mag = flat.reshape(len(stack), *shape)
        self._magnitude(mag, out=mag)
        for axis in axes:
            other = tuple(a + 1 for a in range(len(shape)) if a != axis)
            reduced = mag.sum(axis=other) if other else mag.copy()  # rows outlive the scratch array
            self._cache.update(zip([DimKey(name, axis) for name, _ in stack], reduced))


def _aggregate(group: Group, members, per_index: Callable[[DimKey], np.ndarray]) -> Optional[np.ndarray]:
    """Sum over members of each member's per-channel score, each normalized to mean 1.

    Normalizing keeps one large tensor (a 3x3 conv's weight) from drowning the others (the BN
    scale, the consumer's input channels) whatever their scales.
    """
    total = np.zeros(group.channels, dtype=np.float64)
    used = 0
    for m in members:
        if m.identity:  # what the bincount below gives when index k is channel k: the values themselves
            per_channel = np.asarray(per_index(m.dim), dtype=np.float64)
        else:
            per_channel = np.bincount(m.atoms, weights=per_index(m.dim)[m.positions], minlength=group.channels)
        mean = per_channel.sum() / per_channel.size  # what ``mean()`` computes, without its Python layer
        if mean > 0:
            total += per_channel / mean
            used += 1
    return total if used else None


def _aggregate_all(
    groups: List[Group], members: List[list], per_index: Callable[[DimKey], np.ndarray]
) -> List[Optional[np.ndarray]]:
    """``_aggregate`` of each group with its members, the same numbers: groups whose members all
    map index k to channel k are stacked by (channels, member count) and summed in one pass per
    member position (per row the same divisions and additions in the same order, a skipped
    member adding nothing: 0.0 added to a total that starts at +0.0 leaves it bit for bit).
    The rest go one by one."""
    out: List[Optional[np.ndarray]] = [None] * len(groups)
    batches: Dict[Tuple[int, int], List[int]] = {}
    for i, (group, ms) in enumerate(zip(groups, members)):
        if ms and all(m.identity for m in ms):
            batches.setdefault((group.channels, len(ms)), []).append(i)
        else:
            out[i] = _aggregate(group, ms, per_index)
    for (channels, count), rows in batches.items():
        vectors = [per_index(m.dim) for i in rows for m in members[i]]
        if len(rows) == 1 or any(v.shape != (channels,) for v in vectors):  # odd sizes: as they always went
            for i in rows:
                out[i] = _aggregate(groups[i], members[i], per_index)
            continue
        values = np.concatenate(vectors).astype(np.float64, copy=False).reshape(len(rows), count, channels)
        means = values.sum(axis=2) / channels
        used = means > 0  # False for NaN too, as in ``_aggregate``
        total = np.zeros((len(rows), channels), dtype=np.float64)
        share = np.zeros_like(total)
        for j in range(count):
            share.fill(0.0)
            np.divide(values[:, j], means[:, j, None], out=share, where=used[:, j, None])
            total += share
        for i, row, any_used in zip(rows, total, used.any(axis=1).tolist()):
            out[i] = row if any_used else None
    return out


def group_scores(
    dep: DependencyGraph,
    groups: List[Group],
    criterion: str,
    activation_stats: Optional[Mapping[DimKey, np.ndarray]] = None,
) -> Dict[int, np.ndarray]:
    """Group id -> importance of each of its channels (higher = keep).

    Args:
        dep: the analysed model.
        groups: the groups to score.
        criterion: ``l1``/``l2`` (weight and normalization-scale magnitudes, producers and consumers
            alike), ``bn`` (|scale| of the normalizations in the group; groups without one fall back
            to ``l2``), ``activation`` (mean |activation| of the group's tensors on calibration
            data, from ``activation_stats``; groups without any fall back to ``l2``), ``output``
            (the first-order error a channel's removal causes in its consumers' outputs,
            ``graphprune.pruning.output_error``, also passed as ``activation_stats``), ``wanda``
            (``|W| * ||X||`` of every Conv/Gemm/MatMul weight in the group -- its input channels'
            RMS activation from ``wanda_norms`` as ``activation_stats`` -- summed per channel, on
            the consuming side and the producing side alike; groups without any fall back to ``l2``).
        activation_stats: (tensor, axis) -> mean |value| per index, for ``activation``; weight
            (tensor, input axis) -> output error per index, for ``output``; weight (tensor,
            reduction axis) -> RMS of the input per reduction index, for ``wanda``.
    """
    l1, l2 = _AxisNorms(dep, 1), _AxisNorms(dep, 2)
    magnitude = [[m for m in g.params if m.info.role in _MAGNITUDE_ROLES or m.info.role is None] for g in groups]
    results: List[Optional[np.ndarray]] = [None] * len(groups)
    chosen, per_index = None, None  # the criterion's members of each group, and their per-index scores
    if criterion == "bn":
        chosen, per_index = [[m for m in g.params if m.info.role == "norm_scale"] for g in groups], l1
    elif criterion == "wanda" and activation_stats:
        axes = wanda_axes(activation_stats)
        chosen = [[m for m in g.params if m.dim.tensor in axes] for g in groups]
        per_index = _WandaNorms(dep, activation_stats)
    elif criterion in ("activation", "output") and activation_stats:
        chosen, per_index = [[m for m in g.members if m.dim in activation_stats] for g in groups], activation_stats.get
    elif criterion == "l1":
        chosen, per_index = magnitude, l1
    if chosen is not None:
        if per_index is l1:
            l1.prefetch(m.dim for ms in chosen for m in ms)
        results = _aggregate_all(groups, chosen, per_index)
    rest = [i for i, r in enumerate(results) if r is None]  # no member scored: weight magnitude (l2)
    l2.prefetch(m.dim for i in rest for m in magnitude[i])
    for i, r in zip(rest, _aggregate_all([groups[i] for i in rest], [magnitude[i] for i in rest], l2)):
        results[i] = r
    return {g.id: r if r is not None else np.zeros(g.channels) for g, r in zip(groups, results)}


def wanda_axes(norms: Mapping[DimKey, np.ndarray]) -> Dict[str, DimKey]:
    """Weight name -> the (weight, reduction axis) its input norms are keyed by."""
    return {key.tensor: key for key in norms}


class _WandaNorms:
    """Per-index ``sum |W| * ||X||`` of a weight along one of its axes, the input norm ``||X||``
    broadcast along the weight's reduction axis (for a Conv, over every kernel position)."""

    def __init__(self, dep: DependencyGraph, norms: Mapping[DimKey, np.ndarray]):
        self.dep, self.axes, self.norms = dep, wanda_axes(norms), norms

    def __call__(self, dim: DimKey) -> np.ndarray:
        key = self.axes[dim.tensor]
        w = np.abs(np.asarray(self.dep.const(dim.tensor), dtype=np.float32))
        shape = [1] * w.ndim
        shape[key.axis] = -1
        weighted = w * self.norms[key].astype(np.float32).reshape(shape)
        other = tuple(a for a in range(w.ndim) if a != dim.axis)
        return weighted.sum(axis=other) if other else weighted


def wanda_norms(model, groups: List[Group], data, batch_size: int = 8, progress: bool = False) -> Dict[DimKey, np.ndarray]:
    """(weight, reduction axis) -> RMS of the layer input per reduction index, for every Conv/Gemm/MatMul
    weight among the groups' members, from one streamed ONNX Runtime run over ``data``.

    Grouped convs (whose input channels do not line up with the weight's axis 1) are left out: their
    members fall back to weight magnitude inside ``group_scores``.
    """
    from graphprune.sparsity.calibration import collect_layer_inputs
    from graphprune.sparsity.targets import find_weights

    members = {m.dim.tensor for g in groups for m in g.params}
    targets, _ = find_weights(model)
    targets = [t for t in targets if t.name in members]
    stats = collect_layer_inputs(model, targets, data, want=("norms",), batch_size=batch_size, progress=progress)
    norms: Dict[DimKey, np.ndarray] = {}
    for t in targets:
        info = stats[t.name]
        if info.sq_norms is None or not info.rows or len(info.sq_norms) != t.shape[t.reduction_axis]:
            continue
        norms[DimKey(t.name, t.reduction_axis)] = np.sqrt(info.sq_norms / info.rows)
    return norms
