"""``prune --blocks K`` with a budget or a ratios file: the blocks go first, then the channels of the
shallower model, and the budget stays a fraction of the input model's cost."""

import json

import numpy as np
import onnx
import pytest

from graphprune.cli import main
from graphprune.data import load_inputs
from graphprune.metrics import count_macs
from graphprune.passes import PruneBlocksPass, PruneChannelsPass
from graphprune.runtime import make_session, run
from graphprune.sensitivity.measure import analyse
from graphprune.testing import mobilenet_v2

SHAPE = (1, 3, 32, 32)


def _model(tmp_path):
    model = mobilenet_v2(width=0.25, image=32, num_classes=10)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    data = tmp_path / "calib.npz"
    name = model.graph.input[0].name
    np.savez(str(data), **{name: np.random.default_rng(0).standard_normal((8, *SHAPE[1:])).astype(np.float32)})
    return model, path, data, name


def _removed(model):
    return [p.value for p in model.metadata_props if p.key == "graphprune.removed_blocks"]


@pytest.mark.slow  # a budget search (sensitivity of every group at 2 ratios, builds, uniform check)
def test_blocks_with_target_macs_meets_the_budget_of_the_input_model(tmp_path, capsys):
    model, path, data, name = _model(tmp_path)
    out = tmp_path / "p.onnx"
    assert main(["prune", str(path), "-o", str(out), "--blocks", "2", "--target-macs", "0.7", "--data", str(data),
                 "--budget-ratios", "0.25,0.5", "--jobs", "1"]) == 0
    text = capsys.readouterr().out
    assert "2 removed" in text and "the channels are pruned to" in text
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert _removed(written), "the removed blocks are recorded"
    shapes = {name: SHAPE}
    assert count_macs(written, shapes) <= 0.7 * count_macs(model, shapes)
    # fewer nodes than the blocks alone: channels were pruned as well
    shallow = PruneBlocksPass(blocks=2, data=None, input_shapes=shapes)(model).model
    assert len(written.graph.node) <= len(shallow.graph.node)


def test_blocks_with_group_ratios_equals_blocks_then_ratios(tmp_path):
    model, path, data, name = _model(tmp_path)
    out, ratios = tmp_path / "p.onnx", tmp_path / "r.json"
    calib, _ = load_inputs(str(data), model)
    shallow = PruneBlocksPass(blocks=1, data=calib)(model).model
    key = sorted(analyse(shallow).keys.values())[0]  # a group of the shallower model
    ratios.write_text(json.dumps({"version": 1, "groups": {key: 0.5}}))
    assert main(["prune", str(path), "-o", str(out), "--blocks", "1", "--group-ratios", str(ratios),
                 "--data", str(data)]) == 0
    written = onnx.load(str(out))
    expected = PruneChannelsPass(ratio=0.0, group_ratios={key: 0.5})(shallow).model
    assert len(written.graph.node) == len(expected.graph.node) < len(model.graph.node)
    feed = {name: np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)}
    got, want = (run(make_session(m), feed) for m in (written, expected))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert _removed(written)
