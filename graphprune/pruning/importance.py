"""Channel importance: one score per channel of a group, aggregated over every member it touches."""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional

import numpy as np

from graphprune.dependency import DependencyGraph, DimKey, Group

__all__ = ["CRITERIA", "group_scores"]

CRITERIA = ("l1", "l2", "bn", "activation", "output")
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
                node = self.dep.graph.nodes.get(key)
                if key == dim or (node is not None and not node["info"].fixed):
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
        values = per_index(m.dim)[m.positions]
        per_channel = np.bincount(m.atoms, weights=values, minlength=group.channels)
        mean = per_channel.mean()
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
            ``graphprune.pruning.output_error``, also passed as ``activation_stats``).
        activation_stats: (tensor, axis) -> mean |value| per index, for ``activation``; weight
            (tensor, input axis) -> output error per index, for ``output``.
    """
    l1, l2 = _AxisNorms(dep, 1), _AxisNorms(dep, 2)
    scores: Dict[int, np.ndarray] = {}
    for group in groups:
        magnitude = [m for m in group.params if m.info.role in _MAGNITUDE_ROLES or m.info.role is None]
        result = None
        if criterion == "bn":
            norm_scales = [m for m in group.params if m.info.role == "norm_scale"]
            result = _aggregate(group, norm_scales, l1)
        elif criterion in ("activation", "output") and activation_stats:
            tensors = [m for m in group.members if m.dim in activation_stats]
            result = _aggregate(group, tensors, lambda d: activation_stats[d])
        elif criterion == "l1":
            result = _aggregate(group, magnitude, l1)
        if result is None:
            result = _aggregate(group, magnitude, l2)
        scores[group.id] = result if result is not None else np.zeros(group.channels)
    return scores
