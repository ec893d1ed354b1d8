"""Compress to a latency measured on the target itself, and the trade-off as a curve.

Fewer MACs do not always mean less time: kernels change strategy with their widths, small
layers are bound by memory or by launching threads, and what the rest of the model costs
does not shrink. So ``compile(..., latency_budget=MS)`` (or ``speedup=X``) does not predict
the latency of a pruned model from its MACs: it builds and times it, on the machine it will
run on (targets that run here), and searches the ratio by bisection for the least pruning
whose measured latency is within the budget (``SEARCH_STEPS`` builds after the two ends;
~5-10 s each for a small CNN or encoder). Every other option (criterion, sensitivity,
reconstruction, head and hidden ratios in proportion) applies at each ratio tried, so the
budget is met by the recipe the user chose. The package's own library is timed again at the
end: the manifest's ``latency`` says the asked, the measured and the dense latency, and every
ratio tried.

``sweep`` runs a series of ratios, each pruned, compiled and timed, uniform and (optionally)
with the sensitivity allocation, and writes the held-out fidelity against measured latency as
a table (JSON, Markdown) and a picture (SVG), ONNX Runtime's dense latency marked.

Not yet (see the issue): per-group latency tables from the target's kernels and a knapsack
over them (widths chosen per group by measured cost); today one ratio (or the sensitivity
allocation of it) is searched.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sparsec.errors import BadOptionError

if TYPE_CHECKING:
    import numpy as np

    from sparsec.api import PruneResult
    from sparsec.ir.graph import Graph
    from sparsec.targets import TargetSpec

#: bisection steps after the two ends (resolution of the ratio: its upper end / 2**steps)
SEARCH_STEPS = 5
#: a ratio whose measured latency is within this share under the budget ends the search
CLOSE_ENOUGH = 0.05


def time_ms(run: Callable[[dict], Any], feeds: dict, seconds: float = 0.5,
            blocks: int = 5, min_calls: int = 3) -> float:
    """Milliseconds of ``run(feeds)``: the least of ``blocks`` block medians, each block at
    least ``min_calls`` calls and about ``seconds / blocks`` (after two warm-up calls). On a
    shared machine a burst of other work inflates some blocks; the quietest block is the
    figure that repeats."""
    for _ in range(2):
        run(feeds)
    medians = []
    for _ in range(blocks):
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_calls or time.perf_counter() - start < seconds / blocks:
            t0 = time.perf_counter()
            run(feeds)
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return min(medians) * 1e3


def check_target(spec: "TargetSpec", what: str) -> None:
    if not (spec.runs_here and spec.device == "cpu"):
        raise BadOptionError(f"{what} is measured on the target: target '{spec.name}' does not "
                             f"run on this machine (use host, or a target matching this CPU)")


class Timer:
    """Builds graphs for ``spec`` in a scratch directory and times them on ``feeds``."""

    def __init__(self, spec: "TargetSpec", feeds: dict[str, "np.ndarray"], scratch: Path):
        self.spec, self.feeds, self.scratch = spec, feeds, scratch
        self._n = 0

    def __call__(self, graph: "Graph") -> float:
        from sparsec.ir.onnx_io import to_onnx
        from sparsec.targets.host import compile_onnx, load_library

        self._n += 1
        lib = self.scratch / f"try{self._n}.so"
        facts = compile_onnx(to_onnx(graph), self.spec, lib, log=lambda s: None)
        #: the last library's run function (it stays loaded after its file is deleted)
        self.last = load_library(lib, facts["inputs"]).run
        return time_ms(self.last, self.feeds)


def budget_search(graph: "Graph", options: dict, spec: "TargetSpec",
                  latency_budget: float | None, speedup: float | None,
                  log: Callable[[str], None]) -> tuple["PruneResult", dict, Callable]:
    """The least pruning (per ``options``, a ``prune`` keyword set) whose measured latency on
    ``spec`` is within ``latency_budget`` ms (or the dense latency / ``speedup``): the pruned
    result, the search's record (``budget_ms``, ``dense_ms``, ``tried``) and a function that
    times the dense library again."""
    from sparsec import api, reference

    check_target(spec, "--latency-budget / --speedup")
    if (latency_budget is None) == (speedup is None):
        raise BadOptionError("give one of --latency-budget MS and --speedup X")
    for flag, value in (("--latency-budget", latency_budget), ("--speedup", speedup)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0):
            raise BadOptionError(f"{flag} takes a positive number, not {value!r}")
    if speedup is not None and speedup <= 1:
        raise BadOptionError(f"--speedup is how many times faster than the dense model: > 1, "
                             f"not {speedup:g}")
    if options.get("max_drop") is not None:
        raise BadOptionError("--max-drop and a latency budget both choose the ratio: give one")
    options = {**options, "calibration": api._calibration(graph, options["calibration"])}
    feeds = options["calibration"][0] if options["calibration"] else \
        reference.random_inputs(graph, seed=0)
    top, at_ratio = api.ratio_scaler(options)
    tried: dict[float, tuple["PruneResult", float]] = {}
    with tempfile.TemporaryDirectory(prefix="sparsec-latency-") as tmp:
        timer = Timer(spec, feeds, Path(tmp))
        dense = timer(graph)
        dense_run = getattr(timer, "last", None)
        budget = float(latency_budget) if latency_budget is not None else dense / speedup
        log(f"latency: dense {dense:.4g} ms on {spec.name}; budget {budget:.4g} ms "
            f"({dense / budget:.2f}x faster)")

        def attempt(ratio: float) -> float:
            res = api.prune(graph, **at_ratio(ratio))
            ms = timer(res.graph)
            tried[ratio] = (res, ms)
            log(f"latency: ratio {ratio:.4f} -> {ms:.4g} ms "
                f"({'within' if ms <= budget else 'over'} {budget:.4g})")
            return ms

        if dense <= budget:
            chosen = 0.0
            log("latency: the dense model is within the budget: nothing pruned")
            tried[0.0] = (api.prune(graph, **at_ratio(0.0)), dense)
        else:
            fastest = attempt(top)
            if fastest > budget:
                raise BadOptionError(
                    f"the budget {budget:.4g} ms is out of reach: ratio {top:.2f} (the most "
                    f"this searches; raise --ratio to allow more) measured {fastest:.4g} ms, "
                    f"dense {dense:.4g} ms")
            lo, hi = 0.0, top
            for _ in range(SEARCH_STEPS):
                if tried[hi][1] >= budget * (1 - CLOSE_ENOUGH):
                    break
                mid = round((lo + hi) / 2, 6)
                if attempt(mid) <= budget:
                    hi = mid
                else:
                    lo = mid
            chosen = hi
    result, ms = tried[chosen]
    log(f"latency: chose ratio {chosen:.4f} ({ms:.4g} ms) of {len(tried)} tried")
    record = {"budget_ms": budget, "dense_ms": dense, "ratio": chosen,
              "tried": [{"ratio": r, "ms": t} for r, (_, t) in sorted(tried.items())]}
    result.recipe = result.recipe.updated(**{k: v for k, v in at_ratio(chosen).items()
                                             if k in ("ratio", "head_ratio", "hidden_ratio")})

    def dense_again() -> float | None:
        """The dense library timed again: beside the package's own figure, a speed-up taken
        minutes apart on a VM whose speed drifts would mislead."""
        return None if dense_run is None else time_ms(dense_run, feeds)

    return result, record, dense_again


# --------------------------------------------------------------------------- sweep
def sweep(model, ratios: list[float], *, target: str = "host", sensitivity: bool = False,
          options: dict | None = None, ort: bool = True,
          log: Callable[[str], None] = lambda s: None) -> dict:
    """Each ratio pruned (``options``: ``prune`` keywords), compiled for ``target`` and timed;
    with ``sensitivity`` also the sensitivity allocation of each ratio. Returns
    ``{"target", "dense_ms", "ort_ms", "rows": [{"ratio", "allocation", "ms", "cosine",
    "macs", "params"}]}``; the fidelity is the held-out cosine ``prune`` reports."""
    from sparsec import api, reference
    from sparsec.targets import resolve_target

    spec = resolve_target(target)
    check_target(spec, "sweep")
    if not ratios or any(not 0.0 <= r < 1.0 for r in ratios):
        raise BadOptionError(f"--ratios takes ratios in [0, 1), got {ratios}")
    options = dict(options or {})
    graph = api.load(model, options.pop("input_shapes", None))
    options["calibration"] = api._calibration(graph, options.get("calibration"))
    feeds = options["calibration"][0] if options["calibration"] else \
        reference.random_inputs(graph, seed=0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sparsec-sweep-") as tmp:
        timer = Timer(spec, feeds, Path(tmp))
        dense = timer(graph)
        log(f"sweep: dense {dense:.4g} ms on {spec.name}")
        ort_ms = _ort_ms(graph, feeds) if ort else None
        for allocation in ["uniform"] + (["sensitivity"] if sensitivity else []):
            for ratio in sorted(ratios):
                res = api.prune(graph, **{**options, "ratio": ratio,
                                          "sensitivity": allocation == "sensitivity"})
                ms = dense if ratio == 0 else timer(res.graph)
                rows.append({"ratio": ratio, "allocation": allocation, "ms": ms,
                             "cosine": res.fidelity.cosine, "macs": res.after.macs,
                             "params": res.after.params})
                log(f"sweep: {allocation} ratio {ratio:g} -> {ms:.4g} ms, held-out cosine "
                    f"{res.fidelity.cosine:.5f}")
    return {"target": spec.name, "dense_ms": dense, "ort_ms": ort_ms,
            "measured_on": res.measured_on, "rows": rows}


def _ort_ms(graph: "Graph", feeds: dict) -> float:
    """ONNX Runtime's latency on the dense model, one thread per physical core."""
    import onnxruntime as ort

    from sparsec.ir.onnx_io import to_onnx
    from sparsec.targets import physical_cores

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = physical_cores()
    sess = ort.InferenceSession(to_onnx(graph).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return time_ms(lambda f: sess.run(None, {n: f[n] for n in names}), feeds)


def sweep_markdown(report: dict, title: str) -> str:
    lines = [f"# {title}", "",
             f"Measured on `{report['target']}`: dense {report['dense_ms']:.4g} ms"
             + (f", ONNX Runtime dense {report['ort_ms']:.4g} ms" if report["ort_ms"] else "")
             + f". Fidelity: held-out cosine vs the original ({report['measured_on']}).", "",
             "| allocation | ratio | latency ms | speed-up | held-out cosine | MACs | params |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['allocation']} | {r['ratio']:g} | {r['ms']:.3f} | "
                     f"{report['dense_ms'] / r['ms']:.2f} | {r['cosine']:.5f} | "
                     f"{r['macs']:,} | {r['params']:,} |")
    return "\n".join(lines) + "\n"


def sweep_svg(report: dict, title: str) -> str:
    """Held-out cosine (y) against measured latency (x), one line per allocation; dense
    latencies (ours and ONNX Runtime's) as vertical marks."""
    from sparsec.plot import line_chart_svg

    series: dict[str, list[tuple[float, float]]] = {}
    for r in report["rows"]:
        series.setdefault(r["allocation"], []).append((r["ms"], r["cosine"]))
    marks = {"dense (sparsec)": report["dense_ms"]}
    if report["ort_ms"]:
        marks["dense (ONNX Runtime)"] = report["ort_ms"]
    return line_chart_svg(title, "latency (ms)", "held-out cosine", series, marks)
