"""Compact weight storage: exact round trip, ORT loads it with bit-identical outputs, quantized weights too."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from graphprune.errors import UserError
from graphprune.passes.sparsify_weights import SparsifyWeightsPass
from graphprune.runtime import make_session, run
from graphprune.sparsity.masks import read_weight_masks
from graphprune.sparsity.storage import (
    compact_initializers,
    compact_weight_names,
    encode_positions,
    expand_compact_weights,
    stored_weights,
)
from tests.test_sparsify_pass import LAYERS, small_net, weights

_X = np.random.default_rng(7).standard_normal((4, 3, 8, 8)).astype(np.float32)


def _run(model, optimization="all"):
    return run(make_session(model, optimization=optimization), {"x": _X})["y"]


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(1, 3000),
    density=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5, 1.0]),
    dtype=st.sampled_from([np.float32, np.float16, np.int8]),
    seed=st.integers(0, 2**16),
)
def test_positions_round_trip_exactly_even_across_long_gaps(size, density, dtype, seed):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal(size) * 50).astype(dtype)
    weight[rng.random(size) >= density] = 0
    steps, values = encode_positions(weight)
    assert steps.dtype == np.uint8 and values.dtype == weight.dtype and len(steps) == len(values)
    positions = np.cumsum(steps.astype(np.int64))
    assert np.all(np.diff(positions) > 0) and positions[-1] < size
    rebuilt = np.zeros(size, dtype=dtype)
    rebuilt[positions] = values
    np.testing.assert_array_equal(rebuilt, weight)


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.9}, {"sparsity": 0.7, "scope": "layer"}, {"pattern": "2:4"}])
def test_sparse_storage_matches_dense_storage_bit_for_bit(kwargs):
    model = small_net()
    dense = SparsifyWeightsPass(storage="dense", **kwargs)(model).model
    compact = SparsifyWeightsPass(storage="sparse", **kwargs)(model)
    assert compact.modified
    assert compact.model.ByteSize() < dense.ByteSize()
    for optimization in ("all", "disabled"):  # folded at load, or rebuilt on every run
        np.testing.assert_array_equal(_run(compact.model, optimization), _run(dense, optimization))
    # The inverse restores exactly the dense-with-zeros weights, and masks read the same either way.
    restored = weights(expand_compact_weights(compact.model))
    for name, value in weights(dense).items():
        np.testing.assert_array_equal(restored[name], value)
    dense_masks, compact_masks = read_weight_masks(dense), read_weight_masks(compact.model)
    assert set(compact_masks) == set(dense_masks)
    for name in dense_masks:
        np.testing.assert_array_equal(compact_masks[name], dense_masks[name])


def test_ort_folds_the_rebuild_when_the_session_is_created(tmp_path):
    compact = SparsifyWeightsPass(sparsity=0.9, storage="sparse")(small_net()).model
    assert sorted(compact_weight_names(compact)) == sorted(LAYERS)
    optimized = tmp_path / "optimized.onnx"
    make_session(compact, optimization="basic", optimized_model_path=str(optimized))
    ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert not ops & {"ScatterElements", "CumSum", "ConstantOfShape"}


def test_weights_with_few_zeros_stay_dense_with_a_reason():
    model = small_net()
    compacted, kept = compact_initializers(model, ["conv_w", "proj_b"])
    assert compacted == [] and kept == {
        "conv_w": "too few zeros for compact storage to be smaller",
        "proj_b": "too few zeros for compact storage to be smaller",
    }


def test_an_all_zero_weight_is_stored_and_rebuilt():
    model = small_net()
    init = next(i for i in model.graph.initializer if i.name == "conv_w")
    init.CopyFrom(numpy_helper.from_array(np.zeros((16, 8, 3, 3), np.float32), "conv_w"))
    reference = _run(model)
    compacted, _ = compact_initializers(model, ["conv_w"])
    assert compacted == ["conv_w"]
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(stored_weights(model, ["conv_w"])["conv_w"], 0)
    np.testing.assert_array_equal(_run(model), reference)


def test_quantized_weights_are_compacted_after_quantization(tmp_path):
    """sparsify (dense) -> ORT static QDQ quantization -> compact the int8 weights: same outputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": _X[i:i + 1]} for i in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    sparse = SparsifyWeightsPass(sparsity=0.9)(small_net()).model
    onnx.save(sparse, str(tmp_path / "sparse.onnx"))
    quantize_static(str(tmp_path / "sparse.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    result = SparsifyWeightsPass(sparsity=0.0, storage="sparse")(quantized)
    assert result.modified and result.stats["layers"] == []
    compacted = result.stats["compacted"]
    assert compacted and all(
        numpy_helper.to_array(i).dtype == np.int8 for i in quantized.graph.initializer if i.name in compacted
    )
    assert "conv_w_quantized" in compacted  # the largest weight; smaller ones may not pay the overhead
    assert result.model.ByteSize() < quantized.ByteSize()
    np.testing.assert_array_equal(_run(result.model), _run(quantized))


def test_sparse_storage_refuses_opsets_without_the_rebuild_ops():
    with pytest.raises(UserError, match="needs ai.onnx opset >= 11 .the model imports opset 10"):
        SparsifyWeightsPass(sparsity=0.5, storage="sparse")(small_net(opset=10))


def test_pruned_weights_that_stay_dense_keep_their_zeros():
    """Sparse storage hands each pruned weight to the compaction once; one that stays dense (too few
    zeros to save bytes) is written pruned, as dense storage writes it."""
    result = SparsifyWeightsPass(sparsity=0.3, storage="sparse")(small_net())
    dense = SparsifyWeightsPass(sparsity=0.3)(small_net())
    assert result.stats["kept_dense"] and result.stats["compacted"]
    expected = weights(dense.model)
    got = stored_weights(result.model, list(LAYERS))
    assert got.keys() == set(LAYERS)
    for name in LAYERS:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
