"""``gfc bench``: the exact baseline and the gradient-filtered variants of one model, side by side.

    gfc bench model.onnx --layers 4 --patch 2,4 --batch 8 [--backend onnx|ort-training|both]
        [--json FILE] [--plot FILE.png]

One layer choice is compiled with the exact backward (``--patch 0``) and once per patch
size, for each backend asked for (``--backend``; default: both where onnxruntime-training
imports, else ``onnx``), into a temporary directory, and every variant is measured the
same way:

* **step time**: `gfcompiler.runtime.Trainer.train_step` on a fixed batch, the code path
  of ``gfc train``, with its session options (one shared CPU arena; no spinning thread
  pools for the three sessions of a two-stage step). For ort-training artifacts that is
  the frozen prefix's inference session (two-stage), forward and backward through
  onnxruntime-training's ``Module``, the ``Optimizer`` step and the gradient reset; for
  ``--backend onnx`` ones the one ``step_model.onnx`` session (forward, loss, backward and
  optimizer update) of stock onnxruntime. ``--compare-single-graph`` adds every
  ort-training variant compiled with ``--single-graph`` and the ratio two-stage /
  single-graph. All variants of both backends and the forward-only session live in one
  process and are timed in *interleaved* rounds: every round runs each of them once, in
  an order rotated from round to round, after a short pause (the previous session's
  spinning thread pool must not compete). Medians and IQRs are over rounds; the ratios
  ``×exact`` (against the same backend's exact baseline) and ``×ort`` (onnx against
  ort-training's variant of the same patch) are the median of the per-round ratios, so
  slow drifts of the machine's load cancel out. ``--wait-idle`` makes each round wait
  for other processes to leave the CPUs idle and measures again a round during which
  they were busy (`OtherCpu`).
* **where the step goes**: onnxruntime's profiler, on separate sessions (profiling
  costs time), attributes kernel time to the nodes of the training graph
  (`gfcompiler.bench.profile`): ``trained bwd`` is the backward of the trained convs,
  ``gf fwd`` the filter's forward summaries (``X_mean``, ``X_sum``, the scheduling
  anchor), ``fwd`` the rest of the forward pass and ``other bwd`` the rest of the
  backward (activation gradients, the head, gradient accumulation). For ort-training's
  ``training_model.onnx`` the parts are found through the graph (``ConvGrad`` nodes, the
  filter's nodes by their ``gfc.layer`` metadata, what the loss depends on); for the onnx backend's step model
  from the ``gfc.phase`` / ``gfc.layer`` metadata of every emitted node, and ``optim``
  is its ``optimizer``-phase kernels. ort-training's ``optim`` is the optimizer
  session's step, timed inside each training step. Kernels of nodes onnxruntime
  inserted, matching no graph node, are ``unattr`` (and counted by position in fwd or
  other bwd). ``rest`` is the step time minus kernels, prefix and optimizer: framework
  overhead (medians of different runs, so it can come out slightly negative).
* **forward-only**: an optimized plain ``InferenceSession`` of the same model at the
  same batch, the limit a step that trains only the last layers can approach;
  ``step/fwd`` is each variant's step time over it.
* **peak memory**: each variant in fresh subprocesses (a Trainer with the CPU arena off,
  so the peak follows what the graph keeps alive): the resident-set high-water mark of
  the first training step above the resident set before it (``step peak``), and the
  process's peak; medians over ``--memory-runs`` processes (one process varies by a few
  MiB). Beside it the static accounting of the manifest: the bytes the training graph
  keeps from forward to backward (``held``, ``totals.held_bytes``: activation gradients'
  inputs included), the trained convs' share of them (``convs held``, the layers'
  ``held_bytes``) and the trained convs' backward MACs.

The model's data input gets a fixed batch (``--batch``; a model with a static batch
keeps its own). ``python -m gfcompiler.bench --probe-memory DIR BATCH THREADS`` is the
memory subprocess; it imports onnxruntime and numpy only.

Modules: `options` (BenchOptions, backends), `timing` (runners, interleaved timing),
`profile` (profiler attribution), `memory` (peak-memory probe), `run` (run_bench),
`report` (render_table), `plot`, `cli`.
"""

from __future__ import annotations

from gfcompiler.bench.cli import add_command, probe_main
from gfcompiler.bench.memory import measure_memory, measure_memory_variants, probe_memory
from gfcompiler.bench.options import (
    BACKEND_CHOICES,
    BENCH_DESCRIPTION,
    CATEGORIES,
    CATEGORY_TITLES,
    DEFAULT_BATCH,
    PLOT_INSTALL_HINT,
    STEP_CATEGORIES,
    BenchOptions,
    Progress,
    parse_patches,
    resolve_backends,
    training_available,
)
from gfcompiler.bench.plot import plot, require_matplotlib
from gfcompiler.bench.profile import NodeCategories, StepNodeCategories, parse_profile, profile_variants
from gfcompiler.bench.report import render_table
from gfcompiler.bench.run import Variant, plan_variants, resolve_input_shapes, run_bench
from gfcompiler.bench.timing import (
    ForwardOnly,
    OtherCpu,
    Timings,
    TrainerStep,
    TrainingStep,
    make_batch,
    session_options,
    stats,
    time_interleaved,
    wait_for_idle,
)

__all__ = [
    "BACKEND_CHOICES", "BENCH_DESCRIPTION", "CATEGORIES", "CATEGORY_TITLES", "DEFAULT_BATCH", "PLOT_INSTALL_HINT",
    "STEP_CATEGORIES", "BenchOptions", "ForwardOnly", "NodeCategories", "OtherCpu", "Progress", "StepNodeCategories",
    "Timings", "TrainerStep", "TrainingStep", "Variant", "add_command", "make_batch", "measure_memory",
    "measure_memory_variants", "parse_patches", "parse_profile", "plan_variants", "plot", "probe_main",
    "probe_memory", "profile_variants", "render_table", "require_matplotlib", "resolve_backends",
    "resolve_input_shapes", "run_bench", "session_options", "stats", "time_interleaved", "training_available",
    "wait_for_idle",
]
