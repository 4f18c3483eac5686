"""``GraphBuilder``: writes torch.onnx-export-shaped ONNX graphs with seeded, realistically scaled weights.

Names follow a torch export: initializers are module paths (``layer1.0.conv1.weight``), nodes are
scopes (``/layer1/layer1.0/conv1/Conv``) and their outputs ``<node>_output_<i>``.

The layer helpers (``conv``, ``batch_norm``, ``act``, ``gemm``...) also push a small seeded
standard-normal calibration batch through each layer in NumPy (``graphprune.testing.npops``), so
that the weights behave like trained ones: BatchNormalization running statistics are the statistics
that really reach the layer (plus a little noise, as a finite training run leaves), and layers
without a normalization after them are scaled to unit output variance (LSUV-style).  Activations
then stay O(1) at any depth and test inputs drawn from N(0, 1) see the network its statistics
describe.  Raw ``op`` calls (the transformer builders) carry no calibration values.
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.testing import npops

__all__ = ["GraphBuilder", "Dims", "scope_path"]

Dims = Sequence[Union[int, str]]

DEFAULT_OPSET = 17
DEFAULT_IR_VERSION = 8
# Spread of per-filter magnitudes (log-normal sigma): trained filters differ in norm, and magnitude
# pruning criteria need something to rank.
_FILTER_SPREAD = 0.3
# Calibration batch: as many images as two 224x224 ones hold pixels (64 at most), so the deepest,
# smallest feature maps of a small test image still give each BN some hundred values per channel.
_CALIBRATION_POSITIONS = 32768
_CALIBRATION_MAX_BATCH = 64
# Initializers up to this size stay in the graph shape inference sees (shape constants among them).
_SKELETON_MAX_VALUES = 4096
# Stand-in for a dynamic spatial dim while calibrating: the size tests typically feed (too small a
# size leaves 1x1 deep feature maps, where 3x3 convs see only their centre tap).
_CALIBRATION_DYNAMIC_SIZE = 64


def scope_path(module: str) -> str:
    """Torch's node scope for a module path: ``layer1.0.conv1`` -> ``/layer1/layer1.0/conv1``.

    Children of containers (numeric path parts) are named ``parent.index`` as torch does.
    """
    if not module:
        return ""
    segments: List[str] = []
    for part in module.split("."):
        if part.isdigit() and segments:
            segments.append(f"{segments[-1]}.{part}")
        else:
            segments.append(part)
    return "/" + "/".join(segments)


class GraphBuilder:
    """Accumulates one graph: nodes, initializers, inputs, outputs, and calibration values.

    Args:
        name: the graph name.
        seed: seeds every weight and the calibration batch; same calls, same seed, same bytes.
        opset: ai.onnx opset to import.
        ir_version: IR version to stamp.
    """

    def __init__(self, name: str, seed: int = 0, opset: int = DEFAULT_OPSET, ir_version: int = DEFAULT_IR_VERSION):
        self.name = name
        self.rng = np.random.default_rng(seed)
        # A separate stream, so that calibration data never shifts which weights a seed gives.
        self._calibration_rng = np.random.default_rng([seed, 1])
        self.opset = opset
        self.ir_version = ir_version
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[str] = []
        # Calibration-batch value of every tensor the layer helpers produced.
        self.values: Dict[str, np.ndarray] = {}
        self._node_names: Dict[str, int] = collections.Counter()
        self._init_names: set = set()
        self._output_shapes: Dict[str, List[Union[int, str]]] = {}

    # --- plumbing ----------------------------------------------------------------------------------

    def op(self, op_type: str, inputs: Sequence[str], module: str = "", outputs: int = 1, **attrs):
        """Add a node in ``module``'s scope; returns its output name (a list when ``outputs`` > 1)."""
        base = f"{scope_path(module)}/{op_type}"
        count = self._node_names[base]
        self._node_names[base] += 1
        name = base if count == 0 else f"{base}_{count}"
        out_names = [f"{name}_output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), out_names, name=name, **attrs))
        return out_names[0] if outputs == 1 else out_names

    def constant(self, value, module: str = "") -> str:
        """A ``Constant`` node, as torch exports shape and scalar constants."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        return self.op("Constant", [], module, value=numpy_helper.from_array(array))

    def ints(self, values: Sequence[int], module: str = "") -> str:
        return self.constant(np.asarray(values, dtype=np.int64), module)

    def initializer(self, name: str, array: np.ndarray) -> str:
        if name in self._init_names:
            raise ValueError(f"initializer {name!r} defined twice")
        self._init_names.add(name)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def input(self, name: str, shape: Dims, elem_type: int = TensorProto.FLOAT) -> str:
        """A graph input.  Float inputs get a standard-normal calibration batch (dynamic dims filled in)."""
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        if elem_type == TensorProto.FLOAT:
            dims = [d if isinstance(d, int) else _CALIBRATION_DYNAMIC_SIZE for d in shape[1:]]
            batch = max(2, min(_CALIBRATION_MAX_BATCH, _CALIBRATION_POSITIONS // max(1, int(np.prod(dims[1:])))))
            self.values[name] = self._calibration_rng.standard_normal([batch] + dims).astype(np.float32)
        return name

    def output(self, tensor: str, name: str, shape: Optional[Dims] = None) -> str:
        """Expose ``tensor`` as graph output ``name`` by renaming it where it is produced and used.

        Returns ``name``, which later nodes must use.  ``shape`` declares the output's dims (symbolic
        names included) where shape inference cannot name them; by default they are inferred.
        """
        for node in self.nodes:
            for i, out in enumerate(node.output):
                if out == tensor:
                    node.output[i] = name
            for i, inp in enumerate(node.input):
                if inp == tensor:
                    node.input[i] = name
        self.outputs.append(name)
        if shape is not None:
            self._output_shapes[name] = list(shape)
        if tensor in self.values:
            self.values[name] = self.values[tensor]
        return name

    def build(self, doc_string: str = "") -> onnx.ModelProto:
        """The model, with output types from strict shape inference (symbolic dims kept)."""
        outputs = [helper.make_empty_tensor_value_info(o) for o in self.outputs]
        model = self._model(self.inputs, outputs, self.initializers, doc_string)
        # Infer on a skeleton whose big weights are typed inputs: inference needs their shapes only,
        # and serializing BERT-base's 440 MB for it would double the build time.
        small = [t for t in self.initializers if int(np.prod(t.dims)) <= _SKELETON_MAX_VALUES]
        weights = [
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in self.initializers
            if int(np.prod(t.dims)) > _SKELETON_MAX_VALUES
        ]
        skeleton = self._model(self.inputs + weights, outputs, small, doc_string)
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=True)
        known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for out in model.graph.output:
            if out.name in known and known[out.name].type.HasField("tensor_type"):
                out.type.CopyFrom(known[out.name].type)
            if out.name in self._output_shapes:
                declared = helper.make_tensor_value_info(
                    out.name, out.type.tensor_type.elem_type, self._output_shapes[out.name]
                )
                out.type.CopyFrom(declared.type)
        return model

    def _model(self, inputs, outputs, initializers, doc_string: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, initializers)
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            ir_version=self.ir_version,
            producer_name="graphprune.testing",
            doc_string=doc_string,
        )

    def channels(self, name: str) -> int:
        """Channel count (axis 1) of a tensor a layer helper produced."""
        return int(self.values[name].shape[1])

    def _set(self, name: str, value: np.ndarray) -> str:
        self.values[name] = np.asarray(value, dtype=np.float32)
        return name

    # --- weights -------------------------------------------------------------------------------------

    def he_normal(self, shape: Tuple[int, ...], fan_in: int) -> np.ndarray:
        """He-normal weights with a log-normal per-output-filter magnitude spread."""
        w = self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        spread = np.exp(self.rng.normal(0.0, _FILTER_SPREAD, size=(shape[0],) + (1,) * (len(shape) - 1)))
        return (w * spread).astype(np.float32)

    @staticmethod
    def _unit_scale(w: np.ndarray, b: Optional[np.ndarray], y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Rescale ``w`` so its layer's output, ``y`` before the bias, has unit standard deviation.

        The layer is linear in ``w``, so the rescaled output is ``y`` rescaled: no second pass.
        Returns (weight, output with bias).
        """
        scale = np.float32(1.0 / max(float(y.std()), 1e-6))
        if b is not None:
            y = y * scale + b.reshape((1, -1) + (1,) * (y.ndim - 2))
        else:
            y = y * scale
        return (w * scale).astype(np.float32), y

    # --- layers ------------------------------------------------------------------------------------

    def conv(
        self,
        x: str,
        module: str,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        pad: Optional[int] = None,
        groups: int = 1,
        bias: bool = True,
        normalize: Optional[bool] = None,
    ) -> str:
        """Conv2d named ``module`` (``module.weight`` [out, in/groups, k, k], ``module.bias``).

        ``normalize`` (default: when the conv has a bias, i.e. no BatchNormalization follows)
        rescales the He-normal weights so the output has unit variance on the calibration batch.
        """
        xv = self.values[x]
        pad = kernel // 2 if pad is None else pad
        shape = (out_channels, xv.shape[1] // groups, kernel, kernel)
        w = self.he_normal(shape, int(np.prod(shape[1:])))
        b = (self.rng.standard_normal(out_channels) * 0.05).astype(np.float32) if bias else None

        if normalize if normalize is not None else bias:
            w, y = self._unit_scale(w, b, npops.conv2d(xv, w, None, stride, pad, groups))
        else:
            y = npops.conv2d(xv, w, b, stride, pad, groups)
        inputs = [x, self.initializer(f"{module}.weight", w)]
        if b is not None:
            inputs.append(self.initializer(f"{module}.bias", b))
        out = self.op(
            "Conv", inputs, module,
            dilations=[1, 1], group=groups, kernel_shape=[kernel, kernel], pads=[pad] * 4, strides=[stride, stride],
        )
        return self._set(out, y)

    def conv_transpose(self, x: str, module: str, out_channels: int, kernel: int = 2, stride: int = 2) -> str:
        """ConvTranspose2d (``module.weight`` is [in, out, k, k]), scaled to unit output variance."""
        xv = self.values[x]
        w = self.he_normal((xv.shape[1], out_channels, kernel, kernel), xv.shape[1])
        b = (self.rng.standard_normal(out_channels) * 0.05).astype(np.float32)
        w, y = self._unit_scale(w, b, npops.conv_transpose2d(xv, w, None, stride))
        out = self.op(
            "ConvTranspose",
            [x, self.initializer(f"{module}.weight", w), self.initializer(f"{module}.bias", b)],
            module, dilations=[1, 1], group=1, kernel_shape=[kernel, kernel], pads=[0, 0, 0, 0], strides=[stride, stride],
        )
        return self._set(out, y)

    def batch_norm(self, x: str, module: str) -> str:
        """BatchNormalization whose running statistics are those of its calibration input."""
        xv = self.values[x]
        c = xv.shape[1]
        batch_mean, batch_var = npops.channel_stats(xv)
        gamma = self.rng.uniform(0.25, 1.5, c)
        beta = self.rng.normal(0.0, 0.1, c)
        # What training leaves: close to the statistics the layer sees, not equal to them.
        mean = batch_mean + self.rng.normal(0.0, 0.1, c) * np.sqrt(batch_var)
        var = np.maximum(batch_var, 1e-4) * self.rng.uniform(0.7, 1.3, c)
        params = [p.astype(np.float32) for p in (gamma, beta, mean, var)]
        names = [
            self.initializer(f"{module}.{suffix}", value)
            for suffix, value in zip(("weight", "bias", "running_mean", "running_var"), params)
        ]
        out = self.op("BatchNormalization", [x] + names, module, epsilon=1e-5, momentum=0.9)
        return self._set(out, npops.batch_norm(xv, *params))

    def act(self, x: str, kind: str, module: str) -> str:
        """An activation as torch exports it: relu, relu6 (Clip), hardswish, hardsigmoid, silu, sigmoid."""
        if kind == "relu":
            out = self.op("Relu", [x], module)
        elif kind == "relu6":
            lo, hi = self.constant(np.float32(0.0), module), self.constant(np.float32(6.0), module)
            out = self.op("Clip", [x, lo, hi], module)
        elif kind == "hardswish":
            out = self.op("HardSwish", [x], module)
        elif kind == "hardsigmoid":
            out = self.op("HardSigmoid", [x], module, alpha=1.0 / 6.0, beta=0.5)
        elif kind == "sigmoid":
            out = self.op("Sigmoid", [x], module)
        elif kind == "silu":
            out = self.op("Mul", [x, self.op("Sigmoid", [x], module)], module)
        else:
            raise ValueError(f"unknown activation {kind!r}")
        return self._set(out, npops.ACTIVATIONS[kind](self.values[x]))

    def conv_bn_act(
        self, x: str, conv: str, bn: str, act: Optional[str], out_channels: int, kernel: int,
        stride: int = 1, groups: int = 1, act_module: Optional[str] = None, pad: Optional[int] = None,
    ) -> str:
        """Conv (no bias) -> BatchNormalization -> activation (``act`` None for none)."""
        y = self.conv(x, conv, out_channels, kernel, stride, pad=pad, groups=groups, bias=False)
        y = self.batch_norm(y, bn)
        if act is None:
            return y
        return self.act(y, act, act_module or bn.rsplit(".", 1)[0])

    def add(self, a: str, b: str, module: str = "") -> str:
        return self._set(self.op("Add", [a, b], module), self.values[a] + self.values[b])

    def mul(self, a: str, b: str, module: str = "") -> str:
        """Element-wise product; ``b`` may broadcast (a [N, C, 1, 1] gate)."""
        return self._set(self.op("Mul", [a, b], module), self.values[a] * self.values[b])

    def concat(self, xs: Sequence[str], module: str = "") -> str:
        out = self.op("Concat", list(xs), module, axis=1)
        return self._set(out, np.concatenate([self.values[x] for x in xs], axis=1))

    def split(self, x: str, sizes: Sequence[int], module: str = "") -> List[str]:
        """Split on channels with an explicit ``split`` input (the opset 13+ form torch exports)."""
        outs = self.op("Split", [x, self.ints(sizes, module)], module, outputs=len(sizes), axis=1)
        pieces = np.split(self.values[x], np.cumsum(sizes)[:-1], axis=1)
        for out, piece in zip(outs, pieces):
            self._set(out, piece)
        return outs

    def max_pool(self, x: str, module: str, kernel: int, stride: int, pad: int = 0) -> str:
        out = self.op("MaxPool", [x], module, ceil_mode=0, dilations=[1, 1], kernel_shape=[kernel, kernel],
                      pads=[pad] * 4, strides=[stride, stride])
        return self._set(out, npops.max_pool2d(self.values[x], kernel, stride, pad))

    def global_avg_pool(self, x: str, module: str = "") -> str:
        return self._set(self.op("GlobalAveragePool", [x], module), npops.global_avg_pool(self.values[x]))

    def resize(self, x: str, module: str, scale: int = 2) -> str:
        """nn.Upsample(scale_factor, mode='nearest') as exported: Resize with scales, no roi."""
        scales = self.constant(np.array([1.0, 1.0, scale, scale], dtype=np.float32), module)
        out = self.op("Resize", [x, "", scales], module, coordinate_transformation_mode="asymmetric",
                      cubic_coeff_a=-0.75, mode="nearest", nearest_mode="floor")
        return self._set(out, npops.resize_nearest(self.values[x], scale))

    def flatten(self, x: str, module: str = "") -> str:
        """Flatten(axis=1): channel c becomes features c*H*W ... (c+1)*H*W - 1."""
        xv = self.values[x]
        return self._set(self.op("Flatten", [x], module, axis=1), xv.reshape(xv.shape[0], -1))

    def gemm(self, x: str, module: str, out_features: int, normalize: bool = True) -> str:
        """nn.Linear on [N, F] as exported: Gemm(transB=1) with ``module.weight`` [out, in]."""
        xv = self.values[x]
        w = self.he_normal((out_features, xv.shape[1]), xv.shape[1])
        b = (self.rng.standard_normal(out_features) * 0.05).astype(np.float32)
        if normalize:
            w, y = self._unit_scale(w, b, npops.gemm(xv, w))
        else:
            y = npops.gemm(xv, w, b)
        out = self.op("Gemm", [x, self.initializer(f"{module}.weight", w), self.initializer(f"{module}.bias", b)],
                      module, alpha=1.0, beta=1.0, transB=1)
        return self._set(out, y)
