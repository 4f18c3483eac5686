"""FineTunePass on the digits CNN: loss goes down, only weights change, masks hold, distillation works."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.passes import FineTunePass, finetune
from graphprune.runtime import make_session, run_samples
from graphprune.training.masks import PRUNED_CHANNELS_KEY
from tests.test_finetune_support import digits, no_weight_model, shrink_digits, structure, subset, weights_of


@pytest.fixture(scope="module")
def setup():
    model, train, labels, test, test_labels = digits()
    small, small_labels = subset(train, labels, 480)
    return {"model": model, "pruned": shrink_digits(model), "train": small, "labels": small_labels,
            "test": test, "test_labels": test_labels}


def _outputs(model, data):
    return run_samples(make_session(model), data)["logits"]


def test_loss_decreases_and_validation_improves_on_pruned_model(setup):
    result = FineTunePass(data=setup["train"], labels=setup["labels"], epochs=4, lr=3e-3)(setup["pruned"])
    stats = result.stats
    history = stats["history"]
    assert result.modified
    assert stats["loss"] == "ce on labels"
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    assert history[-1]["train_loss"] < 0.5 * history[1]["train_loss"]
    assert stats["val_loss_best"] < stats["val_loss_before"]
    assert stats["val_metric_best"] > stats["val_metric_before"]
    accuracy = np.mean(_outputs(result.model, setup["test"]).argmax(1) == setup["test_labels"])
    before = np.mean(_outputs(setup["pruned"], setup["test"]).argmax(1) == setup["test_labels"])
    assert accuracy > before + 0.3


def test_only_weight_values_change(setup):
    pruned = setup["pruned"]
    result = FineTunePass(data=setup["train"], labels=setup["labels"], epochs=1, batchnorm="keep")(pruned)
    assert structure(result.model) == structure(pruned)
    before, after = weights_of(pruned), weights_of(result.model)
    trained = [n for n in before if not n.endswith(("running_mean", "running_var"))]
    assert all(not np.array_equal(before[n], after[n]) for n in trained)
    for frozen in ("bn1.running_mean", "bn2.running_var", "bn3.running_mean"):
        np.testing.assert_array_equal(before[frozen], after[frozen])
    onnx.checker.check_model(result.model, full_check=True)


def test_batchnorm_statistics_are_recalibrated_from_the_data(setup):
    pruned = setup["pruned"]
    result = FineTunePass(data=setup["train"], labels=setup["labels"], epochs=0)(pruned)
    assert result.modified and result.stats["batchnorm_recalibrated"] == 3
    before, after = weights_of(pruned), weights_of(result.model)
    assert not np.allclose(before["bn2.running_mean"], after["bn2.running_mean"])
    np.testing.assert_array_equal(before["conv2.weight"], after["conv2.weight"])
    # conv1 sees the raw images: its BatchNorm statistics must equal the conv1 output moments.
    probe = onnx.ModelProto()
    probe.CopyFrom(pruned)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("/conv1/Conv_output_0", onnx.TensorProto.FLOAT, None))
    conv1 = run_samples(make_session(probe), setup["train"].subset(np.arange(len(setup["train"]))))["/conv1/Conv_output_0"]
    # the first 90% of a seeded shuffle trains; recompute over the same split
    split = FineTunePass(data=setup["train"], labels=setup["labels"])._split()[0]
    np.testing.assert_allclose(after["bn1.running_mean"], conv1[split].mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_no_op_without_epochs_or_recalibration(setup):
    model = setup["pruned"]
    result = FineTunePass(data=setup["train"], labels=setup["labels"], epochs=0, batchnorm="keep")(model)
    assert not result.modified
    assert result.model is model
    np.testing.assert_array_equal(_outputs(result.model, setup["test"]), _outputs(model, setup["test"]))


def test_sparsity_masks_stay_zero(setup):
    from graphprune.sparsity.masks import write_mask_record

    model = onnx.ModelProto()
    model.CopyFrom(setup["pruned"])
    weights = weights_of(model)
    w = weights["conv2.weight"]
    w = np.where(np.abs(w) >= np.median(np.abs(w)), w, 0).astype(np.float32)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "conv2.weight":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, "conv2.weight"))
    write_mask_record(model, {"conv2.weight": {"pattern": "unstructured", "sparsity": 0.5}})
    result = FineTunePass(data=setup["train"], labels=setup["labels"], epochs=2, lr=3e-3)(model)
    after = weights_of(result.model)["conv2.weight"]
    assert result.stats["masked_weights"] == 1
    assert np.all(after[w == 0] == 0)
    assert np.mean(after[w != 0] != w[w != 0]) > 0.9  # the kept weights did train


def test_pruned_channel_masks_stay_zero(setup):
    model = onnx.ModelProto()
    model.CopyFrom(setup["model"])
    weights = weights_of(model)
    zeroed = {"conv1.weight": 2, "conv1.bias": 2, "bn1.weight": 2, "bn1.bias": 2}
    for i, init in enumerate(model.graph.initializer):
        if init.name in zeroed:
            value = weights[init.name].copy()
            value[:zeroed[init.name]] = 0
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, init.name))
    record = {name: {"0": list(range(count))} for name, count in zeroed.items()}
    model.metadata_props.add(key=PRUNED_CHANNELS_KEY, value=json.dumps(record))
    result = FineTunePass(data=setup["train"], labels=setup["labels"], epochs=1, lr=3e-3, val_split=0)(model)
    after = weights_of(result.model)
    assert result.stats["masked_weights"] == 4
    for name, count in zeroed.items():
        assert np.all(after[name][:count] == 0), name
        assert not np.array_equal(after[name][count:], weights[name][count:]), name


def test_label_free_distillation_raises_agreement_with_teacher(setup):
    teacher, pruned, test = setup["model"], setup["pruned"], setup["test"]
    reference = _outputs(teacher, test).argmax(1)
    before = np.mean(_outputs(pruned, test).argmax(1) == reference)
    result = FineTunePass(data=setup["train"], teacher=teacher, epochs=4, lr=3e-3)(pruned)
    after = np.mean(_outputs(result.model, test).argmax(1) == reference)
    assert result.stats["loss"] == "kl distillation, T=2"
    assert result.stats["val_loss_best"] < result.stats["val_loss_before"]
    assert after > before + 0.3 and after > 0.8


def test_labels_and_distillation_combined_and_mse_distillation(setup):
    combined = FineTunePass(data=setup["train"], labels=setup["labels"], teacher=setup["model"], epochs=1,
                            distill_weight=0.3, temperature=4)(setup["pruned"])
    assert combined.stats["loss"] == "0.7 x ce on labels + 0.3 x kl distillation, T=4"
    mse = FineTunePass(data=setup["train"], teacher=setup["model"], distill_loss="mse", epochs=2, lr=3e-3)(setup["pruned"])
    assert mse.stats["loss"] == "mse distillation"
    assert mse.stats["history"][2]["train_loss"] < mse.stats["history"][1]["train_loss"]


def test_weights_in_constant_nodes_are_written_back_into_them(setup):
    model = onnx.ModelProto()
    model.CopyFrom(setup["pruned"])
    moved = [i for i in model.graph.initializer if i.name in ("conv1.weight", "fc.weight")]
    for init in moved:
        node = onnx.helper.make_node("Constant", [], [init.name], name=f"const_{init.name}", value=init)
        model.graph.node.insert(0, node)
        model.graph.initializer.remove(init)
    result = finetune(model, data=setup["train"], labels=setup["labels"], epochs=1)
    assert structure(result) == structure(model)
    before, after = weights_of(model), weights_of(result)
    assert not np.array_equal(before["conv1.weight"], after["conv1.weight"])
    assert not np.array_equal(before["fc.weight"], after["fc.weight"])


def test_fixed_batch_model_trains_with_its_batch_size():
    from tests.helpers import conv_model

    model = conv_model(dynamic_batch=False)  # x[1,3,8,8]
    rng = np.random.default_rng(0)
    data = InputSet({"x": rng.standard_normal((40, 3, 8, 8)).astype(np.float32)}, fixed_batch=1)
    labels = rng.integers(0, 5, 40)
    result = FineTunePass(data=data, labels=labels, epochs=2, batch_size=16, lr=1e-2)(model)
    assert result.modified and result.stats["steps"] == 2 * 36  # 4 samples held out, batch forced to 1
    onnx.checker.check_model(result.model, full_check=True)


def test_refusals(setup):
    data, labels = setup["train"], setup["labels"]
    with pytest.raises(UserError, match="needs labels"):
        FineTunePass(data=data)(setup["pruned"])
    with pytest.raises(UserError, match="no trainable weights"):
        x = InputSet({"x": np.ones((8, 4), np.float32)})
        FineTunePass(data=x, labels=np.zeros(8, np.int64))(no_weight_model())
    with pytest.raises(UserError, match="480 labels for 479 samples"):
        FineTunePass(data=data.subset(np.arange(479)), labels=labels)(setup["pruned"])
    with pytest.raises(UserError, match="range over"):
        FineTunePass(data=data, labels=labels + 5)(setup["pruned"])
    with pytest.raises(UserError, match="dtype bool"):
        FineTunePass(data=data, labels=labels > 3)(setup["pruned"])
    bad = InputSet({"images": np.ones((8, 1, 7, 7), np.float32)})
    with pytest.raises(UserError, match="input 'images' has shape"):
        FineTunePass(data=bad, labels=np.zeros(8, np.int64))(setup["pruned"])


def test_non_finite_loss_stops_and_names_the_step(setup):
    with pytest.raises(UserError, match=r"loss became .* at epoch 1, step \d+"):
        FineTunePass(data=setup["train"], labels=setup["labels"], optimizer="sgd", lr=1e30, epochs=1)(setup["pruned"])


def test_integer_operator_model_is_refused(setup):
    model = onnx.ModelProto()
    model.CopyFrom(setup["pruned"])
    model.graph.node.insert(0, onnx.helper.make_node("DynamicQuantizeLinear", ["images"], ["q", "s", "z"], name="q"))
    with pytest.raises(UserError, match=r"computes in integers \(DynamicQuantizeLinear\)"):
        FineTunePass(data=setup["train"], labels=setup["labels"])(model)


def test_qdq_model_fine_tunes_in_place_and_beats_the_untuned_qdq_model(setup):
    """Quantization-aware fine-tuning: the pruned digits CNN quantized to QDQ, then trained with the
    straight-through estimator; the written model keeps its int8 weights, scales and structure."""
    from graphprune import insert_qdq

    qdq = insert_qdq(setup["pruned"], data=setup["train"], measure=False)
    tuned = FineTunePass(data=setup["train"], labels=setup["labels"], epochs=6, lr=5e-3, val_split=0.0,
                         batchnorm="keep")(qdq).model
    accuracy = lambda m: float((_outputs(m, setup["test"]).argmax(-1) == setup["test_labels"]).mean())  # noqa: E731
    before, after = accuracy(qdq), accuracy(tuned)
    assert after > before + 0.3, (before, after)
    assert structure(tuned) == structure(qdq)
    old = {i.name: i for i in qdq.graph.initializer}
    new = {i.name: i for i in tuned.graph.initializer}
    changed = [n for n in old if not np.array_equal(numpy_helper.to_array(old[n]), numpy_helper.to_array(new[n]))]
    assert changed and all(old[n].data_type == new[n].data_type == onnx.TensorProto.INT8 for n in changed
                           if "weight_quantized" in n)
    assert all("scale" not in n and "zero_point" not in n for n in changed)  # calibration is kept
    onnx.checker.check_model(tuned, full_check=True)


def _token_classifier() -> onnx.ModelProto:
    """x[N,6,8] -> MatMul+Add -> LayerNorm -> Gelu (Erf form) -> MatMul+Add -> logits[N,6,5] (opset 17)."""
    from onnx import helper

    rng = np.random.default_rng(7)
    arr = lambda name, *shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("LayerNormalization", ["h1", "ln_s", "ln_b"], ["n1"], name="ln", axis=-1),
        helper.make_node("Div", ["n1", "sqrt2"], ["d"], name="gelu_div"),
        helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
        helper.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
        helper.make_node("Mul", ["n1", "e1"], ["g0"], name="gelu_mul"),
        helper.make_node("Mul", ["g0", "half"], ["g"], name="gelu_half"),
        helper.make_node("MatMul", ["g", "w2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["logits"], name="fc2_bias"),
    ]
    scalars = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("sqrt2", 2**0.5), ("one", 1.0), ("half", 0.5))]
    inits = [arr("w1", 8, 16), arr("b1", 16), numpy_helper.from_array(np.ones(16, np.float32), "ln_s"),
             numpy_helper.from_array(np.zeros(16, np.float32), "ln_b"), arr("w2", 16, 5), arr("b2", 5), *scalars]
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6, 8])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 6, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_token_logits_train_with_per_token_labels_and_bias_adds_train():
    model = _token_classifier()
    rng = np.random.default_rng(8)
    data = InputSet({"x": rng.standard_normal((64, 6, 8)).astype(np.float32)})
    labels = (data.arrays["x"] @ rng.standard_normal((8, 5))).argmax(-1)  # learnable per-token classes
    result = FineTunePass(data=data, labels=labels, epochs=20, batch_size=16, lr=1e-2, val_split=0)(model)
    history = result.stats["history"]
    assert history[-1]["train_loss"] < 0.5 * history[1]["train_loss"]
    assert history[-1]["train_metric"] > history[1]["train_metric"]
    before, after = weights_of(model), weights_of(result.model)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == {"w1", "b1", "ln_s", "ln_b", "w2", "b2"}  # the Gelu constants stay frozen
    with pytest.raises(UserError, match=r"class ids need shape \[N, 6\]"):
        FineTunePass(data=data, labels=labels[:, 0], epochs=1)(model)


def test_channels_masked_by_the_prune_pass_stay_zero(setup):
    from graphprune.passes.prune_channels import prune_channels

    masked = prune_channels(setup["model"], ratio=0.5, mode="mask")
    before = weights_of(masked)
    result = FineTunePass(data=setup["train"], labels=setup["labels"], teacher=setup["model"], epochs=1)(masked)
    after = weights_of(result.model)
    assert result.stats["masked_weights"] >= 9  # conv weight/bias and BatchNorm scale/bias of 3 layers...
    for name in ("conv1.weight", "conv2.weight", "bn2.weight", "bn2.bias", "fc.weight"):
        zero = before[name] == 0
        assert zero.any() and np.all(after[name][zero] == 0), name
    # masked == removed: the mask-mode model still computes what the removed model computes
    removed = prune_channels(result.model, ratio=0.0)
    np.testing.assert_allclose(_outputs(result.model, setup["test"]), _outputs(removed, setup["test"]), rtol=1e-4, atol=1e-4)


def test_recipe_style_arguments_read_labels_and_teacher_from_files(setup):
    from graphprune.recipes import build_pass
    from tests.test_finetune_support import DIGITS, MODELS

    finetune_pass = build_pass("finetune", {"labels": f"{MODELS}/digits_train.npz:labels", "teacher": DIGITS},
                               context={"data": setup["train"]})
    assert finetune_pass.labels.shape == (1437,) and finetune_pass.teacher.graph.output[0].name == "logits"
    with pytest.raises(UserError, match="has no array 'nope'"):
        build_pass("finetune", {"labels": f"{MODELS}/digits_train.npz:nope"})


def test_training_runs_on_plain_onnxruntime_at_any_batch_size(setup):
    """One step graph (batch dim dynamic) serves every batch size; no onnxruntime-training anywhere."""
    import importlib.util

    from graphprune.training.artifacts import TrainingSession, build_training_graph, prepare_for_training
    from graphprune.training.losses import BatchTargets, resolve_loss

    model = onnx.ModelProto()
    model.CopyFrom(setup["pruned"])
    model.ir_version = 11  # as onnx >= 1.18 writes it
    work, trainable = prepare_for_training(model)
    spec = resolve_loss((2, 10), "logits", setup["labels"], len(setup["labels"]), False)
    graph = build_training_graph(work, trainable.names, spec, {})
    targets = BatchTargets(spec, setup["labels"], None, 10)
    images = setup["train"].arrays["images"]
    with TrainingSession(graph, threads=1) as session:
        assert session.step.step_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
        for size in (1, 7, 32):
            idx = np.arange(size)
            loss, output = session.train_step({"images": images[idx], **targets.feeds(idx)}, 1e-3)
            assert np.isfinite(loss) and output.shape == (size, 10)
    assert importlib.util.find_spec("onnxruntime.training") is None


def test_batchnorm_statistics_in_constant_nodes_are_recalibrated(setup):
    """Paddle exports hold BatchNorm statistics in Constant nodes: they are re-estimated in place."""
    from graphprune.training.batchnorm import recalibrate_batchnorm

    model = onnx.ModelProto()
    model.CopyFrom(setup["pruned"])
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert bn
    stats = {name for node in bn for name in node.input[3:5]}
    moved = [init for init in model.graph.initializer if init.name in stats]
    for init in moved:
        model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [init.name], value=numpy_helper.from_array(
            numpy_helper.to_array(init))))
    kept = [init for init in model.graph.initializer if init.name not in stats]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    result, count = recalibrate_batchnorm(model, setup["train"])
    assert count == len(bn)
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in result.graph.node
                 if n.op_type == "Constant"}
    before = {init.name: numpy_helper.to_array(init) for init in moved}
    assert all(not np.allclose(constants[name], before[name]) for name in stats)
    onnx.checker.check_model(result, full_check=True)
