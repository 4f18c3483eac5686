"""The training graph (masks, loss) and the session that trains it on plain onnxruntime.

``build_training_graph`` turns an inference model into the forward graph to differentiate (what feeds
the trained output, masked weights, the loss); ``TrainingSession`` builds graphprune's training-step
model from it (``graphprune.autodiff``) and runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune import ir
from graphprune.errors import UserError
from graphprune.autodiff.optimizers import OptimizerConfig
from graphprune.autodiff.session import StepSession
from graphprune.autodiff.step import build_training_step
from graphprune.model_io import default_opset, for_ort
from graphprune.training.losses import LOSS_NAME, LossSpec, add_loss_graph
from graphprune.training.masks import mask_weights_in_graph
from graphprune.training.qdq import unfold_quantized_weights
from graphprune.training.trainable import TrainableWeights, constants_to_initializers, find_trainable

__all__ = ["TrainingGraph", "prepare_for_training", "build_training_graph", "TrainingSession", "tensor_shapes"]

# Gradient graphs use opset-13 forms (reduction and Squeeze/Unsqueeze axes as inputs); older models
# train on a converted copy and their weights go back to the original.
_MIN_TRAINING_OPSET = 13


@dataclasses.dataclass
class TrainingGraph:
    """The forward graph to differentiate and what was done to make it."""

    model: onnx.ModelProto
    trainable: List[str]
    masked: List[str]


def prepare_for_training(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, TrainableWeights]:
    """A copy of ``model`` with weights as initializers, and its trainable weights.

    Float ``Constant`` nodes become initializers; int8 weights of a QDQ model become float weights
    behind a QuantizeLinear (``training.qdq``, quantization-aware fine-tuning); old-style graphs (IR < 4) stop listing initializers
    as inputs; opsets below 13 are converted to 13 (the form gradient graphs are written in).  Raises
    ``UserError`` when nothing is trainable.
    """
    work = ir.clone(for_ort(model))
    opset = default_opset(work)
    if opset is not None and opset < _MIN_TRAINING_OPSET:
        work = _converted(work, opset)
    converted = constants_to_initializers(work.graph)
    _annotate_reshape_ranks(work)
    fake_quant = unfold_quantized_weights(work.graph)
    inits = {init.name for init in work.graph.initializer}
    kept_inputs = [vi for vi in work.graph.input if vi.name not in inits]
    del work.graph.input[:]
    work.graph.input.extend(kept_inputs)
    work.ir_version = max(work.ir_version, 4)
    trainable = find_trainable(work.graph, converted)
    trainable.fake_quant = {name: record for name, record in fake_quant.items() if name in set(trainable.names)}
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


def _annotate_reshape_ranks(model: onnx.ModelProto, rounds: int = 8) -> None:
    """Record the rank of Reshape outputs whose target is computed at run time (in place).

    onnx shape inference gives up on ``Reshape(x, Concat(Shape(x)[0], -1))`` (Paddle's flatten before
    a classifier's MatMul), yet the target's length is the output's rank, and the gradient rules need
    ranks.  Each round adds the ranks found, so inference can carry them to the next Reshape.
    """
    from graphprune.shapes import infer_shapes

    for _ in range(rounds):
        try:
            inferred = infer_shapes(model).graph
        except Exception:  # inference gaps only cost the annotation
            return
        known = {vi.name: vi for vi in list(inferred.input) + list(inferred.value_info) + list(inferred.output)}
        known.update({init.name: init for init in inferred.initializer})
        added = 0
        for node in model.graph.node:
            if node.op_type != "Reshape" or len(node.input) < 2:
                continue
            out = known.get(node.output[0])
            if out is not None and out.type.tensor_type.HasField("shape"):
                continue
            target = known.get(node.input[1])
            length = (list(target.dims) if isinstance(target, onnx.TensorProto)
                      else ir.value_shape(target) if target is not None else None)
            data = known.get(node.input[0])
            if not length or len(length) != 1 or not isinstance(length[0], int) or data is None:
                continue
            elem = data.data_type if isinstance(data, onnx.TensorProto) else data.type.tensor_type.elem_type
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(node.output[0], elem, [None] * length[0]))
            added += 1
        if not added:
            return


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


def build_training_graph(
    work: onnx.ModelProto,
    trainable: Sequence[str],
    spec: LossSpec,
    masks: Dict[str, np.ndarray],
) -> TrainingGraph:
    """The forward training graph of a model prepared by ``prepare_for_training``.

    Only what feeds ``spec.output`` is kept; masked weights are multiplied by their masks; the loss
    is the first output.  Every dim of the inputs stays as the model declares it (batch, sequence and
    image sizes may be dynamic).
    """
    model = ir.clone(work)
    graph = model.graph
    opset = default_opset(model) or 1
    outputs = {vi.name: vi for vi in graph.output}
    if spec.output in outputs:
        output_vi = outputs[spec.output]
    elif any(spec.output in node.output for node in graph.node):  # the logits before a probability head
        output_vi = _value_info(model, spec.output)
    else:
        raise UserError(f"model has no output {spec.output!r} (outputs: {', '.join(outputs)})")
    _keep_needed(graph, [spec.output])
    present = {init.name for init in graph.initializer}
    trainable = [name for name in trainable if name in present]
    if not trainable:
        raise UserError(f"no trainable weight feeds output {spec.output!r}")
    masked = mask_weights_in_graph(graph, {n: m for n, m in masks.items() if n in trainable})
    add_loss_graph(graph, spec, output_vi, opset)
    return TrainingGraph(model, trainable, masked)


def _value_info(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    """The inferred type and shape of an intermediate tensor (a float tensor of unknown shape if none)."""
    from graphprune.shapes import infer_shapes

    try:
        for vi in infer_shapes(model).graph.value_info:
            if vi.name == name:
                return vi
    except Exception:  # inference gaps only cost the shape annotation
        pass
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


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
    """A training graph's step on plain onnxruntime: graphprune's own gradient graph and optimizer.

    The forward graph, the loss, the gradients (``graphprune.autodiff``) and the optimizer update are
    one ONNX model run by an ``InferenceSession``; the weights stay in onnxruntime buffers between
    steps.

    Args:
        graph: from ``build_training_graph``.
        optimizer: "adamw" or "sgd" (momentum 0.9).
        weight_decay: decoupled weight decay of AdamW (L2 coefficient for SGD).
        clip_grad_norm: clip the global gradient norm to this value (None: no clipping).
        threads: intra-op threads (None lets onnxruntime decide).
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(self, graph: TrainingGraph, optimizer: str = "adamw", weight_decay: float = 0.0,
                 clip_grad_norm: Optional[float] = None, threads: Optional[int] = None,
                 providers: Optional[Sequence] = None):
        config = OptimizerConfig(kind=optimizer, weight_decay=weight_decay, clip_grad_norm=clip_grad_norm,
                                 momentum=0.9 if optimizer == "sgd" else 0.0)
        self.step = build_training_step(graph.model, LOSS_NAME, graph.trainable, config)
        self._session = StepSession(self.step, providers=providers, threads=threads)
        self.trainable = list(self.step.weights)

    def train_step(self, feeds: Dict[str, np.ndarray], lr: float) -> Tuple[float, np.ndarray]:
        """Forward, backward and one optimizer update; returns (loss, model output) before the update.

        A non-finite loss leaves the weights as they were (the caller reports it)."""
        return self._session.train_step(feeds, lr)

    def eval_step(self, feeds: Dict[str, np.ndarray]) -> Tuple[float, np.ndarray]:
        return self._session.eval_step(feeds)

    def weights(self) -> Dict[str, np.ndarray]:
        """Current values of the trainable weights (copies)."""
        return self._session.weights()

    def load_weights(self, values: Dict[str, np.ndarray]) -> None:
        self._session.load_weights(values)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
