"""``conv2d_nchw_packed``: direct NCHW/OIHW conv2d (groups=1) with constant, pre-packed weights.

Packing: W[OC, IC, KH, KW] is rewritten at compile time to ``[ceil(OC/16), IC, KH, KW, 16]``
(zero padded), so the 16 output channels of a block are one contiguous pair of ymm vectors for
every (ic, kh, kw).

The conv is the GEMM micro-kernel again, with "rows" = a strip of ``T`` output pixels along the
output width and "columns" = 16 output channels:
  pad X once (plus extra right padding so OW rounds up to a multiple of T; no predicates inside)
  for (n, ocb pair, oh) in parallel:       # plenty of independent tasks, W panel reused per row
                                           # (rows outermost where they split into tall
                                           # bands a core: :func:`rows_major`)
    row[OWp, V, 16] = 0
    for icb in IC / IC_BLOCK:              # the block's weights stay in L1 over the row
      for owo in OWp/T:                    # T*V zmm (AVX2: 2*T ymm, V = 1) accumulators
        for ic in icb: for kh: for kw in unroll:
          for t in unroll(T): for v in unroll(V): for oc in vectorize(16):
            row[owo*T+t, v, oc] += Xpad[n, ic, oh*s+kh*d, (owo*T+t)*s+kw*d] * Wp[.., ic, kh, kw, oc]
    Y[n, (ocb*V+v)*16 + oc, oh, :] = epilogue(row)   # each channel's row contiguous

``V`` = 2 channel blocks per tile with AVX-512 where they fit (:func:`pick_oc_vecs`), else 1.

Small maps (OW a multiple of 16 or 8 and at most 4 vectors) use :func:`build_wvec` instead
(chosen by :func:`plan_wvec`): lanes along the output width, so the tile holds 16-24 vector
accumulators instead of 4-6 and the NCHW write-back / residual read are contiguous vectors
(measured 1.2-2.5x faster per conv on 16x16 / 32x32 maps, stride 1 and 2, 3..64 channels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import (Activation, epilogue_func, finish,
                                            narrow_vectors_at_full_rate, prefetch_reads,
                                            prefetch_writes, target_cores, vector_pad,
                                            wide_vectors)

if TYPE_CHECKING:
    import numpy as np
    from tvm import s_tir, tirx

NAME = "conv2d_nchw_packed"
LANES = 16
MAX_TILE = 6  # 6 pixels x 2 ymm = 12 accumulators: the most AVX2's 16 registers hold
#: with AVX-512 the 16 channels are one zmm and there are 32 of them: up to 8 pixels per strip
#: (7 fits the 7x7 / 14x14 maps without a wasted column: ResNet-18's 512-channel 3x3 convs
#: 133 -> 201 GFLOP/s, 256-channel 191 -> 210, measured alone)
MAX_TILE_AVX512 = 8
#: accumulators of a strip x channel-blocks tile with AVX-512 (of 32 zmm: the rest hold the
#: input broadcast and the blocks' weight vectors; 28 spilled, 2x slower)
MAX_ACC_AVX512 = 24


def max_tile() -> int:
    """The widest output strip the current target's vector registers hold."""
    return MAX_TILE_AVX512 if wide_vectors() else MAX_TILE


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


def pick_width_tile(ow: int, widest: int | None = None) -> int:
    """Output-width strip ``T``: the size <= ``widest`` (default :func:`max_tile`) that wastes
    the fewest padded columns (ties -> the larger strip, more FMAs per weight load)."""
    best, best_waste = 1, None
    for t in range(widest or max_tile(), 0, -1):
        waste = (-ow) % t
        # a narrow strip pays for its loads; accept a few wasted columns for a wider one
        score = waste / ow + (0.0 if t >= 4 else 0.25)
        if best_waste is None or score < best_waste:
            best, best_waste = t, score
    return best


@dataclass(frozen=True)
class WidthPlan:
    """Tiling of the width-vectorized variant (see :func:`build_wvec`).

    Register tile: ``oct`` output channels x ``rows`` output rows x ``vecs`` vectors of ``lanes``
    consecutive output pixels along the width."""

    oct: int
    rows: int
    vecs: int
    lanes: int


#: accumulator vectors per register tile of the width-vectorized variant (AVX-512 has 32 zmm,
#: a tile needs ``vecs`` more for the input rows and one for the weight broadcast)
WVEC_MAX_ACC = 24
WVEC_LANES = (16, 8)
#: a network's stem (3-4 input channels) has too few MACs per output to hide the channel-
#: blocked kernel's scattered NCHW write-back, so it takes rows of up to 8 vectors too (alone:
#: MobileNetV2's 3x3 s2 stem 365 -> 232 us, ResNet-18's 7x7 s2 stem 1599 -> 1453 us)
WVEC_MAX_VECS_STEM = 8
#: with AVX-512, a KxK conv (K > 1) whose output channels are not a multiple of 16, or of
#: stride 1 with at most ``WVEC_MAX_K`` MACs an output, also takes rows of up to 8 vectors.
#: Ragged channels: the channel-blocked kernel would compute the padded block (a pruned
#: 24-channel conv computes 32); measured alone, interleaved (12->24, 24->24, 48->24, 8->12
#: and 48->40 3x3 convs on 40..160 maps): 1.25-1.45x faster. Stride 1, whole blocks, alone on
#: one thread against the channel-blocked kernel's input-channel passes (3x3, 56x56 rows of 7
#: 8-lane vectors): 16->16 141 against 153 us, 48->48 1189 against 1236, 32->32 the same
#: (544, 542); 64->64 2200 against 2065 and 96->96 4687 against 4603 the other way. Stride 2
#: stays channel-blocked (32->64 3x3 from 112x112: 1218 against 1564 us). (All on Zen 4.) Rows
#: of 8-lane vectors only where those run at the full FMA rate
#: (``common.narrow_vectors_at_full_rate``): on Emerald Rapids' full-width 512-bit units,
#: alone, one thread, 3x3 at 56x56: 32->32 591 against 331 us, 24->24 301 against 213, 48->48
#: 1148 against 721 (pruned ResNet-18, whole: 1.39 -> 1.17x pruned ONNX Runtime)
WVEC_MAX_VECS_RAGGED = 8
WVEC_MAX_K = 48 * 9


def plan_wvec(s: ConvShape) -> WidthPlan | None:
    """The width-vectorized tiling for ``s``, or None when the direct kernel fits better.

    Output rows must split into whole vectors (OW % lanes == 0) and the map must be small
    enough that a row is at most a few vectors (the case where the channel-blocked kernel's
    4-6 pixel strips leave too few accumulators and scatter their write-back), or, for a
    stem, ``WVEC_MAX_VECS_STEM``, or, for a ragged channel count or a stride-1 conv of few
    input channels, ``WVEC_MAX_VECS_RAGGED``."""
    oh, ow = s.out_hw
    lanes = next((v for v in WVEC_LANES if ow % v == 0), None)
    if s.ic <= 4:
        max_vecs = WVEC_MAX_VECS_STEM
    elif s.kh * s.kw > 1 and wide_vectors() and (s.oc % LANES or (
            s.stride == (1, 1) and s.ic * s.kh * s.kw <= WVEC_MAX_K)) and (
            lanes == LANES or narrow_vectors_at_full_rate()):
        max_vecs = WVEC_MAX_VECS_RAGGED
    else:
        max_vecs = 4
    if lanes is None or ow // lanes > max_vecs:
        return None
    vecs = ow // lanes
    # output channels per tile: the fewest wasted (zero-padded) channels, then the biggest tile
    best = None
    for oct_ in range(min(s.oc, 12), 0, -1):
        rows_max = max(1, WVEC_MAX_ACC // (oct_ * vecs))
        rows = max(r for r in range(1, rows_max + 1) if oh % r == 0)
        acc = oct_ * rows * vecs
        if acc > WVEC_MAX_ACC:
            continue
        waste = (-s.oc) % oct_ / s.oc
        score = (waste, -min(acc, 16), -oct_)
        if best is None or score < best[0]:
            best = (score, WidthPlan(oct_, rows, vecs, lanes))
    return best[1] if best else None


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


def _zero_pad(x, s: ConvShape, hp: int, wp: int, pt: int, pl: int, dtype: str):
    """Stage "pad": X zero-padded to [N, IC, hp, wp], the data starting at (pt, pl)."""
    from tvm import te, tirx

    zero = tirx.const(0, dtype)
    return te.compute(
        (s.n, s.ic, hp, wp),
        lambda n, c, i, j: tirx.if_then_else(
            tirx.all(i >= pt, i < s.h + pt, j >= pl, j < s.w + pl),
            x[n, c, i - pt, j - pl], zero),
        name="pad")


def _banded_pad(x, s: ConvShape, wp: int, oh: int, dtype: str):
    """Stage "pad" of a rows-major conv (:func:`rows_major`): X zero-padded in bands, band
    ``t`` being the padded rows that output rows ``[t*band, (t+1)*band)`` read, halo rows
    copied into both bands that read them. A band a core (where the rows split evenly, else
    one band an image): the core that computes a band's rows pads them, from the rows the
    previous conv wrote on that core. Returns ``(P[N, bands, IC, 1, 1, rows, wp], read, band)``,
    ``read(n, c, i, ky, j)`` reading row ``ky`` of output row ``i``'s window, column ``j``
    (the unit phase axes are ``common.vector_pad``'s layout)."""
    from tvm import te, tirx

    (sh, _), (dh, _) = s.stride, s.dilation
    pt, pl = s.padding[:2]
    cores = target_cores()
    bands = cores if oh % cores == 0 else 1
    band = oh // bands
    rows = (band - 1) * sh + (s.kh - 1) * dh + 1
    zero = tirx.const(0, dtype)

    def value(n, t, c, py, px, i, j):
        r, q = t * band * sh + i - pt, j - pl
        return tirx.if_then_else(tirx.all(r >= 0, r < s.h, q >= 0, q < s.w), x[n, c, r, q],
                                 zero)

    xp = te.compute((s.n, bands, s.ic, 1, 1, rows, wp), value, name="pad")

    def read(n, c, i, ky, j):
        return xp[n, i // band, c, 0, 0, i % band * sh + ky * dh, j]
    return xp, read, band


def _schedule_pad(sch: "s_tir.Schedule", lead: int = 2) -> None:
    """The "pad" stage: its ``lead`` leading axes ((n, c), or (n, band, c)) in parallel; its
    body becomes vector copies after scheduling (``common.vector_pad``)."""
    loops = sch.get_loops(sch.get_sblock("pad"))
    sch.parallel(sch.fuse(*loops[:lead]))


#: input channels per pass over an output row's strips: the pass's weights (16 channels x 9
#: taps x 2 blocks x 16 lanes, 18 KB) stay in L1 while every strip of the row uses them, and
#: the row is written back once, each channel's pixels contiguous (alone on one thread, 3x3:
#: 64->64 at 56x56 2236 -> 2067 us, 32->32 598 -> 542, 64->128 stride 2 1105 -> 1067,
#: 128->128 at 28x28 2084 -> 2050; at 14x14 and 7x7 the same)
IC_BLOCK = 16


def ic_block(ic: int) -> int:
    """Input channels per pass (where a row is several strips): the largest divisor of ``ic``
    from 8 to ``IC_BLOCK``, else all of them (a stem's 3)."""
    return max((d for d in range(8, IC_BLOCK + 1) if ic % d == 0), default=ic)


def pick_oc_vecs(ocb: int, t: int, tasks: int) -> int:
    """Output-channel blocks per register tile, 2 when ``ocb`` is even, the ``t * 2``
    accumulators fit the target's registers and 8 tasks are left (``tasks`` = ``n * oh``
    rows per block group), else 1. Two blocks share each input broadcast (a 7-pixel strip:
    14 FMAs per 9 loads instead of 7 per 8): alone, 1x1 convs on 7x7 maps and 3x3 convs on
    7..28 maps ran 5-15 % faster; three blocks were slower as often as faster."""
    budget = MAX_ACC_AVX512 if wide_vectors() else MAX_TILE
    return 2 if ocb % 2 == 0 and t * 2 <= budget and ocb // 2 * tasks >= 8 else 1


#: input channels ahead a 1x1 conv on a map at most 16 wide prefetches its input row (the
#: row of every input channel is read a plane apart, an order the hardware misses: pruned
#: MobileNetV2's 480 -> 160 conv at 7x7 in place 36 -> 25 us; 16 and 64 were slower whole)
READ_AHEAD = 32

#: output rows a core's share of a conv must span for the parallel tasks to run rows-major
#: (see :func:`rows_major`)
MIN_BAND_ROWS = 14


def rows_major(n, oh: int, unit: int = 1) -> bool:
    """Whether a conv's parallel tasks run output rows outermost, so that each core's static
    share is a band of whole rows over every output channel instead of a group of channels
    over every row: the same band the next conv reads (plus a halo), so a chain of convs
    keeps each core's activations in its own L2. Channel-major shares read half their input
    from the other core's cache. On a 2-vCPU Emerald Rapids VM (two threads, whole models
    interleaved with ONNX Runtime in one run) ResNet-18 went from 1.18x ONNX Runtime to 1.09x
    and the mixed CNN from 1.09x to 1.02x. Only where the rows (``n * oh``, in tiles of
    ``unit``) split evenly into bands of at least ``MIN_BAND_ROWS`` a core: 7 rows on 2 cores
    run as 4 + 3 (ResNet-18's 7x7 convs 0.66 -> 0.94 ms), and bands of 5 or 7 rows (14x14 and
    10x10 maps) took back a third of the gain (1.12x, 1.02x): their weights outweigh the
    activations, and each core then reads all of them."""
    if not isinstance(n, int):
        return False
    cores = target_cores()
    tiles = n * (oh // unit)
    return tiles % cores == 0 and n * oh // cores >= MIN_BAND_ROWS


def build(s: ConvShape, dtype: str = "float32", bias: bool = False,
          act: Activation | None = None, residual: bool = False,
          width_tile: int | None = None) -> "tirx.PrimFunc":
    """The scheduled PrimFunc ``(X, Wp[OCB,IC,KH,KW,16] [, B[OC]] [, R[N,OC,OH,OW]], Y)``,
    ``V`` = :func:`pick_oc_vecs` channel blocks per register tile."""
    from tvm import s_tir, te, tirx

    (sh, sw), (dh, dw) = s.stride, s.dilation
    pt, pl, pb, pr = s.padding
    oh, ow = s.out_hw
    t = width_tile or pick_width_tile(ow)
    owp = -(-ow // t) * t
    ocb = -(-s.oc // LANES)
    v = pick_oc_vecs(ocb, t, (s.n if isinstance(s.n, int) else 1) * oh)
    # rows / columns of padded input the (width-padded) output reads
    hp = max(s.h + pt + pb, (oh - 1) * sh + (s.kh - 1) * dh + 1)
    wp = max(s.w + pl + pr, (owp - 1) * sw + (s.kw - 1) * dw + 1)

    x = te.placeholder((s.n, s.ic, s.h, s.w), dtype, name="X")
    w = te.placeholder((ocb, s.ic, s.kh, s.kw, LANES), dtype, name="Wp")
    b = te.placeholder((s.oc,), dtype, name="B") if bias else None
    res = te.placeholder((s.n, s.oc, oh, ow), dtype, name="R") if residual else None
    needs_pad = (hp, wp) != (s.h, s.w)
    by_rows = rows_major(s.n, oh)
    banded = needs_pad and by_rows
    if banded:
        xp, xin, band = _banded_pad(x, s, wp, oh, dtype)
    else:
        xp = _zero_pad(x, s, hp, wp, pt, pl, dtype) if needs_pad else x

        def xin(n, c, i, ky, j):   # padded row ky * dh of output row i's window
            return xp[n, c, i * sh + ky * dh, j]
    rc = te.reduce_axis((0, s.ic), name="rc")
    ry = te.reduce_axis((0, s.kh), name="ry")
    rx = te.reduce_axis((0, s.kw), name="rx")
    acc = te.compute(
        (s.n, ocb, oh, owp, LANES),
        lambda n, cb, i, j, cl: te.sum(
            xin(n, rc, i, ry, j * sw + rx * dw) * w[cb, rc, ry, rx, cl],
            axis=[rc, ry, rx]),
        name="acc",
    )

    sch = s_tir.Schedule(epilogue_func(
        [x, w], lambda n, c, i, j: acc[n, c // LANES, i, j, c % LANES], (s.n, s.oc, oh, ow),
        dtype, b, res, act))

    blk = sch.get_sblock("acc")
    n, cb, i, j, cl, kc, ky, kx = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, t])
    cbo, cbi = sch.split(cb, [None, v])
    # one strip a row: nothing to reuse the block's weights across (MobileNetV2's 320 -> 1280
    # 1x1 conv at 7x7 ran 455 us in one pass, 492 in passes of 16)
    kco, kci = sch.split(kc, [None, ic_block(s.ic) if owp > t else s.ic])
    if by_rows:
        sch.reorder(n, i, cbo, kco, jo, kci, ky, kx, ji, cbi, cl)
    else:
        sch.reorder(n, cbo, i, kco, jo, kci, ky, kx, ji, cbi, cl)
    sch.set_scope(blk, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, cbo if by_rows else i)
    sch.vectorize(cl)
    sch.unroll(cbi)
    sch.unroll(ji)
    sch.unroll(kx)
    task = sch.fuse(n, i, cbo) if by_rows else sch.fuse(n, cbo, i)
    sch.parallel(task)
    if needs_pad:
        _schedule_pad(sch, 3 if banded else 2)
    loop_vars = {"task": sch.get(task).loop_var, "kco": sch.get(kco).loop_var,
                 "kci": sch.get(kci).loop_var}
    sch.decompose_reduction(blk, kco)
    if banded:
        func = vector_pad(finish(sch, NAME), dataclasses.replace(s, stride=(1, 1)),
                          x_row=lambda lead, py, i: ([lead[0], lead[2]],
                                                     lead[1] * band * sh + i - pt))
    else:
        func = vector_pad(finish(sch, NAME), s) if needs_pad else finish(sch, NAME)
    ncbo = -(-ocb // v)

    def decode(task):  # the parallel task's (image, channel-block pair, output row)
        if by_rows:
            return task // (ncbo * oh), task % ncbo, task // ncbo % oh
        return task // (oh * ncbo), task // oh % ncbo, task % oh

    def box(task):     # a task's output: V*16 channels of one row
        n_, cbo_, i_ = decode(task)
        return [(n_, 1), (cbo_ * v * LANES, v * LANES), (i_, 1), (0, ow)]
    func = prefetch_writes(func, box)
    if READ_AHEAD and not needs_pad and ow <= 16 and (s.kh, s.kw) == (1, 1):
        kb = ic_block(s.ic) if owp > t else s.ic

        def ahead():    # the input row READ_AHEAD channels on: its first and last pixel
            n_, _, i_ = decode(loop_vars["task"])
            c = tirx.min(loop_vars["kco"] * kb + loop_vars["kci"] + READ_AHEAD, s.ic - 1)
            return [[n_, c, i_ * sh, j] for j in (0, (ow - 1) * sw)]
        func = prefetch_reads(func, loop_vars["kci"], "X", ahead)
    return func


def build_dynamic_batch(s: ConvShape, dtype: str = "float32", bias: bool = False,
                        act: Activation | None = None, residual: bool = False
                        ) -> "tirx.PrimFunc":
    """``build`` with the batch known only at run time (a model compiled with a dynamic
    batch): ``s.n`` is ignored, the PrimFunc's N symbolic; the tile is chosen as for one
    image."""
    import dataclasses

    from tvm import tirx

    return build(dataclasses.replace(s, n=tirx.Var("n", "int64")), dtype, bias, act, residual)


def build_wvec(s: ConvShape, plan: WidthPlan, dtype: str = "float32", bias: bool = False,
               act: Activation | None = None, residual: bool = False) -> "tirx.PrimFunc":
    """Width-vectorized variant: ``(X, Wp[OC/oct,IC,KH,KW,oct] [, B] [, R], Y)``.

    Vector lanes run along the output width, so the NCHW write-back (and the residual read) are
    whole contiguous vectors, and each weight is one broadcast scalar:
      pad X once; for stride > 1 split it into stride phases so a phase row is contiguous
      for (n, ocb, oh-block) in parallel:
        acc[oct, rows, OW] = 0                            # oct*rows*vecs vector registers
        for ic: for kh: for kw in unroll: for oc in unroll(oct): for r in unroll(rows):
          for v in unroll(vecs): for lane in vectorize:
            acc[oc, r, w] += Xphase[...contiguous in w] * Wp[ocb, ic, kh, kw, oc]
        Y[n, ocb*oct + oc, oh, :] = epilogue(acc)         # masked on the OC tail only
    """
    from tvm import s_tir, te, tirx

    (sh, sw), (dh, dw) = s.stride, s.dilation
    pt, pl, pb, pr = s.padding
    oh, ow = s.out_hw
    oct_, rows, vecs, lanes = plan.oct, plan.rows, plan.vecs, plan.lanes
    ocb = -(-s.oc // oct_)
    # padded-input extent each phase must cover
    hp = max(s.h + pt + pb, (oh - 1) * sh + (s.kh - 1) * dh + 1)
    wp = max(s.w + pl + pr, (ow - 1) * sw + (s.kw - 1) * dw + 1)
    hq, wq = -(-hp // sh), -(-wp // sw)  # rows / columns of one stride phase

    x = te.placeholder((s.n, s.ic, s.h, s.w), dtype, name="X")
    w = te.placeholder((ocb, s.ic, s.kh, s.kw, oct_), dtype, name="Wp")
    b = te.placeholder((s.oc,), dtype, name="B") if bias else None
    res = te.placeholder((s.n, s.oc, oh, ow), dtype, name="R") if residual else None
    zero = tirx.const(0, dtype)
    strided = (sh, sw) != (1, 1)
    needs_pad = strided or (hp, wp) != (s.h, s.w)
    if strided:
        def phase_value(n, c, py, px, i, j):
            r, q = i * sh + py - pt, j * sw + px - pl
            return tirx.if_then_else(tirx.all(r >= 0, r < s.h, q >= 0, q < s.w),
                                     x[n, c, r, q], zero)
        xp = te.compute((s.n, s.ic, sh, sw, hq, wq), phase_value, name="pad")

        def xin(n, c, i, j):  # padded-input element (i, j), through its stride phase
            return xp[n, c, i % sh, j % sw, i // sh, j // sw]
    elif needs_pad:
        xp = _zero_pad(x, s, hp, wp, pt, pl, dtype)

        def xin(n, c, i, j):
            return xp[n, c, i, j]
    else:
        def xin(n, c, i, j):
            return x[n, c, i, j]

    rc = te.reduce_axis((0, s.ic), name="rc")
    ry = te.reduce_axis((0, s.kh), name="ry")
    rx = te.reduce_axis((0, s.kw), name="rx")
    if strided:
        # (i*sh + ry*dh) = sh*(i + ry*dh//sh) + ry*dh%sh: keep the phase index free of i, j
        def tap(n, rc_, i, j):
            return xp[n, rc_, (ry * dh) % sh, (rx * dw) % sw,
                      i + (ry * dh) // sh, j + (rx * dw) // sw]
    else:
        def tap(n, rc_, i, j):
            return xin(n, rc_, i + ry * dh, j + rx * dw)
    acc = te.compute(
        (s.n, ocb, oct_, oh, ow),
        lambda n, cb, cl, i, j: te.sum(tap(n, rc, i, j) * w[cb, rc, ry, rx, cl],
                                       axis=[rc, ry, rx]),
        name="acc")

    sch = s_tir.Schedule(epilogue_func(
        [x, w], lambda n, c, i, j: acc[n, c // oct_, c % oct_, i, j], (s.n, s.oc, oh, ow),
        dtype, b, res, act))

    blk = sch.get_sblock("acc")
    n, cb, cl, i, j, kc, ky, kx = sch.get_loops(blk)
    io, ii = sch.split(i, [None, rows])
    jv, jl = sch.split(j, [vecs, lanes])
    by_rows = rows_major(s.n, oh, rows)
    if by_rows:
        sch.reorder(n, io, cb, kc, ky, kx, cl, ii, jv, jl)
    else:
        sch.reorder(n, cb, io, kc, ky, kx, cl, ii, jv, jl)
    sch.set_scope(blk, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, cb if by_rows else io)
    oj = sch.get_loops(out)[-1]
    _, oj_in = sch.split(oj, [None, lanes])
    sch.vectorize(oj_in)
    sch.vectorize(jl)
    sch.unroll(jv)
    sch.unroll(ii)
    sch.unroll(cl)
    sch.unroll(kx)
    sch.parallel(sch.fuse(n, io, cb) if by_rows else sch.fuse(n, cb, io))
    if needs_pad:
        # strided: a task per (image, channel, row phase), so a stem's 3 channels make 6
        # tasks, not 3 (on 2 cores: 3 + 3, not 2 + 1)
        _schedule_pad(sch, 3 if strided else 2)
    sch.decompose_reduction(blk, kc)
    if not needs_pad:
        return finish(sch, NAME)
    return vector_pad(finish(sch, NAME), s, x_row=(lambda lead, py, i: (
        lead[:2], i * sh + py - pt)) if strided else None)
