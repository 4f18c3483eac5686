"""Gradient rules: Conv and ConvTranspose (the detail below covers every spatial rule module).

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

from typing import List, Optional

from graphprune.autodiff.registry import vjp
from graphprune.autodiff.rules._spatial_common import (
    _END,
    _conv_input_grad,
    _group_width,
    _kernel,
    _refuse,
    _shape_vec,
    _spatial,
    _text,
    _Window,
    _window,
)

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
