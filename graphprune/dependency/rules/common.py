"""Helpers shared by rule families: coupling whole tensors and numpy-style broadcasting."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from graphprune.dependency.dims import DimKey
from graphprune.dependency.rules.registry import RuleContext

__all__ = ["couple_same_shape", "couple_broadcast", "block_axes", "ints", "axes_arg", "block_all", "set_ints"]


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
    out_dims = [DimKey(output, axis) for axis in range(rank)]  # made once, not once per input
    for name in inputs:
        if not name:
            continue
        shape = ctx.require_shape(name)
        lead = rank - len(shape)
        for axis, size in enumerate(shape):
            out_dim = out_dims[lead + axis]
            target = out_shape[lead + axis]
            if size == 1 and target != 1:
                ctx.leave(DimKey(name, axis))  # a size-1 axis never changes
            elif size == target and size is not None:
                ctx.couple(DimKey(name, axis), out_dim)
            else:
                ctx.block(DimKey(name, axis), f"cannot tell how {name} broadcasts on axis {axis}")
                ctx.block(out_dim, f"cannot tell how {name} broadcasts on axis {axis}")


def block_axes(ctx: RuleContext, name: str, axes: Sequence[int], reason: str) -> None:
    """Block ``name`` at each of ``axes`` (negative axes count from the end)."""
    for axis in axes:
        ctx.block(ctx.dim(name, axis), reason)


def ints(values) -> Optional[List[int]]:
    """A constant's values as a flat list of ints (None stays None)."""
    return None if values is None else [int(v) for v in np.asarray(values).reshape(-1)]


def axes_arg(ctx: RuleContext, attr: str = "axes", input_index: int = 1, since: int = 13) -> Tuple[bool, Optional[List[int]]]:
    """(known, axes) for ops whose axes moved from an attribute to an input at opset ``since``."""
    if ctx.opset >= since:
        name = ctx.input(input_index)
        ctx.ignore(name)
        if name is None:
            return True, None
        value = ctx.const(name)
        return value is not None, ints(value)
    return True, ints(ctx.attr(attr))


def block_all(ctx: RuleContext, reason: str) -> None:
    """Block every axis of the node's data input and first output (e.g. a size computed at run time)."""
    for name in (ctx.input(0), ctx.outputs[0]):
        if name:
            ctx.block_tensor(name, reason)


def set_ints(editor, node, index: int, attr: str, values: Sequence[int], as_input: bool, like=None) -> None:
    """Fixup helper: write ``values`` as input ``index`` (opsets that take them as inputs, with the
    dtype of ``like``) or as attribute ``attr`` (older opsets)."""
    if as_input:
        editor.set_input(node, index, np.asarray(values, dtype=like.dtype if like is not None else np.int64))
    else:
        editor.set_attr(node, attr, [int(v) for v in values])
