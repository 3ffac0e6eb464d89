"""NumPy reference of the gradient-filter operator (docs/operator.md), written for clarity.

This is the yardstick the emitted ONNX subgraphs are tested against. It follows
docs/operator.md step by step with explicit padding, window sums and ``np.repeat``, and shares
no formulation with the ONNX builder (which uses matrix products and pooling nodes),
only the integer geometry of `gfcompiler.geometry`.

Only numpy is imported.
"""

from __future__ import annotations

import numpy as np

from gfcompiler.geometry import FilterGeometry


def _pad_or_crop(x: np.ndarray, begin: tuple[int, int], end: tuple[int, int]) -> np.ndarray:
    """Zero-pad the last two axes by (begin, end); a negative amount crops instead."""
    (bh, bw), (eh, ew) = begin, end
    x = x[..., max(-bh, 0) : x.shape[-2] - max(-eh, 0), max(-bw, 0) : x.shape[-1] - max(-ew, 0)]
    pad = [(0, 0)] * (x.ndim - 2) + [(max(bh, 0), max(eh, 0)), (max(bw, 0), max(ew, 0))]
    return np.pad(x, pad)


def _window_sum(x: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """Sum non-overlapping windows of the last two axes (their sizes are multiples of window)."""
    n, c, h, w = x.shape
    wh, ww = window
    return x.reshape(n, c, h // wh, wh, w // ww, ww).sum(axis=(3, 5))


def input_sum(x: np.ndarray, geom: FilterGeometry) -> np.ndarray:
    """Forward step 4: ``X_sum``, zero-padded window sums of X, shape N×Ci×ph×pw."""
    return _window_sum(_pad_or_crop(x, geom.input_pad_begin, geom.input_pad_end), geom.input_patch)


def weight_sum(w: np.ndarray) -> np.ndarray:
    """Forward step 5: ``W_sum``, the kernel summed over its taps, shape Co×(Ci/g)."""
    return w.sum(axis=(2, 3))


def grad_output_average(dy: np.ndarray, geom: FilterGeometry) -> np.ndarray:
    """Backward step 2: r×r window means of dY that count only valid elements."""
    r = geom.patch
    window = (r, r)
    padded = _pad_or_crop(dy, geom.grad_pad_begin, geom.grad_pad_end)
    counts = _pad_or_crop(np.ones((1, 1) + dy.shape[2:], dy.dtype), geom.grad_pad_begin, geom.grad_pad_end)
    return _window_sum(padded, window) / _window_sum(counts, window)


def conv2d(x: np.ndarray, k: np.ndarray, pad: int, dilation: int, group: int) -> np.ndarray:
    """Stride-1 grouped 2-D convolution (cross-correlation), written tap by tap."""
    n, ci, h, w = x.shape
    co, cig, kh, kw = k.shape
    xp = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    ho = h + 2 * pad - dilation * (kh - 1)
    wo = w + 2 * pad - dilation * (kw - 1)
    out = np.zeros((n, co, ho, wo), dtype=np.float64)
    cog = co // group
    for g in range(group):
        xs = xp[:, g * cig : (g + 1) * cig]
        for i in range(kh):
            for j in range(kw):
                tap = xs[:, :, i * dilation : i * dilation + ho, j * dilation : j * dilation + wo]
                out[:, g * cog : (g + 1) * cog] += np.einsum("nchw,oc->nohw", tap, k[g * cog : (g + 1) * cog, :, i, j])
    return out


def _small_input_grad(dy_avg: np.ndarray, w_sum: np.ndarray, w: np.ndarray, geom: FilterGeometry) -> np.ndarray:
    """Backward steps 3, 4 and 8: dX on the patch grid, block-diagonal over groups."""
    conv = geom.conv
    g, cog, cig = conv.group, conv.out_per_group, conv.in_per_group
    if geom.uses_dilated_kernel:
        # Step 8: a dilated conv of dY_avg with the spatially flipped, per-group transposed kernel.
        blocks = w.reshape(g, cog, cig, *conv.kernel).transpose(0, 2, 1, 3, 4)
        flipped = blocks.reshape(g * cig, cog, *conv.kernel)[:, :, ::-1, ::-1]
        e = geom.reduced_dilation
        return conv2d(dy_avg, flipped, pad=e, dilation=e, group=g)
    n, _, ph, pw = dy_avg.shape
    out = np.empty((n, conv.in_channels, ph, pw), dtype=np.float64)
    for k in range(g):
        block = w_sum[k * cog : (k + 1) * cog]  # cog × cig
        out[:, k * cig : (k + 1) * cig] = np.einsum("oc,nohw->nchw", block, dy_avg[:, k * cog : (k + 1) * cog])
    return out


def _weight_sum_grad(dy_avg: np.ndarray, x_sum: np.ndarray, geom: FilterGeometry) -> np.ndarray:
    """Backward steps 3–4: dW_sum[co, c] = Σ_{n,p} dY_avg[n, co, p] · X_sum[n, group(co)·cig + c, p]."""
    conv = geom.conv
    g, cog, cig = conv.group, conv.out_per_group, conv.in_per_group
    out = np.empty((conv.out_channels, cig), dtype=np.float64)
    for k in range(g):
        out[k * cog : (k + 1) * cog] = np.einsum(
            "nohw,nchw->oc", dy_avg[:, k * cog : (k + 1) * cog], x_sum[:, k * cig : (k + 1) * cig]
        )
    return out


def _upsample_and_crop(dx_small: np.ndarray, geom: FilterGeometry) -> np.ndarray:
    """Backward step 6: nearest upsampling by (qh, qw), then the crop back to H×W."""
    qh, qw = geom.input_patch
    up = np.repeat(np.repeat(dx_small, qh, axis=2), qw, axis=3)
    (bh, bw), (eh, ew) = geom.input_pad_begin, geom.input_pad_end
    # Undo the forward padding: cropping a padded side, zero-filling a side the windows skipped.
    return _pad_or_crop(up, (-bh, -bw), (-eh, -ew))


def filtered_backward(
    dy: np.ndarray,
    x_sum: np.ndarray,
    w_sum: np.ndarray,
    geom: FilterGeometry,
    w: np.ndarray | None = None,
    needs_input_grad: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """The whole backward of docs/operator.md: returns (dX or None, dW, dB) in float64.

    ``w`` (the full kernel) is needed only when the dilated rule of step 8 applies.
    """
    dy = dy.astype(np.float64)
    dy_avg = grad_output_average(dy, geom)
    dw_sum = _weight_sum_grad(dy_avg, x_sum.astype(np.float64), geom)
    kh, kw = geom.conv.kernel
    dw = np.repeat(dw_sum[:, :, None, None], kh, axis=2).repeat(kw, axis=3)
    db = dy.sum(axis=(0, 2, 3))
    dx = None
    if needs_input_grad:
        if geom.uses_dilated_kernel and w is None:
            raise ValueError("the dilated rule (docs/operator.md, backward step 8) needs the full kernel w")
        w64 = None if w is None else w.astype(np.float64)
        dx = _upsample_and_crop(_small_input_grad(dy_avg, w_sum.astype(np.float64), w64, geom), geom)
    return dx, dw, db
