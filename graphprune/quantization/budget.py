"""Mixed precision under an error budget: rank quantized layers by the error they add, keep the worst in float."""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import helper

from graphprune.ir import clone, consumer_map
from graphprune.weights_on_disk import session
from graphprune.validate import compare_outputs

__all__ = ["layer_sensitivity", "fit_error_budget"]


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    copy = clone(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


# Ops ORT's quantizer folds into the op before them (the producer then writes their output).
_FOLDED = ("Relu", "Clip")


def _present_in(quantized: onnx.ModelProto, float_model: onnx.ModelProto, layers: Mapping[str, Tuple[str, str]]):
    """``layers`` with each tensor the int8 model no longer has (a Conv output whose Relu the
    quantizer folded) replaced by the folded op's output, which holds the same values after the
    activation in both models; "" when there is none (that side then counts as error 0)."""
    have = {o for n in quantized.graph.node for o in n.output} | {vi.name for vi in quantized.graph.input}
    users = consumer_map(float_model.graph)

    def present(name: str) -> str:
        while name and name not in have:
            after = users.get(name, [])
            if len(after) != 1 or after[0].op_type not in _FOLDED:
                return ""
            name = after[0].output[0]
        return name

    return {layer: (present(inp), present(out)) for layer, (inp, out) in layers.items()}


def layer_sensitivity(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    layers: Mapping[str, Tuple[str, str]],
    feeds: List[Dict[str, np.ndarray]],
    source_dir: Optional[str] = None,
) -> Dict[str, float]:
    """Layer name -> relative L2 error it adds: error of its output minus error of its input.

    Both models keep the float tensors around a quantized layer under their original names (the
    QDQ model computes the layer in float between DequantizeLinear and QuantizeLinear), so one run
    of each with those tensors exposed as outputs shows where the error grows.

    Args:
        layers: name -> (input tensor, output tensor) of each quantized compute layer.
        feeds: a few samples (errors are summed over them).
        source_dir: the folder of weights left on disk (the sessions map them from there).
    """
    layers = _present_in(quantized, float_model, layers)
    names = sorted({t for pair in layers.values() for t in pair if t})
    graph_inputs = {vi.name for vi in float_model.graph.input}
    probe = [n for n in names if n not in graph_inputs]
    ref_sess = session(_with_outputs(float_model, probe), source_dir)
    q_sess = session(_with_outputs(quantized, probe), source_dir)
    ref_vals: Dict[str, List[np.ndarray]] = {n: [] for n in probe}
    q_vals: Dict[str, List[np.ndarray]] = {n: [] for n in probe}
    for feed in feeds:
        for store, sess in ((ref_vals, ref_sess), (q_vals, q_sess)):
            values = sess.run(probe, feed)
            for n, v in zip(probe, values):
                store[n].append(np.ravel(v))
    err = {n: compare_outputs(n, np.concatenate(ref_vals[n]), np.concatenate(q_vals[n])).rel_l2 for n in probe}
    return {
        layer: max(err.get(out, 0.0) - err.get(inp, 0.0), 0.0) for layer, (inp, out) in layers.items()
    }


def fit_error_budget(
    ranked: Sequence[str],
    error_of: Callable[[Set[str]], float],
    max_error: float,
) -> Tuple[Set[str], float, int]:
    """The fewest most-sensitive layers to keep float so that the error is within ``max_error``.

    Args:
        ranked: layers, most error-adding first.
        error_of: measured output error when the given layers stay float (builds and runs a model).
        max_error: the budget (relative L2 of the outputs).

    Returns (layers kept float, the error measured with them, evaluations made).  The error
    shrinks roughly monotonically as more layers stay float, so the count is found by bisection;
    when even keeping every layer float misses the budget, the
    returned error says so (the caller then keeps the model float).
    """
    evaluations = 0
    low, high = 0, len(ranked)  # invariant: keeping `high` float fits; `low - 1` does not
    cache: Dict[int, float] = {}

    def error_with(k: int) -> float:
        nonlocal evaluations
        if k not in cache:
            evaluations += 1
            cache[k] = error_of(set(ranked[:k]))
        return cache[k]

    if error_with(0) <= max_error:
        return set(), cache[0], evaluations
    low = 1
    while low < high:
        mid = (low + high) // 2
        if error_with(mid) <= max_error:
            high = mid
        else:
            low = mid + 1
    return set(ranked[:high]), error_with(high), evaluations
