"""Per-pixel losses (gfcompiler.onnx_step.losses) against torch, run in onnxruntime.

Each case builds a one-node-deep graph (logits input -> loss and dL/dlogits) with
`build_loss`, runs it, and compares with ``torch.nn.functional`` and autograd:
per-pixel cross-entropy with ``ignore_index`` (some, none and all pixels ignored, several
shapes and ignore values), per-pixel BCE-with-logits, the class map of the export
model, and the loss forms the compiler reports.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from gfcompiler.emit import Emitter
from gfcompiler.errors import InputError, UnsupportedModelError
from gfcompiler.onnx_step.losses import DEFAULT_IGNORE_INDEX, build_class_map, build_loss, label_input, loss_form


def _logits_value(shape) -> ir.Value:
    return ir.Value(name="logits", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(shape)))


def _session(graph_outputs, logits: ir.Value, label: ir.Value | None, tape: ir.tape.Tape) -> ort.InferenceSession:
    graph = ir.Graph([logits] + ([label] if label is not None else []), graph_outputs, nodes=tape.nodes,
                     initializers=tape.initializers, opset_imports={"": 17}, name="losses")
    proto = ir.to_proto(ir.Model(graph, ir_version=8))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def run_loss(kind: str, shape, logits: np.ndarray, labels: np.ndarray, ignore_index=None, *, with_gradient=True):
    """(loss, dL/dlogits or None) of `build_loss` on ``logits`` (declared with ``shape``) and ``labels``."""
    value = _logits_value(shape)
    tape = ir.tape.Tape()
    built = build_loss(Emitter(tape, "loss"), kind, value, with_gradient=with_gradient, ignore_index=ignore_index)
    built.loss.name = "loss_out"
    outputs = [built.loss] + ([built.output_grad] if with_gradient else [])
    if with_gradient:
        built.output_grad.name = "grad_out"
    results = _session(outputs, value, built.label, tape).run(None, {"logits": logits, built.label.name: labels})
    return float(results[0]), (results[1] if with_gradient else None)


def torch_cross_entropy(logits: np.ndarray, labels: np.ndarray, ignore_index: int):
    z = torch.from_numpy(logits).requires_grad_(True)
    loss = F.cross_entropy(z, torch.from_numpy(labels), reduction="mean", ignore_index=ignore_index)
    loss.backward()
    return float(loss.detach()), z.grad.numpy()


def _batch(shape, ignore_index: int, ignored_fraction: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape) * 3).astype(np.float32)
    labels = rng.integers(0, shape[1], (shape[0], *shape[2:])).astype(np.int64)
    labels[rng.random(labels.shape) < ignored_fraction] = ignore_index
    if ignored_fraction > 0:  # at least one ignored and one labelled pixel, whatever the draw
        labels.flat[0], labels.flat[-1] = ignore_index, 1
    return logits, labels


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 3, 7, 1), (3, 4, 2, 3, 2), (2, 21, 16, 16)])
@pytest.mark.parametrize("ignore_index,ignored_fraction", [(255, 0.3), (255, 0.0), (-100, 0.5), (0, 0.2), (-1, 0.4)])
def test_per_pixel_cross_entropy_equals_torch(shape, ignore_index, ignored_fraction):
    logits, labels = _batch(shape, ignore_index, ignored_fraction)
    if ignored_fraction > 0:
        assert (labels == ignore_index).any() and (labels != ignore_index).any()
    loss, grad = run_loss("cross_entropy", shape, logits, labels, ignore_index)
    expected_loss, expected_grad = torch_cross_entropy(logits, labels, ignore_index)
    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
    eval_loss, _ = run_loss("cross_entropy", shape, logits, labels, ignore_index, with_gradient=False)
    assert eval_loss == pytest.approx(loss, rel=1e-6)


def test_ignored_pixels_get_no_gradient_and_do_not_count():
    """Changing the logits of ignored pixels changes nothing; the mean is over labelled pixels only."""
    shape = (2, 4, 5, 6)
    logits, labels = _batch(shape, 255, 0.5, seed=3)
    loss, grad = run_loss("cross_entropy", shape, logits, labels)
    ignored = labels == 255
    assert np.all(grad.transpose(0, 2, 3, 1)[ignored] == 0)
    moved = logits.copy()
    moved.transpose(0, 2, 3, 1)[ignored] += 7.0
    assert run_loss("cross_entropy", shape, moved, labels)[0] == pytest.approx(loss, rel=1e-6)
    log_prob = torch.log_softmax(torch.from_numpy(logits), 1).numpy()
    picked = np.take_along_axis(log_prob, np.where(ignored, 0, labels)[:, None], 1)[:, 0]
    assert loss == pytest.approx(-picked[~ignored].sum() / (~ignored).sum(), rel=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 2, 1, 9)])
def test_all_pixels_ignored_gives_zero_loss_and_gradient(shape):
    """torch returns a NaN loss and a zero gradient; the step takes loss 0 and the same zero gradient."""
    logits, _ = _batch(shape, 255, 0.0)
    labels = np.full((shape[0], *shape[2:]), 255, np.int64)
    loss, grad = run_loss("cross_entropy", shape, logits, labels)
    torch_loss, torch_grad = torch_cross_entropy(logits, labels, 255)
    assert np.isnan(torch_loss)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, torch_grad)
    assert not grad.any()


def test_dynamic_batch_and_spatial_dims():
    """Symbolic N, H, W: the labelled count is computed at run time."""
    logits, labels = _batch((3, 4, 6, 5), 255, 0.3, seed=5)
    loss, grad = run_loss("cross_entropy", ("N", 4, "H", "W"), logits, labels)
    expected_loss, expected_grad = torch_cross_entropy(logits, labels, 255)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 1, 6, 5), (3, 1, 4, 4)])
def test_per_pixel_bce_with_logits_equals_torch(shape):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(shape) * 4).astype(np.float32)
    mask = (rng.random(shape) < 0.4).astype(np.float32)
    loss, grad = run_loss("bce", shape, logits, mask)
    z = torch.from_numpy(logits).requires_grad_(True)
    expected = torch.nn.BCEWithLogitsLoss()(z, torch.from_numpy(mask))
    expected.backward()
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=1e-4, atol=1e-8)


def test_classification_cross_entropy_unchanged():
    """N×C and N×C×1×1 logits keep N labels and the batch mean (no ignore_index)."""
    for shape in [(4, 6), (4, 6, 1, 1)]:
        value = _logits_value(shape)
        assert list(label_input("cross_entropy", value).shape) == [4]
        rng = np.random.default_rng(2)
        logits = rng.standard_normal(shape).astype(np.float32)
        labels = rng.integers(0, 6, 4).astype(np.int64)
        loss, grad = run_loss("cross_entropy", shape, logits, labels)
        expected_loss, expected_grad = torch_cross_entropy(logits.reshape(4, 6), labels, -100)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        np.testing.assert_allclose(grad.reshape(4, 6), expected_grad, rtol=1e-4, atol=1e-7)


def test_loss_forms():
    seg = loss_form("cross_entropy", _logits_value((2, 5, 64, 64)))
    assert (seg.task, seg.ignore_index, seg.per_pixel_classes) == ("segmentation", DEFAULT_IGNORE_INDEX, True)
    assert seg.description == ("per-pixel cross-entropy over 5 classes, mean over labelled pixels, ignore_index 255")
    assert loss_form("cross_entropy", _logits_value((2, 5, 8, 8)), 0).ignore_index == 0
    assert list(label_input("cross_entropy", _logits_value((2, 5, 8, 9))).shape) == [2, 8, 9]
    assert label_input("cross_entropy", _logits_value((2, 5, 8, 9))).dtype == ir.DataType.INT64
    binary = loss_form("bce", _logits_value((2, 1, 8, 8)))
    assert (binary.task, binary.ignore_index) == ("segmentation", None)
    assert binary.description.startswith("per-pixel BCE-with-logits")
    classification = loss_form("cross_entropy", _logits_value((2, 10)))
    assert (classification.task, classification.ignore_index) == ("classification", None)
    assert loss_form("mse", _logits_value((2, 3, 8, 8))).task is None
    with pytest.raises(InputError, match="--ignore-index applies to per-pixel cross_entropy"):
        loss_form("cross_entropy", _logits_value((2, 10)), 255)
    with pytest.raises(InputError, match="--ignore-index"):
        loss_form("mse", _logits_value((2, 3, 8, 8)), 255)
    with pytest.raises(UnsupportedModelError, match="cross_entropy needs"):
        loss_form("cross_entropy", _logits_value((7,)))


@pytest.mark.parametrize("shape,kind", [((2, 5, 6, 7), "cross_entropy"), ((2, 1, 6, 7), "bce")])
def test_class_map(shape, kind):
    value = _logits_value(shape)
    tape = ir.tape.Tape()
    classes = build_class_map(Emitter(tape, "class_map"), loss_form(kind, value), value)
    classes.name = "classes"
    logits = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    (result,) = _session([classes], value, None, tape).run(None, {"logits": logits})
    expected = logits.argmax(1) if shape[1] > 1 else (logits[:, 0] > 0).astype(np.int64)
    assert result.dtype == np.int64 and result.shape == (shape[0], *shape[2:])
    np.testing.assert_array_equal(result, expected)
    assert list(classes.shape) == [shape[0], *shape[2:]]
