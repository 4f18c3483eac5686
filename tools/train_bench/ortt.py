"""The onnxruntime-training 1.19.2 column: its side venv, artifacts and step (never a graphprune dependency)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from train_bench.report import profile_summary

SIDE_VENV = os.path.join(os.path.expanduser("~"), ".cache", "graphprune-bench", "ortt")
SIDE_PACKAGES = ["onnxruntime-training-cpu==1.19.2", "onnx<1.18", "numpy"]


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


class OrtTraining:
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


def merged_profile(workdir: str) -> dict:
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
    return profile_summary(target, {})
