"""Timed runners (a variant's training step, the forward-only session) and interleaved timing.

Every variant's step runs through `gfcompiler.runtime.Trainer.train_step` on a fixed
batch, for both backends: the code path ``gfc train`` and users take. `TrainingStep` is
the ort-training step assembled from onnxruntime-training's objects without an eval
model or optimizer session, for profiling only (each of those sessions would write a
profile file of the same name).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gfcompiler.bench.options import Progress, _silent
from gfcompiler.manifest import BACKEND_ORT_TRAINING, FILES, Manifest
from gfcompiler.runtime.artifacts import random_batch

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


def make_batch(manifest: Manifest, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random input batch and labels that fit the manifest's input and label (dynamic dims: ``batch``)."""
    return random_batch(manifest, batch, seed, dynamic_size=batch)


class _Timed:
    """Calls ``function`` and records its seconds as ``split[part]``."""

    def __init__(self, function: Callable, split: dict, part: str) -> None:
        self.function, self.split, self.part = function, split, part

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.split[self.part] = time.perf_counter() - start


class TrainerStep:
    """One variant's training step: `gfcompiler.runtime.Trainer.train_step` on a fixed batch.

    The Trainer opens the artifacts of either backend with ``gfc train``'s session options
    (one shared CPU arena unless ``memory_arena=False``; no spinning thread pools for the
    three sessions of a two-stage step). ``last_split`` holds, in seconds, the share of
    the last call the frozen prefix took (two-stage artifacts) and, for ort-training, the
    optimizer session's step (the engine's ``apply``: ``Optimizer.step`` and the lazy
    gradient reset); a ``--backend onnx`` step model updates the parameters inside its
    one session, where only the profiler sees the optimizer. ``profile_prefix`` turns on
    onnxruntime's profiler for the training sessions (`end_profiling`).
    """

    def __init__(self, directory: Path, manifest: Manifest, batch: int, threads: int | None, *,
                 memory_arena: bool = True, profile_prefix: str | None = None) -> None:
        from gfcompiler.runtime.trainer import Trainer

        self.backend = manifest.backend
        self.trainer = Trainer(directory, threads=threads, verify=False, memory_arena=memory_arena,
                               profile_prefix=profile_prefix)
        self.x, self.y = make_batch(manifest, batch)
        self.last_split: dict[str, float] = {}
        if self.trainer.prefix is not None:
            self.trainer.prefix = _Timed(self.trainer.prefix, self.last_split, "prefix")
        if self.backend == BACKEND_ORT_TRAINING:
            engine = self.trainer.engine
            engine.apply = _Timed(engine.apply, self.last_split, "optimizer")

    def __call__(self) -> None:
        self.trainer.train_step(self.x, self.y)

    def end_profiling(self) -> Path | None:
        """Stop profiling; the step model's profile file (``--backend onnx``; None for ort-training).

        The eval session's (unused) profile is ended first: if both sessions started in
        the same millisecond their files share a name, and the step model's must win.
        """
        engine = self.trainer.engine
        if not hasattr(engine, "step_session"):
            return None
        engine.eval_session.end_profiling()
        return Path(engine.step_session.end_profiling())

    def close(self) -> None:
        self.trainer = None
        gc.collect()


class TrainingStep:
    """An ort-training step from onnxruntime-training's own objects, for the profiler.

    ``step()`` runs the frozen prefix (two-stage artifacts: an optimized InferenceSession,
    `gfcompiler.runtime.prefix.FrozenPrefix`), forward and backward through a ``Module``
    with no eval model, the optimizer step (unless ``optimizer=False``) and the gradient
    reset. Profiling needs it: the Trainer's Module also opens the eval model, and every
    session of a Module (and its Optimizer) would write a profile file of the same name.
    ``last_split`` holds the prefix's and the optimizer's share of the last call, in seconds.
    """

    def __init__(self, directory: Path, manifest: Manifest, batch: int, threads: int | None, *,
                 optimizer: bool = True, arena: bool = True, profile_prefix: str | None = None) -> None:
        from gfcompiler import ort_training
        from gfcompiler.runtime.device import Device
        from gfcompiler.runtime.prefix import FrozenPrefix
        from gfcompiler.runtime.trainer import session_spinning

        ort = _onnxruntime()
        api = ort_training.api()
        spinning = session_spinning(manifest.form.kind == "two_stage")  # as the Trainer's sessions
        options = session_options(threads, arena=arena, profile_prefix=profile_prefix, spinning=spinning)
        self.state = api.CheckpointState.load_checkpoint(str(directory / FILES["checkpoint"]))
        # No eval model: one session (and one profile file) per module.
        self.module = api.Module(str(directory / FILES["training_model"]), self.state, None, device="cpu",
                                 session_options=options)
        self.optimizer = api.Optimizer(str(directory / FILES["optimizer_model"]), self.module) if optimizer else None
        self.module.train()
        self.x, y = make_batch(manifest, batch)
        self.input_name = manifest.inputs[0].name
        self.prefix = None
        if manifest.form.kind == "two_stage":
            self.prefix = FrozenPrefix.from_manifest(directory, manifest, Device("cpu"),
                                                     session_options(threads, arena=arena, spinning=spinning))
        self.names = list(self.module.input_names())
        self.label = ort.OrtValue.ortvalue_from_numpy(y)
        self.x_value = ort.OrtValue.ortvalue_from_numpy(self.x)
        self.label_name = manifest.label.name
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

    def __enter__(self) -> OtherCpu:
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
