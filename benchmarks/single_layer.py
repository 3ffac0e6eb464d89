"""Single-layer backward latency: exact conv backward vs the gradient-filtered backward.

For the 3x3, stride-1, pad-1 convs of the paper's measurements (128 ch at 120x160,
256 ch at 60x80, 512 ch at 30x40) this times, in one process with interleaved runs:

* ``ort-exact``: one ``com.microsoft::ConvGrad`` node (inputs dY, X, W; outputs dX, dW,
  dB) in an onnxruntime ``InferenceSession``; that node is what onnxruntime-training
  puts in ``training_model.onnx`` for every Conv. The script checks the training build
  registers it and that its outputs match PyTorch's conv gradients before timing.
* ``torch-exact``: PyTorch's exact conv backward (``aten.convolution_backward``, the
  oneDNN kernel autograd calls), when torch is importable.
* ``filtered r=2`` / ``r=4``: the backward side of the gradient filter only, as
  `gfcompiler.passes.filter_ops.build_filtered_backward` emits it (inputs dY, X_sum,
  W_sum; outputs dX, dW, dB).

Every variant gets 2 intra-op threads (the machine this was written for has 2 cores);
onnxruntime sessions otherwise keep their defaults (all graph optimizations, spinning
thread pools). They run through an IOBinding with inputs and outputs bound to
preallocated CPU buffers, so what is timed is the graph's own work, not copying results
into new NumPy arrays. One exception is inherent to timing the filtered backward as a
standalone graph: its dW comes out of a ``Reshape``, which is free inside a training
graph but copies when it produces a graph output (≈0.3 ms at 512 ch). torch's
``convolution_backward`` allocates its three outputs on every call.

Turns are interleaved: each round runs every variant once, in an order rotated from
round to round; a turn is a 50 ms pause (spinning pools of the previous variant go
idle), one untimed call, then ``--burst`` timed calls. On a shared machine
``--wait-idle`` also delays each turn until other processes leave the CPUs idle and
reports how many turns it gave up waiting for.

    python benchmarks/single_layer.py [--batch 1 8] [--repeats N] [--json FILE] [--plot FILE.png]
                                      [--burst B] [--channels C ...] [--markdown] [--wait-idle [S]]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from gfcompiler.emit import Emitter
from gfcompiler.geometry import ConvShape, FilterGeometry
from gfcompiler.passes import filter_ops

THREADS = 2
PATCHES = (2, 4)
# (channels, height, width) of the paper's single-layer measurements.
LAYERS = ((128, 120, 160), (256, 60, 80), (512, 30, 40))
# Ratio exact/filtered the compiled backward should reach, per patch size.
GOALS = {2: 15.0, 4: 30.0}
# The paper's own PyTorch filtered backward, measured on this machine when the project was specified; batch 1, ms.
PAPER_IMPL_MS = {(128, 2): 9.9, (128, 4): 7.3, (256, 2): 5.5, (256, 4): 3.3, (512, 2): 5.7, (512, 4): 3.6}


def layer_conv(channels: int, height: int, width: int, batch: int) -> ConvShape:
    return ConvShape(batch, channels, channels, height, width, (3, 3), (1, 1), (1, 1, 1, 1))


# ---------------------------------------------------------------------------- models


def _f32(name: str, shape) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(shape)))


def _model(graph: ir.Graph) -> bytes:
    return ir.to_proto(ir.Model(graph, ir_version=8)).SerializeToString()


def exact_model(conv: ConvShape) -> bytes:
    """One ``com.microsoft::ConvGrad`` node with the conv's attributes: (dY, X, W) -> (dX, dW, dB)."""
    n = conv.batch
    dy = _f32("dY", [n, conv.out_channels, conv.out_height, conv.out_width])
    x = _f32("X", [n, conv.in_channels, conv.height, conv.width])
    w = _f32("W", conv.weight_shape)
    outputs = [ir.Value(name=name) for name in ("dX", "dW", "dB")]
    node = ir.Node(
        "com.microsoft", "ConvGrad", [dy, x, w],
        attributes=[
            ir.AttrInt64s("kernel_shape", list(conv.kernel)),
            ir.AttrInt64s("strides", list(conv.strides)),
            ir.AttrInt64s("pads", list(conv.pads)),
            ir.AttrInt64s("dilations", list(conv.dilations)),
            ir.AttrInt64("group", conv.group),
        ],
        outputs=outputs, name="ConvGrad",
    )
    graph = ir.Graph([dy, x, w], outputs, nodes=[node], opset_imports={"": 17, "com.microsoft": 1}, name="exact")
    return _model(graph)


def filtered_model(geom: FilterGeometry) -> bytes:
    """The builder's backward side alone: (dY, X_sum, W_sum) -> (dX, dW, dB)."""
    conv = geom.conv
    n = conv.batch
    ph, pw = geom.patches
    dy = _f32("dY", [n, conv.out_channels, conv.out_height, conv.out_width])
    x_sum = _f32("X_sum", [n, conv.in_channels, ph, pw])
    w_sum = _f32("W_sum", [conv.out_channels, conv.in_per_group, 1, 1])
    e = Emitter(ir.tape.Tape(), "layer")
    grads = filter_ops.build_filtered_backward(e, dy, x_sum, w_sum, geom)
    outputs = [grads.input_grad, grads.weight_grad, grads.bias_grad]
    graph = ir.Graph(
        [dy, x_sum, w_sum], outputs, nodes=e.tape.nodes, initializers=e.tape.initializers,
        opset_imports={"": 17}, name="filtered",
    )
    return _model(graph)


# ---------------------------------------------------------------------------- runners


def session_options(profile_prefix: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


class OrtRunner:
    """An InferenceSession run through an IOBinding with every input and output preallocated."""

    def __init__(self, model: bytes, feeds: dict[str, np.ndarray], profile_prefix: str | None = None) -> None:
        self.session = ort.InferenceSession(model, session_options(profile_prefix), providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self._keep = []
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            self._keep.append(value)
            self.binding.bind_ortvalue_input(name, value)
        # One run with ORT-allocated outputs tells their shapes; then bind buffers of those shapes.
        outputs = self.session.run(None, feeds)
        self.outputs = {}
        for meta, array in zip(self.session.get_outputs(), outputs):
            value = ort.OrtValue.ortvalue_from_numpy(np.empty_like(array))
            self.outputs[meta.name] = value
            self.binding.bind_ortvalue_output(meta.name, value)

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def result(self, name: str) -> np.ndarray:
        return self.outputs[name].numpy()

    def end_profiling(self) -> str:
        return self.session.end_profiling()


def torch_exact_runner(conv: ConvShape, dy: np.ndarray, x: np.ndarray, w: np.ndarray) -> Callable[[], None] | None:
    """PyTorch's exact conv backward (dX, dW, dB), or None when torch is not importable."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(THREADS)
    tdy, tx, tw = (torch.from_numpy(a) for a in (dy, x, w))
    bwd = torch.ops.aten.convolution_backward

    def run() -> None:
        with torch.no_grad():
            bwd(
                tdy, tx, tw, [conv.out_channels], list(conv.strides), [conv.pads[0], conv.pads[1]],
                list(conv.dilations), False, [0, 0], conv.group, [True, True, True],
            )

    return run


def check_exact_against_torch(conv: ConvShape) -> str:
    """ConvGrad must be registered (training build) and agree with torch autograd on a small case."""
    small = dataclasses.replace(conv, batch=2, in_channels=8, out_channels=8, height=9, width=11)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 9, 11), dtype=np.float32)
    w = rng.standard_normal(small.weight_shape, dtype=np.float32)
    dy = rng.standard_normal((2, 8, small.out_height, small.out_width), dtype=np.float32)
    try:
        session = ort.InferenceSession(exact_model(small), session_options(), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - reported, not handled
        raise SystemExit(f"com.microsoft::ConvGrad is not available (is onnxruntime-training installed?): {error}") from None
    dx, dw, db = session.run(None, {"dY": dy, "X": x, "W": w})
    try:
        import torch
    except ImportError:
        return "ConvGrad registered (torch absent: outputs not checked)"
    tx = torch.from_numpy(x).double().requires_grad_()
    tw = torch.from_numpy(w).double().requires_grad_()
    tb = torch.zeros(small.out_channels, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(tx, tw, tb, small.strides, small.pads[:2], small.dilations, small.group)
    y.backward(torch.from_numpy(dy).double())
    for name, got, want in (("dX", dx, tx.grad), ("dW", dw, tw.grad), ("dB", db, tb.grad)):
        want = want.numpy()
        if not np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()):
            raise SystemExit(f"ConvGrad's {name} disagrees with torch autograd")
    return "ConvGrad registered and matches torch autograd"


# ---------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Stats:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        q1, med, q3 = np.percentile(np.asarray(seconds) * 1e3, [25, 50, 75])
        return cls(float(med), float(q1), float(q3), float(np.min(seconds) * 1e3))


def _cpu_idle_fraction(window: float) -> float | None:
    """Fraction of all CPUs idle over ``window`` seconds (Linux /proc/stat), None elsewhere."""
    def sample() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    try:
        before = sample()
        time.sleep(window)
        after = sample()
    except OSError:
        return None
    delta = [b - a for a, b in zip(before, after)]
    return (delta[3] + delta[4]) / max(sum(delta), 1)  # idle + iowait


class IdleGate:
    """Waits, before a timed turn, until no other process is using the CPUs (a shared machine).

    Returns at once when disabled; otherwise polls until the CPUs are at least
    ``threshold`` idle over a short window, or gives up after ``timeout`` seconds and
    counts the turn as contended.
    """

    def __init__(self, enabled: bool, threshold: float = 0.9, timeout: float = 20.0) -> None:
        self.enabled, self.threshold, self.timeout = enabled, threshold, timeout
        self.turns = self.contended = 0

    def wait(self) -> None:
        if not self.enabled:
            return
        self.turns += 1
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            idle = _cpu_idle_fraction(0.2)
            if idle is None or idle >= self.threshold:
                return
        self.contended += 1


def time_interleaved(
    runners: dict[str, Callable[[], None]], rounds: int, burst: int = 3, pause: float = 0.05,
    gate: IdleGate | None = None,
) -> dict[str, Stats]:
    """Time every runner in each round, rotating their order from round to round.

    Each runner's turn is: a pause (so the thread pools of the previous runner, which
    spin after a run, go idle and do not compete) and the idle gate's wait, one
    untimed call (it wakes the runner's own pool and brings its buffers into cache, as
    back-to-back training steps would), then ``burst`` timed calls.
    """
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            time.sleep(pause)
            if gate is not None:
                gate.wait()
            runners[name]()
            for _ in range(burst):
                start = time.perf_counter()
                runners[name]()
                samples[name].append(time.perf_counter() - start)
    return {name: Stats.of(values) for name, values in samples.items()}


def bench_layer(
    channels: int, height: int, width: int, batch: int, repeats: int, burst: int, gate: IdleGate, profile: str | None
) -> dict:
    conv = layer_conv(channels, height, width, batch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, height, width), dtype=np.float32)
    w = rng.standard_normal(conv.weight_shape, dtype=np.float32) * 0.05
    dy = rng.standard_normal((batch, channels, conv.out_height, conv.out_width), dtype=np.float32)
    runners: dict[str, Callable[[], None]] = {"ort-exact": OrtRunner(exact_model(conv), {"dY": dy, "X": x, "W": w})}
    torch_run = torch_exact_runner(conv, dy, x, w)
    if torch_run is not None:
        runners["torch-exact"] = torch_run
    for r in PATCHES:
        geom = FilterGeometry(conv, r)
        ph, pw = geom.patches
        feeds = {
            "dY": dy,
            "X_sum": rng.standard_normal((batch, channels, ph, pw), dtype=np.float32),
            "W_sum": w.sum(axis=(2, 3), keepdims=True),
        }
        prefix = f"{profile}/filtered_{channels}ch_b{batch}_r{r}" if profile else None
        runners[f"filtered-r{r}"] = OrtRunner(filtered_model(geom), feeds, prefix)
    stats = time_interleaved(runners, repeats, burst, gate=gate)
    if profile:
        for r in PATCHES:
            print(f"  profile: {runners[f'filtered-r{r}'].end_profiling()}", file=sys.stderr)
    return {"channels": channels, "height": height, "width": width, "batch": batch,
            "stats": {name: dataclasses.asdict(s) | {"iqr_ms": s.iqr_ms} for name, s in stats.items()}}


# ---------------------------------------------------------------------------- report


def _fmt(stats: dict | None) -> str:
    return "-" if stats is None else f"{stats['median_ms']:.2f} ±{stats['iqr_ms']:.2f}"


COLUMNS = (
    "layer", "N", "r", "ORT exact ms", "torch exact ms", "filtered ms",
    "ORT/filt", "goal", "torch/filt", "ORT/filt of minima", "paper impl ms",
)


def table_rows(results: list[dict]) -> list[list[str]]:
    """One row per layer, batch and r: medians ±IQR, ratios of medians, goal and paper checks."""
    rows = []
    for res in results:
        s = res["stats"]
        layer = f"{res['channels']}ch {res['height']}x{res['width']}"
        exact, torch_exact = s["ort-exact"], s.get("torch-exact")
        for r in PATCHES:
            filt = s[f"filtered-r{r}"]
            cells = [layer, str(res["batch"]), str(r), _fmt(exact), _fmt(torch_exact), _fmt(filt)]
            ratio = exact["median_ms"] / filt["median_ms"]
            t_ratio = "-" if torch_exact is None else f"{torch_exact['median_ms'] / filt['median_ms']:.1f}x"
            paper = PAPER_IMPL_MS.get((res["channels"], r)) if res["batch"] == 1 else None
            paper_s = "-" if paper is None else f"{paper:.1f} " + ("ok" if filt["median_ms"] <= paper else "SLOWER")
            rows.append(cells + [
                f"{ratio:.1f}x", f"{GOALS[r]:.0f}x " + ("ok" if ratio >= GOALS[r] else "MISS"), t_ratio,
                f"{exact['min_ms'] / filt['min_ms']:.1f}x", paper_s,
            ])
    return rows


def table(results: list[dict], markdown: bool = False) -> str:
    rows = table_rows(results)
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    fmt = lambda cells: "  ".join(cell.rjust(w) for cell, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(COLUMNS), "-" * len(fmt(COLUMNS))] + [fmt(row) for row in rows])


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, variants = [], ["ort-exact", "torch-exact", *(f"filtered-r{r}" for r in PATCHES)]
    series: dict[str, list[float]] = {v: [] for v in variants}
    for res in results:
        labels.append(f"{res['channels']}ch\nN={res['batch']}")
        for v in variants:
            series[v].append(res["stats"].get(v, {}).get("median_ms", np.nan))
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ax.bar(np.arange(len(labels)) + i * width, series[v], width, label=v)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
    ax.set_yscale("log")
    ax.set_ylabel("backward latency, ms (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=11, help="interleaved rounds per layer and batch")
    parser.add_argument("--burst", type=int, default=3, help="timed runs per variant and round")
    parser.add_argument("--channels", type=int, nargs="+", default=[c for c, _, _ in LAYERS], help="subset of layers")
    parser.add_argument("--json", help="write the raw statistics here")
    parser.add_argument("--plot", help="write a bar chart (PNG) here; needs matplotlib")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--wait-idle", type=float, nargs="?", const=10.0, default=None, metavar="SECONDS",
        help="on a shared machine: before each timed turn, wait (up to SECONDS, default 10) until other processes leave the CPUs idle",
    )
    parser.add_argument("--profile", help="directory for onnxruntime profiles of the filtered sessions")
    args = parser.parse_args(argv)

    print(f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, {THREADS} intra-op threads")
    print(check_exact_against_torch(layer_conv(*LAYERS[0], 1)))
    gate = IdleGate(args.wait_idle is not None, timeout=args.wait_idle or 0.0)
    results = []
    for batch in args.batch:
        for channels, height, width in LAYERS:
            if channels not in args.channels:
                continue
            print(f"timing {channels}ch {height}x{width}, batch {batch} ...", file=sys.stderr, flush=True)
            results.append(bench_layer(channels, height, width, batch, args.repeats, args.burst, gate, args.profile))
    print(f"\nmedian ±IQR of {args.repeats} interleaved rounds x {args.burst} runs; ratios are of medians")
    print(table(results, args.markdown))
    if gate.enabled:
        print(f"idle gate: {gate.contended} of {gate.turns} turns started while other processes used the CPUs")
    if args.json:
        meta = {"onnxruntime": ort.__version__, "threads": THREADS, "rounds": args.repeats, "burst": args.burst,
                "python": sys.version, "load_average": os.getloadavg(),
                "idle_gate": {"enabled": gate.enabled, "turns": gate.turns, "contended_turns": gate.contended}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
