"""Preparing a float model for QDQ insertion: ORT's pre-processing (BN folding, shapes) and unique node names."""

from __future__ import annotations

import logging
import os
import tempfile

import onnx

from graphprune.ir import approx_bytes, clone
from graphprune.model_io import EXTERNAL_DATA_THRESHOLD, default_opset, for_ort
from graphprune.shapes import infer_shapes

__all__ = ["prepare", "QUANTIZED_OP_TYPES", "is_quantized", "save_for_tool"]

_MIN_QDQ_OPSET = 13

# Any of these means the model already carries quantization (QDQ or QOperator format).
QUANTIZED_OP_TYPES = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
    }
)


def is_quantized(model: onnx.ModelProto) -> str:
    """The first quantized op type found in the main graph, or "" when there is none."""
    for node in model.graph.node:
        op = node.op_type
        if op in QUANTIZED_OP_TYPES or op.startswith("QLinear") or op.endswith(("Integer", "IntegerToFloat")):
            return node.op_type
    return ""


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as the quantizer wants it, computing the same outputs.

    ONNX Runtime's ``quant_pre_process`` runs its basic graph optimizations (BatchNormalization
    folded into Conv, constant folding, redundant-node removal: a BN left between a Conv and its
    QDQ pair would keep the Conv out of the int8 kernel) and shape inference.  When symbolic shape
    inference fails on an unusual graph it is skipped.  Nodes without a name get one, because
    placement addresses nodes by name.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = for_ort(model)
    if default_opset(source) is not None and default_opset(source) < _MIN_QDQ_OPSET:
        # per-channel DequantizeLinear (axis) needs opset 13; convert the whole graph, not just the label
        source = onnx.version_converter.convert_version(source, _MIN_QDQ_OPSET)
    with tempfile.TemporaryDirectory(prefix="graphprune-prep-") as tmp:
        src = os.path.join(tmp, "in.onnx")
        out = os.path.join(tmp, "out.onnx")
        save_for_tool(source, src)
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)
        previous_cwd = os.getcwd()
        try:
            # ORT's symbolic shape inference dumps sym_shape_infer_temp.onnx (and its weights) into the
            # working directory when it gives up; keep that litter in our temporary folder.
            os.chdir(tmp)
            try:
                quant_pre_process(src, out)
            except Exception:  # symbolic shape inference gives up on some graphs; ONNX's own still runs
                quant_pre_process(src, out, skip_symbolic_shape=True)
        finally:
            os.chdir(previous_cwd)
            logger.setLevel(level)
        prepared = onnx.load(out)
    _name_nodes(prepared.graph)
    _drop_unused_opsets(prepared)
    prepared.ir_version = min(max(prepared.ir_version, 4), source.ir_version) if source.ir_version >= 4 else 4
    return infer_shapes(prepared)


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed or duplicate-named nodes a unique name derived from their op type."""
    seen = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            base = f"{node.op_type}_{i}"
            name = base
            k = 0
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
        seen.add(node.name)


def _drop_unused_opsets(model: onnx.ModelProto) -> None:
    """ORT's optimizer imports every domain it knows; keep ai.onnx and the domains nodes use."""
    used = {n.domain for n in model.graph.node} | {""}
    kept = [imp for imp in model.opset_import if imp.domain in used or imp.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def save_for_tool(model: onnx.ModelProto, path: str) -> None:
    """Write ``model`` for an ORT tool that takes a path.

    Weights go to a side file only past protobuf's 2 GiB limit: ORT's pre-processing reloads
    intermediate copies from its own temporary folder, where a side file would not be found.
    ``onnx.save_model`` rewrites the proto it saves as external data, so a copy is saved.
    """
    model = for_ort(model)
    if approx_bytes(model) < EXTERNAL_DATA_THRESHOLD:  # ByteSize() would encode (and fail past 2 GiB)
        onnx.save_model(model, path)
        return
    onnx.save_model(clone(model), path, save_as_external_data=True, location=os.path.basename(path) + ".data")
