"""Layer inputs as the rows a weight multiplies: im2col patches of a Conv, the last axis of a MatMul/Gemm.

A layer ``y = W x`` seen per output row is ``y[r] = sum_c Wmat[r, c] * X[p, c]`` over *rows* ``p`` of
its input (samples x positions) and *columns* ``c`` of the reduction.  Calibrated pruning (Wanda's
norms, SparseGPT's Hessian ``X^T X``) needs both sides in the same column order, which this module
fixes once:

- Conv, weight ``[Cout, Cin/g, k1, ..., kd]``: columns ordered ``(k1, ..., kd, cin)`` -- kernel
  position major, input channel minor -- so that M consecutive columns are M consecutive input
  channels at one kernel position, the groups ``--pattern N:M`` runs along; one block of rows and
  columns per group ``g`` (``Wmat`` is ``[g, Cout/g, K]``).
- Gemm / MatMul with a 1-D or 2-D weight: ``Wmat`` is ``[1, N, K]`` (the weight's K axis last), and the
  input rows are the input with its K axis last, all leading axes flattened.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np
import onnx

from graphprune import ir

__all__ = ["LayerForm", "layer_form", "weight_matrix", "from_weight_matrix", "input_rows", "channel_rows"]


@dataclasses.dataclass(frozen=True)
class LayerForm:
    """How a layer's input becomes the rows its weight multiplies (hashable: layers sharing an input
    and a form share their statistics).

    Attributes:
        op_type: "Conv", "Gemm" or "MatMul".
        groups: Conv groups (1 otherwise).
        kernel, strides, dilations: Conv geometry (empty otherwise).
        pads: Conv pads as (begin..., end...) after resolving ``auto_pad`` for the input's spatial size
            (None until known: SAME_* depends on it).
        auto_pad: the Conv's ``auto_pad``.
        trans_a: Gemm's ``transA`` (the input is [K, M]).
    """

    op_type: str
    groups: int = 1
    kernel: Tuple[int, ...] = ()
    strides: Tuple[int, ...] = ()
    dilations: Tuple[int, ...] = ()
    pads: Optional[Tuple[int, ...]] = None
    auto_pad: str = "NOTSET"
    trans_a: bool = False


def layer_form(node: onnx.NodeProto, weight_shape: Tuple[int, ...]) -> Tuple[Optional[LayerForm], Optional[str]]:
    """(form, None) for a layer calibrated pruning understands, else (None, the reason)."""
    if node.op_type == "Conv":
        if len(weight_shape) < 3:
            return None, f"Conv weight of rank {len(weight_shape)}"
        kernel = tuple(int(d) for d in weight_shape[2:])
        d = len(kernel)
        auto_pad = ir.get_attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        pads = ir.get_attr(node, "pads", None)
        return LayerForm(
            "Conv",
            groups=int(ir.get_attr(node, "group", 1)),
            kernel=kernel,
            strides=tuple(int(s) for s in ir.get_attr(node, "strides", [1] * d)),
            dilations=tuple(int(s) for s in ir.get_attr(node, "dilations", [1] * d)),
            pads=tuple(int(p) for p in pads) if pads is not None else (None if auto_pad.startswith("SAME") else (0,) * 2 * d),
            auto_pad=auto_pad,
        ), None
    if node.op_type in ("Gemm", "MatMul"):
        if len(weight_shape) > 2:
            return None, f"{node.op_type} weight of rank {len(weight_shape)} (batched weights)"
        return LayerForm(node.op_type, trans_a=bool(ir.get_attr(node, "transA", 0)) if node.op_type == "Gemm" else False), None
    return None, f"{node.op_type}: calibrated criteria handle Conv, Gemm and MatMul"


def weight_matrix(weight: np.ndarray, form: LayerForm, reduction_axis: int) -> np.ndarray:
    """The weight as ``[groups, rows, K]`` in the column order of ``input_rows``."""
    if form.op_type == "Conv":
        g = form.groups
        moved = np.moveaxis(weight, 1, -1)  # [Cout, k..., Cin/g]
        return moved.reshape(g, weight.shape[0] // g, -1)
    if weight.ndim == 1:
        return weight.reshape(1, 1, -1)
    return np.moveaxis(weight, reduction_axis, -1)[None]


def from_weight_matrix(matrix: np.ndarray, shape: Tuple[int, ...], form: LayerForm, reduction_axis: int) -> np.ndarray:
    """Inverse of ``weight_matrix``."""
    if form.op_type == "Conv":
        moved_shape = (shape[0],) + tuple(shape[2:]) + (shape[1],)
        return np.moveaxis(matrix.reshape(moved_shape), -1, 1)
    if len(shape) == 1:
        return matrix.reshape(shape)
    return np.moveaxis(matrix[0], -1, reduction_axis)


def _resolved_pads(form: LayerForm, spatial: Tuple[int, ...]) -> Tuple[int, ...]:
    if form.pads is not None:
        return form.pads
    # SAME_UPPER / SAME_LOWER: output = ceil(in / stride); the odd pad goes at the end (UPPER) or begin.
    begin, end = [], []
    for size, k, s, dil in zip(spatial, form.kernel, form.strides, form.dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * dil + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if form.auto_pad == "SAME_UPPER" else large)
        end.append(large if form.auto_pad == "SAME_UPPER" else small)
    return tuple(begin + end)


def input_rows(x: np.ndarray, form: LayerForm) -> np.ndarray:
    """The rows the weight multiplies: ``[groups, P, K]`` (P = samples x positions)."""
    x = np.asarray(x, dtype=np.float32)
    if form.op_type != "Conv":
        if form.trans_a:
            x = x.T
        return x.reshape(1, -1, x.shape[-1])
    n, c = x.shape[:2]
    d = len(form.kernel)
    pads = _resolved_pads(form, x.shape[2:])
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + d]) for i in range(d)])
    spans = tuple((k - 1) * dil + 1 for k, dil in zip(form.kernel, form.dilations))
    windows = np.lib.stride_tricks.sliding_window_view(x, spans, axis=tuple(range(2, 2 + d)))
    # [N, C, out_full..., span...] -> stride the positions, dilate the window.
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in form.strides) + tuple(
        slice(None, None, dil) for dil in form.dilations)
    windows = windows[index]
    g = form.groups
    out = windows.shape[2:2 + d]
    # -> [N, out..., k..., C] then split C into groups: columns (k..., cin) per group.
    order = (0,) + tuple(range(2, 2 + d)) + tuple(range(2 + d, 2 + 2 * d)) + (1,)
    patches = windows.transpose(order).reshape(n * int(np.prod(out)), int(np.prod(form.kernel)), g, c // g)
    return np.ascontiguousarray(patches.transpose(2, 0, 1, 3)).reshape(g, patches.shape[0], -1)


def channel_rows(x: np.ndarray, form: LayerForm) -> Tuple[np.ndarray, int]:
    """(sum of x^2 per input channel, rows counted): the cheap statistic Wanda needs, without im2col.

    For a Conv this is each channel's energy over all positions, which equals the energy of its
    im2col column up to the border positions padding or striding leave out.
    """
    x = np.asarray(x, dtype=np.float32)
    if form.op_type == "Conv":
        axes = (0,) + tuple(range(2, x.ndim))
        return np.square(x).sum(axis=axes, dtype=np.float64), x.size // x.shape[1]
    if form.trans_a:
        x = x.T
    flat = x.reshape(-1, x.shape[-1])
    return np.square(flat).sum(axis=0, dtype=np.float64), flat.shape[0]
