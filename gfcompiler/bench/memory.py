"""Peak memory of a variant's first training step, each in a fresh process.

``python -m gfcompiler.bench --probe-memory DIR BATCH THREADS`` is the subprocess: it
opens the artifacts with `gfcompiler.runtime.Trainer` (either backend; CPU arena off,
so the peak follows what the graph keeps alive rather than the arena's growth policy)
and imports onnxruntime and numpy only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from gfcompiler.bench.options import Progress, _silent
from gfcompiler.bench.timing import TrainerStep
from gfcompiler.manifest import Manifest
from gfcompiler.runtime.peak_memory import peak_kib, reset_peak_kib


def probe_memory(directory: Path, batch: int, threads: int | None) -> dict:
    """Peak memory of the first training step of ``directory`` (run in a fresh process)."""
    manifest = Manifest.read(directory)
    step = TrainerStep(directory, manifest, batch, threads, memory_arena=False)
    before = reset_peak_kib()
    step()
    peak = peak_kib()
    return {"step_peak_kib": peak - before, "process_peak_kib": peak,
            "method": "VmHWM reset before Trainer.train_step (gfcompiler.runtime.peak_memory)"}


def measure_memory(directory: Path, batch: int, threads: int | None) -> dict:
    """`probe_memory` in a subprocess, so that each variant's peak is its own."""
    command = [sys.executable, "-m", "gfcompiler.bench", "--probe-memory", str(directory), str(batch), str(threads or 0)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"memory probe exited {result.returncode}: {tail[0]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_memory_variants(variants: list, batch: int, threads: int | None, runs: int,
                            progress: Progress = _silent) -> dict[str, dict]:
    """`measure_memory` ``runs`` times per variant (variants alternating); the median of each field.

    One process's step peak varies by several MiB from run to run (allocation order under
    two threads), hence several fresh processes."""
    results: dict[str, list[dict]] = {v.key: [] for v in variants}
    for _ in range(runs):
        for v in variants:
            result = measure_memory(v.directory, batch, threads)
            if "error" in result:
                progress(f"warning: {v.label} ({v.backend}): {result['error']}")
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
