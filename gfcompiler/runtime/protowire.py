"""Adding initializers to a serialized ONNX model without the onnx package.

Protocol buffers merge on concatenation: parsing ``A + B`` gives ``A`` merged with ``B``,
where a singular embedded message (``ModelProto.graph``) is merged field by field and a
repeated field (``GraphProto.initializer``) is appended to. So the bytes of a model
followed by those of ``ModelProto{graph: GraphProto{initializer: [TensorProto, ...]}}``
parse as the model with those initializers added. `with_initializers` writes that
suffix with the standard library and numpy alone; ``--backend onnx`` export uses it to
put the trained parameters into ``export_model.onnx``, which references them without
defining them.

The fields written (onnx/onnx.proto)::

    ModelProto   graph = 7 (GraphProto)
    GraphProto   initializer = 5 (repeated TensorProto)
    TensorProto  dims = 1 (repeated int64, packed), data_type = 2 (int32),
                 name = 8 (string), raw_data = 9 (bytes, little-endian)
"""

from __future__ import annotations

import numpy as np

# TensorProto.DataType values of the numpy dtypes a parameter can have.
DATA_TYPES = {
    np.dtype(np.float32): 1,
    np.dtype(np.uint8): 2,
    np.dtype(np.int8): 3,
    np.dtype(np.uint16): 4,
    np.dtype(np.int16): 5,
    np.dtype(np.int32): 6,
    np.dtype(np.int64): 7,
    np.dtype(np.bool_): 9,
    np.dtype(np.float16): 10,
    np.dtype(np.float64): 11,
    np.dtype(np.uint32): 12,
    np.dtype(np.uint64): 13,
}

_LENGTH_DELIMITED = 2
_VARINT = 0
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_DIMS = 1
TENSOR_DATA_TYPE = 2
TENSOR_NAME = 8
TENSOR_RAW_DATA = 9


def varint(value: int) -> bytes:
    """Base-128 varint; negative values as their 64-bit two's complement (as protobuf's int64)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def _delimited(field: int, payload: bytes) -> bytes:
    return _key(field, _LENGTH_DELIMITED) + varint(len(payload)) + payload


def tensor_proto(name: str, array: np.ndarray) -> bytes:
    """A serialized TensorProto holding ``array`` as little-endian raw data."""
    array = np.asarray(array)
    data_type = DATA_TYPES.get(array.dtype.newbyteorder("="))
    if data_type is None:
        raise ValueError(f"cannot store {array.dtype} tensor {name!r} as an ONNX initializer")
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    parts = []
    if array.ndim:
        parts.append(_delimited(TENSOR_DIMS, b"".join(varint(int(d)) for d in array.shape)))
    parts.append(_key(TENSOR_DATA_TYPE, _VARINT) + varint(data_type))
    parts.append(_delimited(TENSOR_NAME, name.encode("utf-8")))
    parts.append(_delimited(TENSOR_RAW_DATA, raw))
    return b"".join(parts)


def initializers_suffix(arrays: dict[str, np.ndarray]) -> bytes:
    """``ModelProto{graph{initializer: arrays}}`` serialized: append it to a model's bytes."""
    graph = b"".join(_delimited(GRAPH_INITIALIZER, tensor_proto(name, a)) for name, a in arrays.items())
    return _delimited(MODEL_GRAPH, graph)


def with_initializers(model: bytes, arrays: dict[str, np.ndarray]) -> bytes:
    """The serialized model ``model`` with ``arrays`` added as graph initializers."""
    return bytes(model) + initializers_suffix(arrays)
