"""Magnitude masks: exact unstructured counts, global threshold with a per-layer cap, N:M groups, mask record."""

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from graphprune.errors import UserError
from graphprune.sparsity.masks import (
    MASKS_KEY,
    global_prune_counts,
    n_m_fit_reason,
    n_m_mask,
    parse_pattern,
    read_mask_record,
    unstructured_mask,
    write_mask_record,
)


@pytest.mark.parametrize("text, expected", [("unstructured", None), ("2:4", (2, 4)), (" 1:8 ", (1, 8)), ("4:8", (4, 8))])
def test_parse_pattern_accepts_unstructured_and_n_m(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text, message", [
    ("4:4", "1 <= N < M"), ("5:4", "1 <= N < M"), ("0:4", "1 <= N < M"), ("2-4", "neither"), ("1:128", "larger than 64"),
])
def test_parse_pattern_refuses_bad_patterns(text, message):
    with pytest.raises(UserError, match=message):
        parse_pattern(text)


def test_unstructured_mask_prunes_exactly_the_smallest():
    weight = np.array([[0.5, -0.1, 3.0], [-2.0, 0.05, 0.2]], dtype=np.float32)
    keep = unstructured_mask(weight, 3)
    np.testing.assert_array_equal(keep, [[True, False, True], [True, False, False]])
    assert unstructured_mask(weight, 0).all()


def test_global_counts_follow_one_threshold():
    small = np.full(10, 0.01, dtype=np.float32)   # all below the big layer's magnitudes
    big = np.linspace(1, 2, 90).astype(np.float32)
    counts = global_prune_counts([small, big], sparsity=0.2, max_layer_sparsity=0.99)
    # 20 of 100 weights: the small layer's 10 would all go first, but the cap keeps one of them.
    assert counts == [9, 11]
    assert sum(counts) == 20


def test_global_counts_cap_redistributes_to_other_layers():
    tiny = np.full(100, 1e-3, dtype=np.float32)
    large = np.random.default_rng(0).standard_normal(900).astype(np.float32)
    counts = global_prune_counts([tiny, large], sparsity=0.5, max_layer_sparsity=0.6)
    assert counts[0] == 60 and sum(counts) == 500


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=5),
    sparsity=st.floats(0, 0.98),
    seed=st.integers(0, 2**16),
)
def test_global_counts_are_exact_capped_and_never_empty_a_layer(sizes, sparsity, seed):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(n).astype(np.float32) * rng.uniform(0.01, 10) for n in sizes]
    cap = max(0.99, sparsity)
    counts = global_prune_counts(weights, sparsity, cap)
    for count, n in zip(counts, sizes):
        assert 0 <= count <= min(int(np.floor(cap * n)), n - 1)
    reachable = sum(min(int(np.floor(cap * n)), n - 1) for n in sizes)
    assert sum(counts) == min(int(round(sparsity * sum(sizes))), reachable)


@settings(max_examples=25, deadline=None)
@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8)]),
    outer=st.integers(1, 4),
    groups=st.integers(1, 4),
    inner=st.integers(1, 3),
    axis=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_n_m_mask_keeps_the_n_largest_of_every_group(nm, outer, groups, inner, axis, seed):
    n, m = nm
    shape = [outer, inner, 2]
    shape[axis] = groups * m
    weight = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    keep = n_m_mask(weight, n, m, axis)
    kept = np.moveaxis(keep, axis, -1).reshape(-1, m)
    mags = np.moveaxis(np.abs(weight), axis, -1).reshape(-1, m)
    assert (kept.sum(axis=1) == n).all()
    # every kept magnitude is at least every pruned one of its group
    assert all(mags[g][kept[g]].min() >= mags[g][~kept[g]].max() for g in range(len(kept)))


def test_n_m_fit_reason_names_the_axis():
    assert n_m_fit_reason((8, 6, 3, 3), 1, 4) == "reduction axis 1 has length 6, not divisible by M=4"
    assert n_m_fit_reason((8, 8, 3, 3), 1, 4) is None


def _empty_model():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    return helper.make_model(graph)


def test_mask_record_merges_and_uses_the_shared_format():
    model = _empty_model()
    assert read_mask_record(model) == {}
    write_mask_record(model, {"a": {"pattern": "unstructured", "sparsity": 0.9}})
    write_mask_record(model, {"b": {"pattern": "2:4", "sparsity": 0.5}})
    props = [p for p in model.metadata_props if p.key == MASKS_KEY]
    assert len(props) == 1
    assert json.loads(props[0].value) == {
        "version": 1,
        "weights": {"a": {"pattern": "unstructured", "sparsity": 0.9}, "b": {"pattern": "2:4", "sparsity": 0.5}},
    }


def test_a_corrupt_mask_record_is_ignored_with_a_warning():
    model = _empty_model()
    model.metadata_props.add(key=MASKS_KEY, value="{not json")
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert read_mask_record(model) == {}
