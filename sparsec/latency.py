"""Compress to a latency measured on the target itself, and the trade-off as a curve.

Fewer MACs do not always mean less time: kernels change strategy with their widths, small
layers are bound by memory or by launching threads, and what the rest of the model costs
does not shrink. So ``compile(..., latency_budget=MS)`` (or ``speedup=X``) does not predict
the latency of a pruned model from its MACs: it builds and times candidates on the machine
they will run on (targets that run here). Two ways:

* **One ratio** (default): bisection over the ratio for the least pruning whose measured
  latency is within the budget (``SEARCH_STEPS`` builds after the two ends). Every other option
  (criterion, reconstruction, head and hidden ratios in proportion) applies at each ratio.
* **Per-group widths** (``sensitivity=True``; ZipLM's and HALP's idea): a *latency table*
  first, each prunable group alone cut to ``LEVELS`` of its channels, built, timed, and its
  held-out fidelity measured; then a knapsack, greedy on fidelity lost per share of latency
  saved, picks each group's level until the latency the table predicts meets the budget (each
  group's saving is a factor on the latency: cutting a conv's input and output channels
  multiplies its time by both shares). The plan is built and timed; when it measures over
  the budget (or well under), the knapsack is asked for the difference (``FEEDBACK_ROUNDS``).
  The table's levels are coarse, so a plan that still lands well under the budget is then
  scaled back as a whole (every group's cut times one factor, bisected: ``REFINE_STEPS``).
  Of the builds within the budget the most faithful wins; near-ties go to the least pruning.
  Candidates are timed beside the dense build, so a drift of the machine's speed during the
  search does not move the budget. Heads, FFN
  widths and channel groups compete in one budget. The plan is a recipe (``layer_ratios`` by
  each group's own weight), so it re-runs without searching. The record says the predicted
  and the measured latency.

The figure for a build is the least of several block medians (``time_ms``). The manifest's
``latency`` says the asked, the measured (the package's own library) and the dense latency,
timed again beside it (this VM's speed drifts by tens of percent over minutes), and what was
tried.

``sweep`` runs a series of ratios, each pruned, compiled and timed, uniform and (optionally)
with the sensitivity allocation or the latency-aware per-group widths at the same measured
latencies, and writes the held-out fidelity against measured latency as a table (JSON,
Markdown) and a picture (SVG), ONNX Runtime's dense latency marked.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from sparsec.errors import BadOptionError

if TYPE_CHECKING:
    from sparsec.api import PruneResult
    from sparsec.ir.graph import Graph
    from sparsec.targets import TargetSpec

#: bisection steps after the two ends (resolution of the ratio: its upper end / 2**steps)
SEARCH_STEPS = 5
#: a ratio whose measured latency is within this share under the budget ends the search
CLOSE_ENOUGH = 0.05
#: per-group widths: the shares of a group's channels removed in its latency-table rows
LEVELS = (0.25, 0.5, 0.75, 0.875)
#: per-group widths: builds of a plan after the first that measured over the budget
FEEDBACK_ROUNDS = 3
#: per-group widths: builds that scale a plan landing well under the budget back toward it
REFINE_STEPS = 5
#: per-group widths: held-out cosines this close count as equal (the least pruning wins)
COSINE_TIE = 1e-4
#: a scaled-back plan keeps multiples of this many channels per group (16 fp32 lanes: the
#: width conv and dense kernels block output channels by on AVX-512)
KEPT_MULTIPLE = 16


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


def time_pair(run_a: Callable[[dict], Any], run_b: Callable[[dict], Any], feeds: dict,
              seconds: float = 1.0, blocks: int = 5) -> tuple[float, float]:
    """Milliseconds of ``run_a`` and ``run_b`` on ``feeds`` timed side by side (alternating
    blocks, the least block median of each): their ratio holds while the machine's speed
    drifts, which a figure taken minutes earlier does not."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(blocks):
        a.append(time_ms(run_a, feeds, seconds / (2 * blocks), blocks=1))
        b.append(time_ms(run_b, feeds, seconds / (2 * blocks), blocks=1))
    return min(a), min(b)


def scratch_dir(prefix: str) -> "tempfile.TemporaryDirectory":
    """A temp directory for candidate builds, named ``PREFIX-PID-XXXX``; those that runs
    killed before their clean-up left behind (their PID no longer lives) are removed first."""
    import os
    import re
    import shutil

    for old in Path(tempfile.gettempdir()).glob(f"{prefix}-*-*"):
        match = re.fullmatch(rf"{re.escape(prefix)}-(\d+)-.+", old.name)
        if not match or not old.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except OSError:                      # alive, another user's: not ours to touch
            pass
    return tempfile.TemporaryDirectory(prefix=f"{prefix}-{os.getpid()}-")


def check_target(spec: "TargetSpec", what: str) -> None:
    if not (spec.runs_here and spec.device == "cpu"):
        raise BadOptionError(f"{what} is measured on the target: target '{spec.name}' does not "
                             f"run on this machine (use host, or a target matching this CPU)")


class Timer:
    """Builds graphs for ``spec`` in a scratch directory and times them on ``feeds``."""

    def __init__(self, spec: "TargetSpec", feeds: dict[str, "np.ndarray"], scratch: Path):
        import json

        self.spec, self.feeds, self.scratch = spec, feeds, scratch
        self._n = 0
        #: what latency tables measured by this timer are cached under (the target)
        self.cache_key = json.dumps(spec.tvm_target, sort_keys=True)
        #: the first graph timed (the dense model) and its figure: later graphs are timed
        #: beside it and reported at the machine speed of that first figure
        self.reference: tuple[Callable, float] | None = None

    def __call__(self, graph: "Graph") -> float:
        from sparsec.ir.onnx_io import to_onnx
        from sparsec.targets.host import compile_onnx, load_library

        self._n += 1
        lib = self.scratch / f"try{self._n}.so"
        facts = compile_onnx(to_onnx(graph), self.spec, lib, log=lambda s: None)
        #: the last library's run function (it stays loaded after its file is deleted)
        self.last = load_library(lib, facts["inputs"]).run
        if self.reference is None:
            ms = time_ms(self.last, self.feeds)
            self.reference = (self.last, ms)
            return ms
        ms, dense_now = time_pair(self.last, self.reference[0], self.feeds)
        return ms * self.reference[1] / dense_now


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
    with scratch_dir("sparsec-latency") as tmp:
        timer = Timer(spec, feeds, Path(tmp))
        dense = timer(graph)
        dense_run = getattr(timer, "last", None)

        def dense_again() -> float | None:
            """The dense library timed again: beside the package's own figure, a speed-up
            taken minutes apart on a VM whose speed drifts would mislead."""
            return None if dense_run is None else time_ms(dense_run, feeds)

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
        elif options.get("sensitivity"):
            table = latency_table(graph, options, timer, dense, log)
            result, plan = plan_search(graph, options, timer, table, dense, budget, log)

            return result, {"budget_ms": budget, "dense_ms": dense, **plan}, dense_again
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
    record = {"budget_ms": budget, "dense_ms": dense, "ratio": chosen, "ms": ms,
              "tried": [{"ratio": r, "ms": t} for r, (_, t) in sorted(tried.items())]}
    result.recipe = result.recipe.updated(**{k: v for k, v in at_ratio(chosen).items()
                                             if k in ("ratio", "head_ratio", "hidden_ratio")})

    return result, record, dense_again


# --------------------------------------------------------------------------- per-group widths
def _literal(name: str) -> str:
    """``name`` as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def units(graph: "Graph", options: dict) -> list[dict]:
    """The prunable groups that ``options`` do not ignore, each named by a pattern over its
    source weights that ``layer_ratios`` can address: a weight that is a source of this group
    alone where there is one (a group whose weights all feed others too is addressed with
    them: the unit lists every group its pattern reaches)."""
    from fnmatch import fnmatchcase

    from sparsec.analysis.depgraph import DependencyGraph

    dg = DependencyGraph(graph)
    ignore = list(options.get("ignore") or ())
    groups = [g for g in dg.groups if g.prunable and not any(
        fnmatchcase(src, pat) for src in g.sources for pat in ignore)]
    owners: dict[str, int] = {}
    for g in dg.groups:
        for src in set(g.sources):
            owners[src] = owners.get(src, 0) + 1
    out: list[dict] = []
    seen: set[str] = set()
    for g in groups:
        own = [src for src in g.sources if owners[src] == 1]
        pattern = _literal((own or g.sources)[0])
        if pattern in seen:
            continue
        seen.add(pattern)
        reached = [h.id for h in groups if any(fnmatchcase(src, pattern) for src in h.sources)]
        out.append({"pattern": pattern, "groups": reached, "kind": g.kind,
                    "channels": sum(h.size for h in groups if h.id in reached)})
    return out


def _group_options(options: dict, layer_ratios: dict[str, float]) -> dict:
    """``prune`` keywords that cut only the groups in ``layer_ratios``."""
    return {**options, "ratio": 0.0, "head_ratio": None, "hidden_ratio": 0.0,
            "sensitivity": False, "max_drop": None, "layer_ratios": dict(layer_ratios)}


def latency_table(graph: "Graph", options: dict, timer: "Timer", dense: float,
                  log: Callable[[str], None]) -> list[dict]:
    """Each unit (see :func:`units`) alone cut to each of ``LEVELS``: built and timed on the
    target, its held-out fidelity measured. ``[{"pattern", "kind", "channels", "rows":
    [{"level", "ms", "saved_ms", "distortion"}]}]``; distortion is 1 - held-out cosine."""
    from sparsec import api
    from sparsec.passes.manager import Progress

    table = units(graph, options)
    if not table:
        raise BadOptionError("no prunable group to spend a latency budget on")
    path = _table_path(graph, options, timer)
    if path is not None and path.is_file():
        import json

        cached = json.loads(path.read_text())
        scale = dense / cached["dense_ms"]     # the machine's speed drifts: keep the shares
        for unit, rows in zip(table, cached["rows"]):
            unit["rows"] = [{**r, "ms": r["ms"] * scale, "saved_ms": dense - r["ms"] * scale,
                             "saved_log": float(np.log(cached["dense_ms"] / r["ms"]))}
                            for r in rows]
        log(f"latency: table of {len(table)} groups from the cache ({path})")
        return table
    progress = Progress(log, "latency table", len(table) * len(LEVELS), "builds timed")
    for unit in table:
        unit["rows"] = []
        for level in LEVELS:
            res = api.prune(graph, **_group_options(options, {unit["pattern"]: level}))
            ms = timer(res.graph)
            unit["rows"].append({"level": level, "ms": ms, "saved_ms": dense - ms,
                                 "saved_log": float(np.log(dense / ms)),
                                 "distortion": max(0.0, 1.0 - res.fidelity.cosine)})
            progress.step()
    log(f"latency: table of {len(table)} groups x {len(LEVELS)} widths; alone, the most a "
        f"group saves is {max(r['saved_ms'] for u in table for r in u['rows']):.4g} ms")
    if path is not None:
        import json

        from sparsec.package import atomic_write_bytes

        try:
            atomic_write_bytes(path, json.dumps({"dense_ms": dense, "rows": [
                u["rows"] for u in table]}).encode())
        except OSError as e:
            log(f"warning: latency table not cached ({e})")
    return table


def _table_path(graph: "Graph", options: dict, timer) -> Path | None:
    """Where the latency table of this model, pruning options, calibration data and target
    is cached (beside the tuning cache); None for a timer that is not a target's."""
    import hashlib
    import json

    from sparsec.ir.onnx_io import to_onnx
    from sparsec.targets.tuning import cache_path

    key = getattr(timer, "cache_key", None)
    if key is None:
        return None
    h = hashlib.sha256(to_onnx(graph).SerializeToString())
    fixed = {k: v for k, v in sorted(options.items()) if k not in (
        "ratio", "head_ratio", "hidden_ratio", "sensitivity", "layer_ratios", "max_drop",
        "calibration")}
    h.update(json.dumps([key, fixed, LEVELS], sort_keys=True, default=str).encode())
    for batch in options.get("calibration") or []:
        for name in sorted(batch):
            h.update(name.encode())
            h.update(np.ascontiguousarray(batch[name]).tobytes())
    return cache_path().parent / "latency-tables" / f"{h.hexdigest()[:32]}.json"


def knapsack(table: list[dict], need_ms: float, key: str = "saved_ms"
             ) -> tuple[dict[str, float], float] | None:
    """Levels per unit whose summed savings (the table rows' ``key``, assumed to add up)
    reach ``need_ms``, greedily taking the step that loses the least fidelity per unit saved
    (a step may skip levels; savings that do not grow are never bought). ``({pattern:
    level}, predicted saving)``, or None when even the deepest cuts fall short.
    :func:`plan_search` passes log-latency savings (``saved_log``): cuts of two groups that
    share a kernel (a conv's input and output channels) multiply its time, they do not
    subtract twice."""
    state = {u["pattern"]: (0.0, 0.0, 0.0) for u in table}     # level, saved, distortion
    saved = 0.0
    while saved < need_ms:
        best, best_cost = None, float("inf")
        for u in table:
            level, have, lost = state[u["pattern"]]
            for row in u["rows"]:
                gain = row[key] - have
                if row["level"] <= level or gain <= 0:
                    continue
                cost = max(row["distortion"] - lost, 0.0) / gain
                if cost < best_cost:
                    best, best_cost = (u["pattern"], row), cost
        if best is None:
            return None
        pattern, row = best
        saved += row[key] - state[pattern][1]
        state[pattern] = (row["level"], row[key], row["distortion"])
    # greedy steps overshoot (one group's step can save far more than what was left to
    # find): give back cuts, most costly first, while the savings still reach the need
    rows = {u["pattern"]: [(0.0, 0.0, 0.0)] + [(r["level"], r[key], r["distortion"])
                                                for r in u["rows"]] for u in table}
    for pattern in sorted(state, key=lambda p: -state[p][2]):
        for option in sorted(rows[pattern], key=lambda r: r[2]):
            if option[2] >= state[pattern][2]:
                break
            if saved - state[pattern][1] + option[1] >= need_ms:
                saved += option[1] - state[pattern][1]
                state[pattern] = option
                break
    return {p: lv for p, (lv, _, _) in state.items() if lv > 0}, saved


def plan_search(graph: "Graph", options: dict, timer: "Timer", table: list[dict],
                dense: float, budget: float, log: Callable[[str], None]
                ) -> tuple["PruneResult", dict]:
    """Per-group widths from ``table`` for ``budget``, built and timed; asks the knapsack for
    the difference more where a build measures over the budget, or less where it lands well
    under (the table's savings need not add up), then scales a plan still well under back
    (:func:`_refine`). Of the builds within the budget, the one closest to the original on
    held-out data wins (within ``COSINE_TIE``, the least pruning). The result and the
    record: the plan, the predicted and measured latency of every build, the table. The
    budget is out of reach only once the deepest plan has been built and measured over it."""
    from sparsec import api

    need = float(np.log(dense / budget))          # log-latency to save
    builds: list[dict] = []
    result = None
    for _ in range(1 + FEEDBACK_ROUNDS):
        picked = knapsack(table, need, key="saved_log")
        deepest = {u["pattern"]: max(r["level"] for r in u["rows"]) for u in table}
        if picked is None and all(b["plan"] != deepest for b in builds):
            # the table says nothing reaches it (its savings are a sum, the model's are not):
            # a build says how far the deepest cuts really go
            picked = deepest, sum(max(r["saved_log"] for r in u["rows"]) for u in table)
        if picked is None:
            if result is not None:
                break
            most = dense * np.exp(-sum(max(r["saved_log"] for r in u["rows"]) for u in table))
            raise BadOptionError(
                f"the budget {budget:.4g} ms is out of reach by per-group widths: the table "
                f"predicts at best {most:.4g} ms (dense {dense:.4g} ms); without "
                f"--sensitivity one ratio may go further")
        plan, saved = picked
        predicted = dense * float(np.exp(-saved))
        if not plan or builds and plan == builds[-1]["plan"]:
            break               # nothing new to build (an empty plan is the dense model)
        result = api.prune(graph, **_group_options(options, plan))
        ms = timer(result.graph)
        builds.append({"plan": plan, "predicted_ms": predicted, "ms": ms,
                       "cosine": result.fidelity.cosine})
        log(f"latency: {len(plan)} of {len(table)} groups cut, predicted "
            f"{predicted:.4g} ms, measured {ms:.4g} ms "
            f"({'within' if ms <= budget else 'over'} {budget:.4g})")
        if budget * (1 - 2 * CLOSE_ENOUGH) <= ms <= budget:
            break
        # over: ask for the difference more, and at least a step beyond this plan's
        # predicted savings; well under: give the difference back
        miss = float(np.log(ms / budget))
        need = max(need + miss, saved * 1.0001 + 1e-6) if ms > budget else need + miss
    within = [b for b in builds if b["ms"] <= budget]
    if not within:
        raise BadOptionError(f"the budget {budget:.4g} ms is out of reach by per-group widths: "
                             f"the plans built measured "
                             f"{', '.join(format(b['ms'], '.4g') for b in builds)} ms")
    if max(b["ms"] for b in within) < budget * (1 - 2 * CLOSE_ENOUGH):
        result = _refine(graph, options, timer, min(within, key=lambda b: -b["ms"]), dense,
                         budget, builds, log, table) or result
    within = [b for b in builds if b["ms"] <= budget]
    top = max(b["cosine"] for b in within)
    # fidelity first; builds within COSINE_TIE of the best are a tie, and the least pruning
    # (the slowest within the budget) wins it
    best = max((b for b in within if b["cosine"] >= top - COSINE_TIE), key=lambda b: b["ms"])
    if best is not builds[-1]:
        result = api.prune(graph, **_group_options(options, best["plan"]))
    result.recipe = result.recipe.updated(ratio=0.0, head_ratio=None, hidden_ratio=0.0,
                                          sensitivity=False, layer_ratios=best["plan"])
    return result, {"allocation": "latency", "plan": best["plan"],
                    "predicted_ms": best["predicted_ms"], "ms": best["ms"], "builds": builds,
                    "table": table, "ratio": None}


def _friendly(level: float, unit: dict) -> float:
    """``level`` (a share of ``unit``'s channels to cut) moved down to the nearest cut that
    keeps a multiple of ``KEPT_MULTIPLE`` channels (heads and small groups as they are)."""
    c = unit["channels"]
    if unit["kind"] != "channels" or c < 2 * KEPT_MULTIPLE:
        return level
    kept = -(-round(c * (1 - level), 6) // KEPT_MULTIPLE) * KEPT_MULTIPLE
    return max(0.0, round(1 - kept / c, 6))


def _refine(graph: "Graph", options: dict, timer: "Timer", start: dict, dense: float,
            budget: float, builds: list[dict], log: Callable[[str], None],
            table: list[dict]) -> "PruneResult | None":
    """``start``'s plan (within the budget, but well under it) with every group's cut scaled
    by one factor in (0, 1), aimed at the middle of the band under the budget by regula
    falsi on log-latency between the dense model (factor 0) and the plan (factor 1); each
    build is appended to ``builds`` (``refined``: True; its prediction is the interpolation).
    Scaled cuts keep whole multiples of ``KEPT_MULTIPLE`` channels (:func:`_friendly`): a
    width between two vectors' worth costs a whole vector, so latency would not fall with
    it. The last build's result, or None."""
    from sparsec import api

    aim = float(np.log(budget * (1 - CLOSE_ENOUGH)))
    (lo, lo_log), (hi, hi_log) = (0.0, float(np.log(dense))), (1.0, float(np.log(start["ms"])))
    result = None
    for _ in range(REFINE_STEPS):
        scale = lo + (hi - lo) * (lo_log - aim) / max(lo_log - hi_log, 1e-9)
        # log-latency is convex in the scale: regula falsi alone creeps up on the budget from
        # above (MiniLM: x0.67, 0.72, 0.74 all 1-10 % over); a quarter of the bracket at least
        scale = min(max(scale, lo + 0.25 * (hi - lo)), hi - 0.25 * (hi - lo))
        units = {u["pattern"]: u for u in table}
        plan = {p: _friendly(level * scale, units[p]) for p, level in start["plan"].items()}
        plan = {p: level for p, level in plan.items() if level > 0}
        seen = [b["ms"] for b in builds if b["plan"] == plan] or ([dense] if not plan else [])
        if seen:                # built already (or the dense model): move the bracket
            if seen[0] > budget:
                lo, lo_log = scale, float(np.log(seen[0]))
            else:
                hi, hi_log = scale, float(np.log(seen[0]))
            continue
        result = api.prune(graph, **_group_options(options, plan))
        ms = timer(result.graph)
        # the prediction: log-latency interpolated between the bracket's ends
        predicted = float(np.exp(lo_log + (hi_log - lo_log) * (scale - lo) / (hi - lo)))
        builds.append({"plan": plan, "predicted_ms": predicted, "ms": ms,
                       "cosine": result.fidelity.cosine, "refined": True})
        log(f"latency: the plan's cuts x{scale:.3g}: measured {ms:.4g} ms "
            f"({'within' if ms <= budget else 'over'} {budget:.4g})")
        if ms > budget:
            lo, lo_log = scale, float(np.log(ms))
        elif ms >= budget * (1 - 2 * CLOSE_ENOUGH):
            break
        else:
            hi, hi_log = scale, float(np.log(ms))
    return result


# --------------------------------------------------------------------------- sweep
def sweep(model, ratios: list[float], *, target: str = "host", sensitivity: bool = False,
          latency_aware: bool = False, options: dict | None = None, ort: bool = True,
          log: Callable[[str], None] = lambda s: None) -> dict:
    """Each ratio pruned (``options``: ``prune`` keywords), compiled for ``target`` and timed;
    with ``sensitivity`` also the sensitivity allocation of each ratio; with
    ``latency_aware`` also per-group widths (:func:`plan_search`) at each uniform ratio's
    measured latency. Returns ``{"target", "dense_ms", "ort_ms", "rows": [{"ratio",
    "allocation", "ms", "cosine", "macs", "params"}]}`` (``ratio`` None for per-group
    widths); the fidelity is the held-out cosine ``prune`` reports."""
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
    with scratch_dir("sparsec-sweep") as tmp:
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
        if latency_aware:
            table = latency_table(graph, options, timer, dense, log)
            for row in [r for r in rows if r["allocation"] == "uniform" and r["ratio"] > 0]:
                try:
                    res, plan = plan_search(graph, options, timer, table, dense, row["ms"],
                                            lambda s: None)
                except BadOptionError as e:      # a budget the per-group widths cannot meet
                    log(f"sweep: per-group widths at {row['ms']:.4g} ms: {e}")
                    continue
                rows.append({"ratio": None, "allocation": "latency-aware", "ms": plan["ms"],
                             "cosine": res.fidelity.cosine, "macs": res.after.macs,
                             "params": res.after.params, "plan": plan["plan"]})
                log(f"sweep: latency-aware at {row['ms']:.4g} ms -> {plan['ms']:.4g} ms, "
                    f"held-out cosine {res.fidelity.cosine:.5f}")
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
        ratio = "per group" if r["ratio"] is None else f"{r['ratio']:g}"
        lines.append(f"| {r['allocation']} | {ratio} | {r['ms']:.3f} | "
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
