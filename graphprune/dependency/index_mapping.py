"""Index mappings: how channel index i of one dim corresponds to channel indices of another.

A coupling edge (a, b, mapping) means "index i of a is the same channel as index f(i) of b".  Each
mapping turns into paired index arrays (``pairs``) so that the grouping step can work on whole
arrays at once; no mapping is ever applied one channel at a time.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["IndexMapping", "Identity", "Offset", "Expand", "IDENTITY", "MappingError"]


class MappingError(ValueError):
    """The two dims' sizes do not fit the mapping (the rule's assumption about the op is wrong)."""


class IndexMapping:
    """Base class: relates indices of a source dim (size ``n_src``) to a target dim (``n_dst``)."""

    def pairs(self, n_src: int, n_dst: int) -> Tuple[np.ndarray, np.ndarray]:
        """(src_indices, dst_indices): equal-length arrays of indices that are the same channel."""
        raise NotImplementedError

    @property
    def is_identity(self) -> bool:
        return False

    def check(self, n_src: int, n_dst: int) -> None:
        """Raise ``MappingError`` when the sizes cannot be related by this mapping."""
        self.pairs(n_src, n_dst)


class Identity(IndexMapping):
    """Same size, index i is index i (elementwise ops, weight axes, transposed axes...)."""

    def pairs(self, n_src, n_dst):
        if n_src != n_dst:
            raise MappingError(f"sizes differ ({n_src} vs {n_dst})")
        idx = np.arange(n_src, dtype=np.int64)
        return idx, idx

    def check(self, n_src, n_dst):  # no index arrays: checked once per coupling, tens of thousands of times
        if n_src != n_dst:
            raise MappingError(f"sizes differ ({n_src} vs {n_dst})")

    @property
    def is_identity(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "Identity()"


class Offset(IndexMapping):
    """Source index i is target index ``start + i * step``: concat inputs, split outputs, slices.

    Args:
        start: where the source segment begins in the target.
        step: stride between consecutive source indices in the target (a strided slice).
    """

    def __init__(self, start: int, step: int = 1):
        if step < 1:
            raise ValueError("Offset step must be positive")
        self.start = int(start)
        self.step = int(step)

    def pairs(self, n_src, n_dst):
        src = np.arange(n_src, dtype=np.int64)
        dst = self.start + src * self.step
        if n_src and (self.start < 0 or dst[-1] >= n_dst):
            raise MappingError(f"segment start {self.start} step {self.step} x {n_src} exceeds size {n_dst}")
        return src, dst

    def __repr__(self) -> str:
        return f"Offset({self.start}, step={self.step})"


class Expand(IndexMapping):
    """The target axis is the source axis flattened with others: target viewed as [outer, src, inner].

    Source channel c is target indices ``o * n_src * inner + c * inner + k`` for every o < outer and
    k < inner: channel c of [N, C, H, W] flattened to [N, C*H*W] is features c*H*W .. c*H*W + H*W-1
    (``inner = H*W``); channel j of the per-group axis of a group convolution is input channels
    ``g * C/G + j`` (``outer = G``).

    Args:
        outer: product of the merged axes before the source axis.
        inner: product of the merged axes after it.
    """

    def __init__(self, outer: int = 1, inner: int = 1):
        if outer < 1 or inner < 1:
            raise ValueError("Expand outer and inner must be positive")
        self.outer = int(outer)
        self.inner = int(inner)

    def pairs(self, n_src, n_dst):
        if n_dst != self.outer * n_src * self.inner:
            raise MappingError(f"{n_dst} is not {self.outer} x {n_src} x {self.inner}")
        grid = np.arange(n_dst, dtype=np.int64).reshape(self.outer, n_src, self.inner)
        src = np.broadcast_to(np.arange(n_src, dtype=np.int64)[None, :, None], grid.shape)
        return src.ravel(), grid.ravel()

    @property
    def is_identity(self) -> bool:
        return self.outer == 1 and self.inner == 1

    def __repr__(self) -> str:
        return f"Expand(outer={self.outer}, inner={self.inner})"


IDENTITY = Identity()
