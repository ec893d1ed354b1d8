"""The one applier: removes channel-group slices from a Graph. Nothing else edits weights.

A plan maps group ids (of a ``DependencyGraph`` built on the same graph) to the channel indices
to keep. ``apply_plan`` slices every parameter axis in each group, makes the group's recorded
edits (depthwise ``group`` attributes, literal Reshape sizes), then re-derives every tensor shape
with ONNX shape inference. The input graph is not touched.
"""

from __future__ import annotations

import numpy as np

from sparsec.analysis.depgraph import DependencyGraph
from sparsec.ir.graph import Graph

Plan = dict[int, np.ndarray]


def apply_plan(graph: Graph, dg: DependencyGraph, plan: Plan) -> Graph:
    """Copy of ``graph`` with, for every group in ``plan``, only the kept channels."""
    assert dg.graph is graph, "plan must come from a dependency graph of this graph"
    out = graph.copy()
    nodes = {n.name: n for n in out.nodes}
    for gid, keep in sorted(plan.items()):
        group = dg.groups[gid]
        keep = np.asarray(sorted(int(i) for i in keep), dtype=np.int64)
        if group.frozen:
            raise ValueError(f"group {gid} is frozen: {group.frozen[0]}")
        if keep.size == 0 or keep[0] < 0 or keep[-1] >= group.size:
            raise ValueError(f"group {gid}: kept indices must be a non-empty subset of "
                             f"0..{group.size - 1}")
        if keep.size == group.size:
            continue
        for param, axis in group.params:
            out.set_initializer(param, np.take(out.initializers[param], keep, axis=axis))
        for edit in group.edits:
            kind, _, rest = edit.what.partition(":")
            if kind == "group":
                nodes[edit.node].attrs["group"] = int(keep.size)
            elif kind == "reshape":
                param, index = rest.rsplit(":", 1)
                target = out.initializers[param].copy()
                target[int(index)] = keep.size
                out.set_initializer(param, target)
            elif kind == "arange":
                param, axis = rest.rsplit(":", 1)
                old = out.initializers[param]
                shape = list(old.shape)
                shape[int(axis)] = keep.size
                out.set_initializer(param, np.arange(keep.size, dtype=old.dtype).reshape(shape))
            else:
                raise ValueError(f"unknown edit {edit.what}")
    return reinfer_shapes(out)


def reinfer_shapes(graph: Graph) -> Graph:
    """Recompute every intermediate shape after surgery (inputs and weights are authoritative)."""
    from sparsec.frontends.onnx import infer_shapes
    from sparsec.ir.onnx_io import from_onnx, to_onnx

    fresh = from_onnx(infer_shapes(to_onnx(graph, with_value_info=False)))
    fresh.name, fresh.producer, fresh.metadata = graph.name, graph.producer, graph.metadata
    return fresh
