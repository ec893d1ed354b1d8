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

import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from sparsec import reference
from sparsec.analysis.cost import Cost, cost
from sparsec.ir.graph import Graph
from sparsec.progress import Progress  # noqa: F401 - the passes report through it

EXACT_REL_TOL = 1e-4
#: below this many held-out samples a fidelity figure is rough: reports warn, and passes do
#: not choose between alternatives on it
FEW_SAMPLES = 8

Log = Callable[[str], None]


Feeds = dict[str, np.ndarray]


@dataclass
class PassContext:
    """Calibration data for passes: ``fit`` to learn from, ``holdout`` to report on.

    ``mask`` names the input that marks real positions (an ``attention_mask``: 1 for a token,
    0 for padding). Padded positions are left out of every fit, statistic and fidelity figure
    (``rows``, ``compare``): with short sentences padded to a fixed length they can be most of
    the data, and what a model computes there is never used."""

    fit: list[Feeds]
    holdout: list[Feeds]
    mask: str | None = None
    #: progress lines of long loops inside passes (``Progress``); silent by default
    log: Callable[[str], None] = lambda msg: None
    #: distinct samples in ``holdout`` (its batches may repeat samples to fill the batch size)
    samples_held_out: int = 0
    #: the last graph ``holdout_outputs`` ran, with its outputs (a pass compares several
    #: candidates against one original)
    _last: tuple = field(default=(None, None), repr=False)
    #: where held-out outputs over the calibration budget go (a temporary directory)
    _spill: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def held_out(self) -> bool:
        return self.fit is not self.holdout

    def holdout_outputs(self, graph: Graph) -> list[list[np.ndarray]]:
        """``graph``'s outputs on the held-out batches, run once for the graph a pass keeps
        comparing against. Past ``SPARSEC_CALIBRATION_BYTES`` of them (a causal LM's logits
        are held-out tokens x vocabulary), each batch's go to disk as it is run and are read
        back through memory maps."""
        if self._last[0] is not graph:
            self._last = (None, None)           # the previous graph's go first
            self._last = (graph, self._outputs(graph))
        return self._last[1]

    def compare_graph(self, want: list[list[np.ndarray]], graph: Graph) -> reference.Fidelity:
        """``compare(want, graph's held-out outputs)``, running ``graph`` one held-out batch
        at a time: its outputs are never all held at once."""
        sess = reference.session(graph)
        return _worst([reference.compare(*_real(w, sess.run(None, feeds), m))
                       for w, feeds, m in zip(want, self.holdout, self.masks(self.holdout))])

    def _outputs(self, graph: Graph) -> list[list[np.ndarray]]:
        from sparsec import layerwise

        budget, held, out = layerwise.default_budget(), 0, []
        sess = reference.session(graph)
        for feeds in self.holdout:
            outs = sess.run(None, feeds)
            held += sum(o.nbytes for o in outs)
            if budget is not None and held > budget:
                if self._spill is None:
                    self._spill = tempfile.TemporaryDirectory(prefix="sparsec-holdout-")
                outs = [layerwise.to_disk(o, self._spill.name) for o in outs]
                held -= sum(o.nbytes for o in outs)
            out.append(outs)
        return out

    def masks(self, batches: list[Feeds]) -> list[np.ndarray | None]:
        """Per batch: the boolean [batch, sequence] map of real positions, or None."""
        return [None if self.mask is None else np.asarray(b[self.mask]) != 0 for b in batches]

    def compare(self, want: list[list[np.ndarray]], got: list[list[np.ndarray]],
                batches: list[Feeds] | None = None) -> reference.Fidelity:
        """Worst fidelity over batches (default: the held-out ones), padded positions left out
        of outputs laid out by position."""
        batches = self.holdout if batches is None else batches
        return _worst([reference.compare(*_real(w, g, m))
                       for w, g, m in zip(want, got, self.masks(batches))])

    def distortion(self, want: list[list[np.ndarray]], got: list[list[np.ndarray]],
                   batches: list[Feeds]) -> float:
        """Relative squared error of ``got`` against ``want``, over all batches and outputs,
        padded positions left out."""
        num = den = 0.0
        for w, g, m in zip(want, got, self.masks(batches)):
            for r, o in zip(*_real(w, g, m)):
                r = np.asarray(r, np.float64)
                num += float(np.sum((np.asarray(o, np.float64) - r) ** 2))
                den += float(np.sum(r ** 2))
        return num / max(den, 1e-30)

    @classmethod
    def split(cls, batches: list[Feeds], every: int = 4) -> "PassContext":
        """Every ``every``-th batch is held out. With fewer batches than that, samples are
        held out instead (every ``every``-th sample along the leading axis that all inputs
        share, at least one), and both sides are batched again to the model's batch size by
        repeating their own samples, so no fitted sample is ever scored. Only a single sample
        (or inputs without a common leading axis) leaves nothing to hold out: then both roles
        use it, and ``held_out`` is False (reports say "not measured")."""
        if len(batches) >= every:
            holdout = batches[every - 1::every]
            samples = _samples(holdout)
            return cls([b for i, b in enumerate(batches) if i % every != every - 1], holdout,
                       samples_held_out=len(holdout) if samples is None else len(samples))
        samples = _samples(batches)
        if samples is None or len(samples) < 2:
            return cls(batches, batches)
        hold = set(range(every - 1, len(samples), every)) or {len(samples) - 1}
        size = next(iter(batches[0].values())).shape[0]
        return cls(_rebatch([x for i, x in enumerate(samples) if i not in hold], size),
                   _rebatch([x for i, x in enumerate(samples) if i in hold], size),
                   samples_held_out=len(hold))

    def describe(self) -> str:
        if self.held_out:
            padding = f", positions that '{self.mask}' marks as padding left out" if self.mask \
                else ""
            plural = "s" if self.samples_held_out != 1 else ""
            return f"{self.samples_held_out} held-out calibration sample{plural}{padding}"
        return "not measured: one calibration sample, nothing to hold out"


def _worst(fids: list[reference.Fidelity]) -> reference.Fidelity:
    return reference.Fidelity(max(f.max_abs_err for f in fids),
                              max(f.max_rel_err for f in fids), min(f.cosine for f in fids))


def positions(shape: tuple[int, ...], mask: np.ndarray) -> np.ndarray | None:
    """Which positions of a tensor laid out [batch, ..., sequence] (``shape`` without its
    channel axis), or [batch * sequence], are real under ``mask`` [batch, sequence]; None when
    the tensor is not laid out by position (a pooled embedding, a conv map)."""
    b, s = mask.shape
    if len(shape) == 1 and shape[0] == b * s and s > 1:
        return mask.reshape(-1)
    if len(shape) >= 2 and shape[0] == b and shape[-1] == s:
        return np.broadcast_to(mask.reshape((b,) + (1,) * (len(shape) - 2) + (s,)), shape)
    return None


def rows(x: np.ndarray, mask: np.ndarray | None, axis: int = -1) -> np.ndarray:
    """``x`` as a [positions, channels] matrix (channel ``axis`` last), the positions that
    ``mask`` marks as padding left out."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    keep = None if mask is None else positions(x.shape[:-1], mask)
    flat = x.reshape(-1, x.shape[-1])
    return flat if keep is None or keep.all() else flat[keep.reshape(-1)]


def _real(want: list[np.ndarray], got: list[np.ndarray], mask: np.ndarray | None):
    """Paired outputs with padded positions left out (outputs that are laid out by position,
    of at least two dimensions, channels last)."""
    if mask is None:
        return want, got
    w2, g2 = [], []
    for w, g in zip(want, got):
        keep = positions(np.shape(w)[:-1], mask) if np.ndim(w) >= 2 and np.shape(w) == np.shape(
            g) else None
        if keep is None or keep.all():
            w2.append(w)
            g2.append(g)
        else:
            w2.append(rows(w, mask))
            g2.append(rows(g, mask))
    return w2, g2


def find_mask(graph: Graph, batches: list[Feeds], name: str | None = None) -> str | None:
    """The input that marks real positions: ``name`` when given ("" for none), else an input
    called ``attention_mask`` that is [batch, sequence] of 0 and 1 in every batch."""
    from sparsec.errors import BadOptionError

    if name == "":
        return None
    candidates = [name] if name else [i for i in graph.inputs
                                      if i.lower().endswith("attention_mask")]
    for cand in candidates:
        ok = cand in graph.inputs and len(graph.shape(cand)) == 2 and all(
            np.isin(np.asarray(b[cand]), (0, 1)).all() for b in batches)
        if ok:
            return cand
        if name:
            raise BadOptionError(f"--calib-mask '{name}': the model has no [batch, sequence] "
                                 f"input of that name holding only 0 and 1 (inputs: "
                                 f"{', '.join(graph.inputs)})")
    return None


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
    #: the input marking real positions (None: auto-detect an ``attention_mask``; "": none)
    mask: str | None = None
    #: after ``run``: distinct calibration samples the fidelity was measured on
    samples_held_out: int = 0

    def run(self, graph: Graph) -> tuple[Graph, list[PassResult]]:
        batches = self.calibration or [reference.random_inputs(graph, seed=0)]
        ctx = PassContext.split(batches)
        ctx.mask = find_mask(graph, batches, self.mask)
        ctx.log = self.log
        self.measured_on, self.held_out = ctx.describe(), ctx.held_out
        self.samples_held_out = ctx.samples_held_out
        outputs = initial = ctx.holdout_outputs(graph)
        results = []
        for p in self.passes:
            start = time.perf_counter()
            before = cost(graph)
            new, details = p.run(graph, ctx)
            new_outputs = ctx.holdout_outputs(new)
            fid = ctx.compare(outputs, new_outputs)
            if p.exact and not fid.max_rel_err <= EXACT_REL_TOL:
                raise RuntimeError(f"internal error: pass {p.name} is declared exact but moved "
                                   f"outputs by {fid.max_rel_err:.3g} (relative)")
            res = PassResult(p.name, p.exact, before, cost(new), details, fid, ctx.describe(),
                             time.perf_counter() - start, ctx.held_out)
            results.append(res)
            self.log(_summary(res))
            graph, outputs = new, new_outputs
        self.fidelity = ctx.compare(initial, outputs)
        return graph, results


def _summary(r: PassResult) -> str:
    def pct(a: int, b: int) -> str:
        return f"{100.0 * (b - a) / a:+.1f}%" if a else "n/a"
    kind = "exact" if r.exact else (f"lossy, cosine {r.fidelity.cosine:.5f}" if r.held_out
                                    else "lossy, fidelity not measured (one calibration "
                                         "sample: nothing held out)")
    sparse = "" if r.after.nonzeros == r.after.params and r.before.nonzeros == r.before.params \
        else (f", nonzero {r.before.nonzeros:,} -> {r.after.nonzeros:,} "
              f"({pct(r.before.nonzeros, r.after.nonzeros)})")
    return (f"pass {r.name}: params {r.before.params:,} -> {r.after.params:,} "
            f"({pct(r.before.params, r.after.params)}){sparse}, MACs {r.before.macs:,} -> "
            f"{r.after.macs:,} ({pct(r.before.macs, r.after.macs)}), {kind}, {r.seconds:.2f}s")
