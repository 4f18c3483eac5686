"""The QDQ inserter: ONNX Runtime's ``QDQQuantizer`` applied to exactly the nodes placement chose."""

from __future__ import annotations

import logging
import warnings
from typing import Collection, Optional

import onnx

from graphprune.ir import clone, value_shape
from graphprune.quantization.channel_weights import fast_quantizer_class, vectorized_channels
from graphprune.quantization.config import QuantConfig
from graphprune.quantization.float_layers import keep_float_layers_float
from graphprune.quantization.indexed_model import indexed_quantizer
from graphprune.weights_on_disk import files_kept_open, reading_weights_from
from graphprune.quantization.stem import space_to_depth_stems

__all__ = ["insert_qdq_nodes"]

# What the quantizer's rewrites of the node list leave behind per node (see the end of insert_qdq_nodes).
_NODE_GARBAGE_BYTES = 1024


def insert_qdq_nodes(
    model: onnx.ModelProto, ranges, nodes: Collection[str], config: QuantConfig, source_dir: Optional[str] = None
) -> onnx.ModelProto:
    """A copy of ``model`` with QuantizeLinear/DequantizeLinear pairs around ``nodes``.

    Weights become symmetric int8 (per output channel unless ``config.per_channel`` is off), biases
    int32 with scale = input scale x weight scale, activations ``config.activation_type`` with the
    calibrated ``ranges``.  Relu/Clip behind a quantized op are folded into its output range.
    Stride-2 convs on thin (RGB) inputs are then rewritten over ``SpaceToDepth`` (``stem.py``), the
    same integer arithmetic with a kernel layout ORT's int8 convolution runs faster.  Float
    Conv/ConvTranspose/Gemm layers behind an int8 producer read a per-axis DequantizeLinear, so
    that ORT's ``WeightBiasQuantization`` leaves them float (``float_layers.py``).

    Args:
        model: a prepared model (see ``prepare``): every node named, shapes inferred.
        ranges: the ``TensorsData`` from ``calibrate``.
        nodes: names of the nodes to quantize; an empty collection returns an unchanged copy.
        config: the quantization settings.
        source_dir: the folder of the weights ``model`` left on disk: the copy is then only the
            graph and records, and each weight is read when the quantizer needs it (its int8
            form is what stays in memory; unquantized weights stay records).
    """
    copy = clone(model)
    if not nodes:
        return copy
    if not any(p.key == "onnx.infer" for p in copy.metadata_props):
        # ``prepare`` inferred the shapes; without this mark ORT's quantizer saves the model, infers
        # them again and reloads it: a whole copy of every weight (and weights left on disk are lost).
        copy.metadata_props.add(key="onnx.infer", value="onnxruntime.quant")
    weight_type, activation_type = config.ort_types()
    names = set(nodes)
    op_types = sorted({n.op_type for n in copy.graph.node if n.name in names})
    # The quantizer logs routine decisions (skipped tensors without ranges) as warnings.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        # each weight is read twice (its scales, then its int8 values): one descriptor for all reads
        with reading_weights_from(source_dir), files_kept_open(), indexed_quantizer(), vectorized_channels():
            quantizer = fast_quantizer_class()(
                copy,
                config.per_channel,
                False,  # reduce_range: only for pre-VNNI CPUs, costs accuracy
                weight_type,
                activation_type,
                ranges,
                names,  # a set: ORT tests each node's membership (a list made that quadratic)
                [],
                op_types,
                {},
            )
            quantizer.quantize_model()
            quantizer.model.topological_sort()
    finally:
        logger.setLevel(level)
    result = quantizer.model.model
    shapes = _shapes(model)
    space_to_depth_stems(result, shapes)
    exposed = keep_float_layers_float(result, shapes)
    if exposed:
        warnings.warn(
            f"float layer(s) {', '.join(exposed)} read a one-channel int8 tensor: onnxruntime >= 1.21 quantizes "
            "their weights unless the session disables that optimizer: "
            "InferenceSession(..., disabled_optimizers=['WeightBiasQuantization'])"
        )
    result.producer_name = model.producer_name
    result.producer_version = model.producer_version
    # Each rewrite of the node list (the quantizer's clean-up and sort, the float layers' inserts)
    # leaves the old nodes in the message's memory until the whole message goes: ~0.5 KB a node a
    # rewrite (26 MB on the 20k-node graph), two rewrites at least.  A copy holds only the model,
    # and that memory is free again before ONNX Runtime loads it to measure its error; it pays
    # when the tensors it copies meanwhile weigh less (many small nodes, not a few large weights).
    tensor_bytes = sum(len(t.raw_data) for t in result.graph.initializer)
    if tensor_bytes < _NODE_GARBAGE_BYTES * len(result.graph.node):
        fresh = onnx.ModelProto()
        fresh.CopyFrom(result)
        return fresh
    return result


def _shapes(model: onnx.ModelProto):
    """Tensor name -> declared shape of the inputs and value_info (``stem_check`` needs only int dims)."""
    declared = ((vi.name, value_shape(vi)) for vi in list(model.graph.input) + list(model.graph.value_info))
    return {name: shape for name, shape in declared if shape is not None}
