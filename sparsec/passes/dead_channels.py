"""Dead-channel removal (exact): drop channels that provably carry zero.

A channel is dead when every producer-side parameter slice in its group is zero (weights,
biases, norm shifts and means; a BatchNorm variance is exempt) and every op the group's tensors
flow through maps 0 to 0. Such a channel contributes nothing to the consumers' input-channel
weights, so removing it, consumer slices included, leaves outputs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsec.analysis.depgraph import DependencyGraph, Group
from sparsec.ir.graph import Graph
from sparsec.passes.criteria import member_slices
from sparsec.passes.manager import PassContext
from sparsec.passes.surgery import apply_plan

# Ops that keep an all-zero channel all-zero (f(0) == 0, or linear in the channel).
ZERO_PRESERVING = frozenset({
    "Abs", "Add", "AveragePool", "BatchNormalization", "Ceil", "Celu", "Concat", "Conv",
    "Dropout", "Elu",
    "Erf", "Flatten", "Floor", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool",
    "HardSwish", "Identity", "InstanceNormalization", "LeakyRelu", "MatMul", "MaxPool",
    "Mish", "Mul", "Neg", "PRelu", "Relu", "Reshape", "Round", "Selu", "Sign", "Sin",
    "Slice", "Softsign", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "Transpose",
    "Unsqueeze",
})
# ...provided every input is in the group (Add(x, 1.0) with a broadcast scalar is not).
ADDITIVE = frozenset({"Add", "Sub", "Sum"})


def dead_channels(graph: Graph, group: Group) -> np.ndarray:
    """Boolean mask of the group's channels that provably carry zero."""
    users = graph.consumers()
    members = {m.name for m in group.members}
    tensors = {m.name for m in group.tensors}
    for node in (n for t in tensors for n in users.get(t, [])):
        if node.op_type not in ZERO_PRESERVING or (
                node.op_type in ADDITIVE and not all(i in members for i in node.inputs)):
            return np.zeros(group.size, dtype=bool)
    bn_vars = {n.inputs[4] for n in graph.nodes if n.op_type == "BatchNormalization"}
    dead = np.ones(group.size, dtype=bool)
    for m in group.params:
        if m in group.consumers or m.name in bn_vars:
            continue
        dead &= ~np.any(member_slices(graph, group, m) != 0, axis=1)
    return dead


@dataclass
class RemoveDeadChannels:
    name: str = "remove-dead-channels"
    exact: bool = True

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        dg = DependencyGraph(graph)
        plan = {}
        for g in dg.groups:
            if not g.prunable:
                continue
            dead = dead_channels(graph, g)
            if dead.any() and not dead.all():
                plan[g.id] = np.flatnonzero(~dead)
        removed = sum(dg.groups[i].size - len(k) for i, k in plan.items())
        details = {"pruned_groups": len(plan), "channels_removed": removed}
        return apply_plan(graph, dg, plan), details
