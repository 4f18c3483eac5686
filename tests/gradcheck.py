"""Checking gradient rules: central finite differences in float64, onnxruntime in float32, torch autograd.

``check_gradients(model, feeds, wrt)`` differentiates ``loss = sum_i sum(Y_i * R_i)`` (fixed random
``R_i``, so every output element is weighted differently) with graphprune's gradient graph and
compares it with
  1. central finite differences of the same loss, both evaluated in float64 by onnx's reference
     evaluator (the rule's mathematics, free of float32 noise);
  2. the same gradient graph built on the float32 model and run in onnxruntime (the emitted graph
     loads and runs in the runtime users have).
``torch_gradients`` gives torch autograd's answer for a torch function of the same feeds.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from graphprune.autodiff.gradient import build_gradients

__all__ = ["check_gradients", "make_model", "to_double", "loss_model", "graph_gradients", "torch_gradients", "ORT_IR",
           "reference_evaluator"]

ORT_IR = 10  # every supported onnxruntime (>= 1.20) loads IR 10


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    """A float32 test model at an IR version and opset onnxruntime loads."""
    graph = helper.make_graph(list(nodes), "check", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ORT_IR
    return model


class Erf(OpRun):
    """Erf in the input's precision: onnx 1.23's reference rounds it to float32 (``otypes="f"``),
    noise that float64 finite differences (and Gelu, whose function body uses Erf) cannot see through."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


class LRN(OpRun):
    """LRN as the spec defines it: onnx 1.23's reference loops over the batch instead of the channels."""

    op_domain = ""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        alpha, beta, bias, size = (self.alpha if alpha is None else alpha, self.beta if beta is None else beta,
                                   self.bias if bias is None else bias, self.size if size is None else size)
        before, after = (size - 1) // 2, size // 2  # floor((size-1)/2) and ceil((size-1)/2)
        padded = np.pad(x * x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
        square_sum = sum(padded[:, i: i + x.shape[1]] for i in range(size))
        return ((x / (bias + alpha / size * square_sum) ** beta).astype(x.dtype),)


class LpNormalization(OpRun):
    """LpNormalization with |x|: onnx 1.23's reference sums x ** p, wrong for p = 1 and negative x."""

    op_domain = ""

    def _run(self, x, axis=None, p=None):
        axis, p = self.axis if axis is None else axis, self.p if p is None else p
        norm = np.power(np.power(np.abs(x), p).sum(axis=axis, keepdims=True), 1.0 / p)
        return (np.where(norm == 0, 0, x / np.where(norm == 0, 1, norm)).astype(x.dtype),)


class MeanVarianceNormalization(OpRun):
    """MVN in the input's precision: onnx 1.23's function body adds a float32 epsilon (fails on float64)."""

    op_domain = ""

    def _run(self, x, axes=None):
        axes = tuple(self.axes if axes is None else axes)
        centered = x - x.mean(axis=axes, keepdims=True)
        return (centered / (np.sqrt((centered * centered).mean(axis=axes, keepdims=True)) + 1e-9),)


# Exact replacements for reference ops that are imprecise or wrong in the installed onnx.
EXACT_OPS = [Erf, LRN, LpNormalization, MeanVarianceNormalization]


class _ExactEvaluator(ReferenceEvaluator):
    # A subclass, not a new_ops argument alone: function bodies (Gelu, GroupNormalization...) are
    # evaluated by a fresh instance of the evaluator's class, which must use EXACT_OPS too.
    def __init__(self, proto, *args, new_ops=None, **kwargs):
        super().__init__(proto, *args, new_ops=list(new_ops or []) + EXACT_OPS, **kwargs)


def reference_evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    """onnx's ReferenceEvaluator with ``EXACT_OPS`` in place of the library's versions."""
    return _ExactEvaluator(model)


def _retype(elem: int, to: int) -> int:
    return to if elem in (TensorProto.FLOAT, TensorProto.DOUBLE) else elem


def to_double(model: onnx.ModelProto, to: int = TensorProto.DOUBLE) -> onnx.ModelProto:
    """A copy of ``model`` computing in ``to`` (float64 by default) wherever it computed in float32."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    np_type = helper.tensor_dtype_to_np_dtype(to)

    def convert_tensor(tensor: onnx.TensorProto) -> None:
        if tensor.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np_type), tensor.name))

    graph = out.graph
    for init in graph.initializer:
        convert_tensor(init)
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.elem_type = _retype(vi.type.tensor_type.elem_type, to)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                convert_tensor(attr.t)
            elif attr.name in ("to", "dtype", "output_dtype", "stash_type") and attr.type == onnx.AttributeProto.INT:
                attr.i = _retype(attr.i, to)
    return out


def loss_model(model: onnx.ModelProto, feeds: Dict[str, np.ndarray], seed: int = 0) -> onnx.ModelProto:
    """``model`` plus ``loss = sum_i ReduceSum(Y_i * R_i)`` as its only output (float64 in, float64 out)."""
    outputs = reference_evaluator(model).run(None, feeds)
    rng = np.random.default_rng(seed)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    terms = []
    for vi, value in zip(model.graph.output, outputs):
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            continue
        weight = rng.standard_normal(np.shape(value)).astype(np.asarray(value).dtype)
        graph.initializer.append(numpy_helper.from_array(weight, f"check/R/{vi.name}"))
        graph.node.append(helper.make_node("Mul", [vi.name, f"check/R/{vi.name}"], [f"check/wy/{vi.name}"]))
        graph.node.append(helper.make_node("ReduceSum", [f"check/wy/{vi.name}"], [f"check/term/{vi.name}"], keepdims=0))
        terms.append(f"check/term/{vi.name}")
    graph.node.append(helper.make_node("Sum", terms, ["check/loss"]))
    elem = model.graph.output[0].type.tensor_type.elem_type
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("check/loss", elem, []))
    return result


def graph_gradients(model: onnx.ModelProto, wrt: Sequence[str], loss: str = "check/loss") -> onnx.ModelProto:
    """``model`` whose outputs are the loss and its gradient for each of ``wrt`` (in that order)."""
    grads = build_gradients(model, loss, wrt)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    graph.node.extend(grads.nodes)
    graph.initializer.extend(grads.initializers)
    for name in wrt:
        assert grads.grads[name] is not None, f"no gradient reached {name}"
        graph.output.append(helper.make_empty_tensor_value_info(grads.grads[name]))
    return result


def _finite_differences(model: onnx.ModelProto, feeds, name: str, eps: float, max_elements: int, rng):
    """(flat indices, d loss / d name at those indices) by central differences in float64."""
    session = reference_evaluator(model)
    inits = {init.name: init for init in model.graph.initializer}
    base = feeds[name] if name in feeds else numpy_helper.to_array(inits[name])
    size = base.size
    picks = np.arange(size) if size <= max_elements else rng.choice(size, max_elements, replace=False)
    values = []
    for flat in picks:
        total = []
        for sign in (1, -1):
            bumped = base.copy().reshape(-1)
            bumped[flat] += sign * eps
            bumped = bumped.reshape(base.shape)
            if name in feeds:
                total.append(session.run(None, {**feeds, name: bumped})[0])
            else:
                changed = onnx.ModelProto()
                changed.CopyFrom(model)
                for init in changed.graph.initializer:
                    if init.name == name:
                        init.CopyFrom(numpy_helper.from_array(bumped, name))
                total.append(reference_evaluator(changed).run(None, feeds)[0])
        values.append((float(total[0]) - float(total[1])) / (2 * eps))
    return picks, np.array(values)


def check_gradients(
    model: onnx.ModelProto,
    feeds: Dict[str, np.ndarray],
    wrt: Sequence[str],
    rtol: float = 1e-5,
    atol: float = 1e-7,
    eps: float = 1e-6,
    max_elements: int = 24,
    ort_rtol: float = 2e-3,
    run_ort: bool = True,
    seed: int = 0,
) -> Dict[str, np.ndarray]:
    """Assert graphprune's gradients of ``model`` match finite differences (float64) and run in ORT.

    Args:
        model: a float32 model (built with ``make_model``); ``feeds`` its float32/integer inputs.
        wrt: graph inputs or initializers to differentiate with respect to.
        rtol, atol: tolerances against finite differences (float64).
        ort_rtol: tolerance of the float32 onnxruntime run, relative to the gradient's largest entry.
        run_ort: also build the gradient graph on the float32 model and run it in onnxruntime.

    Returns the float64 analytic gradients by name.
    """
    rng = np.random.default_rng(seed)
    double = to_double(model)
    feeds64 = {k: (v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v) for k, v in feeds.items()}
    lossy = loss_model(double, feeds64, seed)
    with_grads = graph_gradients(lossy, wrt)
    analytic = dict(zip(wrt, reference_evaluator(with_grads).run(None, feeds64)[1:]))
    inits = {init.name: init for init in double.graph.initializer}
    for name in wrt:
        shape = feeds64[name].shape if name in feeds64 else tuple(inits[name].dims)
        assert analytic[name].shape == shape, f"gradient of {name} has shape {analytic[name].shape}, expected {shape}"
        picks, numeric = _finite_differences(lossy, feeds64, name, eps, max_elements, rng)
        np.testing.assert_allclose(analytic[name].reshape(-1)[picks], numeric, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {name} vs finite differences")
    if run_ort:
        import onnxruntime as ort

        float_loss = to_double(lossy, TensorProto.FLOAT)
        float_graph = graph_gradients(float_loss, wrt)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(float_graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
                                 for k, v in feeds.items()})[1:]
        for name, value in zip(wrt, got):
            # float32 rounding is relative to the values the gradient is computed from (order 1 here),
            # not to the gradient itself: a saturated softmax's 1e-7 gradient carries 1e-9 of noise.
            scale = max(float(np.abs(analytic[name]).max()), 1e-4)
            np.testing.assert_allclose(value, analytic[name], rtol=0, atol=ort_rtol * scale,
                                       err_msg=f"gradient of {name} in onnxruntime (float32)")
    return analytic


def torch_gradients(fn: Callable, feeds: Dict[str, np.ndarray], wrt: Sequence[str], seed: int = 0):
    """Torch autograd's gradient of ``sum_i sum(fn(**feeds)_i * R_i)`` with the same ``R_i`` as ``loss_model``.

    ``fn`` takes float64 torch tensors by name and returns one tensor or a tuple (the model's outputs in order).
    """
    import torch

    tensors = {k: torch.tensor(v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v,
                               requires_grad=k in wrt) for k, v in feeds.items()}
    outputs = fn(**tensors)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    rng = np.random.default_rng(seed)
    loss = 0
    for out in outputs:
        weight = torch.tensor(rng.standard_normal(tuple(out.shape)).astype(np.float64))
        loss = loss + (out * weight).sum()
    loss.backward()
    return {k: tensors[k].grad.numpy() for k in wrt}
