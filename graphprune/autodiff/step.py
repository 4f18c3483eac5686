"""One training step as one ONNX model: forward, loss, gradients and the optimizer update.

``build_training_step(model, loss, trainable, optimizer)`` takes a forward model whose outputs
include a scalar loss and returns
  - ``step_model``: inputs = the batch, the trainable weights, the optimizer state, ``lr`` and ``step``;
    outputs = the loss, the forward's other outputs, the updated weights and the updated state;
  - ``eval_model``: the same forward and loss with the weights as inputs (no gradients), so one set
    of weight buffers serves training and evaluation.
Both run in a plain ``onnxruntime.InferenceSession`` on any execution provider.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.autodiff.context import GradContext
from graphprune.autodiff.gather_pushdown import gather_before_positionwise
from graphprune.autodiff.gradient import build_gradients, forward_facts
from graphprune.autodiff.linear_gemm import linear_layers_as_gemm
from graphprune.autodiff.optimizers import OptimizerConfig, StepScalars, clip_by_global_norm, emit_update
from graphprune.errors import UserError

__all__ = ["TrainingStep", "build_training_step", "LR_INPUT", "STEP_INPUT"]

LR_INPUT = "graphprune.step/lr"
STEP_INPUT = "graphprune.step/t"
_PREFIX = "graphprune.step/"


@dataclasses.dataclass
class TrainingStep:
    """The step and eval models and how their inputs and outputs pair up.

    Attributes:
        step_model, eval_model: see the module docstring.
        loss: the loss output; ``outputs``: the forward's other outputs, in order.
        weights: the trainable weights (inputs of both models), with their initial values in ``initial``.
        states: every optimizer-state input, with its initial value (zeros) in ``initial``.
        updates: each weight or state input -> the step model's output holding its next value.
        untouched: trainable weights the loss does not depend on (left out of the step).
    """

    step_model: onnx.ModelProto
    eval_model: onnx.ModelProto
    loss: str
    outputs: List[str]
    weights: List[str]
    states: List[str]
    initial: Dict[str, np.ndarray]
    updates: Dict[str, str]
    untouched: List[str]


def _weights_as_inputs(model: onnx.ModelProto, names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Move the initializers ``names`` to graph inputs (in place); returns their values."""
    wanted = set(names)
    values: Dict[str, np.ndarray] = {}
    kept = []
    for init in model.graph.initializer:
        if init.name in wanted:
            values[init.name] = numpy_helper.to_array(init)
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    missing = wanted - set(values)
    if missing:
        raise UserError(f"trainable weights are not initializers of the model: {', '.join(sorted(missing))}")
    return values


def _expose_layer_norm_statistics(model: onnx.ModelProto) -> None:
    """Give float32 LayerNormalization nodes their optional Mean and InvStdDev outputs (in place).

    The kernel computes both anyway; with them the gradient rule reads the statistics instead of
    recomputing them (one subtraction, one square, two reductions and a square root fewer per
    LayerNormalization).  Float64 nodes keep float32 statistics (``stash_type``), which the rule does
    not reuse, so they are left as they are.
    """
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.input) + list(model.graph.value_info)}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    for index, node in enumerate(model.graph.node):
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        outputs = list(node.output) + [""] * (3 - len(node.output))
        if all(outputs[1:]):
            continue
        stash = next((a.i for a in node.attribute if a.name == "stash_type"), 1)
        if stash != 1 or types.get(node.input[0], onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            continue
        tag = f"{_PREFIX}ln{index}"
        outputs[1] = outputs[1] or f"{tag}/mean"
        outputs[2] = outputs[2] or f"{tag}/inv_std_dev"
        del node.output[:]
        node.output.extend(outputs)


def build_training_step(
    model: onnx.ModelProto,
    loss: str,
    trainable: Sequence[str],
    optimizer: Optional[OptimizerConfig] = None,
) -> TrainingStep:
    """Differentiate ``loss`` of ``model`` with respect to ``trainable`` and append the optimizer update.

    Args:
        model: forward model (ai.onnx opset >= 13) with ``loss`` among its outputs; the trainable
            weights are initializers.
        loss: the scalar loss output.
        trainable: names of float initializers to train.
        optimizer: the update rule (default AdamW, no decay).

    Raises ``UserError`` for an op without a gradient rule (named), a non-float trainable weight, or a
    loss that depends on none of the weights.
    """
    optimizer = optimizer or OptimizerConfig()
    optimizer.check()
    outputs = [vi.name for vi in model.graph.output]
    if loss not in outputs:
        raise UserError(f"the model has no output {loss!r} to train on")
    inits = {init.name: init for init in model.graph.initializer}
    for name in trainable:
        if name in inits and inits[name].data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            dtype = helper.tensor_dtype_to_np_dtype(inits[name].data_type)
            raise UserError(f"trainable weight {name!r} has dtype {np.dtype(dtype).name}: only float weights train")
    forward = onnx.ModelProto()
    forward.CopyFrom(model)
    initial = _weights_as_inputs(forward, trainable)
    eval_forward = onnx.ModelProto()
    eval_forward.CopyFrom(forward)
    # Positions the loss never reads are not computed (gather_pushdown), then exported linear layers
    # become Gemms (linear_gemm); both rewrite the step's forward only, the eval model is as exported.
    gather_before_positionwise(forward, forward_facts(forward))
    _expose_layer_norm_statistics(forward)
    facts = forward_facts(forward)
    if linear_layers_as_gemm(forward, initial, facts):
        facts = forward_facts(forward)
    grads = build_gradients(forward, loss, list(trainable), facts=facts)
    untouched = [name for name in trainable if grads.grads[name] is None]
    weights = [name for name in trainable if grads.grads[name] is not None]
    if not weights:
        raise UserError("the loss does not depend on any trainable weight")

    from graphprune.model_io import default_opset

    ctx = GradContext(default_opset(forward) or 13, facts.types, facts.shapes, facts.constants, prefix=_PREFIX + "opt/")
    step_grads = {name: grads.grads[name] for name in weights}
    if optimizer.clip_grad_norm:
        step_grads = clip_by_global_norm(ctx, step_grads, optimizer.clip_grad_norm)
    step_model = onnx.ModelProto()
    step_model.CopyFrom(forward)
    graph = step_model.graph
    for name in untouched:  # not read by the step: keep them as constants there
        graph.initializer.append(numpy_helper.from_array(initial[name], name))
    kept_inputs = [vi for vi in graph.input if vi.name not in set(untouched)]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    graph.input.append(helper.make_tensor_value_info(LR_INPUT, onnx.TensorProto.FLOAT, []))
    graph.input.append(helper.make_tensor_value_info(STEP_INPUT, onnx.TensorProto.FLOAT, []))
    states: List[str] = []
    updates: Dict[str, str] = {}
    new_values: List[onnx.ValueInfoProto] = []
    scalars: Dict[int, StepScalars] = {}
    for name in weights:
        elem = facts.types.get(name, onnx.TensorProto.FLOAT)
        if elem not in scalars:  # the schedule is fed in float32; weights may be float64
            lr, step = ((LR_INPUT, STEP_INPUT) if elem == onnx.TensorProto.FLOAT else
                        (ctx.op("Cast", LR_INPUT, to=elem), ctx.op("Cast", STEP_INPUT, to=elem)))
            scalars[elem] = StepScalars(ctx, optimizer, lr, step, like=name)
        # The update runs on flat views (Reshape aliases, no copy): onnxruntime's elementwise kernels
        # were measured ~50x slower on [C, K, 1, 1] (1x1 conv weights) than on the same values flat.
        # The optimizer state is kept flat; the new weight is viewed back in its own shape.
        size = int(initial[name].size)
        state_inputs = {suffix: f"{_PREFIX}state/{name}/{suffix}" for suffix in optimizer.state_names()}
        for state in state_inputs.values():
            graph.input.append(helper.make_tensor_value_info(state, elem, [size]))
            initial[state] = np.zeros(size, initial[name].dtype)
            states.append(state)
        if initial[name].ndim == 1:  # flat already
            new_weight, new_states = emit_update(ctx, optimizer, name, step_grads[name], state_inputs, scalars[elem])
        else:
            flat = ctx.ints([-1])
            flat_weight = ctx.op("Reshape", name, flat)
            ctx.types[flat_weight] = elem  # constants made "like" it take the weight's float type
            new_weight, new_states = emit_update(ctx, optimizer, flat_weight, ctx.op("Reshape", step_grads[name], flat),
                                                 state_inputs, scalars[elem],
                                                 shaped=(name, ctx.ints(list(initial[name].shape))))
        for source, produced in {name: new_weight, **{state_inputs[k]: v for k, v in new_states.items()}}.items():
            updates[source] = produced
            new_values.append(helper.make_tensor_value_info(f"{_PREFIX}next/{source}", elem, list(initial[source].shape)))
    # The nodes computing the new values write the step's outputs directly (no Identity copies).
    renamed = {produced: f"{_PREFIX}next/{source}" for source, produced in updates.items()}
    for node in ctx.nodes:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    updates = {source: renamed[produced] for source, produced in updates.items()}
    graph.node.extend(grads.nodes + ctx.nodes)
    graph.initializer.extend(grads.initializers + ctx.initializers)
    graph.output.extend(new_values)

    eval_model = eval_forward
    for name in untouched:
        eval_model.graph.initializer.append(numpy_helper.from_array(initial[name], name))
    eval_inputs = [vi for vi in eval_model.graph.input if vi.name not in set(untouched)]
    del eval_model.graph.input[:]
    eval_model.graph.input.extend(eval_inputs)
    return TrainingStep(
        step_model=step_model,
        eval_model=eval_model,
        loss=loss,
        outputs=[name for name in outputs if name != loss],
        weights=weights,
        states=states,
        initial={k: v for k, v in initial.items() if k in set(weights) | set(states)},
        updates=updates,
        untouched=untouched,
    )
