"""Per-kernel profile of a sparsec-compiled model on the host CPU.

Run from the repo root:  PYTHONPATH=. python benchmarks/profile_host.py [--model cnn|cnn50|...]
[--threads N] [--ratio R: the model pruned at R first]

Runs the model once through the Relax VM with an instrument that records every kernel call
(symbol and arguments), then times each call on its own with TVM's ``time_evaluator`` (median of
several repeats, hot caches: "alone") and where it runs, the calls replayed in order ("chain"),
and prints both per kernel, plus the whole-model time for comparison.

With ``--after``, four more columns: each call timed right after the call before it, the two
alternating ("after"), and the same with the kernel reading and writing copies of its tensors
("copies"), with only its inputs copied ("in cp") and with only its output (the last tensor
argument) on a copy ("out cp"). On two threads a kernel that reads what the call before it just
wrote, or writes memory that call just used, runs slower than alone by the cost of moving those
cache lines between the cores; with copies it does not (on one thread they all agree). "in cp"
near "copies" says the cost was reading (read-after-write); "out cp" near it, writing into
storage the memory plan reused (write-after-read).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def _models():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_host as b

    import bench_models

    cnn = b.residual_cnn()

    def whole(name):
        def make():
            with tempfile.TemporaryDirectory() as tmp:
                return bench_models.MODELS[name](Path(tmp) / "m.onnx")
        return make

    return {
        **{name: whole(name) for name in bench_models.MODELS},
        "cnn": lambda: cnn,
        "cnn50": lambda: b.pruned(cnn, 0.5),
        "gemm": b.gemm_model,
        "conv": b.conv_model,
        "ffn": b.ffn_model,
    }


#: ``after_times``' columns: which of a kernel's tensors are copies (inputs, output)
AFTER = {"after_ms": (False, False), "after_copies_ms": (True, True),
         "after_in_ms": (True, False), "after_out_ms": (False, True)}


def after_times(fns: list, rounds: int = 300) -> list[dict[str, float]]:
    """Per call ``(fn, args)`` of ``fns`` (None for a non-kernel): median ms right after the
    call before it, per column of ``AFTER`` (NaN for the first call)."""
    import tvm

    def copy(args, inputs: bool, output: bool):
        last = max((k for k, a in enumerate(args) if isinstance(a, tvm.runtime.Tensor)),
                   default=-1)
        return [tvm.runtime.tensor(a.numpy())
                if isinstance(a, tvm.runtime.Tensor) and (output if k == last else inputs)
                else a for k, a in enumerate(args)]

    def timed(before, fn, args) -> float:
        out = []
        for _ in range(rounds):
            before[0](*before[1])
            t0 = time.perf_counter()
            fn(*args)
            out.append(time.perf_counter() - t0)
        return statistics.median(out) * 1e3

    times = []
    for k, (fn, args) in enumerate(fns):
        prev = fns[k - 1] if k else (None, None)
        if fn is None or prev[0] is None:
            times.append(dict.fromkeys(AFTER, float("nan")))
            continue
        times.append({col: timed(prev, fn, copy(args, *which))
                      for col, which in AFTER.items()})
    return times


def profile(model, repeats: int = 7, number: int = 50, after: bool = False) -> list[dict]:
    import tvm

    from sparsec.profile import chain_times
    from sparsec.targets import host, resolve_target
    from sparsec.targets.host import compile_onnx, load_library

    from sparsec.ir.onnx_io import to_onnx
    from sparsec.loading import load

    # what a user's compile gets: the model as loaded (load-time normalization folds what
    # does not depend on inputs, makes whole-map pools global, ...)
    model = to_onnx(load(model))
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "m.so"
        # the VM's instrument sees kernel calls in bytecode mode only (compiled mode calls
        # them from machine code); the whole-model time below is bytecode's too
        host.EXEC_MODE = "bytecode"
        facts = compile_onnx(model, resolve_target("host"), lib, log=lambda s: None)
        runner = load_library(lib, facts["inputs"])
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_models import random_feeds

        feeds = {k: v for k, v in random_feeds(model).items() if k in facts["inputs"]}

        calls: list[tuple[str, list]] = []

        def instrument(func, symbol, before, ret, *args):
            if before and not str(symbol).startswith("vm.builtin"):
                calls.append((str(symbol), list(args)))
            return 0

        runner.run(feeds)
        whole = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(number):
                runner.run(feeds)
            whole.append((time.perf_counter() - t0) / number * 1e3)
        runner._vm.set_instrument(instrument)
        runner.run(feeds)
        runner._vm.set_instrument(None)

        mod = tvm.runtime.load_module(str(lib)).imports[0]  # the compiled kernels
        chain = chain_times(mod, calls, repeats * number)
        fns = []                 # per call: (the kernel, or None for a VM builtin, its args)
        for sym, args in calls:
            try:
                fns.append((mod.get_function(sym), args))
            except Exception:  # noqa: BLE001 - a VM builtin, not a kernel
                fns.append((None, args))
        rows = []
        for (sym, args), (fn, _), in_chain in zip(calls, fns, chain):
            if fn is None:
                rows.append({"kernel": sym, "ms": float("nan"), "chain_ms": float("nan"),
                             "args": ""})
                continue
            tensors = [a for a in args if isinstance(a, tvm.runtime.Tensor)]
            copies = [tvm.runtime.tensor(a.numpy()) for a in tensors]
            te = mod.time_evaluator(sym, tvm.cpu(), number=number, repeat=repeats)
            res = te(*copies)
            rows.append({"kernel": sym, "ms": statistics.median(res.results) * 1e3,
                         "chain_ms": in_chain,
                         "args": " ".join("x".join(map(str, a.shape)) for a in copies)})
        if after:
            for row, cols in zip(rows, after_times(fns)):
                row.update(cols)
        # the VM's whole-call overhead (copies in/out, allocation) is the rest
        return rows, statistics.median(whole)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn", choices=list(_models()))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.0,
                    help="profile the model pruned at this ratio (magnitude channel groups)")
    ap.add_argument("--after", action="store_true",
                    help="also time each kernel right after the call before it, on the VM's "
                         "tensors and on copies of its inputs, its output or both (what "
                         "moving data between cores costs, and in which direction)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(REPO))
    model = _models()[args.model]()
    if args.ratio:
        import bench_host

        model = bench_host.pruned(model, args.ratio)
    rows, whole = profile(model, after=args.after)
    after = list(AFTER) if args.after else []
    cols = ["ms", "chain_ms"] + after
    sums = {c: sum(r[c] for r in rows if c in r and r[c] == r[c]) for c in cols}
    heads = {"after_ms": "after", "after_copies_ms": "copies", "after_in_ms": "in cp",
             "after_out_ms": "out cp"}
    extra = "".join(f" {heads[c]:>8s}" for c in after)
    print(f"{'kernel':40s} {'alone ms':>8s} {'%':>6s} {'chain ms':>8s}{extra}  shapes")
    for r in rows:
        extra = "".join(f" {r.get(c, float('nan')):8.4f}" for c in after)
        print(f"{r['kernel']:40s} {r['ms']:8.4f} {100 * r['ms'] / whole:5.1f}% "
              f"{r['chain_ms']:8.4f}{extra}  {r['args']}")
    extra = "".join(f" {sums[c]:8.4f}" for c in after)
    print(f"{'sum of kernels':40s} {sums['ms']:8.4f} {'':6s} {sums['chain_ms']:8.4f}{extra}")
    print(f"{'whole Runner.run':40s} {whole:8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
