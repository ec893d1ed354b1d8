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

``pool2d_nchw`` is the same kernel without weights: max pooling (the plane padded with the
lowest float, taps combined by ``max``) and average pooling (zero padded, taps summed, then
divided by the window size, or by the window's taps inside the input when padding does not
count). TVM's generic schedule reads a stride-2 window as scalars: ResNet-18's 3x3 stride-2
max pool over 32x112x112 ran 166 us alone on one thread, ONNX Runtime's 33 us.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import (VEC_LANES, Activation, epilogue_func, finish,
                                            prefetch_writes, vector_pad)

if TYPE_CHECKING:
    from tvm import s_tir, tirx

    from sparsec.targets.kernels.conv2d import ConvShape

NAME = "depthwise_nchw"
POOL_NAME = "pool2d_nchw"
POOLS = ("max", "avg")
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
          act: Activation | None = None, residual: bool = False, max_acc: int = MAX_ACC,
          pool: str | None = None, count_include_pad: bool = True) -> "tirx.PrimFunc":
    """The scheduled PrimFunc ``(X[N,C,H,W], W[C,KH,KW] [, B[C]] [, R[N,C,OH,OW]], Y)``; with
    ``pool`` (one of ``POOLS``) ``(X, Y)``, the pooling window being the conv's (average
    pooling: dilation 1)."""
    import numpy as np
    from tvm import s_tir, te, tirx

    (sh, sw), (dh, dw) = s.stride, s.dilation
    pt, pl, _, _ = s.padding
    if pool not in (None, *POOLS) or (pool == "avg" and (dh, dw) != (1, 1)):
        raise ValueError(f"no {pool} pooling with dilation {s.dilation}")
    oh, ow = s.out_hw
    p = plan(oh, ow, max_acc=max_acc)
    owp = p.padded_width(ow)
    # padded-input rows / columns the (width-padded) output reads, and one stride phase's
    hp = (oh - 1) * sh + (s.kh - 1) * dh + 1
    wp = (owp - 1) * sw + (s.kw - 1) * dw + 1
    hq, wq = -(-hp // sh), -(-wp // sw)

    x = te.placeholder((s.n, s.ic, s.h, s.w), dtype, name="X")
    w = None if pool else te.placeholder((s.ic, s.kh, s.kw), dtype, name="W")
    b = te.placeholder((s.ic,), dtype, name="B") if bias else None
    res = te.placeholder((s.n, s.ic, oh, ow), dtype, name="R") if residual else None
    fill = float(np.finfo(dtype).min) if pool == "max" else 0.0
    outside = tirx.const(fill, dtype)

    def phase_value(n, c, py, px, i, j):
        r, q = i * sh + py - pt, j * sw + px - pl
        return tirx.if_then_else(tirx.all(r >= 0, r < s.h, q >= 0, q < s.w), x[n, c, r, q],
                                 outside)

    xp = te.compute((s.n, s.ic, sh, sw, hq, wq), phase_value, name="pad")
    ry = te.reduce_axis((0, s.kh), name="ry")
    rx = te.reduce_axis((0, s.kw), name="rx")

    def tap(n, c, i, j):   # padded row i*sh + ry*dh: phase (ry*dh) % sh, row i + (ry*dh) // sh
        return xp[n, c, (ry * dh) % sh, (rx * dw) % sw, i + (ry * dh) // sh, j + (rx * dw) // sw]

    def combine(n, c, i, j):
        if pool == "max":
            return te.max(tap(n, c, i, j), axis=[ry, rx])
        if pool == "avg":
            return te.sum(tap(n, c, i, j), axis=[ry, rx])
        return te.sum(tap(n, c, i, j) * w[c, ry, rx], axis=[ry, rx])

    acc = te.compute((s.n, s.ic, oh, owp), combine, name="acc")

    def value(n, c, i, j):
        if pool != "avg":
            return acc[n, c, i, j]
        if count_include_pad:
            return acc[n, c, i, j] * tirx.const(1.0 / (s.kh * s.kw), dtype)

        def inside(o, stride, pad, k, size):   # taps of window o inside [0, size)
            lo = o * stride - pad
            return tirx.min(lo + k, size) - tirx.max(lo, 0)
        taps = inside(i, sh, pt, s.kh, s.h) * inside(j, sw, pl, s.kw, s.w)
        return acc[n, c, i, j] / tirx.Cast(dtype, taps)

    sch = s_tir.Schedule(epilogue_func(
        [x] if pool else [x, w], value, (s.n, s.ic, oh, ow), dtype, b, res, act))
    blk = sch.get_sblock("acc")
    n, c, i, j, ky, kx = sch.get_loops(blk)
    io, ii = sch.split(i, [None, p.rows])
    jo, jv, jl = sch.split(j, [None, p.vecs, p.lanes])
    sch.reorder(n, c, io, jo, ky, kx, ii, jv, jl)
    sch.set_scope(blk, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, jo)
    vectorize_write_back(sch, out, ow, p)
    sch.vectorize(jl)
    sch.unroll(jv)
    sch.unroll(ii)
    sch.unroll(kx)
    sch.unroll(ky)
    # one channel's padded plane per task, still in cache when read
    sch.compute_at(sch.get_sblock("pad"), c)
    sch.parallel(sch.fuse(n, c))
    sch.decompose_reduction(blk, ky)
    func = vector_pad(finish(sch, POOL_NAME if pool else NAME), s,
                      x_row=lambda lead, py, i: (lead[:2], i * sh + py - pt), fill=fill)
    # a task writes one output plane
    return prefetch_writes(func, lambda v: [(v // s.ic, 1), (v % s.ic, 1), (0, oh), (0, ow)])


def vectorize_write_back(sch: "s_tir.Schedule", out, ow: int, p: DepthwisePlan) -> None:
    """Vectorize the write-back ``out`` of a ``p`` tile, placed at the tile's column block:
    in vectors of the tile's lanes when the row is whole vectors, else, when the block is the
    whole row, as one vector of the row's width (LLVM splits a 14-wide store into 8 + 4 + 2
    lanes); a wider row with a tail stays scalar."""
    if ow % p.lanes == 0:
        _, lane = sch.split(sch.get_loops(out)[-1], [None, p.lanes])
        sch.vectorize(lane)
    elif p.padded_width(ow) == p.vecs * p.lanes:
        sch.vectorize(sch.get_loops(out)[-1])
