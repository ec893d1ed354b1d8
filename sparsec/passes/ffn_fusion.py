"""FFN fusion (lossy): a run of consecutive FFN blocks becomes one wider FFN on the run's input.

"FFN Fusion: Rethinking Sequential Computation in Large Language Models" (Bercovich et al.):
once attention blocks are gone (``RemoveAttention``), FFN blocks follow one another, and each
changes the hidden state little, so they can be evaluated side by side on the run's input x0:

    pre-norm   x_k = x_{k-1} + F_k(norm_k(x_{k-1}))   ->   x0 + sum_k F_k(norm_k(x0))
    post-norm  x_k = LN_k(x_{k-1} + F_k(x_{k-1}))     ->   LN_last(x0 + sum_k F_k(x0))

(the post-norms inside the run are dropped). That parallel form is one FFN of the summed width:
the norm's affine part (scale g, shift b) folds into each up-projection, W' = diag(g) W and
b' = b + beta W, so all blocks read one normalized tensor; the up-projections concatenate along
their outputs (gate and up separately for gated FFNs), the activation applies to the wide
tensor, and the down-projections concatenate along their inputs, which sums their outputs.
k blocks of u up-projections each go from k (u + 1) GEMMs to u + 1, with the same MACs but
wider, better-shaped GEMMs.

Blocks are read from the graph, not from names: a block's branch must be [affine norm] -> up
linears (MatMul / Gemm with constant weights, reshapes and bias adds around them) -> an
elementwise region -> one down linear. ``parallel_run`` builds the parallel form by rewiring
only (the reference the tests hold the fused graph to); ``fuse_run`` builds the wide FFN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparsec import reference
from sparsec.errors import BadOptionError
from sparsec.ir.graph import Graph, Node, Value
from sparsec.ir.ops import op_kind
from sparsec.passes.layer_removal import Block, _rewire, angular_distance, find_blocks
from sparsec.passes.manager import PassContext
from sparsec.passes.reconstruct import _as_matrix

_REGION_KINDS = ("unary", "broadcast")


@dataclass
class Linear:
    """y = x @ weight + bias along the last axis, however the graph spells it."""
    weight: np.ndarray      # [in, out]
    bias: np.ndarray        # [out]
    input: str              # tensor read (before any reshape that keeps the last axis)
    output: str             # tensor written (after bias adds and such reshapes)
    nodes: list[str]        # names of the nodes this linear consists of


@dataclass
class FFN:
    block: Block
    norm: str                       # "none", "affine" (Mul/Add by constants) or "layernorm"
    normalized: str                 # the tensor the affine part scales (t)
    scale: np.ndarray | None
    shift: np.ndarray | None
    ups: list[Linear]
    region: list[Node]              # the elementwise code between ups and down, in order
    down: Linear
    branch: list[str] = field(default_factory=list)   # every node of the branch
    ln: Node | None = None          # the LayerNormalization node (norm == "layernorm")

    @property
    def width(self) -> int:
        return self.ups[0].weight.shape[1]


def _const(graph: Graph, name: str) -> np.ndarray | None:
    return graph.initializers.get(name) if name else None


def _keeps_last(graph: Graph, node: Node) -> bool:
    """Identity-like along the last axis: Identity, Dropout, or a Reshape that keeps it."""
    if node.op_type in ("Identity", "Dropout"):
        return True
    return node.op_type == "Reshape" and \
        graph.shape(node.inputs[0])[-1] == graph.shape(node.outputs[0])[-1]


def _linear(graph: Graph, node: Node, producers, consumers) -> Linear | None:
    """The linear layer ``node`` (MatMul or Gemm with a constant weight) belongs to."""
    w = _const(graph, node.inputs[1])
    if node.op_type == "MatMul":
        if w is None or w.ndim != 2 or node.inputs[0] in graph.initializers:
            return None
        weight, bias = w, np.zeros(w.shape[1], w.dtype)
    elif node.op_type == "Gemm":
        if w is None or node.attr("transA", 0):
            return None
        weight = _as_matrix(node, w) * node.attr("alpha", 1.0)
        c = _const(graph, node.inputs[2]) if len(node.inputs) > 2 else None
        if len(node.inputs) > 2 and node.inputs[2] and c is None:
            return None
        bias = np.zeros(weight.shape[1], w.dtype) if c is None else \
            np.broadcast_to(c * node.attr("beta", 1.0), (weight.shape[1],)).astype(w.dtype)
    else:
        return None
    names = [node.name]
    x = node.inputs[0]
    while x in producers and _keeps_last(graph, producers[x]):
        names.append(producers[x].name)
        x = producers[x].inputs[0]
    y = node.outputs[0]
    while len(users := consumers.get(y, [])) == 1 and y not in graph.outputs:
        nxt = users[0]
        other = [i for i in nxt.inputs if i != y]
        if nxt.op_type == "Add" and len(other) == 1 and (c := _const(graph, other[0])) \
                is not None and c.size in (1, weight.shape[1]) and c.shape[-1:] in (
                (1,), (weight.shape[1],), ()):
            bias = bias + c.reshape(-1)
        elif not _keeps_last(graph, nxt):
            break
        names.append(nxt.name)
        y = nxt.outputs[0]
    return Linear(weight, np.asarray(bias, weight.dtype), x, y, names)


def extract_ffn(graph: Graph, block: Block) -> FFN | None:
    """``block`` read as an FFN, or None when its branch has another form."""
    if block.attention:
        return None
    producers, consumers = graph.producers(), graph.consumers()
    add = producers.get(block.add)
    if add is None or add.op_type != "Add" or block.start not in add.inputs[:2]:
        return None
    f = add.inputs[1] if add.inputs[0] == block.start else add.inputs[0]
    branch, stack = {}, [f]          # name -> node, every node between start and f
    while stack:
        t = stack.pop()
        node = producers.get(t)
        if t == block.start or node is None or node.name in branch or \
                node.name not in block.nodes:
            continue
        branch[node.name] = node
        stack.extend(i for i in node.inputs if i and i not in graph.initializers)
    linears = [lin for n in branch.values() if n.op_type in ("MatMul", "Gemm")
               if (lin := _linear(graph, n, producers, consumers)) is not None]
    downs = [lin for lin in linears if lin.output == f]
    ups = [lin for lin in linears if lin.output != f]
    if len(downs) != 1 or not ups or len({u.input for u in ups}) != 1 or \
            len({u.weight.shape[1] for u in ups}) != 1:
        return None
    down, u = downs[0], ups[0].input
    width = ups[0].weight.shape[1]
    if down.weight.shape[0] != width:
        return None
    in_linear = {n for lin in linears for n in lin.nodes}
    starts = {lin.output for lin in ups}
    region, seen = [], set(starts)
    order = {n.name: k for k, n in enumerate(graph.nodes)}
    for node in sorted(branch.values(), key=lambda n: order[n.name]):
        if node.name in in_linear or not any(i in seen for i in node.inputs):
            continue
        kind = op_kind(node.op_type)
        outer = [i for i in node.inputs if i and i not in seen]
        if not (kind in _REGION_KINDS or (node.op_type == "Reshape" and
                                          _keeps_last(graph, node))):
            return None
        if any(i not in graph.initializers for i in outer) or \
                graph.shape(node.outputs[0])[-1] != width:
            return None
        if kind != "reshape" and any(graph.initializers[i].size > 1 and
                                     graph.initializers[i].shape[-1] != 1 for i in outer):
            return None         # per-channel constants inside the activation: not handled
        region.append(node)
        seen.update(node.outputs)
    if down.input not in seen:
        return None
    ffn = FFN(block, "none", u, None, None, ups, region, down,
              branch=sorted(branch, key=order.get))
    if u == block.start:
        return ffn
    # the rest of the branch is the norm: exactly the code between the start and u
    rest = {n for n in branch if n not in in_linear} - {n.name for n in region}
    norm, stack = set(), [u]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and node.name in branch and node.name not in norm:
            norm.add(node.name)
            stack.extend(node.inputs)
    if norm != rest:
        return None
    p = producers[u]
    if p.op_type == "LayerNormalization" and p.inputs[0] == block.start and \
            all(_const(graph, i) is not None for i in p.inputs[1:] if i):
        ffn.norm, ffn.ln = "layernorm", p
        ffn.scale = _const(graph, p.inputs[1])
        ffn.shift = _const(graph, p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] else None
    else:
        if p.op_type == "Add" and (b := _affine_operand(graph, p)) is not None:
            ffn.shift, u = b
            p = producers.get(u)
        if p is not None and p.op_type == "Mul" and (g := _affine_operand(graph, p)) \
                is not None:
            ffn.scale, u = g
        ffn.norm, ffn.normalized = "affine", u
    d = graph.shape(block.start)[-1]
    for name in ("scale", "shift"):
        v = getattr(ffn, name)
        if v is not None:
            if not (v.size == 1 or (v.size == d and v.shape[-1] == d)):
                return None     # not along the hidden axis alone
            setattr(ffn, name, np.broadcast_to(v.reshape(-1), (d,)).astype(down.weight.dtype))
    return ffn


def _affine_operand(graph: Graph, node: Node) -> tuple[np.ndarray, str] | None:
    """(constant, other input) of a binary Mul / Add with one constant operand."""
    a, b = node.inputs[:2]
    if b in graph.initializers and a not in graph.initializers:
        return graph.initializers[b], a
    if a in graph.initializers and b not in graph.initializers:
        return graph.initializers[a], b
    return None


def _same_attrs(a: Node, b: Node) -> bool:
    return repr(sorted(a.attrs.items())) == repr(sorted(b.attrs.items()))


def _same(graph: Graph, a: str, b: str, xa: str, xb: str, producers) -> bool:
    """Whether tensors ``a`` and ``b`` compute the same function, given ``xa`` == ``xb``."""
    if a == b or (a, b) == (xa, xb):
        return True
    if a in graph.initializers or b in graph.initializers:
        ca, cb = graph.initializers.get(a), graph.initializers.get(b)
        return ca is not None and cb is not None and ca.shape == cb.shape and \
            ca.dtype == cb.dtype and bool(np.array_equal(ca, cb))
    pa, pb = producers.get(a), producers.get(b)
    if pa is None or pb is None or pa.op_type != pb.op_type or \
            len(pa.inputs) != len(pb.inputs) or pa.outputs.index(a) != pb.outputs.index(b) or \
            not _same_attrs(pa, pb):
        return False
    return all(_same(graph, i, j, xa, xb, producers) for i, j in zip(pa.inputs, pb.inputs))


def fusible(graph: Graph, blocks: list[Block], ffns: list[FFN | None] | None = None
            ) -> list[FFN] | None:
    """The blocks' FFNs (``ffns`` when already extracted) when the blocks form a run that
    ``fuse_run`` can fuse."""
    if len(blocks) < 2 or any(a.end != b.start for a, b in zip(blocks, blocks[1:])):
        return None
    if ffns is None:
        ffns = [extract_ffn(graph, b) for b in blocks]
    if any(f is None for f in ffns):
        return None
    first, producers = ffns[0], graph.producers()
    for f in ffns[1:]:
        if f.norm != first.norm or len(f.ups) != len(first.ups) or \
                len(f.region) != len(first.region) or f.down.weight.shape[1] != \
                first.down.weight.shape[1]:
            return None
        if f.norm == "layernorm" and not _same_attrs(f.ln, first.ln):
            return None
        if f.norm != "layernorm" and not _same(graph, f.normalized, first.normalized,
                                               f.block.start, first.block.start, producers):
            return None
        for p, q in zip(f.region, first.region):
            if p.op_type != q.op_type or len(p.inputs) != len(q.inputs) or \
                    not _same_attrs(p, q):
                return None
            for i, j in zip(p.inputs, q.inputs):
                if p.op_type != "Reshape" and (i in graph.initializers) != \
                        (j in graph.initializers):
                    return None
                if p.op_type != "Reshape" and i in graph.initializers and not \
                        _same(graph, i, j, "", "", producers):
                    return None
    return ffns


def fusible_runs(graph: Graph, blocks: list[Block], count: int, first: int | None = None
                 ) -> dict[int, list[FFN]]:
    """{first block index: FFNs} of every run of ``count`` blocks that can be fused (only the
    run starting at ``first`` when given, negative from the end); BadOptionError when there is
    none."""
    starts = range(len(blocks)) if first is None else [first % max(len(blocks), 1)]
    found = [extract_ffn(graph, b) for b in blocks]
    runs = {i: ffns for i in starts if i + count <= len(blocks) and (ffns := fusible(
        graph, blocks[i: i + count], found[i: i + count])) is not None}
    if not runs:
        kinds = "".join("A" if b.attention else "F" for b in blocks)
        raise BadOptionError(f"no run of {count} consecutive FFN blocks to fuse (blocks: "
                             f"{kinds or 'none'}, A = attention); remove attention blocks "
                             f"first (remove_attention)")
    return runs


def gemm_count(graph: Graph) -> int:
    """MatMul / Gemm nodes with a constant weight."""
    return sum(1 for n in graph.nodes if n.op_type in ("MatMul", "Gemm")
               and len(n.inputs) > 1 and n.inputs[1] in graph.initializers)


def parallel_run(graph: Graph, blocks: list[Block], ffns: list[FFN]) -> Graph:
    """The run evaluated side by side, by rewiring only: every branch reads the run's input and
    the post-norms inside the run are skipped (the reference ``fuse_run`` must equal)."""
    out = graph.copy()
    x0 = blocks[0].start
    for b, f in zip(blocks[1:], ffns[1:]):
        names = set(f.branch)
        for node in out.nodes:
            if node.name in names:
                node.inputs = [x0 if i == b.start else i for i in node.inputs]
    for b in blocks[:-1]:
        if b.add != b.end:
            out = _rewire(out, b.end, b.add)
    return out


def fuse_run(graph: Graph, blocks: list[Block], ffns: list[FFN], prefix: str = "fused_ffn"
             ) -> Graph:
    """One FFN of the summed width on the run's input in place of the run (module docstring)."""
    out = graph.copy()
    base, k = prefix, 1
    while any(v.startswith(f"{prefix}.") for v in graph.values):     # fused before: new names
        prefix, k = f"{base}{k}", k + 1
    x0, dtype = blocks[0].start, graph.value(blocks[0].start).dtype
    d, width = graph.shape(x0)[-1], sum(f.width for f in ffns)
    new: list[Node] = []

    def emit(op: str, inputs: list[str], name: str, shape, like: Node | None = None) -> str:
        out.values[name] = Value(name, tuple(shape), dtype)
        new.append(Node(op, inputs, [name], dict(like.attrs) if like else {}, name=name,
                        attr_types=dict(like.attr_types) if like else {}))
        return name

    def const(name: str, array: np.ndarray) -> str:
        out.set_initializer(name, np.ascontiguousarray(array))
        return name

    first = ffns[0]
    if first.norm == "layernorm":
        t = emit("LayerNormalization", [x0, const(f"{prefix}.norm.ones", np.ones(d, dtype)),
                                        const(f"{prefix}.norm.zeros", np.zeros(d, dtype))],
                 f"{prefix}.norm", graph.shape(x0), like=first.ln)
    else:
        t = first.normalized
    lead = out.shape(t)[:-1]
    mapped: dict[str, str] = {}
    for j in range(len(first.ups)):
        ws, bs = [], []
        for f in ffns:
            lin = f.ups[j]
            g = np.ones(d, dtype) if f.scale is None else f.scale
            beta = np.zeros(d, dtype) if f.shift is None else f.shift
            ws.append(g[:, None] * lin.weight)
            bs.append(lin.bias + beta @ lin.weight)
        y = emit("MatMul", [t, const(f"{prefix}.up{j}.weight", np.concatenate(ws, 1))],
                 f"{prefix}.up{j}.matmul", lead + (width,))
        y = emit("Add", [y, const(f"{prefix}.up{j}.bias", np.concatenate(bs))],
                 f"{prefix}.up{j}", lead + (width,))
        want = graph.shape(first.ups[j].output)[:-1] + (width,)
        if want != lead + (width,):
            y = emit("Reshape", [y, const(f"{prefix}.up{j}.shape", np.array(want, np.int64))],
                     f"{prefix}.up{j}.reshape", want)
        mapped[first.ups[j].output] = y
    for k, node in enumerate(first.region):
        shape = graph.shape(node.outputs[0])[:-1] + (width,)
        inputs = []
        for i in node.inputs:
            if i in mapped:
                inputs.append(mapped[i])
            elif node.op_type == "Reshape" and i == node.inputs[1]:
                inputs.append(const(f"{prefix}.r{k}.shape", np.array(shape, np.int64)))
            else:
                inputs.append(i)        # a constant shared by all blocks (checked by fusible)
        mapped[node.outputs[0]] = emit(node.op_type, inputs, f"{prefix}.r{k}", shape, node)
    h = mapped.get(first.down.input, first.down.input)
    hs = out.values[h].shape
    y = emit("MatMul", [h, const(f"{prefix}.down.weight",
                                 np.concatenate([f.down.weight for f in ffns], 0))],
             f"{prefix}.down.matmul", hs[:-1] + (d,))
    y = emit("Add", [y, const(f"{prefix}.down.bias", sum(f.down.bias for f in ffns))],
             f"{prefix}.down", hs[:-1] + (d,))
    if hs[:-1] + (d,) != graph.shape(x0):
        y = emit("Reshape", [y, const(f"{prefix}.down.shape",
                                      np.array(graph.shape(x0), np.int64))],
                 f"{prefix}.down.reshape", graph.shape(x0))
    s = emit("Add", [x0, y], f"{prefix}.residual", graph.shape(x0))
    at = next(k for k, n in enumerate(out.nodes) if blocks[-1].add in n.outputs)
    out.nodes[at:at] = new
    return _rewire(out, blocks[-1].add, s)


@dataclass
class FuseFFN:
    """Fuse ``count`` consecutive FFN blocks into one wider FFN: the run (of those that can be
    fused, or the one starting at block ``first``) whose fused model's outputs stay closest in
    angle to the original's on the calibration data."""

    count: int = 2
    first: int | None = None
    name: str = "fuse-ffn"
    exact: bool = False

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        if ctx is None:
            raise ValueError("FFN fusion needs calibration data (a PassContext)")
        if self.count < 2:
            raise ValueError(f"FFN fusion needs a run of at least 2 blocks, got {self.count}")
        blocks = find_blocks(graph)
        runs = fusible_runs(graph, blocks, self.count, self.first)
        ref = reference.activations(graph, ctx.fit, list(graph.outputs))
        scores, fused, best = {}, None, None
        for i, ffns in runs.items():
            candidate = fuse_run(graph, blocks[i: i + self.count], ffns)
            probe = reference.Probe(candidate)
            # one batch's outputs at a time; only the best candidate's graph is kept
            scores[i] = float(np.mean([
                angular_distance(ref[o][b], new[0])
                for b, feeds in enumerate(ctx.fit)
                for o, new in probe.values([feeds], list(graph.outputs)).items()]))
            del probe
            if best is None or scores[i] < scores[best]:
                best, fused = i, candidate
        ffns = runs[best]
        return fused, {
            "blocks": len(blocks), "fused": list(range(best, best + self.count)),
            "width": [f.width for f in ffns],
            "gemms_in_run": {"before": sum(len(f.ups) + 1 for f in ffns),
                             "after": len(ffns[0].ups) + 1},
            "gemms": {"before": gemm_count(graph), "after": gemm_count(fused)},
            "output_angular_distance": {str(k): round(v, 6) for k, v in scores.items()}}
