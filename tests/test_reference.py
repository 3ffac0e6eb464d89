"""Trust in the yardstick: the NumPy reference checked without the ONNX builder.

* (a) where the filter is exact (1x1 conv, stride 1, r = 1) it equals the true conv
  gradients, from torch autograd in float64;
* (b), (c) the two pooling steps on inputs whose answer is known by counting;
* (d) for ungrouped convs, dX and dW equal an independent float64 torch implementation
  written from docs/operator.md's text (avg_pool2d with divisor_override=1 / count_include_pad=False,
  1x1 transposed conv, broadcast, nearest upsampling, crop), on every configuration
  whose paddings torch's avg_pool2d accepts;
* (e) a grouped conv is not a depthwise one (docs/operator.md, backward step 4).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gfcompiler import reference
from gfcompiler.geometry import ConvShape, FilterGeometry

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


def _exact_conv_grads(conv: ConvShape, x, w, dy):
    """dX, dW, dB of Y = conv2d(X, W, b) for upstream gradient dY, by torch autograd in float64."""
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    tb = torch.zeros(conv.out_channels, dtype=torch.float64, requires_grad=True)
    top, left, bottom, right = conv.pads
    y = F.conv2d(F.pad(tx, (left, right, top, bottom)), tw, tb, conv.strides, 0, conv.dilations, conv.group)
    assert tuple(y.shape[2:]) == (conv.out_height, conv.out_width)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


def _filtered(geom: FilterGeometry, x, w, dy):
    x_sum, w_sum = reference.input_sum(x, geom), reference.weight_sum(w)
    return reference.filtered_backward(dy, x_sum, w_sum, geom, w)


# ---------------------------------------------------------------------------- (a)


@pytest.mark.parametrize(
    "batch, ci, co, h, w, group",
    [(1, 1, 1, 1, 1, 1), (2, 3, 5, 7, 9, 1), (3, 4, 4, 6, 5, 4), (2, 4, 6, 5, 8, 2), (1, 16, 8, 11, 13, 1)],
)
def test_pointwise_stride1_patch1_is_exact(batch, ci, co, h, w, group):
    """1x1 conv, stride 1, r = 1: X_sum = X, W_sum = W, dY_avg = dY, so nothing is filtered."""
    conv = ConvShape(batch, ci, co, h, w, (1, 1), group=group)
    geom = FilterGeometry(conv, 1)
    x, wt, dy = _random((batch, ci, h, w), 1), _random(conv.weight_shape, 2), _random((batch, co, h, w), 3)
    dx, dw, db = _filtered(geom, x, wt, dy)
    ex_dx, ex_dw, ex_db = _exact_conv_grads(conv, x, wt, dy)
    np.testing.assert_allclose(dx, ex_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, ex_dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, ex_db, rtol=1e-12, atol=1e-12)


def test_bias_grad_is_exact_for_any_patch():
    """docs/operator.md step 7: dB is the exact bias gradient whatever r and the geometry."""
    conv = ConvShape(2, 3, 4, 13, 11, (3, 5), (2, 1), (1, 2, 0, 1), (1, 2))
    x, w, dy = _random((2, 3, 13, 11), 4), _random(conv.weight_shape, 5), _random((2, 4, conv.out_height, conv.out_width), 6)
    exact_db = _exact_conv_grads(conv, x, w, dy)[2]
    for r in (1, 2, 3, 5):
        geom = FilterGeometry(conv, r)
        if geom.unsupported_reason() is None:
            np.testing.assert_allclose(_filtered(geom, x, w, dy)[2], exact_db, rtol=1e-12)


# ---------------------------------------------------------------------------- (b), (c)

GEOMETRIES = [
    FilterGeometry(ConvShape(1, 1, 1, h, w, kernel, strides, pads), r)
    for h, w, kernel, strides, pads, r in [
        (7, 9, (3, 3), (1, 1), (1, 1, 1, 1), 2),
        (20, 21, (7, 7), (1, 1), (0, 0, 0, 0), 4),  # negative centered padding
        (3, 4, (3, 3), (1, 1), (3, 3, 3, 3), 2),  # padding wider than a window
        (15, 14, (1, 1), (2, 3), (0, 0, 0, 0), 3),
        (5, 7, (3, 3), (1, 1), (1, 1, 1, 1), 4),
        (19, 10, (3, 5), (3, 1), (0, 2, 3, 1), 3),
        (11, 13, (5, 3), (2, 2), (2, 0, 1, 2), 7),
        (6, 6, (1, 1), (1, 1), (0, 0, 0, 0), 1),
    ]
]


def _covered(start: int, size: int, length: int) -> int:
    """How many of the indices start … start+size-1 lie in 0 … length-1."""
    return max(0, min(start + size, length) - max(start, 0))


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
def test_input_sum_of_ones_counts_valid_pixels(geom):
    conv = geom.conv
    (ph, pw), (qh, qw), (bh, bw) = geom.patches, geom.input_patch, geom.input_pad_begin
    counts = reference.input_sum(np.ones((1, 1, conv.height, conv.width)), geom)[0, 0]
    assert counts.shape == (ph, pw)
    for i, j in itertools.product(range(ph), range(pw)):
        expected = _covered(i * qh - bh, qh, conv.height) * _covered(j * qw - bw, qw, conv.width)
        assert counts[i, j] == expected, (i, j)
    # Every pixel of X lies in at most one window; those inside the window grid are counted once.
    assert counts.sum() == _covered(-bh, ph * qh, conv.height) * _covered(-bw, pw * qw, conv.width)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
def test_average_of_constant_grad_is_that_constant(geom):
    conv = geom.conv
    dy = np.full((2, 3, conv.out_height, conv.out_width), -2.5)
    dy_avg = reference.grad_output_average(dy, geom)
    assert dy_avg.shape == (2, 3, *geom.patches)
    np.testing.assert_allclose(dy_avg, -2.5, rtol=1e-15)


# ---------------------------------------------------------------------------- (d)


def _spec_in_torch(geom: FilterGeometry, x, w, dy):
    """docs/operator.md's forward and backward sides, step by step, in float64 torch (ungrouped, no step 8).

    Returns None when a padding is outside what ``avg_pool2d`` accepts (negative, or
    more than half its kernel).
    """
    conv = geom.conv
    r = geom.patch
    (ph, pw), (qh, qw) = geom.patches, geom.input_patch
    pad_h, pad_w = geom.input_pad_begin
    gpad_h, gpad_w = geom.grad_pad_begin
    if not (0 <= pad_h <= qh // 2 and 0 <= pad_w <= qw // 2 and gpad_h <= r // 2 and gpad_w <= r // 2):
        return None
    tx, tw, tdy = (torch.tensor(a, dtype=torch.float64) for a in (x, w, dy))
    # Forward 4: windows laid from -pad with stride q; the first ph x pw of them (zero padding).
    x_sum = F.avg_pool2d(tx, (qh, qw), (qh, qw), (pad_h, pad_w), divisor_override=1)[:, :, :ph, :pw]
    # Forward 5.
    w_sum = tw.sum(dim=(2, 3))
    # Backward 2: averages of valid elements only.
    dy_avg = F.avg_pool2d(tdy, r, r, (gpad_h, gpad_w), count_include_pad=False)[:, :, :ph, :pw]
    assert x_sum.shape[2:] == dy_avg.shape[2:] == (ph, pw)
    # Backward 3: a 1x1 transposed conv, and dW_sum summed over batch and patches.
    dx_small = F.conv_transpose2d(dy_avg, w_sum[:, :, None, None])
    dw_sum = torch.einsum("nohw,nchw->oc", dy_avg, x_sum)
    # Backward 5: broadcast over the kernel taps.
    dw = dw_sum[:, :, None, None].expand(-1, -1, *conv.kernel)
    # Backward 6: nearest upsampling by (qh, qw), rows pad_h … pad_h+H-1, columns likewise.
    up = F.interpolate(dx_small, scale_factor=(qh, qw), mode="nearest")
    dx = up[:, :, pad_h : pad_h + conv.height, pad_w : pad_w + conv.width]
    assert dx.shape == tx.shape
    # Backward 7.
    db = tdy.sum(dim=(0, 2, 3))
    return dx.numpy(), dw.numpy(), db.numpy()


SPEC_CONFIGS = [
    # (H, W, kernel, strides, pads, dilations, r)
    (8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    (9, 11, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    (9, 11, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4),
    (13, 10, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 3),
    (15, 14, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 2),
    (17, 12, (3, 3), (2, 1), (1, 1, 1, 1), (1, 1), 4),
    (16, 16, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 4),  # dilation below r: steps 3-6 unchanged
    (12, 14, (3, 1), (1, 2), (1, 0, 1, 0), (1, 1), 7),
    (30, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4),
    (11, 9, (1, 3), (3, 1), (0, 1, 0, 1), (1, 1), 2),
]


@pytest.mark.parametrize("h, w, kernel, strides, pads, dilations, r", SPEC_CONFIGS)
def test_reference_follows_spec_text(h, w, kernel, strides, pads, dilations, r):
    conv = ConvShape(2, 3, 5, h, w, kernel, strides, pads, dilations)
    geom = FilterGeometry(conv, r)
    assert geom.unsupported_reason() is None and not geom.uses_dilated_kernel
    x, wt = _random((2, 3, h, w), 7), _random(conv.weight_shape, 8)
    dy = _random((2, 5, conv.out_height, conv.out_width), 9)
    spec = _spec_in_torch(geom, x, wt, dy)
    assert spec is not None, "configuration outside avg_pool2d's padding limits"
    for name, got, want in zip(("dX", "dW", "dB"), _filtered(geom, x, wt, dy), spec):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=name)


def test_spec_configs_are_not_trivial():
    """The torch comparison above must include partial windows and non-zero paddings."""
    geoms = [FilterGeometry(ConvShape(2, 3, 5, *c[:-1]), c[-1]) for c in SPEC_CONFIGS]
    assert any(g.conv.out_height % g.patch for g in geoms)
    assert any(max(g.input_pad_begin) > 0 for g in geoms)
    assert any(max(g.grad_pad_begin) > 0 for g in geoms)


# ---------------------------------------------------------------------------- (e)


def _depthwise_reading(geom: FilterGeometry, x, w, dy):
    """The paper code's treatment of any grouped conv: channel c pairs with channel c only."""
    x_sum = reference.input_sum(x, geom)
    dy_avg = reference.grad_output_average(dy, geom)
    per_channel_w = w.sum(axis=(1, 2, 3))  # one number per channel, as for a depthwise kernel
    dx_small = per_channel_w[None, :, None, None] * dy_avg
    dw_sum = (x_sum * dy_avg).sum(axis=(0, 2, 3))
    return dx_small, np.broadcast_to(dw_sum[:, None, None, None], w.shape)


def test_grouped_conv_is_not_depthwise():
    conv = ConvShape(2, 4, 4, 8, 8, (3, 3), pads=(1, 1, 1, 1), group=2)
    geom = FilterGeometry(conv, 2)
    x, w, dy = _random((2, 4, 8, 8), 10), _random(conv.weight_shape, 11), _random((2, 4, 8, 8), 12)
    x_sum, w_sum = reference.input_sum(x, geom), reference.weight_sum(w)
    dy_avg = reference.grad_output_average(dy, geom)
    dx, dw, _ = reference.filtered_backward(dy, x_sum, w_sum, geom, w)

    # Block-diagonal (docs/operator.md step 4), by torch: a grouped 1x1 transposed conv and per-group products.
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    dx_small = F.conv_transpose2d(t(dy_avg), t(w_sum)[:, :, None, None], groups=2).numpy()
    np.testing.assert_allclose(dx[:, :, ::2, ::2], dx_small, rtol=1e-12)
    blocks = [np.einsum("nohw,nchw->oc", dy_avg[:, 2 * k : 2 * k + 2], x_sum[:, 2 * k : 2 * k + 2]) for k in range(2)]
    np.testing.assert_allclose(dw[:, :, 0, 0], np.concatenate(blocks), rtol=1e-12)

    # ... and far from the depthwise reading of the same conv.
    dw_dx_small, dw_dw = _depthwise_reading(geom, x, w, dy)
    assert np.abs(dx[:, :, ::2, ::2] - dw_dx_small).max() > 0.1 * np.abs(dx_small).max()
    assert np.abs(dw - dw_dw).max() > 0.1 * np.abs(dw).max()


def test_depthwise_reading_is_right_for_depthwise():
    """The same depthwise formulas agree with the reference when the conv is depthwise."""
    conv = ConvShape(2, 4, 4, 8, 8, (3, 3), pads=(1, 1, 1, 1), group=4)
    geom = FilterGeometry(conv, 2)
    x, w, dy = _random((2, 4, 8, 8), 13), _random(conv.weight_shape, 14), _random((2, 4, 8, 8), 15)
    dx, dw, _ = _filtered(geom, x, w, dy)
    dx_small, dw_depthwise = _depthwise_reading(geom, x, w, dy)
    np.testing.assert_allclose(dx[:, :, ::2, ::2], dx_small, rtol=1e-12)
    np.testing.assert_allclose(dw, dw_depthwise, rtol=1e-12)
