"""What ``gfc bench`` takes: `BenchOptions`, ``--patch`` parsing and the backends to measure."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from gfcompiler.errors import InputError
from gfcompiler.manifest import BACKEND_ONNX, BACKEND_ORT_TRAINING

Progress = Callable[[str], None]

# The parts of a step onnxruntime's profiler attributes kernel time to (`gfcompiler.bench.profile`);
# the onnx backend's step model also runs the optimizer ("optimizer", see STEP_CATEGORIES).
CATEGORIES = ("fwd", "gf_fwd", "trained_bwd", "other_bwd")
STEP_CATEGORIES = (*CATEGORIES, "optimizer")
CATEGORY_TITLES = {
    "prefix": "frozen prefix (inference session)",
    "fwd": "forward kernels",
    "gf_fwd": "filter's forward summaries",
    "trained_bwd": "trained convs' backward",
    "other_bwd": "other backward kernels",
    "optimizer": "optimizer step",
    "rest": "framework overhead",
}
DEFAULT_BATCH = 8
BOTH = "both"
BACKEND_CHOICES = (BACKEND_ONNX, BACKEND_ORT_TRAINING, BOTH)
BENCH_DESCRIPTION = """\
Compile the exact baseline (--patch 0) and one gradient-filtered variant per --patch size
of the same layer choice, for one or both backends (--backend), and report side by side:
training-step time (median and IQR over interleaved rounds in one process, each step
through gfcompiler.runtime.Trainer), the trained convs' backward time, the filter's forward
overhead and the onnx step model's optimizer (onnxruntime profiler), the forward-only time
of an optimized inference session and step/forward, peak memory of a step (each variant in
its own process), the bytes kept for backward and backward MACs (manifest), every ratio
filtered/exact and, with both backends, onnx/ort-training. Artifacts go to a temporary
directory."""
PLOT_INSTALL_HINT = "--plot needs matplotlib: pip install 'gfcompiler[bench]' (or pip install matplotlib)"


def _silent(_: str) -> None:
    pass


@dataclasses.dataclass
class BenchOptions:
    """What ``gfc bench`` takes besides the model."""

    layers: int | list[str] | str | None = None  # as CompileOptions.layers
    patches: list[int] = dataclasses.field(default_factory=lambda: [4])
    batch: int | None = None  # None: the model's static batch, else DEFAULT_BATCH
    repeats: int = 20  # interleaved timed rounds
    warmup: int = 3  # untimed interleaved rounds first
    threads: int | None = None  # intra-op threads; None: onnxruntime's default
    input_shapes: list = dataclasses.field(default_factory=list)  # [loading.InputShape]
    profile_steps: int = 5  # profiled steps per variant (after one unprofiled); 0: no profile
    memory_runs: int = 3  # fresh subprocesses per variant for peak memory (median reported); 0: none
    pause: float = 0.03  # seconds of idle before each timed run
    wait_idle: float = 0.0  # >0: each round waits up to this long for an idle machine; busy rounds are redone
    single_graph: bool = False  # also compile and measure every ort-training variant in the single-graph form
    backend: str | None = None  # "onnx" | "ort-training" | "both"; None: both where onnxruntime-training imports

    def check(self) -> None:
        if not self.patches or any(p < 1 for p in self.patches):
            raise InputError(f"--patch needs sizes >= 1 (the exact baseline is always included), got {self.patches}")
        for name, value, least in (("--repeats", self.repeats, 1), ("--warmup", self.warmup, 0),
                                   ("--profile-steps", self.profile_steps, 0), ("--memory-runs", self.memory_runs, 0)):
            if value < least:
                raise InputError(f"{name} must be at least {least}, got {value}")
        if self.batch is not None and self.batch < 1:
            raise InputError(f"--batch must be at least 1, got {self.batch}")
        if self.wait_idle < 0:
            raise InputError(f"--wait-idle must be >= 0, got {self.wait_idle}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be at least 1, got {self.threads}")
        if self.backend is not None and self.backend not in BACKEND_CHOICES:
            raise InputError(f"unknown --backend {self.backend!r} (choose from {', '.join(BACKEND_CHOICES)})")
        if self.single_graph and self.backend == BACKEND_ONNX:
            raise InputError("--compare-single-graph compares the two forms of ort-training artifacts "
                             "(a --backend onnx step model is always one graph): use --backend ort-training or both")


def training_available() -> bool:
    """Whether onnxruntime-training's API imports here (the ort-training backend can be measured)."""
    from gfcompiler.ort_training import TrainingBuildMissing, api

    try:
        api()
    except TrainingBuildMissing:
        return False
    return True


def resolve_backends(options: BenchOptions) -> list[str]:
    """The backends to measure, ort-training first: ``--backend``, or both where onnxruntime-training imports."""
    from gfcompiler.ort_training import TRAINING_BUILD_HINT

    choice = options.backend
    if choice is None:
        backends = [BACKEND_ORT_TRAINING, BACKEND_ONNX] if training_available() else [BACKEND_ONNX]
    else:
        backends = [BACKEND_ORT_TRAINING, BACKEND_ONNX] if choice == BOTH else [choice]
        if BACKEND_ORT_TRAINING in backends and not training_available():
            raise InputError(f"--backend {choice} needs onnxruntime-training, which does not import here: "
                             f"{TRAINING_BUILD_HINT}")
    if options.single_graph and BACKEND_ORT_TRAINING not in backends:
        raise InputError("--compare-single-graph needs the ort-training backend (onnxruntime-training does not "
                         "import here)")
    return backends


def parse_patches(text: str) -> list[int]:
    """``"2,4,7"`` → [2, 4, 7]; 0 (the exact baseline, always run) is dropped; duplicates removed."""
    patches: list[int] = []
    for token in text.split(","):
        try:
            value = int(token.strip())
        except ValueError:
            raise InputError(f"--patch expects comma-separated integers such as 2,4,7, got {text!r}") from None
        if value < 0:
            raise InputError(f"--patch sizes must be >= 1 (0 is the exact baseline, always run), got {value}")
        if value and value not in patches:
            patches.append(value)
    if not patches:
        raise InputError(f"--patch {text!r} names no filtered variant (sizes >= 1)")
    return patches
