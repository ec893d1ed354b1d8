"""Channel-group pruning (lossy): remove the least important channels of every group.

Importance comes from a criterion (``sparsec.passes.criteria``: ``l2`` magnitude by default,
``l1``, activation-based ``activation`` and ``wanda`` on calibration data, or ``taylor`` from a
torch module's gradients, precomputed and passed in as ``scores``). Every prunable group loses
``floor(size * ratio)`` channels (uniform ratio); frozen groups are left alone.

Attention heads are groups too (``Group.kind == "heads"``: whole heads across Q, K, V and O;
with grouped-query attention a KV head and its query heads); ``head_ratio`` gives them a ratio
of their own. A hidden width (``Group.kind == "hidden"``: a residual stream under LayerNorms,
from the embedding to the head that reads it) is cut only at ``hidden_ratio``: it is lossy
even for channels that carry nothing, since each norm's statistics then run over fewer
channels, and the pass's measured fidelity says what that cost.

With ``sensitivity=True`` the ratio holds per kind of group over the whole model rather than in
every group: each group's width comes from its measured cost (``sparsec.passes.allocation``).

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
from sparsec.passes.allocation import held_out_distortion, sensitivity_keeps
from sparsec.passes.hidden import keep_output_width
from sparsec.passes.manager import FEW_SAMPLES, PassContext
from sparsec.passes.reconstruct import keep_if_better, refit_consumers
from sparsec.passes.rotate import prepare as prepare_rotation
from sparsec.passes.rotate import rescale, stream_key
from sparsec.passes.surgery import apply_plan


def kept_count(size: int, ratio: float, round_to: int = 1) -> int:
    """Channels a group of ``size`` keeps at ``ratio``: at least one, rounded *up* to a
    multiple of ``round_to`` (never more removed than the ratio asks; a group smaller than
    one multiple keeps its share unrounded)."""
    keep = max(size - int(np.floor(size * ratio)), 1)
    if round_to > 1 and size >= round_to:
        keep = min(-(-keep // round_to) * round_to, size)
    return keep


@dataclass
class ChannelPrune:
    ratio: float
    criterion: str = "l2"
    reconstruct: bool = False
    ridge: float | None = None      # None: chosen per layer (see reconstruct._refit)
    round_to: int = 1
    layer_ratios: dict[str, float] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    scores: criteria.Scores | None = None
    head_ratio: float | None = None
    hidden_ratio: float = 0.0
    sensitivity: bool = False
    #: hidden streams: rotate each to its principal directions first and cut the weakest
    #: (``sparsec.passes.rotate``, SliceGPT), where the stream allows it
    rotate: bool = False
    name: str = "channel-prune"
    exact: bool = False

    def ratio_for(self, sources: list[str], kind: str = "channels") -> float | None:
        """This group's ratio: ``None`` if ignored, else the first matching override, else
        ``head_ratio`` for attention heads (when given), else the global ratio."""
        if any(fnmatchcase(s, pat) for s in sources for pat in self.ignore):
            return None
        if kind == "hidden":      # only asked for by name: its sources span every layer
            return self.hidden_ratio or None
        for pat, ratio in self.layer_ratios.items():
            if any(fnmatchcase(s, pat) for s in sources):
                return ratio
        if kind == "heads" and self.head_ratio is not None:
            return self.head_ratio
        return self.ratio

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        if self.reconstruct and ctx is None:
            raise ValueError("reconstruction needs calibration data (a PassContext)")
        maps: list[dict] = []
        if self.hidden_ratio:          # an encoder's stream is its output: keep that width
            graph, maps = keep_output_width(graph)
        rotated, rotation = {}, []
        if self.rotate and self.hidden_ratio:
            if ctx is None:
                raise ValueError("rotating hidden streams needs calibration data (a PassContext)")
            graph, rotated, rotation = prepare_rotation(graph, ctx)
        dg = DependencyGraph(graph)
        candidates = [g for g in dg.groups if g.prunable or g.hidden_prunable]
        chosen = [(g, r) for g in candidates
                  if (r := self.ratio_for(g.sources, g.kind)) is not None]
        score = criteria.make_scorer(self.criterion, graph, [g for g, _ in chosen],
                                     ctx.fit if ctx is not None else None, self.scores,
                                     ctx.masks(ctx.fit) if ctx is not None else None)
        ignored = sum(1 for g in candidates if g.prunable and any(
            fnmatchcase(s, pat) for s in g.sources for pat in self.ignore))
        scores = {g.id: score(g) for g, _ in chosen}
        for g, _ in chosen:            # a rotated stream's channels are its principal
            if stream_key(g) in rotated:   # directions, strongest first
                scores[g.id] = np.arange(g.size, 0, -1, dtype=np.float64)

        def keep_for(g, ratio: float) -> int:
            # round_to is a vector-width multiple of channels; a head is already head_dim wide
            return kept_count(g.size, ratio, self.round_to if g.kind != "heads" else 1)

        keeps = {g.id: keep_for(g, r) for g, r in chosen}

        def plan_of(k: dict[int, int]) -> dict:
            return {g.id: criteria.keep_top(scores[g.id], k[g.id]) for g, _ in chosen
                    if k[g.id] < g.size}

        def build(plan: dict) -> tuple[Graph, Graph, list]:
            """(pruned, pruned and refit or None, the refit report)."""
            pruned = apply_plan(graph, dg, plan)
            rescale(pruned, rotated, {stream_key(g): len(plan[g.id]) for g, _ in chosen
                                      if g.id in plan and stream_key(g) in rotated})
            if not self.reconstruct:
                return pruned, None, []
            refit, info = refit_consumers(graph, pruned, dg, plan, ctx, self.ridge)
            return pruned, refit, info["refit"]

        allocation = {}
        plan = plan_of(keeps)
        built = None
        if self.sensitivity:
            if ctx is None:
                raise ValueError("sensitivity allocation needs calibration data (a PassContext)")
            spread = {**keeps, **sensitivity_keeps(graph, dg, chosen, scores, ctx, keep_for)}
        if self.sensitivity and ctx.samples_held_out < FEW_SAMPLES:
            # too few held-out samples to tell two plans apart: picking the better-looking one
            # would mostly pick noise, and make the reported figure optimistic
            keeps, plan = spread, plan_of(spread)
            allocation = {"allocation": "sensitivity", "compared": False}
        elif self.sensitivity:
            # the spread assumes the groups' costs add up; where they do not (a few wide
            # groups, refits that help one plan more than the other) it loses to the uniform
            # widths: build both plans (refit too, when asked) and keep the one closer to the
            # original on the held-out data, like a refit (the fit data would favour the plan
            # with more refits, which fit it better)
            options = {"sensitivity": plan_of(spread), "uniform": plan}
            builds = {name: build(p) for name, p in options.items()}
            cost_of = {name: held_out_distortion(graph, b[1] or b[0], ctx)
                       for name, b in builds.items()}
            pick = "sensitivity" if cost_of["sensitivity"] <= cost_of["uniform"] else "uniform"
            keeps = spread if pick == "sensitivity" else keeps
            plan, built = options[pick], builds[pick]
            allocation = {"allocation": pick, "held_out_distortion": cost_of}
        removed = total = heads = hidden = 0
        for g, _ in chosen:
            total += g.size
            n_keep = keeps[g.id]
            removed += g.size - n_keep
            heads += (g.size - n_keep) if g.kind == "heads" else 0
            hidden += (g.size - n_keep) if g.kind == "hidden" else 0
        details = {"criterion": self.criterion, "ratio": self.ratio, "round_to": self.round_to,
                   "sensitivity": self.sensitivity, **allocation,
                   "ignored_groups": ignored, "groups": len(dg.groups),
                   "prunable_groups": sum(g.prunable for g in dg.groups),
                   "pruned_groups": len(plan), "channels_removed": removed,
                   "heads_removed": heads, "head_ratio": self.head_ratio,
                   "hidden_removed": hidden, "hidden_ratio": self.hidden_ratio,
                   "output_maps": maps, **({"rotation": rotation} if self.rotate else {}),
                   "channels_in_prunable_groups": total}
        pruned, refit, report = built or build(plan)
        if self.reconstruct:
            details["reconstructed"] = report
            pruned, details["reconstruction"] = keep_if_better(graph, pruned, refit, ctx)
        return pruned, details
