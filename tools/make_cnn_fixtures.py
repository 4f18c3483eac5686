"""Developer-only: export tiny torchvision/timm CNNs (and timm's ViT) to ONNX as tests/fixtures/cnn/*.onnx.

Not a project dependency and not run by CI: it needs torch, torchvision and timm in a side venv.  It
can sit on top of make_hf_fixtures.py's venv (installing torchvision there would break transformers,
which imports torchvision when present):

    python3.11 -m venv /tmp/cnnenv
    echo /tmp/hfenv/lib/python3.11/site-packages > /tmp/cnnenv/lib/python3.11/site-packages/hfenv.pth
    /tmp/cnnenv/bin/pip install --no-deps torchvision==0.28.0 timm pillow  # its deps would pull a CUDA torch
    /tmp/cnnenv/bin/python tools/make_cnn_fixtures.py [--out tests/fixtures/cnn]

torchvision's wheel is a CUDA build whose ``_C`` does not load beside CPU torch; its Python code runs
once the two op schemas it registers fake kernels for (``torchvision::nms``, ``qnms``) are defined
first (no detection op is exported).  Each architecture keeps its structure (blocks, squeeze-and-
excitation, channel shuffle, grouped convs, layer scale, ASPP) at tiny widths so that each file stays
well under 2 MB; weights and BatchNorm statistics are seeded random.  Each model is exported by
torch's TorchScript exporter (``<name>_torchscript.onnx``, opset 17) and its dynamo exporter
(``<name>_dynamo.onnx``, opset 20) with a dynamic batch axis; ``<name>.npz`` holds a batch of inputs
(``input``) and torch's outputs for it (``output``).
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import numpy as np
import onnx
import torch

_LIB = torch.library.Library("torchvision", "DEF")  # see the module docstring
_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import timm  # noqa: E402  (after the schemas: timm imports torchvision)
import torchvision.models as tvm  # noqa: E402
from torchvision.models import convnext, efficientnet, mobilenetv3, regnet, shufflenetv2  # noqa: E402
from torchvision.models.segmentation import deeplabv3  # noqa: E402

_CLASSES = 10


def _efficientnet_b0():
    setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.34)
    return efficientnet.EfficientNet(setting, dropout=0.2, num_classes=_CLASSES, last_channel=last)


def _mobilenet_v3():
    setting, last = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
    return mobilenetv3.MobileNetV3(setting, last, num_classes=_CLASSES)


def _convnext():
    cfg = convnext.CNBlockConfig
    setting = [cfg(16, 32, 1), cfg(32, 64, 1), cfg(64, 128, 2), cfg(128, None, 1)]
    return convnext.ConvNeXt(setting, num_classes=_CLASSES)


def _regnet():  # RegNetY: grouped convs and squeeze-and-excitation
    params = regnet.BlockParams.from_init_params(depth=6, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return regnet.RegNet(params, num_classes=_CLASSES, stem_width=16)


def _deeplabv3():
    """torchvision's DeepLabV3 (dilated MobileNetV3 backbone, ASPP head, Shape-driven interpolation to
    the input size) with a 16-channel ASPP instead of DeepLabHead's fixed 256."""
    backbone = tvm.mobilenet_v3_large(width_mult=0.25, dilated=True).features
    stage = [i for i, b in enumerate(backbone) if getattr(b, "_is_cn", False)] + [len(backbone) - 1]
    body = tvm._utils.IntermediateLayerGetter(backbone, return_layers={str(stage[-1]): "out"})
    channels = backbone[stage[-1]].out_channels
    head = torch.nn.Sequential(
        deeplabv3.ASPP(channels, [2, 4, 6], out_channels=16),
        torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 4, 1))
    return _OutOnly(deeplabv3.DeepLabV3(body, head))


class _OutOnly(torch.nn.Module):
    """DeepLabV3 returns a dict; the export has one output, its ``out``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def _models():
    """name -> (constructor, input size)."""
    return {
        "resnet18": (partial(timm.create_model, "resnet18", channels=(8, 16, 32, 64), num_classes=_CLASSES), 32),
        "mobilenet_v3": (_mobilenet_v3, 32),
        "efficientnet_b0": (_efficientnet_b0, 32),
        "convnext": (_convnext, 32),
        "regnet": (_regnet, 32),
        "shufflenet_v2": (partial(shufflenetv2.ShuffleNetV2, [2, 2, 2], [8, 16, 32, 64, 128], num_classes=_CLASSES), 32),
        "deeplabv3": (_deeplabv3, 64),
        # timm's ViT: packed qkv, reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4), fused SDPA
        "timm_vit": (partial(timm.create_model, "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=4, mlp_ratio=2.0, num_classes=_CLASSES), 32),
    }


def _randomize(model: torch.nn.Module) -> None:
    """Seeded weights with non-trivial BatchNorm statistics and affine terms (an identity BN would
    hide a pruning error), and no two parameters equal (the exporter would share one initializer)."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def export(model: torch.nn.Module, x: torch.Tensor, exporter: str, path: str) -> None:
    kwargs = dict(input_names=["input"], output_names=["output"])
    if exporter == "dynamo":
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=20, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, **kwargs)
    else:
        axes = {"input": {0: "batch"}, "output": {0: "batch"}}
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, dynamic_axes=axes, **kwargs)
    onnx.checker.check_model(onnx.load(path), full_check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "cnn"))
    parser.add_argument("--only", nargs="*", help="names to make (default: all)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, (make, size) in _models().items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        model = make().eval()
        _randomize(model)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(x)
        np.savez(os.path.join(args.out, f"{name}.npz"), input=x.numpy(), output=ref.numpy())
        for exporter in ("torchscript", "dynamo"):
            path = os.path.join(args.out, f"{name}_{exporter}.onnx")
            try:
                with torch.no_grad():
                    export(model, x, exporter, path)
            except Exception as exc:  # noqa: BLE001 -- reported; the other exports go on
                print(f"{path}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
