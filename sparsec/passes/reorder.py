"""Channel reordering (exact): permute each channel group so nonzero weights cluster into dense
blocks, the unit a block-sparse (BSR) kernel skips or computes.

A group's channels can be put in any order as long as every member weight moves the same way
(``surgery.apply_order``); the model computes exactly what it computed. The order chosen here
puts channels with the same block pattern next to each other: each channel's signature is,
for every weight it belongs to, which blocks of the *other* channel axis it has nonzeros in
(rows pooled over ``block[1]`` input channels for weights it produces, columns pooled over
``block[0]`` output channels for weights it feeds); channels are sorted by signature, denser
first, and the new order is kept only when it lowers the number of nonzero blocks of the
group's weights. A weight can belong to two groups (its rows to one, its columns to another),
and one group's order changes the other's signatures, so this runs for two rounds.

Sparsec removes pruned channels physically (every coupled slice together), so its own output
never needs a gather or a scatter to line channels up; the reason UPSCALE reorders channels,
unconstrained pruning, does not arise. What remains is the block clustering above, for the
weights a sparse kernel will read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsec.analysis.depgraph import DependencyGraph
from sparsec.ir.graph import Graph
from sparsec.passes.manager import PassContext
from sparsec.passes.reconstruct import _consumer_axis, _output_axis
from sparsec.passes.surgery import apply_order


def weight_matrices(graph: Graph) -> dict[str, tuple[int, int]]:
    """{weight name: (output-channel axis, input-channel axis)} of every MatMul / Gemm / Conv
    with a constant weight."""
    out = {}
    for n in graph.nodes:
        w = n.inputs[1] if len(n.inputs) > 1 else ""
        if w not in graph.initializers:
            continue
        if n.op_type in ("Conv", "Gemm") or (n.op_type == "MatMul"
                                             and graph.initializers[w].ndim == 2):
            out[w] = (_output_axis(n), _consumer_axis(n))
    return out


def _pooled(mask: np.ndarray, size: int) -> np.ndarray:
    """Any-nonzero over consecutive runs of ``size`` along axis 1 (the last run may be short)."""
    pad = -mask.shape[1] % size
    if pad:
        mask = np.pad(mask, ((0, 0), (0, pad)))
    return mask.reshape(mask.shape[0], -1, size).any(axis=2)


def _matrix(w: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    """Nonzero mask as [output channels, input channels] (spatial taps folded in)."""
    m = np.moveaxis(w != 0, axes, (0, 1))
    return m.reshape(m.shape[0], m.shape[1], -1).any(axis=2)


def nonzero_blocks(graph: Graph, block: tuple[int, int]) -> int:
    """Blocks of ``block`` = (output channels, input channels) holding any nonzero, summed over
    every weight matrix: the work a block-sparse kernel cannot skip."""
    total = 0
    for name, axes in weight_matrices(graph).items():
        m = _matrix(graph.initializers[name], axes)
        total += int(_pooled(_pooled(m, block[1]).T, block[0]).sum())
    return total


def _signature(graph: Graph, group, matrices, block) -> np.ndarray | None:
    parts = []
    for m in group.params:
        if m.name not in matrices or m.block != 1:
            continue
        mat = _matrix(graph.initializers[m.name], matrices[m.name])
        if m.axis == matrices[m.name][0]:           # the group's channels are output rows
            parts.append(_pooled(mat[m.start: m.start + group.size], block[1]))
        else:                                       # ... or input columns
            cols = mat[:, m.start: m.start + group.size].T
            parts.append(_pooled(cols, block[0]))
    return np.concatenate(parts, axis=1) if parts else None


def _blocks_under(graph: Graph, group, matrices, block, perm: np.ndarray) -> int:
    """Nonzero blocks of the group's member matrices with its channels in order ``perm``."""
    total = 0
    for m in group.params:
        if m.name not in matrices or m.block != 1:
            continue
        mat = _matrix(graph.initializers[m.name], matrices[m.name])
        idx = np.arange(mat.shape[0 if m.axis == matrices[m.name][0] else 1])
        idx[m.start: m.start + group.size] = m.start + perm
        mat = mat[idx] if m.axis == matrices[m.name][0] else mat[:, idx]
        total += int(_pooled(_pooled(mat, block[1]).T, block[0]).sum())
    return total


def cluster_order(graph: Graph, block: tuple[int, int] = (4, 4), rounds: int = 2
                  ) -> tuple[Graph, dict[int, np.ndarray]]:
    """The graph with its prunable groups reordered to cluster nonzeros (module docstring),
    and the order of every group that moved (composed over the rounds)."""
    applied: dict[int, np.ndarray] = {}
    for _ in range(rounds):
        dg = DependencyGraph(graph)
        matrices = weight_matrices(graph)
        orders = {}
        for group in dg.groups:
            sig = _signature(graph, group, matrices, block) if group.prunable else None
            if sig is None:
                continue
            # denser channels first, then equal signatures together (lexsort: last key first)
            perm = np.lexsort([sig[:, k] for k in reversed(range(sig.shape[1]))]
                              + [-sig.sum(axis=1)])
            same = np.arange(group.size)
            if _blocks_under(graph, group, matrices, block, perm) < \
                    _blocks_under(graph, group, matrices, block, same):
                orders[group.id] = perm
                applied[group.id] = applied.get(group.id, same)[perm]
        if not orders:
            break
        graph = apply_order(graph, dg, orders)
    return graph, applied


@dataclass
class ReorderChannels:
    """Exact: permute channel groups so nonzeros cluster into ``block``-shaped dense blocks."""

    block: tuple[int, int] = (4, 4)
    name: str = "reorder-channels"
    exact: bool = True

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        before = nonzero_blocks(graph, self.block)
        new, orders = cluster_order(graph, self.block)
        def gathers(g: Graph) -> int:
            return sum(n.op_type in ("Gather", "GatherND", "ScatterND", "GatherElements")
                       for n in g.nodes)

        return new, {"block": list(self.block), "groups_reordered": len(orders),
                     "nonzero_blocks": {"before": before, "after": nonzero_blocks(new,
                                                                                   self.block)},
                     "gathers_added": gathers(new) - gathers(graph)}
