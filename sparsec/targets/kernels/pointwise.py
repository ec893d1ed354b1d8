"""``conv1x1_nchw``: pointwise (1x1, stride 1, no padding) NCHW conv as a GEMM vectorized along
the pixels, as in Fast Sparse ConvNets. NCHW keeps a channel's pixels contiguous, so each input
channel is a few vector loads per tile, each weight a broadcast, and the write-back whole
vectors of one output plane:

  for (n, chunk of <= 256 pixels, panel) in parallel:    # pixel-major: see build()
   for po in the chunk's PX-pixel tiles:
    acc[OCT, PX] = 0                                      # OCT * PX/8 ymm accumulators
    for c in CI (or, sparse, the panel's kept rows): for o in unroll(OCT): for q in vec(PX):
      acc[o, q] += W[panel, c, o] * X[n, c, po*PX + q]
    Y[n, panel*OCT + o, po*PX + q] = epilogue(acc)        # masked at the CO / P tails

``X`` is ``[N, CI, Pp]`` with ``Pp`` = P rounded up to PX (the caller pads with zeros), ``Y``
is ``[N, CO, P]``. The dense variant walks every input channel of a panel packed
``[CO/OCT, CI, OCT]``; ``bsr_conv1x1`` (kernels/bsr.py) walks each panel's nonzero input
channels through an index (ELL).

The direct conv kernel (conv2d.py) blocks 16 output channels per vector instead, so its
NCHW write-back is 16 scalar stores into 16 planes per pixel: on MobileNetV2's pointwise layers
this layout is ~1.5-2x faster (benchmarks/results/mobilenetv2.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import (Activation, epilogue_func, finish, prefetch_reads,
                                            wide_vectors)

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

NAME = "conv1x1_nchw"


@dataclass(frozen=True)
class Tile:
    """Register tile: ``oct`` output channels x ``pixels`` consecutive pixels."""

    oct: int
    pixels: int

    def padded_pixels(self, p: int) -> int:
        return -(-p // self.pixels) * self.pixels


#: (output channels, pixels) tiles of 8-12 ymm accumulators, best first
TILES = (Tile(6, 16), Tile(4, 16), Tile(12, 8), Tile(8, 8))
#: with AVX-512 a 16-pixel row is one zmm and there are 32: tiles of 8-16 zmm accumulators
#: (MobileNetV2's pointwise layers alone: 16->96 @112x112 396 -> 308 us, 32->16 145 -> 106,
#: 24->144 @56x56 166 -> 140, 64->384 @14x14 61 -> 53; none slower)
TILES_AVX512 = (Tile(12, 16), Tile(8, 32), Tile(8, 16), Tile(6, 16), Tile(4, 16))


def tiles() -> tuple[Tile, ...]:
    """The register tiles the current target's vector registers hold, best first."""
    return TILES_AVX512 if wide_vectors() else TILES


#: cost of a padded MAC in an 8-pixel tile relative to a 16-pixel one: a weight broadcast feeds
#: one vector instead of two (``sparsec tune`` on MobileNetV2's 14x14 layers: 1.2-1.3x)
NARROW_PENALTY = 1.25
#: pixels per task (at most; whole tiles dividing the map): each panel writes its OCT output
#: planes in runs this long, not one tile at a time (MobileNetV2 whole, interleaved with
#: ORT: 1 tile 1.44x ORT's time, 4 tiles 1.32x, 16 tiles 1.28x, 32-64 the same)
CHUNK_PIXELS = 256
#: pixel tiles ahead a task prefetches each input channel's tile (``common.prefetch_reads``;
#: alone, two threads, three of four MobileNetV2 shapes ran 7-11 % faster, 72 -> 16 at 28x28
#: 4 % slower; the whole pruned model 5-6 % faster; 1 tile ties with 2, 4 are slower)
READ_AHEAD = 2
#: tasks a kernel keeps at least, where single tiles give that many (a few panels on a small
#: map must still fill the cores)
MIN_TASKS = 8


def pick_chunk(tiles: int, px: int, panels: int) -> int:
    """Pixel tiles per task: the divisor of ``tiles`` nearest ``CHUNK_PIXELS`` pixels (on a
    log scale; ties to the larger) among those that leave ``MIN_TASKS`` tasks over
    ``panels`` panels, else 1."""
    ok = [c for c in range(1, tiles + 1) if tiles % c == 0 and (
        c == 1 or panels * (tiles // c) >= MIN_TASKS)]
    return min(ok, key=lambda c: (abs(math.log(c * px / CHUNK_PIXELS)), -c))


def pick_tile(co: int, p: int) -> Tile:
    """The tile of :func:`tiles` with the least padded work (output-channel and pixel tails,
    8-pixel tiles weighted by ``NARROW_PENALTY``); ties go to the earlier tile."""
    candidates = tiles()

    def cost(t: Tile) -> tuple[float, int]:
        work = -(-co // t.oct) * t.oct * t.padded_pixels(p)
        return work * (NARROW_PENALTY if t.pixels < 16 else 1.0), candidates.index(t)
    return min(candidates, key=cost)


def pack_weight(w_co_ci: "np.ndarray", oct_: int) -> "np.ndarray":
    """[CO, CI] -> [ceil(CO/oct), CI, oct], zero padded on CO."""
    from sparsec.targets.kernels import dense

    return dense.pack_weight(w_co_ci.T, oct_)


def build(n: int, ci: int, p: int, co: int, tile: Tile, dtype: str = "float32",
          bias: bool = False, act: Activation | None = None, residual: bool = False,
          rows: int | None = None, name: str = NAME) -> "tirx.PrimFunc":
    """Dense: ``(X[N,CI,Pp], Wp[NB,CI,oct] [, B[CO]] [, R[N,CO,P]], Y[N,CO,P])``.
    Sparse (``rows`` = kept input channels per panel): ``(X, idx[NB,rows], data[NB,rows,oct],
    ...)`` as packed by ``bsr.pack_weight(W[CI, CO], oct)``."""
    from tvm import s_tir, te, tirx

    oct_, px = tile.oct, tile.pixels
    nb = -(-co // oct_)
    pp = tile.padded_pixels(p)
    x = te.placeholder((n, ci, pp), dtype, name="X")
    b = te.placeholder((co,), dtype, name="B") if bias else None
    res = te.placeholder((n, co, p), dtype, name="R") if residual else None
    if rows is None:
        w = te.placeholder((nb, ci, oct_), dtype, name="Wp")
        r = te.reduce_axis((0, ci), name="c")
        weights = [w]
        acc = te.compute(
            (n, nb, oct_, pp),
            lambda i, jb, jl, q: te.sum(w[jb, r, jl] * x[i, r, q], axis=r), name="acc")
    else:
        idx = te.placeholder((nb, rows), "int32", name="idx")
        data = te.placeholder((nb, rows, oct_), dtype, name="data")
        r = te.reduce_axis((0, rows), name="l")
        weights = [idx, data]
        acc = te.compute(
            (n, nb, oct_, pp),
            lambda i, jb, jl, q: te.sum(data[jb, r, jl] * x[i, idx[jb, r], q], axis=r),
            name="acc")
    sch = s_tir.Schedule(epilogue_func(
        [x, *weights], lambda i, c, q: acc[i, c // oct_, c % oct_, q], (n, co, p), dtype, b,
        res, act))
    blk = sch.get_sblock("acc")
    i, jb, jl, q, rr = sch.get_loops(blk)
    chunk = pick_chunk(pp // px, px, (n if isinstance(n, int) else 1) * nb)  # N: per image
    qoo, qoi, qi = sch.split(q, [None, chunk, px])
    sch.reorder(i, qoo, jb, qoi, rr, jl, qi)
    sch.set_scope(blk, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, qoi)
    if p % px == 0:
        sch.vectorize(sch.get_loops(out)[-1])
    sch.vectorize(qi)
    sch.unroll(jl)
    # pixel-major tasks (a chunk of pixels x a panel): a thread's static share is a range of
    # pixels over every output channel, so it reads the pixels it (or the fused depthwise
    # kernel's row tiles) wrote itself, where panel-major shares read half their input from
    # the other core's cache (MobileNetV2 whole, interleaved with ORT: 1.41x -> 1.37x)
    task = sch.fuse(i, qoo, jb)
    sch.parallel(task)
    loop_vars = [sch.get(lp).loop_var for lp in (task, qoi, rr)]
    sch.decompose_reduction(blk, rr)
    func = finish(sch, name)
    if READ_AHEAD and rows is None:
        nq = pp // (chunk * px)

        def ahead():    # this input channel's pixel tile READ_AHEAD tiles on
            t, qi_, r_ = loop_vars
            first = tirx.min((t // nb % nq * chunk + qi_ + READ_AHEAD) * px, pp - 1)
            return [[t // (nb * nq), r_, first]]
        func = prefetch_reads(func, loop_vars[2], "X", ahead)
    return func
