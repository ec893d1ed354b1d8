"""``conv1x1_dw_nchw``: a pointwise (1x1) conv and the depthwise conv that reads it, as one
kernel: MobileNetV2's inverted-residual "expansion -> depthwise" pair on a large map.

Run apart, the expansion writes the block's 6x-expanded activation and the depthwise conv
reads it back: at 112x112 that is 4.8 MB each way, more than the L2 caches hold, and inside
the whole network the pair ran 1.6x slower than alone (MobileNetV2's 16 -> 96 expansion and
its stride-2 depthwise conv: 721 us against 462 us). Fused, each task computes the expanded
rows its band of output rows reads, a few channels at a time, into a buffer that stays in
L1/L2, and the depthwise conv reads them from there:

  for (n, band of R output rows) in parallel:
    for block of OCT channels:
      E[OCT, band rows, W] = act_e(We[block] @ X[n, :, band rows, :] + be)   # GEMM tile
      for c in block:
        pad E[c] (zeros outside X; stride phases) into a small buffer         # vector_pad
        Y[n, c, band, :] = act_d(depthwise(...) + bd[c])                      # depthwise_nchw

The band's halo rows (the kernel height minus the stride) are expanded by both bands that
read them: 1/28 more expansion in MobileNetV2's 112x112 block on 2 cores (4 bands of 14 rows; the band
height is a tuning knob). Its 56x56 block runs faster apart (``MIN_PIXELS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels import depthwise
from sparsec.targets.kernels.common import (Activation, clip, epilogue_func, finish,
                                            pick_band, target_cores, vector_pad,
                                            wide_vectors)

if TYPE_CHECKING:
    from tvm import tirx

    from sparsec.targets.kernels.conv2d import ConvShape

NAME = "conv1x1_dw_nchw"
#: fused only where the expanded map has at least this many pixels: smaller maps fit in
#: cache apart, and every band would re-read the expansion weight. MobileNetV2 whole, 2
#: threads, Emerald Rapids, with the kernels' read and write prefetches: its 56x56 block apart
#: is faster (dense 24 -> 144: -2.6 to -4.3 %; pruned 12 -> 72: -1.5 to -2.1 %; there the
#: fused kernel takes 56 us alone and 66 in the chain, the two apart 35 and 49), its 112x112
#: block fused (pruned 8 -> 48 apart: +7.5 %, dense 16 -> 96: +1.1 %)
MIN_PIXELS = 64 * 64
#: expansion channels per register tile (x one vector of the row), best first
OCTS = (12, 8, 6, 4)
#: a band of one expanded channel (its rows, halo included, x the row) is kept under this
#: many bytes: the padding and depthwise steps re-read it from L1. Alone, 2 threads, Emerald
#: Rapids: bands of 14 output rows (a 112-wide plane of 29 rows, 13 KB) beat 28 rows (26 KB)
#: by 8-12 % (MobileNetV2's 16 -> 96 block, and pruned 8 -> 48), and beat 7 rows at 56x56
#: (24 -> 144: 174 -> 160 us; pruned 12 -> 72: 66 -> 55 us), where two bands a core left
#: 7 rows and a 1-in-7 halo
PLANE_BYTES = 16 * 1024
#: expansions of at most this many input channels get tiles of 4 channels, the others the
#: widest tile that pads the channels least: each channel block re-reads the band's input
#: rows (fewer, wider blocks read them less often), and a block's expanded rows are re-read
#: by the padding and depthwise steps (a narrow block's stay in L1), which weighs more where
#: the input is short. 112x112, 14-row bands, alone, 2 threads, Emerald Rapids, with the
#: kernels' prefetches, channels per tile 4 / 6 / 8 / 12: 8 -> 48 74 / 80 / 87 / - us,
#: 12 -> 72 151 / 167 / 131 / 127, 16 -> 96 259 / - / 203 / 195 (the whole MobileNetV2 at
#: 4 -> 12 channels: -1.9 %; pruned at 8 -> 4: -0.3 to -1.1 %). The rule before the
#: prefetches (at least 64 MACs an output: 8 -> 48 at 8 channels, 16 -> 96 at 4) had
#: measured the other way round.
SHORT_K = 8


@dataclass(frozen=True)
class Plan:
    """``rows`` output rows per band; the expansion tile ``oct`` channels x ``lanes``
    pixels."""

    rows: int
    oct: int
    lanes: int


def row_lanes(w: int) -> int | None:
    """The widest vector (of the target's, 16 or 8 lanes) that divides a row of ``w``."""
    return next((v for v in ((16, 8) if wide_vectors() else (8,)) if w % v == 0), None)


def worth_fusing(s: "ConvShape") -> bool:
    """Whether the expansion feeding the depthwise conv ``s`` is fused into it: large maps
    whose rows are whole vectors (the expansion's row is read as vectors)."""
    return s.h * s.w >= MIN_PIXELS and row_lanes(s.w) is not None


def plan(s: "ConvShape", k: int, rows: int | None = None) -> Plan:
    """The plan for the depthwise conv ``s`` (its input: the expansion's ``s.ic`` channels,
    from ``k`` input channels). Band height, unless given: the most rows whose expanded band
    of one channel fits ``PLANE_BYTES``, in bands a multiple of the target's cores (taller
    bands expand fewer halo rows); else ``common.pick_band``. The expansion tile: 4
    channels for ``k`` up to ``SHORT_K``, else the ``OCTS`` entry that pads the channels
    least, then the widest; one vector of the input row wide."""
    oh, w = s.out_hw[0], s.w
    if rows is None:
        cores = target_cores()
        fit = [r for r in range(1, oh + 1) if oh % r == 0 and (oh // r) % cores == 0
               and band_rows(s, r) * w * 4 <= PLANE_BYTES]
        rows = max(fit) if fit else pick_band(oh, cores)
    oct_ = 4 if k <= SHORT_K else min(OCTS, key=lambda t: (-(-s.ic // t) * t, -t))
    return Plan(rows, oct_, row_lanes(w) or 8)


def band_rows(s: "ConvShape", rows: int) -> int:
    """Input rows a band of ``rows`` output rows reads (halo included)."""
    return (rows - 1) * s.stride[0] + (s.kh - 1) * s.dilation[0] + 1


def build(s: "ConvShape", k: int, fplan: Plan, dtype: str = "float32",
          pw_bias: bool = False, pw_act: Activation | None = None, bias: bool = False,
          act: Activation | None = None) -> "tirx.PrimFunc":
    """``(X[N,K,H,W], We[CB,K,oct] [, Be[C]], Wd[C,KH,KW] [, B[C]], Y[N,C,OH,OW])``: ``We``
    packed by ``pointwise.pack_weight(W[C, K], oct)``; ``s`` is the depthwise conv's shape
    (its input being the expansion's output, ``C`` = ``s.ic`` channels)."""
    from tvm import s_tir, te, tirx

    (sh, sw), (dh, dw) = s.stride, s.dilation
    pt, pl, _, _ = s.padding
    oh, ow = s.out_hw
    c, rows, oct_, lanes = s.ic, fplan.rows, fplan.oct, fplan.lanes
    cb = -(-c // oct_)
    tasks = oh // rows
    hb = band_rows(s, rows)                        # expanded rows per band
    dp = depthwise.plan(rows, ow, lanes=row_lanes(ow) or 8)    # the depthwise tile
    owp = dp.padded_width(ow)
    hq = -(-hb // sh)                              # rows of one stride phase
    wq = -(-((owp - 1) * sw + (s.kw - 1) * dw + 1) // sw)
    x = te.placeholder((s.n, k, s.h, s.w), dtype, name="X")
    we = te.placeholder((cb, k, oct_), dtype, name="We")
    be = te.placeholder((c,), dtype, name="Be") if pw_bias else None
    wd = te.placeholder((c, s.kh, s.kw), dtype, name="Wd")
    b = te.placeholder((c,), dtype, name="B") if bias else None
    zero = tirx.const(0, dtype)

    def x_row(t, i):       # input row i of band t (clamped: rows outside X are padding)
        return tirx.max(tirx.min(t * (rows * sh) + i - pt, s.h - 1), 0)

    rk = te.reduce_axis((0, k), name="k")
    eacc = te.compute(
        (s.n, tasks, cb, oct_, hb, s.w),
        lambda n, t, jb, jl, i, q: te.sum(we[jb, rk, jl] * x[n, rk, x_row(t, i), q], axis=rk),
        name="eacc")

    def e_value(n, t, jb, jl, i, q):
        v = eacc[n, t, jb, jl, i, q]
        if be is not None:
            v = v + be[jb * oct_ + jl]
        return clip(v, pw_act, dtype)

    e = te.compute((s.n, tasks, cb, oct_, hb, s.w), e_value, name="E")

    def phase_value(n, t, ch, py, px, i, j):
        r, q = i * sh + py, j * sw + px - pl       # band row, input column
        row = t * (rows * sh) + r - pt
        return tirx.if_then_else(
            tirx.all(row >= 0, row < s.h, q >= 0, q < s.w, r < hb),
            e[n, t, ch // oct_, ch % oct_, tirx.min(r, hb - 1), q], zero)

    xp = te.compute((s.n, tasks, c, sh, sw, hq, wq), phase_value, name="pad")
    ry = te.reduce_axis((0, s.kh), name="ry")
    rx = te.reduce_axis((0, s.kw), name="rx")
    dacc = te.compute(
        (s.n, c, oh, owp),
        lambda n, ch, i, j: te.sum(
            xp[n, i // rows, ch, (ry * dh) % sh, (rx * dw) % sw, i % rows + (ry * dh) // sh,
               j + (rx * dw) // sw] * wd[ch, ry, rx], axis=[ry, rx]),
        name="dacc")
    inputs = [x, we] + ([be] if be is not None else []) + [wd]
    sch = s_tir.Schedule(epilogue_func(
        inputs, lambda n, ch, i, j: dacc[n, ch, i, j], (s.n, c, oh, ow), dtype, b, None, act))

    # depthwise: (n, band) in parallel; per channel block, per channel, depthwise_nchw's tile
    blk = sch.get_sblock("dacc")
    n, ch, i, j, ky, kx = sch.get_loops(blk)
    it, io, ii = sch.split(i, [None, rows // dp.rows, dp.rows])
    jo, jv, jl = sch.split(j, [None, dp.vecs, dp.lanes])
    chb, chl = sch.split(ch, [None, oct_])
    sch.reorder(n, it, chb, chl, io, jo, ky, kx, ii, jv, jl)
    sch.set_scope(blk, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, jo)
    depthwise.vectorize_write_back(sch, out, ow, dp)
    sch.vectorize(jl)
    sch.unroll(jv)
    sch.unroll(ii)
    sch.unroll(kx)
    sch.unroll(ky)
    sch.compute_at(sch.get_sblock("pad"), chl)

    # expansion: the block's channels for the band's rows, oct x one vector per register tile
    eblk = sch.get_sblock("E")
    sch.compute_at(eblk, chb)
    ejl, ei, eq = sch.get_loops(eblk)[-3:]
    eqo, eql = sch.split(eq, [None, lanes])
    sch.reorder(ei, eqo, ejl, eql)
    sch.vectorize(eql)
    ablk = sch.get_sblock("eacc")
    sch.compute_at(ablk, eqo)
    sch.set_scope(ablk, 0, "local")
    ajl, aq, ak = sch.get_loops(ablk)[-3:]
    sch.reorder(ak, ajl, aq)
    sch.vectorize(aq)
    sch.unroll(ajl)
    sch.parallel(sch.fuse(n, it))
    sch.decompose_reduction(ablk, ak)
    sch.decompose_reduction(blk, ky)

    def e_row(lead, py, i):   # phase row i of phase py: a row of E, and of X (bounds)
        n, t, ch = lead
        return [n, t, ch // oct_, ch % oct_], i * sh + py, t * (rows * sh) + i * sh + py - pt

    return vector_pad(finish(sch, NAME), s, lanes, x_row=e_row)
