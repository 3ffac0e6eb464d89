"""Semantic segmentation: a torchvision LRASPP / DeepLabV3 fine-tuned per pixel with the `gfc` command line.

    pip install "gfcompiler[test]"   # torch, torchvision, scikit-image, scikit-learn, Pillow
    python examples/segmentation.py                      # ~20 s on 2 quiet CPU cores
    python examples/segmentation.py --size 64 --train 48 --test 16 --epochs 1   # smaller (CI)
    python examples/segmentation.py --data builtin       # train on builtin:digit-scenes directly

Steps (each `gfc` command is printed before it runs, so you can copy it):

1. write a mask folder, the format your own data would have: ``images/0000.png`` (RGB)
   and ``masks/0000.png`` (a palette PNG whose pixel values are class indices: 0
   background, 1-10 the digits 0-9, 255 = ignore, on the strokes' anti-aliased rims).
   The scenes are gfcompiler's built-in sample (`builtin:digit-scenes`: scikit-learn's
   handwritten digits painted on photos that ship with scikit-image), so no download;
2. build a torchvision segmentation model (random weights: nothing is downloaded;
   ``--weights FILE.pth`` for yours) and export it to ONNX: N×3×S×S in, N×11×S×S logits out;
3. `gfc compile`: an N×C×H×W output with ``--loss cross_entropy`` (the default) is
   trained per pixel: labels N×H×W int64, mean over labelled pixels, 255 ignored
   (``--ignore-index`` changes it); the last ``--layers`` convs train with gradient filtering;
4. `gfc train`, `gfc eval` (pixel accuracy and mean IoU), `gfc export`;
5. the exported model in a plain onnxruntime.InferenceSession: besides the logits it
   outputs ``classes``, the N×H×W class map (argmax over the classes).

With random weights only the last layers learn from features that mean nothing yet, so
the held-out mean IoU stays near what predicting background everywhere gives (≈ 9 % with
the defaults: background IoU ≈ 90 %, the digits ≈ 0); a pretrained backbone
(``--weights``) is what makes fine-tuning the last layers work. benchmarks/segmentation.py
pretrains one in PyTorch and compares the exact and the filtered backward.
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
CLASSES = 11  # builtin:digit-scenes: 0 background, 1..10 = digits 0..9
IGNORE = 255


def torchvision_segmentation():
    """Import torchvision.models.segmentation, also next to a CPU-only torch with a CUDA torchvision wheel.

    There `import torchvision` fails with "operator torchvision::nms does not exist"; defining
    the two missing op schemas ourselves lets the pure-Python model zoo import.
    """
    import torch

    try:
        import torchvision.models.segmentation as segmentation

        return segmentation
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TV_LIB
    _TV_LIB = torch.library.Library("torchvision", "DEF")  # keep a reference: keeps the schemas
    _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision.models.segmentation as segmentation

    return segmentation


def write_mask_folder(root: Path, split: str, count: int, size: int) -> Path:
    """root/images/NNNN.png + root/masks/NNNN.png: ``count`` built-in scenes of ``split``."""
    from PIL import Image

    from gfcompiler.runtime.data import digit_scenes

    images, labels, edges = digit_scenes(split, (size, size), count=count)  # 0-255 floats, classes, rims
    labels = labels.copy()
    labels[edges] = IGNORE
    palette = np.random.default_rng(0).integers(0, 256, (256, 3)).astype(np.uint8)  # any colours: indices count
    palette[0], palette[IGNORE] = 0, 255
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(np.round(image).astype(np.uint8).transpose(1, 2, 0)).save(root / "images" / f"{i:04d}.png")
        mask = Image.fromarray(label.astype(np.uint8), mode="P")
        mask.putpalette(palette.tobytes())
        mask.save(root / "masks" / f"{i:04d}.png")
    return root


def export_onnx(arch: str, size: int, weights: str | None, path: Path, calibration: np.ndarray) -> Path:
    """A torchvision segmentation model -> ONNX (opset 17, dynamic batch): logits N×11×size×size.

    torchvision's models return a dict; the wrapper returns its "out" tensor. With random
    weights BatchNorm's running statistics do not match the activations; a pass over some
    of our images in train mode sets them, as pretraining would have.
    """
    import torch

    torch.manual_seed(0)
    model = getattr(torchvision_segmentation(), arch)(weights=None, weights_backbone=None, num_classes=CLASSES)
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    else:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batch
        model.train()
        with torch.no_grad():
            model(torch.from_numpy(calibration))

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    torch.onnx.export(Logits(model).eval(), torch.randn(1, 3, size, size), str(path),
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def gfc(*args) -> None:
    """Run one `gfc` command (as `python -m gfcompiler.cli`, the same program) and echo it."""
    print("\n$ gfc " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    result = subprocess.run([sys.executable, "-m", "gfcompiler.cli", *map(str, args)])
    if result.returncode:  # gfc has printed why
        sys.exit(result.returncode)


def load_image(path: Path) -> np.ndarray:
    """What `gfc train --mean ... --std ...` does to an image: 1×3×S×S float32."""
    from PIL import Image

    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return ((x - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None])[None]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"],
                        default="lraspp_mobilenet_v3_large")
    parser.add_argument("--weights", help="a local state_dict .pth for the architecture, 11 classes (default: random)")
    parser.add_argument("--data", choices=["folder", "builtin"], default="folder",
                        help="folder: write the scenes as images/ + masks/ PNGs and train on those (default); "
                             "builtin: train on builtin:digit-scenes directly")
    parser.add_argument("--size", type=int, default=96, help="input height and width (default 96)")
    parser.add_argument("--train", type=int, default=200, help="training scenes written (default 200)")
    parser.add_argument("--test", type=int, default=50, help="held-out scenes written (default 50)")
    parser.add_argument("--layers", default="6", help="gfc compile --layers (default 6)")
    parser.add_argument("--patch", type=int, default=2, help="gfc compile --patch (default 2; 0 = exact backward)")
    parser.add_argument("--epochs", type=int, default=4, help="gfc train --epochs (default 4)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--work", help="working directory (default: a new temporary one)")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="gfc-segmentation-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1. Data: a mask folder per split (or the built-in sample itself).
    train_folder = write_mask_folder(work / "scenes-train", "train", args.train, args.size)
    test_folder = write_mask_folder(work / "scenes-test", "test", args.test, args.size)
    train_data, test_data = ((train_folder, test_folder) if args.data == "folder"
                             else ("builtin:digit-scenes/train", "builtin:digit-scenes/test"))
    print(f"data: {train_data} (train), {test_data} (held out)")

    # 2. PyTorch -> ONNX.
    calibration = np.concatenate([load_image(p) for p in sorted((train_folder / "images").iterdir())[:32]])
    model = export_onnx(args.arch, args.size, args.weights, work / f"{args.arch}.onnx", calibration)
    print(f"exported {model}")

    # 3. Compile: per-pixel cross-entropy (it says so), the last --layers convs trained with the filter.
    artifacts = work / "artifacts"
    gfc("compile", model, "--layers", args.layers, "--patch", args.patch, "--ignore-index", IGNORE,
        "-o", artifacts, "--force")

    # 4. Train, evaluate (pixel accuracy, mean IoU), export. Images are already S×S; masks are
    # resized with nearest neighbour to the output's H×W when they are not.
    pre = ["--mean", *MEAN, "--std", *STD]
    gfc("train", artifacts, "--data", train_data, *pre, "--epochs", args.epochs,
        "--batch-size", args.batch_size, "--lr", args.lr, "--overwrite", "--device", "cpu")
    gfc("eval", artifacts, "--data", test_data, *pre, "--device", "cpu")
    finetuned = work / "finetuned.onnx"
    gfc("export", artifacts, "-o", finetuned, "--force")

    # 5. The exported model is an ordinary ONNX model: plain onnxruntime runs it, and its
    # "classes" output is the per-pixel class map.
    import onnxruntime as ort
    from PIL import Image

    session = ort.InferenceSession(str(finetuned), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    print(f"\n{finetuned.name} in a plain onnxruntime.InferenceSession: outputs {outputs}")
    for image in sorted((test_folder / "images").iterdir())[:3]:
        logits, classes = session.run(["logits", "classes"], {"input": load_image(image)})
        truth = np.asarray(Image.open(test_folder / "masks" / image.name))  # class indices
        labelled = truth != IGNORE
        agreement = float((classes[0][labelled] == truth[labelled]).mean())
        digits = sorted(int(c) - 1 for c in np.unique(classes[0]) if c > 0)
        print(f"  {image.name}: class map {classes.shape[1]}x{classes.shape[2]}, digits found {digits}, "
              f"pixels right {agreement:.1%} (logits {logits.shape})")
    print(f"\ndone in {time.perf_counter() - start:.0f} s; fine-tuned model: {finetuned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
