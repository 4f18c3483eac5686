"""Gradient rules: Gather, GatherElements, GatherND (repeated picks add up; never ScatterND with reduction)."""

from __future__ import annotations

from typing import Union

import numpy as np

from graphprune.autodiff.registry import vjp
from graphprune.autodiff.rules._shape_helpers import (
    as_int64,
    axis_of,
    dim_of,
    int_vector,
    rank_of,
    refuse,
    shape_tensor,
)

# Gather along an axis of at most this many entries uses a one-hot MatMul (a dense, threaded kernel)
# instead of a scatter-add (an element-by-element serial loop): on onnxruntime's CPU the MatMul is
# faster up to a few hundred entries (measured at N = 64..512 indices, B = 256).
_ONE_HOT_MAX = 256

# ----- Gather family ---------------------------------------------------------------------------------

@vjp("Gather")
def _gather(ctx, node, dy, wants):
    x, indices = node.input
    rank = rank_of(ctx, node, x)
    axis = axis_of(ctx, node, x)
    dim = (ctx.shape(x) or [None] * rank)[axis]  # static, or None
    one_hot = dim is not None and dim <= _ONE_HOT_MAX
    flat = _flat_indices(ctx, indices, x, axis, normalize=one_hot or ctx.opset < 16)
    # The gradient viewed as [a..., N, B]: N = number of indices, a/B = the dims before/after axis.
    view = ctx.op("Reshape", dy[0], int_vector(ctx, [0] * axis + [_index_count(ctx, indices), -1]))
    if one_hot:  # a small axis: onehot[D, N] @ view is the whole gradient, repeated indices included
        matrix = ctx.cast_like(ctx.op("Equal", ctx.ints([[d] for d in range(dim)]), flat), x)
        if axis == rank - 1:  # [a..., N] @ [N, D]: one GEMM rather than a batch of matrix-vector products
            rows = ctx.op("Reshape", dy[0], int_vector(ctx, [0] * axis + [-1]))
            return [ctx.op("MatMul", rows, ctx.op("Transpose", matrix, perm=[1, 0])), None]
        return [ctx.op("Reshape", ctx.op("MatMul", matrix, view), shape_tensor(ctx, x)), None]
    zeros = ctx.op("Reshape", ctx.zeros_like(x), ctx.ints([0] * (axis + 1) + [-1]))  # [a..., D, B]
    return [_scatter_add(ctx, x, zeros, view, flat, axis), None]


def _scatter_add(ctx, x: str, zeros: str, view: str, flat: str, axis: int) -> str:
    """Add the rows of ``view`` ([a..., N, B]) into ``zeros`` ([a..., D, B]) at positions ``flat`` ([N])
    of ``axis``, and shape the sum like ``x``.

    ScatterElements, never ScatterND: onnxruntime's CPU ScatterND with reduction="add" splits the
    indices over threads, and repeated indices then race (onnxruntime#18048: wrong sums, silently)."""
    if ctx.opset < 16:
        # No scatter-add yet: sum over each distinct index first (a one-hot of at most N x N, not
        # D x N: an embedding table's D is large); the sums then land on distinct positions.
        distinct = ctx.op("Unique", flat, sorted=0)
        matrix = ctx.cast_like(ctx.op("Equal", ctx.unsqueeze(distinct, [1]), flat), x)
        view, flat = ctx.op("MatMul", matrix, view), distinct
    spread = ctx.op("Expand", ctx.op("Reshape", flat, ctx.ints([1] * axis + [-1, 1])), ctx.shape_of(view))
    scatter = ctx.op("ScatterElements", zeros, spread, view, axis=axis,
                     reduction="add" if ctx.opset >= 16 else None)
    return ctx.op("Reshape", scatter, shape_tensor(ctx, x))


def _index_count(ctx, indices: str) -> Union[int, str]:
    shape = ctx.shape(indices)
    if shape is not None and all(d is not None for d in shape):
        return int(np.prod(shape, dtype=np.int64))
    return ctx.unsqueeze(ctx.op("Size", indices), [0])


def _flat_indices(ctx, indices: str, x: str, axis: int, normalize: bool) -> str:
    """The indices as a 1-D int64 tensor; with ``normalize``, negative ones counted from the end
    (so that -1 and D-1 meet in a one-hot or in Unique)."""
    value = ctx.value(indices)
    negative = value is None or bool((value < 0).any())
    dim = dim_of(ctx, x, axis) if normalize and negative else None
    if value is not None and not isinstance(dim, str):  # constant indices: flattened here
        flat = value.astype(np.int64).reshape(-1)
        return ctx.ints(np.where(flat < 0, flat + dim, flat) if dim is not None else flat)
    flat = ctx.op("Reshape", as_int64(ctx, indices), ctx.ints([-1]))
    if dim is None:
        return flat
    dim = ctx.ints([dim]) if isinstance(dim, int) else dim
    return ctx.op("Where", ctx.op("Less", flat, ctx.ints([0])), ctx.op("Add", flat, dim), flat)


@vjp("GatherElements")
def _gather_elements(ctx, node, dy, wants):
    if ctx.opset < 16:
        raise refuse(node, "its gradient needs ScatterElements with reduction (opset 16); "
                            "convert the model to opset 16 or newer")
    x, indices = node.input
    axis = axis_of(ctx, node, x)
    return [ctx.op("ScatterElements", ctx.zeros_like(x), indices, dy[0], axis=axis, reduction="add"), None]


@vjp("GatherND")
def _gather_nd(ctx, node, dy, wants):
    # With batch_dims 0, GatherND is a Gather on x's first k axes flattened into one (k = the last
    # dim of the indices): linearize each index tuple and scatter rows as Gather does.
    if int(ctx.attr(node, "batch_dims", 0)):
        raise refuse(node, "batch_dims > 0 has no gradient rule (only batch_dims = 0 trains)")
    x, indices = node.input
    depth = (ctx.shape(indices) or (None,))[-1]
    if not depth:
        raise refuse(node, "the last dim of its indices is only known at run time (or is 0)")
    dims = [dim_of(ctx, x, j) for j in range(depth)]
    value = ctx.value(indices)
    if value is not None and all(isinstance(d, int) for d in dims):
        tuples = np.where(value < 0, value + np.asarray(dims), value).reshape(-1, depth)
        flat = ctx.ints(np.ravel_multi_index(tuple(tuples.T), dims))
        count, size = len(tuples), int(np.prod(dims, dtype=np.int64))
    else:
        flat, size = None, None
        for j, d in enumerate(dims):  # Horner: ((i0 * D1 + i1) * D2 + i2)...
            d = ctx.ints([d]) if isinstance(d, int) else d
            part = ctx.op("Gather", as_int64(ctx, indices), ctx.ints([j]), axis=-1)
            part = ctx.op("Where", ctx.op("Less", part, ctx.ints([0])), ctx.op("Add", part, d), part)
            flat = part if flat is None else ctx.op("Add", ctx.op("Mul", flat, d), part)
            size = d if size is None else ctx.op("Mul", size, d)
        flat, count = ctx.op("Reshape", flat, ctx.ints([-1])), ctx.op("Size", flat)
        count = ctx.unsqueeze(count, [0])
    view = ctx.op("Reshape", dy[0], int_vector(ctx, [count, -1]))  # [N, B]
    zeros = ctx.op("Reshape", ctx.zeros_like(x), int_vector(ctx, [size, -1]))  # [D0 * ... * Dk-1, B]
    return [_scatter_add(ctx, x, zeros, view, flat, 0), None]
