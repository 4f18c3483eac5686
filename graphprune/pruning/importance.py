"""Channel importance: one score per channel of a group, aggregated over every member it touches."""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional

import numpy as np

from graphprune.dependency import DependencyGraph, DimKey, Group

__all__ = ["CRITERIA", "DATA_CRITERIA", "group_scores", "wanda_norms"]

CRITERIA = ("l1", "l2", "bn", "activation", "output", "wanda")
# Criteria that measure the model on calibration samples.
DATA_CRITERIA = ("activation", "output", "wanda")
# Constants whose magnitude says how much a channel matters (not biases, statistics, divisors).
_MAGNITUDE_ROLES = ("weight", "norm_scale")


class _AxisNorms:
    """Per-index magnitude of constants along their channel axes, cached per (tensor, axis).

    The elementwise |w| (or w^2) of a tensor is computed once and reduced for every axis of it the
    graph knows, then dropped: memory stays O(channels), not a second copy of every weight.
    """

    def __init__(self, dep: DependencyGraph, power: int):
        self.dep = dep
        self.power = power
        self._cache: Dict[DimKey, np.ndarray] = {}

    def __call__(self, dim: DimKey) -> np.ndarray:
        if dim not in self._cache:
            w = np.asarray(self.dep.const(dim.tensor), dtype=np.float32)
            mag = np.abs(w) if self.power == 1 else np.square(w)
            for axis in range(mag.ndim):
                key = DimKey(dim.tensor, axis)
                info = self.dep.known(key)  # blocked axes are never scored: not summed
                if key == dim or (info is not None and not info.fixed and not info.reasons):
                    other = tuple(a for a in range(mag.ndim) if a != axis)
                    self._cache[key] = mag.sum(axis=other) if other else mag
        return self._cache[dim]


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
    scores: Dict[int, np.ndarray] = {}
    for group in groups:
        magnitude = [m for m in group.params if m.info.role in _MAGNITUDE_ROLES or m.info.role is None]
        result = None
        if criterion == "bn":
            norm_scales = [m for m in group.params if m.info.role == "norm_scale"]
            result = _aggregate(group, norm_scales, l1)
        elif criterion == "wanda" and activation_stats:
            weighted = [m for m in group.params if m.dim.tensor in wanda_axes(activation_stats)]
            result = _aggregate(group, weighted, _WandaNorms(dep, activation_stats))
        elif criterion in ("activation", "output") and activation_stats:
            tensors = [m for m in group.members if m.dim in activation_stats]
            result = _aggregate(group, tensors, lambda d: activation_stats[d])
        elif criterion == "l1":
            result = _aggregate(group, magnitude, l1)
        if result is None:
            result = _aggregate(group, magnitude, l2)
        scores[group.id] = result if result is not None else np.zeros(group.channels)
    return scores


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
