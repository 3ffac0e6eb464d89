"""Refuse windowed ops whose attributes no runtime can execute, naming the node and the attribute.

onnx's checker validates attribute types, not their values, and onnxruntime crashes on some
values (a zero stride is a division by zero, negative pads read outside the input) before any
error can be reported. So, before shape inference or any onnxruntime session sees the model:

* `check_window_attributes` refuses values that are wrong whatever the input (a kernel, stride
  or dilation below 1, negative pads, lists of the wrong length, a group below 1 or that does
  not divide the weight's output channels, a kernel_shape that contradicts the weight);
* `check_window_sizes`, once shapes are inferred, refuses an input of the wrong rank, a group
  that does not match the input channels and a window larger than its padded input (an empty output).

Each refusal is an `InputError` (the model file is invalid), one line naming the node.
"""

from __future__ import annotations

import onnx_ir as ir

from gfcompiler.errors import InputError

WINDOW_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})
AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
LARGEST_ATTRIBUTE = 2**31 - 1  # beyond any real window; larger values only come from corrupt files
# name -> (smallest allowed value, values per spatial axis, what the smallest means)
_WINDOW_LISTS = {
    "kernel_shape": (1, 1, "every kernel size must be >= 1"),
    "strides": (1, 1, "every stride must be >= 1"),
    "dilations": (1, 1, "every dilation must be >= 1"),
    "pads": (0, 2, "pads must not be negative"),
    "output_padding": (0, 1, "output_padding must not be negative"),
}


def _refusal(node: ir.Node, message: str) -> InputError:
    return InputError(f"{node.op_type} node {node.name!r}: {message}")


def window_nodes(model: ir.Model) -> list[ir.Node]:
    """The default-domain windowed nodes of every graph (subgraphs included)."""
    return [node for node in ir.traversal.RecursiveGraphIterator(model.graph)
            if node.op_type in WINDOW_OPS and node.domain in ("", "ai.onnx")]


def _weight_dims(node: ir.Node) -> tuple[int, ...] | None:
    """The Conv/ConvTranspose weight's dims when all are known."""
    if node.op_type not in ("Conv", "ConvTranspose") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    shape = node.inputs[1].shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def _spatial_rank(node: ir.Node) -> int | None:
    """The number of spatial axes the window slides over, from kernel_shape, the weight or the input."""
    kernel = node.attributes.get("kernel_shape")
    if kernel is not None:
        return len(kernel.as_ints())
    weight = _weight_dims(node)
    if weight is not None:
        return len(weight) - 2
    x = node.inputs[0] if node.inputs else None
    return len(x.shape) - 2 if x is not None and x.shape is not None else None


def _ints(node: ir.Node, name: str) -> list[int] | None:
    attribute = node.attributes.get(name)
    if attribute is None:
        return None
    if attribute.type != ir.AttributeType.INTS:
        raise _refusal(node, f"attribute {name} must be a list of integers, not {attribute.type.name}")
    return list(attribute.as_ints())


def _check_lists(node: ir.Node, rank: int | None) -> None:
    for name, (smallest, per_axis, rule) in _WINDOW_LISTS.items():
        values = _ints(node, name)
        if values is None:
            continue
        if rank is not None and len(values) != per_axis * rank:
            raise _refusal(node, f"{name}={values} has {len(values)} values, a {rank}-D window needs {per_axis * rank}")
        if any(value < smallest for value in values):
            raise _refusal(node, f"{name}={values}: {rule}")
        if any(value > LARGEST_ATTRIBUTE for value in values):
            raise _refusal(node, f"{name}={values}: a value above {LARGEST_ATTRIBUTE} (corrupt file?)")


def _check_group_and_weight(node: ir.Node, rank: int | None) -> None:
    group = node.attributes.get_int("group", 1)
    if group < 1:
        raise _refusal(node, f"group={group}: must be >= 1")
    weight = _weight_dims(node)
    if weight is None:
        return
    if rank is not None and len(weight) != rank + 2:
        raise _refusal(node, f"weight shape {list(weight)} does not fit a {rank}-D window")
    kernel = _ints(node, "kernel_shape")
    if kernel is not None and list(weight[2:]) != kernel:
        raise _refusal(node, f"kernel_shape={kernel} contradicts the weight's kernel {list(weight[2:])}")
    if any(d < 1 for d in weight):
        raise _refusal(node, f"weight shape {list(weight)} has an empty dimension")
    channels = weight[0] if node.op_type == "Conv" else weight[1]  # ConvTranspose: W is C_in × C_out/group × k
    if node.op_type == "Conv" and channels % group:
        raise _refusal(node, f"group={group} does not divide the weight's {channels} output channels")


def check_window_attributes(model: ir.Model) -> None:
    """Refuse windowed nodes whose attribute values are invalid whatever the input (module docstring)."""
    for node in window_nodes(model):
        rank = _spatial_rank(node)
        _check_lists(node, rank)
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if auto_pad not in AUTO_PADS:
            raise _refusal(node, f"auto_pad={auto_pad!r}: expected one of {', '.join(AUTO_PADS)}")
        if auto_pad != "NOTSET" and node.attributes.get("pads") is not None:
            raise _refusal(node, f"has both auto_pad={auto_pad} and pads: only one may say the padding")
        if node.op_type in ("MaxPool", "AveragePool", "LpPool") and node.attributes.get("kernel_shape") is None:
            raise _refusal(node, "no kernel_shape attribute")
        if node.op_type in ("Conv", "ConvTranspose"):
            _check_group_and_weight(node, rank)


def _check_channels(node: ir.Node, channels: int) -> None:
    weight = _weight_dims(node)
    if weight is None:
        return
    group = node.attributes.get_int("group", 1)
    expected = weight[1] * group if node.op_type == "Conv" else weight[0]
    if channels != expected:
        what = f"group {group} × the weight's {weight[1]} channels per group" if node.op_type == "Conv" else "the weight's"
        raise _refusal(node, f"its input has {channels} channels, but {what} make {expected}")


def _check_window_fits(node: ir.Node, sizes: list) -> None:
    """A window (dilated kernel) larger than its padded input has no output position."""
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad.startswith("SAME"):
        return
    kernel = _ints(node, "kernel_shape") or (list(_weight_dims(node) or ())[2:])
    if len(kernel) != len(sizes):
        return
    dilations = _ints(node, "dilations") or [1] * len(kernel)
    pads = _ints(node, "pads") if auto_pad == "NOTSET" else None
    pads = pads or [0] * (2 * len(kernel))
    for axis, (size, k, d) in enumerate(zip(sizes, kernel, dilations)):
        if not isinstance(size, int):
            continue
        padded, window = size + pads[axis] + pads[axis + len(kernel)], (k - 1) * d + 1
        if window > padded:
            raise _refusal(node, f"its window spans {window} (kernel {k}, dilation {d}) on spatial axis {axis}, "
                                 f"larger than the padded input ({size} + pads {pads[axis]}+{pads[axis + len(kernel)]} "
                                 f"= {padded}): the output would be empty")


def check_window_sizes(model: ir.Model) -> None:
    """Refuse windowed nodes that do not fit their (inferred) input: channels vs group, window vs padded size."""
    for node in window_nodes(model):
        x = node.inputs[0] if node.inputs else None
        if x is None or x.shape is None:
            continue
        rank = _spatial_rank(node)
        if rank is not None and len(x.shape) != rank + 2:
            raise _refusal(node, f"its input has rank {len(x.shape)}, a {rank}-D window needs rank {rank + 2} (N, C, spatial)")
        if isinstance(x.shape[1], int):
            _check_channels(node, x.shape[1])
        if node.op_type != "ConvTranspose":
            _check_window_fits(node, list(x.shape[2:]))
