"""``fallback``: a generic CPU schedule for every PrimFunc our strategies did not produce.

These are the legalized + fused Relax ops (bias adds, pooling, softmax, depthwise conv, ...).
Per function, in order:
1. row-wise functions (softmax, LayerNorm, RMSNorm: every block shares the output's leading
   spatial loops and at most reduces over one inner axis): one parallel loop over the rows,
   every stage computed inside it (a row's intermediates stay in L1), elementwise stages
   vectorized and each inner reduction split into 16 vector lanes with ``rfactor`` (a
   vector accumulator, not a chain of dependent scalar adds: 2.6x on softmax, 6x on
   LayerNorm against DLight's ``Reduction`` rule);
2. one reduction over the trailing axes of its input (global pooling, an SE squeeze):
   the same vector lanes over the fused reduction axes, parallel over what it keeps (DLight's
   ``Reduction`` rule keeps one dependent scalar add per element: 0.50 ms for the mean of a
   96x80x80 map);
3. DLight's CPU rules (``GEMV``, ``Reduction``), the maintained library schedules, when one
   matches;
4. otherwise our loop-nest rule: first inline the intermediate blocks that only move data
   (reshape, transpose, broadcast: FuseTIR keeps one block and one buffer per fused op, so a
   reshape-transpose-reshape chain would write every element three times) and elementwise
   blocks read by one spatial block; then, block by block, fuse the leading spatial loops into
   one parallel loop; move the innermost spatial loop below the reduction loops (so reductions
   accumulate into a vector) and vectorize it when its extent is a constant;
5. on any schedule error the function is left unscheduled (correct, only slower).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import SCHEDULED_ATTR, STRATEGY_ATTR, prefetch_writes

if TYPE_CHECKING:
    from tvm import ir, s_tir, tirx
    from tvm.target import Target

NAME = "fallback"
MAX_VECTOR = 16  # split wider innermost loops so the vector body stays a few ymm registers
MIN_PARALLEL = 2048  # iterations below which threading costs more than it saves


def _is_scheduled(func: "tirx.PrimFunc") -> bool:
    return func.attrs is not None and SCHEDULED_ATTR in func.attrs and bool(
        func.attrs[SCHEDULED_ATTR])


def _const_extent(sch: "s_tir.Schedule", loop: "s_tir.schedule.LoopRV") -> int | None:
    from tvm import tirx

    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def _extent_key(sch: "s_tir.Schedule", loop: "s_tir.schedule.LoopRV") -> int | str:
    """A loop's extent: its value, or a symbolic one's expression (to compare two loops)."""
    ext = _const_extent(sch, loop)
    return ext if ext is not None else str(sch.get(loop).extent)


def _schedule_block(sch: "s_tir.Schedule", block: "s_tir.schedule.SBlockRV"
                    ) -> list[int] | None:
    """Parallel outer spatial loops + vectorized innermost spatial loop for one block. The
    extents of the outer loops where they became the parallel loop of an elementwise block
    (each task then writes one run of the innermost axis), else None."""
    from tvm import tirx

    loops = sch.get_loops(block)
    if not loops:
        return None
    iter_vars = sch.get(block).iter_vars
    if len(iter_vars) != len(loops):
        return None  # not the one-loop-per-block-var form that legalized ops come in
    # LegalizeOps/FuseTIR emit trivial bindings: loop i drives block var i.
    kinds = ["R" if iv.iter_type == tirx.IterVar.CommReduce else
             "S" if iv.iter_type == tirx.IterVar.DataPar else "O" for iv in iter_vars]
    if "O" in kinds:
        return None

    spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds) if k == "R"]
    if not spatial:
        return None
    inner = spatial[-1]
    inner_ext = _const_extent(sch, inner)
    outer = spatial[:-1]
    if reduce:
        sch.reorder(*outer, *reduce, inner)
    total, symbolic = 1, False
    for lp in spatial:
        ext = _const_extent(sch, lp)
        symbolic |= ext is None
        total *= ext or 1
    # a symbolic extent (a dynamic model's batch x seq) is taken to be large
    tasks = None
    if total >= MIN_PARALLEL or symbolic:
        if outer:
            if not reduce and not symbolic:
                tasks = [_const_extent(sch, lp) for lp in outer]
            par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            sch.parallel(par)
        elif inner_ext is not None and inner_ext > MAX_VECTOR:
            par, inner = sch.split(inner, [None, MAX_VECTOR])
            sch.parallel(par)
            inner_ext = MAX_VECTOR
    # TVM 0.27 lowers a vectorized store into a bool buffer as int8 lanes and then refuses it
    # (dtype mismatch on BufferStore): blocks writing masks stay scalar (reading one is fine).
    # (A block's regions name their buffer ``source`` in 0.27: reading ``.buffer`` raised
    # here and left every block unvectorized.)
    if inner_ext is not None and inner_ext > 1 and not _writes_bool(sch, block):
        if inner_ext > MAX_VECTOR and inner_ext % MAX_VECTOR == 0:
            _, inner = sch.split(inner, [None, MAX_VECTOR])
        if inner_ext <= MAX_VECTOR or inner_ext % MAX_VECTOR == 0:
            try:
                sch.vectorize(inner)
            except Exception:  # noqa: BLE001 - e.g. a data-dependent index; stay scalar
                pass
    if reduce:
        sch.decompose_reduction(block, reduce[0])
    return tasks


def _is_spatial(sch: "s_tir.Schedule", block: "s_tir.schedule.SBlockRV") -> bool:
    from tvm import tirx

    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _inline_intermediates(sch: "s_tir.Schedule") -> None:
    """Inline every intermediate spatial block that is a pure data move (its value one
    buffer load), or that one spatial block consumes; repeated until nothing changes."""
    import tvm
    from tvm import tirx

    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if not _is_spatial(sch, block):
                continue
            body = sch.get(block).body
            moves = (isinstance(body, tirx.BufferStore)
                     and isinstance(body.value, tvm.ir.expr.TensorLoad))
            consumers = sch.get_consumers(block)
            if not consumers:
                continue          # writes an output
            if not moves and not (len(consumers) == 1 and _is_spatial(sch, consumers[0])):
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - e.g. an index the consumer cannot substitute
                continue
            changed = True
            break


def _writes_bool(sch: "s_tir.Schedule", block: "s_tir.schedule.SBlockRV") -> bool:
    return any(str(r.source.dtype) == "bool" for r in sch.get(block).writes)


def _reduces_contiguous(block: "tirx.Block", var: "tirx.Var") -> bool:
    """Whether ``block`` reads along ``var`` only in the last (contiguous) index of each
    buffer, and in at least one: a row reduction, not a strided one over a leading axis."""
    from tvm import tirx

    found = False
    for read in block.reads:
        for i, rng in enumerate(read.region):
            if any(v.same_as(var) for v in tirx.analysis.undefined_vars(rng.min)):
                if i != len(read.region) - 1:
                    return False
                found = True
    return found


def schedule_rows(func: "tirx.PrimFunc") -> "tirx.PrimFunc | None":
    """Rule 1 of the module docstring; None when ``func`` is not row-wise."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    _inline_intermediates(sch)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))

    out = blocks[-1]
    out_loops = sch.get_loops(out)
    depth = len(out_loops) - 1
    # a symbolic extent (a dynamic model's batch x seq) is compared as its expression
    rows = [_extent_key(sch, lp) for lp in out_loops[:depth]]
    if depth < 1:
        return None
    reductions = []
    for block in blocks:
        loops, ivs = sch.get_loops(block), sch.get(block).iter_vars
        if (len(loops) not in (depth, depth + 1) or len(ivs) != len(loops)
                or [_extent_key(sch, lp) for lp in loops[:depth]] != rows
                or any(iv.iter_type != tirx.IterVar.DataPar for iv in ivs[:depth])):
            return None
        if ivs[-1].iter_type == tirx.IterVar.CommReduce:
            if not _reduces_contiguous(sch.get(block), ivs[-1].var):
                return None
            reductions.append(block)
    if not reductions or any(_writes_bool(sch, b) for b in reductions):
        return None
    factored = set()
    for block in reductions:
        inner = sch.get_loops(block)[-1]
        extent = _const_extent(sch, inner) or 1
        if extent % MAX_VECTOR == 0:
            # a row of one vector is two half vectors: a split of one whole vector leaves a
            # loop of extent 1 outside the lanes, which the reorder below cannot pass
            width = MAX_VECTOR if extent > MAX_VECTOR else MAX_VECTOR // 2
            _, lanes = sch.split(inner, [None, width])
            factored.add(sch.get(sch.rfactor(lanes, factor_axis=0)).name_hint)
    out_loops = sch.get_loops(out)
    row = sch.fuse(*out_loops[:depth]) if depth > 1 else out_loops[0]
    for block in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
        sch.compute_at(block, row)
    symbolic = not all(isinstance(r, int) for r in rows)
    total = math.prod(r for r in rows if isinstance(r, int))
    if symbolic or (total > 1 and total * (_const_extent(sch, sch.get_loops(out)[-1]) or 1)
                    >= MIN_PARALLEL):
        sch.parallel(row)
    for block in sch.get_child_blocks(row):
        loops = sch.get_loops(block)
        if len(loops) < 2 or _writes_bool(sch, block):
            continue
        if sch.get(block).name_hint in factored:      # (row, lanes, k / lanes): lanes inside
            sch.reorder(loops[-1], loops[-2])
            loops = sch.get_loops(block)
            sch.vectorize(loops[-1])
            sch.decompose_reduction(block, loops[-2])
        elif _is_spatial(sch, block):
            if (_const_extent(sch, loops[-1]) or 1) % MAX_VECTOR == 0:
                _, lanes = sch.split(loops[-1], [None, MAX_VECTOR])
                sch.vectorize(lanes)
    return sch.mod["main"]


def _trailing_reads(block: "tirx.Block", reduce_vars: list, extents: list[int]) -> bool:
    """Whether every read of ``block`` that ``reduce_vars`` index reads them, in order, as its
    last indices over whole trailing axes (so the fused reduction walks contiguous memory)."""
    from tvm import tirx

    m, found = len(reduce_vars), False
    for read in block.reads:
        used = [i for i, rng in enumerate(read.region) if any(
            v.same_as(rv) for v in tirx.analysis.undefined_vars(rng.min) for rv in reduce_vars)]
        if not used:
            continue
        tail = read.region[-m:]
        shape = [int(d) if isinstance(d, tirx.IntImm) else d for d in read.source.shape[-m:]]
        if (used != list(range(len(read.region) - m, len(read.region)))
                or not all(isinstance(r.min, tirx.Var) and r.min.same_as(v)
                           for r, v in zip(tail, reduce_vars))
                or shape != extents):
            return False
        found = True
    return found


def schedule_tail_reduction(func: "tirx.PrimFunc") -> "tirx.PrimFunc | None":
    """One reduction over the trailing axes of its input (global average / max pooling, an SE
    block's squeeze, ``ReduceMean`` over H and W), followed by elementwise blocks: the
    reduction axes fused into one contiguous walk, split into 16 (or 8, 4) vector lanes with
    ``rfactor`` (a vector accumulator, not one dependent scalar add per element: DLight's
    ``Reduction`` rule keeps the scalar chain), one parallel loop over what it keeps. None
    when ``func`` is not of that form."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    _inline_intermediates(sch)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if not _is_spatial(sch, b)]
    if len(reductions) != 1 or _writes_bool(sch, reductions[0]):
        return None
    red, tail = reductions[0], [b for b in blocks if _is_spatial(sch, b)]
    loops, ivs = sch.get_loops(red), sch.get(red).iter_vars
    kinds = "".join("R" if iv.iter_type == tirx.IterVar.CommReduce else
                    "S" if iv.iter_type == tirx.IterVar.DataPar else "O" for iv in ivs)
    m = kinds.count("R")
    if (len(loops) != len(ivs) or m in (0, len(ivs))
            or kinds != "S" * (len(ivs) - m) + "R" * m):
        return None
    extents = [_const_extent(sch, lp) for lp in loops]
    width = next((w for w in (MAX_VECTOR, 8, 4) if None not in extents
                  and math.prod(extents[-m:]) % w == 0), None)
    if width is None:
        return None
    if not _trailing_reads(sch.get(red), [iv.var for iv in ivs[-m:]], extents[-m:]):
        return None
    reduce = loops[-m:]
    k = sch.fuse(*reduce) if m > 1 else reduce[0]
    _, lanes = sch.split(k, [None, width])
    rf = sch.rfactor(lanes, factor_axis=0)
    spatial = sch.get_loops(red)[:-1]
    row = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    sch.compute_at(rf, row)
    lanes, *walk = sch.get_loops(rf)[1:]           # (row, lanes, reduction loops)
    sch.reorder(*walk, lanes)                       # lanes inside: a vector accumulator
    if math.prod(extents[:-m]) > 1 and math.prod(extents) >= MIN_PARALLEL:
        sch.parallel(row)
    sch.vectorize(lanes)
    sch.decompose_reduction(rf, walk[0])
    for block in tail:
        try:
            _schedule_block(sch, block)
        except Exception:  # noqa: BLE001 - an elementwise block stays as it is: correct
            continue
    return sch.mod["main"]


def schedule_generic(func: "tirx.PrimFunc") -> "tirx.PrimFunc | None":
    """Our loop-nest rule applied to every block of ``func``; None when it does not apply."""
    from tvm import relax, s_tir

    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except s_tir.ScheduleError:  # no root block: not a TE/legalized function
        return None
    if not blocks:
        return None
    _inline_intermediates(sch)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    tasks = None
    for block in blocks:
        try:  # each primitive is atomic, so a failure leaves a valid, partly scheduled block
            tasks = _schedule_block(sch, block)
        except Exception:  # noqa: BLE001
            continue
    # a pure reshape stays recognizable: the VM turns it into a view of its input
    if len(blocks) != 1 or tasks is None or relax.analysis.has_reshape_pattern(func):
        return sch.mod["main"]
    # one elementwise block (a pad, a copy, an activation): each task writes one run of the
    # output's last axis; prefetch it for writing a few tasks ahead (``prefetch_writes``)
    (written,) = sch.get(blocks[0]).writes
    extents = [int(d) for d in written.source.shape]

    def box(task):
        index = []
        for extent in reversed(tasks):
            index.append((task % extent, 1))
            task = task // extent
        return [*index[::-1], (0, extents[-1])]
    return prefetch_writes(sch.mod["main"], box, output=written.source.name)


def schedule_function(func: "tirx.PrimFunc", target: "Target") -> "tirx.PrimFunc":
    """Best available generic schedule for ``func`` (unchanged on failure), marked scheduled."""
    from tvm.s_tir import dlight

    try:
        scheduled = schedule_rows(func)
    except Exception:  # noqa: BLE001 - not row-wise after all: the next rule
        scheduled = None
    if scheduled is None:
        try:
            scheduled = schedule_tail_reduction(func)
        except Exception:  # noqa: BLE001 - not a trailing-axes reduction: the next rule
            scheduled = None
    if scheduled is not None:
        return scheduled.with_attr(SCHEDULED_ATTR, True).with_attr(STRATEGY_ATTR, NAME)
    try:
        with target:
            mod = dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction())(
                _as_module(func))
        candidate = mod["main"]
        if _is_scheduled(candidate):
            scheduled = candidate
    except Exception:  # noqa: BLE001 - a library rule that does not fit: try ours
        scheduled = None
    if scheduled is None:
        try:
            scheduled = schedule_generic(func)
        except Exception:  # noqa: BLE001 - leave it unscheduled rather than fail the build
            scheduled = None
    if scheduled is None:
        scheduled = func
    return scheduled.with_attr(SCHEDULED_ATTR, True).with_attr(STRATEGY_ATTR, NAME)


def _as_module(func: "tirx.PrimFunc") -> "ir.IRModule":
    from tvm import ir

    return ir.IRModule({"main": func})


def fallback_pass(target: "Target"):
    """Module pass: ``schedule_function`` on every PrimFunc not yet scheduled."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="SparsecFallbackSchedule")
    def _pass(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        from sparsec import progress

        todo = [(gv, func) for gv, func in mod.functions_items()
                if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func)]
        updates = {}
        with progress.Progress(progress.current(), "generic schedules", len(todo),
                               "kernels") as done:
            for gv, func in todo:
                updates[gv] = schedule_function(func, target)
                done.step(detail=gv.name_hint)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
