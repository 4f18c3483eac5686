"""Benchmark graphprune on large models: peak RSS and wall time of every command, one subprocess each.

Usage:
    .venv/bin/python tools/bench_scale.py [--sizes 0.5,2.5] [--kinds mlp,conv] [--nodes 20000]
        [--commands inspect,prune,sparsify,quantize,canonicalize] [--timeout 1200]
        [--dir /tmp/graphprune-scale] [--keep] [--reuse] [--json out.json] [--rss-limit 2.0]

Models are generated straight to disk with their weights in an external-data file (streamed one
layer at a time, so generating a 6 GB model needs no 6 GB of memory):
  * ``mlp``: MatMul -> Add -> Relu layers of width 2048 (0.5 GB) or 4096 (larger sizes);
  * ``conv``: 3x3 Conv -> Relu layers of 1024 or 2048 channels on an 8x8 feature map;
  * ``nodes``: a 20,000-node residual MLP of width 32, hidden 64 (MatMul, Relu, MatMul, Add per block).
Commands: ``inspect``, ``prune --ratio 0.5``, ``sparsify --sparsity 0.5``, ``quantize`` (random
calibration, 16 samples, ``--no-measure``), ``quantize-timed`` (the same in the default timed mode,
with ``--report``; not in the default list) and ``canonicalize`` (the pass through the Python API:
load, ``graphprune.canonicalize``, save; it has no sub-command).  ``floor``, ``floor-cli`` and
``floor-session`` (not in the default list) measure what commands cost at least: the imports and
every weight read once, or the runtime session every written result needs (see ``_FLOORS``). Each runs in its own process;
peak RSS is that process's ``ru_maxrss`` (from ``os.wait4``), wall time includes start-up (about 1 s
of imports), CPU time is its user + system time (what the wall time would be on an idle core, for
the single-threaded parts). "x size" is peak RSS over the model's bytes on disk; the issue's goal
is <= 1.5x. ``--rss-limit`` kills a command past that multiple of the model's size.

Commands run with graphprune's bytecode compiled once beforehand into ``<dir>/pycache``
(``PYTHONPYCACHEPREFIX``), as an installed package has it: with ``PYTHONDONTWRITEBYTECODE`` set
(as in our shells) every run compiled graphprune's ~170 modules again (0.3-0.4 s of each command).
``--no-bytecode-cache`` measures with the caller's environment unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

GB = 10**9
COMMANDS = ("inspect", "prune", "sparsify", "quantize", "canonicalize")
_CANONICALIZE = (
    "import sys, graphprune; from graphprune.model_io import load, save; "
    "save(graphprune.canonicalize(load(sys.argv[1])), sys.argv[2], input_path=sys.argv[1])"
)
# The floors (not graphprune commands): what any command on the model costs at least.  ``floor``
# imports numpy, onnx and onnxruntime and reads every weight once, keeping them (as a magnitude
# criterion holds them while it scores and slices); ``floor-cli`` imports graphprune's command line
# first (what every sub-command imports); ``floor-session`` imports the command line and creates
# the session that proves onnxruntime loads a model of this structure, reading no weight
# (``validation.check_session``: the weightless copy, as every written result is checked).
_FLOOR = (
    "import os, sys, numpy as np, onnx, onnxruntime\n"
    "{imports}"
    "model = onnx.load(sys.argv[1], load_external_data=False)\n"
    "kept = []\n"
    "for init in model.graph.initializer if {read} else ():\n"
    "    where = {{e.key: e.value for e in init.external_data}}\n"
    "    if not where:\n"
    "        kept.append(onnx.numpy_helper.to_array(init))\n"
    "        continue\n"
    "    path = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), where['location'])\n"
    "    kept.append(np.fromfile(path, dtype=np.uint8, count=int(where['length']), offset=int(where.get('offset', 0))))\n"
    "{after}"
)
_CLI = "import graphprune.cli; graphprune.cli.build_parser()\n"
_FLOORS = {
    "floor": _FLOOR.format(imports="", read=True, after=""),
    "floor-cli": _FLOOR.format(imports=_CLI, read=True, after=""),
    "floor-session": _FLOOR.format(imports=_CLI, read=False,
                                   after="from graphprune.validation import check_session; check_session(model)\n"),
}


class _Weights:
    """Appends tensors to one external-data file and builds their initializer records."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "wb")
        self.inits: List[onnx.TensorProto] = []

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        offset = self.file.tell()
        pad = (-offset) % (4096 if array.nbytes >= 2**20 else 64)  # large tensors page-aligned: ORT maps them
        self.file.write(b"\0" * pad)
        offset += pad
        self.file.write(array.tobytes())
        tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", os.path.basename(self.path)), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.inits.append(tensor)

    def close(self) -> None:
        self.file.close()


def _save(path: str, nodes, inputs, outputs, weights: _Weights) -> str:
    weights.close()
    graph = helper.make_graph(nodes, os.path.basename(path), inputs, outputs, weights.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def make_mlp(path: str, size_bytes: int, rng: np.random.Generator) -> str:
    """MatMul -> Add -> Relu layers (the last without Relu) totalling about ``size_bytes``."""
    width = 2048 if size_bytes <= GB else 4096
    layers = max(2, round(size_bytes / (width * width * 4)))
    weights = _Weights(path + ".data")
    nodes, x = [], "x"
    for i in range(layers):
        weights.add(f"w{i}", (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)))
        weights.add(f"b{i}", rng.standard_normal(width, dtype=np.float32) * 0.01)
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, width]) for n in ("x", "y")]
    return _save(path, nodes, io[:1], io[1:], weights)


def make_conv(path: str, size_bytes: int, rng: np.random.Generator) -> str:
    """3x3 Conv -> Relu layers on an 8x8 map totalling about ``size_bytes``."""
    channels = 1024 if size_bytes <= GB else 2048
    layers = max(2, round(size_bytes / (channels * channels * 9 * 4)))
    weights = _Weights(path + ".data")
    nodes, x = [], "x"
    for i in range(layers):
        w = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) / np.sqrt(channels * 9)
        weights.add(f"w{i}", w)
        weights.add(f"b{i}", rng.standard_normal(channels, dtype=np.float32) * 0.01)
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        x = f"c{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, channels, 8, 8]) for n in ("x", "y")]
    return _save(path, nodes, io[:1], io[1:], weights)


def make_many_nodes(path: str, n_nodes: int, rng: np.random.Generator) -> str:
    """A residual MLP of width 32 and hidden width 64 with about ``n_nodes`` nodes.

    Each block is MatMul -> Relu -> MatMul -> Add (residual): its 64 hidden channels are one
    prunable group; the residual stream is blocked (it reaches the graph input).
    """
    width, hidden = 32, 64
    weights = _Weights(path + ".data")
    nodes, x = [], "x"
    for i in range(n_nodes // 4):
        weights.add(f"u{i}", rng.standard_normal((width, hidden), dtype=np.float32) / np.sqrt(width))
        weights.add(f"d{i}", rng.standard_normal((hidden, width), dtype=np.float32) / np.sqrt(hidden) * 0.1)
        nodes += [
            helper.make_node("MatMul", [x, f"u{i}"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", f"d{i}"], [f"m{i}"]),
            helper.make_node("Add", [x, f"m{i}"], [f"s{i}"]),
        ]
        x = f"s{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, width]) for n in ("x", "y")]
    return _save(path, nodes, io[:1], io[1:], weights)


def _command(name: str, model: str, out: str) -> List[str]:
    cli = [os.path.join(os.path.dirname(sys.executable), "graphprune")]
    return {
        "inspect": cli + ["inspect", model],
        "prune": cli + ["prune", model, "--ratio", "0.5", "-o", out],
        "sparsify": cli + ["sparsify", model, "--sparsity", "0.5", "-o", out],
        "quantize": cli + ["quantize", model, "--calibration-samples", "16", "--no-measure", "-o", out],
        # the default timed mode: each candidate placement timed against the float model
        "quantize-timed": cli + ["quantize", model, "--calibration-samples", "16", "--report", out + ".json", "-o", out],
        "canonicalize": [sys.executable, "-c", _CANONICALIZE, model, out],
        **{floor: [sys.executable, "-c", script, model] for floor, script in _FLOORS.items()},
    }[name]


def _rss(pid: int) -> int:
    """Current resident set of ``pid`` in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def bytecode_env(cache: str) -> Dict[str, str]:
    """The environment for commands with graphprune's bytecode compiled into ``cache`` first."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(package, "graphprune")],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return env


def measure(argv: List[str], timeout: float, rss_limit: Optional[int] = None,
            env: Optional[Dict[str, str]] = None) -> Dict[str, object]:
    """Run one command; its wall time, CPU time, exit code and peak RSS (``wait4``'s ru_maxrss of
    that child, bytes).  With ``rss_limit`` (bytes) the child is killed once its RSS passes it
    (polled every 0.1 s): the machine is shared, and a command that would need more than this
    fails the goal anyway.  ``env``: the child's environment (default: ours)."""
    start = time.perf_counter()
    over = threading.Event()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.1):
                if _rss(proc.pid) > rss_limit:
                    over.set()
                    proc.kill()
                    return

        watcher = threading.Thread(target=watch, daemon=True) if rss_limit else None
        if watcher:
            watcher.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err.seek(0)
        lines = [line for line in err.read().strip().splitlines() if line.strip()]
    code = proc.returncode
    message = lines[-1][:200] if code and lines else ""
    if code == -9 and over.is_set():
        message = f"killed at the RSS limit ({rss_limit / GB:.1f} GB)"
    elif code == -9 and wall >= timeout:
        message = f"killed after {timeout:.0f} s"
    return {"exit": code, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss": usage.ru_maxrss * 1024, "error": message}


def _files_size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))


def _fmt_gb(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / GB:.2f} GB"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5,2.5", help="model sizes in GB, comma-separated")
    ap.add_argument("--kinds", default="mlp,conv", help="mlp, conv (comma-separated)")
    ap.add_argument("--nodes", type=int, default=20000, help="node count of the many-node model (0: none)")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per command")
    ap.add_argument("--dir", default="/tmp/graphprune-scale")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--reuse", action="store_true",
                    help="use a model already in --dir (from a --keep run) instead of generating it again "
                    "(a 6 GB model takes minutes to write); implies --keep")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--rss-limit", type=float, default=0.0,
                    help="kill a command whose RSS passes this multiple of the model's size (0: no limit)")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="run the commands in our environment as it is (PYTHONDONTWRITEBYTECODE: compiled at each run)")
    args = ap.parse_args(argv)
    args.keep = args.keep or args.reuse
    commands = [c for c in args.commands.split(",") if c]
    os.makedirs(args.dir, exist_ok=True)
    rng = np.random.default_rng(0)
    cases = [(kind, float(s)) for s in args.sizes.split(",") if s for kind in args.kinds.split(",") if kind]
    if args.nodes:
        cases.insert(0, ("nodes", float(args.nodes)))
    rows = []
    env = None if args.no_bytecode_cache else bytecode_env(os.path.join(args.dir, "pycache"))
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    print("| model | size | command | exit | wall (s) | CPU (s) | peak RSS | x size |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for kind, amount in cases:
        name = f"{kind}-{int(amount)}" if kind == "nodes" else f"{kind}-{amount:g}GB"
        path = os.path.join(args.dir, name + ".onnx")
        maker = {"mlp": make_mlp, "conv": make_conv, "nodes": make_many_nodes}[kind]
        if not (args.reuse and os.path.exists(path) and os.path.exists(path + ".data")):
            maker(path, int(amount) if kind == "nodes" else int(amount * GB), rng)
        size = _files_size(path)
        for command in commands:
            out = os.path.join(args.dir, f"{name}.{command}.onnx")
            limit = int(args.rss_limit * size) if args.rss_limit else None
            result = measure(_command(command, path, out), args.timeout, limit, env)
            for leftover in (out, out + ".data", out + ".json"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            ratio = result["peak_rss"] / size if result["peak_rss"] else None
            row = {"model": name, "size": size, "command": command, **result,
                   "rss_over_size": round(ratio, 2) if ratio else None}
            rows.append(row)
            print(f"| {name} | {_fmt_gb(size)} | {command} | {result['exit']} | {result['wall_s']} | {result['cpu_s']} | "
                  f"{_fmt_gb(result['peak_rss'])} | {f'{ratio:.2f}' if ratio else '?'} |"
                  + (f" {result['error']}" if result["error"] else ""), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
        if not args.keep:
            for p in (path, path + ".data"):
                os.unlink(p)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
