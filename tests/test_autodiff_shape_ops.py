"""Gradient rules of the shape and selection ops against finite differences, onnxruntime and torch autograd.

Every case runs with static input shapes and, from opset 13, with symbolic dims (the rules then build
sizes, pads and indices from Shape nodes); forms of opsets 11-12 are checked in onnxruntime against
the adjoint of the forward map; hypothesis draws random Slice, Gather and Concat/Split/Tile cases.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from graphprune.autodiff.gradient import build_gradients
from graphprune.errors import UserError
from tests.gradcheck import check_gradients, make_model, torch_gradients

RNG = np.random.default_rng(0)
BIG = 2**63 - 1


def _rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _ints(values):
    return np.asarray(values, dtype=np.int64)


def _node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


@dataclasses.dataclass
class Case:
    """A small graph: float/integer graph inputs (``feeds``), constants (``inits``), a torch twin."""

    id: str
    nodes: List
    feeds: Dict[str, np.ndarray]
    torch_fn: Optional[Callable]
    inits: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    outputs: List[str] = dataclasses.field(default_factory=lambda: ["y"])
    opset: int = 17
    ranks: Dict[str, int] = dataclasses.field(default_factory=dict)  # for outputs shape inference misses
    static_last: Tuple[str, ...] = ()  # inputs whose last dim stays static in the symbolic variant

    def model(self, dynamic: bool):
        def info(name, value):
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            dims = [f"{name}_{i}" for i in range(value.ndim)] if dynamic else list(value.shape)
            if dynamic and name in self.static_last:
                dims[-1] = value.shape[-1]
            return helper.make_tensor_value_info(name, elem, dims)

        inits = [numpy_helper.from_array(v, k) for k, v in self.inits.items()]
        outputs = [helper.make_tensor_value_info(o, T.FLOAT, None) for o in self.outputs]
        model = make_model(self.nodes, [info(k, v) for k, v in self.feeds.items()], outputs, inits, opset=self.opset)
        for name, rank in self.ranks.items():
            dims = [f"{name}_{i}" for i in range(rank)]
            model.graph.value_info.append(helper.make_tensor_value_info(name, T.FLOAT, dims))
        return model

    @property
    def wrt(self):
        return [k for k, v in self.feeds.items() if v.dtype == np.float32]


def _take(torch, x, idx, axis):
    """numpy.take in torch (negative indices wrap)."""
    axis = axis % x.dim()
    picked = torch.index_select(x, axis, (idx % x.shape[axis]).reshape(-1))
    return picked.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _torch_slice(torch, x, starts, ends, axes, steps):
    """ONNX Slice by index_select with python's slicing (same clamping rules as ONNX)."""
    for s, e, a, st_ in zip(starts, ends, axes, steps):
        picks = np.arange(x.shape[a])[slice(s, e, st_)].copy()
        x = torch.index_select(x, a, torch.tensor(picks, dtype=torch.int64))
    return x


def _slice_fn(starts, ends, axes, steps):
    return lambda x: _torch_slice(torch_mod(), x, starts, ends, [a % x.dim() for a in axes], steps)


X = _rand(2, 3, 4)
IDX = _ints([[1, -1], [0, 1], [1, 1]])  # duplicates and a negative index


def _cases() -> List[Case]:
    cases = [
        Case("reshape-0-minus1", [_node("Reshape", ["x", "s"])], {"x": X}, lambda x: x.reshape(2, 12),
             {"s": _ints([0, -1])}),
        Case("reshape-allowzero", [_node("Reshape", ["x", "s"], allowzero=1)], {"x": X}, lambda x: x.reshape(4, 6),
             {"s": _ints([4, 6])}),
        Case("flatten-1", [_node("Flatten", ["x"], axis=1)], {"x": X}, lambda x: x.reshape(2, 12)),
        Case("flatten-neg", [_node("Flatten", ["x"], axis=-1)], {"x": X}, lambda x: x.reshape(6, 4)),
        Case("flatten-0", [_node("Flatten", ["x"], axis=0)], {"x": X}, lambda x: x.reshape(1, 24)),
        Case("transpose-perm", [_node("Transpose", ["x"], perm=[2, 0, 1])], {"x": X}, lambda x: x.permute(2, 0, 1)),
        Case("transpose-default", [_node("Transpose", ["x"])], {"x": X}, lambda x: x.permute(2, 1, 0)),
        Case("squeeze-input", [_node("Squeeze", ["x", "a"])], {"x": _rand(2, 1, 4, 1)},
             lambda x: x.squeeze(3).squeeze(1), {"a": _ints([1, -1])}),
        Case("unsqueeze-input", [_node("Unsqueeze", ["x", "a"])], {"x": X}, lambda x: x[None, :, :, :, None],
             {"a": _ints([0, -1])}),
        Case("split-input", [_node("Split", ["x", "s"], ["y", "z", "w"], axis=-1)], {"x": X},
             lambda x: torch_split(x, [2, 1, 1], -1), {"s": _ints([2, 1, 1])}, outputs=["y", "z", "w"]),
        Case("split-unused-output", [_node("Split", ["x", "s"], ["y", "unused"], axis=1)], {"x": X},
             lambda x: torch_split(x, [1, 2], 1)[:1], {"s": _ints([1, 2])}),
        Case("split-num-outputs", [_node("Split", ["x"], ["y", "z", "w"], axis=1, num_outputs=3)], {"x": _rand(2, 7)},
             lambda x: torch_split(x, [3, 3, 1], 1), outputs=["y", "z", "w"], opset=18),
        Case("concat", [_node("Concat", ["x", "c", "v"], axis=1)], {"x": X, "v": _rand(2, 2, 4)},
             lambda x, v, c: torch_cat([x, c, v], 1), {"c": _rand(2, 1, 4)}),
        Case("concat-opset11", [_node("Concat", ["x", "c", "v"], axis=-2)], {"x": X, "v": _rand(2, 2, 4)},
             lambda x, v, c: torch_cat([x, c, v], 1), {"c": _rand(2, 1, 4)}, opset=11),
        Case("squeeze-attr-opset11", [_node("Squeeze", ["x"], axes=[1])], {"x": _rand(2, 1, 4)},
             lambda x: x.squeeze(1), opset=11),
        Case("unsqueeze-attr-opset12", [_node("Unsqueeze", ["x"], axes=[1])], {"x": X}, lambda x: x[:, None],
             opset=12),
        Case("split-attr-opset11", [_node("Split", ["x"], ["y", "z"], axis=2, split=[1, 3])], {"x": X},
             lambda x: torch_split(x, [1, 3], 2), outputs=["y", "z"], opset=11),
        Case("tile-opset11", [_node("Tile", ["x", "r"])], {"x": X}, lambda x: x.repeat(2, 1, 3),
             {"r": _ints([2, 1, 3])}, opset=11),
        Case("concat-neg", [_node("Concat", ["x", "v"], axis=-1)], {"x": X, "v": _rand(2, 3, 1)},
             lambda x, v: torch_cat([x, v], -1)),
        Case("expand", [_node("Expand", ["x", "s"])], {"x": _rand(3, 1)}, lambda x: x.expand(2, 3, 4),
             {"s": _ints([2, 1, 4])}),
        Case("tile", [_node("Tile", ["x", "r"])], {"x": X}, lambda x: x.repeat(2, 1, 3), {"r": _ints([2, 1, 3])}),
        Case("tile-ones", [_node("Tile", ["x", "r"])], {"x": X}, lambda x: x, {"r": _ints([1, 1, 1])}),
        Case("tile-runtime", [_node("Tile", ["x", "r"])], {"x": X, "r": _ints([1, 2, 2])},
             lambda x, r: x.repeat(1, 2, 2)),
    ]
    slices = [  # starts, ends, axes, steps
        ([1, -3], [BIG, 3], [1, 2], [1, 1]),
        ([0], [-1], [-1], None),
        ([-100], [100], [0], [1]),
        ([2, 0], [0, BIG], [2, 1], [1, 2]),  # an empty slice and a strided one
        ([BIG, -1], [-BIG, 0], [1, 2], [-1, -2]),
        ([3], [0], [2], [-2]),
    ]
    for k, (s, e, a, st_) in enumerate(slices):
        inputs = ["x", "s", "e", "a"] + (["t"] if st_ else [])
        inits = {"s": _ints(s), "e": _ints(e), "a": _ints(a), **({"t": _ints(st_)} if st_ else {})}
        steps = st_ or [1] * len(s)
        cases.append(Case(f"slice-{k}", [_node("Slice", inputs)], {"x": X}, _slice_fn(s, e, a, steps), inits))
    cases += [
        # ends from Shape arithmetic, as exporters write x[:, 1:x.shape[1]-1]
        Case("slice-runtime-ends", [_node("Shape", ["x"], ["sh"]), _node("Gather", ["sh", "one"], ["d"]),
                                    _node("Sub", ["d", "one"], ["e"]), _node("Slice", ["x", "one", "e", "one"])],
             {"x": _rand(2, 5, 3)}, lambda x: x[:, 1:4], {"one": _ints([1])}),
        Case("slice-runtime-starts-steps", [_node("Shape", ["x"], ["sh"]), _node("Gather", ["sh", "ax"], ["d"]),
                                            _node("Neg", ["d"], ["s"]), _node("Slice", ["x", "s", "e", "ax", "t"])],
             {"x": _rand(2, 5, 3)}, lambda x: x[:, 0:4:2], {"ax": _ints([1]), "e": _ints([4]), "t": _ints([2])}),
        Case("slice-runtime-all", [_node("Slice", ["x", "s", "e", "a", "t"])],
             {"x": X, "s": _ints([-1, 0]), "e": _ints([-BIG, 2]), "a": _ints([2, -3]), "t": _ints([-2, 1])},
             _slice_fn([-1, 0], [-BIG, 2], [2, -3], [-2, 1])),
        Case("slice-int32-bounds", [_node("Slice", ["x", "s", "e"])], {"x": X}, lambda x: x[1:2, 1:],
             {"s": np.array([1, 1], np.int32), "e": np.array([2, 99], np.int32)}),
        Case("gather-axis0", [_node("Gather", ["x", "i"])], {"x": X}, lambda x, i: _take(torch_mod(), x, i, 0),
             {"i": IDX}),
        Case("gather-axis0-opset13", [_node("Gather", ["x", "i"])], {"x": X},
             lambda x, i: _take(torch_mod(), x, i, 0), {"i": IDX}, opset=13),
        Case("gather-axis1-scalar", [_node("Gather", ["x", "i"], axis=1)], {"x": X},
             lambda x, i: x[:, -1], {"i": np.array(-1, np.int64)}),
        Case("gather-axis-neg", [_node("Gather", ["x", "i"], axis=-1)], {"x": X},
             lambda x, i: _take(torch_mod(), x, i, 2), {"i": _ints([[3, -1, 0], [3, 3, 1]])}),
        Case("gather-runtime-indices", [_node("Gather", ["x", "i"], axis=1)], {"x": X, "i": _ints([2, -1, 2])},
             lambda x, i: _take(torch_mod(), x, i, 1)),
        Case("gather-wide-axis", [_node("Gather", ["x", "i"], axis=1)], {"x": _rand(2, 300, 2)},
             lambda x, i: _take(torch_mod(), x, i, 1), {"i": np.array([[5, -1], [5, 299]], np.int32)}),
        Case("gather-wide-axis-opset13", [_node("Gather", ["x", "i"], axis=1)], {"x": _rand(2, 300, 2)},
             lambda x, i: _take(torch_mod(), x, i, 1), {"i": _ints([5, -1, 5])}, opset=13),
        Case("gather-opset11", [_node("Gather", ["x", "i"], axis=1)], {"x": X},
             lambda x, i: _take(torch_mod(), x, i, 1), {"i": IDX}, opset=11),
        Case("slice-opset11", [_node("Slice", ["x", "s", "e", "a", "t"])], {"x": X},
             _slice_fn([1, -1], [BIG, -BIG], [1, 2], [1, -2]),
             {"s": _ints([1, -1]), "e": _ints([BIG, -BIG]), "a": _ints([1, 2]), "t": _ints([1, -2])}, opset=11),
        Case("slice-unit-opset11", [_node("Slice", ["x", "s", "e"])], {"x": X}, lambda x: x[1:, :-1],
             {"s": _ints([1, 0]), "e": _ints([BIG, -1])}, opset=11),
        Case("gather-embedding", [_node("Gather", ["w", "i"])], {"w": _rand(300, 2), "i": _ints([[3, 299], [3, -1]])},
             lambda w, i: w[i % 300]),
        Case("gather-embedding-opset13", [_node("Gather", ["w", "i"])],
             {"w": _rand(300, 2), "i": _ints([[3, -1], [3, 0]])}, lambda w, i: w[i % 300], opset=13),
        Case("gather-elements-0", [_node("GatherElements", ["x", "i"])], {"x": _rand(3, 4)},
             lambda x, i: torch_mod().gather(x, 0, i % 3), {"i": _ints([[0, 2, 2, -1], [0, 0, 1, 2]])}),
        Case("gather-elements-1", [_node("GatherElements", ["x", "i"], axis=1)], {"x": _rand(3, 4)},
             lambda x, i: torch_mod().gather(x, 1, i % 4), {"i": _ints([[0, 0, 3], [1, -1, 1], [2, 2, 2]])}),
        Case("gather-nd-1", [_node("GatherND", ["x", "i"])], {"x": X}, lambda x, i: x[i[..., 0]],
             {"i": _ints([[[1], [0]], [[1], [1]]])}),
        Case("gather-nd-2", [_node("GatherND", ["x", "i"])], {"x": X}, lambda x, i: x[i[..., 0], i[..., 1]],
             {"i": _ints([[1, 2], [0, -1], [1, 2]])}),
        Case("gather-nd-runtime", [_node("GatherND", ["x", "i"])], {"x": X, "i": _ints([[[1, -2, 3]], [[0, 1, 0]]])},
             lambda x, i: x[i[..., 0], i[..., 1], i[..., 2]], static_last=("i",)),
        Case("gather-nd-opset13", [_node("GatherND", ["x", "i"])], {"x": X}, lambda x, i: x[i[..., 0], i[..., 1]],
             {"i": _ints([[1, 2], [0, -1], [1, 2]])}, opset=13),
    ]
    einsums = [  # equation, operand shapes, output rank where onnx's inference gives none
        ("bhqd,bhkd->bhqk", [(2, 2, 3, 4), (2, 2, 5, 4)], None),
        ("ij,jk", [(3, 4), (4, 2)], None),
        ("i,j->ij", [(3,), (4,)], None),
        ("bi,bi->b", [(2, 3), (2, 3)], None),
        ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)], 3),
        ("...i,i", [(2, 3, 4), (4,)], 2),
        ("ij->ji", [(3, 4)], None),
        ("ijk->k", [(2, 3, 4)], None),
        ("ij,j->", [(3, 4), (4,)], None),
    ]
    for equation, shapes, rank in einsums:
        feeds = {f"x{k}": _rand(*shape) for k, shape in enumerate(shapes)}
        cases.append(Case(f"einsum-{equation}", [_node("Einsum", list(feeds), equation=equation)], feeds,
                          lambda equation=equation, **xs: torch_mod().einsum(equation, *xs.values()),
                          ranks={"y": rank} if rank else {}))
    return cases


def torch_mod():
    import torch

    return torch


def torch_split(x, sizes, dim):
    return tuple(torch_mod().split(x, sizes, dim))


def torch_cat(parts, dim):
    return torch_mod().cat(parts, dim)


CASES = _cases()


# Symbolic dims only from opset 13: the harness's own loss (a broadcast Mul) reduces with opset-13 nodes.
VARIANTS = [(c, dynamic) for c in CASES for dynamic in (False, True) if c.opset >= 13 or not dynamic]


@pytest.mark.parametrize("case,dynamic", VARIANTS, ids=[f"{c.id}-{'symbolic' if d else 'static'}" for c, d in VARIANTS])
def test_finite_differences(case, dynamic):
    check_gradients(case.model(dynamic), case.feeds, case.wrt)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_against_torch(case):
    pytest.importorskip("torch")
    ours = check_gradients(case.model(False), case.feeds, case.wrt, run_ort=False)
    wanted = inspect.signature(case.torch_fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in wanted.values())
    named = {k: v for k, v in {**case.feeds, **case.inits}.items() if k in wanted or (takes_all and k in case.feeds)}
    theirs = torch_gradients(case.torch_fn, named, case.wrt)
    for name in case.wrt:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-10, atol=1e-12, err_msg=name)


def _grad_ops(case: Case, dynamic: bool = False) -> List[str]:
    model = case.model(dynamic)
    return [n.op_type for n in build_gradients(model, "y", case.wrt).nodes]


def test_static_shapes_give_single_kernels():
    by_id = {c.id: c for c in CASES}
    assert _grad_ops(by_id["slice-0"]) == ["Shape", "Expand", "Pad"]  # seed Expand, then one Pad
    assert _grad_ops(by_id["concat"])[-1] == "Split" and "Shape" not in _grad_ops(by_id["concat"])[2:]
    assert _grad_ops(by_id["transpose-perm"])[-1] == "Transpose"
    assert _grad_ops(by_id["gather-axis0"])[-2:] == ["MatMul", "Reshape"]  # a small axis: one-hot
    for case in ("gather-embedding", "gather-nd-1", "gather-nd-runtime"):  # ORT's ScatterND(add) races
        assert "ScatterND" not in _grad_ops(by_id[case]) + _grad_ops(by_id[case], dynamic=True)


OLD_OPSETS = [  # nodes, input shape, opset: forms from before opset 13 (axes and splits as attributes)
    ([_node("Squeeze", ["x"], axes=[1])], (2, 1, 3), 11),
    ([_node("Unsqueeze", ["x"], axes=[0, 3])], (2, 4, 3), 12),
    ([_node("Split", ["x"], ["p", "q"], axis=1, split=[1, 3]), _node("Concat", ["q", "p"], axis=-2)], (2, 4, 3), 11),
    ([_node("Concat", ["x", "c", "x"], axis=1)], (2, 4, 3), 11),
    ([_node("Slice", ["x", "s", "e", "a", "t"])], (2, 4, 3), 11),
    ([_node("Slice", ["x", "s", "e", "a"])], (2, 4, 3), 11),
    ([_node("Gather", ["x", "i"], axis=1)], (2, 4, 3), 11),
    ([_node("Tile", ["x", "r"])], (2, 4, 3), 11),
]
OLD_INITS = {"c": _rand(2, 2, 3), "s": _ints([-1, 1]), "e": _ints([-BIG, BIG]), "a": _ints([1, 2]), "t": _ints([-2, 1]),
             "i": _ints([[3, -1], [0, 3]]), "r": _ints([1, 2, 2])}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize("nodes,shape,opset", OLD_OPSETS,
                         ids=[f"{n[0].op_type}-{o}-{len(n[0].input)}" for n, _, o in OLD_OPSETS])
def test_old_opsets(nodes, shape, opset, dynamic):
    # The gradient graph at the model's own opset (nodes of opset 11/12 forms), run in onnxruntime and
    # compared with the adjoint of the forward map, pushed through one basis vector at a time.
    import onnxruntime as ort

    dims = [f"d{i}" for i in range(len(shape))] if dynamic else list(shape)
    y = nodes[-1].output[0]
    used = {name for n in nodes for name in n.input}
    inits = [numpy_helper.from_array(v, k) for k, v in OLD_INITS.items() if k in used]
    model = make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, dims)],
                       [helper.make_tensor_value_info(y, T.FLOAT, None)], inits, opset=opset)
    forward = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _rand(*shape)
    seed = np.random.default_rng(1).standard_normal(forward.run(None, {"x": x})[0].shape).astype(np.float32)
    grads = build_gradients(model, y, ["x"], seed="seed")
    model.graph.node.extend(grads.nodes)
    model.graph.initializer.extend(grads.initializers)
    model.graph.input.append(helper.make_tensor_value_info("seed", T.FLOAT, None))
    model.graph.output.append(helper.make_tensor_value_info(grads.grads["x"], T.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x, "seed": seed})[-1]
    basis = np.eye(x.size, dtype=np.float32).reshape((x.size,) + shape)
    offset = forward.run(None, {"x": np.zeros_like(x)})[0]  # the maps are affine (Concat with a constant)
    expected = [float(((forward.run(None, {"x": e})[0] - offset) * seed).sum()) for e in basis]
    np.testing.assert_allclose(got, np.reshape(expected, shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["Gather", "GatherND"])
def test_repeated_indices_add_up_in_onnxruntime(op):
    # Many repeats over wide rows: where onnxruntime's threaded ScatterND(add) loses updates.
    rng = np.random.default_rng(3)
    table = rng.standard_normal((300, 512)).astype(np.float32)
    ids = rng.integers(0, 40, (4, 256)).astype(np.int64)
    indices = ids[..., None] if op == "GatherND" else ids
    inputs = [helper.make_tensor_value_info("w", T.FLOAT, ["v", 512]),
              helper.make_tensor_value_info("i", T.INT64, [None, None, 1][:indices.ndim])]
    model = make_model([_node(op, ["w", "i"])], inputs, [helper.make_tensor_value_info("y", T.FLOAT, None)])
    grads = build_gradients(model, "y", ["w"], seed="seed")
    model.graph.node.extend(grads.nodes)
    model.graph.initializer.extend(grads.initializers)
    model.graph.input.append(helper.make_tensor_value_info("seed", T.FLOAT, None))
    model.graph.output.append(helper.make_tensor_value_info(grads.grads["w"], T.FLOAT, None))
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = rng.standard_normal((4, 256, 512)).astype(np.float32)
    expected = np.zeros(table.shape)
    np.add.at(expected, ids, seed.astype(np.float64))
    for _ in range(5):
        got = session.run(None, {"w": table, "i": indices, "seed": seed})[-1]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_refusals_name_the_op():
    x = helper.make_tensor_value_info("x", T.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", T.FLOAT, None)
    idx = numpy_helper.from_array(_ints([[0], [1]]), "i")
    batched = make_model([_node("GatherND", ["x", "i"], batch_dims=1)], [x], [y], [idx])
    with pytest.raises(UserError, match="GatherND.*batch_dims"):
        build_gradients(batched, "y", ["x"])
    old = make_model([_node("GatherElements", ["x", "i"])], [x], [y], [idx], opset=13)
    with pytest.raises(UserError, match="GatherElements.*opset 16"):
        build_gradients(old, "y", ["x"])
    square = helper.make_tensor_value_info("x", T.FLOAT, [3, 3])
    diagonal = make_model([_node("Einsum", ["x"], equation="ii->i")], [square], [y])
    with pytest.raises(UserError, match="Einsum.*repeated index"):
        build_gradients(diagonal, "y", ["x"])
    a = helper.make_tensor_value_info("a", T.FLOAT, [1, 2, 3])
    b = helper.make_tensor_value_info("b", T.FLOAT, [4, 3, 5])
    broadcast = make_model([_node("Einsum", ["a", "b"], equation="bij,bjk->bik")], [a, b], [y])
    with pytest.raises(UserError, match="Einsum.*index 'b' has sizes 1 and 4"):
        build_gradients(broadcast, "y", ["a"])


# ----- properties over random shapes and attributes ------------------------------------------------

@st.composite
def _slice_case(draw):
    rank = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 5)) for _ in range(rank)]
    axes = draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank, unique_by=lambda a: a % rank))
    bound = st.one_of(st.integers(-7, 7), st.sampled_from([BIG, -BIG]))
    starts = [draw(bound) for _ in axes]
    ends = [draw(bound) for _ in axes]
    steps = [draw(st.sampled_from([1, 1, 2, 3, -1, -2])) for _ in axes]
    return shape, starts, ends, axes, steps


@settings(max_examples=15, deadline=None)
@given(_slice_case(), st.booleans())
def test_slice_property(params, dynamic):
    shape, starts, ends, axes, steps = params
    inits = {"s": _ints(starts), "e": _ints(ends), "a": _ints(axes), "t": _ints(steps)}
    case = Case("slice", [_node("Slice", ["x", "s", "e", "a", "t"])], {"x": _rand(*shape)}, None, inits)
    rank = len(shape)
    picked = case.feeds["x"]
    for s, e, a, t in zip(starts, ends, axes, steps):
        picked = np.take(picked, np.arange(shape[a % rank])[slice(s, e, t)], axis=a % rank)
    if picked.size == 0:
        return  # nothing flows back: no gradient to check
    check_gradients(case.model(dynamic), case.feeds, ["x"])


@st.composite
def _gather_case(draw):
    rank = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    axis = draw(st.integers(-rank, rank - 1))
    dim = shape[axis]
    index_shape = draw(st.lists(st.integers(1, 3), max_size=2))
    indices = draw(st.lists(st.integers(-dim, dim - 1), min_size=int(np.prod(index_shape)),
                            max_size=int(np.prod(index_shape))))
    return shape, axis, _ints(indices).reshape(index_shape), draw(st.sampled_from([13, 17]))


@settings(max_examples=15, deadline=None)
@given(_gather_case(), st.booleans())
def test_gather_property(params, dynamic):
    shape, axis, indices, opset = params
    case = Case("gather", [_node("Gather", ["x", "i"], axis=axis)], {"x": _rand(*shape)}, None, {"i": indices},
                opset=opset)
    grads = check_gradients(case.model(dynamic), case.feeds, ["x"])
    # The gradient sums the output gradient over every pick of each position (duplicates add up).
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(np.take(case.feeds["x"], indices, axis=axis).shape)
    expected = np.zeros(shape)
    moved = np.moveaxis(expected, axis, 0)
    np.add.at(moved, indices.reshape(-1) % shape[axis],
              np.moveaxis(weight.reshape(shape[:axis % len(shape)] + [-1] + shape[axis % len(shape) + 1:]), axis, 0))
    np.testing.assert_allclose(grads["x"], expected, rtol=1e-12)


@st.composite
def _concat_split_case(draw):
    rank = draw(st.integers(1, 3))
    axis = draw(st.integers(-rank, rank - 1))
    base = [draw(st.integers(1, 3)) for _ in range(rank)]
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    return base, axis, sizes, draw(st.lists(st.integers(-2, 2), min_size=rank, max_size=rank))


@settings(max_examples=15, deadline=None)
@given(_concat_split_case(), st.booleans())
def test_concat_split_tile_property(params, dynamic):
    base, axis, sizes, reps = params
    feeds = {}
    for k, size in enumerate(sizes):
        shape = list(base)
        shape[axis] = size
        feeds[f"x{k}"] = _rand(*shape)
    reps = [abs(r) + 1 if r else 1 for r in reps]
    nodes = [_node("Concat", list(feeds), ["c"], axis=axis),
             _node("Split", ["c", "sizes"], [f"p{k}" for k in range(len(sizes))], axis=axis),
             _node("Tile", ["p0", "r"], ["y"])]
    inits = {"sizes": _ints(sizes[::-1]), "r": _ints(reps)}
    check_gradients(Case("cst", nodes, feeds, None, inits).model(dynamic), feeds, list(feeds))
