"""MobileNetV2 (transformers' definition, width 1.0, 224x224, random weights: no trained
weights are reachable here, so this measures speed, not accuracy) with 16x1 block-sparse
weights: latency of ONNX Runtime (dense) and sparsec (dense kernels, and the sparse pointwise
kernel) side by side in one run, and where the time goes.

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_mobilenetv2_sparse.py
Writes benchmarks/results/mobilenetv2_sparse.json and benchmarks/results/mobilenetv2_sparse.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import interleaved_medians, ort_runner, publish, sparsec_runner  # noqa: E402

SPARSITY = (0.5, 0.7, 0.8, 0.9)


def mobilenetv2_onnx(path: Path):
    import onnx
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config()).eval()
    # transformers initialises convs with std 0.02, under which the activations vanish
    # (logits ~1e-28) and an error check against ONNX Runtime says nothing: He init instead
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["pixel_values"])
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 10)
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import sparsec
    from sparsec.ir.onnx_io import to_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense = mobilenetv2_onnx(Path(tmp) / "mnv2.onnx")
        feeds = {"pixel_values": np.random.default_rng(1).standard_normal(
            (1, 3, 224, 224)).astype(np.float32)}
        ort = ort_runner(dense, args.threads)
        ref = ort(feeds)[0]
        engines = {"ort dense": lambda: ort(feeds)}
        variants = [("dense", dense)] + [
            (f"16x1 {s:.0%}", to_onnx(sparsec.prune(dense, sparsity=s,
                                                    sparsity_pattern="16x1").graph))
            for s in SPARSITY]
        for label, model in variants:
            run, facts, compile_s = sparsec_runner(model, Path(tmp), f"v{len(rows)}")
            check = ort_runner(model, args.threads)(feeds)[0]
            err = float(np.abs(run(feeds)[0] - check).max() / np.abs(check).max())
            engines[label] = lambda run=run: run(feeds)
            rows.append({"variant": label, "kernels": facts["kernels"],
                         "compile_s": round(compile_s, 1), "max_rel_err_vs_ort": err,
                         "output_cosine_vs_dense": float(
                             np.dot(check.ravel(), ref.ravel())
                             / (np.linalg.norm(check) * np.linalg.norm(ref)))})
            print(rows[-1], flush=True)
        times = interleaved_medians(engines, args.repeats, budget_s=120.0)
    for r in rows:
        r["sparsec_ms"] = times[r["variant"]]
    ort_ms = times["ort dense"]
    lines = [f"# MobileNetV2 224x224 with 16x1 block sparsity, {args.threads} threads", "",
             f"ONNX Runtime, dense: **{ort_ms:.2f} ms**. Random weights: the cosine column "
             "only shows the weights changed, it says nothing about accuracy; the error column is "
             "sparsec against ONNX Runtime on the same (pruned) model, relative to the largest "
             "output.", "",
             "| variant | sparsec ms | vs ORT dense | error vs ORT | cosine vs dense | compile s "
             "| kernels |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        kern = ", ".join(f"{k} x{v}" for k, v in r["kernels"].items())
        lines.append(f"| {r['variant']} | {r['sparsec_ms']:.2f} | "
                     f"{ort_ms / r['sparsec_ms']:.2f}x | {r['max_rel_err_vs_ort']:.1e} | "
                     f"{r['output_cosine_vs_dense']:.3f} | {r['compile_s']} | {kern} |")
    publish("mobilenetv2_sparse", {"ort_dense_ms": ort_ms, "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
