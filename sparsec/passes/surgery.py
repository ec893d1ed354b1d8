"""The one applier: removes channel-group slices from a Graph. Nothing else changes structure.

A plan maps group ids (of a ``DependencyGraph`` built on the same graph) to the channel indices
to keep. ``axis_keep`` turns it into the kept element indices of every axis that shrinks (a
group's channel can be a block of elements, and one axis can hold several groups side by side,
e.g. a Concat output). ``apply_plan`` slices every weight along those axes, re-derives the
constants that depend on sizes (Reshape targets, Slice bounds, Split sizes, conv ``group`` and
GroupNorm ``num_groups``, identity Gather indices), then re-infers every tensor shape. The input
graph is not touched.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from sparsec.analysis.depgraph import DependencyGraph, slice_ranges
from sparsec.ir.graph import Graph, Node

Plan = dict[int, np.ndarray]
AxisKeep = dict[tuple[str, int], np.ndarray]


def axis_keep(graph: Graph, dg: DependencyGraph, plan: Plan) -> AxisKeep:
    """Kept element indices of every (tensor or weight, axis) that the plan shrinks."""
    dropped: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    sizes: dict[tuple[str, int], int] = {}
    for gid, keep in sorted(plan.items()):
        group = dg.groups[gid]
        keep = np.unique(np.asarray(keep, dtype=np.int64))
        if group.frozen and not group.hidden_prunable:
            raise ValueError(f"group {gid} is frozen: {group.frozen[0]}")
        if keep.size == 0 or keep[0] < 0 or keep[-1] >= group.size:
            raise ValueError(f"group {gid}: kept indices must be a non-empty subset of "
                             f"0..{group.size - 1}")
        drop = np.setdiff1d(np.arange(group.size), keep)
        for m in group.members:
            elems = m.start + drop[:, None] * m.block + np.arange(m.block)[None, :]
            dropped[(m.name, m.axis)].append(elems.ravel())
            sizes[(m.name, m.axis)] = dg.size(m.dim)
    return {key: np.setdiff1d(np.arange(sizes[key]), np.concatenate(parts))
            for key, parts in dropped.items() if any(p.size for p in parts)}


def apply_plan(graph: Graph, dg: DependencyGraph, plan: Plan) -> Graph:
    """Copy of ``graph`` with, for every group in ``plan``, only the kept channels."""
    assert dg.graph is graph, "plan must come from a dependency graph of this graph"
    keep = axis_keep(graph, dg, plan)
    out = graph.copy(arrays=False)         # kept slices are new arrays (np.take)
    for (name, axis), kept in sorted(keep.items()):
        if name in out.initializers:
            out.set_initializer(name, np.take(out.initializers[name], kept, axis=axis))
    uses = out.consumers()
    for node in out.nodes:
        _FIXUPS.get(node.op_type, _no_fixup)(out, graph, node, keep, uses)
    return reinfer_shapes(out)


Order = dict[int, np.ndarray]


def apply_order(graph: Graph, dg: DependencyGraph, order: Order) -> Graph:
    """Copy of ``graph`` with each listed group's channels in a new order: channel ``j`` of the
    result is channel ``order[gid][j]`` of the input. Every member weight is permuted the same
    way, so the function the graph computes is unchanged; sizes do not change, so no constant
    needs a fixup (Slice / Split offsets never cross a group, whose channels are one run)."""
    assert dg.graph is graph, "order must come from a dependency graph of this graph"
    index: dict[tuple[str, int], np.ndarray] = {}
    for gid, perm in sorted(order.items()):
        group, perm = dg.groups[gid], np.asarray(perm, dtype=np.int64)
        if group.frozen:
            raise ValueError(f"group {gid} is frozen: {group.frozen[0]}")
        if not np.array_equal(np.sort(perm), np.arange(group.size)):
            raise ValueError(f"group {gid}: an order must be a permutation of 0..{group.size - 1}")
        for m in group.params:
            idx = index.setdefault((m.name, m.axis), np.arange(dg.size(m.dim)))
            span = slice(m.start, m.start + group.size * m.block)
            idx[span] = (m.start + perm[:, None] * m.block + np.arange(m.block)).ravel()
    out = graph.copy()
    for (name, axis), idx in sorted(index.items()):
        out.set_initializer(name, np.take(out.initializers[name], idx, axis=axis))
    return out


# ---------------------------------------------------------------- size-dependent constants
def _set_const(graph: Graph, node: Node, slot: int, value: np.ndarray,
               uses: dict[str, list[Node]]) -> None:
    """Give ``node`` input ``slot`` a new constant value, copying it first if it is shared."""
    name = node.inputs[slot]
    if len(uses.get(name, [])) > 1:
        name = f"{name}__{node.name}"
        node.inputs[slot] = name
    graph.set_initializer(name, value)


def _no_fixup(*_args) -> None:
    pass


def _groups(node: Node, attr: str, keep: AxisKeep) -> None:
    """Grouped conv / GroupNorm: the group count is what the analysis' virtual axis kept."""
    kept = keep.get((f"{node.outputs[0]}#groups", 0))
    if kept is not None:
        node.attrs[attr] = int(kept.size)


def _conv(out: Graph, orig: Graph, node: Node, keep: AxisKeep, uses) -> None:
    _groups(node, "group", keep)


def _group_norm(out: Graph, orig: Graph, node: Node, keep: AxisKeep, uses) -> None:
    _groups(node, "num_groups", keep)


def _sizes_at(slot: int):
    """Input ``slot`` is a constant naming the output's sizes (aligned right: Reshape targets,
    Expand shapes incl. GQA's KV-head count, Resize ``sizes``): each entry that is the literal
    size of an axis that shrank (not -1, 0 or a broadcast 1) becomes the kept count."""
    def fixup(out: Graph, orig: Graph, node: Node, keep: AxisKeep, uses) -> None:
        _sizes_follow(out, orig, node, keep, uses, slot)
    return fixup


def _sizes_follow(out: Graph, orig: Graph, node: Node, keep: AxisKeep, uses, slot: int) -> None:
    y = node.outputs[0]
    if len(node.inputs) <= slot or node.inputs[slot] not in out.initializers:
        return
    target = out.initializers[node.inputs[slot]].copy()
    offset = len(orig.shape(y)) - len(target)
    changed = False
    for d in range(len(target)):
        axis = d + offset
        if (y, axis) in keep and target[d] == orig.shape(y)[axis]:
            target[d] = keep[(y, axis)].size
            changed = True
    if changed:
        _set_const(out, node, slot, target, uses)


def _gather(out: Graph, orig: Graph, node: Node, keep: AxisKeep, uses) -> None:
    data, idx = node.inputs[0], node.inputs[1]
    axis = int(node.attr("axis", 0)) % len(orig.shape(data))
    if (data, axis) not in keep or idx not in out.initializers:
        return
    old = out.initializers[idx]
    shape = [keep[(data, axis)].size if d != 1 else 1 for d in old.shape]
    _set_const(out, node, 1, np.arange(keep[(data, axis)].size, dtype=old.dtype).reshape(shape),
               uses)


def _slice(out: Graph, orig: Graph, node: Node, keep: AxisKeep, uses) -> None:
    x = node.inputs[0]
    ranges = slice_ranges(orig, node)
    if not ranges or not any((x, ax) in keep for ax in ranges):
        return
    starts = out.initializers[node.inputs[1]].copy()
    ends = out.initializers[node.inputs[2]].copy()
    axes_name = node.inputs[3] if len(node.inputs) > 3 else ""
    axes = out.initializers[axes_name] if axes_name else np.arange(len(starts))
    rank = len(orig.shape(x))
    for k, a in enumerate(axes):
        a = int(a) % rank
        if (x, a) in keep:
            start, stop, _ = ranges[a]
            kept = keep[(x, a)]
            starts[k] = np.searchsorted(kept, start)
            ends[k] = np.searchsorted(kept, stop)
    _set_const(out, node, 1, starts, uses)
    _set_const(out, node, 2, ends, uses)


def _split(out: Graph, orig: Graph, node: Node, keep: AxisKeep, uses) -> None:
    x = node.inputs[0]
    rank = len(orig.shape(x))
    axis = int(node.attr("axis", 0)) % rank
    if (x, axis) not in keep:
        return
    sizes = np.array([keep[(y, axis)].size if (y, axis) in keep else orig.shape(y)[axis]
                      for y in node.outputs], dtype=np.int64)
    if len(node.inputs) > 1 and node.inputs[1]:
        _set_const(out, node, 1, sizes, uses)
    elif "split" in node.attrs:
        node.attrs["split"] = [int(s) for s in sizes]
    else:  # equal split by num_outputs: make the sizes explicit
        node.attrs.pop("num_outputs", None)
        name = f"{node.name}__split"
        out.set_initializer(name, sizes)
        node.inputs[1:] = [name]


_FIXUPS = {"Conv": _conv, "Reshape": _sizes_at(1), "Expand": _sizes_at(1),
           "Resize": _sizes_at(3), "Gather": _gather, "Slice": _slice, "Split": _split,
           "GroupNormalization": _group_norm}


def reinfer_shapes(graph: Graph) -> Graph:
    """Recompute every intermediate shape after surgery (inputs and weights are authoritative)."""
    from sparsec import reference
    from sparsec.errors import InvalidModelError
    from sparsec.frontends.onnx import infer_shapes
    from sparsec.ir.onnx_io import from_onnx

    # the weights stay where they are: the model inferred only names the large ones
    proto, weights = reference.skeleton(graph, with_value_info=False)
    try:
        fresh = from_onnx(infer_shapes(proto, weights=weights), weights)
    except InvalidModelError as e:   # the input ran: a graph the surgery broke is our bug
        raise RuntimeError(f"the pruned graph does not run in ONNX Runtime ({e})") from None
    fresh.name, fresh.producer, fresh.metadata = graph.name, graph.producer, graph.metadata
    return fresh
