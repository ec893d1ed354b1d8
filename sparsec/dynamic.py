"""Compiling with dynamic shapes (``compile --dynamic batch_size=1..32,sequence_length=1..512``):
one package that runs at every size in the declared ranges.

The model's named input dims stay symbolic through Relax (``frontends/dynamic.py``: shape
computations as polynomials of the dims); the rewrite gives rows = batch x seq products to the
``dense_packed`` kernel with a run-time row count and convolutions with a run-time batch to
their static kernels built with a symbolic N, weights packed at compile time
(``kernels/rewrite.py``); everything else gets the generic schedules with symbolic extents. Nothing is padded to the maximum.

The ranges' upper ends go to Relax's memory planner (``tir_var_upper_bound``): the
intermediates live in a fixed set of buffers sized for the largest call and reused by every
call (``compile.memory`` in the manifest), not one pooled allocation per distinct size.

The package is checked against ONNX Runtime at several sizes (``check_sizes``: both ends of
every range and the middle) before it is written. Its manifest records the ranges
(``dynamic``) and each input's and output's dims (``dims``: a ``[name, min, max]`` per
dynamic axis, ``null`` for a fixed one); its ``shape`` and the reference pair are one size in
the range (the middle), the C header's ``shape`` too, beside every axis's least and largest
size for ``sparsec_run_shaped``. The pairs at the other checked sizes are stored too where
they are small (``PAIR_BYTES``; ``dynamic.checked[i].reference`` names the directory), and
``validate`` checks them beside ONNX Runtime. ``run`` and ``validate`` take any size in the
ranges and refuse one outside with ``DynamicShapeError``.

Pruning options prune the model first (``sparsec.dynamic_prune``), at the calibration data's
sizes; the pruned model keeps its dynamic dims.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from sparsec.errors import BadOptionError, DynamicShapeError
from sparsec.frontends.dynamic import Ranges, parse_dynamic, check_sizes
from sparsec.loading import Log, _quiet

#: compile options that the dynamic path does not take yet
_NOT_YET = ("input_shapes", "max_drop", "metric", "tune", "profile", "latency_budget",
            "speedup", "example_inputs")
#: pruning options: the model is pruned first (``sparsec.dynamic_prune``: weight-only passes)
_PRUNE = ("ratio", "head_ratio", "hidden_ratio", "rotate", "remove_layers", "replace_linear",
          "remove_attention", "fuse_ffn", "sensitivity", "sparsity", "sparsity_pattern",
          "sparsity_criterion", "criterion", "reorder", "layer_ratios", "recipe", "remove_dead",
          "reconstruct", "lamp", "calib_mask", "ignore", "round_to")


def refuse_options(options: dict) -> None:
    """``BadOptionError`` naming the options given that ``--dynamic`` does not take yet."""
    given = sorted(k for k in _NOT_YET if options.get(k))     # defaults are all falsy
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise BadOptionError(f"--dynamic: {flags} not supported with dynamic shapes yet")


def _prune_first(model, options: dict, log: Log):
    """The pruning that ``options`` ask for, on the dynamic model (``None`` when they ask for
    none): ``PruneResult`` whose ``onnx`` keeps the model's dynamic dims."""
    from sparsec.pruning import prune

    given = {k: v for k, v in options.items() if k in _PRUNE and v is not None}
    if not any(v for k, v in given.items() if k not in ("criterion", "sparsity_pattern",
                                                        "sparsity_criterion", "calib_mask",
                                                        "round_to")):
        return None
    if options.get("calibration") is None:
        raise BadOptionError("--dynamic prunes at the sizes of the calibration data: give "
                             "--calib")
    return prune(model, **given, calibration=options["calibration"], log=log)


def _signature(proto, values, ranges: Ranges, sizes: dict[str, int],
               index_ranges: dict | None = None) -> list[dict]:
    """``[{"name", "shape", "dtype", "dims"}]`` of ONNX value infos at ``sizes``."""
    from sparsec.ir.onnx_io import tensor_dtype

    out = []
    for v in values:
        tt = v.type.tensor_type
        dims = [None if d.HasField("dim_value") else
                [d.dim_param, *ranges[d.dim_param]] if d.dim_param in ranges else "?"
                for d in tt.shape.dim]
        shape = [d.dim_value if d.HasField("dim_value") else
                 sizes.get(d.dim_param, 0) for d in tt.shape.dim]
        spec = {"name": v.name, "shape": shape, "dtype": tensor_dtype(tt.elem_type),
                "dims": [None if d == "?" else d for d in dims]}
        if index_ranges and v.name in index_ranges:
            spec["range"] = list(index_ranges[v.name])
        out.append(spec)
    return out


def _output_signature(proto, ranges: Ranges, cases: list, mid: dict[str, int]) -> list[dict]:
    """The outputs' signature at ``mid``, read off ONNX Runtime's outputs at the check sizes
    (``cases``), so that outputs the model declares without a shape get one: an axis is the
    dim it equals at every size, fixed when it never changes, and ``"?"`` otherwise."""
    from sparsec.ir.onnx_io import tensor_dtype

    out = []
    for k, v in enumerate(proto.graph.output):
        shapes = [case[3][k].shape for case in cases]
        at_mid = next(case[3][k].shape for case in cases if case[0] == mid)
        dims = []
        for axis in range(len(at_mid)):
            seen = [shape[axis] for shape in shapes]
            name = next((n for n in sorted(ranges) if all(
                shape[axis] == case[0][n] for shape, case in zip(shapes, cases))), None)
            dims.append([name, *ranges[name]] if name else None if len(set(seen)) == 1
                        else ["?", min(seen), max(seen)])
        out.append({"name": v.name, "shape": [int(d) for d in at_mid],
                    "dtype": tensor_dtype(v.type.tensor_type.elem_type), "dims": dims})
    return out


#: a checked size's reference pair (inputs and outputs) is stored in the package when it
#: takes at most this many bytes (the middle size's always is: ``reference/``)
PAIR_BYTES = 16 << 20


def pair_dir(sizes: dict[str, int]) -> str:
    """Where the reference pair at ``sizes`` lives in a package: ``reference/NAMEVALUE_...``."""
    return "reference/" + "_".join(f"{k}{v}" for k, v in sorted(sizes.items()))


def _index_ranges(proto) -> dict[str, tuple[int, int]]:
    """Graph inputs a Gather reads as indices into a constant table: the valid values
    (``reference.index_ranges``, on the ONNX model)."""
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    inputs = {v.name for v in proto.graph.input}
    out: dict[str, tuple[int, int]] = {}
    for node in proto.graph.node:
        if (node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in inputs
                or node.input[0] not in inits):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        shape = inits[node.input[0]]
        rows = int(shape[axis % len(shape)])
        lo, hi = out.get(node.input[1], (-rows, rows - 1))
        out[node.input[1]] = (max(lo, -rows), min(hi, rows - 1))
    return out


def at_sizes(signature: list[dict], sizes: dict[str, int]) -> list[dict]:
    """``signature`` with each dynamic axis at its size in ``sizes``."""
    return [{**s, "shape": [sizes[d[0]] if d else n for n, d in zip(s["shape"], s["dims"])]}
            for s in signature]


def sizes_of(feeds: dict[str, np.ndarray], signature: list[dict]) -> dict[str, int]:
    """The size of every dynamic dim in ``feeds``; ``DynamicShapeError`` when one is outside
    its range, or two inputs disagree on it."""
    sizes: dict[str, int] = {}
    for spec in signature:
        if spec["name"] not in feeds:
            continue
        shape = np.shape(feeds[spec["name"]])
        if len(shape) != len(spec["dims"]):
            continue    # cast_input's rank error says it
        for axis, (n, dim) in enumerate(zip(shape, spec["dims"])):
            if not dim:
                continue
            name, lo, hi = dim
            if not lo <= n <= hi:
                raise DynamicShapeError(
                    f"input '{spec['name']}' has {name} = {n} (axis {axis}), outside the "
                    f"range {lo}..{hi} the package was compiled for")
            if sizes.setdefault(name, n) != n:
                raise DynamicShapeError(
                    f"inputs disagree on {name}: {sizes[name]} and {n} ('{spec['name']}' "
                    f"axis {axis})")
    return sizes


def compile_dynamic(model, output_dir: str | os.PathLike, dynamic, *, target: str = "host",
                    name: str | None = None, precision: str | None = None,
                    denormals: str = "flush", command: Sequence[str] | None = None, log: Log = _quiet,
                    **options) -> dict:
    """``sparsec.compile(..., dynamic=...)``: see the module docstring."""
    import onnx

    from sparsec import reference
    from sparsec.compiling import check_toolchain, manifest_head
    from sparsec.deploy.header import c_header, check_name, default_name
    from sparsec.frontends.dynamic import check_ranges, read_dynamic, symbolic_shapes
    from sparsec.frontends.onnx import _unsupported_ops
    from sparsec.errors import UnsupportedOpError
    from sparsec.ir.onnx_io import MAX_IR_VERSION
    from sparsec.frontends.external_data import save_onnx
    from sparsec.package import (LIBRARY, MANIFEST, MODEL, archive_name, check_writable_dir,
                                 file_hashes, header_name, seal, staging_dir, write_json,
                                 write_reference)
    from sparsec.running import _compare, _load_runner, _raise_if_mismatch, tolerance
    from sparsec.targets import resolve_target
    from sparsec.targets.host import compile_onnx

    ranges = parse_dynamic(dynamic)
    if not ranges:
        raise BadOptionError("--dynamic needs at least one NAME=MIN..MAX")
    refuse_options(options)
    spec = resolve_target(target)
    if spec.device != "cpu" or not spec.runs_here:
        raise BadOptionError(f"--dynamic compiles for this machine's CPU for now, not target "
                             f"'{spec.name}'")
    if (precision or spec.precision) != "fp32":
        raise BadOptionError("--dynamic compiles fp32 kernels only for now")
    if not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        raise BadOptionError("--dynamic takes an ONNX model (export a torch module with its "
                             "dynamic axes first: torch.onnx.export(..., dynamic_axes=...))")
    name = check_name(name) if name is not None else default_name(Path(output_dir).name)
    check_writable_dir(output_dir)
    check_toolchain(spec)
    if options.get("round_to") is None:
        options["round_to"] = spec.channel_multiple
    pruned = _prune_first(model, options, log)
    proto = read_dynamic(model if pruned is None else pruned.onnx)
    bad = _unsupported_ops(proto)
    if bad:
        raise UnsupportedOpError(bad)
    check_ranges(proto, ranges)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    log(f"dynamic dims: {', '.join(f'{k}={lo}..{hi}' for k, (lo, hi) in sorted(ranges.items()))}")
    symbolic = symbolic_shapes(proto, ranges)
    shapes = check_sizes(ranges)
    mid = shapes[1] if len(shapes) > 1 else shapes[0]
    init = {t.name for t in proto.graph.initializer}
    graph_inputs = [v for v in proto.graph.input if v.name not in init]
    inputs = _signature(proto, graph_inputs, ranges, mid, _index_ranges(proto))
    prefix = f"{name}_"
    source = str(model) if isinstance(model, (str, os.PathLike)) else "<ModelProto>"
    cases = []      # ONNX Runtime first: a size the model cannot take fails before compiling
    session = reference.session(proto)
    for i, sizes in enumerate(shapes):
        feeds = reference.random_feeds(at_sizes(inputs, sizes), seed=i)
        where = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items()))
        try:
            cases.append((sizes, where, feeds, session.run(None, feeds)))
        except Exception as e:  # noqa: BLE001 - ORT's errors: the model's own limits
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            raise DynamicShapeError(f"the model does not run at {where} in ONNX Runtime "
                                    f"({first}); narrow --dynamic") from None
    outputs = _output_signature(proto, ranges, cases, mid)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(staging_dir(output_dir))
        save_onnx(proto, tmp / MODEL)   # always: validate runs it at every checked size
        facts = compile_onnx(symbolic, spec, tmp / LIBRARY, log=log,
                             static_lib=tmp / archive_name(name), system_lib_prefix=prefix,
                             precision="fp32", denormals=denormals,
                             upper_bounds={k: hi for k, (_, hi) in ranges.items()})
        slow = sorted({d["op"] for d in facts["decisions"] if d.get("chosen") == "fallback"
                       and d["op"] in ("matmul", "conv2d", "nn.conv2d")})
        if slow:
            log(f"note: {', '.join(slow)} ops with dynamic shapes that no sparsec kernel takes "
                f"run the generic schedule (slow): a fixed shape compiles them to kernels")
        rtol, atol = tolerance(facts)
        runner = _load_runner(spec, tmp, name, inputs, outputs, log)
        checked = []
        for sizes, where, feeds, expected in cases:
            report = _compare(outputs, expected, runner.run(feeds), rtol, atol)
            log(f"reference check at {where}: max abs err {report.max_abs_err:.3g} vs ONNX "
                f"Runtime")
            _raise_if_mismatch(report, flushed=facts.get("denormals") == "flush")
            checked.append({"sizes": sizes, "max_abs_err": report.max_abs_err,
                            "cosine": min(o["cosine"] for o in report.outputs)})
            if sizes == mid:
                write_reference(tmp / "reference", inputs, outputs, feeds, expected)
                ref_check = report
            elif (sum(a.nbytes for a in [*feeds.values(), *expected]) <= PAIR_BYTES
                  and all(d is None or d[0] in sizes for o in outputs for d in o["dims"])):
                write_reference(tmp / pair_dir(sizes), at_sizes(inputs, sizes),
                                at_sizes(outputs, sizes), feeds, expected)
                checked[-1]["reference"] = pair_dir(sizes)
        about = (f"{Path(source).name} compiled for {spec.name} ({facts['tvm_version']}), "
                 f"dynamic dims at " + ", ".join(f"{k}={v}" for k, v in sorted(mid.items())))
        (tmp / header_name(name)).write_text(c_header(
            name, prefix, inputs, outputs, atol, rtol, about, spec.device, tmp / LIBRARY))
        manifest = {
            **manifest_head(name, spec, command, model, source, inputs, outputs),
            "dynamic": {"ranges": {k: list(v) for k, v in sorted(ranges.items())},
                        "reference_sizes": mid, "checked": checked},
            "library": {"shared": LIBRARY, "static": archive_name(name),
                        "header": header_name(name), "system_lib_prefix": prefix},
            "reference": {"inputs": "reference/inputs.bin", "outputs": "reference/outputs.bin",
                          "rtol": rtol, "atol": atol,
                          "from": "random",
                          "check": {"ok": ref_check.ok, "max_abs_err": ref_check.max_abs_err,
                                    "via": runner.via,
                                    "cosine": min(o["cosine"] for o in ref_check.outputs)}},
            "files": file_hashes(tmp),
            "compile": {**facts, "precision": "fp32"},
        }
        if pruned is not None:
            manifest["prune"] = pruned.report()
        write_json(tmp / MANIFEST, seal(manifest))
    log(f"wrote {output_dir}")
    return manifest
