"""Removing residual blocks: consumers of a block's output read its input; what nothing reads goes."""

from __future__ import annotations

from typing import Dict, Iterable, Set

import onnx

from graphprune.ir import copy_fields
from graphprune.pruning.blocks import Block

__all__ = ["remove_blocks", "REMOVED_BLOCKS_KEY"]

# metadata_props key listing the removed blocks (JSON: [{"index", "name", "input", "output"}]).
REMOVED_BLOCKS_KEY = "graphprune.removed_blocks"


def remove_blocks(model: onnx.ModelProto, blocks: Iterable[Block]) -> onnx.ModelProto:
    """A new model without ``blocks``; ``model`` is not modified.

    Every reader of a block's output (nodes, subgraphs, a graph output) reads the block's input
    instead, through chains of removed blocks; a graph output keeps its name through an ``Identity``.
    Nodes that no graph output needs any longer are dropped, then initializers no node reads; the
    model's inputs stay.  Only the surviving initializers are copied (a model loaded without its
    external data copies their records only).  Shapes are not re-inferred here.
    """
    replace: Dict[str, str] = {b.output: b.input for b in blocks}

    def resolve(name: str) -> str:
        seen = set()
        while name in replace and name not in seen:
            seen.add(name)
            name = replace[name]
        return name

    graph = model.graph
    result = onnx.ModelProto()
    copy_fields(model, result, skip=("graph",))
    copy_fields(graph, result.graph, skip=("initializer", "node", "value_info"))
    nodes = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.input):
            if name in replace:
                copy.input[i] = resolve(name)
        _rename_outer(copy, replace, resolve)
        nodes.append(copy)
    outputs = {o.name for o in graph.output}
    for name in outputs & set(replace):
        for node in nodes:  # the old producer keeps an unread name and dies below
            for i, out in enumerate(node.output):
                if out == name:
                    node.output[i] = f"{name}__graphprune_removed"
        nodes.append(onnx.helper.make_node("Identity", [resolve(name)], [name], name=f"{name}__graphprune_identity"))
    live = _live_nodes(nodes, outputs)
    result.graph.node.extend(n for i, n in enumerate(nodes) if i in live)
    read = set(outputs)
    for node in result.graph.node:
        read.update(n for n in node.input if n)
        read.update(_outer_reads(node))
    result.graph.initializer.extend(t for t in graph.initializer if t.name in read)
    kept = {t.name for t in result.graph.initializer}
    initializers = {t.name for t in graph.initializer}
    inputs = [vi for vi in result.graph.input if vi.name not in initializers or vi.name in kept]
    del result.graph.input[:]
    result.graph.input.extend(inputs)
    made = {o for n in result.graph.node for o in n.output}
    result.graph.value_info.extend(vi for vi in graph.value_info if vi.name in made)
    return result


def _live_nodes(nodes, outputs: Set[str]) -> Set[int]:
    """Indices of the nodes some graph output depends on."""
    needed = set(outputs)
    live = set()
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        if any(o in needed for o in node.output if o):
            live.add(i)
            needed.update(n for n in node.input if n)
            needed.update(_outer_reads(node))
    return live


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        for g in attr.graphs:
            yield g


def _outer_reads(node: onnx.NodeProto) -> Set[str]:
    """Every name a node's subgraphs read (a superset of the outer-scope ones: enough for liveness)."""
    names: Set[str] = set()
    for g in _subgraphs(node):
        for sub in g.node:
            names.update(n for n in sub.input if n)
            names.update(_outer_reads(sub))
        names.update(o.name for o in g.output)
    return names


def _rename_outer(node: onnx.NodeProto, replace: Dict[str, str], resolve) -> None:
    """Point subgraph reads of a removed block's output at its input (names defined inside stay)."""
    for g in _subgraphs(node):
        local = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
        for sub in g.node:
            for i, name in enumerate(sub.input):
                if name in replace and name not in local:
                    sub.input[i] = resolve(name)
            _rename_outer(sub, replace, resolve)
        for out in g.output:
            if out.name in replace and out.name not in local:
                # a subgraph output naming an outer tensor directly: route it through an Identity
                g.node.append(onnx.helper.make_node("Identity", [resolve(out.name)], [out.name + "__graphprune_outer"]))
                out.name = out.name + "__graphprune_outer"
