"""``sparsec`` command line. Each flag maps to one keyword of the Python API (``sparsec.api``).

This module imports only the standard library at load time: ``sparsec --help`` must answer fast,
so numpy, onnx, torch and TVM are imported inside the commands that need them.

Exit codes: 0 success, 2 usage, 3-13 the ``SparsecError`` kinds (see ``sparsec.errors``),
70 internal error (a bug: run with ``--debug`` for the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from sparsec.errors import BadOptionError, SparsecError

INTERNAL_ERROR = 70


def _log(args) -> "callable":
    """Progress lines on stderr (a bar on a terminal, ``sparsec.progress``); none with -q."""
    from sparsec.progress import Log

    return Log(quiet=args.quiet)


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _table(rows: list[list[str]]) -> str:
    """Plain-text table; columns whose cells all look numeric are right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    numeric = [all(r[i].lstrip("+-").replace(",", "").replace(".", "").rstrip("%").isdigit()
                   for r in rows[1:]) for i in range(len(widths))]
    lines = ["  ".join((c.rjust(w) if numeric[i] else c.ljust(w)).rstrip() if i == len(r) - 1
                       else (c.rjust(w) if numeric[i] else c.ljust(w))
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands
def _fidelity(prune_report: dict) -> str:
    """The pruned model's fidelity as a report states it: a cosine measured on held-out data,
    or that it was not measured (training error is never shown as fidelity)."""
    f = prune_report["fidelity"]
    if not f.get("held_out", True):
        return "fidelity vs original not measured (one calibration sample)"
    return f"cosine vs original {f['cosine']:.6f}"


def _inspect_package(args) -> int:
    from sparsec.package import Package

    pkg = Package.load(args.model)
    m = pkg.manifest
    if args.recipe:
        from sparsec.recipe import Recipe

        print(Recipe.from_dict(m.get("prune", {}).get("recipe", {})).to_toml(), end="")
        return 0
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    p, lib, ref = m.get("prune"), m["library"], m["reference"]
    print(f"package {pkg.path}: model '{m['name']}' from {m['source']['model']}")
    print(f"  target   {m['target']['name']} {json.dumps(m['target']['tvm'])}")
    print(f"  built by sparsec {m['sparsec_version']}, apache-tvm {m['versions']['apache-tvm']}")
    print(f"  command  {' '.join(m['command'])}")
    for kind in ("inputs", "outputs"):
        for v in m[kind]:
            print(f"  {kind[:-1]:8} {v['name']} {v['dtype']}{v['shape']}")
    if "dynamic" in m:      # a dynamic-shape package (sparsec.dynamic)
        from sparsec.reference import shown_shape

        dyn = m["dynamic"]
        for v in m["inputs"] + m["outputs"]:
            print(f"  dims     {v['name']} {shown_shape(v)}")
        sizes = "; ".join(",".join(f"{k}={n}" for k, n in c["sizes"].items())
                          + f": max abs err {c['max_abs_err']:.3g}" for c in dyn["checked"])
        print(f"  dynamic  checked against ONNX Runtime at {sizes}")
        mem = m["compile"].get("memory")
        if mem:
            at = ", ".join(f"{k}={n}" for k, n in mem["at"].items())
            print(f"  memory   {mem['planned_bytes']:,} bytes of intermediates planned at "
                  f"{at}, reused by every call")
    if p is not None:
        print(f"  params {p['before']['params']:,} -> {p['after']['params']:,}{_nonzero(p)}, "
              f"MACs {p['before']['macs']:,} -> {p['after']['macs']:,}, {_fidelity(p)}")
        print(f"  {_sparsity(p)}")
        for r in p["passes"]:
            print(f"  pass {r['name']}: {'exact' if r['exact'] else 'lossy'}")
    print(f"  kernels  {m['compile']['kernels']}")
    if "denormals" in m["compile"]:
        print("  floats   " + ("subnormals flushed to zero during a call (--denormals keep: "
                              "IEEE gradual underflow)" if m["compile"]["denormals"] == "flush"
                              else "subnormals kept (IEEE gradual underflow)"))
    if "profile" in m:
        from sparsec.profile import summary
        print(f"  profile  {summary(m['profile'])}")
    if "latency" in m:
        lat = m["latency"]
        how = (f"ratio {lat['ratio']:g} of {len(lat['tried'])} tried" if "tried" in lat else
               f"{len(lat['plan'])} of {len(lat['table'])} groups cut, predicted "
               f"{lat['predicted_ms']:.4g} ms")
        print(f"  latency  asked {lat['budget_ms']:.4g} ms, measured {lat['measured_ms']:.4g} ms "
              f"(dense {lat['dense_ms']:.4g} ms; {how})")
    lossy: dict[str, list[str]] = {}
    for d in m["compile"].get("decisions", []):
        if d.get("precision") in ("bf16", "tf32"):
            lossy.setdefault(d["precision"], []).append(d["chosen"])
    for name, chosen in sorted(lossy.items()):
        names = ", ".join(sorted(set(chosen)))
        print(f"  precision {name} inputs, fp32 sums in {len(chosen)} kernels ({names}); "
              f"tolerance rtol {ref['rtol']:g}, atol {ref['atol']:g}")
    cuda = m["compile"].get("cuda")
    if cuda:
        from sparsec.targets.cuda import tensor_core_summary

        print(f"  tensor cores {tensor_core_summary(m['compile'].get('decisions', []))}")
        res = cuda["kernels"].values()
        contents = ", ".join(cuda["fatbin_contents"])
        print(f"  CUDA     {cuda['source']} -> {cuda['fatbin']} ({contents}; nvcc "
              f"{cuda['nvcc']}), max {max((r['registers'] for r in res), default=0)} "
              f"registers, {sum(bool(r['spill_bytes']) for r in res)} kernels spilling")
        if cuda.get("cuda_graph_regions"):
            print(f"  CUDA graphs {cuda['cuda_graph_regions']} region(s) captured at the first "
                  f"call, replayed after")
        print(f"  C API    {lib['header']}, {lib['shared']} (with {cuda['fatbin']} beside it)")
    else:
        print(f"  C API    {lib['header']}, {lib['static']} (prefix '{lib['system_lib_prefix']}'"
              f"), {lib['shared']}")
    check = ref["check"]
    how = "sparsec validate on a machine with the GPU" if cuda else "sparsec_check_reference"
    print(f"  reference pair from {ref['from']} inputs: " + (
        f"library max abs err {check['max_abs_err']:.3g} vs ONNX Runtime ({check['via']})"
        if check else f"to be checked on the device ({how})"))
    for name, digest in m["files"].items():
        print(f"  {digest[:16]}  {(pkg.path / name).stat().st_size:>10,}  {name}")
    return 0


def cmd_inspect(args) -> int:
    from pathlib import Path

    from sparsec import api

    if Path(args.model).is_dir():
        return _inspect_package(args)
    if args.recipe:
        raise BadOptionError("--recipe prints a compiled package's recipe: give its directory")
    info = api.inspect(args.model, args.input_shapes)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"model {args.model}: {_fmt(info['params'])} params, {_fmt(info['macs'])} MACs")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            print(f"  {kind[:-1]:6} {v['name']} {v['dtype']}{v['shape']}")
    print("ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    folded = info["load"].get("normalize", {})
    if folded.get("summary") or folded.get("skipped"):
        print(f"load: {folded.get('summary') or 'folding skipped: ' + folded['skipped']}")
    hidden = f", {info['hidden_groups']} hidden widths" if info["hidden_groups"] else ""
    print(f"channel groups: {len(info['groups'])} ({info['prunable_groups']} prunable{hidden}, "
          f"{info['frozen_groups']} frozen)")
    rows = [["group", "size", "sources", "status"]]
    for g in info["groups"]:
        src = ", ".join(g["sources"][:2]) + (" ..." if len(g["sources"]) > 2 else "")
        status = "prunable" if g["prunable"] else (
            "hidden width: --hidden-ratio (lossy, LayerNorm statistics)"
            if g["hidden_prunable"] else "frozen: " + "; ".join(g["frozen"][:2]))
        rows.append([str(g["id"]), str(g["size"]), src, status])
    if len(rows) > 1:
        print(_table(rows))
    return 0


def _prune_table(result) -> str:
    b, a = result.before, result.after
    pct = lambda x, y: f"{100.0 * (y - x) / x:+.1f}%" if x else "n/a"  # noqa: E731
    rows = [["", "before", "after", "change"],
            ["params", f"{b.params:,}", f"{a.params:,}", pct(b.params, a.params)],
            *([["nonzero", f"{b.nonzeros:,}", f"{a.nonzeros:,}", pct(b.nonzeros, a.nonzeros)]]
              if a.nonzeros != a.params or b.nonzeros != b.params else []),
            ["MACs", f"{b.macs:,}", f"{a.macs:,}", pct(b.macs, a.macs)]]
    f = result.fidelity
    if not result.held_out:
        return _table(rows) + "\nfidelity vs original: not measured (one calibration sample)"
    return (_table(rows) + f"\nfidelity vs original: cosine {f.cosine:.6f}, max abs err "
            f"{f.max_abs_err:.3g}, max rel err {f.max_rel_err:.3g} ({result.measured_on})")


def _prune_kwargs(args) -> dict:
    """The pruning flags shared by `prune` and `compile`, as API keywords."""
    return {"ratio": args.ratio, "criterion": args.criterion, "reconstruct": args.reconstruct,
            "round_to": args.round_to, "head_ratio": args.head_ratio,
            "hidden_ratio": args.hidden_ratio, "rotate": args.rotate,
            "remove_layers": args.remove_layers, "sensitivity": args.sensitivity,
            "replace_linear": args.replace_linear,
            "remove_attention": args.remove_attention, "fuse_ffn": args.fuse_ffn,
            "reorder": args.reorder, "sparsity": args.sparsity,
            "sparsity_pattern": args.sparsity_pattern,
            "sparsity_criterion": args.sparsity_criterion, "lamp": args.lamp,
            "layer_ratios": dict(args.layer_ratio), "ignore": args.ignore,
            "input_shapes": args.input_shapes, "calibration": args.calib,
            "calib_mask": None if args.calib_mask is None else (
                "" if args.calib_mask == "none" else args.calib_mask),
            "max_drop": args.max_drop, "remove_dead": args.remove_dead,
            "recipe": args.recipe}


def cmd_prune(args) -> int:
    from sparsec import api

    result = api.prune(args.model, args.output, **_prune_kwargs(args),
                       latency_budget=args.latency_budget, speedup=args.speedup,
                       target=args.target, eval_tokens=args.eval_tokens,
                       hf_config=args.hf_config, log=_log(args))
    print(_prune_table(result))
    if result.hf_config is not None:
        print(f"Hugging Face config of the pruned model: {result.hf_config}")
    if result.latency is not None:
        lat = result.latency
        print(f"latency on {lat['target']}: {lat['ms']:.4g} ms measured for a budget of "
              f"{lat['budget_ms']:.4g} ms (dense {lat['dense_ms']:.4g} ms)")
    if result.perplexity:
        p = result.perplexity
        print(f"perplexity on {p['tokens']:,} evaluation tokens: {p['before']:.4f} -> "
              f"{p['after']:.4f}")
    print(f"wrote {result.output}")
    return 0


def cmd_compile(args) -> int:
    from sparsec import api

    manifest = api.compile(args.model, args.output, target=args.target, name=args.name,
                           **_prune_kwargs(args), command=["sparsec", *args.argv],
                           tune=args.tune, precision=args.precision, profile=args.profile,
                           latency_budget=args.latency_budget, speedup=args.speedup,
                           keep_onnx=args.keep_onnx, **_rpc_kwargs(args),
                           dynamic=args.dynamic, cuda_graph=args.cuda_graph,
                           denormals=args.denormals, log=_log(args))
    if args.dynamic:
        ranges = ", ".join(f"{k}={lo}..{hi}" for k, (lo, hi) in
                           manifest["dynamic"]["ranges"].items())
        print(f"compiled {args.model} for {manifest['target']['name']} -> {args.output} "
              f"(dynamic: {ranges}; checked against ONNX Runtime at "
              f"{len(manifest['dynamic']['checked'])} sizes)")
        return 0
    p = manifest["prune"]
    print(f"compiled {args.model} for {manifest['target']['name']} -> {args.output}")
    print(f"  params {p['before']['params']:,} -> {p['after']['params']:,}{_nonzero(p)}, "
          f"MACs {p['before']['macs']:,} -> {p['after']['macs']:,}, {_fidelity(p)}")
    print(f"  {_sparsity(p)}")
    return 0


def _sparsity(p: dict) -> str:
    """Zeros among the weights and the weights' bytes, before -> after: what weight sparsity
    changes, which params and MACs (dense counts) do not show."""
    def zeros(c: dict) -> str:
        z = c["params"] - c["nonzeros"]
        return f"{z:,} ({100.0 * z / c['params']:.1f}%)" if c["params"] else "0"

    b, a = p["before"], p["after"]
    text = f"zeros {zeros(b)} -> {zeros(a)} of the weights"
    if "weight_bytes" in a:      # packages written before sparsec recorded them lack it
        text += f", weights {b['weight_bytes']:,} -> {a['weight_bytes']:,} bytes"
    return text


def cmd_sweep(args) -> int:
    from pathlib import Path

    from sparsec import latency
    from sparsec.package import atomic_write_bytes, check_writable_dir

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        from sparsec.errors import BadOptionError
        raise BadOptionError(f"--ratios takes comma-separated numbers, got '{args.ratios}'") \
            from None
    check_writable_dir(args.output, marker="sweep.json", what="sweep directory")
    report = latency.sweep(args.model, ratios, target=args.target, sensitivity=args.sensitivity,
                           latency_aware=args.latency_aware,
                           options={"criterion": args.criterion,
                                    "reconstruct": args.reconstruct,
                                    "input_shapes": args.input_shapes,
                                    "calibration": args.calib}, log=_log(args))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{Path(args.model).name}: fidelity against latency on {report['target']}"
    md = latency.sweep_markdown(report, title)
    for name, text in (("sweep.json", json.dumps(report, indent=2)), ("sweep.md", md),
                       ("sweep.svg", latency.sweep_svg(report, title))):
        atomic_write_bytes(out / name, text.encode())
    print(md, end="")
    print(f"wrote {out / 'sweep.json'}, sweep.md, sweep.svg")
    return 0


def _nonzero(p: dict) -> str:
    """", nonzero A -> B" where weight sparsity made the counts differ from params."""
    b, a = p["before"], p["after"]
    if a.get("nonzeros", a["params"]) == a["params"] and b.get("nonzeros", b["params"]) == \
            b["params"]:
        return ""
    return f", nonzero {b['nonzeros']:,} -> {a['nonzeros']:,}"


def _profile_table(report: dict) -> str:
    from sparsec.profile import summary

    rows = [["kernel", "kind", "calls", "ms", "share"]]
    rows += [[r["kernel"][:60], r["kind"], str(r["calls"]), f"{r['ms']:.4f}",
              f"{100 * r['share']:.1f}%"] for r in report["kernels"]]
    return _table(rows) + "\n" + summary(report)


def cmd_profile(args) -> int:
    from sparsec import api

    report = api.profile(args.model, args.input_shapes)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(_profile_table(report))
    return 0


def cmd_tune(args) -> int:
    from sparsec import api

    records = api.tune(args.model, target=args.target, budget=args.budget,
                       input_shapes=args.input_shapes, check=not args.keep_all,
                       **_rpc_kwargs(args), log=_log(args))
    kernels = [r for r in records if r["strategy"] not in ("choice", "whole_model")]
    choices = [r for r in records if r["strategy"] == "choice"]
    faster = [r for r in kernels if r["default_ms"] and r["best_ms"] < r["default_ms"]]
    print(f"tuned {len(kernels)} kernels ({len(faster)} faster than the default schedule); "
          f"measured {len(choices)} strategy choices")
    for r in records:
        if r["strategy"] == "whole_model":
            ms = r["ms"]
            print(f"whole model {ms['untuned']:.4g} ms -> {ms['tuned']:.4g} ms: "
                  + ("kept" if r["kept"] else "not faster, so compile will not use them"))
    return 0


def cmd_run(args) -> int:
    from sparsec import api
    from sparsec.package import atomic_write_bytes, check_writable_file

    if args.outputs:
        check_writable_file(args.outputs)
    outputs = api.run(args.package, args.inputs, **_rpc_kwargs(args), log=_log(args))
    for name, arr in outputs.items():
        print(f"{name}: {arr.dtype}{list(arr.shape)} mean {float(arr.mean()):.6g} "
              f"min {float(arr.min()):.6g} max {float(arr.max()):.6g}")
    if args.outputs:
        import io

        import numpy as np
        buf = io.BytesIO()
        np.savez(buf, **outputs)
        atomic_write_bytes(args.outputs, buf.getvalue())
        print(f"wrote {args.outputs}")
    return 0


def cmd_validate(args) -> int:
    from sparsec import api

    report = api.validate(args.package, args.inputs, rtol=args.rtol, atol=args.atol,
                          seed=args.seed, **_rpc_kwargs(args), log=_log(args))
    against = ("ONNX Runtime" if report.against == "onnxruntime" else
               "the reference pair (ONNX Runtime's outputs at compile time; the package has no "
               "model.onnx)")
    print(f"via: {report.via}" + (" (the CPU twin of the CUDA schedules: no GPU here)"
                                  if report.via == "cuda-schedules-on-cpu" else "")
          + f"; against {against}")
    for o in report.outputs:
        floor = ("" if report.min_cosine is None
                 else f" (bf16 kernels: or >= {report.min_cosine})")
        print(f"{'ok  ' if o['ok'] else 'FAIL'} {o['name']}: max abs err {o['max_abs_err']:.3g} "
              f"(bound {o['bound']:.3g}), cosine {o['cosine']:.6f}{floor}")
    if not report.ok:
        print(f"validation failed: max abs err {report.max_abs_err:.3g}", file=sys.stderr)
        return 10
    print("library matches ONNX Runtime" + (" (its reference pair)"
                                            if report.against == "reference" else ""))
    return 0


def _rpc_kwargs(args) -> dict:
    """``--rpc`` / ``--key`` / ``--rpc-timeout`` as API keywords."""
    return {"rpc": args.rpc, "key": args.key, "rpc_timeout": args.rpc_timeout}


def cmd_devices(args) -> int:
    from sparsec.remote import devices

    rows = devices(args.rpc)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"tracker {args.rpc}: no device server registered")
        return 0
    table = [["key", "servers", "free", "busy", "pending"]]
    table += [[r["key"], str(r["servers"]), str(r["free"]), str(r["busy"]), str(r["pending"])]
              for r in rows]
    print(f"tracker {args.rpc}:")
    print(_table(table))
    return 0


def cmd_targets(args) -> int:
    # no TVM here (seconds to import): the table and the tags are data (sparsec.targets)
    from sparsec.targets import listing
    from sparsec.targets.tags import CPU_TAGS, GPU_TAGS

    rows = [["target", "TVM target", "runs here", "description"]]
    for t in listing():
        rows.append([t["name"], json.dumps(t["tvm"]),
                     "yes" if t["runs_here"] else f"no: {t['why_not']}", t["description"]])
    print(_table(rows))
    print("\nTVM device tags, CPUs: " + ", ".join(CPU_TAGS))
    print("TVM device tags, NVIDIA GPUs: " + ", ".join(GPU_TAGS))
    print('Raw TVM target JSON works too, e.g. --target \'{"kind": "llvm", "mcpu": "znver3"}\' '
          'or \'{"kind": "cuda", "arch": "sm_86"}\'')
    return 0


def cmd_runtime(args) -> int:
    from sparsec.deploy.runtime import build_runtime

    info = build_runtime(args.target, args.output, wheel_dir=args.wheel_dir, log=_log(args))
    versions = ", ".join(f"{dist} {v}" for dist, v in info["tvm"].items())
    print(f"TVM runtime for {info['target']['name']} -> {args.output} ({versions})")
    return 0


def cmd_cmake_dir(args) -> int:
    from sparsec.deploy import CMAKE_DIR

    print(CMAKE_DIR)
    return 0


def cmd_clean(args) -> int:
    from sparsec.package import remove_stale_staging

    removed = [p for out in args.outputs for p in remove_stale_staging(out, legacy=True)]
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print("nothing to clean")
    return 0


# ----------------------------------------------------------------------------- parser
def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number, got '{text}'") from None


def _layer_ratio(text: str) -> tuple[str, float]:
    pattern, sep, ratio = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN=RATIO, got '{text}'")
    return pattern, _ratio(ratio)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsec",
        description="Compiler for pruned and sparse neural networks: prune ONNX / PyTorch models "
                    "by dependency-aware channel groups and compile them with Apache TVM.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    # the global flags are accepted after the command too ("sparsec compile ... -q"); SUPPRESS
    # keeps a subcommand's absent flag from resetting one given before the command
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress messages")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    def rpc_args(sp, what: str):
        sp.add_argument("--rpc", metavar="HOST:PORT",
                        help=f"{what} on a device server registered with the TVM RPC tracker "
                             "at HOST:PORT (docs: Remote devices)")
        sp.add_argument("--key", metavar="KEY",
                        help="with --rpc: the key the device servers registered under "
                             "(`sparsec devices --rpc HOST:PORT` lists them)")
        sp.add_argument("--rpc-timeout", type=float, metavar="SECONDS",
                        help="with --rpc: how long to wait for a free server under the key "
                             "(default 60)")

    def model_args(sp, ratio: bool, shapes_help: str = ""):
        sp.add_argument("model", help="ONNX model file" + ("" if ratio else
                                                            " (or a package directory)"))
        sp.add_argument("--input-shapes", metavar="NAME:D1xD2,...",
                        help="fix dynamic input dimensions, e.g. input_ids:1x128" + shapes_help)
        if ratio:
            sp.add_argument("--ratio", type=_ratio, default=0.0,
                            help="fraction of channels to remove from every prunable group, "
                                 "in [0, 1) (default 0: no pruning)")
            sp.add_argument("--criterion", default="l2",
                            choices=("l2", "l1", "activation", "wanda", "fluctuation"),
                            help="channel importance: l2 (default) or l1 weight magnitude; "
                                 "on the calibration data: activation (activation norm), wanda "
                                 "(|W| x activation norm), fluctuation (activation variance x "
                                 "W^2, FLAP). (taylor: sparsec.prune_module in Python)")
            sp.add_argument("--head-ratio", type=_ratio, default=None, metavar="R",
                            help="fraction of attention heads to remove (whole heads across "
                                 "Q/K/V/O; with GQA a KV head and its query heads); default: "
                                 "--ratio")
            sp.add_argument("--hidden-ratio", type=_ratio, default=0.0, metavar="R",
                            help="fraction of hidden width to remove: the residual stream "
                                 "under LayerNorms, from the embedding to the head (lossy even "
                                 "for empty channels; default 0: left whole)")
            sp.add_argument("--rotate", action="store_true",
                            help="with --hidden-ratio: rotate the hidden stream to its principal "
                                 "directions on the calibration data first and cut the weakest "
                                 "directions (SliceGPT; RMS-norm and pre-norm LayerNorm models)")
            sp.add_argument("--sensitivity", action="store_true",
                            help="spread each ratio over the model by measured cost (prune "
                                 "each group alone at a few widths on the calibration data) "
                                 "instead of applying it in every group")
            sp.add_argument("--remove-layers", type=int, default=0, metavar="N",
                            help="first remove the N consecutive residual layers that change "
                                 "the hidden state least (angular distance on the "
                                 "calibration data)")
            sp.add_argument("--replace-linear", action="store_true",
                            help="with --remove-layers: a linear map fitted on the calibration "
                                 "data stands in for the removed layers (ReplaceMe)")
            sp.add_argument("--remove-attention", type=int, default=0, metavar="N",
                            help="remove the N attention blocks that change the hidden state "
                                 "least (their FFN blocks stay)")
            sp.add_argument("--fuse-ffn", type=int, default=0, metavar="N",
                            help="fuse N consecutive FFN blocks into one wider FFN on the run's "
                                 "input (after --remove-attention, or in models with FFN runs)")
            sp.add_argument("--sparsity", type=_ratio, default=0.0, metavar="S",
                            help="zero this share of the remaining weights (see "
                                 "--sparsity-pattern)")
            sp.add_argument("--sparsity-pattern", default="unstructured", metavar="P",
                            help="unstructured, RxC blocks (e.g. 4x4) or N:M (e.g. 2:4, which "
                                 "fixes the share); default unstructured")
            sp.add_argument("--sparsity-criterion", default="magnitude",
                            choices=["magnitude", "wanda", "sparsegpt"],
                            help="|W|; |W| x input activation norm on the calibration data; or "
                                 "SparseGPT (mask and second-order weight update from the "
                                 "calibration data; unstructured and N:M)")
            sp.add_argument("--lamp", action="store_true",
                            help="layer-adaptive sparsity (LAMP scores, one global threshold) "
                                 "instead of the same share in every layer")
            sp.add_argument("--reorder", action="store_true",
                            help="permute channels so nonzero weights cluster into dense 4x4 "
                                 "blocks (exact; for models whose weights are sparse)")
            sp.add_argument("--layer-ratio", action="append", default=[], type=_layer_ratio,
                            metavar="PATTERN=R",
                            help="ratio for the groups whose source weights match a glob (as "
                                 "`inspect` lists them), e.g. 'block1.*=0.5'; repeatable, first "
                                 "match wins")
            sp.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                            help="leave groups whose source weights match this glob whole "
                                 "(and matching weights dense under --sparsity); repeatable")
            sp.add_argument("--round-to", type=int, default=None, metavar="N",
                            help="round kept channel counts up to a multiple of N (compile: "
                                 "the target's channel multiple by default, 8 on x86; "
                                 "prune: 1)")
            sp.add_argument("--reconstruct", action="store_true",
                            help="refit the layers that read removed channels by least squares "
                                 "on the calibration data (recovers most of the accuracy)")
            sp.add_argument("--calib", metavar="X.npz",
                            help="calibration inputs by input name, optionally stacked on a "
                                 "leading axis; fitted on (--reconstruct) and measured on "
                                 "(every 4th batch held out); default: seeded random inputs")
            sp.add_argument("--calib-mask", metavar="NAME",
                            help="input that marks real positions (1) and padding (0): padded "
                                 "positions are left out of fits, statistics and fidelity "
                                 "(default: an input called attention_mask; 'none': off)")
            sp.add_argument("--max-drop", type=float, default=None, metavar="D",
                            help="find the largest ratio (up to --ratio, or 0.9) whose held-out "
                                 "cosine stays within D of 1, by bisection (about 6 prunes)")
            sp.add_argument("--remove-dead", action="store_true",
                            help="first remove channels that provably carry zero (exact)")
            sp.add_argument("--recipe", metavar="R.toml",
                            help="the pruning options as a recipe file ([prune] table; "
                                 "flags given beside it override its keys)")

    sp = command("inspect", help="ops, params, MACs and channel groups of a model; "
                                        "or a compiled package's manifest")
    model_args(sp, ratio=False)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--recipe", action="store_true",
                    help="a package's recipe as a TOML file, to run again (compile --recipe)")
    sp.set_defaults(func=cmd_inspect)

    def budget_args(sp):
        sp.add_argument("--latency-budget", type=float, metavar="MS",
                        help="instead of pruning at --ratio, find the least pruning (up to "
                             "--ratio, or 0.9) whose latency, built and measured here for "
                             "--target, is at most MS, by bisection (about 7 builds; targets "
                             "that run on this machine). With --sensitivity: per-group widths "
                             "from a measured latency table (4 builds a group) and a knapsack "
                             "on fidelity lost per ms saved")
        sp.add_argument("--speedup", type=float, metavar="X",
                        help="like --latency-budget, with the budget the dense model's "
                             "measured latency / X")

    sp = command("prune", help="prune a model and write the pruned ONNX")
    model_args(sp, ratio=True, shapes_help="; a model with dynamic dims is pruned at this "
               "size (default: the calibration data's, shorter samples padded) and keeps "
               "its dynamic dims")
    sp.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    budget_args(sp)
    sp.add_argument("--target", default="host",
                    help="with --latency-budget / --speedup: the target whose builds are timed "
                         "(default host; one that runs on this machine)")
    sp.add_argument("--eval-tokens", metavar="X.npy",
                    help="for a causal language model (token ids in, logits out): evaluation "
                         "text as token ids (.npy rows, or .npz with input_ids); reports its "
                         "perplexity before and after pruning")
    sp.add_argument("--hf-config", metavar="config.json",
                    help="the model's Hugging Face config (a model exported with torch.onnx): "
                         "writes the pruned model's (head counts, intermediate and hidden "
                         "size, layer count) as config.json beside the output")
    sp.set_defaults(func=cmd_prune)

    sp = command("compile", help="prune + compile + package for a target")
    model_args(sp, ratio=True)
    sp.add_argument("-o", "--output", required=True, metavar="DIR", help="package directory")
    sp.add_argument("--target", default="host",
                    help="target to compile for (default: host; `sparsec targets` lists them)")
    sp.add_argument("--name", metavar="NAME",
                    help="model name, a C identifier: names NAME.h, libNAME.a and the symbols "
                         "(default: from the output directory's name)")
    sp.add_argument("--tune", type=float, default=0.0, metavar="SECONDS",
                    help="first time the pruned model's kernel variants on this machine for up "
                         "to SECONDS and keep the fastest (tuning cache); default 0: use what "
                         "earlier tuning recorded, defaults elsewhere")
    sp.add_argument("--precision", choices=("fp32", "tf32", "bf16"),
                    help="bf16 lets kernels round their inputs to bf16 where that is faster: "
                         "AMX tiles (CPUs with AMX), tensor cores and sparse tensor cores for "
                         "2:4 weights (CUDA sm_80+); tf32 (CUDA) runs matmuls by a weight on "
                         "tensor cores with inputs rounded to tf32; fp32 keeps every kernel "
                         "exact. Lossy precisions are checked with their tolerance. Default: "
                         "the target's (tf32 for CUDA targets, bf16 for x86-amx, else fp32)")
    sp.add_argument("--denormals", choices=("flush", "keep"), default="flush",
                    help="CPU targets: flush (default) runs each call with subnormal floats "
                         "(under 1.2e-38) read and written as zero, as TensorFlow and OpenVINO "
                         "do, since each one costs the core a microcode assist (a model full of "
                         "them ran 4x slower); keep leaves the CPU's float modes alone")
    sp.add_argument("--profile", action="store_true",
                    help="measure each kernel's share of a call on this CPU into the manifest "
                         "(targets that run here; `sparsec profile DIR` does it later)")
    budget_args(sp)
    rpc_args(sp, "with --tune: time the kernels")
    sp.add_argument("--keep-onnx", action="store_true",
                    help="also put the pruned model.onnx in the package (a second copy of the "
                         "weights the library holds; for ONNX Runtime and validate on new "
                         "inputs; always with --dynamic)")
    sp.add_argument("--cuda-graph", action="store_true",
                    help="CUDA targets: capture the model's kernel launches as CUDA graphs at "
                         "the first call and replay them after (one launch instead of one per "
                         "kernel; speed-up not measured yet: no GPU lent); without a GPU the "
                         "package's check runs them eagerly on its CPU twin")
    sp.add_argument("--dynamic", metavar="DIM=MIN..MAX,...",
                    help="one package for every size in these ranges of the model's named "
                         "input dims (its ONNX dim_params), e.g. "
                         "batch_size=1..32,sequence_length=1..512; checked against ONNX "
                         "Runtime at both ends and the middle; pruning options prune it "
                         "first at the sizes of the calibration data (--calib)")
    sp.set_defaults(func=cmd_compile)

    sp = command("sweep", help="fidelity against measured latency over a series of ratios: "
                               "a table and a picture")
    model_args(sp, ratio=False)
    sp.add_argument("-o", "--output", required=True, metavar="DIR",
                    help="directory for sweep.json, sweep.md and sweep.svg")
    sp.add_argument("--target", default="host",
                    help="target to time on (one that runs on this machine; default: host)")
    sp.add_argument("--ratios", default="0,0.125,0.25,0.375,0.5,0.625",
                    help="comma-separated ratios (default: %(default)s)")
    sp.add_argument("--criterion", default="l2", help="channel importance (as in prune)")
    sp.add_argument("--reconstruct", action="store_true",
                    help="refit the consumers of removed channels (as in prune)")
    sp.add_argument("--sensitivity", action="store_true",
                    help="also each ratio spread by measured sensitivity: a second curve")
    sp.add_argument("--latency-aware", action="store_true",
                    help="also per-group widths chosen from a measured latency table at each "
                         "uniform ratio's latency (as compile --latency-budget --sensitivity)")
    sp.add_argument("--calib", metavar="X.npz", help="calibration inputs (as in prune)")
    sp.set_defaults(func=cmd_sweep)

    sp = command("profile", help="where a model's time goes on this CPU, kernel by "
                                        "kernel (a package or a model)")
    sp.add_argument("model", help="ONNX model file or a package directory")
    sp.add_argument("--input-shapes", metavar="NAME:D1xD2,...",
                    help="fix dynamic input dimensions, e.g. input_ids:1x128")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_profile)

    sp = command("tune", help="time each kernel's schedule variants on this machine (or on "
                              "remote devices, --rpc) and record the fastest for compile "
                              "(tuning cache)")
    sp.add_argument("model", help="ONNX model file or a package directory")
    sp.add_argument("--input-shapes", metavar="NAME:D1xD2,...",
                    help="fix dynamic input dimensions, e.g. input_ids:1x128")
    sp.add_argument("--target", default="host",
                    help="a target of this machine (default host), or with --rpc the "
                         "devices' (e.g. aarch64)")
    sp.add_argument("--budget", type=float, default=60.0, metavar="SECONDS",
                    help="time limit for timing kernels (default 60); the whole-model check "
                         "after it adds two compiles and a few seconds")
    sp.add_argument("--keep-all", action="store_true",
                    help="keep the fastest variants even when the whole model does not get "
                         "faster with them (by default it is timed with and without them)")
    rpc_args(sp, "time the kernels (all servers under the key at once; any CPU target)")
    sp.set_defaults(func=cmd_tune)

    sp = command("devices", help="the device servers a TVM RPC tracker has: per key, how many, "
                                 "free, busy, and requests waiting")
    sp.add_argument("--rpc", required=True, metavar="HOST:PORT",
                    help="the tracker's address")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_devices)

    sp = command("targets", help="the targets compile knows, with their TVM targets")
    sp.set_defaults(func=cmd_targets)

    sp = command("runtime", help="the TVM runtime (libraries, headers, C API source) "
                                        "a C/C++ program needs, for a target")
    sp.add_argument("--target", default="host", help="host (default) or a cross target")
    sp.add_argument("-o", "--output", required=True, metavar="DIR")
    sp.add_argument("--wheel-dir", metavar="DIR",
                    help="take the cross target's apache-tvm / apache-tvm-ffi wheels from here "
                         "instead of downloading them")
    sp.set_defaults(func=cmd_runtime)

    sp = command("cmake-dir", help="print the directory of sparsecConfig.cmake (for "
                                          "-Dsparsec_DIR=...)")
    sp.set_defaults(func=cmd_cmake_dir)

    sp = command("clean", help="remove what interrupted runs left beside outputs "
                                      "(staging directories no live run owns)")
    sp.add_argument("outputs", nargs="+", metavar="OUT", help="an output path given to -o")
    sp.set_defaults(func=cmd_clean)

    sp = command("run", help="run a compiled package on inputs")
    sp.add_argument("package", metavar="DIR")
    sp.add_argument("--inputs", required=True, metavar="X.npz", help="arrays keyed by input name")
    sp.add_argument("--outputs", metavar="Y.npz", help="write the outputs here")
    rpc_args(sp, "run the library")
    sp.set_defaults(func=cmd_run)

    sp = command("validate", help="compiled library vs ONNX Runtime on the pruned model (its "
                                  "reference pair, for a package without model.onnx)")
    sp.add_argument("package", metavar="DIR")
    sp.add_argument("--inputs", metavar="X.npz",
                    help="inputs (default: seeded random; packages with model.onnx)")
    sp.add_argument("--rtol", type=float, help="relative tolerance (of max |ref|; default: "
                    "the package's, 1e-4, or 3e-2 with bf16 kernels)")
    sp.add_argument("--atol", type=float, help="absolute tolerance (default: the package's)")
    sp.add_argument("--seed", type=int, default=None,
                    help="seed of the random inputs (default 0; packages with model.onnx)")
    rpc_args(sp, "run the library (ONNX Runtime runs here)")
    sp.set_defaults(func=cmd_validate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(map(str, argv)) if argv is not None else sys.argv[1:]  # for the manifest
    if args.version:
        from sparsec import __version__
        print(f"sparsec {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except SparsecError as e:
        print(f"sparsec: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sparsec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:            # `sparsec inspect ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # a bug in sparsec: keep the user's screen clean unless --debug
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"sparsec: internal error: {type(e).__name__}: {first[:300]} "
              f"(re-run with --debug for the traceback)", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
