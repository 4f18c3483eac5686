"""Feature distillation: intermediate tensors a pruned model shares with its original, matched while training.

Channel pruning keeps tensor names, and keeps the width of every tensor whose channels were not
removed (the outputs of residual stages whose group was left whole, the pooled features, a
recognizer's sequence features...).  Where such a tensor differs from the original's on the same
input, pruning changed it, and matching it to the original's value gives each stage a direct
target instead of one that reaches it only through the rest of the network: the training signal
that lets a heavily pruned network recover from a few thousand unlabelled samples.

``pick_features`` finds the candidates on a probe batch and keeps a few spread along the graph;
``FeatureTeacher`` computes the original's values batch by batch (memory stays bounded by one
batch, whatever the number of samples).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx

from graphprune import ir

__all__ = ["pick_features", "FeatureTeacher", "FEATURE_PREFIX"]

FEATURE_PREFIX = "graphprune.train/feature_"
# A tensor whose relative change is below this is left as pruning found it (nothing to recover).
_CHANGED = 1e-4
# Tensors too small to describe a stage (shapes, scalars, per-channel statistics).
_MIN_ELEMENTS_PER_SAMPLE = 16
# Ops whose output is only a view of its input: the tensor they read is the feature to match.
_VIEW_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"}
# Insides of a decomposed LayerNorm (x - mean, its square, the std): statistics, not a stage's output
# (the PP-OCR recognizer's SVTR blocks gave Sub and Sqrt tensors as "features").
_STATISTIC_OPS = {"Sub", "Pow", "Sqrt", "Reciprocal", "ReduceMean", "ReduceSum"}


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    copy = ir.clone(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy


def _float_node_outputs(model: onnx.ModelProto) -> List[str]:
    """Node outputs in graph order, without Constant nodes, views and normalization statistics."""
    names = []
    for node in model.graph.node:
        if (node.op_type == "Constant" or node.op_type in _VIEW_OPS or node.op_type in _STATISTIC_OPS
                or node.domain not in ("", "ai.onnx")):
            continue
        names.extend(o for o in node.output if o)
    return names


def pick_features(student: onnx.ModelProto, teacher: onnx.ModelProto, probe: Dict[str, np.ndarray],
                  exclude: Sequence[str] = (), limit: int = 4, threads: Optional[int] = None) -> List[str]:
    """Up to ``limit`` tensors to match: in both graphs, float, the same shape on ``probe``, and changed
    by pruning; spread evenly along the student's graph order (the last candidate of each stretch).

    ``exclude``: tensors the output loss already trains (the output and its logits).
    """
    from graphprune.runtime import make_session

    teacher_names = set(_float_node_outputs(teacher))
    outputs = {o.name for o in student.graph.output} | set(exclude)
    common = [n for n in _float_node_outputs(student) if n in teacher_names and n not in outputs]
    if not common or limit <= 0:
        return []
    values = []
    for model in (student, teacher):
        session = make_session(_with_outputs(model, common), threads=threads)
        wanted = [o.name for o in session.get_outputs() if o.name in set(common)]
        values.append(dict(zip(wanted, session.run(wanted, probe))))
    s_values, t_values = values
    batch = len(next(iter(probe.values())))
    kept = []
    for name in common:
        s, t = s_values.get(name), t_values.get(name)
        if s is None or t is None or s.dtype != np.float32 or s.shape != t.shape or s.size < batch * _MIN_ELEMENTS_PER_SAMPLE:
            continue
        scale = float(np.sqrt(np.mean(t.astype(np.float64) ** 2))) or 1.0
        if float(np.sqrt(np.mean((s.astype(np.float64) - t) ** 2))) / scale > _CHANGED:
            kept.append(name)
    if len(kept) <= limit:
        return kept
    # The last tensor of each of ``limit`` equal stretches: a stage's output rather than its inside.
    bounds = np.linspace(0, len(kept), limit + 1).astype(int)
    return [kept[b - 1] for b in bounds[1:]]


class FeatureTeacher:
    """The original's values of the chosen features, per batch, with a scale for each feature.

    Args:
        teacher: the original model.
        names: the features (from ``pick_features``).
        probe: a batch whose mean square sets each feature's scale (losses are relative: a feature
            with large activations does not drown the others).
    """

    def __init__(self, teacher: onnx.ModelProto, names: Sequence[str], probe: Dict[str, np.ndarray],
                 threads: Optional[int] = None):
        from graphprune.runtime import make_session

        self.names = list(names)
        self.feed_names = [f"{FEATURE_PREFIX}{i}" for i in range(len(self.names))]
        self._session = make_session(_with_outputs(teacher, self.names), threads=threads)
        first = self._session.run(self.names, probe)
        self.ranks = [v.ndim for v in first]
        self.scales = [float(np.mean(v.astype(np.float64) ** 2)) or 1.0 for v in first]

    def feeds(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        values = self._session.run(self.names, inputs)
        return {feed: v.astype(np.float32) for feed, v in zip(self.feed_names, values)}
