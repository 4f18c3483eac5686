"""The model corpus: every fixture and light model is valid, runs in ONNX Runtime with sane outputs, and is seeded."""

from __future__ import annotations

import functools
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphprune.data import random_inputs
from graphprune.ir import count_params, get_attr, real_inputs, value_shape
from graphprune.runtime import make_session, run
from graphprune.testing import (
    DYNAMIC_FIXTURES,
    fixture_corpus,
    gpt_decoder,
    light_model_names,
    light_model_path,
    load_light_model,
    resnet,
    transformer_corpus,
)

CNN = fixture_corpus()
TRANSFORMERS = transformer_corpus()
LIGHT = light_model_names()


@functools.lru_cache(maxsize=None)
def _built(name: str) -> onnx.ModelProto:
    """Each fixture is built once per session; tests must not modify the returned model."""
    return {**CNN, **TRANSFORMERS}[name]()


def _run(session, model: onnx.ModelProto, shapes: Optional[Mapping[str, Tuple[int, ...]]] = None, seed: int = 0):
    feeds = random_inputs(model, shapes, samples=1, seed=seed).arrays
    return feeds, run(session, feeds)


def _assert_healthy(outputs: Dict[str, np.ndarray], where: str) -> None:
    """Finite, not constant, not exploding; probabilities not saturated to one class."""
    for name, value in outputs.items():
        assert np.isfinite(value).all(), f"{where}: {name} has non-finite values"
        spread = float(value.max() - value.min())
        assert spread > 1e-4 * (float(np.abs(value).max()) + 1e-12), f"{where}: {name} is constant"
        assert float(np.abs(value).max()) < 1e3, f"{where}: {name} exploded (max |x| {np.abs(value).max():.3g})"
        if value.min() >= 0 and np.allclose(value.sum(axis=-1), 1.0, atol=1e-3):
            assert float(value.max()) < 0.99, f"{where}: softmax {name} saturated (max {value.max():.4f})"


def _dims(model: onnx.ModelProto, fill: Mapping[str, int]) -> Dict[str, Tuple[int, ...]]:
    """Concrete input shapes: declared ints, symbolic dims from ``fill``."""
    return {vi.name: tuple(d if isinstance(d, int) else fill[d] for d in value_shape(vi)) for vi in real_inputs(model.graph)}


# --- built fixtures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CNN))
def test_cnn_fixture_is_valid_and_runs(name):
    model = _built(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    session = make_session(model)
    symbolic = {d for vi in real_inputs(model.graph) for d in value_shape(vi) if isinstance(d, str)}
    assert symbolic == set(DYNAMIC_FIXTURES.get(name, ())), f"{name}: unexpected dynamic dims {symbolic}"
    # Dynamic fixtures run at two batch sizes (and two image sizes where spatial dims are open).
    sizes = [{"N": 1, "H": 48, "W": 48}, {"N": 3, "H": 64, "W": 64}] if symbolic else [{}]
    seen = set()
    for seed, fill in enumerate(sizes):
        _, outputs = _run(session, model, _dims(model, fill), seed=seed)
        _assert_healthy(outputs, name)
        for out in outputs.values():
            if "N" in fill:
                assert out.shape[0] == fill["N"]
        seen.add(tuple(o.shape for o in outputs.values()))
    assert len(seen) == len(sizes)


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformer_fixture_runs_at_two_lengths(name):
    model = _built(name)
    onnx.checker.check_model(model, full_check=True)
    session = make_session(model)
    for seed, (batch, seq) in enumerate(((1, 5), (2, 17))):
        _, outputs = _run(session, model, {"input_ids": (batch, seq)}, seed=seed)
        _assert_healthy(outputs, name)
        for out_name, value in outputs.items():
            assert value.shape[0] == batch
            if out_name != "logits" or name.startswith("gpt"):
                assert value.shape[1] == seq


def test_gpt_decoder_is_causal():
    """Changing the last token changes the last position's logits and no earlier one."""
    model = _built("gpt_decoder_gqa_swiglu")
    session = make_session(model)
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 9))
    changed = ids.copy()
    changed[:, -1] = (changed[:, -1] + 1) % 100
    before = run(session, {"input_ids": ids})["logits"]
    after = run(session, {"input_ids": changed})["logits"]
    np.testing.assert_allclose(before[:, :-1], after[:, :-1], rtol=1e-5, atol=1e-5)
    assert np.abs(before[:, -1] - after[:, -1]).max() > 1e-3


def test_gpt_decoder_runs_up_to_max_positions():
    model = gpt_decoder(layers=1, hidden=32, heads=4, kv_heads=1, ffn=64, max_positions=24)
    outputs = run(make_session(model), {"input_ids": np.zeros((1, 24), dtype=np.int64)})
    assert outputs["logits"].shape == (1, 24, 100)
    assert np.isfinite(outputs["logits"]).all()


def _ops(model: onnx.ModelProto):
    return [n.op_type for n in model.graph.node]


def _conv_groups(model: onnx.ModelProto):
    return {get_attr(n, "group", 1) for n in model.graph.node if n.op_type == "Conv"}


def test_fixtures_exercise_their_architecture_features():
    # Each fixture exists to exercise a pattern; check the pattern really is in the graph.
    v2 = _built("mobilenet_v2")
    assert max(_conv_groups(v2)) > 1, "depthwise convs"
    assert all(len(n.input) == 3 for n in v2.graph.node if n.op_type == "Clip"), "ReLU6 as Clip(x, min, max)"
    v3 = _ops(_built("mobilenet_v3_block_net"))
    assert {"HardSwish", "HardSigmoid", "GlobalAveragePool", "Mul"} <= set(v3)
    unet = _ops(_built("unet"))
    assert {"ConvTranspose", "Resize", "Concat", "MaxPool"} <= set(unet)
    yolo = _built("yolov8_c2f_net")
    assert {"Split", "Concat", "Sigmoid", "Mul", "Resize"} <= set(_ops(yolo))
    assert _ops(yolo).count("MaxPool") == 3, "SPPF"
    assert [o.name for o in yolo.graph.output] == ["p3", "p4"]
    assert 32 in _conv_groups(_built("resnext_block_net"))
    assert "BatchNormalization" in _ops(_built("resnet50")) and "Add" in _ops(_built("resnet50"))
    flat = _built("conv_flatten_mlp")
    assert _ops(flat).index("Flatten") < _ops(flat).index("Gemm")
    bert = _ops(_built("bert_encoder"))
    assert {"LayerNormalization", "Erf", "Softmax", "Gather"} <= set(bert)
    decomposed = _ops(_built("bert_encoder_decomposed_ln"))
    assert "LayerNormalization" not in decomposed and {"ReduceMean", "Pow", "Sqrt"} <= set(decomposed)
    gqa = _built("gpt_decoder_gqa_swiglu")
    assert {"Expand", "Where", "Slice"} <= set(_ops(gqa))
    dims = {i.name: list(i.dims) for i in gqa.graph.initializer}
    assert dims["model.layers.0.self_attn.k_proj.weight"] == [64, 32], "2 kv heads of 16"
    assert dims["model.layers.0.mlp.gate_proj.weight"] == [64, 256]
    assert "Expand" not in _ops(_built("gpt_decoder"))


def test_torch_export_naming():
    model = _built("resnet18")
    inits = {i.name for i in model.graph.initializer}
    assert {"layer1.0.conv1.weight", "layer1.0.bn1.running_var", "fc.weight", "fc.bias"} <= inits
    assert "/layer1/layer1.0/conv1/Conv" in {n.name for n in model.graph.node}
    assert len({n.name for n in model.graph.node}) == len(model.graph.node), "node names are unique"


def test_batch_norm_statistics_are_varied_and_positive():
    model = _built("resnet18")
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    var, gamma = values["layer2.0.bn1.running_var"], values["layer2.0.bn1.weight"]
    assert (var > 0).all()
    # Per-channel magnitudes differ, so channel-ranking criteria have something to rank.
    assert gamma.std() > 0.1 * gamma.mean()
    filters = np.linalg.norm(values["layer2.0.conv1.weight"].reshape(len(var), -1), axis=1)
    assert filters.max() > 1.3 * filters.min()


def test_resnet50_full_size_parameters():
    # Parameters do not depend on the image size; 64 px keeps the build cheap.
    model = resnet(50, image=64)
    # torchvision's 25,557,032 parameters plus 53 BNs' running statistics (53,120 values).
    assert 25_550_000 < count_params(model) - 53_120 < 25_565_000
    macs = _conv_gemm_macs(model)
    # Every feature map is exactly 224/64 times larger per side at 224 px; the fc layer is not.
    fc = 2048 * 1000
    assert 4.0e9 < (macs - fc) * (224 / 64) ** 2 + fc < 4.2e9


def _conv_gemm_macs(model: onnx.ModelProto) -> int:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: value_shape(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            w = weights[node.input[1]]
            per_output = int(np.prod(w[1:]))  # Conv: in/groups * k * k; Gemm (transB): in
            macs += int(np.prod(shapes[node.output[0]])) * per_output
    return macs


def test_blocks_override_builds_deeper_nets():
    shallow = resnet(50, width=0.125, image=32, num_classes=10)
    deeper = resnet(50, width=0.125, image=32, num_classes=10, blocks=(6, 8, 12, 6))
    assert _ops(deeper).count("Conv") - _ops(shallow).count("Conv") == 3 * 16


def test_same_seed_same_bytes_other_seed_other_weights():
    for build in (CNN["yolov8_c2f_net"], TRANSFORMERS["gpt_decoder_gqa_swiglu"]):
        assert build().SerializeToString() == build().SerializeToString()
    a = resnet(18, width=0.125, image=32, num_classes=10, seed=1)
    b = resnet(18, width=0.125, image=32, num_classes=10, seed=2)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert a.graph.initializer[0].raw_data != b.graph.initializer[0].raw_data
    assert load_light_model("squeezenet", seed=3).SerializeToString() == load_light_model("squeezenet", seed=3).SerializeToString()
    assert load_light_model("squeezenet", seed=3).SerializeToString() != load_light_model("squeezenet", seed=4).SerializeToString()


# --- onnx's light models -----------------------------------------------------------------------------


def test_light_model_names():
    assert {"resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet", "vgg19",
            "bvlc_alexnet", "zfnet512"} <= set(LIGHT)
    with pytest.raises(ValueError, match="no light model"):
        light_model_path("resnet1000")


@pytest.mark.parametrize("name", LIGHT)
def test_light_model_is_valid_and_runs(name):
    original = onnx.load(light_model_path(name))
    model = load_light_model(name, seed=0)
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "ConstantOfShape" for n in model.graph.node)
    inits = {i.name for i in model.graph.initializer}
    assert not inits & {vi.name for vi in model.graph.input}, "initializers are not graph inputs"
    # Same interface: the inputs a user feeds and the outputs, with their shapes; same opset.
    assert [(vi.name, value_shape(vi)) for vi in real_inputs(model.graph)] == [
        (vi.name, value_shape(vi)) for vi in real_inputs(original.graph)
    ]
    assert [(vi.name, value_shape(vi)) for vi in model.graph.output] == [
        (vi.name, value_shape(vi)) for vi in original.graph.output
    ]
    assert model.opset_import[0].version == original.opset_import[0].version
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            assert (numpy_helper.to_array(_init(model, node.input[4])) > 0).all(), "BN variance positive"
    session = make_session(model)
    assert [o.name for o in session.get_outputs()] == [o.name for o in original.graph.output]
    _, outputs = _run(session, model)
    _assert_healthy(outputs, name)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)
