"""Conv and gradient-filter geometry: plain integers, no graph and no tensors.

`ConvShape` describes one 2-D convolution with known spatial sizes. `FilterGeometry`
derives from it, for a patch size r, every size the gradient filter (docs/operator.md) needs
(patch counts, input patch sizes, centered paddings). The NumPy reference, the ONNX
builder, the MAC/byte accounting and `gfc inspect` all read these numbers from here,
so the four can never disagree about a padding.

Only the standard library is imported: the runtime may use this module.
"""

from __future__ import annotations

import dataclasses


def ceil_div(a: int, b: int) -> int:
    """Exact ceiling of a / b for integers, negative numerators included."""
    return -((-a) // b)


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """A 2-D convolution ``Y = Conv(X, W, b)`` with every size known.

    ``pads`` is ONNX order: (top, left, bottom, right).
    """

    batch: int | None  # None: dynamic batch
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    has_bias: bool = True

    def __post_init__(self) -> None:
        if self.in_channels % self.group or self.out_channels % self.group:
            raise ValueError(
                f"group {self.group} does not divide channels {self.in_channels}->{self.out_channels}"
            )

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

    def forward_macs(self, batch: int = 1) -> int:
        """Multiply-accumulates of the forward conv (equal to each of its two exact gradients)."""
        kh, kw = self.kernel
        return batch * self.out_channels * self.out_height * self.out_width * self.in_per_group * kh * kw


def conv_out_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    """Output length of a convolution along one axis (ONNX/torch floor rule)."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


@dataclasses.dataclass(frozen=True)
class FilterGeometry:
    """Every size of the gradient filter (docs/operator.md) for one conv and patch size ``r``.

    Forward side: ``X_sum`` has ``patches`` = (ph, pw) cells, each summing an input
    window of ``input_patch`` = (qh, qw) = (r·sh, r·sw) pixels, windows laid from
    ``-input_pad_begin`` (a negative pad means the windows start inside X).
    Backward side: ``dY`` is averaged over r×r windows laid from ``-grad_pad_begin``.
    """

    conv: ConvShape
    patch: int

    def __post_init__(self) -> None:
        if self.patch < 1:
            raise ValueError(f"patch size must be >= 1, got {self.patch}")

    @property
    def patches(self) -> tuple[int, int]:
        return (ceil_div(self.conv.out_height, self.patch), ceil_div(self.conv.out_width, self.patch))

    @property
    def input_patch(self) -> tuple[int, int]:
        sh, sw = self.conv.strides
        return (self.patch * sh, self.patch * sw)

    @property
    def input_pad_begin(self) -> tuple[int, int]:
        (ph, pw), (qh, qw) = self.patches, self.input_patch
        return (ceil_div(ph * qh - self.conv.height, 2), ceil_div(pw * qw - self.conv.width, 2))

    @property
    def input_pad_end(self) -> tuple[int, int]:
        """The end padding that makes exactly ph (pw) windows; may be negative (a crop)."""
        (ph, pw), (qh, qw), (bh, bw) = self.patches, self.input_patch, self.input_pad_begin
        return (ph * qh - self.conv.height - bh, pw * qw - self.conv.width - bw)

    @property
    def grad_pad_begin(self) -> tuple[int, int]:
        ph, pw = self.patches
        return (ceil_div(ph * self.patch - self.conv.out_height, 2), ceil_div(pw * self.patch - self.conv.out_width, 2))

    @property
    def grad_pad_end(self) -> tuple[int, int]:
        (ph, pw), (bh, bw) = self.patches, self.grad_pad_begin
        return (ph * self.patch - self.conv.out_height - bh, pw * self.patch - self.conv.out_width - bw)

    @property
    def uses_dilated_kernel(self) -> bool:
        """docs/operator.md, backward step 8: a dilation d > 1 with d >= r computes dX_small with the full flipped kernel.

        (d = 1 always uses the reduced 1x1 form, also when r = 1, as the reference does.)
        """
        d = max(self.conv.dilations)
        return self.conv.kernel != (1, 1) and d > 1 and d >= self.patch

    @property
    def reduced_dilation(self) -> int:
        return self.conv.dilations[0] // self.patch

    def unsupported_reason(self) -> str | None:
        """Why this conv must keep its exact backward, or None when the filter applies."""
        conv = self.conv
        if self.patch > max(conv.out_height, conv.out_width):
            return f"patch {self.patch} exceeds the {conv.out_height}x{conv.out_width} output map"
        if self.uses_dilated_kernel:
            if conv.dilations[0] != conv.dilations[1]:
                return f"unequal dilations {conv.dilations} >= patch {self.patch}"
            if conv.kernel != (3, 3):
                # The reference's dilated rule keeps the patch grid's size only for 3x3 kernels.
                return f"dilation {conv.dilations[0]} >= patch {self.patch} with a {conv.kernel} kernel"
        return None

    def backward_macs(self, batch: int = 1, needs_input_grad: bool = True) -> int:
        """Multiply-accumulates of the filtered backward: the reduced dW_sum and dX_small products."""
        conv = self.conv
        ph, pw = self.patches
        reduced = batch * ph * pw * conv.out_channels * conv.in_per_group  # one per (cell, co, ci)
        if not needs_input_grad:
            return reduced
        if self.uses_dilated_kernel:
            return reduced + reduced * conv.kernel[0] * conv.kernel[1]
        return 2 * reduced

    def exact_backward_macs(self, batch: int = 1, needs_input_grad: bool = True) -> int:
        """MACs of the exact conv backward: dW always, dX when the input needs a gradient."""
        forward = self.conv.forward_macs(batch)
        return forward * (2 if needs_input_grad else 1)
