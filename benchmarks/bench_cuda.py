"""CUDA targets: every benchmark model and a BERT-sized linear layer (768 -> 3072, dense, 2:4
and 80 % unstructured, batch 1, 8 and 128) compiled for a GPU in each precision (fp32:
DLight's FMA schedules; tf32, the default, and bf16: tensor cores, ``mma_cuda``; 2:4 at 128
rows in bf16: sparse tensor cores, ``mma_sp_cuda``; bf16+graph: bf16 with CUDA graphs), with
compile time, kernels per strategy, how many matmuls and convs run on tensor cores, ptxas'
registers and spills, and the weight bytes each sparse kernel reads.

Numerics: each library is checked against ONNX Runtime (CPU): on the GPU where this machine
has one, else through the CPU emulation of its schedules (thread loops serialized, see
sparsec/targets/cuda.py). Latency: on a GPU only (the VM's ``time_evaluator`` with the inputs
already on the device), next to ONNX Runtime on the CPU for scale; without a GPU the latency
columns stay empty.

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_cuda.py [--target cuda-sm90]
[--models mlp,bert_base] [--no-linear] [--precisions fp32,tf32,bf16,bf16+graph]
Writes benchmarks/results/cuda.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import _model, ort_runner, publish  # noqa: E402
from bench_models import MODELS, random_feeds  # noqa: E402


def linear_layer(m: int, k: int, n: int, keep: str, seed: int = 0):
    """Y = X @ W + b with W dense, 2:4 (the 2 largest of every 4 inputs per channel) or 80 %
    unstructured (magnitude)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    if keep == "2:4":
        g = w.reshape(k // 4, 4, n)
        np.put_along_axis(g, np.argsort(-np.abs(g), axis=1)[:, 2:, :], 0, axis=1)
        w = g.reshape(k, n)
    elif keep == "80%":
        w[np.abs(w) < np.quantile(np.abs(w), 0.8)] = 0
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"],
                                                                             ["y"])]
    return _model(nodes, [("x", [m, k])], [("y", [m, n])],
                  {"w": w.astype(np.float32), "b": rng.standard_normal(n).astype(np.float32)})


def gpu_ms(lib: Path, inputs: list[str], feeds: dict, cuda_facts: dict) -> float:
    """Median ms of one call on the GPU, inputs resident there."""
    import tvm
    from tvm import relax

    from sparsec.targets.cuda import serve_fatbin

    dev = tvm.cuda(0)
    with serve_fatbin(lib.parent, cuda_facts):
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), dev)
    args = [tvm.runtime.tensor(feeds[n], dev) for n in inputs]
    vm["main"](*args)                 # warm: a --cuda-graph package captures its graphs here
    timer = vm.time_evaluator("main", dev, number=20, repeat=5, min_repeat_ms=50)
    return float(np.median(timer(*args).results)) * 1e3


def bench(name: str, model, spec, work: Path, ort_threads: int, variant: str) -> dict:
    """One row: the model compiled in ``variant``, a precision, ``+graph`` for CUDA graphs."""
    from sparsec import reference
    from sparsec.targets import cuda
    from sparsec.targets.host import load_library

    precision, _, graph = variant.partition("+")
    lib = work / f"{name} {variant}" / "model.so"
    lib.parent.mkdir(parents=True)
    emulated = None if spec.runs_here else lib.parent / "emulated.so"
    start = time.perf_counter()
    facts = cuda.compile_onnx(model, spec, lib, log=lambda s: None, emulation_lib=emulated,
                              precision=precision, cuda_graph=graph == "graph")
    compile_s = time.perf_counter() - start
    feeds = random_feeds(model)
    want = reference.run(model, feeds)[0]
    runner = load_library(emulated or lib, facts["inputs"],
                          None if emulated else facts["cuda"])
    got = runner.run(feeds)[0]
    res = facts["cuda"]["kernels"].values()
    sparse = [d for d in facts["decisions"] if d["chosen"] in ("nm_sparse_cuda", "mma_sp_cuda")]
    row = {"model": name, "precision": variant, "compile_s": round(compile_s, 1),
           "cuda_graph_regions": facts["cuda"]["cuda_graph_regions"],
           "kernels": facts["kernels"],
           "tensor_cores": cuda.tensor_core_summary(facts["decisions"]),
           "max_registers": max((r["registers"] for r in res), default=0),
           "spilling_kernels": sum(bool(r["spill_bytes"]) for r in res),
           "fatbin": facts["cuda"]["fatbin_contents"],
           "checked_on": "cpu-emulation" if emulated else "gpu",
           "max_rel_err": float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)),
           "weight_bytes": {"dense": sum(d["weight_bytes"]["dense"] for d in sparse),
                            "sparse": sum(d["weight_bytes"]["sparse"] for d in sparse)}
           if sparse else None}
    ort = ort_runner(model, ort_threads)
    for _ in range(3):
        ort(feeds)
    start = time.perf_counter()
    for _ in range(10):
        ort(feeds)
    row["ort_cpu_ms"] = (time.perf_counter() - start) / 10 * 1e3
    row["gpu_ms"] = None if emulated else gpu_ms(lib, facts["inputs"], feeds, facts["cuda"])
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-linear", action="store_true", help="skip the linear-layer rows")
    ap.add_argument("--ort-threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,tf32,bf16,bf16+graph",
                    help="compile each model in each of these (a precision, +graph: with "
                         "CUDA graphs; default: all three precisions and bf16 with graphs)")
    args = ap.parse_args(argv)

    from sparsec.targets import resolve_target

    spec = resolve_target(args.target)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        precisions = [p for p in args.precisions.split(",") if p]
        if not args.no_linear:
            for m in (1, 8, 128):
                for keep in ("dense", "2:4", "80%"):
                    for precision in precisions:
                        rows.append(bench(f"linear 768x3072 m={m} {keep}",
                                          linear_layer(m, 768, 3072, keep), spec, work,
                                          args.ort_threads, precision))
        for name in [n for n in args.models.split(",") if n]:
            model = MODELS[name](work / f"{name}.onnx")
            for precision in precisions:
                rows.append(bench(name, model, spec, work, args.ort_threads, precision))
    where = "GPU" if spec.runs_here else f"no GPU here ({spec.why_not_here}): CPU emulation"
    lines = [f"# CUDA: {spec.name} ({spec.tvm_target['arch']})", "",
             f"Numerics checked against ONNX Runtime on: {where}. GPU latency needs a GPU; "
             "ONNX Runtime's CPU latency is for scale.", "",
             "| model | precision | compile s | kernels | tensor cores | max regs | spilling | "
             "weight bytes (sparse / dense) | max rel err | GPU ms | ORT CPU ms |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        wb = r["weight_bytes"]
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['compile_s']} | "
            + ", ".join(f"{k} {v}" for k, v in r["kernels"].items())
            + f" | {r['tensor_cores']} | {r['max_registers']} | {r['spilling_kernels']} | "
            + (f"{wb['sparse'] / wb['dense']:.3f}" if wb else "-")
            + f" | {r['max_rel_err']:.1e} | "
            + (f"{r['gpu_ms']:.3f}" if r["gpu_ms"] is not None else "-")
            + f" | {r['ort_cpu_ms']:.2f} |")
    publish("cuda", {"target": spec.name, "tvm": spec.tvm_target, "checked_on": where,
                     "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
