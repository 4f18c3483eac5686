"""Gradient rules: ops that move or copy elements (Reshape, Transpose, Split, Concat, Slice, Expand, Tile).

Every rule works when dims are only known at run time: static shapes turn sizes and pads into
constants, and where they are missing the same values are computed from ``Shape`` nodes.  Selection
ops put the output gradient back where its elements came from: ``Pad`` for unit-step slices, a
scatter onto zeros for the rest.  Where an element can be picked twice (Gather, GatherElements,
GatherND) repeated picks must add up: a one-hot MatMul over small axes, ScatterElements with
``reduction="add"`` from opset 16, and before it sums over the distinct indices (``Unique``) scattered
without reduction.  Never ScatterND with reduction: onnxruntime's CPU kernel races on repeated
indices.  Einsum's gradients are Einsums with the operand's slot left open.

Refused, by op name: GatherND with ``batch_dims`` > 0 or with a run-time last dim of its indices,
GatherElements in models older than opset 16 (scatter-add arrived in opset 16), inputs of unknown
rank where the rule needs the rank,
Einsum with a repeated index in one operand (diagonal, trace) or with an index whose static sizes
differ between operands (torch-style broadcasting).  Einsum assumes an index whose sizes are only
known at run time has one size in every operand.
"""


from __future__ import annotations

from typing import List, Optional

import numpy as np

from graphprune.autodiff.registry import vjp
from graphprune.autodiff.rules._shape_helpers import (
    INT64,
    as_int64,
    axis_of,
    dim_of,
    int_vector,
    no_input_grads,
    refuse,
    shape_tensor,
)

# ----- pure data movement ----------------------------------------------------------------------------

@vjp("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(ctx, node, dy, wants):
    # Only the layout changes: the gradient takes the input's shape back, whatever form the forward
    # op's shape or axes came in (attribute, constant input, computed input).
    x = node.input[0]
    # allowzero keeps a real 0-sized dim of x from being read as "copy the dim" (opset 14+).
    zero = {"allowzero": 1} if ctx.opset >= 14 else {}
    return [ctx.op("Reshape", dy[0], shape_tensor(ctx, x), **zero)] + no_input_grads(node)


@vjp("Transpose")
def _transpose(ctx, node, dy, wants):
    perm = ctx.attr(node, "perm")
    if perm is None:  # the default reverses the axes: its own inverse
        return [ctx.op("Transpose", dy[0])]
    return [ctx.op("Transpose", dy[0], perm=[int(i) for i in np.argsort(perm)])]


@vjp("Expand")
def _expand(ctx, node, dy, wants):
    return [ctx.reduce_to(dy[0], node.input[0], node.output[0]), None]


@vjp("Split")
def _split(ctx, node, dy, wants):
    # Outputs nothing downstream differentiates contribute zeros of their (run-time) shape.
    parts = [g if g is not None else ctx.zeros_like(out) for g, out in zip(dy, node.output)]
    grad = parts[0] if len(parts) == 1 else ctx.op("Concat", *parts, axis=int(ctx.attr(node, "axis", 0)))
    return [grad] + no_input_grads(node)


@vjp("Concat")
def _concat(ctx, node, dy, wants):
    if len(node.input) == 1:
        return [dy[0]]
    known = [name for name in (node.output[0], *node.input) if ctx.rank(name) is not None]
    axis = axis_of(ctx, node, known[0] if known else node.output[0])
    sizes = [dim_of(ctx, x, axis) for x in node.input]
    if ctx.opset >= 13:  # Split's sizes became an input: run-time sizes are one node away
        return ctx.op("Split", dy[0], int_vector(ctx, sizes), axis=axis, outputs=len(node.input))
    if all(isinstance(d, int) for d in sizes):
        return ctx.op("Split", dy[0], axis=axis, split=sizes, outputs=len(node.input))
    # Older opsets with run-time sizes: one Slice per input, ending at the running total of sizes.
    ends = ctx.op("CumSum", int_vector(ctx, sizes), ctx.const(0, dtype=INT64))
    grads: List[Optional[str]] = []
    for k, (size, want) in enumerate(zip(sizes, wants)):
        end = ctx.op("Slice", ends, ctx.ints([k]), ctx.ints([k + 1])) if want else None
        start = ctx.op("Sub", end, int_vector(ctx, [size])) if want else None
        grads.append(ctx.op("Slice", dy[0], start, end, ctx.ints([axis])) if want else None)
    return grads


@vjp("Tile")
def _tile(ctx, node, dy, wants):
    # y = tile(x, r) viewed as [r0, d0, r1, d1, ...]: sum over the r axes.
    x, repeats = node.input[0], node.input[1]
    reps = ctx.value(repeats)
    shape = ctx.shape(x)
    if reps is not None and shape is not None and all(d is not None for d in shape):
        target, axes = [], []
        for r, d in zip(reps.tolist(), shape):
            if r != 1:
                axes.append(len(target))
                target.append(r)
            target.append(d)
        if not axes:
            return [dy[0], None]
        viewed = ctx.op("Reshape", dy[0], ctx.ints(target))
        return [ctx.reduce_sum(viewed, axes, keepdims=False), None]
    rank = ctx.rank(x) if ctx.rank(x) is not None else (len(reps) if reps is not None else None)
    if rank is None:
        raise refuse(node, "the rank of its input is unknown")
    pairs = ctx.op("Concat", ctx.unsqueeze(as_int64(ctx, repeats), [1]), ctx.unsqueeze(ctx.shape_of(x), [1]), axis=1)
    viewed = ctx.op("Reshape", dy[0], ctx.op("Reshape", pairs, ctx.ints([-1])))
    return [ctx.reduce_sum(viewed, list(range(0, 2 * rank, 2)), keepdims=False), None]


# ----- Slice -----------------------------------------------------------------------------------------

def _slice_operand(ctx, node, index: int):
    """Slice's starts/ends/axes/steps: a numpy constant, a tensor name (run-time), or None (absent)."""
    if len(node.input) <= index or not node.input[index]:
        return None
    value = ctx.value(node.input[index])
    return node.input[index] if value is None else value.astype(np.int64).reshape(-1)


def _slice_axes(ctx, node, starts, rank: int) -> Optional[List[int]]:
    """The sliced axes, non-negative, or None when they are only known at run time."""
    axes = _slice_operand(ctx, node, 3)
    if isinstance(axes, str):
        return None
    if axes is None:
        count = len(starts) if not isinstance(starts, str) else (ctx.shape(starts) or (None,))[0]
        return None if count is None else list(range(count))
    return [int(a) + rank if a < 0 else int(a) for a in axes]


@vjp("Slice")
def _slice(ctx, node, dy, wants):
    x = node.input[0]
    rank = ctx.rank(x)
    starts, ends = _slice_operand(ctx, node, 1), _slice_operand(ctx, node, 2)
    steps = _slice_operand(ctx, node, 4)
    unit = steps is None or (not isinstance(steps, str) and bool(np.all(steps == 1)))
    axes = _slice_axes(ctx, node, starts, rank) if rank is not None else None
    if unit and axes is not None:
        return [_slice_pad(ctx, x, dy[0], starts, ends, axes, rank)] + no_input_grads(node)
    return [_slice_scatter(ctx, node, dy[0], starts, ends, steps)] + no_input_grads(node)


def _slice_pad(ctx, x, grad, starts, ends, axes, rank) -> str:
    """Unit steps: the gradient is ``grad`` padded with zeros where the slice cut ``x``."""
    shape = ctx.shape(x)
    dims = [shape[a] for a in axes]
    pads = np.zeros(2 * rank, dtype=np.int64)
    if not isinstance(starts, str) and not isinstance(ends, str) and all(d is not None for d in dims):
        for a, s, e, d in zip(axes, starts.tolist(), ends.tolist(), dims):
            s = min(max(s + d if s < 0 else s, 0), d)
            e = max(min(max(e + d if e < 0 else e, 0), d), s)
            pads[a], pads[rank + a] = s, d - e
        return grad if not pads.any() else ctx.op("Pad", grad, ctx.ints(pads))
    # Run-time bounds (e.g. ends computed from another tensor's Shape): the same arithmetic in the graph.
    dim = ctx.op("Gather", ctx.shape_of(x), ctx.ints(axes))
    begin = _clamp_bound(ctx, starts, dim)
    end = _int_extreme(ctx, "Max", _clamp_bound(ctx, ends, dim), begin)
    table = ctx.op("Concat", ctx.ints([0]), begin, ctx.op("Sub", dim, end), axis=0)
    for k, a in enumerate(axes):
        pads[a], pads[rank + a] = 1 + k, 1 + len(axes) + k
    return ctx.op("Pad", grad, ctx.op("Gather", table, ctx.ints(pads)))


def _clamp_bound(ctx, bound, dim: str) -> str:
    """A unit-step Slice bound made non-negative and clamped to [0, dim], as Slice does it."""
    bound = ctx.ints(bound) if not isinstance(bound, str) else as_int64(ctx, bound)
    # Clamp to [-dim, dim] first so adding dim cannot overflow an INT64_MAX "until the end".
    bound = _int_extreme(ctx, "Min", _int_extreme(ctx, "Max", bound, ctx.op("Neg", dim)), dim)
    return ctx.op("Where", ctx.op("Less", bound, ctx.ints([0])), ctx.op("Add", bound, dim), bound)


def _int_extreme(ctx, op_type: str, a: str, b: str) -> str:
    """Max or Min of int64 tensors (Max/Min take integers from opset 12; a Where before that)."""
    if ctx.opset >= 12:
        return ctx.op(op_type, a, b)
    return ctx.op("Where", ctx.op("Less" if op_type == "Max" else "Greater", a, b), b, a)


def _slice_scatter(ctx, node, grad, starts, ends, steps) -> str:
    """Any steps, bounds or axes: slice the flat positions of ``x`` with the forward node's own
    operands (so the runtime applies its clamping and negative-step rules), then scatter there."""
    x = node.input[0]
    shape = ctx.shape_of(x)
    size = ctx.op("Size", x)
    positions = ctx.op("Reshape", ctx.op("Range", ctx.const(0, dtype=INT64), size, ctx.const(1, dtype=INT64)), shape)
    operands = [starts, ends, _slice_operand(ctx, node, 3), steps]
    operands = [ctx.ints(v) if isinstance(v, np.ndarray) else (as_int64(ctx, v) if v else None) for v in operands]
    picked = ctx.op("Reshape", ctx.op("Slice", positions, *operands), ctx.ints([-1]))
    flat_zeros = ctx.op("Reshape", ctx.zeros_like(x), ctx.ints([-1]))
    # A slice picks each position at most once: a plain scatter (no reduction) is exact.
    flat = ctx.op("ScatterElements", flat_zeros, picked, ctx.op("Reshape", grad, ctx.ints([-1])), axis=0)
    return ctx.op("Reshape", flat, shape)
