"""Benchmark of static quantization's int8 storage fallback on PP-OCR's text-direction classifier: size, accuracy, speed.

Developer-only (needs ``tools/real_models.py``'s cached model and rendered data):

    .venv/bin/python tools/bench_fallback.py [--rounds 40] [--out /tmp/fallback]

Runs ``graphprune quantize cls.onnx -o OUT --data cls_train.npz`` (int8 pays nowhere on this model,
so it falls back to int8 weight storage), then reports:

- the file sizes and where the written file's bytes are (values by element type, the rest is
  structure: nodes, names, tensor headers; the original holds its weights in Constant nodes, so
  they count as its structure);
- accuracy on the 500 rendered test lines, top-1 agreement and output rel L2 against the float
  model, for the original file, the float model after the fallback's own preparation
  (``storage_form``: BatchNormalization folded, canonicalized) and the fallback's file;
- whether ONNX Runtime's optimized graph of the fallback holds the same ops as the prepared float
  model's (the dequantization is folded at load);
- CPU time per run at batch 1 on 1 thread (thread time), median of ``--rounds`` interleaved rounds
  of 20 runs, each order as often.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_models  # noqa: E402  (a developer tool beside this one)

_VALUE_TYPES = {1: "float32 values", 10: "float16 values", 3: "int8 values"}


def byte_parts(path: str) -> dict:
    """Serialized bytes of ``path`` by part: tensor values by element type, the rest as structure."""
    import onnx

    model = onnx.load(path)
    parts = collections.Counter()
    for tensor in model.graph.initializer:
        data = len(tensor.raw_data) if tensor.raw_data else tensor.ByteSize() - len(tensor.name) - 4
        parts[_VALUE_TYPES.get(tensor.data_type, "integer constants")] += data
    total = model.ByteSize()
    parts["structure (nodes, names, tensor headers)"] = total - sum(parts.values())
    return {"file": os.path.getsize(path), "serialized": total, "nodes": len(model.graph.node),
            "initializers": len(model.graph.initializer), **dict(parts)}


def _session(path: str, optimized: str = ""):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", default="/tmp/graphprune-fallback")
    args = parser.parse_args(argv)
    from graphprune.cli import main as cli
    from graphprune.cli.quantize_weight_only import storage_form
    from graphprune.model_io import load, save

    os.makedirs(args.out, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    original = real_models.models()["cls"]
    train, _ = real_models.data("cls", "train")
    files = {"original": original, "prepared float": os.path.join(args.out, "float.onnx"),
             "fallback": os.path.join(args.out, "fallback.onnx")}
    save(storage_form(load(original))[0], files["prepared float"])
    if cli(["quantize", original, "-o", files["fallback"], "--data", train]) != 0:
        return 1
    for name, path in files.items():
        print(f"{name}: {byte_parts(path)}")
    print(f"fallback: {os.path.getsize(original) / os.path.getsize(files['fallback']):.2f}x smaller than the original")
    test, truth = real_models.data("cls", "test")
    x = np.load(test)["x"]
    outputs, ops = {}, {}
    for name, path in files.items():
        session = _session(path, optimized=path + ".optimized.onnx")
        outputs[name] = np.concatenate([session.run(None, {"x": x[i:i + 64]})[0] for i in range(0, len(x), 64)])
        import onnx

        ops[name] = sorted(n.op_type for n in onnx.load(path + ".optimized.onnx").graph.node)
        ref = outputs["original"]
        print(f"{name}: accuracy {real_models.cls_accuracy(outputs[name], truth) * 100:.1f}%, top-1 agreement "
              f"{np.mean(outputs[name].argmax(1) == ref.argmax(1)) * 100:.1f}%, rel L2 "
              f"{np.linalg.norm(outputs[name] - ref) / np.linalg.norm(ref):.4f}, optimized graph {len(ops[name])} nodes")
    print(f"optimized graph of the fallback: the prepared float model's ops: {ops['fallback'] == ops['prepared float']}")
    sessions = {name: _session(path) for name, path in files.items()}
    one = {"x": x[:1]}
    for session in sessions.values():
        for _ in range(20):
            session.run(None, one)
    times = {name: [] for name in sessions}
    order = list(sessions)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            start = time.thread_time()
            for _ in range(20):
                sessions[name].run(None, one)
            times[name].append((time.thread_time() - start) / 20 * 1e3)
    base = float(np.median(times["prepared float"]))
    for name, values in times.items():
        print(f"{name}: {np.median(values):.3f} ms CPU per run ({base / np.median(values):.2f}x the prepared float model)")
    print(f"load average at end: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
