"""Conversion between ONNX protobufs and the sparsec IR, both directions, losslessly.

``from_onnx`` expects a model whose graph inputs are static and whose value shapes are known
(the ONNX frontend takes care of that); ``to_onnx`` writes a model that ONNX Runtime loads.
Constant nodes are folded into initializers on the way in (their value is already a weight).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from sparsec.ir.graph import Graph, Node, Value

# The newest IR version the pinned onnxruntime reads; onnx 1.23 writes 14 by default.
MAX_IR_VERSION = 10


def tensor_dtype(onnx_type: int) -> str:
    """ONNX element type -> numpy dtype name."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type)).name


def elem_type(dtype: str) -> int:
    """numpy dtype name -> ONNX element type."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _attr_value(attr: AttributeProto) -> Any:
    if attr.type == AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    if attr.type == AttributeProto.TENSORS:
        return [numpy_helper.to_array(t) for t in attr.tensors]
    value = helper.get_attribute_value(attr)
    return list(value) if isinstance(value, (list, tuple)) or hasattr(value, "extend") else value


def _make_attr(key: str, value: Any, attr_type: int | None) -> AttributeProto:
    if isinstance(value, np.ndarray):
        return helper.make_attribute(key, numpy_helper.from_array(value))
    if attr_type == AttributeProto.TENSORS:
        return helper.make_attribute(key, [numpy_helper.from_array(v) for v in value],
                                     attr_type=attr_type)
    return helper.make_attribute(key, value, attr_type=attr_type)


def _shape_of(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}


def from_onnx(model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None) -> Graph:
    """ONNX model (static shapes everywhere) -> Graph. Raises ``ValueError`` naming any tensor
    whose shape is unknown; callers resolve shapes first (see ``sparsec.frontends.onnx``).
    ``arrays``: the values of initializers the model only names (``reference.skeleton``)."""
    g = model.graph
    arrays = arrays or {}
    initializers = {t.name: arrays[t.name] if t.name in arrays else numpy_helper.to_array(t)
                    for t in g.initializer}
    nodes: list[Node] = []
    for i, n in enumerate(g.node):
        attrs = {a.name: _attr_value(a) for a in n.attribute}
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and "value" in attrs:
            initializers[n.output[0]] = np.asarray(attrs["value"])
            continue
        nodes.append(Node(
            op_type=n.op_type, inputs=list(n.input), outputs=list(n.output), attrs=attrs,
            name=n.name or f"{n.op_type}_{i}", domain=n.domain,
            attr_types={a.name: int(a.type) for a in n.attribute},
        ))
    values: dict[str, Value] = {}
    for name, arr in initializers.items():
        values[name] = Value(name, tuple(int(d) for d in arr.shape), arr.dtype.name)
    missing = []
    infos = value_infos(model)
    for name in [x for n in nodes for x in n.outputs + n.inputs] + [v.name for v in g.input]:
        if not name or name in values:
            continue
        vi = infos.get(name)
        shape = _shape_of(vi) if vi is not None else None
        if shape is None or not vi.type.tensor_type.elem_type:
            missing.append(name)
            continue
        values[name] = Value(name, shape, tensor_dtype(vi.type.tensor_type.elem_type))
    if missing:
        raise ValueError(f"shapes unknown for {len(missing)} tensor(s): {', '.join(missing[:5])}")
    return Graph(
        name=g.name or "model",
        inputs=[v.name for v in g.input if v.name not in initializers],
        outputs=[v.name for v in g.output],
        nodes=nodes,
        initializers=initializers,
        values=values,
        opsets={o.domain: int(o.version) for o in model.opset_import},
        ir_version=int(model.ir_version),
        producer=model.producer_name or "",
        metadata={p.key: p.value for p in model.metadata_props},
    )


def to_onnx(graph: Graph, *, with_value_info: bool = True) -> onnx.ModelProto:
    """Graph -> ONNX model that the pinned ONNX Runtime loads (IR version capped)."""

    def vinfo(name: str) -> onnx.ValueInfoProto:
        v = graph.values[name]
        return helper.make_tensor_value_info(name, elem_type(v.dtype), list(v.shape))

    nodes = []
    for n in graph.nodes:
        proto = helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name, domain=n.domain)
        proto.attribute.extend(_make_attr(k, v, n.attr_types.get(k)) for k, v in n.attrs.items())
        nodes.append(proto)
    io = set(graph.inputs) | set(graph.outputs)
    inner = [] if not with_value_info else [
        vinfo(o) for n in graph.nodes for o in n.outputs
        if o and o not in io and o in graph.values
    ]
    g = helper.make_graph(
        nodes, graph.name,
        inputs=[vinfo(i) for i in graph.inputs],
        outputs=[vinfo(o) for o in graph.outputs],
        initializer=[numpy_helper.from_array(a, name) for name, a in graph.initializers.items()],
        value_info=inner,
    )
    model = helper.make_model(
        g, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(graph.opsets.items())],
        producer_name=graph.producer or "sparsec",
    )
    model.ir_version = min(graph.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
    for k, v in sorted(graph.metadata.items()):
        model.metadata_props.add(key=k, value=v)
    return model


__all__ = ["from_onnx", "to_onnx", "value_infos", "tensor_dtype", "elem_type", "MAX_IR_VERSION"]
