"""The back-end interface: what every back end (the host CPU, ``host.py``; NVIDIA GPUs,
``cuda.py``) and the tuner (``tuning.py``) share, so that they depend on this module and not
on each other. Four steps:

  import    :func:`import_onnx`: a static-shaped ONNX model -> a Relax module, weights as
            constants (1-D convs as 2-D ones), plus :func:`safe_take_pass`, the first pass of
            every pipeline (run-time Gather indices never read out of bounds)
  rewrite   :func:`rewrite_pass`: heavy ops -> sparsec's kernels for the device, the choices
            recorded as decisions (``kernels/rewrite.py``)
  build     :func:`export_library` writes a built executable atomically (cross targets link
            with their toolchain); :func:`compile_facts` is what every back end reports
  run       :func:`load_library` loads a library into a Relax VM on the CPU, or on the GPU with
            its kernels from the package's fatbin (:class:`Runner`)

A back end is a module with ``compile_onnx(model, target, lib_path, log, ..., precision=)
-> facts``; which one compiles a target is the caller's choice (``sparsec.compiling``: by
``TargetSpec.device``). Importing this module imports no TVM.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from sparsec.targets import TargetSpec, physical_cores

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


def graph_input_names(model: "onnx.ModelProto") -> list[str]:
    """Graph inputs that are not initializers, in graph order (the VM ``main`` order)."""
    init = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in init]


def _input_dtypes(model: "onnx.ModelProto") -> dict[str, str]:
    from sparsec.ir.onnx_io import tensor_dtype

    init = {t.name for t in model.graph.initializer}
    return {v.name: tensor_dtype(v.type.tensor_type.elem_type)
            for v in model.graph.input if v.name not in init}



def import_onnx(model: "onnx.ModelProto") -> "ir.IRModule":
    """ONNX -> Relax with weights as constants; ``main`` takes the graph inputs in order.
    1-D convolutions are imported as 2-D ones over a unit height (``conv1d_as_conv2d``)."""
    from tvm.relax.frontend.onnx import from_onnx

    model = conv1d_as_conv2d(model)
    dynamic = any(not d.HasField("dim_value") for v in model.graph.input
                  for d in v.type.tensor_type.shape.dim)
    with _symshape_converter() if dynamic else contextlib.nullcontext(), _clip_converter():
        return from_onnx(model, dtype_dict=_input_dtypes(model), keep_params_in_input=False)


@contextlib.contextmanager
def _clip_converter():
    """While importing: ONNX Clip through ``common.clip_bound`` where its bounds are scalars
    (TOPI's broadcasting maximum / minimum otherwise)."""
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    from sparsec.targets.kernels.common import clip_bound

    base = frontend._get_convert_map()["Clip"]

    def bounded(bb, x, bound, side):
        ty = getattr(bound, "ty", None)
        if isinstance(bound, (int, float)) or (
                ty is not None and getattr(ty, "ndim", None) == 0
                and str(ty.dtype) == str(x.ty.dtype)):
            return bb.emit_te(clip_bound, x, bound, side,
                              primfunc_name_hint="maximum" if side == 0 else "minimum")
        return None

    class Clip(base):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            for side, key, default in ((0, "min", -float("inf")), (1, "max", float("inf"))):
                x = bounded(bb, x, float(attr.get(key, default)), side)
            return x

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            x = inputs[0]
            for side in (0, 1):
                if inputs[side + 1] is None:
                    continue
                bound = cls._sanitize_nan_clip_bound(bb, inputs[side + 1], for_min=side == 0)
                y = bounded(bb, x, bound, side)
                if y is None:
                    return base._impl_v13(bb, inputs, attr, params)
                x = y
            return x

    original = frontend._get_convert_map
    frontend._get_convert_map = lambda: {**original(), "Clip": Clip}
    try:
        yield
    finally:
        frontend._get_convert_map = original


@contextlib.contextmanager
def _symshape_converter():
    """While importing a dynamic model (only then): its ``SparsecSymShape`` nodes
    (``frontends/dynamic.py``) become Relax shapes (a scalar: a ``PrimValue``) of the
    symbolic dims of the input tensors they read, so that ``Reshape``, ``Expand``,
    ``ConstantOfShape``, ``Range`` see symbolic shapes, not run-time tensors."""
    import ast

    import tvm
    from tvm import relax, tirx
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    from sparsec.frontends.dynamic import SYMSHAPE_OP

    class SymShape(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            dims = {name: inputs[i].ty.shape.values[axis]
                    for name, (i, axis) in ast.literal_eval(_text(attr["dims"])).items()}
            values = []
            for terms in ast.literal_eval(_text(attr["polys"])):
                expr = tirx.const(0, "int64")
                for mono, coef in terms:
                    term = tirx.const(int(coef), "int64")
                    for name in mono:
                        dim = dims[name]
                        term = term * (dim if str(dim.ty) == "int64" else tirx.Cast("int64", dim))
                    expr = expr + term
                values.append(expr)
            shape = relax.ShapeExpr(values)
            if int(attr.get("tensor", 0)):
                tensor = bb.normalize(relax.op.shape_to_tensor(shape))
                if int(attr["scalar"]):
                    tensor = bb.normalize(relax.op.reshape(tensor, ()))
                dtype = _text(attr["dtype"])
                return tensor if dtype == "int64" else relax.op.astype(tensor, dtype)
            if int(attr["scalar"]):
                return relax.prim_value(values[0])
            return shape

    class Range(frontend.OnnxOpConverter):
        """ONNX Range with symbolic bounds as ``arange`` of the expressions: its length is
        then an expression of the dims (TVM's converter makes a new variable per Range,
        which FuseTIR cannot put two of into one function)."""

        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            values, dtype = [], "int64"
            for x in inputs:
                if isinstance(x, tvm.ir.expr.GenericConst) and x.value.numpy().size == 1:
                    values.append(x.value.numpy().reshape(()).item())
                    dtype = str(x.value.numpy().dtype)
                elif tvm.ir.is_prim_expr(x):
                    values.append(x)
                else:
                    return plain_range(bb, inputs, attr, params)
            if not any(tvm.ir.is_prim_expr(v) and not isinstance(v, tirx.IntImm)
                       for v in values):
                return plain_range(bb, inputs, attr, params)
            return relax.op.arange(*values, dtype=dtype)

    original = frontend._get_convert_map
    plain_range = original()["Range"].get_converter(12)
    frontend._get_convert_map = lambda: {**original(), SYMSHAPE_OP: SymShape, "Range": Range}
    try:
        with warnings.catch_warnings():
            # the importer's model check warns of outputs declared without a shape, which
            # dynamic exports have; the shapes come from the import
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        frontend._get_convert_map = original


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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


def rewrite_pass(cores: int, decisions: list[dict], device: str = "cpu"):
    """Relax pass: every heavy op whose shapes and constant weights one of sparsec's kernels for
    ``device`` ("cpu", "cuda") serves becomes a call of that kernel, epilogues folded in; each
    choice, with the cost rule's estimates, is appended to ``decisions``
    (``kernels/rewrite.py``)."""
    from sparsec.targets.kernels.rewrite import rewrite_pass as _rewrite_pass

    return _rewrite_pass(cores, decisions, device=device)


def export_library(ex, target: TargetSpec, lib_path: str | Path) -> None:
    """Write the built executable ``ex`` as a shared library at ``lib_path``, atomically; a
    cross target's is linked with its toolchain (``target.tool("g++")``)."""
    fcompile = None
    if not target.native:
        from tvm.support import cc

        fcompile = cc.cross_compiler(target.tool("g++"))
    with atomic_path(lib_path) as tmp:
        ex.export_library(str(tmp), fcompile=fcompile)


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



#: how a CUDA package's library runs on a machine without a GPU (``Runner.via``): on the CPU
#: twin of the CUDA schedules
VIA_TWIN = "cuda-schedules-on-cpu"


def _load_with_twin(lib_path: Path, twin_path: Path):
    """A CUDA library's VM executable (its code and its weights) with its GPU kernels replaced
    by their CPU twins (``cuda.emulation_module``: the same functions, threads serialized).

    This TVM has no CUDA runtime, so loading the library needs a loader for its CUDA module:
    one is registered that answers with the twin, and the executable's imports (the host
    code that would launch the GPU kernels) are then replaced by the twin, whose functions
    carry the names the VM calls."""
    import tvm
    import tvm_ffi

    twin = tvm.runtime.load_module(str(twin_path))
    _graphs_run_eagerly()
    loader = "ffi.Module.load_from_bytes.cuda"
    previous = tvm_ffi.get_global_func(loader, allow_missing=True)
    tvm_ffi.register_global_func(loader, lambda _data: twin, override=True)
    try:
        lib = tvm.runtime.load_module(str(lib_path))
    finally:            # the twin stays out of later loads: they fail (or load) as before
        restore = _no_cuda_runtime if previous is None else previous
        tvm_ffi.register_global_func(loader, restore, override=True)
    lib.clear_imports()
    lib.import_module(twin)
    return lib


def _graphs_run_eagerly() -> None:
    """Stand-ins for the CUDA runtime's graph builtins (a package compiled with
    ``cuda_graph``), registered where this TVM has none: ``run_or_capture`` runs the region it
    would capture and replay, straight away, and ``get_cached_alloc`` allocates its memory
    (uncached), so that model.so runs on the CPU twin as it would without graphs."""
    import tvm_ffi

    invoke = tvm_ffi.get_global_func("vm.builtin.invoke_closure")

    def run_or_capture(vm, func, args, _entry, _shape=None):
        return invoke(vm, func, *args)

    def get_cached_alloc(vm, alloc, _entry):
        return invoke(vm, alloc)

    for name, func in (("vm.builtin.cuda_graph.run_or_capture", run_or_capture),
                       ("vm.builtin.cuda_graph.get_cached_alloc", get_cached_alloc)):
        if tvm_ffi.get_global_func(name, allow_missing=True) is None:
            tvm_ffi.register_global_func(name, func)


def _no_cuda_runtime(_data):
    raise RuntimeError("this TVM has no CUDA runtime (no CUDA device here)")


class Runner:
    """A compiled library loaded into a Relax VM on the CPU, or with ``cuda`` (the manifest's
    ``compile.cuda``) on the first CUDA device, its kernels from the package's fatbin; with
    ``cuda`` and ``twin`` (where no GPU is), on the CPU with the kernels' CPU twins."""

    def __init__(self, lib_path: str | Path, input_names: Sequence[str],
                 cuda: dict | None = None, twin: str | Path | None = None) -> None:
        import tvm
        from tvm import relax

        self.lib_path = Path(lib_path)
        self.input_names = list(input_names)
        self._on_cpu = cuda is None or twin is not None
        #: how the package's reference check says it ran
        self.via = "native" if cuda is None else VIA_TWIN if twin is not None else "cuda"
        if self._on_cpu:
            self._dev = tvm.cpu()
            lib = (tvm.runtime.load_module(str(self.lib_path)) if twin is None
                   else _load_with_twin(self.lib_path, Path(twin)))
        else:
            from sparsec.targets.cuda_toolkit import serve_fatbin

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
                 cuda: dict | None = None, twin: str | Path | None = None) -> Runner:
    """Load a library a back end wrote (``compile_onnx``); ``input_names`` as it reported them,
    ``cuda`` its ``cuda`` facts for a CUDA target, ``twin`` the CPU twin of its kernels to run
    it on this CPU (no GPU here)."""
    if cuda is None:
        request_amx()
    return Runner(lib_path, input_names, cuda, twin)


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
