"""``--plot``: bar charts of one or more `run_bench` reports (needs matplotlib, the bench extra)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from gfcompiler.bench.options import CATEGORIES, CATEGORY_TITLES, PLOT_INSTALL_HINT
from gfcompiler.bench.report import _num
from gfcompiler.errors import InputError


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError(PLOT_INSTALL_HINT)


def plot(reports: list[dict], path: os.PathLike | str, titles: list[str] | None = None) -> None:
    """Bar charts of one or more reports: step time by part (with the forward-only time),
    the trained convs' backward time, and step peak memory; variants grouped per report."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    titles = titles or [f"{Path(r['model']).stem}, {r['layers']}" for r in reports]
    colors = {"prefix": "#5b7fa8", "fwd": "#9db4d0", "gf_fwd": "#e8a33d", "trained_bwd": "#c0392b", "other_bwd": "#7f8c8d",
              "optimizer": "#8e6fb5", "rest": "#d5d8dc"}
    positions, labels, group_centers = [], [], []
    several_backends = len({row.get("backend", "ort-training") for report in reports for row in report["variants"]}) > 1
    x = 0.0
    for report in reports:
        start = x
        for row in report["variants"]:
            positions.append(x)
            label = row["label"].replace("r=", "r").replace(" 1-graph", "\n1-graph")
            labels.append(label + (f"\n{row.get('backend', 'ort-training')}" if several_backends else ""))
            x += 1
        group_centers.append((start + x - 1) / 2)
        x += 0.8
    two_line = any("\n" in label for label in labels)
    label_lines = max(label.count("\n") + 1 for label in labels)
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0 if two_line else 6.0, 0.55 * len(positions) + 2.5), 9.5), sharex=True,
                             gridspec_kw={"height_ratios": [2.2, 1.2, 1.2]})
    step_ax, bwd_ax, mem_ax = axes
    rows = [row for report in reports for row in report["variants"]]
    bottoms = np.zeros(len(rows))
    profiled = any(row["profile"] for row in rows)
    for part in ("prefix", *CATEGORIES, "optimizer", "rest") if profiled else ():
        heights = []
        for row in rows:
            p = row["profile"] or {}
            if part == "prefix":
                heights.append((row.get("prefix") or {}).get("median_ms", 0.0))
            elif part == "rest":
                heights.append(max(row["rest_ms"] or 0.0, 0.0))
            elif part == "optimizer":
                heights.append((row["optimizer"] or {}).get("median_ms", 0.0))
            else:
                heights.append((p.get(part) or {}).get("median_ms", 0.0))
        heights = np.asarray(heights)
        step_ax.bar(positions, heights, 0.8, bottom=bottoms, color=colors[part], label=CATEGORY_TITLES[part])
        bottoms += heights
    steps = [row["step"] for row in rows]
    step_ax.errorbar(positions, [s["median_ms"] for s in steps],
                     yerr=[[s["median_ms"] - s["q1_ms"] for s in steps], [s["q3_ms"] - s["median_ms"] for s in steps]],
                     fmt="_", color="black", markersize=14, capsize=3, lw=0.9, label="step time (median, IQR)")
    i = 0
    for report in reports:
        n = len(report["variants"])
        fwd = report["forward"]["median_ms"]
        step_ax.hlines(fwd, positions[i] - 0.45, positions[i + n - 1] + 0.45, colors="black", linestyles="dashed",
                       label="forward-only inference" if i == 0 else None)
        i += n
    step_ax.set_ylabel("training step, ms")
    step_ax.legend(fontsize=7, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.01), frameon=False)
    bwd = [((row["profile"] or {}).get("trained_bwd") or {}).get("median_ms", np.nan) for row in rows]
    bwd_ax.bar(positions, bwd, 0.8, color=colors["trained_bwd"])
    finite = [value for value in bwd if np.isfinite(value) and value > 0]
    logarithmic = bool(finite) and max(finite) / min(finite) > 10
    if logarithmic:
        bwd_ax.set_yscale("log")
        bwd_ax.set_ylim(min(finite) / 3, max(finite) * 2)
        bwd_ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        bwd_ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    bwd_ax.set_ylabel("trained convs'\nbackward, ms" + (" (log)" if logarithmic else ""))
    for x_pos, value in zip(positions, bwd):
        if np.isfinite(value):
            bwd_ax.annotate(_num(value), (x_pos, value), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6)
    mem = [((row["memory"] or {}).get("step_peak_kib", np.nan)) / 1024 for row in rows]
    held = [row["static"]["held_bytes"] / 2**20 for row in rows]
    convs_held = [row["static"]["convs_held_bytes"] / 2**20 for row in rows]
    mem_ax.bar(positions, mem, 0.8, color="#5d6d7e", label="step peak over resident set before it (measured)")
    mem_ax.scatter(positions, held, marker="_", s=160, linewidths=2, color="#e8a33d", zorder=3,
                   label="kept from forward to backward, whole graph (static)")
    mem_ax.scatter(positions, convs_held, marker="_", s=160, linewidths=2, color="#c0392b", zorder=3,
                   label="... by the trained convs (static)")
    mem_ax.set_ylabel("memory, MiB")
    mem_ax.legend(fontsize=7, ncol=2 if len(positions) > 6 else 1, loc="lower center", bbox_to_anchor=(0.5, 1.01), frameon=False)
    mem_ax.set_xticks(positions, labels, fontsize=7)
    for center, title in zip(group_centers, titles):
        mem_ax.annotate(title, (center, 0), xycoords=("data", "axes fraction"), xytext=(0, -18 - 12 * (label_lines - 1)),
                        textcoords="offset points", ha="center", va="top", fontsize=7)
    fig.suptitle("exact vs gradient-filtered training: step time by part (ORT profiler), backward, memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


