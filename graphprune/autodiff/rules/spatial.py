"""Gradient rules: convolution, pooling, resizing, padding and the other spatial (NC...) ops.

Handled: Conv and ConvTranspose (1-3-D, groups incl. depthwise, strides, dilations, asymmetric pads,
auto_pad, output_padding / output_shape, bias), MaxPool, AveragePool (count_include_pad both ways,
ceil_mode, dilations), GlobalAveragePool, GlobalMaxPool, LRN, Pad (constant, reflect, edge, wrap),
Resize (nearest with every nearest_mode, linear; every coordinate mode but tf_crop_and_resize; scales or
sizes, constant or computed), DepthToSpace (DCR, CRD) and SpaceToDepth.  Spatial dims may be dynamic.

How each gradient is formed (few nodes, big kernels; the timings quoted are onnxruntime 1.32 CPU on
ResNet-18 layer shapes):
- Conv input gradient: at stride 1 ONE Conv of dY with the flipped, transposed weights (as fast as
  the forward); else ONE ConvTranspose of dY with the forward weights.  Pads and output_padding give
  the exact input size from static shapes, else a Pad and a Slice against Shape(x) fix it at run time.
- Conv weight gradient: ONE Conv whose contraction is the batch and the positions: the input becomes
  [1, N, H, W, C] (channels a trailing depth axis, batch the channels) and dY the kernel [M, N, OH, OW, 1];
  the forward's strides become dilations and vice versa, groups a grouped Conv, and the end pads are
  trimmed so that exactly the kernel's taps are computed.  (The batch-as-channel Conv [C, N, H, W] *
  [M, N, OH, OW] is 2-4x slower in onnxruntime: its output has k*k pixels per image.)  1x1 kernels
  are batched MatMuls.
- ConvTranspose: the mirror image (input gradient = Conv, weight gradient the same correlation).
- MaxPool: dY goes to the argmax through the forward's Indices (or a second MaxPool that emits them)
  and one ScatterElements add (below opset 16, a plain scatter per set of disjoint windows).
- AveragePool: dY divided by each window's count (a constant when shapes are static), spread back by
  one ConvTranspose with a ones kernel over the (N*C)-plane batch.
- Resize: separable; per resized axis the transposed [out, in] interpolation matrix (one-hot for
  nearest, two taps for linear), built in the graph from the sizes with onnxruntime's float32
  coordinate arithmetic (constant-folded by the runtime when the sizes are static) and applied with
  one MatMul.  Integer nearest upsampling is a Reshape and a ReduceSum instead.

Refused by name (UserError naming op and node): Resize cubic, antialias, tf_crop_and_resize and
keep_aspect_ratio_policy other than stretch; auto_pad SAME whose kernel footprint is shorter than
stride - 1 (onnxruntime pads the head negatively); ConvTranspose whose output_shape exceeds its full
output, output_padding >= stride, or output_shape on run-time spatial sizes; Pad in reflect/edge/wrap
mode with computed or negative pads, or with computed axes; Conv kernels of unknown size and grouped
weights of unknown shape; LRN and Resize on inputs of unknown rank.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import List, Optional, Sequence, Union

import numpy as np
from onnx import TensorProto, helper

from graphprune.autodiff.registry import vjp
from graphprune.errors import UserError

_END = 2**62  # a Slice end meaning "to the end of the axis"
_F32 = TensorProto.FLOAT

# Per spatial axis: static ints, or a run-time 1-D int64 tensor (auto_pad on dynamic sizes).
Pads = Union[List[int], str]


def _refuse(node, why: str) -> UserError:
    return UserError(f"{node.op_type} node {node.name!r}: {why}")


def _text(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def _spatial(ctx, x: str, n: int) -> List[Optional[int]]:
    """The static spatial dims of ``x`` (None where unknown)."""
    shape = ctx.shape(x)
    return list(shape[2:]) if shape is not None and len(shape) == n + 2 else [None] * n


def _shape_vec(ctx, x: str, items: Sequence) -> str:
    """A 1-D int64 shape: ints are constants, ``(start, stop)`` are dims of ``x`` (static when known)."""
    shape = ctx.shape(x)
    parts: List[str] = []
    pending: List[int] = []
    for item in items:
        if not isinstance(item, tuple):
            pending.append(item)
            continue
        dims = list(shape[item[0]:item[1]]) if shape is not None else [None]
        if None in dims:
            if pending:
                parts.append(ctx.ints(pending))
                pending = []
            parts.append(ctx.op("Slice", ctx.shape_of(x), ctx.ints([item[0]]), ctx.ints([item[1]])))
        else:
            pending.extend(dims)
    if pending:
        parts.append(ctx.ints(pending))
    return parts[0] if len(parts) == 1 else ctx.op("Concat", *parts, axis=0)


def _scalar_dim(ctx, x: str, axis: int) -> str:
    """Dim ``axis`` of ``x`` as an int64 scalar."""
    shape = ctx.shape(x)
    if shape is not None and shape[axis] is not None:
        return ctx.const(np.int64(shape[axis]), dtype=TensorProto.INT64)
    return ctx.op("Gather", ctx.shape_of(x), ctx.const(np.int64(axis), dtype=TensorProto.INT64))


def _pick(ctx, pads: Pads, i: int) -> str:
    """Entry ``i`` of static or run-time pads, as an int64 scalar."""
    if isinstance(pads, str):
        return ctx.op("Gather", pads, ctx.const(np.int64(i), dtype=TensorProto.INT64))
    return ctx.const(np.int64(pads[i]), dtype=TensorProto.INT64)


def _kernel(ctx, node, w: str) -> List[int]:
    kernel = ctx.attr(node, "kernel_shape")
    if kernel:
        return list(kernel)
    shape = ctx.shape(w)
    if shape is None or len(shape) < 3 or None in shape[2:]:
        raise _refuse(node, "its kernel size is unknown (no kernel_shape and no static weight shape)")
    return list(shape[2:])


def _group_width(ctx, node, w: str, group: int) -> Optional[int]:
    """Dim 1 of the weight (channels per group): needed to regroup grouped channels, else a layout hint."""
    shape = ctx.shape(w)
    if shape is None or shape[1] is None:
        if group != 1:
            raise _refuse(node, "grouped weights of unknown shape; give the weight a static shape")
        return None
    return int(shape[1])


# ----- window geometry ---------------------------------------------------------------------------

@dataclasses.dataclass
class _Window:
    """Where a Conv/pool node's windows sit along each spatial axis."""

    kernel: List[int]
    strides: List[int]
    dilations: List[int]
    begin: Pads  # head padding
    end: Pads  # tail padding (-1 under SAME when the last input row is never read)

    @property
    def static(self) -> bool:
        return not isinstance(self.begin, str)

    def footprint(self, i: int) -> int:
        return (self.kernel[i] - 1) * self.dilations[i] + 1


def _window(ctx, node, x: str, kernel: List[int]) -> _Window:
    """The geometry of a Conv/pool node, with auto_pad resolved as onnxruntime does."""
    n = len(kernel)
    strides = list(ctx.attr(node, "strides", None) or [1] * n)
    dilations = list(ctx.attr(node, "dilations", None) or [1] * n)
    auto_pad = _text(ctx.attr(node, "auto_pad"), "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        pads = list(ctx.attr(node, "pads", None) or [0] * 2 * n) if auto_pad == "NOTSET" else [0] * 2 * n
        return _Window(kernel, strides, dilations, pads[:n], pads[n:])
    win = _Window(kernel, strides, dilations, [], [])
    feet = [win.footprint(i) for i in range(n)]
    if any(f < s - 1 for f, s in zip(feet, strides)):
        raise _refuse(node, f"auto_pad {auto_pad} with a kernel shorter than stride - 1 pads negatively")
    upper = auto_pad == "SAME_UPPER"
    dims = _spatial(ctx, x, n)
    if None not in dims or all(s == 1 for s in strides):  # stride 1 always needs footprint - 1
        need = [(-(-d // s) - 1) * s + f - d if d is not None else f - 1 for d, s, f in zip(dims, strides, feet)]
        win.begin = [max(p, 0) // 2 if upper else (max(p, 0) + 1) // 2 for p in need]
        win.end = [p - b for p, b in zip(need, win.begin)]
        return win
    # Spatial dims known only at run time: the same arithmetic in the graph.
    size, stride = _shape_vec(ctx, x, [(2, n + 2)]), ctx.ints(strides)
    outs = ctx.op("Div", ctx.op("Add", size, ctx.ints([s - 1 for s in strides])), stride)
    need = ctx.op("Sub", ctx.op("Add", ctx.op("Mul", ctx.op("Sub", outs, ctx.ints([1])), stride), ctx.ints(feet)), size)
    clipped = ctx.op("Max", need, ctx.ints([0] * n))
    win.begin = ctx.op("Div", clipped if upper else ctx.op("Add", clipped, ctx.ints([1])), ctx.ints([2]))
    win.end = ctx.op("Sub", need, win.begin)
    return win


# ----- input gradients: spreading windows back ---------------------------------------------------

def _spread(ctx, g: str, weight: str, group: int, win: _Window, x: str, ys: List[Optional[int]]) -> str:
    """The adjoint of sliding ``weight`` over x: ConvTranspose of ``g`` (output spatial dims ``ys``),
    sized exactly like x."""
    n = len(win.kernel)
    attrs = dict(strides=win.strides, dilations=win.dilations, group=group if group != 1 else None)
    xs = _spatial(ctx, x, n)
    if win.static and None not in xs and None not in ys:
        # ConvTranspose reaches s*(O-1) + footprint - begin; crop the excess at the end, or grow by
        # output_padding where a stride left the last input rows unread.
        span = [s * (o - 1) + win.footprint(i) - b for i, (s, o, b) in enumerate(zip(win.strides, ys, win.begin))]
        crop = [max(L - d, 0) for L, d in zip(span, xs)]
        grow = [max(d - L, 0) for L, d in zip(span, xs)]
        return ctx.op("ConvTranspose", g, weight, pads=list(win.begin) + crop,
                      output_padding=grow if any(grow) else None, **attrs)
    dx = ctx.op("ConvTranspose", g, weight, pads=(list(win.begin) if win.static else [0] * n) + [0] * n, **attrs)
    grow = [s - 1 for s in win.strides]  # at most s-1 input rows follow the last window
    if any(grow):
        dx = ctx.op("Pad", dx, ctx.ints([0] * (n + 2) + [0, 0] + grow))
    starts = ctx.ints([0] * n) if win.static else win.begin
    ends = ctx.op("Add", starts, _shape_vec(ctx, x, [(2, n + 2)]))
    return ctx.op("Slice", dx, starts, ends, ctx.ints(range(2, n + 2)))


def _flipped_weight(ctx, w: str, group: int, n: int) -> Optional[str]:
    """Conv weights [M, C/g, k...] as the weights of their adjoint Conv: [C, M/g, k...] reversed in space."""
    shape = ctx.shape(w)
    if group == 1:
        swapped = ctx.op("Transpose", w, perm=[1, 0] + list(range(2, n + 2)))
    elif shape is None or None in shape:
        return None
    else:
        split = ctx.op("Reshape", w, ctx.ints([group, shape[0] // group] + list(shape[1:])))
        moved = ctx.op("Transpose", split, perm=[0, 2, 1] + list(range(3, n + 3)))
        swapped = ctx.op("Reshape", moved, ctx.ints([group * shape[1], shape[0] // group] + list(shape[2:])))
    return ctx.op("Slice", swapped, ctx.ints([-1] * n), ctx.ints([-_END] * n), ctx.ints(range(2, n + 2)),
                  ctx.ints([-1] * n))


def _conv_input_grad(ctx, g: str, w: str, group: int, win: _Window, x: str, y: str) -> str:
    """Stride 1: a forward Conv of dY with the flipped weights (onnxruntime runs it as fast as the
    forward, about twice as fast as ConvTranspose); otherwise ConvTranspose."""
    n = len(win.kernel)
    if win.static and all(s == 1 for s in win.strides):
        reach = [win.footprint(i) - 1 for i in range(n)]
        pads = [r - b for r, b in zip(reach, win.begin)] + [r - e for r, e in zip(reach, win.end)]
        flipped = _flipped_weight(ctx, w, group, n) if min(pads) >= 0 else None
        if flipped is not None:
            return ctx.op("Conv", g, flipped, dilations=win.dilations, pads=pads, group=group if group != 1 else None)
    return _spread(ctx, g, w, group, win, x, _spatial(ctx, y, n))


# ----- weight gradients: correlating inputs with output gradients ---------------------------------

# Channels per group from which the depth axis goes last: contiguous im2col rows, measured 1.5-3x faster
# in onnxruntime for 64 channels, but slower for an RGB stem.
_DEPTH_LAST_FROM = 8


def _as_depth(ctx, data: str, like: str, group: int, inner: int, n: int, last: bool) -> str:
    """[N, group*inner, S...] -> [1, group*N, inner, S...] (or [1, group*N, S..., inner] with ``last``):
    the channels become a depth axis and the batch (per group) the channels.  ``like`` is a forward
    tensor of data's shape (for static dims)."""
    spatial = list(range(2, n + 2))
    if group == 1:
        return ctx.unsqueeze(ctx.op("Transpose", data, perm=[0] + spatial + [1]) if last else data, [0])
    if inner == 1:  # depthwise: [C, N, S...] read as one image of C*N channels, depth 1
        merged = ctx.op("Reshape", ctx.op("Transpose", data, perm=[1, 0] + spatial), ctx.ints([1, -1] + [0] * n))
        return ctx.unsqueeze(merged, [n + 2 if last else 2])
    split = ctx.op("Reshape", data, ctx.ints([0, group, inner, -1]))
    moved = ctx.op("Transpose", split, perm=[1, 0, 3, 2] if last else [1, 0, 2, 3])
    dims = [1, -1, (2, n + 2), inner] if last else [1, -1, inner, (2, n + 2)]
    return ctx.op("Reshape", moved, _shape_vec(ctx, like, dims))


def _correlate(ctx, data: str, like: str, kernel: str, group: int, inner: Optional[int], win: _Window,
               begin: List[int], end: List[int], kernel_len: List[Optional[int]]) -> str:
    """sum over batch and positions of data's windows times ``kernel``, as ONE Conv -> [K, inner, k...].

    ``data`` [N, group*inner, D...] is the Conv's input as [1, group*N, D..., inner] (its channels a
    depth axis) and ``kernel`` [N, K, Kl...] its weight as [K, N, Kl..., 1]: batch and positions are the
    Conv's contraction, and its output [1, K, k..., inner] is the gradient, computed as one GEMM over a
    well-shaped im2col.  (The batch-as-channel Conv, whose output has only k pixels per image, measured
    2-4x slower in onnxruntime.)  The forward's dilations are its strides and the forward's strides its
    dilations.  Where sizes are static the end pads are trimmed (or the data cropped) so that exactly
    the forward kernel's taps are computed; else the result is sliced.
    """
    n = len(win.kernel)
    last = inner is None or inner >= _DEPTH_LAST_FROM
    axes = list(range(2, n + 2)) if last else list(range(3, n + 3))  # data's spatial axes in the Conv input
    data_len = _spatial(ctx, like, n)
    source = _as_depth(ctx, data, like, group, inner or 0, n, last)
    end = [max(e, 0) for e in end]
    exact = None not in data_len and None not in kernel_len
    if exact:
        excess = [d + b + e - ((k - 1) * s + win.footprint(i))
                  for i, (d, b, e, k, s) in enumerate(zip(data_len, begin, end, kernel_len, win.strides))]
        end = [e - r for e, r in zip(end, excess)]
        if any(e < 0 for e in end):  # the pads cannot absorb the excess: drop unread data rows
            kept = [d + min(e, 0) for d, e in zip(data_len, end)]
            source = ctx.op("Slice", source, ctx.ints([0] * n), ctx.ints(kept), ctx.ints(axes))
            end = [max(e, 0) for e in end]
    weight = ctx.unsqueeze(ctx.op("Transpose", kernel, perm=[1, 0] + list(range(2, n + 2))), [n + 2 if last else 2])
    if last:
        attrs = dict(strides=win.dilations + [1], dilations=win.strides + [1], pads=list(begin) + [0] + end + [0])
    else:
        attrs = dict(strides=[1] + win.dilations, dilations=[1] + win.strides, pads=[0] + list(begin) + [0] + end)
    out = ctx.squeeze(ctx.op("Conv", source, weight, group=group if group != 1 else None, **attrs), [0])
    if last:
        out = ctx.op("Transpose", out, perm=[0, n + 1] + list(range(1, n + 1)))
    if not exact:
        out = ctx.op("Slice", out, ctx.ints([0] * n), ctx.ints(win.kernel), ctx.ints(range(2, n + 2)))
    return out


def _pointwise_weight_grad(ctx, g: str, x: str, w: str, group: int, win: _Window) -> Optional[str]:
    """A 1x1 Conv's weight gradient as batched MatMuls over the (strided) input, summed over the batch;
    None when pads make some outputs read padding or channel counts are unknown."""
    n = len(win.kernel)
    shape_w, shape_x = ctx.shape(w), ctx.shape(x)
    if shape_w is None or None in shape_w or shape_x is None or shape_x[1] is None:
        return None
    m, c = shape_w[0], shape_x[1]
    if not win.static or any(win.begin) or max(win.end) > 0:
        return None
    if any(s > 1 for s in win.strides):
        x = ctx.op("Slice", x, ctx.ints([0] * n), ctx.ints([_END] * n), ctx.ints(range(2, n + 2)),
                   ctx.ints(win.strides))
    rows = ctx.op("Reshape", g, ctx.ints([0, group, m // group, -1]))  # [N, g, M/g, L]
    cols = ctx.op("Reshape", x, ctx.ints([0, group, c // group, -1]))  # [N, g, C/g, L]
    if c <= m:  # transpose the smaller operand
        product = ctx.op("MatMul", rows, ctx.op("Transpose", cols, perm=[0, 1, 3, 2]))
    else:
        product = ctx.op("Transpose", ctx.op("MatMul", cols, ctx.op("Transpose", rows, perm=[0, 1, 3, 2])),
                         perm=[0, 1, 3, 2])
    return ctx.op("Reshape", ctx.reduce_sum(product, [0], keepdims=False), ctx.ints(list(shape_w)))


def _bias_grad(ctx, g: str, n: int) -> str:
    return ctx.reduce_sum(g, [0] + list(range(2, n + 2)), keepdims=False)


# ----- Conv, ConvTranspose -----------------------------------------------------------------------

@vjp("Conv")
def _conv(ctx, node, dy, wants):
    (g,), y = dy, node.output[0]
    x, w = node.input[0], node.input[1]
    kernel = _kernel(ctx, node, w)
    n, group = len(kernel), int(ctx.attr(node, "group", 1))
    win = _window(ctx, node, x, kernel)
    grads: List[Optional[str]] = [None] * len(node.input)
    if wants[0]:
        grads[0] = _conv_input_grad(ctx, g, w, group, win, x, y)
    if wants[1]:
        if all(k == 1 for k in kernel):
            grads[1] = _pointwise_weight_grad(ctx, g, x, w, group, win)
        if grads[1] is None:
            grads[1] = _conv_weight_grad(ctx, node, g, x, y, w, group, win)
    if len(node.input) > 2 and wants[2]:
        grads[2] = _bias_grad(ctx, g, n)
    return grads


def _conv_weight_grad(ctx, node, g: str, x: str, y: str, w: str, group: int, win: _Window) -> str:
    n = len(win.kernel)
    inner = _group_width(ctx, node, w, group)
    data, begin, end = x, win.begin, win.end
    if not win.static:  # run-time auto_pad: pad x explicitly, then correlate without pads
        zeros = ctx.ints([0, 0])
        pads = ctx.op("Concat", zeros, win.begin, zeros, ctx.op("Max", win.end, ctx.ints([0] * n)), axis=0)
        data = ctx.op("Pad", x, pads)
        begin = end = [0] * n
    return _correlate(ctx, data, data, g, group, inner, win, begin, end, _spatial(ctx, y, n))


def _transpose_window(ctx, node, x: str, kernel: List[int]) -> _Window:
    """ConvTranspose's geometry; pads from output_shape / auto_pad as onnxruntime resolves them."""
    n = len(kernel)
    strides = list(ctx.attr(node, "strides", None) or [1] * n)
    win = _Window(kernel, strides, list(ctx.attr(node, "dilations", None) or [1] * n), [], [])
    extra = list(ctx.attr(node, "output_padding", None) or [0] * n)
    if any(p >= s for p, s in zip(extra, strides)):
        raise _refuse(node, "output_padding must be smaller than the stride")
    auto_pad = _text(ctx.attr(node, "auto_pad"), "NOTSET")
    output_shape = ctx.attr(node, "output_shape")
    if not output_shape and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        pads = list(ctx.attr(node, "pads", None) or [0] * 2 * n) if auto_pad != "VALID" else [0] * 2 * n
        win.begin, win.end = pads[:n], pads[n:]
        return win
    if output_shape:
        dims = _spatial(ctx, x, n)
        if None in dims:
            raise _refuse(node, "output_shape on an input of run-time spatial size")
        total = [s * (d - 1) + p + win.footprint(i) - o
                 for i, (s, d, p, o) in enumerate(zip(strides, dims, extra, list(output_shape)[-n:]))]
    else:
        total = [p + win.footprint(i) - s for i, (p, s) in enumerate(zip(extra, strides))]
    if any(t < 0 for t in total):
        raise _refuse(node, "its output (output_shape or auto_pad SAME) exceeds the full transposed convolution")
    win.begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
    win.end = [t - b for t, b in zip(total, win.begin)]
    return win


@vjp("ConvTranspose")
def _conv_transpose(ctx, node, dy, wants):
    (g,), y = dy, node.output[0]
    x, w = node.input[0], node.input[1]
    kernel = _kernel(ctx, node, w)
    n, group = len(kernel), int(ctx.attr(node, "group", 1))
    win = _transpose_window(ctx, node, x, kernel)
    grads: List[Optional[str]] = [None] * len(node.input)
    if wants[0]:  # the forward Conv of dY, same weights: its output has x's size exactly
        grads[0] = ctx.op("Conv", g, w, strides=win.strides, dilations=win.dilations, pads=win.begin + win.end,
                          group=group if group != 1 else None)
    if wants[1]:
        inner = _group_width(ctx, node, w, group)
        grads[1] = _correlate(ctx, g, y, x, group, inner, win, win.begin, win.end, _spatial(ctx, x, n))
    if len(node.input) > 2 and wants[2]:
        grads[2] = _bias_grad(ctx, g, n)
    return grads


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
