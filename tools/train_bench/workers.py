"""Worker processes: one framework on one model, driven over a JSON-lines channel (stdin / stdout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from train_bench.models import ROOT, TARGETS
from train_bench.report import profile_summary

WARMUP_STEPS = 3
# The entry point a worker process runs (``--worker KIND``).
ENTRY = os.path.join(ROOT, "tools", "bench_train.py")
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

        from graphprune.autodiff import step as step_module
        from graphprune.autodiff.optimizers import OptimizerConfig
        from graphprune.autodiff.session import StepSession
        from graphprune.autodiff.step import build_training_step

        if meta.get("ours_without_rewrites"):  # --ours-without-rewrites: the step as differentiated, for A/B
            step_module.gather_before_positionwise = step_module.linear_layers_as_gemm = lambda *args: 0
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
        return profile_summary(path, forward_ops)


class _Torch:
    """The same architecture as a torch module, with the ONNX weights."""

    def __init__(self, workdir: str, meta: dict, threads: int, profile: str = ""):
        import numpy as np
        import onnx
        import torch
        from onnx import numpy_helper

        from train_bench.twins import load_twin, torch_twin

        torch.set_num_threads(threads)
        model = onnx.load(os.path.join(workdir, "model.onnx"))
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.net = torch_twin(meta)
        load_twin(self.net, weights, meta["trainable"])
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
        if kind == "ortt":  # the side venv's python: no graphprune, no torch
            from train_bench.ortt import OrtTraining as runner_class
        else:
            runner_class = {"ours": _Ours, "torch": _Torch}[kind]
        runner = runner_class(workdir, meta, threads, profile)
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


class Worker:
    """A worker process and its JSON-lines channel."""

    def __init__(self, kind: str, python: str, workdir: str, threads: int, profile_prefix: str = ""):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
        self.kind = kind
        self.process = subprocess.Popen(
            [python, ENTRY, "--worker", kind, "--workdir", workdir, "--worker-threads",
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
