"""Where a compiled model's time goes on this CPU: every kernel call, measured.

The model is built once more with the Relax VM in bytecode mode (its instrument sees each kernel
call; a package's compiled-mode ``main`` calls them from machine code), run once to record the
calls, and the calls are then replayed in order on the VM's own tensors, so each kernel reads
what the one before it wrote, as in the model. Kernels are grouped by name: sparsec's own
strategies (``dense_packed``, ``conv1x1_nchw``, ...), the generic schedule of everything
else (TVM's fused elementwise / data-movement / norm functions), and the ``runtime`` functions
that set and restore the CPU's float modes around a call (``targets/denormals.py``).
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from pathlib import Path

def _base(symbol: str) -> str:
    return re.sub(r"\d+$", "", symbol)


def profile_model(proto, rounds: int = 30) -> dict:
    """Kernel shares of ``proto`` (an ONNX model) compiled for this CPU: ``{"whole_ms",
    "kernels": [{"kernel", "kind", "calls", "ms", "share"}, ...] (largest first),
    "generic_share"}``. ``ms`` is per model call, summed over the kernel's calls."""
    import tvm

    from sparsec import reference
    from sparsec.ir.onnx_io import from_onnx
    from sparsec.targets import denormals, host, resolve_target

    graph = from_onnx(proto)
    feeds = reference.random_feeds(reference.signature(graph, graph.inputs), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "profile.so"
        mode, host.EXEC_MODE = host.EXEC_MODE, "bytecode"
        try:
            facts = host.compile_onnx(proto, resolve_target("host"), lib, log=lambda s: None)
        finally:
            host.EXEC_MODE = mode
        runner = host.load_library(lib, facts["inputs"])
        own = set(facts["kernels"]) - {"fallback"}       # strategies name their kernels
        feeds = {k: v for k, v in feeds.items() if k in facts["inputs"]}
        runner.run(feeds)
        t0 = time.perf_counter()
        for _ in range(rounds):
            runner.run(feeds)
        whole = (time.perf_counter() - t0) / rounds * 1e3
        calls: list[tuple[str, list]] = []

        def instrument(func, symbol, before, ret, *args):
            if before and not str(symbol).startswith("vm.builtin"):
                calls.append((str(symbol), list(args)))
            return 0

        runner._vm.set_instrument(instrument)
        runner.run(feeds)
        runner._vm.set_instrument(None)
        kernels = tvm.runtime.load_module(str(lib)).imports[0]
        times = chain_times(kernels, calls, rounds)
    per: dict[str, dict] = {}
    for (symbol, _), ms in zip(calls, times):
        name = _base(symbol)
        kind = ("sparsec" if name in own else "runtime" if name in denormals.NAMES
                else "generic")
        row = per.setdefault(name, {"kernel": name, "calls": 0, "ms": 0.0, "kind": kind})
        row["calls"] += 1
        row["ms"] += ms if ms == ms else 0.0
    total = sum(r["ms"] for r in per.values()) or 1.0
    rows = sorted(per.values(), key=lambda r: -r["ms"])
    for r in rows:
        r["share"] = r["ms"] / total
        r["ms"] = round(r["ms"], 4)
        r["share"] = round(r["share"], 4)
    return {"whole_ms": round(whole, 4), "kernels": rows,
            "generic_share": round(sum(r["share"] for r in rows if r["kind"] == "generic"), 4)}


def chain_times(kernels, calls: list[tuple[str, list]], rounds: int) -> list[float]:
    """Median ms of each recorded call, the calls replayed in order on the VM's own tensors
    (each kernel reads what the one before it wrote; NaN for a symbol the library lacks)."""
    fns = []
    for symbol, args in calls:
        try:
            fns.append((kernels.get_function(symbol), args))
        except Exception:  # noqa: BLE001 - a VM builtin or packed function, not a kernel
            fns.append((None, args))
    clock = time.perf_counter
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for (fn, args), out in zip(fns, times):
            if fn is None:
                out.append(float("nan"))
                continue
            t0 = clock()
            fn(*args)
            out.append((clock() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def summary(report: dict, top: int = 3) -> str:
    """One line: the model's largest kernels (not the float-mode switches) and what share
    the generic schedule takes."""
    rows = report["kernels"]
    generic = [r for r in rows if r["kind"] == "generic"]
    head = ", ".join(f"{r['kernel']} {100 * r['share']:.0f}%"
                     for r in [r for r in rows if r["kind"] != "runtime"][:top])
    return (f"{report['whole_ms']:.3f} ms a call; largest: {head}; generic schedule: "
            f"{100 * report['generic_share']:.0f}% in {len(generic)} kernel kinds")
