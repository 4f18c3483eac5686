"""What fine-tuning trains at a model's output: the logits behind a Softmax/Sigmoid head, and the teacher's targets in that form."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from graphprune.training.losses import LossSpec, sample_chunks

__all__ = ["probability_head", "teacher_targets", "top1_counter"]


def probability_head(model: onnx.ModelProto, output: str, rank: int):
    """(the tensor to train, "softmax" | "sigmoid" | None): the logits feeding a Softmax (last axis) or
    Sigmoid that produces ``output``, or ``output`` itself.  Identity nodes after the head (Paddle's
    ``save_infer_model/scale`` outputs) are looked through."""
    producers = {o: node for node in model.graph.node for o in node.output}
    name = output
    while name in producers and producers[name].op_type == "Identity" and producers[name].input:
        name = producers[name].input[0]
    for node in [producers[name]] if name in producers else []:
        if name in node.output and node.domain in ("", "ai.onnx") and node.input and node.input[0]:
            if node.op_type == "Sigmoid":
                return node.input[0], "sigmoid"
            if node.op_type == "Softmax":
                axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
                opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
                last = axis in (-1, rank - 1) if opset >= 13 else axis in (-1, rank - 1) or rank <= 2
                return (node.input[0], "softmax") if last else (output, None)
    return output, None


def teacher_targets(values: Optional[np.ndarray], spec: LossSpec, out: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """The teacher's probabilities in the form the loss reads: log-probabilities for a softmax head
    (logits up to a constant, which softmax ignores), logits for a sigmoid head distilled with MSE.
    Computed a chunk of samples at a time (float64 copies of all outputs would be 2x their size each);
    ``out``: the float32 array to write into, which may be ``values`` itself (no second copy)."""
    if values is None or spec.head is None or (spec.head == "sigmoid" and spec.distill_loss != "mse"):
        return values
    out = np.empty(values.shape, np.float32) if out is None else out
    for part in sample_chunks(values):
        p = np.clip(values[part].astype(np.float64), 1e-12, 1 - 1e-12)
        out[part] = np.log(p) if spec.head == "softmax" else np.log(p) - np.log1p(-p)
    return out


def top1_counter(reference: np.ndarray):
    """(outputs, indices) -> how many samples' argmax matches ``reference`` (averaged over tokens)."""

    def count(out: np.ndarray, idx: np.ndarray) -> float:
        hits = out.argmax(-1) == reference[idx]
        return float(hits.reshape(len(idx), -1).mean(axis=1).sum())

    return count
