"""The exact backward of ``Y = Conv(X, W, b)`` in default-domain ONNX ops (opset 17).

`build_exact_conv_backward` emits dX, dW and dB for one conv from dY, X and W; what it
emits runs on stock onnxruntime (no ``com.microsoft::ConvGrad``). `ConvAttrs` holds the
conv's attributes and static sizes, read from an onnx_ir ``Conv`` node by
`ConvAttrs.from_node`.

Formulations (chosen by measurement on onnxruntime CPU against ``ConvGrad``; the
reasons are in the function docstrings, ``benchmarks/conv_backward.py`` re-measures):

* dX (`_input_grad`): ``Conv(dY, W rotated 180°, channels swapped)`` for stride-1
  convs on large maps and depthwise-like ones, as Conv's threaded im2col beats
  ConvTranspose's single-threaded col2im there; otherwise ``ConvTranspose(dY, W)``
  with ``output_padding`` for the rows/columns the last stride step skipped (they
  get a zero gradient).
* dW (`_weight_grad`): one ``MatMul`` of dY (Co × N·Ho·Wo) against stacked windows of
  the padded X (cig·kh·kw × N·Ho·Wo, batched over groups), as onnxruntime runs that
  GEMM shape fastest and the product needs no transpose (onnxruntime's Transpose is
  slow); on large maps the kw column taps come from kw shifted copies of dY instead
  of kh·kw windows of X, which moves less memory. One input channel per group
  (depthwise, with or without a channel multiplier): a Slice, Mul and ReduceSum per
  tap on channels-last copies of X and dY, several times faster in onnxruntime than a
  grouped ``Conv(Xᵀ, dYᵀ)`` with dY as the kernel (a common starting point, 2–4×
  slower than the MatMul for dense convs too) or the same ops channels first.
* dB: ``ReduceSum`` of dY over batch and space.

2-D convs are the main case; a 1-D conv is handled as a 2-D conv of height 1.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from gfcompiler.emit import Emitter
from gfcompiler.geometry import ceil_div, conv_out_size


@dataclasses.dataclass(frozen=True)
class ConvAttrs:
    """A Conv's attributes and static sizes, always seen as 2-D.

    ``pads`` is ONNX order (top, left, bottom, right). ``batch`` is None when dynamic;
    ``in_channels``, ``height``, ``width`` and ``out_channels`` are None where unknown
    (the backward needs them). A 1-D conv (``rank`` 1) is stored as a 2-D conv of
    height 1: kernel (1, k), strides (1, s), pads (0, begin, 0, end), dilations (1, d).
    """

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    batch: int | None = None
    in_channels: int | None = None
    height: int | None = None
    width: int | None = None
    out_channels: int | None = None
    rank: int = 2

    def __post_init__(self) -> None:
        for field in ("in_channels", "out_channels"):
            channels = getattr(self, field)
            if channels is not None and channels % self.group:
                raise ValueError(f"group {self.group} does not divide {field} {channels}")

    @classmethod
    def from_node(cls, node: ir.Node) -> ConvAttrs:
        """The attributes of an onnx_ir ``Conv`` node (missing ones take ONNX's defaults).

        Sizes come from the static shapes of the node's X and W inputs. ``auto_pad``
        SAME_UPPER / SAME_LOWER / VALID become explicit pads; SAME_* needs the input's
        spatial size (ValueError otherwise). Raises NotImplementedError for 3-D and
        higher convs, ValueError when the kernel size is unknown.
        """
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            raise ValueError(f"not a Conv node: {node.domain}::{node.op_type}")
        x, w = node.inputs[0], node.inputs[1]
        attrs = node.attributes
        w_dims = _dims(w)
        x_dims = _dims(x)
        rank = None
        if "kernel_shape" in attrs:
            kernel = tuple(attrs.get_ints("kernel_shape"))
            rank = len(kernel)
        elif w_dims is not None and all(isinstance(d, int) for d in w_dims[2:]):
            kernel = tuple(w_dims[2:])
            rank = len(kernel)
        else:
            raise ValueError(f"Conv {node.name!r}: kernel size unknown (no kernel_shape, weight shape {w_dims})")
        if rank not in (1, 2):
            raise NotImplementedError(f"Conv {node.name!r}: {rank}-D convolution (only 1-D and 2-D are supported)")
        strides = tuple(attrs.get_ints("strides", [1] * rank))
        dilations = tuple(attrs.get_ints("dilations", [1] * rank))
        group = attrs.get_int("group", 1)
        spatial = [None] * rank
        batch = in_channels = None
        if x_dims is not None and len(x_dims) == rank + 2:
            batch, in_channels = _static(x_dims[0]), _static(x_dims[1])
            spatial = [_static(d) for d in x_dims[2:]]
        out_channels = _static(w_dims[0]) if w_dims is not None else None
        auto_pad = attrs.get_string("auto_pad", "NOTSET")
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            if any(size is None for size in spatial):
                raise ValueError(f"Conv {node.name!r}: auto_pad {auto_pad} with unknown input size {x_dims}")
            begin, end = zip(*(
                _same_pads(size, k, s, d, auto_pad == "SAME_UPPER")
                for size, k, s, d in zip(spatial, kernel, strides, dilations)
            ))
            pads = (*begin, *end)
        elif auto_pad == "VALID":
            pads = (0,) * (2 * rank)
        elif auto_pad == "NOTSET":
            pads = tuple(attrs.get_ints("pads", [0] * (2 * rank)))
        else:
            raise ValueError(f"Conv {node.name!r}: unknown auto_pad {auto_pad!r}")
        if rank == 1:
            kernel, strides, dilations = (1, *kernel), (1, *strides), (1, *dilations)
            pads = (0, pads[0], 0, pads[1])
            spatial = [1, *spatial]
        return cls(
            kernel=kernel, strides=strides, pads=pads, dilations=dilations, group=group,
            batch=batch, in_channels=in_channels, height=spatial[0], width=spatial[1],
            out_channels=out_channels, rank=rank,
        )

    @property
    def dilated_kernel(self) -> tuple[int, int]:
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))

    @property
    def out_height(self) -> int:
        return conv_out_size(self.height, self.kernel[0], self.strides[0], self.pads[0] + self.pads[2], self.dilations[0])

    @property
    def out_width(self) -> int:
        return conv_out_size(self.width, self.kernel[1], self.strides[1], self.pads[1] + self.pads[3], self.dilations[1])

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.group

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.group

    @property
    def is_depthwise(self) -> bool:
        return self.group == self.in_channels == self.out_channels

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_per_group, *self.kernel)

    def require_sizes(self) -> None:
        """ValueError unless channels and spatial sizes are known (the backward needs them)."""
        missing = [f for f in ("in_channels", "height", "width", "out_channels") if getattr(self, f) is None]
        if missing:
            raise ValueError(f"the exact conv backward needs static sizes; unknown: {', '.join(missing)}")
        if self.out_height < 1 or self.out_width < 1:
            raise ValueError(f"empty conv output for {self}")


def build_exact_conv_backward(
    e: Emitter, dy: ir.Value, x: ir.Value, w: ir.Value, conv: ConvAttrs,
    *, needs_input_grad: bool, needs_weight_grad: bool, needs_bias_grad: bool,
) -> tuple[ir.Value | None, ir.Value | None, ir.Value | None]:
    """(dX, dW, dB) of ``Y = Conv(X, W, b)``, exact; None for each gradient not needed.

    ``dy`` is N×Co×Ho×Wo, ``x`` N×Ci×H×W, ``w`` Co×(Ci/group)×kh×kw (one spatial axis
    fewer each for a 1-D conv); the batch may be dynamic, the other sizes must be
    static in ``conv``. dB is (Co,).
    """
    conv.require_sizes()
    if conv.rank == 1:
        axis = e.ints("axis2", [2])
        dy, x, w = (e.op("Unsqueeze", [v, axis], f"{label}_2d") for v, label in ((dy, "dY"), (x, "X"), (w, "W")))
    dx = _input_grad(e, dy, w, conv) if needs_input_grad else None
    dw = _weight_grad(e, dy, x, conv) if needs_weight_grad else None
    db = e.op("ReduceSum", [dy, e.ints("bias_axes", [0, 2, 3])], "dB", keepdims=0) if needs_bias_grad else None
    if conv.rank == 1:
        dx = e.op("Squeeze", [dx, axis], "dX_1d") if dx is not None else None
        dw = e.op("Squeeze", [dw, axis], "dW_1d") if dw is not None else None
    return dx, dw, db


# ---------------------------------------------------------------------------- dX


def _input_grad(e: Emitter, dy: ir.Value, w: ir.Value, conv: ConvAttrs) -> ir.Value:
    """dX: a Conv of dY with the flipped, channel-swapped W for stride-1 convs that are
    depthwise-like (one input channel per group) or on maps of at least 16×16 with
    N·H·W ≥ Co; otherwise ConvTranspose(dY, W).

    onnxruntime's ConvTranspose is a GEMM plus a single-threaded col2im, which on large
    maps costs more than Conv's im2col plus the O(|W|) weight flip; on small maps the
    flip and Conv's per-image GEMMs (H·W columns each) cost more.
    """
    spatial = conv.height * conv.width
    large = spatial >= 256 and (conv.batch or 1) * spatial >= conv.out_channels
    if conv.strides == (1, 1) and min(_flipped_conv_pads(conv)) >= 0 and (large or conv.in_per_group == 1):
        return _input_grad_flipped_conv(e, dy, w, conv)
    return _input_grad_conv_transpose(e, dy, w, conv)


def _flipped_conv_pads(conv: ConvAttrs) -> list[int]:
    dk = conv.dilated_kernel
    return [dk[i % 2] - 1 - pad for i, pad in enumerate(conv.pads)]


def _input_grad_flipped_conv(e: Emitter, dy: ir.Value, w: ir.Value, conv: ConvAttrs) -> ir.Value:
    """Stride 1: dX = Conv(dY, W rotated 180° and channel-swapped), pads (dilated kernel - 1 - pad)."""
    return e.op("Conv", [dy, _flipped_weight(e, w, conv)], "dX", kernel_shape=list(conv.kernel),
                pads=_flipped_conv_pads(conv), dilations=list(conv.dilations), group=conv.group)


def _input_grad_conv_transpose(e: Emitter, dy: ir.Value, w: ir.Value, conv: ConvAttrs) -> ir.Value:
    """dX = ConvTranspose(dY, W) with the conv's attributes; ``output_padding`` restores the
    rows/columns past the last window (the stride does not divide evenly: zero gradient)."""
    output_padding = [
        size - ((out - 1) * s + k - begin - end)
        for size, out, s, k, begin, end in zip(
            (conv.height, conv.width), (conv.out_height, conv.out_width), conv.strides, conv.dilated_kernel,
            conv.pads[:2], conv.pads[2:],
        )
    ]
    return e.op(
        "ConvTranspose", [dy, w], "dX",
        kernel_shape=list(conv.kernel), strides=list(conv.strides), pads=list(conv.pads),
        dilations=list(conv.dilations), group=conv.group, output_padding=output_padding,
    )


def _flipped_weight(e: Emitter, w: ir.Value, conv: ConvAttrs) -> ir.Value:
    """W rotated by 180° with in/out channels swapped within each group: Ci × cog × kh × kw.

    Rotating both kernel axes is reversing the flattened kh·kw axis.
    """
    g, cog, cig, taps = conv.group, conv.out_per_group, conv.in_per_group, conv.kernel[0] * conv.kernel[1]
    v = e.op("Reshape", [w, e.ints("W_taps_shape", [g, cog, cig, taps])], "W_taps")
    if cog > 1 and cig > 1:
        v = e.op("Transpose", [v], "W_swapped", perm=[0, 2, 1, 3])
    if taps > 1:
        v = e.op("Slice", [v, e.ints("W_flip_start", [-1]), e.ints("W_flip_end", [-(2**63 - 1)]),
                           e.ints("W_flip_axis", [3]), e.ints("W_flip_step", [-1])], "W_flipped")
    return e.op("Reshape", [v, e.ints("W_flipped_shape", [conv.in_channels, cog, *conv.kernel])], "W_flipped_T")


# ---------------------------------------------------------------------------- dW


def _weight_grad(e: Emitter, dy: ir.Value, x: ir.Value, conv: ConvAttrs) -> ir.Value:
    """dW: one MatMul of stacked windows (`_weight_grad_gemm`), with the column taps
    taken from shifted copies of dY when that moves less memory than it adds MACs;
    per-tap elementwise ops, channels last (`_weight_grad_depthwise`), when each group
    has one input channel (depthwise, with or without a channel multiplier), where a
    GEMM per group would be a tiny GEMV."""
    if conv.in_per_group == 1 and conv.kernel != (1, 1):
        return _weight_grad_depthwise(e, dy, x, conv)
    if _correlation_pays(conv):
        return _weight_grad_correlation(e, dy, x, conv)
    return _weight_grad_gemm(e, dy, x, conv, (1,) if _shift_columns_pays(conv) else ())


def _correlation_pays(conv: ConvAttrs) -> bool:
    """Strided convs with few output channels: their window GEMM is memory-bound (about Co/3
    MACs per float moved), and onnxruntime's own Conv correlating X with dY beat it by 1.3–1.5×
    (8→16 and 16→32 channels, stride 2, batch 32; it lost 2–4× at 32+ channels stride 1)."""
    return conv.group == 1 and max(conv.strides) > 1 and conv.out_channels <= 32 and conv.kernel != (1, 1)


def _weight_grad_correlation(e: Emitter, dy: ir.Value, x: ir.Value, conv: ConvAttrs) -> ir.Value:
    """dW = Conv(Xᵀ, dYᵀ) (ungrouped): Xᵀ is Ci×N×H×W, dYᵀ (the kernel) Co×N×Ho×Wo.

    The conv's strides become dilations and its dilations strides; its pads stay, the end
    pad trimmed so no taps past kh×kw are computed. The Ci×Co×kh×kw result is transposed.
    """
    h, wd, ho, wo = conv.height, conv.width, conv.out_height, conv.out_width
    xt = _batch_to_channels(e, x, conv.batch, (conv.in_channels, h, wd), "Xt")
    dyt = _batch_to_channels(e, dy, conv.batch, (conv.out_channels, ho, wo), "dYt")
    pads, taps = [0, 0, 0, 0], []
    for a, (size, out, k, s, d) in enumerate(zip((h, wd), (ho, wo), conv.kernel, conv.strides, conv.dilations)):
        begin = conv.pads[a]
        end = max(min(conv.pads[a + 2], (k - 1) * d + (out - 1) * s + 1 - size - begin), 0)
        pads[a], pads[a + 2] = begin, end
        taps.append((size + begin + end - (out - 1) * s - 1) // d + 1)
    r = e.op("Conv", [xt, dyt], "dW_correlation", kernel_shape=[ho, wo], strides=list(conv.dilations),
             dilations=list(conv.strides), pads=pads)
    if tuple(taps) != conv.kernel:  # the end pad could not be trimmed (it was already 0)
        r = e.op("Slice", [r, e.ints("dW_taps_start", [0, 0]), e.ints("dW_taps_end", list(conv.kernel)),
                           e.ints("dW_taps_axes", [2, 3])], "dW_taps")
    return e.op("Transpose", [r], "dW", perm=[1, 0, 2, 3])


def _shift_columns_pays(conv: ConvAttrs) -> bool:
    """Does taking the kw column taps from dY (stride 1) beat kh·kw windows of X?

    Floats moved (the X windows are sliced, concatenated and packed as MatMul's B;
    the dY shifts padded and concatenated; the product then needs a Transpose, which
    in onnxruntime costs about 6 copies per float) against the MACs the wider rows
    add, at ≈30 MACs per float moved (onnxruntime CPU, copies single-threaded). A
    dynamic batch counts as 1.
    """
    kh, kw = conv.kernel
    if conv.strides[1] != 1 or kw == 1:
        return False
    n, ho, wo = conv.batch or 1, conv.out_height, conv.out_width
    wp = conv.width + conv.pads[1] + conv.pads[3]
    weight = conv.out_channels * conv.in_per_group * kh * kw
    moved_windows = 3 * kh * kw * conv.in_channels * n * ho * wo
    moved_shifted = (3 * kh * conv.in_channels + 2 * kw * conv.out_channels) * n * ho * wp + 6 * weight
    extra_macs = weight * n * ho * (wp - wo)
    return 30 * (moved_windows - moved_shifted) > extra_macs


def _weight_grad_gemm(e: Emitter, dy: ir.Value, x: ir.Value, conv: ConvAttrs, shift_axes: tuple[int, ...],
                      a_side: str = "dY") -> ir.Value:
    """dW as one MatMul (batched over groups) of two stacks sharing the reduction axis K = N·h·w.

    Along each spatial axis the kernel taps come either from X (windows of the padded
    X, strided by the conv's stride) or, for an axis in ``shift_axes`` (stride 1 only),
    from dY (copies of dY zero-padded by i·d before and (k-1-i)·d after, against the
    whole padded X: Σ_K dY_shift(i)·Xp = Σ_K dY·window(i)). The X stack is
    g × cig·tx × K, the dY stack g × cog·ty × K, taps inside each channel. ``a_side``
    is the stack that is MatMul's A (the other is transposed and packed); with A = dY
    and no dY shifts the product is already Co × cig·kh·kw, no Transpose.
    """
    g, cig, cog = conv.group, conv.in_per_group, conv.out_per_group
    out = (conv.out_height, conv.out_width)
    top, left, bottom, right = conv.pads
    padded = (conv.height + top + bottom, conv.width + left + right)
    if any(conv.strides[a] != 1 for a in shift_axes):
        raise ValueError(f"dY shifts need stride 1 on axes {shift_axes}: {conv}")
    x_axes = [a for a in (0, 1)
              if a not in shift_axes and (conv.kernel[a], conv.strides[a], padded[a]) != (1, 1, out[a])]
    y_axes = [a for a in (0, 1) if a in shift_axes]

    # X stack: Ci × tx × N × h × w (windows of the padded X), then (g ×) cig·tx × K
    xs = _batch_to_channels(e, x, conv.batch, (conv.in_channels, conv.height, conv.width), "Xt")
    if any(conv.pads):
        xs = e.op("Pad", [xs, e.ints("Xt_pads", [0, 0, top, left, 0, 0, bottom, right])], "Xt_pad")
    parts = [xs]
    for a in x_axes:
        k, s, d = conv.kernel[a], conv.strides[a], conv.dilations[a]
        axis, step = e.ints(f"X_win{a}_axis", [2 + a]), e.ints(f"X_win{a}_step", [s])
        parts = [
            e.op("Slice", [p, e.ints(f"X_win{a}_start", [i * d]),
                           e.ints(f"X_win{a}_end", [i * d + (out[a] - 1) * s + 1]), axis, step], f"X_win{a}")
            for p in parts for i in range(k)
        ]
    tx = len(parts)
    shape = e.ints("X_cols_shape", [g, cig * tx, -1] if g > 1 else [cig * tx, -1])
    xs = e.op("Reshape", [_stack(e, parts, "X_cols"), shape], "X_cols_flat")

    # dY stack: Co × ty × N × h × w (zero-padded shifts of dY), then (g ×) cog·ty × K
    ys = _batch_to_channels(e, dy, conv.batch, (conv.out_channels, *out), "dYt")
    parts = [ys]
    for a in y_axes:
        k, d = conv.kernel[a], conv.dilations[a]
        shifted = []
        for p in parts:
            for i in range(k):
                pads = [0] * 8
                pads[2 + a], pads[6 + a] = i * d, (k - 1 - i) * d
                shifted.append(e.op("Pad", [p, e.ints(f"dY_shift{a}_pads", pads)], f"dY_shift{a}"))
        parts = shifted
    ty = len(parts)
    shape = e.ints("dY_cols_shape", [g, cog * ty, -1] if g > 1 else [cog * ty, -1])
    ys = e.op("Reshape", [_stack(e, parts, "dY_cols"), shape], "dY_cols_flat")

    # One MatMul, then order the result Co × cig × kh × kw.
    last = [0, 2, 1] if g > 1 else [1, 0]
    x_taps, y_taps = [f"k{a}" for a in x_axes], [f"k{a}" for a in y_axes]
    if a_side == "X":
        prod = e.op("MatMul", [xs, e.op("Transpose", [ys], "dY_cols_T", perm=last)], "dW_gemm")
        axes = ["i", *x_taps, "o", *y_taps]
    else:
        prod = e.op("MatMul", [ys, e.op("Transpose", [xs], "X_cols_T", perm=last)], "dW_gemm")
        axes = ["o", *y_taps, "i", *x_taps]
    want = ["o", "i", *sorted(x_taps + y_taps)]
    if axes != want:
        if _is_matrix_transpose(axes, want):
            perm = last
        else:
            sizes = {"o": cog, "i": cig, "k0": conv.kernel[0], "k1": conv.kernel[1]}
            dims, perm = [sizes[name] for name in axes], [axes.index(name) for name in want]
            if g > 1:
                dims, perm = [g, *dims], [0, *(p + 1 for p in perm)]
            prod = e.op("Reshape", [prod, e.ints("dW_split_shape", dims)], "dW_split")
        prod = e.op("Transpose", [prod], "dW_ordered", perm=perm)
    return e.op("Reshape", [prod, e.ints("dW_shape", list(conv.weight_shape))], "dW")


def _weight_grad_depthwise(e: Emitter, dy: ir.Value, x: ir.Value, conv: ConvAttrs) -> ir.Value:
    """One input channel per group (Co = m·g): dW[g·m + j, 0, tap] = Σ_{n,h,w} dY · window(tap),
    a Slice, Mul and ReduceSum per tap, channels last.

    In N×H×W×C layout each window copies runs of C floats and each ReduceSum sums
    rows of C contiguous floats, which onnxruntime does several times faster than
    the same ops on N×C×H×W (runs of W floats) or a grouped Conv.
    """
    g, m = conv.group, conv.out_per_group
    (kh, kw), (d0, d1), (s0, s1) = conv.kernel, conv.dilations, conv.strides
    top, left, bottom, right = conv.pads
    ho, wo = conv.out_height, conv.out_width
    xh = e.op("Transpose", [x], "X_nhwc", perm=[0, 2, 3, 1])
    if any(conv.pads):
        xh = e.op("Pad", [xh, e.ints("X_nhwc_pads", [0, top, left, 0, 0, bottom, right, 0])], "X_nhwc_pad")
    yh = e.op("Transpose", [dy], "dY_nhwc", perm=[0, 2, 3, 1])
    if m > 1:  # N×h×w×g×1 windows against N×Ho×Wo×g×m
        xh = e.op("Unsqueeze", [xh, e.ints("X_nhwc_multiplier_axis", [4])], "X_nhwc_groups")
        yh = e.op("Reshape", [yh, e.ints("dY_nhwc_groups_shape", [0, ho, wo, g, m])], "dY_nhwc_groups")
    axes, steps = e.ints("X_win_axes", [1, 2]), e.ints("X_win_steps", [s0, s1])
    sum_axes, column = e.ints("tap_sum_axes", [0, 1, 2]), e.ints("tap_axis", [-1])
    taps = []
    for i in range(kh):
        for j in range(kw):
            start = [i * d0, j * d1]
            end = [start[0] + (ho - 1) * s0 + 1, start[1] + (wo - 1) * s1 + 1]
            window = e.op("Slice", [xh, e.ints("X_win_start", start), e.ints("X_win_end", end), axes, steps], "X_win")
            total = e.op("ReduceSum", [e.op("Mul", [window, yh], "dW_tap_prod"), sum_axes], "dW_tap", keepdims=0)
            taps.append(e.op("Unsqueeze", [total, column], "dW_tap_col"))
    dw = taps[0] if len(taps) == 1 else e.op("Concat", taps, "dW_taps", axis=-1)
    return e.op("Reshape", [dw, e.ints("dW_shape", list(conv.weight_shape))], "dW")


def _is_matrix_transpose(axes: list, want: list) -> bool:
    """Is ``axes`` -> ``want`` the swap of two contiguous blocks (a matrix transpose)?"""
    n = len(axes)
    return any(axes[:cut] == want[n - cut:] and axes[cut:] == want[:n - cut] for cut in range(1, n))


def _stack(e: Emitter, parts: list[ir.Value], name: str) -> ir.Value:
    """C × N × h × w parts -> C × len(parts) × N × h × w (the part itself when alone)."""
    if len(parts) == 1:
        return parts[0]
    axis = e.ints(f"{name}_axis", [1])
    return e.op("Concat", [e.op("Unsqueeze", [p, axis], f"{name}_part") for p in parts], name, axis=1)


def _batch_to_channels(e: Emitter, v: ir.Value, batch: int | None, chw: tuple[int, int, int],
                       name: str) -> ir.Value:
    """N×C×H×W -> C×N×H×W (a Reshape when the batch is 1)."""
    if batch == 1:
        return e.op("Reshape", [v, e.ints(f"{name}_shape", [chw[0], 1, chw[1], chw[2]])], name)
    return e.op("Transpose", [v], name, perm=[1, 0, 2, 3])


# ---------------------------------------------------------------------------- helpers


def _dims(value: ir.Value | None) -> list | None:
    if value is None or value.shape is None:
        return None
    return list(value.shape)


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None




def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    """auto_pad SAME_*: output ceil(size / stride); the odd pad goes to the end (UPPER) or the beginning."""
    total = max((ceil_div(size, stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small, large = total // 2, total - total // 2
    return (small, large) if upper else (large, small)
