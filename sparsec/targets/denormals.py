"""Subnormal floats flushed to zero while a CPU library runs.

A float32 below 1.2e-38 is subnormal, and x86 and ARM cores handle subnormal operands and
results in microcode assists: each such operation costs tens to hundreds of cycles instead of
one. They are not rare in networks: a sigmoid or SiLU of a large negative input, a
squeeze-and-excitation gate that closes, activations that shrink through a stack of
randomly-initialized or heavily pruned layers. The coverage benchmark's EfficientNet (32x32,
random weights from its ``transformers`` config) holds 2,496 subnormal activations in a call;
it ran 352 us a call against 81 us with subnormals flushed (two threads), and ONNX Runtime,
which keeps them by default, 354 us.

So every host library sets the core's flush-to-zero modes for the length of a call, as
TensorFlow and OpenVINO do by default: x86's MXCSR FTZ (results) and DAZ (operands), AArch64's
FPCR.FZ. ``main`` starts with ``sparsec_denormals_flush`` and ends with
``sparsec_denormals_restore``: where some kernel runs on threads, a parallel loop over
``WORKER_SLOTS`` slots saves each thread's mode register (the calling thread's and TVM's
workers') into a small tensor and sets the modes, and at the end puts back what it saved;
where every kernel runs serially (``parallel.py``), the same for the calling thread alone. The
caller's own float code after a call, and TVM code of other libraries in the process, see the
modes they had. A subnormal then reads and computes as zero: an absolute change under 1.2e-38
a value, within every tolerance ``validate`` applies. Compile with ``denormals="keep"`` (CLI
``--denormals keep``) for IEEE gradual underflow.

Cost, on the 2-core Emerald Rapids VM: a serial model (the coverage benchmark's BERT, 16
positions) 21.0 -> 21.2 us a call; a parallel one pays two launches of the thread pool (~0.9 us
each; MobileNetV2 2.801 against 2.810 ms, within noise).
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm import ir, tirx

FLUSH_NAME = "sparsec_denormals_flush"
RESTORE_NAME = "sparsec_denormals_restore"
NAMES = (FLUSH_NAME, RESTORE_NAME)
#: the choices of ``compile(denormals=...)``
MODES = ("flush", "keep")
#: x86 MXCSR: FTZ (bit 15) | DAZ (bit 6)
X86_FLUSH_BITS = 0x8040
#: AArch64 FPCR.FZ (bit 24)
ARM_FLUSH_BITS = 1 << 24
#: iterations of the parallel loops that set and restore the threads' modes: TVM splits a
#: parallel loop statically (the same way at both ends of a call), so each of up to this many
#: threads runs at least one. The first slot a thread runs saves its register and sets the
#: modes; the others find them set and save ``UNCHANGED``; the restore writes back only the
#: saved registers
WORKER_SLOTS = 16
#: a slot that changed nothing (no valid MXCSR or FPCR value: their bit 31 is reserved)
UNCHANGED = -1


def arch(target: "object") -> str | None:
    """"x86" or "aarch64" for an LLVM target of that architecture (its ``mtriple``, or this
    machine's when the target gives none), else None: no flushing (other CPUs, GPUs)."""
    attrs = target.attrs
    if str(target.kind.name) != "llvm":
        return None
    triple = str(attrs.get("mtriple", "") or "") or platform.machine()
    if triple.startswith(("x86_64", "amd64", "AMD64", "i686")):
        return "x86"
    if triple.startswith(("aarch64", "arm64")):
        return "aarch64"
    return None


def _functions(kind: str, parallel: bool) -> "tuple[tirx.PrimFunc, tirx.PrimFunc]":
    """(flush, restore) PrimFuncs for ``kind`` ("x86" or "aarch64")."""
    from tvm.script import tirx as T

    if kind == "x86":
        bits = X86_FLUSH_BITS

        @T.macro
        def read(buf):
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.stmxcsr", T.address_of(buf[0])))

        @T.macro
        def write(buf):
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.ldmxcsr", T.address_of(buf[0])))
    else:
        bits = ARM_FLUSH_BITS

        @T.macro
        def read(buf):
            buf[0] = T.Cast("int32", T.call_llvm_intrin("int64", "llvm.aarch64.get.fpcr"))

        @T.macro
        def write(buf):
            T.evaluate(T.call_llvm_intrin("void", "llvm.aarch64.set.fpcr",
                                          T.Cast("int64", buf[0])))

    slots = WORKER_SLOTS if parallel else 1

    @T.prim_func(check_well_formed=False)
    def flush(saved: T.Buffer((slots,), "int32")):
        T.func_attr({"global_symbol": FLUSH_NAME, "tirx.noalias": True})
        for i in T.parallel(slots):
            reg = T.alloc_buffer((1,), "int32", scope="local")
            read(reg)
            if reg[0] & bits != bits:
                saved[i] = reg[0]
                reg[0] = reg[0] | bits
                write(reg)
            else:
                saved[i] = UNCHANGED

    @T.prim_func(check_well_formed=False)
    def restore(saved: T.Buffer((slots,), "int32")):
        T.func_attr({"global_symbol": RESTORE_NAME, "tirx.noalias": True})
        for i in T.parallel(slots):
            if saved[i] != UNCHANGED:
                reg = T.alloc_buffer((1,), "int32", scope="local")
                reg[0] = saved[i]
                write(reg)

    if not parallel:     # the one slot in the calling thread
        from sparsec.targets.parallel import serialize_small

        flush, restore = (serialize_small(f, float("inf")) for f in (flush, restore))
    return flush, restore


def flush_pass(target: "object"):
    """Module pass: each public Relax function of the module runs between
    ``sparsec_denormals_flush`` and ``sparsec_denormals_restore`` (module docstring); the
    module unchanged for targets :func:`arch` does not know. Run after the kernels' threading
    is settled (``parallel.serial_small_models_pass``): the flush sets the worker threads' modes
    only where some kernel keeps a parallel loop."""
    import tvm
    from tvm import relax

    from sparsec.targets.parallel import kernel_calls

    @tvm.transform.module_pass(opt_level=0, name="SparsecFlushDenormals")
    def _pass(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        kind = arch(target)
        if kind is None:
            return mod
        parallel = any(has_parallel for _, has_parallel, _ in kernel_calls(mod))
        publics = [(gv, f) for gv, f in mod.functions_items()
                   if isinstance(f, relax.Function) and "global_symbol" in (f.attrs or {})]
        if not publics:
            return mod
        bb = relax.BlockBuilder(mod)
        flush_gv, restore_gv = (bb.add_func(f, name) for f, name in zip(
            _functions(kind, parallel), (FLUSH_NAME, RESTORE_NAME)))
        mod = bb.get()
        state = relax.TensorType((WORKER_SLOTS if parallel else 1,), "int32")
        for gv, func in publics:
            saved = relax.Var("denormal_modes", state)
            first = relax.BindingBlock([relax.VarBinding(saved, relax.call_tir(
                flush_gv, relax.Tuple([]), state))])
            last = relax.BindingBlock([relax.VarBinding(
                relax.Var("_", relax.TupleType([])),
                relax.Call(restore_gv, [saved], ty_args=[relax.TupleType([])]))])
            body = relax.SeqExpr([first, *func.body.blocks, last], func.body.body)
            mod[gv] = relax.Function(func.params, body, func.ret_ty, False, func.attrs,
                                     func.span)
        return mod

    return _pass


def is_mode_switch(func: "tirx.PrimFunc") -> bool:
    """Whether ``func`` is one of this module's functions (not a kernel of the model)."""
    return str((func.attrs or {}).get("global_symbol", "")) in NAMES
