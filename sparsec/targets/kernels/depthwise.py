"""``depthwise_nchw``: depthwise conv2d (groups = in = out channels) in NCHW with constant
weights, the 3x3 / 5x5 layers of MobileNet-style networks.

A depthwise conv does ``KH*KW`` MACs per output element, so it is bound by moving the
activation, not by FMAs: the kernel reads each input plane once into a small buffer that stays
in cache and writes each output element once, with the arithmetic in vector registers between:

  for (n, c) in parallel:
    pad this channel's plane (zeros; for stride > 1 split into stride phases, so that a tap
    reads ``OW`` consecutive floats) into a per-task buffer: vector copies, a stride phase
    gathered by contiguous loads and a shuffle (``vector_pad``)
    for oh-block of ``rows`` rows: for ow-block of ``vecs`` x 8 lanes:
      acc[rows, vecs*8] = 0                                 # rows*vecs ymm accumulators
      for kh, kw unrolled: acc += Xphase[... contiguous along ow] * W[c, kh, kw]  # broadcast
      Y[n, c, oh, ow] = epilogue(acc)                       # masked at the OW tail

The output width is padded up to whole ow-blocks inside the kernel (the padded columns read
zeros and are never written), so no predicate sits in the FMA loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import (VEC_LANES, Activation, epilogue_func, finish,
                                            wide_vectors)

if TYPE_CHECKING:
    from tvm import tirx

    from sparsec.targets.kernels.conv2d import ConvShape

NAME = "depthwise_nchw"
#: accumulator vectors per register tile: half of AVX2's 16 ymm, the rest hold input rows
MAX_ACC = 8


@dataclass(frozen=True)
class DepthwisePlan:
    """Register tile: ``rows`` output rows x ``vecs`` vectors of ``lanes`` output pixels."""

    rows: int
    vecs: int
    lanes: int = VEC_LANES

    def padded_width(self, ow: int) -> int:
        block = self.vecs * self.lanes
        return -(-ow // block) * block


def plan(oh: int, ow: int, lanes: int = VEC_LANES, max_acc: int = MAX_ACC) -> DepthwisePlan:
    """Whole output rows when they fit in ``max_acc`` vectors (several rows per tile then, so
    a loaded input row serves up to KH output rows); wider rows in blocks of 4..8 vectors,
    the block size wasting the fewest padded columns."""
    nv = -(-ow // lanes)
    if nv <= max_acc:
        vecs = nv
    else:
        vecs = min(range(max_acc, max_acc // 2 - 1, -1), key=lambda v: (-nv) % v)
    rows = max(r for r in range(1, max_acc // vecs + 1) if oh % r == 0)
    return DepthwisePlan(rows, vecs, lanes)


def matches(s: "ConvShape", groups: int) -> bool:
    """Whether the conv is depthwise with one filter per channel (multiplier 1)."""
    return groups == s.ic == s.oc and groups > 1


def build(s: "ConvShape", dtype: str = "float32", bias: bool = False,
          act: Activation | None = None, residual: bool = False, max_acc: int = MAX_ACC
          ) -> "tirx.PrimFunc":
    """The scheduled PrimFunc ``(X[N,C,H,W], W[C,KH,KW] [, B[C]] [, R[N,C,OH,OW]], Y)``."""
    from tvm import s_tir, te, tirx

    (sh, sw), (dh, dw) = s.stride, s.dilation
    pt, pl, _, _ = s.padding
    oh, ow = s.out_hw
    p = plan(oh, ow, max_acc=max_acc)
    owp = p.padded_width(ow)
    # padded-input rows / columns the (width-padded) output reads, and one stride phase's
    hp = (oh - 1) * sh + (s.kh - 1) * dh + 1
    wp = (owp - 1) * sw + (s.kw - 1) * dw + 1
    hq, wq = -(-hp // sh), -(-wp // sw)

    x = te.placeholder((s.n, s.ic, s.h, s.w), dtype, name="X")
    w = te.placeholder((s.ic, s.kh, s.kw), dtype, name="W")
    b = te.placeholder((s.ic,), dtype, name="B") if bias else None
    res = te.placeholder((s.n, s.ic, oh, ow), dtype, name="R") if residual else None
    zero = tirx.const(0, dtype)

    def phase_value(n, c, py, px, i, j):
        r, q = i * sh + py - pt, j * sw + px - pl
        return tirx.if_then_else(tirx.all(r >= 0, r < s.h, q >= 0, q < s.w), x[n, c, r, q], zero)

    xp = te.compute((s.n, s.ic, sh, sw, hq, wq), phase_value, name="pad")
    ry = te.reduce_axis((0, s.kh), name="ry")
    rx = te.reduce_axis((0, s.kw), name="rx")
    # padded row i*sh + ry*dh lies in phase (ry*dh) % sh at row i + (ry*dh) // sh
    acc = te.compute(
        (s.n, s.ic, oh, owp),
        lambda n, c, i, j: te.sum(
            xp[n, c, (ry * dh) % sh, (rx * dw) % sw, i + (ry * dh) // sh, j + (rx * dw) // sw]
            * w[c, ry, rx], axis=[ry, rx]),
        name="acc")

    sch = s_tir.Schedule(epilogue_func(
        [x, w], lambda n, c, i, j: acc[n, c, i, j], (s.n, s.ic, oh, ow), dtype, b, res, act))
    blk = sch.get_sblock("acc")
    n, c, i, j, ky, kx = sch.get_loops(blk)
    io, ii = sch.split(i, [None, p.rows])
    jo, jv, jl = sch.split(j, [None, p.vecs, p.lanes])
    sch.reorder(n, c, io, jo, ky, kx, ii, jv, jl)
    sch.set_scope(blk, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, jo)
    if ow % p.lanes == 0:
        _, lane = sch.split(sch.get_loops(out)[-1], [None, p.lanes])
        sch.vectorize(lane)
    sch.vectorize(jl)
    sch.unroll(jv)
    sch.unroll(ii)
    sch.unroll(kx)
    sch.unroll(ky)
    # one channel's padded plane per task, still in cache when read
    sch.compute_at(sch.get_sblock("pad"), c)
    sch.parallel(sch.fuse(n, c))
    sch.decompose_reduction(blk, ky)
    return vector_pad(finish(sch, NAME), s, 16 if wide_vectors() else VEC_LANES,
                      lambda lead, py, i: (lead[0], lead[1], i * sh + py - pt))


def vector_pad(func: "tirx.PrimFunc", s: "ConvShape", lanes: int, x_row) -> "tirx.PrimFunc":
    """``func`` with its scheduled ``pad`` block (stride phases of the zero-padded input,
    ``P[*lead, py, px, i, j] = X[n, c, row, j*sw + px - pl]`` or 0 outside ``X``) rewritten
    as vector code: TVM scalarizes that block (its bounds test makes the vector loop
    conditional), which cost a stride-2 depthwise conv 3/4 of its time. Here each phase
    row's in-bounds columns are copied in vectors of ``lanes`` (then halves, then scalars)
    and only the border is zeroed; a stride-``sw`` phase is gathered by ``sw`` contiguous
    loads and one shuffle (``vpermt2ps`` on AVX-512), never reading past the row.

    ``x_row(lead, py, i)`` gives ``(n, c, row)`` of ``X`` for phase row ``i`` of phase
    ``py``, ``lead`` being the pad block's index values before ``py``."""
    from tvm import s_tir, tirx

    def replace(stmt):
        if isinstance(stmt, tirx.For):
            inner = stmt.body
            while isinstance(inner, tirx.For):
                inner = inner.body
            if isinstance(inner, s_tir.SBlockRealize) and inner.block.name_hint == "pad":
                return _pad_block(func, inner, s, lanes, x_row)
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind,
                            replace(stmt.body), stmt.thread_binding, stmt.annotations)
        if isinstance(stmt, tirx.SeqStmt):
            return tirx.SeqStmt([replace(x) for x in stmt.seq])
        if isinstance(stmt, s_tir.SBlockRealize):
            return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, replace(stmt.block))
        if isinstance(stmt, s_tir.SBlock):
            return s_tir.SBlock(stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint,
                                replace(stmt.body), stmt.init, stmt.alloc_buffers,
                                stmt.match_buffers, stmt.annotations)
        return stmt

    body = replace(func.body)
    if body.same_as(func.body):
        raise ValueError("no scheduled 'pad' block to rewrite")
    return func.with_body(body)


def strided_load(x, prefix: list, start, stride: int, lanes: int) -> "tirx.PrimExpr":
    """``lanes`` elements ``x[*prefix, start + stride*k]`` as contiguous vector loads and a
    shuffle: ``stride`` loads of ``lanes``, the last one ending at the last element read (a
    strided vector load otherwise compiles to scalar loads or a gather)."""
    from tvm import tirx

    def load(at):
        return tirx.BufferLoad(x, [*prefix, tirx.Ramp(at, 1, lanes)])

    if stride == 1:
        return load(start)
    last = stride * (lanes - 1) + 1 - lanes
    offsets = [m * lanes for m in range(stride - 1)] + [last]
    split = (stride - 1) * lanes
    picks = [e if e < split else split + e - last for e in range(0, stride * lanes, stride)]
    return tirx.Shuffle([load(start + o) for o in offsets],
                        [tirx.IntImm("int32", p) for p in picks])


def _seq(stmts: list) -> "tirx.Stmt":
    from tvm import tirx

    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)


def _pad_block(func, realize, s: "ConvShape", lanes: int, x_row):
    """The opaque block that replaces the ``pad`` loop nest (see :func:`vector_pad`)."""
    from tvm import ir, s_tir, tirx

    (sh, sw), pl = s.stride, s.padding[1]
    store = realize.block.body
    p = store.buffer
    lead = list(realize.iter_values[:len(p.shape) - 4])
    hq, wq = (int(e) for e in p.shape[-2:])
    x = realize.block.reads[0].source
    zero = tirx.const(0, p.dtype)
    i32 = "int32"

    def loop(name, extent, make):
        v = tirx.Var(name, i32)
        return tirx.For(v, tirx.IntImm(i32, 0), tirx.IntImm(i32, extent),
                        tirx.ForKind.SERIAL, make(v))

    def zeros(ppre, lo, hi):
        return [] if hi <= lo else [
            loop("jz", hi - lo, lambda j: tirx.BufferStore(p, zero, [*ppre, j + lo]))]

    def phase_row(xpre, ppre, px):
        jlo = min(wq, max(0, -(-(pl - px) // sw)))          # first column j with q >= 0
        jhi = max(jlo, min(wq, (s.w - 1 - px + pl) // sw + 1))   # first with q >= W
        out, j, width = zeros(ppre, 0, jlo), jlo, lanes
        while width >= 4:
            blocks = (jhi - j) // width
            if blocks:
                def copy(b, j=j, width=width):
                    j0 = b * width + j
                    return tirx.BufferStore(
                        p, strided_load(x, xpre, j0 * sw + (px - pl), sw, width),
                        [*ppre, tirx.Ramp(j0, 1, width)])
                out.append(loop("jv", blocks, copy))
                j += blocks * width
            width //= 2
        if jhi > j:
            out.append(loop("js", jhi - j, lambda v, j=j: tirx.BufferStore(
                p, tirx.BufferLoad(x, [*xpre, (v + j) * sw + (px - pl)]), [*ppre, v + j])))
        return out + zeros(ppre, jhi, wq)

    def row(py, i):
        n, c, r = x_row(lead, py, i)
        inside = _seq([st for px in range(sw)
                       for st in phase_row([n, c, r], [*lead, py, px, i], px)])
        outside = _seq([st for px in range(sw) for st in zeros([*lead, py, px, i], 0, wq)])
        return tirx.IfThenElse(tirx.all(r >= 0, r < s.h), inside, outside)

    body = loop("py", sh, lambda py: loop("i", hq, lambda i: row(py, i)))
    n, c, _ = x_row(lead, 0, 0)
    whole = [ir.Range.from_min_extent(v, 1) for v in lead] + [
        ir.Range.from_min_extent(0, int(e)) for e in p.shape[len(lead):]]
    block = s_tir.SBlock(
        [], [tirx.BufferRegion(x, [ir.Range.from_min_extent(n, 1), ir.Range.from_min_extent(
            c, 1), ir.Range.from_min_extent(0, s.h), ir.Range.from_min_extent(0, s.w)])],
        [tirx.BufferRegion(p, whole)], "pad", body)
    return s_tir.SBlockRealize([], True, block)
