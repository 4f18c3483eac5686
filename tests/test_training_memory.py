"""Fine-tuning's teacher targets are computed a chunk of samples at a time: the same values as the
whole-array formula, and no float64 copies of all the teacher's outputs (the PP-OCRv3 recognizer's
[2000, 40, 6625] outputs peaked at 21 GB of RSS)."""

import tracemalloc

import numpy as np
import pytest

import graphprune.training.losses as losses
from graphprune.training.heads import teacher_targets
from graphprune.training.losses import BatchTargets, LossSpec


def _probabilities(shape, seed=0):
    z = np.random.default_rng(seed).normal(size=shape)
    p = np.exp(z - z.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _peak(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 1 << 12)  # one sample of [10, 300] per chunk


def test_kl_targets_match_whole_array_formula_and_stay_near_output_size(small_chunks):
    spec = LossSpec("out", None, "kl", 1.0, 2.0, head="softmax")
    log_p = teacher_targets(_probabilities((120, 10, 300)), spec)
    targets, peak = _peak(lambda: BatchTargets(spec, None, log_p, 300))
    z = log_p.astype(np.float64) / 2.0
    z -= z.max(axis=-1, keepdims=True)
    ref_log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    ref_p = np.exp(ref_log_p)
    np.testing.assert_array_equal(targets.teacher, ref_p.astype(np.float32))
    np.testing.assert_array_equal(targets.teacher_plogp, (ref_p * ref_log_p).sum(-1).mean(axis=1))
    # the float32 targets themselves plus a few chunks; the whole-array formula took ~10x log_p
    assert peak < 1.3 * log_p.nbytes


def test_bce_targets_share_float32_teacher(small_chunks):
    spec = LossSpec("out", None, "bce", 1.0, 1.0, head="sigmoid")
    p = np.random.default_rng(1).uniform(0.01, 0.99, size=(120, 10, 300)).astype(np.float32)
    targets, peak = _peak(lambda: BatchTargets(spec, None, p, 300))
    assert targets.teacher is p
    q = p.astype(np.float64)
    np.testing.assert_array_equal(targets.teacher_plogp,
                                  (q * np.log(q) + (1 - q) * np.log(1 - q)).reshape(120, -1).mean(axis=1))
    assert peak < 0.3 * p.nbytes


@pytest.mark.parametrize("head,distill", [("softmax", "kl"), ("sigmoid", "mse")])
def test_teacher_targets_in_place_equal_the_copy(small_chunks, head, distill):
    spec = LossSpec("out", None, distill, 1.0, 2.0, head=head)
    values = _probabilities((120, 10, 300), seed=2)
    p = np.clip(values.astype(np.float64), 1e-12, 1 - 1e-12)
    expected = (np.log(p) if head == "softmax" else np.log(p) - np.log1p(-p)).astype(np.float32)
    np.testing.assert_array_equal(teacher_targets(values.copy(), spec), expected)
    result, peak = _peak(lambda: teacher_targets(values, spec, out=values))
    assert result is values  # written over the outputs: no second copy of them
    np.testing.assert_array_equal(values, expected)
    assert peak < 0.3 * values.nbytes


def test_kl_targets_overwrite_their_input(small_chunks):
    spec = LossSpec("out", None, "kl", 1.0, 2.0, head="softmax")
    log_p = teacher_targets(_probabilities((120, 10, 300), seed=3), spec)
    expected = BatchTargets(spec, None, log_p.copy(), 300)
    targets, peak = _peak(lambda: BatchTargets(spec, None, log_p, 300, overwrite=True))
    assert targets.teacher is log_p  # the pass's only copy of the teacher's outputs
    np.testing.assert_array_equal(targets.teacher, expected.teacher)
    np.testing.assert_array_equal(targets.teacher_plogp, expected.teacher_plogp)
    assert peak < 0.3 * log_p.nbytes
