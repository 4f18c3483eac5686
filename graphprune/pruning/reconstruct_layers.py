"""The layers reconstruction refits: which ones lost input channels, their rows, their weights.

A layer is a Conv, Gemm (``transA`` 0) or MatMul (constant 2-D right operand, with the bias of a
following ``Add`` when it has one) of the pruned model whose weight lost indices on its input axis
in the last removal (``graphprune.removed_channels``).  It is paired with the node of the original
that writes the same output; the original's weight with the recorded indices deleted must equal
the pruned weight exactly, or the original is not the model that was pruned (refused).

Every layer is written as ``y = W x + b`` with ``W`` of shape (groups, out/groups, in/groups * k):
``rows`` turns a batch of activations into the regression's rows and ``write`` puts a solution
back in the layer's own layout (Gemm's ``alpha``/``beta``/``transB``, MatMul's (K, N)).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune import ir
from graphprune.errors import UserError
from graphprune.pruning.apply import removed_channels
from graphprune.pruning.reconstruct import conv_chunks, conv_columns, conv_pads

__all__ = ["Layer", "find_layers", "levels", "Constants", "MAX_POSITIONS"]

# Spatial positions of a Conv output that give regression rows, per sample (see ``Layer.rows``).
MAX_POSITIONS = 256


class Constants:
    """Read and replace constants of a model by name (initializers and Constant nodes alike)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self._inits = {init.name: i for i, init in enumerate(model.graph.initializer)}
        self._nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}

    def __contains__(self, name: str) -> bool:
        return name in self._inits or (name in self._nodes and self._nodes[name].attribute[0].name == "value")

    def get(self, name: str) -> Optional[np.ndarray]:
        if name in self._inits:
            return numpy_helper.to_array(self.model.graph.initializer[self._inits[name]])
        if name in self._nodes:
            return ir.constant_node_value(self._nodes[name])
        return None

    def set(self, name: str, value: np.ndarray) -> None:
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        if name in self._inits:
            self.model.graph.initializer[self._inits[name]].CopyFrom(tensor)
        elif name in self._nodes:  # the Constant node keeps its place and output name
            tensor.ClearField("name")
            node = self._nodes[name]
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", tensor))
        else:
            self.model.graph.initializer.append(tensor)
            self._inits[name] = len(self.model.graph.initializer) - 1


@dataclasses.dataclass
class Layer:
    """One layer to refit.

    Attributes:
        op: Conv, Gemm or MatMul.
        output: the output tensor (same name in both models): the original's is the target.
        x: the data input of the pruned node.
        weight: the weight constant; ``bias`` its bias constant (None: the layer has none yet).
        kept_out: original output indices the pruned layer keeps, in order.
        groups: a Conv's ``group``; 1 otherwise.
        add_bias: MatMul: the following Add's constant is the bias (the target adds the original's).
        level: refit round (layers of one round do not feed each other).
    """

    op: str
    output: str
    x: str
    weight: str
    bias: Optional[str]
    kept_out: np.ndarray
    groups: int = 1
    conv: Optional[dict] = None
    gemm: Optional[dict] = None
    add_bias: bool = False
    original_bias: Optional[np.ndarray] = None
    level: int = 0

    @property
    def fits_bias(self) -> bool:
        """MatMul without an Add bias has nowhere to put one."""
        return self.op != "MatMul" or self.bias is not None

    # --- the regression's view -----------------------------------------------------------------
    def matrix(self, consts: Constants) -> np.ndarray:
        """Current weights as (G, O/G, D [+1 bias]) float64."""
        w = consts.get(self.weight).astype(np.float64)
        if self.op == "Conv":
            w = w.reshape(self.groups, w.shape[0] // self.groups, -1)
        elif self.op == "Gemm":
            w = (w.T if not self.gemm["transB"] else w) * self.gemm["alpha"]
            w = w[None]
        else:
            w = w.T[None]
        if not self.fits_bias:
            return w
        b = consts.get(self.bias).astype(np.float64).reshape(-1) if self.bias else np.zeros(w.shape[0] * w.shape[1])
        if self.op == "Gemm" and self.bias:
            b = b * self.gemm["beta"]
        return np.concatenate([w, b.reshape(w.shape[0], w.shape[1], 1)], axis=2)

    def rows(self, x: np.ndarray, y: np.ndarray, rng: Optional[np.random.Generator] = None,
             max_positions: int = MAX_POSITIONS) -> Iterable[Tuple[np.ndarray, np.ndarray]]:
        """(inputs (G, R, D), targets (G, R, O/G)) chunks of one batch: ``x`` from the pruned model,
        ``y`` the original layer's output (all its channels).  A Conv whose output has more than
        ``max_positions`` spatial positions gives rows at that many of them, drawn by ``rng`` (seed 0
        when None) for each chunk of samples: neighbouring positions are nearly the same row, and
        a 320x480 page has 38,400 of them (a 3x3 conv over 68 channels: 12 s of ``X^T X`` a batch)."""
        y = np.take(y, self.kept_out, axis=1 if self.op == "Conv" else -1)
        if self.original_bias is not None:
            y = y + self.original_bias[self.kept_out]
        if self.op != "Conv":
            yield x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1, y.shape[-1])
            return
        c = self.conv
        rng = np.random.default_rng(0) if rng is None else rng
        pads = conv_pads(x.shape[2:], c["kernel"], c["strides"], c["dilations"], c["pads"], c["auto_pad"])
        count = int(np.prod(y.shape[2:]))
        per_sample = min(count, max_positions) * x.shape[1] * int(np.prod(c["kernel"]))
        for start, stop in conv_chunks(len(x), per_sample):
            positions = np.sort(rng.choice(count, max_positions, replace=False)) if count > max_positions else None
            cols = conv_columns(x[start:stop], c["kernel"], c["strides"], c["dilations"], pads, self.groups, positions)
            t = y[start:stop]
            t = t.reshape((t.shape[0], self.groups, t.shape[1] // self.groups, -1))  # (N, G, Og, P)
            if positions is not None:
                t = t[..., positions]
            yield cols, np.ascontiguousarray(t.transpose(1, 0, 3, 2)).reshape(self.groups, -1, t.shape[2])

    def write(self, model: onnx.ModelProto, consts: Constants, solution: np.ndarray) -> None:
        """Store a (G, O/G, D [+1]) solution as the layer's weight (and bias, created when missing)."""
        w = solution[:, :, :-1] if self.fits_bias else solution
        b = solution[:, :, -1].reshape(-1) if self.fits_bias else None
        old = consts.get(self.weight)
        if self.op == "Conv":
            consts.set(self.weight, w.reshape(old.shape).astype(old.dtype))
        elif self.op == "Gemm":
            w = w[0] / self.gemm["alpha"]
            consts.set(self.weight, (w if self.gemm["transB"] else w.T).astype(old.dtype))
            b = b / self.gemm["beta"]
        else:
            consts.set(self.weight, w[0].T.astype(old.dtype))
        if b is None:
            return
        if self.bias is None:  # Conv/Gemm without a bias input: give it one
            node = next(n for n in model.graph.node if n.output and n.output[0] == self.output)
            self.bias = _unique(model, f"{self.weight}_reconstructed_bias")
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = self.bias
            consts.set(self.bias, b.astype(old.dtype))
            return
        old_b = consts.get(self.bias)
        consts.set(self.bias, b.reshape(old_b.shape).astype(old_b.dtype))


def _unique(model: onnx.ModelProto, base: str) -> str:
    names = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    name, k = base, 1
    while name in names:
        name, k = f"{base}_{k}", k + 1
    return name


def _axes(op: str, node: onnx.NodeProto, ndim: int) -> Tuple[int, int]:
    """(input axis, output axis) of a layer's weight."""
    if op == "Conv":
        return 1, 0
    if op == "Gemm":
        return (1, 0) if ir.get_attr(node, "transB", 0) else (0, 1)
    return ndim - 2, ndim - 1


def _describe(node: onnx.NodeProto, consts: Constants, consumers: Dict[str, List[onnx.NodeProto]]) -> Optional[dict]:
    """Op-specific facts of a node reconstruction can handle, or None (not a layer it refits)."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    if node.input[1] not in consts:
        return None
    w = consts.get(node.input[1])
    if w is None or w.dtype.kind != "f" or len(consumers.get(node.input[1], [])) != 1:
        return None  # a weight shared by several nodes cannot take one node's refit
    facts: dict = {"bias": None}
    if node.op_type == "Conv":
        if w.ndim < 3:
            return None
        facts["conv"] = {"kernel": list(w.shape[2:]), "strides": ir.get_attr(node, "strides", [1] * (w.ndim - 2)),
                         "dilations": ir.get_attr(node, "dilations", [1] * (w.ndim - 2)),
                         "pads": ir.get_attr(node, "pads", None),
                         "auto_pad": ir.get_attr(node, "auto_pad", b"NOTSET")}
        if isinstance(facts["conv"]["auto_pad"], bytes):
            facts["conv"]["auto_pad"] = facts["conv"]["auto_pad"].decode()
        facts["groups"] = int(ir.get_attr(node, "group", 1))
        facts["bias"] = node.input[2] if len(node.input) > 2 and node.input[2] else None
    elif node.op_type == "Gemm":
        if w.ndim != 2 or ir.get_attr(node, "transA", 0):
            return None
        facts["gemm"] = {"alpha": float(ir.get_attr(node, "alpha", 1.0)), "beta": float(ir.get_attr(node, "beta", 1.0)),
                         "transB": int(ir.get_attr(node, "transB", 0))}
        if facts["gemm"]["alpha"] == 0 or facts["gemm"]["beta"] == 0:
            return None
        facts["bias"] = node.input[2] if len(node.input) > 2 and node.input[2] else None
    else:
        if w.ndim != 2:
            return None
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != node.output[0]]
            b = consts.get(other[0]) if len(other) == 1 and other[0] in consts else None
            if b is not None and b.ndim == 1 and b.size == w.shape[1] and len(consumers.get(other[0], [])) == 1:
                facts["bias"] = other[0]
                facts["add_bias"] = True
    if facts["bias"] is not None:
        b = consts.get(facts["bias"]) if facts["bias"] in consts else None
        out = w.shape[0] if node.op_type == "Conv" or facts.get("gemm", {}).get("transB") else w.shape[1]
        if b is None or b.size != out or len(consumers.get(facts["bias"], [])) != 1:
            return None  # a broadcast or shared bias cannot hold one value per output
    return facts


def find_layers(original: onnx.ModelProto, pruned: onnx.ModelProto) -> List[Layer]:
    """The layers of ``pruned`` whose inputs lost channels, paired with ``original`` (checked)."""
    record = removed_channels(pruned)
    if not record:
        return []
    consts, orig_consts = Constants(pruned), Constants(original)
    consumers, orig_consumers = ir.consumer_map(pruned.graph), ir.consumer_map(original.graph)
    orig_nodes = {n.output[0]: n for n in original.graph.node if n.output}
    layers = []
    for node in pruned.graph.node:
        facts = _describe(node, consts, consumers)
        if facts is None:
            continue
        w_name = node.input[1]
        w = consts.get(w_name)
        in_axis, out_axis = _axes(node.op_type, node, w.ndim)
        removed = record.get(w_name, {})
        if not len(removed.get(in_axis, ())):
            continue  # its inputs kept every channel (depthwise convs lose outputs with their inputs)
        twin = orig_nodes.get(node.output[0])
        if twin is None or twin.op_type != node.op_type or _describe(twin, orig_consts, orig_consumers) is None \
                or twin.input[1] != w_name:
            raise UserError(f"reconstruct: the original has no {node.op_type} writing {node.output[0]!r} with weight "
                            f"{w_name!r}: it is not the model this one was pruned from")
        orig_w = orig_consts.get(w_name)
        expected = orig_w
        for axis, idx in removed.items():
            if axis >= orig_w.ndim or (len(idx) and int(np.max(idx)) >= orig_w.shape[axis]):
                raise UserError(f"reconstruct: the removal record of {w_name!r} does not fit the original's weight "
                                f"{list(orig_w.shape)}: it is not the model this one was pruned from")
            expected = np.delete(expected, idx, axis=axis)
        if expected.shape != w.shape or not np.array_equal(expected, w):
            raise UserError(f"reconstruct: weight {w_name!r} is not the original's minus the removed channels "
                            "(give the model that was pruned, and reconstruct before any other change)")
        kept_out = np.setdiff1d(np.arange(orig_w.shape[out_axis]), removed.get(out_axis, np.zeros(0, np.int64)))
        layer = Layer(op=node.op_type, output=node.output[0], x=node.input[0], weight=w_name, bias=facts["bias"],
                      kept_out=kept_out, groups=facts.get("groups", 1), conv=facts.get("conv"), gemm=facts.get("gemm"),
                      add_bias=facts.get("add_bias", False))
        if layer.add_bias:
            layer.original_bias = orig_consts.get(layer.bias).astype(np.float64)
        layers.append(layer)
    return layers


def levels(model: onnx.ModelProto, layers: List[Layer]) -> List[List[Layer]]:
    """Layers in refit rounds: a layer's round is the number of refit layers on the longest path to
    its input, so a round's layers never feed one another and each sees its upstream refits."""
    from graphprune.dependency.graph import outer_names

    by_output = {layer.output: layer for layer in layers}
    depth: Dict[str, int] = {}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        reads = list(node.input) + (sorted(outer_names(node)) if any(a.g.node or a.graphs for a in node.attribute) else [])
        d = max((depth.get(name, 0) for name in reads if name), default=0)
        layer = by_output.get(node.output[0]) if node.output else None
        if layer is not None:
            layer.level = d
            d += 1
        for name in node.output:
            depth[name] = d
    rounds: Dict[int, List[Layer]] = {}
    for layer in layers:
        rounds.setdefault(layer.level, []).append(layer)
    return [rounds[k] for k in sorted(rounds)]
