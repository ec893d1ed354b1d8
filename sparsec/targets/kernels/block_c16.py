"""``inverted_residual_c16``: a whole inverted-residual block (1x1 expansion -> 3x3 depthwise
-> 1x1 projection) on a small map, in one kernel that splits the expanded channels between
the cores and keeps them in blocks of 16 (8 without AVX-512) channels inside:

  for (n, split s of the expanded channels) in parallel:       # one split a core
    for pair of channel blocks b in split s:
      E[b, H, W, 16] = act_e(X[n, :, pixels] @ We[b] + be)      # 7 pixels x 2 blocks a tile
      P = E zero-padded by one pixel; D[b, H, W, 16] = act_d(3x3 taps of P * Wd[b] + bd)
    Part[s, co, H, W] = D[split s] @ Wp[split s]                # 7 pixels x V*16 channels
  for (n, co) in parallel:
    Y[n, co] = act(Part[0, co] + Part[1, co] + b[co] + residual[n, co])

Vectorized along channels, the depthwise conv needs no padded rows of whole vectors (a 7x7 map
wastes 9 of 16 lanes in NCHW) and both 1x1 convs are the direct conv's register tile (a row of
pixels x 16 output channels, an input value broadcast). Each core reads the block's input and
the weights of its own channels, and no core reads an expanded activation another core wrote:
the cores exchange only the projection's partial sums (CO x H x W each). Apart, the expansion
wrote its channels by (channel block, row) tasks, the depthwise conv read them by channel and
the projection read all of them, each kernel half from the other core's cache.

Alone, 2 threads, Emerald Rapids: pruned MobileNetV2's 80 -> 480 -> 80 block at 7x7 24 us
against 34 for its three kernels (44 in the model's chain), dense 160 -> 960 -> 160 74 against
92 (115); at 14x14, 32 -> 192 -> 32 19 us against 22 for the row-band kernel
(``dw_pointwise``'s ``conv1x1_dw_conv1x1_nchw``) and 96 -> 576 -> 96 111 against 142 apart.
At 28x28 the row bands are faster (16 -> 96 -> 16: 46 against 24 us): a split's expanded
channels no longer stay in L2 next to everything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import (Activation, clip, epilogue_func, finish,
                                            target_cores, wide_vectors)

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

    from sparsec.targets.kernels.conv2d import ConvShape

NAME = "inverted_residual_c16"
#: maps of at most this many pixels (see the module docstring: 14x14 faster than row bands,
#: 28x28 slower)
MAX_PIXELS = 14 * 14
#: channel blocks an expansion register tile covers (a row of pixels x 2 blocks: two FMAs per
#: broadcast input value; one block: 27 us for the 80 -> 480 -> 80 block, two: 24). A split
#: of an odd number of blocks computes its last pair's second block under a predicate.
EXPANSION_BLOCKS = 2
#: most work the zero channels of :func:`padded_widths` may add (padded MACs over real ones),
#: against the row-band kernel (``dw_pointwise``'s ``conv1x1_dw_conv1x1_nchw``) where that
#: would take the block, else against the block's kernels apart. Zen 4, 2 threads, alone,
#: k -> c -> co, padded work: against row bands at 14x14, 67 -> 404 -> 67 (1.12) 147 -> 145 us,
#: 29 -> 173 -> 29 (1.16) 41 -> 42, 19 -> 116 -> 19 (1.41) 24 -> 32; against the kernels apart,
#: 14x14 45 -> 269 -> 45 (1.10) 110 -> 78 us, 7x7 56 -> 330 -> 56 (1.14) 61 -> 39, 19 -> 116 ->
#: 19 (1.41) 24 -> 14
MAX_PADDED_WORK = {"row_bands": 1.10, "apart": 1.5}


def lanes() -> int:
    """Channels per block: a vector register of the target being compiled for."""
    return 16 if wide_vectors() else 8


def padded_widths(c: int, co: int) -> tuple[int, int]:
    """The kernel's expanded and output channel counts for ``c`` expanded and ``co`` output
    channels: ``c`` up to whole channel blocks one split a core, ``co`` up to whole blocks.
    The added expanded channels have zero weights and biases everywhere, so whatever they
    compute, their projection weights (zero) add nothing; the added output channels' partial
    sums are computed but never written."""
    lanes_ = lanes()
    step = lanes_ * target_cores()
    return -(-c // step) * step, -(-co // lanes_) * lanes_


def padded_work(c: int, k: int, co: int) -> float:
    """The block's multiply-adds with :func:`padded_widths`' channels over those without (per
    pixel: expansion ``k c``, depthwise ``9 c``, projection ``c co``)."""
    cp, cop = padded_widths(c, co)
    return cp * (k + 9 + cop) / (c * (k + 9 + co))


def worth_fusing(s: "ConvShape", k: int, co: int, row_bands: bool = False) -> bool:
    """Whether an expansion (``k`` input channels), the depthwise conv ``s`` that alone reads
    it and the 1x1 projection (``co`` channels) that alone reads that run as one
    ``inverted_residual_c16`` kernel: a 3x3, stride-1, same-size depthwise conv on a map of at
    most ``MAX_PIXELS`` and at least 2x2, static batch, at least two channel blocks a split
    (the schedule addresses the row, column and channel-block loops, which an extent of 1
    drops), and zero channels to whole channel blocks that add at most ``MAX_PADDED_WORK``
    (against the row-band kernel where ``row_bands``: it would take the block, else against
    the kernels apart)."""
    limit = MAX_PADDED_WORK["row_bands" if row_bands else "apart"]
    split_blocks = padded_widths(s.ic, co)[0] // (lanes() * target_cores())
    return (isinstance(s.n, int) and (s.kh, s.kw) == (3, 3) and s.stride == (1, 1)
            and s.dilation == (1, 1) and s.padding == (1, 1, 1, 1)
            and s.h * s.w <= MAX_PIXELS and min(s.h, s.w) >= 2 and split_blocks >= 2
            and k > 0 and padded_work(s.ic, k, co) <= limit)


def pack_weights(we: "np.ndarray", wd: "np.ndarray", wp: "np.ndarray",
                 be: "np.ndarray | None" = None, bd: "np.ndarray | None" = None) -> list:
    """The expansion ``we[C, K]``, depthwise ``wd[C, 3, 3]`` and projection ``wp[CO, C]``
    weights in the kernel's channel blocks, ``C`` and ``CO`` zero-padded to
    :func:`padded_widths` ``(C', CO')``: ``[C'/L, K, L]``, ``[C'/L, 3, 3, L]``,
    ``[CO'/L, C', L]``; with the biases ``be[C]`` and ``bd[C]`` (zero-padded to ``C'``) after
    the weights they follow where given: ``[we, be, wd, bd, wp]``, None for a missing bias."""
    import numpy as np

    from sparsec.targets.kernels import pointwise

    lanes_ = lanes()
    c = we.shape[0]
    cp = padded_widths(c, wp.shape[0])[0]

    def pad(a, *widths):      # zeros after the end of each leading axis, up to ``widths``
        return np.pad(a, [(0, w - n) for w, n in zip(widths, a.shape)] +
                      [(0, 0)] * (a.ndim - len(widths)))

    wd = pad(wd, cp)
    be, bd = (None if b is None else np.ascontiguousarray(pad(b, cp)) for b in (be, bd))
    # pointwise.pack_weight: [CO, CI] -> [CO'/L, CI, L], zero padded on CO
    return [pointwise.pack_weight(pad(we, cp), lanes_), be,
            np.ascontiguousarray(wd.reshape(cp // lanes_, lanes_, 3, 3).transpose(0, 2, 3, 1)),
            bd, pointwise.pack_weight(pad(wp, wp.shape[0], cp), lanes_)]


def build(s: "ConvShape", k: int, co: int, dtype: str = "float32", pw_bias: bool = False,
          pw_act: Activation | None = None, dw_bias: bool = False,
          dw_act: Activation | None = None, bias: bool = False, act: Activation | None = None,
          residual: bool = False) -> "tirx.PrimFunc":
    """``(X[N,K,H*W], We [, Be[C']], Wd [, Bd[C']], Wp [, B[CO]] [, R[N,CO,H,W]],
    Y[N,CO,H,W])``, the weights and inner biases packed by :func:`pack_weights` (``C'``,
    ``CO'``: :func:`padded_widths`); ``s`` is the depthwise conv's shape (``C`` = ``s.ic``)."""
    from tvm import s_tir, te, tirx

    n, h, w = s.n, s.h, s.w
    c, cop = padded_widths(s.ic, co)
    lanes_, splits = lanes(), target_cores()
    cb, cob = c // lanes_, cop // lanes_
    sb = cb // splits                                   # channel blocks a split
    x = te.placeholder((n, k, h * w), dtype, name="X")
    we = te.placeholder((cb, k, lanes_), dtype, name="We")
    be = te.placeholder((c,), dtype, name="Be") if pw_bias else None
    wd = te.placeholder((cb, 3, 3, lanes_), dtype, name="Wd")
    bd = te.placeholder((c,), dtype, name="Bd") if dw_bias else None
    wp = te.placeholder((cob, c, lanes_), dtype, name="Wp")
    zero = tirx.const(0, dtype)

    rk = te.reduce_axis((0, k), name="k")
    eacc = te.compute((n, cb, h, w, lanes_), lambda n_, b_, i, j, l: te.sum(
        x[n_, rk, i * w + j] * we[b_, rk, l], axis=rk), name="eacc")

    def biased(acc, bvec, act_):
        def value(n_, b_, i, j, l):
            v = acc[n_, b_, i, j, l]
            return clip(v if bvec is None else v + bvec[b_ * lanes_ + l], act_, dtype)
        return value

    e = te.compute((n, cb, h, w, lanes_), biased(eacc, be, pw_act), name="E")

    def padded(n_, b_, r, q, l):   # clamped: compute_at needs E's read region bounded
        inside = tirx.all(r >= 1, r <= h, q >= 1, q <= w)
        return tirx.if_then_else(inside, e[n_, b_, tirx.max(tirx.min(r - 1, h - 1), 0),
                                           tirx.max(tirx.min(q - 1, w - 1), 0), l], zero)

    pad = te.compute((n, cb, h + 2, w + 2, lanes_), padded, name="pad")
    ty = te.reduce_axis((0, 3), name="ty")
    tx = te.reduce_axis((0, 3), name="tx")
    dacc = te.compute((n, cb, h, w, lanes_), lambda n_, b_, i, j, l: te.sum(
        pad[n_, b_, i + ty, j + tx, l] * wd[b_, ty, tx, l], axis=[ty, tx]), name="dacc")
    d = te.compute((n, cb, h, w, lanes_), biased(dacc, bd, dw_act), name="D")
    rb = te.reduce_axis((0, sb), name="rb")
    rl = te.reduce_axis((0, lanes_), name="rl")
    part = te.compute(
        (n, splits, cob, h, w, lanes_),
        lambda n_, sp, o, i, j, l: te.sum(
            d[n_, sp * sb + rb, i, j, rl] * wp[o, (sp * sb + rb) * lanes_ + rl, l],
            axis=[rb, rl]), name="part")

    def total(n_, o, i, j):
        v = part[n_, 0, o // lanes_, i, j, o % lanes_]
        for sp in range(1, splits):
            v = v + part[n_, sp, o // lanes_, i, j, o % lanes_]
        return v

    inputs = [x, we] + ([be] if be is not None else []) + [wd] + (
        [bd] if bd is not None else []) + [wp]
    b = te.placeholder((co,), dtype, name="B") if bias else None
    res = te.placeholder((n, co, h, w), dtype, name="R") if residual else None
    sch = s_tir.Schedule(epilogue_func(inputs, total, (n, co, h, w), dtype, b, res, act))

    # phase 1: (n, split) in parallel; the projection's tile a row x V blocks of channels
    v = 2 if cob % 2 == 0 else 1
    pblk = sch.get_sblock("part")
    pn, ps, po, pi, pj, pl, prb, prl = sch.get_loops(pblk)
    poo, poi = sch.split(po, [None, v])
    sch.reorder(pn, ps, poo, pi, prb, prl, pj, poi, pl)
    task = sch.fuse(pn, ps)
    sch.vectorize(pl)
    sch.unroll(poi)
    sch.unroll(pj)
    write_back = sch.cache_write(pblk, 0, "local")
    sch.reverse_compute_at(write_back, pi)
    sch.vectorize(sch.get_loops(write_back)[-1])
    # the split's depthwise output, a pair of channel blocks at a time
    dblk = sch.get_sblock("D")
    sch.compute_at(dblk, task)
    db, di, _, dl = sch.get_loops(dblk)[-4:]
    sch.vectorize(dl)
    ablk = sch.get_sblock("dacc")
    sch.compute_at(ablk, di)
    sch.set_scope(ablk, 0, "local")
    aj, al, aty, atx = sch.get_loops(ablk)[-4:]
    sch.reorder(aty, atx, aj, al)
    sch.vectorize(al)
    sch.unroll(aj)
    sch.unroll(atx)
    sch.unroll(aty)
    dbo, _ = sch.split(db, [None, EXPANSION_BLOCKS])
    pad_blk = sch.get_sblock("pad")
    sch.compute_at(pad_blk, dbo)
    fill = sch.decompose_padding(pad_blk, sch.get_loops(pad_blk)[-4])
    sch.vectorize(sch.get_loops(fill)[-1])
    sch.vectorize(sch.get_loops(pad_blk)[-1])
    eblk = sch.get_sblock("E")
    sch.compute_at(eblk, dbo)
    eb, ei, _, el = sch.get_loops(eblk)[-4:]
    sch.reorder(ei, eb)
    sch.vectorize(el)
    eacc_blk = sch.get_sblock("eacc")
    sch.compute_at(eacc_blk, ei)
    sch.set_scope(eacc_blk, 0, "local")
    eb2, ej2, el2, ek = sch.get_loops(eacc_blk)[-4:]
    sch.reorder(ek, ej2, eb2, el2)
    sch.vectorize(el2)
    sch.unroll(eb2)
    sch.unroll(ej2)
    sch.parallel(task)
    # phase 2: (n, output channel) in parallel, the splits' partial sums added
    yn, yc, _, yj = sch.get_loops(sch.get_sblock("Y"))
    sch.parallel(sch.fuse(yn, yc))
    sch.unroll(yj)
    sch.decompose_reduction(eacc_blk, ek)
    sch.decompose_reduction(ablk, aty)
    sch.decompose_reduction(pblk, prb)
    return finish(sch, NAME)
