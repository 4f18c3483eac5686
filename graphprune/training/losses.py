"""Losses written as ONNX nodes on the model output, and the per-batch target arrays they read.

  - ``ce``: cross-entropy with integer labels (classes on the last axis: [N, C] logits with [N] labels,
    [N, T, V] token logits with [N, T] labels).  Fed as one-hot targets, so it works on every opset.
  - ``mse``: mean squared error against float targets shaped like the output (regression outputs).
  - distillation ``kl``: KL(teacher || student) on temperature-softened logits, scaled by T^2 (Hinton
    et al.), fed as the teacher's softened probabilities; ``mse``: MSE against the teacher outputs;
    ``bce``: binary cross-entropy of sigmoid logits against the teacher's probabilities.
With labels and a teacher, loss = (1 - w) * label loss + w * distillation loss.
Feature distillation (``training.features``) adds, for each matched intermediate tensor f,
``feature_weight / k * MSE(f, teacher f) / mean(teacher f ** 2)`` (k features; relative, so that
features of any magnitude weigh alike).

Outputs that are already probabilities (a model ending in Softmax or Sigmoid) are trained on the
logits that feed that head (``head``): cross-entropy and KL then see real logits (a KL on
probabilities is nearly flat), and a sigmoid map gets a per-element binary cross-entropy instead of a
softmax over its width.  Class scores are recognised by a Softmax head or a ``[N, C]`` output; any
other shape (maps, sequences without a softmax) is distilled with MSE.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.errors import UserError
from graphprune.training.features import FEATURE_PREFIX

__all__ = ["LossSpec", "resolve_loss", "add_loss_graph", "BatchTargets", "LOSS_NAME", "sample_chunks"]

LOSS_NAME = "graphprune.train/loss"
_TARGETS = "graphprune.train/targets"
_TEACHER = "graphprune.train/teacher"
_PREFIX = "graphprune.train/loss_"


@dataclasses.dataclass
class LossSpec:
    """What the training loss is made of.

    Attributes:
        output: the model output the loss reads.
        label_loss: "ce", "mse", "bce" (sigmoid heads) or None (no labels).
        distill_loss: "kl", "mse", "bce" (sigmoid heads) or None (no teacher).
        distill_weight: w in (1 - w) * label loss + w * distillation loss.
        temperature: softening temperature of the ``kl`` distillation.
        head: "softmax" or "sigmoid" when ``output`` holds the logits feeding that head, else None.
        features: intermediate tensors matched to the teacher's (fed as ``FEATURE_PREFIX + i``).
        feature_ranks, feature_scales: their ranks and the teacher's mean squares.
        feature_weight: the weight of all feature terms together.
    """

    output: str
    label_loss: Optional[str]
    distill_loss: Optional[str]
    distill_weight: float
    temperature: float
    head: Optional[str] = None
    features: List[str] = dataclasses.field(default_factory=list)
    feature_ranks: List[int] = dataclasses.field(default_factory=list)
    feature_scales: List[float] = dataclasses.field(default_factory=list)
    feature_weight: float = 1.0

    def describe(self) -> str:
        parts = []
        if self.label_loss:
            parts.append(f"{self.label_loss} on labels")
        if self.distill_loss:
            detail = f", T={self.temperature:g}" if self.distill_loss == "kl" else ""
            parts.append(f"{self.distill_loss} distillation{detail}")
        text = (f"{1 - self.distill_weight:g} x {parts[0]} + {self.distill_weight:g} x {parts[1]}"
                if len(parts) == 2 else parts[0])
        text += f" (on the logits of the {self.head} head)" if self.head else ""
        if self.features:
            text += f" + {self.feature_weight:g} x relative MSE on {len(self.features)} intermediate features"
        return text


def resolve_loss(
    output_shape: tuple,
    output: str,
    labels: Optional[np.ndarray],
    samples: int,
    has_teacher: bool,
    loss: str = "auto",
    distill_loss: str = "auto",
    distill_weight: Optional[float] = None,
    temperature: float = 2.0,
    head: Optional[str] = None,
) -> LossSpec:
    """Pick and check the losses for an output of shape ``output_shape`` (one sample batch).

    ``head`` says ``output`` is the logits of a Softmax (last axis) or Sigmoid head (see the module).
    Raises ``UserError`` for labels of the wrong length, dtype or shape, and for class labels out of range.
    """
    label_loss = None
    if labels is not None:
        label_loss = _label_loss(output_shape, output, labels, samples, loss)
        if head == "sigmoid" and label_loss == "mse" and loss == "auto":
            label_loss = "bce"  # float targets of a sigmoid head are probabilities
    distill = None
    if has_teacher:
        classes_like = head == "softmax" or (head is None and len(output_shape) == 2 and output_shape[-1] > 1)
        auto = "kl" if classes_like else ("bce" if head == "sigmoid" else "mse")
        distill = distill_loss if distill_loss != "auto" else auto
        if distill not in ("kl", "mse", "bce"):
            raise UserError(f"distillation loss {distill_loss!r}: choose kl, mse, bce or auto")
        if distill == "bce" and head != "sigmoid":
            raise UserError(f"output {output!r} does not come from a Sigmoid: bce distillation needs one")
        if distill == "kl" and not classes_like:
            raise UserError(f"output {output!r} has shape {_shape(output_shape)}: KL distillation needs class scores on the last axis")
    if label_loss is None and distill is None:
        raise UserError("fine-tuning needs labels or a teacher model (distillation) to learn from")
    if distill_weight is None:
        distill_weight = 0.5 if label_loss and distill else (1.0 if distill else 0.0)
    if not 0.0 <= distill_weight <= 1.0:
        raise UserError(f"distillation weight {distill_weight} is outside [0, 1]")
    if not temperature > 0:
        raise UserError(f"temperature {temperature} must be positive")
    return LossSpec(output, label_loss, distill, float(distill_weight), float(temperature), head)


def _shape(shape: tuple) -> str:
    """A batch shape with the sample axis shown as N (the probe batch size is arbitrary)."""
    return "[" + ", ".join(["N"] + [str(d) for d in shape[1:]]) + "]" if shape else "[]"


def _label_loss(output_shape: tuple, output: str, labels: np.ndarray, samples: int, loss: str) -> str:
    if len(labels) != samples:
        raise UserError(f"labels: {len(labels)} labels for {samples} samples")
    if np.issubdtype(labels.dtype, np.integer):
        kind = "ce" if loss == "auto" else loss
    elif np.issubdtype(labels.dtype, np.floating):
        kind = "mse" if loss == "auto" else loss
    else:
        raise UserError(f"labels have dtype {labels.dtype}: use integer class ids or float targets")
    if kind == "ce":
        if not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"cross-entropy needs integer class labels, got dtype {labels.dtype}")
        if len(output_shape) < 2 or tuple(labels.shape[1:]) != tuple(output_shape[1:-1]):
            raise UserError(
                f"labels of shape {list(labels.shape)} do not fit output {output!r} of shape "
                f"{_shape(output_shape)} (class ids need shape {_shape(output_shape[:-1])})"
            )
        classes = output_shape[-1]
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise UserError(f"labels range over [{labels.min()}, {labels.max()}] but output {output!r} has {classes} classes")
    elif kind == "mse":
        if not np.issubdtype(labels.dtype, np.floating):
            raise UserError(f"mse needs float targets, got labels of dtype {labels.dtype}")
        if tuple(labels.shape[1:]) != tuple(output_shape[1:]):
            raise UserError(f"float targets of shape {list(labels.shape)} do not fit output {output!r} of shape {_shape(output_shape)}")
    else:
        raise UserError(f"loss {loss!r}: choose ce, mse or auto")
    return kind


class _Nodes:
    """Appends loss nodes to a graph with opset-dependent forms (ReduceSum axes)."""

    def __init__(self, graph: onnx.GraphProto, opset: int):
        self.graph, self.opset, self.count = graph, opset, 0

    def op(self, op_type: str, *inputs: str, out: str = "", **attrs) -> str:
        self.count += 1
        out = out or f"{_PREFIX}{op_type.lower()}{self.count}"
        self.graph.node.append(helper.make_node(op_type, list(inputs), [out], name=f"{_PREFIX}n{self.count}", **attrs))
        return out

    def const(self, value: float) -> str:
        self.count += 1
        name = f"{_PREFIX}c{self.count}"
        self.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    def sum_last_axis(self, x: str) -> str:
        if self.opset < 13:
            return self.op("ReduceSum", x, axes=[-1], keepdims=0)
        self.count += 1
        axes = f"{_PREFIX}axes{self.count}"
        self.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
        return self.op("ReduceSum", x, axes, keepdims=0)

    def mean_all(self, x: str) -> str:
        return self.op("ReduceMean", x, keepdims=0)

    def soft_cross_entropy(self, logits: str, targets: str) -> str:
        """-mean over rows of sum_c targets * log_softmax(logits) (classes on the last axis)."""
        log_probs = self.op("LogSoftmax", logits, axis=-1)
        return self.op("Neg", self.mean_all(self.sum_last_axis(self.op("Mul", targets, log_probs))))

    def bce_with_logits(self, logits: str, targets: str) -> str:
        """mean of softplus(z) - p * z: binary cross-entropy of sigmoid(z) against probabilities p
        (minus p's own entropy, added back by ``BatchTargets.loss_offset``)."""
        return self.mean_all(self.op("Sub", self.op("Softplus", logits), self.op("Mul", targets, logits)))

    def mse(self, x: str, targets: str) -> str:
        diff = self.op("Sub", x, targets)
        return self.mean_all(self.op("Mul", diff, diff))


def add_loss_graph(graph: onnx.GraphProto, spec: LossSpec, output_vi: onnx.ValueInfoProto, opset: int) -> None:
    """Add the loss nodes and target inputs; the graph outputs become [loss, spec.output] (in place)."""
    nodes = _Nodes(graph, opset)
    float_like = onnx.ValueInfoProto()
    float_like.CopyFrom(output_vi)
    dims = float_like.type.tensor_type.shape.dim
    # Targets come in batches of any size.  A symbolic batch dim keeps the output's name: the two
    # then count as equal, so the loss's gradient needs no run-time broadcast reduction over it.
    if len(dims) and not dims[0].dim_param:
        dims[0].Clear()
        dims[0].dim_param = "graphprune_batch"
    float_like.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    terms: List[tuple] = []
    if spec.label_loss:
        graph.input.append(_renamed(float_like, _TARGETS))
        term = (nodes.soft_cross_entropy(spec.output, _TARGETS) if spec.label_loss == "ce"
                else nodes.bce_with_logits(spec.output, _TARGETS) if spec.label_loss == "bce"
                else nodes.mse(spec.output, _TARGETS))
        terms.append((term, 1.0 - spec.distill_weight if spec.distill_loss else 1.0))
    if spec.distill_loss:
        graph.input.append(_renamed(float_like, _TEACHER))
        if spec.distill_loss == "kl":
            softened = nodes.op("Div", spec.output, nodes.const(spec.temperature))
            term = nodes.op("Mul", nodes.soft_cross_entropy(softened, _TEACHER), nodes.const(spec.temperature**2))
        elif spec.distill_loss == "bce":
            term = nodes.bce_with_logits(spec.output, _TEACHER)
        else:
            term = nodes.mse(spec.output, _TEACHER)
        terms.append((term, spec.distill_weight if spec.label_loss else 1.0))
    for i, (name, rank, scale) in enumerate(zip(spec.features, spec.feature_ranks, spec.feature_scales)):
        feed = f"{FEATURE_PREFIX}{i}"
        graph.input.append(helper.make_tensor_value_info(feed, onnx.TensorProto.FLOAT, [None] * rank))
        terms.append((nodes.mse(name, feed), spec.feature_weight / (len(spec.features) * scale)))
    weighted = [t if w == 1.0 else nodes.op("Mul", t, nodes.const(w)) for t, w in terms]
    if len(weighted) == 1:
        nodes.op("Identity", weighted[0], out=LOSS_NAME)
    else:
        total = weighted[0]
        for term in weighted[1:-1]:
            total = nodes.op("Add", total, term)
        nodes.op("Add", total, weighted[-1], out=LOSS_NAME)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(LOSS_NAME, onnx.TensorProto.FLOAT, []), output_vi])


def _renamed(vi: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(vi)
    copy.name = name
    return copy


# Elements per chunk of the per-sample float64 work on teacher outputs (32 MB).
_CHUNK_ELEMENTS = 1 << 22


def sample_chunks(values: np.ndarray):
    """Slices of ``values``' samples (axis 0) of about ``_CHUNK_ELEMENTS`` elements each (one sample at least)."""
    per_sample = max(int(np.prod(values.shape[1:], dtype=np.int64)), 1)
    step = max(_CHUNK_ELEMENTS // per_sample, 1)
    return [slice(i, i + step) for i in range(0, len(values), step)]


class BatchTargets:
    """Builds the target feeds of a batch (one-hot labels, softened teacher outputs) from sample indices.

    Teacher probabilities are computed once for all samples; the constant part of the KL
    (sum p log p) is kept per sample so the reported distillation loss is the true KL (>= 0).  With
    ``overwrite`` the KL probabilities are written over a float32 ``teacher`` (no second copy).
    """

    def __init__(self, spec: LossSpec, labels: Optional[np.ndarray], teacher: Optional[np.ndarray], classes: int,
                 overwrite: bool = False):
        self.spec = spec
        self.labels = labels
        self.classes = classes
        self.teacher = None
        self.teacher_plogp = None
        if spec.distill_loss == "kl":
            # Chunk by chunk of samples: the float64 temporaries of the whole set at once were ~10x the
            # teacher's outputs (the PP-OCRv3 recognizer's [2000, 40, 6625]: 21 GB of RSS).
            # overwrite: the probabilities replace a float32 ``teacher`` the caller no longer needs
            in_place = overwrite and teacher.dtype == np.float32
            self.teacher = teacher if in_place else np.empty(teacher.shape, np.float32)
            self.teacher_plogp = np.empty(len(teacher), np.float64)
            for part in sample_chunks(teacher):
                z = teacher[part].astype(np.float64) / spec.temperature
                z -= z.max(axis=-1, keepdims=True)
                log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
                p = np.exp(log_p)
                self.teacher[part] = p
                per_row = (p * log_p).sum(axis=-1)
                self.teacher_plogp[part] = per_row.reshape(len(per_row), -1).mean(axis=1)  # mean over a sample's rows
        elif spec.distill_loss == "bce":  # teacher probabilities; their entropy is the KL's constant part
            self.teacher = teacher.astype(np.float32, copy=False)
            self.teacher_plogp = np.empty(len(teacher), np.float64)
            for part in sample_chunks(teacher):
                p = np.clip(teacher[part].astype(np.float64), 1e-12, 1 - 1e-12)
                entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
                self.teacher_plogp[part] = -entropy.reshape(len(entropy), -1).mean(axis=1)
        elif spec.distill_loss == "mse":
            self.teacher = teacher.astype(np.float32, copy=False)

    def feeds(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
        out: Dict[str, np.ndarray] = {}
        if self.spec.label_loss == "ce":
            out[_TARGETS] = np.eye(self.classes, dtype=np.float32)[self.labels[indices]]
        elif self.spec.label_loss in ("mse", "bce"):
            out[_TARGETS] = self.labels[indices].astype(np.float32)
        if self.spec.distill_loss:
            out[_TEACHER] = self.teacher[indices]
        return out

    def loss_offset(self, indices: np.ndarray) -> float:
        """What to add to the graph's loss so the KL term reads as KL rather than cross-entropy."""
        if self.teacher_plogp is None:
            return 0.0
        weight = self.spec.distill_weight if self.spec.label_loss else 1.0
        scale = self.spec.temperature**2 if self.spec.distill_loss == "kl" else 1.0
        return float(weight * scale * self.teacher_plogp[indices].mean())
