"""Dependency graph and channel groups (the DepGraph idea, on the sparsec IR).

Every axis of every tensor and weight is a node ``(kind, name, axis)`` of an undirected networkx
graph, ``kind`` being ``"t"`` (activation) or ``"p"`` (parameter). An edge says "these two axes
are the same index space": removing index i from one requires removing index i from the other.
Op rules (one per op kind, see ``sparsec.ir.ops``) add the edges. The connected components are
then exactly the sets of slices that must be removed together; a component that contains the
output-channel axis of a weight op (a *source*: Conv/Gemm/MatMul output features) is a channel
group.

A group is *frozen*, with a reason, when any of its axes touches something the analysis cannot
prune exactly-structurally: a graph input or output, an op without a rule, a normalization whose
statistics run over the axis, a reshape that splits the axis, a grouped convolution, ... Frozen
groups are reported and never pruned: the analysis may be conservative, never wrong.

Edits other than slicing that pruning a group requires (a depthwise conv's ``group`` attribute,
a literal entry of a Reshape's target shape) are recorded with the group, so that one applier
(``sparsec.passes.surgery``) can do all the surgery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from sparsec.ir import ops
from sparsec.ir.graph import Graph, Node

Dim = tuple[str, str, int]  # ("t" | "p", tensor name, axis)


@dataclass(frozen=True)
class Edit:
    """A non-slicing change pruning a group needs: set ``node``'s ``what`` to the kept count.
    ``what`` is ``"group"`` (Conv attribute), ``"reshape:<param>:<index>"`` (a literal entry of a
    Reshape target) or ``"arange:<param>:<axis>"`` (an identity Gather index, re-made as
    ``arange(kept)`` along that axis)."""

    node: str
    what: str


@dataclass
class Group:
    """Axes that must be pruned together, all of ``size`` channels, index-aligned."""

    id: int
    size: int
    dims: list[Dim]
    sources: list[str]                       # weights whose output channels these are
    params: list[tuple[str, int]]            # (initializer, axis) slices removed with the group
    consumer_params: list[tuple[str, int]] = field(default_factory=list)  # input-channel slices
    edits: list[Edit] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1

    def as_dict(self) -> dict:
        return {"id": self.id, "size": self.size, "sources": self.sources,
                "params": [f"{p}[axis {a}]" for p, a in self.params],
                "prunable": self.prunable, "frozen": self.frozen}


class DependencyGraph:
    """Builds the axis graph of ``graph`` and its channel groups (``self.groups``)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nx = nx.Graph()
        self._frozen: dict[Dim, list[str]] = {}
        self._sources: set[Dim] = set()
        self._edits: dict[Dim, list[Edit]] = {}
        self._consumers: set[Dim] = set()
        for name in graph.inputs:
            self.freeze_all(name, "graph input")
        for name in graph.outputs:
            self.freeze_all(name, "graph output")
        for node in graph.nodes:
            _RULES[ops.op_kind(node.op_type)](self, node)
        self.groups = self._collect_groups()

    # ------------------------------------------------------------- rule helpers
    def dim(self, name: str, axis: int) -> Dim:
        rank = len(self.graph.shape(name))
        axis = axis + rank if axis < 0 else axis
        d: Dim = ("p" if self.graph.is_param(name) else "t", name, axis)
        self.nx.add_node(d)
        return d

    def couple(self, a: str, a_axis: int, b: str, b_axis: int) -> None:
        if not a or not b:
            return
        da, db = self.dim(a, a_axis), self.dim(b, b_axis)
        if self.graph.shape(a)[da[2]] != self.graph.shape(b)[db[2]]:
            self.freeze(da, "axis sizes disagree")
            self.freeze(db, "axis sizes disagree")
            return
        self.nx.add_edge(da, db)

    def freeze(self, d: Dim, reason: str) -> None:
        self.nx.add_node(d)
        reasons = self._frozen.setdefault(d, [])
        if reason not in reasons:
            reasons.append(reason)

    def freeze_all(self, name: str, reason: str) -> None:
        if name:
            for axis in range(len(self.graph.shape(name))):
                self.freeze(self.dim(name, axis), reason)

    def source(self, name: str, axis: int) -> None:
        """Mark a weight axis that *produces* channels (Conv/Gemm/MatMul output features)."""
        self._sources.add(self.dim(name, axis))

    def consumer(self, name: str, axis: int) -> None:
        """Mark a weight axis that *reads* the channel (a Conv/Gemm/MatMul input-channel axis)."""
        self._consumers.add(self.dim(name, axis))

    def edit(self, name: str, axis: int, edit: Edit) -> None:
        self._edits.setdefault(self.dim(name, axis), []).append(edit)

    def const(self, name: str) -> np.ndarray | None:
        return self.graph.initializers.get(name) if name else None

    # ------------------------------------------------------------- groups
    def _collect_groups(self) -> list[Group]:
        groups = []
        comps = [sorted(c) for c in nx.connected_components(self.nx)]
        comps = [c for c in comps if any(d in self._sources for d in c)]
        for comp in sorted(comps):
            sizes = {self.graph.shape(d[1])[d[2]] for d in comp}
            frozen = []
            for d in comp:
                for r in self._frozen.get(d, []):
                    msg = f"{r} ({d[1]})"
                    if msg not in frozen:
                        frozen.append(msg)
            if len(sizes) != 1:
                frozen.append("axis sizes disagree")
            groups.append(Group(
                id=len(groups),
                size=min(sizes),
                dims=comp,
                sources=sorted({d[1] for d in comp if d in self._sources}),
                params=[(d[1], d[2]) for d in comp if d[0] == "p"],
                consumer_params=[(d[1], d[2]) for d in comp if d in self._consumers],
                edits=sorted({e for d in comp for e in self._edits.get(d, [])},
                             key=lambda e: (e.node, e.what)),
                frozen=frozen,
            ))
        return groups

    def group_of(self, name: str, axis: int) -> Group | None:
        d = self.dim(name, axis)
        return next((g for g in self.groups if d in g.dims), None)


# ----------------------------------------------------------------- op rules
def _identity(dg: DependencyGraph, a: str, b: str) -> None:
    for axis in range(len(dg.graph.shape(b))):
        dg.couple(a, axis, b, axis)


def _unary(dg: DependencyGraph, n: Node) -> None:
    _identity(dg, n.inputs[0], n.outputs[0])
    for extra in n.outputs[1:]:  # e.g. Dropout's mask
        if extra:
            _identity(dg, n.inputs[0], extra)


def _broadcast(dg: DependencyGraph, n: Node) -> None:
    out = n.outputs[0]
    out_shape = dg.graph.shape(out)
    for name in n.inputs:
        if not name:
            continue
        shape = dg.graph.shape(name)
        offset = len(out_shape) - len(shape)
        for axis, size in enumerate(shape):
            out_size = out_shape[axis + offset]
            if size == out_size and not (size == 1 and out_size != 1):
                dg.couple(name, axis, out, axis + offset)


def _conv(dg: DependencyGraph, n: Node) -> None:
    x, w = n.inputs[0], n.inputs[1]
    b = n.inputs[2] if len(n.inputs) > 2 else ""
    y = n.outputs[0]
    dg.couple(x, 0, y, 0)
    if dg.const(w) is None:
        for name in (x, w, y):
            dg.freeze_all(name, "convolution weights are not constant")
        return
    group = int(n.attr("group", 1))
    cin, cout = dg.graph.shape(x)[1], dg.graph.shape(y)[1]
    if group == 1:
        dg.couple(y, 1, w, 0)
        dg.source(w, 0)
        dg.couple(x, 1, w, 1)
        dg.consumer(w, 1)
    elif group == cin == cout and dg.graph.shape(w)[1] == 1:  # depthwise: channels pass through
        dg.couple(x, 1, y, 1)
        dg.couple(y, 1, w, 0)
        dg.edit(y, 1, Edit(n.name, "group"))
    else:
        dg.freeze(dg.dim(x, 1), f"grouped convolution (group={group})")
        dg.freeze(dg.dim(y, 1), f"grouped convolution (group={group})")
        dg.couple(y, 1, w, 0)
        dg.source(w, 0)
    if b:
        dg.couple(y, 1, b, 0)


def _gemm(dg: DependencyGraph, n: Node) -> None:
    a, w, y = n.inputs[0], n.inputs[1], n.outputs[0]
    c = n.inputs[2] if len(n.inputs) > 2 else ""
    trans_a, trans_b = int(n.attr("transA", 0)), int(n.attr("transB", 0))
    if trans_a or dg.const(w) is None:
        for name in (a, w, y):
            dg.freeze_all(name, "Gemm with transA or non-constant B")
    else:
        dg.couple(a, 0, y, 0)
        dg.couple(a, 1, w, 1 if trans_b else 0)
        dg.consumer(w, 1 if trans_b else 0)
        dg.couple(y, 1, w, 0 if trans_b else 1)
        dg.source(w, 0 if trans_b else 1)
    if c:
        c_shape = dg.graph.shape(c)
        out_shape = dg.graph.shape(y)
        for axis, size in enumerate(c_shape):
            out_axis = axis + len(out_shape) - len(c_shape)
            if size == out_shape[out_axis] and size != 1:
                dg.couple(c, axis, y, out_axis)


def _matmul(dg: DependencyGraph, n: Node) -> None:
    a, w, y = n.inputs[0], n.inputs[1], n.outputs[0]
    wv = dg.const(w)
    if wv is None or wv.ndim != 2 or dg.const(a) is not None:
        for name in (a, w, y):
            dg.freeze_all(name, "MatMul without a constant 2-D right operand")
        return
    a_rank, y_rank = len(dg.graph.shape(a)), len(dg.graph.shape(y))
    for axis in range(a_rank - 1):
        dg.couple(a, axis, y, axis + y_rank - a_rank)
    dg.couple(a, -1, w, 0)
    dg.consumer(w, 0)
    dg.couple(y, -1, w, 1)
    dg.source(w, 1)


def _channel_norm(dg: DependencyGraph, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    _identity(dg, x, y)
    for p in n.inputs[1:]:
        if p:
            dg.couple(y, 1, p, 0)


def _axis_norm(dg: DependencyGraph, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    rank = len(dg.graph.shape(x))
    if n.op_type in ("LayerNormalization", "RMSNormalization"):
        first = int(n.attr("axis", -1)) % rank
    else:
        first = 1
    reason = f"{n.op_type} statistics run over this axis"
    _identity(dg, x, y)
    for axis in range(first, rank):
        dg.freeze(dg.dim(x, axis), reason)
    for p in n.inputs[1:]:
        if p:
            dg.freeze_all(p, reason)
            p_rank = len(dg.graph.shape(p))
            for axis in range(p_rank):
                dg.couple(p, axis, y, axis + rank - p_rank)


def _pool(dg: DependencyGraph, n: Node) -> None:
    dg.couple(n.inputs[0], 0, n.outputs[0], 0)
    dg.couple(n.inputs[0], 1, n.outputs[0], 1)


def _reduce_axes(dg: DependencyGraph, n: Node, rank: int) -> list[int] | None:
    if n.op_type in ("ArgMax", "ArgMin"):
        return [int(n.attr("axis", 0)) % rank]
    axes = n.attr("axes")
    if axes is None and len(n.inputs) > 1 and n.inputs[1]:
        const = dg.const(n.inputs[1])
        if const is None:
            return None
        axes = const.tolist()
    if not axes:
        return None if int(n.attr("noop_with_empty_axes", 0)) == 0 else []
    return sorted(int(a) % rank for a in axes)


def _reduce(dg: DependencyGraph, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    rank = len(dg.graph.shape(x))
    axes = _reduce_axes(dg, n, rank)
    if axes is None:
        dg.freeze_all(x, f"{n.op_type} over all axes")
        dg.freeze_all(y, f"{n.op_type} over all axes")
        return
    keepdims = int(n.attr("keepdims", 1))
    out_axis = 0
    for axis in range(rank):
        if axis in axes:
            dg.freeze(dg.dim(x, axis), f"{n.op_type} reduces over this axis")
            out_axis += keepdims
            continue
        dg.couple(x, axis, y, out_axis)
        out_axis += 1


def _softmax(dg: DependencyGraph, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    rank = len(dg.graph.shape(x))
    axis = int(n.attr("axis", -1)) % rank
    _identity(dg, x, y)
    dg.freeze(dg.dim(x, axis), f"{n.op_type} normalizes over this axis")


def _reshape_segments(src: tuple[int, ...], dst: tuple[int, ...]):
    """Pair up runs of non-unit axes with equal element counts: [(src_axes, dst_axes), ...]."""
    s_axes = [i for i, d in enumerate(src) if d != 1]
    d_axes = [i for i, d in enumerate(dst) if d != 1]
    segments, i, j = [], 0, 0
    while i < len(s_axes) and j < len(d_axes):
        si, dj = [s_axes[i]], [d_axes[j]]
        ps, pd = src[s_axes[i]], dst[d_axes[j]]
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd:
                ps *= src[s_axes[i]]
                si.append(s_axes[i])
                i += 1
            else:
                pd *= dst[d_axes[j]]
                dj.append(d_axes[j])
                j += 1
        segments.append((si, dj))
    return segments


def _reshape(dg: DependencyGraph, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    src, dst = dg.graph.shape(x), dg.graph.shape(y)
    target = None
    if n.op_type == "Reshape":
        target = dg.const(n.inputs[1])
        if target is None:
            dg.freeze_all(x, "Reshape target shape is computed at run time")
            dg.freeze_all(y, "Reshape target shape is computed at run time")
            return
    if math.prod(src) != math.prod(dst):
        dg.freeze_all(x, "reshape changes the element count")
        return
    for s_axes, d_axes in _reshape_segments(src, dst):
        if len(s_axes) == 1 and len(d_axes) == 1:
            dg.couple(x, s_axes[0], y, d_axes[0])
            if target is not None and int(target[d_axes[0]]) > 0:
                dg.edit(y, d_axes[0], Edit(n.name, f"reshape:{n.inputs[1]}:{d_axes[0]}"))
        else:
            for axis in s_axes:
                dg.freeze(dg.dim(x, axis), f"{n.op_type} splits or merges this axis")
            for axis in d_axes:
                dg.freeze(dg.dim(y, axis), f"{n.op_type} splits or merges this axis")


def _transpose(dg: DependencyGraph, n: Node) -> None:
    rank = len(dg.graph.shape(n.inputs[0]))
    perm = n.attr("perm") or list(reversed(range(rank)))
    for out_axis, in_axis in enumerate(perm):
        dg.couple(n.inputs[0], int(in_axis), n.outputs[0], out_axis)


def _pad(dg: DependencyGraph, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    rank = len(dg.graph.shape(x))
    pads = dg.const(n.inputs[1]) if len(n.inputs) > 1 else None
    axes_in = dg.const(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] else None
    if pads is None:
        dg.freeze_all(x, "Pad amounts are computed at run time")
        return
    axes = [int(a) % rank for a in axes_in] if axes_in is not None else list(range(rank))
    padded = {ax for k, ax in enumerate(axes) if pads[k] != 0 or pads[k + len(axes)] != 0}
    for axis in range(rank):
        if axis not in padded:
            dg.couple(x, axis, y, axis)


def _gather(dg: DependencyGraph, n: Node) -> None:
    data, idx, y = n.inputs[0], n.inputs[1], n.outputs[0]
    rank, ishape = len(dg.graph.shape(data)), dg.graph.shape(idx)
    axis = int(n.attr("axis", 0)) % rank
    for ax in range(rank):
        if ax != axis:
            dg.couple(data, ax, y, ax if ax < axis else ax + len(ishape) - 1)
    size = dg.graph.shape(data)[axis]
    const = dg.const(idx)
    if const is None:
        for pos in range(len(ishape)):
            dg.couple(idx, pos, y, axis + pos)
        dg.freeze(dg.dim(data, axis), "Gather indexes this axis")
        return
    long_axes = [pos for pos, d in enumerate(ishape) if d != 1]
    if (size > 1 and const.size == size and len(long_axes) == 1
            and np.array_equal(const.ravel(), np.arange(size))):
        pos = long_axes[0]
        dg.couple(data, axis, y, axis + pos)
        dg.edit(y, axis + pos, Edit(n.name, f"arange:{idx}:{pos}"))
    else:
        dg.freeze(dg.dim(data, axis), "Gather indexes this axis")
        for pos in range(len(ishape)):
            dg.freeze(dg.dim(y, axis + pos), "Gather indexes this axis")


def _shape(dg: DependencyGraph, n: Node) -> None:
    dg.freeze_all(n.inputs[0], f"its shape is read at run time ({n.op_type})")


def _opaque(dg: DependencyGraph, n: Node) -> None:
    reason = f"{n.op_type} has no dependency rule yet"
    for name in n.inputs + n.outputs:
        dg.freeze_all(name, reason)


_RULES = {
    "unary": _unary, "broadcast": _broadcast, "conv": _conv, "gemm": _gemm, "matmul": _matmul,
    "channel_norm": _channel_norm, "axis_norm": _axis_norm, "pool": _pool, "reduce": _reduce,
    "softmax": _softmax, "reshape": _reshape, "transpose": _transpose, "pad": _pad,
    "gather": _gather, "shape": _shape, "opaque": _opaque,
}
assert set(_RULES) == set(ops.OP_KIND.values())
