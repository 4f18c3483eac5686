"""Depth pruning (``prune --blocks``): blocks found in real exports and CNNs, removal equal to the
zeroed-branch twin (pre-norm, identity-shortcut CNN) or to the twin without the layer's LayerNorms
(post-norm), importance that picks the block that changes its input least, the CLI's bad input."""

import os

import numpy as np
import onnx
import pytest

from graphprune.cli import main
from graphprune.errors import UserError
from graphprune.model_io import save
from graphprune.passes import PruneBlocksPass, prune_blocks
from graphprune.passes.prune_blocks import analyze_blocks
from graphprune.pruning.block_importance import row_cosines
from graphprune.runtime import make_session, run
from graphprune.testing import gpt_decoder, mlp, mobilenet_v2, resnet

HF = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
KINDS = {"bert": "post-norm", "gpt2": "pre-norm", "llama": "pre-norm"}
EXPORTS = [f"{arch}_{exporter}" for arch in KINDS for exporter in ("torchscript", "dynamo")]
_CACHE = {}


def _hf(name):
    if name not in _CACHE:
        _CACHE[name] = onnx.load(os.path.join(HF, f"{name}.onnx"))
    return _CACHE[name]


def _tokens(batch=2, seq=11, seed=3):
    return {"input_ids": np.random.default_rng(seed).integers(0, 100, size=(batch, seq)).astype(np.int64)}


def _image(model, seed=3):
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {model.graph.input[0].name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _outputs(model, feed):
    return run(make_session(model), feed)


def _close(a, b, tol=1e-5):
    for name in a:
        err = np.linalg.norm(a[name] - b[name]) / max(np.linalg.norm(b[name]), 1e-12)
        assert err < tol, (name, err)


def _twin(model, *blocks, drop_norms=False):
    """The original with the blocks' branch outputs multiplied by zero (and, for post-norm, their
    LayerNorms replaced by Identity): the blocks then pass their input through, without rewiring."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    zero = onnx.helper.make_tensor("twin_zero", onnx.TensorProto.FLOAT, [], [0.0])
    twin.graph.initializer.append(zero)
    for unit in (u for block in blocks for u in block.units):
        add = twin.graph.node[unit.add]
        position = 1 if add.input[0] == unit.skip else 0
        branch = add.input[position]
        twin.graph.node.append(onnx.helper.make_node("Mul", [branch, "twin_zero"], [branch + "_zeroed"]))
        add.input[position] = branch + "_zeroed"
        for i in unit.post if drop_norms else ():
            node = twin.graph.node[i]
            if node.op_type == "LayerNormalization":
                identity = onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]])
                node.CopyFrom(identity)
    return _toposorted(twin)


def _toposorted(model):
    """The appended Mul nodes moved before their readers (ONNX wants nodes in topological order)."""
    nodes = list(model.graph.node)
    made = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        rest = []
        for node in pending:
            if all(n in made for n in node.input):
                ordered.append(node)
                made.update(node.output)
            else:
                rest.append(node)
        assert len(rest) < len(pending)
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


@pytest.mark.parametrize("name", EXPORTS)
def test_each_export_shows_its_layers_as_blocks(name):
    blocks = analyze_blocks(_hf(name))
    assert [b.kind for b in blocks] == [KINDS[name.split("_")[0]]] * 2
    assert all(b.removable and len(b.units) == 2 for b in blocks)
    assert all(b.units[0].attention and not b.units[1].attention for b in blocks)


@pytest.mark.parametrize("name", [n for n in EXPORTS if not n.startswith("bert")])
@pytest.mark.parametrize("index", [0, 1])
def test_removing_a_pre_norm_layer_equals_zeroing_its_branches(name, index):
    model = _hf(name)
    block = analyze_blocks(model)[index]
    result = PruneBlocksPass(indices=[index])(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert len(result.model.graph.initializer) < len(model.graph.initializer)
    for batch, seq in ((2, 11), (1, 5)):  # dynamic batch and sequence survive
        pruned = _outputs(result.model, _tokens(batch, seq))
        _close(pruned, _outputs(_twin(model, block), _tokens(batch, seq)))
    original = _outputs(model, _tokens(1, 5))["logits"]
    assert np.linalg.norm(pruned["logits"] - original) > 1e-2 * np.linalg.norm(original)  # the layer did matter


@pytest.mark.parametrize("name", ["bert_torchscript", "bert_dynamo"])
@pytest.mark.parametrize("index", [0, 1])
def test_removing_a_post_norm_layer_passes_the_previous_output_on(name, index):
    model = _hf(name)
    block = analyze_blocks(model)[index]
    assert all(model.graph.node[i].op_type == "LayerNormalization" for u in block.units for i in u.post)
    pruned = prune_blocks(model, indices=[index])
    onnx.checker.check_model(pruned, full_check=True)
    _close(_outputs(pruned, _tokens()), _outputs(_twin(model, block, drop_norms=True), _tokens()))
    if index == 1:  # the last layer: the output is what the original fed into it
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(onnx.ValueInfoProto(name=block.input))
        inner = run(make_session(probe), _tokens(), [block.input])[block.input]
        np.testing.assert_allclose(_outputs(pruned, _tokens())["last_hidden_state"], inner, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("build, count", [
    (lambda: resnet(18, width=0.25, image=32, num_classes=10), 5),
    (lambda: mobilenet_v2(width=0.25, image=32, num_classes=10), 11),
])
def test_removing_an_identity_shortcut_cnn_block_equals_zeroing_its_branch(build, count):
    model = build()
    blocks = analyze_blocks(model)
    assert len(blocks) == count and all(b.kind == "residual" and b.removable for b in blocks)
    for block in (blocks[0], blocks[-1]):  # ResNet: relu(x + 0) == x for the Relu output x
        pruned = prune_blocks(model, indices=[block.index])
        onnx.checker.check_model(pruned, full_check=True)
        _close(_outputs(pruned, _image(model)), _outputs(_twin(model, block), _image(model)))


def test_importance_removes_the_block_that_changes_its_input_least():
    model = gpt_decoder(layers=3, hidden=32, heads=4, ffn=64)
    for init in model.graph.initializer:  # layer 1's branches barely add anything
        if init.name.startswith("model.layers.1.") and init.name.endswith(("o_proj.weight", "fc2.weight")):
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1e-3, init.name))
    result = PruneBlocksPass(blocks=1, input_shapes={"input_ids": (2, 8)})(model)
    scores = {e["index"]: e["score"] for e in result.stats["blocks"]}
    assert [e["index"] for e in result.stats["removed"]] == [1]
    assert scores[1] < 1e-3 < min(scores[0], scores[2])
    assert not any(i.name.startswith("model.layers.1.") for i in result.model.graph.initializer)
    assert any(i.name.startswith("model.layers.2.") for i in result.model.graph.initializer)
    assert result.stats["params_after"] < result.stats["params_before"]
    assert "seeded random" in result.stats["calibration"]


def test_scores_are_one_minus_the_mean_cosine_per_token():
    x = np.array([[[1.0, 0.0], [0.0, 2.0]]])
    y = np.array([[[1.0, 1.0], [0.0, -3.0]]])
    np.testing.assert_allclose(row_cosines(x, y, axis=2), [np.sqrt(0.5), -1.0])
    maps = np.zeros((1, 3, 2, 2))
    np.testing.assert_allclose(row_cosines(maps, maps, axis=1), np.ones(4))  # zero rows count as unchanged


def test_zero_blocks_is_a_no_op_with_identical_outputs(tmp_path, capsys):
    model = _hf("gpt2_dynamo")
    result = PruneBlocksPass(blocks=0)(model)
    assert not result.modified and result.model is model
    assert PruneBlocksPass(ratio=0.4)(model).modified is False  # 0.4 of 2 blocks rounds to none
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(model, str(path))
    assert main(["prune", str(path), "-o", str(out), "--blocks", "0"]) == 0
    assert "(unchanged)" in capsys.readouterr().out
    feed = _tokens()
    for name, value in _outputs(model, feed).items():
        np.testing.assert_array_equal(_outputs(onnx.load(str(out)), feed)[name], value)


def test_cli_reports_blocks_and_scores_and_writes_a_valid_model(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(_hf("llama_dynamo"), str(path))
    assert main(["prune", str(path), "-o", str(out), "--blocks-ratio", "0.5", "--input-shape", "input_ids=1x16",
                 "--stats"]) == 0
    text = capsys.readouterr().out
    assert "blocks: 2 found, 2 removable, 1 removed" in text and "removed" in text and "MACs:" in text
    assert '"score"' in text and "model.model.layers." in text
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert any(p.key == "graphprune.removed_blocks" for p in written.metadata_props)


def test_external_data_model_is_pruned_from_disk_like_in_memory(tmp_path):
    model = gpt_decoder(layers=3, hidden=64, heads=4, ffn=256)
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    save(model, str(path), external_data=True)
    assert os.path.exists(str(path) + ".data")
    assert main(["prune", str(path), "-o", str(out), "--blocks", "1", "--input-shape", "input_ids=1x8"]) == 0
    expected = PruneBlocksPass(blocks=1, input_shapes={"input_ids": (1, 8)})(model).model
    written = onnx.load(str(out))  # with its data file
    assert {i.name for i in written.graph.initializer} == {i.name for i in expected.graph.initializer}
    _close(_outputs(written, _tokens()), _outputs(expected, _tokens()), tol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--blocks", "3"], "3 blocks asked for (--blocks), the model has 2 removable residual blocks"),
    (["--blocks", "-1"], "--blocks -1 must be 0 or more"),
    (["--blocks", "two"], "--blocks 'two' is not an integer"),
    (["--blocks-ratio", "1"], "--blocks-ratio 1.0 is outside [0.0, 1.0)"),
    (["--blocks", "1", "--blocks-ratio", "0.5"], "give --blocks K or --blocks-ratio R, not both"),
    (["--blocks", "1", "--ratio", "0.5"], "do not combine with --ratio"),
    (["--blocks-ratio", "0.5", "--ffn-ratio", "0.5"], "do not combine with --ffn-ratio"),
])
def test_bad_block_options_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, args, message):
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(_hf("gpt2_dynamo"), str(path))
    assert main(["prune", str(path), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_model_without_residual_blocks_exits_2_with_the_reason(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(mlp(16, hidden=(8,), classes=4), str(path))
    assert main(["prune", str(path), "-o", str(out), "--blocks", "1"]) == 2
    assert "no residual block found" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(UserError, match="no residual block"):
        PruneBlocksPass(blocks=1)(mlp(16, hidden=(8,), classes=4))


@pytest.mark.parametrize("kwargs, kind, post", [
    (dict(), "post-norm", 1),
    (dict(decomposed_layernorm=True), "post-norm", 9),  # ReduceMean/Sub/Pow/.../Add written out
])
def test_post_norm_encoder_builders_last_layer_removal_outputs_its_input(kwargs, kind, post):
    from graphprune.testing import bert_encoder

    model = bert_encoder(layers=3, hidden=32, heads=4, ffn=64, **kwargs)
    blocks = analyze_blocks(model)
    assert [b.kind for b in blocks] == [kind] * 3 and all(len(u.post) == post for b in blocks for u in b.units)
    pruned = prune_blocks(model, indices=[2])
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=blocks[2].input))
    inner = run(make_session(probe), _tokens(), [blocks[2].input])[blocks[2].input]
    np.testing.assert_allclose(_outputs(pruned, _tokens())["last_hidden_state"], inner, rtol=1e-6, atol=1e-6)


def test_gqa_swiglu_decoder_layer_removal_equals_zeroing_its_branches():
    model = gpt_decoder(layers=3, hidden=32, heads=4, kv_heads=2, ffn=64, gated=True)
    blocks = analyze_blocks(model)
    assert [b.kind for b in blocks] == ["pre-norm"] * 3
    pruned = prune_blocks(model, indices=[0, 1])  # two neighbours: the chain of rewirings resolves
    onnx.checker.check_model(pruned, full_check=True)
    twin = _twin(model, blocks[0], blocks[1])
    _close(_outputs(pruned, _tokens()), _outputs(twin, _tokens()))


def test_the_pass_runs_from_the_run_command(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(_hf("llama_torchscript"), str(path))
    assert main(["run", str(path), "-o", str(out), "--pass", "prune-blocks:blocks=1"]) == 0
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert len(analyze_blocks(written)) == 1


def _fused_encoder(layers=2, hidden=16, ffn=32, seed=0):
    """Post-norm layers as ORT's transformer optimizer writes them: com.microsoft Attention, then
    SkipLayerNormalization(proj, x), FFN, SkipLayerNormalization(down, h); a MatMul head."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, x = {}, [], "x"

    def w(name, *shape):
        inits[name] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        return name

    for i in range(layers):
        ctx, proj, h, up, act, down, out = (f"{n}{i}" for n in ("ctx", "proj", "h", "up", "act", "down", "out"))
        nodes += [
            helper.make_node("Attention", [x, w(f"qkv{i}", hidden, 3 * hidden), w(f"qkvb{i}", 3 * hidden)], [ctx],
                             domain="com.microsoft", num_heads=4),
            helper.make_node("MatMul", [ctx, w(f"wo{i}", hidden, hidden)], [proj]),
            helper.make_node("SkipLayerNormalization", [proj, x, w(f"g1_{i}", hidden), w(f"b1_{i}", hidden)], [h],
                             domain="com.microsoft", epsilon=1e-5),
            helper.make_node("MatMul", [h, w(f"w1_{i}", hidden, ffn)], [up]),
            helper.make_node("FastGelu", [up], [act], domain="com.microsoft"),
            helper.make_node("MatMul", [act, w(f"w2_{i}", ffn, hidden)], [down]),
            helper.make_node("SkipLayerNormalization", [down, h, w(f"g2_{i}", hidden), w(f"b2_{i}", hidden)], [out],
                             domain="com.microsoft", epsilon=1e-5),
        ]
        x = out
    nodes.append(helper.make_node("MatMul", [x, w("head", hidden, 3)], ["y"]))
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def test_ort_fused_post_norm_layers_are_blocks_and_removal_skips_their_skip_layernorms():
    model = _fused_encoder(layers=3)
    blocks = analyze_blocks(model)
    assert [b.kind for b in blocks] == ["post-norm"] * 3 and all(b.removable for b in blocks)
    pruned = prune_blocks(model, indices=[1])
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    for unit in blocks[1].units:  # the layer passes its input through: each SkipLayerNorm -> Identity(skip)
        node = twin.graph.node[unit.add]
        node.CopyFrom(onnx.helper.make_node("Identity", [unit.skip], [node.output[0]]))
    feed = {"x": np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)}
    _close(_outputs(pruned, feed), _outputs(twin, feed))
    kept = {i.name for i in pruned.graph.initializer}
    assert not {"qkv1", "wo1", "w1_1", "w2_1"} & kept and {"qkv0", "qkv2"} <= kept


def test_a_block_whose_inner_tensor_is_a_model_output_stays_with_the_reason():
    model = gpt_decoder(layers=2, hidden=32, heads=4, ffn=64)
    inner = next(n.output[0] for n in model.graph.node if n.name.startswith("/model/layers/layers.0/self_attn/k_proj"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(inner, onnx.TensorProto.FLOAT, ["N", "S", 32]))  # a KV cache
    blocks = analyze_blocks(model)
    assert not blocks[0].removable and "is a model output" in blocks[0].reason and blocks[1].removable
    with pytest.raises(UserError, match="2 blocks asked for, the model has 1 removable"):
        PruneBlocksPass(blocks=2, input_shapes={"input_ids": (1, 8)})(model)
    result = PruneBlocksPass(blocks=1, input_shapes={"input_ids": (1, 8)})(model)
    assert [e["index"] for e in result.stats["removed"]] == [1]
