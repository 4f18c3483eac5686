"""Streamed global selection (radix select over weights read one at a time) equals the in-memory ranking."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.sparsity import selection
from graphprune.sparsity.masks import global_prune_counts
from graphprune.sparsity.selection import LazyWeights, smallest_counts


def _reference(weights, count):
    """The counts per layer of a stable argsort's first ``count`` over the concatenated magnitudes."""
    magnitudes = np.concatenate([np.abs(w.astype(np.result_type(*weights))).ravel() for w in weights])
    chosen = np.zeros(magnitudes.size, dtype=bool)
    chosen[np.argsort(magnitudes, kind="stable")[:count]] = True
    ends = np.cumsum([w.size for w in weights])
    return [int(np.count_nonzero(chosen[end - w.size:end])) for w, end in zip(weights, ends)]


def _streamed(weights, count, reads=None, owned=False):
    def load(i):
        if reads is not None:
            reads.append(i)
        return weights[i].copy() if owned else weights[i]

    before = [w.copy() for w in weights]
    lazy = LazyWeights([w.size for w in weights], [w.dtype for w in weights], load, owned=owned)
    counts = smallest_counts(lazy, list(range(len(weights))), count, in_memory_limit=0)
    for w, b in zip(weights, before):  # the caller's arrays are never written
        np.testing.assert_array_equal(w, b)
    return counts


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 80), min_size=1, max_size=5),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    levels=st.sampled_from([0, 3, 1000]),  # few distinct values: many ties across layers
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    owned=st.booleans(),
)
def test_streamed_selection_matches_the_stable_sort(sizes, dtype, levels, fraction, seed, owned):
    rng = np.random.default_rng(seed)
    weights = []
    for n in sizes:
        w = rng.standard_normal(n) * rng.uniform(0.01, 10)
        if levels:
            w = np.round(w * levels) / levels
        weights.append(w.astype(dtype))
    count = int(round(fraction * sum(sizes)))
    assert _streamed(weights, count, owned=owned) == _reference(weights, count)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 60), min_size=1, max_size=8),
    small=st.sampled_from([1, 20, 2**16]),
    gather=st.sampled_from([1, 70, 2**20]),
    keep_limit=st.sampled_from([0, 2**24]),
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_weights_keyed_together_or_alone_select_alike(sizes, small, gather, keep_limit, fraction, seed):
    """Small weights are gathered and keyed as one (``_SMALL``/``_GATHER``), large ones alone, empty
    ones too: every mix gives the stable sort's counts, also when the last pass keeps nothing."""
    rng = np.random.default_rng(seed)
    weights = [(np.round(rng.standard_normal(n) * 4) / 4).astype(rng.choice([np.float16, np.float32])) for n in sizes]
    count = int(round(fraction * sum(sizes)))
    saved = selection._SMALL, selection._GATHER, selection._KEEP_LIMIT
    selection._SMALL, selection._GATHER, selection._KEEP_LIMIT = small, gather, keep_limit
    try:
        assert _streamed(weights, count) == _streamed(weights, count, owned=True) == _reference(weights, count)
    finally:
        selection._SMALL, selection._GATHER, selection._KEEP_LIMIT = saved


def test_ties_negative_zero_inf_and_nan_order_as_the_stable_sort():
    a = np.array([0.0, -0.0, np.inf, np.nan, 1.0, -1.0], dtype=np.float32)
    b = np.array([np.nan, -np.inf, 0.0, 1.0, -np.nan], dtype=np.float32)
    for count in range(a.size + b.size + 1):
        assert _streamed([a, b], count) == _streamed([a, b], count, owned=True) == _reference([a, b], count), count


def test_mixed_widths_rank_by_value():
    half = np.array([0.1, 0.5, 2.0], dtype=np.float16)
    single = np.array([0.2, 0.4, 3.0], dtype=np.float32)
    assert _streamed([half, single], 3) == _reference([half, single], 3) == [1, 2]


def test_each_weight_is_read_once_per_pass(monkeypatch):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(1000).astype(np.float32) for _ in range(4)]
    reads = []
    expected = _streamed(weights, 1234, reads)
    assert reads == [0, 1, 2, 3] * 2  # two 16-bit digits of float32; the last pass keeps what it counts
    monkeypatch.setattr(selection, "_KEEP_LIMIT", 0)  # too many to keep: a counting pass more
    reads.clear()
    assert _streamed(weights, 1234, reads) == expected == _reference(weights, 1234)
    assert reads == [0, 1, 2, 3] * 3


@pytest.mark.parametrize("sparsity, cap", [(0.5, 0.99), (0.5, 0.6), (0.9, 0.95)])
def test_global_counts_streamed_equal_in_memory(sparsity, cap, monkeypatch):
    rng = np.random.default_rng(1)
    weights = [np.full(300, 1e-3, dtype=np.float32)] + [
        (rng.standard_normal(n) * s).astype(np.float32) for n, s in ((2000, 1.0), (500, 0.1), (1200, 3.0))]
    expected = global_prune_counts(weights, sparsity, cap)
    monkeypatch.setattr(selection, "IN_MEMORY_LIMIT", 0)  # the streamed path
    lazy = LazyWeights([w.size for w in weights], [w.dtype for w in weights], weights.__getitem__)
    assert global_prune_counts(lazy, sparsity, cap) == expected
    if cap < 0.99:  # the tiny layer hits its cap: the water-filling ran a second round, streamed too
        assert expected[0] == int(np.floor(cap * 300))


@pytest.mark.parametrize("cap", [None, 0.55])
def test_pass_on_disk_streamed_equals_in_memory(tmp_path, monkeypatch, cap):
    """Oracle: magnitude at global scope on a model whose weights stay on disk, ranked by the
    streamed select, gives the in-memory pass's weights, every one of them."""
    from graphprune.model_io import load, save
    from graphprune.passes.sparsify_weights import SparsifyWeightsPass
    from tests.test_sparsify_pass import small_net, weights

    expected = weights(SparsifyWeightsPass(sparsity=0.5, max_layer_sparsity=cap or 0.99)(small_net()).model)
    path = tmp_path / "ext.onnx"
    save(small_net(), str(path), external_data=True)
    monkeypatch.setattr(selection, "IN_MEMORY_LIMIT", 0)
    result = SparsifyWeightsPass(sparsity=0.5, max_layer_sparsity=cap or 0.99, source_dir=str(tmp_path))(
        load(str(path), load_external_data=False))
    out = tmp_path / "out.onnx"
    save(result.model, str(out), source_dir=str(tmp_path))
    got = weights(load(str(out)))
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_wanda_global_scores_streamed_equal_in_memory(monkeypatch):
    """Wanda at global scope ranks scores recomputed per pass, never all held: same weights."""
    from graphprune.passes.sparsify_weights import SparsifyWeightsPass
    from tests.test_sparsify_calibrated import _data
    from tests.test_sparsify_pass import small_net, weights

    def run():
        return weights(SparsifyWeightsPass(sparsity=0.6, criterion="wanda", scope="global", data=_data(8))(
            small_net()).model)

    expected = run()
    monkeypatch.setattr(selection, "IN_MEMORY_LIMIT", 0)
    got = run()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.parametrize("keep_limit", [0, 2**24])
def test_pass_reads_small_weights_once_and_never_overwrites_them(tmp_path, monkeypatch, keep_limit):
    """The global ranking holds small weights read once (read-only) for its passes and the pruning:
    each weight is read from disk once, and the result equals the in-memory pass's, also when the
    ranking needs its extra counting pass (``_KEEP_LIMIT`` 0), which must not write into them."""
    import importlib

    from graphprune.model_io import load, save
    from graphprune.passes.sparsify_weights import SparsifyWeightsPass
    from tests.test_sparsify_pass import small_net, weights

    pass_module = importlib.import_module("graphprune.passes.sparsify_weights")  # the package's name is the function
    expected = weights(SparsifyWeightsPass(sparsity=0.5)(small_net()).model)
    path = tmp_path / "ext.onnx"
    save(small_net(), str(path), external_data=True)
    monkeypatch.setattr(selection, "IN_MEMORY_LIMIT", 0)
    monkeypatch.setattr(selection, "_KEEP_LIMIT", keep_limit)
    reads = []
    original = SparsifyWeightsPass._read
    monkeypatch.setattr(SparsifyWeightsPass, "_read", lambda self, tensor: reads.append(tensor.name) or original(self, tensor))
    model = load(str(path), load_external_data=False)
    result = SparsifyWeightsPass(sparsity=0.5, source_dir=str(tmp_path))(model)
    layers = len(result.stats["layers"])
    assert layers == 4 and sorted(reads) == sorted({row["weight"] for row in result.stats["layers"]})  # once each
    out = tmp_path / "out.onnx"
    save(result.model, str(out), source_dir=str(tmp_path))
    got = weights(load(str(out)))
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    monkeypatch.setattr(pass_module, "_HOLD_BELOW", 0)  # nothing held: read once per pass of the ranking
    reads.clear()
    SparsifyWeightsPass(sparsity=0.5, source_dir=str(tmp_path))(load(str(path), load_external_data=False))
    assert len(reads) == layers * (4 if keep_limit == 0 else 3)
