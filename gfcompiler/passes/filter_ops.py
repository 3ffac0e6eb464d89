"""The gradient-filter operator (docs/operator.md), built from standard ONNX ops.

Two builders, independent of where their nodes are plugged in:

* `build_forward_summaries` (forward side): X → X_sum, W → W_sum.
* `build_filtered_backward` (backward side): (dY, X_sum, W_sum, geometry) → (dX, dW, dB).

They emit onto a `gfcompiler.emit.Emitter`, whose prefix (``<layer>/gf``), tape and
layer/phase metadata the caller chooses, and return `ir.Value`s; the caller wires those
values into the graph it is rewriting (onnxruntime-training's gradient graph in
`gradient_filter`, the step model of `gfcompiler.onnx_step`). A person reading the graph
in Netron sees ``<layer>/gf/dY_avg`` etc.

Formulation, each choice with its reason (the times that decided them, onnxruntime's CPU
kernels, are in benchmarks/README.md, "Formulation choices of the filtered backward"):

* Sum pooling of X is ``AveragePool(count_include_pad=1) · qh·qw``; windows wholly in
  the padding are zero cells padded onto the small X_sum, because onnxruntime's
  PadFusion folds a ``Pad`` of X into the pooling as a padding it then rejects.
* ``dY_avg`` is one ``AveragePool(count_include_pad=0)``, which onnxruntime runs in its
  fast NCHWc layout.
* ``dB`` (step 7, exact) is Σ count·dY_avg over the windows, which tile dY, so dY is
  not read a second time.
* ``dX_small`` (steps 3–4) is ``W_sumᵀ · dY_avg`` per group, a ``Transpose`` and a batched
  ``MatMul`` (as fast as a 1×1 conv, and groups stay a batch axis); ``dW_sum`` is
  ``dY_avg · X_sumᵀ`` per group. Depthwise convs use a ``Mul`` (and a ``ReduceSum``);
  step 8 (dilation ≥ r) is a ``ConvTranspose`` with the full kernel.
* On a patch grid of at most 16 cells both products take the batch folded into their
  GEMM columns (`_folds_batch`), because per-sample GEMMs that narrow waste most of
  MLAS's 16-column panels.
* Step 5's broadcast over kernel taps is a ``MatMul`` with a ones row and a ``Reshape``,
  an order of magnitude faster than ``Expand``, ``Tile`` or a broadcasting ``Mul``.
* Step 6 repeats columns on the small map (a ``MatMul`` with a ones row) and rows last
  with a ``Gather``, so the full-size dX is written once.

Requires opset >= 13 (``ReduceSum`` with axes as an input).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gfcompiler.emit import Emitter
from gfcompiler.geometry import FilterGeometry

MIN_OPSET = 13


@dataclasses.dataclass
class FilteredGradients:
    """Outputs of the filtered backward; ``input_grad`` is None when not requested."""

    input_grad: ir.Value | None
    weight_grad: ir.Value
    bias_grad: ir.Value | None


def _pool_pads(begin: tuple[int, int], end: tuple[int, int]) -> list[int]:
    return [begin[0], begin[1], end[0], end[1]]


def build_input_sum(e: Emitter, x: ir.Value, geom: FilterGeometry) -> ir.Value:
    """Forward step 4 (docs/operator.md): ``X_sum = SumPool(X)`` over (qh, qw) windows with centered padding.

    Negative paddings (windows that start inside X) become a ``Slice``. Windows lying
    wholly in the padding (a padding of a window's size or more, which the pooling op
    refuses) sum to zero: they are left out of the pooling and added back as zero
    cells by a ``Pad`` of the small ``X_sum``. Padding X itself instead would be a
    ``Pad`` → ``AveragePool`` pair that onnxruntime's PadFusion merges back into one
    pooling with an invalid padding.
    """
    qh, qw = geom.input_patch
    begin, end = geom.input_pad_begin, geom.input_pad_end
    if min(*begin, *end) < 0:
        starts = [max(-begin[0], 0), max(-begin[1], 0)]
        ends = [geom.conv.height - max(-end[0], 0), geom.conv.width - max(-end[1], 0)]
        x = e.op("Slice", [x, e.ints("crop_starts", starts), e.ints("crop_ends", ends), e.ints("crop_axes", [2, 3])], "X_cropped")
        begin = (max(begin[0], 0), max(begin[1], 0))
        end = (max(end[0], 0), max(end[1], 0))
    empty_begin = (begin[0] // qh, begin[1] // qw)  # windows wholly in the padding
    empty_end = (end[0] // qh, end[1] // qw)
    begin = (begin[0] - empty_begin[0] * qh, begin[1] - empty_begin[1] * qw)
    end = (end[0] - empty_end[0] * qh, end[1] - empty_end[1] * qw)
    pooled = e.op(
        "AveragePool", [x], "X_mean",
        kernel_shape=[qh, qw], strides=[qh, qw], pads=_pool_pads(begin, end), count_include_pad=1,
    )
    area = e.const("window_area", np.array(float(qh * qw), dtype=np.float32))
    if max(*empty_begin, *empty_end) == 0:
        return e.op("Mul", [pooled, area], "X_sum")
    x_sum = e.op("Mul", [pooled, area], "X_sum_covered")
    pads = [0, 0, empty_begin[0], empty_begin[1], 0, 0, empty_end[0], empty_end[1]]
    return e.op("Pad", [x_sum, e.ints("empty_window_pads", pads)], "X_sum")


def build_weight_sum(e: Emitter, w: ir.Value) -> ir.Value:
    """Forward step 5 (docs/operator.md): ``W_sum`` = W summed over its kernel taps, kept as Co×(Ci/g)×1×1."""
    return e.op("ReduceSum", [w, e.ints("tap_axes", [2, 3])], "W_sum", keepdims=1)


def build_forward_summaries(e: Emitter, x: ir.Value, w: ir.Value, geom: FilterGeometry) -> tuple[ir.Value, ir.Value]:
    """The forward side of the operator: (X_sum, W_sum)."""
    return build_input_sum(e, x, geom), build_weight_sum(e, w)


def _average_grad_output(e: Emitter, dy: ir.Value, geom: FilterGeometry) -> ir.Value:
    """Backward step 2: r×r window means of dY counting only valid elements."""
    r = geom.patch
    if r == 1:
        return dy
    return e.op(
        "AveragePool", [dy], "dY_avg",
        kernel_shape=[r, r], strides=[r, r],
        pads=_pool_pads(geom.grad_pad_begin, geom.grad_pad_end), count_include_pad=0,
    )


def _grad_window_counts(geom: FilterGeometry) -> np.ndarray:
    """How many valid dY elements each r×r window of step 2 holds: ph×pw."""
    r, (ph, pw) = geom.patch, geom.patches
    (bh, bw), conv = geom.grad_pad_begin, geom.conv
    rows = np.minimum(np.arange(ph) * r - bh + r, conv.out_height) - np.maximum(np.arange(ph) * r - bh, 0)
    cols = np.minimum(np.arange(pw) * r - bw + r, conv.out_width) - np.maximum(np.arange(pw) * r - bw, 0)
    return np.outer(rows, cols).astype(np.float32)


def _bias_grad(e: Emitter, dy: ir.Value, dy_avg: ir.Value, geom: FilterGeometry) -> ir.Value:
    """Step 7, exact: Σ dY, summed as Σ_windows count·dY_avg.

    The r×r windows tile dY (each element lies in exactly one), so the window sums
    count·dY_avg add up to Σ dY; only the order of the float additions differs. This
    reads the small dY_avg instead of the full-size dY a second time.
    """
    if geom.patch == 1:
        return e.op("ReduceSum", [dy, e.ints("bias_axes", [0, 2, 3])], "dB", keepdims=0)
    return _window_bias_grad(e, dy_avg, geom)


def _window_bias_grad(e: Emitter, dy_avg: ir.Value, geom: FilterGeometry) -> ir.Value:
    """Σ dY as Σ_windows count·dY_avg (exact: the windows tile dY)."""
    window_sums = e.op("Mul", [dy_avg, e.const("grad_window_counts", _grad_window_counts(geom))], "dY_window_sums")
    return e.op("ReduceSum", [window_sums, e.ints("bias_axes", [0, 2, 3])], "dB", keepdims=0)


def _batch_ones(e: Emitter, like: ir.Value, batch: int | None) -> ir.Value:
    """A 1×N row of ones (N = the batch), a constant when the batch is static."""
    if batch is not None:
        return e.const("batch_ones", np.ones((1, batch), np.float32))
    shape = e.op("Shape", [like], "batch_shape")
    n = e.op("Slice", [shape, e.ints("batch_start", [0]), e.ints("batch_end", [1])], "batch_size")
    row_shape = e.op("Concat", [e.ints("one", [1]), n], "batch_ones_shape", axis=0)
    return e.op("ConstantOfShape", [row_shape], "batch_ones", value=ir.tensor(np.ones(1, np.float32)))


def _is_depthwise_like(geom: FilterGeometry) -> bool:
    """One input and one output channel per group: the products are elementwise."""
    return geom.conv.out_per_group == 1 and geom.conv.in_per_group == 1


# MLAS's SGEMM packs its right-hand operand in zero-padded panels of 16 columns.
FOLD_MAX_PATCHES = 16


def _folds_batch(geom: FilterGeometry) -> bool:
    """Whether the per-group products take the batch folded into their GEMM columns.

    Per sample, a product has P = ph·pw columns (dX_small) or a contraction of length P
    (dW_sum), and onnxruntime runs it as N small GEMMs, each transposing the weight
    block again, plus an N×Co×(Ci/g) stack of partial dW sums. Folding the batch
    (g×c×(N·P) operands) makes one GEMM per group but costs three transposes of
    N×C×P tensors. It wins while P fits one 16-column panel of MLAS's SGEMM and
    loses from P ≈ 49 on at all but the widest layers (benchmarks/README.md).
    With a static batch of 1 folding is a ``Reshape`` and always taken.
    """
    ph, pw = geom.patches
    return geom.conv.batch == 1 or ph * pw <= FOLD_MAX_PATCHES


def _fold_batch(e: Emitter, value: ir.Value, per_group: int, geom: FilterGeometry, name: str) -> ir.Value:
    """N×(g·c)×ph×pw viewed as g×c×(N·P): one GEMM operand per group with the batch folded in.

    With a static batch of 1 this is a ``Reshape``; otherwise the batch axis is moved
    behind the channels by a ``Transpose`` of the (small) patch-grid tensor.
    """
    g = geom.conv.group
    folded_shape = e.ints(f"{name}_shape", [g, per_group, -1])
    if geom.conv.batch == 1:
        return e.op("Reshape", [value, folded_shape], name)
    groups = e.op("Reshape", [value, e.ints(f"{name}_groups_shape", [0, g, per_group, -1])], f"{name}_groups")
    moved = e.op("Transpose", [groups], f"{name}_batch_inner", perm=[1, 2, 0, 3])  # g×c×N×P
    return e.op("Reshape", [moved, folded_shape], name)


def _grad_output_groups(e: Emitter, dy_avg: ir.Value, geom: FilterGeometry) -> ir.Value:
    """dY_avg as the right-hand operand of the per-group products.

    g×(Co/g)×(N·P) when the batch is folded (`_folds_batch`), else N×g×(Co/g)×P.
    """
    conv = geom.conv
    if _folds_batch(geom):
        return _fold_batch(e, dy_avg, conv.out_per_group, geom, "dY_avg_folded")
    shape = e.ints("dY_avg_groups_shape", [0, conv.group, conv.out_per_group, -1])
    return e.op("Reshape", [dy_avg, shape], "dY_avg_groups")


def _weight_sum_grad(
    e: Emitter, dy_avg: ir.Value, dy_groups: ir.Value | None, x_sum: ir.Value, geom: FilterGeometry
) -> ir.Value:
    """Backward steps 3–4: dW_sum = Σ_{n,p} dY_avg ⊗ X_sum, block-diagonal over groups; Co×(Ci/g).

    Batch folded (`_folds_batch`, always at batch 1): X_sum is folded like dY_avg to
    g×(Ci/g)×(N·P) and one batched ``MatMul`` per group contracts over N·P, summing the
    batch in the GEMM. Otherwise one batched ``MatMul`` per sample and group
    (N×g×cog×cig), then the batch is summed by a second ``MatMul`` with a 1×N ones row
    (faster than a ``ReduceSum`` over the batch axis). Depthwise-like convs are a ``Mul``
    and a ``ReduceSum``.
    """
    conv = geom.conv
    g, cig = conv.group, conv.in_per_group
    dw_sum_shape = e.ints("dW_sum_shape", [conv.out_channels, cig])
    if dy_groups is None:
        product = e.op("Mul", [dy_avg, x_sum], "dY_avg_x_X_sum")
        summed = e.op("ReduceSum", [product, e.ints("dW_sum_axes", [0, 2, 3])], "dW_sum_flat", keepdims=0)
        return e.op("Reshape", [summed, dw_sum_shape], "dW_sum")
    if _folds_batch(geom):
        x_folded = _fold_batch(e, x_sum, cig, geom, "X_sum_folded")
        x_folded_t = e.op("Transpose", [x_folded], "X_sum_folded_T", perm=[0, 2, 1])  # g×(N·P)×cig
        blocks = e.op("MatMul", [dy_groups, x_folded_t], "dW_sum_groups")  # g×cog×cig
        return e.op("Reshape", [blocks, dw_sum_shape], "dW_sum")
    x_groups = e.op("Reshape", [x_sum, e.ints("X_groups_shape", [0, g, cig, -1])], "X_sum_groups")
    x_groups_t = e.op("Transpose", [x_groups], "X_sum_groups_T", perm=[0, 1, 3, 2])
    per_sample = e.op("MatMul", [dy_groups, x_groups_t], "dW_sum_per_sample")  # N×g×cog×cig
    flat = e.op("Reshape", [per_sample, e.ints("per_sample_flat_shape", [0, -1])], "dW_sum_per_sample_flat")
    summed = e.op("MatMul", [_batch_ones(e, dy_avg, conv.batch), flat], "dW_sum_row")  # 1×(Co·cig)
    return e.op("Reshape", [summed, dw_sum_shape], "dW_sum")


def _broadcast_weight_grad(e: Emitter, dw_sum: ir.Value, geom: FilterGeometry) -> ir.Value:
    """Backward step 5: every kernel tap gets dW_sum (a MatMul with a ones row, not Expand)."""
    conv = geom.conv
    kh, kw = conv.kernel
    if kh * kw == 1:
        return e.op("Reshape", [dw_sum, e.ints("dW_shape", list(conv.weight_shape))], "dW")
    column = e.op("Reshape", [dw_sum, e.ints("dW_column_shape", [conv.out_channels, conv.in_per_group, 1])], "dW_sum_column")
    taps = e.op("MatMul", [column, e.const("tap_ones", np.ones((1, kh * kw), np.float32))], "dW_taps")
    return e.op("Reshape", [taps, e.ints("dW_shape", list(conv.weight_shape))], "dW")


def _small_input_grad(
    e: Emitter, dy_avg: ir.Value, dy_groups: ir.Value | None, w_sum: ir.Value, w: ir.Value | None,
    geom: FilterGeometry,
) -> ir.Value:
    """Backward steps 3, 4 and 8: dX on the patch grid, N×Ci×ph×pw.

    Steps 3–4 are, per group, ``W_sumᵀ · dY_avg``: a ``Transpose`` of the (small) W_sum
    blocks and a batched ``MatMul`` (onnxruntime fuses the two into one ``FusedMatMul``).
    With the batch folded (`_folds_batch`) that is one GEMM per group, g×cig×(N·P),
    whose result is transposed back to batch-first (a ``Reshape`` alone at batch 1);
    otherwise one GEMM per sample and group, N×g×cig×P. Depthwise convs (one input
    and one output channel per group) are a ``Mul``. Step 8 is a ``ConvTranspose``
    with the full kernel, dilation and padding d // r.
    """
    conv = geom.conv
    g, cog, cig = conv.group, conv.out_per_group, conv.in_per_group
    if geom.uses_dilated_kernel:
        if w is None:
            raise ValueError("the dilated rule (backward step 8) needs the full kernel")
        d = geom.reduced_dilation
        return e.op("ConvTranspose", [dy_avg, w], "dX_small", group=conv.group, dilations=[d, d], pads=[d, d, d, d])
    if dy_groups is None:
        scale = e.op("Reshape", [w_sum, e.ints("W_sum_channel_shape", [conv.in_channels, 1, 1])], "W_sum_channel")
        return e.op("Mul", [dy_avg, scale], "dX_small")
    ph, pw = geom.patches
    blocks = e.op("Reshape", [w_sum, e.ints("W_sum_blocks_shape", [g, cog, cig])], "W_sum_blocks")
    blocks_t = e.op("Transpose", [blocks], "W_sum_blocks_T", perm=[0, 2, 1])  # g×cig×cog
    product = e.op("MatMul", [blocks_t, dy_groups], "dX_small_groups")
    if _folds_batch(geom) and conv.batch != 1:  # g×cig×(N·P) → g×cig×N×P → N×g×cig×P
        unfolded = e.op("Reshape", [product, e.ints("dX_small_unfolded_shape", [g, cig, -1, ph * pw])], "dX_small_unfolded")
        product = e.op("Transpose", [unfolded], "dX_small_batch_first", perm=[2, 0, 1, 3])
    # N×g×cig×P, or g×cig×P (folded, batch 1)
    return e.op("Reshape", [product, e.ints("dX_small_shape", [-1, conv.in_channels, ph, pw])], "dX_small")


def _upsample_and_crop(e: Emitter, dx_small: ir.Value, geom: FilterGeometry) -> ir.Value:
    """Backward step 6: nearest upsampling by (qh, qw) cropped to H×W, columns first, rows last.

    Columns: each value of the small map is repeated qw times by a ``MatMul`` with a
    1×qw ones row, and a ``Slice`` crops the columns. Rows: a ``Gather`` on the row axis
    picks, for each output row, its patch row; it is the op that writes the full-size
    dX, copying whole contiguous rows. Rows or columns that no window covered
    (negative padding) get zero gradient through a final ``Pad``.
    """
    conv = geom.conv
    (qh, qw), (ph, pw), (bh, bw) = geom.input_patch, geom.patches, geom.input_pad_begin
    # Output rows i in [row0, row1) lie in patch row (i + bh) // qh; the rest are uncovered.
    row0, row1 = max(0, -bh), min(conv.height, ph * qh - bh)
    col0, col1 = max(0, -bw), min(conv.width, pw * qw - bw)
    cols = dx_small
    if qw > 1:
        column = e.op("Unsqueeze", [cols, e.ints("last_axis", [-1])], "dX_small_column")
        repeated = e.op("MatMul", [column, e.const("col_ones", np.ones((1, qw), np.float32))], "dX_cols_repeated")
        cols = e.op("Reshape", [repeated, e.ints("dX_wide_shape", [0, 0, 0, -1])], "dX_wide")
    first_col = col0 + bw  # column offset inside the (pw·qw)-wide upsampled map
    if (first_col, col1 - col0) != (0, pw * qw):
        cols = e.op(
            "Slice", [cols, e.ints("col_start", [first_col]), e.ints("col_end", [first_col + col1 - col0]), e.ints("col_axis", [3])],
            "dX_cols_cropped",
        )
    row_index = (np.arange(row0, row1) + bh) // qh
    rows = cols
    if not np.array_equal(row_index, np.arange(ph)):
        rows = e.op("Gather", [cols, e.ints("row_patch_index", row_index)], "dX_rows", axis=2)
    if (row0, col0, row1, col1) != (0, 0, conv.height, conv.width):
        pads = [0, 0, row0, col0, 0, 0, conv.height - row1, conv.width - col1]
        rows = e.op("Pad", [rows, e.ints("uncovered_pads", pads)], "dX_padded")
    return rows


def build_filtered_backward(
    e: Emitter,
    dy: ir.Value,
    x_sum: ir.Value,
    w_sum: ir.Value,
    geom: FilterGeometry,
    *,
    needs_input_grad: bool = True,
    needs_bias_grad: bool = True,
    weight: ir.Value | None = None,
    constant_dy: ir.Value | None = None,
) -> FilteredGradients:
    """The backward side of docs/operator.md: (dY, X_sum, W_sum) → (dX, dW, dB).

    ``W_sum`` is Co×(Ci/g)×1×1 as `build_weight_sum` makes it. ``weight`` (the full
    kernel) is read only by the dilated rule (step 8). dB is exact (step 7).
    ``constant_dy`` (N×Co×1×1): dY is known to be this tensor broadcast over the
    output map (a global-average-pool head), so ``dY_avg`` is it broadcast over the
    patch grid (the mean of a constant is the constant) and dY itself is never read.
    """
    if constant_dy is not None:
        dy_avg = e.op("Expand", [constant_dy, e.ints("patch_grid", [1, 1, *geom.patches])], "dY_avg")
        dy_groups = None if _is_depthwise_like(geom) else _grad_output_groups(e, dy_avg, geom)
        dw = _broadcast_weight_grad(e, _weight_sum_grad(e, dy_avg, dy_groups, x_sum, geom), geom)
        db = _window_bias_grad(e, dy_avg, geom) if needs_bias_grad else None
        dx = None
        if needs_input_grad:
            dx = _upsample_and_crop(e, _small_input_grad(e, dy_avg, dy_groups, w_sum, weight, geom), geom)
        return FilteredGradients(input_grad=dx, weight_grad=dw, bias_grad=db)
    dy_avg = _average_grad_output(e, dy, geom)
    dy_groups = None if _is_depthwise_like(geom) else _grad_output_groups(e, dy_avg, geom)
    dw = _broadcast_weight_grad(e, _weight_sum_grad(e, dy_avg, dy_groups, x_sum, geom), geom)
    db = _bias_grad(e, dy, dy_avg, geom) if needs_bias_grad else None
    dx = None
    if needs_input_grad:
        dx = _upsample_and_crop(e, _small_input_grad(e, dy_avg, dy_groups, w_sum, weight, geom), geom)
    return FilteredGradients(input_grad=dx, weight_grad=dw, bias_grad=db)
