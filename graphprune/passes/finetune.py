"""Fine-tune: train a model's weights on plain onnxruntime (graphprune's gradient graphs), with labels or by distillation."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import onnx

from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.passes.base import Pass, PassResult, register_pass
from graphprune.training.artifacts import TrainingSession, build_training_graph, prepare_for_training
from graphprune.training.batchnorm import recalibrate_batchnorm, statistics_follow_reconstruction
from graphprune.training.fold import FoldRecord, fold_batchnorms, unfold_values
from graphprune.training.heads import probability_head, teacher_targets, top1_counter
from graphprune.training.losses import BatchTargets, LossSpec, resolve_loss
from graphprune.training.loop import TrainConfig, train_loop
from graphprune.training.masks import apply_masks, read_masks
from graphprune.training.probe import freeze_boundary
from graphprune.training.qdq import requantize
from graphprune.training.samples import ModelLike, check_data, read_labels, read_teacher
from graphprune.training.trainable import write_back

__all__ = ["FineTunePass", "finetune", "probability_head"]

# Samples of the probe step that finds the weights to freeze (``training.probe``).
_PROBE_BATCH = 8
# Probe batches: the step is computed on the first and must lower the loss of each (held-out ones too).
_PROBE_BATCHES = 3

# Integer-only operators have no gradient: their weights cannot train.
_INTEGER_OPS = {"DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                "QLinearAdd", "QLinearMul", "QGemm"}


@register_pass
class FineTunePass(Pass):
    """Fine-tune the weights of an inference model and return the same graph with the new weights.

    Handles:
      - Trainable: float32 weights of Conv/ConvTranspose/Gemm/MatMul (and their bias ``Add``) and the
        scale/bias of normalization layers; weights in ``Constant`` nodes are trained and written back
        into those nodes.  Everything else is frozen.
      - Losses: cross-entropy with integer labels, MSE with float targets, distillation from a teacher
        (KL on temperature-softened logits, or MSE), or labels and distillation combined.
      - Every op with a gradient rule in ``graphprune.autodiff`` trains as it is (the step graph is
        plain ONNX run by ``onnxruntime.InferenceSession``); batch, sequence and image dims stay
        dynamic; opsets below 13 train on a converted copy.
      - BatchNormalization: the running statistics are re-estimated once from the training samples
        (pruning changed the activations they describe; ``batchnorm="keep"`` skips this), then held
        *frozen* while scale and bias train.  Frozen statistics are the small-data choice: batch
        statistics of a few dozen samples are noisy, the per-channel affine absorbs any remaining
        shift, and the trained function is exactly the one inference computes.  With
        ``fold_batchnorm`` a BatchNorm right after a Conv trains folded into it (``training.fold``)
        and is written back unfolded, the graph unchanged.
      - QDQ models (quantization-aware fine-tuning): int8 weights train as float weights behind a
        QuantizeLinear with the straight-through estimator, and are quantized again with their
        unchanged scales; activation scales and zero points stay as calibrated.
      - Weights named by the sparsity mask record or the pruned-channel record keep their zeros.
      - With ``freeze="auto"`` (default), the early weights whose joint step overshoots are frozen:
        when some tensor's probe step at ``lr`` alone raises its batch's loss, the step is applied to
        the suffixes of the weights (graph order) after candidate boundaries, and the prefix left
        out where it lowers the loss of each probe batch, and most, keeps its values; nothing when
        the full step already lowers them (``training.probe``).
      - A held-out split is evaluated before training and after each epoch and the best is kept, so
        training never makes the validation metric worse than at its start.

    Refuses: a model without data, labels or teacher; data that does not match the model inputs;
    labels of the wrong length, dtype or shape; a model with integer-only operators (QLinearConv...)
    or without trainable weights; an op on the training path without a gradient rule (named); a loss that becomes non-finite (the error names the epoch and step).

    Args:
        data: training samples (``InputSet``; the CLI and recipes inject ``--data``).
        labels: integer class ids (cross-entropy) or float targets (MSE), one per sample; or
            ``"FILE.npz"`` / ``"FILE.npz:KEY"`` (default key ``labels``) for recipes.
        teacher: the model to distill from (a ModelProto or a path), usually the unpruned original.
        epochs, batch_size, lr, schedule, seed: the training loop (see ``TrainConfig``).
        val_split: fraction of ``data`` held out for validation (0 disables it).
        optimizer: "adamw" or "sgd"; weight_decay: AdamW's decoupled weight decay.
        loss: "auto" (ce for integer labels, mse for float), "ce" or "mse".
        distill_loss: "auto" (kl for class scores, mse otherwise), "kl" or "mse".
        distill_weight: w in (1 - w) * label loss + w * distillation loss (default 0.5 with both).
        temperature: distillation temperature.
        features: feature distillation with a teacher: "auto" (up to ``max_features`` intermediate
            tensors the model shares with the teacher and pruning changed, ``training.features``),
            "none", or a list of tensor names.
        feature_weight: weight of the feature terms (together) beside the output loss.
        max_features: how many features "auto" picks.
        patience: early stopping: stop after this many epochs without a better validation loss.
        batchnorm: "recalibrate" (re-estimate BatchNorm statistics from ``data`` first), "keep", or
            "auto" (default): keep after ``reconstruct`` refit the layers, recalibrate otherwise.
        fold_batchnorm: train each Conv + BatchNorm pair in its folded form, each channel's weights
            times its BatchNorm gain over the layer's median gain (default False: the stored Conv
            weights and the BatchNorm's scale and bias train).
        freeze: "auto" (default): before training, one probe step at ``lr`` on 8 training samples,
            applied to the weight tensors after a boundary (graph order), must lower the loss of that
            batch and of 2 held-out ones; the boundary where it lowers them most keeps the tensors
            before it (``training.probe``: the loss is too curved along them for ``lr``); none when
            the full step lowers them or no tensor's step alone raises its batch's loss.  "none"
            trains all; a list of weight names freezes those.
        output: the output to train (default: the first float32 output).
        threads: intra-op threads for training (None: onnxruntime decides).
        providers: onnxruntime execution providers for training (default CPU), e.g.
            ``["CUDAExecutionProvider", "CPUExecutionProvider"]``; passed through as they are.
        progress: show a progress bar with the running loss and metric.
    """

    name = "finetune"

    def __init__(
        self,
        data: Optional[InputSet] = None,
        labels: Union[np.ndarray, str, None] = None,
        teacher: Optional[ModelLike] = None,
        epochs: int = 5,
        batch_size: int = 32,
        lr: float = 1e-3,
        val_split: float = 0.1,
        optimizer: str = "adamw",
        weight_decay: float = 1e-4,
        schedule: str = "cosine",
        loss: str = "auto",
        distill_loss: str = "auto",
        distill_weight: Optional[float] = None,
        temperature: float = 2.0,
        features: Union[str, Sequence[str]] = "auto",
        feature_weight: float = 1.0,
        max_features: int = 4,
        patience: Optional[int] = None,
        batchnorm: str = "auto",
        fold_batchnorm: bool = False,
        freeze: Union[str, Sequence[str]] = "auto",
        output: Optional[str] = None,
        seed: int = 0,
        threads: Optional[int] = None,
        progress: bool = False,
        providers: Optional[Sequence[str]] = None,
    ):
        self.data = data
        self.labels = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else labels
        self.teacher = read_teacher(teacher)
        self.config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed,
                                  progress=progress, patience=patience)
        self.config.check()
        if not 0 <= val_split < 1:
            raise UserError(f"validation split {val_split} is outside [0, 1)")
        if optimizer not in ("adamw", "sgd"):
            raise UserError(f"optimizer {optimizer!r}: choose adamw or sgd")
        if batchnorm not in ("auto", "recalibrate", "keep"):
            raise UserError(f"batchnorm {batchnorm!r}: choose auto, recalibrate or keep")
        self.batchnorm = batchnorm
        self.fold_batchnorm = bool(fold_batchnorm)
        if isinstance(freeze, str) and freeze not in ("auto", "none"):
            raise UserError(f"freeze {freeze!r}: choose auto, none or a list of weight names")
        self.freeze = freeze if isinstance(freeze, str) else list(freeze)
        self.val_split = float(val_split)
        self.optimizer = optimizer
        self.weight_decay = float(weight_decay)
        self.loss = loss
        self.distill_loss = distill_loss
        self.distill_weight = distill_weight
        self.temperature = float(temperature)
        if isinstance(features, str) and features not in ("auto", "none"):
            raise UserError(f"features {features!r}: choose auto, none or a list of tensor names")
        if not feature_weight >= 0:
            raise UserError(f"feature weight {feature_weight} must be >= 0")
        self.features = features if isinstance(features, str) else list(features)
        self.feature_weight = float(feature_weight)
        self.max_features = int(max_features)
        self.output = output
        self.threads = threads
        self.providers = list(providers) if providers else None

    def requires(self, model: onnx.ModelProto) -> None:
        if self.data is None or len(self.data) == 0:
            raise UserError("finetune needs training samples (--data FILE.npz)")
        if self.labels is None and self.teacher is None:
            raise UserError("finetune needs labels (--labels KEY) or a teacher model (--teacher ORIGINAL.onnx)")
        integer_ops = sorted({node.op_type for node in model.graph.node if node.op_type in _INTEGER_OPS})
        if integer_ops:
            raise UserError(f"the model computes in integers ({', '.join(integer_ops)}): only float and QDQ "
                            "models fine-tune (fine-tune before converting to integer operators)")
        check_data(model, self.data, "data")
        if self.teacher is not None:
            check_data(self.teacher, self.data, "data (for the teacher)")
        if self.labels is not None and len(self.labels) != len(self.data):
            raise UserError(f"labels: {len(self.labels)} labels for {len(self.data)} samples")

    def call(self, model: onnx.ModelProto) -> PassResult:
        start = time.perf_counter()
        train_idx, val_idx = self._split()
        base, recalibrated = model, 0
        auto_keep = self.batchnorm == "auto" and statistics_follow_reconstruction(model)
        if self.batchnorm == "recalibrate" or (self.batchnorm == "auto" and not auto_keep):
            base, recalibrated = recalibrate_batchnorm(model, self.data.subset(train_idx), self.threads)
        work, trainable = prepare_for_training(base)
        folded = fold_batchnorms(work, trainable) if self.fold_batchnorm else FoldRecord([], [])
        spec, output_shape, out_names = self._loss_spec(model)
        feature_teacher = self._feature_teacher(base, work, spec, exclude=folded.removed_tensors)
        classes = output_shape[-1] if output_shape else 1
        values = {init.name: onnx.numpy_helper.to_array(init) for init in work.graph.initializer
                  if init.name in set(trainable.names)}
        masks = read_masks(model, values)
        stats: Dict[str, Any] = {
            "loss": spec.describe(),
            "batchnorm_recalibrated": recalibrated,
            "batchnorm_folded": len(folded.folds),
            "trainable_params": trainable.count(work.graph),
            "masked_weights": len(masks),
            "features": list(spec.features),
        }
        if self.config.epochs == 0:
            return PassResult(_finite(base), recalibrated > 0, stats)
        graph = build_training_graph(work, trainable.names, spec, masks)
        # The step model is built (and an op without a gradient rule refused) before the teacher's
        # outputs are computed: a refusal comes in seconds, not after a pass over the data.
        session = TrainingSession(graph, self.optimizer, self.weight_decay, threads=self.threads,
                                  providers=self.providers)
        try:
            # No reference to the teacher's outputs is kept beside the targets made of them (2.1 GB
            # each for the PP-OCRv3 recognizer's 2,000 lines).
            targets = BatchTargets(spec, self.labels, self._teacher_targets(out_names, output_shape, spec), classes,
                                   overwrite=True)
            arrays = self.data.arrays

            def feeds(idx):
                inputs = {k: v[idx] for k, v in arrays.items()}
                extra = feature_teacher.feeds(inputs) if feature_teacher else {}
                return {**inputs, **targets.feeds(idx), **extra}

            frozen = self._probe(session, feeds, train_idx, graph.trainable)
            if self.freeze == "auto" or frozen:  # train from a fresh optimizer state (the probe used it)
                session.close()
                graph = build_training_graph(work, [n for n in graph.trainable if n not in frozen], spec, masks)
                session = TrainingSession(graph, self.optimizer, self.weight_decay, threads=self.threads,
                                          providers=self.providers)
            outcome = train_loop(session, self.config, feeds, self._metric(spec), train_idx, val_idx,
                                 fixed_batch=self.data.fixed_batch, loss_offset=targets.loss_offset)
        finally:
            session.close()
        stats["frozen_weights"] = frozen
        trained = apply_masks(outcome.weights, masks)
        changed = [n for n, v in trained.items() if not np.array_equal(v, values[n])]
        new_values = unfold_values(requantize({n: trained[n] for n in changed}, trainable.fake_quant), folded)
        result = write_back(base, new_values) if changed else base
        stats.update(_training_stats(graph, outcome, len(changed)))
        stats["seconds"] = round(time.perf_counter() - start, 3)
        return PassResult(_finite(result), bool(changed) or recalibrated > 0, stats)

    def _probe(self, session, feeds, train_idx: np.ndarray, names) -> list:
        """The weights to freeze: the named ones, or with ``freeze="auto"`` every weight up to the last
        one whose probe step overshoots (``training.probe``); all of them is none: a model whose
        last weight overshoots trains whole (the best epoch guards the result)."""
        if not isinstance(self.freeze, str):
            unknown = sorted(set(self.freeze) - set(names))
            if unknown:
                raise UserError(f"freeze: {unknown[0]!r} is not a trainable weight of the model")
            return list(self.freeze)
        if self.freeze != "auto" or len(names) < 2:
            return []
        size = self.data.fixed_batch or min(_PROBE_BATCH, len(train_idx))
        count = max(1, min(_PROBE_BATCHES, len(train_idx) // size))
        batches = [feeds(train_idx[i * size:(i + 1) * size]) for i in range(count)]
        # The prefix stays as it is, the layers after it train (training.probe).
        return list(names[: freeze_boundary(session, batches, self.config.lr, names)])

    def _loss_spec(self, model: onnx.ModelProto):
        """(LossSpec, the trained output's shape on a probe batch, the model's output names)."""
        from graphprune.runtime import make_session

        probe = make_session(model, threads=self.threads)
        out_names = [o.name for o in probe.get_outputs()]
        floats = [o.name for o in probe.get_outputs() if o.type == "tensor(float)"]
        output = self.output or (floats[0] if floats else out_names[0])
        if output not in out_names:
            raise UserError(f"model has no output {output!r} (outputs: {', '.join(out_names)})")
        if output not in floats:
            raise UserError(f"output {output!r} is not float32: choose the float output to train with output=NAME")
        first = next(iter(self.data.batches(min(len(self.data), 2))))
        output_shape = tuple(probe.run([output], first)[0].shape)
        logits, head = probability_head(model, output, len(output_shape))
        spec = resolve_loss(output_shape, logits, self.labels, len(self.data), self.teacher is not None,
                            self.loss, self.distill_loss, self.distill_weight, self.temperature, head)
        self._model_output = output
        return spec, output_shape, out_names

    def _feature_teacher(self, student: onnx.ModelProto, work: onnx.ModelProto, spec: LossSpec, exclude=()):
        """Pick the features to match (into ``spec``) and return their ``FeatureTeacher`` (None without).
        ``exclude``: tensors the training graph does not have (Conv outputs folded into their BatchNorm)."""
        if self.teacher is None or self.features == "none" or self.feature_weight == 0:
            return None
        from graphprune.training.features import FeatureTeacher, pick_features

        probe = self.data.first_batch(min(len(self.data), 4) if not self.data.fixed_batch else self.data.fixed_batch)
        present = {o for node in work.graph.node for o in node.output}
        if self.features == "auto":
            names = pick_features(student, self.teacher, probe, exclude=[spec.output, self._model_output, *exclude],
                                  limit=self.max_features, threads=self.threads)
        else:
            missing = [n for n in self.features if n not in present]
            if missing:
                raise UserError(f"features: the model has no tensor {missing[0]!r}")
            names = list(self.features)
        names = [n for n in names if n in present]
        if not names:
            return None
        teacher = FeatureTeacher(self.teacher, names, probe, threads=self.threads)
        spec.features, spec.feature_ranks = names, teacher.ranks
        spec.feature_scales, spec.feature_weight = teacher.scales, self.feature_weight
        return teacher

    def _teacher_targets(self, out_names, output_shape, spec: LossSpec) -> Optional[np.ndarray]:
        """The teacher's outputs on every sample, as the loss reads them (``teacher_targets``), in one array:
        each batch is written into it (not gathered then concatenated) and converted in place."""
        if self.teacher is None:
            return None
        from graphprune.runtime import make_session

        output = self._model_output
        session = make_session(self.teacher, threads=self.threads)
        names = [o.name for o in session.get_outputs()]
        name = output if output in names else names[min(out_names.index(output), len(names) - 1)]
        values, done = None, 0
        for feed in self.data.batches(32):
            batch = session.run([name], feed)[0]
            if tuple(batch.shape[1:]) != tuple(output_shape[1:]):
                raise UserError(f"teacher output {name!r} has shape {list(batch.shape)}, the student's "
                                f"{output!r} has {list(output_shape)}")
            if values is None:
                values = np.empty((len(self.data), *batch.shape[1:]), batch.dtype)
            values[done:done + len(batch)] = batch
            done += len(batch)
        return teacher_targets(values, spec, out=values if values.dtype == np.float32 else None)

    def _split(self):
        """Seeded shuffle of the sample indices into (train, validation)."""
        n = len(self.data)
        order = np.random.default_rng(self.config.seed + 1).permutation(n)
        held = int(round(self.val_split * n))
        fixed = self.data.fixed_batch
        if fixed:
            held -= held % fixed
        if held >= n:
            raise UserError(f"validation split {self.val_split} leaves no training samples out of {n}")
        return np.sort(order[held:]), np.sort(order[:held])

    def _metric(self, spec: LossSpec):
        """Correct-sample counter: label accuracy with class labels, else none, so that the best epoch
        is the one with the lowest validation loss.  (Top-1 agreement with the teacher cannot tell a
        collapsed model: an all-blank CTC recognizer agrees with its teacher on 80% of positions.)"""
        if spec.label_loss == "ce":
            return top1_counter(self.labels)
        return lambda out, idx: None


def _training_stats(graph, outcome, changed: int) -> Dict[str, Any]:
    first, best, trained = outcome.history[0], outcome.history[outcome.best_epoch], outcome.history[1:]
    return {
        "trainable_weights": len(graph.trainable),
        "weights_changed": changed,
        "steps": outcome.steps,
        "best_epoch": outcome.best_epoch,
        "stopped_early": len(outcome.history) - 1 < outcome.planned_epochs,
        "train_loss_first_epoch": trained[0].train_loss,
        "train_loss_last_epoch": trained[-1].train_loss,
        "val_loss_before": first.val_loss,
        "val_loss_best": best.val_loss,
        "val_metric_before": first.val_metric,
        "val_metric_best": best.val_metric,
        "history": [vars(r) for r in outcome.history],
    }


def finetune(model: onnx.ModelProto, data: InputSet, labels: Optional[np.ndarray] = None,
             teacher: Optional[ModelLike] = None, **kwargs) -> onnx.ModelProto:
    """Functional form of ``FineTunePass`` (same arguments)."""
    return FineTunePass(data=data, labels=labels, teacher=teacher, **kwargs)(model).model


def _finite(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a ``UserError`` when a trained weight or statistic is NaN or Inf (nothing non-finite is returned)."""
    from graphprune.validation import check_finite

    try:
        check_finite(model, what="fine-tuned")
    except UserError as exc:
        raise UserError(f"finetune: {exc}: training diverged (lower --lr, or check the data and labels)") from None
    return model
