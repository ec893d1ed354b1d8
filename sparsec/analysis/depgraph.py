"""Dependency graph and channel groups (the DepGraph idea, on the sparsec IR).

Op rules state which elements of which axes are the same index space, as *links*: "channel i
of this run of axis A is channel i of that run of axis B", where a run starts at some offset
and each of its channels spans ``block`` consecutive elements. Plain elementwise coupling is a
link of two whole axes; Concat, Split and Slice link an axis to an offset range of another;
a flatten that merges channels with trailing spatial axes links each channel to a block of
H*W features.

Every axis is then cut at the boundaries of every run that touches it, and cuts propagate
through links until nothing changes. The segments between cuts are the nodes of an undirected
networkx graph, links its edges (weighted by how many elements one channel covers on each side).
A connected component that contains the output-channel axis of a weight op (a *source*:
Conv/Gemm/MatMul output features) is a channel group: its channels must be removed together,
from every member segment.

A group is *frozen*, with a reason, when any of its segments touches something the analysis
cannot prune structurally: a graph input or output, an op without a rule, a normalization whose
statistics run over the axis, a reshape that splits the axis, a grouped convolution, ... Frozen
groups are reported and never pruned: the analysis may be conservative, never wrong.

Everything pruning changes besides slicing weights (Reshape/Slice/Split constants, depthwise
``group`` attributes, arange indices) follows from the kept indices of each axis, and is redone
by the one applier (``sparsec.passes.surgery``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

import networkx as nx
import numpy as np

from sparsec.ir import ops
from sparsec.ir.graph import Graph, Node

Dim = tuple[str, str, int]  # ("t" | "p" | "v", tensor name, axis)


@dataclass(frozen=True)
class Member:
    """A group's share of one axis: elements ``start .. start + channels * block`` of
    ``name``'s ``axis``; group channel ``c`` is elements ``start + c*block .. + block``."""

    kind: str
    name: str
    axis: int
    start: int
    block: int

    @property
    def dim(self) -> Dim:
        return (self.kind, self.name, self.axis)


@dataclass
class Group:
    """Slices that must be pruned together: ``size`` channels, index-aligned in every member."""

    id: int
    size: int
    members: list[Member]
    sources: list[str]                       # weights whose output channels these are
    frozen: list[str] = field(default_factory=list)
    consumers: list[Member] = field(default_factory=list)  # weight slices that *read* them
    kind: str = "channels"   # "heads": it runs through attention's batch axes; "hidden": a
    #                          residual stream under a norm (see ``lossy``)
    #: why removing even a zero channel changes the function (a LayerNorm's statistics run
    #: over the axis): such a group is in ``frozen`` too, and ``hidden_prunable`` when that is
    #: all that holds it; only a lossy pass asked for it (``hidden_ratio``) prunes it
    lossy: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1

    @property
    def hidden_prunable(self) -> bool:
        """A hidden width whose only obstacles are norms' statistics (lossy to cut, not
        impossible): the residual stream of a transformer, a ConvNeXt's channels."""
        return self.kind == "hidden" and self.size > 1 and bool(self.lossy) and all(
            r in self.lossy for r in self.frozen)

    @property
    def params(self) -> list[Member]:
        return [m for m in self.members if m.kind == "p"]

    @property
    def tensors(self) -> list[Member]:
        return [m for m in self.members if m.kind == "t"]

    def describe(self, m: Member, graph: Graph) -> str:
        full = graph.shape(m.name)[m.axis]
        span = self.size * m.block
        where = "" if span == full else f" [{m.start}:{m.start + span}]"
        step = "" if m.block == 1 else f" x{m.block}"
        return f"{m.name}[axis {m.axis}{where}{step}]"

    def as_dict(self, graph: Graph) -> dict:
        return {"id": self.id, "kind": self.kind, "size": self.size, "sources": self.sources,
                "params": [self.describe(m, graph) for m in self.params],
                "prunable": self.prunable, "hidden_prunable": self.hidden_prunable,
                "frozen": self.frozen}


@dataclass(frozen=True)
class _Link:
    a: Dim
    a_start: int
    a_block: int
    b: Dim
    b_start: int
    b_block: int
    channels: int


class DependencyGraph:
    """Builds the segment graph of ``graph`` and its channel groups (``self.groups``)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._links: list[_Link] = []
        self._frozen: dict[Dim, list[str]] = defaultdict(list)
        self._sources: set[Dim] = set()
        self._consumers: set[Dim] = set()
        self._lossy: set[tuple[Dim, str]] = set()
        self._virtual: dict[str, int] = {}
        self._heads: set[Dim] = set()
        for name in graph.inputs:
            self.freeze_all(name, "graph input")
        for name in graph.outputs:
            self.freeze_all(name, "graph output")
        for node in graph.nodes:
            _RULES[ops.op_kind(node.op_type)](self, node)
        self.nx = nx.Graph()
        self.groups = self._collect_groups(self._segment())

    # ------------------------------------------------------------- rule helpers
    def dim(self, name: str, axis: int) -> Dim:
        if name in self._virtual:
            return ("v", name, 0)
        rank = len(self.graph.shape(name))
        return ("p" if self.graph.is_param(name) else "t", name, axis + rank if axis < 0 else axis)

    def size(self, d: Dim) -> int:
        return self._virtual[d[1]] if d[0] == "v" else self.graph.shape(d[1])[d[2]]

    def virtual(self, name: str, size: int) -> str:
        """A 1-D index space that exists in no tensor: e.g. the groups of a grouped conv, linked
        to blocks of its channels so that channels go only a whole group at a time. Its kept
        indices (``surgery.axis_keep``) give the new group count."""
        self._virtual[name] = size
        return name

    def link(self, a: str, a_axis: int, b: str, b_axis: int, *, channels: int | None = None,
             a_start: int = 0, b_start: int = 0, a_block: int = 1, b_block: int = 1) -> None:
        """Channel i of ``a``'s run is channel i of ``b``'s run (see the module docstring).
        Without ``channels`` the two whole axes are linked one to one."""
        if not a or not b:
            return
        da, db = self.dim(a, a_axis), self.dim(b, b_axis)
        if channels is None:
            if self.size(da) != self.size(db):
                self.freeze(da, "axis sizes disagree")
                self.freeze(db, "axis sizes disagree")
                return
            channels = self.size(da)
        if channels > 0:
            self._links.append(_Link(da, a_start, a_block, db, b_start, b_block, channels))

    couple = link  # whole-axis one-to-one coupling reads better at most call sites

    def freeze(self, d: Dim, reason: str) -> None:
        if reason not in self._frozen[d]:
            self._frozen[d].append(reason)

    def normalized(self, name: str, axis: int, reason: str) -> None:
        """A norm's statistics run over this axis: frozen for exact passes, prunable (lossy) as
        a hidden width."""
        self.freeze_axis(name, axis, reason)
        self._lossy.add((self.dim(name, axis), reason))

    def freeze_axis(self, name: str, axis: int, reason: str) -> None:
        if name:
            self.freeze(self.dim(name, axis), reason)

    def freeze_all(self, name: str, reason: str) -> None:
        if name:
            for axis in range(len(self.graph.shape(name))):
                self.freeze(self.dim(name, axis), reason)

    def source(self, name: str, axis: int) -> None:
        """Mark a weight axis that *produces* channels (Conv/Gemm/MatMul output features)."""
        self._sources.add(self.dim(name, axis))

    def head_axis(self, name: str, axis: int) -> None:
        """Mark a batch axis of an activation MatMul: its group is attention heads."""
        self._heads.add(self.dim(name, axis))

    def consumer(self, name: str, axis: int) -> None:
        """Mark a weight axis that *reads* channels (a Conv/Gemm/MatMul input-channel axis)."""
        self._consumers.add(self.dim(name, axis))

    def const(self, name: str) -> np.ndarray | None:
        return self.graph.initializers.get(name) if name else None

    # ------------------------------------------------------------- segmentation
    def _segment(self) -> dict[Dim, list[int]]:
        """Cut every axis at run boundaries until the cuts agree across all links."""
        cuts: dict[Dim, set[int]] = defaultdict(set)
        touching: dict[Dim, list[_Link]] = defaultdict(list)
        for ln in self._links:
            for d, start, block in ((ln.a, ln.a_start, ln.a_block), (ln.b, ln.b_start, ln.b_block)):
                cuts[d].update({0, self.size(d), start, start + ln.channels * block})
                touching[d].append(ln)
        work = list(cuts)
        while work:
            d = work.pop()
            for ln in touching[d]:
                for src, s0, sb, dst, t0, tb in ((ln.a, ln.a_start, ln.a_block, ln.b, ln.b_start,
                                                  ln.b_block),
                                                 (ln.b, ln.b_start, ln.b_block, ln.a, ln.a_start,
                                                  ln.a_block)):
                    if src != d:
                        continue
                    end = s0 + ln.channels * sb
                    for p in [c for c in cuts[src] if s0 < c < end]:
                        if (p - s0) % sb:
                            self.freeze(src, "cut inside a channel block")
                            self.freeze(dst, "cut inside a channel block")
                            continue
                        q = t0 + (p - s0) // sb * tb
                        if q not in cuts[dst]:
                            cuts[dst].add(q)
                            work.append(dst)
        return {d: sorted(c) for d, c in cuts.items()}

    def _collect_groups(self, cuts: dict[Dim, list[int]]) -> list[Group]:
        # one node per segment (dim, start, stop); edges carry elements-per-channel ratios
        for ln in self._links:
            a_end = ln.a_start + ln.channels * ln.a_block
            bounds = [c for c in cuts[ln.a] if ln.a_start <= c <= a_end]
            for lo, hi in zip(bounds, bounds[1:]):
                if (lo - ln.a_start) % ln.a_block or (hi - lo) % ln.a_block:
                    continue  # frozen above: cut inside a block
                b_lo = ln.b_start + (lo - ln.a_start) // ln.a_block * ln.b_block
                b_hi = b_lo + (hi - lo) // ln.a_block * ln.b_block
                # per group channel, the b side covers `ratio` times the a side's elements
                self.nx.add_edge((ln.a, lo, hi), (ln.b, b_lo, b_hi), a=(ln.a, lo, hi),
                                 ratio=Fraction(ln.b_block, ln.a_block))
        groups: list[Group] = []
        comps = [c for c in nx.connected_components(self.nx)
                 if any(seg[0] in self._sources for seg in c)]
        for comp in sorted((sorted(c) for c in comps)):
            groups.append(self._group(len(groups), comp))
        return groups

    def _group(self, gid: int, comp: list) -> Group:
        # elements per group channel of every segment, relative to the first one
        root = comp[0]
        scale = {root: Fraction(1)}
        for u, v in nx.bfs_edges(self.nx, root):
            edge = self.nx.edges[u, v]
            scale[v] = scale[u] * (edge["ratio"] if edge["a"] == u else 1 / edge["ratio"])
        frozen: list[str] = []
        unit = min(scale.values())
        blocks = {seg: scale[seg] / unit for seg in comp}
        if any(b.denominator != 1 for b in blocks.values()):
            frozen.append("channel blocks of different sizes meet")
        sizes = {(seg[2] - seg[1]) / blocks[seg] for seg in comp}
        if len(sizes) != 1:
            frozen.append("axis sizes disagree")
        lossy: list[str] = []
        for seg in comp:
            for r in self._frozen.get(seg[0], []):
                msg = f"{r} ({seg[0][1]})"
                if msg not in frozen:
                    frozen.append(msg)
                if (seg[0], r) in self._lossy and msg not in lossy:
                    lossy.append(msg)
        members = [Member(seg[0][0], seg[0][1], seg[0][2], seg[1], int(blocks[seg]))
                   for seg in comp]
        kind = "heads" if any(seg[0] in self._heads for seg in comp) else \
            "hidden" if lossy else "channels"
        return Group(
            id=gid,
            size=int(min(sizes)),
            members=members,
            sources=sorted({seg[0][1] for seg in comp if seg[0] in self._sources}),
            frozen=frozen,
            consumers=[m for m in members if m.dim in self._consumers],
            kind=kind,
            lossy=lossy,
        )

    def group_of(self, name: str, axis: int) -> Group | None:
        d = self.dim(name, axis)
        return next((g for g in self.groups if any(m.dim == d for m in g.members)), None)


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
    dg.couple(y, 1, w, 0)
    if group == 1:
        dg.source(w, 0)
        dg.couple(x, 1, w, 1)
        dg.consumer(w, 1)
    else:  # grouped / depthwise: conv group g maps input block g to output block g, so
        # channels go a whole conv group at a time (one channel each when depthwise)
        groups = dg.virtual(f"{y}#groups", group)
        dg.link(groups, 0, x, 1, channels=group, b_block=cin // group)
        dg.link(groups, 0, y, 1, channels=group, b_block=cout // group)
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
    if wv is None and dg.const(a) is None:
        _batched_matmul(dg, a, w, y)
        return
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


def _batched_matmul(dg: DependencyGraph, a: str, b: str, y: str) -> None:
    """A @ B of two activations (attention scores and context): batch axes pass through (the
    heads axis among them), rows of A and columns of B are Y's, and A's columns are B's rows
    (removing a contraction index from both removes one term of each sum). Batch axes wider
    than one are *head* axes. The inner axes (head_dim of Q/K and of V) are frozen: a torch
    module sizes its heads by a ``head_dim`` attribute, so only whole heads go."""
    sa, sb, sy = dg.graph.shape(a), dg.graph.shape(b), dg.graph.shape(y)
    if len(sa) < 2 or len(sb) < 2:
        for name in (a, b, y):
            dg.freeze_all(name, "MatMul of 1-D activations")
        return
    for name, shape in ((a, sa), (b, sb)):
        for axis in range(len(shape) - 2):
            out_axis = axis + len(sy) - len(shape)
            if shape[axis] == sy[out_axis]:
                dg.couple(name, axis, y, out_axis)
                if shape[axis] > 1:
                    dg.head_axis(y, out_axis)
    dg.couple(a, -2, y, -2)
    dg.couple(b, -1, y, -1)
    dg.couple(a, -1, b, -2)
    reason = "attention head_dim (only whole heads are pruned)"
    dg.freeze_axis(a, -1, reason)
    dg.freeze_axis(b, -1, reason)


def _expand(dg: DependencyGraph, n: Node) -> None:
    """Expand broadcasts axes of size 1; every other axis passes through (numpy alignment)."""
    x, y = n.inputs[0], n.outputs[0]
    if dg.const(n.inputs[1]) is None:     # the surgery could not rewrite the target shape
        dg.freeze_all(x, "Expand shape is computed at run time")
        dg.freeze_all(y, "Expand shape is computed at run time")
        return
    sx, sy = dg.graph.shape(x), dg.graph.shape(y)
    for axis, size in enumerate(sx):
        out_axis = axis + len(sy) - len(sx)
        if size == sy[out_axis] and not (size == 1 and sy[out_axis] != 1):
            dg.couple(x, axis, y, out_axis)


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
    # over the last axis alone (a transformer's hidden width, a channels-last ConvNeXt) the
    # axis can still be cut, at a cost: a hidden width (the norm's scale and bias go with it)
    width = first == rank - 1 and n.op_type in ("LayerNormalization", "RMSNormalization")
    for axis in range(first, rank):
        (dg.normalized if width else dg.freeze_axis)(x, axis, reason)
    for p in n.inputs[1:]:
        if p:
            p_rank = len(dg.graph.shape(p))
            if not width:
                dg.freeze_all(p, reason)
            elif p_rank > 1:
                for axis in range(p_rank - 1):
                    dg.freeze_axis(p, axis, reason)
            for axis in range(p_rank):
                dg.couple(p, axis, y, axis + rank - p_rank)


def _group_norm(dg: DependencyGraph, n: Node) -> None:
    """GroupNormalization: statistics run over blocks of C/G channels, so channels go a whole
    norm group at a time (the other groups' statistics stay the same)."""
    x, y = n.inputs[0], n.outputs[0]
    c, g = dg.graph.shape(x)[1], int(n.attr("num_groups"))
    _identity(dg, x, y)
    groups = dg.virtual(f"{y}#groups", g)
    dg.link(groups, 0, x, 1, channels=g, b_block=c // g)
    for p in n.inputs[1:3]:
        if p:   # opset 18: one scale per group; opset 21: one per channel
            dg.couple(p, 0, groups if dg.graph.shape(p)[0] == g else y, 0 if
                      dg.graph.shape(p)[0] == g else 1)


def _depth_to_space(dg: DependencyGraph, n: Node) -> None:
    """CRD mode: output channel c is input channels c*r*r .. (c+1)*r*r (a block); DCR mode
    interleaves channels with a stride, which no block link expresses."""
    x, y = n.inputs[0], n.outputs[0]
    dg.couple(x, 0, y, 0)
    r = int(n.attr("blocksize"))
    mode = n.attr("mode", "DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "CRD":
        dg.link(y, 1, x, 1, channels=dg.graph.shape(y)[1], b_block=r * r)
    else:
        dg.freeze_axis(x, 1, "DepthToSpace in DCR mode interleaves channels")
        dg.freeze_axis(y, 1, "DepthToSpace in DCR mode interleaves channels")


def _resize(dg: DependencyGraph, n: Node) -> None:
    """Resize/Upsample: axes it leaves the same size (batch, channels) pass through."""
    x, y = n.inputs[0], n.outputs[0]
    if len(n.inputs) > 3 and n.inputs[3] and dg.const(n.inputs[3]) is None:
        dg.freeze_all(x, f"{n.op_type} sizes are computed at run time")
        dg.freeze_all(y, f"{n.op_type} sizes are computed at run time")
        return
    for axis, (a, b) in enumerate(zip(dg.graph.shape(x), dg.graph.shape(y))):
        if a == b:
            dg.couple(x, axis, y, axis)
        else:
            dg.freeze_axis(x, axis, f"{n.op_type} rescales this axis")


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
    # a mean over the last axis kept for broadcasting back is a norm's statistic (RMSNorm and
    # LayerNorm written out as ops): a hidden width, lossy to cut like LayerNormalization's
    stat = n.op_type == "ReduceMean" and axes == [rank - 1] and keepdims == 1
    out_axis = 0
    for axis in range(rank):
        if axis in axes:
            if stat:
                dg.normalized(x, axis, "norm statistics (ReduceMean) run over this axis")
            else:
                dg.freeze_axis(x, axis, f"{n.op_type} reduces over this axis")
            out_axis += keepdims
            continue
        dg.couple(x, axis, y, out_axis)
        out_axis += 1


def _softmax(dg: DependencyGraph, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    rank = len(dg.graph.shape(x))
    axis = int(n.attr("axis", -1)) % rank
    _identity(dg, x, y)
    dg.freeze_axis(x, axis, f"{n.op_type} normalizes over this axis")


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
    """Axes pass through 1:1. Where axes are split or merged, the outermost axes of the two
    sides are linked channel-to-block (see below); the inner axes are frozen (their sizes are
    baked into the block)."""
    x, y = n.inputs[0], n.outputs[0]
    src, dst = dg.graph.shape(x), dg.graph.shape(y)
    if n.op_type == "Reshape" and dg.const(n.inputs[1]) is None:
        dg.freeze_all(x, "Reshape target shape is computed at run time")
        dg.freeze_all(y, "Reshape target shape is computed at run time")
        return
    if math.prod(src) != math.prod(dst):
        dg.freeze_all(x, "reshape changes the element count")
        return
    why = f"{n.op_type} splits or merges this axis"
    for s_axes, d_axes in _reshape_segments(src, dst):
        if len(s_axes) == 1 and len(d_axes) == 1:
            dg.couple(x, s_axes[0], y, d_axes[0])
            continue
        # In row-major order the outermost axis of a run indexes contiguous blocks: when one
        # side's outer axis divides the other's, each of its channels is a block of the other
        # (merge: conv -> flatten -> linear; split: head splits; both: GroupNorm's [N, G, -1]).
        s0, d0 = s_axes[0], d_axes[0]
        if src[s0] % dst[d0] == 0:
            dg.link(y, d0, x, s0, channels=dst[d0], b_block=src[s0] // dst[d0])
        elif dst[d0] % src[s0] == 0:
            dg.link(x, s0, y, d0, channels=src[s0], b_block=dst[d0] // src[s0])
        else:
            dg.freeze_axis(x, s0, why)
            dg.freeze_axis(y, d0, why)
        for axis in s_axes[1:]:
            dg.freeze_axis(x, axis, f"merged into a wider axis by {n.op_type}" if
                           len(d_axes) == 1 else why)
        for axis in d_axes[1:]:
            dg.freeze_axis(y, axis, f"split out of a wider axis by {n.op_type}" if
                           len(s_axes) == 1 else why)


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
        dg.freeze_all(y, "Pad amounts are computed at run time")
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
        dg.freeze_axis(data, axis, "Gather indexes this axis")
        return
    long_axes = [pos for pos, d in enumerate(ishape) if d != 1]
    if (size > 1 and const.size == size and len(long_axes) == 1
            and np.array_equal(const.ravel(), np.arange(size))):
        dg.couple(data, axis, y, axis + long_axes[0])  # identity: the index is rebuilt
    else:
        dg.freeze_axis(data, axis, "Gather indexes this axis")
        for pos in range(len(ishape)):
            dg.freeze_axis(y, axis + pos, "Gather indexes this axis")


def _part_of(dg: DependencyGraph, part: str, whole: str, axis: int, offset: int) -> None:
    """``part`` is elements ``offset ..`` of ``whole`` along ``axis``; other axes are equal."""
    for ax in range(len(dg.graph.shape(whole))):
        if ax == axis:
            dg.link(part, ax, whole, ax, channels=dg.graph.shape(part)[ax], b_start=offset)
        else:
            dg.couple(part, ax, whole, ax)


def _concat(dg: DependencyGraph, n: Node) -> None:
    y = n.outputs[0]
    axis = int(n.attr("axis")) % len(dg.graph.shape(y))
    offset = 0
    for x in n.inputs:
        _part_of(dg, x, y, axis, offset)
        offset += dg.graph.shape(x)[axis]


def _split_sizes(dg: DependencyGraph, n: Node) -> list[int] | None:
    if len(n.inputs) > 1 and n.inputs[1]:
        const = dg.const(n.inputs[1])
        return None if const is None else [int(s) for s in const]
    if n.attr("split") is not None:
        return [int(s) for s in n.attr("split")]
    return [dg.graph.shape(o)[int(n.attr("axis", 0)) % len(dg.graph.shape(o))]
            for o in n.outputs]


def _split(dg: DependencyGraph, n: Node) -> None:
    x = n.inputs[0]
    rank = len(dg.graph.shape(x))
    axis = int(n.attr("axis", 0)) % rank
    sizes = _split_sizes(dg, n)
    if sizes is None:
        for name in [x, *n.outputs]:
            dg.freeze_all(name, "Split sizes are computed at run time")
        return
    offset = 0
    for y, size in zip(n.outputs, sizes):
        _part_of(dg, y, x, axis, offset)
        offset += size


def slice_ranges(dg_or_graph, n: Node) -> dict[int, tuple[int, int, int]] | None:
    """{axis: (start, stop, step)} of a Slice with constant, clamped bounds; None if computed."""
    graph = dg_or_graph.graph if isinstance(dg_or_graph, DependencyGraph) else dg_or_graph
    shape = graph.shape(n.inputs[0])
    consts = [graph.initializers.get(i) if i else None for i in n.inputs[1:]]
    if len(consts) < 2 or consts[0] is None or consts[1] is None:
        return None
    starts, ends = consts[0], consts[1]
    axes = consts[2] if len(consts) > 2 and consts[2] is not None else np.arange(len(starts))
    steps = consts[3] if len(consts) > 3 and consts[3] is not None else np.ones(len(starts))
    if (len(consts) > 2 and n.inputs[3] and consts[2] is None) or (
            len(consts) > 3 and n.inputs[4] and consts[3] is None):
        return None
    out = {}
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) % len(shape)
        out[a] = tuple(int(v) for v in slice(int(s), int(e), int(st)).indices(shape[a]))
    return out


def _slice(dg: DependencyGraph, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    ranges = slice_ranges(dg, n)
    if ranges is None:
        dg.freeze_all(x, "Slice bounds are computed at run time")
        dg.freeze_all(y, "Slice bounds are computed at run time")
        return
    for ax in range(len(dg.graph.shape(x))):
        if ax not in ranges:
            dg.couple(x, ax, y, ax)
            continue
        start, stop, step = ranges[ax]
        if step != 1:
            dg.freeze_axis(x, ax, "strided Slice")
            dg.freeze_axis(y, ax, "strided Slice")
        else:
            dg.link(y, ax, x, ax, channels=max(stop - start, 0), b_start=start)


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
    "gather": _gather, "concat": _concat, "split": _split, "slice": _slice, "shape": _shape,
    "group_norm": _group_norm, "depth_to_space": _depth_to_space, "resize": _resize,
    "expand": _expand,
    "opaque": _opaque,
}
assert set(_RULES) == set(ops.OP_KIND.values())
