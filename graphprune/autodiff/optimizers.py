"""Optimizer updates written as ONNX nodes: AdamW, SGD with momentum, weight decay, gradient clipping.

The update of every weight is part of the training-step graph, so one ``InferenceSession.run`` does
forward, backward and update.  The formulas are torch's (``torch.optim.AdamW`` and ``SGD``), so a
step here and a step there agree to rounding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

from graphprune.autodiff.context import GradContext
from graphprune.errors import UserError

__all__ = ["OptimizerConfig", "OPTIMIZERS", "StepScalars", "emit_update", "clip_by_global_norm"]

OPTIMIZERS = ("adamw", "sgd")


@dataclasses.dataclass
class OptimizerConfig:
    """What each step does with the gradients.

    Args:
        kind: "adamw" (decoupled weight decay) or "sgd" (momentum; weight decay added to the gradient).
        betas: AdamW's moment decay rates.
        eps: AdamW's denominator guard.
        weight_decay: AdamW's decoupled decay, or SGD's L2 coefficient.
        momentum: SGD momentum (0: plain SGD, no state).
        nesterov: SGD with Nesterov momentum.
        clip_grad_norm: rescale all gradients together so their global L2 norm is at most this (None: off).
    """

    kind: str = "adamw"
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    clip_grad_norm: Optional[float] = None

    def check(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise UserError(f"optimizer {self.kind!r}: choose {' or '.join(OPTIMIZERS)}")
        numbers = {"weight decay": self.weight_decay, "momentum": self.momentum, "eps": self.eps}
        for label, value in numbers.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f"{label} must be a non-negative number, got {value}")
        if not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"AdamW betas must lie in [0, 1), got {self.betas}")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise UserError(f"gradient clipping norm must be positive, got {self.clip_grad_norm}")

    def state_names(self) -> List[str]:
        """Suffixes of the per-weight state tensors this optimizer keeps."""
        if self.kind == "adamw":
            return ["exp_avg", "exp_avg_sq"]
        return ["momentum_buffer"] if self.momentum else []


def clip_by_global_norm(ctx: GradContext, grads: Dict[str, str], max_norm: float) -> Dict[str, str]:
    """Every gradient times ``min(1, max_norm / (norm + 1e-6))``, norm over all of them (torch's rule)."""
    any_grad = next(iter(grads.values()))
    squares = [ctx.reduce("ReduceSumSquare", g, None, keepdims=False) for g in grads.values()]
    total = ctx.op("Sqrt", squares[0] if len(squares) == 1 else ctx.op("Sum", *squares))
    factor = ctx.op("Min", ctx.const(1.0, like=any_grad),
                    ctx.op("Div", ctx.const(max_norm, like=any_grad), ctx.op("Add", total, ctx.const(1e-6, like=any_grad))))
    return {name: ctx.op("Mul", g, factor) for name, g in grads.items()}


class StepScalars:
    """Per-step scalars of the update, computed once per step (not once per weight).

    AdamW keeps its moments unnormalized, ``M = m / (1 - b1)`` and ``V = v / (1 - b2)``, so that each
    update is ``M' = b1 * M + g`` and ``V' = b2 * V + g * g`` (5 passes over the weights instead of 7;
    the optimizer is memory-bound), and the constant factors join the bias corrections in one step
    size and one epsilon: torch's ``lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`` equals
    ``step_size * M / (sqrt(V) + eps_hat)`` with ``step_size = lr (1 - b1) sqrt(bc2) / (bc1 sqrt(1 - b2))``
    and ``eps_hat = eps sqrt(bc2) / sqrt(1 - b2)``.
    """

    def __init__(self, ctx: GradContext, config: OptimizerConfig, lr: str, step: str, like: str):
        c = lambda v: ctx.const(v, like=like)  # noqa: E731
        self.lr = lr
        self.decay = None
        if config.kind == "adamw":
            beta1, beta2 = config.betas
            bias1 = ctx.op("Sub", c(1.0), ctx.op("Pow", c(beta1), step))
            root_bias2 = ctx.op("Sqrt", ctx.op("Sub", c(1.0), ctx.op("Pow", c(beta2), step)))
            scale = (1 - beta1) / (1 - beta2) ** 0.5
            self.step_size = ctx.op("Div", ctx.op("Mul", lr, ctx.op("Mul", root_bias2, c(scale))), bias1)
            self.eps = ctx.op("Mul", c(config.eps / (1 - beta2) ** 0.5), root_bias2)
            if config.weight_decay:
                self.decay = ctx.op("Sub", c(1.0), ctx.op("Mul", lr, c(config.weight_decay)))


def emit_update(ctx: GradContext, config: OptimizerConfig, weight: str, grad: str, states: Dict[str, str],
                scalars: StepScalars, shaped: Optional[Tuple[str, str]] = None) -> Tuple[str, Dict[str, str]]:
    """Nodes computing one weight's new value and new optimizer state.

    Args:
        weight, grad: the current weight and its gradient (flat views, see ``shaped``).
        states: state suffix -> the input holding its current value.
        scalars: the step's shared scalars (learning rate, AdamW's folded bias corrections).
        shaped: (the weight in its own shape, that shape as an int64 tensor) when ``weight`` is a flat
            view of it: the last node (a Sub of same-shaped operands) then computes the new weight in
            its own shape, so it writes the step output directly instead of a Reshape copying into it.

    Returns (new weight, state suffix -> new state).
    """
    c = lambda v: ctx.const(v, like=weight)  # noqa: E731

    def apply(base: str, decayed: Optional[str], step: str) -> str:
        """``decayed - step`` (``base - step`` without decay), in the weight's own shape when asked."""
        if shaped is None:
            return ctx.op("Sub", decayed or base, step)
        original, shape = shaped
        # Reshapes of intermediates alias their input (no copy); only scalar-broadcast kernels are
        # slow on [C, K, 1, 1] shapes, and a same-shape Sub is not one of them.
        first = ctx.op("Reshape", decayed, shape) if decayed else original
        return ctx.op("Sub", first, ctx.op("Reshape", step, shape))

    if config.kind == "adamw":
        beta1, beta2 = config.betas
        exp_avg = ctx.op("Add", ctx.op("Mul", states["exp_avg"], c(beta1)), grad)  # M, see StepScalars
        exp_avg_sq = ctx.op("Add", ctx.op("Mul", states["exp_avg_sq"], c(beta2)), ctx.op("Mul", grad, grad))
        denom = ctx.op("Add", ctx.op("Sqrt", exp_avg_sq), scalars.eps)
        update = ctx.op("Mul", ctx.op("Div", exp_avg, denom), scalars.step_size)
        decayed = ctx.op("Mul", weight, scalars.decay) if scalars.decay else None
        return apply(weight, decayed, update), {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if config.weight_decay:
        grad = ctx.op("Add", grad, ctx.op("Mul", weight, c(config.weight_decay)))
    new_states: Dict[str, str] = {}
    direction = grad
    if config.momentum:
        buffer = ctx.op("Add", ctx.op("Mul", states["momentum_buffer"], c(config.momentum)), grad)
        new_states["momentum_buffer"] = buffer
        direction = ctx.op("Add", grad, ctx.op("Mul", buffer, c(config.momentum))) if config.nesterov else buffer
    return apply(weight, None, ctx.op("Mul", direction, scalars.lr)), new_states
