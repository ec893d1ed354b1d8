"""Dynamic batch on CNNs: the mixed CNN of ``bench_models`` (inception, SE, grouped and depthwise
convs) and a ResNet-18 exported with a dynamic batch (legacy exporter, ``dynamic_axes``),
compiled once with ``--dynamic batch=1..8``, timed at batch 1 and 8 against ONNX Runtime on the
same dynamic model (interleaved blocks, same inputs, 2 threads), and at batch 1 beside a package
compiled for the fixed batch.

Run from the repo root:  PYTHONPATH=. python benchmarks/dynamic_cnn.py [--repeats N]
[--models mixed_cnn,resnet18]. Writes benchmarks/results/dynamic_cnn.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import interleaved_medians, ort_runner  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 8)


def module(name: str):
    """(torch module, one example input) of a model named in ``MODELS``."""
    import torch

    torch.manual_seed(0)
    if name == "resnet18":
        import transformers as tf

        cfg = tf.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                              depths=[2, 2, 2, 2], layer_type="basic",
                              downsample_in_first_stage=False)
        return tf.ResNetForImageClassification(cfg).eval(), torch.randn(1, 3, 224, 224)
    import bench_models

    holder = {}

    def grab(m, example, path, names):    # bench_models builds the module; keep it instead
        holder["m"], holder["x"] = m, example[0]

    real, bench_models._export = bench_models._export, grab
    try:
        bench_models.mixed_cnn(Path("unused.onnx"))
    finally:
        bench_models._export = real
    return holder["m"], holder["x"]


MODELS = ("mixed_cnn", "resnet18")


def export(name: str, path: Path) -> None:
    import torch

    model, x = module(name)
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import onnx

    import sparsec
    from sparsec.package import LIBRARY
    from sparsec.targets.backend import load_library

    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in args.models.split(","):
            model = work / f"{name}.onnx"
            export(name, model)
            proto = onnx.load(str(model))
            shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
            t0 = time.perf_counter()
            dyn = sparsec.compile(model, work / f"{name}_dyn", dynamic="batch=1..8")
            compile_s = time.perf_counter() - t0
            sparsec.compile(model, work / f"{name}_fixed",
                            input_shapes="x:" + "x".join(map(str, [1, *shape])))
            run_dyn = load_library(work / f"{name}_dyn" / LIBRARY, ["x"]).run
            run_fixed = load_library(work / f"{name}_fixed" / LIBRARY, ["x"]).run
            run_ort = ort_runner(proto, args.threads)
            for batch in BATCHES:
                feeds = {"x": np.random.default_rng(batch).standard_normal(
                    (batch, *shape)).astype(np.float32)}
                fns = {"sparsec dynamic": lambda: run_dyn(feeds),
                       "onnxruntime": lambda: run_ort(feeds)}
                if batch == 1:
                    fns["sparsec fixed"] = lambda: run_fixed(feeds)
                err = float(np.abs(run_dyn(feeds)[0] - run_ort(feeds)[0]).max())
                ms = interleaved_medians(fns, args.repeats)
                rows.append({"model": name, "batch": batch, "compile_s": round(compile_s, 1),
                             "kernels": dyn["compile"]["kernels"],
                             **{k: round(v, 3) for k, v in ms.items()},
                             "ratio_to_ort": round(ms["sparsec dynamic"] / ms["onnxruntime"], 3),
                             "max_abs_err": err})
                print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dynamic_cnn.json").write_text(json.dumps(
        {"ranges": {"batch": [1, 8]}, "threads": args.threads, "rows": rows}, indent=1) + "\n")
    lines = ["# Dynamic batch on CNNs", "",
             f"One package for batch 1..8 per model, {args.threads} threads, median ms in "
             "interleaved blocks against ONNX Runtime on the same dynamic model; at batch 1 also "
             "the package compiled for the fixed batch.", "",
             "| model | batch | sparsec dynamic | ONNX Runtime | ratio | sparsec fixed | "
             "max abs err |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['sparsec dynamic']} | "
                     f"{r['onnxruntime']} | {r['ratio_to_ort']} | "
                     f"{r.get('sparsec fixed', '')} | {r['max_abs_err']:.1e} |")
    (RESULTS / "dynamic_cnn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
