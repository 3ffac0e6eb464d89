"""The standard-ONNX optimizer step (`gfcompiler.onnx_step.optimizers`) equals torch.optim.

A small model holds only the update: parameters, gradients, state, lr and step in;
updated parameters and state out. It runs for a few steps in a plain onnxruntime
InferenceSession, each step's outputs fed back, and must track torch.optim.AdamW /
SGD stepping the same tensors with the same gradients and learning rates.

The guarded update (``ok`` from `build_guard`, for in-place execution) must equal the
plain one bit for bit where ``ok`` is true, and be the exact identity where it is
false, whatever the gradients hold (NaN, Inf).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from gfcompiler.artifacts import OptimizerSpec
from gfcompiler.emit import Emitter
from gfcompiler.errors import UnsupportedModelError
from gfcompiler.onnx_step.optimizers import ADAM_BETAS, build_guard, build_update, state_slots

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


def _step_model(spec: OptimizerSpec, prefix: str = "", guarded: bool = False):
    """The update as a model; returns (proto, state slots, the values build_update was given).

    ``guarded``: the update takes ``ok`` (a bool scalar input of the model)."""
    slots = state_slots(spec, list(SHAPES))
    params = {name: _float_input(name, shape) for name, shape in SHAPES.items()}
    grads = {name: _float_input(f"{name}.grad", shape) for name, shape in SHAPES.items()}
    state = {slot.name: _float_input(slot.name, SHAPES[slot.param]) for slot in slots}
    lr, step = _float_input("lr", ()), _float_input("step", ())
    ok = ir.Value(name="ok", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([])) if guarded else None
    tape = ir.tape.Tape()
    new_params, new_state = build_update(Emitter(tape, prefix), spec, params, grads, state, lr, step, ok=ok)
    assert set(new_params) == set(SHAPES) and set(new_state) == {slot.name for slot in slots}
    outputs = []
    for name, value in [*new_params.items(), *new_state.items()]:
        assert value not in (*params.values(), *state.values())  # fresh values
        assert value.type is not None and tuple(value.shape) == SHAPES[name.split(".exp")[0].split(".momentum")[0]]
        value.name = f"{name}.updated"
        outputs.append(value)
    inputs = [*params.values(), *grads.values(), *state.values(), lr, step, *([ok] if guarded else [])]
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
            _assert_close(_as_torch_state(slot.kind, state[slot.name]), expected, f"{slot.name} step {t}")
        # torch keeps exactly these states (and AdamW a step count)
        kinds = {kind for kind in optimizer.state[tensors["conv.bias"]] if kind != "step"}
        assert kinds == {slot.kind for slot in slots if slot.param == "conv.bias"}
    for name in SHAPES:
        assert not np.array_equal(values[name], initial[name])  # every parameter moves, biases too


def _as_torch_state(kind: str, value: np.ndarray) -> np.ndarray:
    """torch's state from ours: AdamW keeps its moments pre-scaled, exp_avg/(1 − β1) and exp_avg_sq/(1 − β2)."""
    scale = {"exp_avg": 1 - ADAM_BETAS[0], "exp_avg_sq": 1 - ADAM_BETAS[1]}.get(kind, 1.0)
    return value.astype(np.float64) * scale


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
    assert all(len(group) == 11 for group in per_param.values())
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


# ---------------------------------------------------------------------------- the guard (in-place updates)


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-m{s.momentum}-wd{s.effective_weight_decay}")
def test_guarded_update_is_the_plain_one_or_the_identity(spec):
    """ok true: bit-identical to the unguarded update (steps 1 to 4, state fed back); ok false: every output is
    bit-identical to its input, with NaN, +-Inf or ordinary gradients, on step 1 (SGD's buf = g) as on later ones."""
    plain = ort.InferenceSession(_step_model(spec)[0].SerializeToString(), providers=["CPUExecutionProvider"])
    model, slots, _ = _step_model(spec, guarded=True)
    guarded = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in guarded.get_outputs()]
    assert names == [o.name for o in plain.get_outputs()]
    rng = np.random.default_rng(2)
    values = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    state = {slot.name: np.zeros(SHAPES[slot.param], np.float32) for slot in slots}
    for t, lr in enumerate(LRS[:4], start=1):
        grads = {f"{n}.grad": (rng.standard_normal(shape) * 10.0 ** rng.uniform(-8, 1)).astype(np.float32)
                 for n, shape in SHAPES.items()}
        feeds = {**values, **grads, **state, "lr": np.array(lr, np.float32), "step": np.array(t, np.float32)}
        expected = plain.run(None, feeds)
        for name, actual, wanted in zip(names, guarded.run(None, {**feeds, "ok": np.array(True)}), expected):
            np.testing.assert_array_equal(_bits(actual), _bits(wanted), err_msg=f"{name} step {t}")
        # ok false: the identity, also for non-finite gradients and a state that is not zero.
        poisoned = {name: g.copy() for name, g in grads.items()}
        for g in poisoned.values():
            g.reshape(-1)[:3] = [np.nan, np.inf, -np.inf]
        for bad in (grads, poisoned):
            results = dict(zip(names, guarded.run(None, {**feeds, **bad, "ok": np.array(False)})))
            for name in [*SHAPES, *state]:
                np.testing.assert_array_equal(_bits(results[f"{name}.updated"]), _bits(feeds[name]),
                                              err_msg=f"{name} step {t}, ok false")
        outputs = dict(zip(names, expected))
        values = {name: outputs[f"{name}.updated"] for name in SHAPES}
        state = {slot.name: outputs[f"{slot.name}.updated"] for slot in slots}
    assert not any(np.array_equal(state[s.name], 0 * state[s.name]) for s in slots)  # the identity was tested on it


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-m{s.momentum}-wd{s.effective_weight_decay}")
def test_every_state_write_waits_for_ok(spec):
    """The node writing each updated tensor has ``ok`` among its ancestors (the in-place barrier)."""
    model, _, _ = _step_model(spec, guarded=True)
    producers = {out: node for node in model.graph.node for out in node.output}

    def ancestors(name: str) -> set[str]:
        """The values ``name`` is computed from."""
        seen, pending = set(), [name]
        while pending:
            node = producers.get(pending.pop())
            for value in node.input if node is not None else ():
                if value not in seen:
                    seen.add(value)
                    pending.append(value)
        return seen

    for output in model.graph.output:
        assert "ok" in ancestors(output.name), output.name


def test_guard_is_true_iff_the_loss_is_finite_and_reads_every_gradient():
    grads = {name: _float_input(f"{name}.grad", shape) for name, shape in SHAPES.items()}
    loss = _float_input("loss", ())
    tape = ir.tape.Tape()
    ok = build_guard(Emitter(tape, "step"), loss, grads)
    assert ok.dtype == ir.DataType.BOOL and tuple(ok.shape) == ()
    ok.name = "ok"
    graph = ir.Graph([loss, *grads.values()], [ok], nodes=tape.nodes, initializers=tape.initializers,
                     opset_imports={"": 17}, name="guard")
    proto = ir.to_proto(ir.Model(graph, ir_version=8))
    assert {n.name.split("/")[1] for n in proto.graph.node} == {"guard"}
    # each gradient is read (through one sliced element), so ok comes after all of them
    read = {i for n in proto.graph.node for i in n.input}
    assert all(f"{name}.grad" in read for name in SHAPES)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for fill in (0.5, np.nan, np.inf, -np.inf):
        feeds = {f"{name}.grad": np.full(shape, fill, np.float32) for name, shape in SHAPES.items()}
        for value, expected in ((1.25, True), (0.0, True), (-3e38, True), (np.nan, False), (np.inf, False),
                                (-np.inf, False)):
            result = session.run(None, {**feeds, "loss": np.array(value, np.float32)})[0]
            assert result.dtype == np.bool_ and result.shape == () and bool(result) is expected, (fill, value)
