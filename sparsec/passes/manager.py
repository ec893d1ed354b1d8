"""Pass manager: runs passes in order and records what each one did and what it cost.

Each pass declares whether it is exact. After every pass the manager runs the graph before and
after it with the reference runtime (ONNX Runtime): an exact pass that moves outputs beyond
``EXACT_REL_TOL`` is a bug and raises; a lossy pass gets its measured fidelity (cosine
similarity, max error) recorded in its ``PassResult``.

Calibration batches are split (``PassContext``): passes fit to ``ctx.fit`` (e.g. least-squares
reconstruction), fidelity is measured on the held-out ``ctx.holdout``, so a pass that overfits its
calibration data cannot report its own training error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from sparsec import reference
from sparsec.analysis.cost import Cost, cost
from sparsec.ir.graph import Graph

EXACT_REL_TOL = 1e-4

Log = Callable[[str], None]


Feeds = dict[str, np.ndarray]


@dataclass
class PassContext:
    """Calibration data for passes: ``fit`` to learn from, ``holdout`` to report on."""

    fit: list[Feeds]
    holdout: list[Feeds]

    @property
    def held_out(self) -> bool:
        return self.fit is not self.holdout

    @classmethod
    def split(cls, batches: list[Feeds], every: int = 4) -> "PassContext":
        """Every ``every``-th batch is held out. With fewer batches than that, samples are
        held out instead (every ``every``-th sample along the leading axis that all inputs
        share, at least one), and both sides are batched again to the model's batch size by
        repeating their own samples, so no fitted sample is ever scored. Only a single sample
        (or inputs without a common leading axis) leaves nothing to hold out: then both roles
        use it, and ``held_out`` is False (reports say "not measured")."""
        if len(batches) >= every:
            return cls([b for i, b in enumerate(batches) if i % every != every - 1],
                       batches[every - 1::every])
        samples = _samples(batches)
        if samples is None or len(samples) < 2:
            return cls(batches, batches)
        hold = set(range(every - 1, len(samples), every)) or {len(samples) - 1}
        size = next(iter(batches[0].values())).shape[0]
        return cls(_rebatch([x for i, x in enumerate(samples) if i not in hold], size),
                   _rebatch([x for i, x in enumerate(samples) if i in hold], size))

    def describe(self) -> str:
        if self.held_out:
            return f"{len(self.holdout)} held-out calibration batches"
        return "not measured: one calibration sample, nothing to hold out"


def _samples(batches: list[Feeds]) -> list[Feeds] | None:
    """Batches cut into single samples ([1, ...] each) along the leading axis all their inputs
    share; None when the inputs have no common leading axis."""
    out: list[Feeds] = []
    for feeds in batches:
        sizes = {np.shape(v)[0] if np.ndim(v) else None for v in feeds.values()}
        if len(sizes) != 1 or None in sizes:
            return None
        n = sizes.pop()
        out += [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n)]
    return out


def _rebatch(samples: list[Feeds], size: int) -> list[Feeds]:
    """Samples joined into batches of ``size``; the last batch is filled by repeating the
    list's own samples from its start."""
    count = -(-len(samples) // size)
    padded = [samples[i % len(samples)] for i in range(count * size)]
    return [{k: np.concatenate([s[k] for s in padded[b * size:(b + 1) * size]])
             for k in samples[0]} for b in range(count)]


class Pass(Protocol):
    name: str
    exact: bool

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        """Return a new graph (never edit ``graph``) and a dict of details for the report.
        Passes that learn from data read ``ctx.fit`` (and refuse to run without a context)."""
        ...


@dataclass
class PassResult:
    name: str
    exact: bool
    before: Cost
    after: Cost
    details: dict
    fidelity: reference.Fidelity
    measured_on: str
    seconds: float
    #: whether ``fidelity`` was measured on data the pass did not fit to
    held_out: bool = True

    def as_dict(self) -> dict:
        """Report entry; wall time is left out so that artifacts are reproducible."""
        return {"name": self.name, "exact": self.exact, "before": self.before.as_dict(),
                "after": self.after.as_dict(), "details": self.details,
                "fidelity": {**self.fidelity.as_dict(), "measured_on": self.measured_on,
                             "held_out": self.held_out}}


@dataclass
class PassManager:
    passes: list[Pass]
    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)
    log: Log = lambda msg: None
    #: after ``run``: the final graph vs the input graph, on the held-out calibration batches
    fidelity: reference.Fidelity | None = None
    #: after ``run``: what ``fidelity`` was measured on (``PassContext.describe``), and whether
    #: that data was held out from fitting (False: the figure is training error, not fidelity)
    measured_on: str = ""
    held_out: bool = True

    def run(self, graph: Graph) -> tuple[Graph, list[PassResult]]:
        ctx = PassContext.split(self.calibration or [reference.random_inputs(graph, seed=0)])
        self.measured_on, self.held_out = ctx.describe(), ctx.held_out
        outputs = initial = reference.run_batches(graph, ctx.holdout)
        results = []
        for p in self.passes:
            start = time.perf_counter()
            before = cost(graph)
            new, details = p.run(graph, ctx)
            new_outputs = reference.run_batches(new, ctx.holdout)
            fid = _worst(outputs, new_outputs)
            if p.exact and not fid.max_rel_err <= EXACT_REL_TOL:
                raise RuntimeError(f"internal error: pass {p.name} is declared exact but moved "
                                   f"outputs by {fid.max_rel_err:.3g} (relative)")
            res = PassResult(p.name, p.exact, before, cost(new), details, fid, ctx.describe(),
                             time.perf_counter() - start, ctx.held_out)
            results.append(res)
            self.log(_summary(res))
            graph, outputs = new, new_outputs
        self.fidelity = _worst(initial, outputs)
        return graph, results


def _worst(ref: list[list[np.ndarray]], new: list[list[np.ndarray]]) -> reference.Fidelity:
    fids = [reference.compare(r, n) for r, n in zip(ref, new)]
    return reference.Fidelity(max(f.max_abs_err for f in fids), max(f.max_rel_err for f in fids),
                              min(f.cosine for f in fids))


def _summary(r: PassResult) -> str:
    def pct(a: int, b: int) -> str:
        return f"{100.0 * (b - a) / a:+.1f}%" if a else "n/a"
    kind = "exact" if r.exact else (f"lossy, cosine {r.fidelity.cosine:.5f}" if r.held_out
                                    else "lossy, fidelity not measured (one calibration "
                                         "sample: nothing held out)")
    return (f"pass {r.name}: params {r.before.params:,} -> {r.after.params:,} "
            f"({pct(r.before.params, r.after.params)}), MACs {r.before.macs:,} -> "
            f"{r.after.macs:,} ({pct(r.before.macs, r.after.macs)}), {kind}, {r.seconds:.2f}s")
