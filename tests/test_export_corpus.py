"""The export corpus: models written by the real tools (transformers and torchvision/timm through both torch
exporters, Keras through tf2onnx; tests/fixtures/{hf,cnn,keras}, made by tools/make_*_fixtures.py).

For each: ONNX Runtime reproduces the source framework's outputs; the dependency analysis finds the
groups it is expected to (by kind: a model that loses its heads fails); pruning (ratio 0.3; heads 0.5
and FFN 0.5) removes what it says, passes the full checker, and its masked and removed forms agree at
two batch sizes (and sequence lengths); inspect, prune, quantize and canonicalize run without error."""

import glob
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.cli import main
from graphprune.dependency import build_dependency_graph, reported_groups
from graphprune.ir import real_inputs
from graphprune.passes import CanonicalizePass, PruneChannelsPass
from graphprune.runtime import make_session, run

ROOT = os.path.join(os.path.dirname(__file__), "fixtures")
_TRANSFORMER = {"heads": 2, "ffn": 2}
# Prunable groups per kind of each export (2-layer transformers: one heads and one FFN group per layer).
EXPECTED = {
    **{f"{arch}_{exporter}": _TRANSFORMER
       for arch in ("bert", "gpt2", "llama", "distilbert", "roberta", "qwen2", "vit")
       for exporter in ("torchscript", "dynamo")},
    # Whisper's two stem convolutions (GELU between them) are one plain channel group
    "whisper_encoder_torchscript": {"channels": 1, **_TRANSFORMER},
    "whisper_encoder_dynamo": {"channels": 1, **_TRANSFORMER},
    # T5 computes its relative position bias [1, heads, q, k] once and adds it in every layer: head h
    # of every layer is pruned together (one group)
    "t5_encoder_torchscript": {"heads": 1, "ffn": 2},
    "t5_encoder_dynamo": {"heads": 1, "ffn": 2},
    "resnet18_torchscript": {"channels": 13}, "resnet18_dynamo": {"channels": 13},
    "mobilenet_v3_torchscript": {"channels": 26}, "mobilenet_v3_dynamo": {"channels": 26},
    "efficientnet_b0_torchscript": {"channels": 27}, "efficientnet_b0_dynamo": {"channels": 27},
    # ConvNeXt's blocks are token-wise MLPs behind a LayerNorm: FFN groups; the stages' widths are the
    # hidden size (lossy, only with --hidden-ratio)
    "convnext_torchscript": {"ffn": 5}, "convnext_dynamo": {"ffn": 5},
    "regnet_torchscript": {"channels": 22}, "regnet_dynamo": {"channels": 22},
    "shufflenet_v2_torchscript": {"channels": 14}, "shufflenet_v2_dynamo": {"channels": 14},
    "deeplabv3_torchscript": {"channels": 36}, "deeplabv3_dynamo": {"channels": 36},
    # timm's ViT: packed qkv; the dynamo export batches attention as [batch * heads, ...] (a periodic merge)
    "timm_vit_torchscript": _TRANSFORMER, "timm_vit_dynamo": _TRANSFORMER,
    "mobilenetv2_tf2onnx": {"channels": 25},
    "efficientnetb0_tf2onnx": {"channels": 27},
}
# Channels of every heads group: Llama and Qwen2 prune KV heads (each with its 2 query heads).
HEADS = {"llama": 2, "qwen2": 2}
ALL = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*", "*.onnx")))
# The command-line round trip (inspect, prune, quantize, canonicalize) on a cross-section: quantize
# alone takes seconds per model.  T5: its relative-position buckets hold -inf (Log(0)), which once
# crashed quantize.
CLI_FAST = ("mobilenet_v3_torchscript",)
CLI_SLOW = ("bert_dynamo", "llama_torchscript", "t5_encoder_torchscript")
_CACHE = {}


def _arch(name):
    return name.rsplit("_", 1)[0]


def _path(name):
    return next(iter(glob.glob(os.path.join(ROOT, "*", f"{name}.onnx"))))


def _load(name):
    if name not in _CACHE:
        _CACHE[name] = onnx.load(_path(name))
    return _CACHE[name]


def _reference(name):
    """(inputs, outputs) the source framework saved beside the model."""
    data = np.load(os.path.join(os.path.dirname(_path(name)), f"{_arch(name)}.npz"))
    model = _load(name)
    return ({vi.name: data[vi.name] for vi in real_inputs(model.graph)},
            {vi.name: data[vi.name] for vi in model.graph.output})


def _feeds(name):
    """Two input sets of other shapes than the export's example: batch 1, and (text) other lengths."""
    inputs, _ = _reference(name)
    (key, x), = inputs.items()
    if key != "input_ids":
        return [{key: x[:1]}, {key: np.concatenate([x, x[::-1]])}]
    rng = np.random.default_rng(3)
    return [{key: rng.integers(0, 100, size=shape).astype(np.int64)} for shape in ((1, 13), (3, 5))]


def _kwargs(name):
    kinds = EXPECTED.get(name, {})
    extra = dict(heads_ratio=0.5, ffn_ratio=0.5) if {"heads", "ffn"} & set(kinds) else {}
    return dict(ratio=0.3, **extra)


def test_every_fixture_has_an_expectation():
    assert len(ALL) == 36 and sorted(EXPECTED) == ALL


@pytest.mark.parametrize("name", ALL)
def test_onnx_runtime_reproduces_the_source_framework(name):
    inputs, outputs = _reference(name)
    got = run(make_session(_load(name)), inputs)
    for key, ref in outputs.items():
        scale = float(np.abs(ref).max())
        np.testing.assert_allclose(got[key], ref, rtol=0, atol=1e-4 * max(scale, 1.0), err_msg=key)


@pytest.mark.parametrize("name", ALL)
def test_groups_found_by_kind(name):
    groups = reported_groups(build_dependency_graph(_load(name)).groups())
    found = {}
    for g in groups:
        if g.prunable:
            found[g.kind] = found.get(g.kind, 0) + 1
    assert found == EXPECTED[name], found
    heads = [g for g in groups if g.kind == "heads"]
    assert all(g.channels == HEADS.get(_arch(name), 4) for g in heads), [g.channels for g in heads]


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_pruned_is_valid_and_masked_equals_removed(name):
    model = _load(name)
    removed = PruneChannelsPass(**_kwargs(name))(model)
    masked = PruneChannelsPass(mode="mask", **_kwargs(name))(model)
    kinds = removed.stats["kinds"]
    for kind in EXPECTED[name]:
        assert kinds[kind]["groups"] == EXPECTED[name][kind] and kinds[kind]["removed"] > 0, (kind, kinds)
    if "heads" in kinds:
        assert kinds["heads"]["removed"] == kinds["heads"]["channels"] // 2
    assert removed.stats["params_after"] < 0.9 * removed.stats["params_before"]
    onnx.checker.check_model(removed.model, full_check=True)
    reference, pruned, twin = make_session(model), make_session(removed.model), make_session(masked.model)
    for feeds in _feeds(name):
        expected = run(reference, feeds)
        out, ref = run(pruned, feeds), run(twin, feeds)
        for key in expected:
            assert out[key].shape == expected[key].shape, key
            scale = max(float(np.abs(ref[key]).max()), 1.0)
            np.testing.assert_allclose(out[key], ref[key], rtol=0, atol=1e-4 * scale, err_msg=key)


def test_canonicalize_keeps_outputs_and_groups():
    """canonicalize folds the exporters' shape arithmetic; the outputs and the heads stay."""
    name = "bert_torchscript"
    model = _load(name)
    result = CanonicalizePass()(model)
    inputs, outputs = _reference(name)
    got = run(make_session(result.model), inputs)
    np.testing.assert_allclose(got["last_hidden_state"], outputs["last_hidden_state"], rtol=0, atol=1e-4)
    groups = reported_groups(build_dependency_graph(result.model).groups())
    assert sum(g.prunable and g.kind == "heads" for g in groups) == 2


def _commands(name, tmp_path):
    model_path = _path(name)
    inputs, _ = _reference(name)
    data = tmp_path / "data.npz"
    np.savez(data, **{k: np.concatenate([v, v]) for k, v in inputs.items()})
    pruned, quantized, canonical = (str(tmp_path / f) for f in ("pruned.onnx", "q.onnx", "c.onnx"))
    ratios = ["--ratio", "0.3"] + (["--heads-ratio", "0.5", "--ffn-ratio", "0.5"] if len(_kwargs(name)) > 1 else [])
    assert main(["inspect", model_path, "--groups"]) == 0
    assert main(["prune", model_path, "-o", pruned, *ratios]) == 0
    assert main(["quantize", pruned, "-o", quantized, "--data", str(data), "--no-measure",
                 "--calibration-samples", "2"]) == 0
    assert main(["run", model_path, "-o", canonical, "--pass", "canonicalize"]) == 0
    for path in (pruned, quantized, canonical):
        onnx.checker.check_model(onnx.load(path), full_check=True)
        make_session(onnx.load(path))


@pytest.mark.parametrize("name", CLI_FAST)
def test_commands_run(name, tmp_path):
    _commands(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLI_SLOW)
def test_commands_run_on_transformers(name, tmp_path):
    _commands(name, tmp_path)


# -- the exporters' patterns behind the corpus, written inline ------------------------------------------

def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _interpolate_model():
    """Conv -> Relu -> F.interpolate(size=(16, 16)) as torch writes it (sizes = Concat(Shape(x)[:2], [16,
    16]), DeepLabV3's ASPP pooling) -> Conv."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Shape", ["r"], ["nc"], start=0, end=2),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        helper.make_node("Resize", ["r", "", "", "sizes"], ["u"], mode="nearest"),
        helper.make_node("Conv", ["u", "w2", "b2"], ["y"]),
    ]
    inits = [_init("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
             _init("b1", rng.standard_normal(8).astype(np.float32)),
             _init("w2", rng.standard_normal((4, 8, 1, 1)).astype(np.float32)),
             _init("b2", rng.standard_normal(4).astype(np.float32)), _init("hw", np.array([16, 16], np.int64))]
    graph = helper.make_graph(nodes, "interpolate", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batched_attention_model(heads=4, seq=6, hd=8, width=16):
    """Self-attention as torch's dynamo exporter writes SDPA: Q, K, V [B, heads, S, hd] merged with the
    batch into [B*heads, S, hd] (target [-1, S, hd]) for the MatMuls, split back with B read by Shape."""
    rng = np.random.default_rng(1)
    nodes, inits = [], [_init("split_heads", np.array([0, seq, heads, hd], np.int64)),
                        _init("merged", np.array([-1, seq, hd], np.int64)),
                        _init("heads_s_hd", np.array([heads, seq, hd], np.int64)),
                        _init("merge_heads", np.array([0, seq, heads * hd], np.int64)),
                        _init("zero", np.array([0], np.int64))]
    for p in ("q", "k", "v"):
        inits.append(_init(f"w{p}", rng.standard_normal((width, heads * hd)).astype(np.float32)))
        nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"]),
                  helper.make_node("Reshape", [f"{p}0", "split_heads"], [f"{p}1"]),
                  helper.make_node("Transpose", [f"{p}1"], [f"{p}2"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"{p}2", "merged"], [f"{p}3"])]
    inits.append(_init("wo", rng.standard_normal((heads * hd, width)).astype(np.float32)))
    nodes += [helper.make_node("Transpose", ["k3"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q3", "kt"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v3"], ["ctx"]),
              helper.make_node("Shape", ["x"], ["xshape"]),
              helper.make_node("Gather", ["xshape", "zero"], ["batch"], axis=0),
              helper.make_node("Concat", ["batch", "heads_s_hd"], ["split_batch"], axis=0),
              helper.make_node("Reshape", ["ctx", "split_batch"], ["ctx4"]),
              helper.make_node("Transpose", ["ctx4"], ["ctx5"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx5", "merge_heads"], ["ctx6"]),
              helper.make_node("MatMul", ["ctx6", "wo"], ["y"])]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", seq, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", seq, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# (model, input name and shape after the batch, channels of the one prunable group).  The attention's
# group is its 4 heads (the Q/K/V columns and Wo rows of each, 8 wide), found through the periodic
# batch*heads merge; its kind is "ffn" here, since the attention rules recognise heads in 4-D MatMuls.
@pytest.mark.parametrize("make, feeds, channels", [
    (_interpolate_model, ("x", (3, 8, 8)), 8),
    (_batched_attention_model, ("x", (6, 16)), 4),
])
def test_inline_export_patterns_prune_and_masked_equals_removed(make, feeds, channels):
    model = make()
    groups = [g for g in reported_groups(build_dependency_graph(model).groups()) if g.prunable]
    assert [g.channels for g in groups] == [channels], [(g.kind, g.channels) for g in groups]
    removed = PruneChannelsPass(ratio=0.5)(model)
    masked = PruneChannelsPass(ratio=0.5, mode="mask")(model)
    assert removed.stats["params_after"] < removed.stats["params_before"]
    key, shape = feeds
    for batch in (1, 3):
        feed = {key: np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)}
        out, ref = run(make_session(removed.model), feed), run(make_session(masked.model), feed)
        np.testing.assert_allclose(out["y"], ref["y"], rtol=1e-4, atol=1e-4)
