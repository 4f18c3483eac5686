"""Benchmark: time per fine-tuning step (forward + backward + AdamW) — graphprune's gradient graphs
on the newest onnxruntime against torch eager and onnxruntime-training 1.19.2.

    .venv/bin/python tools/bench_train.py [--models digits resnet18 bert] [--threads 1 2] [--rounds 9]
        [--round-seconds 1.5] [--profile] [--json out.json]

Models (each with a cross-entropy loss on its logits, added by ``losses.add_loss_graph``):
  - ``digits``: the digits CNN (``models/digits_cnn.onnx``, 8x8 images, 10 classes), batch 32;
  - ``resnet18``: ResNet-18 (``graphprune.testing.resnet(depth=18)``: 64-128-256-512 channels, 1000
    classes) on 64x64 images, batch 32;
  - ``bert``: the BERT-style encoder of ``graphprune.testing.bert_encoder`` at BERT-mini size (4 layers,
    hidden 256, 4 heads, FFN 1024, vocab 30522), sequence 128, batch 8, CE on its 2-class classifier.
Trained weights are the ones fine-tuning trains (``training.trainable.find_trainable``: Conv/Gemm/
MatMul weights and biases, normalization scale/bias; BatchNorm statistics and embeddings frozen, so
BatchNorm runs in its inference form in all three).

Columns:
  - ours: ``autodiff.build_training_step`` + ``StepSession`` (one InferenceSession run per step);
  - torch: the same architecture written as a torch module here, the ONNX weights loaded by name,
    ``F.cross_entropy``, ``torch.optim.AdamW`` (its default, single-tensor implementation on CPU);
  - ORT-training: onnxruntime-training-cpu 1.19.2 (``generate_artifacts`` with the loss already the
    first output, ``api.Module`` / ``api.Optimizer``), the way graphprune used it before: BatchNorm in
    its frozen-statistics form and LayerNormalization with the mean / inv-std outputs its gradient needs.
    It runs in a side virtualenv this script builds on first use with python3.11 (in
    ``~/.cache/graphprune-bench/ortt``); it is never a dependency of graphprune.
All use AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01) and the same fixed batch.

Each framework runs in its own long-lived worker process per model and thread count, driven over
stdin/stdout: a worker builds its session and takes warm-up steps, then the rounds alternate
ours / torch / ORT-training (order rotated each round) so that machine load hits all three alike.  A
round runs about ``--round-seconds`` of steps; the table shows the median over rounds of the
per-step wall-clock time and of the per-step process CPU time (all threads of the worker).  Peak
memory is the growth of the worker's peak RSS (``ru_maxrss``) over its RSS after imports.  The first
step's loss of each column is printed as a check that the three train the same function.

``--profile`` adds onnxruntime's per-op profile of one ours step model and one ORT-training step
(kernel time by op type, and for ours by the gradient rule that emitted the nodes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIDE_VENV = os.path.join(os.path.expanduser("~"), ".cache", "graphprune-bench", "ortt")
SIDE_PACKAGES = ["onnxruntime-training-cpu==1.19.2", "onnx<1.18", "numpy"]
LOSS = "graphprune.train/loss"
TARGETS = "graphprune.train/targets"
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
WARMUP_STEPS = 3
FRAMEWORKS = ("ours", "torch", "ortt")
TITLES = {"ours": "ours", "torch": "torch", "ortt": "ORT-training 1.19.2"}
# Per model: batch and what the torch twin is.  BERT-mini sizes (google/bert_uncased_L-4_H-256_A-4).
MODELS = {
    "digits": {"batch": 32, "classes": 10, "title": "digits CNN (8x8)"},
    "resnet18": {"batch": 32, "classes": 1000, "image": 64, "title": "ResNet-18 (64x64)"},
    "bert": {"batch": 8, "classes": 2, "seq": 128, "layers": 4, "hidden": 256, "heads": 4, "ffn": 1024,
             "vocab": 30522, "max_positions": 512, "title": "BERT-mini encoder (seq 128)"},
}


# ----- the forward + loss model and the batch (orchestrator side, project venv) --------------------
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


# ----- workers: one framework, one model, driven over stdin/stdout -----------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class _Ours:
    """graphprune's training step in a StepSession."""

    def __init__(self, workdir: str, meta: dict, threads: int, profile: str = ""):
        import numpy as np
        import onnx

        from graphprune.autodiff.optimizers import OptimizerConfig
        from graphprune.autodiff.session import StepSession
        from graphprune.autodiff.step import build_training_step

        model = onnx.load(os.path.join(workdir, "model.onnx"))
        batch = np.load(os.path.join(workdir, "batch.npz"))
        self.feeds = {k: batch[k] for k in meta["feeds"]}
        adamw = meta["adamw"]
        config = OptimizerConfig(kind="adamw", betas=tuple(adamw["betas"]), eps=adamw["eps"],
                                 weight_decay=adamw["weight_decay"])
        self.step = build_training_step(model, meta["loss"], meta["trainable"], config)
        self.session = StepSession(self.step, threads=threads)
        self.lr = adamw["lr"]
        self.threads = threads
        self.workdir = workdir

    def train_step(self) -> float:
        return self.session.train_step(self.feeds, self.lr)[0]

    def profile(self, steps: int) -> dict:
        """Per-op kernel time of the step model (a profiling InferenceSession over the same graph)."""
        import numpy as np

        from graphprune.autodiff.step import LR_INPUT, STEP_INPUT
        from graphprune.model_io import for_ort
        from graphprune.runtime import ort

        rt = ort()
        options = rt.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(self.workdir, "ours-prof")
        session = rt.InferenceSession(for_ort(self.step.step_model).SerializeToString(), options,
                                      providers=["CPUExecutionProvider"])
        feeds = dict(self.feeds, **self.step.initial)
        feeds[LR_INPUT] = np.array(self.lr, np.float32)
        fetch = [self.step.loss]
        for t in range(steps + 1):
            feeds[STEP_INPUT] = np.array(t + 1, np.float32)
            session.run(fetch, feeds)
        path = session.end_profiling()
        forward_ops = {n.name: n.op_type for n in self.step.step_model.graph.node}
        return _profile_summary(path, forward_ops)


class _Torch:
    """The same architecture as a torch module, with the ONNX weights."""

    def __init__(self, workdir: str, meta: dict, threads: int, profile: str = ""):
        import numpy as np
        import onnx
        import torch
        from onnx import numpy_helper

        torch.set_num_threads(threads)
        model = onnx.load(os.path.join(workdir, "model.onnx"))
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.net = _torch_twin(meta)
        _load_twin(self.net, weights, meta["trainable"])
        self.net.eval()  # BatchNorm with its running statistics, as in the ONNX graph
        batch = np.load(os.path.join(workdir, "batch.npz"))
        self.inputs = [torch.from_numpy(batch[k]) for k in meta["feeds"] if k != TARGETS]
        self.labels = torch.from_numpy(batch["labels"])
        adamw = meta["adamw"]
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=adamw["lr"], betas=tuple(adamw["betas"]),
                                           eps=adamw["eps"], weight_decay=adamw["weight_decay"])
        self.torch = torch

    def train_step(self) -> float:
        F = self.torch.nn.functional
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.net(*self.inputs), self.labels)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())


class _OrtTraining:
    """onnxruntime-training 1.19.2 artifacts and its on-device Module / Optimizer (side venv)."""

    def __init__(self, workdir: str, meta: dict, threads: int, profile: str = ""):
        import numpy as np
        import onnx

        training = _import_ort_training()
        model = onnx.load(os.path.join(workdir, "model.onnx"))
        _as_old_graphprune_trained_it(model)
        artifacts = tempfile.mkdtemp(prefix="ortt-artifacts-", dir=workdir)  # removed with workdir
        adamw = meta["adamw"]
        optimizer = training["onnxblock"].optim.AdamW(betas=tuple(adamw["betas"]), eps=adamw["eps"],
                                                      weight_decay=adamw["weight_decay"])
        with _quiet_stderr():
            training["artifacts"].generate_artifacts(model, requires_grad=meta["trainable"], loss=None,
                                                     optimizer=optimizer, artifact_directory=artifacts)
        import onnxruntime as rt

        options = rt.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = profile
        api = training["api"]
        files = {name: os.path.join(artifacts, name) for name in os.listdir(artifacts)}
        with _quiet_stderr():
            self.state = api.CheckpointState.load_checkpoint(files["checkpoint"])
            self.module = api.Module(files["training_model.onnx"], self.state, files["eval_model.onnx"],
                                     session_options=options)
            if profile:  # profile files are named by the second the session starts: keep the two apart
                time.sleep(1.1)
            self.optimizer = api.Optimizer(files["optimizer_model.onnx"], self.module)
        self.optimizer.set_learning_rate(adamw["lr"])
        batch = np.load(os.path.join(workdir, "batch.npz"))
        self.inputs = [np.ascontiguousarray(batch[name]) for name in self.module.input_names()]
        self.module.train(True)

    def train_step(self) -> float:
        loss = self.module(*self.inputs)[0]
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss)


def _import_ort_training() -> dict:
    """``onnxruntime.training``'s artifacts/onnxblock/api without its ``__init__`` (which imports torch)."""
    import importlib
    import types

    import onnxruntime

    def bare(name):
        full = f"onnxruntime.{name}"
        package = types.ModuleType(full)
        package.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), name)]
        package.__package__ = full
        sys.modules.setdefault(full, package)
        setattr(onnxruntime, name, sys.modules[full])

    bare("training")
    try:
        importlib.import_module("onnxruntime.tools")
    except Exception:  # noqa: BLE001  (its __init__ imports torch when torch is findable but broken)
        sys.modules.pop("onnxruntime.tools", None)
        bare("tools")
    return {part: importlib.import_module(f"onnxruntime.training.{part}") for part in ("artifacts", "onnxblock", "api")}


def _as_old_graphprune_trained_it(model) -> None:
    """The forward-graph rewrites graphprune applied before onnxruntime-training (in place).

    onnxruntime-training runs a BatchNormalization node in training mode (batch statistics) whatever
    the node says (the first loss differs from torch's eval-mode BatchNorm), so inference BatchNorm
    became ``(x - mean) * inv_std * scale + bias`` with frozen statistics.  Its LayerNormalization
    gradient needs the optional mean / inv-std outputs, which exporters leave out.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = []
    for index, node in enumerate(graph.node):
        if node.op_type == "BatchNormalization" and len(node.output) == 1:
            x, scale, bias, mean, var = node.input
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            shape = [-1, 1, 1]
            tag = f"bench.bn{index}"
            inv_std = (1.0 / np.sqrt(values[var].astype(np.float64) + eps)).astype(np.float32).reshape(shape)
            graph.initializer.extend([numpy_helper.from_array(values[mean].reshape(shape), f"{tag}.mean"),
                                      numpy_helper.from_array(inv_std, f"{tag}.inv_std"),
                                      numpy_helper.from_array(np.array(shape, np.int64), f"{tag}.shape")])
            nodes += [
                helper.make_node("Sub", [x, f"{tag}.mean"], [f"{tag}.c"]),
                helper.make_node("Mul", [f"{tag}.c", f"{tag}.inv_std"], [f"{tag}.n"]),
                helper.make_node("Reshape", [scale, f"{tag}.shape"], [f"{tag}.s"]),
                helper.make_node("Reshape", [bias, f"{tag}.shape"], [f"{tag}.b"]),
                helper.make_node("Mul", [f"{tag}.n", f"{tag}.s"], [f"{tag}.a"]),
                helper.make_node("Add", [f"{tag}.a", f"{tag}.b"], [node.output[0]]),
            ]
            continue
        if node.op_type == "LayerNormalization" and len(node.output) < 3:
            outputs = list(node.output) + [""] * (3 - len(node.output))
            outputs[1] = outputs[1] or f"bench.ln{index}.mean"
            outputs[2] = outputs[2] or f"bench.ln{index}.inv_std"
            del node.output[:]
            node.output.extend(outputs)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


class _quiet_stderr:
    """Native writes to fd 2 go nowhere inside the block (ORT-training logs every graph transformer)."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def _profile_summary(path: str, forward_ops: dict) -> dict:
    """Kernel microseconds per step by op type (and by emitting rule for graphprune's gradient nodes).

    Each node's time is its median over the profiled runs, so the first run's allocations do not count."""
    with open(path) as f:
        events = json.load(f)
    runs: dict = {}
    ops: dict = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        runs.setdefault(node, []).append(float(event.get("dur", 0)))
        ops[node] = event.get("args", {}).get("op_name", "?")
    by_op: dict = {}
    by_rule: dict = {}
    for node, durations in runs.items():
        dur = statistics.median(durations)
        for table, key in ((by_op, ops[node]), (by_rule, f"{_emitting_rule(node, forward_ops)} -> {ops[node]}")):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += dur
            entry[1] += 1
    total = sum(statistics.median(d) for d in runs.values())
    slowest = sorted(runs, key=lambda n: -statistics.median(runs[n]))[:25]

    def rows(table):
        return sorted(([k, round(v[0], 1), v[1]] for k, v in table.items()), key=lambda r: -r[1])

    return {"total_us": round(total, 1), "by_op": rows(by_op), "by_rule": rows(by_rule),
            "slowest_nodes": [[n, ops[n], round(statistics.median(runs[n]), 1)] for n in slowest]}


def _emitting_rule(node: str, forward_ops: dict) -> str:
    """Which part of the step a node belongs to: forward, the optimizer, or the rule of a forward op."""
    if node.startswith("graphprune.step/opt/"):
        return "optimizer"
    if node.startswith("graphprune.step/next/"):
        return "step outputs"
    if node.startswith("graphprune.grad/"):
        owner = node[len("graphprune.grad/"):]
        while "/" in owner:  # onnxruntime's fusions append to the emitted name: find the forward node
            owner = owner.rsplit("/", 1)[0]
            if owner in forward_ops:
                return f"grad of {forward_ops[owner]}"
        return "gradient"
    if node.startswith("graphprune.train/"):
        return "loss"
    if "_Grad/" in node or node.endswith("_Grad"):
        return "gradient"
    return "forward"


def worker_main(kind: str, workdir: str, threads: int, profile: str) -> None:
    """Serve one framework over stdin/stdout, one JSON line per command (run N, memory, profile, quit)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints must not corrupt the protocol
    with open(os.path.join(workdir, "meta.json")) as f:
        meta = json.load(f)
    if kind == "torch":
        import torch  # noqa: F401  (its import is not part of the measured growth)
    baseline = _rss_bytes()
    started = time.perf_counter()
    try:
        runner = {"ours": _Ours, "torch": _Torch, "ortt": _OrtTraining}[kind](workdir, meta, threads, profile)
        setup = time.perf_counter() - started
        losses = [runner.train_step() for _ in range(WARMUP_STEPS)]
    except Exception as exc:  # noqa: BLE001  (shown in the table, e.g. an op without a gradient rule)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        protocol.write(json.dumps({"error": f"{type(exc).__name__}: {first[:300]}"}) + "\n")
        return
    reply = {"setup_s": setup, "first_loss": losses[0], "losses": losses}
    protocol.write(json.dumps(reply) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "run":
            wall, cpu, loss = [], [], None
            for _ in range(command["steps"]):
                w0, c0 = time.perf_counter(), time.process_time()
                loss = runner.train_step()
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
            reply = {"wall": wall, "cpu": cpu, "loss": loss}
        elif command["cmd"] == "memory":
            reply = {"baseline": baseline, "peak": _peak_rss_bytes(), "now": _rss_bytes()}
        elif command["cmd"] == "profile":
            reply = runner.profile(command["steps"]) if kind == "ours" else {}
        else:
            protocol.write(json.dumps({}) + "\n")
            if kind == "ortt" and profile:
                del runner  # the training session writes its profile when it is destroyed
            return
        protocol.write(json.dumps(reply) + "\n")


# ----- torch twins -----------------------------------------------------------------------------------
def _torch_twin(meta: dict):
    """A torch module computing what the ONNX graph of ``meta['name']`` computes, with its weight names."""
    import torch
    from torch import nn

    F = nn.functional

    class Digits(nn.Module):
        def __init__(self):
            super().__init__()
            for i, (cin, cout) in enumerate(((1, 16), (16, 32), (32, 64))):
                setattr(self, f"conv{i + 1}", nn.Conv2d(cin, cout, 3, padding=1))
                setattr(self, f"bn{i + 1}", nn.BatchNorm2d(cout))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
            x = F.relu(self.bn3(self.conv3(x)))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(y + identity)

    class ResNet18(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            cin = 64
            for stage, cout in enumerate((64, 128, 256, 512)):
                stride = 1 if stage == 0 else 2
                setattr(self, f"layer{stage + 1}", nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1)))
                cin = cout
            self.fc = nn.Linear(512, classes)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    class Linear(nn.Module):
        """An exported Linear: weight stored [in, out] (x @ W + b), as the fixture writes it."""

        def __init__(self, fan_in, fan_out):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(fan_in, fan_out))
            self.bias = nn.Parameter(torch.empty(fan_out))

        def forward(self, x):
            return x @ self.weight + self.bias

    class Layer(nn.Module):
        def __init__(self, hidden, heads, ffn):
            super().__init__()
            self.heads, self.hidden = heads, hidden
            attention = nn.Module()
            attention.self = nn.Module()
            for name in ("query", "key", "value"):
                setattr(attention.self, name, Linear(hidden, hidden))
            attention.output = nn.Module()
            attention.output.dense = Linear(hidden, hidden)
            attention.output.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
            self.attention = attention
            self.intermediate = nn.Module()
            self.intermediate.dense = Linear(hidden, ffn)
            self.output = nn.Module()
            self.output.dense = Linear(ffn, hidden)
            self.output.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

        def forward(self, x):
            n, s, _ = x.shape
            h, d = self.heads, self.hidden // self.heads
            attn = self.attention.self
            q = attn.query(x).view(n, s, h, d).transpose(1, 2)
            k = attn.key(x).view(n, s, h, d).permute(0, 2, 3, 1)
            v = attn.value(x).view(n, s, h, d).transpose(1, 2)
            probs = torch.softmax((q @ k) / torch.tensor(d ** 0.5, dtype=x.dtype), dim=-1)
            context = (probs @ v).transpose(1, 2).reshape(n, s, self.hidden)
            x = self.attention.output.LayerNorm(self.attention.output.dense(context) + x)
            inner = F.gelu(self.intermediate.dense(x))
            return self.output.LayerNorm(self.output.dense(inner) + x)

    class Bert(nn.Module):
        def __init__(self, m):
            super().__init__()
            hidden = m["hidden"]
            self.embeddings = nn.Module()
            self.embeddings.word_embeddings = nn.Embedding(m["vocab"], hidden)
            self.embeddings.position_embeddings = nn.Embedding(m["max_positions"], hidden)
            self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(Layer(hidden, m["heads"], m["ffn"]) for _ in range(m["layers"]))
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(hidden, hidden)
            self.classifier = nn.Linear(hidden, m["classes"])

        def forward(self, ids):
            e = self.embeddings
            positions = torch.arange(ids.shape[1])
            x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(positions))
            for layer in self.encoder.layer:
                x = layer(x)
            return self.classifier(torch.tanh(self.pooler.dense(x[:, 0])))

    name = meta["name"]
    if name == "digits":
        return Digits()
    if name == "resnet18":
        return ResNet18(meta["classes"])
    return Bert(meta)


def _load_twin(net, weights: dict, trainable) -> None:
    """Copy the ONNX initializers into ``net`` by name; only ``trainable`` ones require gradients."""
    import torch

    trainable = set(trainable)
    missing = []
    for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
        if name.endswith("num_batches_tracked"):
            continue
        if name not in weights:
            missing.append(name)
            continue
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(weights[name].copy()).reshape(tensor.shape))
        if isinstance(tensor, torch.nn.Parameter):
            tensor.requires_grad_(name in trainable)
    params = {name for name, p in net.named_parameters() if p.requires_grad}
    if missing or params != trainable:
        raise SystemExit(f"torch twin does not match the ONNX model: missing {missing}, "
                         f"trainable differ by {sorted(params ^ trainable)}")


# ----- orchestration ------------------------------------------------------------------------------
def ensure_side_venv(path: str, python: str) -> str:
    """The side venv's python with onnxruntime-training 1.19.2, built on first use."""
    exe = os.path.join(path, "bin", "python")
    marker = os.path.join(path, ".graphprune-bench-ready")
    if os.path.exists(marker):
        return exe
    print(f"building the onnxruntime-training side venv in {path} (once)...", file=sys.stderr)
    subprocess.run([python, "-m", "venv", path], check=True)
    subprocess.run([exe, "-m", "pip", "install", "-q", *SIDE_PACKAGES], check=True)
    with open(marker, "w") as f:
        f.write(" ".join(SIDE_PACKAGES) + "\n")
    return exe


class Worker:
    """A worker process and its JSON-lines channel."""

    def __init__(self, kind: str, python: str, workdir: str, threads: int, profile_prefix: str = ""):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
        self.kind = kind
        self.process = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", kind, "--workdir", workdir, "--worker-threads",
             str(threads), "--worker-profile", profile_prefix],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        self.ready = self._reply()
        if "error" in self.ready:
            self.process.wait(timeout=60)
            raise RuntimeError(self.ready["error"])

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"{self.kind} worker exited ({code}); see its stderr above")
        return json.loads(line)

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        try:
            self.ask(cmd="quit")
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        self.process.stdin.close()
        self.process.wait(timeout=120)


def measure(name: str, threads: int, args, side_python: str) -> dict:
    """One row: the three frameworks on ``name`` at ``threads``, interleaved rounds."""
    workdir = tempfile.mkdtemp(prefix=f"bench-train-{name}-")
    meta = prepare(name, workdir)
    row = {"model": name, "title": MODELS[name]["title"], "threads": threads, "batch": meta["batch"],
           "trainable_params": meta["trainable_params"], "frameworks": {}}
    pythons = {"ours": sys.executable, "torch": sys.executable, "ortt": side_python}
    workers = {}
    for kind in args.frameworks:
        try:
            workers[kind] = Worker(kind, pythons[kind], workdir, threads)
            row["frameworks"][kind] = {"setup_s": workers[kind].ready["setup_s"],
                                       "first_loss": workers[kind].ready["first_loss"], "rounds": []}
        except RuntimeError as exc:
            row["frameworks"][kind] = {"error": str(exc)}
            print(f"{row['title']}: {TITLES[kind]} fails: {exc}", file=sys.stderr)
    steps = {}
    for kind, worker in workers.items():
        probe = worker.ask(cmd="run", steps=1)["wall"][0]
        steps[kind] = max(1, min(200, round(args.round_seconds / max(probe, 1e-4))))
    for r in range(args.rounds):
        order = list(workers)
        order = order[r % len(order):] + order[: r % len(order)]
        for kind in order:
            reply = workers[kind].ask(cmd="run", steps=steps[kind])
            row["frameworks"][kind]["rounds"].append(
                {"wall": sum(reply["wall"]) / len(reply["wall"]), "cpu": sum(reply["cpu"]) / len(reply["cpu"]),
                 "steps": len(reply["wall"])})
    for kind, worker in workers.items():
        stats = row["frameworks"][kind]
        memory = worker.ask(cmd="memory")
        stats["peak_rss_growth_mb"] = max(0, memory["peak"] - memory["baseline"]) / 2**20
        stats["steady_rss_growth_mb"] = max(0, memory["now"] - memory["baseline"]) / 2**20
        stats["wall_ms"] = 1000 * statistics.median(x["wall"] for x in stats["rounds"])
        stats["cpu_ms"] = 1000 * statistics.median(x["cpu"] for x in stats["rounds"])
        if args.profile and kind == "ours":
            stats["profile"] = worker.ask(cmd="profile", steps=5)
        worker.close()
    if args.profile and "ortt" in workers:
        prefix = os.path.join(workdir, "ortt-prof")
        worker = Worker("ortt", side_python, workdir, threads, profile_prefix=prefix)
        worker.ask(cmd="run", steps=3)
        worker.close()
        row["frameworks"]["ortt"]["profile"] = _ortt_profile(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    fw = row["frameworks"]
    for other in ("ortt", "torch"):
        if "wall_ms" in fw.get("ours", {}) and "wall_ms" in fw.get(other, {}):
            row[f"ours_over_{other}"] = fw["ours"]["wall_ms"] / fw[other]["wall_ms"]
            row[f"ours_over_{other}_cpu"] = fw["ours"]["cpu_ms"] / fw[other]["cpu_ms"]
    return row


def _ortt_profile(workdir: str) -> dict:
    """Per-op totals of the ORT-training sessions' profiles (training and optimizer models)."""
    files = [os.path.join(workdir, f) for f in os.listdir(workdir) if f.startswith("ortt-prof") and f.endswith(".json")]
    merged = []
    decoder = json.JSONDecoder()
    for path in files:  # the training and optimizer sessions may append to one file: several arrays
        with open(path) as f:
            text, at = f.read(), 0
        while text[at:].strip():
            at += len(text[at:]) - len(text[at:].lstrip())
            events, at = decoder.raw_decode(text, at)
            merged.extend(events)
    target = os.path.join(workdir, "ortt-merged.json")
    with open(target, "w") as f:
        json.dump(merged, f)
    return _profile_summary(target, {})


def _cell(stats: dict) -> str:
    if "error" in stats:
        return "fails"
    if "wall_ms" not in stats:
        return "-"
    return f"{stats['wall_ms']:.1f} ms (cpu {stats['cpu_ms']:.1f})"


def _ratio(row: dict, other: str) -> str:
    if f"ours_over_{other}" not in row:
        return "-"
    return f"{row[f'ours_over_{other}']:.2f}x (cpu {row[f'ours_over_{other}_cpu']:.2f}x)"


def _goal(row: dict) -> str:
    """Whether ours <= 1.0x ORT-training and <= 1.5x torch, on wall-clock and on CPU time."""
    if "ours_over_ortt" not in row or "ours_over_torch" not in row:
        return "-"
    met = {clock: row[f"ours_over_ortt{suffix}"] <= 1.0 and row[f"ours_over_torch{suffix}"] <= 1.5
           for clock, suffix in (("wall", ""), ("cpu", "_cpu"))}
    if all(met.values()) or not any(met.values()):
        return "met" if met["wall"] else "missed"
    return f"met on {'wall' if met['wall'] else 'cpu'} time only"


def markdown(rows) -> str:
    header = ["model", "trained params", "batch", "threads", "ours", "ORT-training 1.19.2", "torch eager",
              "ours / ORT-training", "ours / torch", "peak RSS growth: ours / ORT-T / torch", "goal (<=1.0x, <=1.5x)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        fw = row["frameworks"]
        memory = " / ".join(f"{fw[k]['peak_rss_growth_mb']:.0f}" if "peak_rss_growth_mb" in fw.get(k, {}) else "-"
                            for k in ("ours", "ortt", "torch"))
        goal = _goal(row)
        cells = [row["title"], f"{row['trainable_params'] / 1e6:.2f}M", row["batch"], row["threads"],
                 *(_cell(fw.get(k, {})) for k in ("ours", "ortt", "torch")), _ratio(row, "ortt"), _ratio(row, "torch"),
                 f"{memory} MB", goal]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def profile_text(rows, top: int = 40) -> str:
    out = []
    for row in rows:
        for kind in ("ours", "ortt"):
            prof = row["frameworks"].get(kind, {}).get("profile")
            if not prof:
                continue
            out.append(f"\n{row['title']}, {row['threads']} thread(s), {TITLES[kind]}: "
                       f"{prof['total_us'] / 1000:.1f} ms of kernels per step")
            out.append("  by op type (ms/step, nodes): " + ", ".join(
                f"{op} {us / 1000:.1f} ({n})" for op, us, n in prof["by_op"][:top]))
            if kind == "ours":
                parts: dict = {}
                for key, us, _ in prof["by_rule"]:
                    part = "gradient" if key.startswith(("grad of", "gradient")) else key.split(" -> ")[0]
                    parts[part] = parts.get(part, 0.0) + us
                out.append("  by part (ms/step): " + ", ".join(
                    f"{part} {us / 1000:.1f}" for part, us in sorted(parts.items(), key=lambda p: -p[1])))
                out.append("  by rule -> op (ms/step, nodes): " + ", ".join(
                    f"{key} {us / 1000:.1f} ({n})" for key, us, n in prof["by_rule"][:top]))
    return "\n".join(out)


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--round-seconds", type=float, default=1.5, help="steps per round: about this long")
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=list(FRAMEWORKS))
    parser.add_argument("--side-venv", default=SIDE_VENV)
    parser.add_argument("--side-python", default="python3.11", help="python that builds the side venv")
    parser.add_argument("--profile", action="store_true", help="per-op profiles of ours and ORT-training")
    parser.add_argument("--json")
    parser.add_argument("--worker", choices=list(FRAMEWORKS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker-profile", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.workdir, args.worker_threads, args.worker_profile)
        return 0
    side_python = ensure_side_venv(args.side_venv, args.side_python) if "ortt" in args.frameworks else ""
    rows = []
    for name in args.models:
        for threads in args.threads:
            row = measure(name, threads, args, side_python)
            rows.append(row)
            losses = ", ".join(f"{TITLES[k]} {stats['first_loss']:.6g}" for k, stats in row["frameworks"].items()
                               if "first_loss" in stats)
            print(f"{row['title']} at {threads} thread(s): first-step loss {losses}", file=sys.stderr)
    info = machine()
    print(f"\n{info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}, torch {info['torch']}; "
          f"{info['date']}; median over {args.rounds} interleaved rounds\n")
    print(markdown(rows))
    if args.profile:
        print(profile_text(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
