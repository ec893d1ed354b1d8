"""Tuning: time each kernel's schedule variants on this machine and keep the fastest.

Every hand-scheduled kernel has knobs with a heuristic default (the row tile of the GEMM
kernels, the register tile of the pointwise conv, the accumulator budget of the depthwise conv,
the pixel strip of the direct conv). ``tune`` builds each variant of every kernel a model uses,
compiles it alone, times it on random data with TVM's ``time_evaluator`` and records the
fastest in a persistent cache keyed by (target, strategy, shape). ``compile`` reads the cache:
a kernel with an entry is built with the tuned knobs (the compile report says ``tuned``),
one without keeps the defaults. Timing runs here (:class:`LocalTimer`), so only this
machine's CPU can be tuned, or on remote devices through a TVM RPC tracker
(``sparsec.remote.KernelTimer``, any CPU target: several devices time at once).

Where several strategies can serve one op (the direct or the pointwise kernel for a 1x1 conv,
dense or BSR for a block-sparse layer), ``tune`` also times each with its best knobs and
records the fastest as a ``choice``; ``compile`` then follows that measurement instead of the
cost rule's estimate. The strategy choice never depends on knobs, only on such measurements.

The kernels, their knobs and the cache are ``knobs.py`` (what compile reads; re-exported
here); this module is the tuner, which imports the model and rewrites it through the back-end
interface (``backend.py``) and builds the whole model with the host back end for its check.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sparsec.progress import Progress
# knobs.py's names, private ones too: tests and benchmarks reach them as tuning.X
from sparsec.targets.knobs import (_ACTIVE, _ALTERNATIVES, AMX_STRATEGIES, SHAPE_ATTR, Cache,
                                   _choice_key, _conv_shape, _default_knobs,
                                   _expansion_kernel_plan, _fused_kernel_plan, _key, _row_tiles,
                                   _variants, build, build_tuned, cache_path, knobs_for,
                                   measured_choice, target_key, using)

if TYPE_CHECKING:
    import onnx
    from tvm import tirx

    from sparsec.targets import TargetSpec

# --------------------------------------------------------------------------- tuner


def _random_args(func: "tirx.PrimFunc") -> list:
    import numpy as np
    import tvm

    from sparsec.targets.kernels.common import STRATEGY_ATTR

    rng = np.random.default_rng(0)
    if str(func.attrs.get(STRATEGY_ATTR, "")) == "sparse_amx_bf16":
        # its masks, offsets and values must agree (random ones would read out of bounds);
        # the tile grid is the masks' (params X, values, masks, offsets, ...)
        from sparsec.targets.kernels import amx

        shape = json.loads(str(func.attrs[SHAPE_ATTR]))
        grid = [int(d) for d in func.params[2].ty.shape[:2]]
        sw = amx.random_sparse(*grid, shape["nnz"])
        arrays = [rng.standard_normal((shape["m"], shape["k"])).astype("float32"),
                  sw.values, sw.masks, sw.offsets]
        arrays += [rng.standard_normal([int(d) for d in p.ty.shape]).astype(str(p.ty.dtype))
                   for p in func.params[4:]]
        return [tvm.runtime.tensor(a) for a in arrays]
    args = []
    for p in func.params:   # TVM 0.27: a buffer parameter's type is its BufferType
        shape = [int(d) for d in p.ty.shape]
        dtype = str(p.ty.dtype)
        if dtype.startswith("int"):
            # the sparse kernels' row indices into X's axis 1: distinct and sorted per panel,
            # as pack_weight makes them (all-zero indices would time a cache-friendly lie)
            bound = int(func.params[0].ty.shape[1])
            rows = shape[-1]
            arr = np.stack([np.sort(rng.choice(bound, size=rows, replace=rows > bound))
                            for _ in range(int(np.prod(shape[:-1])))]).reshape(shape)
            arr = arr.astype(dtype)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(arr))
    return args


def time_kernel(func: "tirx.PrimFunc", tvm_target: dict, min_ms: float = 50.0) -> float:
    """Median milliseconds of one call of ``func`` compiled alone for ``tvm_target``."""
    import tvm

    from sparsec.targets.backend import request_amx
    from sparsec.targets.scratch import tir_pipeline

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=tvm.target.Target(dict(tvm_target)),
                      tir_pipeline=tir_pipeline())    # as compile_onnx builds it
    args = _random_args(func)
    request_amx()     # AMX kernels fault without the tile state
    return time_module(lib.mod, tvm.cpu(), args, min_ms)


def time_module(mod, dev, args: list, min_ms: float = 50.0, name: str = "main") -> float:
    """Median milliseconds of one call of ``mod``'s function ``name`` on ``args`` on ``dev``
    (here, or a remote device's over RPC): calls per repeat chosen from one timed call so
    that a repeat lasts about ``min_ms``, five repeats."""
    once = mod.time_evaluator(name, dev, number=1, repeat=1)(*args).mean
    number = max(1, min(1000, int(min_ms / 1e3 / max(once, 1e-7))))
    res = mod.time_evaluator(name, dev, number=number, repeat=5)(*args)
    return statistics.median(res.results) * 1e3


class LocalTimer:
    """Times kernel trials ``(strategy, shape, knobs)`` on this machine, one after another
    (the interface of ``remote.KernelTimer``, which times them on remote devices)."""

    workers = 1

    def __init__(self, target: "TargetSpec", log: Callable[[str], None] = print) -> None:
        self.target, self.log = target, log

    def __enter__(self) -> "LocalTimer":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, jobs, deadline: float, step: Callable[[int], None] = lambda job: None):
        """Yield ``(job index, [ms or None per trial])`` job by job; a job is started only
        before ``deadline`` (``time.monotonic()``)."""
        import tvm

        for j, trials in enumerate(jobs):
            if time.monotonic() > deadline:
                return
            out: list[float | None] = []
            for strategy, shape, knobs in trials:
                try:
                    # built in the target's scope: the tiles depend on the ISA (AVX-512's
                    # 32 registers hold twice the accumulators), as when the model is compiled
                    with tvm.target.Target(dict(self.target.tvm_target)):
                        func = build(strategy, shape, knobs)
                    out.append(time_kernel(func, dict(self.target.tvm_target)))
                except Exception as e:  # noqa: BLE001 - a variant TVM cannot build
                    self.log(f"  {strategy} {knobs}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:80] if str(e) else ''}")
                    out.append(None)
                step(j)
            yield j, out


def kernels_of(model: "onnx.ModelProto", target: "TargetSpec", alternatives: list | None = None
               ) -> list[tuple[str, dict]]:
    """(strategy, shape) of every distinct tunable kernel ``compile`` would emit for
    ``model``, as the strategy registry chooses them (after the kernel rewrite only). With
    ``alternatives`` (a list), also the candidate sets of ops that more than one kernel could
    serve are appended to it."""
    import tvm
    from tvm import relax, tirx

    from sparsec.targets.backend import import_onnx, rewrite_pass
    from sparsec.targets.kernels import common
    from sparsec.targets.kernels.common import STRATEGY_ATTR

    cores = int(target.tvm_target.get("num-cores", os.cpu_count() or 1))
    token = _ALTERNATIVES.set(alternatives)
    try:
        with tvm.target.Target(dict(target.tvm_target)), common.precision(target.precision):
            mod = tvm.transform.Sequential([rewrite_pass(cores, []),
                                            relax.transform.DeadCodeElimination()])(
                import_onnx(model))
    finally:
        _ALTERNATIVES.reset(token)
    seen: dict[str, tuple[str, dict]] = {}
    for _, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and (
                SHAPE_ATTR in func.attrs):
            strategy = str(func.attrs[STRATEGY_ATTR])
            shape = json.loads(str(func.attrs[SHAPE_ATTR]))
            seen.setdefault(_key(strategy, shape), (strategy, shape))
    return list(seen.values())


def tune(model: "onnx.ModelProto", target: "TargetSpec", budget_s: float,
         cache: Cache | None = None, log: Callable[[str], None] = print,
         check: bool = True, remote=None) -> list[dict]:
    """Time every variant of every tunable kernel of ``model``, in the order the model uses
    them, until ``budget_s`` seconds are spent (a kernel started is finished), record the
    fastest in ``cache`` and save it as each kernel finishes. Kernels already in the cache,
    and kernels with a single variant, are skipped. Then ops that several strategies can serve
    (dense or block-sparse) get each strategy timed, and compile follows the measurement
    instead of the cost rule's estimate. Last (``check``), the whole model is timed with and
    without this session's records and they are kept only if it got faster
    (:func:`_check_whole_model`). Returns one record per kernel tuned (and per choice
    measured, ``strategy == "choice"``) here, and the whole-model verdict (``strategy ==
    "whole_model"``).

    With ``remote`` (a ``sparsec.remote.Remote``) the kernels are built here for ``target``
    and timed on the devices under its key, all of them at once; the records are stored
    under ``target`` as if it had been tuned where it runs."""
    import tvm

    from sparsec.errors import BadOptionError

    if remote is None and not (target.runs_here and target.device == "cpu"):
        raise BadOptionError(f"tuning times kernels on this machine's CPU; target "
                             f"'{target.name}' is not this machine's CPU (--rpc HOST:PORT "
                             f"--key KEY times them on a device)")
    if remote is not None and target.device != "cpu":
        raise BadOptionError(f"tuning over RPC times CPU kernels; target '{target.name}' "
                             f"runs on {target.device}")
    if remote is not None:
        remote.check()     # the tracker and a device under the key, before anything else
    cache = cache or Cache()
    tkey = target_key(dict(target.tvm_target))
    alternatives: list = []
    todo = [(s, sh) for s, sh in kernels_of(model, target, alternatives)
            if len(_variants(s, sh)) > 1 and cache.get(tkey, s, sh) is None]
    cache.save()   # a cache that cannot be written fails now, not after the timing
    where = f" on devices '{remote.key}' at {remote.address}" if remote is not None else ""
    with tvm.target.Target(dict(target.tvm_target)):   # knobs that depend on the ISA
        plans = [(s, sh, _variants(s, sh), _default_knobs(s, sh)) for s, sh in todo]
    if remote is not None:
        from sparsec.remote import KernelTimer

        timer = KernelTimer(remote, target, log)
    else:
        timer = LocalTimer(target, log)
    start = time.monotonic()
    deadline = start + budget_s
    records: list[dict] = []
    with timer:
        if remote is not None:
            where += f", {timer.workers} at once"
        log(f"tuning {len(todo)} kernels for {target.name}{where} (budget {budget_s:g} s, "
            f"cache {cache.path})")
        trials = Progress(log, "tuning", sum(len(p[2]) for p in plans), "trials")
        jobs = [[(s, sh, knobs) for knobs in variants] for s, sh, variants, _ in plans]
        finished = 0
        for j, results in timer.run(jobs, deadline, lambda j: trials.step(
                detail=f"kernel {j + 1}/{len(todo)} {plans[j][0]}")):
            finished += 1
            strategy, shape, variants, default_knobs = plans[j]
            timings = {json.dumps(knobs, sort_keys=True): ms
                       for knobs, ms in zip(variants, results) if ms is not None}
            if not timings:
                continue
            best = min(timings, key=timings.__getitem__)
            default = timings.get(json.dumps(default_knobs, sort_keys=True))
            record = {"knobs": json.loads(best),
                      "ms": {k: round(v, 5) for k, v in timings.items()}}
            cache.put(tkey, strategy, shape, record)
            cache.save()        # a record is kept as soon as it is measured
            records.append({"strategy": strategy, "shape": shape, **record,
                            "best_ms": timings[best], "default_ms": default})
            gain = f" (default {default:.4f} ms)" if default is not None else ""
            log(f"  [{j + 1}/{len(todo)}] {strategy} {_short(shape)}: {best} "
                f"{timings[best]:.4f} ms{gain}")
        trials.close()
        if finished < len(jobs):
            log(f"  budget spent after {finished} of {len(todo)} kernels")
        # ops several kernels can serve (direct vs pointwise conv, dense vs block-sparse):
        # time each, with its best knobs
        choices = {json.dumps(_choice_key(a), sort_keys=True): a for a in alternatives}
        todo_choices = [a for a in choices.values()
                        if cache.get(tkey, "choice", _choice_key(a)) is None]
        jobs = [[(s, sh, (cache.get(tkey, s, sh) or {}).get("knobs")) for s, sh in alts]
                for alts in todo_choices]
        finished = 0
        for j, results in timer.run(jobs, deadline):
            finished += 1
            alts = todo_choices[j]
            ms = {s: v for (s, _), v in zip(alts, results) if v is not None}
            if len(ms) < len(alts):
                continue
            best = min(ms, key=ms.__getitem__)
            cache.put(tkey, "choice", _choice_key(alts),
                      {"choice": best, "ms": {k: round(v, 5) for k, v in ms.items()}})
            cache.save()
            records.append({"strategy": "choice", "choice": best, "ms": ms,
                            "alternatives": alts})
            log(f"  choice {' / '.join(ms)}: {best} "
                f"({', '.join(f'{k} {v:.4f} ms' for k, v in ms.items())})")
        if finished < len(jobs):
            log("  budget spent before every strategy choice was measured")
    n_choices = sum(r["strategy"] == "choice" for r in records)
    log(f"tuned {len(records) - n_choices} kernels and measured {n_choices} strategy "
        f"choices in {time.monotonic() - start:.1f} s")
    if records and check:
        records.append(_check_whole_model(model, target, cache, tkey, records, log, remote))
    cache.save()
    return records


#: how much faster the whole model must run with this session's records for them to be kept
KEEP_MARGIN = 0.02


def _check_whole_model(model: "onnx.ModelProto", target: "TargetSpec", cache: Cache, tkey: str,
                       records: list[dict], log: Callable[[str], None], remote=None) -> dict:
    """Kernels timed alone (hot caches, one at a time) are not the model: build the whole
    model with and without this session's records, time both interleaved, and keep the
    records only if the tuned model is at least ``KEEP_MARGIN`` faster. Otherwise they stay in
    the cache marked ``rejected`` (compile ignores them, ``tune`` does not time them again).
    Returns the verdict as a record (``strategy == "whole_model"``)."""
    import tempfile

    from sparsec import reference
    from sparsec.frontends.onnx import load_onnx
    from sparsec.targets.backend import graph_input_names, load_library
    from sparsec.targets.host import compile_onnx

    session = [("choice", _choice_key(r["alternatives"])) if r["strategy"] == "choice"
               else (r["strategy"], r["shape"]) for r in records]
    before = copy.copy(cache)    # the cache as it was before this session
    before.data = {t: dict(entries) for t, entries in cache.data.items()}
    for strategy, shape in session:
        before.data.get(tkey, {}).pop(_key(strategy, shape), None)
    quiet = lambda _msg: None  # noqa: E731
    with tempfile.TemporaryDirectory() as work:
        paths = {}
        for label, which in (("untuned", before), ("tuned", cache)):
            paths[label] = Path(work) / f"{label}.so"
            compile_onnx(model, target, paths[label], log=quiet, tuned=which)
        feeds = reference.random_inputs(load_onnx(model))
        if remote is not None:       # timed on a device under the key
            from sparsec.remote import whole_model_ms

            ms = whole_model_ms(remote, paths, feeds, graph_input_names(model))
        else:
            libs = {k: load_library(p, graph_input_names(model)) for k, p in paths.items()}
            ms = interleaved_ms({k: (lambda r=r: r.run(feeds)) for k, r in libs.items()})
    kept = ms["tuned"] <= ms["untuned"] * (1 - KEEP_MARGIN)
    if not kept:
        for strategy, shape in session:
            cache.put(tkey, strategy, shape, {**cache.get(tkey, strategy, shape), "rejected": ms})
    log(f"whole model: {ms['untuned']:.3f} ms with the earlier records, {ms['tuned']:.3f} ms "
        f"with this session's: {'kept' if kept else 'not faster, recorded as rejected'}")
    return {"strategy": "whole_model", "kept": kept, "ms": ms}


def interleaved_ms(fns: dict[str, Callable[[], object]], seconds: float = 3.0,
                   block: int = 5) -> dict[str, float]:
    """Median ms per function, run in alternating blocks of ``block`` calls (the first call
    of a block not counted: the other function's threads may still be spinning) until each
    has run for about ``seconds``: both see the same background load."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    spent = 0.0
    while spent < seconds * len(fns) or min(len(t) for t in times.values()) < 5:
        for name, fn in fns.items():
            for i in range(block + 1):
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                spent += dt
                if i:
                    times[name].append(dt)
    return {k: statistics.median(t) * 1e3 for k, t in times.items()}


def _short(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if k != "dtype")


__all__ = ["Cache", "LocalTimer", "build", "build_tuned", "cache_path", "interleaved_ms",
           "kernels_of", "knobs_for", "measured_choice", "target_key", "time_kernel",
           "time_module", "tune", "using"]
