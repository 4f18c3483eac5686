"""Channel dimensions: the nodes of the dependency graph, one per (tensor, axis)."""

from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Optional, Union

__all__ = ["DimKey", "DimInfo", "VIRTUAL_PREFIX", "is_concrete"]

# Virtual dims (e.g. "channels per group" of a group convolution) are not axes of a real tensor;
# their tensor name starts with this prefix so they can never collide with a graph tensor.
VIRTUAL_PREFIX = "@"


class DimKey(NamedTuple):
    """One axis of one tensor (an activation, an initializer, or a virtual tensor)."""

    tensor: str
    axis: int

    @property
    def is_virtual(self) -> bool:
        return self.tensor.startswith(VIRTUAL_PREFIX)

    def __str__(self) -> str:
        return f"{self.tensor}[{self.axis}]"


def is_concrete(size: Union[int, str, None]) -> bool:
    """Whether an axis length is known: an int, not a symbol or None (-1 marks unknown too)."""
    return isinstance(size, int) and size >= 0


@dataclasses.dataclass(slots=True)  # no __dict__: tens of thousands of dims per model
class DimInfo:
    """What the graph knows about a dim.

    Attributes:
        size: the axis length: an int when known, a symbol name or None when dynamic/unknown.
        param: the tensor is a constant (initializer): its values are deleted or zeroed by pruning.
        role: for params, how pruning treats the values (see ``graphprune.dependency.rules.ROLES``).
        reasons: why this dim must not be pruned (empty when it may be).
        fixed: set when the axis is no channel axis at all (a kernel or spatial window axis): groups
            holding it are never pruned and not reported.
        kind: what a rule recognised the axis as (``graphprune.dependency.kinds``: attention heads,
            FFN neurons, the hidden size...); None for plain channels.
        index: the dim's position in the order the analysis saw the dims (``DependencyGraph.dims``):
            edges and components are arrays of these, no dict lookup of a (tensor, axis) key each.
    """

    size: Union[int, str, None]
    param: bool = False
    role: Optional[str] = None
    reasons: List[str] = dataclasses.field(default_factory=list)
    fixed: Optional[str] = None
    kind: Optional[str] = None
    index: int = dataclasses.field(default=-1, compare=False, repr=False)

    @property
    def concrete(self) -> bool:
        return is_concrete(self.size)
