"""Model-zoo report: which architectures prune at ratio 0.5 through each path, and what stays
frozen (and why). The same checks as tests/test_zoo_acceptance.py, written out as a table.

Run from the repo root:  PYTHONPATH=. python benchmarks/zoo_report.py
Writes benchmarks/results/zoo.json and benchmarks/results/zoo.md.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import publish  # noqa: E402


def _reasons(groups) -> str:
    """Frozen-group reasons without the tensor names, with how many groups each froze."""
    counts = Counter(re.sub(r" \([^)]*\)$", "", r) for g in groups if not g.prunable
                     for r in dict.fromkeys(re.sub(r" \([^)]*\)$", "", x) for x in g.frozen))
    return "; ".join(f"{r} ({n})" for r, n in counts.most_common())


def main() -> int:
    import torch
    import zoo

    import sparsec
    from sparsec import reference
    from sparsec.analysis.depgraph import DependencyGraph
    from sparsec.frontends.fx import capture_fx
    from sparsec.frontends.onnx import load_onnx
    from sparsec.frontends.torch import first_tensor

    rows = []
    for name in (*zoo.TRANSFORMERS, *zoo.TRANSFORMERS_MORE):
        module, example = zoo.transformers_model(name)
        row = {"model": name}
        for path in ("onnx", "torch"):
            try:
                if path == "onnx":
                    g = load_onnx(zoo.export_onnx(module, example))
                    result = sparsec.prune(g, ratio=0.5)
                    out = reference.run(result.graph, reference.random_inputs(result.graph))
                    ok = bool(np.isfinite(out[0]).all())
                else:
                    g = capture_fx(module, example)
                    pruned, result = sparsec.prune_module(module, example, ratio=0.5)
                    with torch.no_grad():
                        got = pruned(*example)
                    got = first_tensor(got).numpy()
                    want = reference.run(result.graph,
                                         {result.graph.inputs[0]: example[0].numpy()})[0]
                    ok = bool(np.allclose(got, want, rtol=1e-4, atol=1e-5))
                groups = DependencyGraph(g).groups
                row[path] = {"ok": ok, "prunable": sum(x.prunable for x in groups),
                             "frozen": sum(not x.prunable for x in groups),
                             "params": [result.before.params, result.after.params],
                             "frozen_reasons": _reasons(groups)}
            except Exception as e:  # noqa: BLE001 - a report, not a test: record and go on
                row[path] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| model | ONNX path | torch path | prunable / frozen groups | params at 0.5 "
             "(torch path) | what stays frozen (groups) |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        o, t = r["onnx"], r["torch"]
        p = t.get("params", [0, 0])
        lines.append(f"| {r['model']} | {'ok' if o['ok'] else 'FAIL'} | "
                     f"{'ok' if t['ok'] else 'FAIL'} | {t.get('prunable', '-')} / "
                     f"{t.get('frozen', '-')} | {p[0]:,} -> {p[1]:,} | "
                     f"{t.get('frozen_reasons') or t.get('error', '')} |")
    publish("zoo", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
