"""Training through BatchNorm folded into its Conv, and writing the trained values back unfolded.

With statistics frozen, inference-mode BatchNorm multiplies each channel of the Conv before it by
``s = gamma / sqrt(var + eps)``.  Trained as they are stored, the Conv weights see that gain twice:
the gradient is ``s`` times larger and every change of ``W`` moves the output ``s`` times more.
Trained PP-OCR recognizers hold channels with running variance ~1e-5, so ``s`` reaches 180-627: no
learning rate is small enough for them and right for the rest (AdamW at lr 1e-5 already raised the
validation loss 0.19 -> 0.48).  Trained in the folded form ``W' = s W``, ``b' = s (b - mean) + beta``
(what inference computes, as one Conv), a step changes the output by what it changes the weight.
The folded weights are divided by the layer's median gain ``m`` (multiplied back after the Conv):
the median channel then trains as it did unfolded and only the outliers stop amplifying, where the
plain fold would also slow every layer whose typical gain is above 1 (the digits CNN's are 2-7).

The trained values go back into the input's form: ``W = W' / s`` and the BatchNorm's bias absorbs
the new Conv bias (``beta = b' - s (b - mean)``), the Conv bias, gamma and the statistics unchanged;
the written model keeps its graph, and computes what the trained folded graph computed.

Folded: an inference-mode BatchNorm (statistics and affine stored) right after a ``Conv`` whose output
only it reads, the Conv weight a trainable float initializer used by that Conv alone, every ``s``
finite and non-zero (a zero gain cannot be undone).  Others (ConvTranspose, QDQ weights, shared
weights, training-mode BatchNorm) train as before.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune import ir
from graphprune.training.trainable import TrainableWeights

__all__ = ["FoldedBatchNorm", "FoldRecord", "fold_batchnorms", "unfold_values"]

_PREFIX = "/graphprune_folded_"


@dataclasses.dataclass
class FoldedBatchNorm:
    """One BatchNorm folded into its Conv: the names and the values needed to unfold."""

    weight: str  # the Conv weight (trained as ``W * s / m``)
    bias: str  # the folded bias ``s (b - mean) + beta`` trained in the step graph (shape [C, 1, ...])
    beta: str  # the BatchNorm bias that takes the trained bias back
    gain: np.ndarray  # s / m, per output channel
    shift: np.ndarray  # s * (b - mean): the folded bias minus beta


@dataclasses.dataclass
class FoldRecord:
    """What ``fold_batchnorms`` did: the folds and the tensors that no longer exist in the graph."""

    folds: List[FoldedBatchNorm]
    removed_tensors: List[str]  # the Conv outputs the BatchNorms read (features cannot be matched there)

    @property
    def trained_names(self) -> List[str]:
        return [n for f in self.folds for n in (f.weight, f.bias)]


def _foldable(bn: onnx.NodeProto, producers, consumers, values, trainable: set) -> Optional[Tuple]:
    """(conv, s, W, b, gamma, beta, mean) when ``bn`` folds into the Conv before it, else None."""
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.input) != 5:
        return None
    if any(bn.output[1:]) or ir.get_attr(bn, "training_mode", 0):
        return None
    conv = producers.get(bn.input[0])
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
        return None
    if len(consumers.get(conv.output[0], [])) != 1 or conv.input[1] not in trainable:
        return None
    if len(consumers.get(conv.input[1], [])) != 1 or not all(n in values for n in bn.input[1:]):
        return None
    bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
    if bias is not None and (bias not in values or len(consumers.get(bias, [])) != 1):
        return None
    if any(len(consumers.get(n, [])) != 1 for n in bn.input[1:3]):
        return None  # a gamma/beta shared with another node cannot take this layer's bias alone
    gamma, beta, mean, var = (values[n].astype(np.float64) for n in bn.input[1:])
    s = gamma / np.sqrt(var + float(ir.get_attr(bn, "epsilon", 1e-5)))
    weight = values[conv.input[1]]
    if s.ndim != 1 or s.shape[0] != weight.shape[0] or not np.all(np.isfinite(s)) or np.any(np.abs(s) < 1e-30):
        return None
    b = values[bias].astype(np.float64) if bias is not None else np.zeros_like(s)
    return conv, s, weight, b, beta, mean


def fold_batchnorms(model: onnx.ModelProto, trainable: TrainableWeights) -> FoldRecord:
    """Fold every foldable BatchNorm of ``model`` (a ``prepare_for_training`` copy: weights are
    initializers) into its Conv, in place; ``trainable`` is updated to train the folded weights.

    Conv + BatchNorm becomes ``Conv(x, W * s / m) * m + b'`` (``m``: the layer's median ``|s|``, a
    constant): within a layer every channel then moves the output per step as the median channel
    did, while the layer's steps keep their size (plain ``s W`` would shrink them by ``m``)."""
    graph = model.graph
    inits = {init.name: i for i, init in enumerate(graph.initializer)}
    values = {name: numpy_helper.to_array(graph.initializer[i]) for name, i in inits.items()}
    producers = ir.producer_map(graph)
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for out in graph.output:  # a graph output is read outside: it must keep its value
        consumers.setdefault(out.name, []).append(None)
    names = set(trainable.names) - set(trainable.fake_quant)
    folds, removed, dropped, nodes = [], [], [], {}
    for bn in list(graph.node):
        found = _foldable(bn, producers, consumers, values, names)
        if found is None:
            continue
        conv, s, weight, b, beta, mean = found
        m = float(np.median(np.abs(s)))
        gain = s / m
        shift = s * (b - mean)
        spatial = (1,) * (weight.ndim - 2)
        scaled = (weight.astype(np.float64) * gain.reshape((-1, 1) + spatial)).astype(np.float32)
        graph.initializer[inits[conv.input[1]]].CopyFrom(numpy_helper.from_array(scaled, conv.input[1]))
        out, prefix = bn.output[0], bn.output[0] + _PREFIX
        bias = (shift + beta).astype(np.float32).reshape((-1,) + spatial)
        graph.initializer.extend([numpy_helper.from_array(bias, prefix + "bias"),
                                  numpy_helper.from_array(np.array(m, np.float32), prefix + "median_gain")])
        if len(conv.input) > 2 and conv.input[2]:
            dropped.append(conv.input[2])  # its value is in the folded bias now
            del conv.input[2]
        removed.append(conv.output[0])
        conv.output[0] = prefix + "conv"
        nodes[id(bn)] = [onnx.helper.make_node("Mul", [prefix + "conv", prefix + "median_gain"], [prefix + "scaled"],
                                               name=prefix + "mul"),
                         onnx.helper.make_node("Add", [prefix + "scaled", prefix + "bias"], [out], name=prefix + "add")]
        dropped.extend(n for n in bn.input[1:] if len(consumers.get(n, [])) == 1)
        folds.append(FoldedBatchNorm(conv.input[1], prefix + "bias", bn.input[2], gain, shift))
    kept = []
    for node in graph.node:
        kept.extend(nodes.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(kept)
    _drop_initializers(graph, set(dropped))
    gone = set(dropped)
    trainable.names = [n for n in trainable.names if n not in gone] + [f.bias for f in folds]
    trainable.in_constant_nodes = [n for n in trainable.in_constant_nodes if n not in gone]
    return FoldRecord(folds, removed)


def _drop_initializers(graph: onnx.GraphProto, names: set) -> None:
    """Remove the statistics and affine of the folded BatchNorms (nothing reads them any more)."""
    kept = [init for init in graph.initializer if init.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    kept_vi = [vi for vi in graph.value_info if vi.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept_vi)


def unfold_values(trained: Dict[str, np.ndarray], record: FoldRecord) -> Dict[str, np.ndarray]:
    """The trained values in the input model's form: folded weights divided by their gain, folded
    biases moved into the BatchNorm bias; every other name as it is."""
    result = dict(trained)
    for fold in record.folds:
        if fold.weight in result:
            w = result[fold.weight].astype(np.float64)
            result[fold.weight] = (w / fold.gain.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        if fold.bias in result:
            folded_bias = result.pop(fold.bias).astype(np.float64).reshape(-1)
            result[fold.beta] = (folded_bias - fold.shift).astype(np.float32)
    return result
