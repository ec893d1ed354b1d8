"""CUDA back end: static-shaped ONNX model -> shared library with CUDA kernels, compiled ahead
of time with nvcc.

Pipeline: from_onnx -> SparsecSafeTake -> TVM's CUDA pipeline (LegalizeOps, FuseOps, FuseTIR,
then DLight's default GPU schedules: Matmul, GEMV, Reduction, GeneralReduction, Fallback) ->
the VM's host code (LLVM, for the target's host CPU) and one CUDA C++ source for the kernels.

Without a GPU the schedules are still checked: :func:`emulation_module` builds the same
scheduled kernels for the CPU with their thread loops run serially into ``cpu_twin.so`` (the
kernels alone, no weights), and ``model.so`` itself (its VM code and its weights) runs on this
CPU with its GPU kernels replaced by those twins (``backend.Runner``, ``via:
"cuda-schedules-on-cpu"``): ``compile`` checks the reference pair that way, and ``validate``
and ``run`` do the same with a package on a machine without a GPU.

TVM's wheel is built without the CUDA runtime: its code generator keeps the kernels as CUDA
source inside the library, and a CUDA-enabled TVM runtime compiles that source when it loads
the library (``tvm_callback_cuda_compile``). sparsec compiles the same source here with nvcc
for the target's architecture (SASS, plus PTX for newer GPUs), so the package carries:

  kernels.cu        the CUDA source of every kernel (what the library holds)
  kernels.fatbin    nvcc's build of it for the target's ``arch``
  cpu_twin.so       the same kernels for this CPU, threads serialized (above)

and :func:`serve_fatbin` answers the runtime's compile callback with the fatbin when the
source is the one it was built from: a device needs no nvcc, and what runs is what was
checked here. ptxas' per-kernel register and spill counts go to the manifest.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sparsec import progress
from sparsec.errors import UnsupportedOpError
from sparsec.targets import TargetSpec
from sparsec.targets.backend import (atomic_path, compile_facts, export_library, import_onnx,
                                     native_stderr_to, rewrite_pass, safe_take_pass)
# the toolkit's names, re-exported: the CUDA back end's public face
from sparsec.targets.cuda_toolkit import (FATBIN, NVCC_DIRS, SOURCE, TWIN, compile_callback,
                                          compile_fatbin, fatbin_entries, gencode, nvcc,
                                          nvcc_version, ptxas_resources, serve_fatbin)
from sparsec.targets.kernels.common import SCHEDULED_ATTR, STRATEGY_ATTR

if TYPE_CHECKING:
    import onnx
    from tvm import ir, tirx

STRATEGY = "dlight"


def schedule(mod: "ir.IRModule", target: "object", counts: dict[str, int],
             decisions: list[dict] | None = None) -> "ir.IRModule":
    """Relax module -> every kernel scheduled onto GPU threads (module docstring): sparsec's
    CUDA kernels where they fit (sparse weights, ``kernels/sparse_cuda.py``; the choices go to
    ``decisions``), DLight's rules for the rest. The kernels are counted into ``counts`` per
    strategy or DLight rule."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda

    with target:
        mod = tvm.transform.Sequential(
            [safe_take_pass(), rewrite_pass(1, decisions if decisions is not None else [],
                                            device="cuda"),
             relax.transform.DeadCodeElimination()]
            + cuda.library_dispatch_passes(target)
            + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
               relax.transform.FoldConstant(), relax.transform.FuseOps(),
               relax.transform.FuseTIR()])(mod)
        return apply_rules(mod, target, counts)


def apply_rules(mod: "ir.IRModule", target: "object", counts: dict[str, int]) -> "ir.IRModule":
    """DLight's default GPU rules, in TVM's order (Matmul, GEMV, Reduction, GeneralReduction,
    Fallback), on every kernel; the first rule that schedules it wins. Unlike DLight's own
    pass, a rule that fails on a kernel (GEMV asserts on some reductions in TVM 0.27) is
    passed over rather than ending the compile."""
    from tvm import tirx
    from tvm.s_tir import dlight

    rules = [dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
             dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()]
    funcs = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    with progress.Progress(progress.current(), "GPU schedules", len(funcs), "kernels") as done:
        for gv, func in funcs:
            _schedule_one(mod, gv, func, target, rules, counts)
            done.step(detail=gv.name_hint)
    return mod


def _schedule_one(mod: "ir.IRModule", gv, func: "tirx.PrimFunc", target: "object", rules: list,
                  counts: dict[str, int]) -> None:
    """One kernel of :func:`apply_rules`: ours stay as they are, the rest get the first DLight
    rule that schedules them."""
    from tvm.s_tir import Schedule

    if func.attrs.get(SCHEDULED_ATTR):     # one of ours
        name = str(func.attrs.get(STRATEGY_ATTR, "scheduled"))
        counts[name] = counts.get(name, 0) + 1
        return
    for rule in rules:
        try:
            space = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001 - a rule's own bug: try the next one
            continue
        if space is None:
            continue
        sch = space if isinstance(space, Schedule) else space[0]
        mod[gv] = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
        name = f"{STRATEGY}.{type(rule).__name__.lower()}"
        counts[name] = counts.get(name, 0) + 1
        break
    else:
        raise UnsupportedOpError(f"no GPU schedule for kernel '{gv.name_hint}' (every "
                                 f"DLight rule failed on it)")


#: the Relax functions ``RewriteCUDAGraph`` lifts out of ``main`` (``main_cuda_graph_capture``
#: ...): regions captured as one CUDA graph at the first call and replayed after
GRAPH_CAPTURE = "cuda_graph_capture"


def lower(mod: "ir.IRModule", target: "object", cuda_graph: bool = False) -> "ir.IRModule":
    """A scheduled module -> what ``relax.build`` compiles for the GPU. With ``cuda_graph``,
    TVM's ``RewriteCUDAGraph`` (in the CUDA finalize passes, switched on by the pass config
    ``relax.backend.use_cuda_graph``) lifts the static kernel launches and their memory into
    functions that the VM's CUDA runtime captures as a CUDA graph at the first call and
    replays after (``vm.builtin.cuda_graph.run_or_capture`` / ``get_cached_alloc``)."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda

    passes = tvm.transform.Sequential(cuda.dataflow_lower_passes(target)
                                      + cuda.finalize_passes(target))
    if not cuda_graph:
        with target:
            return passes(mod)
    outer = tvm.transform.PassContext.current()     # the same context, the graph pass on
    config = {**dict(outer.config), "relax.backend.use_cuda_graph": True}
    with target, tvm.transform.PassContext(opt_level=outer.opt_level, config=config):
        return passes(mod)


def graph_regions(mod: "ir.IRModule") -> int:
    """How many regions of a lowered module run as CUDA graphs (:func:`lower`)."""
    return sum(GRAPH_CAPTURE in gv.name_hint for gv in mod.get_global_vars())


# ----------------------------------------------------------------------------- CPU emulation
#: ``T.thread_binding(extent[, ...], thread="threadIdx.x"[, annotations=...])`` in TVMScript
_THREAD_LOOP = re.compile(
    r'T\.thread_binding\(((?:[^,()]+(?:\([^()]*\))?, )*)thread="[^"]+"(, annotations=)?')
#: GPU memory scopes, all plain memory on a CPU
_GPU_SCOPES = re.compile(r'scope="(shared|shared\.dyn|local|warp)"')


def serialize_threads(func: "tirx.PrimFunc") -> "tirx.PrimFunc":
    """A GPU-scheduled kernel as a CPU function: every loop bound to a GPU thread or block
    becomes a serial loop and shared or local buffers plain memory, all else unchanged.

    Each stage of a scheduled kernel (a cooperative load into shared memory, the compute, a
    cross-thread reduction) is its own thread-bound loop nest, and the barrier between stages
    sits between the nests: run serially, all threads of one stage finish before the next
    begins, which is what the barrier guarantees on the GPU. So the function computes what
    the kernel's schedule computes, on the CPU. TVM 0.27 has no Python statement mutator: the
    rewrite goes through TVMScript text and back, and fails loudly if a binding is left.
    A kernel with warp-wide instructions (``mma_cuda``, ``mma_sp_cuda``) is replaced by its
    CPU twin, whose lanes share one set of fragments."""
    import tvm

    from sparsec.targets.kernels import mma, mma_sp
    from sparsec.targets.kernels.common import STRATEGY_ATTR

    if mma_sp.TWIN_ATTR in func.attrs:   # warp-wide instructions: the kernel's CPU twin
        kernel = {mma.NAME: mma, mma_sp.NAME: mma_sp}[str(func.attrs[STRATEGY_ATTR])]
        return kernel.twin(func)
    text = func.script()
    text = _THREAD_LOOP.sub(lambda m: "T.serial(" + m.group(1)[:-2]
                            + (", annotations=" if m.group(2) else ""), text)
    text = _GPU_SCOPES.sub('scope="global"', text)
    if "thread_binding" in text or "launch_thread" in text:
        raise RuntimeError("a GPU thread binding survived serialization (a TVMScript form "
                           "sparsec does not know: a bug)")
    return tvm.script.from_source(text)


def emulation_module(scheduled: "ir.IRModule") -> "ir.IRModule":
    """The GPU-scheduled module with every kernel serialized (:func:`serialize_threads`),
    lowered for the CPU."""
    import tvm
    from tvm import tirx
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    items = list(scheduled.functions_items())
    funcs = {}
    with progress.Progress(progress.current(), "CPU twins of the GPU kernels",
                           sum(isinstance(f, tirx.PrimFunc) for _, f in items),
                           "kernels") as done:
        for gv, f in items:
            if isinstance(f, tirx.PrimFunc):
                f = serialize_threads(f)
                done.step(detail=gv.name_hint)
            funcs[gv] = f
    mod = tvm.IRModule(funcs, attrs=scheduled.attrs)
    target = tvm.target.Target({"kind": "llvm"})
    with target:
        return tvm.transform.Sequential(cpu.dataflow_lower_passes(target)
                                        + cpu.finalize_passes(target))(mod)


def tensor_core_summary(decisions: list[dict]) -> str:
    """One line of the compile report: how many matmuls and convolutions run on tensor cores,
    with which kernel and precision, and how many in fp32 without them (by whom)."""
    from collections import Counter

    # (a conv no kernel of ours took keeps the Relax op's name, "nn.conv2d")
    heavy = [d for d in decisions if d.get("op") in ("matmul", "conv2d", "nn.conv2d")]
    on = Counter(f"{d['chosen']} {d['precision']}" for d in heavy if d.get("chosen") in (
        "mma_cuda", "mma_sp_cuda"))
    off = Counter(f"{d['op'].removeprefix('nn.')} on "
                  f"{'DLight' if d.get('chosen') == 'fallback' else d['chosen']}"
                  for d in heavy if d.get("chosen") not in ("mma_cuda", "mma_sp_cuda"))

    def listed(counts: Counter) -> str:
        return ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))

    return (f"{sum(on.values())} of {len(heavy)} matmuls and convolutions"
            + (f" ({listed(on)})" if on else "")
            + (f"; fp32 without tensor cores: {listed(off)}" if off else ""))


def kernel_source(ex) -> str:
    """The CUDA source a built executable holds (its one CUDA module: TVM's source-only
    stand-in without a CUDA runtime, which answers "cuda" with the source it keeps; a real
    CUDA module, where a GPU runtime is present, keeps the source beside its binary)."""
    def walk(module):
        if module.kind == "cuda":
            for fmt in ("cuda", "cu", ""):
                source = module.inspect_source(fmt)
                if source and "__global__" in source:
                    return source
            return None
        for sub in module.imports:
            found = walk(sub)
            if found is not None:
                return found
        return None

    source = walk(ex.mod)
    if not source:
        raise RuntimeError("the CUDA build holds no kernel source")   # a TVM change: a bug
    return source


#: a kernel's definition in the CUDA source TVM generates
_ENTRY = re.compile(r'__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(')


def kernel_entries(source: str) -> list[str]:
    """The kernels (``__global__`` functions) a CUDA source defines, sorted: what nvcc compiles
    and ptxas reports. A scheduled TIR function may launch several (a softmax's reductions),
    so their number is not the number of functions scheduled."""
    return sorted(set(_ENTRY.findall(source)))


def compile_onnx(model: "onnx.ModelProto", target: TargetSpec, lib_path: str | Path,
                 log: Callable[[str], None] = print,
                 emulation_lib: str | Path | None = None, precision: str | None = None,
                 cuda_graph: bool = False) -> dict:
    """Compile ``model`` for a CUDA target: the library at ``lib_path`` and, beside it,
    ``kernels.cu``, ``kernels.fatbin`` and ``cpu_twin.so`` (module docstring). Returns the
    manifest's facts, as every back end does (:func:`sparsec.targets.backend.compile_facts`),
    with ``cuda``: arch, nvcc's version, the source's sha256, ptxas' per-kernel resources and
    the twin's file.

    The twin holds the same scheduled kernels built for this CPU with their thread loops
    serialized (:func:`emulation_module`), and no weights: where no GPU is present, model.so
    runs on it, which checks the schedules' numerics (not nvcc's code, which only a GPU
    runs). A target whose host is another CPU (a Jetson's aarch64) gets no twin: with
    ``emulation_lib`` the whole model (weights too) is built for this CPU into that library
    instead, for compile's check."""
    import tvm
    from tvm import relax

    from sparsec.targets.kernels import common

    tool = nvcc()   # before any work: a missing toolkit is the user's first error
    tvm_target = tvm.target.Target(dict(target.tvm_target))
    arch = str(target.tvm_target["arch"])
    log(f"importing ONNX graph ({len(model.graph.node)} nodes) into Relax")
    mod = import_onnx(model)
    counts: dict[str, int] = {}
    decisions: list[dict] = []
    log(f"compiling for {target.name} ({target.description}); the same schedules for this "
        f"CPU, threads serialized, to check them without a GPU")
    with native_stderr_to(log), progress.reporting(log), tvm_target, compile_callback(arch):
        with common.precision(precision or target.precision):   # bf16: mma.sp for 2:4
            scheduled = schedule(mod, tvm_target, counts, decisions)
        lowered = lower(scheduled, tvm_target, cuda_graph)
        ex = relax.build(lowered, tvm_target, relax_pipeline=None)
        twin = relax.build(emulation_module(scheduled), tvm.target.Target({"kind": "llvm"}),
                           relax_pipeline=None)
    log(f"tensor cores: {tensor_core_summary(decisions)}")
    regions = graph_regions(lowered)
    if cuda_graph:
        log(f"CUDA graphs: {regions} region(s) of main captured at the first call and replayed "
            f"after (on a GPU; without one they run eagerly on the CPU twin)")
    hints = [d["hint"] for d in decisions if "hint" in d]
    if hints:
        log(f"hint ({len(hints)} of the matmuls): {hints[0]}")
    source = kernel_source(ex)
    lib_path = Path(lib_path)
    export_library(ex, target, lib_path)
    if target.native:
        with atomic_path(lib_path.parent / TWIN) as tmp:   # kernels; weights stay in model.so
            (kernels,) = twin.mod.imports        # the executable's one library: the kernels
            kernels.export_library(str(tmp))
    if emulation_lib is not None:
        twin.export_library(str(emulation_lib))
    with atomic_path(lib_path.parent / SOURCE) as tmp:
        tmp.write_text(source)
        tmp.chmod(0o644)
    entries = kernel_entries(source)   # what nvcc compiles: a function may launch several
    log(f"nvcc: compiling {len(entries)} kernels for {arch}")
    with atomic_path(lib_path.parent / FATBIN) as tmp:
        resources = compile_fatbin(source, arch, tmp)
        tmp.chmod(0o644)
    contents = fatbin_entries((lib_path.parent / FATBIN).read_bytes())
    spilling = sorted(k for k, r in resources.items() if r["spill_bytes"])
    registers = max((r["registers"] for r in resources.values()), default=0)
    log(f"library {lib_path.stat().st_size:,} bytes, fatbin "
        f"{(lib_path.parent / FATBIN).stat().st_size:,} bytes ({', '.join(contents)}); "
        f"{len(resources)} kernels, max {registers} registers, {len(spilling)} spilling")
    return {
        **compile_facts(model, target, counts, decisions),
        "cuda": {"arch": arch, "nvcc": nvcc_version(tool), "source": SOURCE, "fatbin": FATBIN,
                 "fatbin_contents": contents,
                 "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
                 "kernels": resources, "cuda_graph_regions": regions,
                 **({"cpu_twin": TWIN} if target.native else {})},
    }
