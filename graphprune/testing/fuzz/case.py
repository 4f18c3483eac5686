"""A fuzz case: files to write into an empty folder, the argument list, and what a correct CLI does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

FAMILIES = ("model_bytes", "structure", "npz", "recipe", "args", "output")

# Commands a model-level defect is tried against (each case picks one; quantize without timing).
MODEL_COMMANDS: Dict[str, List[str]] = {
    "inspect": ["inspect", "{d}/model.onnx"],
    "prune": ["prune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--ratio", "0.5"],
    "sparsify": ["sparsify", "{d}/model.onnx", "-o", "{d}/out.onnx", "--sparsity", "0.5"],
    "quantize": ["quantize", "{d}/model.onnx", "-o", "{d}/out.onnx", "--no-measure", "--calibration-samples", "4",
                 "--input-shape", "x=1x3x8x8"],
    "run": ["run", "{d}/model.onnx", "-o", "{d}/out.onnx", "--pass", "prune:ratio=0.25"],
    "validate": ["validate", "{d}/model.onnx", "{d}/model.onnx", "--samples", "2", "--runs", "1",
                 "--input-shape", "x=1x3x8x8"],
    "finetune": ["finetune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--data", "{d}/data.npz",
                 "--teacher", "{d}/model.onnx", "--epochs", "1", "--val-split", "0"],
}


@dataclass
class FuzzCase:
    """One malformed input: files to write, the argument list, what a correct CLI does."""

    id: str
    family: str
    argv: List[str]
    files: Dict[str, bytes] = field(default_factory=dict)
    expect: str = "any"  # "error" | "ok" | "any"
    isolate: bool = False  # run in a subprocess (once crashed the process)
    fifos: Sequence[str] = ()  # names to create as FIFOs
    dirs: Sequence[str] = ()  # names to create as folders

    def materialize(self, folder: str) -> List[str]:
        """Write the files into ``folder``; return the argument list with ``{d}`` filled in."""
        import os

        for name in self.dirs:
            os.makedirs(os.path.join(folder, name), exist_ok=True)
        for name, content in self.files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(content)
        for name in self.fifos:
            os.mkfifo(os.path.join(folder, name))
        return [a.replace("{d}", folder) for a in self.argv]


# ---------------------------------------------------------------------------- base models
