"""Torch-side yardsticks for whole-model gradient tests (tests only; torch is no runtime dependency).

* `FilteredConv2d` swaps an ``nn.Conv2d`` for one whose backward is the NumPy
  reference of docs/operator.md (`gfcompiler.reference`), so torch autograd chains filtered
  layers exactly as the compiled graph should.
* `fused` folds BatchNorm into convs (torch.fx), giving the same parameters the
  compiler's BN folding produces.
* `ort_gradients` runs one forward/backward of compiled artifacts and returns the
  gradients onnxruntime computed, keyed by parameter name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from stages import module_inputs
from torch.fx.experimental.optimization import fuse

from gfcompiler import ort_training, reference
from gfcompiler.geometry import ConvShape, FilterGeometry


def geometry_of(conv: torch.nn.Conv2d, x: torch.Tensor, patch: int) -> FilterGeometry:
    ph, pw = conv.padding if isinstance(conv.padding, tuple) else (conv.padding, conv.padding)
    shape = ConvShape(
        batch=x.shape[0], in_channels=conv.in_channels, out_channels=conv.out_channels,
        height=x.shape[2], width=x.shape[3], kernel=tuple(conv.kernel_size), strides=tuple(conv.stride),
        pads=(ph, pw, ph, pw), dilations=tuple(conv.dilation), group=conv.groups, has_bias=conv.bias is not None,
    )
    return FilterGeometry(shape, patch)


class _FilteredConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv, patch):
        geom = geometry_of(conv, x, patch)
        x_np, w_np = x.detach().numpy(), weight.detach().numpy()
        ctx.saved = (reference.input_sum(x_np, geom), reference.weight_sum(w_np), w_np, geom, bias is not None)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, dy):
        x_sum, w_sum, w, geom, has_bias = ctx.saved
        dx, dw, db = reference.filtered_backward(
            dy.numpy(), x_sum, w_sum, geom, w=w, needs_input_grad=ctx.needs_input_grad[0]
        )
        def as_tensor(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dy.dtype)

        return as_tensor(dx), as_tensor(dw), as_tensor(db) if has_bias else None, None, None


class FilteredConv2d(torch.nn.Module):
    """An nn.Conv2d (same parameters) whose backward is the reference gradient filter."""

    def __init__(self, conv: torch.nn.Conv2d, patch: int) -> None:
        super().__init__()
        self.conv, self.patch = conv, patch

    def forward(self, x):
        return _FilteredConvFunction.apply(x, self.conv.weight, self.conv.bias, self.conv, self.patch)


def fused(model: torch.nn.Module) -> torch.fx.GraphModule:
    """BN folded into convs (eval mode), as the compiler's FoldBatchNormIntoConvPass does."""
    return fuse(model.eval())


def conv_modules_in_order(module: torch.fx.GraphModule) -> list[str]:
    """Qualified names of Conv2d modules in forward (fx graph) order."""
    modules = dict(module.named_modules())
    return [n.target for n in module.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], torch.nn.Conv2d)]


def with_filtered_convs(module: torch.fx.GraphModule, names: list[str], patch: int) -> torch.fx.GraphModule:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, FilteredConv2d(getattr(parent, child), patch))
    module.recompile()
    return module


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BN layers non-trivial statistics so folding is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


def ort_gradients(directory, x: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(loss, gradients, initial parameter values) from one training-graph run of compiled artifacts."""
    api = ort_training.api()
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"), device="cpu")
    module.train()
    module.lazy_reset_grad()
    loss, _logits = module(*module_inputs(directory, module, x, labels))  # the training model outputs (loss, logits)
    names = [name for name, _ in state.parameters]
    grads = {name: np.array(state.parameters[name].grad) for name in names}
    values = {name: np.array(state.parameters[name].data) for name in names}
    return float(loss), grads, values


def torch_gradients(model: torch.nn.Module, x: np.ndarray, labels: np.ndarray) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
    """(loss, [(parameter value, gradient)]) from torch autograd, cross-entropy mean."""
    for p in model.parameters():
        p.requires_grad_(True)  # fixtures may hand out frozen modules
        p.grad = None
    loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels))
    loss.backward()
    return float(loss.detach()), [(p.detach().numpy(), p.grad.numpy()) for p in model.parameters() if p.grad is not None]


def match_by_value(ort_values: dict[str, np.ndarray], torch_pairs) -> dict[str, np.ndarray]:
    """Map each ORT parameter name to the torch gradient of the parameter with identical values."""
    matched = {}
    for name, value in ort_values.items():
        hits = [grad for data, grad in torch_pairs if data.shape == value.shape and np.allclose(data, value, rtol=1e-5, atol=1e-6)]
        assert len(hits) == 1, f"parameter {name}: {len(hits)} torch parameters with equal values"
        matched[name] = hits[0]
    return matched


def assert_gradients_close(grads: dict[str, np.ndarray], expected: dict[str, np.ndarray], tolerance: float,
                           floor: float = 1e-12) -> None:
    """Every gradient within ``tolerance`` of the expected one, relative to the expected one's largest entry."""
    for name, grad in grads.items():
        scale = np.abs(expected[name]).max() + floor
        error = np.abs(grad - expected[name]).max() / scale
        assert error < tolerance, f"{name}: relative gradient error {error:.2e}"
