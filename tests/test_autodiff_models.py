"""Whole-model gradients of the fixtures against torch autograd (issue 10's whole-model oracle).

Fixtures, small: ResNet-18 (dynamic batch, height and width), MobileNetV2 (depthwise convs, ReLU6 as
Clip), MobileNetV3 (HardSwish, HardSigmoid, squeeze-excite), U-Net (ConvTranspose, nearest Resize,
skip Concats), YOLOv8-style (Split, SiLU, stride-1 padded MaxPools, Resize, two outputs), BERT (with
LayerNormalization, and with it decomposed into ReduceMean/Pow/Sqrt), GPT (grouped-query attention,
causal mask by Where, SwiGLU).  graphprune differentiates ``loss = sum_i sum(Y_i * R_i)`` (fixed
random ``R_i``, as ``tests/gradcheck.py``'s ``loss_model``) with respect to every float initializer:
conv/linear weights and biases, BatchNorm scales, shifts and running statistics, LayerNorm scales
and shifts, embeddings, scalars such as the attention scale.  Torch autograd through
``tests/torch_reference.py`` (an independent float64 evaluation of the same ONNX graph with torch
ops) is the reference, and the tolerances are:

1. the gradient graph on the float64 model, run by onnx's ReferenceEvaluator, vs torch (float64):
   the same mathematics, so ``|ours - torch| <= 1e-7 * |torch| + 1e-9 * scale`` element-wise
   (observed: below 1e-13 of scale);
2. the gradient graph on the float32 model, run by onnxruntime, vs torch (float64):
   ``|ours - torch| <= 2e-4 * scale`` (float32 rounding; observed: below 4e-5 of scale);
3. one float32 gradient graph with symbolic dims, in onnxruntime: at batch 3, the sum of the three
   batch-1 gradients (the loss sums independent samples; BatchNormalization is in inference mode),
   ``|batch - sum| <= 1e-4 * scale`` (observed: below 2e-6); at a second image size or sequence
   length, torch's gradient within ``2e-4 * scale``.

``scale`` is the gradient tensor's largest entry, but at least 1e-2 of the largest gradient entry of
the whole model: some gradients vanish in exact arithmetic (attention key biases: softmax ignores a
shift common to all of a query's scores), and there both sides are rounding noise.

The oracle is itself checked against onnxruntime: on every fixture's outputs, and op by op in
attribute forms the fixtures do not use.  Where onnx's ReferenceEvaluator is imprecise or wrong
(Erf rounded to float32, MaxPool Indices with pads and stride 1), ``FLOAT64_KERNELS`` replace it.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from graphprune.autodiff.gradient import build_gradients
from graphprune.testing import (
    bert_encoder, gpt_decoder, mobilenet_v2, mobilenet_v3_block_net, resnet, unet, yolov8_c2f_net,
)
from tests.gradcheck import graph_gradients, loss_model, to_double

torch = pytest.importorskip("torch")

from tests.torch_reference import run_in_torch, run_node  # noqa: E402  (needs torch)

# Tolerances stated in the module docstring.
REFERENCE_RTOL = 1e-7  # float64 ReferenceEvaluator vs float64 torch, element-wise
REFERENCE_ATOL = 1e-9  # ... plus this fraction of scale
ORT_TOL = 2e-4  # float32 onnxruntime vs float64 torch, fraction of scale
BATCH_TOL = 1e-4  # float32 batch-3 gradient vs the sum of three batch-1 gradients
SCALE_FLOOR = 1e-2  # tolerances scale with max(max|gradient|, this fraction of the model's largest entry)

# Small instances: every architectural feature, milliseconds per run.  The transformers keep
# max_positions small (the position table and causal mask are initializers of that size).
FIXTURES: Dict[str, Callable[[], onnx.ModelProto]] = {
    "resnet18": lambda: resnet(18, width=0.125, num_classes=10, dynamic_batch=True, dynamic_spatial=True),
    "mobilenet_v2": lambda: mobilenet_v2(width=0.25, image=32, num_classes=10, dynamic_batch=True),
    "mobilenet_v3": lambda: mobilenet_v3_block_net(width=0.5, image=32, num_classes=10, dynamic_batch=True),
    "unet": lambda: unet(width=0.125, image=16, dynamic_batch=True),
    "yolov8_c2f": lambda: yolov8_c2f_net(width=0.125, image=32, num_classes=4, dynamic_batch=True),
    "bert": lambda: bert_encoder(layers=2, hidden=32, heads=4, ffn=64, max_positions=16),
    "bert_decomposed_ln": lambda: bert_encoder(layers=1, hidden=32, heads=4, ffn=64, max_positions=16,
                                               decomposed_layernorm=True),
    "gpt_gqa_swiglu": lambda: gpt_decoder(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64, gated=True,
                                          max_positions=16),
}


class Erf(OpRun):
    """float64 Erf: onnx's reference kernel rounds through float32 (``np.vectorize(erf, otypes="f")``)."""

    op_domain = ""

    def _run(self, x):
        return (torch.erf(torch.from_numpy(np.asarray(x))).numpy(),)


class MaxPool(OpRun):
    """MaxPool by torch: onnx's reference returns wrong Indices when pads meet stride-1 windows (its
    CommonPool path), and the gradient graph scatters through Indices."""

    op_domain = ""

    def _run(self, x, **_):
        results = run_node(self.onnx_node, [torch.from_numpy(np.asarray(x))], opset=17)
        return tuple(r.numpy().astype(x.dtype) if r.is_floating_point() else r.numpy() for r in results)


FLOAT64_KERNELS = [Erf, MaxPool]


@functools.lru_cache(maxsize=None)
def _fixture(name: str) -> onnx.ModelProto:
    """Each fixture built once per session; tests copy before changing it."""
    return FIXTURES[name]()


def _feeds(model: onnx.ModelProto, batch: int, seed: int = 0, image: int = 32, seq: int = 7) -> Dict[str, np.ndarray]:
    """N(0, 1) images or random token ids at ``batch``; symbolic H, W are ``image``, a symbolic sequence ``seq``."""
    rng = np.random.default_rng(seed)
    (vi,) = model.graph.input
    ids = vi.type.tensor_type.elem_type == TensorProto.INT64
    dims = [d.dim_value if d.HasField("dim_value") else (seq if ids else image) for d in vi.type.tensor_type.shape.dim]
    dims[0] = batch
    if ids:
        return {vi.name: rng.integers(0, 100, dims).astype(np.int64)}
    return {vi.name: rng.standard_normal(dims).astype(np.float32)}


def _double(model: onnx.ModelProto) -> onnx.ModelProto:
    """``to_double(model)``, except Resize's scales stay float32 (the only type ONNX allows there).

    A float64 scales tensor makes strict shape inference fail, and the gradient rules would then see no shapes.
    """
    double = to_double(model)
    scales = {node.input[2] for node in double.graph.node if node.op_type == "Resize" and len(node.input) > 2}
    for tensor in [init for init in double.graph.initializer if init.name in scales] + [
        node.attribute[0].t for node in double.graph.node if node.op_type == "Constant" and node.output[0] in scales
    ]:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    return double


def _trainable(model: onnx.ModelProto) -> List[str]:
    """Every float initializer of the forward model (all of them reach its outputs)."""
    return [init.name for init in model.graph.initializer if init.data_type == TensorProto.FLOAT]


def _torch_gradients(model: onnx.ModelProto, feeds, weights: Dict[str, np.ndarray], wrt) -> Dict[str, np.ndarray]:
    """Torch autograd (float64) of ``sum_i sum(Y_i * weights[Y_i])`` with respect to the initializers ``wrt``."""
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    params = {name: torch.tensor(inits[name].astype(np.float64), requires_grad=True) for name in wrt}
    outputs = run_in_torch(model, feeds, params)
    loss = sum((y * torch.from_numpy(weights[vi.name].astype(np.float64))).sum()
               for vi, y in zip(model.graph.output, outputs) if vi.name in weights)
    loss.backward()
    return {name: params[name].grad.numpy() for name in wrt}


def _ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _scaled_error(got: np.ndarray, want: np.ndarray, floor: float = 1e-30) -> float:
    """Largest |got - want| as a fraction of max|want| (or of ``floor`` when that is larger)."""
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), floor))


def _floor(grads) -> float:
    """The least tolerance scale of a model's gradients (see the module docstring)."""
    return SCALE_FLOOR * max(float(np.abs(g).max()) for g in grads)


def _cases():
    """Single-node models for the oracle's ops beyond the fixtures' attribute forms: (op, attrs, inputs, outputs)."""
    rng = np.random.default_rng(0)

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def i64(values):
        return np.array(values, dtype=np.int64)

    x = f(2, 3, 7, 6)
    return [
        ("MaxPool", dict(kernel_shape=[3, 2], pads=[0, 1, 2, 0], strides=[2, 1]), [x], 2),
        ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), [x], 2),
        ("AveragePool", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0), [x], 1),
        ("AveragePool", dict(kernel_shape=[3, 2], pads=[1, 0, 1, 1], strides=[2, 2], count_include_pad=1), [x], 1),
        ("Conv", dict(pads=[0, 1, 2, 1], strides=[2, 1], dilations=[1, 2], group=3), [x, f(6, 1, 3, 2), f(6)], 1),
        ("Conv", dict(auto_pad="SAME_LOWER", strides=[2, 2]), [x, f(4, 3, 3, 3)], 1),
        ("Conv", dict(), [f(2, 3, 9), f(4, 3, 3)], 1),
        ("ConvTranspose", dict(strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 1], group=3),
         [x, f(3, 2, 3, 3), f(6)], 1),
        ("Resize", dict(mode="linear"), [x, "", np.array([1, 1, 2, 1.5], np.float32)], 1),
        ("Resize", dict(mode="linear", coordinate_transformation_mode="align_corners"),
         [x, "", "", i64([2, 3, 11, 4])], 1),
        ("Resize", dict(mode="nearest", coordinate_transformation_mode="pytorch_half_pixel"),
         [x, "", "", i64([2, 3, 13, 3])], 1),
        ("Slice", dict(), [x, i64([-1, 5]), i64([-100, 0]), i64([3, 2]), i64([-2, -2])], 1),
        ("Split", dict(axis=2), [x, i64([2, 5])], 2),
        ("Split", dict(axis=1, num_outputs=2), [x], 2),
        ("Squeeze", dict(), [f(2, 1, 3, 1), i64([-1])], 1),
        ("Unsqueeze", dict(), [f(2, 3), i64([-1, 0])], 1),
        ("Gather", dict(axis=-1), [x, i64([[0, -1], [2, 3]])], 1),
        ("Softmax", dict(axis=1), [x], 1),
        ("LayerNormalization", dict(axis=-2, epsilon=1e-3), [x, f(7, 6), f(7, 6)], 3),
        ("BatchNormalization", dict(epsilon=1e-3), [x, f(3), f(3), f(3), np.abs(f(3)) + 0.5], 1),
        ("Gemm", dict(alpha=0.5, beta=2.0, transA=1), [f(4, 3), f(4, 5), f(5)], 1),
        ("HardSwish", dict(), [4 * x], 1),
        ("HardSigmoid", dict(alpha=0.3, beta=0.4), [x], 1),
        ("Gelu", dict(approximate="tanh"), [x], 1),
        ("Expand", dict(), [f(3, 1), i64([2, 1, 4])], 1),
        ("Where", dict(), [x > 0, x, f(1, 6)], 1),
        ("Range", dict(), [i64(2), i64(11), i64(3)], 1),
        ("ReduceMean", dict(keepdims=0), [x, i64([1, -1])], 1),
        ("Reshape", dict(), [x, i64([0, -1, 6])], 1),
        ("Cast", dict(to=TensorProto.INT64), [3 * x], 1),
        ("Clip", dict(), [x, np.float32(-0.5), np.float32(0.7)], 1),
        ("Shape", dict(start=1, end=-1), [x], 1),
    ]


CASES = _cases()


@pytest.mark.parametrize("op, attrs, inputs, outputs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_torch_reference_ops(op, attrs, inputs, outputs):
    """The oracle's ops in forms the fixtures do not use (asymmetric pads, ceil_mode, linear Resize) vs onnxruntime."""
    names = ["" if isinstance(v, str) else f"in{i}" for i, v in enumerate(inputs)]
    feeds = {name: np.asarray(v) for name, v in zip(names, inputs) if name}
    graph = helper.make_graph(
        [helper.make_node(op, names, [f"out{i}" for i in range(outputs)], **attrs)], op,
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
        [helper.make_empty_tensor_value_info(f"out{i}") for i in range(outputs)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    for got, want in zip(run_in_torch(model, feeds), _ort_session(model).run(None, feeds)):
        assert tuple(got.shape) == want.shape
        assert _scaled_error(got.detach().numpy(), want, 1e-30) <= 1e-6


@pytest.mark.parametrize("name", list(FIXTURES))
def test_torch_reference_matches_onnxruntime(name):
    """The oracle itself: run_in_torch computes each fixture's outputs as onnxruntime does (float32 there)."""
    model = _fixture(name)
    feeds = _feeds(model, batch=2)
    for vi, got, want in zip(model.graph.output, run_in_torch(model, feeds), _ort_session(model).run(None, feeds)):
        assert tuple(got.shape) == want.shape
        assert _scaled_error(got.detach().numpy(), want) <= 1e-5, f"{name}: output {vi.name}"


@pytest.mark.parametrize("name", list(FIXTURES))
def test_whole_model_gradients_match_torch(name):
    """float64 ReferenceEvaluator and float32 onnxruntime gradients vs torch float64 autograd."""
    model = _fixture(name)
    wrt = _trainable(model)
    feeds = _feeds(model, batch=2)
    feeds64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    lossy = loss_model(_double(model), feeds64)
    weights = {init.name[len("check/R/"):]: numpy_helper.to_array(init)
               for init in lossy.graph.initializer if init.name.startswith("check/R/")}
    expected = _torch_gradients(model, feeds, weights, wrt)
    floor = _floor(expected.values())

    reference = ReferenceEvaluator(graph_gradients(lossy, wrt), new_ops=FLOAT64_KERNELS).run(None, feeds64)[1:]
    for param, got in zip(wrt, reference):
        want = expected[param]
        assert got.shape == want.shape, f"{name}: gradient of {param} has shape {got.shape}, torch {want.shape}"
        np.testing.assert_allclose(got, want, rtol=REFERENCE_RTOL, atol=REFERENCE_ATOL * max(np.abs(want).max(), floor),
                                   err_msg=f"{name}: float64 gradient of {param} vs torch")

    session = _ort_session(graph_gradients(to_double(lossy, TensorProto.FLOAT), wrt))
    for param, got in zip(wrt, session.run(None, feeds)[1:]):
        error = _scaled_error(got, expected[param], floor)
        assert error <= ORT_TOL, (
            f"{name}: onnxruntime float32 gradient of {param} is off by {error:.2e} of its scale (tolerance {ORT_TOL})")


def _batch_loss_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with loss ``sum_i sum(Y_i * R_i)``, the ``R_i`` inputs shaped like the outputs (batch symbolic)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    terms = []
    for vi in model.graph.output:
        weight = onnx.ValueInfoProto()
        weight.CopyFrom(vi)
        weight.name = f"R/{vi.name}"
        graph.input.append(weight)
        graph.node.append(helper.make_node("Mul", [vi.name, weight.name], [f"wy/{vi.name}"]))
        graph.node.append(helper.make_node("ReduceSum", [f"wy/{vi.name}"], [f"term/{vi.name}"], keepdims=0))
        terms.append(f"term/{vi.name}")
    graph.node.append(helper.make_node("Sum", terms, ["loss"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    return result


def _weights(model: onnx.ModelProto, feeds, seed: int) -> Dict[str, np.ndarray]:
    """Random ``R_i`` shaped like the model's outputs on ``feeds``, as ``R/<output>`` inputs."""
    rng = np.random.default_rng(seed)
    outputs = _ort_session(model).run(None, feeds)
    return {f"R/{vi.name}": rng.standard_normal(y.shape).astype(np.float32)
            for vi, y in zip(model.graph.output, outputs)}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_gradient_graph_has_dynamic_dims(name):
    """One gradient graph: the batch-3 gradient is the sum of the per-sample ones; another size matches torch."""
    model = _batch_loss_model(_fixture(name))
    assert all(inp.type.tensor_type.shape.dim[0].HasField("dim_param") for inp in model.graph.input), \
        f"{name}: the test needs a symbolic batch dim on every input"
    wrt = _trainable(_fixture(name))
    grads = build_gradients(model, "loss", wrt)
    with_grads = onnx.ModelProto()
    with_grads.CopyFrom(model)
    with_grads.graph.node.extend(grads.nodes)
    with_grads.graph.initializer.extend(grads.initializers)
    with_grads.graph.output.extend(helper.make_empty_tensor_value_info(grads.grads[p]) for p in wrt)
    session = _ort_session(with_grads)

    feeds = _feeds(_fixture(name), batch=3, seed=1)
    feeds.update(_weights(_fixture(name), feeds, seed=2))
    batched = session.run(None, feeds)[1:]
    singles = [session.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[1:] for i in range(3)]
    floor = _floor(batched)
    for j, param in enumerate(wrt):
        total = sum(single[j] for single in singles)
        assert batched[j].shape == total.shape
        error = _scaled_error(total, batched[j], floor)
        assert error <= BATCH_TOL, (
            f"{name}: gradient of {param} at batch 3 differs from the sum over samples by {error:.2e} of its scale")

    # Other image size / sequence length (fixed dims stay as they are).
    feeds = _feeds(_fixture(name), batch=2, seed=3, image=40, seq=11)
    weights = _weights(_fixture(name), feeds, seed=4)
    got = session.run(None, {**feeds, **weights})[1:]
    expected = _torch_gradients(_fixture(name), feeds, {k[len("R/"):]: v for k, v in weights.items()}, wrt)
    floor = _floor(expected.values())
    for param, value in zip(wrt, got):
        error = _scaled_error(value, expected[param], floor)
        assert error <= ORT_TOL, f"{name}: gradient of {param} at a second size is off by {error:.2e} of its scale"
