"""The standard-ONNX optimizer step (`gfcompiler.onnx_step.optimizers`) equals torch.optim.

A small model holds only the update: parameters, gradients, state, lr and step in;
updated parameters and state out. It runs for a few steps in a plain onnxruntime
InferenceSession, each step's outputs fed back, and must track torch.optim.AdamW /
SGD stepping the same tensors with the same gradients and learning rates.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from gfcompiler.artifacts import OptimizerSpec
from gfcompiler.errors import UnsupportedModelError
from gfcompiler.onnx_step.emit import Emitter
from gfcompiler.onnx_step.optimizers import build_update, state_slots

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 32)}
# float32-exact learning rates (the ONNX input is float32, torch's lr a Python float), with changes between steps.
LRS = [float(np.float32(x)) for x in (1e-2, 1e-2, 3e-3, 3e-3, 5e-2, 1e-3)]

SPECS = [
    OptimizerSpec(name="adamw"),  # weight decay 0.01 (decoupled)
    OptimizerSpec(name="adamw", weight_decay=0.0),
    OptimizerSpec(name="sgd", momentum=0.0),
    OptimizerSpec(name="sgd", momentum=0.0, weight_decay=5e-4),
    OptimizerSpec(name="sgd", momentum=0.9),
    OptimizerSpec(name="sgd", momentum=0.9, weight_decay=5e-4),
]


def _float_input(name: str, shape) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))


def _step_model(spec: OptimizerSpec, prefix: str = ""):
    """The update as a model; returns (proto, state slots, the values build_update was given)."""
    slots = state_slots(spec, list(SHAPES))
    params = {name: _float_input(name, shape) for name, shape in SHAPES.items()}
    grads = {name: _float_input(f"{name}.grad", shape) for name, shape in SHAPES.items()}
    state = {slot.name: _float_input(slot.name, SHAPES[slot.param]) for slot in slots}
    lr, step = _float_input("lr", ()), _float_input("step", ())
    tape = ir.tape.Tape()
    new_params, new_state = build_update(Emitter(tape, prefix), spec, params, grads, state, lr, step)
    assert set(new_params) == set(SHAPES) and set(new_state) == {slot.name for slot in slots}
    outputs = []
    for name, value in [*new_params.items(), *new_state.items()]:
        assert value not in (*params.values(), *state.values())  # fresh values
        assert value.type is not None and tuple(value.shape) == SHAPES[name.split(".exp")[0].split(".momentum")[0]]
        value.name = f"{name}.updated"
        outputs.append(value)
    inputs = [*params.values(), *grads.values(), *state.values(), lr, step]
    graph = ir.Graph(inputs, outputs, nodes=tape.nodes, initializers=tape.initializers,
                     opset_imports={"": 17}, name="optimizer_step")
    return ir.to_proto(ir.Model(graph, ir_version=8)), slots, (params, grads, state)


def _torch_optimizer(spec: OptimizerSpec, tensors, lr):
    if spec.name == "adamw":
        return torch.optim.AdamW(tensors, lr=lr, weight_decay=spec.effective_weight_decay)
    return torch.optim.SGD(tensors, lr=lr, momentum=spec.momentum, weight_decay=spec.effective_weight_decay)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-m{s.momentum}-wd{s.effective_weight_decay}")
def test_steps_match_torch_optim(spec):
    model, slots, _ = _step_model(spec)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    values = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    state = {slot.name: np.zeros(SHAPES[slot.param], np.float32) for slot in slots}

    tensors = {name: torch.nn.Parameter(torch.from_numpy(value.copy())) for name, value in values.items()}
    optimizer = _torch_optimizer(spec, list(tensors.values()), LRS[0])

    initial = dict(values)
    output_names = [o.name for o in session.get_outputs()]
    for t, lr in enumerate(LRS, start=1):
        # gradient scales from 1e-8 (where AdamW's eps matters) to 10
        grads = {name: (rng.standard_normal(shape) * 10.0 ** rng.uniform(-8, 1)).astype(np.float32)
                 for name, shape in SHAPES.items()}
        feeds = {**values, **{f"{n}.grad": g for n, g in grads.items()}, **state,
                 "lr": np.array(lr, np.float32), "step": np.array(t, np.float32)}
        results = dict(zip(output_names, session.run(None, feeds)))
        values = {name: results[f"{name}.updated"] for name in SHAPES}
        state = {slot.name: results[f"{slot.name}.updated"] for slot in slots}

        for group in optimizer.param_groups:
            group["lr"] = lr
        for name, tensor in tensors.items():
            tensor.grad = torch.from_numpy(grads[name].copy())
        optimizer.step()

        for name, tensor in tensors.items():
            expected = tensor.detach().numpy()
            _assert_close(values[name], expected, f"{name} step {t}")
        for slot in slots:
            expected = optimizer.state[tensors[slot.param]][slot.kind].numpy()
            _assert_close(state[slot.name], expected, f"{slot.name} step {t}")
        # torch keeps exactly these states (and AdamW a step count)
        kinds = {kind for kind in optimizer.state[tensors["conv.bias"]] if kind != "step"}
        assert kinds == {slot.kind for slot in slots if slot.param == "conv.bias"}
    for name in SHAPES:
        assert not np.array_equal(values[name], initial[name])  # every parameter moves, biases too


def _assert_close(actual, expected, what: str) -> None:
    """float32 agreement: torch's CPU kernels fuse some multiply-adds (lerp, addcmul, add with alpha: FMA)
    and its sqrt is not always correctly rounded, so single elements differ by an ulp of the terms; where
    the terms cancel (exp_avg near 0) that ulp is large relative to the result, hence the tensor-scaled atol."""
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()), err_msg=what)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-m{s.momentum}-wd{s.effective_weight_decay}")
def test_state_slots_are_exactly_what_the_update_reads(spec):
    model, slots, (params, grads, state) = _step_model(spec)
    assert [slot.name for slot in slots] == [f"{slot.param}.{slot.kind}" for slot in slots]
    assert len({slot.name for slot in slots}) == len(slots)
    expected_kinds = {"adamw": ["exp_avg", "exp_avg_sq"], "sgd": ["momentum_buffer"] if spec.momentum else []}[spec.name]
    for param in SHAPES:
        assert [slot.kind for slot in slots if slot.param == param] == expected_kinds
    for value in [*params.values(), *grads.values(), *state.values()]:
        assert value.uses(), f"{value.name} is not read"
    # A missing slot fails at build time.
    for slot in slots:
        with pytest.raises(KeyError):
            _build_without(spec, slot.name)


def _build_without(spec: OptimizerSpec, slot_name: str) -> None:
    slots = state_slots(spec, list(SHAPES))
    params = {name: _float_input(name, shape) for name, shape in SHAPES.items()}
    grads = {name: _float_input(f"{name}.grad", shape) for name, shape in SHAPES.items()}
    state = {s.name: _float_input(s.name, SHAPES[s.param]) for s in slots if s.name != slot_name}
    build_update(Emitter(ir.tape.Tape(), ""), spec, params, grads, state, _float_input("lr", ()), _float_input("step", ()))


def test_names_and_phase():
    """Per-parameter ops are named after their parameter and tagged as optimizer nodes; scalars are shared."""
    model, _, _ = _step_model(OptimizerSpec(name="adamw"), prefix="optimizer")
    nodes = list(model.graph.node)
    per_param = {name: [n for n in nodes if n.name.startswith(f"optimizer/{name}/adamw/")] for name in SHAPES}
    assert all(len(group) == 14 for group in per_param.values())
    shared = [n for n in nodes if not any(n in group for group in per_param.values())]
    assert all(n.name.startswith("optimizer/adamw/") for n in shared)
    assert all({(p.key, p.value) for p in n.metadata_props} >= {("gfc.phase", "optimizer")} for n in nodes)
    assert {n.op_type for group in per_param.values() for n in group} <= {"Mul", "Add", "Sub", "Div", "Sqrt"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-m{s.momentum}-wd{s.effective_weight_decay}")
def test_scalars_have_the_parameter_rank(spec):
    """Every operand of a per-parameter op has the parameter's rank (scalars as [1]*rank): onnxruntime's CPU
    broadcast of a [] or [1] operand against a tensor with trailing unit dims ([1280, 320, 1, 1]) is ~50x slower."""
    model, _, _ = _step_model(spec, prefix="optimizer")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    ranks.update({t.name: len(t.dims) for t in inferred.graph.initializer})
    checked = 0
    for name, shape in SHAPES.items():
        nodes = [n for n in inferred.graph.node if n.name.startswith(f"optimizer/{name}/{spec.name}/")]
        assert nodes
        for node in nodes:
            assert [ranks[i] for i in node.input] == [len(shape)] * len(node.input), (node.name, list(node.input))
            checked += 1
    assert {len(shape) for shape in SHAPES.values()} == {1, 2, 4} and checked


def test_rejects_unknown_optimizers():
    with pytest.raises(UnsupportedModelError):
        state_slots(OptimizerSpec(name="lion"), ["w"])
    with pytest.raises(UnsupportedModelError):
        state_slots(OptimizerSpec(name="sgd", momentum=1.0), ["w"])


def test_sgd_first_step_ignores_the_momentum_buffer():
    """torch.optim.SGD's first step sets buf = g (a clone), whatever the fed buffer holds (if finite)."""
    spec = OptimizerSpec(name="sgd", momentum=0.9, weight_decay=5e-4)
    model, slots, _ = _step_model(spec)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    values = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    grads = {f"{name}.grad": rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    stale = {slot.name: rng.standard_normal(SHAPES[slot.param]).astype(np.float32) for slot in slots}
    lr = LRS[0]
    for t in (1, 2):
        feeds = {**values, **grads, **stale, "lr": np.array(lr, np.float32), "step": np.array(t, np.float32)}
        results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        for name in SHAPES:
            g = grads[f"{name}.grad"] + np.float32(5e-4) * values[name]
            buf = g if t == 1 else np.float32(0.9) * stale[f"{name}.momentum_buffer"] + g
            _assert_close(results[f"{name}.momentum_buffer.updated"], buf, f"{name} buffer step {t}")
            _assert_close(results[f"{name}.updated"], values[name] - np.float32(lr) * buf, f"{name} step {t}")
