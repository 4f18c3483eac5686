"""Segmentation and detection test models (U-Net, YOLOv8-style), torch.onnx-export-shaped like ``fixtures_cnn``."""

from __future__ import annotations

import onnx

from graphprune.testing.builder import GraphBuilder
from graphprune.testing.fixtures_cnn import _channels, _image_input

__all__ = ["unet", "yolov8_c2f_net"]


def unet(
    width: float = 1.0,
    image: int = 256,
    in_channels: int = 3,
    num_classes: int = 2,
    dynamic_batch: bool = False,
    dynamic_spatial: bool = False,
    seed: int = 0,
    batch: int = 1,
) -> onnx.ModelProto:
    """A two-level U-Net (milesial/Pytorch-UNet naming), base width 64 * ``width``.

    Exercises: skip connections through ``Concat`` on the channel axis (the concatenated input
    channels of the next conv map back to two different producers), ``ConvTranspose`` upsampling
    (weight [in, out, k, k]: output channels on axis 1) on one level and ``Resize`` (nearest,
    scales) on the other, MaxPool downsampling, a per-pixel 1x1 classifier.
    """
    b = GraphBuilder("unet", seed)
    x = b.input("input", ["N" if dynamic_batch else batch, in_channels] + (["H", "W"] if dynamic_spatial else [image, image]))
    c = _channels(64, width)
    x1 = _double_conv(b, x, "inc", c)
    x2 = _double_conv(b, b.max_pool(x1, "down1.maxpool_conv.0", 2, 2), "down1.maxpool_conv.1", 2 * c)
    x3 = _double_conv(b, b.max_pool(x2, "down2.maxpool_conv.0", 2, 2), "down2.maxpool_conv.1", 4 * c)
    up = b.conv_transpose(x3, "up1.up", 2 * c)
    y = _double_conv(b, b.concat([x2, up], "up1"), "up1.conv", 2 * c)
    up = b.resize(y, "up2.up", 2)
    y = _double_conv(b, b.concat([x1, up], "up2"), "up2.conv", c)
    b.output(b.conv(y, "outc.conv", num_classes, 1), "output")
    return b.build(f"U-Net (width {width})")


def _double_conv(b: GraphBuilder, x: str, module: str, channels: int) -> str:
    for i in (0, 3):
        x = b.conv_bn_act(x, f"{module}.double_conv.{i}", f"{module}.double_conv.{i + 1}", "relu", channels, 3,
                          act_module=f"{module}.double_conv.{i + 2}")
    return x


def yolov8_c2f_net(
    width: float = 0.25,
    depth: float = 0.33,
    image: int = 640,
    num_classes: int = 80,
    dynamic_batch: bool = False,
    seed: int = 0,
    batch: int = 1,
    reg_max: int = 16,
) -> onnx.ModelProto:
    """A YOLOv8-style detector to stride 16 (ultralytics naming); defaults are YOLOv8n's multipliers.

    Exercises: Conv-BN-SiLU with SiLU as ``Sigmoid`` + ``Mul``; C2f blocks (1x1 conv -> ``Split``
    in two halves -> bottlenecks chained on the second half -> ``Concat`` of all pieces -> 1x1
    conv), so split and concat index mappings compose; SPPF (three chained MaxPools concatenated);
    a ``Resize`` + ``Concat`` neck; a detect head with two outputs (``p3`` at stride 8, ``p4`` at
    16), each the ``Concat`` of a box branch and a class branch.
    """
    b = GraphBuilder("yolov8_c2f_net", seed)
    x = _image_input(b, 3, image, batch, dynamic_batch)
    c1, c2, c3, c4 = (_channels(base, width) for base in (64, 128, 256, 512))
    n = max(1, round(3 * depth))
    x = _yolo_conv(b, x, "model.0", c1, 3, 2)
    x = _yolo_conv(b, x, "model.1", c2, 3, 2)
    x = _c2f(b, x, "model.2", c2, n, shortcut=True)
    x = _yolo_conv(b, x, "model.3", c3, 3, 2)
    p3 = _c2f(b, x, "model.4", c3, n, shortcut=True)
    x = _yolo_conv(b, p3, "model.5", c4, 3, 2)
    x = _c2f(b, x, "model.6", c4, n, shortcut=True)
    p4 = _sppf(b, x, "model.7", c4)
    up = b.resize(p4, "model.8", 2)
    p3 = _c2f(b, b.concat([up, p3], "model.9"), "model.10", c3, n, shortcut=False)
    box = max(16, c3 // 4, reg_max * 4)
    cls = max(c3, min(num_classes, 100))
    for level, feature in enumerate((p3, p4)):
        outputs = []
        for branch, hidden, channels in (("cv2", box, 4 * reg_max), ("cv3", cls, num_classes)):
            module = f"model.11.{branch}.{level}"
            y = _yolo_conv(b, feature, f"{module}.0", hidden, 3)
            y = _yolo_conv(b, y, f"{module}.1", hidden, 3)
            outputs.append(b.conv(y, f"{module}.2", channels, 1))
        b.output(b.concat(outputs, "model.11"), f"p{level + 3}")
    return b.build(f"YOLOv8-style C2f net (width {width}, depth {depth})")


def _yolo_conv(b: GraphBuilder, x: str, module: str, channels: int, kernel: int, stride: int = 1) -> str:
    return b.conv_bn_act(x, f"{module}.conv", f"{module}.bn", "silu", channels, kernel, stride, act_module=f"{module}.act")


def _c2f(b: GraphBuilder, x: str, module: str, channels: int, n: int, shortcut: bool) -> str:
    hidden = channels // 2
    y = _yolo_conv(b, x, f"{module}.cv1", 2 * hidden, 1)
    parts = b.split(y, [hidden, hidden], module)
    for i in range(n):
        z = _yolo_conv(b, parts[-1], f"{module}.m.{i}.cv1", hidden, 3)
        z = _yolo_conv(b, z, f"{module}.m.{i}.cv2", hidden, 3)
        parts.append(b.add(parts[-1], z, f"{module}.m.{i}") if shortcut else z)
    return _yolo_conv(b, b.concat(parts, module), f"{module}.cv2", channels, 1)


def _sppf(b: GraphBuilder, x: str, module: str, channels: int) -> str:
    y = _yolo_conv(b, x, f"{module}.cv1", b.channels(x) // 2, 1)
    pieces = [y]
    for _ in range(3):
        pieces.append(b.max_pool(pieces[-1], f"{module}.m", 5, 1, 2))
    return _yolo_conv(b, b.concat(pieces, module), f"{module}.cv2", channels, 1)
