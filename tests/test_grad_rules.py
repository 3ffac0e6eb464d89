"""The gradient rules of the standard-ONNX backend (`gfcompiler.onnx_step.grad_rules`), op by op.

Each case builds a one-node forward model with onnx_ir, runs ONNX shape inference (as
the compiler does), calls the op's rule with a `GradContext`, wires a ``dY`` graph input
per differentiated output into it and the returned gradients to graph outputs, runs the
whole in onnxruntime, and compares with a reference:

* torch autograd of the equivalent torch function, in float64 (the forward outputs are
  compared too, which checks that the twin is one);
* for linear ops without a torch twin (Resize or AveragePool modes torch lacks), the exact
  transpose of onnxruntime's own forward: its Jacobian probed column by column with
  basis inputs, so ``dX = Jᵀ · dY``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from gfcompiler.emit import Emitter
from gfcompiler.errors import UnsupportedModelError
from gfcompiler.onnx_step.grad_rules import RULES
from gfcompiler.onnx_step.rules_api import GradContext

RTOL = 1e-4
_rng = np.random.default_rng(1234)


# ----------------------------------------------------------------------------- input specs


@dataclasses.dataclass
class Data:
    """A graph input; differentiated when float. ``dynamic``: its first axis is symbolic (N, or that
    name), or a tuple of names for its leading axes."""

    array: np.ndarray
    dynamic: bool | str | tuple = False
    grad: bool = True

    def __post_init__(self):
        self.array = np.asarray(self.array)


@dataclasses.dataclass
class Const:
    """An initializer (never differentiated)."""

    array: np.ndarray


def rand(*shape, lo=-1.0, hi=1.0, dynamic=False) -> Data:
    return Data(_rng.uniform(lo, hi, shape).astype(np.float32), dynamic)


def ints_data(*shape, lo=-3, hi=4, dynamic=False) -> Data:
    """Small integers as floats: ties for max-like ops."""
    return Data(_rng.integers(lo, hi, shape).astype(np.float32), dynamic)


def with_values(spec: Data, values) -> Data:
    """``spec`` with its first elements replaced by ``values`` (kinks, bounds)."""
    flat = spec.array.reshape(-1)
    flat[: len(values)] = values
    return spec


def const(values, dtype=np.int64) -> Const:
    return Const(np.asarray(values, dtype=dtype))


# ----------------------------------------------------------------------------- harness


@dataclasses.dataclass
class Case:
    op: str
    inputs: list
    ref: Callable | str | None = None  # torch twin, "jacobian" (linear in input 0), or None (refusal)
    attrs: dict = dataclasses.field(default_factory=dict)
    opset: int = 17
    outputs: int = 1
    no_dy: tuple = ()  # outputs that get no gradient (dys[i] None)


def _graph_input(name: str, spec: Data) -> ir.Value:
    shape = list(spec.array.shape)
    if spec.dynamic:
        names = spec.dynamic if isinstance(spec.dynamic, tuple) else (
            spec.dynamic if isinstance(spec.dynamic, str) else "N",)
        shape[: len(names)] = names
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(spec.array.dtype)), shape=ir.Shape(shape))


@dataclasses.dataclass
class Built:
    model: ir.Model  # forward node + backward, the dY inputs and gradient outputs added
    forward: bytes  # the forward model alone, shape-inferred
    feeds: dict
    forward_names: list
    grad_names: dict  # input index -> graph output name
    dys: list


def build(case: Case) -> Built:
    """The case's one-node forward model with the rule's backward attached."""
    graph_inputs, initializers, node_inputs, needs, feeds = [], [], [], [], {}
    for i, spec in enumerate(case.inputs):
        if spec is None:
            node_inputs.append(None)
            needs.append(False)
        elif isinstance(spec, Const):
            value = ir.Value(name=f"c{i}", const_value=ir.tensor(spec.array, name=f"c{i}"),
                             type=ir.TensorType(ir.DataType.from_numpy(spec.array.dtype)),
                             shape=ir.Shape(spec.array.shape))
            initializers.append(value)
            node_inputs.append(value)
            needs.append(False)
        else:
            value = _graph_input(f"x{i}", spec)
            graph_inputs.append(value)
            node_inputs.append(value)
            feeds[value.name] = spec.array
            needs.append(spec.grad and np.issubdtype(spec.array.dtype, np.floating))
    outputs = [ir.Value(name=f"y{i}") for i in range(case.outputs)]
    node = ir.Node("", case.op, node_inputs, attributes=_attrs(case.attrs), outputs=outputs, name=f"/test/{case.op}")
    graph = ir.Graph(graph_inputs, outputs, nodes=[node], initializers=initializers,
                     opset_imports={"": case.opset}, name="case")
    return attach(ir.to_proto(ir.Model(graph, ir_version=9)), feeds, needs, case.no_dy)


def attach(proto: onnx.ModelProto, feeds: dict, needs: list[bool], no_dy=(), node_name: str | None = None) -> Built:
    """Shape-infer a forward model and wire the rule of its node ``node_name`` (default: the
    first) into it: a dY input per output, an output per returned gradient."""
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    forward_bytes = proto.SerializeToString()
    model = ir.from_proto(proto)
    graph = model.graph
    node = next(n for n in graph if node_name is None or n.name == node_name)
    forward_outputs = [v.name for v in graph.outputs]

    tape = ir.tape.Tape()
    dys = []
    for i, y in enumerate(node.outputs):
        if i in no_dy or not y.dtype.is_floating_point():
            dys.append(None)
            continue
        dy = ir.Value(name=f"dY{i}", type=ir.TensorType(y.dtype), shape=None if y.shape is None else ir.Shape(y.shape))
        graph.inputs.append(dy)
        dys.append(dy)
    ctx = GradContext(node, Emitter(tape, f"{node.name}/grad"), needs)
    grads = RULES[node.op_type](ctx, dys)
    assert len(grads) == len(node.inputs)
    graph.extend(tape.nodes)
    for value in tape.initializers:
        graph.register_initializer(value)
    grad_names = {}
    for i, (grad, need) in enumerate(zip(grads, needs)):
        if not need:
            assert grad is None, f"input {i} needs no gradient but got one"
            continue
        assert grad is not None, f"input {i} needs a gradient"
        out = ir.Value(name=f"grad{i}", type=node.inputs[i].type)
        graph.append(ir.Node("", "Identity", [grad], outputs=[out], name=f"grad_out{i}"))
        graph.outputs.append(out)
        grad_names[i] = out.name
    return Built(model, forward_bytes, feeds, forward_outputs, grad_names, dys)


def _attrs(attrs: dict):
    from onnx_ir import _convenience

    return _convenience.convert_attributes(attrs)


def session(model: ir.Model | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(case: Case):
    """Returns (forward outputs, gradients by input index, dY arrays) from onnxruntime."""
    built = build(case)
    forward = session(built.forward).run(built.forward_names, built.feeds)
    rng = np.random.default_rng(7)
    feeds, dy_arrays = dict(built.feeds), {}
    for i, dy in enumerate(built.dys):
        if dy is not None:
            dy_arrays[i] = rng.uniform(-1, 1, forward[i].shape).astype(forward[i].dtype)
            feeds[dy.name] = dy_arrays[i]
    names = built.forward_names + list(built.grad_names.values())
    values = dict(zip(names, session(built.model).run(names, feeds)))
    return forward, {i: values[n] for i, n in built.grad_names.items()}, dy_arrays


def torch_reference(case: Case, dy_arrays):
    tensors = []
    for spec in case.inputs:
        if spec is None:
            tensors.append(None)
            continue
        array = spec.array
        if np.issubdtype(array.dtype, np.floating):
            t = torch.tensor(array, dtype=torch.float64)
            t.requires_grad_(isinstance(spec, Data) and spec.grad)
        else:
            t = torch.tensor(array)
        tensors.append(t)
    outputs = case.ref(*tensors)
    if not isinstance(outputs, tuple):
        outputs = (outputs,)
    loss = sum((out * torch.tensor(dy_arrays[i], dtype=torch.float64)).sum() for i, out in enumerate(outputs)
               if i in dy_arrays)
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    by_index, k = {}, 0
    for i, t in enumerate(tensors):
        if t is not None and t.requires_grad:
            g = grads[k]
            by_index[i] = np.zeros(t.shape) if g is None else g.numpy()
            k += 1
    return [o.detach().numpy() for o in outputs], by_index


def jacobian_reference(case: Case, dy_arrays):
    """dX = Jᵀ·dY with J probed from onnxruntime's forward on basis inputs (input 0 only)."""
    built = build(case)
    forward = session(built.forward)
    x = built.feeds["x0"]
    columns = []
    for k in range(x.size):
        basis = np.zeros(x.size, dtype=x.dtype)
        basis[k] = 1.0
        probe = dict(built.feeds, x0=basis.reshape(x.shape))
        columns.append(forward.run(built.forward_names[:1], probe)[0].reshape(-1).astype(np.float64))
    jacobian = np.stack(columns, axis=1)
    return None, {0: (jacobian.T @ dy_arrays[0].reshape(-1).astype(np.float64)).reshape(x.shape)}


def check(case: Case):
    forward, grads, dy_arrays = run(case)
    if case.ref == "jacobian":
        ref_forward, ref_grads = jacobian_reference(case, dy_arrays)
    else:
        ref_forward, ref_grads = torch_reference(case, dy_arrays)
    if ref_forward is not None:
        for got, want in zip(forward, ref_forward):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5 * max(1.0, np.abs(want).max(initial=0)),
                                       err_msg="forward differs from the reference: not a twin")
    assert set(grads) == set(ref_grads), (sorted(grads), sorted(ref_grads))
    for i, want in ref_grads.items():
        got = grads[i]
        assert got.shape == want.shape, (i, got.shape, want.shape)
        scale = max(1.0, np.abs(want).max(initial=0))
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5 * scale, err_msg=f"gradient of input {i}")


# ----------------------------------------------------------------------------- cases

CASES: dict[str, Case] = {}


def case(name: str, op: str, inputs: list, ref, **kwargs) -> None:
    assert name not in CASES, name
    CASES[name] = Case(op, inputs, ref, **kwargs)


# elementwise, broadcasting
case("Add-same", "Add", [rand(2, 3), rand(2, 3)], torch.add)
case("Add-bcast", "Add", [rand(2, 1, 4), rand(3, 1)], torch.add)
case("Add-bias-dynamic", "Add", [rand(3, 4, 2, 2, dynamic=True), rand(4, 1, 1)], torch.add)
case("Add-const", "Add", [rand(3, 4), Const(np.float32([1.0, 2, 3, 4]))], torch.add)
case("Sub-bcast", "Sub", [rand(4,), rand(3, 4)], torch.sub)
case("Sub-dynamic-both", "Sub", [rand(3, 4, dynamic=True), rand(1, 4, dynamic="M")], torch.sub)
case("Mul-bcast", "Mul", [rand(2, 3, 1), rand(1, 4)], torch.mul)
case("Mul-scalar", "Mul", [rand(2, 3), rand()], torch.mul)
case("Div-bcast", "Div", [rand(2, 3, 4), rand(3, 1, lo=0.5, hi=2.0)], torch.div)
case("Div-dynamic", "Div", [rand(3, 2, dynamic=True), rand(2, lo=0.5, hi=2.0)], torch.div)
case("Neg", "Neg", [rand(2, 3)], torch.neg)
case("Identity", "Identity", [rand(2, 3)], lambda x: x)
case("Abs", "Abs", [with_values(rand(2, 3), [0.0])], torch.abs)
case("Reciprocal", "Reciprocal", [rand(2, 3, lo=0.5, hi=2)], torch.reciprocal)
case("Sqrt", "Sqrt", [rand(2, 3, lo=0.1, hi=2)], torch.sqrt)
case("Pow-2", "Pow", [rand(2, 3), Const(np.float32(2.0))], lambda a, p: a ** 2)
case("Pow-3-int", "Pow", [rand(2, 3), const(3)], lambda a, p: a ** 3)
case("Pow-half", "Pow", [rand(2, 3, lo=0.1, hi=2), Const(np.float32(0.5))], lambda a, p: a ** 0.5)
case("Pow-tensor", "Pow", [rand(2, 3, lo=0.5, hi=2), rand(3, lo=-1, hi=2)], torch.pow)
case("Sum-3", "Sum", [rand(2, 3), rand(3), rand(2, 1)], lambda a, b, c: a + b + c)
case("Mean-2", "Mean", [rand(2, 3), rand(1, 3)], lambda a, b: (a + b) / 2)
case("Max-ties", "Max", [ints_data(3, 4), ints_data(4)], torch.maximum)
case("Min-bcast", "Min", [rand(3, 4), rand(3, 1)], torch.minimum)
case("Max-3", "Max", [rand(3, 4), rand(4), rand(3, 1)], lambda a, b, c: torch.maximum(torch.maximum(a, b), c))
case("Where", "Where", [Const(_rng.random((3, 4)) > 0.5), rand(3, 4), rand(4)], torch.where)

# activations (kinks and bounds placed on purpose)
case("Relu", "Relu", [with_values(rand(2, 3, 4), [0.0, -0.0])], torch.relu)
case("Relu-dynamic", "Relu", [rand(3, 4, dynamic=True)], torch.relu)
case("LeakyRelu", "LeakyRelu", [with_values(rand(2, 5), [0.0])], lambda x: F.leaky_relu(x, 0.1),
     attrs={"alpha": 0.1})
case("PRelu", "PRelu", [with_values(rand(2, 3, 2, 2), [0.0]), rand(3, 1, 1)], lambda x, s: torch.where(x > 0, x, s * x))
case("Sigmoid", "Sigmoid", [rand(2, 5, lo=-4, hi=4)], torch.sigmoid)
case("Tanh", "Tanh", [rand(2, 5, lo=-3, hi=3)], torch.tanh)
case("Clip-minmax", "Clip", [with_values(rand(3, 6, lo=-2, hi=8), [0.0, 6.0]), Const(np.float32(0)),
                             Const(np.float32(6))], lambda x, lo, hi: torch.nn.functional.hardtanh(x, float(lo), float(hi)))
case("Clip-min-only", "Clip", [with_values(rand(3, 4), [0.0]), Const(np.float32(0))],
     lambda x, lo: torch.where(x > lo, x, lo))
case("Clip-max-only", "Clip", [rand(3, 4), None, Const(np.float32(0.25))], lambda x, lo, hi: torch.clamp(x, max=hi))
case("Clip-none", "Clip", [rand(3, 4)], lambda x: x)
case("Clip-trainable-bounds", "Clip", [rand(3, 4, lo=-2, hi=2), Data(np.float32(-0.5)), Data(np.float32(0.75))],
     lambda x, lo, hi: torch.clamp(x, lo, hi))
case("HardSigmoid-default", "HardSigmoid", [rand(3, 8, lo=-4, hi=4)], lambda x: torch.clamp(0.2 * x + 0.5, 0, 1))
case("HardSigmoid-torch", "HardSigmoid", [with_values(rand(3, 8, lo=-5, hi=5), [-3.0, 3.0, 0.0])], F.hardsigmoid,
     attrs={"alpha": 1 / 6, "beta": 0.5})
case("HardSwish", "HardSwish", [with_values(rand(3, 8, lo=-5, hi=5), [-3.0, 3.0, 0.0, -2.0, 2.5])], F.hardswish)
case("Elu", "Elu", [with_values(rand(3, 5, lo=-3, hi=3), [0.0])], F.elu)
case("Elu-alpha", "Elu", [with_values(rand(3, 5, lo=-3, hi=3), [0.0])], lambda x: F.elu(x, 0.5),
     attrs={"alpha": 0.5})
case("Selu", "Selu", [with_values(rand(3, 5, lo=-3, hi=3), [0.0])], F.selu)
case("Softplus", "Softplus", [with_values(rand(3, 5, lo=-5, hi=5), [0.0])], F.softplus)
case("Mish", "Mish", [with_values(rand(3, 5, lo=-4, hi=4), [0.0])], F.mish, opset=18)
case("Celu", "Celu", [with_values(rand(3, 5, lo=-3, hi=3), [0.0])], lambda x: F.celu(x, 0.7), attrs={"alpha": 0.7})
case("Softsign", "Softsign", [rand(3, 5, lo=-3, hi=3)], F.softsign)
case("Exp", "Exp", [rand(3, 4)], torch.exp)
case("Log", "Log", [rand(3, 4, lo=0.2, hi=3)], torch.log)
case("Erf", "Erf", [rand(3, 4, lo=-2, hi=2)], torch.erf)
case("Gelu", "Gelu", [rand(3, 4, lo=-3, hi=3)], F.gelu, opset=20)
case("Gelu-tanh", "Gelu", [rand(3, 4, lo=-3, hi=3)], lambda x: F.gelu(x, approximate="tanh"), opset=20,
     attrs={"approximate": "tanh"})
case("Softmax", "Softmax", [rand(2, 3, 4, lo=-2, hi=2)], lambda x: torch.softmax(x, 1), attrs={"axis": 1})
case("Softmax-last-dynamic", "Softmax", [rand(3, 5, lo=-2, hi=2, dynamic=True)], lambda x: torch.softmax(x, -1))
case("LogSoftmax", "LogSoftmax", [rand(2, 3, 4, lo=-2, hi=2)], lambda x: torch.log_softmax(x, 1), attrs={"axis": 1})
case("LogSoftmax-last", "LogSoftmax", [rand(3, 5, lo=-2, hi=2)], lambda x: torch.log_softmax(x, -1))

# shape ops
case("Reshape", "Reshape", [rand(2, 3, 4), const([4, 6])], lambda x, s: x.reshape(4, 6))
case("Reshape-dynamic", "Reshape", [rand(2, 3, 4, dynamic=True), const([-1, 12])], lambda x, s: x.reshape(-1, 12))
case("Reshape-two-unknown", "Reshape", [rand(2, 3, 4, dynamic=("N", "T")), const([-1, 4])],
     lambda x, s: x.reshape(-1, 4))
case("Flatten", "Flatten", [rand(2, 3, 2, 2, dynamic=True)], lambda x: x.flatten(1), attrs={"axis": 1})
case("Squeeze", "Squeeze", [rand(2, 3, 1, 1, dynamic=True), const([2, 3])], lambda x, a: x.squeeze(3).squeeze(2))
case("Unsqueeze", "Unsqueeze", [rand(2, 3), const([0, 3])], lambda x, a: x[None, :, :, None])
case("Transpose", "Transpose", [rand(2, 3, 4)], lambda x: x.permute(1, 2, 0), attrs={"perm": [1, 2, 0]})
case("Transpose-default", "Transpose", [rand(2, 3, 4)], lambda x: x.permute(2, 1, 0))
case("Concat", "Concat", [rand(2, 3, 2), Const(np.ones((2, 1, 2), np.float32)), rand(2, 4, 2)],
     lambda a, b, c: torch.cat([a, b, c], 1), attrs={"axis": 1})
case("Concat-dynamic", "Concat", [rand(2, 3, dynamic=True), rand(2, 3, dynamic=True)],
     lambda a, b: torch.cat([a, b], 0), attrs={"axis": 0})
case("Split-sizes", "Split", [rand(2, 7, 3), const([2, 5])], lambda x, s: tuple(torch.split(x, [2, 5], 1)),
     attrs={"axis": 1}, outputs=2)
case("Split-missing-dy", "Split", [rand(2, 6, 3, dynamic=True)], lambda x: tuple(torch.split(x, 2, 1)),
     attrs={"axis": 1, "num_outputs": 3}, opset=18, outputs=3, no_dy=(1,))
case("Slice-step1", "Slice", [rand(4, 6, 5), const([1, 2]), const([3, 100]), const([0, 2])],
     lambda x, *_: x[1:3, :, 2:])
case("Slice-negative", "Slice", [rand(4, 6, 5), const([-3]), const([-1]), const([-2])], lambda x, *_: x[:, -3:-1])
case("Slice-step2", "Slice", [rand(4, 7, 5), const([1, 0]), const([7, 5]), const([1, 2]), const([2, 3])],
     lambda x, *_: x[:, 1:7:2, 0:5:3])
case("Slice-reverse", "Slice", [rand(3, 6), const([-1]), const([-(2**63) + 1]), const([1]), const([-1])],
     lambda x, *_: x.flip(1))
case("Slice-step-minus2", "Slice", [rand(3, 2, 7, 2), const([5]), const([0]), const([2]), const([-2])],
     lambda x, *_: x[:, :, [5, 3, 1]])
case("Slice-dynamic", "Slice", [rand(2, 3, 6, 6, dynamic=True), const([1, 0]), const([5, -1]), const([2, 3])],
     lambda x, *_: x[:, :, 1:5, 0:-1])
case("Slice-batch-tail", "Slice", [rand(4, 3, dynamic=True), const([1]), const([2**63 - 1]), const([0])],
     lambda x, *_: x[1:])
case("Gather-dup", "Gather", [rand(3, 5, 2), const([4, 0, -1, 2])], lambda x, i: x[:, [4, 0, 4, 2]],
     attrs={"axis": 1})
case("Gather-scalar", "Gather", [rand(3, 5, dynamic=True), const(2)], lambda x, i: x[:, 2], attrs={"axis": 1})
case("Gather-two-unknown", "Gather", [rand(2, 3, 5, dynamic=("N", "T")), const([1, 1, 3])],
     lambda x, i: x[:, :, [1, 1, 3]], attrs={"axis": 2})
case("Gather-2d-index", "Gather", [rand(5, 3), const([[0, 1], [1, 4]])], lambda x, i: x[i], attrs={"axis": 0})
case("Expand", "Expand", [rand(3, 1), const([2, 3, 4])], lambda x, s: x.expand(2, 3, 4))
case("Pad", "Pad", [rand(2, 3, 4), const([0, 1, 2, 0, 0, 1])], lambda x, p: F.pad(x, (2, 1, 1, 0)))
case("Pad-crop", "Pad", [rand(2, 5, 4, dynamic=True), const([0, -1, 2, 0, 1, -1])],
     lambda x, p: F.pad(x, (2, -1, -1, 1)))
case("Pad-axes", "Pad", [rand(2, 3, 4), const([1, 2]), None, const([-1])], lambda x, *_: F.pad(x, (1, 2)),
     opset=18)
case("Tile", "Tile", [rand(2, 3, dynamic=True), const([1, 3])], lambda x, r: x.repeat(1, 3))
case("Tile-2d", "Tile", [rand(2, 3), const([2, 2])], lambda x, r: x.repeat(2, 2))

# reductions
case("ReduceSum-keep", "ReduceSum", [rand(2, 3, 4), const([1])], lambda x, a: x.sum(1, keepdim=True))
case("ReduceSum-drop-dynamic", "ReduceSum", [rand(2, 3, 4, dynamic=True), const([-1, 1])],
     lambda x, a: x.sum((1, 2)), attrs={"keepdims": 0})
case("ReduceSum-all", "ReduceSum", [rand(2, 3)], lambda x: x.sum().reshape(1, 1))
case("ReduceSum-noop", "ReduceSum", [rand(2, 3), const([], np.int64)], lambda x, a: x,
     attrs={"noop_with_empty_axes": 1})
case("ReduceMean-attr", "ReduceMean", [rand(2, 3, 4, 4)], lambda x: x.mean((2, 3)),
     attrs={"axes": [2, 3], "keepdims": 0}, opset=13)
case("ReduceMean-input", "ReduceMean", [rand(2, 3, 4, dynamic=True), const([0])], lambda x, a: x.mean(0, keepdim=True),
     opset=18)
case("ReduceMax-ties", "ReduceMax", [ints_data(2, 3, 4, lo=0, hi=3)], lambda x: x.amax((1, 2)),
     attrs={"axes": [1, -1], "keepdims": 0}, opset=13)
case("ReduceMax-input-dynamic", "ReduceMax", [rand(2, 3, 4, dynamic=True), const([1])],
     lambda x, a: x.amax(1, keepdim=True), opset=18)
case("ReduceMin-all", "ReduceMin", [ints_data(3, 4)], lambda x: x.amin().reshape(1, 1))
case("ReduceL2", "ReduceL2", [with_values(rand(3, 4), [0.0] * 4)], lambda x: torch.linalg.vector_norm(x, dim=1),
     attrs={"axes": [1], "keepdims": 0})
case("ReduceSumSquare", "ReduceSumSquare", [rand(2, 3, 4)], lambda x: (x * x).sum(2, keepdim=True),
     attrs={"axes": [2]})

# pooling
for opset in (17, 13):
    case(f"MaxPool-k3s2p1-{opset}", "MaxPool", [ints_data(2, 3, 7, 7)], lambda x: F.max_pool2d(x, 3, 2, 1),
         attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, opset=opset)
    case(f"MaxPool-k2s2-{opset}", "MaxPool", [ints_data(2, 3, 6, 6)], lambda x: F.max_pool2d(x, 2, 2),
         attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, opset=opset)
    case(f"MaxPool-ceil-{opset}", "MaxPool", [ints_data(1, 2, 6, 7, dynamic=True)],
         lambda x: F.max_pool2d(x, 3, 2, 0, ceil_mode=True),
         attrs={"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, opset=opset)
    case(f"MaxPool-dilated-{opset}", "MaxPool", [rand(1, 2, 7, 7)], lambda x: F.max_pool2d(x, 2, 1, 1, dilation=2),
         attrs={"kernel_shape": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 2]}, opset=opset)
case("MaxPool-rect-pad", "MaxPool", [ints_data(2, 2, 5, 8)], lambda x: F.max_pool2d(x, (3, 2), (1, 2), (1, 0)),
     attrs={"kernel_shape": [3, 2], "strides": [1, 2], "pads": [1, 0, 1, 0]})
case("MaxPool-with-indices", "MaxPool", [rand(2, 3, 6, 6)], lambda x: F.max_pool2d(x, 3, 1),
     attrs={"kernel_shape": [3, 3]}, outputs=2, no_dy=(1,))
for opset in (17, 13):
    case(f"MaxPool-unknown-channels-{opset}", "MaxPool", [ints_data(2, 3, 7, 7, dynamic=("N", "C"))],
         lambda x: F.max_pool2d(x, 3, 2, 1), attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
         opset=opset)
    case(f"MaxPool-same-upper-{opset}", "MaxPool", [ints_data(2, 2, 6, 7)],
         lambda x: F.max_pool2d(F.pad(x, (1, 1, 0, 1), value=float("-inf")), 3, 2),
         attrs={"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, opset=opset)
    case(f"MaxPool-same-lower-{opset}", "MaxPool", [ints_data(2, 2, 6, 7)],
         lambda x: F.max_pool2d(F.pad(x, (1, 1, 1, 0), value=float("-inf")), 3, 2),
         attrs={"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}, opset=opset)
case("MaxPool-1d", "MaxPool", [ints_data(2, 3, 9)], lambda x: F.max_pool1d(x, 3, 2, 1),
     attrs={"kernel_shape": [3], "strides": [2], "pads": [1, 1]})
for cip in (0, 1):
    case(f"AveragePool-k3s1p1-cip{cip}", "AveragePool", [rand(2, 3, 5, 5)],
         lambda x, c=cip: F.avg_pool2d(x, 3, 1, 1, count_include_pad=bool(c)),
         attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": cip})
    # onnxruntime divides an overhanging ceil_mode window by the whole kernel, torch by its clipped size
    case(f"AveragePool-ceil-cip{cip}", "AveragePool", [rand(2, 2, 6, 7, dynamic=True)],
         lambda x, c=cip: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=bool(c)) if not c else
         F.avg_pool2d(F.pad(x, (1, 2, 1, 2)), 3, 2, 0),
         attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1,
                "count_include_pad": cip})
case("AveragePool-k2s2", "AveragePool", [rand(2, 3, 6, 4)], lambda x: F.avg_pool2d(x, 2, 2),
     attrs={"kernel_shape": [2, 2], "strides": [2, 2]})
case("AveragePool-same-upper", "AveragePool", [rand(1, 1, 5, 6)], "jacobian",
     attrs={"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"})
case("AveragePool-same-lower", "AveragePool", [rand(1, 1, 6, 5)], "jacobian",
     attrs={"kernel_shape": [2, 3], "strides": [2, 1], "auto_pad": "SAME_LOWER", "count_include_pad": 1})
case("AveragePool-asym-pads", "AveragePool", [rand(1, 1, 6, 5)], "jacobian",
     attrs={"kernel_shape": [3, 3], "strides": [2, 1], "pads": [0, 1, 2, 0]})
case("GlobalAveragePool", "GlobalAveragePool", [rand(2, 3, 4, 5)], lambda x: x.mean((2, 3), keepdim=True))
case("GlobalAveragePool-dynamic", "GlobalAveragePool", [rand(2, 3, 4, 5, dynamic=True)],
     lambda x: x.mean((2, 3), keepdim=True))
case("GlobalMaxPool-ties", "GlobalMaxPool", [ints_data(2, 3, 3, 4, lo=0, hi=3, dynamic=True)],
     lambda x: F.adaptive_max_pool2d(x, 1))

# linear
for ta in (0, 1):
    for tb in (0, 1):
        case(f"Gemm-tA{ta}-tB{tb}", "Gemm", [rand(*((4, 3) if ta else (3, 4))), rand(*((5, 4) if tb else (4, 5))),
                                            rand(5)],
             lambda a, b, c, ta=ta, tb=tb: 0.5 * (a.T if ta else a) @ (b.T if tb else b) + 2.0 * c,
             attrs={"transA": ta, "transB": tb, "alpha": 0.5, "beta": 2.0})
case("Gemm-dynamic-noC", "Gemm", [rand(3, 4, dynamic=True), rand(5, 4)], lambda a, b: a @ b.T, attrs={"transB": 1})
case("Gemm-C-matrix", "Gemm", [rand(3, 4), rand(4, 5), rand(3, 1)], lambda a, b, c: a @ b + c)
case("MatMul-2d", "MatMul", [rand(3, 4), rand(4, 5)], torch.matmul)
case("MatMul-batched-bcast", "MatMul", [rand(2, 1, 3, 4), rand(5, 4, 2)], torch.matmul)
case("MatMul-weight-dynamic", "MatMul", [rand(2, 3, 4, dynamic=True), rand(4, 5)], torch.matmul)
case("MatMul-batched-unknown", "MatMul", [rand(2, 3, 4, dynamic=("N", "T")), rand(2, 4, 5, dynamic="N")],
     torch.matmul)
case("MatMul-vec-left", "MatMul", [rand(4), rand(2, 4, 3)], torch.matmul)
case("MatMul-vec-right", "MatMul", [rand(2, 3, 4), rand(4)], torch.matmul)
case("MatMul-vec-vec", "MatMul", [rand(4), rand(4)], torch.matmul)

# Resize
_no_roi = Const(np.zeros(0, np.float32))
case("Resize-nearest-x2-scales", "Resize", [rand(2, 3, 3, 4), _no_roi, Const(np.float32([1, 1, 2, 2]))],
     lambda x, r, s: F.interpolate(x, scale_factor=2, mode="nearest"),
     attrs={"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"})
case("Resize-nearest-x2-sizes-axes-dynamic", "Resize", [rand(2, 3, 3, 4, dynamic=True), None, None, const([6, 8])],
     lambda x, *_: F.interpolate(x, size=(6, 8), mode="nearest"), opset=18,
     attrs={"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor", "axes": [2, 3]})
case("Resize-nearest-x2-sizes", "Resize", [rand(2, 3, 3, 4), None, None, const([2, 3, 6, 8])],
     lambda x, *_: F.interpolate(x, size=(6, 8), mode="nearest"),
     attrs={"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"})
case("Resize-nearest-x2-batch-channel-unknown", "Resize", [rand(2, 3, 3, 4, dynamic=("N", "C")), _no_roi,
                                                          Const(np.float32([1, 1, 2, 2]))],
     lambda x, r, s: F.interpolate(x, scale_factor=2, mode="nearest"),
     attrs={"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"})
case("Resize-nearest-x3x2-halfpixel", "Resize", [rand(1, 2, 3, 4), _no_roi, Const(np.float32([1, 1, 3, 2]))],
     lambda x, r, s: F.interpolate(x, scale_factor=(3, 2), mode="nearest"),
     attrs={"mode": "nearest"})  # half_pixel + round_prefer_floor maps o -> o // s too
case("Resize-nearest-exact-down", "Resize", [rand(1, 2, 7, 9), None, None, const([1, 2, 3, 4])],
     lambda x, *_: F.interpolate(x, size=(3, 4), mode="nearest-exact"),
     attrs={"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_ceil"})
case("Resize-nearest-odd-scale", "Resize", [rand(1, 1, 4, 5), _no_roi, Const(np.float32([1, 1, 1.7, 0.6]))],
     "jacobian", attrs={"mode": "nearest"})
case("Resize-nearest-asym-third", "Resize", [rand(1, 1, 3, 6), None, None, const([1, 1, 7, 2])], "jacobian",
     attrs={"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "round_prefer_floor"})
for ac in (True, False):
    mode = "align_corners" if ac else "pytorch_half_pixel"
    case(f"Resize-bilinear-up-{mode}", "Resize", [rand(2, 2, 4, 5), None, None, const([2, 2, 7, 9])],
         lambda x, *_, ac=ac: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=ac),
         attrs={"mode": "linear", "coordinate_transformation_mode": mode})
    case(f"Resize-bilinear-down-{mode}", "Resize", [rand(2, 2, 8, 8, dynamic=True), _no_roi,
                                                    Const(np.float32([1, 1, 0.625, 0.375]))],
         lambda x, *_, ac=ac: F.interpolate(x, scale_factor=(0.625, 0.375), mode="bilinear", align_corners=ac),
         attrs={"mode": "linear", "coordinate_transformation_mode": mode})
case("Resize-bilinear-x2-scales-halfpixel", "Resize", [rand(1, 3, 4, 4), _no_roi, Const(np.float32([1, 1, 2, 2]))],
     lambda x, r, s: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
     attrs={"mode": "linear"})
case("Resize-linear-asymmetric", "Resize", [rand(1, 1, 5, 4), None, None, const([1, 1, 3, 7])], "jacobian",
     attrs={"mode": "linear", "coordinate_transformation_mode": "asymmetric"})
case("Resize-linear-symmetric-axes", "Resize", [rand(1, 1, 5, 4), _no_roi, Const(np.float32([0.6, 1.5]))],
     "jacobian", attrs={"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric", "axes": [2, 3]},
     opset=19)

# normalization, casts
_channels = 3
case("BatchNormalization-frozen", "BatchNormalization",
     [rand(2, _channels, 3, 3, dynamic=True), Const(_rng.uniform(0.5, 2, _channels).astype(np.float32)),
      Const(_rng.uniform(-1, 1, _channels).astype(np.float32)),
      Const(_rng.uniform(-1, 1, _channels).astype(np.float32)),
      Const(_rng.uniform(0.5, 2, _channels).astype(np.float32))],
     lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, training=False, eps=1e-3), attrs={"epsilon": 1e-3})
case("BatchNormalization-affine", "BatchNormalization",
     [rand(2, _channels, 3, 3), rand(_channels, lo=0.5, hi=2), rand(_channels),
      Const(_rng.uniform(-1, 1, _channels).astype(np.float32)),
      Const(_rng.uniform(0.5, 2, _channels).astype(np.float32))],
     lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, training=False))
case("BatchNormalization-2d", "BatchNormalization",
     [rand(4, _channels), Const(_rng.uniform(0.5, 2, _channels).astype(np.float32)),
      Const(np.zeros(_channels, np.float32)), Const(np.zeros(_channels, np.float32)),
      Data(_rng.uniform(0.5, 2, _channels).astype(np.float32), grad=False)],
     lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, training=False))
case("LayerNormalization", "LayerNormalization", [rand(2, 3, 4, dynamic=True), rand(4, lo=0.5, hi=2), rand(4)],
     lambda x, w, b: F.layer_norm(x, (4,), w, b, 1e-3), attrs={"epsilon": 1e-3})
# (no bias: an explicit empty third input crashes onnxruntime 1.19's LayerNormalization)
case("LayerNormalization-2axes-stats", "LayerNormalization", [rand(2, 3, 4, 5), rand(4, 5)],
     lambda x, w: (F.layer_norm(x, (4, 5), w), x.mean((2, 3), keepdim=True),
                      1 / torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + 1e-5)),
     attrs={"axis": 2}, outputs=3, no_dy=(1, 2))
case("LayerNormalization-frozen-scale", "LayerNormalization", [rand(3, 6), Const(_rng.uniform(0.5, 2, 6)
                                                                                 .astype(np.float32))],
     lambda x, w: F.layer_norm(x, (6,), w))
case("InstanceNormalization", "InstanceNormalization", [rand(2, 3, 4, 5, dynamic=True), rand(3, lo=0.5, hi=2),
                                                        rand(3)],
     lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=1e-4), attrs={"epsilon": 1e-4})
case("Cast-double", "Cast", [rand(2, 3)], lambda x: x, attrs={"to": onnx.TensorProto.DOUBLE})
case("CastLike", "CastLike", [rand(2, 3), Const(np.zeros(1, np.float64))], lambda x, t: x)
case("Cast-same", "Cast", [rand(2, 3)], lambda x: x, attrs={"to": onnx.TensorProto.FLOAT})
case("Dropout", "Dropout", [rand(2, 3), Const(np.float32(0.3))], lambda x, r: x, opset=13)
case("Dropout-eval-flag", "Dropout", [rand(2, 3), None, Const(np.bool_(False))], lambda x, *_: x)


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_reference(name):
    check(CASES[name])


def test_every_rule_has_a_case():
    assert set(RULES) <= {c.op for c in CASES.values()}


# ----------------------------------------------------------------------------- contract


def test_all_none_dys_give_all_none():
    node = ir.Node("", "Mul", [ir.Value(name="a"), ir.Value(name="b")], num_outputs=1, name="/m")
    tape = ir.tape.Tape()
    assert RULES["Mul"](GradContext(node, Emitter(tape, "/m/grad"), [True, True]), [None]) == [None, None]
    assert not tape.nodes


def test_unneeded_inputs_get_none_and_no_nodes():
    tape = ir.tape.Tape()
    a = ir.Value(name="a", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    b = ir.Value(name="b", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3]))
    node = ir.Node("", "Mul", [a, b], num_outputs=1, name="/m")
    node.outputs[0].shape = ir.Shape([2, 3])
    dy = ir.Value(name="dy")
    grads = RULES["Mul"](GradContext(node, Emitter(tape, "/m/grad"), [True, False]), [dy])
    assert grads[1] is None and grads[0] is not None
    assert all(n.op_type == "Mul" for n in tape.nodes) and len(tape.nodes) == 1
    assert tape.nodes[0].name.startswith("/m/grad/")


@pytest.mark.parametrize("opset", [13, 17])
def test_resize_sizes_from_shape_arithmetic(opset):
    """torch's legacy export of F.interpolate(size=...): sizes = Concat(Shape(X)[0:2], Cast(HW)); onnx
    shape inference leaves the output unknown, the rule folds the sizes."""
    from onnx import TensorProto, helper

    x = rand(2, 3, 4, 5).array
    nodes = [
        helper.make_node("Shape", ["x0"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "two", "zero"], ["batch_channels"]),
        helper.make_node("Cast", ["hw"], ["hw_int"], to=TensorProto.INT64),
        helper.make_node("Concat", ["batch_channels", "hw_int"], ["sizes"], axis=0),
        helper.make_node("Resize", ["x0", "", "", "sizes"], ["y"], name="/up/Resize", mode="linear",
                         coordinate_transformation_mode="pytorch_half_pixel"),
    ]
    initializers = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
                    helper.make_tensor("two", TensorProto.INT64, [1], [2]),
                    helper.make_tensor("hw", TensorProto.FLOAT, [2], [7, 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    built = attach(proto, {"x0": x}, [True, False, False, False], node_name="/up/Resize")
    dy = np.random.default_rng(3).uniform(-1, 1, (2, 3, 7, 3)).astype(np.float32)
    grad = session(built.model).run(["grad0"], {"x0": x, "dY0": dy})[0]
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (F.interpolate(xt, size=(7, 3), mode="bilinear") * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=RTOL, atol=1e-5)


def test_resize_scales_from_constant_value_floats():
    """torch's dynamo exporter: scales from a Constant node with a value_floats attribute."""
    from onnx import TensorProto, helper

    x = rand(2, 3, 3, 4).array
    nodes = [
        helper.make_node("Constant", [], ["scales"], value_floats=[1.0, 1.0, 2.0, 2.0]),
        helper.make_node("Resize", ["x0", "", "scales"], ["y"], name="/up/Resize", mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", 3, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    built = attach(proto, {"x0": x}, [True, False, False], node_name="/up/Resize")
    dy = np.random.default_rng(4).uniform(-1, 1, (2, 3, 6, 8)).astype(np.float32)
    grad = session(built.model).run(["grad0"], {"x0": x, "dY0": dy})[0]
    np.testing.assert_allclose(grad, dy.reshape(2, 3, 3, 2, 4, 2).sum((3, 5)), rtol=RTOL, atol=1e-6)


# ----------------------------------------------------------------------------- refusals


REFUSED = {
    "Resize-cubic": (Case("Resize", [rand(1, 1, 3, 3), _no_roi, Const(np.float32([1, 1, 2, 2]))], None,
                          attrs={"mode": "cubic"}), "Resize mode cubic"),
    "Resize-crop": (Case("Resize", [rand(1, 1, 3, 3), Const(np.float32([0, 0, 0, 0, 1, 1, 1, 1])),
                                    Const(np.float32([1, 1, 2, 2]))], None,
                         attrs={"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}),
                    "tf_crop_and_resize"),
    "Pad-reflect": (Case("Pad", [rand(1, 2, 4), const([0, 0, 1, 0, 0, 1])], None, attrs={"mode": "reflect"}),
                    "Pad mode reflect"),
    "BN-training": (Case("BatchNormalization", [rand(2, 2, 2), Const(np.ones(2, np.float32)),
                                                Const(np.zeros(2, np.float32)), Const(np.zeros(2, np.float32)),
                                                Const(np.ones(2, np.float32))], None,
                         attrs={"training_mode": 1}, outputs=3, no_dy=(1, 2)), "training mode"),
    "Slice-runtime-starts": (Case("Slice", [rand(4, 3), Data(np.int64([1])), const([3])], None), "non-constant"),
    "Dropout-training": (Case("Dropout", [rand(2, 3), None, Const(np.bool_(True))], None), "training mode"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_one_line_naming_op_and_node(name):
    case_, fragment = REFUSED[name]
    with pytest.raises(UnsupportedModelError) as info:
        build(case_)
    message = str(info.value)
    assert fragment in message and f"(node /test/{case_.op})" in message and "\n" not in message
