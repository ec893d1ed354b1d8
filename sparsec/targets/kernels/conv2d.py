"""``conv2d_nchw_packed``: direct NCHW/OIHW conv2d (groups=1) with constant, pre-packed weights.

Packing: W[OC, IC, KH, KW] is rewritten at compile time to ``[ceil(OC/16), IC, KH, KW, 16]``
(zero padded), so the 16 output channels of a block are one contiguous pair of ymm vectors for
every (ic, kh, kw).

The conv is the GEMM micro-kernel again, with "rows" = a strip of ``T`` output pixels along the
output width and "columns" = 16 output channels:
  pad X once (plus extra right padding so OW rounds up to a multiple of T; no predicates inside)
  for (n, ocb, oh) in parallel:            # plenty of independent tasks, W panel reused per row
    for owo in OWp/T:
      acc[T, 16] = 0                       # 2*T ymm accumulators
      for ic: for kh: for kw in unroll:
        for t in unroll(T): for oc in vectorize(16):
          acc[t, oc] += Xpad[n, ic, oh*s+kh*d, (owo*T+t)*s+kw*d] * Wp[ocb, ic, kh, kw, oc]
      Y[n, ocb*16 + oc, oh, owo*T + t] = epilogue(acc)   # masked at the OC / OW tails
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import finish

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

NAME = "conv2d_nchw_packed"
LANES = 16
MAX_TILE = 6  # 6 pixels x 2 vectors = 12 accumulators: the most AVX2 holds without spilling


@dataclass(frozen=True)
class ConvShape:
    """Static conv2d geometry (NCHW / OIHW, groups = 1)."""

    n: int
    ic: int
    h: int
    w: int
    oc: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        (sh, sw), (dh, dw) = self.stride, self.dilation
        pt, pl, pb, pr = self.padding
        oh = (self.h + pt + pb - (self.kh - 1) * dh - 1) // sh + 1
        ow = (self.w + pl + pr - (self.kw - 1) * dw - 1) // sw + 1
        return oh, ow


def pick_width_tile(ow: int) -> int:
    """Output-width strip ``T``: the size <= MAX_TILE that wastes the fewest padded columns
    (ties -> the larger strip, more FMAs per weight load)."""
    best, best_waste = 1, None
    for t in range(MAX_TILE, 0, -1):
        waste = (-ow) % t
        # a narrow strip pays for its loads; accept a few wasted columns for a wider one
        score = waste / ow + (0.0 if t >= 4 else 0.25)
        if best_waste is None or score < best_waste:
            best, best_waste = t, score
    return best


def pack_weight(w_oihw: "np.ndarray", lanes: int = LANES) -> "np.ndarray":
    """[OC, IC, KH, KW] -> [ceil(OC/lanes), IC, KH, KW, lanes], zero padded on OC."""
    import numpy as np

    oc = w_oihw.shape[0]
    ocb = -(-oc // lanes)
    padded = np.zeros((ocb * lanes,) + w_oihw.shape[1:], dtype=w_oihw.dtype)
    padded[:oc] = w_oihw
    return np.ascontiguousarray(
        padded.reshape((ocb, lanes) + w_oihw.shape[1:]).transpose(0, 2, 3, 4, 1)
    )


def build(s: ConvShape, dtype: str = "float32", bias: bool = False,
          relu: bool = False, residual: bool = False) -> "tirx.PrimFunc":
    """The scheduled PrimFunc ``(X, Wp[OCB,IC,KH,KW,16] [, B[OC]] [, R[N,OC,OH,OW]], Y)``."""
    from tvm import s_tir, te, tirx

    (sh, sw), (dh, dw) = s.stride, s.dilation
    pt, pl, pb, pr = s.padding
    oh, ow = s.out_hw
    t = pick_width_tile(ow)
    owp = -(-ow // t) * t
    ocb = -(-s.oc // LANES)
    # rows / columns of padded input the (width-padded) output reads
    hp = max(s.h + pt + pb, (oh - 1) * sh + (s.kh - 1) * dh + 1)
    wp = max(s.w + pl + pr, (owp - 1) * sw + (s.kw - 1) * dw + 1)

    x = te.placeholder((s.n, s.ic, s.h, s.w), dtype, name="X")
    w = te.placeholder((ocb, s.ic, s.kh, s.kw, LANES), dtype, name="Wp")
    b = te.placeholder((s.oc,), dtype, name="B") if bias else None
    res = te.placeholder((s.n, s.oc, oh, ow), dtype, name="R") if residual else None
    needs_pad = (hp, wp) != (s.h, s.w)
    if needs_pad:
        zero = tirx.const(0, dtype)
        xp = te.compute(
            (s.n, s.ic, hp, wp),
            lambda n, c, i, j: tirx.if_then_else(
                tirx.all(i >= pt, i < s.h + pt, j >= pl, j < s.w + pl),
                x[n, c, i - pt, j - pl], zero),
            name="pad",
        )
    else:
        xp = x
    rc = te.reduce_axis((0, s.ic), name="rc")
    ry = te.reduce_axis((0, s.kh), name="ry")
    rx = te.reduce_axis((0, s.kw), name="rx")
    acc = te.compute(
        (s.n, ocb, oh, owp, LANES),
        lambda n, cb, i, j, cl: te.sum(
            xp[n, rc, i * sh + ry * dh, j * sw + rx * dw] * w[cb, rc, ry, rx, cl],
            axis=[rc, ry, rx]),
        name="acc",
    )

    def epilogue(n, c, i, j):
        v = acc[n, c // LANES, i, j, c % LANES]
        if b is not None:
            v = v + b[c]
        if res is not None:
            v = v + res[n, c, i, j]
        if relu:
            v = tirx.max(v, tirx.const(0, dtype))
        return v

    y = te.compute((s.n, s.oc, oh, ow), epilogue, name="Y")
    args = [x, w] + [t for t in (b, res) if t is not None] + [y]
    sch = s_tir.Schedule(te.create_prim_func(args))

    blk = sch.get_sblock("acc")
    n, cb, i, j, cl, kc, ky, kx = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, t])
    sch.reorder(n, cb, i, jo, kc, ky, kx, ji, cl)
    sch.set_scope(blk, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, jo)
    sch.vectorize(cl)
    sch.unroll(ji)
    sch.unroll(kx)
    sch.parallel(sch.fuse(n, cb, i))
    if needs_pad:
        pad = sch.get_sblock("pad")
        pn, pc, _, pj = sch.get_loops(pad)
        sch.parallel(sch.fuse(pn, pc))
        try:  # the bounds test is a select; LLVM vectorises it when TVM accepts the loop
            sch.vectorize(pj)
        except s_tir.ScheduleError:
            pass
    sch.decompose_reduction(blk, kc)
    return finish(sch, NAME)
