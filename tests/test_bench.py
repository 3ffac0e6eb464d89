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
    argv = ["bench", str(tiny_model), "--backend", "ort-training", "--layers", "2", "--patch", "2,4", "--batch", "2",
            "--repeats", "3",
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
    argv = ["bench", str(tiny_model), "--backend", "ort-training", "--layers", "2", "--patch", "2", "--batch", "2",
            "--repeats", "2", "--warmup", "1", "--profile-steps", "1", "--threads", "1", "--memory-runs", "1",
            "--compare-single-graph", "-q",
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


# ---------------------------------------------------------------------------- --backend onnx / both


def _bench_json(argv: list[str], tmp_path, capsys) -> tuple[dict, str]:
    json_path = tmp_path / "bench.json"
    code = main([*argv, "--json", str(json_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(json_path.read_text()), out


def test_bench_onnx_backend(tiny_model, tmp_path, capsys):
    argv = ["bench", str(tiny_model), "--backend", "onnx", "--layers", "2", "--patch", "2", "--batch", "2",
            "--repeats", "3", "--warmup", "1", "--profile-steps", "2", "--threads", "1", "--memory-runs", "1", "-q"]
    report, out = _bench_json(argv, tmp_path, capsys)
    assert report["backends"] == ["onnx"]
    assert "backend" in out and "onnx" in out and "ort-training" not in out.split("optim:")[0]
    rows = report["variants"]
    assert [(row["backend"], row["label"], row["key"]) for row in rows] == [("onnx", "exact", "exact-onnx"),
                                                                            ("onnx", "r=2", "r2-onnx")]
    for row in rows:
        assert row["form"] == "step_model" and row["prefix"] is None
        assert row["step"]["median_ms"] > 0 and row["step"]["n"] == 3 and row["step_over_forward"] > 0
        profile = row["profile"]
        # the step model's parts, from its gfc.phase / gfc.layer metadata
        assert profile["trained_bwd"]["median_ms"] > 0 and profile["fwd"]["median_ms"] > 0
        assert profile["other_bwd"]["median_ms"] > 0 and profile["optimizer"]["median_ms"] > 0
        assert set(profile["trained_bwd_per_layer_ms"]) == set(report["trained_convs"])
        assert row["optimizer"] == profile["optimizer"] and row["optimizer_source"] == "profiler"
        assert row["unattributed_ms"] is not None and row["unattributed_ms"] >= 0
        assert row["rest_ms"] is not None
        assert row["memory"]["step_peak_kib"] >= 0 and row["memory"]["process_peak_kib"] > 0
        for name in ("step", "trained_bwd", "step_peak", "held_bytes", "convs_held_bytes", "backward_macs"):
            assert row["ratios"][name] is not None and row["ratios"][name] >= 0, name
        assert row["ratios"]["step_vs_ort_training"] is None  # no ort-training variant to compare with
    exact, filtered = rows
    assert exact["ratios"]["step"] == 1.0 and exact["profile"]["gf_fwd"]["median_ms"] == 0
    assert filtered["profile"]["gf_fwd"]["median_ms"] > 0
    assert filtered["static"]["backward_macs"] < exact["static"]["backward_macs"]


def test_bench_both_backends_side_by_side(tiny_model, tmp_path, capsys):
    plotting = importlib.util.find_spec("matplotlib") is not None
    plot_path = tmp_path / "both.png"
    argv = ["bench", str(tiny_model), "--backend", "both", "--layers", "2", "--patch", "2", "--batch", "2",
            "--repeats", "2", "--warmup", "1", "--profile-steps", "1", "--threads", "1", "--memory-runs", "1", "-q",
            *(["--plot", str(plot_path)] if plotting else [])]
    report, out = _bench_json(argv, tmp_path, capsys)
    assert report["backends"] == ["ort-training", "onnx"]
    assert "x ort" in out and "ort-training" in out and "onnx" in out
    rows = {(row["backend"], row["label"]): row for row in report["variants"]}
    assert list(rows) == [("ort-training", "exact"), ("ort-training", "r=2"), ("onnx", "exact"), ("onnx", "r=2")]
    for label in ("exact", "r=2"):
        ort, onnx = rows[("ort-training", label)], rows[("onnx", label)]
        assert ort["form"] == "two_stage" and ort["optimizer_source"] == "timed" and ort["optimizer"]["median_ms"] > 0
        assert onnx["form"] == "step_model" and onnx["optimizer_source"] == "profiler"
        assert onnx["ratios"]["step_vs_ort_training"] > 0 and onnx["ratios"]["step_peak_vs_ort_training"] > 0
        assert onnx["ratios"]["trained_bwd_vs_ort_training"] > 0
        assert ort["ratios"]["step_vs_ort_training"] is None
        assert ort["step"]["n"] == onnx["step"]["n"] == 2  # one set of interleaved rounds
    assert rows[("onnx", "exact")]["ratios"]["step"] == 1.0  # each backend against its own exact baseline
    if plotting:
        assert plot_path.stat().st_size > 1000 and plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_onnx_backend_refuses_single_graph_comparison(tiny_model, capsys):
    argv = ["bench", str(tiny_model), "--backend", "onnx", "--layers", "1", "--compare-single-graph"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gfc: error")]
    assert len(lines) == 1 and "--compare-single-graph" in lines[0], err


@pytest.mark.parametrize("patch", [0, 2])
def test_step_model_parts_come_from_metadata_not_names(tiny_model, tmp_path, patch):
    """Every node the compiler emits for a trained conv is found by its gfc.phase/gfc.layer
    metadata: renaming all nodes to meaningless names changes no category."""
    import onnx_ir as ir

    from gfcompiler.bench import StepNodeCategories
    from gfcompiler.driver import CompileOptions, compile_model

    directory = tmp_path / "artifacts"
    manifest = compile_model(tiny_model, directory, CompileOptions(layers=2, patch=patch, backend="onnx"))
    trained = manifest["selection"]["trained_convs"]
    path = directory / "step_model.onnx"
    categories = StepNodeCategories(path, trained)
    model = ir.load(str(path))
    renamed = {}
    for i, node in enumerate(model.graph):
        if node.name:
            renamed[node.name] = node.name = f"n{i}"
    scrambled_path = tmp_path / "scrambled.onnx"
    ir.save(model, str(scrambled_path))
    scrambled = StepNodeCategories(scrambled_path, trained)
    assert {renamed[name]: category for name, category in categories.category.items()} == scrambled.category
    counts = {c: list(categories.category.values()).count(c) for c in ("fwd", "gf_fwd", "trained_bwd", "other_bwd",
                                                                       "optimizer")}
    assert counts["trained_bwd"] > 0 and counts["other_bwd"] > 0 and counts["optimizer"] > 0 and counts["fwd"] > 0
    assert (counts["gf_fwd"] > 0) == bool(patch)
    assert set(categories.layer_of.values()) == set(trained)
    for name, layer in categories.layer_of.items():
        assert categories.category[name] in ("trained_bwd", "gf_fwd") and layer in trained
    # exact convs' backward is emitted as <conv>/grad/..., the filter's as <conv>/gf/...: both found
    marker = "/gf/" if patch else "/grad/"
    assert all(marker in name for name, c in categories.category.items() if c == "trained_bwd")


def test_profile_attribution_reports_unmatched_kernels(tmp_path):
    """Renamed nodes map back to their graph node (name, or the value they compute, before a
    suffix); inserted ones are unattributed, placed by position and reported."""
    from gfcompiler.bench import parse_profile
    from gfcompiler.bench.profile import NodeCategories

    class Parts(NodeCategories):
        names = ("fwd", "gf_fwd", "trained_bwd", "other_bwd", "optimizer")

        def __init__(self):
            self.category = {"conv": "fwd", "relu": "fwd", "c/gf/dW": "trained_bwd", "relu/grad": "other_bwd",
                             "adam": "optimizer"}
            self.layer_of = {"c/gf/dW": "c"}
            self.producer = {"relu_output_0": "relu"}

    def kernel(name, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {}}

    events = []
    for run in range(2):
        t = run * 1000
        events += [{"cat": "Session", "name": "model_run", "ts": t, "dur": 900},
                   kernel("conv", t + 1, 100), kernel("relu_output_0_nchwc", t + 110, 50),
                   kernel("ReorderInput_token_3", t + 170, 20), kernel("relu/grad", t + 200, 30),
                   kernel("c/gf/dW/MatmulTransposeFusion/", t + 240, 40), kernel("ReorderOutput", t + 300, 10),
                   kernel("adam", t + 320, 60)]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    result = parse_profile(path, Parts(), skip_runs=1)
    ms = {name: result[name]["median_ms"] for name in Parts.names}
    assert ms == pytest.approx({"fwd": 0.17, "gf_fwd": 0.0, "trained_bwd": 0.04, "other_bwd": 0.04, "optimizer": 0.06})
    assert result["unmatched_ms"] == pytest.approx(0.03)
    assert result["trained_bwd_per_layer_ms"] == pytest.approx({"c": 0.04})
    assert result["kernels"]["median_ms"] == pytest.approx(0.31)
