"""Helpers the data-movement rules share: shapes as int64 tensors, axes, refusals naming the node."""

from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np
import onnx

from graphprune.errors import UserError

INT64 = onnx.TensorProto.INT64


def refuse(node, why: str) -> UserError:
    return UserError(f"{node.op_type} node {node.name or node.output[0]!r}: {why}")


def shape_tensor(ctx, x: str) -> str:
    """``x``'s shape as an int64 tensor: a constant when every dim is static, else ``Shape(x)``."""
    shape = ctx.shape(x)
    if shape is not None and all(d is not None for d in shape):
        return ctx.ints(shape)
    return ctx.shape_of(x)


def as_int64(ctx, name: str) -> str:
    return name if ctx.types.get(name) == INT64 else ctx.op("Cast", name, to=INT64)


def axis_of(ctx, node, x: str, default: int = 0) -> int:
    """``node``'s ``axis`` attribute, non-negative."""
    axis = int(ctx.attr(node, "axis", default))
    if axis < 0:
        rank = ctx.rank(x)
        if rank is None:
            raise refuse(node, "a negative axis on an input of unknown rank")
        axis += rank
    return axis


def rank_of(ctx, node, x: str) -> int:
    rank = ctx.rank(x)
    if rank is None:
        raise refuse(node, "the rank of its input is unknown; give the model's inputs a known rank")
    return rank


def dim_of(ctx, x: str, axis: int) -> Union[int, str]:
    """Dim ``axis`` of ``x``: an int when static, else a 1-D int64 tensor of one element."""
    shape = ctx.shape(x)
    if shape is not None and shape[axis] is not None:
        return shape[axis]
    return ctx.op("Gather", ctx.shape_of(x), ctx.ints([axis]))


def int_vector(ctx, parts: Sequence[Union[int, str]]) -> str:
    """An int64 1-D tensor from python ints and 1-D int64 tensors (a constant when all are ints)."""
    if all(isinstance(p, (int, np.integer)) for p in parts):
        return ctx.ints([int(p) for p in parts])
    pieces = [ctx.ints([int(p)]) if isinstance(p, (int, np.integer)) else p for p in parts]
    return pieces[0] if len(pieces) == 1 else ctx.op("Concat", *pieces, axis=0)


def no_input_grads(node) -> List[None]:
    return [None] * (len(node.input) - 1)
