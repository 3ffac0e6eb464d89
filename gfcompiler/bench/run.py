"""`run_bench`: compile every variant, time, profile and measure them; the report as a dict."""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gfcompiler.bench.memory import measure_memory_variants
from gfcompiler.bench.options import DEFAULT_BATCH, BenchOptions, Progress, _silent, resolve_backends
from gfcompiler.bench.profile import profile_variants
from gfcompiler.bench.timing import ForwardOnly, OtherCpu, Timings, TrainerStep, _onnxruntime, make_batch, stats, time_interleaved
from gfcompiler.errors import InputError, UnsupportedModelError
from gfcompiler.manifest import BACKEND_ONNX, BACKEND_ORT_TRAINING, Manifest


@dataclasses.dataclass
class Variant:
    patch: int
    directory: Path
    manifest: Manifest | None  # None until compiled
    single_graph: bool = False  # compiled with --single-graph (no frozen prefix model)
    backend: str = BACKEND_ORT_TRAINING

    @property
    def label(self) -> str:
        """"exact", "r=4", "exact 1-graph", ... (the backend is a column of its own)."""
        return ("exact" if self.patch == 0 else f"r={self.patch}") + (" 1-graph" if self.single_graph else "")

    @property
    def key(self) -> str:
        """Unique per variant: "exact", "r4", "exact-1graph" (ort-training), "exact-onnx", "r4-onnx"."""
        return (("exact" if self.patch == 0 else f"r{self.patch}") + ("-1graph" if self.single_graph else "")
                + ("-onnx" if self.backend == BACKEND_ONNX else ""))

    @property
    def form(self) -> str:
        """What the compiler made: "two_stage", "single_graph" (asked for, or no frozen prefix to cut), "step_model"."""
        return self.manifest.form.kind


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


def plan_variants(options: BenchOptions, backends: list[str]) -> list[tuple[str, int, bool]]:
    """(backend, patch, single graph) of every variant, in report order: ort-training's (two-stage,
    then single-graph with ``--compare-single-graph``), then onnx's; exact first in each group."""
    plan = []
    for backend in backends:
        forms = (False, True) if options.single_graph and backend == BACKEND_ORT_TRAINING else (False,)
        plan += [(backend, patch, single) for single in forms for patch in (0, *options.patches)]
    return plan


def run_bench(model_path: os.PathLike | str, options: BenchOptions | None = None, progress: Progress = _silent) -> dict:
    """Compile, time, profile and measure the exact baseline and each filtered variant; the report as a dict."""
    import onnx_ir as ir

    from gfcompiler.driver import CompileOptions, compile_model

    options = options or BenchOptions()
    options.check()
    backends = resolve_backends(options)
    model_path = Path(model_path)
    ort = _onnxruntime()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    shapes, batch, plain = resolve_input_shapes(model_path, options)
    with tempfile.TemporaryDirectory(prefix="gfc-bench-") as tmp:
        workdir = Path(tmp)
        variants = []
        plan = plan_variants(options, backends)
        for i, (backend, patch, single) in enumerate(plan):
            variant = Variant(patch, workdir, None, single, backend)
            variant.directory = workdir / variant.key
            progress(f"compiling {variant.label} ({backend}, {i + 1}/{len(plan)})")
            compile_options = CompileOptions(layers=options.layers, patch=patch, input_shapes=shapes, single_graph=single,
                                             backend=backend)
            variant.manifest = Manifest.from_json(compile_model(model_path, variant.directory, compile_options))
            variants.append(variant)
        forward_path = workdir / "forward.onnx"
        ir.save(plain, str(forward_path))
        del plain

        progress(f"timing {options.repeats} interleaved rounds (+{options.warmup} warm-up) of "
                 f"{len(variants)} training variants and the forward-only session, batch {batch}")
        runners: dict[str, Callable[[], None]] = {
            v.key: TrainerStep(v.directory, v.manifest, batch, options.threads) for v in variants
        }
        x, _ = make_batch(variants[0].manifest, batch)
        runners["forward"] = ForwardOnly(forward_path, x, options.threads)
        with OtherCpu() as contention:
            timings = time_interleaved(runners, options.repeats, options.warmup, options.pause, progress,
                                       idle_wait=options.wait_idle)
        for runner in runners.values():
            if isinstance(runner, TrainerStep):
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


def _paired(samples: dict[str, list[float]], key: str, base: str) -> float:
    """Median of the per-round ratios of two runners' times."""
    return float(np.median([a / b for a, b in zip(samples[key], samples[base])]))


def _conv_held(manifest: Manifest) -> dict:
    """Bytes the trained convs' backward keeps from forward to backward (sum of the layer records)."""
    trained = [layer for layer in manifest.layers if layer.trained]
    return {"convs_held_bytes": sum(layer.held_bytes or 0 for layer in trained),
            "convs_held_bytes_exact": sum(layer.held_bytes_exact or 0 for layer in trained)}


def _median_ms(entry: dict | None) -> float | None:
    return (entry or {}).get("median_ms")


def _report(model_path: Path, options: BenchOptions, batch: int, variants: list[Variant], timings: Timings,
            profiles: dict, memory: dict, ort_version: str, load_start, load_end) -> dict:
    samples = timings.samples
    forward = stats(samples["forward"]) | {"samples_ms": [round(t * 1e3, 3) for t in samples["forward"]]}
    rows = []
    for v in variants:
        # Ratios are against the exact baseline of the same backend compiled the same way
        # (both two-stage, or both single-graph).
        exact = next(e for e in variants if e.patch == 0 and e.single_graph == v.single_graph and e.backend == v.backend)
        exact_steps = samples[exact.key]
        exact_profile = profiles.get(exact.key) or {}
        exact_memory = memory.get(exact.key) or {}
        totals = v.manifest.totals
        step = stats(samples[v.key]) | {"samples_ms": [round(t * 1e3, 3) for t in samples[v.key]]}
        profile = profiles.get(v.key) or {}
        mem = memory.get(v.key) or {}
        parts = timings.splits[v.key]
        in_graph = v.backend == BACKEND_ONNX  # the step model's optimizer: profiled kernels, not a session of its own
        optimizer = profile.get("optimizer") if in_graph else (stats(parts["optimizer"]) if parts.get("optimizer") else None)
        prefix = stats(parts["prefix"]) if parts.get("prefix") else None
        paired = [a / b for a, b in zip(samples[v.key], exact_steps)]
        bwd = _median_ms(profile.get("trained_bwd"))
        single = None
        if not v.single_graph:
            single = next((o for o in variants if o.single_graph and o.patch == v.patch and o.backend == v.backend), None)
        # onnx rows against ort-training's variant of the same patch (its default, two-stage form).
        ort = None
        if v.backend == BACKEND_ONNX:
            ort = next((o for o in variants if o.backend == BACKEND_ORT_TRAINING and o.patch == v.patch
                        and not o.single_graph), None)
        ort_profile = (profiles.get(ort.key) or {}) if ort else {}
        ort_memory = (memory.get(ort.key) or {}) if ort else {}
        rest = None
        if profile:
            rest = (step["median_ms"] - profile["kernels"]["median_ms"]
                    - (0.0 if in_graph else (_median_ms(optimizer) or 0.0)) - (prefix["median_ms"] if prefix else 0.0))
        rows.append({
            "label": v.label,
            "key": v.key,
            "backend": v.backend,
            "form": v.form,
            "single_graph_reason": v.manifest.form.single_graph_reason,
            "boundary": [b.name for b in v.manifest.boundary],
            "patch": v.patch,
            "trained_layers": totals.trained_layers,
            "filtered_layers": totals.filtered_layers,
            "step": step,
            "step_over_forward": step["median_ms"] / forward["median_ms"],
            "profile": profile,
            # ort-training: the optimizer session's step, timed in each training step;
            # onnx: the step model's optimizer kernels (profiler).
            "optimizer": optimizer,
            "optimizer_source": "profiler" if in_graph else "timed",
            "prefix": prefix,  # the frozen prefix's InferenceSession, two-stage only
            # What neither the profiled kernels, the prefix nor the optimizer account for (medians of different runs).
            "rest_ms": rest,
            "unattributed_ms": profile.get("unmatched_ms") if profile else None,
            "memory": mem or None,
            "static": {key: getattr(totals, key) for key in ("held_bytes", "held_bytes_exact", "backward_macs", "backward_macs_exact")}
            | _conv_held(v.manifest),
            "ratios": {  # filtered / exact
                "step": float(np.median(paired)),
                "step_of_medians": step["median_ms"] / stats(exact_steps)["median_ms"],
                "trained_bwd": _ratio(bwd, _median_ms(exact_profile.get("trained_bwd"))),
                "step_peak": _ratio(mem.get("step_peak_kib"), exact_memory.get("step_peak_kib")),
                "held_bytes": _ratio(totals.held_bytes, exact.manifest.totals.held_bytes),
                "convs_held_bytes": _ratio(_conv_held(v.manifest)["convs_held_bytes"],
                                           _conv_held(exact.manifest)["convs_held_bytes"]),
                "backward_macs": _ratio(totals.backward_macs, exact.manifest.totals.backward_macs),
                # two-stage / single-graph of the same patch: median of per-round ratios, and of peaks
                "step_vs_single_graph": _paired(samples, v.key, single.key) if single else None,
                "step_peak_vs_single_graph": _ratio(mem.get("step_peak_kib"), (memory.get(single.key) or {}).get("step_peak_kib"))
                if single else None,
                # onnx / ort-training of the same patch: median of per-round ratios, and of medians / peaks
                "step_vs_ort_training": _paired(samples, v.key, ort.key) if ort else None,
                "trained_bwd_vs_ort_training": _ratio(bwd, _median_ms(ort_profile.get("trained_bwd"))) if ort else None,
                "step_peak_vs_ort_training": _ratio(mem.get("step_peak_kib"), ort_memory.get("step_peak_kib"))
                if ort else None,
            },
        })
    return {
        "model": str(model_path),
        "batch": batch,
        "layers": variants[0].manifest.selection.rule,
        "trained_convs": list(variants[0].manifest.selection.trained_convs),
        "backends": sorted({v.backend for v in variants}, key=[BACKEND_ORT_TRAINING, BACKEND_ONNX].index),
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
