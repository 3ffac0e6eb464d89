"""Device side: fine-tune compiled artifacts on local data, survive a power cut, export.

Uses only gfcompiler.runtime, numpy and plain onnxruntime (no onnx, no torch), so on a
Raspberry Pi or a Jetson it needs just `pip install --no-deps gfcompiler && pip install
onnxruntime numpy` (see README.md next to this file).

    python train_on_device.py on_device_bundle/artifacts --data on_device_bundle/train.npz \
        --test on_device_bundle/test.npz
    # pull the plug (or `kill -9` it) mid-epoch, then continue where the last checkpoint left off:
    python train_on_device.py on_device_bundle/artifacts --data on_device_bundle/train.npz \
        --test on_device_bundle/test.npz --resume

Every epoch ends with a checkpoint in the run directory (default <artifacts>/run/); the
result is a plain inference model (default <artifacts>/../finetuned.onnx).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gfcompiler.runtime import Trainer, load_dataset, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, help="the artifacts directory copied from the workstation")
    parser.add_argument("--data", type=Path, required=True, help=".npz with x (N×C×H×W float32) and y (labels)")
    parser.add_argument("--test", type=Path, default=None, help="optional held-out .npz: accuracy before/after")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    parser.add_argument("--run-dir", type=Path, default=None, help="checkpoints and metrics (default <artifacts>/run)")
    parser.add_argument("--export", type=Path, default=None, help="inference model to write (default: finetuned.onnx "
                                                                  "next to the artifacts directory)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (CUDA when it works)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    parser.add_argument("--step-delay", type=float, default=0.0,
                        help="sleep this long after each step, to leave time to kill the process by hand "
                             "when trying out --resume on a fast machine")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or args.artifacts / "run"
    export_path = args.export or args.artifacts.resolve().parent / "finetuned.onnx"

    # Accuracy of the model as deployed (skipped on resume: it is the starting point of the
    # first run, not of this one).
    if args.test is not None and not args.resume:
        before = Trainer(args.artifacts, args.device, threads=args.threads)
        test = load_dataset(args.test, before.artifacts)
        print(f"test accuracy before fine-tuning: {before.evaluate(test)['accuracy']:.1%}", flush=True)

    # train() does what `gfc train` does: load the .npz (checked against the model's input),
    # shuffle per (seed, epoch), write a checkpoint at every epoch end -- the checkpoint file
    # first, then state.json naming it with its sha256, each written atomically and fsynced.
    # With resume=True it reloads the state.json checkpoint (verifying the sha256) and
    # continues with the same step count, learning-rate schedule, shuffling and optimizer
    # moments, so the result is bit for bit the one of an uninterrupted run.
    on_step = (lambda position, loss: time.sleep(args.step_delay)) if args.step_delay > 0 else None
    result = train(
        args.artifacts, args.data, run_dir=run_dir, resume=args.resume, overwrite=not args.resume,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule="cosine",
        device=args.device, threads=args.threads, on_step=on_step,
    )
    if result.interrupted:  # Ctrl-C: a checkpoint was taken between two steps
        print("interrupted; run again with --resume to continue", flush=True)
        return 130

    # The trained weights live in the last checkpoint; load them and write a plain inference
    # model (checked against the runtime's own outputs before it replaces anything).
    trainer = Trainer(args.artifacts, args.device, threads=args.threads, checkpoint=result.checkpoint.path)
    if args.test is not None:
        test = load_dataset(args.test, trainer.artifacts)
        print(f"test accuracy after fine-tuning:  {trainer.evaluate(test)['accuracy']:.1%}", flush=True)
    trainer.export(export_path, overwrite=True)
    print(f"exported {export_path} (run it with onnxruntime.InferenceSession)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
