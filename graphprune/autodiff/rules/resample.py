"""Gradient rules: Pad, Resize, DepthToSpace, SpaceToDepth (see conv.py for how each is formed)."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np
from onnx import TensorProto

from graphprune.autodiff.registry import vjp
from graphprune.autodiff.rules._spatial_common import (
    _END,
    _F32,
    _refuse,
    _scalar_dim,
    _shape_vec,
    _text,
)

# ----- Pad ---------------------------------------------------------------------------------------

@vjp("Pad")
def _pad(ctx, node, dy, wants):
    g = dy[0]
    mode = _text(ctx.attr(node, "mode"), "constant")
    pads = ctx.value(node.input[1])
    axes_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
    axes = ctx.value(axes_name) if axes_name else None
    if axes_name and axes is None:
        raise _refuse(node, "its axes are computed at run time")
    grads: List[Optional[str]] = [None] * len(node.input)
    if mode == "constant":
        grads[0] = _unpad_constant(ctx, g, node.input[1], pads, axes)
    elif mode in ("reflect", "edge", "wrap"):
        if pads is None or (pads < 0).any():
            raise _refuse(node, f"{mode} mode with computed or negative pads")
        k = len(pads) // 2
        for axis, before, after in zip(axes if axes is not None else range(k), pads[:k], pads[k:]):
            if before or after:
                g = _fold_axis(ctx, g, int(axis), int(before), int(after), mode)
        grads[0] = g
    else:
        raise _refuse(node, f"mode {mode!r}")
    if len(node.input) > 2 and node.input[2] and wants[2] and mode == "constant":
        # The fill value appears at every padded position: its gradient is what dx leaves out.
        left = ctx.op("Sub", ctx.reduce_sum(g, None, keepdims=False), ctx.reduce_sum(grads[0], None, keepdims=False))
        grads[2] = ctx.op("Reshape", left, ctx.shape_of(node.input[2]))
    return grads


def _unpad_constant(ctx, g: str, pads_name: str, pads: Optional[np.ndarray], axes) -> str:
    """The padded region dropped: a Slice for static non-negative pads, else Pad by the negated pads."""
    if pads is not None and not (pads < 0).any():
        k = len(pads) // 2
        axes = list(axes) if axes is not None else list(range(k))
        keep = [i for i in range(k) if pads[i] or pads[k + i]]
        if not keep:
            return g
        return ctx.op("Slice", g, ctx.ints([int(pads[i]) for i in keep]),
                      ctx.ints([-int(pads[k + i]) if pads[k + i] else _END for i in keep]),
                      ctx.ints([int(axes[i]) for i in keep]))
    negated = ctx.ints(-pads) if pads is not None else ctx.op("Neg", pads_name)
    return ctx.op("Pad", g, negated, *([None, ctx.ints(list(axes))] if axes is not None else []))


def _fold_axis(ctx, g: str, axis: int, before: int, after: int, mode: str) -> str:
    """Undo reflect/edge/wrap padding on one axis: the border copies' gradients are added back
    to the positions they were copied from."""

    def part(t, start, stop, step=None):
        return ctx.op("Slice", t, ctx.ints([start]), ctx.ints([stop]), ctx.ints([axis]),
                      ctx.ints([step]) if step else None)

    def add_at(t, start, stop, v):  # t[start:stop] += v along axis
        pieces = [part(t, 0, start)] if start != 0 else []
        pieces.append(ctx.op("Add", part(t, start, stop), v))
        if stop != _END:
            pieces.append(part(t, stop, _END))
        return ctx.op("Concat", *pieces, axis=axis) if len(pieces) > 1 else pieces[0]

    core = part(g, before, -after if after else _END)
    if mode == "edge":
        if before:
            core = add_at(core, 0, 1, ctx.reduce_sum(part(g, 0, before), [axis]))
        if after:
            core = add_at(core, -1, _END, ctx.reduce_sum(part(g, -after, _END), [axis]))
    elif mode == "reflect":  # pad row j before maps to x[before - j], after to x[-2 - j]: reversed runs
        if before:
            core = add_at(core, 1, before + 1, part(g, before - 1, -_END, -1))
        if after:
            core = add_at(core, -1 - after, -1, part(g, -1, -after - 1, -1))
    else:  # wrap: the head pad copies x's tail, the tail pad x's head
        if before:
            core = add_at(core, -before, _END, part(g, 0, before))
        if after:
            core = add_at(core, 0, after, part(g, -after, _END))
    return core


# ----- Resize ------------------------------------------------------------------------------------

# (coordinate mode, nearest mode) under which an integer upscale f repeats each input f times
# (asymmetric with round_prefer_floor too, for f = 2 only).
_REPEATS = {(c, m) for c in ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric")
            for m in ("round_prefer_floor", "round_prefer_ceil")} | {("asymmetric", "floor"),
                                                                      ("tf_half_pixel_for_nn", "floor")}


@dataclasses.dataclass
class _Interpolation:
    """What a Resize node does along each axis it resizes."""

    mode: str
    coord: str
    nearest: str
    rank: int
    axes: List[int]
    scales_in: Optional[str]  # the scales input, if it is given (else sizes are)
    scales: Optional[np.ndarray]  # its constant value

    def repeats(self, scale: Optional[float]) -> bool:
        if self.mode != "nearest" or scale is None or scale < 2 or scale != int(scale):
            return False
        return (self.coord, self.nearest) in _REPEATS or (self.coord, self.nearest, scale) == (
            "asymmetric", "round_prefer_floor", 2)


def _interpolation(ctx, node) -> _Interpolation:
    """Resize's attributes and scales; refuses what has no gradient rule."""
    mode = _text(ctx.attr(node, "mode"), "nearest")
    coord = _text(ctx.attr(node, "coordinate_transformation_mode"), "half_pixel")
    if mode not in ("nearest", "linear"):
        raise _refuse(node, f"mode {mode!r} (only nearest and linear train)")
    if ctx.attr(node, "antialias", 0) or coord == "tf_crop_and_resize":
        raise _refuse(node, "antialias" if ctx.attr(node, "antialias", 0) else "coordinate mode tf_crop_and_resize")
    if _text(ctx.attr(node, "keep_aspect_ratio_policy"), "stretch") != "stretch":
        raise _refuse(node, "keep_aspect_ratio_policy other than 'stretch'")
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x) if ctx.rank(x) is not None else ctx.rank(y)
    if rank is None:
        raise _refuse(node, "input of unknown rank")
    axes = [a + rank if a < 0 else a for a in (ctx.attr(node, "axes", None) or range(rank))]
    scales_in = node.input[2] if len(node.input) > 2 and node.input[2] else None
    scales = ctx.value(scales_in) if scales_in else None
    if scales is not None and scales.size == 0:  # an empty scales input: sizes are given
        scales_in, scales = None, None
    return _Interpolation(mode, coord, _text(ctx.attr(node, "nearest_mode"), "round_prefer_floor"), rank, axes,
                          scales_in, scales)


def _static_scale(ctx, interp: _Interpolation, i: int, x: str, y: str) -> Optional[float]:
    """Axis ``axes[i]``'s scale as onnxruntime holds it (float32), when it is known at build time."""
    if interp.scales_in:
        return float(np.float32(interp.scales[i])) if interp.scales is not None else None
    axis = interp.axes[i]
    sx, sy = ctx.shape(x), ctx.shape(y)
    size_in, size_out = (sx[axis] if sx else None), (sy[axis] if sy else None)
    return None if None in (size_in, size_out) else float(np.float32(size_out) / np.float32(size_in))


@vjp("Resize")
def _resize(ctx, node, dy, wants):
    (g,), x, y = dy, node.input[0], node.output[0]
    interp = _interpolation(ctx, node)
    repeats = {}
    for i, axis in enumerate(interp.axes):
        scale = _static_scale(ctx, interp, i, x, y)
        if scale == 1.0:  # onnxruntime copies axes of scale 1 whatever the coordinate mode
            continue
        if interp.repeats(scale):
            repeats[axis] = int(scale)
            continue
        scale_t = (ctx.const(np.float32(scale), dtype=_F32) if scale is not None
                   else _resize_scale(ctx, interp.scales_in, i, x, y, axis))
        matrix = _resize_matrix(ctx, x, y, axis, scale_t, scale is None, interp, axis == interp.rank - 2)
        g = _contract(ctx, g, matrix, axis, interp.rank)
    if repeats:  # out = in * f: split each such axis into (in, f) and sum the f copies
        items: list = []
        for axis in range(interp.rank):
            items += [(axis, axis + 1), repeats[axis]] if axis in repeats else [(axis, axis + 1)]
        summed = [i for i, item in enumerate(items) if not isinstance(item, tuple)]
        g = ctx.reduce_sum(ctx.op("Reshape", g, _shape_vec(ctx, x, items)), summed, keepdims=False)
    return [g] + [None] * (len(node.input) - 1)


def _resize_scale(ctx, scales_in: Optional[str], i: int, x: str, y: str, axis: int) -> str:
    """The run-time float32 scale of one axis: the scales input's, or out/in sizes."""
    if scales_in:
        return ctx.op("Cast", ctx.op("Gather", scales_in, ctx.const(np.int64(i), dtype=TensorProto.INT64)), to=_F32)
    return ctx.op("Div", *(ctx.op("Cast", _scalar_dim(ctx, t, axis), to=_F32) for t in (y, x)))


def _resize_matrix(ctx, x: str, y: str, axis: int, scale: str, dynamic_scale: bool, interp: _Interpolation,
                   transposed: bool) -> str:
    """Resize's interpolation along ``axis`` as a [out, in] matrix ([in, out] if ``transposed``).

    The coordinates follow onnxruntime's arithmetic (upsamplebase.h / upsample.cc) in float32, as it
    computes them for every element type; the matrix is cast to x's type at the end."""
    zero, half, one = (ctx.const(np.float32(v), dtype=_F32) for v in (0.0, 0.5, 1.0))
    size_in, size_out = (ctx.op("Cast", _scalar_dim(ctx, t, axis), to=_F32) for t in (x, y))
    o = ctx.op("Range", zero, size_out, one)
    source = _source_coordinates(ctx, o, scale, size_in, size_out, interp.coord)
    if dynamic_scale:
        source = ctx.op("Where", ctx.op("Equal", scale, one), o, source)
    last = ctx.op("Sub", size_in, one)
    columns = ctx.op("Range", zero, size_in, one)
    rows_at, cols_at = ([0], [1]) if transposed else ([1], [0])

    def onehot(index: str) -> str:
        return ctx.op("Cast", ctx.op("Equal", ctx.unsqueeze(index, rows_at), ctx.unsqueeze(columns, cols_at)), to=_F32)

    def typed(matrix: str) -> str:
        return matrix if ctx.elem_type(x) == _F32 else ctx.cast_like(matrix, x)

    if interp.mode == "nearest":
        floor = ctx.op("Floor", source)
        if interp.nearest == "floor":
            index = floor
        elif interp.nearest == "ceil":
            index = ctx.op("Ceil", source)
        else:  # round, ties down (prefer_floor) or up (prefer_ceil)
            above = ctx.op("Greater" if interp.nearest == "round_prefer_floor" else "GreaterOrEqual",
                           ctx.op("Sub", source, floor), half)
            index = ctx.op("Add", floor, ctx.op("Cast", above, to=_F32))
        return typed(onehot(ctx.op("Min", ctx.op("Max", index, zero), last)))
    clamped = ctx.op("Min", ctx.op("Max", source, zero), last)
    low = ctx.op("Floor", clamped)
    high = ctx.op("Min", ctx.op("Add", low, one), last)
    frac = ctx.unsqueeze(ctx.op("Sub", clamped, low), rows_at)
    return typed(ctx.op("Add", ctx.op("Mul", onehot(low), ctx.op("Sub", one, frac)), ctx.op("Mul", onehot(high), frac)))


def _source_coordinates(ctx, o: str, scale: str, size_in: str, size_out: str, coord: str) -> str:
    """Where output positions ``o`` read the input, per coordinate_transformation_mode (float32)."""
    half, one = (ctx.const(np.float32(v), dtype=_F32) for v in (0.5, 1.0))
    centred = ctx.op("Div", ctx.op("Add", o, half), scale)
    if coord == "asymmetric":
        return ctx.op("Div", o, scale)
    if coord == "tf_half_pixel_for_nn":
        return centred
    if coord == "align_corners":  # an output of length 1 reads position 0 (o is 0 there)
        return ctx.op("Div", ctx.op("Mul", o, ctx.op("Sub", size_in, one)),
                      ctx.op("Max", ctx.op("Sub", size_out, one), one))
    if coord == "half_pixel_symmetric":
        adjust = ctx.op("Div", size_out, ctx.op("Mul", scale, size_in))
        halved = ctx.op("Div", size_in, ctx.const(np.float32(2), dtype=_F32))
        centred = ctx.op("Add", ctx.op("Mul", halved, ctx.op("Sub", one, adjust)), centred)
    source = ctx.op("Sub", centred, half)
    if coord == "pytorch_half_pixel":  # an output of length 1 reads position 0
        source = ctx.op("Where", ctx.op("Greater", size_out, one), source, ctx.const(np.float32(0), dtype=_F32))
    return source


def _contract(ctx, g: str, matrix: str, axis: int, rank: int) -> str:
    """Apply the transposed interpolation along ``axis``: one MatMul (the matrix is [in, out] for the
    second-last axis, [out, in] otherwise)."""
    if axis == rank - 1:
        return ctx.op("MatMul", g, matrix)
    if axis == rank - 2:
        return ctx.op("MatMul", matrix, g)
    perm = [a for a in range(rank) if a != axis] + [axis]
    moved = ctx.op("MatMul", ctx.op("Transpose", g, perm=perm), matrix)
    return ctx.op("Transpose", moved, perm=list(np.argsort(perm)))


# ----- DepthToSpace, SpaceToDepth ------------------------------------------------------------------

@vjp("DepthToSpace")
def _depth_to_space(ctx, node, dy, wants):
    (g,), x, y = dy, node.input[0], node.output[0]
    block = int(ctx.attr(node, "blocksize"))
    gathered = ctx.op("SpaceToDepth", g, blocksize=block)
    if _text(ctx.attr(node, "mode"), "DCR") == "DCR":
        return [gathered]
    # CRD read channel c*b*b + i*b + j where SpaceToDepth writes (i*b + j)*C' + c: swap the two factors.
    split = ctx.op("Reshape", gathered, _shape_vec(ctx, y, [0, block * block, (1, 2), -1]))
    swapped = ctx.op("Transpose", split, perm=[0, 2, 1, 3])
    return [ctx.op("Reshape", swapped, ctx.shape_of(x))]


@vjp("SpaceToDepth")
def _space_to_depth(ctx, node, dy, wants):
    return [ctx.op("DepthToSpace", dy[0], blocksize=int(ctx.attr(node, "blocksize")), mode="DCR")]
