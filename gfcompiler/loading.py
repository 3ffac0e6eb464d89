"""Load a user's ONNX model and bring it to a form onnxruntime-training 1.19.2 accepts.

Everything that can go wrong with the file itself is reported here as a one-line
`InputError` / `UnsupportedModelError`: a missing file, bytes that are not ONNX, a
truncated protobuf, missing external-data files, non-float weights, unknown spatial
sizes. The result is an `onnx_ir.Model` with:

* the default-domain opset in [MIN_OPSET, MAX_OPSET] (converted with onnx's version
  converter when outside) and IR version <= MAX_IR_VERSION (measured: ORT 1.19 refuses 11+);
* every graph input's shape fixed where the user gave ``--input-shape``;
* shapes inferred for every value (onnx shape inference with data propagation).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from gfcompiler.errors import InputError, UnsupportedModelError

MIN_OPSET = 13  # ReduceSum/Squeeze take axes as inputs; the filter builder needs this
TARGET_OPSET = 17  # what old models are converted to
MAX_OPSET = 21  # newest default-domain opset onnxruntime 1.19.2 implements
MAX_IR_VERSION = 10


@dataclasses.dataclass(frozen=True)
class InputShape:
    """``--input-shape NAME=N,C,H,W``; ``None`` for a dimension left dynamic (``N``, ``?`` or ``-1``)."""

    name: str
    dims: tuple[int | None, ...]

    @classmethod
    def parse(cls, text: str) -> "InputShape":
        name, sep, dims_text = text.partition("=")
        if not sep or not name or not dims_text:
            raise InputError(f"--input-shape expects NAME=N,C,H,W, got {text!r}")
        dims: list[int | None] = []
        for token in dims_text.split(","):
            token = token.strip()
            if token in ("N", "?", "-1", ""):
                dims.append(None)
                continue
            try:
                value = int(token)
            except ValueError:
                raise InputError(f"--input-shape {text!r}: {token!r} is not an integer") from None
            if value <= 0:
                raise InputError(f"--input-shape {text!r}: dimensions must be positive")
            dims.append(value)
        return cls(name, tuple(dims))


def read_model_proto(path: Path) -> onnx.ModelProto:
    """Parse the file (with its external data) or raise a one-line InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, EOFError) as error:
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(error) or 'protobuf parse failed'})") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise InputError(f"{path}: not an ONNX model (no graph nodes; truncated or another file type?)")
    _load_external_data(proto, path)
    return proto


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    missing = sorted(
        {
            entry.value
            for tensor in onnx.external_data_helper._get_all_tensors(proto)
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location" and not (path.parent / entry.value).exists()
        }
    )
    if missing:
        raise InputError(f"{path}: external data file(s) missing next to the model: {', '.join(missing)}")
    try:
        onnx.load_external_data_for_model(proto, os.fspath(path.parent))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read external data ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise UnsupportedModelError("model imports no default-domain (ai.onnx) opset")


def normalize_versions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Convert the default opset into [MIN_OPSET, MAX_OPSET] and cap the IR version."""
    opset = default_opset(proto)
    target = TARGET_OPSET if opset < MIN_OPSET else MAX_OPSET if opset > MAX_OPSET else opset
    if target != opset:
        try:
            proto = onnx.version_converter.convert_version(proto, target)
        except Exception as error:  # the converter raises bare RuntimeErrors/ValueErrors per op
            raise UnsupportedModelError(
                f"cannot convert opset {opset} to {target} (onnxruntime-training 1.19.2 needs "
                f"{MIN_OPSET}..{MAX_OPSET}): {_first_line(error)}"
            ) from None
    if proto.ir_version > MAX_IR_VERSION or proto.ir_version < 7:
        proto.ir_version = MAX_IR_VERSION if proto.ir_version > MAX_IR_VERSION else 7
    return proto


def apply_input_shapes(model: ir.Model, shapes: list[InputShape]) -> None:
    """Fix graph-input shapes from ``--input-shape``; refuse shapes that contradict the model."""
    inputs = {value.name: value for value in model.graph.inputs if not value.const_value}
    for shape in shapes:
        if shape.name not in inputs:
            raise InputError(f"--input-shape names {shape.name!r}, but the model's inputs are {sorted(inputs)}")
        value = inputs[shape.name]
        if value.shape is not None:
            if len(value.shape) != len(shape.dims):
                raise InputError(
                    f"--input-shape {shape.name}: rank {len(shape.dims)} contradicts the model's {value.shape}"
                )
            for mine, theirs in zip(shape.dims, value.shape):
                if isinstance(theirs, int) and mine is not None and mine != theirs:
                    raise InputError(
                        f"--input-shape {shape.name}={_dims_text(shape.dims)} contradicts the model's shape {_dims_text(tuple(value.shape))}"
                    )
        value.shape = ir.Shape(_merged_dims(shape, value.shape))


def _merged_dims(given: InputShape, current: ir.Shape | None) -> list:
    """The user's dimensions; a dimension left dynamic keeps the model's (or becomes symbolic)."""
    dims: list = []
    for axis, dim in enumerate(given.dims):
        if dim is not None:
            dims.append(dim)
        elif current is not None and current[axis] is not None:
            dims.append(current[axis])
        else:
            dims.append("N" if axis == 0 else f"{given.name}_{axis}")
    return dims


def _dims_text(dims) -> str:
    return ",".join(str(d) if isinstance(d, int) else "?" for d in dims)


def data_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are not initializers (IR < 4 models list weights as inputs too)."""
    return [value for value in model.graph.inputs if value.const_value is None and value.name not in model.graph.initializers]


def check_float_weights(model: ir.Model) -> None:
    """Refuse integer or quantized models: training needs float32 weights on every Conv."""
    quantized = {node.op_type for node in model.graph if node.op_type in ("QLinearConv", "ConvInteger", "DequantizeLinear", "QuantizeLinear")}
    if quantized:
        raise UnsupportedModelError(f"quantized model ({', '.join(sorted(quantized))}): only float32 models can be trained")
    for node in model.graph:
        if node.op_type == "Conv" and node.inputs[1] is not None:
            dtype = node.inputs[1].dtype
            if dtype is not None and dtype != ir.DataType.FLOAT:
                raise UnsupportedModelError(f"Conv {node.name!r} has {dtype.name} weights: only float32 models can be trained")


def _inferred_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except onnx.shape_inference.InferenceError as error:
        raise UnsupportedModelError(f"shape inference failed: {_first_line(error)}") from None


def _with_batch_one(proto: onnx.ModelProto) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    initializers = {init.name for init in probe.graph.initializer}
    for value in probe.graph.input:
        if value.name not in initializers and value.type.tensor_type.shape.dim:
            first = value.type.tensor_type.shape.dim[0]
            if not first.HasField("dim_value"):
                first.dim_value = 1
    return probe


def _inferred_types(proto: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every value's type after shape inference, by name (value_info, then graph outputs; subgraphs too)."""
    types: dict[str, onnx.ValueInfoProto] = {}
    pending = [_inferred_proto(proto).graph]
    while pending:
        graph = pending.pop()
        types.update({info.name: info for info in graph.value_info})
        types.update({info.name: info for info in graph.output})
        for node in graph.node:
            for attribute in node.attribute:
                pending.extend([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs)
    return types


def _lost_non_batch_dims(value: ir.Value) -> bool:
    """An activation whose batch dimension is symbolic and some other dimension unknown."""
    shape = value.shape
    return (shape is not None and len(shape) >= 2 and not isinstance(shape[0], int)
            and not all(isinstance(d, int) for d in shape[1:]))


def infer_shapes(model: ir.Model) -> None:
    """Annotate every node output with onnx shape inference (data propagation on); keep the batch dynamic.

    Shape arithmetic with a symbolic batch (a channel shuffle's ``Reshape`` built from
    ``Shape``/``Gather``/``Concat``) loses every dimension. When that happens, a second
    inference with the batch fixed to 1 recovers the non-batch dimensions, which are
    copied into the values whose own inference left them unknown. The model is
    annotated in place: only the inference itself runs on a protobuf copy.
    """
    proto = ir.serde.serialize_model(model)
    inferred = _inferred_types(proto)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value.name in inferred:
                ir.serde.deserialize_value_info_proto(inferred[value.name], value)
    lost = [value for node in model.graph for value in node.outputs if _lost_non_batch_dims(value)]
    if not lost:
        return
    probe = _inferred_types(_with_batch_one(proto))
    for value in lost:
        known = ir.serde.deserialize_type_proto_for_shape(probe[value.name].type) if value.name in probe else None
        if known is not None and len(known) == len(value.shape):
            value.shape = ir.Shape([value.shape[0], *known[1:]])


def measure_unknown_conv_inputs(model: ir.Model) -> None:
    """Run the model once at batch 1 to measure conv input shapes inference left unknown.

    onnx's data propagation stops at ops such as ``Div`` in shape arithmetic (a channel
    shuffle computes its ``Reshape`` target at run time), so every later dimension is
    unknown. When the data inputs' non-batch dims are static, one onnxruntime run on
    zeros gives the real shapes; the batch dimension stays symbolic.
    """
    from gfcompiler.ort_training import onnxruntime

    ort = onnxruntime()

    targets = {
        node.inputs[0].name: node.inputs[0]
        for node in model.graph
        if node.op_type == "Conv" and node.inputs[0] is not None
        and (node.inputs[0].shape is None or not all(isinstance(d, int) for d in node.inputs[0].shape[1:]))
    }
    feeds = {}
    for value in data_inputs(model):
        dims = list(value.shape) if value.shape is not None else None
        if dims is None or not all(isinstance(d, int) for d in dims[1:]):
            return
        feeds[value.name] = np.zeros([1, *dims[1:]], dtype=value.dtype.numpy())
    if not targets:
        return
    proto = ir.serde.serialize_model(model)
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in targets)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        results = session.run(None, feeds)
    except Exception:  # the model does not run as is: leave the shapes unknown (layers keep the exact backward)
        return
    for (name, value), array in zip(targets.items(), results):
        batch = value.shape[0] if value.shape is not None and len(value.shape) == array.ndim else "N"
        value.shape = ir.Shape([batch, *array.shape[1:]])


def load_model(path: Path, input_shapes: list[InputShape] = ()) -> ir.Model:
    """Read, version-normalize and shape-annotate a model (see the module docstring)."""
    proto = normalize_versions(read_model_proto(path))
    model = ir.serde.deserialize_model(proto)
    apply_input_shapes(model, list(input_shapes))
    check_float_weights(model)
    if not data_inputs(model):
        raise UnsupportedModelError("model has no data input (every input is an initializer)")
    return model


def tensor_array(value: ir.Value) -> np.ndarray | None:
    """The constant behind a value (initializer or folded constant), as numpy; else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()
