"""Workstation side: compile a model for on-device fine-tuning and write the device's data.

Writes into --out (default ./on_device_bundle):

    artifacts/         the compiled training artifacts: copy this whole directory to the device
    train.npz          the device's own data to fine-tune on (x: N×1×28×28 float32 in [0, 1], y: int64)
    test.npz           held-out data the device reports accuracy on
    deployed.onnx      the model "already deployed" (the compiler's input; the device does not need it)

Needs the compiler (onnx, onnx-ir, networkx: `pip install gfcompiler`), not torch.
Data: scikit-learn's 8×8 digits upsampled to 28×28 if scikit-learn is installed, else a
synthetic 10-class set (bright square at a class-dependent position), so it runs anywhere.

    python examples/on_device/prepare_on_workstation.py                 # ~30 s on 2 cores
    python examples/on_device/prepare_on_workstation.py --pretrain-epochs 0 --samples 128   # CI-sized
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from gfcompiler.demo import build_cnn  # the `gfc demo` CNN: 4 conv3×3-relu, global pool, Gemm (onnx.helper, no torch)
from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.runtime import Dataset, train
from gfcompiler.runtime.data import resize_bilinear


def load_images(samples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, description): x N×1×28×28 float32 in [0, 1], y int64 in 0..9."""
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        load_digits = None
    if load_digits is not None:
        digits = load_digits()
        raw = digits.images.astype(np.float32)[:, None] / 16.0  # 8×8, values 0..16
        x, y, what = resize_bilinear(raw, (28, 28)), digits.target.astype(np.int64), "scikit-learn digits, 28×28"
    else:  # synthetic: a noisy 8×8 bright square whose position encodes the class
        n = 1800
        y = rng.integers(0, 10, n).astype(np.int64)
        x = rng.uniform(0, 0.3, (n, 1, 28, 28)).astype(np.float32)
        for i, label in enumerate(y):
            row, col = 2 + 9 * (label // 4), 2 + 6 * (label % 4)
            x[i, 0, row:row + 8, col:col + 8] += 0.7
        what = "synthetic squares (scikit-learn not installed)"
    order = rng.permutation(len(y))
    if samples:
        order = order[:samples]
    return np.ascontiguousarray(x[order], dtype=np.float32), y[order], what


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("on_device_bundle"), help="output directory (replaced)")
    parser.add_argument("--layers", default="2", help="train the last N convs (gfc compile --layers; default 2)")
    parser.add_argument("--patch", type=int, default=2, help="gradient-filter patch size r; 0 = exact backward")
    parser.add_argument("--pretrain-epochs", type=int, default=6,
                        help="epochs of whole-model training on the workstation standing in for your "
                             "pretrained model (0: keep the random initialisation; fast, for CI)")
    parser.add_argument("--samples", type=int, default=None, help="use only this many images (CI: 128)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "work").mkdir(parents=True)
    x, y, what = load_images(args.samples, seed=0)
    # Half the images "stay on the workstation" (pretraining), half are the device's own data,
    # seen through a different camera: lower contrast, a grey background and sensor noise, so
    # the deployed model does worse on them and fine-tuning on the device has something to recover.
    half = len(y) // 2
    noise = np.random.default_rng(1).normal(0, 0.15, x[half:].shape).astype(np.float32)
    device_x, device_y = np.clip(0.4 + 0.5 * x[half:] + noise, 0, 1).astype(np.float32), y[half:]
    n_test = max(len(device_y) // 4, 1)
    np.savez(out / "train.npz", x=device_x[n_test:], y=device_y[n_test:])
    np.savez(out / "test.npz", x=device_x[:n_test], y=device_y[:n_test])
    print(f"data: {what}: {len(device_y) - n_test} training and {n_test} test images for the device")

    # 1. The deployed model. In real use this is your own pretrained .onnx (a PyTorch export
    #    works: see examples/pytorch_to_finetuned.py); here the demo CNN, briefly trained.
    deployed = out / "deployed.onnx"
    build_cnn(out / "work" / "cnn.onnx", seed=0)
    if args.pretrain_epochs > 0:
        compile_model(out / "work" / "cnn.onnx", out / "work" / "pretrain", CompileOptions(layers="all", patch=0))
        result = train(out / "work" / "pretrain", Dataset(x[:half], y[:half], "workstation images"),
                       run_dir=out / "work" / "pretrain-run", epochs=args.pretrain_epochs, lr=1e-2,
                       schedule="cosine", device="cpu", threads=args.threads)
        from gfcompiler.runtime import Trainer
        Trainer(out / "work" / "pretrain", "cpu", checkpoint=result.checkpoint.path).export(deployed)
    else:
        shutil.copy(out / "work" / "cnn.onnx", deployed)

    # 2. Compile it for the device: the default backend "onnx" emits a standard-ONNX training
    #    step that plain onnxruntime (CPU, CUDA, ARM builds alike) runs. Same as
    #    `gfc compile deployed.onnx -o artifacts --layers 2 --patch 2`.
    layers = int(args.layers) if args.layers.isdigit() else args.layers
    manifest = compile_model(deployed, out / "artifacts", CompileOptions(layers=layers, patch=args.patch, backend="onnx"))
    shutil.rmtree(out / "work")
    totals = manifest.get("totals", {})
    print(f"compiled: {out / 'artifacts'} ({totals.get('filtered_layers', 0)} filtered convs, patch {args.patch})")
    for path in sorted((out / "artifacts").iterdir()):
        print(f"  {path.name:28s} {path.stat().st_size / 1024:8.1f} KiB")
    print(f"\ncopy to the device: {out / 'artifacts'}/, {out / 'train.npz'}, {out / 'test.npz'} "
          "and examples/on_device/train_on_device.py; then run there:\n"
          f"  python train_on_device.py {out / 'artifacts'} --data {out / 'train.npz'} --test {out / 'test.npz'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
