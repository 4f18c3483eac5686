"""``graphprune prune`` and ``inspect --groups`` on transformers: per-kind ratios, bad input (exit 2,
one line, nothing written)."""

import json

import numpy as np
import onnx
import pytest

from graphprune.cli import main
from graphprune.runtime import make_session, run
from graphprune.testing import bert_encoder, gpt_decoder


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "bert.onnx"
    onnx.save(bert_encoder(layers=2, hidden=64, heads=4, ffn=256), str(path))
    return str(path)


@pytest.fixture(scope="module")
def gpt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "gpt.onnx"
    onnx.save(gpt_decoder(layers=2, hidden=64, heads=4, kv_heads=2, ffn=256, gated=True), str(path))
    return str(path)


def test_prune_heads_and_ffn_writes_a_smaller_model_that_runs(bert_path, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    assert main(["prune", bert_path, "-o", str(out), "--heads-ratio", "0.5", "--ffn-ratio", "0.5", "--stats"]) == 0
    text = capsys.readouterr().out
    assert "by kind: heads 4 of 8 in 2 groups, ffn 256 of 512 in 2 groups, channels 0 of 64 in 1 groups" in text
    stats = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert stats["kinds"]["heads"]["removed"] == 4
    model = onnx.load(str(out))
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    assert dims["encoder.layer.1.attention.self.key.weight"] == [64, 32]
    assert dims["encoder.layer.1.intermediate.dense.weight"] == [64, 128]
    ids = np.random.default_rng(0).integers(0, 100, size=(3, 17)).astype(np.int64)
    assert run(make_session(model), {"input_ids": ids})["last_hidden_state"].shape == (3, 17, 64)


def test_heads_ratio_one_keeps_a_head_per_layer_and_says_so(gpt_path, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    assert main(["prune", gpt_path, "-o", str(out), "--heads-ratio", "1"]) == 0
    assert "note: heads ratio 1 would remove every head of 2 attention layer(s): kept 1 head in each" in capsys.readouterr().out
    dims = {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert dims["model.layers.0.self_attn.k_proj.weight"] == [64, 16]  # one KV head and its 2 query heads
    assert dims["model.layers.0.self_attn.q_proj.weight"] == [64, 32]


def test_hidden_ratio_prunes_the_stream(gpt_path, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    assert main(["prune", gpt_path, "-o", str(out), "--hidden-ratio", "0.5"]) == 0
    assert "lossy" in capsys.readouterr().out
    dims = {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert dims["model.embed_tokens.weight"] == [100, 32] and dims["model.norm.weight"] == [32]
    assert dims["model.layers.0.mlp.up_proj.weight"] == [32, 256]  # only the hidden size was asked


def test_inspect_groups_names_each_kind(gpt_path, capsys):
    assert main(["inspect", gpt_path, "--groups"]) == 0
    text = capsys.readouterr().out
    assert "heads" in text and "ffn" in text and "pruned only with --hidden-ratio" in text
    assert main(["inspect", gpt_path, "--groups", "--json", "--hidden"]) == 0
    doc = json.loads(capsys.readouterr().out)
    kinds = sorted(g["kind"] for g in doc["prunable"])
    assert kinds == ["ffn", "ffn", "heads", "heads", "hidden"]
    assert main(["inspect", gpt_path, "--groups", "--json", "--head-dim"]) == 0
    assert "head_dim" in {g["kind"] for g in json.loads(capsys.readouterr().out)["prunable"]}


@pytest.mark.parametrize("args, message", [
    ([], "give --ratio R (or a per-kind ratio: --heads-ratio, --ffn-ratio, --hidden-ratio)"),
    (["--heads-ratio", "1.5"], "--heads-ratio 1.5 is outside [0.0, 1.0]"),
    (["--ffn-ratio", "1"], "--ffn-ratio 1.0 is outside [0.0, 1.0)"),
    (["--hidden-ratio", "most"], "--hidden-ratio 'most' is not a number"),
    (["--ratio", "0.5", "--heads-ratio", "-0.1"], "--heads-ratio -0.1 is outside [0.0, 1.0]"),
])
def test_bad_ratios_exit_2_with_one_line_and_write_nothing(bert_path, tmp_path, capsys, args, message):
    out = tmp_path / "p.onnx"
    assert main(["prune", bert_path, "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_run_pipeline_passes_kind_ratios_to_the_prune_pass(bert_path, tmp_path, capsys):
    out = tmp_path / "r.onnx"
    assert main(["run", bert_path, "-o", str(out), "--pass", "prune:ratio=0,heads_ratio=0.5,head_dim=true"]) == 0
    dims = {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert dims["encoder.layer.0.attention.self.query.weight"] == [64, 32]  # 4 heads of 8 dims
    assert dims["encoder.layer.0.intermediate.dense.weight"] == [64, 256]
