"""The training graph (stand-ins, masks, loss) and its onnxruntime-training session.

``build_training_graph`` turns an inference model into the forward graph onnxruntime-training
differentiates; ``TrainingSession`` generates the artifacts (training, eval and optimizer models and
a checkpoint, in a temporary folder) and wraps the on-device ``Module`` / ``Optimizer``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune import ir
from graphprune.errors import UserError
from graphprune.model_io import ORT_MAX_IR_VERSION, default_opset, for_ort
from graphprune.training.losses import LossSpec, add_loss_graph
from graphprune.training.masks import mask_weights_in_graph
from graphprune.training.ort_training import ort_training, quiet_native_stderr
from graphprune.training.standins import apply_standins
from graphprune.training.trainable import TrainableWeights, constants_to_initializers, find_trainable

__all__ = ["TrainingGraph", "prepare_for_training", "build_training_graph", "TrainingSession", "tensor_shapes"]

_MIN_TRAINING_OPSET = 11


@dataclasses.dataclass
class TrainingGraph:
    """The forward graph to differentiate and what was done to make it."""

    model: onnx.ModelProto
    trainable: List[str]
    standins: Counter
    masked: List[str]


def prepare_for_training(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, TrainableWeights]:
    """A copy of ``model`` with weights as initializers, and its trainable weights.

    Float ``Constant`` nodes become initializers; old-style graphs (IR < 4) stop listing initializers
    as inputs; opsets below 11 are converted to 11 (the gradient builders emit two-input Gemm nodes,
    which older opsets reject).  Raises ``UserError`` when nothing is trainable.
    """
    work = ir.clone(for_ort(model))
    opset = default_opset(work)
    if opset is not None and opset < _MIN_TRAINING_OPSET:
        work = _converted(work, opset)
    converted = constants_to_initializers(work.graph)
    inits = {init.name for init in work.graph.initializer}
    kept_inputs = [vi for vi in work.graph.input if vi.name not in inits]
    del work.graph.input[:]
    work.graph.input.extend(kept_inputs)
    work.ir_version = max(work.ir_version, 4)
    trainable = find_trainable(work.graph, converted)
    if not trainable.names:
        raise UserError(
            "the model has no trainable weights (float32 weights of Conv/ConvTranspose/Gemm/MatMul or "
            "normalization layers); quantized models must be fine-tuned before quantization"
        )
    return work, trainable


def _converted(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, _MIN_TRAINING_OPSET)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the model's opset {opset} is too old to train and does not convert to opset "
                        f"{_MIN_TRAINING_OPSET} ({first})") from None


def _keep_needed(graph: onnx.GraphProto, outputs: Sequence[str]) -> None:
    """Drop nodes and initializers that do not feed ``outputs`` (in place)."""
    needed = set(outputs)
    kept: List[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs read outer names
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    needed.update(i for n in sub.node for i in n.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _fix_sample_dims(graph: onnx.GraphProto, sample_shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Give every input its samples' concrete non-batch dims (in place).

    The training data fixes them anyway, and onnxruntime-training 1.19 crashes (segfault) running
    the MaxPool gradient on dynamic spatial dims; only the batch dim stays symbolic.
    """
    for vi in graph.input:
        shape = sample_shapes.get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        if shape is None or len(dims) != len(shape) + 1:
            continue
        for dim, size in zip(list(dims)[1:], shape):
            dim.Clear()
            dim.dim_value = int(size)


def build_training_graph(
    work: onnx.ModelProto,
    trainable: Sequence[str],
    spec: LossSpec,
    masks: Dict[str, np.ndarray],
    sample_shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
) -> TrainingGraph:
    """The forward training graph of a model prepared by ``prepare_for_training``.

    Only what feeds ``spec.output`` is kept; ops without gradients get their stand-ins; masked
    weights are multiplied by their masks; the loss is the first output.  ``sample_shapes`` (input
    name -> the shape of one sample) makes the non-batch dims of the inputs static.
    """
    model = ir.clone(work)
    graph = model.graph
    _fix_sample_dims(graph, dict(sample_shapes or {}))
    opset = default_opset(model) or 1
    outputs = {vi.name: vi for vi in graph.output}
    if spec.output not in outputs:
        raise UserError(f"model has no output {spec.output!r} (outputs: {', '.join(outputs)})")
    output_vi = outputs[spec.output]
    _keep_needed(graph, [spec.output])
    present = {init.name for init in graph.initializer}
    trainable = [name for name in trainable if name in present]
    if not trainable:
        raise UserError(f"no trainable weight feeds output {spec.output!r}")
    shapes = tensor_shapes(model)
    masked = mask_weights_in_graph(graph, {n: m for n, m in masks.items() if n in trainable})
    standins = apply_standins(graph, opset, shapes)
    del graph.value_info[:]  # stand-ins rewrite internals; onnxblock infers shapes again
    add_loss_graph(graph, spec, output_vi, opset)
    return TrainingGraph(model, trainable, standins, masked)


def tensor_shapes(model: onnx.ModelProto) -> Dict[str, Tuple[Optional[int], ...]]:
    """Tensor name -> shape (None for unknown dims) wherever shape inference knows the rank."""
    from graphprune.shapes import infer_shapes

    graph = infer_shapes(model).graph
    shapes: Dict[str, Tuple[Optional[int], ...]] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        shape = ir.value_shape(vi)
        if shape is not None:  # symbolic dims count as unknown
            shapes[vi.name] = tuple(d if isinstance(d, int) else None for d in shape)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


class TrainingSession:
    """onnxruntime-training artifacts of a training graph and the on-device session over them.

    Args:
        graph: from ``build_training_graph``.
        optimizer: "adamw" or "sgd".
        weight_decay: decoupled weight decay of AdamW (ignored by SGD).
        clip_grad_norm: clip the global gradient norm to this value (None: no clipping).
        threads: intra-op threads (None lets onnxruntime decide).
    """

    def __init__(self, graph: TrainingGraph, optimizer: str = "adamw", weight_decay: float = 0.0,
                 clip_grad_norm: Optional[float] = None, threads: Optional[int] = None):
        training = ort_training()
        self.trainable = list(graph.trainable)
        self._dir = tempfile.mkdtemp(prefix="graphprune-train-")
        try:
            self._generate(training, graph.model, optimizer, weight_decay, clip_grad_norm)
            self._open(training, threads)
        except BaseException:
            self.close()
            raise

    def _generate(self, training, model, optimizer, weight_decay, clip_grad_norm) -> None:
        blocks = training.onnxblock
        clip = blocks.optim.ClipGradNorm(clip_grad_norm) if clip_grad_norm else None
        if optimizer == "adamw":
            opt_block = blocks.optim.AdamW(weight_decay=weight_decay, clip_grad=clip)
        elif optimizer == "sgd":
            opt_block = blocks.optim.SGD(clip_grad=clip)
        else:
            raise UserError(f"optimizer {optimizer!r}: choose adamw or sgd")
        log: List[str] = []
        try:
            with quiet_native_stderr(log):
                training.artifacts.generate_artifacts(
                    model, requires_grad=self.trainable, loss=None, optimizer=opt_block, artifact_directory=self._dir
                )
        except Exception as exc:
            raise UserError(f"onnxruntime-training cannot build the training graph: {_first_reason(exc)}") from None
        for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            _cap_ir_version(os.path.join(self._dir, name))

    def _open(self, training, threads) -> None:
        from graphprune.runtime import ort

        rt = ort()
        options = rt.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        api = training.api
        path = lambda name: os.path.join(self._dir, name)  # noqa: E731
        log: List[str] = []
        try:
            with quiet_native_stderr(log):
                self.state = api.CheckpointState.load_checkpoint(path("checkpoint"))
                self.module = api.Module(path("training_model.onnx"), self.state, path("eval_model.onnx"),
                                         session_options=options)
                self.optimizer = api.Optimizer(path("optimizer_model.onnx"), self.module)
        except Exception as exc:
            raise UserError(f"onnxruntime-training cannot run the training graph: {_first_reason(exc)}") from None
        self.input_names = self.module.input_names()

    def _call(self, train: bool, feeds: Dict[str, np.ndarray]) -> Tuple[float, np.ndarray]:
        self.module.train(train)
        loss, output = self.module(*[feeds[name] for name in self.input_names])
        return float(loss), output

    def train_step(self, feeds: Dict[str, np.ndarray], lr: float) -> Tuple[float, np.ndarray]:
        """Forward, backward and one optimizer update; returns (loss, model output) before the update."""
        loss, output = self._call(True, feeds)
        if np.isfinite(loss):  # a non-finite step must not poison the weights the caller may keep
            self.optimizer.set_learning_rate(lr)
            self.optimizer.step()
        self.module.lazy_reset_grad()
        return loss, output

    def eval_step(self, feeds: Dict[str, np.ndarray]) -> Tuple[float, np.ndarray]:
        return self._call(False, feeds)

    def weights(self) -> Dict[str, np.ndarray]:
        """Current values of the trainable weights (copies)."""
        params = self.state.parameters
        return {name: np.array(params[name].data, copy=True) for name in self.trainable}

    def load_weights(self, values: Dict[str, np.ndarray]) -> None:
        params = self.state.parameters
        for name, value in values.items():
            params[name] = value

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_reason(exc: Exception) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    if "Could not find an implementation for" in text:
        op = text.split("Could not find an implementation for")[-1].split("(")[0].strip()
        return (f"onnxruntime-training has no CPU kernel for {op}"
                + (" (the gradient of Resize: only nearest resizing by integer factors trains)" if op == "ResizeGrad" else ""))
    if "gradient builder has not been registered" in text:
        op = text.split("registered:")[-1].split(" for node")[0].strip()
        return (f"op {op} has no gradient in onnxruntime-training and graphprune has no differentiable "
                f"stand-in for it")
    return reason[-300:]


def _cap_ir_version(path: str) -> None:
    """Relabel an artifact written by a newer onnx with an IR version onnxruntime 1.19 loads."""
    model = onnx.load(path)
    if model.ir_version > ORT_MAX_IR_VERSION:
        onnx.save(for_ort(model), path)
