"""``graphprune sparsify``: the report, sparse storage on disk, and one-line errors with nothing written."""

import json
import re

import numpy as np
import onnx
import pytest

from graphprune.cli import main
from graphprune.model_io import load
from graphprune.runtime import make_session, run
from tests.test_sparsify_pass import LAYERS, small_net, weights


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(small_net(), str(path))
    return str(path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_sparsify_prints_layers_sizes_and_writes_a_report(model_path, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["sparsify", model_path, "-o", str(out), "--sparsity", "0.8", "--report", str(report), "--gzip-size"]) == 0
    text = capsys.readouterr().out
    assert "overall sparsity of sparsified weights: 79.99% over 2,264 weights" in text  # round(0.8 * 2264) zeros
    assert "gzip" in text and "size reduction" in text and f"wrote {out}" in text
    data = json.loads(report.read_text())
    assert {r["weight"] for r in data["layers"]} == set(LAYERS)
    sizes = data["sizes"]
    assert sizes["output"]["gzip_bytes"] < sizes["input"]["gzip_bytes"] < sizes["input"]["bytes"]
    onnx.checker.check_model(str(out), full_check=True)


def test_gzip_sizes_only_when_asked(model_path, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["sparsify", model_path, "-o", str(out), "--sparsity", "0.5", "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "gzip " not in text and re.search(r"size reduction: \d+\.\d\dx raw\n", text)
    sizes = json.loads(report.read_text())["sizes"]
    assert sizes["input"] == {"bytes": len(open(model_path, "rb").read())} and "gzip_bytes" not in sizes["output"]


def test_sparse_storage_file_is_smaller_and_gives_the_dense_outputs(model_path, tmp_path, capsys):
    dense, compact = tmp_path / "dense.onnx", tmp_path / "compact.onnx"
    assert main(["sparsify", model_path, "-o", str(dense), "--sparsity", "0.9"]) == 0
    assert main(["sparsify", model_path, "-o", str(compact), "--sparsity", "0.9", "--storage", "sparse"]) == 0
    assert "compact storage: 4 weight(s)" in capsys.readouterr().out
    assert compact.stat().st_size < dense.stat().st_size / 2
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(make_session(load(compact)), x)["y"], run(make_session(load(dense)), x)["y"])


def test_sparse_storage_of_an_external_data_model_equals_the_inline_one(model_path, tmp_path, capsys):
    """Weights left on disk are read one at a time for compact storage too: same graph, same values."""
    from graphprune.model_io import save

    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    ext = ext_dir / "net.onnx"
    save(small_net(), str(ext), external_data=True)
    inline_out, ext_out = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for source, out in ((model_path, inline_out), (str(ext), ext_out)):
        assert main(["sparsify", source, "-o", str(out), "--sparsity", "0.9", "--storage", "sparse"]) == 0
    a, b = load(str(inline_out)), load(str(ext_out))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def test_n_m_reports_the_skipped_layer(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["sparsify", model_path, "-o", str(out), "--pattern", "2:4", "--exclude", "proj"]) == 0
    text = capsys.readouterr().out
    assert "skipped Conv 'stem': 2:4 does not fit: reduction axis 1 has length 3, not divisible by M=4" in text
    after, before = weights(load(out)), weights(small_net())
    np.testing.assert_array_equal(after["proj_w"], before["proj_w"])
    assert np.mean(after["conv_w"] == 0) == 0.5


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1"], "--sparsity 1.0 is outside [0.0, 1.0)"),
    (["--sparsity", "-0.2"], "outside"),
    (["--sparsity", "abc"], "--sparsity 'abc' is not a number"),
    ([], "sparsity is required"),
    (["--pattern", "4:4"], "N:M needs 1 <= N < M"),
    (["--pattern", "8:4"], "N:M needs 1 <= N < M"),
    (["--pattern", "two:four"], "neither 'unstructured' nor N:M"),
    (["--sparsity", "0.5", "--op-types", "Conv,Softmax"], "op type 'Softmax' cannot be sparsified"),
    (["--sparsity", "0.5", "--exclude", "no_such_node"], "--exclude 'no_such_node': no node or weight"),
    (["--sparsity", "0.5", "--op-types", "ConvTranspose"], "no ConvTranspose weight could be sparsified"),
    (["--pattern", "1:8", "--op-types", "Conv", "--exclude", "conv"], "no Conv weight could be sparsified (stem: 1:8 does not fit"),
])
def test_bad_requests_exit_2_and_write_nothing(model_path, tmp_path, capsys, extra, message):
    out = tmp_path / "out.onnx"
    assert main(["sparsify", model_path, "-o", str(out)] + extra) == 2
    line = _error_line(capsys)
    assert line.startswith("graphprune sparsify: error:") and message in line
    assert not out.exists()


def test_bad_files_exit_2_and_write_nothing(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["sparsify", str(tmp_path / "missing.onnx"), "-o", str(out), "--sparsity", "0.5"]) == 2
    assert "no such file" in _error_line(capsys)
    assert main(["sparsify", model_path, "-o", model_path, "--sparsity", "0.5"]) == 2
    assert "refusing to overwrite the input model" in _error_line(capsys)
    assert main(["sparsify", model_path, "-o", str(out), "--sparsity", "0.5", "--report", str(tmp_path / "no" / "r.json")]) == 2
    assert "output directory does not exist" in _error_line(capsys)
    old = tmp_path / "old.onnx"
    onnx.save(small_net(opset=10), str(old))
    assert main(["sparsify", str(old), "-o", str(out), "--sparsity", "0.5", "--storage", "sparse"]) == 2
    assert "needs ai.onnx opset >= 11" in _error_line(capsys)
    assert not out.exists()
    assert weights(load(model_path))["conv_w"].all()  # the input is never touched


def test_run_pass_spec_and_bundled_recipe(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["run", model_path, "-o", str(out), "--pass", "sparsify:pattern=2:4,op_types=[Gemm]"]) == 0
    fc = weights(load(out))["fc_w"]
    assert (np.count_nonzero(fc.reshape(32, 4, 4), axis=2) == 2).all()
    assert main(["run", model_path, "-o", str(tmp_path / "r.onnx"), "--recipe", "sparsify"]) == 0
    capsys.readouterr()
    from graphprune.sparsity.storage import compact_weight_names

    assert sorted(compact_weight_names(load(tmp_path / "r.onnx"))) == sorted(LAYERS)
