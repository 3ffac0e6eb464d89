"""``gfc compile`` / ``gfc inspect`` on good and bad input: one-line errors, exit codes, nothing half-written;
every entry point (gfc, python -m gfcompiler.runtime.cli, python -m gfcompiler.demo) reports errors the same way."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from gfcompiler import demo
from gfcompiler.cli import main
from gfcompiler.commandline import add_debug_flag, run_command
from gfcompiler.errors import InputError


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "net.onnx"
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    torch.onnx.export(model, torch.randn(1, 3, 16, 16), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}})
    return path


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(err: str, code: int, expected_code: int, fragment: str):
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.startswith("gfc: error")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_compile_and_inspect(tmp_path, model_file, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "compile", str(model_file), "-o", str(out), "--layers", "2", "--patch", "2",
                          "--input-shape", "input=N,3,16,16")
    assert code == 0 and "filtered 2 of 2" in stdout
    code, stdout, _ = run(capsys, "inspect", str(out), "--layer", "/2/Conv", "--dot", str(tmp_path / "l.dot"))
    assert code == 0 and "/2/Conv/gf/dY_avg = AveragePool" in stdout
    assert (tmp_path / "l.dot").read_text().startswith("digraph")


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["--layers", "9"], 2, "only 2 Conv nodes"),
        (["--layers", "0"], 2, "must be positive"),
        (["--layers", "-1"], 2, "must be positive"),
        (["--layers", "nope"], 2, "no Conv node named nope"),
        (["--patch", "-1", "--layers", "2"], 2, "--patch must be >= 0"),
        (["--patch", "99", "--layers", "2"], 2, "larger than every trained layer"),
        ([], 2, "pass --input-shape input=N,C,H,W"),  # dynamic spatial dims
        (["--input-shape", "input=1,4,16,16"], 2, "contradicts"),
        (["--input-shape", "image=1,3,16,16"], 2, "model's inputs are"),
        (["--input-shape", "input=1,3,x,16"], 2, "is not an integer"),
    ],
)
def test_bad_arguments(tmp_path, model_file, capsys, args, code, fragment):
    out = tmp_path / "out"
    argv = ["compile", str(model_file), "-o", str(out), *args]
    if args and args[0] != "--input-shape":
        argv += ["--input-shape", "input=N,3,16,16"]
    got, _, err = run(capsys, *argv)
    assert_clean_error(err, got, code, fragment)
    assert not out.exists()


def test_bad_files(tmp_path, model_file, capsys):
    out = tmp_path / "out"
    cases = {
        "missing.onnx": (None, "no such file"),
        "text.onnx": (b"this is not a model\n", "not"),
        "truncated.onnx": (model_file.read_bytes()[: len(model_file.read_bytes()) // 2], "not"),
    }
    for name, (content, fragment) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        code, _, err = run(capsys, "compile", str(path), "-o", str(out))
        assert_clean_error(err, code, 2, fragment)
        assert not out.exists()


def test_no_conv_model_is_refused(tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(1, 4), str(path), dynamo=False, opset_version=17)
    code, _, err = run(capsys, "compile", str(path), "-o", str(tmp_path / "out"))
    assert_clean_error(err, code, 3, "no Conv node")


def test_output_paths(tmp_path, model_file, capsys):
    common = ["--layers", "1", "--input-shape", "input=N,3,16,16", "-q"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run(capsys, "compile", str(model_file), "-o", str(a_file), *common)
    assert_clean_error(err, code, 4, "not a directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compile", str(model_file), "-o", str(full), *common)
    assert_clean_error(err, code, 4, "--force")
    assert (full / "keep.txt").read_text() == "mine"
    assert run(capsys, "compile", str(model_file), "-o", str(full), "--force", *common)[0] == 0
    assert not (full / "keep.txt").exists() and (full / "manifest.json").exists()
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run(capsys, "compile", str(model_file), "-o", str(locked / "out"), *common)
        assert_clean_error(err, code, 4, "not writable")


def test_killed_compilation_leaves_nothing(tmp_path, model_file):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "gfcompiler.cli", "compile", str(model_file), "-o", str(out), "--input-shape", "input=N,3,16,16"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline and not any(tmp_path.glob(".out.partial-*")):
            time.sleep(0.01)
        process.send_signal(sig)
        process.wait(timeout=60)
        assert not out.exists(), f"{sig.name}: partial output at -o"
        if sig == signal.SIGTERM:
            assert not any(tmp_path.glob(".out.partial-*")), "SIGTERM must clean the staging directory"
    # The next compile removes what a SIGKILL left behind.
    subprocess.run(argv, check=True, capture_output=True)
    assert (out / "manifest.json").exists()
    assert not any(tmp_path.glob(".out.partial-*"))


def test_missing_external_data(tmp_path, model_file, capsys):
    import onnx

    model = onnx.load(str(model_file))
    path = tmp_path / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="external.onnx.data", size_threshold=0)
    (tmp_path / "external.onnx.data").unlink()
    code, _, err = run(capsys, "compile", str(path), "-o", str(tmp_path / "out"), "--input-shape", "input=N,3,16,16")
    assert_clean_error(err, code, 2, "external data file(s) missing next to the model: external.onnx.data")
    assert not (tmp_path / "out").exists()


def test_quantized_and_integer_models_are_refused(tmp_path, capsys):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(nodes, initializers, name):
        graph = helper.make_graph(
            nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers,
        )
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    scale, zero = numpy_helper.from_array(np.array(0.1, np.float32), "scale"), numpy_helper.from_array(np.array(0, np.int8), "zero")
    w_q = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.int8), "w_q")
    qdq = save([helper.make_node("DequantizeLinear", ["w_q", "scale", "zero"], ["w"]),
                helper.make_node("Conv", ["x", "w"], ["y"])], [scale, zero, w_q], "qdq")
    code, _, err = run(capsys, "compile", str(qdq), "-o", str(tmp_path / "out"))
    assert_clean_error(err, code, 3, "quantized model (DequantizeLinear)")

    w_int = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.int32), "w")
    integer = save([helper.make_node("Conv", ["x", "w"], ["y"])], [w_int], "integer")
    code, _, err = run(capsys, "compile", str(integer), "-o", str(tmp_path / "out"))
    assert_clean_error(err, code, 3, "INT32 weights")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["gfcompiler.cli", "gfcompiler.runtime.cli"])
def test_every_entry_point_reports_errors_the_same_way(tmp_path, capsys, entry):
    entry_main = importlib.import_module(entry).main
    argv = ["eval", str(tmp_path / "missing"), "--data", "builtin:digits"]
    code = entry_main(argv)
    assert_clean_error(capsys.readouterr().err, code, 5, "no compiled artifacts")
    code = entry_main(["--debug", *argv])
    err = capsys.readouterr().err
    assert code == 5 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("gfc: error: no compiled artifacts")


def test_demo_entry_point_reports_errors_the_same_way(capsys):
    code = demo.main(["--patch", "0", "--no-memory"])
    assert_clean_error(capsys.readouterr().err, code, 2, "--patch must be at least 1")


@pytest.mark.parametrize(
    "raised, code, line",
    [
        (InputError("bad input"), 2, "gfc: error: bad input"),
        (KeyboardInterrupt(), 130, "gfc: interrupted"),
        (ZeroDivisionError("oops"), 1, "gfc: internal error: ZeroDivisionError: oops (rerun with --debug for the traceback)"),
    ],
)
def test_run_command_exit_codes(capsys, raised, code, line):
    def handler(args):
        raise raised

    parser = argparse.ArgumentParser(prog="gfc")
    add_debug_flag(parser)
    parser.set_defaults(handler=handler)
    assert run_command(parser, []) == code
    assert capsys.readouterr().err.splitlines() == [line]
