"""Compile, train and export from Python: gfcompiler without the command line.

    pip install "gfcompiler[demo]"        # scikit-learn (the digits data set); no torch needed
    python examples/python_api.py         # ~10 seconds on 2 CPU cores
    python examples/python_api.py --epochs 1 --train-samples 200   # smaller (CI)

For programs that embed gfcompiler and bring their own data pipeline:

1. an ONNX CNN (gfcompiler's small demo CNN, random weights; any ONNX CNN works);
2. gfcompiler.driver.compile_model(...) with CompileOptions (what `gfc compile` does);
3. gfcompiler.runtime.Trainer with our own loop: numpy batching and augmentation, and a
   warm-up + cosine learning-rate schedule computed here and passed to trainer.step();
4. trainer.evaluate(), trainer.save_checkpoint() (and resuming from it), trainer.export();
5. the exported model in a plain onnxruntime.InferenceSession.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gfcompiler.artifacts import OptimizerSpec
from gfcompiler.demo import build_cnn
from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.runtime import Trainer


def load_digits_split(train_samples: int, seed: int = 0):
    """scikit-learn's 8×8 digits as N×1×8×8 float32 in 0..1, split into train and test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:train_samples], order[train_samples:]
    return (x[train], y[train]), (x[test], y[test])


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Our own augmentation: shift each image by up to one pixel, add a little noise."""
    out = np.zeros_like(x)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i, (dy, dx) in enumerate(rng.integers(0, 3, size=(len(x), 2))):
        out[i] = padded[i, :, dy : dy + 8, dx : dx + 8]
    return out + rng.normal(0, 0.05, out.shape).astype(np.float32)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="default 10")
    parser.add_argument("--train-samples", type=int, default=1400, help="of the 1797 digits; the rest is the test set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--layers", default="3", help="train the last N convs (default 3 of 4), or 'all'")
    parser.add_argument("--patch", type=int, default=2, help="gradient-filter patch size (0 = exact backward)")
    parser.add_argument("--work", help="working directory (default: a new temporary one)")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="gfc-api-example-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = load_digits_split(args.train_samples)
    print(f"digits: {len(x_train)} train, {len(x_test)} test images of 1×8×8")

    # 1. An ONNX CNN with a dynamic batch: conv3×3-relu ×4 (spatial 8, 8, 4, 4) -> pool -> Gemm.
    model = build_cnn(work / "cnn.onnx", channels=(16, 32, 64, 64), strides=(1, 1, 2, 1),
                      input_shape=(1, 8, 8), classes=10)

    # 2. Compile. Every `gfc compile` option is a CompileOptions field.
    layers = args.layers if args.layers == "all" else int(args.layers)
    options = CompileOptions(layers=layers, patch=args.patch, loss="cross_entropy",
                             optimizer=OptimizerSpec("adamw", weight_decay=1e-4), force=True)
    artifacts = work / "artifacts"
    compile_model(model, artifacts, options)
    print(f"compiled {model.name} -> {artifacts} (last {args.layers} convs trained, patch {args.patch})")

    # 3. Our own training loop.
    trainer = Trainer(artifacts, device="cpu")
    rng = np.random.default_rng(0)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = max(1, total // 10)
    step = 0
    print(f"before training: test accuracy {trainer.evaluate((x_test, y_test))['accuracy']:.1%}")
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        losses = []
        for first in range(0, len(order), args.batch_size):
            batch = order[first : first + args.batch_size]
            lr = learning_rate(step, total, args.lr, warmup)
            losses.append(trainer.step(augment(x_train[batch], rng), y_train[batch], lr=lr))
            step += 1
        result = trainer.evaluate((x_test, y_test))  # {"loss", "accuracy", "samples"}
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {np.mean(losses):.4f}, lr {lr:.2e}, "
              f"test loss {result['loss']:.4f}, test accuracy {result['accuracy']:.1%}")

    # 4. Save the whole training state, and check that a new Trainer resumes from it.
    checkpoint = work / f"state{trainer.checkpoint_suffix}"  # .npz for the default onnx backend
    trainer.save_checkpoint(checkpoint)
    resumed = Trainer(artifacts, device="cpu", checkpoint=checkpoint)
    print(f"checkpoint {checkpoint}: resumed test accuracy {resumed.evaluate((x_test, y_test))['accuracy']:.1%}")

    finetuned = trainer.export(work / "finetuned.onnx", overwrite=True)  # verified against the trainer
    print(f"exported {finetuned}")

    # 5. Plain onnxruntime runs the exported model: no gfcompiler needed on the device.
    import onnxruntime as ort

    session = ort.InferenceSession(str(finetuned), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x_test[:10]})[0]
    print(f"InferenceSession predictions: {logits.argmax(axis=1).tolist()}")
    print(f"true labels:                  {y_test[:10].tolist()}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
