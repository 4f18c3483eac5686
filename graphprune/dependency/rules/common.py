"""Helpers shared by rule families: coupling whole tensors and numpy-style broadcasting."""

from __future__ import annotations

from typing import Optional, Sequence

from graphprune.dependency.dims import DimKey
from graphprune.dependency.rules.registry import RuleContext

__all__ = ["couple_same_shape", "couple_broadcast", "block_axes"]


def couple_same_shape(ctx: RuleContext, a: str, b: str) -> None:
    """Every axis of ``a`` is the same axis of ``b`` (unary elementwise ops)."""
    for axis in range(ctx.rank(a)):
        ctx.couple(DimKey(a, axis), DimKey(b, axis))


def couple_broadcast(ctx: RuleContext, output: str, inputs: Sequence[Optional[str]]) -> None:
    """Multidirectional broadcasting: inputs align to the output from the right.

    An input axis of the output's size is the same channel axis; an axis of size 1 broadcasts
    (it carries no channels: a [C,1,1] constant's trailing axes, an SE block's [N,C,1,1] scale);
    an axis whose size is unknown or symbolic while the output's differs is blocked.
    """
    out_shape = ctx.require_shape(output)
    rank = len(out_shape)
    for name in inputs:
        if not name:
            continue
        shape = ctx.require_shape(name)
        lead = rank - len(shape)
        for axis, size in enumerate(shape):
            out_dim = DimKey(output, lead + axis)
            target = out_shape[lead + axis]
            if size == 1 and target != 1:
                ctx.leave(DimKey(name, axis))  # a size-1 axis never changes
            elif size == target and size is not None:
                ctx.couple(DimKey(name, axis), out_dim)
            else:
                ctx.block(DimKey(name, axis), f"cannot tell how {name} broadcasts on axis {axis}")
                ctx.block(out_dim, f"cannot tell how {name} broadcasts on axis {axis}")


def block_axes(ctx: RuleContext, name: str, axes: Sequence[int], reason: str) -> None:
    for axis in axes:
        ctx.block(ctx.dim(name, axis), reason)
