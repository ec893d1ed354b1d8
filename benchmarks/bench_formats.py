"""Bytes per weight of every weight format sparsec's kernels read, next to the memory-bound limit.

A batch-1 linear layer reads each weight once and does one multiply-add with it: it is bound by
memory, and its floor is (weight bytes) / (bandwidth). This script packs one 768 x 3072
weight, pruned by sparsec at several sparsities and patterns, with each kernel's own packing
code, and reports bytes per original weight (values + indices + metadata, padding included),
the floor those bytes give at this machine's measured DRAM read bandwidth (the bound of a model
whose weights exceed the caches: BERT-base's are 340 MB), and, for the kernels that run here,
the measured batch-1 time (interleaved, one run) with the bandwidth it achieved. Run alone,
this one layer's 9 MiB stay in the 32 MiB L3, so the measured times beat the DRAM floor.

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_formats.py [--repeats N]
Writes benchmarks/results/formats.json and benchmarks/results/formats.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import gemm_model, interleaved_medians, publish, sparsec_runner  # noqa: E402

K, N = 768, 3072
CASES = (("dense", "unstructured", 0.0), ("unstructured", "unstructured", 0.5),
         ("unstructured", "unstructured", 0.8), ("unstructured", "unstructured", 0.9),
         ("16x1 blocks", "16x1", 0.8), ("16x1 blocks", "16x1", 0.9), ("2:4", "2:4", 0.5))


def read_bandwidth(threads: int, mib: int) -> float:
    """GB/s of summing a ``mib`` MiB float32 array split over ``threads`` threads (numpy
    releases the GIL), best of 5."""
    data = np.ones(mib * 2**18, np.float32)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(5):
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def format_bytes(w: np.ndarray) -> dict[str, int]:
    """Bytes each kernel's packing of ``w`` [K, N] takes, for the kernels that accept it."""
    from sparsec.targets.kernels import amx, bsr, mma_sp, sparse_cuda

    k, n = w.shape
    out = {"dense_packed (fp32)": k * n * 4}
    idx, data = bsr.pack_weight(w)
    if idx.shape[1] < k:
        out["bsr_dense (16x1 panels)"] = idx.nbytes + data.nbytes
    fmt = sparse_cuda.plan(w)
    out[f"nm_sparse_cuda ({'N:M' if fmt.group else 'indices'})"] = sparse_cuda.weight_bytes(
        fmt, n)
    p = amx.plan(1, k, n)
    out["dense_amx_bf16"] = amx.pack_weight(w, p).nbytes
    out["sparse_amx_bf16 (bitmap)"] = amx.pack_sparse(w, p).nbytes
    if mma_sp.is_2_4(w):
        wa, we = mma_sp.pack_weight(w, mma_sp.plan(16, k, n))
        out["mma_sp_cuda (2:4 + metadata)"] = wa.nbytes + we.nbytes
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import sparsec
    from sparsec.ir.onnx_io import to_onnx

    dram = read_bandwidth(args.threads, 256)
    print(f"DRAM read bandwidth: {dram:.1f} GB/s", flush=True)
    rows, engines = [], {}
    feeds = {"x": np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        dense = gemm_model(1, K, N)
        for label, pattern, share in CASES:
            model = dense if share == 0 else to_onnx(sparsec.prune(
                dense, sparsity=share,
                sparsity_pattern=pattern).graph)
            w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
            run, facts, _ = sparsec_runner(model, Path(tmp), f"m{len(engines)}")
            case = f"{label} {share:.0%}" if share else "dense"
            engines[case] = lambda run=run: run(feeds)
            (kernel,) = facts["kernels"]
            for fmt, nbytes in format_bytes(w).items():
                rows.append({"case": case, "sparsity": float(np.mean(w == 0)), "format": fmt,
                             "bytes_per_weight": round(nbytes / (K * N), 3),
                             "bytes": nbytes,
                             "dram_floor_us": round(nbytes / (dram * 1e9) * 1e6, 1),
                             "runs_here": fmt.startswith(kernel)})
        times = interleaved_medians(engines, args.repeats, budget_s=60.0)
    for r in rows:
        r["measured_us"] = round(times[r["case"]] * 1e3, 1) if r["runs_here"] else None
        r["measured_gbs"] = (round(r["bytes"] / (r["measured_us"] * 1e3), 1)
                             if r["runs_here"] else None)
    lines = [f"# Bytes per weight, {K} x {N} linear layer, batch 1", "",
             f"DRAM read bandwidth here: {dram:.1f} GB/s ({args.threads} threads, numpy sums "
             f"over 256 MiB); floor = bytes / that bandwidth. Measured: the kernel sparsec "
             f"chose here (host target), interleaved medians of one run; the layer's weights "
             f"stay in L3 between calls, hence above-DRAM bandwidths.", "",
             "| weights | format | bytes / weight | DRAM floor µs | measured µs | "
             "measured GB/s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        measured = ("| |" if r["measured_us"] is None
                    else f"{r['measured_us']:.1f} | {r['measured_gbs']:.0f} |")
        lines.append(f"| {r['case']} | {r['format']} | {r['bytes_per_weight']} | "
                     f"{r['dram_floor_us']:.1f} | {measured}")
    publish("formats", {"dram_gbs": dram, "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
