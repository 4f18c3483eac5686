"""What a sensitivity run prunes alone: one group, all groups of a kind, or all groups of a stage."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Dict, List

import numpy as np

from graphprune.dependency import DependencyGraph, Group
from graphprune.errors import UserError

__all__ = ["Unit", "BY", "build_units", "stage_of"]

BY = ("group", "kind", "stage")


@dataclasses.dataclass
class Unit:
    """Groups pruned together at one ratio while every other group keeps its channels.

    Attributes:
        name: the group's stable name (``conv2.weight:0``), the kind, or the stage.
        kind: the groups' kind (``mixed`` when a stage holds several).
        groups: stable names of its groups (``graphprune.pruning.group_ratios.group_keys``).
        channels: channels of its groups, summed.
    """

    name: str
    kind: str
    groups: List[str]
    channels: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stage_of(dep: DependencyGraph, group: Group) -> str:
    """A group's stage: the spatial size of its activations (``16x16``), as a CNN's stages differ by
    resolution; ``tokens`` for sequence tensors and ``flat`` for features without spatial axes.

    A group's activations may span two sizes (a residual stream read by a global pool, a strided
    conv's input): the size most of its activation tensors have counts, the larger on a tie.
    """
    sizes: Counter = Counter()
    for m in group.members:
        if m.info.param or m.dim.tensor not in dep.shapes:
            continue
        shape = dep.shapes[m.dim.tensor]
        if shape is None or m.dim.axis != 1 or len(shape) < 3:
            continue
        spatial = tuple(shape[2:])
        if all(isinstance(d, int) for d in spatial):
            sizes[spatial] += 1
    if sizes:
        best = max(sizes.items(), key=lambda kv: (kv[1], int(np.prod(kv[0]))))[0]
        return "x".join(str(d) for d in best)
    kinds = {m.info.kind for m in group.members} - {None}
    return "tokens" if kinds else "flat"


def build_units(dep: DependencyGraph, prunable: List[Group], keys: Dict[int, str], by: str) -> List[Unit]:
    """The units of a run, in model order (first group's position)."""
    if by not in BY:
        raise UserError(f"--by {by!r}: choose from {', '.join(BY)}")
    if by == "group":
        return [Unit(keys[g.id], g.kind, [keys[g.id]], int(g.channels)) for g in prunable]
    units: Dict[str, Unit] = {}
    for g in prunable:
        label = g.kind if by == "kind" else f"stage {stage_of(dep, g)}"
        unit = units.setdefault(label, Unit(label, g.kind, [], 0))
        if unit.kind != g.kind:
            unit.kind = "mixed"
        unit.groups.append(keys[g.id])
        unit.channels += int(g.channels)
    return list(units.values())
