"""gfcompiler.manifest: the one schema of manifest.json, as written by the compiler and read back.

The golden expectations below are written from the model's definition (names, shapes,
which convs train) and the schema's documentation, not from a compiler run.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnx.helper
import onnx.parser
import pytest

from gfcompiler.cli import main
from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.errors import ArtifactError
from gfcompiler.manifest import (
    FORMAT,
    Form,
    Manifest,
    ManifestError,
    TensorRecord,
    dtype_name,
)
from gfcompiler.runtime.artifacts import open_artifacts, random_batch

NET = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 3, 8, 8] x) => (float[N, 5] logits) {
    [conv1] a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    [relu1] r = Relu (a)
    [conv2] c = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (r, w2, b2)
    [relu2] s = Relu (c)
    [pool] g = GlobalAveragePool (s)
    [flat] f = Flatten (g)
    [fc] logits = Gemm <transB = 1> (f, wf, bf)
}
"""
SOFTMAX_NET = NET.replace("float[N, 5] logits", "float[N, 5] probs").replace(
    "(f, wf, bf)\n", "(f, wf, bf)\n    [softmax] probs = Softmax <axis = 1> (logits)\n")
WEIGHT_SHAPES = {"w1": (4, 3, 3, 3), "b1": (4,), "w2": (4, 4, 3, 3), "b2": (4,), "wf": (5, 4), "bf": (5,)}


def _save(text: str, path):
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
        for name, shape in WEIGHT_SHAPES.items()
    )
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return _save(NET, tmp_path_factory.mktemp("manifest") / "net.onnx")


TOP_KEYS_START = ["format", "backend", "gfcompiler_version", "created", "source_model", "files", "form"]
TOP_KEYS_END = ["inputs", "outputs", "label", "loss", "optimizer", "patch", "selection", "trainable_params", "preprocess",
                "accounting_batch", "totals", "layers", "file_digests"]
CONV1_GEOMETRY = {"input_shape": [None, 3, 8, 8], "output_shape": [None, 4, 8, 8], "kernel": [3, 3], "strides": [1, 1],
                  "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1}
CONV2_GEOMETRY = {"input_shape": [None, 4, 8, 8], "output_shape": [None, 4, 4, 4], "kernel": [3, 3], "strides": [2, 2],
                  "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1}
CONV2_FORWARD_MACS = 4 * 4 * 3 * 3 * 4 * 4  # Cout · Cin · k² · Ho·Wo at the accounting batch 1


def _check_common(manifest: dict, directory, source) -> None:
    """What both backends write for NET compiled with --layers 1 --patch 2."""
    assert manifest["format"] == FORMAT == 3
    assert manifest["source_model"] == {"path": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    assert manifest["inputs"] == [{"name": "x", "shape": [None, 3, 8, 8], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "logits", "shape": [None, 5], "dtype": "float32"}]
    assert manifest["loss"] == "cross_entropy" and manifest["patch"] == 2 and manifest["preprocess"] is None
    assert manifest["selection"] == {"rule": "last 1 of 2 Conv nodes in graph order", "trained_convs": ["conv2"]}
    assert manifest["label"] == {"name": "labels", "shape": [None], "dtype": "int64"}
    assert manifest["trainable_params"] == ["w2", "b2", "wf", "bf"]
    assert manifest["accounting_batch"] == 1
    conv1, conv2 = manifest["layers"]
    assert conv1 == {"name": "conv1", "trained": False, **CONV1_GEOMETRY, "backward": "none (frozen)"}
    assert list(conv2) == ["name", "trained", *CONV2_GEOMETRY, "needs_input_grad", "backward", "backward_macs_exact",
                           "backward_macs", "patches", "held_bytes_exact", "held_bytes", "held_tensors"]
    assert {k: conv2[k] for k in ["name", "trained", *CONV2_GEOMETRY, "needs_input_grad", "backward", "patches"]} == {
        "name": "conv2", "trained": True, **CONV2_GEOMETRY, "needs_input_grad": False, "backward": "filtered",
        "patches": [2, 2]}
    assert conv2["backward_macs_exact"] == CONV2_FORWARD_MACS  # dW only: the input needs no gradient
    assert 0 < conv2["backward_macs"] < CONV2_FORWARD_MACS
    totals = manifest["totals"]
    assert list(totals) == ["filtered_layers", "trained_layers", "backward_macs_exact", "backward_macs", "held_bytes_exact",
                            "held_bytes", "trained_convs_held_bytes_exact", "trained_convs_held_bytes", "held_bytes_unknown"]
    assert (totals["filtered_layers"], totals["trained_layers"]) == (1, 1)
    assert (totals["backward_macs_exact"], totals["backward_macs"]) == (conv2["backward_macs_exact"], conv2["backward_macs"])
    assert (totals["trained_convs_held_bytes_exact"], totals["trained_convs_held_bytes"]) == \
        (conv2["held_bytes_exact"], conv2["held_bytes"])
    assert manifest["file_digests"] == {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
                                        for name in manifest["files"].values()}
    for absent in ("task", "ignore_index", "notes"):
        assert absent not in manifest
    written = (directory / "manifest.json").read_text()
    assert json.loads(written) == manifest
    assert json.dumps(Manifest.from_json(manifest).to_json(), indent=2) + "\n" == written  # reads back to the same bytes


def test_ort_training_manifest_matches_the_schema(tmp_path, net):
    manifest = compile_model(net, tmp_path / "out", CompileOptions(backend="ort-training", layers=1, patch=2))
    extra = {"loss_form"} & set(manifest)  # the loss description, when the compiler records one
    assert [k for k in manifest if k not in extra] == TOP_KEYS_START + ["boundary", "prefix_nodes", "suffix_nodes"] + TOP_KEYS_END
    assert manifest["backend"] == "ort-training" and manifest["form"] == "two_stage"
    assert manifest["files"] == {"training_model": "training_model.onnx", "eval_model": "eval_model.onnx",
                                 "optimizer_model": "optimizer_model.onnx", "checkpoint": "checkpoint",
                                 "prefix_model": "prefix_model.onnx", "export_model": "export_model.onnx"}
    assert manifest["boundary"] == [{"name": "r", "shape": [None, 4, 8, 8], "dtype": "float32", "from_input": False}]
    assert (manifest["prefix_nodes"], manifest["suffix_nodes"]) == (2, 5)
    assert manifest["optimizer"] == {"name": "adamw", "weight_decay": 0.01, "lr_multiplier": 1.0}
    _check_common(manifest, tmp_path / "out", net)


def test_onnx_step_manifest_matches_the_schema(tmp_path, net):
    from gfcompiler.artifacts import OptimizerSpec

    options = CompileOptions(layers=1, patch=2, optimizer=OptimizerSpec("sgd", momentum=0.5, weight_decay=0.0))
    manifest = compile_model(net, tmp_path / "out", options)
    extra = {"loss_form"} & set(manifest)
    assert [k for k in manifest if k not in extra] == TOP_KEYS_START + ["step"] + TOP_KEYS_END
    assert manifest["backend"] == "onnx" and manifest["form"] == "step_model"
    assert manifest["files"] == {"step_model": "step_model.onnx", "eval_model": "eval_model.onnx",
                                 "export_model": "export_model.onnx", "state": "initial_state.npz"}
    step = manifest["step"]
    assert list(step) == ["learning_rate", "step", "loss", "output", "state"]
    assert step["loss"] == "loss" and step["output"] == "logits"
    parameters = [s for s in step["state"] if s["kind"] == "parameter"]
    assert [s["name"] for s in parameters] == ["w2", "b2", "wf", "bf"]
    assert all(s["param"] == s["name"] and list(s) == ["name", "updated", "kind", "param"] for s in parameters)
    assert {s["param"] for s in step["state"] if s["kind"] == "optimizer"} == {"w2", "b2", "wf", "bf"}  # momentum buffers
    assert manifest["optimizer"] == {"name": "sgd", "weight_decay": 0.0, "lr_multiplier": 1.0, "momentum": 0.5,
                                     "implementation": "standard ONNX ops in the step model, torch.optim.SGD numerics"}
    _check_common(manifest, tmp_path / "out", net)
    artifacts = open_artifacts(tmp_path / "out")
    assert artifacts.manifest == Manifest.from_json(manifest)
    assert [s.name for s in artifacts.step.parameters] == ["w2", "b2", "wf", "bf"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps({**manifest, "task": "detection"}))
    with pytest.raises(ArtifactError, match="names task 'detection'; this runtime knows classification, segmentation"):
        open_artifacts(tmp_path / "out")


def _format_1() -> dict:
    """A format-1 manifest (no backend, no form: single-graph ort-training artifacts), with a key we do not know."""
    return {
        "format": 1, "gfcompiler_version": "0.1.0", "files": {"training_model": "training_model.onnx"},
        "inputs": [{"name": "x", "shape": [None, 3, 8, 8], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": ["N", 5], "dtype": "float32"}],
        "label": {"name": "labels", "shape": [None], "dtype": "int64"},
        "loss": "cross_entropy", "optimizer": {"name": "sgd", "momentum": 0.9, "lr_multiplier": 10.0},
        "trainable_params": ["w"], "someday": {"a key": "from the future"},
    }


def test_older_formats_read_and_unknown_keys_are_ignored():
    manifest = Manifest.from_json(_format_1())
    assert manifest.backend == "ort-training" and manifest.form == Form("single_graph")
    assert manifest.outputs[0].shape == (None, 5)  # a symbolic dimension reads as dynamic
    assert manifest.lr_multiplier == 10.0 and manifest.optimizer.weight_decay is None
    assert (manifest.task, manifest.ignore_index, manifest.loss_form, manifest.notes) == ("classification", None, None, ())
    assert manifest.totals is None and manifest.layers == ()
    two_stage = {**_format_1(), "format": 2, "form": "two_stage", "prefix_nodes": 3, "suffix_nodes": 4,
                 "boundary": [{"name": "x", "shape": [None, 3, 8, 8], "dtype": "float32", "from_input": True}]}
    assert Manifest.from_json(two_stage).boundary == (TensorRecord("x", (None, 3, 8, 8), "float32", True),)


@pytest.mark.parametrize("data, fragment", [({**_format_1(), "format": 4}, "format 4"), ([1, 2], "not a JSON object"),
                                            ({**_format_1(), "inputs": [{"shape": [1]}]}, "name")])
def test_unreadable_manifests_are_refused(data, fragment):
    with pytest.raises((ManifestError, KeyError)) as raised:
        Manifest.from_json(data)
    assert fragment in str(raised.value)


def test_task_fields_are_written_only_when_set():
    base = Manifest.from_json({**_format_1(), "format": 3})
    assert not {"task", "ignore_index", "loss_form", "notes"} & set(base.to_json())
    segmentation = Manifest.from_json({**base.to_json(), "task": "segmentation", "ignore_index": 255,
                                       "loss_form": "per-pixel cross-entropy", "notes": ["a note"]})
    written = segmentation.to_json()
    keys = list(written)
    assert keys[keys.index("loss"):keys.index("loss") + 4] == ["loss", "task", "ignore_index", "loss_form"]
    assert (written["task"], written["ignore_index"], written["notes"]) == ("segmentation", 255, ["a note"])
    assert Manifest.from_json(written) == segmentation


@pytest.mark.parametrize("onnx_name, name", [("FLOAT", "float32"), ("tensor(float)", "float32"), ("DOUBLE", "float64"),
                                             ("INT64", "int64"), ("tensor(float16)", "float16"), ("uint8", "uint8")])
def test_dtype_names(onnx_name, name):
    assert dtype_name(onnx_name) == name


def test_random_batch_fits_the_manifest():
    classifier = Manifest.from_json({**_format_1(), "format": 3})
    x, y = random_batch(classifier, 6)
    assert x.shape == (6, 3, 8, 8) and x.dtype == np.float32
    assert y.shape == (6,) and y.dtype == np.int64 and 0 <= y.min() and y.max() < 5
    segmentation = Manifest.from_json({**classifier.to_json(), "task": "segmentation",
                                       "outputs": [{"name": "y", "shape": [None, 3, 8, 8], "dtype": "float32"}],
                                       "label": {"name": "labels", "shape": [None, 8, 8], "dtype": "int64"}})
    _, y = random_batch(segmentation, 2, seed=1)
    assert y.shape == (2, 8, 8) and set(np.unique(y)) <= {0, 1, 2}
    regression = Manifest.from_json({**classifier.to_json(), "loss": "mse",
                                     "label": {"name": "t", "shape": [None, 5], "dtype": "float32"}})
    _, y = random_batch(regression, 3)
    assert y.shape == (3, 5) and y.dtype == np.float32


def test_quiet_compile_still_warns_and_inspect_shows_the_note(tmp_path, capsys):
    source = _save(SOFTMAX_NET, tmp_path / "softmax_net.onnx")
    out = tmp_path / "out"
    assert main(["compile", str(source), "-o", str(out), "-q", "--layers", "1", "--patch", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "'probs' is a Softmax" in warnings[0]
    notes = json.loads((out / "manifest.json").read_text())["notes"]
    assert len(notes) == 1 and "'probs' was a Softmax (softmax)" in notes[0] and "'logits'" in notes[0]
    assert main(["inspect", str(out)]) == 0
    assert f"note: {notes[0]}" in capsys.readouterr().out
