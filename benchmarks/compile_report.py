"""Compile torchvision mobilenet_v2 and resnet18 (last 4 convs, r = 2, 4, 7) and report
backward MACs and bytes held for backward (exact vs filtered, from the manifests: by the
trained convs' backward, and by the whole training graph, ReLU gradients included) and
the largest relative gradient error of the compiled graph against torch autograd with
the NumPy reference operator swapped into the same convs.

    python benchmarks/compile_report.py [--batch 2]

Needs the test extras (torch, torchvision); run from the repository root.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import models  # noqa: E402
import torchref  # noqa: E402

from gfcompiler.driver import CompileOptions, compile_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--archs", default="mobilenet_v2,resnet18")
    args = parser.parse_args()
    import torch

    print(f"{'model':13} {'r':>2} {'filtered':>8} {'bwd MMAC exact':>14} {'bwd MMAC':>9} {'MACs x':>7} "
          f"{'convs held KiB exact':>20} {'convs held KiB':>14} {'graph held KiB exact':>20} {'graph held KiB':>14} "
          f"{'grad rel err':>12}")
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        model = models.torchvision_module(arch, num_classes=10)
        torchref.randomize_batchnorm(model)
        fused = torchref.fused(model)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            torch.onnx.export(fused, torch.randn(args.batch, 3, 224, 224), str(tmp / "m.onnx"), dynamo=False,
                              opset_version=17, input_names=["input"], output_names=["logits"])
            rng = np.random.default_rng(0)
            x = rng.standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
            y = rng.integers(0, 10, args.batch).astype(np.int64)
            for patch in (0, 2, 4, 7):
                out = tmp / f"r{patch}"
                manifest = compile_model(tmp / "m.onnx", out, CompileOptions(layers=4, patch=patch, backend="ort-training"))
                _, grads, values = torchref.ort_gradients(out, x, y)
                reference = copy.deepcopy(fused)
                if patch:
                    torchref.with_filtered_convs(reference, torchref.conv_modules_in_order(reference)[-4:], patch)
                _, pairs = torchref.torch_gradients(reference, x, y)
                expected = torchref.match_by_value(values, pairs)
                error = max(np.abs(grads[n] - expected[n]).max() / (np.abs(expected[n]).max() + 1e-12) for n in grads)
                t = manifest["totals"]
                trained = [layer for layer in manifest["layers"] if layer["trained"]]
                convs_exact = sum(layer["held_bytes_exact"] or 0 for layer in trained)
                convs = sum(layer["held_bytes"] or 0 for layer in trained)
                print(f"{arch:13} {patch:>2} {t['filtered_layers']:>8} {t['backward_macs_exact'] / 1e6:>14.1f} "
                      f"{t['backward_macs'] / 1e6:>9.2f} {t['backward_macs_exact'] / t['backward_macs']:>7.1f} "
                      f"{convs_exact / 1024:>20.0f} {convs / 1024:>14.0f} "
                      f"{t['held_bytes_exact'] / 1024:>20.0f} {t['held_bytes'] / 1024:>14.0f} {error:>12.1e}", flush=True)


if __name__ == "__main__":
    main()
