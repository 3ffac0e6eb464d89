"""From a PyTorch model to a fine-tuned ONNX model, with the `gfc` command line.

    pip install "gfcompiler[test]"   # torch, torchvision, scikit-image, Pillow
    python examples/pytorch_to_finetuned.py               # ~30 seconds on 2 CPU cores
    python examples/pytorch_to_finetuned.py --size 64 --per-class 4 --epochs 1 --layers 2   # smaller (CI)

Steps (each `gfc` command is printed before it runs, so you can copy it):

1. make a tiny image-folder data set from photos that ship with scikit-image
   (class = which photo, samples = random crops and flips; a second, held-out set
   for evaluation), unless --data FOLDER;
2. build a torchvision model (random weights, or yours with --weights FILE.pth) and
   export it to ONNX with a dynamic batch dimension;
3. `gfc compile` it: train the last --layers convs with gradient filtering (--patch);
4. `gfc train`, `gfc eval`, `gfc export`;
5. load the exported model in a plain onnxruntime.InferenceSession and predict.

With random weights the held-out accuracy is modest (~75%); give --weights for a real
pretrained backbone.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# ImageNet normalization, what torchvision's models expect (pixels scaled to 0..1 first).
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]  # scikit-image's bundled colour photos


def torchvision_models():
    """Import torchvision.models, also next to a CPU-only torch with a CUDA torchvision wheel.

    There `import torchvision` fails with "operator torchvision::nms does not exist"; defining
    the two missing op schemas ourselves lets the pure-Python model zoo import (only the
    detection ops stay unusable, which classification models do not need).
    """
    import torch

    try:
        import torchvision.models as tvm

        return tvm
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TV_LIB
    _TV_LIB = torch.library.Library("torchvision", "DEF")  # keep a reference: keeps the schemas
    _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision.models as tvm

    return tvm


def export_onnx(arch: str, classes: int, size: int, weights: str | None, path: Path, calibration: np.ndarray) -> Path:
    """A torchvision classifier -> ONNX (opset 17, dynamic batch, fixed size×size input).

    With random weights, BatchNorm's running statistics (mean 0, variance 1) do not match
    the activations, which then blow up layer after layer; a pass over some of our images
    in train mode sets them, as pretraining would have.
    """
    import torch

    torch.manual_seed(0)
    model = getattr(torchvision_models(), arch)(weights=None)
    if weights:  # your own state_dict (e.g. ImageNet weights downloaded once with torchvision)
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    # A new head for our classes (the last Linear of either architecture).
    if arch == "resnet18":
        model.fc = torch.nn.Linear(model.fc.in_features, classes)
    else:
        model.classifier[-1] = torch.nn.Linear(model.classifier[-1].in_features, classes)
    if not weights:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batch
        model.train()
        with torch.no_grad():
            model(torch.from_numpy(calibration))
    model.eval()  # eval mode: BatchNorm is folded into the convs by the exporter
    torch.onnx.export(
        model, torch.randn(1, 3, size, size), str(path),
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    return path


def make_photo_dataset(root: Path, per_class: int, seed: int = 0) -> Path:
    """root/<photo>/<i>.png: random crops (30–70% of the side) with random flips of each photo."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()[..., :3]
        (root / name).mkdir(parents=True, exist_ok=True)
        h, w = photo.shape[:2]
        for i in range(per_class):
            side = int(min(h, w) * rng.uniform(0.3, 0.7))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = photo[top : top + side, left : left + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / name / f"{i:03d}.png")
    return root


def gfc(*args) -> None:
    """Run one `gfc` command (as `python -m gfcompiler.cli`, the same program) and echo it."""
    print("\n$ gfc " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    result = subprocess.run([sys.executable, "-m", "gfcompiler.cli", *map(str, args)])
    if result.returncode:  # gfc has printed why
        sys.exit(result.returncode)


def load_image(path: Path, size: int) -> np.ndarray:
    """What `gfc train --resize S S --mean ... --std ...` does to an image: 1×3×S×S float32."""
    from PIL import Image

    image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    x = (x - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
    return x[None]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["mobilenet_v2", "resnet18"], default="mobilenet_v2")
    parser.add_argument("--weights", help="a local state_dict .pth for the architecture (default: random weights)")
    parser.add_argument("--data", help="an image folder, one sub-folder per class (default: scikit-image photos)")
    parser.add_argument("--size", type=int, default=96, help="input height and width (default 96)")
    parser.add_argument("--per-class", type=int, default=32, help="generated images per photo (default 32)")
    parser.add_argument("--layers", default="8", help="gfc compile --layers (default 8)")
    parser.add_argument("--patch", type=int, default=2, help="gfc compile --patch (default 2; 0 = exact backward)")
    parser.add_argument("--epochs", type=int, default=8, help="gfc train --epochs (default 8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--work", help="working directory (default: a new temporary one)")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="gfc-example-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1. Data first: the number of classes decides the model's head.
    # Held-out images for `gfc eval`: other random crops of the same photos (or --data itself).
    data = Path(args.data) if args.data else make_photo_dataset(work / "photos", args.per_class)
    val = data if args.data else make_photo_dataset(work / "photos-val", max(2, args.per_class // 4), seed=1)
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())  # gfc's label order: sorted names
    print(f"data: {data} ({len(classes)} classes: {', '.join(classes)})")

    # 2. PyTorch -> ONNX.
    images = sorted(p for label in classes for p in (data / label).iterdir())
    calibration = np.concatenate([load_image(p, args.size) for p in images[:: max(1, len(images) // 64)]])
    model = export_onnx(args.arch, len(classes), args.size, args.weights, work / f"{args.arch}.onnx", calibration)
    print(f"exported {model}")

    # 3. Compile: the last --layers convs (and the head) train, with the gradient filter.
    artifacts = work / "artifacts"
    gfc("compile", model, "--layers", args.layers, "--patch", args.patch, "-o", artifacts, "--force")

    # 4. Train, evaluate, export. The preprocessing options must match load_image() below.
    pre = ["--resize", args.size, args.size, "--mean", *MEAN, "--std", *STD]
    gfc("train", artifacts, "--data", data, *pre, "--epochs", args.epochs,
        "--batch-size", args.batch_size, "--lr", args.lr, "--overwrite", "--device", "cpu")
    gfc("eval", artifacts, "--data", val, *pre, "--device", "cpu")
    finetuned = work / "finetuned.onnx"
    gfc("export", artifacts, "-o", finetuned, "--force")

    # 5. The exported model is an ordinary ONNX model: plain onnxruntime runs it.
    import onnxruntime as ort

    session = ort.InferenceSession(str(finetuned), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    print(f"\npredictions of {finetuned.name} in a plain onnxruntime.InferenceSession:")
    for label in classes:
        image = sorted((val / label).iterdir())[0]
        logits = session.run(None, {input_name: load_image(image, args.size)})[0][0]
        print(f"  {label}/{image.name}: predicted {classes[int(np.argmax(logits))]}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s; fine-tuned model: {finetuned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
