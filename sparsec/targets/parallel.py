"""Threads only where they pay: a model whose kernels are small runs every kernel serially.

Every kernel schedule (ours and the generic one) parallelizes its outer loop. Starting a
parallel loop wakes TVM's worker threads and ends on a barrier: a few microseconds when the
workers are spinning, far more when they have gone to sleep, and milliseconds when the other
core is busy with another process and a worker has to be scheduled back in (TVM gives each
thread a fixed share of the loop, so the barrier waits for it). Making only a model's smallest
kernels serial was worse than all or nothing, since the remaining parallel kernels found the
workers asleep (ResNet at 32x32 with one parallel conv: 3-4 ms a call with the other core
busy, 0.03 ms serially). So the choice is per model.

The cost model behind it: a call of a model with ``W`` operations in ``n`` calls of kernels
with a parallel loop costs ``W / r`` serially and ``W / (t r) + n c`` on ``t`` threads, where
``r`` is one core's rate and ``c`` one parallel launch. Threads pay when the mean work of a
parallel kernel call, ``W / n``, exceeds ``t c r / (t - 1)``: about 1.2e6 operations for ``r``
~1e11 operations/s and ``c`` ~6 us, both fitted on this 2-core Zen 4 VM, idle (a 64x64
residual CNN pruned to half its channels: 3.2e7 operations in 11 calls, 0.31 ms serially,
0.21 ms parallel; wav2vec2 at 2.1e7 operations in 77 calls: 0.34 ms serially, 0.70 ms
parallel). The total work alone misleads: the pruned CNN and wav2vec2 do the same work, and
the one wants threads, the other not. Every model of the coverage benchmark (transformers at
seq 16, CNNs at 32x32: 1e4-3e5 operations a call) runs serially, 1.1-2x faster than with
threads; ResNet-18, MobileNetV2 and BERT-base at full size keep them.

The pass estimates work by walking each kernel's body: every buffer store counts its loop trip
count times the arithmetic nodes of the stored value (a multiply-add: 2, a fast_exp: ~40),
times the model's calls of that kernel. Loops whose extent is not a constant count as
unbounded work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm import ir, tirx

#: mean operations of one call of a kernel with a parallel loop for threads to pay (see the
#: module docstring: 2 threads, r ~1e11 operations/s, c ~6 us a launch)
MIN_PARALLEL_CALL_WORK = 1_200_000
#: nodes counted in one stored expression before giving up (deep trees are heavy anyway)
_MAX_NODES = 256


def _expr_ops(expr, budget: list[int]) -> int:
    """Arithmetic nodes in ``expr`` (loads, variables and constants count 0), visiting at
    most ``budget[0]`` nodes."""
    import tvm

    if budget[0] <= 0 or expr is None or isinstance(expr, tvm.ir.expr.TensorLoad):
        return 0
    children = [getattr(expr, name, None) for name in _CHILDREN]
    children = [c for c in children if c is not None and not isinstance(c, (int, float, str))]
    children += list(getattr(expr, "args", None) or [])
    if not children:
        return 0          # a leaf: variable, constant
    budget[0] -= 1
    return 1 + sum(_expr_ops(c, budget) for c in children)


#: the operand fields of TIR expression nodes (binary ops, Cast, Not, Select, Let)
_CHILDREN = ("a", "b", "value", "condition", "true_value", "false_value", "body")


def work(stmt) -> float:
    """Estimated operations ``stmt`` performs (see the module docstring)."""
    from tvm import s_tir, tirx

    if stmt is None:
        return 0.0
    if isinstance(stmt, tirx.For):
        ext = stmt.extent
        trips = int(ext.value) if isinstance(ext, tirx.IntImm) else float("inf")
        return trips * work(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        return sum(work(s) for s in stmt.seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        return work(stmt.block)
    if isinstance(stmt, s_tir.SBlock):
        return work(stmt.body) + work(stmt.init)
    if isinstance(stmt, tirx.BufferStore):
        return max(1, _expr_ops(stmt.value, [_MAX_NODES]))
    if isinstance(stmt, tirx.IfThenElse):
        return max(work(stmt.then_case), work(stmt.else_case))
    body = getattr(stmt, "body", None)
    return 1.0 if body is None else work(body)


def _serialize(stmt, min_work: float):
    """``stmt`` with every parallel loop of less than ``min_work`` operations made serial;
    the node itself when nothing changed. Descends through the statement kinds that sit
    above a kernel's parallel loop (blocks, sequences, serial loops, conditions)."""
    from tvm import s_tir, tirx

    if isinstance(stmt, tirx.For):
        if stmt.kind == tirx.ForKind.PARALLEL:
            if work(stmt) >= min_work:
                return stmt
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, tirx.ForKind.SERIAL,
                            stmt.body, stmt.thread_binding, stmt.annotations)
        body = _serialize(stmt.body, min_work)
        return stmt if body.same_as(stmt.body) else tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
            stmt.annotations)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_serialize(s, min_work) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        block = _serialize(stmt.block, min_work)
        return stmt if block.same_as(stmt.block) else s_tir.SBlockRealize(
            stmt.iter_values, stmt.predicate, block)
    if isinstance(stmt, s_tir.SBlock):
        body = _serialize(stmt.body, min_work)
        return stmt if body.same_as(stmt.body) else s_tir.SBlock(
            stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body, stmt.init,
            stmt.alloc_buffers, stmt.match_buffers, stmt.annotations)
    return stmt


def serialize_small(func: "tirx.PrimFunc", min_work: float) -> "tirx.PrimFunc":
    """``func`` with its parallel loops of little work made serial (unchanged otherwise)."""
    body = _serialize(func.body, min_work)
    return func if body.same_as(func.body) else func.with_body(body)


def _has_parallel(stmt) -> bool:
    """Whether ``stmt`` holds a parallel loop (descending as :func:`work` does)."""
    from tvm import s_tir, tirx

    if stmt is None:
        return False
    if isinstance(stmt, tirx.For):
        return stmt.kind == tirx.ForKind.PARALLEL or _has_parallel(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        return any(_has_parallel(s) for s in stmt.seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        return _has_parallel(stmt.block)
    if isinstance(stmt, tirx.IfThenElse):
        return _has_parallel(stmt.then_case) or _has_parallel(stmt.else_case)
    return _has_parallel(getattr(stmt, "body", None))


def kernel_calls(mod: "ir.IRModule") -> list[tuple[float, bool, int]]:
    """``(work, has a parallel loop, calls)`` of each PrimFunc that ``mod``'s Relax functions
    call through ``call_tir`` (work of one call: :func:`work`)."""
    from tvm import relax, tirx

    calls: dict = {}

    def visit(expr) -> None:
        if (isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir"
                and isinstance(expr.args[0], relax.GlobalVar)):
            calls[expr.args[0]] = calls.get(expr.args[0], 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return [(work(mod[gv].body), _has_parallel(mod[gv].body), n) for gv, n in calls.items()
            if isinstance(mod[gv], tirx.PrimFunc)]


def model_work(mod: "ir.IRModule") -> float:
    """Estimated operations of one call of ``mod``'s Relax functions."""
    return sum(w * n for w, _, n in kernel_calls(mod))


def threads_pay(mod: "ir.IRModule", min_call_work: float | None = None) -> bool:
    """Whether ``mod``'s parallel kernels do enough work a call to pay for their launches:
    their mean work a call is at least ``min_call_work`` (default
    :data:`MIN_PARALLEL_CALL_WORK`; the module docstring has the cost model)."""
    least = MIN_PARALLEL_CALL_WORK if min_call_work is None else min_call_work
    par = [(w, n) for w, has_par, n in kernel_calls(mod) if has_par]
    calls = sum(n for _, n in par)
    return calls > 0 and sum(w * n for w, n in par) >= least * calls


def serial_small_models_pass(min_call_work: float | None = None):
    """Module pass: every PrimFunc serial (:func:`serialize_small` with no limit) unless
    :func:`threads_pay` for the model; the module unchanged otherwise."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="SparsecSerialSmallModels")
    def _pass(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        if threads_pay(mod, min_call_work):
            return mod
        limit = float("inf")
        updates = {gv: serialize_small(f, limit) for gv, f in mod.functions_items()
                   if isinstance(f, tirx.PrimFunc)}
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
