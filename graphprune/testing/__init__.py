"""Model corpus for tests and benchmarks: onnx's bundled real architectures and built fixtures.

* ``load_light_model(name)`` / ``light_model_names()``: ResNet-50, DenseNet-121, Inception, VGG...
  from onnx's light test models, with seeded weights of a realistic scale (``zoo``).
* Builders of torch.onnx-export-shaped models, no torch needed (``fixtures``): ``resnet``,
  ``mobilenet_v2``, ``unet``, ``yolov8_c2f_net``, ``bert_encoder``, ``gpt_decoder``...
* ``fixture_corpus()`` / ``transformer_corpus()``: small instances of each, by name.
"""

from graphprune.testing import fixtures
from graphprune.testing.builder import GraphBuilder
from graphprune.testing.fixtures import *  # noqa: F401,F403
from graphprune.testing.zoo import light_model_names, light_model_path, load_light_model

__all__ = ["load_light_model", "light_model_names", "light_model_path", "GraphBuilder"]
__all__ += fixtures.__all__
