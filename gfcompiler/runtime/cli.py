"""``gfc train``, ``gfc eval`` and ``gfc export``.

`add_commands` registers the three sub-commands on the top-level CLI's argparse
sub-parsers; each sets ``handler`` (a function ``(args) -> exit code``). Handlers raise
GfcError subclasses for problems a user can fix; the top-level CLI prints those as one
line and exits with their code. Modules that import onnxruntime are imported inside
the handlers, so registering the commands costs nothing.

``main`` runs these three commands alone (``python -m gfcompiler.runtime.cli``), for
devices where only the runtime is installed, through the same `run_command` as ``gfc``
(gfcompiler.commandline: one error line, exit codes, ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from gfcompiler.commandline import DATA_HELP, DEVICE_HELP, add_debug_flag, run_command
from gfcompiler.errors import EXIT_INTERRUPTED


def add_commands(subparsers) -> None:
    """Register ``train``, ``eval`` and ``export`` on an argparse sub-parsers object."""
    train = subparsers.add_parser(
        "train",
        help="fine-tune compiled artifacts on data",
        description="Train the compiled model on data; checkpoints and metrics.jsonl go to the run directory.",
    )
    _artifacts_argument(train)
    train.add_argument("--data", required=True, help=DATA_HELP)
    train.add_argument("--val-data", help="data evaluated after every epoch (same forms as --data)")
    train.add_argument("--epochs", type=int, help="total epochs (default 5; with --resume: the stored value)")
    train.add_argument("--batch-size", type=int, help="batch size (default 32, or the model's fixed batch)")
    train.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    train.add_argument("--schedule", choices=("constant", "warmup", "linear", "cosine"),
                       help="learning-rate schedule (default constant)")
    train.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 5%% of the steps; 0 for constant)")
    train.add_argument("--seed", type=int, help="shuffling seed (default 0)")
    train.add_argument("--drop-last", action="store_true", default=None, help="drop each epoch's last partial batch")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    train.add_argument("--overwrite", action="store_true", help="discard the run directory's checkpoint and start over")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    _session_arguments(train)
    _preprocess_arguments(train)
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser(
        "eval",
        help="evaluate the trained (or initial) model on data",
        description="Loss and accuracy (segmentation: pixel accuracy and mean IoU; per-class IoU with --json) of the "
                    "run directory's checkpoint (or, with --initial, the compiled weights).",
    )
    _artifacts_argument(evaluate)
    evaluate.add_argument("--data", required=True, help=DATA_HELP)
    evaluate.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    evaluate.add_argument("--initial", action="store_true", help="evaluate the compiled weights, not the trained ones")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    _session_arguments(evaluate)
    _preprocess_arguments(evaluate)
    evaluate.set_defaults(handler=run_eval)

    export = subparsers.add_parser(
        "export",
        help="write a plain inference ONNX model with the trained weights",
        description="Export the eval model without its loss, with the trained weights, verified against the runtime.",
    )
    _artifacts_argument(export)
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--initial", action="store_true", help="export the compiled weights, not the trained ones")
    export.add_argument("--force", action="store_true", help="replace an existing output file")
    _session_arguments(export, device=False)
    export.set_defaults(handler=run_export)


def _artifacts_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", help="the directory written by gfc compile")


def _session_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        parser.add_argument("--device", default="auto", help=DEVICE_HELP)
        parser.add_argument("--threads", type=int, help="CPU threads (default: onnxruntime's choice)")
    parser.add_argument("--run-dir", help="checkpoints and metrics (default: ARTIFACTS/run)")


def _preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "image preprocessing (default: manifest.json's, else resize to the model input and scale by 1/255)"
    )
    group.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), help="resize images to H×W")
    group.add_argument("--scale", type=float, help="multiply pixel values (0–255) by this")
    group.add_argument("--mean", type=float, nargs="+", help="per-channel mean subtracted after scaling")
    group.add_argument("--std", type=float, nargs="+", help="per-channel std divided by after the mean")


def _preprocess(args, artifacts):
    from gfcompiler.runtime.data import Preprocess

    return Preprocess.for_model(artifacts, resize=args.resize, scale=args.scale, mean=args.mean, std=args.std)


@contextlib.contextmanager
def _checkpoint(args, artifacts):
    """(checkpoint path or None, description) for eval / export: a verified private copy of the run
    directory's committed checkpoint (safe while ``gfc train`` writes there), deleted afterwards."""
    from gfcompiler.runtime.checkpoints import RunDir, default_run_dir

    if args.initial:
        yield None, "the compiled initial weights"
        return
    runs = RunDir(args.run_dir or default_run_dir(artifacts), artifacts)
    with runs.reading() as record:
        if record is None:
            yield None, f"the compiled initial weights (no checkpoint in {runs.path})"
        else:
            yield record.load_path, f"checkpoint {record.describe()}"


def run_train(args) -> int:
    from gfcompiler.runtime.artifacts import open_artifacts
    from gfcompiler.runtime.loop import train
    from gfcompiler.runtime.progress import Progress

    artifacts = open_artifacts(args.artifacts)
    progress = Progress(enabled=not args.quiet)
    result = train(
        artifacts, args.data, val=args.val_data, run_dir=args.run_dir, resume=args.resume,
        overwrite=args.overwrite, device=args.device, threads=args.threads,
        preprocess=_preprocess(args, artifacts), progress=progress,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
        warmup_steps=args.warmup_steps, seed=args.seed, drop_last=args.drop_last,
    )
    if result.interrupted:
        return EXIT_INTERRUPTED
    where = result.checkpoint.path if result.checkpoint else "(not saved)"
    progress.message(f"done at step {result.position.global_step}; checkpoint {where}")
    return 0


def run_eval(args) -> int:
    from gfcompiler.runtime.artifacts import open_artifacts
    from gfcompiler.runtime.data import load_dataset
    from gfcompiler.runtime.trainer import Trainer

    artifacts = open_artifacts(args.artifacts)
    dataset = load_dataset(args.data, artifacts, _preprocess(args, artifacts))
    with _checkpoint(args, artifacts) as (checkpoint, weights):
        trainer = Trainer(artifacts, args.device, threads=args.threads, checkpoint=checkpoint)
    result = trainer.evaluate(dataset, batch_size=args.batch_size)
    if args.json:
        names = {"class_names": list(dataset.classes)} if dataset.classes is not None and artifacts.segmentation else {}
        print(json.dumps({**result, **names, "data": dataset.source, "weights": weights,
                          "device": trainer.device.ort_device}))
        return 0
    print(f"loss {result['loss']:.4f}{_scores(result)} on {result['samples']} samples of {dataset.source}")
    print(f"weights: {weights}; device: {trainer.device.describe()}", file=sys.stderr)
    return 0


def _scores(result: dict) -> str:
    """``, accuracy 91.20%`` (classifiers) or ``, pixel accuracy 95.10%, mean IoU 61.30%`` (segmentation)."""
    def percent(value) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    if "mean_iou" in result:
        return f", pixel accuracy {percent(result['pixel_accuracy'])}, mean IoU {percent(result['mean_iou'])}"
    return f", accuracy {percent(result['accuracy'])}" if "accuracy" in result else ""


def run_export(args) -> int:
    from gfcompiler.runtime.artifacts import open_artifacts
    from gfcompiler.runtime.trainer import Trainer

    artifacts = open_artifacts(args.artifacts)
    with _checkpoint(args, artifacts) as (checkpoint, weights):
        trainer = Trainer(artifacts, "cpu", checkpoint=checkpoint)
    path = trainer.export(args.output, overwrite=args.force)
    outputs = f"outputs {artifacts.output.name!r} and 'classes' (N×H×W class map)" if artifacts.segmentation else ""
    print(f"wrote {path} ({weights}); verified against the runtime's eval outputs" + (f"; {outputs}" if outputs else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The three runtime commands on their own, run as ``gfc`` runs them."""
    parser = argparse.ArgumentParser(prog="gfc", description="Train, evaluate and export gfcompiler artifacts.")
    add_debug_flag(parser)
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_command(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
