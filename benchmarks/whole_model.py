"""Whole models: exact vs gradient-filtered training steps of torchvision mobilenet_v2 and resnet18.

For each architecture (224x224 input, random seeded weights, legacy exporter, BN folded;
exported by ``tests/models.torchvision_onnx`` with a dynamic batch that ``gfc bench`` fixes)
and each number of trained layers (last 1, 2, 4 convs), runs the machinery of ``gfc bench``
(`gfcompiler.bench.run_bench`): the exact baseline and r = 2, 4, 7, for one or both backends
(``--backend``; default: ort-training and onnx where onnxruntime-training is installed),
each step through `gfcompiler.runtime.Trainer`, timed in interleaved rounds in one process,
with the trained convs' backward (and the onnx step model's optimizer) from onnxruntime's
profiler, the forward-only time of an optimized inference session, peak memory per variant in its own
process, and the manifest's held bytes (whole graph and trained convs) and backward MACs.

    python benchmarks/whole_model.py --threads 2 --wait-idle 600 --json whole_model.json \
        --plot benchmarks/whole_model.png --markdown

Needs the test extras (torch, torchvision for the exports) and matplotlib for ``--plot``;
run from the repository root. With the defaults it takes about 10 minutes on an idle 2-core
machine (plus any waiting for it to become idle).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import models  # noqa: E402

from gfcompiler import bench  # noqa: E402


def _ms(stats: dict | None) -> str:
    return "-" if not stats else f"{stats['median_ms']:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _peak(mem: dict) -> str:
    if "step_peak_kib" not in mem:
        return "-"
    text = f"{mem['step_peak_kib'] / 1024:.1f}"
    if mem.get("runs", 1) > 1:
        text += f" ({mem['step_peak_kib_min'] / 1024:.0f}–{mem['step_peak_kib_max'] / 1024:.0f})"
    return text


def summary_markdown(reports: list[tuple[str, int, dict]]) -> str:
    """One markdown table over every (architecture, layers) report; ratios are filtered/exact."""
    header = ("model", "layers", "variant", "backend", "step ms (±IQR)", "×exact", "×ort", "step/fwd", "trained bwd ms",
              "×exact", "gf fwd ms", "optim ms", "step peak MiB (min–max)", "×exact", "held MiB", "×exact", "convs held MiB", "×exact",
              "bwd MMAC", "×exact")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|"]
    for arch, layers, report in reports:
        for row in report["variants"]:
            p, mem, st, ratios = row["profile"] or {}, row["memory"] or {}, row["static"], row["ratios"]
            variant = row["label"]
            if row["patch"] and row["filtered_layers"] != row["trained_layers"]:
                variant += f" ({row['filtered_layers']}/{row['trained_layers']} filtered)"
            lines.append("| " + " | ".join((
                arch, str(layers), variant, row.get("backend", "ort-training"),
                f"{row['step']['median_ms']:.1f} ±{row['step']['iqr_ms']:.1f}", _x(ratios["step"]),
                _x(ratios.get("step_vs_ort_training")),
                _x(row["step_over_forward"]),
                _ms(p.get("trained_bwd")), _x(ratios["trained_bwd"]),
                _ms(p.get("gf_fwd")) if row["patch"] else "-", _ms(row["optimizer"]),
                _peak(mem), _x(ratios["step_peak"]),
                f"{st['held_bytes'] / 2**20:.2f}", _x(ratios["held_bytes"]),
                f"{st['convs_held_bytes'] / 2**20:.2f}", _x(ratios["convs_held_bytes"]),
                f"{st['backward_macs'] / 1e6:.1f}", _x(ratios["backward_macs"]),
            )) + " |")
    lines.append("")
    lines.append("| model | layers | forward-only ms (±IQR) | other processes' CPU while timing, cores "
                 "| rounds measured again | busy rounds kept |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for arch, layers, report in reports:
        env = report["environment"]
        other = env.get("other_cpu_cores_while_timing")
        lines.append(f"| {arch} | {layers} | {report['forward']['median_ms']:.1f} ±{report['forward']['iqr_ms']:.1f} | "
                     f"{'-' if other is None else f'{other:.2f}'} | {env.get('rounds_measured_again', '-')} "
                     f"| {env.get('rounds_kept_busy', '-')} |")
    return "\n".join(lines)


def merged_reports(paths: list[str]) -> list[tuple[str, int, dict]]:
    """(arch, layers, report) from --json files, in first-seen order; later files win."""
    merged: dict[tuple[str, int], dict] = {}
    for path in paths:
        for report in json.loads(Path(path).read_text())["reports"]:
            merged[(report["arch"], len(report["trained_convs"]))] = report
    return [(arch, layers, report) for (arch, layers), report in merged.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="mobilenet_v2,resnet18")
    parser.add_argument("--layers", default="1,2,4", help="numbers of trained (last) convs")
    parser.add_argument("--patch", default="2,4,7")
    parser.add_argument("--backend", choices=bench.BACKEND_CHOICES, default=None,
                        help="onnx, ort-training or both (default: both where onnxruntime-training is installed)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=60, help="interleaved timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--memory-runs", type=int, default=3, help="fresh processes per variant for peak memory")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each configuration and each timed round, wait up to this long for other "
                             "processes to go idle; rounds during which they were busy are measured again")
    parser.add_argument("--json", help="write every report here")
    parser.add_argument("--plot", help="write a chart (PNG) here; needs matplotlib")
    parser.add_argument("--markdown", action="store_true", help="also print the summary as a markdown table")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="measure nothing: render --markdown/--plot from earlier --json files (a configuration "
                             "in a later file replaces the same one in an earlier file)")
    args = parser.parse_args(argv)
    if args.plot:
        bench.require_matplotlib()
    if args.from_json:
        reports = merged_reports(args.from_json)
        print(summary_markdown(reports))
        if args.plot:
            bench.plot([r for _, _, r in reports], args.plot, titles=[f"{arch} last {layers}" for arch, layers, _ in reports])
        return 0

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    started, load_start = time.time(), os.getloadavg()
    reports: list[tuple[str, int, dict]] = []
    for arch in args.archs.split(","):
        model = models.torchvision_onnx(arch, batch=None)
        for layers in (int(n) for n in args.layers.split(",")):
            print(f"{arch}, last {layers} conv(s) ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
            options = bench.BenchOptions(
                layers=layers, patches=bench.parse_patches(args.patch), batch=args.batch, repeats=args.repeats,
                warmup=args.warmup, threads=args.threads, profile_steps=args.profile_steps, wait_idle=args.wait_idle,
                memory_runs=args.memory_runs, backend=args.backend,
            )
            idle_before = bench.wait_for_idle(args.wait_idle, 0.15, 3.0) if args.wait_idle else None
            report = bench.run_bench(model, options, progress)
            report["arch"] = arch
            report["environment"]["other_cpu_cores_before"] = idle_before
            reports.append((arch, layers, report))
            print(f"\n## {arch}, last {layers} conv(s)\n\n{bench.render_table(report)}\n", flush=True)
    load_end = os.getloadavg()
    elapsed = time.time() - started
    print(f"total {elapsed / 60:.1f} min; load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    if args.markdown:
        print("\n" + summary_markdown(reports))
    if args.json:
        meta = {"elapsed_s": elapsed, "load_average_start": load_start, "load_average_end": load_end}
        Path(args.json).write_text(json.dumps({"meta": meta, "reports": [r for _, _, r in reports]}, indent=2) + "\n")
    if args.plot:
        bench.plot([r for _, _, r in reports], args.plot,
                   titles=[f"{arch} last {layers}" for arch, layers, _ in reports])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
