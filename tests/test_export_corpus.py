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
    "shufflenet_v2_torchscript": {"channels": 8}, "shufflenet_v2_dynamo": {"channels": 14},
    "deeplabv3_torchscript": {"channels": 36}, "deeplabv3_dynamo": {"channels": 38},
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
