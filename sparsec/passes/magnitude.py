"""Magnitude channel-group pruning (lossy): remove the lowest-L2 channels of every group.

A channel's importance is the L2 norm of everything that would be removed with it: its slice of
every parameter in the group (producer weights, biases, norm parameters and the consumers'
input-channel weights), as in DepGraph's group-level magnitude criterion. Every prunable group
loses ``floor(size * ratio)`` channels (uniform ratio); frozen groups are left alone.

With ``reconstruct=True`` the consumers of the removed channels are then refit by least squares
on the calibration data (``sparsec.passes.reconstruct``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsec.analysis.depgraph import DependencyGraph, Group
from sparsec.ir.graph import Graph
from sparsec.passes.manager import PassContext
from sparsec.passes.reconstruct import RIDGE, refit_consumers
from sparsec.passes.surgery import apply_plan


def member_slices(graph: Graph, group: Group, member) -> np.ndarray:
    """A weight member's elements as [group channel, everything else]."""
    w = np.moveaxis(graph.initializers[member.name], member.axis, 0)
    span = w[member.start: member.start + group.size * member.block]
    return span.reshape(group.size, -1)


def group_l2(graph: Graph, group: Group) -> np.ndarray:
    """Per-channel L2 norm over all parameter slices in the group."""
    sq = np.zeros(group.size, dtype=np.float64)
    for m in group.params:
        sq += (member_slices(graph, group, m).astype(np.float64) ** 2).sum(axis=1)
    return np.sqrt(sq)


def keep_top(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Indices of the ``n_keep`` highest scores, ascending; ties go to the lower index."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n_keep])


@dataclass
class MagnitudePrune:
    ratio: float
    reconstruct: bool = False
    ridge: float = RIDGE
    name: str = "magnitude-prune"
    exact: bool = False

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        dg = DependencyGraph(graph)
        plan = {}
        removed = total = 0
        for g in dg.groups:
            if not g.prunable:
                continue
            n_drop = min(int(np.floor(g.size * self.ratio)), g.size - 1)
            total += g.size
            if n_drop == 0:
                continue
            plan[g.id] = keep_top(group_l2(graph, g), g.size - n_drop)
            removed += n_drop
        details = {"ratio": self.ratio, "groups": len(dg.groups),
                   "prunable_groups": sum(g.prunable for g in dg.groups),
                   "pruned_groups": len(plan), "channels_removed": removed,
                   "channels_in_prunable_groups": total}
        pruned = apply_plan(graph, dg, plan)
        if self.reconstruct:
            if ctx is None:
                raise ValueError("reconstruction needs calibration data (a PassContext)")
            pruned, info = refit_consumers(graph, pruned, dg, plan, ctx.fit, self.ridge)
            details["reconstructed"] = info["refit"]
        return pruned, details
