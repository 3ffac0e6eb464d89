"""``gfc bench`` smoke test: it runs on a tiny model, exits 0 and reports sane numbers.

Only the plumbing is checked (positive times, ratios present, the JSON parses, the plot
is written); the numbers themselves are benchmarks/whole_model.py's business.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from gfcompiler.cli import main


@pytest.fixture(scope="module")
def tiny_model(small_cnn):
    return small_cnn("plain", batch=None)  # 1x28x28, three conv-BN-ReLU, dynamic batch


def test_bench_runs_and_reports_sane_fields(tiny_model, tmp_path, capsys):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    plotting = importlib.util.find_spec("matplotlib") is not None
    argv = ["bench", str(tiny_model), "--layers", "2", "--patch", "2,4", "--batch", "2", "--repeats", "3",
            "--warmup", "1", "--profile-steps", "2", "--threads", "1", "--wait-idle", "0.5", "--memory-runs", "1",
            "--json", str(json_path)]
    if plotting:
        argv += ["--plot", str(plot_path)]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "exact" in out and "r=2" in out and "r=4" in out and "forward-only" in out
    assert "compiling exact" in err  # progress goes to stderr

    report = json.loads(json_path.read_text())
    assert report["batch"] == 2 and len(report["trained_convs"]) == 2
    assert report["forward"]["median_ms"] > 0
    labels = [row["label"] for row in report["variants"]]
    assert labels == ["exact", "r=2", "r=4"]
    for row in report["variants"]:
        assert row["step"]["median_ms"] > 0 and row["step"]["iqr_ms"] >= 0 and row["step"]["n"] == 3
        assert row["step_over_forward"] > 0 and row["optimizer"]["median_ms"] > 0
        assert row["profile"]["trained_bwd"]["median_ms"] > 0
        assert row["profile"]["fwd"]["median_ms"] > 0
        assert row["memory"]["step_peak_kib"] >= 0 and row["memory"]["process_peak_kib"] > 0
        for name in ("step", "trained_bwd", "step_peak", "held_bytes", "convs_held_bytes", "backward_macs"):
            assert row["ratios"][name] is not None and row["ratios"][name] >= 0, name
    exact, filtered = report["variants"][0], report["variants"][1]
    assert exact["ratios"]["step"] == 1.0 and exact["profile"]["gf_fwd"]["median_ms"] == 0
    assert filtered["filtered_layers"] == 2 and filtered["profile"]["gf_fwd"]["median_ms"] > 0
    assert filtered["static"]["backward_macs"] < exact["static"]["backward_macs"]
    if plotting:
        assert plot_path.stat().st_size > 1000 and plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["--patch", "2,x"], 2, "comma-separated integers"),
        (["--patch", "0"], 2, "names no filtered variant"),
        (["--batch", "3"], 2, "static batch of 1"),
        (["--repeats", "0"], 2, "--repeats must be at least 1"),
        (["--json", "/nonexistent-dir/r.json"], 4, "does not exist"),
    ],
)
def test_bench_user_errors_are_one_line(small_cnn, args, code, fragment, capsys):
    model = small_cnn("plain", batch=1) if "--batch" in args else small_cnn("plain", batch=None)
    assert main(["bench", str(model), "--layers", "1", *args]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gfc: error")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_bench_compares_two_stage_with_single_graph(tiny_model, tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    argv = ["bench", str(tiny_model), "--layers", "2", "--patch", "2", "--batch", "2", "--repeats", "2", "--warmup", "1",
            "--profile-steps", "1", "--threads", "1", "--memory-runs", "1", "--compare-single-graph", "-q",
            "--json", str(json_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "x 1-graph" in out and "prefix ms" in out
    rows = {row["label"]: row for row in json.loads(json_path.read_text())["variants"]}
    assert list(rows) == ["exact", "r=2", "exact 1-graph", "r=2 1-graph"]
    for label in ("exact", "r=2"):
        two, one = rows[label], rows[f"{label} 1-graph"]
        assert two["form"] == "two_stage" and len(two["boundary"]) == 1 and two["prefix"]["median_ms"] > 0
        assert one["form"] == "single_graph" and one["prefix"] is None and not one["boundary"]
        assert two["ratios"]["step_vs_single_graph"] > 0 and two["ratios"]["step_peak_vs_single_graph"] > 0
        assert one["ratios"]["step_vs_single_graph"] is None
    assert rows["exact 1-graph"]["ratios"]["step"] == 1.0  # each form against its own exact baseline
