"""``graphprune finetune MODEL -o OUT --data FILE.npz [--labels KEY] [--teacher ORIGINAL.onnx] ...``."""

from __future__ import annotations

import json
import sys

from graphprune.cli.common import add_output_options, check_output_path, parse_number, read_inputs, write_model
from graphprune.errors import UserError
from graphprune.model_io import load


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model's weights on plain onnxruntime (labels and/or distillation)",
        description="Train the weights of an ONNX model (e.g. after pruning) with labels, by distillation from "
        "the original model, or both, and write the same graph with the new weights.  No torch needed.",
    )
    p.add_argument("model", help="the ONNX model to fine-tune")
    add_output_options(p)
    p.add_argument("--data", required=True, metavar="FILE.npz", help="training samples, one array per model input")
    p.add_argument("--labels", metavar="KEY", help="array in --data with integer class ids (or float targets)")
    p.add_argument("--teacher", metavar="ORIGINAL.onnx", help="distill from this model (e.g. the unpruned original)")
    p.add_argument("--epochs", default="5", help="passes over the training samples (default 5)")
    p.add_argument("--batch-size", default="32", help="samples per step (default 32)")
    p.add_argument("--lr", default="1e-3", help="peak learning rate (default 1e-3)")
    p.add_argument("--val-split", default="0.1", help="fraction held out for validation; the best epoch is kept (default 0.1)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--weight-decay", default="1e-4", help="AdamW weight decay (default 1e-4)")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine", help="learning-rate schedule")
    p.add_argument("--loss", choices=["auto", "ce", "mse"], default="auto",
                   help="label loss: ce for integer class ids, mse for float targets (default auto)")
    p.add_argument("--distill-loss", choices=["auto", "kl", "mse", "bce"], default="auto",
                   help="distillation loss: kl for class scores, bce for sigmoid outputs, mse otherwise (default auto)")
    p.add_argument("--distill-weight", help="w in (1-w)*label loss + w*distillation loss (default 0.5 with both)")
    p.add_argument("--temperature", default="2", help="distillation temperature (default 2)")
    p.add_argument("--features", default="auto", metavar="auto|none|NAME[,NAME...]",
                   help="with --teacher: also match intermediate tensors to the teacher's (auto: up to "
                   "--max-features tensors both models share and pruning changed; default auto)")
    p.add_argument("--feature-weight", default="1", help="weight of the feature terms beside the output loss (default 1)")
    p.add_argument("--max-features", default="4", help="how many features --features auto matches (default 4)")
    p.add_argument("--patience", metavar="N", help="early stopping: stop after N epochs without a better validation loss")
    p.add_argument("--batchnorm", choices=["auto", "recalibrate", "keep"], default="auto",
                   help="re-estimate BatchNorm statistics from --data before training, or keep them; auto "
                        "(default): keep them after prune --reconstruct, re-estimate otherwise")
    p.add_argument("--freeze", choices=["auto", "none"], default="auto",
                   help="auto (default): the early weights whose joint probe step at --lr raises the loss keep "
                        "their values (none on a model whose full step lowers it); none: train every weight")
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="train each Conv + BatchNorm folded (written back unfolded)")
    p.add_argument("--output-name", metavar="NAME", help="the model output to train (default: the first)")
    p.add_argument("--seed", type=int, default=0, help="shuffling and split seed")
    p.add_argument("--threads", type=int, help="training threads (default: onnxruntime decides)")
    p.add_argument("--providers", metavar="EP[,EP...]",
                   help="onnxruntime execution providers for training, in order (default CPUExecutionProvider), "
                   "e.g. CUDAExecutionProvider,CPUExecutionProvider")
    p.add_argument("--prune-ratio", metavar="R", help="prune this fraction of channels first (with --steps)")
    p.add_argument("--steps", default="1", metavar="K", help="with --prune-ratio: prune in K rounds, fine-tuning after each")
    p.add_argument("--stats", action="store_true", help="print the training statistics as JSON")
    p.set_defaults(func=run)


def _positive_int(text: str, what: str, allow_zero: bool = False) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{what} {text!r} is not an integer") from None
    if value < (0 if allow_zero else 1):
        raise UserError(f"{what} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")
    return value


def _training_args(args) -> dict:
    """Every number checked before any work is done."""
    lr = parse_number(args.lr, "--lr", 0.0, float("inf"))
    if lr <= 0:
        raise UserError(f"--lr must be positive, got {lr}")
    temperature = parse_number(args.temperature, "--temperature", 0.0, float("inf"))
    if temperature <= 0:
        raise UserError(f"--temperature must be positive, got {temperature}")
    return {
        "epochs": _positive_int(args.epochs, "--epochs", allow_zero=True),
        "batch_size": _positive_int(args.batch_size, "--batch-size"),
        "lr": lr,
        "val_split": parse_number(args.val_split, "--val-split", 0.0, 1.0),
        "optimizer": args.optimizer,
        "weight_decay": parse_number(args.weight_decay, "--weight-decay", 0.0, 1.0, high_inclusive=True),
        "schedule": args.schedule,
        "distill_weight": None if args.distill_weight is None
        else parse_number(args.distill_weight, "--distill-weight", 0.0, 1.0, high_inclusive=True),
        "temperature": temperature,
        "loss": args.loss,
        "distill_loss": args.distill_loss,
        "batchnorm": args.batchnorm,
        "freeze": args.freeze,
        "fold_batchnorm": args.fold_batchnorm,
        "features": args.features if args.features in ("auto", "none")
        else [name.strip() for name in args.features.split(",") if name.strip()],
        "feature_weight": parse_number(args.feature_weight, "--feature-weight", 0.0, float("inf")),
        "max_features": _positive_int(args.max_features, "--max-features"),
        "patience": None if args.patience is None else _positive_int(args.patience, "--patience"),
        "output": args.output_name,
        "seed": args.seed,
        "threads": args.threads,
        "progress": sys.stderr.isatty(),
        "providers": _providers(args.providers),
    }


def _providers(text):
    """``--providers`` checked against the providers the installed onnxruntime has."""
    if not text:
        return None
    from graphprune.runtime import ort

    wanted = [name.strip() for name in text.split(",") if name.strip()]
    available = ort().get_available_providers()
    missing = [name for name in wanted if name not in available]
    if missing:
        raise UserError(f"--providers: {', '.join(missing)} not in this onnxruntime (available: {', '.join(available)})")
    return wanted


def run(args) -> int:
    from graphprune.passes.finetune import FineTunePass

    check_output_path(args)
    settings = _training_args(args)
    steps = _positive_int(args.steps, "--steps")
    ratio = None if args.prune_ratio is None else parse_number(args.prune_ratio, "--prune-ratio", 0.0, 1.0)
    if steps > 1 and ratio is None:
        raise UserError("--steps needs --prune-ratio (the fraction of channels to prune in total)")
    if args.labels is None and args.teacher is None:
        raise UserError("give --labels KEY, --teacher ORIGINAL.onnx, or both: fine-tuning needs something to learn from")
    model = load(args.model)
    teacher = load(args.teacher) if args.teacher else None
    data, _, extras = read_inputs(args, model, extra_keys=[args.labels] if args.labels else [])
    settings.update(labels=extras.get(args.labels), teacher=teacher)
    if ratio:
        from graphprune.training.gradual import gradual_prune_pipeline

        if teacher is None:  # the unpruned input is the natural teacher of its pruned versions
            settings["teacher"] = model
        result = gradual_prune_pipeline(ratio, steps, data=data, finetune_args=settings, progress=settings["progress"])(model)
        stats = result.stats
        for record in stats["passes"]:
            detail = record["stats"].get("val_metric_best")
            metric = f" validation metric {detail * 100:.2f}%" if isinstance(detail, float) else ""
            print(f"{record['pass']:<9} {record['seconds']:7.2f}s{metric}")
    else:
        result = FineTunePass(data=data, **settings)(model)
        stats = result.stats
        _print_summary(stats)
    write_model(args, result.model)
    if args.stats:
        print(json.dumps(stats, indent=2, default=str))
    print(f"wrote {args.output}")
    return 0


def _print_summary(stats: dict) -> None:
    print(f"loss: {stats['loss']}; {stats['trainable_params']:,} trainable parameters; "
          f"BatchNorm layers recalibrated: {stats['batchnorm_recalibrated']}")
    if stats.get("features"):
        print(f"features matched to the teacher: {', '.join(stats['features'])}")
    if stats.get("frozen_weights"):
        print(f"frozen (the probe step through them raised the loss): {len(stats['frozen_weights'])} weights")
    if "steps" not in stats:
        return
    metric = lambda v: "n/a" if v is None else f"{v * 100:.2f}%"  # noqa: E731
    print(f"{stats['steps']} steps in {stats['seconds']:.1f}s; train loss {stats['train_loss_first_epoch']:.4f} (epoch 1) "
          f"-> {stats['train_loss_last_epoch']:.4f} (last)")
    if stats["val_loss_before"] is not None:
        epochs = len(stats["history"]) - 1
        if stats.get("stopped_early"):
            print(f"stopped early after epoch {epochs} (no better validation loss for --patience epochs)")
        print(f"validation: metric {metric(stats['val_metric_before'])} -> {metric(stats['val_metric_best'])}, "
              f"loss {stats['val_loss_before']:.4f} -> {stats['val_loss_best']:.4f} (best epoch {stats['best_epoch']})")
