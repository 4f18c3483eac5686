"""Gradient rules: MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, LRN (see conv.py for how each is formed)."""

from __future__ import annotations

import itertools
from typing import List, Optional

import numpy as np
from onnx import TensorProto, helper

from graphprune.autodiff.registry import vjp
from graphprune.autodiff.rules._spatial_common import (
    _END,
    _pick,
    _refuse,
    _scalar_dim,
    _spatial,
    _spread,
    _Window,
    _window,
)

# ----- pooling -----------------------------------------------------------------------------------

def _argmax_indices(ctx, node) -> str:
    """MaxPool's Indices (flat row-major offsets into x): the forward's, or a second MaxPool's."""
    if len(node.output) > 1 and node.output[1] and not ctx.attr(node, "storage_order", 0):
        return node.output[1]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "storage_order"}
    return ctx.op("MaxPool", node.input[0], outputs=2, **attrs)[1]


@vjp("MaxPool")
def _max_pool(ctx, node, dy, wants):
    g, x = dy[0], node.input[0]
    if g is None:
        return [None]
    indices = _argmax_indices(ctx, node)
    flat = ctx.ints([-1])
    target = ctx.op("Reshape", ctx.zeros_like(x), flat)
    if ctx.opset >= 16:
        out = ctx.op("ScatterElements", target, ctx.op("Reshape", indices, flat), ctx.op("Reshape", g, flat),
                     axis=0, reduction="add")
    else:
        out = _scatter_disjoint(ctx, node, target, indices, g)
    return [ctx.op("Reshape", out, ctx.shape_of(x))]


def _scatter_disjoint(ctx, node, target: str, indices: str, g: str) -> str:
    """Scatter-add without ScatterElements' reduction (opset < 16): windows p = ceil(footprint/stride)
    apart never overlap, so each of the prod(p) strided subsets scatters without duplicates."""
    kernel = list(ctx.attr(node, "kernel_shape"))
    n = len(kernel)
    win = _Window(kernel, list(ctx.attr(node, "strides", None) or [1] * n),
                  list(ctx.attr(node, "dilations", None) or [1] * n), [], [])
    period = [-(-win.footprint(i) // s) for i, s in enumerate(win.strides)]
    overlap = any(p > 1 for p in period)
    flat = ctx.ints([-1])
    for offsets in itertools.product(*[range(p) for p in period]):
        pick_i, pick_g = indices, g
        if overlap:
            args = (ctx.ints(offsets), ctx.ints([_END] * n), ctx.ints(range(2, n + 2)), ctx.ints(period))
            pick_i, pick_g = ctx.op("Slice", indices, *args), ctx.op("Slice", g, *args)
        pick_i, pick_g = ctx.op("Reshape", pick_i, flat), ctx.op("Reshape", pick_g, flat)
        if overlap:  # disjoint within the subset, not across subsets: add to what is there
            pick_g = ctx.op("Add", ctx.op("Gather", target, pick_i), pick_g)
        target = ctx.op("ScatterElements", target, pick_i, pick_g, axis=0)
    return target


def _pool_out_dims(ctx, win: _Window, x: str, ceil_mode: bool) -> List[Optional[int]]:
    """A pool's static output dims.  Computed: onnx's shape inference misses ceil_mode's rule that the
    last window starts inside the input or its head padding (onnxruntime and torch apply it)."""
    n = len(win.kernel)
    xs = _spatial(ctx, x, n)
    if not win.static or None in xs:
        return [None] * n
    dims = []
    for i, (d, s, b, e) in enumerate(zip(xs, win.strides, win.begin, win.end)):
        span = d + b + e - win.footprint(i)
        o = (-(-span // s) if ceil_mode else span // s) + 1
        dims.append(o - 1 if ceil_mode and (o - 1) * s >= d + b else o)
    return dims


def _window_counts(ctx, win: _Window, x: str, y: str, ys: List[Optional[int]], include_pad: bool) -> str:
    """How many input (or padded, with ``include_pad``) positions each output window covers, [O...]."""
    n, int64 = len(win.kernel), TensorProto.INT64
    xs = _spatial(ctx, x, n)
    if win.static and None not in xs and None not in ys:  # a constant, from the same arithmetic in numpy
        counts = np.ones([])
        for i, (d, o, s, b, e) in enumerate(zip(xs, ys, win.strides, win.begin, win.end)):
            taps = np.arange(o)[:, None] * s - b + np.arange(win.kernel[i]) * win.dilations[i]
            low, high = (-b, d + e) if include_pad else (0, d)
            counts = np.multiply.outer(counts, ((taps >= low) & (taps < high)).sum(1))
        return ctx.const(counts, like=x)
    zero, one = ctx.const(np.int64(0), dtype=int64), ctx.const(np.int64(1), dtype=int64)
    total = None
    for i in range(n):
        begin = _pick(ctx, win.begin, i)
        starts = ctx.op("Sub", ctx.op("Mul", ctx.op("Range", zero, _scalar_dim(ctx, y, i + 2), one),
                                      ctx.const(np.int64(win.strides[i]), dtype=int64)), begin)
        taps = ctx.op("Add", ctx.unsqueeze(starts, [1]), ctx.ints(np.arange(win.kernel[i]) * win.dilations[i]))
        size = _scalar_dim(ctx, x, i + 2)
        low, high = (ctx.op("Neg", begin), ctx.op("Add", size, _pick(ctx, win.end, i))) if include_pad else (zero, size)
        inside = ctx.op("And", ctx.op("GreaterOrEqual", taps, low), ctx.op("Less", taps, high))
        count = ctx.reduce_sum(ctx.cast_like(inside, x), [1], keepdims=False)
        others = [a for a in range(n) if a != i]
        count = ctx.unsqueeze(count, others) if others else count
        total = count if total is None else ctx.op("Mul", total, count)
    return total


def _uniform_windows(ctx, win: _Window, x: str, ys: List[Optional[int]], include_pad: bool, ceil_mode: bool) -> bool:
    """Whether every window counts prod(kernel) positions (no clipped window)."""
    if not win.static or (not include_pad and any(list(win.begin) + list(win.end))):
        return False
    if not ceil_mode:
        return True
    xs = _spatial(ctx, x, len(win.kernel))
    if None in xs or None in ys:
        return False
    return all((o - 1) * s + win.footprint(i) <= d + b + e
               for i, (o, s, d, b, e) in enumerate(zip(ys, win.strides, xs, win.begin, win.end)))


@vjp("AveragePool")
def _average_pool(ctx, node, dy, wants):
    (g,), x, y = dy, node.input[0], node.output[0]
    kernel = list(ctx.attr(node, "kernel_shape"))
    n = len(kernel)
    win = _window(ctx, node, x, kernel)
    include_pad, ceil_mode = bool(ctx.attr(node, "count_include_pad", 0)), bool(ctx.attr(node, "ceil_mode", 0))
    ys = _pool_out_dims(ctx, win, x, ceil_mode)
    if _uniform_windows(ctx, win, x, ys, include_pad, ceil_mode):
        scaled = ctx.op("Div", g, ctx.const(float(np.prod(kernel)), like=x))
    else:
        scaled = ctx.op("Div", g, _window_counts(ctx, win, x, y, ys, include_pad))
    # Every (n, c) plane is spread back by the same ones kernel: fold channels into the batch.
    planes = ctx.op("Reshape", scaled, ctx.ints([-1, 1] + [0] * n))
    ones = ctx.const(np.ones([1, 1] + kernel), like=x)
    return [ctx.op("Reshape", _spread(ctx, planes, ones, 1, win, x, ys), ctx.shape_of(x))]


@vjp("GlobalAveragePool")
def _global_average_pool(ctx, node, dy, wants):
    (g,), x, y = dy, node.input[0], node.output[0]
    shape = ctx.shape(x)
    if shape is not None and None not in shape[2:]:
        count = ctx.const(float(np.prod(shape[2:])), like=x)
    else:
        count = ctx.op("Div", ctx.cast_like(ctx.op("Size", x), x), ctx.cast_like(ctx.op("Size", y), x))
    return [ctx.op("Expand", ctx.op("Div", g, count), ctx.shape_of(x))]


@vjp("GlobalMaxPool")
def _global_max_pool(ctx, node, dy, wants):
    # The gradient is shared equally among positions tied for the maximum (as torch's amax does).
    (g,), x, y = dy, node.input[0], node.output[0]
    hits = ctx.cast_like(ctx.op("Equal", x, y), x)
    count = ctx.reduce_sum(ctx.op("Reshape", hits, ctx.ints([0, 0, -1])), [2], keepdims=True)
    share = ctx.op("Div", g, ctx.op("Reshape", count, ctx.shape_of(y)))
    return [ctx.op("Mul", hits, share)]


@vjp("LRN")
def _lrn(ctx, node, dy, wants):
    # y = x * S^-beta, S = bias + alpha * mean of x^2 over a channel window (size taps, zero padded):
    # dx = dy * S^-beta - 2 alpha beta x * mirrored-window mean of (dy x S^(-beta-1)).
    (g,), x = dy, node.input[0]
    size = int(ctx.attr(node, "size"))
    alpha, beta = float(ctx.attr(node, "alpha", 1e-4)), float(ctx.attr(node, "beta", 0.75))
    bias = float(ctx.attr(node, "bias", 1.0))
    rank = ctx.rank(x)
    if rank is None:
        raise _refuse(node, "input of unknown rank")
    head = (size - 1) // 2
    rest = [0] * (rank - 2)

    def channel_mean(t: str, before: int, after: int) -> str:  # channels as the first pooled axis
        pooled = ctx.op("AveragePool", ctx.unsqueeze(t, [1]), kernel_shape=[size] + [1] * (rank - 2),
                        pads=[before] + rest + [after] + rest, count_include_pad=1)
        return ctx.squeeze(pooled, [1])

    s = ctx.op("Add", ctx.op("Mul", channel_mean(ctx.op("Mul", x, x), head, size - 1 - head), ctx.const(alpha, like=x)),
               ctx.const(bias, like=x))
    powered = ctx.op("Pow", s, ctx.const(-beta, like=x))
    t = ctx.op("Mul", ctx.op("Mul", g, x), ctx.op("Div", powered, s))
    back = ctx.op("Mul", ctx.op("Mul", x, channel_mean(t, size - 1 - head, head)), ctx.const(2 * alpha * beta, like=x))
    return [ctx.op("Sub", ctx.op("Mul", g, powered), back)]
