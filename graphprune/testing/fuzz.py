"""Seeded generator of malformed (and odd but valid) inputs for the command line, in families.

Each ``FuzzCase`` is a set of files to write into an empty folder and a ``graphprune`` argument list
naming them through ``{d}`` (the folder); ``expect`` says what a correct CLI does with it:
``"error"`` (exit 2, one line naming the problem), ``"ok"`` (exit 0 and a valid output) or ``"any"``
(either).  Cases marked ``isolate`` crashed the whole process once (SIGFPE, SIGSEGV): tests run
them in a subprocess.  ``tests/test_fuzz.py`` runs the cases; ``cases(seed)`` is deterministic.

Families:
  - ``model_bytes``: truncated, bit-flipped, empty, garbage or non-ONNX model files;
  - ``structure``: defects built with ``onnx.helper`` (Conv stride 0, negative pads, group not dividing
    the channels, opset 99, negative or zero dims, conflicting value_info, NaN/Inf weights, raw data of
    the wrong length, dangling inputs, malformed mask metadata...);
  - ``npz``: bad sample files (zero samples, NaN/Inf, wrong rank or dims, a ``.npy`` as ``.npz``,
    labels of the wrong rank) and odd good ones (scalar and integer inputs);
  - ``recipe``: bad recipe files (``round_to: 1.5``, a FIFO, an oversized file, bad YAML) and ``--pass`` specs;
  - ``args``: out-of-range numeric options (``--threads`` huge, ratios NaN...);
  - ``output``: odd output paths (a directory, a missing folder, the input itself, a data file of the run).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["FuzzCase", "cases", "conv_model", "scalar_input_model", "FAMILIES"]

FAMILIES = ("model_bytes", "structure", "npz", "recipe", "args", "output")

# Commands a model-level defect is tried against (each case picks one; quantize without timing).
_MODEL_COMMANDS: Dict[str, List[str]] = {
    "inspect": ["inspect", "{d}/model.onnx"],
    "prune": ["prune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--ratio", "0.5"],
    "sparsify": ["sparsify", "{d}/model.onnx", "-o", "{d}/out.onnx", "--sparsity", "0.5"],
    "quantize": ["quantize", "{d}/model.onnx", "-o", "{d}/out.onnx", "--no-measure", "--calibration-samples", "4",
                 "--input-shape", "x=1x3x8x8"],
    "run": ["run", "{d}/model.onnx", "-o", "{d}/out.onnx", "--pass", "prune:ratio=0.25"],
    "validate": ["validate", "{d}/model.onnx", "{d}/model.onnx", "--samples", "2", "--runs", "1",
                 "--input-shape", "x=1x3x8x8"],
    "finetune": ["finetune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--data", "{d}/data.npz",
                 "--teacher", "{d}/model.onnx", "--epochs", "1", "--val-split", "0"],
}


@dataclass
class FuzzCase:
    """One malformed input: files to write, the argument list, what a correct CLI does."""

    id: str
    family: str
    argv: List[str]
    files: Dict[str, bytes] = field(default_factory=dict)
    expect: str = "any"  # "error" | "ok" | "any"
    isolate: bool = False  # run in a subprocess (once crashed the process)
    fifos: Sequence[str] = ()  # names to create as FIFOs
    dirs: Sequence[str] = ()  # names to create as folders

    def materialize(self, folder: str) -> List[str]:
        """Write the files into ``folder``; return the argument list with ``{d}`` filled in."""
        import os

        for name in self.dirs:
            os.makedirs(os.path.join(folder, name), exist_ok=True)
        for name, content in self.files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(content)
        for name in self.fifos:
            os.mkfifo(os.path.join(folder, name))
        return [a.replace("{d}", folder) for a in self.argv]


# ---------------------------------------------------------------------------- base models


def conv_model(batch="N", channels: int = 3, opset: int = 17, seed: int = 0,
               edit: Optional[Callable[[dict], None]] = None) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm on [batch, channels, 8, 8].

    ``edit`` receives the parts (``nodes``, ``inits``, ``inputs``, ``outputs``, ``value_info``) before
    the graph is made: structural defects are small edits of this one model.
    """
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.3

    inits = {
        "c1.w": w(4, channels, 3, 3), "c1.b": w(4),
        "bn.s": np.ones(4, np.float32), "bn.b": np.zeros(4, np.float32),
        "bn.m": np.zeros(4, np.float32), "bn.v": np.ones(4, np.float32),
        "c2.w": w(4, 4, 3, 3), "c2.b": w(4),
        "fc.w": w(10, 4), "fc.b": w(10),
    }
    parts = {
        "nodes": [
            helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["h1"], name="conv1", pads=[1, 1, 1, 1], strides=[1, 1]),
            helper.make_node("BatchNormalization", ["h1", "bn.s", "bn.b", "bn.m", "bn.v"], ["h2"], name="bn"),
            helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
            helper.make_node("Conv", ["h3", "c2.w", "c2.b"], ["h4"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["h4"], ["h5"], name="gap"),
            helper.make_node("Flatten", ["h5"], ["h6"], name="flatten"),
            helper.make_node("Gemm", ["h6", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
        ],
        "inits": [numpy_helper.from_array(v, k) for k, v in inits.items()],
        "inputs": [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, 8, 8])],
        "outputs": [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        "value_info": [],
        "opset": opset,
    }
    if edit:
        edit(parts)
    graph = helper.make_graph(parts["nodes"], "fuzz", parts["inputs"], parts["outputs"], parts["inits"],
                              value_info=parts["value_info"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", parts["opset"])], ir_version=8)


def scalar_input_model(int_input: bool = False) -> onnx.ModelProto:
    """A voice-activity-like MLP with a rank-0 int64 input ``sr`` beside ``x`` [N, 16] (``tokens`` int64 optional)."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "srf"], ["xs"]),
        helper.make_node("MatMul", ["xs", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hr"]),
        helper.make_node("MatMul", ["hr", "w2"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    if int_input:  # an integer input per sample (token ids) feeding a Gather
        inits.append(numpy_helper.from_array(rng.standard_normal((20, 4)).astype(np.float32), "emb"))
        nodes += [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("Add", ["y", "e"], ["y2"])]
        nodes[-1].output[0] = "out"
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]))
        outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])]
    else:
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    graph = helper.make_graph(nodes, "vad", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _good_x(n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------------------- structural defects


def _set_attr(node_name: str, attr: str, value):
    def edit(parts):
        node = next(n for n in parts["nodes"] if n.name == node_name)
        for a in list(node.attribute):
            if a.name == attr:
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute(attr, value))
    return edit


def _replace_init(name: str, tensor_fn):
    def edit(parts):
        parts["inits"] = [tensor_fn(t) if t.name == name else t for t in parts["inits"]]
    return edit


def _nan_weight(value: float):
    def fn(t):
        a = numpy_helper.to_array(t).copy()
        a.flat[0] = value
        return numpy_helper.from_array(a, t.name)
    return fn


def _negative_dims(t):
    bad = TensorProto()
    bad.CopyFrom(t)
    bad.dims[0] = -bad.dims[0]
    return bad


def _short_raw(t):
    bad = TensorProto()
    bad.CopyFrom(t)
    bad.raw_data = bad.raw_data[: len(bad.raw_data) // 2]
    return bad


def _conflicting_vi(parts):
    parts["value_info"].append(helper.make_tensor_value_info("h3", TensorProto.FLOAT, ["N", 7, 8, 8]))


def _conflicting_type(parts):
    parts["value_info"].append(helper.make_tensor_value_info("h2", TensorProto.INT64, ["N", 4, 8, 8]))


def _dangling(parts):
    parts["nodes"][3].input[1] = "missing.w"


def _unknown_op(parts):
    parts["nodes"][2] = helper.make_node("NoSuchOp", ["h2"], ["h3"], name="relu")


def _pool_edit(attr, value):
    def edit(parts):
        parts["nodes"][4] = helper.make_node("MaxPool", ["h4"], ["h4p"], name="pool", kernel_shape=[2, 2], strides=[2, 2])
        parts["nodes"].insert(5, helper.make_node("GlobalAveragePool", ["h4p"], ["h5"], name="gap"))
        _set_attr("pool", attr, value)(parts)
    return edit


def _conv_transpose(attr, value):
    def edit(parts):
        parts["inits"].append(numpy_helper.from_array(np.ones((4, 4, 2, 2), np.float32), "ct.w"))
        parts["nodes"][3] = helper.make_node("ConvTranspose", ["h3", "ct.w"], ["h4"], name="conv2", strides=[1, 1])
        _set_attr("conv2", attr, value)(parts)
    return edit


def _negative_input_dim(parts):
    parts["inputs"][0] = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, -8, 8])


def _structure_defects() -> List[tuple]:
    """(name, model, expect) for every structural defect."""
    defects = [
        ("conv_stride0", conv_model(edit=_set_attr("conv1", "strides", [0, 1])), "error", True),
        ("conv_stride_neg", conv_model(edit=_set_attr("conv1", "strides", [-1, 1])), "error", True),
        ("conv_dilation0", conv_model(edit=_set_attr("conv1", "dilations", [0, 1])), "error", True),
        ("conv_pad_neg", conv_model(edit=_set_attr("conv1", "pads", [-1, 1, 1, 1])), "error", True),
        ("conv_kernel0", conv_model(edit=_set_attr("conv1", "kernel_shape", [0, 3])), "error", True),
        ("conv_group0", conv_model(edit=_set_attr("conv2", "group", 0)), "error", True),
        ("conv_group3", conv_model(edit=_set_attr("conv2", "group", 3)), "error", True),
        ("conv_pads_len", conv_model(edit=_set_attr("conv1", "pads", [1, 1])), "error", True),
        ("pool_stride0", conv_model(edit=_pool_edit("strides", [0, 2])), "error", True),
        ("pool_kernel0", conv_model(edit=_pool_edit("kernel_shape", [0, 2])), "error", True),
        ("convT_stride0", conv_model(edit=_conv_transpose("strides", [0, 1])), "error", True),
        ("convT_dilation0", conv_model(edit=_conv_transpose("dilations", [1, 0])), "error", True),
        ("zero_channels", conv_model(channels=0), "error", False),
        ("opset99", conv_model(opset=99), "error", False),
        ("opset5", conv_model(opset=5), "error", False),
        ("neg_init_dims", conv_model(edit=_replace_init("c1.w", _negative_dims)), "error", False),
        ("short_raw", conv_model(edit=_replace_init("c2.w", _short_raw)), "error", False),
        ("nan_weight", conv_model(edit=_replace_init("c2.w", _nan_weight(float("nan")))), "error", False),
        ("inf_weight", conv_model(edit=_replace_init("fc.w", _nan_weight(float("inf")))), "error", False),
        ("inf_bn_var", conv_model(edit=_replace_init("bn.v", _nan_weight(float("inf")))), "error", False),
        ("conflicting_vi", conv_model(edit=_conflicting_vi), "error", False),
        ("conflicting_type", conv_model(edit=_conflicting_type), "error", False),
        ("dangling_input", conv_model(edit=_dangling), "error", False),
        ("unknown_op", conv_model(edit=_unknown_op), "error", False),
        ("neg_input_dim", conv_model(edit=_negative_input_dim), "error", False),
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


# ---------------------------------------------------------------------------- families


def _model_bytes_cases(rng: random.Random) -> List[FuzzCase]:
    good = _bytes(conv_model())
    out: List[FuzzCase] = []
    commands = list(_MODEL_COMMANDS)
    variants = [("empty", b""), ("garbage", bytes(rng.getrandbits(8) for _ in range(300))),
                ("npy_as_model", _npy(np.zeros((2, 3), np.float32))), ("text", b"hello: world\n")]
    for cut in (1, 2, 7, 64, len(good) // 3, len(good) // 2, len(good) - 5, len(good) - 1):
        variants.append((f"truncated{cut}", good[:cut]))
    for k in range(12):
        flipped = bytearray(good)
        for _ in range(1 + k % 4):
            pos = rng.randrange(len(flipped))
            flipped[pos] ^= 1 << rng.randrange(8)
        variants.append((f"bitflip{k}", bytes(flipped)))
    data = _npz(x=_good_x())
    for i, (name, content) in enumerate(variants):
        for j in range(2):
            command = commands[(i * 2 + j) % len(commands)]
            out.append(FuzzCase(f"model_bytes/{name}/{command}", "model_bytes", list(_MODEL_COMMANDS[command]),
                                {"model.onnx": content, "data.npz": data}, "any" if name.startswith("bitflip") else "error"))
    return out


def _structure_cases(rng: random.Random) -> List[FuzzCase]:
    out = []
    data = _npz(x=_good_x())
    commands = list(_MODEL_COMMANDS)
    for i, (name, model, expect, isolate) in enumerate(_structure_defects()):
        picks = commands if isolate else [commands[(i + k) % len(commands)] for k in range(3)]
        for command in picks:
            if command in ("finetune", "validate", "quantize") and name == "fixed_batch":
                continue  # their --input-shape x=1x3x8x8 does not fit a fixed batch of 2; prune/run cover it
            expect_here = expect
            if name.startswith(("pc_", "wm_")) and command == "finetune":
                expect_here = "any"
            out.append(FuzzCase(f"structure/{name}/{command}", "structure", list(_MODEL_COMMANDS[command]),
                                {"model.onnx": _bytes(model), "data.npz": data}, expect_here, isolate))
    return out


def _npz_cases(rng: random.Random) -> List[FuzzCase]:
    model = _bytes(conv_model())
    x = _good_x()
    nan = x.copy()
    nan[1, 0, 0, 0] = np.nan
    inf = x.copy()
    inf[0, 2, 3, 3] = -np.inf
    npy = io.BytesIO()
    np.save(npy, x)
    variants = [
        ("zero_samples", _npz(x=x[:0]), "error"),
        ("nan", _npz(x=nan), "error"),
        ("inf", _npz(x=inf), "error"),
        ("rank3", _npz(x=x[:, 0]), "error"),
        ("rank0", _npz(x=np.float32(1.0)), "error"),
        ("wrong_dims", _npz(x=x[:, :, :4]), "error"),
        ("wrong_channels", _npz(x=np.concatenate([x, x], axis=1)), "error"),
        ("npy_as_npz", npy.getvalue(), "error"),
        ("text", b"not an npz", "error"),
        ("empty_file", b"", "error"),
        ("no_arrays", _npz(), "error"),
        ("missing_key", _npz(z=x), "error"),
        ("int_for_float", _npz(x=x.astype(np.int32)), "error"),
        ("bool_for_float", _npz(x=x > 0), "error"),
        ("float64", _npz(x=x.astype(np.float64)), "ok"),
        ("complex", _npz(x=x.astype(np.complex64)), "error"),
        ("object_pickle", None, "error"),
        ("truncated", _npz(x=x)[:200], "error"),
    ]
    out = []
    cmds = {
        "prune": ["prune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--ratio", "0.5", "--criterion", "activation", "--data", "{d}/data.npz"],
        "quantize": _MODEL_COMMANDS["quantize"][:-2] + ["--data", "{d}/data.npz"],
        "validate": ["validate", "{d}/model.onnx", "{d}/model.onnx", "--data", "{d}/data.npz", "--runs", "1"],
        "finetune": _MODEL_COMMANDS["finetune"],
        "run": ["run", "{d}/model.onnx", "-o", "{d}/out.onnx", "--pass", "prune:ratio=0.25,criterion=activation",
                "--data", "{d}/data.npz"],
    }
    for i, (name, content, expect) in enumerate(variants):
        if content is None:  # an object array (needs pickle to read)
            buf = io.BytesIO()
            np.savez(buf, x=np.array([object()], dtype=object))
            content = buf.getvalue()
        for k in range(2):
            command = list(cmds)[(i + k) % len(cmds)]
            out.append(FuzzCase(f"npz/{name}/{command}", "npz", list(cmds[command]),
                                {"model.onnx": model, "data.npz": content}, expect))
    labels_cmd = ["finetune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--data", "{d}/data.npz", "--labels", "y",
                  "--epochs", "1", "--val-split", "0"]
    for name, labels, expect in [("labels_rank3", np.zeros((8, 2, 2), np.int64), "error"),
                                 ("labels_count", np.zeros(5, np.int64), "error"),
                                 ("labels_nan", np.array([np.nan] * 8, np.float32), "error"),
                                 ("labels_out_of_range", np.full(8, 50, np.int64), "error"),
                                 ("labels_negative", np.full(8, -3, np.int64), "error"),
                                 ("labels_string", np.array(["a"] * 8), "error"),
                                 ("labels_ok", np.arange(8, dtype=np.int64) % 10, "ok")]:
        out.append(FuzzCase(f"npz/{name}/finetune", "npz", list(labels_cmd),
                            {"model.onnx": model, "data.npz": _npz(x=x, y=labels)}, expect))
    # scalar (rank-0) and integer inputs are first-class
    vad = _bytes(scalar_input_model())
    vad_int = _bytes(scalar_input_model(int_input=True))
    xs = np.random.default_rng(2).standard_normal((6, 16)).astype(np.float32)
    ids = np.arange(6, dtype=np.int64) % 20
    scalar_cmds = {
        "prune": ["prune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--ratio", "0.5", "--criterion", "activation", "--data", "{d}/data.npz"],
        "quantize": _MODEL_COMMANDS["quantize"][:-2] + ["--data", "{d}/data.npz"],
        "validate": ["validate", "{d}/model.onnx", "{d}/model.onnx", "--data", "{d}/data.npz", "--runs", "1"],
        "sparsify": _MODEL_COMMANDS["sparsify"],
        "validate_random": ["validate", "{d}/model.onnx", "{d}/model.onnx", "--samples", "2", "--runs", "1",
                            "--input-shape", "x=1x16"],
    }
    for name, content, expect in [
        ("scalar_shared", _npz(x=xs, sr=np.array(16000, np.int64)), "ok"),
        ("scalar_per_sample", _npz(x=xs, sr=np.full(6, 16000, np.int64)), "ok"),
        ("scalar_int32", _npz(x=xs, sr=np.array(8000, np.int32)), "ok"),
        ("scalar_varying", _npz(x=xs, sr=np.arange(6, dtype=np.int64)), "error"),
        ("scalar_rank2", _npz(x=xs, sr=np.zeros((6, 2), np.int64)), "error"),
        ("scalar_float", _npz(x=xs, sr=np.array(1.5, np.float32)), "error"),
    ]:
        for command in scalar_cmds:
            if command in ("sparsify", "validate_random") and name != "scalar_shared":
                continue
            out.append(FuzzCase(f"npz/{name}/{command}", "npz", list(scalar_cmds[command]),
                                {"model.onnx": vad, "data.npz": content}, expect))
    for command in ("prune", "validate", "quantize"):
        out.append(FuzzCase(f"npz/int_input/{command}", "npz", list(scalar_cmds[command]),
                            {"model.onnx": vad_int, "data.npz": _npz(x=xs, sr=np.array(16000, np.int64), ids=ids)}, "ok"))
        out.append(FuzzCase(f"npz/int_input_float/{command}", "npz", list(scalar_cmds[command]),
                            {"model.onnx": vad_int, "data.npz": _npz(x=xs, sr=np.array(16000, np.int64),
                                                                     ids=ids.astype(np.float32))}, "error"))
    return out


def _recipe_cases(rng: random.Random) -> List[FuzzCase]:
    model = _bytes(conv_model())
    run = ["run", "{d}/model.onnx", "-o", "{d}/out.onnx", "--recipe", "{d}/recipe.yaml"]
    recipes = [
        ("round_to_1.5", "passes:\n  - prune: {ratio: 0.5, round_to: 1.5}\n", "error"),
        ("round_to_0", "passes:\n  - prune: {ratio: 0.5, round_to: 0}\n", "error"),
        ("round_to_str", "passes:\n  - prune: {ratio: 0.5, round_to: 'x'}\n", "error"),
        ("round_to_true", "passes:\n  - prune: {ratio: 0.5, round_to: true}\n", "error"),
        ("ratio_2", "passes:\n  - prune: {ratio: 2}\n", "error"),
        ("ratio_neg", "passes:\n  - prune: {ratio: -0.5}\n", "error"),
        ("ratio_nan", "passes:\n  - prune: {ratio: .nan}\n", "error"),
        ("ratio_inf", "passes:\n  - prune: {ratio: .inf}\n", "error"),
        ("ratio_str", "passes:\n  - prune: {ratio: half}\n", "error"),
        ("ratio_list", "passes:\n  - prune: {ratio: [1, 2]}\n", "error"),
        ("ratio_null", "passes:\n  - prune: {ratio: null}\n", "any"),
        ("sparsity_nan", "passes:\n  - sparsify: {sparsity: .nan}\n", "error"),
        ("sparsity_1", "passes:\n  - sparsify: {sparsity: 1.0}\n", "error"),
        ("pattern_bad", "passes:\n  - sparsify: {pattern: '5:4'}\n", "error"),
        ("pattern_zero", "passes:\n  - sparsify: {pattern: '0:4'}\n", "error"),
        ("unknown_pass", "passes:\n  - nosuchpass\n", "error"),
        ("unknown_arg", "passes:\n  - prune: {ratio: 0.5, color: red}\n", "error"),
        ("args_list", "passes:\n  - prune: [1, 2]\n", "error"),
        ("two_keys", "passes:\n  - {prune: {}, sparsify: {}}\n", "error"),
        ("no_passes", "other: 1\n", "error"),
        ("empty_passes", "passes: []\n", "error"),
        ("passes_str", "passes: prune\n", "error"),
        ("not_yaml", "passes: [\n  - {\n", "error"),
        ("binary", None, "error"),
        ("empty", "", "error"),
        ("list_top", "- prune\n", "error"),
        ("pass_int", "passes:\n  - 7\n", "error"),
        ("yaml_tag", "passes: !!python/object:os.system {}\n", "error"),
        ("mode_bad", "passes:\n  - prune: {ratio: 0.5, mode: shred}\n", "error"),
        ("criterion_bad", "passes:\n  - prune: {ratio: 0.5, criterion: vibes}\n", "error"),
        ("max_group_2", "passes:\n  - prune: {ratio: 0.5, global_ranking: true, max_group_ratio: 2}\n", "error"),
        ("quantize_samples0", "passes:\n  - quantize: {calibration_samples: 0, measure: false}\n", "error"),
        ("quantize_threads_neg", "passes:\n  - quantize: {threads: -2, measure: false}\n", "error"),
        ("ok", "passes:\n  - prune: {ratio: 0.5, round_to: 2}\n", "ok"),
    ]
    out = []
    for name, text, expect in recipes:
        content = bytes(rng.getrandbits(8) for _ in range(200)) if text is None else text.encode()
        out.append(FuzzCase(f"recipe/{name}", "recipe", list(run), {"model.onnx": model, "recipe.yaml": content}, expect))
    out.append(FuzzCase("recipe/huge", "recipe", list(run),
                        {"model.onnx": model, "recipe.yaml": b"passes:\n  - prune: {ratio: 0.5}\n" + b"#" * (3 << 20)}, "error"))
    out.append(FuzzCase("recipe/fifo", "recipe", list(run), {"model.onnx": model}, "error", fifos=["recipe.yaml"]))
    out.append(FuzzCase("recipe/directory", "recipe", list(run), {"model.onnx": model}, "error", dirs=["recipe.yaml"]))
    out.append(FuzzCase("recipe/missing", "recipe", list(run), {"model.onnx": model}, "error"))
    specs = [("prune:ratio=2", "error"), (":ratio=0.5", "error"), ("prune:ratio", "error"), ("nosuch", "error"),
             ("prune:round_to=1.5", "error"), ("prune:ratio=nan", "error"), ("sparsify:sparsity=inf", "error"),
             ("prune:ratio=[", "error"), ("prune:ratio=0.5,ratio=0.6", "any"), ("prune:ratio=-1", "error"),
             ("sparsify:pattern=2:4", "ok"), ("prune:ratio=0.5,exclude=[conv1", "error"), ("", "error"),
             ("prune:ratio=0.5,round_to=-4", "error"), ("quantize:calibration_samples=-1", "error"),
             ("canonicalize", "ok"), ("prune:ratio=1", "error"), ("prune:ratio=0.3", "ok")]
    for i, (spec, expect) in enumerate(specs):
        out.append(FuzzCase(f"recipe/pass{i}:{spec}", "recipe",
                            ["run", "{d}/model.onnx", "-o", "{d}/out.onnx", "--pass", spec], {"model.onnx": model}, expect))
    return out


def _args_cases(rng: random.Random) -> List[FuzzCase]:
    model = _bytes(conv_model())
    files = {"model.onnx": model, "data.npz": _npz(x=_good_x(), y=np.arange(8, dtype=np.int64) % 10)}
    prune = ["prune", "{d}/model.onnx", "-o", "{d}/out.onnx"]
    ft = ["finetune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--data", "{d}/data.npz", "--labels", "y",
          "--epochs", "1", "--val-split", "0"]
    quant = ["quantize", "{d}/model.onnx", "-o", "{d}/out.onnx", "--calibration-samples", "4", "--input-shape", "x=1x3x8x8"]
    val = ["validate", "{d}/model.onnx", "{d}/model.onnx", "--samples", "2", "--runs", "1"]
    spars = ["sparsify", "{d}/model.onnx", "-o", "{d}/out.onnx"]
    cases = [
        (prune + ["--ratio", "nan"], "error"), (prune + ["--ratio", "inf"], "error"), (prune + ["--ratio", "-0.1"], "error"),
        (prune + ["--ratio", "1"], "error"), (prune + ["--ratio", "abc"], "error"), (prune + ["--ratio", "1e400"], "error"),
        (prune + ["--ratio", "0.5", "--round-to", "0"], "error"), (prune + ["--ratio", "0.5", "--round-to", "-3"], "error"),
        (prune + ["--ratio", "0.5", "--round-to", str(2**70)], "any"),
        (prune + ["--ratio", "0.5", "--max-group-ratio", "2"], "error"), (prune + ["--ratio", "0.5", "--max-group-ratio", "nan"], "error"),
        (prune + ["--ratio", "0.5", "--heads-ratio", "nan"], "error"), (prune + ["--ratio", "0.5", "--criterion", "x"], "error"),
        (prune + ["--ratio", "0.5", "--input-shape", "x=0x3"], "error"), (prune + ["--ratio", "0.5", "--input-shape", "x=ax3"], "error"),
        (prune + ["--ratio", "0.5", "--input-shape", "nosuch=1x3x8x8"], "any"),
        (prune + ["--ratio", "0.5", "--input-shape", "x=1x3x8"], "any"),
        (spars + ["--sparsity", "nan"], "error"), (spars + ["--sparsity", "1"], "error"), (spars + ["--pattern", "5:4"], "error"),
        (spars + ["--pattern", "0:4"], "error"), (spars + ["--pattern", "2:0"], "error"), (spars + ["--pattern", "a:b"], "error"),
        (spars + ["--sparsity", "0.5", "--max-layer-sparsity", "inf"], "error"),
        (quant + ["--threads", "0"], "error"), (quant + ["--threads", "-1"], "error"),
        (quant + ["--threads", str(10**9)], "error"), (quant + ["--threads", str(2**40)], "error"),
        (quant + ["--calibration-samples", "0"], "error"), (quant + ["--calibration-samples", "-5"], "error"),
        (quant + ["--max-error", "nan"], "error"), (quant + ["--max-error", "-1"], "error"),
        (val + ["--threads", "0"], "error"), (val + ["--threads", str(10**6)], "error"), (val + ["--threads", "-4"], "error"),
        (val + ["--samples", "0"], "error"), (val + ["--samples", "-1"], "error"), (val + ["--samples", str(10**12)], "error"),
        (val + ["--runs", "0"], "error"), (val + ["--runs", "-2"], "error"), (val + ["--runs", str(10**12)], "error"),
        (ft + ["--threads", "0"], "error"), (ft + ["--threads", str(10**6)], "error"),
        (ft + ["--lr", "nan"], "error"), (ft + ["--lr", "inf"], "error"), (ft + ["--lr", "0"], "error"),
        (ft + ["--batch-size", "0"], "error"), (ft + ["--epochs", "-1"], "error"), (ft + ["--epochs", str(10**12)], "error"),
        (ft + ["--batch-size", str(10**12)], "any"), (ft + ["--val-split", "1"], "error"), (ft + ["--val-split", "nan"], "error"),
        (ft + ["--weight-decay", "nan"], "error"), (ft + ["--temperature", "nan"], "error"), (ft + ["--temperature", "0"], "error"),
        (ft + ["--distill-weight", "2"], "error"), (ft + ["--seed", "-1"], "error"), (ft + ["--seed", str(2**70)], "error"),
        (ft + ["--steps", "0"], "error"), (ft + ["--prune-ratio", "nan"], "error"), (ft + ["--prune-ratio", "0.5", "--steps", str(10**9)], "error"),
        (ft + ["--providers", "NoSuchEP"], "error"), (ft + ["--lr", "1e30"], "any"),
        (["inspect", "{d}/model.onnx", "--input-shape", "x=-1x3x8x8"], "error"),
        (["demo", "--nosuch"], "error"), (["nosuchcommand"], "error"), ([], "error"),
    ]
    out = []
    for i, (argv, expect) in enumerate(cases):
        isolate = any("--threads" == a for a in argv)  # a huge thread count once segfaulted the runtime
        out.append(FuzzCase(f"args/{i}:{' '.join(argv[3:] if len(argv) > 3 else argv)}", "args", list(argv),
                            dict(files), expect, isolate))
    return out


def _output_cases(rng: random.Random) -> List[FuzzCase]:
    model = _bytes(conv_model())
    files = {"model.onnx": model, "data.npz": _npz(x=_good_x(), y=np.arange(8, dtype=np.int64) % 10),
             "recipe.yaml": b"passes:\n  - prune: {ratio: 0.5}\n"}
    prune = ["prune", "{d}/model.onnx", "--ratio", "0.5", "-o"]
    cases = [
        (prune + ["{d}/sub"], "error", ["sub"]),
        (prune + ["{d}/missing/out.onnx"], "error", []),
        (prune + ["{d}/model.onnx"], "error", []),
        (prune + ["{d}/out.onnx/"], "error", []),
        (prune + [""], "error", []),
        (prune + ["{d}/data.npz", "--criterion", "activation", "--data", "{d}/data.npz"], "error", []),
        (["run", "{d}/model.onnx", "--recipe", "{d}/recipe.yaml", "-o", "{d}/recipe.yaml"], "error", []),
        (["finetune", "{d}/model.onnx", "--data", "{d}/data.npz", "--teacher", "{d}/teacher.onnx", "--epochs", "1",
          "-o", "{d}/teacher.onnx"], "error", []),
        (["finetune", "{d}/model.onnx", "--data", "{d}/data.npz", "--labels", "y", "--epochs", "1", "-o", "{d}/data.npz"], "error", []),
        (["quantize", "{d}/model.onnx", "--no-measure", "--calibration-samples", "2", "-o", "{d}/out.onnx",
          "--report", "{d}/data.npz", "--data", "{d}/data.npz"], "error", []),
        (["quantize", "{d}/model.onnx", "--no-measure", "--calibration-samples", "2", "-o", "{d}/out.onnx",
          "--report", "{d}/nodir/r.json", "--input-shape", "x=1x3x8x8"], "error", []),
        (["sparsify", "{d}/model.onnx", "--sparsity", "0.5", "-o", "{d}/out.onnx", "--report", "{d}/sub"], "error", ["sub"]),
        (["sparsify", "{d}/model.onnx", "--sparsity", "0.5", "-o", "{d}/out.onnx", "--report", "{d}/out.onnx"], "error", []),
        (["validate", "{d}/model.onnx", "{d}/model.onnx", "--samples", "2", "--runs", "1", "--report", "{d}/model.onnx"], "error", []),
        (prune + ["{d}/out.onnx"], "ok", []),
        (prune + ["{d}/ünï cödé out.onnx"], "ok", []),
        (prune + ["{d}/model.onnx", "--overwrite-input"], "ok", []),
    ]
    out = []
    for i, (argv, expect, dirs) in enumerate(cases):
        extra = {"teacher.onnx": model} if "{d}/teacher.onnx" in argv else {}
        out.append(FuzzCase(f"output/{i}:{' '.join(argv[:1] + argv[-3:])}", "output", list(argv),
                            {**files, **extra}, expect, dirs=dirs))
    return out


_BUILDERS = {
    "model_bytes": _model_bytes_cases,
    "structure": _structure_cases,
    "npz": _npz_cases,
    "recipe": _recipe_cases,
    "args": _args_cases,
    "output": _output_cases,
}


def cases(seed: int = 0, families: Sequence[str] = FAMILIES) -> List[FuzzCase]:
    """Every case of ``families``, generated from ``seed`` (same seed, same cases and bytes)."""
    out: List[FuzzCase] = []
    for family in families:
        out.extend(_BUILDERS[family](random.Random(f"{seed}/{family}")))
    return out


def fast_subset(seed: int = 0, size: int = 60) -> List[FuzzCase]:
    """A seeded sample of ``size`` cases across every family (the subset ``make test`` runs).

    Crash-prone (``isolate``) cases are capped at two: each costs a subprocess.
    """
    everything = cases(seed)
    rng = random.Random(f"{seed}/subset")
    isolated = [c for c in everything if c.isolate]
    plain = [c for c in everything if not c.isolate and not c.id.startswith(("structure/fixed_batch", "npz/labels_ok"))]
    by_family: Dict[str, List[FuzzCase]] = {}
    for c in plain:
        by_family.setdefault(c.family, []).append(c)
    picked = rng.sample(isolated, 2)
    share = -(-(size - len(picked)) // len(by_family))  # rounded up
    for family, members in by_family.items():
        picked += rng.sample(members, min(share, len(members)))
    return picked


# ---------------------------------------------------------------------------- running and judging


@dataclass
class Outcome:
    """What a case did: exit code (negative: killed by that signal; None: hung), stderr, problems found."""

    case: FuzzCase
    code: Optional[int]
    stderr: str
    problems: List[str]

    @property
    def kind(self) -> str:
        """How the issue's fuzz report counts it: clean, internal, broken-success, crash, hang, multiline."""
        if self.code is None:
            return "hang"
        if self.code < 0:
            return "crash"
        if self.code == 1 or "Traceback" in self.stderr:
            return "internal"
        if not self.problems:
            return "clean"
        if self.code == 0:
            return "broken-success"
        return "bad-rejection"


def _snapshot(folder: str) -> Dict[str, bytes]:
    import hashlib
    import os

    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).digest()
            else:
                out[rel] = b"<dir or special>"
    return out


def run_case(case: FuzzCase, folder: str, subprocess_mode: Optional[bool] = None, timeout: float = 120.0) -> Outcome:
    """Run ``case`` through the CLI in ``folder`` (empty) and judge the result.

    In-process (``graphprune.cli.main``, stderr captured at the file-descriptor level, so ORT's own
    log lines count) unless the case is ``isolate`` or ``subprocess_mode`` is set.
    """
    argv = case.materialize(folder)
    before = _snapshot(folder)
    if subprocess_mode if subprocess_mode is not None else case.isolate:
        code, stderr = _run_subprocess(argv, timeout)
    else:
        code, stderr = _run_in_process(argv, timeout)
    return Outcome(case, code, stderr, _judge(case, code, stderr, folder, before))


def _run_subprocess(argv: List[str], timeout: float):
    import subprocess
    import sys

    script = "import sys; from graphprune.cli import main; sys.exit(main(sys.argv[1:]))"
    try:
        proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return None, (exc.stderr or b"").decode(errors="replace")
    return proc.returncode, proc.stderr.decode(errors="replace")


class _Hang(BaseException):
    pass


def _run_in_process(argv: List[str], timeout: float):
    import os
    import signal
    import sys
    import tempfile

    from graphprune.cli import main

    def on_alarm(signum, frame):
        raise _Hang()

    sys.stderr.flush()
    saved, saved_stream = os.dup(2), sys.stderr
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        sys.stderr = open(2, "w", closefd=False, errors="replace")  # Python's writes and the runtime's, in order
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        code: Optional[int]
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        except _Hang:
            code = None
        except BaseException as exc:  # noqa: BLE001 - an escaped exception is a finding, not a test crash
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            sys.stderr.flush()
            sys.stderr = saved_stream
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        stderr = capture.read().decode(errors="replace")
    return code, stderr


def _judge(case: FuzzCase, code: Optional[int], stderr: str, folder: str, before: Dict[str, bytes]) -> List[str]:
    import os

    problems = []
    lines = [line for line in stderr.splitlines() if line.strip()]
    after = _snapshot(folder)
    if code is None:
        return ["hung (timeout)"]
    if code < 0:
        return [f"killed by signal {-code}"]
    if "Traceback" in stderr:
        problems.append("traceback on stderr")
    if code not in (0, 2):
        problems.append(f"exit {code}: {lines[-1] if lines else ''}"[:300])
    if code == 2:
        if case.expect == "ok":
            problems.append(f"refused a valid input: {lines[-1] if lines else ''}"[:300])
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines: {' | '.join(lines)[:300]}")
        elif len(lines[0]) > 400:
            problems.append(f"stderr line of {len(lines[0])} characters")
        if after != before:
            changed = sorted(set(after) ^ set(before) | {k for k in before if k in after and after[k] != before[k]})
            problems.append(f"files changed on failure: {changed}")
    if code == 0:
        if case.expect == "error":
            problems.append("accepted a bad input (exit 0)")
        changed_inputs = [k for k in before if after.get(k) != before[k] and "--overwrite-input" not in case.argv]
        if changed_inputs:
            problems.append(f"input files changed: {changed_inputs}")
        for name in set(after) - set(before):
            path = os.path.join(folder, name)
            if name.endswith(".onnx") and os.path.isfile(path):
                problem = _check_output(path)
                if problem:
                    problems.append(f"output {name}: {problem}")
    return problems


def _check_output(path: str) -> Optional[str]:
    """None when ``path`` passes the full checker, holds finite weights and opens in onnxruntime."""
    try:
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        for init in model.graph.initializer:
            value = numpy_helper.to_array(init)
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                return f"non-finite values in {init.name}"
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4
        onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return None
