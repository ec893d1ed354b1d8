"""Block-sparse linear layer, side by side: ONNX Runtime (dense), sparsec's dense kernel and
sparsec's BSR kernel on the same weights (768 x 3072; 16x1 zero blocks at 70-95 %, and
grouped N:M with 16 outputs per group).

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_sparse.py [--repeats N]
Writes benchmarks/results/sparse.json and benchmarks/results/sparse.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import (gemm_model, interleaved_medians, ort_runner, publish,  # noqa: E402
                        sparsec_runner)

K, N = 768, 3072
# (pattern, sparsity): 16x1 blocks by share, and grouped N:M (16 outputs share one N:M
# pattern: every panel keeps exactly K N/M rows, no padding)
PATTERNS = (("16x1", 0.7), ("16x1", 0.8), ("16x1", 0.9), ("16x1", 0.95),
            ("1:4g16", 0.75), ("1:8g16", 0.875), ("1:16g16", 0.9375))
ROWS = (1, 32, 128)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import sparsec
    from sparsec.ir.onnx_io import to_onnx
    from sparsec.targets.kernels import bsr

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in ROWS:
            dense = gemm_model(m, K, N)
            feeds = {"x": np.random.default_rng(1).standard_normal((m, K)).astype(np.float32)}
            engines = {}
            run, facts, _ = sparsec_runner(dense, Path(tmp), f"d{m}")
            engines["sparsec dense"] = lambda run=run: run(feeds)
            ort = ort_runner(dense, args.threads)
            engines["ort dense"] = lambda ort=ort: ort(feeds)
            for pattern, s in PATTERNS:
                share = s if pattern == "16x1" else 0.0
                model = to_onnx(sparsec.prune(dense, sparsity=share,
                                              sparsity_pattern=pattern).graph)
                run, facts, _ = sparsec_runner(model, Path(tmp), f"s{m}_{len(rows)}")
                assert facts["kernels"] == {"bsr_dense": 1}, facts["kernels"]
                w = next(t for t in model.graph.initializer if t.name == "w")

                kept = bsr.padded_rows(numpy_helper.to_array(w))
                ort_s = ort_runner(model, args.threads)
                err = float(np.abs(run(feeds)[0] - ort_s(feeds)[0]).max())
                engines[f"bsr {pattern} {s}"] = lambda run=run: run(feeds)
                rows.append({"M": m, "pattern": pattern, "sparsity": s, "rows_kept": kept,
                             "max_abs_err": err,
                             # bytes per original weight: kept values + one int32 per 16
                             "bytes_per_weight": round(kept * N * (4 + 4 / 16) / (K * N), 3)})
            times = interleaved_medians(engines, args.repeats, budget_s=90.0)
            for r in rows:
                if r["M"] == m:
                    r.update({"ort_dense_ms": times["ort dense"],
                              "sparsec_dense_ms": times["sparsec dense"],
                              "bsr_ms": times[f"bsr {r['pattern']} {r['sparsity']}"]})
            print(rows[-1], flush=True)
    lines = [f"# BSR linear {K} x {N}, {args.threads} threads", "",
             "| M | pattern | sparsity | rows kept / 768 | bytes per weight (dense 4) | "
             "ORT dense ms | sparsec dense ms | sparsec BSR ms | vs our dense | vs ORT |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['M']} | {r['pattern']} | {r['sparsity']:.1%} | {r['rows_kept']} | "
                     f"{r['bytes_per_weight']} | {r['ort_dense_ms']:.3f} | "
                     f"{r['sparsec_dense_ms']:.3f} | {r['bsr_ms']:.3f} | "
                     f"{r['sparsec_dense_ms'] / r['bsr_ms']:.1f}x | "
                     f"{r['ort_dense_ms'] / r['bsr_ms']:.1f}x |")
    publish("sparse", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
