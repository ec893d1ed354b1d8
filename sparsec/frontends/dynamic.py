"""Dynamic shapes: a model whose named dimensions (ONNX ``dim_param``: ``batch_size``,
``sequence_length``, ...) stay symbolic through compilation, each within a declared range.

ONNX models compute their run-time shapes in the graph (``Shape -> Gather -> Concat ->
Reshape``), and TVM's ONNX importer loses track of symbolic shapes in most of those chains
(every tensor downstream of such a ``Reshape`` has an unknown shape). So before the import,
:func:`symbolic_shapes` reads every shape computation off ONNX Runtime runs of the model at a
few probe sizes and fits each computed value as a multilinear polynomial of the dynamic dims
(``batch * seq * 4``, ``seq``, ``64``), checked at one more probe. Values that do not vary
become constants; the others become one ``SymShape`` node each, which the importer turns into
a Relax shape of the symbolic dims (``targets/backend.py``). The shape subgraphs are then dead
and removed. A computed shape that is not such a polynomial is refused
(``DynamicShapeError``).
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec.errors import BadOptionError, DynamicShapeError

#: the custom op the importer turns into a symbolic shape (``targets/backend.py``)
SYMSHAPE_OP, SYMSHAPE_DOMAIN = "SparsecSymShape", "ai.sparsec"
#: probe sizes per dynamic dim: two for the fit, one to check it (primes: no coincidences
#: with the model's own sizes; 1 is avoided, where broadcasting could hide a dim)
_PROBES = (3, 5, 7)
#: shape-valued tensors are small integer vectors
_SHAPE_DTYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)

#: (op, input slot) that takes a shape: the importer gets a symbolic shape there
_SHAPE_SLOTS = {("Reshape", 1), ("Expand", 1), ("ConstantOfShape", 0), ("Range", 0),
                ("Range", 1), ("Range", 2), ("Tile", 1), ("Slice", 1), ("Slice", 2),
                ("Slice", 3), ("Slice", 4)}

Ranges = dict[str, tuple[int, int]]


def parse_dynamic(text: str | dict | None) -> Ranges:
    """``"batch=1..32,seq=1..512"`` (or a dict of pairs) -> {"batch": (1, 32), ...}."""
    if not text:
        return {}
    if isinstance(text, dict):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for item in str(text).split(","):
            m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+)\s*\.\.\s*(\d+)\s*", item)
            if m is None:
                raise BadOptionError(f"bad --dynamic entry '{item.strip()}': expected "
                                     f"NAME=MIN..MAX, e.g. batch_size=1..32")
            items.append((m[1], (int(m[2]), int(m[3]))))
    ranges: Ranges = {}
    for name, value in items:
        try:
            lo, hi = (int(v) for v in value)
        except (TypeError, ValueError):
            raise BadOptionError(f"dynamic dim '{name}' needs a (min, max) pair, "
                                 f"got {value!r}") from None
        if not 1 <= lo <= hi:
            raise BadOptionError(f"dynamic dim '{name}': range {lo}..{hi} must satisfy "
                                 f"1 <= min <= max")
        ranges[name] = (lo, hi)
    return ranges


def dim_params(model: onnx.ModelProto) -> dict[str, list[tuple[str, int]]]:
    """Each ``dim_param`` of the graph inputs -> the (input, axis) places it sizes."""
    init = {t.name for t in model.graph.initializer}
    found: dict[str, list[tuple[str, int]]] = {}
    for v in model.graph.input:
        if v.name in init:
            continue
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") and d.dim_param:
                found.setdefault(d.dim_param, []).append((v.name, axis))
    return found


def check_ranges(model: onnx.ModelProto, ranges: Ranges) -> None:
    """Every name in ``ranges`` is a dim_param of the model's inputs, and every symbolic input
    dim is named: a one-line error listing the model's own names otherwise."""
    params = dim_params(model)
    shown = ", ".join(sorted(params)) or "none"
    unknown = sorted(set(ranges) - set(params))
    if unknown:
        raise BadOptionError(f"--dynamic names unknown dim(s) {', '.join(unknown)} (the "
                             f"model's dynamic dims: {shown})")
    init = {t.name for t in model.graph.initializer}
    loose = [f"{v.name}[{a}]" for v in model.graph.input if v.name not in init
             for a, d in enumerate(v.type.tensor_type.shape.dim)
             if not d.HasField("dim_value") and d.dim_param not in ranges]
    if loose:
        raise DynamicShapeError(f"input dim(s) {', '.join(loose)} are dynamic but not in "
                                f"--dynamic (the model's dynamic dims: {shown}); give each "
                                f"a range, or fix the model")


def input_shapes(model: onnx.ModelProto, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The graph inputs' concrete shapes when each dynamic dim has the size in ``sizes``."""
    init = {t.name for t in model.graph.initializer}
    return {v.name: tuple(d.dim_value if d.HasField("dim_value") else sizes[d.dim_param]
                          for d in v.type.tensor_type.shape.dim)
            for v in model.graph.input if v.name not in init}


@dataclass(frozen=True)
class Poly:
    """A multilinear integer polynomial of the dynamic dims: ``{(): c, ("b",): c, ("b", "s"): c}``."""

    terms: tuple[tuple[tuple[str, ...], int], ...]

    def __call__(self, sizes: dict[str, int]) -> int:
        return sum(c * int(np.prod([sizes[n] for n in mono], dtype=np.int64))
                   for mono, c in self.terms)


def check_sizes(ranges: Ranges) -> list[dict[str, int]]:
    """The sizes a dynamic package is checked at: both ends of every range, and a size in the
    middle, dims moving together (min, mid, max) plus one mixed corner."""
    names = sorted(ranges)
    lo = {n: ranges[n][0] for n in names}
    hi = {n: ranges[n][1] for n in names}
    mid = {n: (ranges[n][0] + ranges[n][1] + 1) // 2 for n in names}
    shapes = [lo, mid, hi]
    if len(names) > 1:
        shapes.append({n: hi[n] if i == 0 else lo[n] for i, n in enumerate(names)})
    out: list[dict[str, int]] = []
    for s in shapes:
        if s not in out:
            out.append(s)
    return out


def _shape_valued(model: onnx.ModelProto, ok=lambda name: True) -> set[str]:
    """Tensors computed from shapes and constants only (``Shape`` outputs and what is computed
    from them), not from any input's values; with ``ok``, only tensors it accepts."""
    consts = {t.name for t in model.graph.initializer}
    derived: set[str] = set()
    for node in model.graph.node:        # ONNX nodes are topologically sorted
        if node.op_type == "Constant":
            consts.update(node.output)
        elif not all(ok(o) for o in node.output if o):
            continue
        elif node.op_type in ("Shape", "Size"):
            derived.update(node.output)
        elif (node.input and all(not i or i in consts or i in derived for i in node.input)
              and any(i in derived for i in node.input)):
            derived.update(node.output)
    return derived


def _frontier(model: onnx.ModelProto, derived: set[str]) -> list[str]:
    """Shape-valued tensors that real computation reads (or the graph returns)."""
    used = {i for n in model.graph.node
            if not (n.output and n.output[0] in derived) for i in n.input}
    used |= {o.name for o in model.graph.output}
    return sorted(derived & used)


def _probe_sizes(lo: int, hi: int) -> tuple[int, int, int]:
    """Three distinct sizes to fit and check a dim's shape values at: 3, 5, 7 when the range
    holds them, else three sizes of at least 2 inside the range, else 3, 5, 7 anyway (a
    range too narrow to probe inside)."""
    if lo <= _PROBES[0] and _PROBES[-1] <= hi:
        return _PROBES
    inside = list(range(max(lo, 2), hi + 1))
    if len(inside) >= 3:
        return inside[0], inside[len(inside) // 2], inside[-1]
    return _PROBES


def _probe(model: onnx.ModelProto, names: list[str], sizes: dict[str, int]
           ) -> list[np.ndarray]:
    from sparsec import reference
    from sparsec.ir.onnx_io import MAX_IR_VERSION, tensor_dtype

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.ir_version = min(probe.ir_version, MAX_IR_VERSION)
    del probe.graph.output[:]
    for name in names:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for v in model.graph.input:
        if v.name in init:
            continue
        shape = input_shapes(model, sizes)[v.name]
        dtype = tensor_dtype(v.type.tensor_type.elem_type)
        # ones: valid token ids, a full attention mask, no NaNs
        feeds[v.name] = np.ones(shape, dtype=dtype)
    try:
        return reference.session(probe).run(names, feeds)
    except Exception as e:  # noqa: BLE001 - ORT's errors for a model that does not run
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DynamicShapeError(f"the model does not run at {sizes}: {first}") from None


def _fit(names: list[str], samples: list[tuple[dict[str, int], np.ndarray]]) -> Poly | None:
    """The multilinear polynomial through the first 2^k samples (a grid), checked on the rest."""
    monos = [m for r in range(len(names) + 1) for m in itertools.combinations(names, r)]
    grid = samples[:len(monos)]
    a = np.array([[np.prod([s[n] for n in m]) for m in monos] for s, _ in grid], dtype=float)
    y = np.array([float(v) for _, v in grid])
    coef = np.linalg.solve(a, y)
    rounded = np.rint(coef).astype(np.int64)
    if not np.allclose(coef, rounded, atol=1e-6):
        return None
    poly = Poly(tuple((m, int(c)) for m, c in zip(monos, rounded) if c != 0))
    if any(poly(s) != int(v) for s, v in samples):
        return None
    return poly


def symbolic_shapes(model: onnx.ModelProto, ranges: Ranges) -> onnx.ModelProto:
    """A copy of ``model`` whose shape computations are constants or ``SymShape`` nodes
    (module docstring); the model's own outputs are unchanged at every size."""
    names = sorted(ranges)
    model = out = _constants_as_initializers(model)
    candidates = sorted(_shape_valued(model))
    if not candidates:
        return out
    sizes = {n: _probe_sizes(*ranges[n]) for n in names}
    grid = [dict(zip(names, combo))
            for combo in itertools.product(*(sizes[n][:2] for n in names))]
    probes = grid + [{n: sizes[n][2] for n in names}]
    probed = [_probe(model, candidates, sizes) for sizes in probes]
    # shape values are small integer vectors of one length at every size (a Range's output
    # or a table row gathered by position is data, computed from shape values)
    by_name = {name: [v[j] for v in probed] for j, name in enumerate(candidates)}
    small = {name for name, seen in by_name.items()
             if all(s.shape == seen[0].shape and s.dtype.kind in "iub" and s.ndim <= 1
                    for s in seen)}
    frontier = _frontier(model, _shape_valued(model, small.__contains__))
    values = [[by_name[name][p] for name in frontier] for p in range(len(probes))]
    places = dim_params(model)
    carriers = sorted({places[n][0][0] for n in names})   # inputs the SymShape nodes read
    axes = {n: (carriers.index(places[n][0][0]), places[n][0][1]) for n in names}
    replace: dict[str, list[onnx.NodeProto] | onnx.TensorProto] = {}
    shape_uses = {name for n in model.graph.node for slot, name in enumerate(n.input)
                  if (n.op_type, slot) in _SHAPE_SLOTS}
    renamed: set[str] = set()
    bad = []
    for j, name in enumerate(frontier):
        seen = [v[j] for v in values]
        if all(np.array_equal(s, seen[0]) for s in seen):
            replace[name] = numpy_helper.from_array(seen[0], name)
            continue
        polys = []
        for k in range(seen[0].size):
            poly = _fit(names, [(p, v.reshape(-1)[k]) for p, v in zip(probes, seen)])
            if poly is None:
                bad.append(name)
                break
            polys.append(poly)
        else:
            attrs = dict(domain=SYMSHAPE_DOMAIN, polys=repr([list(p.terms) for p in polys]),
                         dims=repr(axes), scalar=int(seen[0].ndim == 0),
                         dtype=str(seen[0].dtype))
            # a symbolic shape where an op takes a shape, a run-time tensor where it is data
            made = [helper.make_node(SYMSHAPE_OP, carriers, [name], name=f"sparsec_sym_{j}",
                                     tensor=1, **attrs)]
            if name in shape_uses:
                renamed.add(name)
                made.append(helper.make_node(SYMSHAPE_OP, carriers, [f"{name}__shape"],
                                             name=f"sparsec_symshape_{j}", tensor=0, **attrs))
            replace[name] = made
    if bad:
        raise DynamicShapeError(
            f"shape computation(s) {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} are "
            f"not polynomial in the dynamic dims {', '.join(names)}; the model cannot be "
            f"compiled with dynamic shapes")
    nodes = []
    for node in out.graph.node:
        produced = [o for o in node.output if o in replace]
        if produced:
            for o in produced:
                r = replace.pop(o)
                if isinstance(r, onnx.TensorProto):
                    out.graph.initializer.append(r)
                else:
                    nodes.extend(r)
            continue
        for slot, name in enumerate(node.input):
            if (node.op_type, slot) in _SHAPE_SLOTS and name in renamed:
                node.input[slot] = f"{name}__shape"
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(_live(out, _fold_constant_of_shape(out, nodes)))
    if not any(o.domain == SYMSHAPE_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(SYMSHAPE_DOMAIN, 1))
    return out


def _constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``Constant`` nodes (tensor values) are initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        attr = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in attr:
            t = onnx.TensorProto()
            t.CopyFrom(attr["value"].t)
            t.name = node.output[0]
            out.graph.initializer.append(t)
            continue
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _fold_constant_of_shape(model: onnx.ModelProto, nodes: list[onnx.NodeProto]
                            ) -> list[onnx.NodeProto]:
    """``ConstantOfShape`` of a now constant shape as the constant (TVM's importer fails on a
    scalar one)."""
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in nodes:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64).tolist()
            attr = {a.name: a for a in node.attribute}
            fill = (numpy_helper.to_array(attr["value"].t).reshape(-1)[:1] if "value" in attr
                    else np.zeros(1, np.float32))
            model.graph.initializer.append(numpy_helper.from_array(
                np.full(shape, fill[0], dtype=fill.dtype), node.output[0]))
            continue
        keep.append(node)
    return keep


def _live(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` less those whose outputs nothing reads (dead shape subgraphs)."""
    needed = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    init = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(init)
    return keep


def read_dynamic(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """The ONNX model for a dynamic compile: read with its weights (external data files
    too), model-local functions inlined (a copy)."""
    from sparsec.frontends.onnx import has_external_data, load_weights, read_model

    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        proto = read_model(model)
        if has_external_data(proto):
            load_weights(proto, Path(model).parent)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    return proto
