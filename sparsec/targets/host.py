"""CPU back end: static-shaped ONNX model -> shared library (and static archive) with baked-in
weights, and a runner.

Pipeline (compare ``tvm/relax/backend/cpu_generic/pipeline.py``, the "zero" default):
  from_onnx -> SparsecSafeTake (Gather wraps run-time indices: never out of bounds)
  -> SparsecKernelRewrite (our kernels, weights packed) -> DeadCodeElimination
  -> SparsecFastSigmoid (sigmoid as 1 / (1 + exp(-x)))
  -> FastMathTransform (softmax, exp, erf, tanh) -> LegalizeOps -> AnnotateTIROpPattern
  -> FoldConstant -> FuseOps -> FuseTIR
  -> SparsecFallbackSchedule (every PrimFunc not already scheduled)
  -> SparsecSerialSmallModels (a model with little work runs serially: parallel.py)
  -> the default dataflow-lowering and finalization passes -> LLVM.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from sparsec.targets import TargetSpec, physical_cores
from sparsec.targets.kernels import FALLBACK
from sparsec.targets.kernels.common import STRATEGY_ATTR

# TVM pins its worker threads to cores by default but not the calling thread, which the OS then
# sometimes runs on a worker's core: every parallel kernel serialises (measured ~2x for whole
# runs, in bursts, on a 2-core VM). Unpinned threads avoid that. TVM reads this when its thread
# pool starts (compiling may already start it: FoldConstant runs kernels), so set it on import.
os.environ.setdefault("TVM_BIND_THREADS", "0")
# TVM's default thread count on x86 is half the logical CPUs (it assumes 2-way SMT): on a VM
# without SMT that is half the cores. One thread per physical core, unless the user says.
os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from tvm import ir

    from sparsec.targets import tuning

@contextlib.contextmanager
def native_stderr_to(log: Callable[[str], None]):
    """Route what native code (TVM's C++ logging) writes to fd 2 through ``log``, so that its
    warnings are progress messages (silenced by ``-q``) rather than stray lines on the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    log(f"tvm: {line.strip()}")


#: how the Relax VM runs ``main``: "compiled" (TIR calling the kernels) or "bytecode"
EXEC_MODE = "compiled"


def graph_input_names(model: "onnx.ModelProto") -> list[str]:
    """Graph inputs that are not initializers, in graph order (the VM ``main`` order)."""
    init = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in init]


def _input_dtypes(model: "onnx.ModelProto") -> dict[str, str]:
    from sparsec.ir.onnx_io import tensor_dtype

    init = {t.name for t in model.graph.initializer}
    return {v.name: tensor_dtype(v.type.tensor_type.elem_type)
            for v in model.graph.input if v.name not in init}


def _count_strategies(mod: "ir.IRModule") -> dict[str, int]:
    """Kernel calls in the Relax functions, per strategy of the PrimFunc they call."""
    from tvm import relax, tirx

    counts: Counter[str] = Counter()

    def visit(expr) -> None:
        if (isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir"
                and isinstance(expr.args[0], relax.GlobalVar)):
            func = mod[expr.args[0]]
            if isinstance(func, tirx.PrimFunc):
                attrs = func.attrs or {}
                counts[str(attrs[STRATEGY_ATTR]) if STRATEGY_ATTR in attrs else FALLBACK] += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return dict(sorted(counts.items()))


def _relax_function_pass(mutator_cls, name: str):
    """A module pass running ``mutator_cls`` (a ``relax.PyExprMutator``) over every Relax
    function of the module."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        mutator = mutator_cls(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return _pass


def safe_take_pass():
    """Relax pass: ``take`` (ONNX Gather) with run-time indices wraps them modulo the table
    (``mode="wrap"``) instead of the frontend's ``fast`` mode, which reads out of bounds for
    an out-of-range index (a token id past the vocabulary): the library must never crash on
    input data. Wrapping is ONNX's own reading of the valid negative indices ``[-s, -1]``;
    values outside ``[-s, s - 1]`` are refused before a run (``reference.check_ranges``, the
    C API's ``sparsec_run``)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class SafeTake(relax.PyExprMutator):
        def visit_call_(self, call: "relax.Call") -> "relax.Expr":
            call = super().visit_call_(call)
            if (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take"
                    and str(call.attrs.mode) == "fast"
                    and not isinstance(call.args[1], tvm.ir.expr.GenericConst)):
                axis = call.attrs.axis
                return relax.op.take(call.args[0], call.args[1],
                                     None if axis is None else int(axis), mode="wrap")
            return call

    return _relax_function_pass(SafeTake, "SparsecSafeTake")


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


def build_pipeline(target: "object", cores: int, decisions: list[dict],
                   counts: dict[str, int]):
    """The Relax pipeline with our kernels and schedules (see module docstring)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from sparsec.targets.kernels.fallback import fallback_pass
    from sparsec.targets.kernels.rewrite import rewrite_pass
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
                + cpu.legalize_passes(target)
                + [fallback_pass(target), serial_small_models_pass()]
                # counted once reshapes that only relabel memory have become views
                + cpu.dataflow_lower_passes(target)[:1] + [record]
                + cpu.dataflow_lower_passes(target)[1:]
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def import_onnx(model: "onnx.ModelProto") -> "ir.IRModule":
    """ONNX -> Relax with weights as constants; ``main`` takes the graph inputs in order.
    1-D convolutions are imported as 2-D ones over a unit height (``conv1d_as_conv2d``)."""
    from tvm.relax.frontend.onnx import from_onnx

    model = conv1d_as_conv2d(model)
    return from_onnx(model, dtype_dict=_input_dtypes(model), keep_params_in_input=False)


def conv1d_as_conv2d(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Every Conv with one spatial axis and a constant weight as ``Unsqueeze -> Conv 2-D over
    [N, C, 1, L] -> Squeeze`` (a copy; exact): the 2-D conv kernels then serve the Conv1d
    layers of speech and audio models, which the generic schedule ran 20-30x slower."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.domain in ("", "ai.onnx")
             and len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]].dims) == 3]
    if not convs:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 1)
    axes = helper.make_tensor("sparsec_axis2", onnx.TensorProto.INT64, [1], [2])
    if opset >= 13:
        out.graph.initializer.append(axes)
    nodes = []
    targets = {id(n): n for n in convs}
    for node in model.graph.node:
        if id(node) not in targets:
            nodes.append(node)
            continue
        x, w, y = node.input[0], node.input[1], node.output[0]
        weight = numpy_helper.to_array(inits[w])
        w2 = numpy_helper.from_array(weight[:, :, None, :], f"{w}__2d")
        out.graph.initializer.append(w2)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        conv = {"group": attrs.get("group", 1)}
        for key in ("kernel_shape", "strides", "dilations"):
            if key in attrs:
                conv[key] = [1, *attrs[key]]
        if "pads" in attrs:
            conv["pads"] = [0, attrs["pads"][0], 0, attrs["pads"][1]]
        if "auto_pad" in attrs:
            conv["auto_pad"] = attrs["auto_pad"]
        unsq = ([x, axes.name] if opset >= 13 else [x])
        extra = {} if opset >= 13 else {"axes": [2]}
        nodes.append(helper.make_node("Unsqueeze", unsq, [f"{y}__4d_in"], **extra))
        nodes.append(helper.make_node("Conv", [f"{y}__4d_in", w2.name, *node.input[2:]],
                                      [f"{y}__4d"], name=node.name, **conv))
        sq = ([f"{y}__4d", axes.name] if opset >= 13 else [f"{y}__4d"])
        nodes.append(helper.make_node("Squeeze", sq, [y], **extra))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def compile_onnx(model: "onnx.ModelProto", target: TargetSpec, lib_path: str | Path,
                 log: Callable[[str], None] = print, *, static_lib: str | Path | None = None,
                 system_lib_prefix: str = "", tuned: "bool | tuning.Cache" = True,
                 precision: str | None = None) -> dict:
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
    ``targets/tuning.py``; or in the ``tuning.Cache`` given) are built with their
    measured-best knobs.

    ``precision`` ("fp32", "bf16"; default: the target's, ``TargetSpec.precision``) says
    whether kernels that round their inputs to bf16 (AMX tiles) may be chosen.

    A CUDA target goes to :func:`sparsec.targets.cuda.compile_onnx` (no static archive).
    """
    if target.device == "cuda":
        from sparsec.targets import cuda

        return cuda.compile_onnx(model, target, lib_path, log, precision=precision)
    import tvm
    from tvm import relax

    tvm_target = tvm.target.Target(dict(target.tvm_target))
    cores = int(target.tvm_target.get("num-cores", os.cpu_count() or 1))
    log(f"importing ONNX graph ({len(model.graph.node)} nodes) into Relax")
    mod = import_onnx(model)
    decisions: list[dict] = []
    counts: dict[str, int] = {}
    log(f"compiling for {target.name} ({target.description})")
    from sparsec.targets import tuning

    from sparsec.targets.kernels import common

    cache = tuned if isinstance(tuned, tuning.Cache) else tuning.Cache() if tuned else None
    with native_stderr_to(log):
        with tvm_target, tuning.using(cache, dict(target.tvm_target)), (
                common.precision(precision or target.precision)):
            lowered = build_pipeline(tvm_target, cores, decisions, counts)(mod)
        if any("tuned" in d for d in decisions):
            log(f"{sum('tuned' in d for d in decisions)} kernels built with tuned knobs "
                f"({cache.path})")
        # "compiled": the VM's calling sequence is machine code, not bytecode the VM
        # interprets per instruction (MobileNetV2's ~280 instructions a call)
        ex = relax.build(lowered, tvm_target, relax_pipeline=None, exec_mode=EXEC_MODE)
        # the module attribute alone makes codegen emit a system lib; relax.build's own
        # system_lib=True path reads the attribute back, which fails for strings shorter
        # than 8 bytes in TVM 0.27 (ffi.SmallStr is not an Object)
        static = None if static_lib is None else relax.build(
            _system_lib(lowered, system_lib_prefix), tvm_target, relax_pipeline=None,
            exec_mode=EXEC_MODE)
    fcompile = None
    if not target.native:
        from tvm.support import cc

        fcompile = cc.cross_compiler(target.tool("g++"))
    with atomic_path(lib_path) as tmp:
        ex.export_library(str(tmp), fcompile=fcompile)
    log(f"library {Path(lib_path).stat().st_size:,} bytes; kernels: {counts}")
    if static is not None:
        with atomic_path(static_lib) as tmp:
            _export_archive(static, tmp, target.tool("ar"))
        log(f"static archive {Path(static_lib).stat().st_size:,} bytes "
            f"(symbol prefix '{system_lib_prefix}')")
    return compile_facts(model, target, counts, decisions)


def compile_facts(model: "onnx.ModelProto", target: TargetSpec, counts: dict[str, int],
                  decisions: list[dict]) -> dict:
    """What every back end reports for the manifest: TVM version, target dict, kernel calls per
    strategy, the per-op decisions, and the input/output names in call order."""
    import tvm

    return {
        "tvm_version": tvm.__version__,
        "target": dict(target.tvm_target),
        "kernels": counts,
        "decisions": decisions,
        "inputs": graph_input_names(model),
        "outputs": [o.name for o in model.graph.output],
    }


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temporary path beside ``path`` that is moved onto it when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


class Runner:
    """A compiled library loaded into a Relax VM on the CPU, or with ``cuda`` (the manifest's
    ``compile.cuda``) on the first CUDA device, its kernels from the package's fatbin."""

    def __init__(self, lib_path: str | Path, input_names: Sequence[str],
                 cuda: dict | None = None) -> None:
        import tvm
        from tvm import relax

        self.lib_path = Path(lib_path)
        self.input_names = list(input_names)
        self._on_cpu = cuda is None
        #: how the package's reference check says it ran
        self.via = "native" if cuda is None else "cuda"
        if cuda is None:
            self._dev = tvm.cpu()
            lib = tvm.runtime.load_module(str(self.lib_path))
        else:
            from sparsec.targets.cuda import serve_fatbin

            self._dev = tvm.cuda(0)
            with serve_fatbin(self.lib_path.parent, cuda):   # the loader compiles the source
                lib = tvm.runtime.load_module(str(self.lib_path))
        self._vm = relax.VirtualMachine(lib, self._dev)
        self._main = self._vm["main"]
        #: per input, an aligned TVM tensor kept across calls and its numpy view: unaligned
        #: inputs are copied into it (numpy's memcpy; ``tvm.runtime.tensor`` costs ~0.1 ms
        #: a call, as much as a small model's whole run)
        self._staging: dict[str, tuple] = {}

    def _arg(self, name: str, arr: "np.ndarray"):
        import numpy as np
        import tvm

        arr = np.ascontiguousarray(arr)
        if not self._on_cpu:
            return tvm.runtime.tensor(arr, self._dev)     # a copy to the GPU
        if arr.ctypes.data % _ALIGN == 0 and arr.dtype.isnative:
            try:
                return tvm.runtime.from_dlpack(arr)   # borrowed: kernels never write inputs
            except Exception:  # noqa: BLE001 - e.g. a dtype DLPack cannot express: copy
                pass
        held = self._staging.get(name)
        if held is None or held[1].shape != arr.shape or held[1].dtype != arr.dtype:
            buf = tvm.runtime.empty(arr.shape, str(arr.dtype), self._dev)
            held = self._staging[name] = (buf, np.from_dlpack(buf))
        np.copyto(held[1], arr)
        return held[0]

    def run(self, inputs: dict[str, "np.ndarray"]) -> list["np.ndarray"]:
        """Run once; ``inputs`` keyed by ONNX input name; outputs in ONNX graph order."""
        import numpy as np

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise KeyError(f"missing input(s): {', '.join(missing)}")
        result = self._main(*[self._arg(n, inputs[n]) for n in self.input_names])
        if not self._on_cpu:
            return [t.numpy() for t in _flatten(result)]
        # DLPack view + numpy copy: the result owns its memory (never a view of an input or a
        # baked-in constant) at a fraction of ``Tensor.numpy()``'s per-call cost
        return [np.from_dlpack(t).copy() for t in _flatten(result)]


#: byte alignment TVM requires of a tensor it borrows through DLPack
_ALIGN = 64


def _flatten(value) -> list:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    out: list = []
    for item in value:
        out.extend(_flatten(item))
    return out


def load_library(lib_path: str | Path, input_names: Sequence[str],
                 cuda: dict | None = None) -> Runner:
    """Load a library written by :func:`compile_onnx`; ``input_names`` as it reported them,
    ``cuda`` its ``cuda`` facts for a CUDA target."""
    if cuda is None:
        request_amx()
    return Runner(lib_path, input_names, cuda)


#: Linux x86-64: arch_prctl's syscall number, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def request_amx() -> bool:
    """Ask Linux for the AMX tile state, once per process: code that touches a tile register
    without it dies with SIGILL (the kernel hands AMX state out on request only, since 5.16).
    The C runtime asks the same in ``sparsec_open``. True when granted, False on a CPU or
    kernel without AMX."""
    import ctypes
    import platform

    from sparsec.targets import cpu_flags

    if "amx_tile" not in cpu_flags() or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
