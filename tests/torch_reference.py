"""A test-only ONNX evaluator in torch (float64): torch autograd through it is the whole-model gradient oracle.

``run_in_torch(model, feeds, params)`` runs an ONNX graph node by node with torch ops, one small
function per op type in ``TORCH_OPS``.  Every float tensor computes in float64 (float32 initializers,
feeds and Constants are widened; ``Cast`` to any float type gives float64), integer tensors flow as
int64, so the reference carries none of float32's noise.  Initializers named in ``params`` are
replaced by the given torch tensors (leaves with ``requires_grad``), so ``loss.backward()`` gives
torch's gradient of each of them, computed by torch's own derivative formulas, independent of
graphprune's rules.

It covers the ops of the test fixtures (ResNet, MobileNet, U-Net, BERT, GPT) and their obvious
neighbours, with the attribute forms those exports use; anything else raises NotImplementedError
naming the op or attribute (never a silently different result).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

__all__ = ["run_in_torch", "TORCH_OPS", "run_node"]


class _Node:
    """One node's attributes (by name) and the model's ai.onnx opset, as the op functions read them."""

    def __init__(self, node: onnx.NodeProto, opset: int):
        self.op_type = node.op_type
        self.opset = opset
        self.outputs = len(node.output)
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def attr(self, name: str, default=None):
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value


OpFn = Callable[..., object]
TORCH_OPS: Dict[str, OpFn] = {}


def _op(*names: str):
    def register(fn: OpFn) -> OpFn:
        for name in names:
            TORCH_OPS[name] = fn
        return fn

    return register


def _tensor(array: np.ndarray) -> torch.Tensor:
    """numpy -> torch: floats become float64, integers int64, bools stay bool."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(array.astype(np.float64))
    if array.dtype == np.bool_:
        return torch.from_numpy(array.copy())
    return torch.from_numpy(array.astype(np.int64))


def _ints(t: Optional[torch.Tensor]) -> Optional[List[int]]:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(n: _Node, axes: Optional[torch.Tensor], input_since: int) -> Optional[List[int]]:
    """Axes: an attribute before opset ``input_since``, the optional ``axes`` input from it on."""
    return n.attr("axes") if n.opset < input_since else _ints(axes)


# --- element-wise -------------------------------------------------------------------------------------

_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
    "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
    "Identity": lambda x: x, "Not": torch.logical_not,
}
_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "And": torch.logical_and, "Or": torch.logical_or,
}
for _name, _fn in _UNARY.items():
    TORCH_OPS[_name] = lambda n, x, _fn=_fn: _fn(x)
for _name, _fn in _BINARY.items():
    TORCH_OPS[_name] = lambda n, a, b, _fn=_fn: _fn(a, b)


@_op("Div")
def _div(n, a, b):
    # Integer Div truncates in ONNX (shape arithmetic); float Div is true division.
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@_op("Sum")
def _sum(n, *xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


@_op("HardSigmoid")
def _hard_sigmoid(n, x):
    return torch.clamp(n.attr("alpha", 0.2) * x + n.attr("beta", 0.5), 0.0, 1.0)


# HardSwish's alpha as ONNX's function body states it (HardSigmoid's float attribute, so float32 1/6):
# what runtimes compute, and what the gradient rule differentiates, also in float64.
_HARD_SWISH_ALPHA = float(np.float32(1.0 / 6.0))


@_op("HardSwish")
def _hard_swish(n, x):
    return x * torch.clamp(x * _HARD_SWISH_ALPHA + 0.5, 0.0, 1.0)


@_op("Gelu")
def _gelu(n, x):
    return F.gelu(x, approximate=n.attr("approximate", "none"))


@_op("Clip")
def _clip(n, x, lo=None, hi=None):
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
    return torch.clamp(x, min=lo, max=hi)


@_op("Where")
def _where(n, cond, a, b):
    return torch.where(cond.bool(), a, b)


@_op("Cast")
def _cast(n, x):
    to = n.attr("to")
    if to in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return x.to(torch.float64)
    if to == onnx.TensorProto.BOOL:
        return x != 0
    return x.to(torch.int64)


# --- linear algebra -----------------------------------------------------------------------------------

@_op("MatMul")
def _matmul(n, a, b):
    return torch.matmul(a, b)


@_op("Gemm")
def _gemm(n, a, b, c=None):
    a = a.T if n.attr("transA", 0) else a
    b = b.T if n.attr("transB", 0) else b
    y = n.attr("alpha", 1.0) * (a @ b)
    return y if c is None else y + n.attr("beta", 1.0) * c


# --- convolution and pooling --------------------------------------------------------------------------

def _explicit_pads(n: _Node, spatial: Sequence[int], kernel: Sequence[int], strides, dilations) -> List[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] resolving auto_pad (SAME_* as ONNX defines them)."""
    auto = n.attr("auto_pad", "NOTSET")
    rank = len(spatial)
    if auto in ("NOTSET", ""):
        return list(n.attr("pads", [0] * 2 * rank))
    if auto == "VALID":
        return [0] * 2 * rank
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


def _torch_pad(pads: Sequence[int]) -> List[int]:
    """ONNX [b1, b2, e1, e2] -> F.pad's last-axis-first [b2, e2, b1, e1]."""
    rank = len(pads) // 2
    out: List[int] = []
    for axis in reversed(range(rank)):
        out += [pads[axis], pads[axis + rank]]
    return out


def _conv_params(n: _Node, x: torch.Tensor, kernel: Sequence[int]):
    rank = x.dim() - 2
    strides = list(n.attr("strides", [1] * rank))
    dilations = list(n.attr("dilations", [1] * rank))
    return strides, dilations, _explicit_pads(n, x.shape[2:], kernel, strides, dilations)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@_op("Conv")
def _conv(n, x, w, b=None):
    strides, dilations, pads = _conv_params(n, x, w.shape[2:])
    # Asymmetric (or any) padding as an explicit zero pad, so one code path covers every case.
    x = F.pad(x, _torch_pad(pads))
    return _CONV[x.dim() - 2](x, w, b, stride=strides, dilation=dilations, groups=n.attr("group", 1))


@_op("ConvTranspose")
def _conv_transpose(n, x, w, b=None):
    rank = x.dim() - 2
    if n.attr("output_shape") is not None or n.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID", ""):
        raise NotImplementedError("ConvTranspose with output_shape or SAME auto_pad")
    strides = list(n.attr("strides", [1] * rank))
    dilations = list(n.attr("dilations", [1] * rank))
    pads = list(n.attr("pads", [0] * 2 * rank))
    y = _CONV_T[rank](x, w, b, stride=strides, dilation=dilations, groups=n.attr("group", 1),
                      output_padding=list(n.attr("output_padding", [0] * rank)))
    # Pads crop the full transposed output (begin and end independently).
    index = tuple([slice(None)] * 2 + [slice(pads[i], y.shape[2 + i] - pads[i + rank]) for i in range(rank)])
    return y[index]


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@_op("MaxPool")
def _max_pool(n, x):
    """Y and ONNX's Indices: flat row-major offsets into the whole (unpadded) input."""
    kernel = list(n.attr("kernel_shape"))
    if n.attr("storage_order", 0):
        raise NotImplementedError("MaxPool storage_order=1")
    strides, dilations, pads = _conv_params(n, x, kernel)
    padded = F.pad(x, _torch_pad(pads), value=-math.inf)
    y, within = _MAX_POOL[x.dim() - 2](padded, kernel, strides, 0, dilations, ceil_mode=bool(n.attr("ceil_mode", 0)),
                                       return_indices=True)
    # torch's indices count within one padded plane: unravel there, shift by the begin pads, ravel unpadded.
    spatial, rank = x.shape[2:], x.dim() - 2
    flat, rest = torch.zeros_like(within), within
    coords = []
    for size in reversed(padded.shape[2:]):
        coords.append(rest % size)
        rest = rest // size
    for coord, begin, size in zip(reversed(coords), pads[:rank], spatial):
        flat = flat * size + (coord - begin)
    planes = torch.arange(x.shape[0] * x.shape[1]).reshape(x.shape[:2] + (1,) * rank)
    return y, flat + planes * math.prod(spatial)


@_op("AveragePool")
def _average_pool(n, x):
    kernel = list(n.attr("kernel_shape"))
    strides, dilations, pads = _conv_params(n, x, kernel)
    if any(d != 1 for d in dilations) or n.attr("ceil_mode", 0):
        raise NotImplementedError("AveragePool with dilations or ceil_mode")
    pool = _AVG_POOL[x.dim() - 2]
    total = pool(F.pad(x, _torch_pad(pads)), kernel, strides, 0) * math.prod(kernel)
    if n.attr("count_include_pad", 0):
        return total / math.prod(kernel)
    # Divide each window by the number of real (unpadded) elements it covers.
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
    return total / (pool(ones, kernel, strides, 0) * math.prod(kernel))


@_op("GlobalAveragePool")
def _global_average_pool(n, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(n, x):
    return x.flatten(2).amax(dim=2).reshape(x.shape[:2] + (1,) * (x.dim() - 2))


# --- normalization ------------------------------------------------------------------------------------

@_op("BatchNormalization")
def _batch_norm(n, x, scale, bias, mean, var):
    if n.attr("training_mode", 0):
        raise NotImplementedError("BatchNormalization training_mode=1")
    # Written out (not F.batch_norm) so the running statistics get gradients too.
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = torch.rsqrt(var + n.attr("epsilon", 1e-5)).reshape(shape)
    return (x - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)


@_op("LayerNormalization")
def _layer_norm(n, x, scale, bias=None):
    axis = n.attr("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(var + n.attr("epsilon", 1e-5))
    y = (x - mean) * inv * scale
    return (y if bias is None else y + bias), mean, inv


@_op("Softmax", "LogSoftmax")
def _softmax(n, x):
    fn = torch.softmax if n.op_type == "Softmax" else torch.log_softmax
    if n.opset >= 13:
        return fn(x, dim=n.attr("axis", -1))
    # Before opset 13: the input is coerced to 2-D at ``axis`` (default 1).
    axis = n.attr("axis", 1) % x.dim()
    return fn(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)


# --- reductions ---------------------------------------------------------------------------------------

def _reduce(fn, n, x, axes):
    keep = bool(n.attr("keepdims", 1))
    if not axes:
        if n.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    return fn(x, dim=tuple(a % x.dim() for a in axes), keepdim=keep)


@_op("ReduceMean")
def _reduce_mean(n, x, axes=None):
    return _reduce(torch.mean, n, x, _axes(n, axes, 18))


@_op("ReduceSum")
def _reduce_sum(n, x, axes=None):
    return _reduce(torch.sum, n, x, _axes(n, axes, 13))


@_op("ReduceMax")
def _reduce_max(n, x, axes=None):
    return _reduce(torch.amax, n, x, _axes(n, axes, 18))


# --- shapes, indexing, constants ----------------------------------------------------------------------

@_op("Constant")
def _constant(n):
    (name, value), = n.attrs.items()
    if name == "value":
        return _tensor(numpy_helper.to_array(value))
    if name in ("value_float", "value_floats"):
        return torch.tensor(value, dtype=torch.float64)
    if name in ("value_int", "value_ints"):
        return torch.tensor(value, dtype=torch.int64)
    raise NotImplementedError(f"Constant with {name}")


@_op("ConstantOfShape")
def _constant_of_shape(n, shape):
    value = n.attr("value")
    fill = _tensor(numpy_helper.to_array(value)) if value is not None else torch.zeros(1, dtype=torch.float64)
    return torch.full(_ints(shape), fill.reshape(-1)[0].item(), dtype=fill.dtype)


@_op("Shape")
def _shape(n, x):
    dims = list(x.shape)
    start, end = n.attr("start", 0), n.attr("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


@_op("Size")
def _size(n, x):
    return torch.tensor(x.numel(), dtype=torch.int64)


@_op("Range")
def _range(n, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@_op("Reshape")
def _reshape(n, x, shape):
    target = _ints(shape)
    if not n.attr("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@_op("Flatten")
def _flatten(n, x):
    axis = n.attr("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@_op("Transpose")
def _transpose(n, x):
    return x.permute(n.attr("perm", list(reversed(range(x.dim())))))


@_op("Unsqueeze")
def _unsqueeze(n, x, axes=None):
    axes = _axes(n, axes, 13)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


@_op("Squeeze")
def _squeeze(n, x, axes=None):
    axes = _axes(n, axes, 13)
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


@_op("Expand")
def _expand(n, x, shape):
    # ONNX Expand broadcasts both ways: a 1 in ``shape`` keeps x's dim.
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


@_op("Concat")
def _concat(n, *xs):
    return torch.cat(xs, dim=n.attr("axis"))


@_op("Split")
def _split(n, x, split=None):
    axis = n.attr("axis", 0)
    sizes = _ints(split) if n.opset >= 13 else n.attr("split")
    if sizes is None:
        count = n.attr("num_outputs") or n.outputs
        chunk = -(-x.shape[axis] // count)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(count)]
    return tuple(torch.split(x, sizes, dim=axis))


@_op("Slice")
def _slice(n, x, starts=None, ends=None, axes=None, steps=None):
    if n.opset < 10:
        starts, ends, axes = n.attr("starts"), n.attr("ends"), n.attr("axes")
    else:
        starts, ends, axes, steps = _ints(starts), _ints(ends), _ints(axes), _ints(steps)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        # Python's slice clamping is numpy's, which ONNX Slice follows (negative steps included).
        index = torch.arange(*slice(start, end, step).indices(x.shape[axis]), dtype=torch.int64)
        x = x.index_select(axis % x.dim(), index)
    return x


@_op("Gather")
def _gather(n, x, indices):
    axis = n.attr("axis", 0) % x.dim()
    flat = indices.reshape(-1) % x.shape[axis]  # negative indices count from the end
    out = x.index_select(axis, flat)
    return out.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1:])


# --- resize -------------------------------------------------------------------------------------------

def _source_coords(n: _Node, out_size: int, in_size: int, scale: float) -> torch.Tensor:
    """Coordinate of each output position in the input, per coordinate_transformation_mode."""
    mode = n.attr("coordinate_transformation_mode", "half_pixel")
    x = torch.arange(out_size, dtype=torch.float64)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_size > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * (in_size - 1) / (out_size - 1) if out_size > 1 else torch.zeros_like(x)
    raise NotImplementedError(f"Resize coordinate_transformation_mode={mode}")


def _nearest(n: _Node, coords: torch.Tensor) -> torch.Tensor:
    mode = n.attr("nearest_mode", "round_prefer_floor")
    if mode == "floor":
        return torch.floor(coords)
    if mode == "ceil":
        return torch.ceil(coords)
    # round_prefer_floor / round_prefer_ceil differ only at exact halves.
    half = torch.floor(coords) + 0.5
    return torch.where(coords == half, torch.floor(coords) if mode == "round_prefer_floor" else torch.ceil(coords),
                       torch.round(coords))


@_op("Resize")
def _resize(n, x, roi=None, scales=None, sizes=None):
    mode = n.attr("mode", "nearest")
    if mode not in ("nearest", "linear") or n.attr("axes") is not None:
        raise NotImplementedError(f"Resize mode={mode} / axes")
    scales = scales.tolist() if scales is not None and scales.numel() else None
    sizes = _ints(sizes) if sizes is not None and sizes.numel() else None
    # Separable: interpolate one axis at a time (exact for nearest and for (bi/tri)linear).
    for axis in range(x.dim()):
        in_size = x.shape[axis]
        out_size = sizes[axis] if sizes else int(math.floor(in_size * scales[axis]))
        scale = scales[axis] if scales else out_size / in_size
        if out_size == in_size and scale == 1.0:
            continue
        coords = _source_coords(n, out_size, in_size, scale)
        if mode == "nearest":
            index = _nearest(n, coords).clamp(0, in_size - 1).to(torch.int64)
            x = x.index_select(axis, index)
            continue
        coords = coords.clamp(0, in_size - 1)
        lo = torch.floor(coords).to(torch.int64)
        hi = (lo + 1).clamp(max=in_size - 1)
        shape = [1] * x.dim()
        shape[axis] = out_size
        frac = (coords - lo).reshape(shape)
        x = x.index_select(axis, lo) * (1 - frac) + x.index_select(axis, hi) * frac
    return x


# --- the evaluator ------------------------------------------------------------------------------------

def run_in_torch(
    model: onnx.ModelProto,
    feeds: Dict[str, np.ndarray],
    params: Optional[Dict[str, torch.Tensor]] = None,
) -> List[torch.Tensor]:
    """The model's outputs computed by torch in float64, differentiable with respect to ``params``.

    Args:
        model: an ONNX model (ai.onnx domain only, no subgraphs).
        feeds: graph input values (floats are widened to float64).
        params: initializer name -> the torch tensor to use instead (a leaf with requires_grad for
            gradients); other initializers become constant float64 / int64 / bool tensors.
    """
    params = params or {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    env: Dict[str, torch.Tensor] = {"": None}
    for init in model.graph.initializer:
        env[init.name] = params[init.name] if init.name in params else _tensor(numpy_helper.to_array(init))
    for name, value in feeds.items():
        env[name] = _tensor(value)
    for node in model.graph.node:
        results = run_node(node, [env[name] for name in node.input], opset)
        for name, value in zip(node.output, results):
            if name:
                env[name] = value
    return [env[vi.name] for vi in model.graph.output]


def run_node(node: onnx.NodeProto, inputs: Sequence[Optional[torch.Tensor]], opset: int) -> tuple:
    """One node's outputs (a tuple) from its input tensors (None for an omitted optional input)."""
    fn = TORCH_OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if fn is None:
        raise NotImplementedError(f"torch reference has no op {node.domain}.{node.op_type}")
    n = _Node(node, opset)
    inputs = list(inputs)
    while inputs and inputs[-1] is None:  # trailing optional inputs left out
        inputs.pop()
    result = fn(n, *inputs)
    return result if isinstance(result, tuple) else (result,)
