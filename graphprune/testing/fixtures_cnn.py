"""Convolutional classifiers written the way torch.onnx exports them (no torch needed): ResNet, ResNeXt,
MobileNetV2/V3.

Every builder is deterministic in ``seed``, scales channels with ``width``, and returns an opset 17 /
IR 8 ``onnx.ModelProto`` whose image input is ``input`` [batch, C, H, W] (``"N"`` with
``dynamic_batch``, ``"H"``/``"W"`` with ``dynamic_spatial`` where offered).  BatchNormalization is
left unfolded, as an export in training-aware mode or before constant folding leaves it.  The
segmentation / detection nets (``fixtures_dense_prediction``) and the tiny MLP / digits nets
(``fixtures_small``) follow the same conventions and share this module's channel and input helpers.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import onnx

from graphprune.testing.builder import GraphBuilder

__all__ = ["resnet", "resnext_block_net", "mobilenet_v2", "mobilenet_v3_block_net", "make_divisible"]


_RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, never below 90% of ``value``."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def _image_input(b: GraphBuilder, channels: int, image: int, batch: int, dynamic_batch: bool, dynamic_spatial: bool = False) -> str:
    n: Union[int, str] = "N" if dynamic_batch else batch
    hw: List[Union[int, str]] = ["H", "W"] if dynamic_spatial else [image, image]
    return b.input("input", [n, channels] + hw)


def resnet(
    depth: int = 18,
    width: float = 1.0,
    image: int = 224,
    num_classes: int = 1000,
    dynamic_batch: bool = False,
    blocks: Optional[Sequence[int]] = None,
    seed: int = 0,
    batch: int = 1,
    dynamic_spatial: bool = False,
) -> onnx.ModelProto:
    """torchvision ResNet: BasicBlock (depth 18/34) or Bottleneck v1.5 (50/101/152).

    Exercises: Conv->BN->Relu chains, MaxPool, residual ``Add`` coupling every block's output
    channels, 1x1 conv + BN downsample shortcuts, GlobalAveragePool -> Flatten -> Gemm.  ResNet-50 at
    width 1 has 25.6M stored values (25.56M parameters plus BN running statistics) and 4.1 GMACs at
    224.  ``blocks`` overrides the per-stage block counts (deeper nets for benchmarks).
    """
    if depth not in _RESNET_BLOCKS:
        raise ValueError(f"resnet depth {depth} not in {sorted(_RESNET_BLOCKS)}")
    bottleneck = depth >= 50
    stages = tuple(blocks) if blocks is not None else _RESNET_BLOCKS[depth]
    b = GraphBuilder(f"resnet{depth}", seed)
    x = _image_input(b, 3, image, batch, dynamic_batch, dynamic_spatial)
    inplanes = _channels(64, width)
    x = b.conv_bn_act(x, "conv1", "bn1", "relu", inplanes, 7, stride=2, act_module="relu")
    x = b.max_pool(x, "maxpool", 3, 2, 1)
    for stage, count in enumerate(stages):
        planes = _channels(64 * 2**stage, width)
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            module = f"layer{stage + 1}.{index}"
            block = _bottleneck if bottleneck else _basic_block
            x = block(b, x, module, planes, stride)
    x = b.global_avg_pool(x, "avgpool")
    x = b.flatten(x)
    b.output(b.gemm(x, "fc", num_classes), "output")
    return b.build(f"ResNet-{depth} (width {width}, {image}px)")


def _shortcut(b: GraphBuilder, x: str, module: str, out_channels: int, stride: int) -> str:
    if stride == 1 and b.channels(x) == out_channels:
        return x
    return b.conv_bn_act(x, f"{module}.downsample.0", f"{module}.downsample.1", None, out_channels, 1, stride, pad=0)


def _basic_block(b: GraphBuilder, x: str, module: str, planes: int, stride: int) -> str:
    identity = _shortcut(b, x, module, planes, stride)
    y = b.conv_bn_act(x, f"{module}.conv1", f"{module}.bn1", "relu", planes, 3, stride, act_module=f"{module}.relu")
    y = b.conv_bn_act(y, f"{module}.conv2", f"{module}.bn2", None, planes, 3)
    return b.act(b.add(y, identity, module), "relu", f"{module}.relu")


def _bottleneck(b: GraphBuilder, x: str, module: str, planes: int, stride: int, groups: int = 1, inner: Optional[int] = None) -> str:
    inner = inner or planes
    out = planes * 4
    identity = _shortcut(b, x, module, out, stride)
    y = b.conv_bn_act(x, f"{module}.conv1", f"{module}.bn1", "relu", inner, 1, act_module=f"{module}.relu")
    y = b.conv_bn_act(y, f"{module}.conv2", f"{module}.bn2", "relu", inner, 3, stride, groups=groups, act_module=f"{module}.relu")
    y = b.conv_bn_act(y, f"{module}.conv3", f"{module}.bn3", None, out, 1)
    return b.act(b.add(y, identity, module), "relu", f"{module}.relu")


def resnext_block_net(
    width: float = 1.0,
    groups: int = 32,
    width_per_group: int = 4,
    blocks: Sequence[int] = (1, 1),
    image: int = 32,
    num_classes: int = 10,
    dynamic_batch: bool = False,
    seed: int = 0,
    batch: int = 1,
) -> onnx.ModelProto:
    """A small ResNeXt: a 3x3 stem, then stages of ResNeXt bottlenecks (torchvision's resnext50_32x4d block).

    Exercises: grouped 3x3 convolution (``group=groups``) between 1x1 convs, so pruning must keep
    whole groups (or equal counts per group) on the coupled channels.
    """
    b = GraphBuilder("resnext", seed)
    x = _image_input(b, 3, image, batch, dynamic_batch)
    x = b.conv_bn_act(x, "conv1", "bn1", "relu", _channels(64, width), 3, act_module="relu")
    for stage, count in enumerate(blocks):
        planes = _channels(64 * 2**stage, width)
        inner = max(1, int(planes * width_per_group / 64.0)) * groups
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            x = _bottleneck(b, x, f"layer{stage + 1}.{index}", planes, stride, groups=groups, inner=inner)
    x = b.flatten(b.global_avg_pool(x, "avgpool"))
    b.output(b.gemm(x, "fc", num_classes), "output")
    return b.build(f"ResNeXt {groups}x{width_per_group}d block net")


# (expansion t, output channels c, repeats n, first stride s), as in torchvision.
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(
    width: float = 1.0,
    image: int = 224,
    num_classes: int = 1000,
    dynamic_batch: bool = False,
    seed: int = 0,
    batch: int = 1,
) -> onnx.ModelProto:
    """torchvision MobileNetV2.

    Exercises: depthwise convolution (``group`` = channels, whose input and output channels are
    one coupled set), inverted residuals (1x1 expand -> depthwise -> linear 1x1 project, ``Add``
    only when shapes match), ReLU6 exported as ``Clip`` with min/max inputs.
    """
    b = GraphBuilder("mobilenet_v2", seed)
    x = _image_input(b, 3, image, batch, dynamic_batch)
    cin = make_divisible(32 * width)
    x = b.conv_bn_act(x, "features.0.0", "features.0.1", "relu6", cin, 3, stride=2, act_module="features.0.2")
    index = 1
    for t, c, n, s in _MOBILENET_V2:
        cout = make_divisible(c * width)
        for i in range(n):
            x = _inverted_residual_v2(b, x, f"features.{index}", cout, s if i == 0 else 1, t)
            index += 1
    last = make_divisible(1280 * max(1.0, width))
    x = b.conv_bn_act(x, f"features.{index}.0", f"features.{index}.1", "relu6", last, 1, act_module=f"features.{index}.2")
    x = b.flatten(b.global_avg_pool(x))
    b.output(b.gemm(x, "classifier.1", num_classes), "output")
    return b.build(f"MobileNetV2 (width {width}, {image}px)")


def _inverted_residual_v2(b: GraphBuilder, x: str, module: str, cout: int, stride: int, expand: int) -> str:
    cin = b.channels(x)
    hidden = int(round(cin * expand))
    y, layer = x, 0
    if expand != 1:
        y = b.conv_bn_act(y, f"{module}.conv.0.0", f"{module}.conv.0.1", "relu6", hidden, 1, act_module=f"{module}.conv.0.2")
        layer = 1
    y = b.conv_bn_act(y, f"{module}.conv.{layer}.0", f"{module}.conv.{layer}.1", "relu6", hidden, 3, stride, groups=hidden,
                      act_module=f"{module}.conv.{layer}.2")
    y = b.conv_bn_act(y, f"{module}.conv.{layer + 1}", f"{module}.conv.{layer + 2}", None, cout, 1)
    return b.add(x, y, module) if stride == 1 and cin == cout else y


# (kernel, expanded channels, output channels, squeeze-excite, activation, stride): MobileNetV3-Small's start.
_MOBILENET_V3_BLOCKS = (
    (3, 16, 16, True, "relu", 2),
    (3, 72, 24, False, "relu", 2),
    (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hardswish", 2),
    (5, 240, 40, True, "hardswish", 1),
)


def mobilenet_v3_block_net(
    width: float = 1.0,
    image: int = 224,
    num_classes: int = 1000,
    dynamic_batch: bool = False,
    seed: int = 0,
    batch: int = 1,
    blocks: Optional[Sequence[Tuple]] = None,
) -> onnx.ModelProto:
    """The first blocks of torchvision's MobileNetV3-Small and its head.

    Exercises: HardSwish / HardSigmoid, squeeze-and-excitation (GlobalAveragePool -> 1x1 Conv ->
    Relu -> 1x1 Conv -> HardSigmoid -> ``Mul`` with the [N, C, H, W] tensor, coupling the SE convs'
    channels to the block's expanded channels), depthwise convs with 5x5 kernels, residual ``Add``.
    """
    b = GraphBuilder("mobilenet_v3_block_net", seed)
    x = _image_input(b, 3, image, batch, dynamic_batch)
    x = b.conv_bn_act(x, "features.0.0", "features.0.1", "hardswish", make_divisible(16 * width), 3, stride=2,
                      act_module="features.0.2")
    for i, (kernel, expanded, out, se, act, stride) in enumerate(blocks or _MOBILENET_V3_BLOCKS):
        x = _inverted_residual_v3(b, x, f"features.{i + 1}.block", kernel, make_divisible(expanded * width),
                                  make_divisible(out * width), se, act, stride)
    last = 6 * b.channels(x)
    n = len(blocks or _MOBILENET_V3_BLOCKS) + 1
    x = b.conv_bn_act(x, f"features.{n}.0", f"features.{n}.1", "hardswish", last, 1, act_module=f"features.{n}.2")
    x = b.flatten(b.global_avg_pool(x, "avgpool"))
    x = b.act(b.gemm(x, "classifier.0", make_divisible(1024 * width)), "hardswish", "classifier.1")
    b.output(b.gemm(x, "classifier.3", num_classes), "output")
    return b.build(f"MobileNetV3-style block net (width {width}, {image}px)")


def _inverted_residual_v3(b: GraphBuilder, x: str, module: str, kernel: int, expanded: int, out: int,
                          se: bool, act: str, stride: int) -> str:
    cin = b.channels(x)
    y, layer = x, 0
    if expanded != cin:
        y = b.conv_bn_act(y, f"{module}.0.0", f"{module}.0.1", act, expanded, 1, act_module=f"{module}.0.2")
        layer = 1
    y = b.conv_bn_act(y, f"{module}.{layer}.0", f"{module}.{layer}.1", act, expanded, kernel, stride, groups=expanded,
                      act_module=f"{module}.{layer}.2")
    layer += 1
    if se:
        y = _squeeze_excite(b, y, f"{module}.{layer}", make_divisible(expanded // 4))
        layer += 1
    y = b.conv_bn_act(y, f"{module}.{layer}.0", f"{module}.{layer}.1", None, out, 1)
    return b.add(y, x, module.rsplit(".", 1)[0]) if stride == 1 and cin == out else y


def _squeeze_excite(b: GraphBuilder, x: str, module: str, squeeze: int) -> str:
    channels = b.channels(x)
    s = b.global_avg_pool(x, f"{module}.avgpool")
    s = b.act(b.conv(s, f"{module}.fc1", squeeze, 1), "relu", f"{module}.relu")
    s = b.act(b.conv(s, f"{module}.fc2", channels, 1), "hardsigmoid", f"{module}.scale_activation")
    return b.mul(x, s, module)
