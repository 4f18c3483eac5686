"""Property tests over random small CNNs built from every supported op family.

For each random graph and ratio: the pruned model passes the full checker and runs in ORT with a
dynamic batch, output shapes are unchanged, every member of a group loses the same channels
(each pruned constant shrinks by exactly its dims' removed indices), and masked == removed.
"""

from typing import Dict, List

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphprune.dependency import build_dependency_graph, reported_groups
from graphprune.opset_upgrade import upgrade_group_norm
from graphprune.passes import PruneChannelsPass
from graphprune.pruning import group_scores, removal_masks, select_channels
from graphprune.runtime import make_session, run
from graphprune.validate import compare_outputs

OPSET = 18


class NetBuilder:
    """Appends blocks to a [N, C, H, W] tensor, tracking its channels and spatial size."""

    def __init__(self, seed: int, channels: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: Dict[str, np.ndarray] = {}
        self.n = 0
        self.x, self.c, self.hw = "x", channels, 8
        self.in_channels = channels

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value, prefix="k") -> str:
        name = self.name(prefix)
        self.inits[name] = np.asarray(value)
        return name

    def weight(self, *shape) -> str:
        fan_in = int(np.prod(shape[1:])) or 1
        return self.const((self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), "w")

    def node(self, op, inputs, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    # -- blocks (each returns the new tensor and sets self.x/c/hw) -------------------------------
    def conv(self, cout, x=None, cin=None, k=3, group=1, bias=True, bn=True, act="Relu"):
        x, cin = x or self.x, cin or self.c
        inputs = [x, self.weight(cout, cin // group, k, k)] + ([self.const(self.rng.standard_normal(cout).astype(np.float32))] if bias else [])
        y = self.node("Conv", inputs, pads=[k // 2] * 4, group=group)
        if bn:
            params = [self.rng.uniform(0.5, 1.5, cout), self.rng.standard_normal(cout) * 0.1,
                      self.rng.standard_normal(cout) * 0.1, self.rng.uniform(0.5, 1.5, cout)]
            y = self.node("BatchNormalization", [y] + [self.const(p.astype(np.float32)) for p in params])
        if act:
            y = self.node(act, [y])
        self.x, self.c = y, cout
        return y

    def residual(self):
        skip = self.x
        self.conv(self.c, act="Relu")
        self.conv(self.c, act=None)
        self.x = self.node("Add", [self.x, skip])

    def concat(self, c1, c2):
        x, c = self.x, self.c
        a = self.conv(c1, x=x, cin=c)
        b = self.conv(c2, x=x, cin=c)
        self.x, self.c = self.node("Concat", [a, b], axis=1), c1 + c2

    def depthwise(self):
        self.conv(self.c, group=self.c, act="HardSwish")

    def group_conv(self):
        if self.c % 2 == 0:
            self.conv(self.c, group=2)

    def se(self):
        x, c = self.x, self.c
        p = self.node("GlobalAveragePool", [x])
        s = self.conv(max(c // 2, 1), x=p, cin=c, k=1, bn=False, act="Relu")
        s = self.conv(c, x=s, cin=max(c // 2, 1), k=1, bn=False, act="HardSigmoid")
        self.x, self.c = self.node("Mul", [x, s]), c

    def c2f(self, half):
        self.conv(2 * half, k=1)
        a, b = self.name("split_a"), self.name("split_b")
        self.nodes.append(helper.make_node("Split", [self.x, self.const(np.array([half, half], np.int64))], [a, b], axis=1))
        c = self.conv(half, x=b, cin=half, act="Sigmoid")
        self.x, self.c = self.node("Concat", [a, b, c], axis=1), 3 * half

    def shuffle(self):
        if self.c % 2:
            return
        g, hw = 2, self.hw
        r = self.node("Reshape", [self.x, self.const(np.array([0, g, self.c // g, hw, hw], np.int64))])
        t = self.node("Transpose", [r], perm=[0, 2, 1, 3, 4])
        self.x = self.node("Reshape", [t, self.const(np.array([0, self.c, hw, hw], np.int64))])

    def pool(self):
        if self.hw >= 4:
            self.x = self.node("MaxPool", [self.x], kernel_shape=[2, 2], strides=[2, 2])
            self.hw //= 2

    def upsample(self):
        if self.hw <= 8:
            scales = self.const(np.array([1, 1, 2, 2], np.float32))
            self.x = self.node("Resize", [self.x, "", scales], mode="nearest")
            self.hw *= 2

    def conv_transpose(self):
        if self.hw <= 8:
            cout = self.c
            w = self.weight(self.c, cout, 2, 2)
            self.x = self.node("ConvTranspose", [self.x, w, self.const(np.zeros(cout, np.float32))], strides=[2, 2])
            self.hw *= 2

    def slice_channels(self):
        if self.c >= 4:
            starts, ends, axes = (self.const(np.array([v], np.int64)) for v in (1, self.c - 1, 1))
            self.x = self.node("Slice", [self.x, starts, ends, axes])
            self.c -= 2

    def norm(self):
        if self.c % 2 == 0:
            s, b = (self.const(v.astype(np.float32)) for v in (self.rng.uniform(0.5, 1.5, 2), self.rng.standard_normal(2)))
            self.x = self.node("GroupNormalization", [self.x, s, b], num_groups=2)
        else:
            s, b = (self.const(v.astype(np.float32)) for v in (self.rng.uniform(0.5, 1.5, self.c), self.rng.standard_normal(self.c)))
            self.x = self.node("InstanceNormalization", [self.x, s, b])

    def pad_conv(self):
        pads = self.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
        self.x = self.node("Pad", [self.x, pads])
        y = self.node("Conv", [self.x, self.weight(self.c, self.c, 3, 3)])
        self.x = self.node("Clip", [y, self.const(np.float32(0)), self.const(np.float32(6))])

    def prelu_affine(self):
        self.x = self.node("PRelu", [self.x, self.const((self.rng.uniform(0, 0.3, (self.c, 1, 1))).astype(np.float32))])
        self.x = self.node("Div", [self.x, self.const(self.rng.uniform(1, 2, (self.c, 1, 1)).astype(np.float32))])
        self.x = self.node("Sub", [self.x, self.const(self.rng.standard_normal((1, self.c, 1, 1)).astype(np.float32))])

    def head(self, kind):
        if kind == "gemm":
            p = self.node("GlobalAveragePool", [self.x])
            f = self.node("Flatten", [p])
            self.x = self.node("Gemm", [f, self.weight(5, self.c), self.const(np.zeros(5, np.float32))], transB=1)
            return [("N", 5)]
        if kind == "matmul":
            r = self.node("ReduceMean", [self.x, self.const(np.array([2, 3], np.int64))], keepdims=0)
            self.x = self.node("MatMul", [r, self.weight(self.c, 5)])
            return [("N", 5)]
        f = self.node("Flatten", [self.node("MaxPool", [self.x], kernel_shape=[self.hw, self.hw])])
        self.x = self.node("Gemm", [f, self.weight(4, self.c), self.const(np.zeros(4, np.float32))], transB=1)
        return [("N", 4)]

    def model(self, head):
        out_shape = self.head(head)
        graph = helper.make_graph(
            self.nodes, "random",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", self.in_channels, 8, 8])],
            [helper.make_tensor_value_info(self.x, TensorProto.FLOAT, list(out_shape[0]))],
            [numpy_helper.from_array(v, k) for k, v in self.inits.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 9
        return upgrade_group_norm(model)  # GroupNormalization's per-group form, upgraded as model_io.load does


BLOCKS = ["conv", "residual", "concat", "depthwise", "group_conv", "se", "c2f", "shuffle", "pool",
          "upsample", "conv_transpose", "slice", "norm", "pad_conv", "prelu_affine"]


def build(blocks, channels, seed, head):
    b = NetBuilder(seed, 3)
    b.conv(channels)
    for kind in blocks:
        if kind == "conv":
            b.conv(channels + 2)
        elif kind == "concat":
            b.concat(channels // 2 + 1, channels)
        elif kind == "c2f":
            b.c2f(channels // 2 + 1)
        elif kind == "slice":
            b.slice_channels()
        else:
            getattr(b, kind)()
    return b.model(head)


def run_all(model, feed):
    return run(make_session(model), feed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5),
    channels=st.sampled_from([4, 6, 8]),
    ratio=st.sampled_from([0.25, 0.5, 0.75]),
    head=st.sampled_from(["gemm", "matmul", "pool"]),
    seed=st.integers(0, 1000),
)
def test_random_graphs_prune_consistently(blocks, channels, ratio, head, seed):
    model = build(blocks, channels, seed, head)
    onnx.checker.check_model(model, full_check=True)
    feed = {"x": np.random.default_rng(seed).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    original = run_all(model, feed)

    removed = PruneChannelsPass(ratio=ratio)(model)
    masked = PruneChannelsPass(ratio=ratio, mode="mask")(model)
    assert removed.modified == masked.modified
    if not removed.modified:
        return
    onnx.checker.check_model(removed.model, full_check=True)
    out_removed, out_masked = run_all(removed.model, feed), run_all(masked.model, feed)
    for name, ref in original.items():
        assert out_removed[name].shape == ref.shape == out_masked[name].shape
        assert compare_outputs(name, out_masked[name], out_removed[name]).rel_l2 <= 1e-4
    # a batch of another size runs too (dynamic batch kept)
    assert run_all(removed.model, {"x": feed["x"][:1]})[next(iter(original))].shape[0] == 1

    # every pruned constant shrank by exactly its dims' removed indices
    dep = build_dependency_graph(model)
    groups = [g for g in reported_groups(dep.groups()) if g.prunable]
    selected = select_channels(groups, group_scores(dep, groups, "l2"), ratio)
    masks = removal_masks(groups, selected)
    new_dims = {i.name: list(i.dims) for i in removed.model.graph.initializer}
    for dim, mask in masks.items():
        if dim.tensor in new_dims:
            assert new_dims[dim.tensor][dim.axis] == len(mask) - mask.sum()
