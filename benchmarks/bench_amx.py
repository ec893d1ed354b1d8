"""AMX on real hardware: the benchmark models compiled for ``x86-amx`` (bf16 tile kernels for
every matmul by a weight, conv and attention matmul) against the same models compiled for
``host`` (fp32 AVX-512) and ONNX Runtime (fp32), side by side in one run, with what bf16 costs
in fidelity (cosine and max relative error of each output against ONNX Runtime's).

Needs a CPU with AMX (Sapphire Rapids or newer) and refuses to run elsewhere: the tile
programs are then only emulated, which says nothing about speed.

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_amx.py [--models a,b]
[--rounds N] [--threads T]
Writes benchmarks/results/amx.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import interleaved_medians, macs, ort_runner, publish, sparsec_runner  # noqa: E402
from bench_models import MODELS, random_feeds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from sparsec.reference import compare
    from sparsec.targets import cpu_flags, resolve_target

    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        print("bench_amx: this CPU has no AMX (needs amx_tile and amx_bf16)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SPARSEC_TUNING_CACHE"] = str(Path(tmp) / "untuned.json")   # never written
        for name in [m for m in args.models.split(",") if m]:
            model = MODELS[name](Path(tmp) / f"{name}.onnx")
            feeds = random_feeds(model)
            ort = ort_runner(model, args.threads)
            fp32, _, fp32_s = sparsec_runner(model, Path(tmp), f"{name}_fp32")
            bf16, facts, bf16_s = sparsec_runner(model, Path(tmp), f"{name}_amx", "x86-amx")
            want = ort(feeds)[0]
            engines = {"ort": lambda: ort(feeds), "fp32": lambda: fp32(feeds),
                       "amx": lambda: bf16(feeds)}
            rounds = [interleaved_medians(engines, args.repeats, block=10, budget_s=60.0)
                      for _ in range(args.rounds)]
            ms = {k: float(np.median([r[k] for r in rounds])) for k in engines}
            amx_vs_ort = [r["amx"] / r["ort"] for r in rounds]
            amx_vs_fp32 = [r["fp32"] / r["amx"] for r in rounds]
            tiles = {k: v for k, v in facts["kernels"].items() if "amx" in k}
            rows.append({"model": name, "gflop": 2 * macs(model) / 1e9, **{
                f"{k}_ms": v for k, v in ms.items()},
                "amx_over_ort": [min(amx_vs_ort), max(amx_vs_ort)],
                "amx_speedup_over_fp32": [min(amx_vs_fp32), max(amx_vs_fp32)],
                "compile_s": {"fp32": round(fp32_s, 1), "amx": round(bf16_s, 1)},
                "amx_kernels": tiles, "fp32": compare([want], [fp32(feeds)[0]]).as_dict(),
                "bf16": compare([want], [bf16(feeds)[0]]).as_dict()})
            print(rows[-1], flush=True)
    host = resolve_target("host")

    def rng(pair):
        lo, hi = pair
        return f"{lo:.2f}" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}"

    lines = [f"# AMX (bf16 tiles) against fp32, {args.threads} threads ({host.description})",
             "", "Random weights. `x86-amx`: bf16 tile kernels (inputs rounded to bf16, fp32 "
             "sums); `host`: fp32 AVX-512 kernels; ONNX Runtime: fp32. Untuned. Medians of "
             f"{args.rounds} rounds of interleaved blocks; ratios as ranges over rounds. "
             "Fidelity: the first output against ONNX Runtime's.", "",
             "| model | GFLOP | ORT ms | sparsec fp32 ms | sparsec AMX ms | AMX / ORT | "
             "AMX speed-up over fp32 | AMX kernels | bf16 cosine | bf16 max rel err |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        kernels = ", ".join(f"{k} {v}" for k, v in r["amx_kernels"].items()) or "-"
        lines.append(
            f"| {r['model']} | {r['gflop']:.2f} | {r['ort_ms']:.2f} | {r['fp32_ms']:.2f} | "
            f"{r['amx_ms']:.2f} | {rng(r['amx_over_ort'])} | "
            f"{rng(r['amx_speedup_over_fp32'])}x | {kernels} | {r['bf16']['cosine']:.6f} | "
            f"{r['bf16']['max_rel_err']:.2e} |")
    publish("amx", {"threads": args.threads, "cpu": host.description, "rows": rows},
            "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
