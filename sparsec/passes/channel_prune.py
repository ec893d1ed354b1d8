"""Channel-group pruning (lossy): remove the least important channels of every group.

Importance comes from a criterion (``sparsec.passes.criteria``: ``l2`` magnitude by default,
``l1``, activation-based ``activation`` and ``wanda`` on calibration data, or ``taylor`` from a
torch module's gradients, precomputed and passed in as ``scores``). Every prunable group loses
``floor(size * ratio)`` channels (uniform ratio); frozen groups are left alone.

Attention heads are groups too (``Group.kind == "heads"``: whole heads across Q, K, V and O;
with grouped-query attention a KV head and its query heads); ``head_ratio`` gives them a ratio
of their own.

Per-group choices: ``layer_ratios`` maps glob patterns over a group's source weight names
(``"block1.*"``, as ``sparsec inspect`` lists them) to a ratio of their own (first match wins);
groups whose sources match an ``ignore`` pattern are left whole; ``round_to`` rounds every kept
count up to a multiple (the target's channel block: ``TargetSpec.channel_multiple``).

With ``reconstruct=True`` the consumers of the removed channels are then refit by least squares
on the calibration data (``sparsec.passes.reconstruct``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np

from sparsec.analysis.depgraph import DependencyGraph
from sparsec.ir.graph import Graph
from sparsec.passes import criteria
from sparsec.passes.manager import PassContext
from sparsec.passes.reconstruct import RIDGE, refit_consumers
from sparsec.passes.surgery import apply_plan


def kept_count(size: int, ratio: float, round_to: int = 1) -> int:
    """Channels a group of ``size`` keeps at ``ratio``: at least one, rounded *up* to a
    multiple of ``round_to`` (never more removed than the ratio asks; a group smaller than
    one multiple keeps its share unrounded)."""
    keep = max(size - int(np.floor(size * ratio)), 1)
    if round_to > 1 and size >= round_to:
        keep = min(-(-keep // round_to) * round_to, size)
    return keep


def keep_top(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Indices of the ``n_keep`` highest scores, ascending; ties go to the lower index."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n_keep])


@dataclass
class ChannelPrune:
    ratio: float
    criterion: str = "l2"
    reconstruct: bool = False
    ridge: float = RIDGE
    round_to: int = 1
    layer_ratios: dict[str, float] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    scores: criteria.Scores | None = None
    head_ratio: float | None = None
    name: str = "channel-prune"
    exact: bool = False

    def ratio_for(self, sources: list[str], kind: str = "channels") -> float | None:
        """This group's ratio: ``None`` if ignored, else the first matching override, else
        ``head_ratio`` for attention heads (when given), else the global ratio."""
        if any(fnmatchcase(s, pat) for s in sources for pat in self.ignore):
            return None
        for pat, ratio in self.layer_ratios.items():
            if any(fnmatchcase(s, pat) for s in sources):
                return ratio
        if kind == "heads" and self.head_ratio is not None:
            return self.head_ratio
        return self.ratio

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        if self.reconstruct and ctx is None:
            raise ValueError("reconstruction needs calibration data (a PassContext)")
        dg = DependencyGraph(graph)
        score = criteria.make_scorer(self.criterion, graph, [g for g in dg.groups if g.prunable],
                                     ctx.fit if ctx is not None else None, self.scores)
        plan = {}
        removed = total = ignored = heads = 0
        for g in dg.groups:
            if not g.prunable:
                continue
            ratio = self.ratio_for(g.sources, g.kind)
            if ratio is None:
                ignored += 1
                continue
            total += g.size
            # round_to is a vector-width multiple of channels; a head is already head_dim wide
            n_keep = kept_count(g.size, ratio, self.round_to if g.kind == "channels" else 1)
            if n_keep == g.size:
                continue
            plan[g.id] = keep_top(score(g), n_keep)
            removed += g.size - n_keep
            heads += (g.size - n_keep) if g.kind == "heads" else 0
        details = {"criterion": self.criterion, "ratio": self.ratio, "round_to": self.round_to,
                   "ignored_groups": ignored, "groups": len(dg.groups),
                   "prunable_groups": sum(g.prunable for g in dg.groups),
                   "pruned_groups": len(plan), "channels_removed": removed,
                   "heads_removed": heads, "head_ratio": self.head_ratio,
                   "channels_in_prunable_groups": total}
        pruned = apply_plan(graph, dg, plan)
        if self.reconstruct:
            pruned, info = refit_consumers(graph, pruned, dg, plan, ctx.fit, self.ridge)
            details["reconstructed"] = info["refit"]
        return pruned, details
