"""Tiny test models (MLP, Conv -> Flatten -> MLP, a digits CNN) that build and run in milliseconds."""

from __future__ import annotations

from typing import Sequence, Union

import onnx

from graphprune.testing.builder import GraphBuilder
from graphprune.testing.fixtures_cnn import _image_input

__all__ = ["mlp", "conv_flatten_mlp", "digits_cnn_like"]


def mlp(
    in_features: Union[int, Sequence[int]] = 64,
    hidden: Sequence[int] = (256, 128),
    classes: int = 10,
    dynamic_batch: bool = True,
    seed: int = 0,
    batch: int = 1,
) -> onnx.ModelProto:
    """``nn.Sequential(Flatten, Linear, ReLU, ..., Linear)``.

    Exercises: Gemm (transB=1) chains where a hidden layer's output features couple to the next
    weight's input columns.  ``in_features`` may be a shape such as (1, 8, 8): the input is then
    [N, 1, 8, 8] and ``Flatten`` does real work.
    """
    b = GraphBuilder("mlp", seed)
    shape = [in_features] if isinstance(in_features, int) else list(in_features)
    x = b.input("input", ["N" if dynamic_batch else batch] + shape)
    x = b.flatten(x, "net.0")
    for i, features in enumerate(hidden):
        x = b.act(b.gemm(x, f"net.{2 * i + 1}", features), "relu", f"net.{2 * i + 2}")
    b.output(b.gemm(x, f"net.{2 * len(hidden) + 1}", classes), "output")
    return b.build("MLP")


def conv_flatten_mlp(
    image: int = 8,
    in_channels: int = 1,
    channels: int = 8,
    hidden: Sequence[int] = (32,),
    classes: int = 10,
    dynamic_batch: bool = True,
    seed: int = 0,
    batch: int = 1,
) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Flatten -> Gemm -> Relu -> Gemm.

    Exercises: the Flatten index mapping, where conv channel c owns Gemm input features
    c*H*W ... (c+1)*H*W - 1, so pruning a channel removes a block of weight columns.
    """
    b = GraphBuilder("conv_flatten_mlp", seed)
    x = _image_input(b, in_channels, image, batch, dynamic_batch)
    x = b.act(b.conv(x, "features.0", channels, 3), "relu", "features.1")
    x = b.flatten(b.max_pool(x, "features.2", 2, 2), "flatten")
    for i, features in enumerate(hidden):
        x = b.act(b.gemm(x, f"classifier.{2 * i}", features), "relu", f"classifier.{2 * i + 1}")
    b.output(b.gemm(x, f"classifier.{2 * len(hidden)}", classes), "output")
    return b.build("Conv -> Flatten -> MLP")


def digits_cnn_like(
    channels: Sequence[int] = (8, 16),
    hidden: int = 32,
    classes: int = 10,
    dynamic_batch: bool = True,
    seed: int = 0,
    batch: int = 1,
) -> onnx.ModelProto:
    """A tiny CNN for 1x8x8 images (sklearn's digits): two biased 3x3 convs, MaxPool, two Gemms.

    Exercises: the smallest complete prune-and-run path; it builds and runs in milliseconds.
    """
    b = GraphBuilder("digits_cnn", seed)
    x = _image_input(b, 1, 8, batch, dynamic_batch)
    x = b.act(b.conv(x, "conv1", channels[0], 3), "relu", "relu1")
    x = b.act(b.conv(x, "conv2", channels[1], 3), "relu", "relu2")
    x = b.flatten(b.max_pool(x, "pool", 2, 2), "flatten")
    x = b.act(b.gemm(x, "fc1", hidden), "relu", "relu3")
    b.output(b.gemm(x, "fc2", classes), "output")
    return b.build("digits CNN")
