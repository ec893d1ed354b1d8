"""Kernel scratch buffers on the stack, not on TVM's workspace heap.

A kernel's small buffers (a register tile's accumulators, a channel's padded rows) are
allocated where they are used: inside the task loop, often inside a channel or tile loop.
TVM 0.27's ``LowerTVMBuiltin`` keeps only buffers of scope "global" under 1 KB on the stack;
every other one becomes a ``TVMBackendAllocWorkspace`` /
``TVMBackendFreeWorkspace`` pair per loop iteration: two calls into the runtime's workspace
pool, and a tile behind a heap pointer where a stack tile can live in registers. Our
schedules put accumulator tiles in scope "local", so every tile paid it: pruned MobileNetV2
made 4,337 workspace calls a run, and a 16 -> 96 pointwise conv at 28x28 (3 K MACs a tile)
ran 10.1 us where the same kernel with a stack tile runs 7.9 us (two threads).

``tir_pipeline()`` is TVM's default TIR pipeline with one pass added before
``LowerTVMBuiltin``: each constant-size CPU buffer of at most ``STACK_BYTES`` is annotated
``disable_lower_builtin``, which code generation turns into an ``alloca`` in the function's
entry block (the parallel task's, for a buffer inside a parallel loop), so a buffer inside a
loop is allocated once a call, not once an iteration. A function's stack buffers total at most
``STACK_BUDGET`` (buffers past it stay on the heap), a small part of a thread's stack (8 MB
by default on Linux, about 1 MB on Android). Larger buffers (a fused kernel's
per-task expansion band, a conv's padded input) stay on the heap: one allocation a task.

Every host library (``host.compile_onnx``), every kernel ``sparsec tune`` times, and every RPC
build compile through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm import tirx

#: the name ``tir_pipeline()`` registers with TVM
PIPELINE = "sparsec"
#: one buffer at most this many bytes goes on the stack
STACK_BYTES = 16 * 1024
#: one function's stack buffers at most this many bytes together
STACK_BUDGET = 64 * 1024
#: the annotation TVM's ``LowerTVMBuiltin`` reads: leave this allocation to code generation
KEEP_ON_STACK = "disable_lower_builtin"


def _constant_bytes(buffer: "tirx.Buffer") -> int | None:
    """Bytes of ``buffer`` where its shape is constant, else None."""
    import math

    import tvm
    from tvm import tirx

    if not all(isinstance(extent, tirx.IntImm) for extent in buffer.shape):
        return None
    dtype = tvm.runtime.DataType(str(buffer.dtype))
    return math.prod(int(e) for e in buffer.shape) * dtype.bits * dtype.lanes // 8


def on_stack(func: "tirx.PrimFunc") -> "tirx.PrimFunc":
    """``func`` with each constant-size buffer of scope "global" or "local" up to
    ``STACK_BYTES`` marked to stay on the stack, while their total stays within
    ``STACK_BUDGET`` (in the order the body allocates them)."""
    import tvm_ffi
    from tvm import tirx

    used = 0

    def mark(node: "tirx.AllocBuffer") -> "tirx.AllocBuffer":
        nonlocal used
        annotations = dict(node.annotations or {})
        nbytes = _constant_bytes(node.buffer)
        if (KEEP_ON_STACK in annotations or nbytes is None or nbytes > STACK_BYTES
                or used + nbytes > STACK_BUDGET
                or node.buffer.scope() not in ("global", "local")):
            return node
        used += nbytes
        annotations[KEEP_ON_STACK] = tirx.IntImm("bool", 1)
        return tirx.AllocBuffer(node.buffer, annotations)

    return func.with_body(tvm_ffi.structural_map(func.body, [(tirx.AllocBuffer, mark)]))


def _stack_pass():
    from tvm import tirx

    @tirx.transform.prim_func_pass(opt_level=0, name="SparsecScratchOnStack")
    def _pass(func, _mod, _ctx):
        target = (func.attrs or {}).get("target")
        if target is not None and target.kind.name != "llvm":
            return func          # a GPU kernel's buffers are the device's business
        return on_stack(func)

    return _pass


def _pipeline():
    """TVM's default (s_tir) pipeline; the host's finalization runs the stack pass first."""
    import tvm
    from tvm import s_tir

    lower, finalize_host, finalize_device = s_tir.pipeline.default_s_tir_pipeline()

    def host():
        return tvm.transform.Sequential([_stack_pass(), finalize_host()])

    return lower, host, finalize_device


def tir_pipeline() -> str:
    """The TIR pipeline's name for ``relax.build`` / ``tvm.compile`` (registered on first
    use)."""
    from tvm.tirx import compilation_pipeline

    if PIPELINE not in compilation_pipeline.PIPELINE_MAP:
        compilation_pipeline.register_tir_pipeline(PIPELINE, _pipeline)
    return PIPELINE
