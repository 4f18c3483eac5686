"""Running training steps in a plain onnxruntime ``InferenceSession``, weights kept on the device.

The weights and optimizer state live in two sets of ``OrtValue`` buffers on the session's device:
a step reads one set and writes the next values into the other (IO binding), then the two swap.
Nothing crosses to numpy between steps except the batch, the loss and the model output; a step whose
loss is not finite does not swap, so its update is discarded.  The two directions' bindings are
built once and kept (a BERT-mini step binds 426 weight and state buffers: rebinding them and wrapping
every output each step cost about 0.7 ms); a step only rebinds the batch and the two scalars.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from graphprune.autodiff.fpenv import flush_denormals
from graphprune.autodiff.step import LR_INPUT, STEP_INPUT, TrainingStep
from graphprune.errors import UserError

__all__ = ["StepSession"]


def _device(providers: Sequence) -> Tuple[str, int]:
    first = providers[0] if providers else "CPUExecutionProvider"
    name, options = (first if isinstance(first, tuple) else (first, {}))
    if name == "CUDAExecutionProvider":
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


class StepSession:
    """Training and evaluation sessions over a ``TrainingStep``.

    Args:
        step: from ``build_training_step``.
        providers: onnxruntime execution providers, passed through (default CPU).
        threads: intra-op threads (None lets onnxruntime decide).
        output: the forward output returned with the loss (default: the first one).
    """

    def __init__(self, step: TrainingStep, providers: Optional[Sequence] = None, threads: Optional[int] = None,
                 output: Optional[str] = None):
        from graphprune import runtime
        from graphprune.runtime import ort

        rt = ort()
        self.step = step
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.device, self.device_id = _device(self.providers)
        options = rt.SessionOptions()
        options.log_severity_level = runtime.LOG_SEVERITY
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.output = output or (step.outputs[0] if step.outputs else None)
        self._options = options
        self._train = self._open(step.step_model)
        self._eval = None  # opened on first use: a loop without validation never pays for it
        self.trainable = list(step.weights)
        self._ortvalue = rt.OrtValue
        self._current = {name: self._on_device(value) for name, value in step.initial.items()}
        self._spare = {name: self._on_device(np.zeros_like(value)) for name, value in step.initial.items()}
        self._count = 0
        self._fetch = [step.loss] + ([self.output] if self.output else [])
        self._bindings: Dict[Tuple[int, int], object] = {}  # (session, weight set) -> its IOBinding

    def _open(self, model):
        from graphprune.model_io import for_ort
        from graphprune.runtime import ort

        try:
            return ort().InferenceSession(for_ort(model).SerializeToString(), self._options, providers=self.providers)
        except UserError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"onnxruntime cannot run the training step: {first[-300:]}") from None

    def _on_device(self, value: np.ndarray):
        # A copy: on CPU an OrtValue shares the array's memory, and the steps write into these
        # buffers, so the caller's arrays (step.initial, saved weights) would change under it.
        return self._ortvalue.ortvalue_from_numpy(np.array(value, order="C", copy=True), self.device, self.device_id)

    def _binding(self, session, names: List[str], write_into: Optional[Dict[str, object]]):
        """The kept IOBinding reading the current weight set (and writing the spare one when training)."""
        key = (id(session), id(self._current))
        binding = self._bindings.get(key)
        if binding is None:
            binding = session.io_binding()
            for name in names:
                binding.bind_ortvalue_input(name, self._current[name])
            for name in self._fetch:  # bound first: the fetched outputs lead the output list
                binding.bind_output(name, "cpu")  # (rebound each run, in place: see _run)
            for source, target in (write_into or {}).items():
                binding.bind_ortvalue_output(self.step.updates[source], target)
            self._bindings[key] = binding
        return binding

    def _run(self, session, feeds: Dict[str, np.ndarray], extra: Dict[str, np.ndarray], names: List[str],
             write_into: Optional[Dict[str, object]]):
        binding = self._binding(session, names, write_into)
        for name, value in list(feeds.items()) + list(extra.items()):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._fetch:  # a kept output buffer would fix the batch size of the next run
            binding.bind_output(name, "cpu")
        with flush_denormals():  # see fpenv: denormal moments and gradients are 10x slower
            session.run_with_iobinding(binding)
        # The raw output vector: get_outputs() would wrap every updated weight in a Python object.
        raw = getattr(binding, "get_outputs_as_ortvaluevector", binding.get_outputs)()
        loss = float(raw[0].numpy())
        output = raw[1].numpy() if len(self._fetch) > 1 else None
        return loss, output

    def train_step(self, feeds: Dict[str, np.ndarray], lr: float) -> Tuple[float, Optional[np.ndarray]]:
        """Forward, backward and one optimizer update; returns (loss, model output) before the update.

        A non-finite loss leaves weights and state as they were."""
        extra = {LR_INPUT: np.array(lr, np.float32), STEP_INPUT: np.array(self._count + 1, np.float32)}
        names = list(self.step.weights) + list(self.step.states)
        loss, output = self._run(self._train, feeds, extra, names, self._spare)
        if np.isfinite(loss):
            self._current, self._spare = self._spare, self._current
            self._count += 1
        return loss, output

    def eval_step(self, feeds: Dict[str, np.ndarray]) -> Tuple[float, Optional[np.ndarray]]:
        """Loss and model output at the current weights (no update)."""
        if self._eval is None:
            self._eval = self._open(self.step.eval_model)
        return self._run(self._eval, feeds, {}, list(self.step.weights), None)

    def weights(self) -> Dict[str, np.ndarray]:
        """Current values of the trainable weights (copies)."""
        return {name: np.array(self._current[name].numpy(), copy=True) for name in self.step.weights}

    def load_weights(self, values: Dict[str, np.ndarray]) -> None:
        self._bindings.clear()  # they hold the replaced buffers
        for name, value in values.items():
            self._current[name] = self._on_device(np.asarray(value, dtype=self.step.initial[name].dtype))

    def close(self) -> None:
        self._train = self._eval = None
        self._bindings.clear()

    def __enter__(self) -> "StepSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
