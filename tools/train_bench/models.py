"""The benchmark's models: the forward + loss graph and fixed batch each framework trains on."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSS = "graphprune.train/loss"
TARGETS = "graphprune.train/targets"
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
FRAMEWORKS = ("ours", "torch", "ortt")
TITLES = {"ours": "ours", "torch": "torch", "ortt": "ORT-training 1.19.2"}
# Per model: batch and what the torch twin is.  BERT-mini sizes (google/bert_uncased_L-4_H-256_A-4).
MODELS = {
    "digits": {"batch": 32, "classes": 10, "title": "digits CNN (8x8)"},
    "resnet18": {"batch": 32, "classes": 1000, "image": 64, "title": "ResNet-18 (64x64)"},
    "bert": {"batch": 8, "classes": 2, "seq": 128, "layers": 4, "hidden": 256, "heads": 4, "ffn": 1024,
             "vocab": 30522, "max_positions": 512, "title": "BERT-mini encoder (seq 128)"},
}


def _forward_model(name: str):
    """The inference model of ``name`` (opset 17)."""
    import onnx

    from graphprune.testing import bert_encoder, resnet

    spec = MODELS[name]
    if name == "digits":
        return onnx.load(os.path.join(ROOT, "models", "digits_cnn.onnx"))
    if name == "resnet18":
        return resnet(depth=18, image=spec["image"], num_classes=spec["classes"], dynamic_batch=True)
    return bert_encoder(layers=spec["layers"], hidden=spec["hidden"], heads=spec["heads"], ffn=spec["ffn"],
                        vocab=spec["vocab"], max_positions=spec["max_positions"], num_labels=spec["classes"])


def prepare(name: str, workdir: str) -> dict:
    """Write ``model.onnx`` (forward + CE loss, loss first) and ``batch.npz`` for ``name``; returns meta."""
    import numpy as np
    import onnx

    from graphprune.training.losses import LossSpec, add_loss_graph
    from graphprune.training.trainable import find_trainable

    spec = MODELS[name]
    model = _forward_model(name)
    logits = model.graph.output[-1]  # digits: logits; resnet: output; bert: logits (after last_hidden_state)
    trainable = find_trainable(model.graph).names
    add_loss_graph(model.graph, LossSpec(logits.name, "ce", None, 0.0, 1.0), logits, 17)
    model.ir_version = min(model.ir_version, 10)  # what onnxruntime 1.19 loads
    onnx.save(model, os.path.join(workdir, "model.onnx"))
    rng = np.random.default_rng(0)
    batch = spec["batch"]
    labels = rng.integers(0, spec["classes"], size=batch).astype(np.int64)
    if name == "bert":
        data = {"input_ids": rng.integers(0, spec["vocab"], size=(batch, spec["seq"])).astype(np.int64)}
    else:
        image = os.path.join(ROOT, "models", "digits_train.npz")
        if name == "digits":
            data = {"images": np.load(image)["images"][:batch].astype(np.float32)}
            labels = np.load(image)["labels"][:batch].astype(np.int64)
        else:
            data = {"input": rng.standard_normal((batch, 3, spec["image"], spec["image"])).astype(np.float32)}
    data[TARGETS] = np.eye(spec["classes"], dtype=np.float32)[labels]
    np.savez(os.path.join(workdir, "batch.npz"), labels=labels, **data)
    dims = {t.name: t.dims for t in model.graph.initializer}
    count = sum(int(np.prod(dims[n])) for n in trainable)
    meta = {"name": name, "trainable": list(trainable), "trainable_params": count, "loss": LOSS, "output": logits.name,
            "feeds": [k for k in data], "adamw": ADAMW, **spec}
    with open(os.path.join(workdir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta
