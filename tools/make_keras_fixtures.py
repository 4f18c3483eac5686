"""Developer-only: export tiny Keras MobileNetV2 and EfficientNetB0 to ONNX with tf2onnx as
tests/fixtures/keras/*.onnx.

Not a project dependency and not run by CI: tensorflow wants its own venv:

    python3.11 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow tf2onnx onnx==1.23.2 onnxruntime==1.32.0
    /tmp/tfenv/bin/python tools/make_keras_fixtures.py [--out tests/fixtures/keras]

Both come from keras.applications with ``weights=None`` at 32x32 inputs and 10 classes: MobileNetV2
at ``alpha=0.35``, EfficientNetB0's own builder at width 0.25 and depth 0.34 (its squeeze-and-excitation
blocks reshape ``[N, C] -> [-1, C, 1, 1]`` after tf2onnx's NHWC -> NCHW rewrite).  Weights and BatchNorm
statistics are seeded random.  tf2onnx (opset 17) keeps Keras' NHWC input ``input`` [batch, 32, 32, 3]
with a dynamic batch; ``<name>.npz`` holds a batch of inputs (``input``) and Keras' outputs (``output``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import numpy_helper
import tensorflow as tf
import tf2onnx
from keras.src.applications import efficientnet, mobilenet_v2

_SIZE, _CLASSES = 32, 10


def _models():
    """name -> constructor."""
    shape = (_SIZE, _SIZE, 3)
    return {
        "mobilenetv2": lambda: mobilenet_v2.MobileNetV2(input_shape=shape, alpha=0.35, weights=None, classes=_CLASSES),
        "efficientnetb0": lambda: efficientnet.EfficientNet(
            0.25, 0.34, _SIZE, 0.2, name="efficientnetb0", weights=None, input_shape=shape, classes=_CLASSES),
    }


def _randomize(model, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm statistics (an identity BN would hide a pruning error)."""
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma + rng.normal(0, 0.1, gamma.shape), beta + rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def _freeze_normalization(graph: onnx.GraphProto, model) -> None:
    """tf2onnx leaves the mean and variance of Keras 3's (never adapted) Normalization layer as graph
    inputs (``.../normalization_1/Sub/y:0``, ``.../Sqrt/x:0``): they become initializers of its values."""
    layers = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Normalization)]
    for vi in list(graph.input)[1:]:
        value = {"Sub/y:0": layers[0].mean, "Sqrt/x:0": layers[0].variance}[vi.name.split("/", 2)[-1]]
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32).reshape(dims), vi.name))
        graph.input.remove(vi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "keras"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, make in _models().items():
        tf.keras.utils.set_random_seed(0)
        model = make()
        _randomize(model, np.random.default_rng(0))
        x = np.random.default_rng(1).uniform(0, 255, size=(2, _SIZE, _SIZE, 3)).astype(np.float32)
        ref = model(x, training=False).numpy()
        np.savez(os.path.join(args.out, f"{name}.npz"), input=x, output=ref)

        @tf.function(input_signature=[tf.TensorSpec([None, _SIZE, _SIZE, 3], tf.float32, name="input")])
        def forward(inp):
            return tf.identity(model(inp, training=False), name="output")

        path = os.path.join(args.out, f"{name}_tf2onnx.onnx")
        proto, _ = tf2onnx.convert.from_function(forward, input_signature=forward.input_signature, opset=17)
        _freeze_normalization(proto.graph, model)
        _rename(proto.graph, proto.graph.output[0].name, "output")  # tf2onnx names it "Identity:0"
        for vi in (proto.graph.input[0], proto.graph.output[0]):
            vi.type.tensor_type.shape.dim[0].dim_param = "batch"  # tf2onnx's "unk__671"
        onnx.save(proto, path)
        onnx.checker.check_model(onnx.load(path), full_check=True)
        print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
