"""Channel importance criteria: which channels of a group matter least.

* ``l2`` / ``l1``: the L2 (L1) norm of everything removed with the channel (its slice of every
  weight in the group: producer weights, biases, norm parameters, the consumers' input-channel
  weights), as in DepGraph's group magnitude criterion. Needs no data.
* ``activation``: the norm ||X_c|| of the channel's activations on calibration data, where the
  next weight layers read it. A channel that is (nearly) never active scores low.
* ``wanda``: activation-aware (Wanda, "A Simple and Effective Pruning Approach for LLMs", taken
  to channels): channel c scores sum_i |W[i, c]| * ||X_c|| over every weight that reads the
  channel. It estimates how much the channel contributes to the next layers' outputs.
* ``taylor`` (torch modules only): first-order Taylor expansion of the loss (Molchanov et al.,
  "Importance Estimation for Neural Network Pruning"): per calibration batch, the change of the
  loss when the channel is removed is estimated as sum over its weights of w * dL/dw; a
  channel scores the mean square of that over the batches. Gradients come from the module
  (``taylor_scores``); without labels the loss is the cross-entropy against the model's own
  predictions.
"""

from __future__ import annotations

import numpy as np

from typing import Callable

from sparsec import reference
from sparsec.analysis.depgraph import Group, Member
from sparsec.ir.graph import Graph, Node

CRITERIA = ("l2", "l1", "activation", "wanda", "taylor")
NEEDS_DATA = frozenset({"activation", "wanda", "taylor"})
NEEDS_TORCH = frozenset({"taylor"})  # gradients come from the module


def member_slices(graph: Graph, group: Group, member: Member,
                  array: np.ndarray | None = None) -> np.ndarray:
    """A weight member's elements (or those of ``array``, shaped like the weight) as
    [group channel, everything else]."""
    w = np.moveaxis(graph.initializers[member.name] if array is None else array, member.axis, 0)
    span = w[member.start: member.start + group.size * member.block]
    return span.reshape(group.size, -1)


def l2(graph: Graph, group: Group) -> np.ndarray:
    """Per-channel L2 norm over all parameter slices in the group."""
    sq = np.zeros(group.size, dtype=np.float64)
    for m in group.params:
        sq += (member_slices(graph, group, m).astype(np.float64) ** 2).sum(axis=1)
    return np.sqrt(sq)


def l1(graph: Graph, group: Group) -> np.ndarray:
    """Per-channel L1 norm over all parameter slices in the group."""
    total = np.zeros(group.size, dtype=np.float64)
    for m in group.params:
        total += np.abs(member_slices(graph, group, m).astype(np.float64)).sum(axis=1)
    return total


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
          users: dict[str, list[Node]], weighted: bool = True) -> np.ndarray:
    """Sum over the group's consumer weights of |W| times the channel's activation norm
    (``weighted=False``: the activation norm alone, once per reading tensor)."""
    score = np.zeros(group.size, dtype=np.float64)
    seen = set()
    for m in group.consumers:
        reader = _reader(graph, m.name, users)
        if reader is None or reader not in norms or (not weighted and reader in seen):
            continue
        seen.add(reader)
        span = norms[reader][m.start: m.start + group.size * m.block]
        if weighted:
            w = np.abs(np.moveaxis(graph.initializers[m.name].astype(np.float64), m.axis, 0))
            span = span * w[m.start: m.start + group.size * m.block].reshape(
                group.size * m.block, -1).sum(axis=1)
        score += span.reshape(group.size, m.block).sum(axis=1)
    return score if seen else l2(graph, group)  # nothing reads it through a weight: magnitude


Scores = dict[tuple[str, ...], np.ndarray]   # group sources -> per-channel scores


def taylor_scores(module, graph: Graph, groups: list[Group], batches: list[dict],
                  loss_fn: Callable | None = None) -> Scores:
    """First-order Taylor importance of every group's channels, from the module's gradients.

    ``graph`` must be the FX capture of ``module`` (initializers carry the state_dict names);
    batches are keyed by its input names. Per batch, channel c's estimated loss change is
    S_c = sum over the group's trainable weights of (w * dL/dw) on c's slice; the score is the
    mean of S_c**2. The module itself is not touched (a copy computes the gradients)."""
    import copy

    import torch

    model = copy.deepcopy(module).eval()
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    loss_fn = loss_fn or _self_distillation_loss
    totals = {tuple(g.sources): np.zeros(g.size) for g in groups}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(*(torch.from_numpy(np.asarray(batch[n])) for n in graph.inputs))
        loss_fn(_first_tensor(out)).backward()
        wg = {name: (p.detach() * p.grad).double().numpy()
              for name, p in params.items() if p.grad is not None}
        for g in groups:
            s = np.zeros(g.size)
            for m in g.params:
                if m.name in wg:
                    s += member_slices(graph, g, m, wg[m.name]).sum(axis=1)
            totals[tuple(g.sources)] += s ** 2
    return {k: v / max(len(batches), 1) for k, v in totals.items()}


def _first_tensor(out):
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return out


def _self_distillation_loss(logits):
    """Cross-entropy of the outputs against the model's own predictions (no labels needed)."""
    import torch

    flat = logits.reshape(-1, logits.shape[-1]).float()
    return torch.nn.functional.cross_entropy(flat, flat.argmax(dim=-1).detach())


def make_scorer(criterion: str, graph: Graph, groups: list[Group], batches: list[dict] | None,
                scores: Scores | None = None) -> Callable[[Group], np.ndarray]:
    """Per-channel scores of a group under ``criterion``; data-driven criteria collect their
    activations once, here, for all ``groups``. ``scores`` are precomputed ones (``taylor``)."""
    if criterion == "l2":
        return lambda group: l2(graph, group)
    if criterion == "l1":
        return lambda group: l1(graph, group)
    if criterion == "taylor":
        if scores is None:
            raise ValueError("criterion 'taylor' needs gradients: prune a torch module "
                             "(sparsec.prune_module)")

        def lookup(group: Group) -> np.ndarray:
            got = scores.get(tuple(group.sources))
            if got is None or got.shape != (group.size,):
                raise ValueError(f"no Taylor scores for the group of {group.sources[0]}")
            return got
        return lookup
    if criterion in ("wanda", "activation"):
        if batches is None:
            raise ValueError(f"criterion '{criterion}' needs calibration data")
        users = graph.consumers()
        norms = activation_norms(graph, groups, batches, users)
        weighted = criterion == "wanda"
        return lambda group: wanda(graph, group, norms, users, weighted)
    raise ValueError(f"unknown criterion '{criterion}' (known: {', '.join(CRITERIA)})")
