"""The fine-tuning loop: shuffled mini-batches, a learning-rate schedule, per-epoch validation, best kept."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from graphprune.errors import UserError
from graphprune.progress import progress_bar

__all__ = ["TrainConfig", "EpochRecord", "TrainOutcome", "learning_rate", "train_loop", "SCHEDULES"]

SCHEDULES = ("cosine", "linear", "constant")

# Feeds of the samples at some indices (model inputs and loss targets).
FeedFn = Callable[[np.ndarray], Dict[str, np.ndarray]]
# (model outputs, indices) -> number of "correct" samples, or None when there is no metric.
MetricFn = Callable[[np.ndarray, np.ndarray], Optional[float]]


@dataclasses.dataclass
class TrainConfig:
    """Loop settings.

    Args:
        epochs: passes over the training samples (0: evaluate only, train nothing).
        batch_size: samples per step (models with a fixed batch dimension use theirs).
        lr: peak learning rate.
        schedule: "cosine" (default) or "linear" decay to 0 after a short linear warm-up, or "constant".
        warmup: fraction of the steps spent warming up (at most 100 steps).
        seed: shuffling seed.
        patience: stop after this many epochs without a better validation (None: run every epoch).
        progress: show a progress bar with the running loss and metric.
    """

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup: float = 0.05
    seed: int = 0
    progress: bool = False
    patience: Optional[int] = None

    def check(self) -> None:
        if int(self.epochs) != self.epochs or self.epochs < 0:
            raise UserError(f"epochs must be a non-negative integer, got {self.epochs}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {self.batch_size}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"learning rate must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule {self.schedule!r}: choose {', '.join(SCHEDULES)}")
        if self.patience is not None and (int(self.patience) != self.patience or self.patience < 1):
            raise UserError(f"patience must be a positive integer, got {self.patience}")
        if not 0 <= self.warmup < 1:
            raise UserError(f"warm-up fraction {self.warmup} is outside [0, 1)")


@dataclasses.dataclass
class EpochRecord:
    epoch: int  # 0 = before training
    train_loss: Optional[float]
    train_metric: Optional[float]
    val_loss: Optional[float]
    val_metric: Optional[float]
    seconds: float


@dataclasses.dataclass
class TrainOutcome:
    """What the loop did: per-epoch history and the epoch whose weights it kept."""

    history: List[EpochRecord]
    best_epoch: int
    weights: Dict[str, np.ndarray]
    steps: int
    planned_epochs: int = 0


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """Learning rate of step ``step`` (0-based) out of ``total``."""
    warmup = min(int(config.warmup * total), 100)
    if step < warmup:
        return config.lr * (step + 1) / (warmup + 1)
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(total - warmup, 1)
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(indices: np.ndarray, size: int, drop_last: bool) -> List[np.ndarray]:
    stop = len(indices) - len(indices) % size if drop_last else len(indices)
    return [indices[i : i + size] for i in range(0, stop, size)]


def _evaluate(session, feeds: FeedFn, metric: MetricFn, indices: np.ndarray, size: int, drop_last: bool, offset):
    total_loss, correct, counted = 0.0, 0.0, 0
    has_metric = True
    for batch in _batches(indices, size, drop_last):
        loss, output = session.eval_step(feeds(batch))
        total_loss += (loss + offset(batch)) * len(batch)
        value = metric(output, batch)
        has_metric = has_metric and value is not None
        correct += value or 0.0
        counted += len(batch)
    if not counted:
        return None, None
    return total_loss / counted, (correct / counted if has_metric else None)


def _better(record: EpochRecord, best: EpochRecord) -> bool:
    """Higher validation metric wins; equal metrics (or none) fall back to lower validation loss."""
    if record.val_metric is not None and best.val_metric is not None and record.val_metric != best.val_metric:
        return record.val_metric > best.val_metric
    return record.val_loss < best.val_loss


def train_loop(
    session,
    config: TrainConfig,
    feeds: FeedFn,
    metric: MetricFn,
    train_indices: np.ndarray,
    val_indices: np.ndarray,
    fixed_batch: Optional[int] = None,
    loss_offset: Callable[[np.ndarray], float] = lambda batch: 0.0,
) -> TrainOutcome:
    """Train ``session`` (a ``TrainingSession``) and return the weights of the best validated epoch.

    With validation samples, the model is evaluated before training (epoch 0) and after each epoch;
    the best of these is kept, so fine-tuning never returns weights that validate worse than the
    input's.  Without validation samples the last epoch is kept.  A non-finite loss stops training
    with a ``UserError`` naming the epoch and step.
    """
    config.check()
    size = fixed_batch or int(config.batch_size)
    drop_last = fixed_batch is not None
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = len(_batches(train_indices, size, drop_last))
    if steps_per_epoch == 0 and config.epochs:
        raise UserError(f"{len(train_indices)} training samples make no batch of {size}")
    total = max(steps_per_epoch * int(config.epochs), 1)
    eval_size = max(size, 256) if fixed_batch is None else size
    validate = lambda: _evaluate(session, feeds, metric, val_indices, eval_size, drop_last, loss_offset)  # noqa: E731

    start = time.perf_counter()
    val_loss, val_metric = validate() if len(val_indices) else (None, None)
    history = [EpochRecord(0, None, None, val_loss, val_metric, 0.0)]
    best, best_weights = history[0], session.weights()
    step = 0
    with progress_bar(total=total, desc="fine-tune", enabled=config.progress, unit="step") as bar:
        for epoch in range(1, int(config.epochs) + 1):
            order = rng.permutation(train_indices)
            loss_sum, correct, seen, has_metric = 0.0, 0.0, 0, True
            for batch in _batches(order, size, drop_last):
                lr = learning_rate(config, step, total)
                loss, output = session.train_step(feeds(batch), lr)
                if not np.isfinite(loss):
                    raise UserError(
                        f"fine-tuning stopped: the loss became {loss} at epoch {epoch}, step {step + 1} "
                        f"(learning rate {lr:.3g}); nothing was written - try a lower learning rate"
                    )
                step += 1
                loss_sum += (loss + loss_offset(batch)) * len(batch)
                value = metric(output, batch)
                has_metric = has_metric and value is not None
                correct += value or 0.0
                seen += len(batch)
                bar.update(1)
                postfix = {"epoch": epoch, "loss": f"{loss_sum / seen:.4f}"}
                if has_metric:
                    postfix["metric"] = f"{correct / seen:.4f}"
                bar.set_postfix(postfix, refresh=False)
            val_loss, val_metric = validate() if len(val_indices) else (None, None)
            record = EpochRecord(epoch, loss_sum / seen, correct / seen if has_metric else None,
                                 val_loss, val_metric, time.perf_counter() - start)
            history.append(record)
            if val_loss is None or _better(record, best):
                weights = session.weights()
                bad = [name for name, value in weights.items() if not np.all(np.isfinite(value))]
                if bad:  # the last update overflowed without a step left to show it in the loss
                    raise UserError(f"fine-tuning stopped: weight {bad[0]!r} became non-finite in epoch {epoch}; "
                                    "nothing was written - try a lower learning rate")
                best, best_weights = record, weights
            elif config.patience is not None and epoch - best.epoch >= config.patience:
                break  # early stopping: the held-out split stopped improving
    return TrainOutcome(history=history, best_epoch=best.epoch, weights=best_weights, steps=step,
                        planned_epochs=int(config.epochs))
