"""tools/bench_scale.py: the floor commands run on a generated model and report what they measure."""

import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import bench_scale  # noqa: E402


@pytest.mark.parametrize("floor", ["floor", "floor-session"])
def test_floor_commands_read_the_weights_or_open_a_session(tmp_path, floor):
    model = bench_scale.make_many_nodes(str(tmp_path / "m.onnx"), 40, np.random.default_rng(0))
    result = bench_scale.measure(bench_scale._command(floor, model, str(tmp_path / "out.onnx")), timeout=120)
    assert result["exit"] == 0, result["error"]
    assert result["peak_rss"] > 10 * 2**20 and result["cpu_s"] > 0
    assert not (tmp_path / "out.onnx").exists()  # a floor writes nothing


def test_floor_reads_every_weight_once(tmp_path):
    """The floor script's weights are the model's (the sum of what it read, checked in its process)."""
    model = bench_scale.make_many_nodes(str(tmp_path / "m.onnx"), 8, np.random.default_rng(0))
    script = bench_scale._FLOORS["floor"] + "print(sum(k.nbytes for k in kept))\n"
    out = subprocess.run([sys.executable, "-c", script, model], capture_output=True, text=True, check=True).stdout
    assert int(out) == os.path.getsize(model + ".data")  # every byte of the data file (8 KiB tensors: no padding)
