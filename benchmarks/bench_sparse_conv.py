"""Block-sparse pointwise (1x1) convs, side by side: ONNX Runtime (dense), sparsec's dense
conv kernel and sparsec's ``bsr_conv1x1`` on the same weights (16x1 zero blocks at 70-90 %),
for the pointwise shapes of MobileNetV2 at 224x224 (expand and project convs of its stages),
each followed by ReLU6.

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_sparse_conv.py [--repeats N]
Writes benchmarks/results/sparse_conv.json and benchmarks/results/sparse_conv.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import _model, interleaved_medians, ort_runner, publish, sparsec_runner  # noqa: E402,E501

# (in channels, out channels, map side): MobileNetV2 pointwise convs at 224x224
SHAPES = ((24, 144, 56), (32, 192, 28), (64, 384, 14), (96, 576, 14), (160, 960, 7),
          (960, 160, 7))
SPARSITY = (0.7, 0.8, 0.9)


def pointwise_model(c: int, oc: int, hw: int):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((oc, c, 1, 1)) / np.sqrt(c)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32) * 0.1
    lo, hi = np.array(0, np.float32), np.array(6, np.float32)
    # Conv -> ReLU6, as MobileNetV2's expand convs (the clip is one elementwise kernel in every
    # engine; it also keeps the conv's result inside the graph, where reshapes are views)
    return _model([helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1]),
                   helper.make_node("Clip", ["c", "lo", "hi"], ["y"])],
                  [("x", [1, c, hw, hw])], [("y", [1, oc, hw, hw])],
                  {"w": w, "b": b, "lo": lo, "hi": hi})


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
        for c, oc, hw in SHAPES:
            dense = pointwise_model(c, oc, hw)
            feeds = {"x": np.random.default_rng(1).standard_normal((1, c, hw, hw)
                                                                    ).astype(np.float32)}
            run, facts, _ = sparsec_runner(dense, Path(tmp), f"d{c}_{oc}")
            engines = {"sparsec dense": lambda run=run: run(feeds)}
            ort = ort_runner(dense, args.threads)
            engines["ort dense"] = lambda ort=ort: ort(feeds)
            for s in SPARSITY:
                model = to_onnx(sparsec.prune(dense, sparsity=s, sparsity_pattern="16x1").graph)
                run, facts, _ = sparsec_runner(model, Path(tmp), f"s{len(rows)}")
                assert facts["kernels"]["bsr_conv1x1"] == 1, facts["kernels"]   # + clip (+ pad)
                w = numpy_helper.to_array(next(t for t in model.graph.initializer
                                               if t.name == "w"))
                kept = bsr.padded_rows(np.ascontiguousarray(w[:, :, 0, 0].T), bsr.CONV_LANES)
                ort_s = ort_runner(model, args.threads)
                err = float(np.abs(run(feeds)[0] - ort_s(feeds)[0]).max())
                engines[f"bsr {s}"] = lambda run=run: run(feeds)
                rows.append({"C": c, "OC": oc, "HW": hw, "sparsity": s, "rows_kept": kept,
                             "max_abs_err": err,
                             "gflop_dense": round(2 * c * oc * hw * hw / 1e9, 4)})
            times = interleaved_medians(engines, args.repeats, budget_s=60.0)
            for r in rows:
                if (r["C"], r["OC"]) == (c, oc):
                    r.update({"ort_dense_ms": times["ort dense"],
                              "sparsec_dense_ms": times["sparsec dense"],
                              "bsr_ms": times[f"bsr {r['sparsity']}"]})
            print(rows[-1], flush=True)
    lines = [f"# BSR pointwise conv (MobileNetV2 shapes, 224x224), {args.threads} threads", "",
             "| C -> OC @ HW | sparsity | input channels kept (max per 4-ch panel) | "
             "ORT dense ms | sparsec dense ms | sparsec BSR ms | vs our dense | vs ORT |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['C']} -> {r['OC']} @ {r['HW']}x{r['HW']} | {r['sparsity']:.0%} | "
                     f"{r['rows_kept']} / {r['C']} | {r['ort_dense_ms']:.3f} | "
                     f"{r['sparsec_dense_ms']:.3f} | {r['bsr_ms']:.3f} | "
                     f"{r['sparsec_dense_ms'] / r['bsr_ms']:.1f}x | "
                     f"{r['ort_dense_ms'] / r['bsr_ms']:.1f}x |")
    publish("sparse_conv", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
