"""Host CPU benchmark: ONNX Runtime vs sparsec vs TVM's zero (default) pipeline.

Run from the repo root:  PYTHONPATH=. python benchmarks/bench_host.py [--repeats N]
Writes benchmarks/results/host.json and benchmarks/results/host.md.

Every engine gets the same thread budget (``--threads``, default 2: ORT intra-op threads and
TVM's ``TVM_NUM_THREADS``) and the same inputs; each time is the median of ``--repeats`` timed
calls, ORT and sparsec alternating in small blocks (see ``interleaved_medians``), measured
around the engine's Python ``run`` call (so host<->engine copies are included for both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- models


def _model(nodes, inputs, outputs, inits: dict[str, np.ndarray]):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "bench",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnxruntime 1.31 refuses the IR version onnx 1.23 writes
    onnx.checker.check_model(model)
    return model


def gemm_model(m: int = 32, k: int = 768, n: int = 3072):
    """Y = X @ W, W constant [K, N]."""
    from onnx import helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                  [("x", [m, k])], [("y", [m, n])], {"w": w})


def conv_model(c: int = 64, hw: int = 56, oc: int = 64):
    """One 3x3 conv, stride 1, pad 1, with bias."""
    from onnx import helper

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((oc, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32) * 0.1
    return _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
                  [("x", [1, c, hw, hw])], [("y", [1, oc, hw, hw])], {"w": w, "b": b})


def residual_cnn(hw: int = 64, classes: int = 10):
    """Stem conv (3->32, s2) + 2 residual blocks @32 + down conv (32->64, s2) + 1 residual
    block @64 + global average pool + Gemm. Odd-free channel counts; ~100 MMACs."""
    from onnx import helper

    rng = np.random.default_rng(2)
    nodes, inits = [], {}

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str, relu: bool) -> str:
        inits[f"{name}_w"] = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(k * k * cin)
                              ).astype(np.float32)
        inits[f"{name}_b"] = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        p = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"],
                                      pads=[p] * 4, strides=[stride] * 2))
        if not relu:
            return f"{name}_c"
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]))
        return f"{name}_r"

    def block(x: str, c: int, name: str) -> str:
        h = conv(x, c, c, 3, 1, f"{name}a", True)
        h = conv(h, c, c, 3, 1, f"{name}b", False)
        nodes.append(helper.make_node("Add", [h, x], [f"{name}_sum"]))
        nodes.append(helper.make_node("Relu", [f"{name}_sum"], [f"{name}_out"]))
        return f"{name}_out"

    h = conv("x", 3, 32, 3, 2, "stem", True)
    h = block(h, 32, "b1")
    h = block(h, 32, "b2")
    h = conv(h, 32, 64, 3, 2, "down", True)
    h = block(h, 64, "b3")
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits["fc_w"] = (rng.standard_normal((classes, 64)) / 8).astype(np.float32)
    inits["fc_b"] = np.zeros(classes, np.float32)
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1))
    return _model(nodes, [("x", [1, 3, hw, hw])], [("y", [1, classes])], inits)


def ffn_model(m: int = 32, d: int = 768, hidden: int = 3072):
    """A transformer FFN: X @ W1 + b1 -> ReLU -> @ W2 + b2 (the BERT-base shape)."""
    from onnx import helper

    rng = np.random.default_rng(3)
    inits = {"w1": (rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32),
             "b1": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
             "w2": (rng.standard_normal((hidden, d)) / np.sqrt(hidden)).astype(np.float32),
             "b2": np.zeros(d, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    return _model(nodes, [("x", [m, d])], [("y", [m, d])], inits)


def pruned(model, ratio: float):
    """The same model after sparsec's magnitude channel-group pruning at ``ratio``."""
    import sparsec
    from sparsec.ir.onnx_io import to_onnx

    return to_onnx(sparsec.prune(model, ratio=ratio).graph)


def macs(model) -> int:
    from sparsec.analysis.cost import cost
    from sparsec.frontends.onnx import load_onnx

    return cost(load_onnx(model)).macs


# --------------------------------------------------------------------------- engines


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, block: int = 20,
                        drop: int = 5, budget_s: float = 30.0) -> dict[str, float]:
    """Median ms per engine, timed in alternating blocks of ``block`` calls.

    The machine is shared and noisy: alternating blocks exposes every engine to the same
    background load. The first ``drop`` calls of each block are not counted: the other
    engine's idle worker threads keep spinning for a while and would be billed to this one."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    start = time.perf_counter()
    while min(len(t) for t in times.values()) < repeats:
        for name, fn in fns.items():
            for i in range(drop + block):
                t0 = time.perf_counter()
                fn()
                if i >= drop:
                    times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and min(len(t) for t in times.values()) >= 3:
            break
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def ort_runner(model, threads: int) -> Callable[[dict], list]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return lambda feeds: sess.run(None, feeds)


#: a run whose machine reference (:func:`machine_reference`) moved more than this between its
#: start and end is flagged: this shared VM's speed moves up to ~2x within an hour, in both
#: engines and single-threaded too, and ratios taken far apart then compare different machines
REFERENCE_DRIFT = 0.15


def machine_reference(threads: int, calls: int = 200) -> float:
    """Median ms of ONNX Runtime on a fixed model (:func:`conv_model`: one 64-channel 3x3 conv
    at 56x56, fixed weights and input), ``threads`` threads: timed at a benchmark's start and
    end, it says how fast the machine ran meanwhile, and how this run's machine compares with
    the one a committed results file was taken on."""
    model = conv_model()
    run = ort_runner(model, threads)
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 64, 56, 56)).astype(np.float32)}
    for _ in range(20):
        run(feeds)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run(feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def reference_report(start_ms: float, end_ms: float) -> tuple[dict, str]:
    """The machine reference of a run (start and end) for its JSON, and its markdown line,
    which says so when the machine's speed moved by more than ``REFERENCE_DRIFT``."""
    drift = round(end_ms / start_ms - 1, 4) + 0.0     # no "-0%"
    line = (f"Machine reference (ONNX Runtime, one 64-channel 3x3 conv at 56x56, "
            f"`bench_host.machine_reference`): {start_ms:.3f} ms at the start of this run, "
            f"{end_ms:.3f} ms at its end ({drift:+.0%}).")
    if abs(drift) > REFERENCE_DRIFT:
        line += (" **The machine's speed moved during this run: its ratios were taken on "
                 "different machines, in effect.**")
    return {"start_ms": round(start_ms, 4), "end_ms": round(end_ms, 4),
            "drift": round(drift, 4), "flagged": abs(drift) > REFERENCE_DRIFT}, line


def sparsec_runner(model, workdir: Path, name: str, target: str = "host"
                   ) -> tuple[Callable[[dict], list], dict, float]:
    from sparsec.targets import resolve_target
    from sparsec.targets.host import compile_onnx, load_library

    t0 = time.perf_counter()
    lib = workdir / f"{name}.so"
    facts = compile_onnx(model, resolve_target(target), lib, log=lambda s: None)
    compile_s = time.perf_counter() - t0
    runner = load_library(lib, facts["inputs"])
    return runner.run, facts, compile_s


def zero_pipeline_runner(model) -> Callable[[dict], list]:
    """TVM's default CPU pipeline with no schedules at all (what you get out of the box)."""
    import tvm
    from tvm import relax

    from sparsec.targets import resolve_target
    from sparsec.targets.host import graph_input_names, import_onnx

    ex = tvm.compile(import_onnx(model),
                     target=tvm.target.Target(resolve_target("host").tvm_target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    names = graph_input_names(model)

    def run(feeds: dict) -> list:
        out = vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in names])
        return [out.numpy()] if isinstance(out, tvm.runtime.Tensor) else [o.numpy() for o in out]

    return run


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-zero", action="store_true", help="skip the (slow) zero pipeline")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts
    sys.path.insert(0, str(REPO))

    cnn, ffn = residual_cnn(), ffn_model()
    cases = [
        ("gemm_32x768x3072", gemm_model(), True),
        ("conv3x3_1x64x56x56_to_64", conv_model(), False),
        ("residual_cnn_1x3x64x64", cnn, False),
        ("residual_cnn_1x3x64x64 pruned 50%", pruned(cnn, 0.5), False),
        ("ffn_32x768x3072", ffn, False),
        ("ffn_32x768x3072 pruned 50%", pruned(ffn, 0.5), False),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, with_zero in cases:
            from sparsec.targets.host import graph_input_names

            rng = np.random.default_rng(123)
            feeds = {}
            for vi in model.graph.input:
                if vi.name in graph_input_names(model):
                    shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
                    feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
            ort_run = ort_runner(model, args.threads)
            sp_run, facts, compile_s = sparsec_runner(model, Path(tmp), name)
            ref, got = ort_run(feeds), sp_run(feeds)
            max_err = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, got))
            engines = {"ort": lambda: ort_run(feeds), "sparsec": lambda: sp_run(feeds)}
            if with_zero and not args.no_zero:
                zero_run = zero_pipeline_runner(model)
                engines["zero"] = lambda: zero_run(feeds)
            fast = interleaved_medians({k: engines[k] for k in ("ort", "sparsec")}, args.repeats)
            row = {
                "case": name,
                "ort_ms": fast["ort"],
                "sparsec_ms": fast["sparsec"],
                "zero_ms": None,
                "sparsec_compile_s": round(compile_s, 2),
                "kernels": facts["kernels"],
                "macs": macs(model),
                "max_abs_err_vs_ort": max_err,
            }
            if "zero" in engines:  # slow: a few calls, timed on their own
                row["zero_ms"] = interleaved_medians({"zero": engines["zero"]}, 3, block=3, drop=0)[
                    "zero"]
            row["sparsec_over_ort"] = row["sparsec_ms"] / row["ort_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    import onnxruntime
    import tvm

    from sparsec.targets import resolve_target

    report = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "target": resolve_target("host").tvm_target},
        "threads": args.threads,
        "repeats": args.repeats,
        "versions": {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__},
        "results": rows,
    }
    publish("host", report, _markdown(report))
    return 0


def _markdown(report: dict) -> str:
    t = report["machine"]["target"]
    lines = [
        f"# Host CPU benchmark ({t.get('mcpu', 'generic')}, {report['threads']} threads)",
        "",
        f"Median of up to {report['repeats']} runs; TVM {report['versions']['tvm']}, "
        f"ONNX Runtime {report['versions']['onnxruntime']}.",
        "",
        "| case | ONNX Runtime ms | sparsec ms | TVM zero pipeline ms | sparsec / ORT | kernels |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        zero = f"{r['zero_ms']:.2f}" if r["zero_ms"] is not None else "-"
        kern = ", ".join(f"{k} x{v}" for k, v in r["kernels"].items())
        lines.append(f"| {r['case']} | {r['ort_ms']:.3f} | {r['sparsec_ms']:.3f} | {zero} | "
                     f"{r['sparsec_over_ort']:.2f}x | {kern} |")
    by_case = {r["case"]: r for r in report["results"]}
    pairs = [(by_case[c[: -len(" pruned 50%")]], r) for c, r in by_case.items()
             if c.endswith(" pruned 50%")]
    if pairs:
        lines += ["", "## What pruning buys (dense vs 50 % channel-pruned, same engine)", "",
                  "| model | MAC reduction | ONNX Runtime speed-up | sparsec speed-up |",
                  "|---|---:|---:|---:|"]
        for dense, small in pairs:
            lines.append(f"| {dense['case']} | {dense['macs'] / small['macs']:.2f}x | "
                         f"{dense['ort_ms'] / small['ort_ms']:.2f}x | "
                         f"{dense['sparsec_ms'] / small['sparsec_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def publish(stem: str, data, markdown: str) -> None:
    """Write results/STEM.json and results/STEM.md (atomically) and print the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    _write(RESULTS / f"{stem}.json", json.dumps(data, indent=2) + "\n")
    _write(RESULTS / f"{stem}.md", markdown.rstrip("\n") + "\n")
    print(markdown)


def bar_chart_svg(title: str, labels: list[str], series: dict[str, list[float]],
                  unit: str) -> str:
    """A grouped horizontal bar chart as a small standalone SVG (no plotting dependency):
    one group per label, one bar per series, each bar labelled with its value."""
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    bar, gap, left, width = 16, 14, 150, 420
    top = 40
    vmax = max(max(v) for v in series.values()) or 1.0
    n = len(series)
    height = top + len(labels) * (n * bar + gap) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" '
           f'height="{height}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{title}</text>']
    for s_i, name in enumerate(series):
        out.append(f'<rect x="{left + s_i * 130}" y="{height - 20}" width="10" height="10" '
                   f'fill="{colors[s_i % 4]}"/><text x="{left + s_i * 130 + 14}" '
                   f'y="{height - 11}">{name}</text>')
    for i, label in enumerate(labels):
        y0 = top + i * (n * bar + gap)
        out.append(f'<text x="{left - 6}" y="{y0 + n * bar / 2 + 4}" '
                   f'text-anchor="end">{label}</text>')
        for s_i, values in enumerate(series.values()):
            w = width * values[i] / vmax
            y = y0 + s_i * bar
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 2}" '
                       f'fill="{colors[s_i % 4]}"/><text x="{left + w + 4:.1f}" '
                       f'y="{y + bar - 5}">{values[i]:.2f} {unit}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
