"""The gradient-filter operator of SPEC.md, built from standard ONNX ops.

Two builders, independent of where their nodes are plugged in:

* `build_forward_summaries` (forward side): X → X_sum, W → W_sum.
* `build_filtered_backward` (backward side): (dY, X_sum, W_sum, geometry) → (dX, dW, dB).

They append nodes to an `onnx_ir.tape.Tape` and return `ir.Value`s; the caller wires
those values into whatever graph it is rewriting (today the onnxruntime-training
gradient graph, see `gradient_filter.py`). Node and value names are derived from the
layer's name, so a person reading the graph in Netron sees ``<layer>/gf/dY_avg`` etc.

Formulation choices (measured on onnxruntime CPU, see benchmarks/README.md):

* sum pooling is ``AveragePool(count_include_pad=1) · qh·qw``;
* ``dX_small`` is one ``ConvTranspose`` for every case: with the 1×1 kernel ``W_sum``
  it is SPEC step 3 (block-diagonal over groups through its ``group`` attribute, which
  covers ungrouped, depthwise and channel-multiplier convs alike); with the full
  kernel, dilation and padding ``d // r`` it is step 8's conv with the flipped kernel;
* ``dW_sum`` is a batched ``MatMul`` over groups (``Mul``+``ReduceSum`` when each group
  has one input and one output channel, i.e. depthwise);
* broadcasts and nearest upsampling use ``MatMul`` with a ones row and ``Gather`` of
  whole rows, never ``Expand`` over inner axes or ``Resize`` (both slow in ORT CPU).

Requires opset >= 13 (``ReduceSum`` with axes as an input).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gfcompiler.geometry import FilterGeometry

MIN_OPSET = 13


@dataclasses.dataclass
class FilteredGradients:
    """Outputs of the filtered backward; ``input_grad`` is None when not requested."""

    input_grad: ir.Value | None
    weight_grad: ir.Value
    bias_grad: ir.Value | None


class _Emitter:
    """Appends named nodes to a tape: node and output are both called ``<prefix>/<name>``."""

    def __init__(self, tape: ir.tape.Tape, prefix: str) -> None:
        self.tape = tape
        self.prefix = prefix

    def _name(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def op(self, op_type: str, inputs: list[ir.Value | None], name: str, **attributes) -> ir.Value:
        return self.tape.op(
            op_type,
            inputs,
            attributes=attributes or None,
            name=self._name(name),
            output=ir.Value(name=self._name(name)),
        )

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return self.tape.initializer(ir.tensor(np.asarray(array), name=self._name(name)))

    def ints(self, name: str, values) -> ir.Value:
        return self.const(name, np.asarray(values, dtype=np.int64))


def _pool_pads(begin: tuple[int, int], end: tuple[int, int]) -> list[int]:
    return [begin[0], begin[1], end[0], end[1]]


def build_input_sum(tape: ir.tape.Tape, x: ir.Value, geom: FilterGeometry, prefix: str) -> ir.Value:
    """SPEC forward step 4: ``X_sum = SumPool(X)`` over (qh, qw) windows with centered padding.

    Negative paddings (windows that start inside X) become a ``Slice``; paddings the
    pooling op cannot take (one window's worth or more) become an explicit ``Pad``.
    """
    e = _Emitter(tape, prefix)
    qh, qw = geom.input_patch
    begin, end = geom.input_pad_begin, geom.input_pad_end
    if min(*begin, *end) < 0:
        starts = [max(-begin[0], 0), max(-begin[1], 0)]
        ends = [geom.conv.height - max(-end[0], 0), geom.conv.width - max(-end[1], 0)]
        x = e.op("Slice", [x, e.ints("crop_starts", starts), e.ints("crop_ends", ends), e.ints("crop_axes", [2, 3])], "X_cropped")
        begin = (max(begin[0], 0), max(begin[1], 0))
        end = (max(end[0], 0), max(end[1], 0))
    if max(begin[0], end[0]) >= qh or max(begin[1], end[1]) >= qw:
        pads = [0, 0, begin[0], begin[1], 0, 0, end[0], end[1]]
        x = e.op("Pad", [x, e.ints("X_pads", pads)], "X_padded")
        begin, end = (0, 0), (0, 0)
    pooled = e.op(
        "AveragePool", [x], "X_mean",
        kernel_shape=[qh, qw], strides=[qh, qw], pads=_pool_pads(begin, end), count_include_pad=1,
    )
    area = e.const("window_area", np.array(float(qh * qw), dtype=np.float32))
    return e.op("Mul", [pooled, area], "X_sum")


def build_weight_sum(tape: ir.tape.Tape, w: ir.Value, prefix: str) -> ir.Value:
    """SPEC forward step 5: ``W_sum`` = W summed over its kernel taps, kept as Co×(Ci/g)×1×1."""
    e = _Emitter(tape, prefix)
    return e.op("ReduceSum", [w, e.ints("tap_axes", [2, 3])], "W_sum", keepdims=1)


def build_forward_summaries(
    tape: ir.tape.Tape, x: ir.Value, w: ir.Value, geom: FilterGeometry, prefix: str
) -> tuple[ir.Value, ir.Value]:
    """The forward side of the operator: (X_sum, W_sum)."""
    return build_input_sum(tape, x, geom, prefix), build_weight_sum(tape, w, prefix)


def _average_grad_output(e: _Emitter, dy: ir.Value, geom: FilterGeometry) -> ir.Value:
    """Backward step 2: r×r window means of dY counting only valid elements."""
    r = geom.patch
    if r == 1:
        return dy
    return e.op(
        "AveragePool", [dy], "dY_avg",
        kernel_shape=[r, r], strides=[r, r],
        pads=_pool_pads(geom.grad_pad_begin, geom.grad_pad_end), count_include_pad=0,
    )


def _weight_sum_grad(e: _Emitter, dy_avg: ir.Value, x_sum: ir.Value, geom: FilterGeometry) -> ir.Value:
    """Backward steps 3–4: dW_sum = Σ_{n,p} dY_avg ⊗ X_sum, block-diagonal over groups; Co×(Ci/g)."""
    conv = geom.conv
    g, cog, cig = conv.group, conv.out_per_group, conv.in_per_group
    if cog == 1 and cig == 1:
        product = e.op("Mul", [dy_avg, x_sum], "dY_avg_x_X_sum")
        summed = e.op("ReduceSum", [product, e.ints("dW_sum_axes", [0, 2, 3])], "dW_sum_flat", keepdims=0)
        return e.op("Reshape", [summed, e.ints("dW_sum_shape", [conv.out_channels, cig])], "dW_sum")
    dy_groups = e.op("Reshape", [dy_avg, e.ints("dY_groups_shape", [0, g, cog, -1])], "dY_avg_groups")
    x_groups = e.op("Reshape", [x_sum, e.ints("X_groups_shape", [0, g, cig, -1])], "X_sum_groups")
    x_groups_t = e.op("Transpose", [x_groups], "X_sum_groups_T", perm=[0, 1, 3, 2])
    per_sample = e.op("MatMul", [dy_groups, x_groups_t], "dW_sum_per_sample")  # N×g×cog×cig
    summed = e.op("ReduceSum", [per_sample, e.ints("batch_axis", [0])], "dW_sum_groups", keepdims=0)
    return e.op("Reshape", [summed, e.ints("dW_sum_shape", [conv.out_channels, cig])], "dW_sum")


def _broadcast_weight_grad(e: _Emitter, dw_sum: ir.Value, geom: FilterGeometry) -> ir.Value:
    """Backward step 5: every kernel tap gets dW_sum (a MatMul with a ones row, not Expand)."""
    conv = geom.conv
    kh, kw = conv.kernel
    if kh * kw == 1:
        return e.op("Reshape", [dw_sum, e.ints("dW_shape", list(conv.weight_shape))], "dW")
    column = e.op("Reshape", [dw_sum, e.ints("dW_column_shape", [conv.out_channels, conv.in_per_group, 1])], "dW_sum_column")
    taps = e.op("MatMul", [column, e.const("tap_ones", np.ones((1, kh * kw), np.float32))], "dW_taps")
    return e.op("Reshape", [taps, e.ints("dW_shape", list(conv.weight_shape))], "dW")


def _small_input_grad(
    e: _Emitter, dy_avg: ir.Value, w_sum: ir.Value, w: ir.Value | None, geom: FilterGeometry
) -> ir.Value:
    """Backward steps 3, 4 and 8 as one ConvTranspose (the transposed conv *is* the input gradient)."""
    conv = geom.conv
    if geom.uses_dilated_kernel:
        if w is None:
            raise ValueError("the dilated rule (SPEC.md step 8) needs the full kernel")
        d = geom.reduced_dilation
        return e.op("ConvTranspose", [dy_avg, w], "dX_small", group=conv.group, dilations=[d, d], pads=[d, d, d, d])
    return e.op("ConvTranspose", [dy_avg, w_sum], "dX_small", group=conv.group)


def _upsample_and_crop(e: _Emitter, dx_small: ir.Value, geom: FilterGeometry) -> ir.Value:
    """Backward step 6: nearest upsampling by (qh, qw) cropped to H×W, built row/column-wise.

    Rows: a ``Gather`` on the row axis picks, for each output row, its patch row (whole
    contiguous rows are copied). Columns: each value is repeated qw times by a ``MatMul``
    with a 1×qw ones row, then the crop is a ``Slice``. Rows or columns that no window
    covered (negative padding) get zero gradient through a final ``Pad``.
    """
    conv = geom.conv
    (qh, qw), (ph, pw) = geom.input_patch, geom.patches
    (bh, bw), (eh, ew) = geom.input_pad_begin, geom.input_pad_end
    # Output rows i in [row0, row1) lie in patch row (i + bh) // qh; the rest are uncovered.
    row0, row1 = max(0, -bh), min(conv.height, ph * qh - bh)
    col0, col1 = max(0, -bw), min(conv.width, pw * qw - bw)
    row_index = (np.arange(row0, row1) + bh) // qh
    rows = e.op("Gather", [dx_small, e.ints("row_patch_index", row_index)], "dX_rows", axis=2)
    if qw == 1:
        cols = rows
    else:
        column = e.op("Unsqueeze", [rows, e.ints("last_axis", [-1])], "dX_rows_column")
        repeated = e.op("MatMul", [column, e.const("col_ones", np.ones((1, qw), np.float32))], "dX_cols_repeated")
        cols = e.op("Reshape", [repeated, e.ints("dX_wide_shape", [0, 0, 0, -1])], "dX_wide")
    first_col = col0 + bw  # column offset inside the (pw·qw)-wide upsampled map
    if (first_col, col1 - col0) != (0, pw * qw):
        cols = e.op(
            "Slice", [cols, e.ints("col_start", [first_col]), e.ints("col_end", [first_col + col1 - col0]), e.ints("col_axis", [3])],
            "dX_cropped",
        )
    if (row0, col0, row1, col1) != (0, 0, conv.height, conv.width):
        pads = [0, 0, row0, col0, 0, 0, conv.height - row1, conv.width - col1]
        cols = e.op("Pad", [cols, e.ints("uncovered_pads", pads)], "dX_padded")
    return cols


def build_filtered_backward(
    tape: ir.tape.Tape,
    dy: ir.Value,
    x_sum: ir.Value,
    w_sum: ir.Value,
    geom: FilterGeometry,
    prefix: str,
    *,
    needs_input_grad: bool = True,
    needs_bias_grad: bool = True,
    weight: ir.Value | None = None,
) -> FilteredGradients:
    """The backward side of SPEC.md: (dY, X_sum, W_sum) → (dX, dW, dB).

    ``W_sum`` is Co×(Ci/g)×1×1 as `build_weight_sum` makes it. ``weight`` (the full
    kernel) is read only by the dilated rule (step 8). dB is exact (step 7).
    """
    e = _Emitter(tape, prefix)
    dy_avg = _average_grad_output(e, dy, geom)
    dw = _broadcast_weight_grad(e, _weight_sum_grad(e, dy_avg, x_sum, geom), geom)
    db = None
    if needs_bias_grad:
        db = e.op("ReduceSum", [dy, e.ints("bias_axes", [0, 2, 3])], "dB", keepdims=0)
    dx = None
    if needs_input_grad:
        dx = _upsample_and_crop(e, _small_input_grad(e, dy_avg, w_sum, weight, geom), geom)
    return FilteredGradients(input_grad=dx, weight_grad=dw, bias_grad=db)
