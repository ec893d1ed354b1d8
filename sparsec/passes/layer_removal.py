"""Layer removal (lossy): drop the run of residual layers that changes the hidden state least.

"The Unreasonable Ineffectiveness of the Deeper Layers" (Gromov et al.): score every run of n
consecutive layers by the angular distance between the hidden state entering the run and the
one leaving it, arccos(cos(h_in, h_out)) / pi averaged over positions, on calibration data;
remove the run with the smallest distance.

Finding layers needs no names. The *trunk* is the chain of tensors that every path from the main
input (the input most of the graph depends on) to the output passes through: the dominators of
the output. Side inputs such as attention masks join every layer and do not count, since paths
start at the main input. Between consecutive trunk tensors lie segments; a segment that ends in
an Add reading its start (the skip connection) is a *residual block*, and the other segments
after it (a post-norm LayerNorm) belong to it. A *layer* starts at a block that contains
attention (a MatMul of two activations) and takes the attention-free blocks that follow (the
FFN); without attention anywhere (a ResNet) every block is a layer.

Removing a run rewires the readers of the run's output to its input (the two have the same
shape) and drops what nothing reads any more. With ``replace_linear`` (ReplaceMe, "Network
Simplification via Layer Pruning and Linear Transformations") the readers get ``input @ T``
instead, T fitted by least squares on the calibration data: one d x d MatMul for the whole run.

Attention removal (``RemoveAttention``) works on single blocks: the attention blocks whose input
and output are closest in angle go, the FFN blocks stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from sparsec import layerwise
from sparsec.errors import BadOptionError
from sparsec.ir.graph import Graph
from sparsec.passes.manager import PassContext


@dataclass(frozen=True)
class Block:
    """One residual block on the trunk: ``start`` -> branch -> skip Add (``add``) -> any
    post-norm -> ``end``. In a pre-norm model ``add == end``."""
    start: str
    add: str            # output of the skip-connection Add
    end: str
    nodes: frozenset    # names of the nodes inside
    attention: bool     # whether the branch multiplies two activations (attention)


@dataclass(frozen=True)
class Layer:
    start: str          # trunk tensor entering the layer
    end: str            # trunk tensor leaving it
    nodes: frozenset    # names of the nodes inside (for reports and tests)


def find_blocks(graph: Graph) -> list[Block]:
    """Residual blocks along the trunk, in order (see the module docstring)."""
    if not graph.inputs or len(graph.outputs) != 1:
        return []
    dag = nx.DiGraph()
    for node in graph.nodes:
        for i in node.inputs:
            if i and i not in graph.initializers:
                for o in node.outputs:
                    if o:
                        dag.add_edge(i, o)
    sink = graph.outputs[0]
    # the main input: the one most of the graph depends on
    source = max((i for i in graph.inputs if i in dag),
                 key=lambda i: len(nx.descendants(dag, i)), default=None)
    if source is None or sink not in dag or not nx.has_path(dag, source, sink):
        return []
    sub = dag.subgraph((nx.descendants(dag, source) & nx.ancestors(dag, sink)) | {source, sink})
    idom = nx.immediate_dominators(sub, source)
    trunk = [sink]
    while trunk[-1] != source:
        trunk.append(idom[trunk[-1]])
    trunk.reverse()
    producers = graph.producers()
    attention = {n.name for n in graph.nodes if n.op_type == "MatMul"
                 and all(i not in graph.initializers for i in n.inputs[:2])}
    segments = []   # (start, end, node names, residual?)
    for a, b in zip(trunk, trunk[1:]):
        between = nx.descendants(sub, a) & nx.ancestors(sub, b)
        names = {producers[t].name for t in between | {b} if t in producers}
        # residual: the segment ends in an Add that reads its start (the skip connection);
        # a norm also has two paths (x and its statistics) but ends in a Mul / Div
        end = producers.get(b)
        residual = bool(between) and end is not None and end.op_type == "Add" \
            and a in end.inputs
        segments.append((a, b, names, residual))
    blocks: list[list] = []
    for seg in segments:
        if seg[3] or not blocks:
            blocks.append([seg])
        else:
            blocks[-1].append(seg)      # a norm after the residual add belongs to its block
    blocks = [b for b in blocks if b[0][3]]
    if blocks:                          # the head after the last block is no part of it
        while not blocks[-1][-1][3]:
            blocks[-1].pop()
    out = []
    for segs in blocks:
        nodes = frozenset(n for s in segs for n in s[2])
        out.append(Block(segs[0][0], segs[0][1], segs[-1][1], nodes, bool(nodes & attention)))
    return out


def find_layers(graph: Graph, blocks: list[Block] | None = None) -> list[Layer]:
    """Residual layers along the trunk, in order: an attention block and the attention-free
    blocks after it (every block is a layer when there is no attention). ``blocks``: the
    graph's ``find_blocks``, when already computed."""
    blocks = find_blocks(graph) if blocks is None else blocks
    any_attention = any(b.attention for b in blocks)
    layers: list[list[Block]] = []
    for b in blocks:
        if not any_attention or b.attention or not layers:
            layers.append([b])
        else:
            layers[-1].append(b)
    out = []
    for run in layers:
        start, end = run[0].start, run[-1].end
        if graph.shape(start) != graph.shape(end):
            continue
        out.append(Layer(start, end, frozenset().union(*(b.nodes for b in run))))
    return out


def angular_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over positions of arccos(cos(a, b)) / pi, vectors along the last axis."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                      1e-12)
    return float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi))


def _mean_distances(graph: Graph, ctx: PassContext, windows: list[tuple[str, str]]
                    ) -> list[float]:
    """Per ``(start, end)`` window: :func:`angular_distance` between the two hidden states,
    averaged over the fit batches, computed along one layer-wise walk (``layerwise.pairs``:
    a hidden state is held only while a window still needs it)."""
    dists: list[list[float]] = [[] for _ in windows]
    layerwise.pairs(graph, ctx.fit, windows,
                    lambda k, _i, a, b: dists[k].append(angular_distance(a, b)))
    return [float(np.mean(d)) for d in dists]


def remove_run(graph: Graph, start: str, end: str) -> Graph:
    """Readers of ``end`` read ``start`` instead; nodes nothing reads any more are dropped."""
    return _rewire(graph, end, start)


def fit_linear(h_in: list[np.ndarray], h_out: list[np.ndarray], ridge: float = 1e-3
               ) -> np.ndarray:
    """T minimizing ||H_in T - H_out||^2 + ridge * mean(diag(H_in^T H_in)) ||T||^2 over all
    positions (vectors along the last axis): ReplaceMe's linear stand-in for removed layers.
    The normal equations are summed batch by batch (no rows of all batches at once)."""
    gram = rhs = 0.0
    for x, y in zip(h_in, h_out):
        a = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
        gram = gram + a.T @ a
        rhs = rhs + a.T @ np.asarray(y, dtype=np.float64).reshape(-1, np.shape(y)[-1])
    gram[np.diag_indices_from(gram)] += ridge * max(float(np.mean(np.diag(gram))), 1e-12)
    return np.linalg.solve(gram, rhs)


def replace_run(graph: Graph, start: str, end: str, transform: np.ndarray) -> Graph:
    """Readers of ``end`` read ``start @ transform`` instead (one MatMul for the whole run)."""
    from sparsec.ir.graph import Node, Value

    mapped, weight = f"{end}__linear", f"{end}__linear_weight"
    out = graph.copy()
    out.set_initializer(weight, transform.astype(graph.value(start).dtype))
    out.values[mapped] = Value(mapped, graph.shape(end), graph.value(end).dtype)
    first = next(k for k, n in enumerate(out.nodes) if end in n.outputs) + 1
    out.nodes.insert(first, Node("MatMul", [start, weight], [mapped], {},
                                 name=f"MatMul_{mapped}"))
    return _rewire(out, end, mapped)


def _rewire(graph: Graph, old: str, new: str) -> Graph:
    """Readers (and graph outputs) of ``old`` read ``new``; then drop the dead code."""
    out = graph.copy()
    for node in out.nodes:
        if new not in node.outputs:
            node.inputs = [new if i == old else i for i in node.inputs]
    out.outputs = [new if o == old else o for o in out.outputs]
    needed = set(out.outputs)
    keep = []
    for node in reversed(out.nodes):
        if any(o in needed for o in node.outputs):
            keep.append(node)
            needed.update(i for i in node.inputs if i)
    out.nodes = list(reversed(keep))
    for name in [k for k in out.initializers if k not in needed]:
        del out.initializers[name]
    produced = {o for n in out.nodes for o in n.outputs}
    out.values = {k: v for k, v in out.values.items()
                  if k in needed or k in produced or k in out.inputs}
    return out


@dataclass
class RemoveLayers:
    """Remove the ``count`` consecutive layers whose run has the smallest angular distance;
    with ``replace_linear`` a least-squares linear map stands in for them (ReplaceMe)."""

    count: int
    replace_linear: bool = False
    name: str = "remove-layers"
    exact: bool = False

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        if ctx is None:
            raise ValueError("layer removal needs calibration data (a PassContext)")
        layers = find_layers(graph)
        if self.count >= len(layers):
            raise ValueError(f"cannot remove {self.count} of the {len(layers)} residual layers "
                             f"found")
        windows = [(layers[i].start, layers[i + self.count - 1].end)
                   for i in range(len(layers) - self.count + 1)]
        scores = _mean_distances(graph, ctx, windows)
        best = int(np.argmin(scores))
        run = layers[best: best + self.count]
        if self.replace_linear:
            a, b = run[0].start, run[-1].end
            h_in: list[np.ndarray] = []
            h_out: list[np.ndarray] = []
            layerwise.pairs(graph, ctx.fit, [(a, b)],
                            lambda _k, _i, x, y: (h_in.append(x), h_out.append(y)))
            pruned = replace_run(graph, a, b, fit_linear(h_in, h_out))
        else:
            pruned = remove_run(graph, run[0].start, run[-1].end)
        return pruned, {"layers_found": len(layers), "removed": [best + k for k in
                                                                  range(self.count)],
                        "angular_distance": [round(float(s), 6) for s in scores]}


@dataclass
class RemoveAttention:
    """Remove the ``count`` attention blocks whose input and output hidden states are closest
    in angle, each on its own ("What Matters in Transformers? Not All Attention is Needed",
    He et al.): the FFN blocks stay, and runs of them can then be fused (``FuseFFN``). With
    ``between_ffns`` only attention blocks that follow an attention-free block are candidates:
    removing one of those is what makes two FFN blocks consecutive. ``which`` (indices into
    the candidates, negative from the end) picks the blocks instead of the angular distance."""

    count: int
    between_ffns: bool = False
    which: list[int] | None = None
    name: str = "remove-attention"
    exact: bool = False

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        if ctx is None:
            raise ValueError("attention removal needs calibration data (a PassContext)")
        found = find_blocks(graph)
        blocks = [b for k, b in enumerate(found)
                  if b.attention and graph.shape(b.start) == graph.shape(b.end)
                  and (not self.between_ffns or (k > 0 and not found[k - 1].attention))]
        if self.count > len(blocks):
            where = " that follow an FFN block" if self.between_ffns else ""
            raise BadOptionError(f"cannot remove {self.count} attention blocks: the model has "
                                 f"{len(blocks)}{where}")
        scores = _mean_distances(graph, ctx, [(b.start, b.end) for b in blocks])
        chosen = sorted(np.argsort(scores, kind="stable")[: self.count].tolist()
                        if self.which is None else [k % len(blocks) for k in self.which])
        pruned = graph
        for k in chosen:
            pruned = remove_run(pruned, blocks[k].start, blocks[k].end)
        return pruned, {"attention_blocks": len(blocks), "removed": chosen,
                        "angular_distance": [round(s, 6) for s in scores]}
