"""``--criterion output``: a channel's importance is the error its removal causes in the next layers' outputs.

For a linear consumer ``y = W x`` (Conv, Gemm, MatMul with a constant weight), deleting input
channel ``c`` changes the output by ``W[:, c] x_c``, whose expected squared norm is
``||W[:, c]||^2 * E[x_c^2]`` when the channels are uncorrelated (the first-order output error: the
Wanda / OBD-diagonal form).  The score of a group's channel is that error at every consumer the
group feeds, each consumer normalized to mean 1 (as every criterion aggregates members) so one
wide layer does not drown the rest.  Unlike weight magnitude it sees the data: a channel with
large weights that is almost always zero costs nothing; unlike mean |activation| it sees how much
the consumer amplifies the channel.  Groups without such a consumer fall back to ``l2``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx

from graphprune import ir
from graphprune.data import InputSet
from graphprune.dependency import DimKey, Group
from graphprune.progress import progress_bar

__all__ = ["output_error_stats", "consumer_dims"]


def _consumer(node: onnx.NodeProto, weight_ndim: int) -> Optional[Tuple[int, int]]:
    """(weight input axis, activation channel axis) of a linear consumer, or None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Conv" and int(ir.get_attr(node, "group", 1)) == 1:
        return 1, 1
    if node.op_type == "Gemm" and weight_ndim == 2 and not ir.get_attr(node, "transA", 0):
        return (1 if ir.get_attr(node, "transB", 0) else 0), -1
    if node.op_type == "MatMul" and weight_ndim == 2:
        return 0, -1
    return None


def consumer_dims(model: onnx.ModelProto, groups: List[Group]) -> Dict[DimKey, Tuple[str, int]]:
    """Weight dim (input axis of a linear consumer, a member of a group) -> (activation, channel axis)."""
    shapes = {i.name: len(i.dims) for i in model.graph.initializer}
    shapes.update({n.output[0]: len(ir.constant_node_value(n).shape) for n in model.graph.node
                   if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].name == "value"})
    fed = {i.name for i in model.graph.input}
    members = {m.dim for g in groups for m in g.members if not m.dim.is_virtual}
    out: Dict[DimKey, Tuple[str, int]] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in shapes or node.input[0] in fed:
            continue
        axes = _consumer(node, shapes[node.input[1]])
        if axes is None:
            continue
        key = DimKey(node.input[1], axes[0])
        if key in members:
            out[key] = (node.input[0], axes[1])
    return out


def output_error_stats(model: onnx.ModelProto, groups: List[Group], data: InputSet, batch_size: int = 32,
                       progress: bool = False) -> Dict[DimKey, np.ndarray]:
    """Weight dim -> ``||W[:, i]||^2 * E[x_i^2]`` for each input index ``i`` of every linear consumer
    in ``groups`` (``E`` over samples and every other axis of the activation, streamed)."""
    from graphprune.pruning.reconstruct_layers import Constants
    from graphprune.runtime import make_session, run

    dims = consumer_dims(model, groups)
    if not dims:
        return {}
    activations = list(dict.fromkeys(x for x, _ in dims.values()))
    probe = ir.clone(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in activations if name not in present)
    session = make_session(probe, threads=None, spinning=False)
    axes = {x: axis for x, axis in dims.values()}
    squares: Dict[str, np.ndarray] = {}
    counts: Dict[str, int] = {}
    batches = list(data.batches(batch_size))
    with progress_bar(len(batches), "output error", enabled=progress) as bar:
        for feed in batches:
            for name, value in run(session, feed, activations).items():
                value = np.moveaxis(np.asarray(value, dtype=np.float64), axes[name], -1)
                flat = value.reshape(-1, value.shape[-1])
                squares[name] = squares.get(name, 0) + np.einsum("rc,rc->c", flat, flat)
                counts[name] = counts.get(name, 0) + len(flat)
            bar.update(1)
    consts = Constants(model)
    out: Dict[DimKey, np.ndarray] = {}
    for key, (x, _) in dims.items():
        w = np.asarray(consts.get(key.tensor), dtype=np.float64)
        other = tuple(a for a in range(w.ndim) if a != key.axis)
        column_norms = np.square(w).sum(axis=other)
        mean_square = squares[x] / max(counts[x], 1)
        if mean_square.shape == column_norms.shape:  # else a reshape between them: leave it to l2
            out[key] = column_norms * mean_square
    return out
