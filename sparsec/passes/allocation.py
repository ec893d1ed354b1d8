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
from sparsec.passes.surgery import apply_plan

#: levels tried per group, as multiples of the target ratio (capped below 1)
LEVELS = (0.5, 1.0, 1.5, 2.0)
#: calibration batches used to measure (each level of each group is one model run per batch)
MAX_BATCHES = 4


def _distortion(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> float:
    num = sum(float(np.sum((np.asarray(o, np.float64) - r) ** 2))
              for rb, ob in zip(ref, out) for r, o in zip(rb, ob))
    den = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for rb in ref for r in rb)
    return num / max(den, 1e-30)


def sensitivity_keeps(graph: Graph, dg: DependencyGraph, chosen: list[tuple[Group, float]],
                      scores: dict[int, np.ndarray], batches: list[dict],
                      keep_for) -> dict[int, int]:
    """Kept channel count per group id (see the module docstring). ``keep_for(group, ratio)``
    is the caller's rounding rule; ``scores`` rank each group's channels."""
    batches = batches[:MAX_BATCHES]
    base = [[np.asarray(o, np.float64) for o in outs]
            for outs in reference.run_batches(graph, batches)]
    buckets: dict[tuple[str, float], list[Group]] = {}
    for g, ratio in chosen:
        if ratio > 0:
            buckets.setdefault((g.kind, ratio), []).append(g)
    keeps: dict[int, int] = {}
    for (_, ratio), groups in buckets.items():
        options: dict[int, list[tuple[int, float]]] = {}   # gid -> [(kept, distortion), ...]
        for g in groups:
            opts = [(g.size, 0.0)]
            for level in LEVELS:
                kept = keep_for(g, min(ratio * level, 0.95))
                if kept >= opts[-1][0]:
                    continue
                plan = {g.id: keep_top(scores[g.id], kept)}
                out = reference.run_batches(apply_plan(graph, dg, plan), batches)
                opts.append((kept, _distortion(base, out)))
            options[g.id] = opts
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
