"""Compiling: prune, build the library for a target (``sparsec/targets/``: the host CPU back
end or CUDA), check its reference pair against ONNX Runtime, and write the package directory
(``sparsec.package``). Also ``tune`` (the kernel tuner) and ``profile`` (where the time goes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from sparsec import reference
from sparsec.errors import BadOptionError, ToolchainError
from sparsec.frontends.external_data import save_onnx
from sparsec.frontends.onnx import InputShapes
from sparsec.ir.graph import Graph
from sparsec.ir.onnx_io import to_onnx
from sparsec.loading import Log, ModelLike, _quiet, load
from sparsec.package import (FORMAT, LIBRARY, MANIFEST, MODEL, Package, archive_name,
                             check_writable_dir, file_hashes, header_name, seal, sha256,
                             staging_dir, write_json, write_reference)
from sparsec.pruning import _check_ratio, as_recipe, merge_recipe, prune
from sparsec.reference import signature
from sparsec.running import (_compare, _load_runner, _raise_if_mismatch, device_rtol,
                             kernel_precision, min_cosine, tolerance, uses_bf16)
from sparsec.targets.kernels.common import PRECISIONS


def version() -> str:
    try:
        return metadata.version("sparsec")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def manifest_head(name: str, spec, command, model, source: str, inputs: list[dict],
                  outputs: list[dict]) -> dict:
    """The first keys of every package's manifest: format, versions, target, command, source
    and signature."""
    return {
        "format": FORMAT,
        "name": name,
        "sparsec_version": version(),
        "versions": {dist: _dist_version(dist) for dist in
                     ("apache-tvm", "onnx", "onnxruntime", "numpy", "torch")},
        "target": {"name": spec.name, "tvm": spec.tvm_target, "triple": spec.triple},
        "command": list(command) if command is not None else ["sparsec.compile(...)"],
        "source": _source(model, source),
        "inputs": inputs,
        "outputs": outputs,
    }


def _source(model, source: str) -> dict:
    """The manifest's record of the input model: its path and digest, and the digest of each
    external data file it names (the weights of a model over 2 GB live there)."""
    if not isinstance(model, (str, os.PathLike)):
        return {"model": source, "sha256": None}
    from sparsec.frontends.external_data import external_files

    out = {"model": source, "sha256": sha256(model)}
    data = {p.name: sha256(p) for p in external_files(model) if p.is_file()}
    return {**out, "external_data": data} if data else out


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def compile(model: ModelLike, output_dir: str | os.PathLike, *, target: str = "host",
            name: str | None = None, recipe=None,
            ratio: float = 0.0, criterion: str = "l2", reconstruct: bool = False,
            round_to: int | None = None, head_ratio: float | None = None,
            hidden_ratio: float = 0.0, rotate: bool = False,
            remove_layers: int = 0, replace_linear: bool = False, remove_attention: int = 0,
            fuse_ffn: int = 0, sensitivity: bool = False, sparsity: float = 0.0,
            sparsity_pattern: str = "unstructured", sparsity_criterion: str = "magnitude",
            lamp: bool = False, reorder: bool = False,
            layer_ratios: dict[str, float] | None = None, ignore: Sequence[str] = (),
            input_shapes: InputShapes | str | None = None,
            calibration=None, calib_mask: str | None = None, max_drop: float | None = None,
            metric: Callable[[Graph], float] | None = None, remove_dead: bool = False,
            example_inputs: Sequence[Any] | None = None, command: Sequence[str] | None = None,
            tune: float = 0.0, precision: str | None = None, profile: bool = False,
            latency_budget: float | None = None, speedup: float | None = None,
            rpc: str | None = None, key: str | None = None, rpc_timeout: float | None = None,
            keep_onnx: bool = False, dynamic: dict[str, tuple[int, int]] | str | None = None,
            cuda_graph: bool = False, denormals: str = "flush", log: Log = _quiet) -> dict:
    """Prune, compile for ``target`` and write a package directory (see ``sparsec.package``);
    returns its manifest. ``name`` (a C identifier; default: from the directory name) names
    the C header, the static archive and its symbols. ``round_to`` defaults to the target's
    channel multiple (``TargetSpec.channel_multiple``).

    The package's reference pair is one calibration batch and ONNX Runtime's outputs for it on
    the pruned model. The library must reproduce them (within the tolerance ``validate``
    uses) or nothing is written (``ValidationError``): run here, or for a cross target under
    its emulator; without one the package is written unchecked, with a warning.

    ``tune`` > 0 first spends up to that many seconds timing the pruned model's kernels (see
    :func:`tune`); kernels tuned earlier for the target are built with their best knobs
    either way. With ``rpc`` (a TVM RPC tracker's HOST:PORT) and ``key`` the kernels are
    timed on the device servers registered under that key (any CPU target, cross targets
    included; ``sparsec.remote``).

    ``profile`` (targets that run here) measures each kernel's share of a call on this CPU
    (``sparsec.profile``) into the manifest's ``profile``.

    ``latency_budget`` (ms) or ``speedup`` (x the dense model's speed), for targets that run
    here: instead of pruning at ``ratio``, find the least pruning (up to ``ratio``, or 0.9)
    whose latency, measured on this machine, is within the budget, by bisection over the
    ratio with the other options applied at each; with ``sensitivity``, per-group widths
    from a measured latency table and a knapsack on held-out fidelity lost per millisecond
    saved (``sparsec.latency``). The manifest's
    ``latency`` holds the asked, the measured (the package's own library) and the dense
    latency and every ratio tried; its recipe holds the ratio chosen.

    ``keep_onnx`` puts the pruned model in the package too (``model.onnx``, its weights in
    ``model.onnx.data`` beside it when large): a second copy of the weights, which the library
    holds already, for ONNX Runtime and for ``validate`` on new inputs (without it,
    ``validate`` checks the library on the package's reference pair).

    ``precision`` "bf16" lets kernels that round their inputs to bf16 run where they are
    faster (AMX tiles on CPUs that have them, tensor cores and sparse tensor cores on
    sm_80+); "tf32" (CUDA targets) runs matmuls by a weight on tensor cores with inputs
    rounded to tf32. The default is the target's: tf32 for CUDA targets, bf16 for
    ``x86-amx``, else fp32. Such a package is checked with that precision's tolerance.

    ``cuda_graph`` (CUDA targets): the model's kernel launches are captured as CUDA graphs at
    the first call and replayed after (TVM's ``RewriteCUDAGraph``; the manifest's
    ``compile.cuda.cuda_graph_regions`` counts the regions). Without a GPU the package runs
    those regions eagerly on its CPU twin, so the check is the same; the speed-up is not
    measured yet.

    ``denormals`` (CPU targets): "flush" (the default) runs each call with subnormal floats
    (below 1.2e-38 in float32) read and written as zero, as TensorFlow and OpenVINO do: a
    subnormal costs the core a microcode assist per operation (``targets/denormals.py``);
    "keep" leaves the CPU's floating-point modes alone (IEEE gradual underflow).

    ``dynamic`` (``{"batch_size": (1, 32), "sequence_length": (1, 512)}`` or
    ``"batch_size=1..32,sequence_length=1..512"``; names are the model's ``dim_param``s)
    compiles an ONNX model once for every size in those ranges (``sparsec.dynamic``); it is
    checked against ONNX Runtime at both ends of each range and in the middle. Pruning
    options prune it first at the calibration data's sizes, keeping its dynamic dims
    (``sparsec.dynamic_prune``: passes that change weights only)."""
    from sparsec.targets.denormals import MODES

    if denormals not in MODES:
        raise BadOptionError(f"--denormals takes {' or '.join(MODES)}, not '{denormals}'")
    if dynamic is not None:
        from sparsec.dynamic import compile_dynamic

        if cuda_graph:
            raise BadOptionError("--cuda-graph is for CUDA targets, and --dynamic compiles "
                                 "for this machine's CPU")

        return compile_dynamic(
            model, output_dir, dynamic, target=target, name=name, precision=precision,
            denormals=denormals,
            command=command, log=log, recipe=recipe, ratio=ratio, reconstruct=reconstruct,
            head_ratio=head_ratio, hidden_ratio=hidden_ratio, rotate=rotate,
            remove_layers=remove_layers, replace_linear=replace_linear,
            remove_attention=remove_attention, fuse_ffn=fuse_ffn, sensitivity=sensitivity,
            sparsity=sparsity, lamp=lamp, reorder=reorder, layer_ratios=layer_ratios,
            input_shapes=input_shapes, calibration=calibration, max_drop=max_drop,
            metric=metric, remove_dead=remove_dead, example_inputs=example_inputs, tune=tune,
            profile=profile, latency_budget=latency_budget, speedup=speedup,
            calib_mask=calib_mask, ignore=ignore, round_to=round_to, criterion=criterion,
            sparsity_pattern=sparsity_pattern, sparsity_criterion=sparsity_criterion)
    from sparsec.deploy.header import check_name, default_name
    from sparsec.targets import resolve_target

    spec = resolve_target(target)
    name = check_name(name) if name is not None else default_name(Path(output_dir).name)
    if round_to is None and recipe is not None:
        round_to = as_recipe(recipe).round_to
    if round_to is None:
        round_to = spec.channel_multiple
    _check_ratio(ratio)
    defaulted = precision is None
    precision = precision or spec.precision
    allowed = [p for p in PRECISIONS if p != "tf32" or spec.device == "cuda"]
    if precision == "tf32" and "tf32" not in allowed:
        raise BadOptionError(f"--precision tf32 is for CUDA targets (tensor cores); target "
                             f"'{spec.name}' takes fp32 or bf16")
    if precision not in allowed:
        raise BadOptionError(f"--precision takes {', '.join(allowed[:-1])} or {allowed[-1]}, "
                             f"not '{precision}'")
    if cuda_graph and spec.device != "cuda":
        raise BadOptionError(f"--cuda-graph is for CUDA targets, not target '{spec.name}'")
    if profile and not (spec.runs_here and spec.device == "cpu"):
        raise BadOptionError(f"--profile measures on this machine's CPU; target "
                             f"'{spec.name}' does not run here")
    from sparsec.remote import Remote

    remote = Remote.of(rpc, key, rpc_timeout)
    if remote is not None and not tune > 0:
        raise BadOptionError("--rpc on compile is where --tune times the kernels: give "
                             "--tune SECONDS too")
    here = spec.runs_here or remote is not None      # where the kernels can be timed
    if tune < 0 or (tune > 0 and not (here and spec.device == "cpu")):
        raise BadOptionError(f"--tune takes a positive number of seconds, for this machine's "
                             f"CPU or a device's over --rpc (got {tune:g} for target "
                             f"'{spec.name}')")
    check_writable_dir(output_dir)
    check_toolchain(spec)
    if remote is not None:
        remote.check()     # the tracker and a device under the key, before the heavy work
    options = dict(ratio=ratio, criterion=criterion, reconstruct=reconstruct,
                   round_to=round_to, head_ratio=head_ratio, hidden_ratio=hidden_ratio,
                   rotate=rotate, remove_layers=remove_layers,
                   replace_linear=replace_linear, remove_attention=remove_attention,
                   fuse_ffn=fuse_ffn, sensitivity=sensitivity, sparsity=sparsity,
                   sparsity_pattern=sparsity_pattern, sparsity_criterion=sparsity_criterion,
                   lamp=lamp, reorder=reorder, layer_ratios=layer_ratios, ignore=ignore,
                   calib_mask=calib_mask, max_drop=max_drop, remove_dead=remove_dead)
    budget = None
    if latency_budget is not None or speedup is not None:
        from sparsec import latency

        if metric is not None:
            raise BadOptionError("metric is what max_drop bounds, not a latency budget")
        if recipe is not None:
            options = merge_recipe(recipe, options).options()
        result, budget, dense_again = latency.budget_search(
            load(model, input_shapes, example_inputs),
            {**options, "calibration": calibration}, spec, latency_budget, speedup, log)
    else:
        result = prune(model, recipe=recipe, **options, input_shapes=input_shapes,
                       calibration=calibration, metric=metric, example_inputs=example_inputs,
                       log=log)
    graph = result.graph
    from sparsec.deploy.header import c_header
    from sparsec.targets.host import compile_onnx

    inputs, outputs = signature(graph, graph.inputs), signature(graph, graph.outputs)
    source = (str(model) if isinstance(model, (str, os.PathLike))
              else f"<{type(model).__name__}>")
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(staging_dir(output_dir))
        proto = to_onnx(graph)
        if keep_onnx:
            save_onnx(proto, tmp / MODEL)
        if tune > 0:
            from sparsec.targets import tuning

            tuning.tune(proto, spec, tune, log=log, remote=remote)
        prefix = f"{name}_"
        on_cpu = spec.device == "cpu"   # CUDA packages: no static archive yet
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        emulation = None
        if on_cpu:
            facts = compile_onnx(proto, spec, tmp / LIBRARY, log=log,
                                 static_lib=tmp / archive_name(name), system_lib_prefix=prefix,
                                 precision=precision, denormals=denormals)
            if spec.amx_emulated_here and uses_bf16(facts):
                from sparsec.targets.kernels import amx

                # the same tile programs, runnable on this CPU
                log("building the AMX tile kernels with emulated tile ops for this CPU's check")
                emulation = scratch / "emulation.so"
                with amx.emulated():
                    compile_onnx(proto, resolve_target("host"), emulation, log=log, tuned=False,
                                 precision="bf16")
        else:   # without a GPU, the library runs on its kernels' CPU twin (cpu_twin.so)
            from sparsec.targets import cuda

            # a host of another CPU (Jetson): the whole model's twin, for this check only
            emulation = None if spec.native else scratch / "emulation.so"
            if defaulted and precision == "tf32":
                log("precision tf32, the CUDA default (as ONNX Runtime's and TensorRT's): "
                    "matmuls and convolutions on tensor cores with inputs rounded to tf32, "
                    "fp32 sums; --precision fp32 keeps every kernel exact")
            facts = cuda.compile_onnx(proto, spec, tmp / LIBRARY, log, emulation_lib=emulation,
                                      precision=precision, cuda_graph=cuda_graph)
        computed = kernel_precision(facts)    # what the package computes in
        lossy = computed != "fp32"
        feeds = {s["name"]: result.sample[s["name"]] for s in inputs}
        expected = reference.run(proto, feeds)
        write_reference(tmp / "reference", inputs, outputs, feeds, expected)
        rtol, atol = tolerance(facts)
        if precision != "fp32" and computed == "fp32":
            log(f"note: {'precision' if defaulted else '--precision'} {precision}"
                f"{' (the target default)' if defaulted else ''}, but no kernel computes in "
                f"{precision} for this model and target (bf16 kernels: AMX tiles on CPUs with AMX; CUDA "
                f"sm_80+: tensor cores for matmuls by a weight, tf32 or bf16); the package is "
                f"fp32")
        about = f"{Path(source).name} compiled for {spec.name} ({facts['tvm_version']})"

        def write_header(rtol: float) -> None:
            (tmp / header_name(name)).write_text(c_header(
                name, prefix, inputs, outputs, atol, rtol, about, spec.device, tmp / LIBRARY))

        write_header(rtol)
        check, via = None, "native"
        try:
            runner = _load_runner(spec, tmp, name, inputs, outputs, log, facts.get("cuda"))
        except ToolchainError as e:  # e.g. no qemu: the package is still right, just unchecked
            if emulation is None:
                log(f"warning: reference pair not checked here ({e}); check it on the device "
                    f"(sparsec_check_reference)")
                runner = None
            else:   # no AMX, or a GPU with another host: check the numerics on this CPU
                from sparsec.targets.backend import VIA_TWIN, load_library

                what, how, where = (
                    ("AMX code", "its tile programs are checked on this CPU with the tile ops "
                     "emulated", "an AMX machine") if on_cpu else
                    ("GPU code", "its schedules are checked on this CPU", "the GPU"))
                log(f"warning: the {what} is not run here ({e}); {how}, the binary on "
                    f"{where} with sparsec validate")
                runner = load_library(emulation, [s["name"] for s in inputs])
                runner.via = "amx-tiles-emulated-on-cpu" if on_cpu else VIA_TWIN
        cosine = min_cosine(facts)
        if runner is not None:
            via = runner.via
            check = _compare(outputs, expected, runner.run(feeds), rtol, atol, cosine)
            log(f"reference check ({via}): max abs err {check.max_abs_err:.3g} vs ONNX Runtime"
                + (f" ({computed} kernels: cosine "
                   f"{min(o['cosine'] for o in check.outputs):.6f})" if lossy else ""))
            _raise_if_mismatch(check, flushed=facts.get("denormals") == "flush")
            if lossy:   # the device check: the binary must match at the fidelity found here
                rtol = device_rtol(check)
                write_header(rtol)
        if budget is not None:
            from sparsec.latency import time_ms

            budget["measured_ms"] = time_ms(runner.run, feeds)
            budget["dense_ms_after"] = dense_again()
            log(f"latency: asked {budget['budget_ms']:.4g} ms, the package measures "
                f"{budget['measured_ms']:.4g} ms (dense, timed again beside it: "
                f"{budget['dense_ms_after']:.4g} ms: "
                f"{budget['dense_ms_after'] / budget['measured_ms']:.2f}x faster)")
        measured = None
        if profile:
            from sparsec.profile import profile_model, summary

            measured = profile_model(proto)
            log(f"profile: {summary(measured)}")
        manifest = {
            **manifest_head(name, spec, command, model, source, inputs, outputs),
            "library": {"shared": LIBRARY, "static": archive_name(name) if on_cpu else None,
                        "header": header_name(name),
                        "system_lib_prefix": prefix if on_cpu else None},
            "reference": {"inputs": "reference/inputs.bin", "outputs": "reference/outputs.bin",
                          "rtol": rtol, "atol": atol,
                          **({"min_cosine": cosine} if lossy else {}),
                          "from": "calibration" if calibration is not None else "random",
                          "check": None if check is None else {
                              "ok": check.ok, "max_abs_err": check.max_abs_err, "via": via,
                              "cosine": min(o["cosine"] for o in check.outputs)}},
            "files": file_hashes(tmp),
            "prune": result.report(),
            # what the package computes in, not what was allowed: bf16 or tf32 only when a
            # kernel does
            "compile": {**facts, "precision": computed,
                        **({"precision_asked": precision} if precision != computed else {})},
            **({"profile": measured} if measured is not None else {}),
            **({"latency": budget} if budget is not None else {}),
        }
        write_json(tmp / MANIFEST, seal(manifest))
    log(f"wrote {output_dir}")
    return manifest


def profile(model: ModelLike, input_shapes: InputShapes | str | None = None) -> dict:
    """Where a model's time goes on this CPU, kernel by kernel (``sparsec.profile``): a
    package directory (its pruned model, as compiled for the host) or any model."""
    from sparsec.profile import profile_model

    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        model = _package_model(Package.load(model))
    return profile_model(to_onnx(load(model, input_shapes)))


def tune(model: ModelLike, *, target: str = "host", budget: float = 60.0,
         input_shapes: InputShapes | str | None = None, check: bool = True,
         rpc: str | None = None, key: str | None = None, rpc_timeout: float | None = None,
         log: Log = _quiet) -> list[dict]:
    """Time the schedule variants of every kernel ``model`` compiles to, within ``budget``
    seconds, and record the fastest in the tuning cache that ``compile`` reads (see
    ``sparsec/targets/tuning.py``). ``model`` may be a package directory (its pruned model is
    tuned). This machine's CPU is tuned here; with ``rpc`` (a TVM RPC tracker's HOST:PORT)
    and ``key``, the kernels are built here for ``target`` and timed on every device server
    registered under that key at once, waiting up to ``rpc_timeout`` seconds for a free one
    (``sparsec.remote``); the records are stored under ``target``, where a later compile for
    it finds them. With ``check`` the whole model is then timed with and without the new
    records, which compile uses only if it got faster. Returns one record per kernel tuned,
    and the whole-model verdict."""
    from sparsec.remote import Remote
    from sparsec.targets import resolve_target, tuning

    remote = Remote.of(rpc, key, rpc_timeout)
    spec = resolve_target(target)
    if budget <= 0:
        raise BadOptionError(f"tuning budget must be positive, got {budget}")
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        model = _package_model(Package.load(model))
    proto = to_onnx(load(model, input_shapes))
    return tuning.tune(proto, spec, budget, log=log, check=check, remote=remote)


def _package_model(pkg: Package) -> Path:
    """A package's pruned model, for the commands that need one."""
    if pkg.model is None:
        raise BadOptionError(f"package {pkg.path} has no {MODEL}: compile it with --keep-onnx, "
                             f"or give the model itself")
    return pkg.model


def check_toolchain(spec) -> None:
    """The programs ``spec`` links with must be installed; fails before any heavy work."""
    import shutil

    from sparsec.targets import CROSS_PACKAGES

    for tool in (spec.tool("g++"), spec.tool("ar")):
        if shutil.which(tool) is None:
            package = CROSS_PACKAGES.get(spec.triple or "", "g++ and binutils")
            raise ToolchainError(f"target {spec.name} needs {tool}, which is not installed "
                                 f"(Debian/Ubuntu: apt install {package})")
    if spec.device == "cuda":
        from sparsec.targets.cuda_toolkit import nvcc

        nvcc()
