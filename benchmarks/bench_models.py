"""Whole models, ONNX Runtime vs sparsec side by side in one run: ResNet-18 (1x3x224x224),
MobileNetV2 (224x224), a BERT-base-like encoder (sequence 128), an MLP and a mixed CNN
(inception, SE, grouped and depthwise convs), with sparsec's compile time (untuned; with --tune
also the tuned library and the tuning time) and the GFLOP/s each engine reaches next to the
machine's FMA peak. Each model is also pruned (``sparsec.prune(ratio=--ratio)``, magnitude) and
both builds timed in the same rotation: the pruned build's speed-up over the dense one, next to
the speed-up its MAC reduction predicts. ``--rounds`` repeats the timing: ratios are ranges.

Models are transformers' / torch's definitions with random weights (no model hub here): this
measures speed, not accuracy. Each sparsec output is checked against ONNX Runtime.

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_models.py [--models a,b]
[--tune SECONDS] [--ratio R] [--rounds N] [--stem S] [--keep-others]  (--tune: also tune each
model from an empty cache and time the result; --ratio 0: dense only; --keep-others: a partial
re-run keeps the published rows of the other models)
Writes benchmarks/results/models.{json,md} and a plot, benchmarks/results/models.svg (another
stem with --stem).
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
from bench_host import (RESULTS, bar_chart_svg, interleaved_medians,  # noqa: E402
                        machine_reference, macs, ort_runner, pruned, publish, reference_report,
                        sparsec_runner)


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


def mixed_cnn(path: Path):
    """A CNN of the parts real ones mix (1x3x160x160): an inception block (1x1 / 3x3 / 5x5
    branches concatenated), squeeze-and-excitation, a ResNeXt bottleneck (grouped 3x3 conv, 4 groups), depthwise
    separable blocks with SiLU, residual adds, global pooling and a classifier."""
    import torch
    from torch import nn

    def cbr(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), act())

    class SE(nn.Module):
        def __init__(self, c, r=4):
            super().__init__()
            self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // r, 1), nn.ReLU(),
                                    nn.Conv2d(c // r, c, 1), nn.Sigmoid())

        def forward(self, x):
            return x * self.fc(x)

    class Inception(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.b1, self.b3 = cbr(cin, 32, 1), nn.Sequential(cbr(cin, 24, 1), cbr(24, 48))
            self.b5 = nn.Sequential(cbr(cin, 8, 1), cbr(8, 16, 5))

        def forward(self, x):
            return torch.cat([self.b1(x), self.b3(x), self.b5(x)], 1)   # 96 channels

    class GroupedBlock(nn.Module):      # ResNeXt's bottleneck: 1x1, grouped 3x3, 1x1
        def __init__(self, cin, c, cout, groups, stride):
            super().__init__()
            self.body = nn.Sequential(cbr(cin, c, 1), cbr(c, c, 3, stride, groups=groups),
                                      cbr(c, cout, 1, act=nn.Identity))
            self.skip = cbr(cin, cout, 1, stride, act=nn.Identity)

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    class DWBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(cbr(c, c, 3, groups=c, act=nn.SiLU), SE(c),
                                      cbr(c, c, 1, act=nn.Identity))

        def forward(self, x):
            return x + self.body(x)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                cbr(3, 32, 3, 2), Inception(32), SE(96),
                GroupedBlock(96, 128, 128, 4, 2), DWBlock(128), DWBlock(128),
                cbr(128, 192, 1), cbr(192, 192, 3, 2, groups=192, act=nn.SiLU), DWBlock(192))
            self.head = nn.Linear(192, 100)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    torch.manual_seed(0)
    model = Mixed().eval()
    return _export(model, (torch.randn(1, 3, 160, 160),), path, ["x"])


MODELS = {"resnet18": resnet18, "mobilenetv2": mobilenetv2, "bert_base": bert_base, "mlp": mlp,
          "mixed_cnn": mixed_cnn}


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
    ap.add_argument("--ratio", type=float, default=0.5,
                    help="also prune each model at this ratio and time it (0: dense only)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timing rounds per model; ratios are reported as ranges over them")
    ap.add_argument("--tune", type=float, default=0.0, metavar="SECONDS",
                    help="also tune each model (fresh cache, up to SECONDS) and time the tuned "
                         "library beside the untuned one")
    ap.add_argument("--stem", default="models",
                    help="write results/STEM.{json,md,svg} (another machine's run beside the "
                         "published one: --stem models_<cpu>)")
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the published rows of the models not named in --models (a "
                         "partial re-run; their figures stay those of the run that made them)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from sparsec.targets import resolve_target, tuning
    from sparsec.targets.kernels import PEAK_MACS_PER_CORE

    host = resolve_target("host")
    peak_gflops = 2 * PEAK_MACS_PER_CORE * args.threads / 1e9
    rows = []
    reference_start = machine_reference(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in args.models.split(",") if m]:
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
            prune_row = {}
            if args.ratio > 0:
                small = pruned(model, args.ratio)
                run_p, _, _ = sparsec_runner(small, Path(tmp), f"{name}_pruned")
                ort_p = ort_runner(small, args.threads)
                want_p = ort_p(feeds)[0]
                prune_row = {"mac_ratio": macs(model) / macs(small), "max_rel_err_pruned": float(
                    np.abs(run_p(feeds)[0] - want_p).max() / max(np.abs(want_p).max(), 1e-30))}
                engines["pruned"] = lambda: run_p(feeds)
                engines["ort_pruned"] = lambda: ort_p(feeds)
            rounds = [interleaved_medians(engines, args.repeats, block=10, budget_s=90.0)
                      for _ in range(args.rounds)]
            times = {k: float(np.median([r[k] for r in rounds])) for k in engines}
            ratio = [r["sparsec"] / r["ort"] for r in rounds]
            flop = 2 * macs(model)
            rows.append({"model": name, "gflop": flop / 1e9, "ort_ms": times["ort"],
                         "sparsec_ms": times["sparsec"], "ratio_range": [min(ratio), max(ratio)],
                         "compile_s": round(compile_s, 1),
                         "max_rel_err_vs_ort": rel, "kernels": facts["kernels"],
                         **({"tuned_ms": times["tuned"], **tuned} if tuned else {})})
            if prune_row:
                speedup = [r["sparsec"] / r["pruned"] for r in rounds]
                prune_row.update(pruned_ms=times["pruned"], ort_pruned_ms=times["ort_pruned"],
                                 speedup_range=[min(speedup), max(speedup)],
                                 ort_speedup=times["ort"] / times["ort_pruned"])
                rows[-1]["pruned"] = prune_row
            print(rows[-1], flush=True)
    reference, reference_line = reference_report(reference_start,
                                                 machine_reference(args.threads))
    if args.keep_others and (RESULTS / f"{args.stem}.json").is_file():
        import json

        kept = {r["model"]: r for r in json.loads(
            (RESULTS / f"{args.stem}.json").read_text())["rows"]}
        kept.update({r["model"]: r for r in rows})
        rows = [kept[m] for m in MODELS if m in kept]
    lines = [f"# Whole models, {args.threads} threads ({host.description})", "",
             f"FMA peak assumed {peak_gflops:.0f} GFLOP/s ({args.threads} cores x 2 FMA units x "
             "8 fp32 lanes x 3 GHz). Random weights. sparsec: untuned"
             + (f"; tuned: after `sparsec tune` with a {args.tune:g} s budget from an empty "
                "cache." if args.tune > 0 else ".")
             + f" Medians of {args.rounds} rounds; sparsec / ORT as the range over rounds.", "",
             reference_line + (" (Rows kept from an earlier run by --keep-others were taken "
                               "on that run's machine.)" if args.keep_others else ""), "",
             "| model | GFLOP | ORT ms | sparsec ms | sparsec / ORT | ORT GFLOP/s | "
             "sparsec GFLOP/s | compile s | fallback kernels |"
             + (" tuned ms | tuned / ORT | tune s |" if args.tune > 0 else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
             + ("---:|---:|---:|" if args.tune > 0 else "")]
    for r in rows:
        gf = r["gflop"]
        lo, hi = r["ratio_range"]
        lines.append(
            f"| {r['model']} | {gf:.2f} | {r['ort_ms']:.2f} | {r['sparsec_ms']:.2f} | "
            f"{lo:.2f}-{hi:.2f} | {gf / r['ort_ms'] * 1e3:.0f} | "
            f"{gf / r['sparsec_ms'] * 1e3:.0f} | {r['compile_s']} | "
            f"{r['kernels'].get('fallback', 0)} / {sum(r['kernels'].values())} |"
            + (f" {r['tuned_ms']:.2f} | {r['tuned_ms'] / r['ort_ms']:.2f} | {r['tune_s']} |"
               if "tuned_ms" in r else ""))
    if args.ratio > 0:
        lines += ["", f"## Pruned at ratio {args.ratio:g} (magnitude), against our own dense build",
                  "", "Speed-up: dense sparsec ms / pruned sparsec ms (range over rounds); "
                  "share of the MAC-predicted speed-up: the speed-up over the MAC ratio "
                  "(the issue's bar: at least 0.8).", "",
                  "| model | MACs dense / pruned | pruned ms | speed-up | share of MAC "
                  "prediction | ORT's speed-up | pruned sparsec / ORT |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            p = r["pruned"]
            lo, hi = p["speedup_range"]
            lines.append(f"| {r['model']} | {p['mac_ratio']:.2f} | {p['pruned_ms']:.2f} | "
                         f"{lo:.2f}-{hi:.2f} | {lo / p['mac_ratio']:.2f}-{hi / p['mac_ratio']:.2f}"
                         f" | {p['ort_speedup']:.2f} | {p['pruned_ms'] / p['ort_pruned_ms']:.2f} |")
    publish(args.stem, {"peak_gflops": peak_gflops, "threads": args.threads,
                        "machine_reference": reference, "rows": rows},
            "\n".join(lines))
    # the plot: each engine's time relative to ONNX Runtime's, per model (lower is faster)
    svg = bar_chart_svg(f"Latency relative to ONNX Runtime ({args.threads} threads)",
                        [r["model"] for r in rows],
                        {"ONNX Runtime": [1.0] * len(rows),
                         "sparsec": [r["sparsec_ms"] / r["ort_ms"] for r in rows],
                         **({"sparsec tuned": [r["tuned_ms"] / r["ort_ms"] for r in rows]}
                            if args.tune > 0 else {})}, "x")
    (RESULTS / f"{args.stem}.svg").write_text(svg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
