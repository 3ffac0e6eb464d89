"""The human-readable report of `run_bench`: a time table and a memory/compute table."""

from __future__ import annotations

from pathlib import Path

from gfcompiler.manifest import BACKEND_ORT_TRAINING


def _num(ms: float) -> str:
    return f"{ms:.2f}" if abs(ms) < 10 else f"{ms:.1f}"


def _ms(s: dict | None, iqr: bool = True) -> str:
    if not s:
        return "-"
    return f"{_num(s['median_ms'])} ±{_num(s['iqr_ms'])}" if iqr else _num(s["median_ms"])


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _columns(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    def line(row):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _variant_name(row: dict) -> str:
    name = row["label"]
    if row["patch"] and row["filtered_layers"] != row["trained_layers"]:
        name += f" ({row['filtered_layers']}/{row['trained_layers']} filtered)"
    return name


def _backend(row: dict) -> str:
    return row.get("backend", BACKEND_ORT_TRAINING)  # reports from before --backend: ort-training


def render_table(report: dict) -> str:
    """The human-readable report: a time table and a memory/compute table."""
    env = report["environment"]
    load = env.get("load_average_start"), env.get("load_average_end")
    threads = report["threads"] or "default"
    rows_in = report["variants"]
    lines = [
        f"{Path(report['model']).name}: batch {report['batch']}, {report['layers']} trained, "
        f"onnxruntime {env['onnxruntime']}, {threads} intra-op threads, {env['cpus']} CPUs"
        + (f", load {load[0][0]:.2f} -> {load[1][0]:.2f}" if load[0] and load[1] else "")
        + ("" if (other := env.get("other_cpu_cores_while_timing")) is None
           else f", other processes used {other:.2f} cores while timing")
        + (f" ({env['rounds_measured_again']} rounds measured again, {env['rounds_kept_busy']} kept busy)"
           if env.get("idle_wait_s") else ""),
        f"step: Trainer.train_step, median ±IQR of {report['repeats']} interleaved rounds; x exact: median of "
        f"per-round ratios (filtered/exact, same backend); kernels: onnxruntime profiler, median of "
        f"{report['profile_steps']} steps",
        "",
    ]
    compared = any(row["ratios"].get("step_vs_single_graph") for row in rows_in)
    versus_ort = any(row["ratios"].get("step_vs_ort_training") is not None for row in rows_in)
    header = ("variant", "backend", "step ms", "x exact", *(("x 1-graph",) if compared else ()),
              *(("x ort",) if versus_ort else ()), "step/fwd", "trained bwd ms", "x exact",
              *(("x ort",) if versus_ort else ()), "prefix ms", "gf fwd ms", "fwd ms", "other bwd ms", "optim ms",
              "unattr ms", "rest ms")
    rows = []
    for row in rows_in:
        p, ratios = row["profile"] or {}, row["ratios"]
        rows.append((
            _variant_name(row), _backend(row), _ms(row["step"]), _x(ratios["step"]),
            *((_x(ratios.get("step_vs_single_graph")),) if compared else ()),
            *((_x(ratios.get("step_vs_ort_training")),) if versus_ort else ()),
            _x(row["step_over_forward"]),
            _ms(p.get("trained_bwd")), _x(ratios["trained_bwd"]),
            *((_x(ratios.get("trained_bwd_vs_ort_training")),) if versus_ort else ()),
            _ms(row.get("prefix"), iqr=False),
            _ms(p.get("gf_fwd"), iqr=False) if row["patch"] else "-", _ms(p.get("fwd"), iqr=False),
            _ms(p.get("other_bwd"), iqr=False), _ms(row["optimizer"], iqr=False),
            "-" if p.get("unmatched_ms") is None else _num(p["unmatched_ms"]),
            "-" if row["rest_ms"] is None else _num(row["rest_ms"]),
        ))
    lines += _columns(header, rows)
    for row in rows_in:
        if row.get("form") == "single_graph" and not row["key"].endswith("-1graph") and row.get("single_graph_reason"):
            lines.append(f"{row['label']}: single graph ({row['single_graph_reason']})")
    lines.append("prefix: the frozen layers' optimized InferenceSession (two-stage artifacts); fwd/other bwd: "
                 "the training session's kernels; rest: the step minus kernels, prefix and optimizer")
    lines.append("unattr: kernels of nodes onnxruntime inserted (layout reorders) that match no graph node, "
                 "counted in fwd before the run's first backward kernel, else in other bwd")
    if any(row.get("optimizer_source") == "profiler" for row in rows_in):
        lines.append("optim: ort-training: the optimizer session's step, timed; onnx: the step model's optimizer "
                     "kernels (profiler; the update runs in the step's one session)")
    if versus_ort:
        lines.append("x ort: onnx / ort-training (two-stage) of the same variant; step: median of per-round ratios")
    lines.append(f"forward-only (optimized InferenceSession, same batch): {_ms(report['forward'])} ms")
    lines.append("")
    header = ("variant", "backend", "step peak MiB", "x exact", *(("x 1-graph",) if compared else ()),
              *(("x ort",) if versus_ort else ()), "process peak MiB",
              "held MiB", "x exact", "convs held MiB", "x exact", "bwd MMAC", "x exact")
    rows = []
    for row in rows_in:
        mem, static, ratios = row["memory"] or {}, row["static"], row["ratios"]
        rows.append((
            _variant_name(row), _backend(row),
            f"{mem['step_peak_kib'] / 1024:.1f}" if "step_peak_kib" in mem else "-", _x(ratios["step_peak"]),
            *((_x(ratios.get("step_peak_vs_single_graph")),) if compared else ()),
            *((_x(ratios.get("step_peak_vs_ort_training")),) if versus_ort else ()),
            f"{mem['process_peak_kib'] / 1024:.1f}" if "process_peak_kib" in mem else "-",
            f"{static['held_bytes'] / 2**20:.2f}", _x(ratios["held_bytes"]),
            f"{static['convs_held_bytes'] / 2**20:.2f}", _x(ratios["convs_held_bytes"]),
            f"{static['backward_macs'] / 1e6:.1f}", _x(ratios["backward_macs"]),
        ))
    lines += _columns(header, rows)
    runs = next((row["memory"]["runs"] for row in rows_in if row["memory"]), 0)
    lines.append("step peak: resident-set peak of a first training step over the resident set before it "
                 f"(fresh process, CPU arena off; median of {runs})")
    lines.append("held: bytes the training graph keeps from forward to backward; convs held: the trained convs' share "
                 "(manifest, static); bwd MMAC: trained convs' backward")
    return "\n".join(lines)
