"""Gradient rules: ops that move, select or copy elements (Reshape, Transpose, Split, Concat, Slice, Gather...).

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

from typing import List, Optional, Sequence, Union

import numpy as np
import onnx

from graphprune.autodiff.registry import vjp
from graphprune.errors import UserError

# Gather along an axis of at most this many entries uses a one-hot MatMul (a dense, threaded kernel)
# instead of a scatter-add (an element-by-element serial loop): on onnxruntime's CPU the MatMul is
# faster up to a few hundred entries (measured at N = 64..512 indices, B = 256).
_ONE_HOT_MAX = 256
_INT64 = onnx.TensorProto.INT64


def _refuse(node, why: str) -> UserError:
    return UserError(f"{node.op_type} node {node.name or node.output[0]!r}: {why}")


def _shape_tensor(ctx, x: str) -> str:
    """``x``'s shape as an int64 tensor: a constant when every dim is static, else ``Shape(x)``."""
    shape = ctx.shape(x)
    if shape is not None and all(d is not None for d in shape):
        return ctx.ints(shape)
    return ctx.shape_of(x)


def _int64(ctx, name: str) -> str:
    return name if ctx.types.get(name) == _INT64 else ctx.op("Cast", name, to=_INT64)


def _axis(ctx, node, x: str, default: int = 0) -> int:
    """``node``'s ``axis`` attribute, non-negative."""
    axis = int(ctx.attr(node, "axis", default))
    if axis < 0:
        rank = ctx.rank(x)
        if rank is None:
            raise _refuse(node, "a negative axis on an input of unknown rank")
        axis += rank
    return axis


def _needs_rank(ctx, node, x: str) -> int:
    rank = ctx.rank(x)
    if rank is None:
        raise _refuse(node, "the rank of its input is unknown; give the model's inputs a known rank")
    return rank


def _dim(ctx, x: str, axis: int) -> Union[int, str]:
    """Dim ``axis`` of ``x``: an int when static, else a 1-D int64 tensor of one element."""
    shape = ctx.shape(x)
    if shape is not None and shape[axis] is not None:
        return shape[axis]
    return ctx.op("Gather", ctx.shape_of(x), ctx.ints([axis]))


def _vector(ctx, parts: Sequence[Union[int, str]]) -> str:
    """An int64 1-D tensor from python ints and 1-D int64 tensors (a constant when all are ints)."""
    if all(isinstance(p, (int, np.integer)) for p in parts):
        return ctx.ints([int(p) for p in parts])
    pieces = [ctx.ints([int(p)]) if isinstance(p, (int, np.integer)) else p for p in parts]
    return pieces[0] if len(pieces) == 1 else ctx.op("Concat", *pieces, axis=0)


def _no_grads(node) -> List[None]:
    return [None] * (len(node.input) - 1)


# ----- pure data movement ----------------------------------------------------------------------------

@vjp("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(ctx, node, dy, wants):
    # Only the layout changes: the gradient takes the input's shape back, whatever form the forward
    # op's shape or axes came in (attribute, constant input, computed input).
    x = node.input[0]
    # allowzero keeps a real 0-sized dim of x from being read as "copy the dim" (opset 14+).
    zero = {"allowzero": 1} if ctx.opset >= 14 else {}
    return [ctx.op("Reshape", dy[0], _shape_tensor(ctx, x), **zero)] + _no_grads(node)


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
    return [grad] + _no_grads(node)


@vjp("Concat")
def _concat(ctx, node, dy, wants):
    if len(node.input) == 1:
        return [dy[0]]
    known = [name for name in (node.output[0], *node.input) if ctx.rank(name) is not None]
    axis = _axis(ctx, node, known[0] if known else node.output[0])
    sizes = [_dim(ctx, x, axis) for x in node.input]
    if ctx.opset >= 13:  # Split's sizes became an input: run-time sizes are one node away
        return ctx.op("Split", dy[0], _vector(ctx, sizes), axis=axis, outputs=len(node.input))
    if all(isinstance(d, int) for d in sizes):
        return ctx.op("Split", dy[0], axis=axis, split=sizes, outputs=len(node.input))
    # Older opsets with run-time sizes: one Slice per input, ending at the running total of sizes.
    ends = ctx.op("CumSum", _vector(ctx, sizes), ctx.const(0, dtype=_INT64))
    grads: List[Optional[str]] = []
    for k, (size, want) in enumerate(zip(sizes, wants)):
        end = ctx.op("Slice", ends, ctx.ints([k]), ctx.ints([k + 1])) if want else None
        start = ctx.op("Sub", end, _vector(ctx, [size])) if want else None
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
        raise _refuse(node, "the rank of its input is unknown")
    pairs = ctx.op("Concat", ctx.unsqueeze(_int64(ctx, repeats), [1]), ctx.unsqueeze(ctx.shape_of(x), [1]), axis=1)
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
        return [_slice_pad(ctx, x, dy[0], starts, ends, axes, rank)] + _no_grads(node)
    return [_slice_scatter(ctx, node, dy[0], starts, ends, steps)] + _no_grads(node)


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
    bound = ctx.ints(bound) if not isinstance(bound, str) else _int64(ctx, bound)
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
    positions = ctx.op("Reshape", ctx.op("Range", ctx.const(0, dtype=_INT64), size, ctx.const(1, dtype=_INT64)), shape)
    operands = [starts, ends, _slice_operand(ctx, node, 3), steps]
    operands = [ctx.ints(v) if isinstance(v, np.ndarray) else (_int64(ctx, v) if v else None) for v in operands]
    picked = ctx.op("Reshape", ctx.op("Slice", positions, *operands), ctx.ints([-1]))
    flat_zeros = ctx.op("Reshape", ctx.zeros_like(x), ctx.ints([-1]))
    # A slice picks each position at most once: a plain scatter (no reduction) is exact.
    flat = ctx.op("ScatterElements", flat_zeros, picked, ctx.op("Reshape", grad, ctx.ints([-1])), axis=0)
    return ctx.op("Reshape", flat, shape)


# ----- Gather family ---------------------------------------------------------------------------------

@vjp("Gather")
def _gather(ctx, node, dy, wants):
    x, indices = node.input
    rank = _needs_rank(ctx, node, x)
    axis = _axis(ctx, node, x)
    dim = (ctx.shape(x) or [None] * rank)[axis]  # static, or None
    one_hot = dim is not None and dim <= _ONE_HOT_MAX
    flat = _flat_indices(ctx, indices, x, axis, normalize=one_hot or ctx.opset < 16)
    # The gradient viewed as [a..., N, B]: N = number of indices, a/B = the dims before/after axis.
    view = ctx.op("Reshape", dy[0], _vector(ctx, [0] * axis + [_index_count(ctx, indices), -1]))
    if one_hot:  # a small axis: onehot[D, N] @ view is the whole gradient, repeated indices included
        matrix = ctx.cast_like(ctx.op("Equal", ctx.ints([[d] for d in range(dim)]), flat), x)
        if axis == rank - 1:  # [a..., N] @ [N, D]: one GEMM rather than a batch of matrix-vector products
            rows = ctx.op("Reshape", dy[0], _vector(ctx, [0] * axis + [-1]))
            return [ctx.op("MatMul", rows, ctx.op("Transpose", matrix, perm=[1, 0])), None]
        return [ctx.op("Reshape", ctx.op("MatMul", matrix, view), _shape_tensor(ctx, x)), None]
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
    return ctx.op("Reshape", scatter, _shape_tensor(ctx, x))


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
    dim = _dim(ctx, x, axis) if normalize and negative else None
    if value is not None and not isinstance(dim, str):  # constant indices: flattened here
        flat = value.astype(np.int64).reshape(-1)
        return ctx.ints(np.where(flat < 0, flat + dim, flat) if dim is not None else flat)
    flat = ctx.op("Reshape", _int64(ctx, indices), ctx.ints([-1]))
    if dim is None:
        return flat
    dim = ctx.ints([dim]) if isinstance(dim, int) else dim
    return ctx.op("Where", ctx.op("Less", flat, ctx.ints([0])), ctx.op("Add", flat, dim), flat)


@vjp("GatherElements")
def _gather_elements(ctx, node, dy, wants):
    if ctx.opset < 16:
        raise _refuse(node, "its gradient needs ScatterElements with reduction (opset 16); "
                            "convert the model to opset 16 or newer")
    x, indices = node.input
    axis = _axis(ctx, node, x)
    return [ctx.op("ScatterElements", ctx.zeros_like(x), indices, dy[0], axis=axis, reduction="add"), None]


@vjp("GatherND")
def _gather_nd(ctx, node, dy, wants):
    # With batch_dims 0, GatherND is a Gather on x's first k axes flattened into one (k = the last
    # dim of the indices): linearize each index tuple and scatter rows as Gather does.
    if int(ctx.attr(node, "batch_dims", 0)):
        raise _refuse(node, "batch_dims > 0 has no gradient rule (only batch_dims = 0 trains)")
    x, indices = node.input
    depth = (ctx.shape(indices) or (None,))[-1]
    if not depth:
        raise _refuse(node, "the last dim of its indices is only known at run time (or is 0)")
    dims = [_dim(ctx, x, j) for j in range(depth)]
    value = ctx.value(indices)
    if value is not None and all(isinstance(d, int) for d in dims):
        tuples = np.where(value < 0, value + np.asarray(dims), value).reshape(-1, depth)
        flat = ctx.ints(np.ravel_multi_index(tuple(tuples.T), dims))
        count, size = len(tuples), int(np.prod(dims, dtype=np.int64))
    else:
        flat, size = None, None
        for j, d in enumerate(dims):  # Horner: ((i0 * D1 + i1) * D2 + i2)...
            d = ctx.ints([d]) if isinstance(d, int) else d
            part = ctx.op("Gather", _int64(ctx, indices), ctx.ints([j]), axis=-1)
            part = ctx.op("Where", ctx.op("Less", part, ctx.ints([0])), ctx.op("Add", part, d), part)
            flat = part if flat is None else ctx.op("Add", ctx.op("Mul", flat, d), part)
            size = d if size is None else ctx.op("Mul", size, d)
        flat, count = ctx.op("Reshape", flat, ctx.ints([-1])), ctx.op("Size", flat)
        count = ctx.unsqueeze(count, [0])
    view = ctx.op("Reshape", dy[0], _vector(ctx, [count, -1]))  # [N, B]
    zeros = ctx.op("Reshape", ctx.zeros_like(x), _vector(ctx, [size, -1]))  # [D0 * ... * Dk-1, B]
    return [_scatter_add(ctx, x, zeros, view, flat, 0), None]


# ----- Einsum ----------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _einsum_terms(ctx, node):
    """(input terms, output term) with any ellipsis spelled out as letters, and implicit output made explicit."""
    equation = ctx.attr(node, "equation")
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    spare = [c for c in _LETTERS if c not in equation]
    width = 0
    if "..." in equation:
        widths = []
        for term, x in zip(terms, node.input):
            rank = ctx.rank(x) if "..." in term else len(term)
            if rank is None:
                raise _refuse(node, "an ellipsis on an input of unknown rank")
            widths.append(rank - len(term) + 3 if "..." in term else 0)
        width = max(widths)
        # Ellipsis dims align on the right, as in numpy.
        terms = [t.replace("...", "".join(spare[width - w:width])) for t, w in zip(terms, widths)]
    if not arrow:  # implicit output: the ellipsis, then the letters used once, sorted
        letters = "".join(terms)
        once = sorted(c for c in set(letters) if letters.count(c) == 1 and c not in spare)
        out = "".join(spare[:width]) + "".join(once)
    else:
        out = out.replace("...", "".join(spare[:width]))
    return terms, out


@vjp("Einsum")
def _einsum(ctx, node, dy, wants):
    # d x_i = einsum(dy, the other operands -> term_i): the contraction with x_i's slot left open.
    terms, out = _einsum_terms(ctx, node)
    _check_sizes(ctx, node, terms)
    grads: List[Optional[str]] = []
    for i, (term, x, want) in enumerate(zip(terms, node.input, wants)):
        if not want:
            grads.append(None)
            continue
        if len(set(term)) != len(term):
            raise _refuse(node, f"a repeated index in {term!r} (diagonal or trace) has no gradient rule")
        others = [(t, name) for j, (t, name) in enumerate(zip(terms, node.input)) if j != i]
        available = set(out).union(*[set(t) for t, _ in others])
        kept = "".join(c for c in term if c in available)
        if kept == out and not others:
            grad = dy[0]
        else:
            equation = ",".join([out] + [t for t, _ in others]) + "->" + kept
            grad = ctx.op("Einsum", dy[0], *[name for _, name in others], equation=equation)
        if kept != term:  # indices only x_i has were summed away: broadcast the gradient over them
            missing = [k for k, c in enumerate(term) if c not in available]
            grad = ctx.op("Expand", ctx.unsqueeze(grad, missing) if kept else grad, ctx.shape_of(x))
        grads.append(grad)
    return grads


def _check_sizes(ctx, node, terms) -> None:
    """Refuse an index whose static sizes differ between operands (torch-style 1-vs-n broadcasting):
    ONNX Einsum does not define it and onnx's shape inference types the output wrongly."""
    sizes = {}
    for term, x in zip(terms, node.input):
        shape = ctx.shape(x) or [None] * len(term)
        for c, dim in zip(term, shape):
            if dim is not None and sizes.setdefault(c, dim) != dim:
                raise _refuse(node, f"index {c!r} has sizes {sizes[c]} and {dim} in different operands "
                                    "(broadcast indices have no gradient rule)")
