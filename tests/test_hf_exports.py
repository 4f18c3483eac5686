"""Transformers as Hugging Face and torch export them (tests/fixtures/hf, made by tools/make_hf_fixtures.py):
heads and FFN neurons are found where the exporter's run-time Reshape targets are understood, and pruning
them keeps a valid model whose masked and removed forms agree at other batch sizes and lengths."""

import os

import numpy as np
import onnx
import pytest

from graphprune.dependency import build_dependency_graph, reported_groups, shape_info
from graphprune.errors import UserError
from graphprune.passes import PruneChannelsPass
from graphprune.pruning.apply import Editor
from graphprune.runtime import make_session, run

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")

# Prunable groups per kind that each export must keep showing (2 layers: one heads and one FFN group
# per layer); fewer is a regression.
EXPECTED = {
    "bert_torchscript": {"heads": 2, "ffn": 2},
    "bert_dynamo": {"heads": 2, "ffn": 2},
    "gpt2_torchscript": {"heads": 2, "ffn": 2},
    "gpt2_dynamo": {"heads": 2, "ffn": 2},
    "llama_torchscript": {"heads": 2, "ffn": 2},
    "llama_dynamo": {"heads": 2, "ffn": 2},
}
# Channels of a heads group: 4 heads, or Llama's 2 KV heads (each pruned with its 2 query heads).
HEADS = {"llama_torchscript": 2, "llama_dynamo": 2}
PRUNABLE = sorted(name for name, kinds in EXPECTED.items() if kinds)
_CACHE = {}


def _load(name):
    if name not in _CACHE:
        _CACHE[name] = onnx.load(os.path.join(FIXTURES, f"{name}.onnx"))
    return _CACHE[name]


def _groups(name):
    key = ("groups", name)
    if key not in _CACHE:
        _CACHE[key] = reported_groups(build_dependency_graph(_load(name)).groups())
    return _CACHE[key]


def _prunable_by_kind(name):
    groups = _groups(name)
    counts = {}
    for g in groups:
        if g.prunable:
            counts[g.kind] = counts.get(g.kind, 0) + 1
    return counts


def _tokens(batch, seq, seed=0):
    return {"input_ids": np.random.default_rng(seed).integers(0, 100, size=(batch, seq)).astype(np.int64)}


def _outputs(model, feeds):
    return run(make_session(model), feeds)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_export_shows_its_heads_and_ffn_groups(name):
    found = _prunable_by_kind(name)
    for kind, count in EXPECTED[name].items():
        assert found.get(kind, 0) == count, (kind, found)
    if "heads" in EXPECTED[name]:
        heads = [g for g in _groups(name) if g.kind == "heads"]
        assert all(g.channels == HEADS.get(name, 4) for g in heads)


@pytest.mark.parametrize("name", PRUNABLE)
def test_heads_and_ffn_pruned_model_is_valid_and_masked_equals_removed(name):
    model = _load(name)
    removed = PruneChannelsPass(ratio=0.0, heads_ratio=0.5, ffn_ratio=0.5)(model)
    masked = PruneChannelsPass(ratio=0.0, heads_ratio=0.5, ffn_ratio=0.5, mode="mask")(model)
    kinds = removed.stats["kinds"]
    for kind in EXPECTED[name]:
        assert kinds[kind]["removed"] == kinds[kind]["channels"] // 2, kind
    assert removed.stats["params_after"] < 0.8 * removed.stats["params_before"]
    onnx.checker.check_model(removed.model, full_check=True)
    for batch, seq in ((2, 7), (1, 13)):
        feeds = _tokens(batch, seq)
        out, ref = _outputs(removed.model, feeds), _outputs(masked.model, feeds)
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in _outputs(model, feeds).items()}
        for key in out:
            np.testing.assert_allclose(out[key], ref[key], rtol=1e-4, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("name", PRUNABLE)
def test_nothing_asked_nothing_changed(name):
    result = PruneChannelsPass(ratio=0.0)(_load(name))
    assert not result.modified


@pytest.mark.parametrize("name", ["bert_torchscript", "llama_torchscript"])
def test_without_symbolic_inference_ffn_still_prunes(name, monkeypatch):
    """An onnxruntime without its tools (or sympy): the -1 head axis stays unknown, heads are not found,
    but FFN groups prune and the Expand targets sized at run time are left alone (no crash)."""
    monkeypatch.setattr(shape_info, "symbolic_shapes", lambda model: {})
    model = _load(name)
    kwargs = dict(ratio=0.0, heads_ratio=0.5, ffn_ratio=0.5)
    removed, masked = PruneChannelsPass(**kwargs)(model), PruneChannelsPass(mode="mask", **kwargs)(model)
    assert removed.stats["kinds"]["ffn"]["removed"] == 128
    onnx.checker.check_model(removed.model, full_check=True)
    feeds = _tokens(2, 7)
    out, ref = _outputs(removed.model, feeds), _outputs(masked.model, feeds)
    for key in out:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-4, atol=1e-4, err_msg=key)


def test_a_size_no_rule_could_resolve_is_refused_cleanly():
    dep = build_dependency_graph(_load("bert_dynamo"))
    editor = Editor(dep, {}, onnx.GraphProto())
    dim = next(d for d in dep.graph.nodes if not dep.info(d).concrete)
    with pytest.raises(UserError, match="unknown"):
        editor.new_size(dim)
