"""The end-to-end demo meets its deterministic targets: accuracy within 1 pt, MACs <= 30% of the original."""

from __future__ import annotations

import onnx
import pytest

from graphprune.cli import main
from graphprune.demo import TARGETS, run_demo
from graphprune.passes.base import registered_passes

_MISSING = sorted({"prune", "quantize", "finetune"} - set(registered_passes()))


@pytest.mark.skipif(bool(_MISSING), reason=f"passes not in this checkout: {_MISSING}")
def test_demo_meets_accuracy_and_macs_targets(tmp_path):
    lines = []
    report = run_demo(output_dir=str(tmp_path), latency_runs=20, echo=lines.append)
    names = [stage.stage for stage in report.stages]
    assert names == ["original", "pruned 50% (no fine-tune)", "fine-tuned (labels+distill)", "int8 QDQ"]
    original, pruned, tuned, final = report.stages
    assert original.accuracy - final.accuracy <= TARGETS["accuracy_drop_points"] / 100
    assert final.macs <= TARGETS["macs_fraction"] * original.macs
    # pruning alone loses accuracy that fine-tuning wins back; quantization shrinks the file
    assert pruned.accuracy < original.accuracy - 0.2 < tuned.accuracy
    assert final.size_bytes < 0.6 * tuned.size_bytes
    assert report.skipped == []
    assert any("MACs <= 30%" in line and "[met]" in line for line in lines)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 3 and written[-1].endswith("int8_QDQ.onnx")
    onnx.checker.check_model(onnx.load(str(tmp_path / written[-1])), full_check=True)


@pytest.mark.parametrize("argv, message", [(["--ratio", "0"], "--ratio must be in (0, 1)"),
                                          (["--steps", "0"], "--steps must be >= 1")])
def test_demo_bad_arguments(capsys, argv, message):
    assert main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err
