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
import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path, PureWindowsPath

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from gfcompiler.errors import InputError, UnsupportedModelError
from gfcompiler.passes.check_attributes import check_window_attributes, check_window_sizes

MIN_OPSET = 13  # ReduceSum/Squeeze take axes as inputs; the filter builder needs this
TARGET_OPSET = 17  # what old models are converted to
MAX_OPSET = 21  # newest default-domain opset onnxruntime 1.19.2 implements
MAX_IR_VERSION = 10
MAX_ELEMENTS = 2**31 - 1  # per sample, in any input or activation: more is a corrupt or mistyped shape


@dataclasses.dataclass(frozen=True)
class InputShape:
    """``--input-shape NAME=N,C,H,W``; ``None`` for a dimension left dynamic (``N``, ``?`` or ``-1``)."""

    name: str
    dims: tuple[int | None, ...]

    @classmethod
    def parse(cls, text: str) -> InputShape:
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
    """Parse the file (with its external data) and check it is valid ONNX, or raise a one-line InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, EOFError) as error:
        raise InputError(f"{path}: not a readable ONNX model (protobuf parse failed: truncated or another file type?)") from error
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise InputError(f"{path}: not an ONNX model (no graph nodes; truncated or another file type?)")
    _check_text(proto, path)
    _load_external_data(proto, path)
    _check_onnx(proto, path)
    return proto


def _check_text(message, path: Path, where: str = "model") -> None:
    """Refuse text fields (names, attribute strings, external-data entries) that are not UTF-8.

    protobuf hands such fields over as bytes, which every later stage would trip on.
    """
    for field, value in message.ListFields():
        name = f"{where}.{field.name}"
        repeated = _is_repeated(field)
        values = value if repeated else [value]
        if field.type == field.TYPE_STRING:
            if any(isinstance(item, bytes) for item in values):
                raise InputError(f"{path}: not a valid ONNX model: {name} is not UTF-8 text (a corrupt file?)")
        elif field.type == field.TYPE_MESSAGE:
            for index, item in enumerate(values):
                _check_text(item, path, f"{name}[{index}]" if repeated else name)


def _is_repeated(field) -> bool:
    """``FieldDescriptor.is_repeated`` (protobuf >= 6.31; ``label`` is deprecated there), else from ``label``."""
    repeated = getattr(field, "is_repeated", None)
    return repeated if isinstance(repeated, bool) else field.label == field.LABEL_REPEATED


def _check_onnx(proto: onnx.ModelProto, path: Path) -> None:
    """onnx's structural checker (nodes against their schemas, topological order, defined inputs).

    Graph inputs/outputs declared without a shape, which onnxruntime accepts and exporters
    write, are not refused: they get an empty shape for the duration of the check only.
    """
    if proto.ByteSize() >= 2**31:  # the checker cannot take a proto this large in memory; onnxruntime checks it later
        return
    shapeless = [info.type.tensor_type for info in (*proto.graph.input, *proto.graph.output)
                 if info.type.HasField("tensor_type") and not info.type.tensor_type.HasField("shape")]
    for tensor_type in shapeless:
        tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise InputError(f"{path}: not a valid ONNX model: {_checker_detail(error)}") from error
    finally:
        for tensor_type in shapeless:
            tensor_type.ClearField("shape")


def _checker_detail(error: BaseException) -> str:
    """The checker's first line without its C++ framing (``[ONNXRuntimeError]``-style prefixes, node dumps)."""
    line = _first_line(error)
    return line.split("==>")[0].strip().rstrip(".:") or "structural check failed"


@dataclasses.dataclass(frozen=True)
class ExternalData:
    """Where one tensor's bytes are stored outside the model file (its ``external_data`` entries)."""

    tensor: str
    location: str
    offset: int
    length: int | None  # None: to the end of the file

    @classmethod
    def of(cls, tensor: onnx.TensorProto, path: Path) -> ExternalData:
        entries = {entry.key: entry.value for entry in tensor.external_data}
        numbers = {}
        for key in ("offset", "length"):
            text = entries.get(key)
            if text is None:
                continue
            if not text.isdigit():
                raise InputError(f"{path}: tensor {tensor.name!r} has external data {key} {text!r}, not a non-negative integer")
            numbers[key] = int(text)
        return cls(tensor.name, entries.get("location", ""), numbers.get("offset", 0), numbers.get("length"))

    def file(self, path: Path, folder: Path) -> Path:
        """The file to read, refusing any location outside the model's folder (the resolved folder ``folder``)."""
        location = self.location
        if not location or "\0" in location:
            raise InputError(f"{path}: tensor {self.tensor!r} is stored as external data but names no usable file ({location!r})")
        if os.path.isabs(location) or PureWindowsPath(location).anchor:
            raise self._refusal(path, "an absolute path")
        candidate = folder / location
        resolved = candidate.resolve()
        if not resolved.is_relative_to(folder):
            climbs = os.path.normpath(location).split(os.sep)[0] == os.pardir
            raise self._refusal(path, "a path that climbs out of the model's folder" if climbs
                                else f"a symbolic link to {resolved}, outside the model's folder")
        return resolved

    def _refusal(self, path: Path, what: str) -> InputError:
        return InputError(
            f"{path}: tensor {self.tensor!r} keeps its data at {self.location!r}, {what}: refused, "
            f"gfc reads external data only from files inside the model's folder ({path.parent.resolve()})"
        )


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [tensor for tensor in onnx.external_data_helper._get_all_tensors(proto)
            if tensor.data_location == onnx.TensorProto.EXTERNAL]


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Read every external tensor's bytes into the proto, from regular files inside the model's folder only.

    Every location is checked before any file is opened (onnx's own loader is not used:
    it reads first and refuses with its exception texts).
    """
    folder = path.parent.resolve()
    tensors = _external_tensors(proto)
    places = [(tensor, ExternalData.of(tensor, path)) for tensor in tensors]
    files = [place.file(path, folder) for _, place in places]
    missing = sorted({place.location for (_, place), file in zip(places, files) if not file.exists()})
    if missing:
        raise InputError(f"{path}: external data file(s) missing next to the model: {', '.join(missing)}")
    for (tensor, place), file in zip(places, files):
        tensor.raw_data = _external_bytes(tensor, place, file, path)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _external_bytes(tensor: onnx.TensorProto, place: ExternalData, file: Path, path: Path) -> bytes:
    """The tensor's bytes from ``file``; a file too short for them, or not a regular file, is refused."""
    where = f"{path}: tensor {tensor.name!r} (external data {place.location!r}"
    if not stat.S_ISREG(file.stat().st_mode):
        raise InputError(f"{where}) is not a regular file")
    needed = _tensor_bytes(tensor)
    length = place.length if place.length is not None else needed
    try:
        with open(file, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if length is None:
                length = max(size - place.offset, 0)
            if place.offset + length > size:
                raise InputError(f"{where}, offset {place.offset}, {length} bytes) runs past the end of the "
                                 f"{size}-byte file: the data file is short or belongs to another model")
            stream.seek(place.offset)
            data = stream.read(length)
    except OSError as error:
        raise InputError(f"{where}) cannot be read: {error.strerror}") from error
    if needed is not None and len(data) != needed:
        dims = "x".join(map(str, tensor.dims)) or "scalar"
        raise InputError(f"{where}) holds {len(data)} bytes, but its shape {dims} needs {needed}")
    return data


_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4} | (
    {onnx.TensorProto.FLOAT4E2M1} if hasattr(onnx.TensorProto, "FLOAT4E2M1") else set())


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """How many bytes a tensor's raw data must hold (None for strings or an unknown type)."""
    count = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return None if tensor.data_type == onnx.TensorProto.STRING else count * itemsize


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


def mark_dynamic_dims(proto: onnx.ModelProto) -> None:
    """Turn every non-positive dimension (``-1``, ``0``: exporters' spellings of "dynamic") into an unknown one.

    A dimension that is missing, symbolic or non-positive is dynamic; ``--input-shape`` fixes it.
    """
    pending = [proto.graph]
    while pending:
        graph = pending.pop()
        for info in (*graph.input, *graph.output, *graph.value_info):
            for dim in info.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value <= 0:
                    dim.ClearField("dim_value")
        for node in graph.node:
            for attribute in node.attribute:
                pending.extend([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs)


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
                    f"--input-shape {shape.name}: rank {len(shape.dims)} contradicts the model's rank {len(value.shape)} "
                    f"(shape {_dims_text(tuple(value.shape))})"
                )
            for mine, theirs in zip(shape.dims, value.shape):
                if isinstance(theirs, int) and mine is not None and mine != theirs:
                    raise InputError(
                        f"--input-shape {shape.name}={_dims_text(shape.dims)} contradicts the model's shape "
                        f"{_dims_text(tuple(value.shape))}"
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


def _elements_per_sample(shape: ir.Shape) -> int:
    """The product of the known dimensions after the first (the batch)."""
    return math.prod(d for d in list(shape)[1:] if isinstance(d, int))


def check_input_sizes(model: ir.Model) -> None:
    """Refuse a data input declaring more than MAX_ELEMENTS elements per sample (a corrupt or mistyped shape)."""
    for value in data_inputs(model):
        if value.shape is not None and _elements_per_sample(value.shape) > MAX_ELEMENTS:
            raise InputError(
                f"input {value.name!r} has shape {_dims_text(tuple(value.shape))}: "
                f"{_elements_per_sample(value.shape):.3g} elements per sample, more than gfc accepts "
                f"({MAX_ELEMENTS}; a corrupt or mistyped shape?); give the real one with --input-shape {value.name}=N,C,H,W"
            )


def _check_value_sizes(model: ir.Model) -> None:
    """Refuse a node whose inferred output exceeds MAX_ELEMENTS per sample (absurd attributes or constants)."""
    for node in model.graph:
        for value in node.outputs:
            if value.shape is not None and _elements_per_sample(value.shape) > MAX_ELEMENTS:
                raise InputError(
                    f"{node.op_type} node {node.name!r} produces {value.name!r} of shape {_dims_text(tuple(value.shape))}: "
                    f"more than {MAX_ELEMENTS} elements per sample (corrupt attributes or input shape?)"
                )


def data_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are not initializers (IR < 4 models list weights as inputs too)."""
    return [value for value in model.graph.inputs if value.const_value is None and value.name not in model.graph.initializers]


def check_float_weights(model: ir.Model) -> None:
    """Refuse integer or quantized models: training needs float32 weights on every Conv."""
    quantized_ops = ("QLinearConv", "ConvInteger", "DequantizeLinear", "QuantizeLinear")
    quantized = {node.op_type for node in model.graph if node.op_type in quantized_ops}
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
        raise UnsupportedModelError(f"the model's shapes do not agree: {_inference_detail(error)}") from error


_ERROR_TAG = re.compile(r"\[\w+Error\]\s*")
_NODE_OF_ERROR = re.compile(r"\(op_type:(\w+), node name: ([^)]*)\):\s*(.*)")


def _inference_detail(error: BaseException) -> str:
    """onnx's inference message in the model's terms: ``<op> node '<name>': <what>``."""
    text = _first_line(error)
    match = _NODE_OF_ERROR.search(text)
    if match is None:
        return _ERROR_TAG.sub("", text).strip()
    op_type, name, rest = match.groups()
    return f"{op_type} node {name!r}: {_ERROR_TAG.sub('', rest).strip()}"


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
    annotated in place: only the inference itself runs on a protobuf copy. Windowed nodes
    that do not fit their input and absurdly large values are then refused (`InputError`).
    """
    proto = ir.serde.serialize_model(model)
    inferred = _inferred_types(proto)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value.name in inferred:
                ir.serde.deserialize_value_info_proto(inferred[value.name], value)
    lost = [value for node in model.graph for value in node.outputs if _lost_non_batch_dims(value)]
    if lost:
        probe = _inferred_types(_with_batch_one(proto))
        for value in lost:
            known = ir.serde.deserialize_type_proto_for_shape(probe[value.name].type) if value.name in probe else None
            if known is not None and len(known) == len(value.shape):
                value.shape = ir.Shape([value.shape[0], *known[1:]])
    check_window_sizes(model)
    _check_value_sizes(model)


RUN_CHECK_ELEMENTS = 2**26  # inputs larger than this (256 MB of float32) are not test-run at load


def _ignore(_: str) -> None:
    pass


def _zero_feeds(model: ir.Model) -> dict[str, np.ndarray] | None:
    """Zeros for every data input at its declared batch (else 1); None when a size is unknown or too large."""
    feeds = {}
    for value in data_inputs(model):
        dims = list(value.shape) if value.shape is not None else None
        if dims is None or value.dtype is None or not dims or not all(isinstance(d, int) for d in dims[1:]):
            return None
        dims[0] = dims[0] if isinstance(dims[0], int) else 1
        try:
            dtype = value.dtype.numpy()
        except (TypeError, ValueError):
            return None
        if math.prod(dims) > RUN_CHECK_ELEMENTS or dtype.kind not in "biuf":
            return None
        feeds[value.name] = np.zeros(dims, dtype=dtype)
    return feeds


def _session(proto: onnx.ModelProto):
    from gfcompiler.ort_training import onnxruntime

    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are reported (or deliberately ignored) by the caller
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # errors name the model's nodes
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ")
_ORT_NODE = re.compile(r"Node \(([^)]*)\) Op \((\w+)\)\s*(.*)")
_ORT_RUNNING = re.compile(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)")
_ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+ \S+\([^)]*\) ")


def _onnxruntime_detail(error: BaseException) -> tuple[str, str]:
    """onnxruntime's status code and its message in the model's terms (``<op> node '<name>': <what>``)."""
    text = _first_line(error)
    prefix = _ORT_PREFIX.match(text)
    code = prefix.group(1) if prefix else ""
    text = _ORT_SOURCE.sub("", text[prefix.end():] if prefix else text)
    for pattern, order in ((_ORT_NODE, (1, 0, 2)), (_ORT_RUNNING, (0, 1, 2))):
        match = pattern.search(text)
        if match is not None:
            op_type, name, what = (match.group(i + 1) for i in order)
            return code, f"{op_type} node {name!r}: {_ERROR_TAG.sub('', what).strip()}"
    return code, text.strip()


def check_model_runs(model: ir.Model, warn: Callable[[str], None] = _ignore) -> None:
    """Run the model once on zeros (its declared batch, else 1); refuse it when onnxruntime cannot.

    Attributes, shapes and weights that contradict each other in ways neither onnx's checker
    nor its shape inference sees (a Gemm whose weight does not fit the flattened features)
    surface here, as one line naming the node, instead of in the generated training graph.
    Graph-output shapes declared with another rank or size than the model computes are dropped
    (shape inference then gives the computed ones).
    Shapes are inferred first on a copy (`infer_shapes`), so windows that do not fit their input
    are named as such. Skipped when an input size is unknown (``--input-shape`` is then
    required) or very large.
    """
    feeds = _zero_feeds(model)
    if feeds is None:
        return
    proto = ir.serde.serialize_model(model)
    infer_shapes(ir.serde.deserialize_model(proto))
    try:
        results = _session(proto).run(None, feeds)
    except Exception as error:  # onnxruntime raises its own exception types per status code
        code, detail = _onnxruntime_detail(error)
        if code in ("NOT_IMPLEMENTED", "EP_FAIL"):
            raise UnsupportedModelError(f"onnxruntime cannot run the model: {detail}") from error
        raise InputError(f"the model does not run in onnxruntime (zeros at batch "
                         f"{next(iter(feeds.values())).shape[0]}): {detail}") from error
    _forget_wrong_output_shapes(model, results, warn)


def measure_unknown_conv_inputs(model: ir.Model) -> None:
    """Run the model once at batch 1 to measure conv input shapes inference left unknown.

    onnx's data propagation stops at ops such as ``Div`` in shape arithmetic (a channel
    shuffle computes its ``Reshape`` target at run time), so every later dimension is
    unknown. When the data inputs' non-batch dims are static, one onnxruntime run on
    zeros gives the real shapes; the batch dimension stays symbolic.
    """
    targets = {
        node.inputs[0].name: node.inputs[0]
        for node in model.graph
        if node.op_type == "Conv" and node.inputs[0] is not None
        and (node.inputs[0].shape is None or not all(isinstance(d, int) for d in node.inputs[0].shape[1:]))
    }
    feeds = _zero_feeds(model) if targets else None
    if feeds is None:
        return
    proto = ir.serde.serialize_model(model)
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in targets)
    try:
        results = _session(proto).run(None, feeds)
    except Exception:  # the model does not run as is: leave the shapes unknown (layers keep the exact backward)
        return
    for value, array in zip(targets.values(), results):
        batch = value.shape[0] if value.shape is not None and len(value.shape) == array.ndim else "N"
        value.shape = ir.Shape([batch, *array.shape[1:]])


def _deserialized(proto: onnx.ModelProto, path: Path) -> ir.Model:
    """The IR model; what onnx's checker let through but the IR cannot represent (an unknown data type) is refused."""
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as error:  # onnx_ir wraps every failure in SerdeError chains; the innermost cause says what
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise InputError(f"{path}: not a valid ONNX model: {_first_line(cause) or type(cause).__name__}") from error


def _forget_wrong_output_shapes(model: ir.Model, results: list[np.ndarray], warn: Callable[[str], None]) -> None:
    """Drop (with a warning) graph-output shapes whose declared rank or sizes contradict what the model computes.

    Real exporters write such shapes (ddddocr's OCR declares 1×? for a T×N×C output) and
    onnxruntime only warns; shape inference then gives the computed shape instead.
    """
    for value, array in zip(model.graph.outputs, results):
        declared = value.shape
        if declared is not None and (len(declared) != array.ndim or any(
                isinstance(d, int) and d != actual for d, actual in zip(declared, array.shape))):
            warn(f"warning: output {value.name!r} is declared as {_dims_text(tuple(declared)) or 'a scalar'}, but the "
                 f"model computes {_dims_text(array.shape)} (run on zeros); the computed shape is used")
            value.shape = None


def load_model(path: Path, input_shapes: list[InputShape] = (), warn: Callable[[str], None] = _ignore) -> ir.Model:
    """Read, version-normalize and check a model (see the module docstring); ``warn`` gets ``warning: ...`` lines."""
    proto = normalize_versions(read_model_proto(path))
    mark_dynamic_dims(proto)
    model = _deserialized(proto, Path(path))
    apply_input_shapes(model, list(input_shapes))
    check_input_sizes(model)
    check_float_weights(model)
    check_window_attributes(model)
    check_model_runs(model, warn)
    if not data_inputs(model):
        raise UnsupportedModelError("model has no data input (every input is an initializer)")
    return model


def tensor_array(value: ir.Value) -> np.ndarray | None:
    """The constant behind a value (initializer or folded constant), as numpy; else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()
