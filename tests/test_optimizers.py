"""The compiled optimizers do what the manifest says: plain SGD, momentum SGD, coupled weight decay.

Gradients come from a training-graph run (tests/torchref.ort_gradients); one step of the
runtime must then move every trainable parameter by exactly the torch.optim.SGD update.
"""

from __future__ import annotations

import numpy as np
import pytest
import torchref

from gfcompiler.artifacts import OptimizerSpec
from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.runtime import Trainer

LR, DECAY = 0.05, 0.1


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 4)


def _compile(model, directory, momentum: float, weight_decay: float) -> dict:
    spec = OptimizerSpec(name="sgd", momentum=momentum, weight_decay=weight_decay)
    return compile_model(model, directory, CompileOptions(layers=2, patch=2, optimizer=spec, backend="ort-training"))


def test_coupled_weight_decay_is_added_to_the_gradients(small_cnn, tmp_path, batch):
    model = small_cnn("plain", batch=None)
    _compile(model, tmp_path / "plain", 0.0, 0.0)
    manifest = _compile(model, tmp_path / "decayed", 0.0, DECAY)
    assert manifest["optimizer"]["weight_decay"] == DECAY and "SGDOptimizerV2" in manifest["optimizer"]["implementation"]
    loss, grads, values = torchref.ort_gradients(tmp_path / "plain", *batch)
    decayed_loss, decayed_grads, _ = torchref.ort_gradients(tmp_path / "decayed", *batch)
    assert decayed_loss == pytest.approx(loss, rel=1e-6)  # the reported loss has no regularizer term
    assert set(decayed_grads) == set(manifest["trainable_params"])
    for name, grad in grads.items():
        np.testing.assert_allclose(decayed_grads[name], grad + DECAY * values[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_one_step_is_the_torch_sgd_update(small_cnn, tmp_path, batch, momentum):
    """torch.optim.SGD's first step is p - lr·(g + λ·p) with or without momentum (its buffer starts at g)."""
    model = small_cnn("plain", batch=None)
    _compile(model, tmp_path / "sgd", momentum, DECAY)
    _, grads, values = torchref.ort_gradients(tmp_path / "sgd", *batch)  # g + λ·p, from the same graph
    trainer = Trainer(tmp_path / "sgd", "cpu", lr=LR)
    trainer.step(*batch)
    after = trainer.parameters()
    for name, grad in grads.items():
        np.testing.assert_allclose(after[name], values[name] - LR * grad, rtol=1e-5, atol=1e-6)
