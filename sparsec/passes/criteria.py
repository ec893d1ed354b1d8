"""Channel importance criteria: which channels of a group matter least.

* ``l2`` / ``l1``: the L2 (L1) norm of everything removed with the channel (its slice of every
  weight in the group: producer weights, biases, norm parameters, the consumers' input-channel
  weights), as in DepGraph's group magnitude criterion. Needs no data.
* ``activation``: the norm ||X_c|| of the channel's activations on calibration data, where the
  next weight layers read it. A channel that is (nearly) never active scores low.
* ``wanda``: activation-aware (Wanda, "A Simple and Effective Pruning Approach for LLMs", taken
  to channels): channel c scores sum_i |W[i, c]| * ||X_c|| over every weight that reads the
  channel. It estimates how much the channel contributes to the next layers' outputs.
* ``fluctuation`` (FLAP, "Fluctuation-based Adaptive Structured Pruning for LLMs"): the
  variance of the channel's activations times the squared norm of the weights that read it:
  what the channel adds beyond its mean, which reconstruction's intercept restores anyway.
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

from sparsec import layerwise
from sparsec.analysis.depgraph import Group, Member
from sparsec.ir.graph import Graph, Node
from sparsec.passes.manager import rows

CRITERIA = ("l2", "l1", "activation", "wanda", "fluctuation", "taylor")
NEEDS_DATA = frozenset({"activation", "wanda", "fluctuation", "taylor"})
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


def activation_stats(graph: Graph, groups: list[Group], batches: list[dict],
                     users: dict[str, list[Node]], masks: list | None = None
                     ) -> dict[tuple[str, int], dict]:
    """Per element of the channel axis of every tensor the groups' consumers read: the norm
    ||X|| and the variance over samples and positions, on calibration data (``masks``, one per
    batch: positions left out as padding, see ``PassContext.masks``)."""
    wanted = {r for g in groups for m in g.consumers if (r := _reader(graph, m.name, users))}
    masks = masks or [None] * len(batches)
    sums: dict[tuple[str, int], list] = {key: [0, 0.0, 0.0] for key in wanted}

    def add(x, i, value):     # running sums, one batch at a time (layerwise.collect)
        for axis in sorted(a for t, a in wanted if t == x):
            f = rows(value, masks[i], axis).astype(np.float64)
            acc = sums[(x, axis)]
            acc[0] += f.shape[0]
            acc[1] = acc[1] + f.sum(axis=0)
            acc[2] = acc[2] + (f ** 2).sum(axis=0)

    layerwise.collect(graph, batches, sorted({x for x, _ in wanted}), add)
    stats = {}
    for key, (n, total, sq) in sums.items():
        n = max(n, 1)
        stats[key] = {"norm": np.sqrt(sq), "var": np.maximum(sq / n - (total / n) ** 2, 0)}
    return stats


def consumer_score(graph: Graph, group: Group, stats: dict, users: dict[str, list[Node]],
                   kind: str = "wanda") -> np.ndarray:
    """Score channels by how their consumers read them, summed over the group's consumers:
    ``wanda`` ||X_c|| * sum_i |W[i, c]|; ``activation`` ||X_c|| (once per reading tensor);
    ``fluctuation`` (FLAP) Var(X_c) * sum_i W[i, c]^2: what a channel contributes beyond its
    mean, which bias compensation / reconstruction restores."""
    score = np.zeros(group.size, dtype=np.float64)
    seen = set()
    for m in group.consumers:
        reader = _reader(graph, m.name, users)
        if reader is None or reader not in stats or (kind == "activation" and reader in seen):
            continue
        seen.add(reader)
        span = slice(m.start, m.start + group.size * m.block)
        if kind == "activation":
            per_elem = stats[reader]["norm"][span]
        else:
            w = np.moveaxis(graph.initializers[m.name].astype(np.float64), m.axis, 0)[span]
            w = w.reshape(group.size * m.block, -1)
            if kind == "wanda":
                per_elem = stats[reader]["norm"][span] * np.abs(w).sum(axis=1)
            else:
                per_elem = stats[reader]["var"][span] * (w ** 2).sum(axis=1)
        score += per_elem.reshape(group.size, m.block).sum(axis=1)
    return score if seen else l2(graph, group)  # nothing reads it through a weight: magnitude


Scores = dict[tuple[str, ...], np.ndarray]   # group sources -> per-channel scores


def keep_top(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Indices of the ``n_keep`` highest scores, ascending; ties go to the lower index."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n_keep])


def taylor_scores(module, graph: Graph, groups: list[Group], batches: list[dict],
                  loss_fn: Callable | None = None) -> Scores:
    """First-order Taylor importance of every group's channels, from the module's gradients.

    ``graph`` must be the FX capture of ``module`` (initializers carry the state_dict names);
    batches are keyed by its input names. Per batch, channel c's estimated loss change is
    S_c = sum over the group's trainable weights of (w * dL/dw) on c's slice; the score is the
    mean of S_c**2. The module itself is not touched (a copy computes the gradients)."""
    import copy

    import torch

    from sparsec.frontends.torch import first_tensor

    model = copy.deepcopy(module).eval()
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    loss_fn = loss_fn or _self_distillation_loss
    totals = {tuple(g.sources): np.zeros(g.size) for g in groups}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(*(torch.from_numpy(np.asarray(batch[n])) for n in graph.inputs))
        loss_fn(first_tensor(out)).backward()
        wg = {name: (p.detach() * p.grad).double().numpy()
              for name, p in params.items() if p.grad is not None}
        for g in groups:
            s = np.zeros(g.size)
            for m in g.params:
                if m.name in wg:
                    s += member_slices(graph, g, m, wg[m.name]).sum(axis=1)
            totals[tuple(g.sources)] += s ** 2
    return {k: v / max(len(batches), 1) for k, v in totals.items()}


def _self_distillation_loss(logits):
    """Cross-entropy of the outputs against the model's own predictions (no labels needed)."""
    import torch

    flat = logits.reshape(-1, logits.shape[-1]).float()
    return torch.nn.functional.cross_entropy(flat, flat.argmax(dim=-1).detach())


def make_scorer(criterion: str, graph: Graph, groups: list[Group], batches: list[dict] | None,
                scores: Scores | None = None, masks: list | None = None
                ) -> Callable[[Group], np.ndarray]:
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
    if criterion in ("wanda", "activation", "fluctuation"):
        if batches is None:
            raise ValueError(f"criterion '{criterion}' needs calibration data")
        users = graph.consumers()
        stats = activation_stats(graph, groups, batches, users, masks)
        return lambda group: consumer_score(graph, group, stats, users, criterion)
    raise ValueError(f"unknown criterion '{criterion}' (known: {', '.join(CRITERIA)})")
