"""The fixture corpus: small-but-real instances of every builder, by name, for tests and benchmarks.

``fixture_corpus()`` maps a name to a zero-argument builder of a convolutional model sized to run in
milliseconds (small widths, 32-64 px images); ``transformer_corpus()`` does the same for the
transformers.  The builders themselves live in ``fixtures_cnn``, ``fixtures_dense_prediction``,
``fixtures_small`` and ``fixtures_transformer`` and are re-exported here.
"""

from __future__ import annotations

from typing import Callable, Dict

import onnx

from graphprune.testing import fixtures_cnn, fixtures_dense_prediction, fixtures_small, fixtures_transformer
from graphprune.testing.fixtures_cnn import *  # noqa: F401,F403
from graphprune.testing.fixtures_dense_prediction import *  # noqa: F401,F403
from graphprune.testing.fixtures_small import *  # noqa: F401,F403
from graphprune.testing.fixtures_transformer import *  # noqa: F401,F403

# The corpus, then every builder under the one list of names its family module declares.
__all__ = ["fixture_corpus", "transformer_corpus", "DYNAMIC_FIXTURES"]
__all__ += fixtures_cnn.__all__
__all__ += fixtures_dense_prediction.__all__
__all__ += fixtures_small.__all__
__all__ += fixtures_transformer.__all__

Builder = Callable[[], onnx.ModelProto]

# Fixtures whose inputs have symbolic dims: name -> the dims they leave open.
DYNAMIC_FIXTURES = {
    "dynamic_resnet": ("N", "H", "W"),
    "unet": ("N",),
    "mlp": ("N",),
    "conv_flatten_mlp": ("N",),
    "digits_cnn_like": ("N",),
}


def fixture_corpus() -> Dict[str, Builder]:
    """Every convolutional fixture at test size, name -> zero-argument builder (a fresh dict each call)."""
    return {
        "resnet18": lambda: resnet(18, width=0.25, image=64, num_classes=10),
        "resnet50": lambda: resnet(50, width=0.25, image=64, num_classes=10),
        "dynamic_resnet": lambda: resnet(18, width=0.25, num_classes=10, dynamic_batch=True, dynamic_spatial=True),
        "mobilenet_v2": lambda: mobilenet_v2(width=0.25, image=64, num_classes=10),
        "mobilenet_v3_block_net": lambda: mobilenet_v3_block_net(width=0.5, image=64, num_classes=10),
        "unet": lambda: unet(width=0.125, image=32, dynamic_batch=True),
        "yolov8_c2f_net": lambda: yolov8_c2f_net(width=0.25, depth=0.33, image=64, num_classes=4),
        "mlp": lambda: mlp(64, hidden=(32, 16), classes=10),
        "conv_flatten_mlp": lambda: conv_flatten_mlp(image=8, channels=8, hidden=(32,), classes=10),
        "resnext_block_net": lambda: resnext_block_net(width=0.25, image=32, num_classes=10),
        "digits_cnn_like": lambda: digits_cnn_like(),
    }


def transformer_corpus() -> Dict[str, Builder]:
    """Every transformer fixture at test size (dynamic batch ``N`` and sequence ``S``)."""
    return {
        "bert_encoder": lambda: bert_encoder(layers=2, hidden=64, heads=4, ffn=256),
        "bert_encoder_decomposed_ln": lambda: bert_encoder(layers=2, hidden=64, heads=4, ffn=256, decomposed_layernorm=True),
        "gpt_decoder": lambda: gpt_decoder(layers=2, hidden=64, heads=4, ffn=256),
        "gpt_decoder_gqa_swiglu": lambda: gpt_decoder(layers=2, hidden=64, heads=4, kv_heads=2, ffn=256, gated=True),
    }
