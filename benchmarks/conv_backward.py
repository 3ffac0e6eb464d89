"""Exact conv backward in standard ONNX ops vs onnxruntime-training's ConvGrad and torch.

Times, in one process with interleaved runs (``--threads``, default 2, intra-op threads each):

* ``emitted``: `gfcompiler.onnx_step.conv_backward.build_exact_conv_backward` (dX, dW,
  dB in default-domain ops) in an onnxruntime ``InferenceSession``;
* ``convgrad``: one ``com.microsoft::ConvGrad`` node (dY, X, W -> dX, dW, dB), what
  onnxruntime-training emits for a Conv (needs the training build);
* ``torch``: ``aten.convolution_backward`` (dX, dW, dB).

With ``--alternatives`` it also times, per gradient, the formulations that were
measured against the emitted ones (dX-only and dW-only models), to re-check the
module's choices on another machine; ``--threads 1 --cpu-time`` compares them by
process CPU time, which other jobs on a shared machine disturb much less. Every model
is checked against torch autograd on the case's own inputs before timing.

Turns are interleaved as in ``single_layer.py``: each round runs every variant once in
a rotated order; a turn is a pause (default 1 s: spinning pools and caches of the
previous variant settle), one untimed call, then ``--burst`` timed calls. onnxruntime
sessions run through an IOBinding with preallocated inputs and outputs.

    python benchmarks/conv_backward.py [--repeats N] [--burst B] [--pause S] [--threads T] [--cpu-time]
                                       [--alternatives | --only-alternatives [--formulations PREFIX ...]]
                                       [--cases NAME ...] [--markdown]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from gfcompiler.emit import Emitter
from gfcompiler.onnx_step import conv_backward as cb
from gfcompiler.onnx_step.conv_backward import ConvAttrs, build_exact_conv_backward


def _conv(ci, co, h, w, kernel, batch, strides=(1, 1), pads=(1, 1, 1, 1), group=1) -> ConvAttrs:
    return ConvAttrs(kernel=kernel, strides=strides, pads=pads, group=group, batch=batch,
                     in_channels=ci, height=h, width=w, out_channels=co)


CASES = {
    "3x3 128ch 120x160 N1": _conv(128, 128, 120, 160, (3, 3), 1),
    "3x3 256ch 60x80 N1": _conv(256, 256, 60, 80, (3, 3), 1),
    "3x3 512ch 30x40 N1": _conv(512, 512, 30, 40, (3, 3), 1),
    "3x3 512ch 7x7 N8": _conv(512, 512, 7, 7, (3, 3), 8),
    "dw 3x3 960ch 7x7 N8": _conv(960, 960, 7, 7, (3, 3), 8, group=960),
    "1x1 320->1280 7x7 N8": _conv(320, 1280, 7, 7, (1, 1), 8, pads=(0, 0, 0, 0)),
    # The small MNIST CNN of `gfc demo` at its training batch (small maps, large batch).
    "3x3 s2 8->16ch 28x28 N32": _conv(8, 16, 28, 28, (3, 3), 32, strides=(2, 2)),
    "3x3 s2 16->32ch 14x14 N32": _conv(16, 32, 14, 14, (3, 3), 32, strides=(2, 2)),
    "3x3 64ch 56x56 N8": _conv(64, 64, 56, 56, (3, 3), 8),
    "3x3 32ch 28x28 N32": _conv(32, 32, 28, 28, (3, 3), 32),
}


# ---------------------------------------------------------------------------- models


def _f32(name: str, shape) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(shape)))


def _io(conv: ConvAttrs) -> tuple[ir.Value, ir.Value, ir.Value]:
    n = conv.batch
    return (_f32("dY", [n, conv.out_channels, conv.out_height, conv.out_width]),
            _f32("X", [n, conv.in_channels, conv.height, conv.width]), _f32("W", conv.weight_shape))


def _model(inputs, outputs, nodes, initializers=(), domains=None) -> bytes:
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers,
                     opset_imports=domains or {"": 17}, name="bwd")
    return ir.to_proto(ir.Model(graph, ir_version=8)).SerializeToString()


def emitted_model(conv: ConvAttrs) -> bytes:
    dy, x, w = _io(conv)
    tape = ir.tape.Tape()
    grads = build_exact_conv_backward(Emitter(tape, "g"), dy, x, w, conv,
                                      needs_input_grad=True, needs_weight_grad=True, needs_bias_grad=True)
    return _model([dy, x, w], list(grads), tape.nodes, tape.initializers)


def convgrad_model(conv: ConvAttrs) -> bytes:
    dy, x, w = _io(conv)
    outputs = [ir.Value(name=name) for name in ("dX", "dW", "dB")]
    node = ir.Node(
        "com.microsoft", "ConvGrad", [dy, x, w],
        attributes=[ir.AttrInt64s("kernel_shape", list(conv.kernel)), ir.AttrInt64s("strides", list(conv.strides)),
                    ir.AttrInt64s("pads", list(conv.pads)), ir.AttrInt64s("dilations", list(conv.dilations)),
                    ir.AttrInt64("group", conv.group)],
        outputs=outputs, name="ConvGrad",
    )
    return _model([dy, x, w], outputs, [node], domains={"": 17, "com.microsoft": 1})


def component_model(conv: ConvAttrs, build: Callable) -> bytes:
    """A model (dY, X, W) -> one gradient, emitted by ``build(e, dy, x, w, conv)``."""
    dy, x, w = _io(conv)
    tape = ir.tape.Tape()
    out = build(Emitter(tape, "g"), dy, x, w, conv)
    return _model([dy, x, w], [out], tape.nodes, tape.initializers)


# ------------------------------------------------------------ alternative formulations
#
# The module's own formulations are reached through its private builders; the ones it
# does not use (they lost) are written out here.


def _windows(e: Emitter, v: ir.Value, conv: ConvAttrs, name: str) -> list[ir.Value]:
    """The kh·kw strided windows of ``v`` (spatial axes 2, 3; already padded), each ..×Ho×Wo."""
    ho, wo = conv.out_height, conv.out_width
    (s0, s1), (d0, d1) = conv.strides, conv.dilations
    steps, axes = e.ints(f"{name}_steps", [s0, s1]), e.ints(f"{name}_axes", [2, 3])
    windows = []
    for i in range(conv.kernel[0]):
        for j in range(conv.kernel[1]):
            end = [i * d0 + (ho - 1) * s0 + 1, j * d1 + (wo - 1) * s1 + 1]
            windows.append(e.op("Slice", [v, e.ints(f"{name}_start", [i * d0, j * d1]), e.ints(f"{name}_end", end),
                                          axes, steps], name))
    return windows


def _pad(e: Emitter, v: ir.Value, pads, name: str) -> ir.Value:
    top, left, bottom, right = pads
    return e.op("Pad", [v, e.ints(f"{name}_pads", [0, 0, top, left, 0, 0, bottom, right])], name) if any(pads) else v


def dw_conv_spec(e, dy, x, w, conv):
    """dW = Conv(Xᵀ, dYᵀ), the module's `_weight_grad_correlation`, timed on every ungrouped conv."""
    return cb._weight_grad_correlation(e, dy, x, conv)


def dw_depthwise_mul(e, dy, x, w, conv):
    """One input channel per group (Co = m·g): dW[g·m + j, 0, tap] = Σ_{n,h,w} dY · window(tap),
    a Mul and a ReduceSum per tap, channels first.

    Stride 1: the windows are contiguous runs of the flattened padded X (offset
    i·d·Wp + j·d) against dY laid out on the padded width (zeros in the Wp - Wo extra
    columns), which onnxruntime slices much faster than 2-D windows of short rows.
    """
    g, m = conv.group, conv.out_per_group
    (kh, kw), (d0, d1), (s0, s1) = conv.kernel, conv.dilations, conv.strides
    top, left, bottom, right = conv.pads
    ho, wo = conv.out_height, conv.out_width
    flat = conv.strides == (1, 1)
    wp = conv.width + left + right
    extra_rows = -(-((kw - 1) * d1) // wp) if flat else 0  # room for the last windows' overhang
    xp = x
    if any(conv.pads) or extra_rows:
        xp = e.op("Pad", [x, e.ints("X_pads", [0, 0, top, left, 0, 0, bottom + extra_rows, right])], "X_pad")
    if flat:
        if wp > wo:
            dy = e.op("Pad", [dy, e.ints("dY_wide_pads", [0, 0, 0, 0, 0, 0, 0, wp - wo])], "dY_wide")
        xp = e.op("Reshape", [xp, e.ints("X_flat_shape", [0, g, 1, -1] if m > 1 else [0, g, -1])], "X_flat")
        dy = e.op("Reshape", [dy, e.ints("dY_flat_shape", [0, g, m, -1] if m > 1 else [0, g, -1])], "dY_flat")
        spatial = [3] if m > 1 else [2]
    else:
        if m > 1:  # N × g × 1 × h × w windows against N × g × m × Ho × Wo
            xp = e.op("Unsqueeze", [xp, e.ints("X_group_axis", [2])], "X_groups")
            dy = e.op("Reshape", [dy, e.ints("dY_groups_shape", [0, g, m, ho, wo])], "dY_groups")
        spatial = [3, 4] if m > 1 else [2, 3]
    axes, sum_axes = e.ints("X_win_axes", spatial), e.ints("tap_sum_axes", [0, *spatial])
    column = e.ints("tap_axis", [-1])
    steps = None if flat else e.ints("X_win_steps", [s0, s1])
    taps = []
    for i in range(kh):
        for j in range(kw):
            if flat:
                start = [i * d0 * wp + j * d1]
                end = [start[0] + ho * wp]
            else:
                start = [i * d0, j * d1]
                end = [start[0] + (ho - 1) * s0 + 1, start[1] + (wo - 1) * s1 + 1]
            inputs = [xp, e.ints("X_win_start", start), e.ints("X_win_end", end), axes] + ([steps] if steps else [])
            window = e.op("Slice", inputs, "X_win")
            total = e.op("ReduceSum", [e.op("Mul", [window, dy], "dW_tap_prod"), sum_axes], "dW_tap", keepdims=0)
            taps.append(e.op("Unsqueeze", [total, column], "dW_tap_col"))
    dw = taps[0] if len(taps) == 1 else e.op("Concat", taps, "dW_taps", axis=-1)
    return e.op("Reshape", [dw, e.ints("dW_shape", list(conv.weight_shape))], "dW")


def dw_depthwise_stacked(e, dy, x, w, conv):
    """Depthwise: windows stacked N×C×kk×Ho×Wo, one Mul with dY and one ReduceSum."""
    assert conv.is_depthwise
    ax2 = e.ints("ax2", [2])
    parts = [e.op("Unsqueeze", [t, ax2], "win_u") for t in _windows(e, _pad(e, x, conv.pads, "X_pad"), conv, "win")]
    prod = e.op("Mul", [e.op("Concat", parts, "cols", axis=2), e.op("Unsqueeze", [dy, ax2], "dY_u")], "prod")
    dw = e.op("ReduceSum", [prod, e.ints("axes", [0, 3, 4])], "sum", keepdims=0)
    return e.op("Reshape", [dw, e.ints("dW_shape", list(conv.weight_shape))], "dW")


def dx_depthwise_taps(e, dy, x, w, conv):
    """Depthwise, stride 1: dX = Σ_tap window(padded dY) · W[:, tap] (Slice, Mul, Add)."""
    assert conv.is_depthwise and conv.strides == (1, 1)
    (kh, kw), (d0, d1) = conv.kernel, conv.dilations
    dyp = _pad(e, dy, cb._flipped_conv_pads(conv), "dY_pad")
    wt = e.op("Reshape", [w, e.ints("w_taps", [conv.in_channels, kh * kw])], "W_taps")
    wt = e.op("Transpose", [wt], "W_tapsT", perm=[1, 0])
    wt = e.op("Reshape", [wt, e.ints("w_b", [kh * kw, 1, conv.in_channels, 1, 1])], "W_b")
    axes, axis0 = e.ints("axes", [2, 3]), e.ints("axis0", [0])
    total = None
    for i in range(kh):
        for j in range(kw):
            start = [(kh - 1 - i) * d0, (kw - 1 - j) * d1]
            end = [start[0] + conv.height, start[1] + conv.width]
            window = e.op("Slice", [dyp, e.ints("s", start), e.ints("e", end), axes], "win")
            t = i * kw + j
            tap = e.op("Slice", [wt, e.ints("ts", [t]), e.ints("te", [t + 1]), axis0], "wtap")
            tap = e.op("Squeeze", [tap, axis0], "wtap_sq")
            term = e.op("Mul", [window, tap], "term")
            total = term if total is None else e.op("Add", [total, term], "acc")
    return total


def dw_gemm(shift_axes, a_side="dY"):
    return lambda e, dy, x, w, conv: cb._weight_grad_gemm(e, dy, x, conv, shift_axes, a_side)


def alternatives(conv: ConvAttrs) -> dict[str, tuple[int, Callable]]:
    """name -> (output index in (dX, dW, dB), builder(e, dy, x, w, conv)) of the formulations that apply."""
    out = {"dX:convtranspose": (0, lambda e, dy, x, w, c: cb._input_grad_conv_transpose(e, dy, w, c))}
    if conv.strides == (1, 1) and min(cb._flipped_conv_pads(conv)) >= 0:
        out["dX:conv-flipped"] = (0, lambda e, dy, x, w, c: cb._input_grad_flipped_conv(e, dy, w, c))
        if conv.is_depthwise:
            out["dX:depthwise-taps"] = (0, dx_depthwise_taps)
    if conv.group == 1:
        out["dW:conv-spec"] = (1, dw_conv_spec)
    shiftable = [a for a in (0, 1) if conv.strides[a] == 1 and conv.kernel[a] > 1]
    for side in ("dY", "X"):
        out[f"dW:gemm-A{side}"] = (1, dw_gemm((), side))
        for a in shiftable:
            out[f"dW:gemm-shift-{'rows' if a == 0 else 'cols'}-A{side}"] = (1, dw_gemm((a,), side))
        if len(shiftable) == 2:
            out[f"dW:gemm-shift-both-A{side}"] = (1, dw_gemm(tuple(shiftable), side))
    if conv.in_per_group == 1:
        out["dW:depthwise-nhwc"] = (1, lambda e, dy, x, w, c: cb._weight_grad_depthwise(e, dy, x, c))
        out["dW:depthwise-nchw"] = (1, dw_depthwise_mul)
    if conv.is_depthwise:
        out["dW:depthwise-stacked"] = (1, dw_depthwise_stacked)
    return out


# ---------------------------------------------------------------------------- runs


class OrtRunner:
    """An InferenceSession run through an IOBinding with preallocated inputs and outputs."""

    def __init__(self, model: bytes, feeds: dict[str, np.ndarray], threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        if threads == 1:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self._inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for name, a in feeds.items()}
        for name, value in self._inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        self.outputs = {}
        for meta, array in zip(self.session.get_outputs(), self.session.run(None, feeds)):
            self.outputs[meta.name] = ort.OrtValue.ortvalue_from_numpy(np.empty_like(array))
            self.binding.bind_ortvalue_output(meta.name, self.outputs[meta.name])

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def results(self) -> list[np.ndarray]:
        return [value.numpy() for value in self.outputs.values()]


def torch_grads(conv: ConvAttrs, dy, x, w) -> list[np.ndarray]:
    import torch

    out = torch.ops.aten.convolution_backward(
        torch.from_numpy(dy), torch.from_numpy(x), torch.from_numpy(w), [conv.out_channels], list(conv.strides),
        [conv.pads[0], conv.pads[1]], list(conv.dilations), False, [0, 0], conv.group, [True, True, True],
    )
    return [t.numpy() for t in out]


def torch_runner(conv: ConvAttrs, dy, x, w, threads: int) -> Callable[[], None]:
    import torch

    assert conv.pads[:2] == conv.pads[2:], "torch: symmetric pads only"
    torch.set_num_threads(threads)
    tdy, tx, tw = (torch.from_numpy(a) for a in (dy, x, w))

    def run() -> None:
        with torch.no_grad():
            torch.ops.aten.convolution_backward(
                tdy, tx, tw, [conv.out_channels], list(conv.strides), [conv.pads[0], conv.pads[1]],
                list(conv.dilations), False, [0, 0], conv.group, [True, True, True],
            )

    return run


def _check(name: str, got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, t in zip(got, want):
        scale = np.abs(t).max() + 1e-30
        if g.shape != t.shape or np.abs(g - t).max() > 1e-3 * scale:
            raise SystemExit(f"{name}: disagrees with torch ({g.shape} vs {t.shape})")


@dataclasses.dataclass
class Stats:
    median_ms: float
    iqr_ms: float
    min_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        q1, med, q3 = np.percentile(np.asarray(seconds) * 1e3, [25, 50, 75])
        return cls(float(med), float(q3 - q1), float(np.min(seconds) * 1e3))


def time_interleaved(runners: dict[str, Callable[[], None]], rounds: int, burst: int, pause: float,
                     cpu_time: bool) -> dict[str, Stats]:
    """Each round runs every runner (order rotated per round): pause, one untimed call, ``burst`` timed calls."""
    clock = time.process_time if cpu_time else time.perf_counter
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            time.sleep(pause)
            runners[name]()
            for _ in range(burst):
                start = clock()
                runners[name]()
                samples[name].append(clock() - start)
    return {name: Stats.of(values) for name, values in samples.items()}


def bench_case(label: str, conv: ConvAttrs, args) -> dict[str, Stats]:
    rng = np.random.default_rng(0)
    n = conv.batch
    x = rng.standard_normal((n, conv.in_channels, conv.height, conv.width), dtype=np.float32)
    w = rng.standard_normal(conv.weight_shape, dtype=np.float32) * 0.05
    dy = rng.standard_normal((n, conv.out_channels, conv.out_height, conv.out_width), dtype=np.float32)
    feeds = {"dY": dy, "X": x, "W": w}
    want = torch_grads(conv, dy, x, w)
    runners: dict[str, Callable[[], None]] = {}
    if not args.only_alternatives:
        for name, model in (("emitted", emitted_model(conv)), ("convgrad", convgrad_model(conv))):
            runner = OrtRunner(model, feeds, args.threads)
            runner()
            _check(f"{label} {name}", runner.results(), want)
            runners[name] = runner
        runners["torch"] = torch_runner(conv, dy, x, w, args.threads)
    if args.alternatives or args.only_alternatives:
        for name, (index, build) in alternatives(conv).items():
            if args.formulations and not any(name.startswith(f) for f in args.formulations):
                continue
            runner = OrtRunner(component_model(conv, build), feeds, args.threads)
            runner()
            _check(f"{label} {name}", runner.results(), [want[index]])
            runners[name] = runner
    return time_interleaved(runners, args.repeats, args.burst, args.pause, args.cpu_time)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per case")
    parser.add_argument("--burst", type=int, default=3, help="timed calls per variant and round")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of pause before each variant's turn")
    parser.add_argument("--alternatives", action="store_true", help="also time the per-gradient alternatives")
    parser.add_argument("--only-alternatives", action="store_true", help="time only the per-gradient alternatives")
    parser.add_argument("--formulations", nargs="+", help="time only the alternatives whose names start with these")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every variant")
    parser.add_argument("--cpu-time", action="store_true", help="time process CPU time instead of wall time")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    clock = "CPU time" if args.cpu_time else "wall time"
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {clock}: "
          f"median of {args.repeats} rounds x {args.burst} calls")
    rows = []
    for label in args.cases:
        print(f"timing {label} ...", file=sys.stderr, flush=True)
        stats = bench_case(label, CASES[label], args)
        for name, s in stats.items():
            print(f"  {label:24s} {name:22s} {s.median_ms:9.2f} ms  (IQR {s.iqr_ms:.2f}, min {s.min_ms:.2f})",
                  file=sys.stderr, flush=True)
        rows.append((label, stats))
    if not args.only_alternatives:
        cols = ("case", "emitted ms", "ConvGrad ms", "torch ms", "emitted/ConvGrad", "emitted/torch")
        lines = [cols]
        for label, s in rows:
            e, c, t = (s[k].median_ms for k in ("emitted", "convgrad", "torch"))
            lines.append((label, f"{e:.2f}", f"{c:.2f}", f"{t:.2f}", f"{e / c:.2f}x", f"{e / t:.2f}x"))
        _print_table(lines, args.markdown)
    if args.alternatives or args.only_alternatives:
        lines = [("case", "formulation", "median ms", "IQR ms", "min ms")]
        for label, s in rows:
            for name, st in s.items():
                if ":" in name:
                    lines.append((label, name, f"{st.median_ms:.2f}", f"{st.iqr_ms:.2f}", f"{st.min_ms:.2f}"))
        _print_table(lines, args.markdown)
    return 0


def _print_table(lines, markdown: bool) -> None:
    print()
    if markdown:
        print("| " + " | ".join(lines[0]) + " |")
        print("|" + "---|" * len(lines[0]))
        for row in lines[1:]:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    for row in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    raise SystemExit(main())
