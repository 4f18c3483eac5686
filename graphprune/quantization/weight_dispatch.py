"""``--kernel dispatch``: int4 MatMul weights stored once, read by ``MatMulNBits`` for one row, the int8 kernel for more.

On the benchmarks' x86 CPU neither int4 kernel wins at every row count (``kernel_choice``):
``MatMulNBits`` (4-bit B, int8 activations per block) is the fastest at one row (decoding is
bound by the weight bytes it reads: half those of int8), but no faster than fp32 at 128 (a
prompt); ``DynamicQuantizeMatMul`` on int8 weights (the int8 kernel's form,
``weight_int8_kernel``) is 4-6x fp32 at 128 rows but reads twice the bytes at one.  This form has
both: the graph becomes one ``If`` on "the input holds one row" whose then-branch is the model with
``MatMulNBits`` and whose else-branch is the model with ``DynamicQuantizeMatMul``; the weights
are stored once, in the main graph, and both kernels' inputs are derived from them by nodes in the
main graph that ONNX Runtime constant-folds when it creates the session.

Stored per weight (file as the int8 kernel's form, 0.53 bytes a weight): the int4 values q in
[-8, 7] of the even and of the odd rows of each block, two INT4 tensors [K / block, block / 2, N];
the integer block multipliers r (int8 [K / block, 1, N]) and one float scale per column u
(``weight_int8_kernel.int4_with_multipliers``: weight = q * r * u).  Derived at load:

- int8 [K, N] for ``DynamicQuantizeMatMul``: Cast to int8, times r (each half), Concat of the
  halves along N and a Reshape that interleaves them back into rows;
- ``MatMulNBits``' B, uint8 [N, K / block, block / 2] whose bytes are (q_even + 8) | (q_odd + 8) << 4:
  16 q_odd + q_even - 120 in int8 (wrapping: the same bits modulo 256), Cast to uint8, Transpose;
  its scales [N, K / block]: Cast(r) * u, transposed.

Why not simpler (measured with onnxruntime 1.32, docs/benchmarks.md): a ``DequantizeLinear ->
MatMul`` in the then-branch (which ONNX Runtime fuses into ``MatMulNBits`` itself) fails session
creation when the weight is an outer-scope initializer (``TransposeDQWeightsForMatMulNBits``:
"Missing required weight"); constant folding inside the branches works too but holds more memory
than folding in the main graph; an ``If`` per MatMul would run 169 of them per token on the 0.5B
Llama.  ONNX Runtime keeps every folded intermediate until the session is built, so the
derivations are short chains of narrow types: about 7 bytes a weight at load against 3 for the
int8 kernel's form alone.

Which rows count: the first integer graph input that is no initializer (token ids: all its dims)
or else the first such input (all dims but the last, the features).  Weights this form cannot
hold (K not in whole blocks) take ``MatMulNBits`` in both branches, as with ``--kernel int8``.  Refused by the pass (``UserError``): int8 weights, GPTQ
(float block scales), a runtime without ``MatMulNBits``, ``DynamicQuantizeMatMul`` or INT4 casts,
a model that cannot be raised to opset 21, a graph without inputs.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphprune.errors import UserError
from graphprune.quantization import weight_int8_kernel as ik

__all__ = ["rewrite", "assemble", "derivation_nodes", "SHARED_CONSTANTS"]

# Constants every derivation reads, created once per model.
SHARED_CONSTANTS = {
    "dispatch_sixteen": np.array(16, np.int8),  # q_odd * 16: the high nibble
    "dispatch_offset": np.array(-120, np.int8),  # + 8 + 8 * 16 = 136 = -120 modulo 256
    "dispatch_one_row": np.array(1, np.int64),
}
_INTEGER_INPUTS = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
                   TensorProto.UINT64, TensorProto.UINT32, TensorProto.UINT16, TensorProto.UINT8}


def rewrite(rewriter, target, w: np.ndarray, awq) -> None:
    """Store one int4 MatMul/Gemm weight (``target``, float [K, N] ``w``) through ``rewriter`` (a
    ``weight_nodes.Rewriter`` with kernel "dispatch"): its tensors, the derivations (main graph,
    ``rewriter.hoisted``), each reader as ``DynamicQuantizeMatMul`` (``rewriter.instead``: the
    else-branch) and as ``MatMulNBits`` (``rewriter.instead_then``).  ``awq``: AWQ's input scale or None."""
    k, n = w.shape
    b, name = rewriter.block_size, target.name
    q, mult, unit = ik.int4_with_multipliers(w, b)  # q [K / b, b, N]
    del w
    even = rewriter._add_int4(f"{name}_q4_even", np.ascontiguousarray(q[:, 0::2]))
    odd = rewriter._add_int4(f"{name}_q4_odd", np.ascontiguousarray(q[:, 1::2]))
    del q
    rewriter.needs.add("opset21")
    for constant, value in SHARED_CONSTANTS.items():
        if constant not in rewriter._shared:
            rewriter._shared.add(rewriter._add(constant, value))
    mult = rewriter._add(f"{name}_q4_multipliers", mult.reshape(k // b, 1, n))
    scale = rewriter._add(f"{name}_scale", unit)
    shapes = (rewriter._add(f"{name}_q4_shape", np.array([k, n], np.int64)),
              rewriter._add(f"{name}_q4_scales_shape", np.array([n, k // b], np.int64)))
    int8, packed, scales = f"{name}_int8", f"{name}_Q4", f"{name}_scales"
    rewriter.hoisted.extend(derivation_nodes(name, (even, odd, mult, scale) + shapes, (int8, packed, scales)))
    activation = rewriter._awq_input(target, awq, np.float32) if awq is not None else None
    ik.read_by_dynamic_matmul(rewriter, target, int8, scale, activation, "_Q4I8")
    attrs = dict(K=k, N=n, bits=4, block_size=b)
    if rewriter.accuracy_level:
        attrs["accuracy_level"] = rewriter.accuracy_level
    for i, _ in target.uses:
        node = rewriter.model.graph.node[i]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        out = f"{node.output[0]}_nobias" if has_bias else node.output[0]
        base = node.name or name
        nodes = [helper.make_node("MatMulNBits", [activation or node.input[0], packed, scales], [out],
                                  name=base + "_Q4", domain="com.microsoft", **attrs)]
        if has_bias:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=base + "_bias"))
        rewriter.instead_then[i] = nodes


def derivation_nodes(name: str, inputs: Sequence[str], outputs: Sequence[str]) -> List[onnx.NodeProto]:
    """The main-graph nodes deriving (int8 [K, N], packed B, B's scales) from (q_even, q_odd, r, u,
    shape [K, N], scales' shape [N, K / block]); all constant, folded by ONNX Runtime at load."""
    even, odd, mult, unit, shape, scales_shape = inputs
    int8, packed, scales = outputs
    t = f"{name}_dispatch"
    sixteen, offset, _ = SHARED_CONSTANTS
    node = helper.make_node
    return [
        node("Cast", [even], [f"{t}_even"], name=f"{t}_even", to=TensorProto.INT8),
        node("Cast", [odd], [f"{t}_odd"], name=f"{t}_odd", to=TensorProto.INT8),
        # int8 weight: q * r per half, the halves side by side ([K / b, b / 2, 2N]) are [K, N] in row order
        node("Mul", [f"{t}_even", mult], [f"{t}_even_r"], name=f"{t}_even_r"),
        node("Mul", [f"{t}_odd", mult], [f"{t}_odd_r"], name=f"{t}_odd_r"),
        node("Concat", [f"{t}_even_r", f"{t}_odd_r"], [f"{t}_rows"], name=f"{t}_rows", axis=2),
        node("Reshape", [f"{t}_rows", shape], [int8], name=f"{t}_int8"),
        # MatMulNBits' bytes: (q_odd + 8) * 16 + q_even + 8, computed modulo 256 in int8
        node("Mul", [f"{t}_odd", sixteen], [f"{t}_high"], name=f"{t}_high"),
        node("Add", [f"{t}_high", f"{t}_even"], [f"{t}_sum"], name=f"{t}_sum"),
        node("Add", [f"{t}_sum", offset], [f"{t}_bytes"], name=f"{t}_bytes"),
        node("Cast", [f"{t}_bytes"], [f"{t}_uint8"], name=f"{t}_uint8", to=TensorProto.UINT8),
        node("Transpose", [f"{t}_uint8"], [packed], name=f"{t}_packed", perm=[2, 0, 1]),
        node("Cast", [mult], [f"{t}_mult_float"], name=f"{t}_mult_float", to=TensorProto.FLOAT),
        node("Mul", [f"{t}_mult_float", unit], [f"{t}_block_scales"], name=f"{t}_block_scales"),
        node("Transpose", [f"{t}_block_scales"], [f"{t}_scales_n"], name=f"{t}_scales_n", perm=[2, 0, 1]),
        node("Reshape", [f"{t}_scales_n", scales_shape], [scales], name=f"{t}_scales"),
    ]


def assemble(model: onnx.ModelProto, hoisted: List[onnx.NodeProto], then_nodes: List[onnx.NodeProto],
             else_nodes: List[onnx.NodeProto]) -> None:
    """Make ``model``'s graph (whose nodes are replaced) the derivations, the row count test and
    one ``If``: then (one row) ``then_nodes``, else ``else_nodes``; the graph outputs come out of
    the ``If``.  Inside each branch a graph output is renamed (suffix ``_then`` / ``_else``) and
    the graph's value_info moves into both branches."""
    graph = model.graph
    outputs = [o.name for o in graph.output]
    value_info = list(graph.value_info)
    rows = _row_count_nodes(graph)
    branches = {}
    for suffix, nodes in (("then", then_nodes), ("else", else_nodes)):
        renamed = {o: f"{o}_{suffix}" for o in outputs}
        body = []
        produced = {out for n in nodes for out in n.output}
        for n in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.input[:] = [renamed.get(i, i) for i in n.input]
            copy.output[:] = [renamed.get(o, o) for o in n.output]
            body.append(copy)
        for o in outputs:  # an output no node makes (a graph input, an initializer) passes through
            if o not in produced:
                body.append(helper.make_node("Identity", [o], [renamed[o]], name=f"{o}_{suffix}_pass"))
        outs = []
        for o in graph.output:
            info = onnx.ValueInfoProto()
            info.CopyFrom(o)
            info.name = renamed[o.name]
            outs.append(info)
        branch = helper.make_graph(body, f"{graph.name or 'model'}_{suffix}", [], outs)
        branch.value_info.extend(v for v in value_info if v.name not in renamed)
        branches[suffix] = branch
    del graph.node[:]
    del graph.value_info[:]
    graph.node.extend(hoisted + rows)
    graph.node.append(helper.make_node("If", ["dispatch_one_row_input"], outputs, name="dispatch_by_rows",
                                       then_branch=branches["then"], else_branch=branches["else"]))


def _row_count_nodes(graph: onnx.GraphProto) -> List[onnx.NodeProto]:
    """Nodes computing the bool "dispatch_one_row_input": the rows the MatMuls will see are 1."""
    constants = {t.name for t in graph.initializer}  # before IR 4 the inputs list the initializers too
    fed = [i for i in graph.input if i.name not in constants]
    if not fed:
        raise UserError("--kernel dispatch: the model has no input to count rows from")
    ids = [i for i in fed if i.type.tensor_type.elem_type in _INTEGER_INPUTS]
    source = (ids or fed)[0]
    attrs: Dict[str, int] = {} if ids else {"end": -1}  # token ids: every dim; features: all but the last
    return [helper.make_node("Shape", [source.name], ["dispatch_input_shape"], name="dispatch_input_shape", **attrs),
            helper.make_node("ReduceProd", ["dispatch_input_shape"], ["dispatch_rows"], name="dispatch_rows",
                             keepdims=0),
            helper.make_node("Equal", ["dispatch_rows", "dispatch_one_row"], ["dispatch_one_row_input"],
                             name="dispatch_one_row")]
