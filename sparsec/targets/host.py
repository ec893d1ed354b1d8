"""CPU back end: static-shaped ONNX model -> shared library (and static archive) with baked-in
weights, and a runner.

Pipeline (compare ``tvm/relax/backend/cpu_generic/pipeline.py``, the "zero" default):
  from_onnx -> SparsecSafeTake (Gather wraps run-time indices: never out of bounds)
  -> SparsecKernelRewrite (our kernels, weights packed) -> DeadCodeElimination
  -> SparsecFastSigmoid (sigmoid as 1 / (1 + exp(-x)))
  -> FastMathTransform (softmax, exp, erf, tanh)
  -> LegalizeOps (ours first: isnan as a bit test, ``legalize_isnan``) -> AnnotateTIROpPattern
  -> FoldConstant -> FuseOps -> FuseTIR
  -> SparsecFallbackSchedule (every PrimFunc not already scheduled)
  -> SparsecSerialSmallModels (a model with little work runs serially: parallel.py)
  -> SparsecFlushDenormals (each call with subnormals flushed to zero: denormals.py)
  -> the default dataflow-lowering and finalization passes
  -> SparsecNoaliasShapeFunc (dynamic shapes: keeps LLVM's noalias on every kernel)
  -> TVM's TIR pipeline, small kernel scratch buffers kept on the stack (scratch.py) -> LLVM.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sparsec import progress
from sparsec.targets import TargetSpec
# the back-end interface's names, re-exported: callers and tests reach them as host.X
from sparsec.targets.backend import (_ALIGN, Runner, _flatten, _input_dtypes,
                                     _relax_function_pass, atomic_path, compile_facts,
                                     conv1d_as_conv2d, export_library, graph_input_names,
                                     import_onnx, load_library, native_stderr_to, request_amx,
                                     rewrite_pass, safe_take_pass)
from sparsec.targets.denormals import arch, flush_pass, is_mode_switch
from sparsec.targets.kernels import FALLBACK
from sparsec.targets.kernels.common import STRATEGY_ATTR
from sparsec.targets.knobs import Cache, using
from sparsec.targets.scratch import tir_pipeline

if TYPE_CHECKING:
    import onnx
    from tvm import ir


#: how the Relax VM runs ``main``: "compiled" (TIR calling the kernels) or "bytecode"
EXEC_MODE = "compiled"


def _count_strategies(mod: "ir.IRModule") -> dict[str, int]:
    """Kernel calls in the Relax functions, per strategy of the PrimFunc they call."""
    from tvm import relax, tirx

    counts: Counter[str] = Counter()

    def visit(expr) -> None:
        if (isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir"
                and isinstance(expr.args[0], relax.GlobalVar)):
            func = mod[expr.args[0]]
            if isinstance(func, tirx.PrimFunc) and not is_mode_switch(func):
                attrs = func.attrs or {}
                counts[str(attrs[STRATEGY_ATTR]) if STRATEGY_ATTR in attrs else FALLBACK] += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return dict(sorted(counts.items()))


def sigmoid_pass():
    """Relax pass: ``sigmoid(x)`` as ``1 / (1 + exp(-x))``, so that FastMathTransform then
    makes the exponential TOPI's vectorizable ``fast_exp``: the ``sigmoid`` intrinsic lowers
    to libm's scalar ``expf`` per element, which made SiLU / Swish (EfficientNet, MobileViT)
    and SE gates cost more than the convolutions around them. Large ``|x|`` stays exact
    enough: ``fast_exp`` clamps its argument to +-88, so the result is 0 or 1 to within 1e-38."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Sigmoid(relax.PyExprMutator):
        def visit_call_(self, call: "relax.Call") -> "relax.Expr":
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.sigmoid":
                x = call.args[0]
                one = relax.const(1.0, str(x.ty.dtype))
                e = self.builder_.emit(relax.op.exp(relax.op.negative(x)))
                return relax.op.divide(one, self.builder_.emit(relax.op.add(one, e)))
            return call

    return _relax_function_pass(Sigmoid, "SparsecFastSigmoid")


#: IEEE bit patterns: (integer type of the same width, sign mask's complement, +inf)
_FLOAT_BITS = {"float16": ("int16", 0x7FFF, 0x7C00), "float32": ("int32", 0x7FFFFFFF, 0x7F800000),
               "float64": ("int64", 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def legalize_isnan(bb: "relax.BlockBuilder", call: "relax.Call") -> "relax.Expr":
    """``isnan(x)`` as an integer test of its bits, ``(bits & ~sign) > bits(+inf)``: TVM
    lowers the ``isnan`` intrinsic one lane at a time, which made the vectorized
    ``where(isnan(softmax), 0, softmax)`` that torch's dynamo exporter writes after every
    attention softmax 2.4-2.7x slower than the softmax alone (12x128x128, one thread: 271 ->
    113 us). ``x != x`` vectorizes but LLVM's fast-math flags fold it to false."""
    from tvm import te, tirx, topi

    x = call.args[0]
    dtype = str(x.ty.dtype)
    if dtype not in _FLOAT_BITS:
        return bb.call_te(topi.isnan, x, primfunc_name_hint="tir_isnan")
    itype, magnitude, inf = _FLOAT_BITS[dtype]

    def isnan_bits(t):
        return te.compute(t.shape, lambda *i: tirx.bitwise_and(
            tirx.reinterpret(itype, t(*i)), tirx.const(magnitude, itype))
            > tirx.const(inf, itype), name="isnan")
    return bb.call_te(isnan_bits, x, primfunc_name_hint="tir_isnan")


def legalize_relu(bb: "relax.BlockBuilder", call: "relax.Call") -> "relax.Expr":
    """ReLU as ``max(0, x)``, the bound first, so that a NaN stays NaN as in ONNX Runtime
    (TOPI's ``max(x, 0)`` is LLVM's ``select(x > 0, x, 0)``: a NaN became 0, and a model that
    overflowed inside gave finite outputs): Clip's lower bound at 0."""
    from sparsec.targets.kernels.common import clip_bound

    return bb.call_te(clip_bound, call.args[0], 0, 0, primfunc_name_hint="relu")


def noalias_shape_func_pass():
    """Module pass: mark the PrimFuncs of one buffer that lack ``tirx.noalias`` (the shape
    function Relax writes for a model with symbolic shapes) as such; one buffer cannot alias.

    TVM 0.27 compiles every function of a module without ``noalias`` pointers once any one
    function lacks the attribute: the kernels' compute scopes are then inlined and their
    accumulators, in a work buffer LLVM must assume may alias the inputs, are stored back
    after every multiply-add (conv kernels of a dynamic-batch CNN ran 2-2.4x slower than the
    same kernels in a fixed-shape package)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="SparsecNoaliasShapeFunc")
    def _pass(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        for gv, func in list(mod.functions_items()):
            if (isinstance(func, tirx.PrimFunc) and "tirx.noalias" not in func.attrs
                    and sum(p.dtype == "handle" for p in func.params) <= 1):
                mod[gv] = func.with_attr("tirx.noalias", True)
        return mod

    return _pass


def build_pipeline(target: "object", cores: int, decisions: list[dict],
                   counts: dict[str, int], denormals: str = "flush"):
    """The Relax pipeline with our kernels and schedules (see module docstring)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from sparsec.targets.kernels.fallback import fallback_pass
    from sparsec.targets.parallel import serial_small_models_pass

    @tvm.transform.module_pass(opt_level=0, name="SparsecRecordKernels")
    def record(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        counts.update(_count_strategies(mod))
        return mod

    @tvm.transform.module_pass(opt_level=0, name="SparsecPipeline")
    def _pipeline(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        with target:
            seq = tvm.transform.Sequential(
                [safe_take_pass(),
                 rewrite_pass(cores, decisions), relax.transform.DeadCodeElimination(),
                 # softmax / exp / erf / tanh left over (sigmoid as exp): TOPI's rational
                 # approximations, which vectorize (LLVM calls libm's scalar expf / erff
                 # otherwise)
                 sigmoid_pass(), relax.transform.FastMathTransform()]
                + cpu.library_dispatch_passes(target)
                # our legalizations first; TVM's LegalizeOps then finds the rest
                + [relax.transform.LegalizeOps({"relax.isnan": legalize_isnan,
                                                "relax.nn.relu": legalize_relu})]
                + cpu.legalize_passes(target)
                + [fallback_pass(target), serial_small_models_pass()]
                + ([flush_pass(target)] if denormals == "flush" else [])
                # counted once reshapes that only relabel memory have become views
                + cpu.dataflow_lower_passes(target)[:1] + [record]
                + cpu.dataflow_lower_passes(target)[1:]
                + cpu.finalize_passes(target) + [noalias_shape_func_pass()]
            )
            return seq(mod)

    return _pipeline


def compile_onnx(model: "onnx.ModelProto", target: TargetSpec, lib_path: str | Path,
                 log: Callable[[str], None] = print, *, static_lib: str | Path | None = None,
                 system_lib_prefix: str = "", tuned: "bool | Cache" = True,
                 precision: str | None = None,
                 upper_bounds: dict[str, int] | None = None, denormals: str = "flush") -> dict:
    """Compile a static-shaped ONNX model to a shared library at ``lib_path``, and with
    ``static_lib`` also to a static archive for system-lib linking, whose symbols and VM
    executable register under ``system_lib_prefix`` (so that several models link into one
    program).

    Weights are baked into the libraries. The Relax pipeline runs once; code generation runs
    once per library. Cross targets link with their toolchain (``target.tool``). Each file is
    written to a temporary name in its directory and moved into place, so none is ever half
    written. Returns facts for the manifest: TVM version, target dict, kernel calls per
    strategy, the per-op strategy decisions (with the cost rule's estimates), and the
    input/output names in call order.

    With ``tuned`` (the default) kernels recorded in the tuning cache (``sparsec tune``,
    ``targets/tuning.py``; or in the ``Cache`` given, ``targets/knobs.py``) are built with their
    measured-best knobs.

    ``precision`` ("fp32", "bf16"; default: the target's, ``TargetSpec.precision``) says
    whether kernels that round their inputs to bf16 (AMX tiles) may be chosen.

    ``denormals``: "flush" (the default) runs each call with subnormal floats flushed to zero
    on x86 and AArch64 (``targets/denormals.py``: subnormals cost a microcode assist per
    operation); "keep" leaves the CPU's floating-point modes alone.

    CPU targets only: a CUDA target is compiled by :func:`sparsec.targets.cuda.compile_onnx`
    (no static archive); the caller picks the back end by ``target.device``.
    """
    if target.device != "cpu":
        raise ValueError(f"the host back end compiles for CPUs; target {target.name} is "
                         f"{target.device} (sparsec.targets.cuda.compile_onnx)")
    import tvm
    from tvm import relax

    tvm_target = tvm.target.Target(dict(target.tvm_target))
    cores = int(target.tvm_target.get("num-cores", os.cpu_count() or 1))
    log(f"importing ONNX graph ({len(model.graph.node)} nodes) into Relax")
    mod = import_onnx(model)
    if upper_bounds:
        mod = _with_upper_bounds(mod, upper_bounds)
    decisions: list[dict] = []
    counts: dict[str, int] = {}
    log(f"compiling for {target.name} ({target.description})")
    from sparsec.targets.kernels import common

    cache = tuned if isinstance(tuned, Cache) else Cache() if tuned else None
    with native_stderr_to(log), progress.reporting(log):
        with tvm_target, using(cache, dict(target.tvm_target)), (
                common.precision(precision or target.precision)):
            lowered = build_pipeline(tvm_target, cores, decisions, counts, denormals)(mod)
        if any("tuned" in d for d in decisions):
            log(f"{sum('tuned' in d for d in decisions)} kernels built with tuned knobs "
                f"({cache.path})")
        log("generating machine code (LLVM)" + (", twice: a library and a static archive"
                                                if static_lib is not None else ""))
        # "compiled": the VM's calling sequence is machine code, not bytecode the VM
        # interprets per instruction (MobileNetV2's ~280 instructions a call)
        ex = relax.build(lowered, tvm_target, relax_pipeline=None, exec_mode=EXEC_MODE,
                         tir_pipeline=tir_pipeline())
        # the module attribute alone makes codegen emit a system lib; relax.build's own
        # system_lib=True path reads the attribute back, which fails for strings shorter
        # than 8 bytes in TVM 0.27 (ffi.SmallStr is not an Object)
        static = None if static_lib is None else relax.build(
            _system_lib(lowered, system_lib_prefix), tvm_target, relax_pipeline=None,
            exec_mode=EXEC_MODE, tir_pipeline=tir_pipeline())
    memory = _planned_memory(lowered, upper_bounds) if upper_bounds else None
    if memory is not None:
        log(f"memory: {memory['planned_bytes']:,} bytes of intermediates planned at the "
            f"largest sizes, reused by every call")
    export_library(ex, target, lib_path)
    log(f"library {Path(lib_path).stat().st_size:,} bytes; kernels: {counts}")
    if static is not None:
        with atomic_path(static_lib) as tmp:
            _export_archive(static, tmp, target.tool("ar"))
        log(f"static archive {Path(static_lib).stat().st_size:,} bytes "
            f"(symbol prefix '{system_lib_prefix}')")
    facts = compile_facts(model, target, counts, decisions)
    facts["denormals"] = "flush" if denormals == "flush" and arch(tvm_target) else "keep"
    if memory is not None:
        facts["memory"] = memory
    return facts


def _planned_memory(mod: "ir.IRModule", bounds: dict[str, int]) -> dict:
    """What the memory planner left in ``main`` (lowered for the VM): the buffers of constant
    size that hold the intermediates (their bytes: the workspace at the largest sizes), and
    the allocations sized per call (the outputs, which go to the caller)."""
    import tvm
    from tvm import relax

    sizes, per_call = [], 0

    @relax.expr_functor.visitor
    class Storage(relax.PyExprVisitor):
        def visit_call_(self, call: "relax.Call") -> None:
            nonlocal per_call
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.vm.alloc_storage":
                size = call.args[0]
                if isinstance(size, relax.ShapeExpr) and all(
                        isinstance(v, tvm.tirx.IntImm) for v in size.values):
                    sizes.append(int(size.values[0]))
                else:
                    per_call += 1
            super().visit_call_(call)

    Storage().visit_expr(mod["main"])
    return {"planned_bytes": sum(sizes), "planned_buffers": len(sizes),
            "per_call_allocations": per_call, "at": dict(sorted(bounds.items()))}


def _with_upper_bounds(mod: "ir.IRModule", bounds: dict[str, int]) -> "ir.IRModule":
    """``mod`` whose Relax functions know the largest size of each dynamic dim: Relax's memory
    planner then plans every intermediate at those sizes, as buffers of constant size that
    each call reuses, instead of one allocation per distinct shape (which the VM's pooled
    allocator keeps: a package run at many sizes would hold a block for each)."""
    import tvm
    from tvm import relax

    funcs = {gv: (f.with_attr("tir_var_upper_bound", {k: int(v) for k, v in bounds.items()})
                  .with_attr("tir_non_negative_var", list(bounds))
                  if isinstance(f, relax.Function) else f) for gv, f in mod.functions_items()}
    return tvm.IRModule(funcs, attrs=mod.attrs)


def _system_lib(mod: "ir.IRModule", prefix: str) -> "ir.IRModule":
    """``mod`` for a system lib whose symbols carry ``prefix``, so that several models link
    into one program. The module attribute makes codegen register the library under the
    prefix; the kernels register under their ``global_symbol``, which TVM leaves unprefixed
    (every model would define ``__tvm_ffi_dense_packed``), so it is prefixed here. The VM still
    calls them by name: the system library looks names up with the prefix first."""
    import tvm
    from tvm import tirx

    funcs = {gv: (f.with_attr("global_symbol", prefix + gv.name_hint)
                  if isinstance(f, tirx.PrimFunc) else f) for gv, f in mod.functions_items()}
    return tvm.IRModule(funcs, attrs=mod.attrs).with_attr("system_lib_prefix", prefix)


def _export_archive(ex, path: Path, ar: str) -> None:
    """A system-lib executable as a static archive: TVM exports its objects (kernels, and the
    packed VM executable) as a tar; ``ar`` in deterministic mode (no timestamps or owners)
    archives them in a fixed order, so the same model gives the same bytes."""
    import subprocess
    import tarfile

    with tempfile.TemporaryDirectory() as work:
        tar = Path(work) / "objects.tar"
        ex.export_library(str(tar))
        objects = []
        with tarfile.open(tar) as t:
            # TVM's tar holds flat object files; read those members only (no paths, links or
            # devices), which needs no ``extractall(filter=...)`` (Python >= 3.11.4 only)
            for member in t.getmembers():
                if member.isfile() and member.name.endswith(".o") and "/" not in member.name:
                    (Path(work) / member.name).write_bytes(t.extractfile(member).read())
                    objects.append(member.name)
        objects.sort()
        path.unlink(missing_ok=True)  # ar appends to an existing archive
        subprocess.run([ar, "rcsD", str(path), *objects], cwd=work, check=True,
                       capture_output=True)
