"""ONNX frontend: a file (or ModelProto) -> a static-shaped sparsec Graph.

Steps: read (clear errors for a missing file or a file that is not ONNX), inline model-local
functions, refuse ops outside the core set (all of them listed at once), pin graph input shapes
(``input_shapes`` fixes symbolic dimensions; anything still dynamic is refused), infer every
tensor's shape with ONNX shape inference, and, where that leaves gaps (shape-computing
subgraphs), read the missing shapes off one ONNX Runtime execution of the pinned model.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from sparsec.errors import (BadOptionError, DynamicShapeError, InputNotFoundError,
                            InvalidModelError, UnsupportedOpError)
from sparsec.frontends.checks import check_attribute_values, check_attributes, check_proto
from sparsec.frontends.normalize import normalize
from sparsec.ir import ops
from sparsec.ir.graph import Graph, Node
from sparsec.ir.onnx_io import MAX_IR_VERSION, from_onnx, tensor_dtype, value_infos

InputShapes = dict[str, tuple[int, ...]]


def parse_input_shapes(text: str | None) -> InputShapes:
    """``"x:1x3x224x224,mask:1x128"`` -> {"x": (1, 3, 224, 224), "mask": (1, 128)}."""
    shapes: InputShapes = {}
    if not text:
        return shapes
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise BadOptionError(
                f"bad --input-shapes entry '{item}': expected NAME:D1xD2x... with positive dims"
            ) from None
        shapes[name] = shape
    return shapes


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """An ONNX file. Tensors it keeps in external data files are left there (their names,
    types and shapes are read) and the file is checked by its path: :func:`load_onnx` works on
    such a model without its weights, whatever its size, and reads them last
    (:func:`read_weights`, from the file's directory)."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"model file not found: {p}")
    if not p.is_file():
        raise InputNotFoundError(f"model path is not a file: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises several unrelated types for garbage input
        raise InvalidModelError(f"{p} is not a valid ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise InvalidModelError(f"{p} is not a valid ONNX model (no graph)")
    if has_external_data(model):
        check_proto(str(p), str(p))          # by path: the checker reads the data files there
    return model


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def load_weights(model: onnx.ModelProto, base: Path) -> None:
    """Read the tensors ``model`` keeps in external data files (relative to ``base``) into it."""
    from onnx.external_data_helper import load_external_data_for_model

    try:
        load_external_data_for_model(model, str(base))
    except Exception as e:  # noqa: BLE001 - a missing or short data file
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise InvalidModelError(f"cannot read the model's external data: {first}") from None


def read_weights(model: onnx.ModelProto, base: Path) -> dict[str, np.ndarray]:
    """The tensors ``model`` keeps in external data files (relative to ``base``), read
    straight into arrays (``from_onnx``'s ``arrays``): the protobuf never holds them, so
    loading a large model holds its weights once, not twice (the message's bytes and the
    arrays made from them). The file was checked by path (``read_model``)."""
    out = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        path = base / info.get("location", "")
        count = int(np.prod(t.dims, dtype=np.int64))
        try:
            with open(path, "rb") as f:
                f.seek(int(info.get("offset", 0)))
                arr = np.fromfile(f, dtype=np.dtype(tensor_dtype(t.data_type)), count=count)
        except (OSError, ValueError, TypeError) as e:
            raise InvalidModelError(f"cannot read the model's external data for "
                                    f"'{t.name}': {e}") from None
        if arr.size != count:
            raise InvalidModelError(f"cannot read the model's external data: {path.name} ends "
                                    f"before the end of '{t.name}'")
        out[t.name] = arr.reshape(tuple(t.dims))
    return out


def _unsupported_ops(model: onnx.ModelProto) -> dict[str, int]:
    bad: Counter[str] = Counter()
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            continue
        if not ops.is_supported(n.op_type, n.domain):
            bad[f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type] += 1
    return dict(bad)


def _pin_inputs(model: onnx.ModelProto, input_shapes: InputShapes) -> None:
    init = {t.name for t in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in init]
    unknown = sorted(set(input_shapes) - {v.name for v in graph_inputs})
    if unknown:
        names = ", ".join(v.name for v in graph_inputs)
        raise BadOptionError(f"--input-shapes names unknown input(s) {', '.join(unknown)} "
                             f"(model inputs: {names})")
    dynamic = []
    for v in graph_inputs:
        dims = v.type.tensor_type.shape.dim
        if v.name in input_shapes:
            shape = input_shapes[v.name]
            if len(shape) != len(dims):
                raise BadOptionError(f"--input-shapes gives {v.name} rank {len(shape)}, "
                                     f"the model expects rank {len(dims)}")
            for d, size in zip(dims, shape):
                if d.HasField("dim_value") and d.dim_value != size:
                    raise BadOptionError(f"--input-shapes gives {v.name} dim {size} where the "
                                         f"model fixes {d.dim_value}")
                d.dim_value = size
        if any(not d.HasField("dim_value") for d in dims):
            shown = "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                             for d in dims)
            dynamic.append(f"{v.name}[{shown}]")
    if dynamic:
        raise DynamicShapeError(
            f"dynamic input shape(s) {', '.join(dynamic)}: fix them with --input-shapes "
            f"NAME:D1xD2x... (e.g. {graph_inputs[0].name}:1x...)")


def _fill_shapes_with_onnxruntime(model: onnx.ModelProto, base: Path | None = None,
                                  weights=None) -> onnx.ModelProto:
    """Shapes ONNX inference could not derive, read off one ONNX Runtime run of the model
    (``base``: where the files of its external data are; ``weights``: the arrays of a
    ``reference.skeleton``'s placeholders)."""
    from sparsec import reference

    infos = value_infos(model)
    init = {t.name for t in model.graph.initializer}
    known = {n for n, vi in infos.items()
             if vi.type.tensor_type.elem_type and all(
                 d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)
             and vi.type.tensor_type.HasField("shape")}
    missing = [o for n in model.graph.node for o in n.output
               if o and o not in known and o not in init]
    if not missing:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.ir_version = min(probe.ir_version, MAX_IR_VERSION)
    declared = {o.name: o for o in model.graph.output}
    for name in missing:
        if name not in declared:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = reference.session(probe, external_dir=base, weights=weights)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        feeds[vi.name] = np.zeros([d.dim_value for d in tt.shape.dim],
                                  dtype=tensor_dtype(tt.elem_type))
    outs = sess.run(missing, feeds)
    for name, arr in zip(missing, outs):
        info = onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
        if name in declared:                     # a graph output declared without a shape
            declared[name].CopyFrom(info)
        else:
            model.graph.value_info.append(info)
    return model


def _does_not_run(e: Exception) -> InvalidModelError:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return InvalidModelError(f"model does not run in ONNX Runtime: {first}")


def infer_shapes(model: onnx.ModelProto, base: Path | None = None,
                 weights=None) -> onnx.ModelProto:
    """Model with a concrete shape for every tensor (inputs must already be static). A model
    over protobuf's 2 GB is inferred without its weights (shape inference reads shapes);
    ``base``: where the files of a model's external data are; ``weights``: the arrays of a
    ``reference.skeleton``'s placeholders."""
    from sparsec.frontends.external_data import too_big, without_weights

    try:
        if too_big(model):    # the shapes inferred go into the model, which keeps its weights
            with without_weights(model):
                shapes = onnx.shape_inference.infer_shapes(model, strict_mode=False,
                                                           data_prop=True).graph
            inferred = model
            del inferred.graph.value_info[:]
            inferred.graph.value_info.extend(shapes.value_info)
            for out, shaped in zip(inferred.graph.output, shapes.output):
                out.CopyFrom(shaped)
        else:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False,
                                                         data_prop=True)
    except Exception as e:
        raise InvalidModelError(f"ONNX shape inference failed: {str(e).splitlines()[0]}") from None
    try:
        return _fill_shapes_with_onnxruntime(inferred, base, weights)
    except Exception as e:
        raise _does_not_run(e) from None


def untie_constant_initializers(graph: Graph) -> Graph:
    """Give each user of a shared, constant-valued float initializer its own copy (exact).

    Exporters deduplicate identical initializers, so every zero bias or unit norm scale of an
    untrained or freshly initialized model becomes one shared tensor, and the dependency
    analysis would have to prune all its users together. Such sharing is an accident of export:
    copies make the users independent. Shared initializers with varying values are real ties
    (e.g. tied embeddings) and stay shared.
    """
    users: dict[str, list[tuple[Node, int]]] = {}
    for node in graph.nodes:
        for slot, name in enumerate(node.inputs):
            if name in graph.initializers:
                users.setdefault(name, []).append((node, slot))
    for name, uses in users.items():
        arr = graph.initializers[name]
        if len(uses) < 2 or arr.dtype.kind != "f" or arr.size < 2 or not np.all(arr == arr.flat[0]):
            continue
        for node, slot in uses[1:]:
            copy_name = f"{name}__{node.name}"
            graph.set_initializer(copy_name, arr.copy())
            node.inputs[slot] = copy_name
    return graph


def load_onnx(model: str | os.PathLike | onnx.ModelProto,
              input_shapes: InputShapes | None = None) -> Graph:
    """Read an ONNX file or proto into a static-shaped Graph (the input is never modified)."""
    base = None
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:       # external data: checked by path, the graph worked on without its weights
        proto = read_model(model)
        base = Path(model).parent if has_external_data(proto) else None
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    bad = _unsupported_ops(proto)
    if bad:
        raise UnsupportedOpError(bad)
    check_attribute_values(proto)
    _pin_inputs(proto, input_shapes or {})
    proto = infer_shapes(proto, base)
    if base is None:
        check_proto(proto, "the model")
    arrays = None if base is None else read_weights(proto, base)
    try:
        graph = from_onnx(proto, arrays)
    except ValueError as e:
        raise InvalidModelError(str(e)) from None
    del proto       # ours (read or copied): the graph has the weights now, free the protobuf's
    check_attributes(graph)
    return untie_constant_initializers(normalize_exactly(graph))


def normalize_exactly(graph: Graph) -> Graph:
    """``normalize.normalize`` (constant folding, Pad fusion, ...), proven on this model: the
    normalized graph must give the input graph's outputs in ONNX Runtime on seeded inputs.
    Should it not (a bug), the graph is used as it was, and its notes say why."""
    from sparsec import reference
    from sparsec.passes.manager import EXACT_REL_TOL

    new, report = normalize(graph)
    if not report.changed:
        return graph
    feeds = reference.random_inputs(graph, seed=0)
    try:
        before = reference.run(graph, feeds)
    except Exception as e:
        raise _does_not_run(e) from None
    fid = reference.compare(before, reference.run(new, feeds))
    if not fid.max_rel_err <= EXACT_REL_TOL:
        graph.notes["normalize"] = {"skipped": f"folding moved outputs by {fid.max_rel_err:.3g}"}
        return graph
    new.notes["normalize"] = {**report.as_dict(), "summary": report.summary(),
                              "max_rel_err": fid.max_rel_err}
    return new
