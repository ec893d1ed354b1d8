"""Coverage on real-world architectures: every model of ``tests/realworld.py`` (transformers
configs: encoders, decoders with GQA, vision transformers, CNNs, speech encoders), exported
by both torch exporters (TorchScript ``legacy`` and ``dynamo``), through what a user runs:

* inspect: load (fold what does not depend on input values), channel groups, frozen reasons
* prune --ratio 0.5: the pruned model must run in ONNX Runtime; the share of parameters kept
* prune --hidden-ratio 0.25: the same for the hidden width (residual streams under norms)
* compile --target host + validate: the package's library against ONNX Runtime, and its
  latency next to ONNX Runtime's (2 threads each, alternating blocks; dense models)
* the pruned (ratio 0.5) model compiled and validated too, timed beside the dense package:
  its speed-up as a share of its MAC reduction, beside ONNX Runtime's on the same two files

Each model runs in its own process (a crash in one cannot end the run).

Run from the repo root:  PYTHONPATH=. python benchmarks/coverage.py [--models a,b]
[--exporters legacy,dynamo] [--no-compile] [--update: replace only those rows; with
--no-compile, their compile and latency fields are kept from the last run]
Writes benchmarks/results/coverage.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _reason(text: str) -> str:
    """A frozen reason without the tensor names in parentheses."""
    return re.sub(r" \([^)]*\)$", "", text)


def one(name: str, exporter: str, do_compile: bool) -> dict:
    """All steps for one model and exporter (runs in a worker process)."""
    import numpy as np
    import onnx

    import realworld
    import sparsec
    from sparsec import reference
    from sparsec.analysis.depgraph import DependencyGraph

    row: dict = {"model": name, "exporter": exporter}
    try:
        proto = realworld.build(name, exporter)
    except Exception as e:  # noqa: BLE001 - torch cannot export it: recorded, not ours
        row["export"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return row
    work = Path(tempfile.mkdtemp(prefix="sparsec-coverage-"))
    path = work / "model.onnx"
    onnx.save(proto, str(path))
    step = "inspect"
    try:
        t0 = time.perf_counter()
        graph = sparsec.load(path)
        groups = DependencyGraph(graph).groups
        row["load_s"] = round(time.perf_counter() - t0, 2)
        row["normalize"] = graph.notes.get("normalize", {})
        frozen = [g for g in groups if not g.prunable and not g.hidden_prunable]
        row["groups"] = [sum(g.prunable for g in groups), len(frozen)]
        row["hidden"] = sum(g.hidden_prunable for g in groups)
        row["frozen"] = dict(Counter(_reason(r) for g in frozen
                                     for r in dict.fromkeys(_reason(x) for x in g.frozen)))
        step = "prune"
        result = sparsec.prune(graph, work / "pruned.onnx", ratio=0.5)
        out = reference.run(onnx.load(str(work / "pruned.onnx")),
                            reference.random_inputs(result.graph))
        row["prune_ok"] = all(np.isfinite(o).all() for o in out if o.dtype.kind == "f")
        row["params"] = [result.before.params, result.after.params]
        row["kept"] = round(result.after.params / max(result.before.params, 1), 3)
        step = "prune hidden"
        hidden = sparsec.prune(graph, work / "hidden.onnx", hidden_ratio=0.25)
        out = reference.run(onnx.load(str(work / "hidden.onnx")),
                            reference.random_inputs(hidden.graph))
        row["hidden_prune_ok"] = all(np.isfinite(o).all() for o in out if o.dtype.kind == "f")
        row["hidden_kept"] = round(hidden.after.params / max(hidden.before.params, 1), 3)
        if do_compile:
            step = "compile"
            t0 = time.perf_counter()
            manifest = sparsec.compile(path, work / "pkg", target="host")
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            step = "validate"
            report = sparsec.validate(work / "pkg")
            row["validate_ok"] = report.ok
            row["kernels"] = manifest["compile"].get("kernels", {})
            step = "compile pruned"
            sparsec.compile(work / "pruned.onnx", work / "pkg_pruned", target="host")
            row["pruned_validate_ok"] = sparsec.validate(work / "pkg_pruned").ok
            step = "latency"
            row["latency_ms"] = _latency(work / "pkg", proto, work / "pkg_pruned",
                                         onnx.load(str(work / "pruned.onnx")))
            from bench_host import macs

            row["macs"] = [macs(proto), macs(onnx.load(str(work / "pruned.onnx")))]
    except Exception as e:  # noqa: BLE001 - a report: record the failing step and go on
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row["error"] = f"{step}: {type(e).__name__}: {first[:200]}"
    return row


#: the fields a compiling run adds to a row (kept by ``--no-compile --update``)
COMPILE_KEYS = ("compile_s", "validate_ok", "kernels", "latency_ms", "pruned_validate_ok",
                "macs")


def _latency(pkg_dir: Path, proto, pruned_dir: Path, pruned_proto) -> dict:
    """Median ms of ONNX Runtime on the input model and on the pruned (ratio 0.5) one, of the
    package's library and of the pruned package's library, timed in alternating blocks."""
    from bench_host import interleaved_medians, ort_runner

    from sparsec import reference
    from sparsec.api import _runner
    from sparsec.package import Package

    pkg, pruned = Package.load(pkg_dir), Package.load(pruned_dir)
    feeds = reference.random_feeds(pkg.inputs, 0)
    pruned_feeds = reference.random_feeds(pruned.inputs, 0)
    ort, ort_pruned = ort_runner(proto, 2), ort_runner(pruned_proto, 2)
    lib, lib_pruned = _runner(pkg), _runner(pruned)
    ms = interleaved_medians({"ort": lambda: ort(feeds), "sparsec": lambda: lib.run(feeds),
                              "pruned": lambda: lib_pruned.run(pruned_feeds),
                              "ort_pruned": lambda: ort_pruned(pruned_feeds)},
                             repeats=30, block=10, drop=3, budget_s=20.0)
    return {k: round(v, 4) for k, v in ms.items()}


def share(row: dict, engine: str = "sparsec") -> float | None:
    """The pruned model's speed-up over the dense one, as a share of the MAC reduction, for
    sparsec's packages or (``engine="ort"``) ONNX Runtime; None where pruning took off less
    than 5 % of the MACs (nothing to predict: ConvNeXt-V2, whose channels are all frozen)."""
    lat, m = row.get("latency_ms") or {}, row.get("macs")
    pruned = "pruned" if engine == "sparsec" else "ort_pruned"
    if pruned not in lat or not m or m[0] < 1.05 * m[1]:
        return None
    return (lat[engine] / lat[pruned]) / (m[0] / m[1])


def _cell_ok(flag) -> str:
    return "-" if flag is None else ("ok" if flag else "FAIL")


def markdown(rows: list[dict]) -> str:
    lines = ["| model | exporter | load | folded nodes | groups prunable / frozen | hidden widths "
             "| prune 0.5: params kept | hidden 0.25: params kept | compile + validate "
             "| sparsec / ORT | pruned 0.5: speed-up / MAC reduction (share) "
             "| ORT's share | what stays frozen |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        if "export" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | torch cannot export: "
                         f"{r['export']} | | | | | | | | | | |")
            continue
        err = r.get("error", "")
        folded = sum(r.get("normalize", {}).get("folded", {}).values())
        groups = "/".join(map(str, r["groups"])) if "groups" in r else "-"
        kept = f"{r['kept']:.2f}" if "kept" in r else "-"
        hidden = str(r.get("hidden", "-"))
        hidden_kept = f"{r['hidden_kept']:.2f}" if "hidden_kept" in r else "-"
        lat = r.get("latency_ms")
        ratio = f"{lat['sparsec'] / lat['ort']:.2f}" if lat else "-"
        sh = share(r)
        speedup = "-" if sh is None else (
            f"{lat['sparsec'] / lat['pruned']:.2f}x / {r['macs'][0] / r['macs'][1]:.2f}x "
            f"({sh:.2f})")
        ort_sh = share(r, "ort")
        ort_share = "-" if ort_sh is None else f"{ort_sh:.2f}"
        frozen = "; ".join(f"{k} ({v})" for k, v in sorted(
            r.get("frozen", {}).items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['model']} | {r['exporter']} | {'ok' if 'groups' in r else 'FAIL'} | "
                     f"{folded} | {groups} | {hidden} | {kept} | {hidden_kept} | "
                     f"{_cell_ok(r.get('validate_ok')) if not err else 'FAIL: ' + err} | "
                     f"{ratio} | {speedup} | {ort_share} | {frozen} |")
    done = [r for r in rows if "export" not in r]
    ok = sum(1 for r in done if r.get("validate_ok"))
    pruned = sum(1 for r in done if r.get("prune_ok"))
    hidden_ok = sum(1 for r in done if r.get("hidden_prune_ok"))
    reasons: Counter = Counter()
    for r in done:
        reasons.update(r.get("frozen", {}))
    shares = sorted(x for x in map(share, done) if x is not None)
    ort_shares = sorted(x for x in (share(r, "ort") for r in done) if x is not None)
    lines += ["", f"compile + validate: {ok} / {len(done)} files; prune --ratio 0.5 runs in ONNX "
              f"Runtime: {pruned} / {len(done)}; prune --hidden-ratio 0.25 runs: {hidden_ok} / "
              f"{len(done)}" + (f"; pruned speed-up as a share of the MAC reduction: "
                                f"{shares[0]:.2f}-{shares[-1]:.2f} over {len(shares)} files, "
                                f"median {shares[len(shares) // 2]:.2f}" if shares else "")
              + (f" (ONNX Runtime on the same pruned files: {ort_shares[0]:.2f}-"
                 f"{ort_shares[-1]:.2f}, median {ort_shares[len(ort_shares) // 2]:.2f})"
                 if ort_shares else ""),
              "", "Frozen groups by reason, all files:", "",
              "| reason | groups |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in reasons.most_common()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import realworld
    from bench_host import machine_reference, publish, reference_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(realworld.MODELS))
    ap.add_argument("--exporters", default=",".join(realworld.EXPORTERS))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--update", action="store_true",
                    help="replace only these models' rows in the existing results")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        name, exporter, do_compile = args.worker
        print("ROW " + json.dumps(one(name, exporter, do_compile == "1")), flush=True)
        return 0
    rows = []
    reference_start = machine_reference(2)
    for name in args.models.split(","):
        for exporter in args.exporters.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", name, exporter,
                 "0" if args.no_compile else "1"], capture_output=True, text=True, cwd=ROOT)
            found = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            row = json.loads(found[-1]) if found else {
                "model": name, "exporter": exporter,
                "error": f"worker died (exit {proc.returncode}): {proc.stderr.strip()[-200:]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.update:
        from bench_host import RESULTS

        fresh = {(r["model"], r["exporter"]): r for r in rows}
        old = json.loads((RESULTS / "coverage.json").read_text())
        if args.no_compile:       # keep what the last compiling run measured
            for r in old:
                new = fresh.get((r["model"], r["exporter"]))
                if new is not None and "error" not in new:
                    new.update({k: r[k] for k in COMPILE_KEYS if k in r})
        rows = [fresh.pop((r["model"], r["exporter"]), r) for r in old] + list(fresh.values())
    _, reference = reference_report(reference_start, machine_reference(2))
    publish("coverage", rows, markdown(rows) + "\n" + reference + (
        " (With --update: the rows this run re-measured.)" if args.update else "") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
