"""Whole models, dense, ONNX Runtime vs sparsec side by side in one run: ResNet-18
(1x3x224x224), MobileNetV2 (224x224), a BERT-base-like encoder (sequence 128) and an MLP, with
sparsec's compile time (untuned; with --tune also the tuned library and the tuning time) and
the GFLOP/s each engine reaches next to the machine's FMA peak.

Models are transformers' / torch's definitions with random weights (no model hub here): this
measures speed, not accuracy. Each sparsec output is checked against ONNX Runtime.

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_models.py [--models a,b]
[--tune SECONDS]  (--tune: also tune each model from an empty cache and time the result)
Writes benchmarks/results/models.{json,md} and a plot, benchmarks/results/models.svg.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import (RESULTS, bar_chart_svg, interleaved_medians, macs,  # noqa: E402
                        ort_runner, publish, sparsec_runner)


def _export(module, example, path: Path, names: list[str]):
    import onnx
    import torch

    torch.onnx.export(module, example, str(path), dynamo=True, input_names=names)
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 10)
    return m


def resnet18(path: Path):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                          layer_type="basic", downsample_in_first_stage=False)
    model = tf.ResNetForImageClassification(cfg).eval()
    return _export(model, (torch.randn(1, 3, 224, 224),), path, ["pixel_values"])


def mobilenetv2(path: Path):
    from bench_mobilenetv2_sparse import mobilenetv2_onnx

    return mobilenetv2_onnx(path)


def bert_base(path: Path):
    import torch
    import transformers as tf

    class LastHidden(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).last_hidden_state

    torch.manual_seed(0)
    model = LastHidden(tf.BertModel(tf.BertConfig())).eval()   # 12 x 768, 12 heads, 3072
    ids = torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(0))
    return _export(model, (ids,), path, ["input_ids"])


def mlp(path: Path):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
                                torch.nn.Linear(4096, 1000)).eval()
    return _export(model, (torch.randn(32, 1024),), path, ["x"])


MODELS = {"resnet18": resnet18, "mobilenetv2": mobilenetv2, "bert_base": bert_base, "mlp": mlp}


def random_feeds(model) -> dict:
    rng = np.random.default_rng(1)
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == 7:   # int64 token ids
            feeds[vi.name] = rng.integers(0, 1000, shape).astype(np.int64)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=60,
                    help="timed calls per engine, in alternating blocks of 10 (a burst of "
                         "load on this shared machine then hits one block, not the median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tune", type=float, default=0.0, metavar="SECONDS",
                    help="also tune each model (fresh cache, up to SECONDS) and time the tuned "
                         "library beside the untuned one")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from sparsec.targets import resolve_target, tuning
    from sparsec.targets.kernels import PEAK_MACS_PER_CORE

    host = resolve_target("host")
    peak_gflops = 2 * PEAK_MACS_PER_CORE * args.threads / 1e9
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = MODELS[name](Path(tmp) / f"{name}.onnx")
            feeds = random_feeds(model)
            ort = ort_runner(model, args.threads)
            os.environ["SPARSEC_TUNING_CACHE"] = str(Path(tmp) / "untuned.json")  # never written
            run, facts, compile_s = sparsec_runner(model, Path(tmp), name)
            engines = {"ort": lambda: ort(feeds), "sparsec": lambda: run(feeds)}
            want, got = ort(feeds)[0], run(feeds)[0]
            rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
            tuned = {}
            if args.tune > 0:
                os.environ["SPARSEC_TUNING_CACHE"] = str(Path(tmp) / f"{name}-tuning.json")
                start = time.monotonic()
                tuning.tune(model, host, args.tune, log=lambda s: None)
                tune_s = time.monotonic() - start
                run_t, facts_t, _ = sparsec_runner(model, Path(tmp), f"{name}_tuned")
                rel = max(rel, float(np.abs(run_t(feeds)[0] - want).max()
                                     / max(np.abs(want).max(), 1e-30)))
                engines["tuned"] = lambda run_t=run_t: run_t(feeds)
                tuned = {"tune_s": round(tune_s, 1), "kernels_tuned": sum(
                    "tuned" in d for d in facts_t["decisions"])}
            times = interleaved_medians(engines, args.repeats, block=10, budget_s=90.0)
            flop = 2 * macs(model)
            rows.append({"model": name, "gflop": flop / 1e9, "ort_ms": times["ort"],
                         "sparsec_ms": times["sparsec"], "compile_s": round(compile_s, 1),
                         "max_rel_err_vs_ort": rel, "kernels": facts["kernels"],
                         **({"tuned_ms": times["tuned"], **tuned} if tuned else {})})
            print(rows[-1], flush=True)
    lines = [f"# Whole models, dense, {args.threads} threads ({host.description})", "",
             f"FMA peak assumed {peak_gflops:.0f} GFLOP/s ({args.threads} cores x 2 FMA units x "
             "8 fp32 lanes x 3 GHz). Random weights. sparsec: untuned"
             + (f"; tuned: after `sparsec tune` with a {args.tune:g} s budget from an empty "
                "cache." if args.tune > 0 else "."), "",
             "| model | GFLOP | ORT ms | sparsec ms | sparsec / ORT | ORT GFLOP/s | "
             "sparsec GFLOP/s | compile s | fallback kernels |"
             + (" tuned ms | tuned / ORT | tune s |" if args.tune > 0 else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
             + ("---:|---:|---:|" if args.tune > 0 else "")]
    for r in rows:
        gf = r["gflop"]
        lines.append(
            f"| {r['model']} | {gf:.2f} | {r['ort_ms']:.2f} | {r['sparsec_ms']:.2f} | "
            f"{r['sparsec_ms'] / r['ort_ms']:.2f} | {gf / r['ort_ms'] * 1e3:.0f} | "
            f"{gf / r['sparsec_ms'] * 1e3:.0f} | {r['compile_s']} | "
            f"{r['kernels'].get('fallback', 0)} / {sum(r['kernels'].values())} |"
            + (f" {r['tuned_ms']:.2f} | {r['tuned_ms'] / r['ort_ms']:.2f} | {r['tune_s']} |"
               if "tuned_ms" in r else ""))
    publish("models", {"peak_gflops": peak_gflops, "threads": args.threads, "rows": rows},
            "\n".join(lines))
    # the plot: each engine's time relative to ONNX Runtime's, per model (lower is faster)
    svg = bar_chart_svg(f"Latency relative to ONNX Runtime ({args.threads} threads)",
                        [r["model"] for r in rows],
                        {"ONNX Runtime": [1.0] * len(rows),
                         "sparsec": [r["sparsec_ms"] / r["ort_ms"] for r in rows],
                         **({"sparsec tuned": [r["tuned_ms"] / r["ort_ms"] for r in rows]}
                            if args.tune > 0 else {})}, "x")
    (RESULTS / "models.svg").write_text(svg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
