"""all-MiniLM-L6-v2 with block-sparse weights (16x1, the BSR kernel's pattern): sentence
embedding fidelity (cosine vs the original, held-out sentences, sequence 32) and latency
(batch 1, sequence 128) in ONNX Runtime (dense) and sparsec, side by side in one run.

Run from the repo root:  PYTHONPATH=. python benchmarks/minilm_sparse.py
Writes benchmarks/results/minilm_sparse.json and benchmarks/results/minilm_sparse.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import interleaved_medians, ort_runner, publish, sparsec_runner  # noqa: E402
from minilm_quality import (CALIB_MODULES, EVAL_MODULES, batches, embed,  # noqa: E402
                            embed_graph, load_minilm, packed, sentences)

SEQ = 128
VARIANTS = [("dense", {}),
            ("16x1, 50 %", {"sparsity": 0.5}),
            ("16x1, 80 %", {"sparsity": 0.8}),
            ("16x1, 90 %", {"sparsity": 0.9})]
COMMON = {"sparsity_pattern": "16x1", "sparsity_criterion": "wanda", "lamp": True,
          "reconstruct": True}


def main() -> int:
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    import sparsec
    from sparsec.frontends.fx import capture_fx
    from sparsec.ir.onnx_io import to_onnx

    module, tok = load_minilm()
    calib = batches(tok, packed(tok, sentences(CALIB_MODULES, 512)))
    test = batches(tok, sentences(EVAL_MODULES, 256))
    ref = embed(module, test)
    dicts = [{"input_ids": i.numpy(), "attention_mask": m.numpy()} for i, m in calib]
    short = capture_fx(module, calib[0])
    enc = tok(["a sentence to time the encoder with"], padding="max_length", max_length=SEQ,
              return_tensors="pt")
    long = capture_fx(module, (enc["input_ids"], enc["attention_mask"]))
    feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    params = set(module.state_dict())
    rows, engines = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in VARIANTS:
            opts = {**COMMON, **kw} if kw else {}
            # the same sparse weights at both lengths: prune the short graph, copy into the long
            result = sparsec.prune(short, calibration=dicts, **opts)
            cos = (embed_graph(result.graph, test) * ref).sum(axis=1)
            g = long.copy()
            for k in params:                 # module parameters keep their names in both
                if k in g.initializers and k in result.graph.initializers:
                    g.initializers[k] = result.graph.initializers[k]
            model = to_onnx(g)
            run, facts, compile_s = sparsec_runner(model, Path(tmp), f"v{len(rows)}")
            ort = ort_runner(model, 2)
            err = float(np.abs(run(feeds)[0] - ort(feeds)[0]).max())
            engines[f"{name} sparsec"] = lambda run=run: run(feeds)
            engines[f"{name} ort"] = lambda ort=ort: ort(feeds)
            rows.append({"variant": name, "cosine": float(cos.mean()),
                         "min_cosine": float(cos.min()), "kernels": facts["kernels"],
                         "max_abs_err_vs_ort": err, "compile_s": round(compile_s, 1),
                         "achieved": result.passes[0].details["achieved"] if kw else 0.0})
            print(json.dumps(rows[-1]), flush=True)
        times = interleaved_medians(engines, 20, budget_s=180.0)
    for r in rows:
        r["sparsec_ms"] = times[f"{r['variant']} sparsec"]
        r["ort_ms"] = times[f"{r['variant']} ort"]
    lines = ["all-MiniLM-L6-v2, linear weights sparsified in 16x1 blocks (wanda, LAMP, "
             "reconstruct; no training). Cosine: sentence embeddings vs the original on "
             f"{len(test) * 8} held-out sentences (sequence 32). Latency: batch 1, sequence "
             f"{SEQ}, 2 threads; ONNX Runtime runs the same (zero-filled) weights densely.", "",
             "| variant | mean cosine | min cosine | BSR layers | ORT ms | sparsec ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['cosine']:.4f} | {r['min_cosine']:.4f} | "
                     f"{r['kernels'].get('bsr_dense', 0)} | {r['ort_ms']:.2f} | "
                     f"{r['sparsec_ms']:.2f} |")
    publish("minilm_sparse", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
