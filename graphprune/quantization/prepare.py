"""Preparing a float model for QDQ insertion: ORT's pre-processing (BN folding, shapes) and unique node names."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.external_writes import write_inline, write_with_external_data
from graphprune.ir import approx_bytes, consumer_map, copy_fields, get_attr, has_external_data, is_large, producer_map
from graphprune.ir import clone as ir_clone
from graphprune.model_io import EXTERNAL_DATA_THRESHOLD, default_opset, for_ort
from graphprune.weights_on_disk import read_tensor
from graphprune.shapes import infer_shapes

__all__ = ["prepare", "fold_batchnorms", "QUANTIZED_OP_TYPES", "is_quantized", "save_for_tool"]

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


def prepare(model: onnx.ModelProto, source_dir: Optional[str] = None) -> onnx.ModelProto:
    """The model as the quantizer wants it, computing the same outputs.

    ONNX Runtime's ``quant_pre_process`` runs its basic graph optimizations (BatchNormalization
    folded into Conv, constant folding, redundant-node removal: a BN left between a Conv and its
    QDQ pair would keep the Conv out of the int8 kernel) and shape inference, after ``CanonicalizePass``
    (HardSwish fused).  When symbolic shape inference fails on an unusual graph it is skipped.  Nodes without a name get one, because
    placement addresses nodes by name.  Large models (``ir.is_large``) take ``_prepare_large``;
    ``source_dir`` is the folder of the weights a model left on disk (the folds read them there).
    """
    source = for_ort(model)
    if default_opset(source) is not None and default_opset(source) < _MIN_QDQ_OPSET:
        # per-channel DequantizeLinear (axis) needs opset 13; convert the whole graph, not just the label
        source = onnx.version_converter.convert_version(source, _MIN_QDQ_OPSET)
    if is_large(source):
        prepared = _prepare_large(source, owned=source is not model, source_dir=source_dir)
    else:
        # Canonicalized first, as large models and the int8 storage fallback are: hard-swish written
        # out as Add/Clip/Div/Mul (Paddle) would otherwise be placed and timed as four ops, which
        # made PP-OCRv3's int8 recognizer (19.0 ms) slower than its canonicalized float (17.7 ms).
        from graphprune.passes.canonicalize import CanonicalizePass

        prepared = _prepare_with_ort(CanonicalizePass()(source).model)
    _name_nodes(prepared.graph)
    _drop_unused_opsets(prepared)
    prepared.ir_version = min(max(prepared.ir_version, 4), source.ir_version) if source.ir_version >= 4 else 4
    return infer_shapes(prepared, inplace=True)  # ``prepared`` is this function's own copy


def _prepare_large(source: onnx.ModelProto, owned: bool, source_dir: Optional[str] = None) -> onnx.ModelProto:
    """``_prepare_with_ort``'s work on a large model, holding one copy of the weights, not five.

    ORT's pre-processing loads, infers, saves and reloads whole copies (6.8x the model's size at
    peak on a 0.5 GB MLP) and loses its external data past 2 GiB.  Here: canonicalize (constant
    folding, dead nodes: it reads only the weights folding needs), then BatchNormalization folded
    into the Conv before it (the fold the int8 Conv kernel needs), then one copy of the model
    (the caller's is not modified; each folded weight is written once).  Not done here, unlike
    ORT's basic level: the other fusions (Conv+Add, Conv+Mul) and Identity/Dropout removal,
    which leave the model correct and only keep those nodes out of int8.

    Args:
        owned: ``source`` is a copy made for this call (it may be returned and modified).
    """
    from graphprune.passes.canonicalize import CanonicalizePass

    result = CanonicalizePass()(source)
    owned = owned or result.modified  # a model of our own: the caller's is never modified below
    return fold_batchnorms(result.model, copy=not owned, source_dir=source_dir)


def fold_batchnorms(model: onnx.ModelProto, copy: bool = True, source_dir: Optional[str] = None) -> onnx.ModelProto:
    """A copy of ``model`` with every inference BatchNormalization that follows a Conv folded into it
    (``model`` itself when nothing folds and ``copy`` is False).

    Folded: a Conv (ai.onnx) whose weight (and bias, if any) are initializers, read by nothing
    but the BatchNormalization (one output) whose four parameters are initializers, neither
    output a graph output.  W' = W * s (per output channel), b' = (b - mean) * s + beta with
    s = scale / sqrt(var + epsilon).  Everything else is copied as it is (weights left on disk stay
    records; the folded ones are read from ``source_dir``).
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers = consumer_map(graph)
    producers = producer_map(graph)
    outputs = {vi.name for vi in graph.output}
    plans = {}  # BN index -> (conv, bn)
    for index, bn in enumerate(graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.input) != 5:
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        weights = [name for name in conv.input[1:] if name]
        if any(o for o in bn.output[1:]) or get_attr(bn, "training_mode", 0):
            continue
        if not all(name in inits for name in weights + list(bn.input[1:])):
            continue
        if len(consumers.get(conv.output[0], [])) != 1 or conv.output[0] in outputs:
            continue
        if any(len(consumers.get(name, [])) != 1 for name in weights):
            continue  # a weight shared with another node keeps its values
        plans[index] = (conv, bn)
    if not plans:
        return ir_clone(model) if copy else model
    new = {}  # initializer name -> folded value
    for conv, bn in plans.values():
        scale, beta, mean, var = (read_tensor(inits[n], source_dir).astype(np.float64) for n in bn.input[1:])
        s = scale / np.sqrt(var + float(get_attr(bn, "epsilon", 1e-5)))
        w = read_tensor(inits[conv.input[1]], source_dir)
        new[conv.input[1]] = (w * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        b = read_tensor(inits[conv.input[2]], source_dir).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        new[f"{bn.output[0]}_folded_bias"] = ((b - mean) * s + beta).astype(w.dtype)
    result = onnx.ModelProto()
    copy_fields(model, result, skip={"graph"})
    copy_fields(graph, result.graph, skip={"initializer", "node"})
    by_conv = {id(conv): bn for conv, bn in plans.values()}
    for index, node in enumerate(graph.node):
        if index in plans:
            continue  # the BN: its Conv now writes its output
        target = result.graph.node.add()
        target.CopyFrom(node)
        bn = by_conv.get(id(node))
        if bn is not None:
            del target.input[2:]
            target.input.append(f"{bn.output[0]}_folded_bias")
            target.output[0] = bn.output[0]
    for init in graph.initializer:
        if init.name in new:
            result.graph.initializer.append(numpy_helper.from_array(new.pop(init.name), init.name))
        else:
            result.graph.initializer.add().CopyFrom(init)
    for name, value in new.items():  # the folded biases
        result.graph.initializer.append(numpy_helper.from_array(value, name))
    used = {name for node in result.graph.node for name in node.input}
    kept = [init for init in result.graph.initializer if init.name in used or init.name in outputs]
    if len(kept) != len(result.graph.initializer):  # the BNs' parameters and the replaced biases
        names = {init.name for init in kept}
        for i in reversed(range(len(result.graph.initializer))):
            if result.graph.initializer[i].name not in names:
                del result.graph.initializer[i]
    return result


def _prepare_with_ort(source: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's ``quant_pre_process`` (basic graph optimizations, symbolic and ONNX shape
    inference) through files in a temporary folder."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
        return onnx.load(out)


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


def save_for_tool(model: onnx.ModelProto, path: str, source_dir: Optional[str] = None) -> None:
    """Write ``model`` for an ORT tool that takes a path.

    Weights go to a side file only past protobuf's 2 GiB limit: ORT's pre-processing reloads
    intermediate copies from its own temporary folder, where a side file would not be found.
    Both forms are written one tensor at a time (``graphprune.external_data``).  Weights left on
    disk are copied from ``source_dir`` (the folder their model was loaded from) into the side file.
    """
    model = for_ort(model)
    if not has_external_data(model) and approx_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        write_inline(model, path)  # ByteSize() would encode (and fail past 2 GiB)
        return
    # streamed, the model not copied
    write_with_external_data(model, path, os.path.basename(path) + ".data", source_dir=source_dir)
