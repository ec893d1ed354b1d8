"""Does rounding kept channel counts to a multiple pay? Residual CNN pruned at 30 % and 50 %
with ``round_to`` 1, 8 and 16, each compiled by sparsec and run in ONNX Runtime, timed side by
side (interleaved, same inputs). This is the measurement behind ``TargetSpec.channel_multiple``.

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_round_to.py [--repeats N]
Writes benchmarks/results/round_to.json and benchmarks/results/round_to.md.
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
                        residual_cnn, sparsec_runner)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import sparsec
    from sparsec.ir.onnx_io import to_onnx

    dense = residual_cnn()
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    rows, engines = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in (0.3, 0.5):
            for round_to in (1, 8, 16):
                model = to_onnx(sparsec.prune(dense, ratio=ratio, round_to=round_to).graph)
                key = f"ratio {ratio} round_to {round_to}"
                run, _, _ = sparsec_runner(model, Path(tmp), key.replace(" ", "_"))
                ort = ort_runner(model, args.threads)
                engines[f"{key} sparsec"] = lambda run=run: run(feeds)
                engines[f"{key} ort"] = lambda ort=ort: ort(feeds)
                widths = sorted({int(i.dims[0]) for i in model.graph.initializer
                                 if len(i.dims) == 4})
                rows.append({"ratio": ratio, "round_to": round_to, "macs": macs(model),
                             "conv_widths": widths, "key": key})
        times = interleaved_medians(engines, args.repeats, budget_s=120.0)
    for r in rows:
        r["sparsec_ms"], r["ort_ms"] = times[f"{r['key']} sparsec"], times[f"{r['key']} ort"]
        print(json.dumps(r), flush=True)
    lines = ["# Kept channel counts: round_to 1 / 8 / 16 (residual CNN, 1x3x64x64)", "",
             "| ratio | round_to | conv widths | MACs | sparsec ms | ONNX Runtime ms |",
             "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ratio']} | {r['round_to']} | {r['conv_widths']} | "
                     f"{r['macs'] / 1e6:.1f}M | {r['sparsec_ms']:.3f} | {r['ort_ms']:.3f} |")
    publish("round_to", {"threads": args.threads, "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
