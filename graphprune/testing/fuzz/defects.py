"""Structural defects: small edits of ``conv_model``'s parts (attributes out of range, bad initializers,
conflicting value_info, unknown ops, malformed mask metadata) and the list the ``structure`` family runs."""

from __future__ import annotations

from typing import List

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphprune.testing.fuzz.models import conv_model


def set_attr(node_name: str, attr: str, value):
    def edit(parts):
        node = next(n for n in parts["nodes"] if n.name == node_name)
        for a in list(node.attribute):
            if a.name == attr:
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute(attr, value))
    return edit


def replace_init(name: str, tensor_fn):
    def edit(parts):
        parts["inits"] = [tensor_fn(t) if t.name == name else t for t in parts["inits"]]
    return edit


def nan_weight(value: float):
    def fn(t):
        a = numpy_helper.to_array(t).copy()
        a.flat[0] = value
        return numpy_helper.from_array(a, t.name)
    return fn


def negative_dims(t):
    bad = TensorProto()
    bad.CopyFrom(t)
    bad.dims[0] = -bad.dims[0]
    return bad


def short_raw(t):
    bad = TensorProto()
    bad.CopyFrom(t)
    bad.raw_data = bad.raw_data[: len(bad.raw_data) // 2]
    return bad


def conflicting_vi(parts):
    parts["value_info"].append(helper.make_tensor_value_info("h3", TensorProto.FLOAT, ["N", 7, 8, 8]))


def conflicting_type(parts):
    parts["value_info"].append(helper.make_tensor_value_info("h2", TensorProto.INT64, ["N", 4, 8, 8]))


def dangling(parts):
    parts["nodes"][3].input[1] = "missing.w"


def unknown_op(parts):
    parts["nodes"][2] = helper.make_node("NoSuchOp", ["h2"], ["h3"], name="relu")


def pool_edit(attr, value):
    def edit(parts):
        parts["nodes"][4] = helper.make_node("MaxPool", ["h4"], ["h4p"], name="pool", kernel_shape=[2, 2], strides=[2, 2])
        parts["nodes"].insert(5, helper.make_node("GlobalAveragePool", ["h4p"], ["h5"], name="gap"))
        set_attr("pool", attr, value)(parts)
    return edit


def conv_transpose(attr, value):
    def edit(parts):
        parts["inits"].append(numpy_helper.from_array(np.ones((4, 4, 2, 2), np.float32), "ct.w"))
        parts["nodes"][3] = helper.make_node("ConvTranspose", ["h3", "ct.w"], ["h4"], name="conv2", strides=[1, 1])
        set_attr("conv2", attr, value)(parts)
    return edit


def negative_input_dim(parts):
    parts["inputs"][0] = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, -8, 8])


def structure_defects() -> List[tuple]:
    """(name, model, expect) for every structural defect."""
    defects = [
        ("conv_stride0", conv_model(edit=set_attr("conv1", "strides", [0, 1])), "error", True),
        ("conv_stride_neg", conv_model(edit=set_attr("conv1", "strides", [-1, 1])), "error", True),
        ("conv_dilation0", conv_model(edit=set_attr("conv1", "dilations", [0, 1])), "error", True),
        ("conv_pad_neg", conv_model(edit=set_attr("conv1", "pads", [-1, 1, 1, 1])), "error", True),
        ("conv_kernel0", conv_model(edit=set_attr("conv1", "kernel_shape", [0, 3])), "error", True),
        ("conv_group0", conv_model(edit=set_attr("conv2", "group", 0)), "error", True),
        ("conv_group3", conv_model(edit=set_attr("conv2", "group", 3)), "error", True),
        ("conv_pads_len", conv_model(edit=set_attr("conv1", "pads", [1, 1])), "error", True),
        ("pool_stride0", conv_model(edit=pool_edit("strides", [0, 2])), "error", True),
        ("pool_kernel0", conv_model(edit=pool_edit("kernel_shape", [0, 2])), "error", True),
        ("convT_stride0", conv_model(edit=conv_transpose("strides", [0, 1])), "error", True),
        ("convT_dilation0", conv_model(edit=conv_transpose("dilations", [1, 0])), "error", True),
        ("zero_channels", conv_model(channels=0), "error", False),
        ("opset99", conv_model(opset=99), "error", False),
        ("opset5", conv_model(opset=5), "error", False),
        ("neg_init_dims", conv_model(edit=replace_init("c1.w", negative_dims)), "error", False),
        ("short_raw", conv_model(edit=replace_init("c2.w", short_raw)), "error", False),
        ("nan_weight", conv_model(edit=replace_init("c2.w", nan_weight(float("nan")))), "error", False),
        ("inf_weight", conv_model(edit=replace_init("fc.w", nan_weight(float("inf")))), "error", False),
        ("inf_bn_var", conv_model(edit=replace_init("bn.v", nan_weight(float("inf")))), "error", False),
        ("conflicting_vi", conv_model(edit=conflicting_vi), "error", False),
        ("conflicting_type", conv_model(edit=conflicting_type), "error", False),
        ("dangling_input", conv_model(edit=dangling), "error", False),
        ("unknown_op", conv_model(edit=unknown_op), "error", False),
        ("neg_input_dim", conv_model(edit=negative_input_dim), "error", False),
        ("fixed_batch", conv_model(batch=2), "ok", False),
    ]
    for name, value in [("pc_not_json", "{"), ("pc_list", "[1, 2]"), ("pc_bad_axis", '{"c1.w": {"9": [0]}}'),
                        ("pc_bad_index", '{"c1.w": {"0": [99]}}'), ("pc_str", '{"c1.w": "x"}'),
                        ("wm_not_json", None), ("wm_bad_version", None)]:
        model = conv_model()
        key, text = "graphprune.pruned_channels", value
        if name == "wm_not_json":
            key, text = "graphprune.weight_masks", "not json"
        elif name == "wm_bad_version":
            key, text = "graphprune.weight_masks", '{"version": 7, "weights": {}}'
        model.metadata_props.add(key=key, value=text)
        defects.append((name, model, "ok", False))  # ignored with a warning
    bad_ir = conv_model()
    bad_ir.ir_version = 99
    defects.append(("ir99", bad_ir, "any", False))
    return defects


