"""Hostile and mutated model files: ``gfc compile`` exits 0, 2 or 3 with one line and leaves nothing at ``-o``.

Two parts:

* explicit hostile cases (the seeded corpus): external data that points outside the model's
  folder (a climbing relative path, an absolute path, a symbolic link), short or missing data
  files, absurd shapes, dynamic dimensions spelled ``-1``/``0``/a symbol/missing, invalid
  Conv/pool attributes; each with its exit code and the words its one-line message must hold;
* a bounded seeded fuzz: byte flips, truncations and splices of a model file, Conv/pool
  attribute, input-shape and external-data mutations, any node's attributes or inputs,
  initializers, declared outputs, opset and IR versions, dropped nodes, drawn from a fixed seed (reproducible: the case id
  is the seed), run in-process, plus a few through a subprocess for the real exit code.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from onnx import helper

from gfcompiler.cli import main

FUZZ_SEED = 13
FUZZ_CASES = 40  # the whole file stays well under a minute on two cores
CASE_SECONDS = 30  # one compile of these tiny models takes about a second


@dataclass
class Outcome:
    code: int
    err: str
    output: Path


def compile_cli(capfd, model: Path, output: Path, *extra: str) -> Outcome:
    """``gfc compile`` in-process; stderr captured at the file-descriptor level (native libraries' prints too)."""
    started = time.monotonic()
    code = main(["compile", str(model), "-o", str(output), "-q", "--layers", "1", "--patch", "2", *extra])
    assert time.monotonic() - started < CASE_SECONDS, f"compile took {time.monotonic() - started:.0f} s"
    return Outcome(code, capfd.readouterr().err, output)


def assert_clean(outcome: Outcome, fragment: str = "") -> None:
    """Exit 0 with a manifest, or 2/3 with one ``gfc: error:`` line (after warnings, if any), no bug report,
    nothing at -o."""
    assert outcome.code in (0, 2, 3), outcome.err
    leftovers = list(outcome.output.parent.glob(f".{outcome.output.name}.partial-*"))
    assert not leftovers, f"staging directory left behind: {leftovers}"
    if outcome.code == 0:
        assert (outcome.output / "manifest.json").is_file()
        return
    *warnings, last = outcome.err.splitlines() or [""]
    assert last.startswith("gfc: error: ") and all(line.startswith("gfc: warning: ") for line in warnings), outcome.err
    assert "Traceback" not in outcome.err and "internal error" not in outcome.err
    assert fragment in last, outcome.err
    assert not outcome.output.exists(), "a failed compile left output at -o"


# --------------------------------------------------------------------------- model copies


def copy_model(source: Path, folder: Path) -> Path:
    """Copy a model and its external-data file (if any) into ``folder``; returns the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in [source, *source.parent.glob(source.name + ".data")]:
        shutil.copyfile(file, folder / file.name)
    return folder / source.name


def external_tensor(proto: onnx.ModelProto) -> onnx.TensorProto:
    """The largest initializer stored as external data."""
    tensors = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    return max(tensors, key=lambda t: math.prod(t.dims))


def set_external(tensor: onnx.TensorProto, **entries: str) -> None:
    """Replace some of a tensor's external-data entries (location, offset, length)."""
    current = {entry.key: entry.value for entry in tensor.external_data}
    current.update(entries)
    del tensor.external_data[:]
    for key, value in current.items():
        tensor.external_data.add(key=key, value=value)


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for attribute in list(node.attribute):
        if attribute.name == name:
            node.attribute.remove(attribute)
    node.attribute.append(helper.make_attribute(name, value))


def set_input_dims(proto: onnx.ModelProto, dims: list) -> None:
    """Rewrite the first input's dims: an int is a dim_value, a str a dim_param, None an unknown dim."""
    shape = proto.graph.input[0].type.tensor_type.shape
    del shape.dim[:]
    for dim in dims:
        entry = shape.dim.add()
        if isinstance(dim, int):
            entry.dim_value = dim
        elif isinstance(dim, str):
            entry.dim_param = dim


def node_of(proto: onnx.ModelProto, op_type: str, index: int = 0) -> onnx.NodeProto:
    return [node for node in proto.graph.node if node.op_type == op_type][index]


@pytest.fixture(scope="module")
def external_model(small_cnn):
    """The plain small CNN with its weights in ``model.onnx.data``."""
    return small_cnn("plain", external_data=True)


@pytest.fixture(scope="module")
def mixed_model(small_cnn):
    """The small CNN with max-pool, biased, asymmetric and valid convs (input 1×1×28×28)."""
    return small_cnn("mixed")


# --------------------------------------------------------------------------- explicit hostile cases


def _climb(folder: Path, proto: onnx.ModelProto) -> None:
    (folder.parent / "outside.bin").write_bytes((folder / "model.onnx.data").read_bytes())
    set_external(external_tensor(proto), location="../outside.bin")


def _absolute(folder: Path, proto: onnx.ModelProto) -> None:
    set_external(external_tensor(proto), location="/etc/passwd")


def _symlink_out(folder: Path, proto: onnx.ModelProto) -> None:
    (folder / "link.bin").symlink_to("/etc/passwd")
    set_external(external_tensor(proto), location="link.bin")


def _symlink_in(folder: Path, proto: onnx.ModelProto) -> None:
    (folder / "link.bin").symlink_to(folder / "model.onnx.data")  # inside the folder: allowed
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            set_external(tensor, location="link.bin")


def _missing(folder: Path, proto: onnx.ModelProto) -> None:
    (folder / "model.onnx.data").unlink()


def _short(folder: Path, proto: onnx.ModelProto) -> None:
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])


def _wrong_length(folder: Path, proto: onnx.ModelProto) -> None:
    set_external(external_tensor(proto), length="4")


def _bad_offset(folder: Path, proto: onnx.ModelProto) -> None:
    set_external(external_tensor(proto), offset="-8")


def _fifo(folder: Path, proto: onnx.ModelProto) -> None:
    os.mkfifo(folder / "pipe")  # reading it would block forever
    set_external(external_tensor(proto), location="pipe")


def _directory(folder: Path, proto: onnx.ModelProto) -> None:
    (folder / "sub").mkdir()
    set_external(external_tensor(proto), location="sub")


EXTERNAL_CASES = {
    "climbing-relative-path": (_climb, 2, "'../outside.bin', a path that climbs out of the model's folder: refused"),
    "absolute-path": (_absolute, 2, "'/etc/passwd', an absolute path: refused"),
    "symlink-outside": (_symlink_out, 2, "a symbolic link to /etc/passwd, outside the model's folder: refused"),
    "symlink-inside": (_symlink_in, 0, ""),
    "missing-data-file": (_missing, 2, "external data file(s) missing next to the model: model.onnx.data"),
    "short-data-file": (_short, 2, "runs past the end of the 100-byte file"),
    "wrong-length": (_wrong_length, 2, "holds 4 bytes, but its shape"),
    "negative-offset": (_bad_offset, 2, "offset '-8', not a non-negative integer"),
    "fifo": (_fifo, 2, "is not a regular file"),
    "directory": (_directory, 2, "is not a regular file"),
}


@pytest.mark.parametrize("case", list(EXTERNAL_CASES))
def test_hostile_external_data(tmp_path, capfd, external_model, case):
    mutate, code, fragment = EXTERNAL_CASES[case]
    folder = tmp_path / "model"
    path = copy_model(external_model, folder)
    proto = onnx.load(str(path), load_external_data=False)
    mutate(folder, proto)
    onnx.save(proto, str(path))
    outcome = compile_cli(capfd, path, tmp_path / "out")
    assert_clean(outcome, fragment)
    assert outcome.code == code, outcome.err


def _attribute(op_type: str, index: int, name: str, value):
    return lambda proto: set_attribute(node_of(proto, op_type, index), name, value)


def _input_dims(*dims):
    return lambda proto: set_input_dims(proto, list(dims))


def _output_dims(*dims):
    def mutate(proto: onnx.ModelProto) -> None:
        shape = proto.graph.output[0].type.tensor_type.shape
        del shape.dim[:]
        for dim in dims:
            shape.dim.add().dim_value = dim
    return mutate


def _initializer_type(data_type: int):
    def mutate(proto: onnx.ModelProto) -> None:
        proto.graph.initializer[0].data_type = data_type
    return mutate


# name -> (mutation of the mixed CNN, extra arguments, exit code, message fragment)
MODEL_CASES = {
    "absurd-input-shape": (_input_dims(1, 1, 10**6, 10**6), [], 2,
                           "input 'input' has shape 1,1,1000000,1000000: 1e+12 elements per sample"),
    "absurd-input-shape-given": (_input_dims(1, 1, "h", "w"), ["--input-shape", "input=1,1,100000,100000"], 2,
                                 "1e+10 elements per sample"),
    "batch-minus-one": (_input_dims(-1, 1, 28, 28), ["--input-shape", "input=1,1,28,28"], 0, ""),
    "paddle-style-dynamic": (_input_dims(-1, 1, -1, -1), ["--input-shape", "input=1,1,28,28"], 0, ""),
    "batch-zero": (_input_dims(0, 1, 28, 28), ["--input-shape", "input=1,1,28,28"], 0, ""),
    "symbolic-dims": (_input_dims("batch", 1, "h", "w"), ["--input-shape", "input=N,1,28,28"], 0, ""),
    "missing-dims": (_input_dims(None, None, None, None), ["--input-shape", "input=1,1,28,28"], 0, ""),
    "dynamic-spatial-without-shape": (_input_dims(-1, 1, -1, -1), [], 2, "pass --input-shape input=N,C,H,W"),
    "negative-pads": (_attribute("Conv", 0, "pads", [-1, -1, -1, -1]), [], 2,
                      "Conv node '/features/features.0/Conv': pads=[-1, -1, -1, -1]: pads must not be negative"),
    "zero-stride": (_attribute("Conv", 1, "strides", [0, 1]), [], 2, "strides=[0, 1]: every stride must be >= 1"),
    "zero-pool-stride": (_attribute("MaxPool", 0, "strides", [0, 0]), [], 2, "MaxPool node"),
    "group-not-dividing": (_attribute("Conv", 1, "group", 3), [], 2, "group=3 does not divide the weight's 16 output"),
    "group-channel-mismatch": (_attribute("Conv", 1, "group", 2), [], 2, "its input has 8 channels, but group 2"),
    "kernel-larger-than-padded-input": (_attribute("Conv", 3, "dilations", [9, 9]), [], 2,
                                        "larger than the padded input"),
    "pool-larger-than-input": (_attribute("MaxPool", 0, "kernel_shape", [40, 40]), [], 2,
                               "larger than the padded input"),
    "kernel-contradicts-weight": (_attribute("Conv", 0, "kernel_shape", [7, 7]), [], 2, "contradicts the weight's kernel"),
    "pads-wrong-length": (_attribute("Conv", 0, "pads", [1, 1]), [], 2, "has 2 values, a 2-D window needs 4"),
    "huge-pads": (_attribute("Conv", 0, "pads", [2**40] * 4), [], 2, "a value above 2147483647"),
    "unknown-auto-pad": (_attribute("Conv", 0, "auto_pad", "MIDDLE"), [], 2, "auto_pad='MIDDLE'"),
    "string-strides": (_attribute("Conv", 0, "strides", "2"), [], 2, "not a valid ONNX model"),
    "auto-pad-with-pads": (_attribute("Conv", 0, "auto_pad", "VALID"), [], 2, "has both auto_pad=VALID and pads"),
    "five-d-input": (_input_dims(1, 1, 3, 28, 28), [], 2,
                     "Conv node '/features/features.0/Conv': its input has rank 5, a 2-D window needs rank 4"),
    # runs into the classifier with 7×7 instead of 5×5 maps: only onnxruntime notices the Gemm does not fit
    "features-do-not-fit-the-head": (_attribute("Conv", 3, "pads", [1, 1, 1, 1]), [], 2,
                                     "the model does not run in onnxruntime (zeros at batch 1): "
                                     "Gemm node '/classifier/classifier.1/Gemm': GEMM: Dimension mismatch"),
    # a warning, as onnxruntime gives (real exporters do it); the computed shape is used
    "output-declared-wrong": (_output_dims(1, 7), [], 0, "output 'logits' is declared as 1,7, but the model computes 1,10"),
    "output-declared-wrong-rank": (_output_dims(1, 0, 7, 7), [], 0, "is declared as 1,?,7,7, but the model computes 1,10"),
    "unknown-data-type": (_initializer_type(99), [], 2, "not a valid ONNX model: 99 is not a valid DataType"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_hostile_model(tmp_path, capfd, mixed_model, case):
    mutate, extra, code, fragment = MODEL_CASES[case]
    proto = onnx.load(str(mixed_model))
    mutate(proto)
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    outcome = compile_cli(capfd, path, tmp_path / "out", *extra)
    assert_clean(outcome, fragment)
    assert outcome.code == code, outcome.err
    if code == 0 and fragment:  # a warning
        assert outcome.err.startswith("gfc: warning: ") and fragment in outcome.err, outcome.err


@pytest.mark.parametrize("content, fragment", [
    (b"", "not an ONNX model"),
    (b"this is not a model\n", "not a readable ONNX model"),
    (b"\x08\x07\x12\x00" * 1000, "not"),
])
def test_not_onnx_files(tmp_path, capfd, content, fragment):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    assert_clean(compile_cli(capfd, path, tmp_path / "out"), fragment)


def test_text_that_is_not_utf8(tmp_path, capfd, mixed_model):
    data = mixed_model.read_bytes()
    name = b"/features/features.0/Conv"
    assert data.count(name) >= 1
    path = tmp_path / "model.onnx"
    path.write_bytes(data.replace(name, name[:5] + b"\xae" + name[6:], 1))
    assert_clean(compile_cli(capfd, path, tmp_path / "out"), "is not UTF-8 text (a corrupt file?)")


@pytest.mark.slow
def test_paddle_batch_minus_one_takes_input_shape(tmp_path, capfd):
    """The issue's real case: PP-OCR's direction classifier declares x as -1,3,?,? (batch -1)."""
    import models
    from conftest import available

    path = available(models.packaged_onnx, models.PACKAGED_MODELS["ppocr_cls_v2"])
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    outcome = compile_cli(capfd, path, tmp_path / "out", "--input-shape", "x=1,3,48,192")
    assert outcome.code == 0, outcome.err
    assert_clean(outcome)


# --------------------------------------------------------------------------- seeded fuzz

HOSTILE_INTS = [-(2**63), -(2**31), -3, -1, 0, 1, 2, 3, 5, 9, 64, 2**31, 2**62]
WINDOW_ATTRIBUTES = ["pads", "strides", "dilations", "kernel_shape", "group", "auto_pad"]
HOSTILE_LOCATIONS = ["../model.onnx.data", "/dev/zero", "/etc/passwd", "", "model.onnx", ".", "a/../../x",
                     "model.onnx.data/x", "\x00", "C:\\weights.bin", "model.onnx.data"]


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
    return bytes(buffer)


def truncate_bytes(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def splice_bytes(data: bytes, rng: random.Random) -> bytes:
    start, length = rng.randrange(len(data)), rng.randint(1, 64)
    target = rng.randrange(len(data))
    return data[:target] + data[start:start + length] + data[target + length:]


def mutate_window_attribute(proto: onnx.ModelProto, rng: random.Random) -> None:
    node = rng.choice([node for node in proto.graph.node if node.op_type in ("Conv", "MaxPool")])
    name = rng.choice(WINDOW_ATTRIBUTES)
    if name == "auto_pad":
        set_attribute(node, name, rng.choice(["VALID", "SAME_UPPER", "SAME_LOWER", "NOTSET", "bogus"]))
    elif name == "group":
        set_attribute(node, name, rng.choice(HOSTILE_INTS))
    else:
        count = rng.choice([1, 2, 4, 2, 2] if name != "pads" else [2, 4, 4, 3])
        set_attribute(node, name, [rng.choice(HOSTILE_INTS) if rng.random() < 0.5 else rng.randint(0, 4) for _ in range(count)])


def mutate_input_shape(proto: onnx.ModelProto, rng: random.Random) -> list[str]:
    """Rewrite the input dims; maybe also pass an --input-shape (returned as extra arguments)."""
    choices = [-1, 0, 1, 2, 3, 28, 10**5, 2**40, "N", None]
    dims = [rng.choice(choices) for _ in range(rng.choice([2, 3, 4, 4, 4, 5]))]
    set_input_dims(proto, dims)
    if rng.random() < 0.5:
        return ["--input-shape", "input=" + ",".join(rng.choice(["1", "N", "28", "3", "1"]) for _ in range(4))]
    return []


def mutate_external_entry(proto: onnx.ModelProto, folder: Path, rng: random.Random) -> None:
    tensor = rng.choice([t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL])
    key = rng.choice(["location", "offset", "length", "data_file"])
    if key == "location":
        set_external(tensor, location=rng.choice(HOSTILE_LOCATIONS))
    elif key == "data_file":
        data = folder / "model.onnx.data"
        data.write_bytes(truncate_bytes(data.read_bytes(), rng))
    else:
        set_external(tensor, **{key: rng.choice(["-1", "0", "7", "1.5", "", "99999999999999999999", "x"])})


def mutate_any_node(proto: onnx.ModelProto, rng: random.Random) -> None:
    """Any node: an existing or a common attribute set to a hostile value, or an input rewired."""
    node = rng.choice(list(proto.graph.node))
    if rng.random() < 0.3 and node.input:
        names = [i.name for i in proto.graph.initializer] + [o for n in proto.graph.node for o in n.output] + ["", "nope"]
        node.input[rng.randrange(len(node.input))] = rng.choice(names)
        return
    names = [a.name for a in node.attribute] or ["axis", "perm", "transB", "alpha", "keepdims"]
    value = rng.choice([rng.choice(HOSTILE_INTS), [rng.choice(HOSTILE_INTS) for _ in range(rng.randint(1, 5))], 1.5, "x"])
    set_attribute(node, rng.choice(names), value)


def mutate_graph(proto: onnx.ModelProto, rng: random.Random) -> None:
    """An initializer's dims or data, the declared output, the opset or IR version, or a dropped node."""
    graph, choice = proto.graph, rng.randrange(5)
    tensor = rng.choice(list(graph.initializer))
    if choice == 0:
        dims = list(tensor.dims) or [1]
        dims[rng.randrange(len(dims))] = rng.choice(HOSTILE_INTS)
        del tensor.dims[:]
        tensor.dims.extend(dims)
    elif choice == 1:
        tensor.raw_data = tensor.raw_data[: rng.randrange(len(tensor.raw_data) + 1)]
        tensor.data_type = rng.choice([tensor.data_type, 0, 7, 10, 99])
    elif choice == 2:
        _output_dims(*[rng.choice([-1, 0, 1, 7, 10]) for _ in range(rng.randint(0, 4))])(proto)
    elif choice == 3:
        proto.opset_import[0].version = rng.choice([1, 9, 11, 12, 20, 22, 99])
        proto.ir_version = rng.choice([proto.ir_version, 3, 11, 99])
    else:
        del graph.node[rng.randrange(len(graph.node))]


FUZZ_KINDS = ("flip", "truncate", "splice", "attribute", "input-shape", "external", "any-node", "graph")


def make_fuzz_case(seed: int, folder: Path, external_model: Path, mixed_model: Path) -> tuple[Path, list[str]]:
    """Write the mutated model for ``seed`` into ``folder``; returns its path and extra compile arguments."""
    rng = random.Random(seed)
    kind = FUZZ_KINDS[seed % len(FUZZ_KINDS)]
    extra: list[str] = []
    if kind in ("flip", "truncate", "splice", "external"):  # the graph structure without weights: mutations hit it
        path = copy_model(external_model, folder)
        if kind == "external":
            proto = onnx.load(str(path), load_external_data=False)
            mutate_external_entry(proto, folder, rng)
            onnx.save(proto, str(path))
        else:
            mutate = {"flip": flip_bytes, "truncate": truncate_bytes, "splice": splice_bytes}[kind]
            path.write_bytes(mutate(path.read_bytes(), rng))
        return path, extra
    proto = onnx.load(str(mixed_model))
    if kind == "attribute":
        mutate_window_attribute(proto, rng)
    elif kind == "any-node":
        mutate_any_node(proto, rng)
    elif kind == "graph":
        mutate_graph(proto, rng)
    else:
        extra = mutate_input_shape(proto, rng)
    path = folder / "model.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path, extra


@pytest.mark.parametrize("seed", range(FUZZ_SEED * 1000, FUZZ_SEED * 1000 + FUZZ_CASES))
def test_fuzzed_model(tmp_path, capfd, external_model, mixed_model, seed):
    path, extra = make_fuzz_case(seed, tmp_path / "model", external_model, mixed_model)
    assert_clean(compile_cli(capfd, path, tmp_path / "out", *extra))


@pytest.mark.parametrize("seed", [FUZZ_SEED * 1000 + 2, FUZZ_SEED * 1000 + 5])
def test_fuzzed_model_subprocess(tmp_path, external_model, mixed_model, seed):
    """The real process: exit code and stderr of ``python -m gfcompiler.cli`` (a native crash would show here)."""
    path, extra = make_fuzz_case(seed, tmp_path / "model", external_model, mixed_model)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "gfcompiler.cli", "compile", str(path), "-o", str(out), "-q",
                             "--layers", "1", "--patch", "2", *extra], capture_output=True, text=True, timeout=120)
    assert_clean(Outcome(result.returncode, result.stderr, out))
