"""Make the embedded default: the digits data files and a small CNN trained on them.

Run once by a developer (needs torch and scikit-learn, which graphprune itself does not):

    pip install torch==2.13.0 scikit-learn && python models/make_digits_model.py

Writes, beside this script:
  digits_train.npz, digits_test.npz  `images` [N,1,8,8] float32 (pixels / 16) and `labels` [N] int64,
                                     a fixed seeded 80/20 split of scikit-learn's copy of the UCI
                                     "Optical Recognition of Handwritten Digits" test set (CC BY 4.0)
  digits_cnn.onnx                    the trained CNN: Conv-BN-Relu x3 (16, 32, 64 channels), MaxPool,
                                     GlobalAveragePool, Flatten, Gemm; input `images` [N,1,8,8],
                                     output `logits` [N,10]; opset 17, IR 8, written with onnx.helper
                                     from the trained weights (no exporter quirks).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
CHANNELS = (16, 32, 64)


def make_data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    np.savez_compressed(os.path.join(HERE, "digits_train.npz"), images=images[train], labels=labels[train])
    np.savez_compressed(os.path.join(HERE, "digits_test.npz"), images=images[test], labels=labels[test])
    return (images[train], labels[train]), (images[test], labels[test])


def train(train_set, test_set):
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    c1, c2, c3 = CHANNELS
    net = nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, 10),
    )
    x = torch.from_numpy(train_set[0])
    y = torch.from_numpy(train_set[1])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=80)
    for epoch in range(80):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            # light augmentation: one-pixel shifts, so the net does not memorize positions
            xb = torch.roll(x[idx], shifts=(int(torch.randint(-1, 2, ())), int(torch.randint(-1, 2, ()))), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(torch.from_numpy(test_set[0])).argmax(1).numpy() == test_set[1]).mean()
    print(f"held-out accuracy: {acc * 100:.2f}%")
    return net


def to_onnx(net) -> onnx.ModelProto:
    """Write the trained torch net as an ONNX graph named like a torch export."""
    nodes, inits = [], []

    def init(name, tensor):
        inits.append(numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name))
        return name

    x = "images"
    convs = [m for m in net if m.__class__.__name__ == "Conv2d"]
    bns = [m for m in net if m.__class__.__name__ == "BatchNorm2d"]
    for i, (conv, bn) in enumerate(zip(convs, bns)):
        w = init(f"conv{i + 1}.weight", conv.weight)
        b = init(f"conv{i + 1}.bias", conv.bias)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"/conv{i + 1}/Conv_output_0"], name=f"/conv{i + 1}/Conv",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]))
        bn_in = [init(f"bn{i + 1}.{p}", t) for p, t in
                 (("weight", bn.weight), ("bias", bn.bias), ("running_mean", bn.running_mean), ("running_var", bn.running_var))]
        nodes.append(helper.make_node("BatchNormalization", [f"/conv{i + 1}/Conv_output_0"] + bn_in,
                                      [f"/bn{i + 1}/BatchNormalization_output_0"], name=f"/bn{i + 1}/BatchNormalization",
                                      epsilon=bn.eps, momentum=1 - bn.momentum))
        nodes.append(helper.make_node("Relu", [f"/bn{i + 1}/BatchNormalization_output_0"], [f"/relu{i + 1}/Relu_output_0"],
                                      name=f"/relu{i + 1}/Relu"))
        x = f"/relu{i + 1}/Relu_output_0"
        if i == 1:
            nodes.append(helper.make_node("MaxPool", [x], ["/pool/MaxPool_output_0"], name="/pool/MaxPool",
                                          kernel_shape=[2, 2], strides=[2, 2]))
            x = "/pool/MaxPool_output_0"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["/gap/GlobalAveragePool_output_0"], name="/gap/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["/gap/GlobalAveragePool_output_0"], ["/flatten/Flatten_output_0"],
                                  name="/flatten/Flatten", axis=1))
    fc = net[-1]
    nodes.append(helper.make_node("Gemm", ["/flatten/Flatten_output_0", init("fc.weight", fc.weight), init("fc.bias", fc.bias)],
                                  ["logits"], name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1))
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphprune-models")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    train_set, test_set = make_data()
    net = train(train_set, test_set)
    model = to_onnx(net)
    onnx.save(model, os.path.join(HERE, "digits_cnn.onnx"))
    print("wrote digits_cnn.onnx, digits_train.npz, digits_test.npz")


if __name__ == "__main__":
    main()
