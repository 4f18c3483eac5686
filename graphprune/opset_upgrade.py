"""Opset upgrades: GroupNormalization's opset 18-20 form (which onnx >= 1.18 refuses) on load, and
``raise_opset`` for rewrites that need a newer op (HardSwish is opset 14)."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune import ir
from graphprune.errors import UserError

__all__ = ["upgrade_group_norm", "raise_opset", "GROUP_NORM_PER_CHANNEL_OPSET"]

# GroupNormalization-18 scales and shifts each group ([num_groups] parameters); GroupNormalization-21
# each channel ([C]), as every framework does.  onnx 1.18 deprecated the first form: its checker
# refuses a model that uses it.
GROUP_NORM_PER_GROUP_OPSET = 18
GROUP_NORM_PER_CHANNEL_OPSET = 21
# GroupNormalization nodes wait in this domain while onnx's converter raises the other nodes' opset:
# its own GroupNormalization adapter would compute the repeated parameters at run time.
_WAITING_DOMAIN = "graphprune.upgrade"
# Initializers above this many elements are handed to the converter without their data (it only
# relabels nodes between opsets 18 and 21, and a model past 2 GiB cannot be serialized for it).
_CONVERTER_MAX_ELEMENTS = 64


def upgrade_group_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every GroupNormalization in its opset 21 form; ``model`` itself when none needs it.

    Handles a model importing ai.onnx opset 18, 19 or 20 with GroupNormalization nodes in its main
    graph.  Each group's scale and bias value is repeated over the group's C / num_groups channels:
    an initializer is rewritten in place when only such nodes read it (a new one is added
    otherwise); a computed parameter goes through Reshape -> Expand -> Reshape.  The ai.onnx import
    becomes 21 and the other nodes go through ``onnx.version_converter`` (a relabel for most ops,
    a rewrite for the few whose meaning changed, e.g. GridSample's mode names).  Outputs are
    unchanged.

    Refuses (``UserError``): a GroupNormalization whose channel count neither shape inference nor
    the producing Conv tells, channels not divisible by ``num_groups``, parameters of another
    size than [num_groups] or [C], GroupNormalization inside a subgraph, a failed conversion.
    """
    opset = _default_opset(model)
    if opset is None or not GROUP_NORM_PER_GROUP_OPSET <= opset < GROUP_NORM_PER_CHANNEL_OPSET:
        return model
    if any(_is_group_norm(n) for g in _subgraphs(model.graph) for n in g.node):
        raise UserError(
            f"GroupNormalization inside a subgraph at opset {opset}: graphprune upgrades only main-graph ones "
            f"to opset {GROUP_NORM_PER_CHANNEL_OPSET} (convert the model with onnx.version_converter)"
        )
    if not any(_is_group_norm(n) for n in model.graph.node):
        return model
    work = ir.clone(model)
    _Rewriter(work, _channel_counts(work)).run()
    return _convert_others(work, opset)


def _default_opset(model: onnx.ModelProto) -> Optional[int]:
    return next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), None)


def _is_group_norm(node: onnx.NodeProto) -> bool:
    return node.op_type == "GroupNormalization" and node.domain in ("", "ai.onnx")


def _subgraphs(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield sub
                yield from _subgraphs(sub)


def _channel_counts(model: onnx.ModelProto) -> Dict[str, int]:
    """Tensor name -> size of axis 1, from shape inference or, failing that, the producing Conv's weight."""
    from graphprune.dependency.shape_info import infer_value_info

    infos = list(model.graph.input) + list(model.graph.output) + infer_value_info(model, keep_value_info=True)
    channels: Dict[str, int] = {}
    for vi in infos:
        shape = ir.value_shape(vi)
        if shape and len(shape) >= 2 and isinstance(shape[1], int) and shape[1] > 0:
            channels[vi.name] = shape[1]
    weights = ir.initializer_map(model.graph)
    for node in model.graph.node:
        if node.output and node.output[0] not in channels and len(node.input) > 1 and node.input[1] in weights:
            dims = list(weights[node.input[1]].dims)
            if node.op_type == "Conv" and dims:
                channels[node.output[0]] = dims[0]
            elif node.op_type == "ConvTranspose" and len(dims) > 1:
                channels[node.output[0]] = dims[1] * int(ir.get_attr(node, "group", 1))
    return channels


class _Rewriter:
    """Rewrites the [num_groups] parameters of a graph's GroupNormalization nodes to [C]."""

    def __init__(self, model: onnx.ModelProto, channels: Dict[str, int]):
        self.graph = model.graph
        self.channels = channels
        self.inits = ir.initializer_map(self.graph)
        self.consumers = ir.consumer_map(self.graph)
        self.done: Dict[tuple, str] = {}  # (tensor, channels) -> its per-channel tensor
        self.names = {out for n in self.graph.node for out in n.output} | set(self.inits)

    def run(self) -> None:
        nodes: List[onnx.NodeProto] = []
        for node in self.graph.node:
            if _is_group_norm(node):
                groups, channels = self._sizes(node)
                for slot, role in ((1, "scale"), (2, "bias")):
                    if len(node.input) > slot and node.input[slot]:
                        node.input[slot] = self._per_channel(node, role, node.input[slot], groups, channels, nodes)
            nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self._drop_unread(name for name, _ in self.done)

    def _drop_unread(self, names) -> None:
        """Remove the per-group initializers nothing reads any more (their per-channel copies replaced them)."""
        read = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        read |= {i for g in _subgraphs(self.graph) for n in g.node for i in n.input}
        unread = {name for name in names if name in self.inits and name not in read}
        if unread:
            kept = [init for init in self.graph.initializer if init.name not in unread]
            del self.graph.initializer[:]
            self.graph.initializer.extend(kept)

    def _sizes(self, node: onnx.NodeProto):
        groups = int(ir.get_attr(node, "num_groups", 0))
        channels = self.channels.get(node.input[0])
        label = f"GroupNormalization {node.name or node.output[0]!r}"
        if channels is None:
            raise UserError(
                f"{label}: cannot tell its channel count (input {node.input[0]!r} has no known shape), so its "
                f"per-group scale cannot become the opset {GROUP_NORM_PER_CHANNEL_OPSET} per-channel form "
                "(give the model input shapes, or convert the model to opset 21 yourself)"
            )
        if groups <= 0 or channels % groups:
            raise UserError(f"{label}: {channels} channels are not divisible by num_groups={groups}")
        return groups, channels

    def _per_channel(self, node, role: str, name: str, groups: int, channels: int, nodes) -> str:
        key = (name, channels)
        if key in self.done:
            return self.done[key]
        if name in self.inits:
            result = self._repeat_initializer(node, role, name, groups, channels)
        else:
            result = self._repeat_nodes(node, role, name, groups, channels, nodes)
        self.done[key] = result
        return result

    def _repeat_initializer(self, node, role: str, name: str, groups: int, channels: int) -> str:
        value = numpy_helper.to_array(self.inits[name])
        if value.shape == (channels,):
            return name  # already per channel (groups of one channel, or an exporter ahead of its opset)
        if value.shape != (groups,):
            raise UserError(
                f"GroupNormalization {node.name or node.output[0]!r}: {role} {name!r} has shape {list(value.shape)}, "
                f"expected [{groups}] (num_groups) or [{channels}] (channels)"
            )
        repeated = numpy_helper.from_array(np.repeat(value, channels // groups), name)
        readers = self.consumers.get(name, [])
        if all(_is_group_norm(r) and self.channels.get(r.input[0]) == channels for r in readers):
            self.inits[name].CopyFrom(repeated)  # every reader becomes per-channel with the same C
            return name
        repeated.name = self._fresh(f"{name}_per_channel")
        self.graph.initializer.append(repeated)
        return repeated.name

    def _repeat_nodes(self, node, role: str, name: str, groups: int, channels: int, nodes) -> str:
        """[G] -> [G, 1] -> [G, C/G] -> [C]: each value repeated over its group's channels at run time."""
        prefix = f"{node.name or node.output[0]}/{role}"
        shapes = {"grouped": [groups, 1], "expanded": [groups, channels // groups], "flat": [channels]}
        consts = {}
        for key, dims in shapes.items():
            consts[key] = self._fresh(f"{prefix}_{key}_shape")
            self.graph.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), consts[key]))
        grouped, expanded, flat = (self._fresh(f"{prefix}_{key}") for key in shapes)
        nodes += [
            helper.make_node("Reshape", [name, consts["grouped"]], [grouped], name=grouped),
            helper.make_node("Expand", [grouped, consts["expanded"]], [expanded], name=expanded),
            helper.make_node("Reshape", [expanded, consts["flat"]], [flat], name=flat),
        ]
        return flat

    def _fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name


def raise_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` importing ai.onnx opset ``target``; ``model`` itself when it already imports ``target`` or more.

    When every default-domain op of the model (subgraphs included) has the same schema at both
    versions, only the import is relabelled: nothing can change meaning.  Otherwise the nodes go
    through ``onnx.version_converter`` (e.g. Squeeze's ``axes`` attribute becomes an input at 13),
    on a copy whose large weights carry no data.  Refuses (``UserError``) a model without an ai.onnx
    import and a conversion that fails.
    """
    opset = _default_opset(model)
    if opset is None:
        raise UserError("the model imports no ai.onnx opset: nothing to raise")
    if opset >= target:
        return model
    if _same_schemas(model, opset, target):
        work = ir.clone(model)
        for imp in work.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = target
        work.ir_version = max(work.ir_version, helper.find_min_ir_version_for(list(work.opset_import), ignore_unknown=True))
        return work
    return _convert(model, opset, target, f"raise the model from opset {opset} to {target}")


def _same_schemas(model: onnx.ModelProto, opset: int, target: int) -> bool:
    graphs = [model.graph] + list(_subgraphs(model.graph))
    for op in {n.op_type for g in graphs for n in g.node if n.domain in ("", "ai.onnx")}:
        try:
            if onnx.defs.get_schema(op, target).since_version != onnx.defs.get_schema(op, opset).since_version:
                return False
        except onnx.defs.SchemaError:  # an op unknown at one of the two versions: the converter decides
            return False
    return True


def _convert_others(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Raise the ai.onnx import to 21 through onnx's converter, GroupNormalization kept out of its reach."""
    return _convert(model, opset, GROUP_NORM_PER_CHANNEL_OPSET,
                    f"raise the model from opset {opset} to {GROUP_NORM_PER_CHANNEL_OPSET} for its GroupNormalization",
                    hold=_is_group_norm)


def _convert(model: onnx.ModelProto, opset: int, target: int, what: str, hold=lambda node: False) -> onnx.ModelProto:
    """``onnx.version_converter`` to ``target`` on a copy without large weights (put back after);
    main-graph nodes for which ``hold`` is true wait in another domain, unconverted."""
    light = _without_large_weights(model)
    for node in light.graph.node:
        if hold(node):
            node.domain = _WAITING_DOMAIN
    light.opset_import.append(helper.make_opsetid(_WAITING_DOMAIN, 1))
    try:
        converted = onnx.version_converter.convert_version(light, target)
    except Exception as exc:  # the converter raises RuntimeError or ConvertError with C++ text
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot {what}: {first}") from None
    for node in converted.graph.node:
        if node.domain == _WAITING_DOMAIN:
            node.domain = ""
    kept = [imp for imp in converted.opset_import if imp.domain != _WAITING_DOMAIN]
    del converted.opset_import[:]
    converted.opset_import.extend(kept)
    originals = ir.initializer_map(model.graph)
    for init in converted.graph.initializer:
        if init.name in originals and not _has_data(init):
            init.CopyFrom(originals[init.name])
    converted.ir_version = max(converted.ir_version, helper.find_min_ir_version_for(kept, ignore_unknown=True))
    return converted


def _without_large_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers carry name, type and dims but no data."""
    from graphprune.dependency.shape_info import model_shell

    light = model_shell(model, keep_value_info=True)
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= _CONVERTER_MAX_ELEMENTS:
            light.graph.initializer.append(init)
        else:
            light.graph.initializer.append(onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))
    return light


def _has_data(init: onnx.TensorProto) -> bool:
    return bool(init.raw_data or init.external_data or any(
        len(getattr(init, field)) for field in ("float_data", "int32_data", "int64_data", "double_data",
                                                 "uint64_data", "string_data")
    ))
