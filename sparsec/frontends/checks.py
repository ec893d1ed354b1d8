"""Validation on load: the ONNX checker, then the attribute values that ONNX Runtime, TVM's
importer or sparsec's passes read. A file that ONNX Runtime would refuse is refused here with
the node and attribute named (``InvalidModelError``, exit 4), never inspected, pruned or
compiled.
"""

from __future__ import annotations

import onnx

from sparsec.errors import InvalidModelError
from sparsec.ir.graph import Graph, Node

_FLAGS = {  # attributes that must be 0 or 1
    "Gemm": ("transA", "transB"),
    "ArgMax": ("keepdims", "select_last_index"), "ArgMin": ("keepdims", "select_last_index"),
    "AveragePool": ("ceil_mode", "count_include_pad"), "MaxPool": ("ceil_mode",),
    "CumSum": ("exclusive", "reverse"), "TopK": ("largest", "sorted"), "Trilu": ("upper",),
    **{op: ("keepdims", "noop_with_empty_axes") for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
_AXIS = ("Concat", "Softmax", "LogSoftmax", "Hardmax", "Gather", "GatherElements", "Split",
         "LayerNormalization", "ArgMax", "ArgMin", "Compress")
_CHOICES = {
    "auto_pad": ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"),
    ("Pad", "mode"): ("constant", "reflect", "edge", "wrap"),
    ("DepthToSpace", "mode"): ("DCR", "CRD"),
}
_WINDOWED = ("Conv", "ConvTranspose", "AveragePool", "MaxPool", "LpPool")


def check_proto(model: onnx.ModelProto | str, where: str) -> None:
    """The ONNX checker (structure, op schemas, attribute types) as a one-line error; a path
    is checked by path (a model with external data: the checker reads the files named, and
    the model is never held in one protobuf message, which cannot exceed 2 GB)."""
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModelError(f"{where} fails the ONNX checker: {first[:300]}") from None


def check_attribute_values(model: onnx.ModelProto) -> None:
    """Attribute values that need no shapes (flags, choices, positive sizes), before anything
    runs the model (``InvalidModelError`` naming the node and the attribute)."""
    for i, proto in enumerate(model.graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute
                 if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS,
                               onnx.AttributeProto.STRING)}
        node = Node(proto.op_type, list(proto.input), list(proto.output),
                    {k: list(v) if isinstance(v, (list, tuple)) or hasattr(v, "extend") else v
                     for k, v in attrs.items()}, proto.name or f"{proto.op_type}_{i}")
        _check_values(node)


def check_attributes(graph: Graph) -> None:
    """Attribute values per op, against the static shapes (``InvalidModelError`` on the first
    bad one, naming the node and the attribute)."""
    for node in graph.nodes:
        _check_values(node)
        _check_types(graph, node)
        _check_shapes(graph, node)


def _check_types(graph: Graph, n: Node) -> None:
    """Inputs that the op's schema binds to one type parameter (MatMul's two ``T``s, Add's,
    Concat's variadic ``T``...) must have one element type: ONNX Runtime refuses the file
    otherwise, and ONNX's shape inference (not strict) lets it through."""
    try:
        schema = onnx.defs.get_schema(n.op_type, graph.opsets.get(n.domain, 1), n.domain)
    except onnx.defs.SchemaError:
        return
    formal = list(schema.inputs)
    if not formal:
        return
    bound: dict[str, tuple[str, str]] = {}
    for i, name in enumerate(n.inputs):
        param = formal[min(i, len(formal) - 1)]
        if i >= len(formal) and param.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
            break
        if not name or name not in graph.values or not param.is_homogeneous:
            continue
        dtype = graph.values[name].dtype
        first = bound.setdefault(param.type_str, (name, dtype))
        if first[1] != dtype:
            raise _bad(n, f"inputs '{first[0]}' ({first[1]}) and '{name}' ({dtype}) must have "
                          f"one element type (the schema's {param.type_str})")


def _bad(node: Node, what: str) -> InvalidModelError:
    return InvalidModelError(f"node '{node.name}' ({node.op_type}): {what}")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_values(n: Node) -> None:
    for key in _FLAGS.get(n.op_type, ()):
        if key in n.attrs and n.attrs[key] not in (0, 1):
            raise _bad(n, f"attribute {key} is {n.attrs[key]}, must be 0 or 1")
    for key, choices in _CHOICES.items():
        name = key if isinstance(key, str) else key[1]
        if (isinstance(key, tuple) and key[0] != n.op_type) or name not in n.attrs:
            continue
        if _text(n.attrs[name]) not in choices:
            raise _bad(n, f"attribute {name} is '{_text(n.attrs[name])}', must be one of "
                          f"{', '.join(choices)}")
    if n.op_type in _WINDOWED:
        for key in ("strides", "dilations", "kernel_shape"):
            if any(int(v) <= 0 for v in n.attrs.get(key) or ()):
                raise _bad(n, f"attribute {key} is {list(n.attrs[key])}, must be positive")
        if n.op_type != "ConvTranspose" and any(int(p) < 0 for p in n.attrs.get("pads") or ()):
            raise _bad(n, f"attribute pads is {list(n.attrs['pads'])}, must not be negative")
    if n.op_type == "DepthToSpace" and int(n.attrs.get("blocksize", 0)) <= 0:
        raise _bad(n, f"attribute blocksize is {n.attrs.get('blocksize')}, must be positive")
    if n.op_type == "Conv" and int(n.attrs.get("group", 1)) <= 0:
        raise _bad(n, f"attribute group is {n.attrs['group']}, must be positive")


def _check_shapes(graph: Graph, n: Node) -> None:
    rank = len(graph.shape(n.inputs[0])) if n.inputs and n.inputs[0] in graph.values else 0
    if n.op_type in _AXIS and "axis" in n.attrs:
        axis = int(n.attrs["axis"])
        if not -rank <= axis < rank:
            raise _bad(n, f"attribute axis is {axis}, outside [{-rank}, {rank - 1}] for a "
                          f"rank-{rank} input")
    if n.op_type == "Flatten" and "axis" in n.attrs:
        axis = int(n.attrs["axis"])
        if not -rank <= axis <= rank:
            raise _bad(n, f"attribute axis is {axis}, outside [{-rank}, {rank}]")
    if n.op_type == "Transpose" and n.attrs.get("perm") is not None:
        perm = [int(p) for p in n.attrs["perm"]]
        if sorted(perm) != list(range(rank)):
            raise _bad(n, f"attribute perm {perm} is not a permutation of the {rank} axes")
    if n.op_type in _WINDOWED:
        _check_window(graph, n, rank)


def _check_window(graph: Graph, n: Node, rank: int) -> None:
    spatial = max(rank - 2, 0)
    for key in ("strides", "dilations", "kernel_shape"):
        values = n.attrs.get(key)
        if values is None:
            continue
        if len(values) != spatial:
            raise _bad(n, f"attribute {key} has {len(values)} values for {spatial} spatial axes")
    pads = n.attrs.get("pads")
    if pads is not None and len(pads) != 2 * spatial:
        raise _bad(n, f"attribute pads has {len(pads)} values, {2 * spatial} expected")
    if n.op_type != "Conv" or len(n.inputs) < 2 or n.inputs[1] not in graph.values:
        return
    group = int(n.attrs.get("group", 1))
    w = graph.shape(n.inputs[1])
    x = graph.shape(n.inputs[0])
    if x[1] % group or w[0] % group:
        raise _bad(n, f"attribute group is {group}: it must divide the {x[1]} input and "
                      f"{w[0]} output channels")
    if w[1] * group != x[1]:
        raise _bad(n, f"weight {list(w)} with group {group} reads {w[1] * group} channels, "
                      f"the input has {x[1]}")
    kernel = n.attrs.get("kernel_shape")
    if kernel is not None and list(map(int, kernel)) != list(w[2:]):
        raise _bad(n, f"attribute kernel_shape {list(kernel)} differs from the weight's "
                      f"{list(w[2:])}")
    if len(n.inputs) > 2 and n.inputs[2] and graph.shape(n.inputs[2]) != (w[0],):
        raise _bad(n, f"bias has shape {list(graph.shape(n.inputs[2]))}, expected [{w[0]}]")
