"""Channel importance criteria: which channels of a group matter least.

* ``l2``: the L2 norm of everything removed with the channel (its slice of every weight in the
  group: producer weights, biases, norm parameters, the consumers' input-channel weights), as in
  DepGraph's group magnitude criterion. Needs no data.
* ``wanda``: activation-aware (Wanda, "A Simple and Effective Pruning Approach for LLMs", taken
  to channels): channel c scores sum_i |W[i, c]| * ||X_c|| over every weight that reads the
  channel, X_c being that channel's activations on calibration data. It estimates how much the
  channel actually contributes to the next layers' outputs; a channel with large weights that is
  (nearly) never active scores low.
"""

from __future__ import annotations

import numpy as np

from typing import Callable

from sparsec import reference
from sparsec.analysis.depgraph import Group, Member
from sparsec.ir.graph import Graph, Node

CRITERIA = ("l2", "wanda")
NEEDS_DATA = frozenset({"wanda"})


def member_slices(graph: Graph, group: Group, member: Member) -> np.ndarray:
    """A weight member's elements as [group channel, everything else]."""
    w = np.moveaxis(graph.initializers[member.name], member.axis, 0)
    span = w[member.start: member.start + group.size * member.block]
    return span.reshape(group.size, -1)


def l2(graph: Graph, group: Group) -> np.ndarray:
    """Per-channel L2 norm over all parameter slices in the group."""
    sq = np.zeros(group.size, dtype=np.float64)
    for m in group.params:
        sq += (member_slices(graph, group, m).astype(np.float64) ** 2).sum(axis=1)
    return np.sqrt(sq)


def _reader(graph: Graph, weight: str, users: dict[str, list[Node]]) -> tuple[str, int] | None:
    """(input tensor, its channel axis) of the op that reads channels through ``weight``."""
    for node in users.get(weight, []):
        if len(node.inputs) > 1 and node.inputs[1] == weight:
            x = node.inputs[0]
            axis = 1 if node.op_type in ("Conv", "Gemm") else len(graph.shape(x)) - 1
            return x, axis
    return None


def activation_norms(graph: Graph, groups: list[Group], batches: list[dict],
                     users: dict[str, list[Node]]) -> dict[tuple[str, int], np.ndarray]:
    """||X|| per element of the channel axis of every tensor the groups' consumers read."""
    wanted = {r for g in groups for m in g.consumers if (r := _reader(graph, m.name, users))}
    names = sorted({x for x, _ in wanted})
    acts = reference.activations(graph, batches, names) if names else {}
    norms = {}
    for x, axis in wanted:
        sq = sum((np.moveaxis(a.astype(np.float64), axis, 0).reshape(a.shape[axis], -1) ** 2)
                 .sum(axis=1) for a in acts[x])
        norms[(x, axis)] = np.sqrt(sq)
    return norms


def wanda(graph: Graph, group: Group, norms: dict[tuple[str, int], np.ndarray],
          users: dict[str, list[Node]]) -> np.ndarray:
    """Sum over the group's consumer weights of |W| times the channel's activation norm."""
    score = np.zeros(group.size, dtype=np.float64)
    found = False
    for m in group.consumers:
        reader = _reader(graph, m.name, users)
        if reader is None or reader not in norms:
            continue
        found = True
        span = norms[reader][m.start: m.start + group.size * m.block]
        w = np.abs(np.moveaxis(graph.initializers[m.name].astype(np.float64), m.axis, 0))
        w = w[m.start: m.start + group.size * m.block].reshape(group.size * m.block, -1)
        score += (w.sum(axis=1) * span).reshape(group.size, m.block).sum(axis=1)
    return score if found else l2(graph, group)  # nothing reads it through a weight: magnitude


def make_scorer(criterion: str, graph: Graph, groups: list[Group],
                batches: list[dict] | None) -> Callable[[Group], np.ndarray]:
    """Per-channel scores of a group under ``criterion``; data-driven criteria collect their
    activations once, here, for all ``groups``."""
    if criterion == "l2":
        return lambda group: l2(graph, group)
    if criterion == "wanda":
        if batches is None:
            raise ValueError("criterion 'wanda' needs calibration data")
        users = graph.consumers()
        norms = activation_norms(graph, groups, batches, users)
        return lambda group: wanda(graph, group, norms, users)
    raise ValueError(f"unknown criterion '{criterion}' (known: {', '.join(CRITERIA)})")
