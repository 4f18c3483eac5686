"""Parameter and MAC counts, checked against hand-computed formulas."""

import pytest

from graphprune.metrics import count_macs
from graphprune.testing import fixtures
from tests.helpers import conv_model


def test_conv_model_macs_and_dynamic_dims():
    model = conv_model(dynamic_batch=True)
    assert count_macs(model) is None  # batch unknown
    assert count_macs(model, {"x": (3, 3, 8, 8)}) == 3 * (4 * 64 * 27 + 5 * 4)


def test_resnet50_macs_match_the_published_figure():
    macs = count_macs(fixtures.resnet(depth=50, width=1.0, image=224))
    assert macs == pytest.approx(4.09e9, rel=0.01)


@pytest.mark.parametrize("seq", [1, 16])
def test_transformer_macs_resolve_lost_sequence_length(seq):
    # ONNX inference loses S at the position-id Slice; the count completes it with one ORT run.
    hidden, ffn, layers = 64, 256, 2
    model = fixtures.bert_encoder(layers=layers, hidden=hidden, heads=4, ffn=ffn)
    per_layer = 4 * seq * hidden * hidden + 2 * seq * seq * hidden + 2 * seq * hidden * ffn
    pooler_and_classifier = hidden * hidden + hidden * 2
    assert count_macs(model, {"input_ids": (1, seq)}) == layers * per_layer + pooler_and_classifier
