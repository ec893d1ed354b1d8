"""Threads only where they pay: a kernel whose parallel loop holds little work runs it serially.

Every kernel schedule (ours and the generic one) parallelizes its outer loop. Starting a
parallel loop wakes TVM's worker threads and ends on a barrier: a few microseconds when the
workers are spinning, far more when the other core is busy with another process and a worker
has to be scheduled back in, which on a shared 2-core machine is most of the time. A kernel
that does a few microseconds of work is then slower in parallel than alone, and small models
are made of such kernels: MobileViT at 32x32 (190 kernel calls, most under 2 us) ran 0.55 ms
with 2 threads and 0.16 ms with 1 (ONNX Runtime: 0.33 ms). ONNX Runtime sizes its thread use
by the work the same way (its cost model in ``TryParallelFor``).

The pass estimates each parallel loop's work by walking its body: every buffer store counts
its loop trip count times the arithmetic nodes of the stored value (a multiply-add: 2, a
fast_exp: ~40), and a loop with less than :data:`MIN_PARALLEL_WORK` becomes serial. Loops
whose extent is not a constant stay parallel (their work is unknown).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm import ir, tirx

#: operations a parallel loop must hold to keep its threads: 10-20 us of one core's vector
#: arithmetic, several times what waking the workers costs on an idle machine. Measured on
#: the coverage models (2 threads, against a fully serial build): MobileViT 0.55 ms with no
#: limit, 0.22 at 1e5, 0.17 at 3e5, 0.13 serial; wav2vec2 0.90 / 0.83 / 0.82 / 0.73 at 1e6 /
#: 0.70 serial; a 32x768x3072 GEMM (150 M operations) keeps its threads at any of these
MIN_PARALLEL_WORK = 1_000_000
#: operations a whole model call must do for any of its loops to run in parallel: a model
#: this small is done in a few hundred microseconds on one core, and a parallel kernel in
#: it, the rare one among serial ones, finds TVM's workers asleep: waking them costs tens of
#: microseconds on an idle machine and milliseconds on a busy one (ResNet at 32x32 with one
#: parallel conv: 0.03 ms serial, 3-4 ms a call with the other core busy; ORT 0.036)
MIN_PARALLEL_MODEL_WORK = 50_000_000
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


def serialize_small(func: "tirx.PrimFunc", min_work: float = MIN_PARALLEL_WORK
                    ) -> "tirx.PrimFunc":
    """``func`` with its parallel loops of little work made serial (unchanged otherwise)."""
    body = _serialize(func.body, min_work)
    return func if body.same_as(func.body) else func.with_body(body)


def model_work(mod: "ir.IRModule") -> float:
    """Estimated operations of one call of ``mod``'s Relax functions: each PrimFunc's
    :func:`work` times the ``call_tir`` calls of it."""
    from tvm import relax, tirx

    calls: dict = {}

    def visit(expr) -> None:
        if (isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir"
                and isinstance(expr.args[0], relax.GlobalVar)):
            calls[expr.args[0]] = calls.get(expr.args[0], 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sum(n * work(mod[gv].body) for gv, n in calls.items()
               if isinstance(mod[gv], tirx.PrimFunc))


def serial_small_kernels_pass(min_work: float | None = None,
                              model_min_work: float | None = None):
    """Module pass: :func:`serialize_small` on every PrimFunc, with ``min_work`` (default
    :data:`MIN_PARALLEL_WORK`); every loop serial when the whole model does less than
    ``model_min_work`` (default :data:`MIN_PARALLEL_MODEL_WORK`)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="SparsecSerialSmallKernels")
    def _pass(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        limit = MIN_PARALLEL_WORK if min_work is None else min_work
        whole = model_work(mod)
        if whole < (MIN_PARALLEL_MODEL_WORK if model_min_work is None else model_min_work):
            limit = float("inf")
        updates = {gv: serialize_small(f, limit) for gv, f in mod.functions_items()
                   if isinstance(f, tirx.PrimFunc)}
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
