"""Model corpus for tests and benchmarks: onnx's bundled real architectures and built fixtures.

* ``load_light_model(name)`` / ``light_model_names()``: ResNet-50, DenseNet-121, Inception, VGG...
  from onnx's light test models, with seeded weights of a realistic scale (``zoo``).
* Builders of torch.onnx-export-shaped models, no torch needed (``fixtures``): ``resnet``,
  ``mobilenet_v2``, ``unet``, ``yolov8_c2f_net``, ``bert_encoder``, ``gpt_decoder``...
* ``fixture_corpus()`` / ``transformer_corpus()``: small instances of each, by name.
"""

from graphprune.testing.fixtures import (
    DYNAMIC_FIXTURES,
    bert_base_like,
    bert_encoder,
    conv_flatten_mlp,
    digits_cnn_like,
    fixture_corpus,
    gpt_decoder,
    mlp,
    mobilenet_v2,
    mobilenet_v3_block_net,
    resnet,
    resnext_block_net,
    transformer_corpus,
    unet,
    yolov8_c2f_net,
)
from graphprune.testing.builder import GraphBuilder
from graphprune.testing.zoo import light_model_names, light_model_path, load_light_model

__all__ = [
    "load_light_model",
    "light_model_names",
    "light_model_path",
    "fixture_corpus",
    "transformer_corpus",
    "DYNAMIC_FIXTURES",
    "GraphBuilder",
    "resnet",
    "mobilenet_v2",
    "mobilenet_v3_block_net",
    "unet",
    "yolov8_c2f_net",
    "mlp",
    "conv_flatten_mlp",
    "resnext_block_net",
    "digits_cnn_like",
    "bert_encoder",
    "bert_base_like",
    "gpt_decoder",
]
