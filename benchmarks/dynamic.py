"""Dynamic shapes: all-MiniLM-L6-v2 (a 6-layer BERT, real weights) exported once with dynamic
batch and sequence, compiled once with ``--dynamic``, timed at several sizes against ONNX
Runtime on the same dynamic model (interleaved blocks, same inputs, 2 threads), and beside a
package compiled for the fixed size 1 x 128.

With ``--ratio R`` the exported model is first pruned as a dynamic model (``sparsec.prune``:
heads and FFN at ratio R, calibrated on real sentences, each at its own length) and the pruned
model, which keeps its dynamic dims, is what is compiled and timed.

Run from the repo root:  PYTHONPATH=. python benchmarks/dynamic.py [--repeats N] [--ratio R]
Needs the ``minilm`` extra. Writes benchmarks/results/dynamic.{json,md}
(dynamic_pruned.{json,md} with ``--ratio``).
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

SIZES = [(1, 16), (1, 64), (1, 128), (4, 128)]
RANGES = {"batch_size": (1, 8), "sequence_length": (1, 256)}
RESULTS = Path(__file__).resolve().parent / "results"


def export(path: Path) -> None:
    import torch

    from minilm_quality import load_minilm

    module, _ = load_minilm()
    ids = torch.ones((2, 16), dtype=torch.int64)
    axes = {0: "batch_size", 1: "sequence_length"}
    torch.onnx.export(module, (ids, ids), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                    "embedding": {0: "batch_size"}})


def prune(model: Path, out: Path, ratio: float) -> dict:
    """Heads and FFN of the dynamic model pruned at ``ratio``, calibrated on real sentences of
    their own lengths (1 x n tokens each: sparsec pads them to the longest, masked)."""
    import sparsec
    from minilm_quality import CALIB_MODULES, load_minilm, sentences

    _, tok = load_minilm()
    calib = []
    for text in sentences(CALIB_MODULES, 64):
        ids = np.asarray(tok(text)["input_ids"], np.int64)[None]
        calib.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    result = sparsec.prune(model, out, ratio=ratio, calibration=calib)
    lengths = [c["input_ids"].shape[1] for c in calib]
    return {"ratio": ratio, "params": [result.before.params, result.after.params],
            "cosine": result.fidelity.cosine, "calibration_lengths": [min(lengths), max(lengths)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.0,
                    help="prune heads and FFN at this ratio first (the dynamic model)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import onnx

    import sparsec
    from sparsec.package import LIBRARY
    from sparsec.targets.backend import load_library

    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = work / "minilm.onnx"
        export(model)
        pruned = None
        if args.ratio:
            pruned = prune(model, work / "pruned.onnx", args.ratio)
            model = work / "pruned.onnx"
        t0 = time.perf_counter()
        dyn = sparsec.compile(model, work / "dyn", dynamic=RANGES)
        compile_s = time.perf_counter() - t0
        sparsec.compile(model, work / "fixed", input_shapes="input_ids:1x128,attention_mask:1x128")
        names = [s["name"] for s in dyn["inputs"]]
        run_dyn = load_library(work / "dyn" / LIBRARY, names).run
        run_fixed = load_library(work / "fixed" / LIBRARY, names).run
        run_ort = ort_runner(onnx.load(str(model)), args.threads)
        rng = np.random.default_rng(0)
        for batch, seq in SIZES:
            ids = rng.integers(0, 30000, (batch, seq)).astype(np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            fns = {"sparsec dynamic": lambda: run_dyn(feeds),
                   "onnxruntime": lambda: run_ort(feeds)}
            if (batch, seq) == (1, 128):
                fns["sparsec fixed 1x128"] = lambda: run_fixed(feeds)
            err = float(np.abs(run_dyn(feeds)[0] - run_ort(feeds)[0]).max())
            ms = interleaved_medians(fns, args.repeats)
            rows.append({"batch": batch, "seq": seq, **{k: round(v, 3) for k, v in ms.items()},
                         "ratio_to_ort": round(ms["sparsec dynamic"] / ms["onnxruntime"], 3),
                         "max_abs_err": err})
            print(rows[-1], flush=True)
    base = next(r["sparsec dynamic"] for r in rows if (r["batch"], r["seq"]) == (1, 128))
    for r in rows:
        r["share_of_1x128"] = round(r["sparsec dynamic"] / base, 3)
    name = "all-MiniLM-L6-v2 (legacy exporter, dynamic_axes)"
    if pruned is not None:
        name += (f", pruned as a dynamic model at ratio {args.ratio} (params "
                 f"{pruned['params'][0]:,} -> {pruned['params'][1]:,}, held-out cosine "
                 f"{pruned['cosine']:.4f})")
    result = {"model": name, "pruned": pruned,
              "ranges": {k: list(v) for k, v in RANGES.items()}, "threads": args.threads,
              "compile_s": round(compile_s, 1), "kernels": dyn["compile"]["kernels"],
              "rows": rows}
    stem = "dynamic_pruned" if pruned is not None else "dynamic"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Dynamic shapes: {result['model']}", "",
             f"One package for batch_size 1..8 x sequence_length 1..256 (compiled in "
             f"{result['compile_s']} s; kernels {result['kernels']}), {args.threads} threads, "
             "median ms in interleaved blocks against ONNX Runtime on the same dynamic model.",
             "", "| batch x seq | sparsec dynamic | ONNX Runtime | ratio | x of 1x128 | "
             "sparsec fixed 1x128 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} x {r['seq']} | {r['sparsec dynamic']} | "
                     f"{r['onnxruntime']} | {r['ratio_to_ort']} | {r['share_of_1x128']} | "
                     f"{r.get('sparsec fixed 1x128', '')} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
