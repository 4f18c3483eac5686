"""What the installed ONNX Runtime loads, and labelling models so that it loads them.

The limits (highest IR version and ai.onnx opset) are probed from the runtime once per process,
never hard-coded: newer onnx releases stamp IR versions and opsets an older runtime refuses, and a
runtime may bundle a newer onnx than the Python package knows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import onnx
from onnx import helper

from graphprune.errors import UserError

__all__ = ["OrtLimits", "all_graphs", "default_opset", "for_ort", "ort_limits", "ort_refusal", "written_ir_version"]

# IR versions introduce element types; a model using none of a newer version's types can be
# labelled with an older IR version without changing its meaning.  By name: older onnx releases
# lack the newest types (and then cannot hold them either).
_ELEM_TYPE_MIN_IR = {
    getattr(onnx.TensorProto, name): ir
    for name, ir in [
        ("BFLOAT16", 4),
        ("FLOAT8E4M3FN", 9), ("FLOAT8E4M3FNUZ", 9), ("FLOAT8E5M2", 9), ("FLOAT8E5M2FNUZ", 9),
        ("UINT4", 10), ("INT4", 10),
        ("FLOAT4E2M1", 11),
        ("FLOAT8E8M0", 12),
        ("UINT2", 13), ("INT2", 13),
        ("FLOAT6E2M3", 14), ("FLOAT6E3M2", 14),
    ]
    if hasattr(onnx.TensorProto, name)
}
# Probing starts this far above what the installed onnx knows: the runtime may bundle a newer onnx.
_PROBE_HEADROOM = 3


def default_opset(model: onnx.ModelProto) -> Optional[int]:
    """The ai.onnx opset version the model imports, or None if it imports none."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


class OrtLimits(NamedTuple):
    """What the installed ONNX Runtime loads (see ``ort_limits``)."""

    ir_version: int  # highest IR version
    opset: int  # highest ai.onnx opset
    version: str  # onnxruntime.__version__

    @property
    def short_version(self) -> str:
        """"1.32" for "1.32.0": the release line messages name."""
        return ".".join(self.version.split(".")[:2])


@functools.lru_cache(maxsize=None)
def ort_limits() -> OrtLimits:
    """The highest IR version and ai.onnx opset the installed onnxruntime loads, probed once.

    Each probe is a one-node Identity model handed to an ``InferenceSession`` (a few ms in all):
    the runtime refuses IR versions newer than its own and opsets newer than the onnx release it
    bundles, whatever the Python ``onnx`` package knows.
    """
    from graphprune.runtime import ort

    rt = ort()
    ir_version = _highest_loaded(rt, "ir_version", onnx.IR_VERSION + _PROBE_HEADROOM, opset=13)
    opset = _highest_loaded(rt, "opset", onnx.defs.onnx_opset_version() + _PROBE_HEADROOM, ir_version=ir_version)
    return OrtLimits(ir_version, opset, rt.__version__)


def _highest_loaded(rt, field: str, start: int, **fixed: int) -> int:
    """Count ``field`` down from ``start`` until the runtime loads the probe model."""
    options = rt.SessionOptions()
    options.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # no thread pools: ~0.3 ms a probe
    for value in range(start, 2, -1):
        versions = {**fixed, field: value}
        try:
            rt.InferenceSession(_probe_model(**versions), options, providers=["CPUExecutionProvider"])
            return value
        except Exception:  # the runtime's refusal: try the next lower version
            continue
    raise UserError(f"onnxruntime {rt.__version__} loads no ONNX model at all (broken installation?)")


def _probe_model(ir_version: int, opset: int) -> bytes:
    info = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", info[:1], info[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    return model.SerializeToString()


def for_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model`` labelled with an IR version the installed onnxruntime loads.

    Newer onnx releases stamp newer IR versions than a runtime may know; when the content uses
    nothing newer than the runtime's IR the label is lowered (a copy; the input is not modified).
    Raises ``UserError`` when that is impossible: an ai.onnx opset above the runtime's (it has no
    kernels for it), or element types of a newer IR (``ort_refusal``).
    """
    refusal = ort_refusal(model)
    if refusal is not None:
        raise UserError(refusal)
    limits = ort_limits()
    if model.ir_version <= limits.ir_version:
        return model
    return _relabelled(model, limits.ir_version)


def ort_refusal(model: onnx.ModelProto) -> Optional[str]:
    """Why ``for_ort`` would refuse ``model`` (its one-line message), or None; copies nothing."""
    limits = ort_limits()
    opset = default_opset(model)
    if opset is not None and opset > limits.opset:
        return (f"model uses ai.onnx opset {opset}; the installed onnxruntime {limits.short_version} runs "
                f"opset <= {limits.opset} (upgrade onnxruntime or convert the model)")
    if model.ir_version <= limits.ir_version:
        return None
    needed = _min_ir_for_content(model)
    if needed > limits.ir_version:
        return (f"model has IR version {model.ir_version} and uses element types of IR {needed}; the installed "
                f"onnxruntime {limits.short_version} loads IR <= {limits.ir_version} (upgrade onnxruntime)")
    return None


def written_ir_version(model: onnx.ModelProto) -> int:
    """The IR label ``save`` writes: the runtime's when the content allows, else the model's own.

    Never an error (a model the runtime cannot run is still the user's model).
    """
    limits = ort_limits()
    if model.ir_version <= limits.ir_version or _min_ir_for_content(model) > limits.ir_version:
        return model.ir_version
    return limits.ir_version


def _relabelled(model: onnx.ModelProto, ir_version: int) -> onnx.ModelProto:
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    lowered.ir_version = ir_version
    return lowered


def _min_ir_for_content(model: onnx.ModelProto) -> int:
    """The oldest IR version whose element types cover every type the model uses."""
    needed = 3
    newest_known = max(_ELEM_TYPE_MIN_IR)

    def visit_type(elem_type: int) -> None:
        nonlocal needed
        known = _ELEM_TYPE_MIN_IR.get(elem_type)
        if known is None and elem_type > newest_known:
            known = onnx.IR_VERSION + 1  # a type newer than this onnx release: assume the newest IR
        needed = max(needed, known or 3)

    for graph in all_graphs(model.graph):
        for init in graph.initializer:
            visit_type(init.data_type)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type"):
                visit_type(vi.type.tensor_type.elem_type)
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in ("to", "output_dtype", "dtype") and attr.type == onnx.AttributeProto.INT:
                    visit_type(attr.i)
                elif attr.type == onnx.AttributeProto.TENSOR:
                    visit_type(attr.t.data_type)
    return needed


def all_graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph of its nodes' attributes (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_graphs(g)
