"""Gradient rules of the spatial ops (Conv, ConvTranspose, pools, LRN, Pad, Resize, DepthToSpace)
against finite differences, onnxruntime and torch autograd.

Every case runs with static input shapes and with symbolic dims (the rules then build sizes and pads
from Shape nodes).  onnx 1.23's reference evaluator gets grouped ConvTranspose, some MaxPool Indices
and some ceil_mode AveragePools wrong: the tests replace those three kernels (for their duration)
with numpy versions checked against onnxruntime.  Where the reference and onnxruntime disagree on the
forward op itself (Resize with non-integer scales, whose coordinates onnxruntime computes in float32;
Pad with negative pads), the gradient is checked against onnxruntime's own forward instead.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper, numpy_helper
from onnx.reference.ops.op_average_pool import AveragePool_11, AveragePool_19
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _ReferenceConvTranspose
from onnx.reference.ops.op_max_pool import MaxPool as _ReferenceMaxPool

from graphprune.autodiff.gradient import build_gradients
from graphprune.errors import UserError
from tests.gradcheck import check_gradients, graph_gradients, make_model, torch_gradients

RNG = np.random.default_rng(0)


def _exact_conv_transpose(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                          output_padding=None, output_shape=None, pads=None, strides=None):
    """ConvTranspose with pads resolved as onnxruntime does: onnx 1.23's reference mixes up the channels
    of groups > 1 and refuses output_shape without auto_pad."""
    n, group = x.ndim - 2, group or 1
    strides, dilations = strides or [1] * n, dilations or [1] * n
    extra, kernel, dims = output_padding or [0] * n, w.shape[2:], x.shape[2:]
    full = [s * (d - 1) + (k - 1) * dl + 1 + e for s, d, k, dl, e in zip(strides, dims, kernel, dilations, extra)]
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = list(output_shape)[-n:] if output_shape else [d * s for d, s in zip(dims, strides)]
        total = [f - o for f, o in zip(full, out)]
        head = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
    else:
        pads = pads or [0] * 2 * n
        head, out = pads[:n], [f - pads[i] - pads[n + i] for i, f in enumerate(full)]
    width, per = w.shape[1], w.shape[0] // group
    y = np.zeros((x.shape[0], width * group, *full), dtype=x.dtype)
    for g in range(group):
        xs, ws = x[:, g * per:(g + 1) * per], w[g * per:(g + 1) * per]
        for tap in np.ndindex(*kernel):
            at = tuple(slice(t * dl, t * dl + s * (d - 1) + 1, s) for t, dl, s, d in zip(tap, dilations, strides, dims))
            y[(slice(None), slice(g * width, (g + 1) * width)) + at] += np.einsum(
                "nc...,cm->nm...", xs, ws[(slice(None), slice(None)) + tap])
    y = y[(slice(None), slice(None)) + tuple(slice(h, h + o) for h, o in zip(head, out))]
    return (y if b is None else y + b.reshape((1, -1) + (1,) * n),)


def _pool_geometry(dims, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides):
    """(head pads, tail pads, tail pads reaching the last window, output dims) as onnxruntime sizes a
    pool: ceil_mode's window that would start in the tail padding is dropped."""
    n = len(dims)
    strides, dilations = strides or [1] * n, dilations or [1] * n
    feet = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(dims, kernel_shape, strides, dilations, auto_pad == "SAME_UPPER")
    pads = pads or [0] * 2 * n
    outs = []
    for d, s, f, b, e in zip(dims, strides, feet, pads[:n], pads[n:]):
        o = (-(-(d + b + e - f) // s) if ceil_mode else (d + b + e - f) // s) + 1
        outs.append(o - 1 if ceil_mode and (o - 1) * s >= d + b else o)
    reach = [max(e, (o - 1) * s + f - d - b) for d, s, f, o, b, e in zip(dims, strides, feet, outs, pads[:n], pads[n:])]
    return pads[:n], pads[n:], reach, outs, strides, dilations


def _pool_taps(array, fill, kernel_shape, geometry):
    """The window views of ``array`` (spatial dims last), one per kernel tap in row-major order."""
    begin, _, reach, outs, strides, dilations = geometry
    n = len(begin)
    padded = np.pad(array, [(0, 0)] * (array.ndim - n) + list(zip(begin, reach)), constant_values=fill)
    for tap in np.ndindex(*kernel_shape):
        yield padded[(Ellipsis,) + tuple(slice(t * dl, t * dl + s * (o - 1) + 1, s)
                                          for t, dl, s, o in zip(tap, dilations, strides, outs))]


def _exact_max_pool(self, x, auto_pad=None, ceil_mode=0, dilations=None, kernel_shape=None, pads=None,
                    storage_order=0, strides=None):
    """MaxPool with Indices as onnxruntime computes them: onnx 1.23's reference gives per-channel offsets
    for some 1-D pools (the rules scatter through the global row-major offsets the spec defines)."""
    dims = x.shape[2:]
    geometry = _pool_geometry(dims, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides)
    order = np.arange(np.prod(dims)).reshape(dims[::-1]).transpose() if storage_order else np.arange(np.prod(dims))
    index = (np.arange(x.shape[0] * x.shape[1])[:, None] * np.prod(dims) + order.reshape(1, -1)).reshape(x.shape)
    best = where = None
    for values, offsets in zip(_pool_taps(x, -np.inf, kernel_shape, geometry),
                               _pool_taps(index, -1, kernel_shape, geometry)):
        if best is None:
            best, where = values, offsets
        else:  # strict >: the first maximum wins
            best, where = np.where(values > best, values, best), np.where(values > best, offsets, where)
    return best, where


def _exact_average_pool(self, x, auto_pad=None, ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape=None,
                        pads=None, strides=None):
    """AveragePool as onnxruntime and torch compute it: onnx 1.23's reference misplaces ceil_mode's
    partial windows for some shapes."""
    dims = x.shape[2:]
    geometry = _pool_geometry(dims, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides)
    begin, end, reach, _, _, _ = geometry
    counted = np.ones(dims)
    if count_include_pad:  # the declared padding counts; the reach beyond it (ceil_mode) does not
        counted = np.pad(counted, list(zip(begin, end)), constant_values=1)
        geometry = ([0] * len(dims), None, [r - e for r, e in zip(reach, end)]) + geometry[3:]
        total = sum(_pool_taps(np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end))), 0.0, kernel_shape, geometry))
    else:
        total = sum(_pool_taps(x, 0.0, kernel_shape, geometry))
    count = sum(_pool_taps(counted, 0.0, kernel_shape, geometry))
    return ((total / count).astype(x.dtype),)


@pytest.fixture(autouse=True)
def _exact_reference_ops(monkeypatch):
    monkeypatch.setattr(_ReferenceConvTranspose, "_run", _exact_conv_transpose)
    monkeypatch.setattr(_ReferenceMaxPool, "_run", _exact_max_pool)
    for average_pool in (AveragePool_11, AveragePool_19):
        monkeypatch.setattr(average_pool, "_run", _exact_average_pool)


def _f32(value: float) -> float:
    """A float attribute as the model holds it (ONNX float attributes are float32)."""
    return float(np.float32(value))


def _rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _distinct(*shape):
    """Values with no ties (MaxPool's and GlobalMaxPool's argmax stays put under finite differences)."""
    return (RNG.permutation(int(np.prod(shape))).reshape(shape) * 0.1 - 1).astype(np.float32)


def _ints(values):
    return np.asarray(values, dtype=np.int64)


def _node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def torch_mod():
    import torch

    return torch


class _LazyFunctional:
    """``torch.nn.functional`` looked up at call time: cases (and their torch twins) are built at
    collection, where torch may be absent; only the torch comparisons need it (and skip without it)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: getattr(torch_mod().nn.functional, name)(*args, **kwargs)


def F():
    return _LazyFunctional()


@dataclasses.dataclass
class Case:
    """One node on float inputs (``feeds``) and constants (``inits``), with a torch twin.

    The symbolic variant gives the data input ``x`` symbolic dims; weights keep their static shapes
    (initializers in real models)."""

    id: str
    node: object
    feeds: Dict[str, np.ndarray]
    torch_fn: Optional[Callable] = None
    inits: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    opset: int = 17
    dynamic: bool = True  # also run with symbolic dims
    ort_forward: bool = False  # onnx's reference disagrees with onnxruntime: check against onnxruntime
    torch_rtol: float = 1e-9  # onnxruntime's float32 arithmetic (Resize coordinates) shows up beyond 1e-9
    constant: tuple = ()  # float inputs that get no gradient (Resize's scales)

    def model(self, dynamic: bool):
        def info(name, value):
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            dims = [f"{name}_{i}" for i in range(value.ndim)] if dynamic and name == "x" else list(value.shape)
            return helper.make_tensor_value_info(name, elem, dims)

        inits = [numpy_helper.from_array(v, k) for k, v in self.inits.items()]
        return make_model([self.node], [info(k, v) for k, v in self.feeds.items()],
                          [helper.make_tensor_value_info("y", T.FLOAT, None)], inits, opset=self.opset)

    @property
    def wrt(self):
        return [k for k, v in self.feeds.items() if v.dtype == np.float32 and k not in self.constant]


# ----- torch twins -----------------------------------------------------------------------------------

def _torch_pad(x, pads, value=0.0):
    """ONNX spatial pads [b1..bn, e1..en] with F.pad (last axis first)."""
    n = len(pads) // 2
    return F().pad(x, [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])], value=value)


def _same_pads(dims, kernel, strides, dilations, upper):
    need = [max((-(-d // s) - 1) * s + (k - 1) * dl + 1 - d, 0)
            for d, k, s, dl in zip(dims, kernel, strides, dilations)]
    begin = [p // 2 if upper else (p + 1) // 2 for p in need]
    return begin + [p - b for p, b in zip(need, begin)]


def _conv_twin(shape_x, shape_w, strides=None, pads=None, dilations=None, group=1, auto_pad=None, **_):
    n = len(shape_x) - 2
    strides, dilations = strides or [1] * n, dilations or [1] * n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(shape_x[2:], shape_w[2:], strides, dilations, auto_pad == "SAME_UPPER")
    pads = pads or [0] * 2 * n
    conv = [None, F().conv1d, F().conv2d, F().conv3d][n]
    return lambda x, w, b=None: conv(_torch_pad(x, pads), w, b, stride=strides, dilation=dilations, groups=group)


def _conv_transpose_twin(shape_x, shape_w, strides=None, pads=None, dilations=None, group=1, auto_pad=None,
                         output_padding=None, output_shape=None, **_):
    n = len(shape_x) - 2
    strides, dilations, extra = strides or [1] * n, dilations or [1] * n, output_padding or [0] * n
    full = [s * (d - 1) + (k - 1) * dl + 1 + e
            for s, d, k, dl, e in zip(strides, shape_x[2:], shape_w[2:], dilations, extra)]
    if output_shape or auto_pad:
        out = output_shape or [d * s for d, s in zip(shape_x[2:], strides)]
        head = [(f - o) // 2 if auto_pad == "SAME_UPPER" else (f - o) - (f - o) // 2 for f, o in zip(full, out)]
    else:
        pads = pads or [0] * 2 * n
        head, out = pads[:n], [f - pads[i] - pads[n + i] for i, f in enumerate(full)]
    conv = [None, F().conv_transpose1d, F().conv_transpose2d, F().conv_transpose3d][n]

    def fn(x, w, b=None):
        y = conv(x, w, b, stride=strides, dilation=dilations, groups=group, output_padding=extra)
        return y[(slice(None), slice(None)) + tuple(slice(h, h + o) for h, o in zip(head, out))]
    return fn


def _pool_twin(op, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=0, count_include_pad=0, **_):
    n = len(kernel_shape)
    strides, pads = strides or [1] * n, pads or [0] * 2 * n
    assert pads[:n] == pads[n:], "torch pools pad symmetrically"
    if op == "MaxPool":
        pool = [None, F().max_pool1d, F().max_pool2d, F().max_pool3d][n]
        return lambda x: pool(x, kernel_shape, strides, pads[:n], dilations or 1, ceil_mode=bool(ceil_mode))
    pool = [None, F().avg_pool1d, F().avg_pool2d, F().avg_pool3d][n]
    return lambda x: pool(x, kernel_shape, strides, pads[:n], ceil_mode=bool(ceil_mode),
                          count_include_pad=bool(count_include_pad))


def _depth_to_space(x, b, mode):
    n, c, h, w = x.shape
    if mode == "DCR":
        return x.reshape(n, b, b, c // b // b, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c // b // b, h * b, w * b)
    return F().pixel_shuffle(x, b)


def _space_to_depth(x, b):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4).reshape(n, c * b * b, h // b, w // b)


# ----- the cases -------------------------------------------------------------------------------------

def _conv(cid, shape_x, shape_w, bias=True, op="Conv", dynamic=True, **attrs):
    feeds = {"x": _rand(*shape_x), "w": _rand(*shape_w)}
    channels = shape_w[0] if op == "Conv" else shape_w[1] * attrs.get("group", 1)
    if bias:
        feeds["b"] = _rand(channels)
    twin = (_conv_twin if op == "Conv" else _conv_transpose_twin)(shape_x, shape_w, **attrs)
    return Case(f"{op}-{cid}", _node(op, list(feeds), **attrs), feeds, twin, dynamic=dynamic)


def _pool(cid, op, shape, opset=17, outputs=("y",), **attrs):
    x = _distinct(*shape) if op == "MaxPool" else _rand(*shape)
    torch_ok = attrs.get("pads", [0])[: len(shape) - 2] == attrs.get("pads", [0])[len(shape) - 2:] and (
        op == "MaxPool" or "dilations" not in attrs) and "auto_pad" not in attrs
    twin = _pool_twin(op, **attrs) if torch_ok else None
    return Case(f"{op}-{cid}", _node(op, ["x"], outputs, **attrs), {"x": x}, twin, opset=opset)


def _resize(cid, shape, scales=None, sizes=None, ort_forward=False, twin=None, opset=17, dynamic=True, rtol=1e-9,
            **attrs):
    inits, inputs = {}, ["x", ""]
    if scales is not None:
        inits["s"] = np.asarray(scales, np.float32)
        inputs.append("s")
    else:
        inits["z"] = _ints(sizes)
        inputs += ["", "z"]
    return Case(f"Resize-{cid}", _node("Resize", inputs, **attrs), {"x": _rand(*shape)}, twin, inits, opset=opset,
                ort_forward=ort_forward, dynamic=dynamic, torch_rtol=rtol)


def _interp(mode, align_corners=None, **kw):
    return lambda x: F().interpolate(x, mode=mode, align_corners=align_corners, **kw)


def _cases() -> List[Case]:
    s2 = dict(strides=[2, 2])
    cases = [
        _conv("s2-p1", (2, 3, 7, 7), (4, 3, 3, 3), pads=[1, 1, 1, 1], **s2),
        _conv("asym-dilated", (2, 3, 8, 7), (4, 3, 3, 2), strides=[2, 3], pads=[1, 0, 2, 1], dilations=[2, 1]),
        _conv("grouped-s2", (2, 4, 6, 6), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1], **s2),
        _conv("depthwise-x2", (2, 4, 6, 6), (8, 1, 3, 3), bias=False, group=4, pads=[1, 1, 1, 1]),
        _conv("depthwise-s2", (2, 3, 7, 6), (3, 1, 3, 3), group=3, pads=[1, 1, 0, 1], **s2),
        _conv("1d-same-upper", (2, 3, 9), (4, 3, 3), strides=[2], auto_pad="SAME_UPPER"),
        _conv("same-lower", (2, 3, 8, 8), (4, 3, 3, 3), auto_pad="SAME_LOWER", **s2),
        _conv("same-upper-s1", (2, 3, 6, 5), (4, 3, 3, 2), auto_pad="SAME_UPPER"),
        _conv("valid-dilated", (2, 3, 7, 7), (4, 3, 3, 3), auto_pad="VALID", dilations=[2, 2]),
        _conv("pads-beyond-reach", (1, 2, 5, 5), (3, 2, 3, 3), pads=[3, 0, 1, 3]),
        _conv("1x1-same-s2", (2, 3, 8, 7), (4, 3, 1, 1), auto_pad="SAME_UPPER", **s2),
        _conv("1x1-grouped", (2, 4, 5, 5), (6, 2, 1, 1), group=2),
        _conv("1x1-padded", (2, 3, 4, 4), (5, 3, 1, 1), pads=[1, 0, 0, 1]),
        _conv("3d", (1, 2, 5, 6, 5), (3, 2, 2, 3, 2), strides=[2, 1, 2], pads=[0, 1, 1, 1, 0, 0]),
        _conv("s2-p1", (2, 3, 7, 7), (3, 2, 3, 3), op="ConvTranspose", pads=[1, 1, 0, 0], output_padding=[1, 0], **s2),
        _conv("grouped-dilated", (2, 4, 5, 5), (4, 2, 3, 3), op="ConvTranspose", group=2, dilations=[1, 2], **s2),
        _conv("depthwise", (2, 3, 4, 5), (3, 1, 3, 3), op="ConvTranspose", group=3, pads=[0, 1, 1, 0], **s2),
        _conv("1d-same-lower", (2, 3, 9), (3, 2, 3), op="ConvTranspose", strides=[2], auto_pad="SAME_LOWER"),
        _conv("output-shape-upper", (2, 3, 4, 4), (3, 2, 3, 3), op="ConvTranspose", output_shape=[8, 9],
              auto_pad="SAME_UPPER", dynamic=False, **s2),
        _conv("output-shape", (2, 3, 4, 4), (3, 2, 3, 3), bias=False, op="ConvTranspose", output_shape=[7, 8],
              dynamic=False, **s2),
        _conv("3d", (1, 2, 3, 4, 3), (2, 3, 2, 2, 3), op="ConvTranspose", strides=[1, 2, 2], pads=[0, 1, 0, 1, 0, 1]),
        _pool("3x3-s2-p1", "MaxPool", (2, 3, 7, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1], **s2),
        _pool("3x3-s2-p1-opset13", "MaxPool", (2, 3, 7, 8), opset=13, kernel_shape=[3, 3], pads=[1, 1, 1, 1], **s2),
        _pool("2x2-opset13", "MaxPool", (2, 3, 6, 7), opset=13, kernel_shape=[2, 2], **s2),
        _pool("dilated-ceil", "MaxPool", (2, 2, 8, 9), kernel_shape=[2, 3], strides=[2, 2], pads=[1, 0, 1, 1],
              dilations=[2, 1], ceil_mode=1),
        _pool("1d-ceil", "MaxPool", (2, 3, 10), kernel_shape=[3], strides=[2], ceil_mode=1),
        _pool("3d", "MaxPool", (1, 2, 4, 5, 4), kernel_shape=[2, 2, 2], strides=[2, 2, 1]),
        _pool("indices", "MaxPool", (2, 2, 6, 6), outputs=("y", "i"), kernel_shape=[3, 3], pads=[1, 1, 1, 1], **s2),
        _pool("indices-column-major", "MaxPool", (2, 2, 6, 5), outputs=("y", "i"), kernel_shape=[2, 2],
              storage_order=1, **s2),
        _pool("same-upper", "MaxPool", (2, 2, 7, 6), kernel_shape=[3, 3], auto_pad="SAME_UPPER", **s2),
        _pool("3x3-s2-p1", "AveragePool", (2, 3, 7, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1], **s2),
        _pool("include-pad", "AveragePool", (2, 3, 7, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1],
              count_include_pad=1, **s2),
        _pool("ceil", "AveragePool", (2, 3, 7, 7), kernel_shape=[2, 2], ceil_mode=1, **s2),
        _pool("ceil-include-pad", "AveragePool", (2, 2, 6, 6), kernel_shape=[3, 3], pads=[1, 1, 1, 1],
              ceil_mode=1, count_include_pad=1, **s2),
        _pool("dilated-asym", "AveragePool", (2, 2, 7, 9), opset=19, kernel_shape=[2, 2], dilations=[2, 1],
              pads=[1, 0, 0, 1], ceil_mode=1, **s2),
        _pool("same-upper", "AveragePool", (2, 2, 7, 6), kernel_shape=[3, 2], auto_pad="SAME_UPPER", **s2),
        _pool("1d", "AveragePool", (2, 3, 9), kernel_shape=[3], strides=[2], pads=[1, 1]),
        _pool("2x2", "AveragePool", (2, 3, 6, 6), kernel_shape=[2, 2], **s2),
        Case("GlobalAveragePool", _node("GlobalAveragePool", ["x"]), {"x": _rand(2, 3, 4, 5)},
             lambda x: x.mean((2, 3), keepdim=True)),
        Case("GlobalMaxPool", _node("GlobalMaxPool", ["x"]), {"x": _distinct(2, 3, 4, 5)},
             lambda x: x.amax((2, 3), keepdim=True)),
        Case("LRN-3", _node("LRN", ["x"], size=3, alpha=0.3, beta=0.75, bias=1.5), {"x": _rand(2, 5, 3, 4)},
             lambda x: F().local_response_norm(x, 3, alpha=_f32(0.3), beta=0.75, k=1.5)),
        Case("LRN-5", _node("LRN", ["x"], size=5, alpha=0.2, beta=0.6), {"x": _rand(2, 6, 4, 1)},
             lambda x: F().local_response_norm(x, 5, alpha=_f32(0.2), beta=_f32(0.6), k=1.0)),
        Case("Pad-constant", _node("Pad", ["x", "p", "v"]), {"x": _rand(2, 3, 4, 5), "v": _rand()},
             lambda x, v: _pad_constant(x, v, [0, 1, 2, 0], [0, 0, 1, 3]), {"p": _ints([0, 1, 2, 0, 0, 0, 1, 3])}),
        Case("Pad-axes", _node("Pad", ["x", "p", "", "a"]), {"x": _rand(2, 3, 4)},
             lambda x: F().pad(x, [1, 2, 0, 0, 2, 0]), {"p": _ints([2, 1, 0, 2]), "a": _ints([0, -1])}, opset=18),
        Case("Pad-reflect", _node("Pad", ["x", "p"], mode="reflect"), {"x": _rand(2, 3, 4, 5)},
             lambda x: F().pad(x, [3, 1, 2, 3], mode="reflect"), {"p": _ints([0, 0, 2, 3, 0, 0, 3, 1])}),
        Case("Pad-edge", _node("Pad", ["x", "p"], mode="edge"), {"x": _rand(2, 3, 4, 5)},
             lambda x: F().pad(x, [2, 0, 1, 3], mode="replicate"), {"p": _ints([0, 0, 1, 2, 0, 0, 3, 0])}),
        Case("Pad-wrap", _node("Pad", ["x", "p"], mode="wrap"), {"x": _rand(2, 3, 4, 5)},
             lambda x: F().pad(x, [1, 4, 3, 2], mode="circular"), {"p": _ints([0, 0, 3, 1, 0, 0, 2, 4])}, opset=19),
        Case("Pad-negative", _node("Pad", ["x", "p"]), {"x": _rand(2, 3, 5, 6)}, None,
             {"p": _ints([0, 0, -1, 2, 0, 0, 1, -2])}, ort_forward=True),
        Case("Pad-runtime", _node("Pad", ["x", "p"]), {"x": _rand(2, 3, 5), "p": _ints([0, 1, -1, 0, 0, 2])}, None,
             ort_forward=True),
        Case("DepthToSpace-DCR", _node("DepthToSpace", ["x"], blocksize=2), {"x": _rand(2, 8, 3, 2)},
             lambda x: _depth_to_space(x, 2, "DCR")),
        Case("DepthToSpace-CRD", _node("DepthToSpace", ["x"], blocksize=2, mode="CRD"), {"x": _rand(2, 8, 3, 2)},
             lambda x: _depth_to_space(x, 2, "CRD")),
        Case("SpaceToDepth", _node("SpaceToDepth", ["x"], blocksize=2), {"x": _rand(2, 3, 4, 6)},
             lambda x: _space_to_depth(x, 2)),
        _resize("nearest-x2x3", (2, 3, 3, 4), scales=[1, 1, 2, 3], mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor",
                twin=_interp("nearest", scale_factor=(2.0, 3.0))),
        _resize("nearest-half-pixel-x2", (2, 3, 3, 4), scales=[1, 1, 2, 2], mode="nearest"),
        _resize("nearest-sizes", (2, 3, 5, 7), sizes=[2, 3, 8, 3], mode="nearest", nearest_mode="round_prefer_ceil",
                twin=_interp("nearest-exact", size=(8, 3))),
        _resize("nearest-floor-sizes", (1, 2, 5, 7), sizes=[1, 2, 7, 11], mode="nearest", nearest_mode="floor",
                coordinate_transformation_mode="asymmetric"),
        _resize("nearest-axes", (2, 3, 5, 4), scales=[3.0], mode="nearest", axes=[2], opset=18),
        _resize("linear-x2", (2, 3, 3, 4), scales=[1, 1, 2, 2], mode="linear",
                twin=_interp("bilinear", False, scale_factor=2.0)),
        _resize("linear-align-corners", (2, 3, 4, 5), sizes=[2, 3, 7, 3], mode="linear",
                coordinate_transformation_mode="align_corners", twin=_interp("bilinear", True, size=(7, 3))),
        _resize("linear-asymmetric-down", (1, 2, 6, 7), sizes=[1, 2, 4, 3], mode="linear",
                coordinate_transformation_mode="asymmetric"),
        _resize("linear-pytorch-half-pixel", (1, 2, 5, 4), sizes=[1, 2, 2, 6], mode="linear",
                coordinate_transformation_mode="pytorch_half_pixel", twin=_interp("bilinear", False, size=(2, 6)),
                rtol=1e-6),
        _resize("linear-pytorch-half-pixel-to-1", (1, 2, 5, 4), sizes=[1, 2, 1, 6], mode="linear",
                coordinate_transformation_mode="pytorch_half_pixel"),  # row 0 (torch would take the centre)
        _resize("linear-1d-outer-axis", (4, 3, 5), scales=[1.5, 1, 1], mode="linear",
                twin=lambda x: F().interpolate(x.permute(1, 2, 0), scale_factor=1.5, mode="linear").permute(2, 0, 1),
                rtol=1e-6),
        _resize("nearest-x1.5x0.6", (1, 2, 5, 7), scales=[1, 1, 1.5, 0.6], mode="nearest", ort_forward=True),
        _resize("nearest-floor-x1.5x0.6", (1, 2, 5, 7), scales=[1, 1, 1.5, 0.6], mode="nearest", nearest_mode="floor",
                coordinate_transformation_mode="asymmetric", ort_forward=True),
        _resize("nearest-align-corners-x0.5", (1, 2, 5, 7), scales=[1, 1, 0.5, 0.5], mode="nearest",
                coordinate_transformation_mode="align_corners", nearest_mode="ceil", ort_forward=True),
        _resize("nearest-symmetric", (1, 2, 5, 7), scales=[1, 1, 1.5, 0.6], mode="nearest",
                coordinate_transformation_mode="half_pixel_symmetric", nearest_mode="round_prefer_ceil",
                ort_forward=True, opset=19),
        _resize("linear-align-corners-x1.5", (1, 2, 5, 7), scales=[1, 1, 1.5, 0.6], mode="linear",
                coordinate_transformation_mode="align_corners", ort_forward=True),
        _resize("linear-symmetric", (1, 2, 5, 7), scales=[1, 1, 0.5, 0.5], mode="linear",
                coordinate_transformation_mode="half_pixel_symmetric", ort_forward=True, opset=19),
        _resize("tf-half-pixel", (1, 2, 3, 4), scales=[1, 1, 2, 3], mode="nearest", nearest_mode="floor",
                coordinate_transformation_mode="tf_half_pixel_for_nn", ort_forward=True, opset=13),
    ]
    scales = _rand(4)
    scales[:] = [1, 1, 1.5, 2]  # scales as a graph input: computed in the graph, never constant
    cases.append(Case("Resize-runtime-scales", _node("Resize", ["x", "", "s"], mode="linear"),
                      {"x": _rand(1, 2, 4, 3), "s": scales}, None, ort_forward=True, constant=("s",)))
    return cases


def _pad_constant(x, v, begin, end):
    torch = torch_mod()
    inside = _torch_pad(torch.ones_like(x), begin[2:] + end[2:])
    inside = F().pad(inside, [0, 0, 0, 0, begin[1], end[1]])
    return F().pad(_torch_pad(x, begin[2:] + end[2:]), [0, 0, 0, 0, begin[1], end[1]]) + (1 - inside) * v


CASES = _cases()
REFERENCE = [c for c in CASES if not c.ort_forward]
VARIANTS = [(c, d) for c in REFERENCE for d in (False, True) if c.dynamic or not d]


@pytest.mark.parametrize("case,dynamic", VARIANTS, ids=[f"{c.id}-{'symbolic' if d else 'static'}" for c, d in VARIANTS])
def test_finite_differences(case, dynamic):
    check_gradients(case.model(dynamic), case.feeds, case.wrt, rtol=1e-5, atol=1e-7)


TWINS = [c for c in CASES if c.torch_fn is not None]


@pytest.mark.parametrize("case", TWINS, ids=[c.id for c in TWINS])
def test_against_torch(case):
    pytest.importorskip("torch")
    ours = check_gradients(case.model(False), case.feeds, case.wrt, run_ort=False)
    wanted = inspect.signature(case.torch_fn).parameters
    named = {k: v for k, v in case.feeds.items() if k in wanted}
    theirs = torch_gradients(case.torch_fn, named, case.wrt)
    for name in case.wrt:
        scale = np.abs(theirs[name]).max()
        np.testing.assert_allclose(ours[name], theirs[name], rtol=case.torch_rtol, atol=case.torch_rtol * scale,
                                   err_msg=name)


ORT_CASES = [(c, d) for c in CASES if c.ort_forward for d in (False, True) if c.dynamic or not d]


def _ort_loss_model(model, feeds):
    """``model`` plus ``loss = sum(y * R)`` (R as ``loss_model`` draws it), shaped by onnxruntime's forward
    (onnx's reference cannot run these models)."""
    import onnxruntime as ort

    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    weight = np.random.default_rng(0).standard_normal(y.shape).astype(np.float32)
    result = make_model(list(model.graph.node) + [_node("Mul", ["y", "R"], ["wy"]),
                                                  _node("ReduceSum", ["wy"], ["loss"], keepdims=0)],
                        model.graph.input, [helper.make_tensor_value_info("loss", T.FLOAT, [])],
                        list(model.graph.initializer) + [numpy_helper.from_array(weight, "R")],
                        opset=model.opset_import[0].version)
    return result


@pytest.mark.parametrize("case,dynamic", ORT_CASES,
                         ids=[f"{c.id}-{'symbolic' if d else 'static'}" for c, d in ORT_CASES])
def test_against_onnxruntime_forward(case, dynamic):
    """The float32 gradient graph in onnxruntime against central differences of onnxruntime's own
    forward with a unit step: exact (up to rounding) for inputs the op is linear in."""
    import onnxruntime as ort

    lossy = _ort_loss_model(case.model(dynamic), case.feeds)
    forward = ort.InferenceSession(lossy.SerializeToString(), providers=["CPUExecutionProvider"])
    with_grads = graph_gradients(lossy, case.wrt, loss="loss")
    got = ort.InferenceSession(with_grads.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, case.feeds)
    for name, grad in zip(case.wrt, got[1:]):
        base = case.feeds[name]
        expected = np.empty(base.size)
        for flat in range(base.size):
            totals = []
            for sign in (1, -1):
                bumped = base.copy().reshape(-1)
                bumped[flat] += sign
                totals.append(float(forward.run(None, {**case.feeds, name: bumped.reshape(base.shape)})[0]))
            expected[flat] = (totals[0] - totals[1]) / 2
        np.testing.assert_allclose(grad.reshape(-1), expected, atol=1e-5 * np.abs(expected).max(), err_msg=name)


# ----- the emitted graphs ------------------------------------------------------------------------------

def _grad_ops(node, shape_x, shape_w=None, wrt=("x", "w"), opset=17, dynamic=False) -> List[str]:
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, [None] * len(shape_x) if dynamic else shape_x)]
    if shape_w:
        inputs.append(helper.make_tensor_value_info("w", T.FLOAT, shape_w))
    model = make_model([node], inputs, [helper.make_tensor_value_info("y", T.FLOAT, None)], opset=opset)
    return [n.op_type for n in build_gradients(model, "y", list(wrt)).nodes][2:]  # after the seed's Shape, Expand


def test_conv_gradients_are_single_kernels():
    conv = _node("Conv", ["x", "w"], pads=[1, 1, 1, 1], strides=[2, 2])
    # input gradient: one ConvTranspose; weight gradient: one Conv (the stride's unread row trimmed)
    assert sorted(_grad_ops(conv, [8, 16, 32, 32], [32, 16, 3, 3])) == sorted(
        ["ConvTranspose", "Transpose", "Unsqueeze", "Transpose", "Unsqueeze", "Conv", "Squeeze", "Transpose"])
    same = _node("Conv", ["x", "w"], pads=[1, 1, 1, 1])  # stride 1: dx is a Conv with the flipped weights
    # (the taps reversed by one MatMul with the anti-identity)
    assert sorted(_grad_ops(same, [8, 16, 32, 32], [32, 16, 3, 3], wrt=["x"])) == [
        "Conv", "MatMul", "Reshape", "Reshape", "Transpose"]
    pointwise = _node("Conv", ["x", "w"])
    assert "MatMul" in _grad_ops(pointwise, [8, 16, 32, 32], [32, 16, 1, 1], wrt=["w"])
    grouped = _node("Conv", ["x", "w"], pads=[1, 1, 1, 1], group=4)
    assert _grad_ops(grouped, [8, 16, 32, 32], [16, 4, 3, 3], wrt=["w"]).count("Conv") == 1
    # symbolic spatial dims: the same kernels, sized at run time
    ops = _grad_ops(conv, [8, 16, 32, 32], [32, 16, 3, 3], dynamic=True)
    assert ops.count("ConvTranspose") == 1 and ops.count("Conv") == 1


def test_pool_gradients():
    average = _node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    assert sorted(_grad_ops(average, [2, 3, 8, 8], wrt=["x"])) == ["ConvTranspose", "Div", "Reshape", "Reshape",
                                                                   "Shape"]  # window counts are a constant
    pool = _node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    assert _grad_ops(pool, [2, 3, 8, 8], wrt=["x"]).count("ScatterElements") == 1
    assert _grad_ops(pool, [2, 3, 8, 8], wrt=["x"], opset=13).count("ScatterElements") == 4  # 2x2 disjoint sets
    nearest = _node("Resize", ["x", "", "s"], mode="nearest")
    model = make_model([nearest], [helper.make_tensor_value_info("x", T.FLOAT, [None, 3, None, None])],
                       [helper.make_tensor_value_info("y", T.FLOAT, None)],
                       [numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "s")])
    ops = [n.op_type for n in build_gradients(model, "y", ["x"]).nodes]
    assert "ReduceSum" in ops and "MatMul" not in ops  # integer nearest upsampling: Reshape + ReduceSum


def test_refusals_name_the_op():
    x = helper.make_tensor_value_info("x", T.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", T.FLOAT, None)
    scales = numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "s")
    cubic = make_model([_node("Resize", ["x", "", "s"], mode="cubic")], [x], [y], [scales])
    with pytest.raises(UserError, match="Resize.*cubic"):
        build_gradients(cubic, "y", ["x"])
    pads = helper.make_tensor_value_info("p", T.INT64, [8])
    reflect = make_model([_node("Pad", ["x", "p"], mode="reflect")], [x, pads], [y])
    with pytest.raises(UserError, match="Pad.*reflect.*computed"):
        build_gradients(reflect, "y", ["x"])
    w = numpy_helper.from_array(_rand(2, 3, 3, 3), "w")
    too_big = make_model([_node("ConvTranspose", ["x", "w"], output_shape=[12, 12], strides=[2, 2])], [x], [y], [w])
    with pytest.raises(UserError, match="ConvTranspose.*exceeds"):
        build_gradients(too_big, "y", ["x"])
    w1 = numpy_helper.from_array(_rand(2, 2, 1, 1), "w")
    skipping = make_model([_node("Conv", ["x", "w"], auto_pad="SAME_UPPER", strides=[3, 3])], [x], [y], [w1])
    with pytest.raises(UserError, match="Conv.*SAME_UPPER.*shorter than stride"):
        build_gradients(skipping, "y", ["x"])


# ----- properties over random shapes and attributes ------------------------------------------------

@st.composite
def _conv_params(draw):
    n = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2]))
    per_in, out = draw(st.integers(1, 2)), group * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    strides = [draw(st.integers(1, 3)) for _ in range(n)]
    dilations = [draw(st.integers(1, 2)) for _ in range(n)]
    pads = [draw(st.integers(0, 2)) for _ in range(2 * n)]
    dims = [draw(st.integers((k - 1) * d + 1, 7)) for k, d in zip(kernel, dilations)]
    return dict(shape_x=(draw(st.integers(1, 2)), group * per_in, *dims), shape_w=(out, per_in, *kernel),
                attrs=dict(group=group, strides=strides, dilations=dilations, pads=pads),
                dynamic=draw(st.booleans()), transposed=draw(st.booleans()), extra=draw(st.integers(0, 2)))


@settings(max_examples=15, deadline=None)
@given(_conv_params())
def test_conv_property(params):
    attrs, shape_w = dict(params["attrs"]), params["shape_w"]
    op = "Conv"
    if params["transposed"]:  # ConvTranspose weights are [C, M/group, k...]; pads must leave an output
        op, n = "ConvTranspose", len(attrs["strides"])
        attrs["output_padding"] = [params["extra"] % s for s in attrs["strides"]]
        full = [s * (d - 1) + e + (k - 1) * dl + 1 for s, d, e, k, dl in zip(
            attrs["strides"], params["shape_x"][2:], attrs["output_padding"], shape_w[2:], attrs["dilations"])]
        fits = [f - min(b, 1) - min(e, 1) >= 2 for f, b, e in zip(full, attrs["pads"][:n], attrs["pads"][n:])]
        attrs["pads"] = [min(p, 1) if fits[i % n] else 0 for i, p in enumerate(attrs["pads"])]
        shape_w = (params["shape_x"][1], shape_w[0] // attrs["group"], *shape_w[2:])
    case = _conv("property", params["shape_x"], shape_w, op=op, **attrs)
    check_gradients(case.model(params["dynamic"]), case.feeds, case.wrt)


@st.composite
def _pool_params(draw):
    n = draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    pads = [draw(st.integers(0, (k - 1) // 2)) for k in kernel] * 2  # the reference fails on all-pad windows
    attrs = dict(kernel_shape=kernel, strides=[draw(st.integers(1, 3)) for _ in range(n)], pads=pads,
                 ceil_mode=draw(st.sampled_from([0, 1])))
    op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
    if op == "AveragePool":
        attrs["count_include_pad"] = draw(st.sampled_from([0, 1]))
    shape = (2, 2, *[draw(st.integers(k, 7)) for k in kernel])
    return op, shape, attrs, draw(st.booleans()), draw(st.sampled_from([13, 17]))


@settings(max_examples=15, deadline=None)
@given(_pool_params())
def test_pool_property(params):
    op, shape, attrs, dynamic, opset = params
    if attrs["ceil_mode"] and any((-(-(d + 2 * p - k) // s)) * s >= d + p for d, k, s, p in zip(
            shape[2:], attrs["kernel_shape"], attrs["strides"], attrs["pads"])):
        dynamic = True  # a window would start in the padding: onnx's static shape inference disagrees
    case = _pool("property", op, shape, opset=opset, **attrs)
    check_gradients(case.model(dynamic), case.feeds, case.wrt)


@st.composite
def _resize_params(draw):
    mode = draw(st.sampled_from(["nearest", "linear"]))
    attrs = dict(mode=mode, coordinate_transformation_mode=draw(st.sampled_from(
        ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])))
    if mode == "nearest":
        attrs["nearest_mode"] = draw(st.sampled_from(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]))
    shape = (1, 2, draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    if draw(st.booleans()):
        scales = [1.0, 1.0] + [draw(st.sampled_from([0.5, 0.75, 1.0, 1.5, 2.0, 3.0])) for _ in range(2)]
        if any(int(d * s) == 0 for d, s in zip(shape[2:], scales[2:])):
            scales[2:] = [2.0, 2.0]
        return _resize("property", shape, scales=scales, ort_forward=True, **attrs), draw(st.booleans())
    sizes = [1, 2, draw(st.integers(1, 7)), draw(st.integers(1, 7))]
    return _resize("property", shape, sizes=sizes, ort_forward=True, **attrs), draw(st.booleans())


@settings(max_examples=15, deadline=None)
@given(_resize_params())
def test_resize_property(params):
    case, dynamic = params
    test_against_onnxruntime_forward(case, dynamic)


def test_ceil_mode_last_window_rule():
    """The window that would start in the tail padding is dropped (onnxruntime, torch), though onnx's
    shape inference counts it: the static-shape gradient must match the symbolic-shape one."""
    import onnxruntime as ort

    node = _node("AveragePool", ["x"], kernel_shape=[3], strides=[2], pads=[0, 2], ceil_mode=1)
    x = _rand(2, 3, 6)
    results = []
    for dims in ([2, 3, 6], ["n", "c", "w"]):
        model = make_model([node], [helper.make_tensor_value_info("x", T.FLOAT, dims)],
                           [helper.make_tensor_value_info("y", T.FLOAT, None)])
        grads = build_gradients(model, "y", ["x"], seed="seed")
        model.graph.node.extend(grads.nodes)
        model.graph.initializer.extend(grads.initializers)
        model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", T.FLOAT, ["n", "c", "w"]))
        model.graph.input.append(helper.make_tensor_value_info("seed", T.FLOAT, None))
        model.graph.output.append(helper.make_tensor_value_info(grads.grads["x"], T.FLOAT, None))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        results.append(session.run(None, {"x": x, "seed": np.ones((2, 3, 3), np.float32)})[-1])
    # windows [0, 3), [2, 5), [4, 7): the last covers two inputs (no window starts at 6, in the padding)
    expected = np.broadcast_to([1 / 3, 1 / 3, 2 / 3, 1 / 3, 1 / 3 + 1 / 2, 1 / 2], (2, 3, 6))
    for got in results:
        np.testing.assert_allclose(got, expected, rtol=1e-6)
