"""Where to prune: per-group widths from measured sensitivity instead of one uniform ratio.

A uniform ratio treats every layer alike, but layers are not alike: in all-MiniLM-L6-v2,
removing a quarter of the heads of any one of the first five layers keeps the sentence
embeddings at cosine 0.998, while doing it in the last layer drops them to 0.947.

``sensitivity_keeps`` measures, on calibration data, what pruning each group *alone* costs at a
few levels around the target ratio (0, r/2, r, 3r/2, 2r of its channels, by the criterion's
ranking): the relative squared error of the model's outputs. Groups of one kind and target ratio
then share one budget, the channels that ratio removes from all of them together, spent
greedily on the cheapest next step (distortion added per channel removed; the last step may
overshoot the budget by part of one level). This assumes the
costs of different groups add up, which holds for small perturbations; reconstruction, when
asked for, runs afterwards on the final plan.
"""

from __future__ import annotations

import numpy as np

from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph, Group
from sparsec.ir.graph import Graph
from sparsec.passes.criteria import keep_top
from sparsec.passes.manager import PassContext, Progress
from sparsec.passes.surgery import apply_plan

#: levels tried per group, as multiples of the target ratio (capped below 1)
LEVELS = (0.5, 1.0, 1.5, 2.0)
#: calibration batches used to measure (each level of each group is one model run per batch)
MAX_BATCHES = 4


def sensitivity_keeps(graph: Graph, dg: DependencyGraph, chosen: list[tuple[Group, float]],
                      scores: dict[int, np.ndarray], ctx: PassContext,
                      keep_for) -> dict[int, int]:
    """Kept channel count per group id (see the module docstring). ``keep_for(group, ratio)``
    is the caller's rounding rule; ``scores`` rank each group's channels."""
    batches = ctx.fit[:MAX_BATCHES]
    trial = Trials(graph, dg, [g for g, r in chosen if r > 0], batches)
    buckets: dict[tuple[str, float], list[Group]] = {}
    for g, ratio in chosen:
        if ratio > 0:
            buckets.setdefault((g.kind, ratio), []).append(g)
    keeps: dict[int, int] = {}
    progress = Progress(ctx.log, "sensitivity", sum(map(len, buckets.values())), "groups measured")
    for (_, ratio), groups in buckets.items():
        options: dict[int, list[tuple[int, float]]] = {}   # gid -> [(kept, distortion), ...]
        trial.check = True                                 # once per kind of group
        for g in groups:
            opts = [(g.size, 0.0)]
            for level in LEVELS:
                kept = keep_for(g, min(ratio * level, 0.95))
                if kept >= opts[-1][0]:
                    continue
                out = trial(g, keep_top(scores[g.id], kept))
                opts.append((kept, ctx.distortion(trial.base, out, batches)))
            options[g.id] = opts
            progress.step()
        budget = sum(g.size - keep_for(g, ratio) for g in groups)
        step = {g.id: 0 for g in groups}
        removed = 0
        while removed < budget:
            best, best_cost = None, np.inf
            for gid, opts in options.items():
                i = step[gid]
                if i + 1 < len(opts):
                    gain = opts[i][0] - opts[i + 1][0]
                    cost = (opts[i + 1][1] - opts[i][1]) / gain
                    if cost < best_cost:
                        best, best_cost = gid, cost
            if best is None:
                break
            removed += options[best][step[best]][0] - options[best][step[best] + 1][0]
            step[best] += 1
        keeps.update({gid: options[gid][step[gid]][0] for gid in options})
    return keeps


def held_out_distortion(graph: Graph, changed: Graph, ctx: PassContext) -> float:
    """How far ``changed`` (a whole plan applied, maybe refit) is from ``graph`` on the held-out
    batches (relative squared error, padded positions left out)."""
    return ctx.distortion(ctx.holdout_outputs(graph),
                          reference.run_batches(changed, ctx.holdout), ctx.holdout)


class Trials:
    """The model's outputs with one group cut to some of its channels, for many trials.

    Removing channels is the same function as zeroing what their consumers read of them (the
    weight slices that contract them: ``Group.consumers``): nothing else of the model sees a
    channel once no weight reads it (the analysis freezes groups that reach an output or a
    contraction without a weight). So a trial feeds zeroed consumer weights to one ONNX Runtime
    session (``reference.Probe``) instead of building and loading a smaller model. While
    ``check`` is set, the next trial is also run on the pruned model (``apply_plan``) and
    compared; if they differ, every later trial prunes (``exact`` False). Groups that no weight
    reads, and hidden widths (a norm's statistics see every channel), are always pruned."""

    def __init__(self, graph: Graph, dg: DependencyGraph, groups: list[Group],
                 batches: list[dict]):
        self.graph, self.dg, self.batches = graph, dg, batches
        free = {m.name for g in groups for m in g.consumers if m.name in graph.initializers}
        self.probe = reference.Probe(graph, free=free)
        self.base = self.probe.outputs(batches)
        self.check, self.exact = True, True

    def __call__(self, group: Group, keep: np.ndarray) -> list[list[np.ndarray]]:
        readers = [m for m in group.consumers if m.name in self.graph.initializers]
        if not readers or not self.exact or group.kind == "hidden":   # norms see every channel
            return self._pruned(group, keep)
        drop = np.setdiff1d(np.arange(group.size), keep)
        weights: dict[str, np.ndarray] = {}
        for m in readers:
            w = weights.get(m.name)
            w = self.graph.initializers[m.name].copy() if w is None else w
            index = [slice(None)] * w.ndim
            index[m.axis] = (m.start + drop[:, None] * m.block + np.arange(m.block)).ravel()
            w[tuple(index)] = 0
            weights[m.name] = w
        out = self.probe.outputs(self.batches, weights)
        if self.check:
            self.check = False
            pruned = self._pruned(group, keep)
            self.exact = all(
                np.allclose(a, b, rtol=1e-4, atol=1e-5 * max(float(np.abs(b).max()), 1.0))
                for ob, pb in zip(out, pruned) for a, b in zip(ob, pb))
            return pruned
        return out

    def _pruned(self, group: Group, keep: np.ndarray) -> list[list[np.ndarray]]:
        return reference.run_batches(apply_plan(self.graph, self.dg, {group.id: keep}),
                                     self.batches)
