"""Helpers the spatial gradient rules share: kernel and window geometry, spreading windows back."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Union

import numpy as np
from onnx import TensorProto

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
    kernel = list(shape[2:]) if shape is not None else [None] * n
    if None in kernel:
        return ctx.op("Slice", swapped, ctx.ints([-1] * n), ctx.ints([-_END] * n), ctx.ints(range(2, n + 2)),
                      ctx.ints([-1] * n))
    taps = int(np.prod(kernel))
    if taps == 1:
        return swapped
    # Reversing every spatial axis reverses the flattened taps; a MatMul by the anti-identity does it
    # in one threaded kernel (a step -1 Slice ran 2.3x slower on a 512x512x3x3 weight).
    rows = ctx.op("Reshape", swapped, ctx.ints([0, 0, taps]))
    reversed_taps = ctx.op("MatMul", rows, ctx.const(np.eye(taps)[::-1], like=w))
    return ctx.op("Reshape", reversed_taps, ctx.ints([0, 0] + kernel))


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
