"""``gfc bench``: the exact baseline and the gradient-filtered variants of one model, side by side.

    gfc bench model.onnx --layers 4 --patch 2,4 --batch 8 [--json FILE] [--plot FILE.png]

One layer choice is compiled with the exact backward (``--patch 0``) and once per patch
size, into a temporary directory, and every variant is measured the same way:

* **step time**: for two-stage artifacts the frozen prefix's inference session first, then
  forward, backward, optimizer step and gradient reset, through onnxruntime-training's
  ``Module``/``Optimizer`` (the calls ``gfc train`` makes, with its session options: one
  shared CPU arena; no spinning thread pools for the three sessions of a two-stage step). ``--compare-single-graph`` adds every
  variant compiled with ``--single-graph`` and the ratio two-stage / single-graph. All
  variants and the forward-only session live in one process and are timed in
  *interleaved* rounds: every round runs each of them once, in an order rotated from
  round to round, after a short pause (the previous session's spinning thread pool
  must not compete). Medians and IQRs are over rounds; the ratios ``×exact`` are the
  median of the per-round ratios, so slow drifts of the machine's load cancel out.
  ``--wait-idle`` makes each round wait for other processes to leave the CPUs idle and
  measures again a round during which they were busy (`OtherCpu`).
* **where the step goes**: onnxruntime's profiler, on separate sessions (profiling
  costs time), attributes kernel time to the nodes of ``training_model.onnx``:
  ``trained bwd`` is the backward of the trained convs (their ``ConvGrad`` nodes, or
  the nodes the filter emits as ``<conv>/gf/...`` that run after the loss), ``gf fwd``
  the filter's forward summaries (``X_mean``, ``X_sum``, the scheduling anchor: every
  ``<conv>/gf/...`` node the loss depends on), ``fwd`` the rest of the forward pass and
  ``other bwd`` the rest of the backward (activation gradients, the head,
  gradient accumulation). ``optim`` is the optimizer session's step, timed inside each
  training step, and ``rest`` the step time minus kernels and optimizer: framework
  overhead (medians of different runs, so it can come out slightly negative).
* **forward-only**: an optimized plain ``InferenceSession`` of the same model at the
  same batch, the limit a step that trains only the last layers can approach;
  ``step/fwd`` is each variant's step time over it.
* **peak memory**: each variant in fresh subprocesses (CPU arena off, so the peak
  follows what the graph keeps alive): the resident-set high-water mark of the first
  training step above the resident set before it (``step peak``), and the process's
  peak; medians over ``--memory-runs`` processes (one process varies by a few MiB).
  Beside it the static accounting of the manifest: the bytes the training graph keeps
  from forward to backward (``held``, ``totals.held_bytes``: activation gradients'
  inputs included), the trained convs' share of them (``convs held``, the layers'
  ``held_bytes``) and the trained convs' backward MACs.

The model's data input gets a fixed batch (``--batch``; a model with a static batch
keeps its own). ``python -m gfcompiler.bench --probe-memory DIR BATCH THREADS`` is the
memory subprocess; it imports onnxruntime and numpy only.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gfcompiler.runtime.peak_memory import peak_kib, reset_peak_kib
from gfcompiler.errors import GfcError, InputError, OutputError, UnsupportedModelError
from gfcompiler.manifest import FILES, read_manifest

Progress = Callable[[str], None]

CATEGORIES = ("fwd", "gf_fwd", "trained_bwd", "other_bwd")
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
BENCH_DESCRIPTION = """\
Compile the exact baseline (--patch 0) and one gradient-filtered variant per --patch size
of the same layer choice, and report side by side: training-step time (median and IQR over
interleaved rounds in one process), the trained convs' backward time and the filter's
forward overhead (onnxruntime profiler), the forward-only time of an optimized inference
session and step/forward, peak memory of a step (each variant in its own process), the
bytes kept for backward and backward MACs (manifest), and every ratio filtered/exact.
Artifacts go to a temporary directory."""
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
    single_graph: bool = False  # also compile and measure every variant in the single-graph form

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


# ---------------------------------------------------------------------------- statistics


def stats(values: list[float]) -> dict:
    """Median, quartiles, IQR and minimum of ``values`` (seconds) in milliseconds."""
    q1, median, q3 = np.percentile(np.asarray(values, dtype=np.float64) * 1e3, [25, 50, 75])
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1),
            "min_ms": float(np.min(values) * 1e3), "n": len(values)}


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


# ---------------------------------------------------------------------------- onnxruntime


def _onnxruntime():
    """onnxruntime, imported without its torch-only training helpers (see gfcompiler.ort_training)."""
    from gfcompiler.ort_training import onnxruntime

    return onnxruntime()


def session_options(threads: int | None, *, arena: bool = True, profile_prefix: str | None = None,
                    spinning: bool = True):
    """The runtime's session options (gfcompiler.runtime.device), plus profiling when asked."""
    from gfcompiler.runtime.device import session_options as runtime_session_options

    options = runtime_session_options(threads, memory_arena=arena, spinning=spinning)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def make_batch(manifest: dict, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random input batch and labels that fit the manifest's input and label."""
    rng = np.random.default_rng(seed)
    spec = manifest["inputs"][0]
    shape = [batch if d is None or i == 0 else d for i, d in enumerate(spec["shape"])]
    x = rng.standard_normal(shape).astype(np.float32)
    label = manifest["label"]
    label_shape = [batch if d is None or i == 0 else d for i, d in enumerate(label["shape"] or [None])]
    if (label["dtype"] or "int64").startswith("int"):
        out_shape = manifest["outputs"][0]["shape"] or []
        classes = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else 1
        y = rng.integers(0, max(classes, 1), label_shape).astype(np.int64)
    else:
        y = rng.random(label_shape).astype(np.float32)
    return x, y


class TrainingStep:
    """One variant's training step, as the runtime's Trainer runs it.

    ``step()`` runs the frozen prefix (two-stage artifacts: an optimized InferenceSession,
    `gfcompiler.runtime.prefix.FrozenPrefix`), forward and backward, the optimizer step
    and the gradient reset. ``last_split`` holds the prefix's and the optimizer's share of
    the last call, in seconds.
    """

    def __init__(self, directory: Path, manifest: dict, batch: int, threads: int | None, *,
                 optimizer: bool = True, arena: bool = True, profile_prefix: str | None = None) -> None:
        from gfcompiler import ort_training
        from gfcompiler.runtime.device import Device
        from gfcompiler.runtime.prefix import FrozenPrefix
        from gfcompiler.runtime.trainer import session_spinning

        ort = _onnxruntime()
        api = ort_training.api()
        spinning = session_spinning(manifest.get("form") == "two_stage")  # as the Trainer's sessions
        options = session_options(threads, arena=arena, profile_prefix=profile_prefix, spinning=spinning)
        self.state = api.CheckpointState.load_checkpoint(str(directory / FILES["checkpoint"]))
        # No eval model: one session (and one profile file) per module.
        self.module = api.Module(str(directory / FILES["training_model"]), self.state, None, device="cpu",
                                 session_options=options)
        self.optimizer = api.Optimizer(str(directory / FILES["optimizer_model"]), self.module) if optimizer else None
        self.module.train()
        self.x, y = make_batch(manifest, batch)
        self.input_name = manifest["inputs"][0]["name"]
        self.prefix = None
        if manifest.get("form") == "two_stage":
            self.prefix = FrozenPrefix.from_manifest(directory, manifest, Device("cpu"),
                                                     session_options(threads, arena=arena, spinning=spinning))
        self.names = list(self.module.input_names())
        self.label = ort.OrtValue.ortvalue_from_numpy(y)
        self.x_value = ort.OrtValue.ortvalue_from_numpy(self.x)
        self.label_name = manifest["label"]["name"]
        self.last_split: dict[str, float] = {}

    def _feeds(self) -> list:
        feeds = {self.input_name: self.x_value, self.label_name: self.label}
        if self.prefix is not None:
            start = time.perf_counter()
            feeds.update(self.prefix(self.x))
            self.last_split["prefix"] = time.perf_counter() - start
        return [feeds[name] for name in self.names]

    def __call__(self) -> None:
        self.module(*self._feeds())
        if self.optimizer is not None:
            start = time.perf_counter()
            self.optimizer.step()
            self.last_split["optimizer"] = time.perf_counter() - start
        self.module.lazy_reset_grad()

    def close(self) -> None:
        """Drop the sessions (their destructor writes the profile, if profiling)."""
        self.module = self.optimizer = self.state = self.prefix = None
        gc.collect()


class ForwardOnly:
    """An optimized plain InferenceSession of the model: ``run()`` is one forward pass."""

    def __init__(self, model_path: Path, x: np.ndarray, threads: int | None) -> None:
        ort = _onnxruntime()
        options = session_options(threads)  # a plain InferenceSession at onnxruntime's defaults
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.feeds = {self.session.get_inputs()[0].name: ort.OrtValue.ortvalue_from_numpy(x)}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self) -> None:
        self.session.run_with_ort_values(self.outputs, self.feeds)


# ---------------------------------------------------------------------------- machine load


class OtherCpu:
    """CPU used by *other* processes while a block runs, in cores (Linux; None elsewhere).

    Busy time of the whole machine (``/proc/stat``) minus this process's own user and
    system time (all its threads, onnxruntime's pools included) over the wall time: 0 on a
    quiet machine, about 1 when another process keeps one core busy. It tells how much a
    measurement was contended, which a load average (a 1-minute mean that counts the
    benchmark itself) cannot.
    """

    def __init__(self) -> None:
        self.cores: float | None = None

    @staticmethod
    def _sample() -> tuple[int, int, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
        return user + nice + system + irq + softirq, int(own[11]) + int(own[12]), time.monotonic()

    def __enter__(self) -> "OtherCpu":
        self._start = self._sample()
        return self

    def __exit__(self, *_) -> None:
        end = self._sample()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        other = (end[0] - self._start[0]) - (end[1] - self._start[1])
        self.cores = max(other, 0) / ticks / (end[2] - self._start[2])


@dataclasses.dataclass
class Timings:
    """What `time_interleaved` measured: seconds per call, and how contended the rounds were."""

    samples: dict[str, list[float]]
    splits: dict[str, dict[str, list[float]]]  # runner -> part ("prefix", "optimizer") -> seconds per kept call
    rounds_dropped: int = 0  # rounds measured while other processes were busy, and measured again
    rounds_busy: int = 0  # rounds kept although other processes were busy (retries used up, or no idle gate)
    round_other_cores: list[float] = dataclasses.field(default_factory=list)


def wait_for_idle(limit_s: float, threshold: float = 0.2, window_s: float = 0.25) -> float | None:
    """Wait (at most ``limit_s``) until other processes use under ``threshold`` cores over a window.

    Returns the last window's usage (None where `OtherCpu` cannot measure it)."""
    deadline = time.monotonic() + limit_s
    while True:
        with OtherCpu() as usage:
            time.sleep(window_s)
        if usage.cores is None or usage.cores < threshold or time.monotonic() >= deadline:
            return usage.cores


def time_interleaved(runners: dict[str, Callable[[], None]], rounds: int, warmup: int, pause: float,
                     progress: Progress = _silent, idle_wait: float = 0.0, busy_threshold: float = 0.25) -> Timings:
    """Seconds per call of each runner, over ``rounds`` rounds that each call every runner once.

    The order rotates from round to round and every call is preceded by ``pause`` seconds
    of idle, so that the thread pool of the session that ran before stops spinning.
    ``warmup`` untimed rounds come first. Every round records the CPU other processes
    used meanwhile (`OtherCpu`); with ``idle_wait`` > 0 each round first waits (up to
    that many seconds) for them to go idle, and a round during which they used more than
    ``busy_threshold`` cores is dropped and measured again (at most ``rounds`` times in all).
    """
    names = list(runners)
    timings = Timings({name: [] for name in names}, {name: {} for name in names})
    attempt = 0
    while True:
        kept = len(timings.samples[names[0]])
        if kept >= rounds:
            break
        if idle_wait and attempt >= warmup:
            wait_for_idle(idle_wait, busy_threshold * 0.8)
        k = attempt % len(names)
        times, splits = {}, {}
        with OtherCpu() as usage:
            for name in names[k:] + names[:k]:
                time.sleep(pause)
                start = time.perf_counter()
                runners[name]()
                times[name] = time.perf_counter() - start
                splits[name] = dict(getattr(runners[name], "last_split", None) or {})
        attempt += 1
        if attempt <= warmup:
            continue
        busy = usage.cores is not None and usage.cores > busy_threshold
        if busy and idle_wait and timings.rounds_dropped < rounds:
            timings.rounds_dropped += 1
            continue
        timings.rounds_busy += busy
        timings.round_other_cores.append(usage.cores if usage.cores is not None else float("nan"))
        for name in names:
            timings.samples[name].append(times[name])
            for part, seconds in splits[name].items():
                timings.splits[name].setdefault(part, []).append(seconds)
        done = kept + 1
        if done == rounds or done % max(1, rounds // 5) == 0:
            extra = f" ({timings.rounds_dropped} measured again: other processes busy)" if timings.rounds_dropped else ""
            progress(f"timed round {done}/{rounds}{extra}")
    return timings


# ---------------------------------------------------------------------------- profile attribution


class NodeCategories:
    """Which part of a step each node of a ``training_model.onnx`` belongs to (`CATEGORIES`).

    Forward nodes are those the loss depends on (ancestors of the graph outputs that are
    not gradient accumulators). ``trained_bwd``: the ``ConvGrad`` of a trained conv (its
    forward Conv found through use-def links, as the compiler does) and every
    ``<conv>/gf/...`` node of a trained conv that is not in the forward; ``gf_fwd``: the
    ``<conv>/gf/...`` nodes that are. ``layer_of`` maps the nodes of the trained convs
    to their conv.
    """

    def __init__(self, training_model: Path, trained_convs: list[str]) -> None:
        import onnx_ir as ir

        from gfcompiler.passes.gradient_filter import forward_conv_of, is_conv_grad

        graph = ir.load(str(training_model)).graph
        forward = self._forward_nodes(graph)
        trained = set(trained_convs)
        prefixes = {f"{conv}/gf/": conv for conv in trained_convs}
        self.category: dict[str, str] = {}
        self.layer_of: dict[str, str] = {}
        for node in graph:
            if not node.name:
                continue
            layer = None
            if is_conv_grad(node):
                conv = forward_conv_of(node)
                layer = conv.name if conv is not None and conv.name in trained else None
            else:
                layer = next((conv for prefix, conv in prefixes.items() if node.name.startswith(prefix)), None)
            if layer is not None:
                self.layer_of[node.name] = layer
                self.category[node.name] = "gf_fwd" if node in forward else "trained_bwd"
            else:
                self.category[node.name] = "fwd" if node in forward else "other_bwd"

    @staticmethod
    def _forward_nodes(graph) -> set:
        stack = [out.producer() for out in graph.outputs
                 if out.producer() is not None and out.producer().op_type != "InPlaceAccumulatorV2"]
        seen: set = set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            stack.extend(value.producer() for value in node.inputs if value is not None)
        return seen

    def lookup(self, profiled_name: str) -> str | None:
        """The graph node a profiled node came from: its name, or the longest node name that
        prefixes it before a ``_`` or ``/`` (onnxruntime renames nodes it transforms, such as
        ``X_mean`` → ``X_mean_nchwc`` or ``dW_sum_per_sample/MatmulTransposeFusion/``)."""
        name = profiled_name
        while name:
            if name in self.category:
                return name
            cut = max(name.rfind("_"), name.rfind("/"))
            if cut <= 0:
                return None
            name = name[:cut]
        return None


def parse_profile(path: Path, categories: NodeCategories, skip_runs: int = 1) -> dict:
    """Kernel milliseconds per category (and per trained layer) of each profiled run.

    Profiled nodes that match no graph node (nodes onnxruntime inserted) count as
    forward when they ran before the first backward node of their run, else as other
    backward.
    """
    events = json.loads(Path(path).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run: list[dict] = [{"categories": dict.fromkeys(CATEGORIES, 0.0), "layers": {}, "unmatched": 0.0, "first_bwd": None}
                           for _ in runs]
    kernels = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    placed = []
    for event in kernels:
        index = next((i for i, (start, end) in enumerate(runs) if start <= event["ts"] <= end), None)
        if index is None:
            continue
        node = categories.lookup(event["name"][: -len("_kernel_time")])
        category = categories.category.get(node) if node else None
        run = per_run[index]
        if category in ("trained_bwd", "other_bwd") and run["first_bwd"] is None:
            run["first_bwd"] = event["ts"]
        placed.append((run, event, node, category))
    for run, event, node, category in placed:
        ms = event["dur"] / 1e3
        if category is None:
            run["unmatched"] += ms
            category = "fwd" if run["first_bwd"] is None or event["ts"] < run["first_bwd"] else "other_bwd"
        run["categories"][category] += ms
        layer = categories.layer_of.get(node) if node else None
        if layer is not None and category == "trained_bwd":
            run["layers"][layer] = run["layers"].get(layer, 0.0) + ms
    kept = per_run[skip_runs:]
    if not kept:
        return {}
    result = {}
    for category in CATEGORIES:
        values = [run["categories"][category] / 1e3 for run in kept]
        result[category] = stats(values)
    result["kernels"] = stats([sum(run["categories"].values()) / 1e3 for run in kept])
    result["unmatched_ms"] = _median([run["unmatched"] for run in kept])
    layers = sorted({layer for run in kept for layer in run["layers"]})
    result["trained_bwd_per_layer_ms"] = {layer: _median([run["layers"].get(layer, 0.0) for run in kept]) for layer in layers}
    result["runs"] = len(kept)
    return result


def profile_variants(variants: list["Variant"], batch: int, options: BenchOptions, workdir: Path,
                     progress: Progress = _silent) -> dict[str, dict]:
    """Profile ``options.profile_steps`` interleaved steps of every variant (after one unprofiled)."""
    steps = {}
    for variant in variants:
        prefix = workdir / f"profile-{variant.key}" / "step"
        prefix.parent.mkdir()
        # No optimizer session: its profile would go to a file of the same name.
        steps[variant.key] = TrainingStep(variant.directory, variant.manifest, batch, options.threads,
                                          optimizer=False, profile_prefix=str(prefix))
    time_interleaved(steps, options.profile_steps, 1, options.pause)
    results = {}
    for variant in variants:
        steps[variant.key].close()
        files = sorted((workdir / f"profile-{variant.key}").glob("step*.json"))
        if len(files) != 1:
            progress(f"warning: expected one onnxruntime profile for {variant.label}, found {len(files)}")
            results[variant.key] = {}
            continue
        categories = NodeCategories(variant.directory / FILES["training_model"], variant.manifest["selection"]["trained_convs"])
        results[variant.key] = parse_profile(files[0], categories, skip_runs=1)
    return results


# ---------------------------------------------------------------------------- peak memory


def probe_memory(directory: Path, batch: int, threads: int | None) -> dict:
    """Peak memory of the first training step of ``directory`` (run in a fresh process)."""
    manifest = read_manifest(directory)
    step = TrainingStep(directory, manifest, batch, threads, arena=False)
    before = reset_peak_kib()
    step()
    peak = peak_kib()
    return {"step_peak_kib": peak - before, "process_peak_kib": peak,
            "method": "VmHWM reset before the step (gfcompiler.runtime.peak_memory)"}


def measure_memory(directory: Path, batch: int, threads: int | None) -> dict:
    """`probe_memory` in a subprocess, so that each variant's peak is its own."""
    command = [sys.executable, "-m", "gfcompiler.bench", "--probe-memory", str(directory), str(batch), str(threads or 0)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"memory probe exited {result.returncode}: {tail[0]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_memory_variants(variants: list["Variant"], batch: int, threads: int | None, runs: int,
                            progress: Progress = _silent) -> dict[str, dict]:
    """`measure_memory` ``runs`` times per variant (variants alternating); the median of each field.

    One process's step peak varies by several MiB from run to run (allocation order under
    two threads), hence several fresh processes."""
    results: dict[str, list[dict]] = {v.key: [] for v in variants}
    for _ in range(runs):
        for v in variants:
            result = measure_memory(v.directory, batch, threads)
            if "error" in result:
                progress(f"warning: {v.label}: {result['error']}")
            else:
                results[v.key].append(result)
    summary = {}
    for v in variants:
        found = results[v.key]
        if not found:
            summary[v.key] = {}
            continue
        peaks = [r["step_peak_kib"] for r in found]
        summary[v.key] = {
            "step_peak_kib": int(np.median(peaks)), "step_peak_kib_min": min(peaks), "step_peak_kib_max": max(peaks),
            "process_peak_kib": int(np.median([r["process_peak_kib"] for r in found])),
            "runs": len(found), "method": found[0]["method"],
        }
    return summary


# ---------------------------------------------------------------------------- the benchmark


@dataclasses.dataclass
class Variant:
    patch: int
    directory: Path
    manifest: dict
    single_graph: bool = False  # compiled with --single-graph (no frozen prefix model)

    @property
    def label(self) -> str:
        """"exact", "r=4", "exact 1-graph", ..."""
        return ("exact" if self.patch == 0 else f"r={self.patch}") + (" 1-graph" if self.single_graph else "")

    @property
    def key(self) -> str:
        return ("exact" if self.patch == 0 else f"r{self.patch}") + ("-1graph" if self.single_graph else "")

    @property
    def form(self) -> str:
        """What the compiler made: "two_stage", or "single_graph" (asked for, or no frozen prefix to cut)."""
        return self.manifest.get("form", "single_graph")


def resolve_input_shapes(model_path: Path, options: BenchOptions):
    """(input shapes for the compiler, batch, the loaded model with those shapes).

    The data input's batch is fixed: to ``--batch`` when the model's is dynamic, and a
    static batch must agree with ``--batch`` (a model cannot be re-batched here).
    """
    from gfcompiler.loading import InputShape, data_inputs, load_model

    model = load_model(model_path, options.input_shapes)
    inputs = data_inputs(model)
    if len(inputs) != 1:
        raise UnsupportedModelError(f"gfc bench needs a model with one data input, this one has {len(inputs)}: "
                                    + ", ".join(v.name for v in inputs))
    value = inputs[0]
    if value.shape is None or len(value.shape) < 2:
        raise InputError(f"input {value.name!r} has no known rank: pass --input-shape {value.name}=N,C,H,W")
    dims = list(value.shape)
    static = dims[0] if isinstance(dims[0], int) else None
    if static is not None and options.batch is not None and options.batch != static:
        raise InputError(f"input {value.name!r} has a static batch of {static}: use --batch {static}, "
                         "or a model exported with a dynamic batch")
    batch = static or options.batch or DEFAULT_BATCH
    fixed = InputShape(value.name, (batch, *(d if isinstance(d, int) else None for d in dims[1:])))
    shapes = [s for s in options.input_shapes if s.name != value.name] + [fixed]
    return shapes, batch, load_model(model_path, shapes)


def run_bench(model_path: os.PathLike | str, options: BenchOptions | None = None, progress: Progress = _silent) -> dict:
    """Compile, time, profile and measure the exact baseline and each filtered variant; the report as a dict."""
    import onnx_ir as ir

    from gfcompiler.driver import CompileOptions, compile_model

    options = options or BenchOptions()
    options.check()
    model_path = Path(model_path)
    ort = _onnxruntime()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    shapes, batch, plain = resolve_input_shapes(model_path, options)
    with tempfile.TemporaryDirectory(prefix="gfc-bench-") as tmp:
        workdir = Path(tmp)
        variants = []
        plan = [(patch, single) for single in ((False, True) if options.single_graph else (False,))
                for patch in (0, *options.patches)]
        for i, (patch, single) in enumerate(plan):
            variant = Variant(patch, workdir, {}, single)
            variant.directory = workdir / variant.key
            progress(f"compiling {variant.label} ({i + 1}/{len(plan)})")
            compile_options = CompileOptions(layers=options.layers, patch=patch, input_shapes=shapes, single_graph=single)
            variant.manifest = compile_model(model_path, variant.directory, compile_options)
            variants.append(variant)
        forward_path = workdir / "forward.onnx"
        ir.save(plain, str(forward_path))
        del plain

        progress(f"timing {options.repeats} interleaved rounds (+{options.warmup} warm-up) of "
                 f"{len(variants)} training variants and the forward-only session, batch {batch}")
        runners: dict[str, Callable[[], None]] = {
            v.key: TrainingStep(v.directory, v.manifest, batch, options.threads) for v in variants
        }
        x, _ = make_batch(variants[0].manifest, batch)
        runners["forward"] = ForwardOnly(forward_path, x, options.threads)
        with OtherCpu() as contention:
            timings = time_interleaved(runners, options.repeats, options.warmup, options.pause, progress,
                                       idle_wait=options.wait_idle)
        for runner in runners.values():
            if isinstance(runner, TrainingStep):
                runner.close()
        del runners
        gc.collect()

        profiles: dict[str, dict] = {}
        if options.profile_steps:
            progress(f"profiling {options.profile_steps} steps of each variant")
            profiles = profile_variants(variants, batch, options, workdir, progress)
        memory: dict[str, dict] = {}
        if options.memory_runs:
            progress(f"peak memory: {options.memory_runs} fresh process(es) per variant")
            memory = measure_memory_variants(variants, batch, options.threads, options.memory_runs, progress)
        load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
        report = _report(model_path, options, batch, variants, timings, profiles, memory, ort.__version__,
                         load_start, load_end)
        kept = [c for c in timings.round_other_cores if np.isfinite(c)]
        # CPU other processes used during the kept rounds (the whole phase includes waiting for them).
        report["environment"]["other_cpu_cores_while_timing"] = float(np.mean(kept)) if kept else contention.cores
        report["environment"]["other_cpu_cores_timing_phase"] = contention.cores
        return report


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def _conv_held(manifest: dict) -> dict:
    """Bytes the trained convs' backward keeps from forward to backward (sum of the layer records)."""
    trained = [layer for layer in manifest["layers"] if layer["trained"]]
    return {"convs_held_bytes": sum(layer.get("held_bytes") or 0 for layer in trained),
            "convs_held_bytes_exact": sum(layer.get("held_bytes_exact") or 0 for layer in trained)}


def _report(model_path: Path, options: BenchOptions, batch: int, variants: list[Variant], timings: Timings,
            profiles: dict, memory: dict, ort_version: str, load_start, load_end) -> dict:
    samples = timings.samples
    forward = stats(samples["forward"]) | {"samples_ms": [round(t * 1e3, 3) for t in samples["forward"]]}
    rows = []
    for v in variants:
        # Ratios are against the exact baseline compiled the same way (both two-stage, or both single-graph).
        exact = next(e for e in variants if e.patch == 0 and e.single_graph == v.single_graph)
        exact_steps = samples[exact.key]
        exact_profile = profiles.get(exact.key) or {}
        exact_memory = memory.get(exact.key) or {}
        totals = v.manifest["totals"]
        step = stats(samples[v.key]) | {"samples_ms": [round(t * 1e3, 3) for t in samples[v.key]]}
        profile = profiles.get(v.key) or {}
        mem = memory.get(v.key) or {}
        parts = timings.splits[v.key]
        optimizer = stats(parts["optimizer"])
        prefix = stats(parts["prefix"]) if parts.get("prefix") else None
        paired = [a / b for a, b in zip(samples[v.key], exact_steps)]
        bwd = (profile.get("trained_bwd") or {}).get("median_ms")
        single = next((o for o in variants if o.single_graph and o.patch == v.patch), None) if not v.single_graph else None
        rows.append({
            "label": v.label,
            "key": v.key,
            "form": v.form,
            "single_graph_reason": v.manifest.get("single_graph_reason"),
            "boundary": [b["name"] for b in v.manifest.get("boundary") or []],
            "patch": v.patch,
            "trained_layers": totals["trained_layers"],
            "filtered_layers": totals["filtered_layers"],
            "step": step,
            "step_over_forward": step["median_ms"] / forward["median_ms"],
            "profile": profile,
            "optimizer": optimizer,
            "prefix": prefix,  # the frozen prefix's InferenceSession, two-stage only
            # What neither the profiled kernels, the prefix nor the optimizer account for (medians of different runs).
            "rest_ms": (step["median_ms"] - profile["kernels"]["median_ms"] - optimizer["median_ms"]
                        - (prefix["median_ms"] if prefix else 0.0)) if profile else None,
            "memory": mem or None,
            "static": {key: totals[key] for key in ("held_bytes", "held_bytes_exact", "backward_macs", "backward_macs_exact")}
            | _conv_held(v.manifest),
            "ratios": {  # filtered / exact
                "step": float(np.median(paired)),
                "step_of_medians": step["median_ms"] / stats(exact_steps)["median_ms"],
                "trained_bwd": _ratio(bwd, (exact_profile.get("trained_bwd") or {}).get("median_ms")),
                "step_peak": _ratio(mem.get("step_peak_kib"), exact_memory.get("step_peak_kib")),
                "held_bytes": _ratio(totals["held_bytes"], exact.manifest["totals"]["held_bytes"]),
                "convs_held_bytes": _ratio(_conv_held(v.manifest)["convs_held_bytes"],
                                           _conv_held(exact.manifest)["convs_held_bytes"]),
                "backward_macs": _ratio(totals["backward_macs"], exact.manifest["totals"]["backward_macs"]),
                # two-stage / single-graph of the same patch: median of per-round ratios, and of peaks
                "step_vs_single_graph": float(np.median([a / b for a, b in zip(samples[v.key], samples[single.key])]))
                if single else None,
                "step_peak_vs_single_graph": _ratio(mem.get("step_peak_kib"), (memory.get(single.key) or {}).get("step_peak_kib"))
                if single else None,
            },
        })
    return {
        "model": str(model_path),
        "batch": batch,
        "layers": variants[0].manifest["selection"]["rule"],
        "trained_convs": variants[0].manifest["selection"]["trained_convs"],
        "threads": options.threads,
        "repeats": options.repeats,
        "warmup": options.warmup,
        "profile_steps": options.profile_steps,
        "environment": {
            "onnxruntime": ort_version,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_start": list(load_start) if load_start else None,
            "load_average_end": list(load_end) if load_end else None,
            "idle_wait_s": options.wait_idle,
            "rounds_measured_again": timings.rounds_dropped,
            "rounds_kept_busy": timings.rounds_busy,
            "round_other_cpu_cores": [round(c, 3) for c in timings.round_other_cores],
        },
        "forward": forward,
        "variants": rows,
    }


# ---------------------------------------------------------------------------- output


def _num(ms: float) -> str:
    return f"{ms:.2f}" if abs(ms) < 10 else f"{ms:.1f}"


def _ms(s: dict | None, iqr: bool = True) -> str:
    if not s:
        return "-"
    return f"{_num(s['median_ms'])} ±{_num(s['iqr_ms'])}" if iqr else _num(s["median_ms"])


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _columns(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    def line(row):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _variant_name(row: dict) -> str:
    name = row["label"]
    if row["patch"] and row["filtered_layers"] != row["trained_layers"]:
        name += f" ({row['filtered_layers']}/{row['trained_layers']} filtered)"
    return name


def render_table(report: dict) -> str:
    """The human-readable report: a time table and a memory/compute table."""
    env = report["environment"]
    load = env.get("load_average_start"), env.get("load_average_end")
    threads = report["threads"] or "default"
    lines = [
        f"{Path(report['model']).name}: batch {report['batch']}, {report['layers']} trained, "
        f"onnxruntime {env['onnxruntime']}, {threads} intra-op threads, {env['cpus']} CPUs"
        + (f", load {load[0][0]:.2f} -> {load[1][0]:.2f}" if load[0] and load[1] else "")
        + ("" if (other := env.get("other_cpu_cores_while_timing")) is None
           else f", other processes used {other:.2f} cores while timing")
        + (f" ({env['rounds_measured_again']} rounds measured again, {env['rounds_kept_busy']} kept busy)"
           if env.get("idle_wait_s") else ""),
        f"step: median ±IQR of {report['repeats']} interleaved rounds; x exact: median of per-round ratios "
        f"(filtered/exact); kernels: onnxruntime profiler, median of {report['profile_steps']} steps",
        "",
    ]
    compared = any(row["ratios"].get("step_vs_single_graph") for row in report["variants"])
    header = ("variant", "step ms", "x exact", *(("x 1-graph",) if compared else ()), "step/fwd", "trained bwd ms",
              "x exact", "prefix ms", "gf fwd ms", "fwd ms", "other bwd ms", "optim ms", "rest ms")
    rows = []
    for row in report["variants"]:
        p = row["profile"] or {}
        rows.append((
            _variant_name(row), _ms(row["step"]), _x(row["ratios"]["step"]),
            *((_x(row["ratios"].get("step_vs_single_graph")),) if compared else ()), _x(row["step_over_forward"]),
            _ms(p.get("trained_bwd")), _x(row["ratios"]["trained_bwd"]), _ms(row.get("prefix"), iqr=False),
            _ms(p.get("gf_fwd"), iqr=False) if row["patch"] else "-", _ms(p.get("fwd"), iqr=False),
            _ms(p.get("other_bwd"), iqr=False), _ms(row["optimizer"], iqr=False),
            "-" if row["rest_ms"] is None else _num(row["rest_ms"]),
        ))
    lines += _columns(header, rows)
    for row in report["variants"]:
        if row.get("form") == "single_graph" and not row["key"].endswith("-1graph") and row.get("single_graph_reason"):
            lines.append(f"{row['label']}: single graph ({row['single_graph_reason']})")
    lines.append("prefix: the frozen layers' optimized InferenceSession (two-stage artifacts); fwd/other bwd: "
                 "the training session's kernels; rest: the step minus kernels, prefix and optimizer")
    lines.append(f"forward-only (optimized InferenceSession, same batch): {_ms(report['forward'])} ms")
    lines.append("")
    header = ("variant", "step peak MiB", "x exact", *(("x 1-graph",) if compared else ()), "process peak MiB",
              "held MiB", "x exact", "convs held MiB", "x exact", "bwd MMAC", "x exact")
    rows = []
    for row in report["variants"]:
        mem, static, ratios = row["memory"] or {}, row["static"], row["ratios"]
        rows.append((
            _variant_name(row),
            f"{mem['step_peak_kib'] / 1024:.1f}" if "step_peak_kib" in mem else "-", _x(ratios["step_peak"]),
            *((_x(ratios.get("step_peak_vs_single_graph")),) if compared else ()),
            f"{mem['process_peak_kib'] / 1024:.1f}" if "process_peak_kib" in mem else "-",
            f"{static['held_bytes'] / 2**20:.2f}", _x(ratios["held_bytes"]),
            f"{static['convs_held_bytes'] / 2**20:.2f}", _x(ratios["convs_held_bytes"]),
            f"{static['backward_macs'] / 1e6:.1f}", _x(ratios["backward_macs"]),
        ))
    lines += _columns(header, rows)
    runs = next((row["memory"]["runs"] for row in report["variants"] if row["memory"]), 0)
    lines.append("step peak: resident-set peak of a first training step over the resident set before it "
                 f"(fresh process, CPU arena off; median of {runs})")
    lines.append("held: bytes the training graph keeps from forward to backward; convs held: the trained convs' share "
                 "(manifest, static); bwd MMAC: trained convs' backward")
    return "\n".join(lines)


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError(PLOT_INSTALL_HINT)


def plot(reports: list[dict], path: os.PathLike | str, titles: list[str] | None = None) -> None:
    """Bar charts of one or more reports: step time by part (with the forward-only time),
    the trained convs' backward time, and step peak memory; variants grouped per report."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    titles = titles or [f"{Path(r['model']).stem}, {r['layers']}" for r in reports]
    colors = {"prefix": "#5b7fa8", "fwd": "#9db4d0", "gf_fwd": "#e8a33d", "trained_bwd": "#c0392b", "other_bwd": "#7f8c8d",
              "optimizer": "#8e6fb5", "rest": "#d5d8dc"}
    positions, labels, group_centers = [], [], []
    x = 0.0
    for report in reports:
        start = x
        for row in report["variants"]:
            positions.append(x)
            labels.append(row["label"].replace("r=", "r").replace(" 1-graph", "\n1-graph"))
            x += 1
        group_centers.append((start + x - 1) / 2)
        x += 0.8
    two_line = any("\n" in label for label in labels)
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0 if two_line else 6.0, 0.55 * len(positions) + 2.5), 9.5), sharex=True,
                             gridspec_kw={"height_ratios": [2.2, 1.2, 1.2]})
    step_ax, bwd_ax, mem_ax = axes
    rows = [row for report in reports for row in report["variants"]]
    bottoms = np.zeros(len(rows))
    profiled = any(row["profile"] for row in rows)
    for part in ("prefix", *CATEGORIES, "optimizer", "rest") if profiled else ():
        heights = []
        for row in rows:
            p = row["profile"] or {}
            if part == "prefix":
                heights.append((row.get("prefix") or {}).get("median_ms", 0.0))
            elif part == "rest":
                heights.append(max(row["rest_ms"] or 0.0, 0.0))
            elif part == "optimizer":
                heights.append(row["optimizer"]["median_ms"])
            else:
                heights.append((p.get(part) or {}).get("median_ms", 0.0))
        heights = np.asarray(heights)
        step_ax.bar(positions, heights, 0.8, bottom=bottoms, color=colors[part], label=CATEGORY_TITLES[part])
        bottoms += heights
    steps = [row["step"] for row in rows]
    step_ax.errorbar(positions, [s["median_ms"] for s in steps],
                     yerr=[[s["median_ms"] - s["q1_ms"] for s in steps], [s["q3_ms"] - s["median_ms"] for s in steps]],
                     fmt="_", color="black", markersize=14, capsize=3, lw=0.9, label="step time (median, IQR)")
    i = 0
    for report in reports:
        n = len(report["variants"])
        fwd = report["forward"]["median_ms"]
        step_ax.hlines(fwd, positions[i] - 0.45, positions[i + n - 1] + 0.45, colors="black", linestyles="dashed",
                       label="forward-only inference" if i == 0 else None)
        i += n
    step_ax.set_ylabel("training step, ms")
    step_ax.legend(fontsize=7, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.01), frameon=False)
    bwd = [((row["profile"] or {}).get("trained_bwd") or {}).get("median_ms", np.nan) for row in rows]
    bwd_ax.bar(positions, bwd, 0.8, color=colors["trained_bwd"])
    finite = [value for value in bwd if np.isfinite(value) and value > 0]
    logarithmic = bool(finite) and max(finite) / min(finite) > 10
    if logarithmic:
        bwd_ax.set_yscale("log")
        bwd_ax.set_ylim(min(finite) / 3, max(finite) * 2)
        bwd_ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        bwd_ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    bwd_ax.set_ylabel("trained convs'\nbackward, ms" + (" (log)" if logarithmic else ""))
    for x_pos, value in zip(positions, bwd):
        if np.isfinite(value):
            bwd_ax.annotate(_num(value), (x_pos, value), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6)
    mem = [((row["memory"] or {}).get("step_peak_kib", np.nan)) / 1024 for row in rows]
    held = [row["static"]["held_bytes"] / 2**20 for row in rows]
    convs_held = [row["static"]["convs_held_bytes"] / 2**20 for row in rows]
    mem_ax.bar(positions, mem, 0.8, color="#5d6d7e", label="step peak over resident set before it (measured)")
    mem_ax.scatter(positions, held, marker="_", s=160, linewidths=2, color="#e8a33d", zorder=3,
                   label="kept from forward to backward, whole graph (static)")
    mem_ax.scatter(positions, convs_held, marker="_", s=160, linewidths=2, color="#c0392b", zorder=3,
                   label="... by the trained convs (static)")
    mem_ax.set_ylabel("memory, MiB")
    mem_ax.legend(fontsize=7, ncol=2 if len(positions) > 6 else 1, loc="lower center", bbox_to_anchor=(0.5, 1.01), frameon=False)
    mem_ax.set_xticks(positions, labels, fontsize=7)
    for center, title in zip(group_centers, titles):
        mem_ax.annotate(title, (center, 0), xycoords=("data", "axes fraction"), xytext=(0, -30 if two_line else -18),
                        textcoords="offset points", ha="center", va="top", fontsize=7)
    fig.suptitle("exact vs gradient-filtered training: step time by part (ORT profiler), backward, memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _check_output_path(path: str | None, flag: str) -> None:
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: directory {parent} does not exist")
    if Path(path).is_dir():
        raise OutputError(f"{flag} {path}: is a directory")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{flag} {path}: directory {parent} is not writable")


# ---------------------------------------------------------------------------- CLI


def add_command(subparsers) -> None:
    """Register ``gfc bench`` on the top-level CLI's sub-parsers."""
    from gfcompiler.cli import EXIT_HELP

    parser = subparsers.add_parser(
        "bench",
        help="time and measure the exact baseline and filtered variants of a model, side by side",
        description=BENCH_DESCRIPTION,
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="input .onnx model")
    parser.add_argument("--layers", default=None, help="as in gfc compile (default: last 4 convs)")
    parser.add_argument("--patch", default="4",
                        help="comma-separated patch sizes, e.g. 2,4,7 (the exact baseline always runs; default 4)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size (default: the model's static batch, else {DEFAULT_BATCH})")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per session (default: onnxruntime's)")
    parser.add_argument("--profile-steps", type=int, default=5, help="profiled steps per variant (default 5; 0: no profile)")
    parser.add_argument("--memory-runs", type=int, default=3,
                        help="fresh processes per variant measuring peak memory; the median is reported (default 3; 0: skip)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each round wait up to this long for other processes to leave the CPUs idle, "
                             "and measure again a round during which they were busy (default 0: off)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=N,C,H,W", help="as in gfc compile")
    parser.add_argument("--compare-single-graph", action="store_true",
                        help="also compile every variant with --single-graph (the whole forward in the training "
                             "session) and report two-stage / single-graph ratios")
    parser.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a chart (needs matplotlib: the bench extra)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from gfcompiler.loading import InputShape

    options = BenchOptions(
        layers=args.layers, patches=parse_patches(args.patch), batch=args.batch, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, profile_steps=args.profile_steps, wait_idle=args.wait_idle,
        memory_runs=args.memory_runs, input_shapes=[InputShape.parse(text) for text in args.input_shape],
        single_graph=args.compare_single_graph,
    )
    options.check()
    _check_output_path(args.json, "--json")
    _check_output_path(args.plot, "--plot")
    if args.plot:
        require_matplotlib()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"gfc: bench: {message}", file=sys.stderr, flush=True)

    report = run_bench(args.model, options, progress)
    print(render_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot([report], args.plot)
    return 0


def _probe_main(argv: list[str]) -> int:
    directory, batch, threads = Path(argv[0]), int(argv[1]), int(argv[2])
    try:
        print(json.dumps(probe_memory(directory, batch, threads or None)))
    except GfcError as error:
        print(f"gfc: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--probe-memory":
        sys.exit(_probe_main(sys.argv[2:]))
    sys.exit("usage: python -m gfcompiler.bench --probe-memory DIR BATCH THREADS (gfc bench is the command)")
