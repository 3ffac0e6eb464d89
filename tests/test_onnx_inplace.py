"""In-place state updates of ``--backend onnx`` step models (gfcompiler.runtime.onnx_engine).

The engine binds each ``<name>.updated`` output to the OrtValue bound as input
``<name>``, so onnxruntime overwrites the old parameters and optimizer slots. That is
only correct because the step graph makes every state write wait for every gradient
(a parameter read by a backward node, e.g. an exact conv backward's
``dX = ConvTranspose(dY, W)``, would otherwise be read after its update) and turns
the update into the identity when the loss is not finite
(gfcompiler.onnx_step.optimizers). Here:

* training in place and functionally (fresh output buffers) gives bit-identical losses
  and state over several steps, for models whose trained convs run the exact backward
  (their dX reads W) and the gradient filter, AdamW and SGD;
* the same step model with the barrier removed is flagged by
  `step_model.in_place_hazards`, and (where onnxruntime's order exposes it) trains
  differently in place: the comparison above would catch a missing barrier;
* a batch with a NaN (or an overflowing one: an infinite loss) leaves every state
  tensor bit-identical and the step count unchanged, and training then continues
  exactly as if that batch had never come.

The models are written with ``onnx.helper`` (no torch: CI runs this in the
plain-onnxruntime venv too); where torch is installed, SmallNet of
tests/test_whole_model.py joins them.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes import common as common_passes

from gfcompiler.artifacts import OptimizerSpec
from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.errors import ArtifactError
from gfcompiler.manifest import STEP_FILES as FILES
from gfcompiler.onnx_step import step_model
from gfcompiler.runtime import Trainer
from gfcompiler.runtime.onnx_engine import IN_PLACE_KEY, IN_PLACE_VALUE
from gfcompiler.runtime.trainer import NonFiniteLoss

BATCH, CLASSES = 8, 10
ADAMW, SGD = OptimizerSpec(name="adamw"), OptimizerSpec(name="sgd", momentum=0.9, weight_decay=5e-4)


def small_cnn(path) -> tuple[int, ...]:
    """SmallNet's shape in onnx.helper: stride 2, depthwise + residual, grouped dilated, 1x1, no-bias conv, Gemm head."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        fan_in = int(np.prod(shape[1:])) or 1
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w_stem", "b_stem"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w_down", "b_down"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="down"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w_dw", "b_dw"], ["c2"], pads=[1, 1, 1, 1], group=24, name="depthwise"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Add", ["r2", "r1"], ["res"]),
        helper.make_node("Conv", ["res", "w_grouped"], ["c3"], pads=[2, 2, 2, 2], dilations=[2, 2], group=4,
                         name="grouped"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w_pw", "b_pw"], ["c4"], name="pointwise"),
        helper.make_node("GlobalAveragePool", ["c4"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w_head", "b_head"], ["logits"], transB=1, name="head"),
    ]
    inits = [weight("w_stem", 16, 3, 3, 3), weight("b_stem", 16), weight("w_down", 24, 16, 3, 3), weight("b_down", 24),
             weight("w_dw", 24, 1, 3, 3), weight("b_dw", 24), weight("w_grouped", 24, 6, 3, 3),
             weight("w_pw", 32, 24, 1, 1), weight("b_pw", 32), weight("w_head", CLASSES, 32), weight("b_head", CLASSES)]
    shape = (BATCH, 3, 32, 32)
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return shape


def torch_small_net(path) -> tuple[int, ...]:
    """tests/test_whole_model.py's SmallNet (BN folded), exported with torch."""
    pytest.importorskip("torch")
    import torch
    import torchref
    from test_whole_model import SmallNet, export

    torch.manual_seed(0)
    shape = (BATCH, 3, 32, 32)
    export(torchref.fused(SmallNet(CLASSES)), path, shape)
    return shape


MODELS = {"helper": small_cnn, "SmallNet": torch_small_net}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(model, patch, optimizer name) -> (artifact directory, input shape); compiled once per module."""
    cache = {}

    def get(model: str, patch: int = 0, optimizer: OptimizerSpec = ADAMW):
        key = (model, patch, optimizer)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{model}-p{patch}-{optimizer.name}")
            shape = MODELS[model](directory / "model.onnx")
            compile_model(directory / "model.onnx", directory / "out",
                          CompileOptions(layers=3, patch=patch, backend="onnx", optimizer=optimizer))
            cache[key] = directory / "out", shape
        return cache[key]

    return get


def _batches(shape, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape).astype(np.float32), rng.integers(0, CLASSES, shape[0]).astype(np.int64))
            for _ in range(count)]


def _train(directory, batches, *, in_place: bool, lr: float = 0.01, verify: bool = True):
    """(losses, state arrays) after one step per batch; NonFiniteLoss steps give loss None."""
    trainer = Trainer(directory, device="cpu", threads=2, verify=verify)
    trainer.engine.in_place = in_place
    losses = []
    for x, y in batches:
        try:
            losses.append(trainer.step(x, y, lr=lr))
        except NonFiniteLoss:
            losses.append(None)
    return losses, trainer.engine.state_arrays(), trainer


def _assert_bit_identical(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and actual[name].shape == value.shape, name
        np.testing.assert_array_equal(actual[name].view(np.uint32), value.view(np.uint32), err_msg=name)


# ---------------------------------------------------------------------------- in place == functional


@pytest.mark.parametrize("model,patch,optimizer", [
    ("helper", 0, ADAMW), ("helper", 2, ADAMW), ("helper", 0, SGD), ("SmallNet", 0, ADAMW), ("SmallNet", 2, SGD),
])
def test_in_place_training_is_bit_identical_to_functional(compiled, model, patch, optimizer):
    directory, shape = compiled(model, patch, optimizer)
    batches = _batches(shape, 5)
    in_place_losses, in_place_state, trainer = _train(directory, batches, in_place=True)
    assert trainer.engine.in_place_allowed
    functional_losses, functional_state, _ = _train(directory, batches, in_place=False)
    assert None not in in_place_losses
    assert in_place_losses == functional_losses  # exact floats
    _assert_bit_identical(in_place_state, functional_state)
    initial = dict(np.load(directory / FILES["state"]))
    assert all(not np.array_equal(in_place_state[name], initial[name]) for name in initial)  # everything moved


def test_in_place_is_the_default_and_shares_the_buffers(compiled):
    directory, shape = compiled("helper")
    trainer = Trainer(directory, device="cpu")
    engine = trainer.engine
    assert engine.in_place_allowed and engine.in_place
    model = onnx.load(directory / FILES["step_model"], load_external_data=False)
    assert {p.key: p.value for p in model.metadata_props}[IN_PLACE_KEY] == IN_PLACE_VALUE
    assert (IN_PLACE_KEY, IN_PLACE_VALUE) == (step_model.IN_PLACE_KEY, step_model.IN_PLACE_VALUE)
    values = dict(engine.values)
    pointers = {name: value.data_ptr() for name, value in values.items()}
    (x, y), = _batches(shape, 1)
    trainer.step(x, y)
    assert all(engine.values[name] is values[name] for name in values)  # the same OrtValues, updated
    assert {name: value.data_ptr() for name, value in engine.values.items()} == pointers
    assert Trainer(directory, device="cpu").engine.in_place  # and a fresh trainer does the same


def test_finite_in_place_step_cannot_be_discarded(compiled):
    directory, shape = compiled("helper")
    trainer = Trainer(directory, device="cpu")
    (x, y), = _batches(shape, 1)
    before = trainer.engine.state_arrays()
    trainer.engine.train(trainer._feeds(x, y))
    with pytest.raises(RuntimeError, match="cannot be discarded"):
        trainer.engine.discard()
    assert trainer.engine.steps_taken == 1  # the state is step 1's, and the count says so
    assert any(not np.array_equal(before[n], v) for n, v in trainer.engine.state_arrays().items())


# ---------------------------------------------------------------------------- the barrier


def _without_barrier(directory, target):
    """A copy of the artifacts whose step model's update no longer waits for every gradient.

    The guard's ``ok`` (true iff the loss is finite, computed after every gradient) is
    replaced by the loss check alone, so the NaN safety stays and only the barrier goes.
    """
    shutil.copytree(directory, target)
    model = ir.load(target / FILES["step_model"])
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs}
    values["guard/ok"].replace_all_uses_with(values["guard/loss_is_finite"])
    common_passes.RemoveUnusedNodesPass()(model)
    ir.save(model, target / FILES["step_model"])
    return target, model


def test_a_missing_barrier_is_caught(compiled, tmp_path):
    directory, shape = compiled("helper")
    built = ir.load(directory / FILES["step_model"])
    state = [v.name for v in built.graph.inputs if f"{v.name}{step_model.UPDATED_SUFFIX}" in
             {o.name for o in built.graph.outputs}]
    assert len(state) == 3 * 7 and step_model.in_place_hazards(built.graph, state) == []  # 3 convs (2 biased), head

    unguarded, model = _without_barrier(directory, tmp_path / "unguarded")
    hazards = step_model.in_place_hazards(model.graph, state)
    # The exact backward of every trained layer but the first (depthwise: no dX needed) reads its weight for dX.
    assert {h.split()[0] for h in hazards} == {"w_grouped", "w_pw", "w_head"}, hazards
    assert any(h.startswith("w_head is read by Gemm") for h in hazards), hazards

    batches = _batches(shape, 4)
    functional_losses, functional_state, _ = _train(unguarded, batches, in_place=False, verify=False)
    expected_losses, expected_state, _ = _train(directory, batches, in_place=False)
    assert functional_losses == expected_losses  # the barrier changes nothing by itself
    _assert_bit_identical(functional_state, expected_state)
    in_place_losses, in_place_state, _ = _train(unguarded, batches, in_place=True, verify=False)
    if in_place_losses == functional_losses and all(np.array_equal(in_place_state[n], v)
                                                    for n, v in functional_state.items()):
        pytest.skip("this onnxruntime happens to run every backward read before the writes (the hazards stand)")
    # Here it diverged (the comparison of test_in_place_training_is_bit_identical_to_functional would fail);
    # only from the second step on: the first loss is computed before any write.
    assert in_place_losses[0] == functional_losses[0]


@pytest.mark.parametrize("patch", [0, 2])
def test_onnxruntime_optimizations_keep_the_barrier(compiled, tmp_path, patch):
    """The graph onnxruntime runs (after its ORT_ENABLE_ALL rewrites: fusions, layout changes) passes the check too."""
    import onnxruntime as ort

    directory, _ = compiled("helper", patch)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(directory / FILES["step_model"]), options, providers=["CPUExecutionProvider"])
    optimized = ir.load(tmp_path / "optimized.onnx")
    state = [o.name.removesuffix(step_model.UPDATED_SUFFIX) for o in optimized.graph.outputs
             if o.name.endswith(step_model.UPDATED_SUFFIX)]
    assert len(state) == 3 * 7
    assert step_model.in_place_hazards(optimized.graph, state) == []


# ---------------------------------------------------------------------------- non-finite losses


@pytest.mark.parametrize("optimizer", [ADAMW, SGD], ids=lambda o: o.name)
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_loss_leaves_the_state_bit_identical(compiled, optimizer, bad):
    directory, shape = compiled("helper", 0, optimizer)
    batches = _batches(shape, 4)
    x, y = batches[2]
    poisoned = x.copy()
    if bad == "nan":
        poisoned[0, 0, 3, 3] = np.nan
    else:
        poisoned[:] = 3e38  # overflows to an infinite loss
    trainer = Trainer(directory, device="cpu", threads=2)
    assert trainer.engine.in_place
    for x, y in batches[:2]:
        trainer.step(x, y, lr=0.01)
    before = trainer.engine.state_arrays()
    with pytest.raises(NonFiniteLoss):
        trainer.step(poisoned, y, lr=0.01)
    _assert_bit_identical(trainer.engine.state_arrays(), before)
    assert trainer.engine.steps_taken == 2 and trainer.steps_taken == 2
    for x, y in batches[2:]:
        trainer.step(x, y, lr=0.01)
    # exactly the run that never saw the bad batch (AdamW's bias correction counts steps 1..4)
    _, expected, _ = _train(directory, batches, in_place=False)
    _assert_bit_identical(trainer.engine.state_arrays(), expected)


def test_in_place_needs_a_guarded_step_model(compiled, tmp_path):
    """Step models without the metadata mark (older compilers, hand-written ones) run functionally."""
    directory, _ = compiled("helper")
    target = tmp_path / "unmarked"
    shutil.copytree(directory, target)
    model = onnx.load(target / FILES["step_model"])
    kept = [p for p in model.metadata_props if p.key != IN_PLACE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, target / FILES["step_model"])
    engine = Trainer(target, device="cpu", verify=False).engine
    assert not engine.in_place_allowed and not engine.in_place
    with pytest.raises(ArtifactError, match="does not allow in-place"):
        engine.in_place = True
