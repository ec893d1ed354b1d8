"""``dw_conv1x1_nchw``: a depthwise conv and the pointwise (1x1) conv that reads it, as one
kernel: MobileNetV2's inverted-residual "depthwise -> projection" pair.

Run apart, the depthwise conv writes the block's 6x-expanded activation to memory and the
projection reads it back; inside a whole network both kernels then run 1.2-2.3x slower than
alone (the expanded tensor lives in L3 or in the other core's L2). Fused, each task computes
the depthwise output of a few whole rows for every channel into a buffer that stays in L1/L2,
and the projection's GEMM reads it from there:

  for (n, row tile of R output rows) in parallel:
    for c in C:                                       # depthwise_nchw's schedule, R rows
      pad channel c's input rows (zeros; stride phases) into a small buffer
      D[c, R, OWp] = act_dw(depthwise(...) + bias_dw[c])
    for panel of OCT output channels: for (row r, PX pixels of it):
      acc[OCT, PX] = sum_c Wp[panel, c, :] * D[c, r, PX pixels]     # conv1x1_nchw's tile
      Y[n, panel*OCT + o, row, pixels] = epilogue(acc)               # bias, residual, act

``OWp`` is the output width rounded up to whole vectors: the padded columns compute garbage
that no output reads (each output pixel depends on the same pixel of ``D`` only).

``conv1x1_dw_conv1x1_nchw`` is the same kernel with the block's 1x1 expansion in front (the
whole inverted-residual block): before a channel block's depthwise step, the task expands that
block's channels over the input pixels its band reads, halo rows included, as one contiguous
range of whole vectors (``X`` is ``[N, K, H*W]``), and pads from there. Apart, the expansion
split its output channels between the cores and this kernel its rows, so half of each core's
input had been written by the other core.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from sparsec.targets.kernels import depthwise
from sparsec.targets.kernels.common import (Activation, clip, epilogue_func, finish,
                                            pick_band, target_cores, vector_pad,
                                            wide_vectors)

if TYPE_CHECKING:
    from collections.abc import Callable

    from tvm import tirx

    from sparsec.targets.kernels.conv2d import ConvShape

NAME = "dw_conv1x1_nchw"
#: the kernel with the expansion conv before the depthwise conv: a whole inverted-residual block
EXPANDED_NAME = "conv1x1_dw_conv1x1_nchw"
#: the per-task depthwise buffer D[C, R, OWp] is kept under this many bytes (L2 is 1 MB a
#: core; alone on one thread, MobileNetV2's 144-channel block at 56x56 ran 358 us in 4-row
#: tasks (147 KB), 347 us in 14-row ones (516 KB), and its 72-channel pruned twin 145 us in
#: 7-row tasks, 120 us in 14-row ones: taller tasks re-read fewer halo rows)
MAX_TILE_BYTES = 512 * 1024
#: output-channel blocks of the projection's register tile, best first
OCTS = (12, 8, 6, 4)


#: maps of at least this many pixels are fused in row tiles of ``common.pick_band`` (two or
#: more a core)
MIN_PIXELS = 28 * 28
#: smaller maps down to this many pixels are fused in one band of rows a core, where the
#: rows split evenly (:func:`core_band`). In tiles of one row (what ``pick_band`` leaves a
#: 14x14 map on 2 cores) each task re-reads the whole projection weight for 14 pixels:
#: alone, 14x14 pairs ran 1.3-1.6x slower fused. In one band a core, the projection reads
#: the depthwise output its own core just wrote; apart, the depthwise conv splits channels
#: between the cores and the projection pixels, so half of its input comes from the other
#: core's cache. MobileNetV2 on a 2-core Emerald Rapids VM, two threads, interleaved with
#: ONNX Runtime: dense 1.25 -> 1.12x ONNX Runtime, pruned at 0.5 1.30 -> 1.19 ms.
MIN_BAND_PIXELS = 14 * 14


def _tile_fits(c: int, ow: int, lanes: int | None) -> "tuple[int, Callable[[int], bool]]":
    """(the target's lanes, or ``lanes``; whether a task of that many rows keeps its depthwise
    output ``D[c, rows, OWp]`` under ``MAX_TILE_BYTES``)."""
    if lanes is None:
        lanes = 16 if wide_vectors() else 8
    owp = -(-ow // lanes) * lanes
    return lanes, lambda rows: c * rows * owp * 4 <= MAX_TILE_BYTES


def core_band(c: int, oh: int, ow: int, lanes: int | None = None) -> int | None:
    """Rows per task for a map under ``MIN_PIXELS``: ``oh / cores`` where the target has
    several cores, they split the rows evenly, and a band's depthwise output of ``c``
    channels fits ``MAX_TILE_BYTES``; None otherwise (not fused)."""
    cores = target_cores()
    if cores < 2 or oh % cores or oh * ow < MIN_BAND_PIXELS:
        return None
    rows = oh // cores
    return rows if _tile_fits(c, ow, lanes)[1](rows) else None


def worth_fusing(s: "ConvShape") -> bool:
    """Whether the depthwise conv ``s`` and the pointwise conv reading it run faster as one
    kernel: stride 1, maps of ``MIN_PIXELS`` or more, or smaller ones that split into one
    band a core (:func:`core_band`). MobileNetV2's stride-2 pairs time the same fused and
    apart (alone: 149 against 153 us, 232 against 222; the whole model the same), and its
    large stride-2 depthwise convs fuse with their expansion instead (``pointwise_dw``)."""
    oh, ow = s.out_hw
    if s.stride != (1, 1):
        return False
    return oh * ow >= MIN_PIXELS or core_band(s.ic, oh, ow) is not None


@dataclass(frozen=True)
class FusedPlan:
    """``rows`` output rows per task; projection tile ``oct`` channels x ``pixels`` pixels of
    one row (vectors of ``lanes``)."""

    rows: int
    oct: int
    lanes: int
    pixels: int = 0       # 0: one vector

    @property
    def tile_pixels(self) -> int:
        return self.pixels or self.lanes

    def padded_width(self, ow: int) -> int:
        return -(-ow // self.lanes) * self.lanes


def plan(c: int, co: int, oh: int, ow: int, lanes: int | None = None, sparse: bool = False
         ) -> FusedPlan:
    """Rows per task: the most (dividing ``oh``) that keep ``D`` under ``MAX_TILE_BYTES`` and
    leave two row tiles a core of the target, in a multiple of its cores
    (``common.pick_band``), one row when none does; on maps under ``MIN_PIXELS`` one band a
    core (:func:`core_band`). The projection tile: dense,
    ``OCTS``'s entry that pads the output channels least by one vector of pixels; sparse
    (``bsr_conv1x1``'s 4-channel panels), 4 channels by up to 4 vectors of the row."""
    lanes, fits = _tile_fits(c, ow, lanes)
    owp = -(-ow // lanes) * lanes
    rows = (pick_band(oh, target_cores(), fits) if oh * ow >= MIN_PIXELS
            else core_band(c, oh, ow, lanes) or 1)
    if sparse:
        from sparsec.targets.kernels import bsr

        pixels = max(v * lanes for v in (1, 2, 4) if owp % (v * lanes) == 0)
        return FusedPlan(rows, bsr.CONV_LANES, lanes, pixels)
    oct_ = min(OCTS, key=lambda t: (-(-co // t) * t, OCTS.index(t)))
    return FusedPlan(rows, oct_, lanes)


@dataclass(frozen=True)
class Expansion:
    """The 1x1 conv (``k`` input channels) whose output the depthwise conv reads, computed by
    the same kernel (``conv1x1_dw_conv1x1_nchw``): tiles of ``oct`` channels x one vector
    of pixels, a channel block at a time, before the block's depthwise step."""

    k: int
    oct: int
    bias: bool = False
    act: Activation | None = None


def expansion_pixels(s: "ConvShape", rows: int, lanes: int) -> int | None:
    """Pixels of the input map one task expands: the rows its band reads (halo included,
    at most the map), as whole vectors of ``lanes``; None where that exceeds the map."""
    need = min(s.h, (rows - 1) * s.stride[0] + (s.kh - 1) * s.dilation[0] + 1) * s.w
    pixels = -(-need // lanes) * lanes
    return pixels if pixels <= s.h * s.w else None


#: the expansion's register tiles (channels x one vector), widest first among those that pad
#: the channels least. Alone, 2 threads, pruned MobileNetV2's 32 -> 192 -> 32 block at 14x14:
#: 12 channels 22.2 us, 16 22.1, 8 23.8, 6 24.2
EXPANSION_OCTS = (12, 8, 6, 4)


#: the whole block is fused on maps of at most this many pixels. MobileNetV2 on Emerald
#: Rapids, 2 threads, each kernel in the model's chain (its input just written, as
#: ``profile_host`` replays it): the 28x28 blocks fused ran 8-10 us faster than the expansion
#: and dw_conv1x1_nchw apart (pruned 16 -> 96 -> 16: 39 -> 30 us; dense 32 -> 192 -> 32: 98
#: -> 86-91), the 14x14 ones 2-7 us; the 56x56 ones 2-7 us slower (pruned 12 -> 72: 66 ->
#: 68 us; dense 24 -> 144: 191 -> 198; bands of 7 or 14 rows no better than 28)
BLOCK_MAX_PIXELS = 28 * 28
#: ... and where the rows two bands both expand cost at most this many MACs per value of the
#: expanded map (the extra share of pixels expanded x the expansion's input channels). On
#: 14x14 in two bands each expands 128 pixels for its 98: 64 -> 384 -> 64 (19.6) fused 85
#: -> 81-83 us, 96 -> 576 -> 96 (29.4) 161 -> 171
MAX_REDONE_MACS = 24


def worth_fusing_block(s: "ConvShape", k: int, co: int) -> bool:
    """Whether the expansion (``k`` input channels) feeding the depthwise conv ``s`` of a
    fused ``dw_conv1x1_nchw`` kernel joins it: small maps (``BLOCK_MAX_PIXELS``) where the
    band's halo rows expanded twice cost little (``MAX_REDONE_MACS``)."""
    planned = block_plan(s, co)
    if planned is None or s.h * s.w > BLOCK_MAX_PIXELS:
        return False
    fplan = planned[0]
    hw = s.h * s.w
    expanded = expansion_pixels(s, fplan.rows, fplan.lanes) * (s.out_hw[0] // fplan.rows)
    return (expanded - hw) * k <= MAX_REDONE_MACS * hw


def block_plan(s: "ConvShape", co: int, rows: int | None = None
               ) -> "tuple[FusedPlan, int] | None":
    """The plan of ``conv1x1_dw_conv1x1_nchw`` for the depthwise conv ``s`` and a projection
    to ``co`` channels, and its expansion tile's channels; None where a task's expansion
    would not fit the map (:func:`expansion_pixels`). Unless ``rows`` is given, one band of
    rows a core where the rows split evenly and the band's depthwise output fits
    ``MAX_TILE_BYTES`` (every band expands its halo rows again: fewer bands, less of it),
    else :func:`plan`'s rows."""
    oh, ow = s.out_hw
    fplan = plan(s.ic, co, oh, ow)
    if rows is None:
        cores = target_cores()
        fits = _tile_fits(s.ic, ow, fplan.lanes)[1]
        rows = oh // cores if cores > 1 and oh % cores == 0 and fits(oh // cores) \
            else fplan.rows
    if expansion_pixels(s, rows, fplan.lanes) is None:
        return None
    eoct = min(EXPANSION_OCTS, key=lambda t: (-(-s.ic // t) * t, EXPANSION_OCTS.index(t)))
    return replace(fplan, rows=rows), eoct


def build(s: "ConvShape", co: int, fplan: FusedPlan, dtype: str = "float32",
          dw_bias: bool = False, dw_act: Activation | None = None, bias: bool = False,
          act: Activation | None = None, residual: bool = False, kept: int | None = None,
          expansion: Expansion | None = None) -> "tirx.PrimFunc":
    """``(X[N,C,H,W], Wd[C,KH,KW] [, Bd[C]], Wp[NB,C,oct] [, B[CO]] [, R[N,CO,OH,OW]], Y)``:
    ``Wp`` packed by ``pointwise.pack_weight(W[CO, C], oct)``. Sparse projection (``kept``
    input channels per panel): ``idx[NB,kept], data[NB,kept,oct]`` in place of ``Wp``, as
    ``bsr.pack_weight(W[C, CO], oct)`` packs them. With ``expansion``
    (``conv1x1_dw_conv1x1_nchw``): ``(X[N,K,H*W], We[CB,K,oct_e] [, Be[C]], Wd, ...)``, the
    depthwise conv reading ``act_e(We @ X + Be)``, ``We`` packed by
    ``pointwise.pack_weight(W[C, K], oct_e)``; each task expands the pixels
    :func:`expansion_pixels` of its band's rows, one channel block at a time."""
    from tvm import s_tir, te, tirx

    (sh, sw), (dh, dw) = s.stride, s.dilation
    pt, pl, _, _ = s.padding
    oh, ow = s.out_hw
    c = s.ic
    rows, oct_, lanes = fplan.rows, fplan.oct, fplan.lanes
    owp = fplan.padded_width(ow)
    nb = -(-co // oct_)
    tasks = oh // rows
    # one task's padded input rows, split into stride phases: phase row l of task t is
    # padded row (t*rows + l)*sh + phase; each task pads its own (halo rows are copied twice)
    hq = rows + ((s.kh - 1) * dh) // sh
    wq = -(-(owp + ((s.kw - 1) * dw) // sw) // lanes) * lanes   # whole vectors
    if expansion is None:
        x = te.placeholder((s.n, c, s.h, s.w), dtype, name="X")
        sources = [x]

        def source(n, t, ch, r, q):
            return x[n, ch, r, q]
    else:
        sources, source, e_start = _expansion_stage(s, c, rows, lanes, expansion, dtype,
                                                    tasks)
    wd = te.placeholder((c, s.kh, s.kw), dtype, name="Wd")
    bd = te.placeholder((c,), dtype, name="Bd") if dw_bias else None
    b = te.placeholder((co,), dtype, name="B") if bias else None
    res = te.placeholder((s.n, co, oh, ow), dtype, name="R") if residual else None
    zero = tirx.const(0, dtype)

    def phase_value(n, t, ch, py, px, row, j):
        r, q = (t * rows + row) * sh + py - pt, j * sw + px - pl
        return tirx.if_then_else(tirx.all(r >= 0, r < s.h, q >= 0, q < s.w),
                                 source(n, t, ch, r, q), zero)

    xp = te.compute((s.n, tasks, c, sh, sw, hq, wq), phase_value, name="pad")
    ry = te.reduce_axis((0, s.kh), name="ry")
    rx = te.reduce_axis((0, s.kw), name="rx")
    dacc = te.compute(
        (s.n, c, oh, owp),
        lambda n, ch, i, j: te.sum(
            xp[n, i // rows, ch, (ry * dh) % sh, (rx * dw) % sw, i % rows + (ry * dh) // sh,
               j + (rx * dw) // sw] * wd[ch, ry, rx], axis=[ry, rx]),
        name="dacc")

    def dw_value(n, ch, i, j):
        v = dacc[n, ch, i, j]
        if bd is not None:
            v = v + bd[ch]
        return clip(v, dw_act, dtype)

    d = te.compute((s.n, c, oh, owp), dw_value, name="D")
    if kept is None:
        wpk = te.placeholder((nb, c, oct_), dtype, name="Wp")
        weights = [wpk]
        r = te.reduce_axis((0, c), name="c")
        pacc = te.compute(
            (s.n, nb, oct_, oh, owp),
            lambda n, jb, jl, i, j: te.sum(wpk[jb, r, jl] * d[n, r, i, j], axis=r),
            name="pacc")
    else:
        idx = te.placeholder((nb, kept), "int32", name="idx")
        data = te.placeholder((nb, kept, oct_), dtype, name="data")
        weights = [idx, data]
        r = te.reduce_axis((0, kept), name="l")

        def channel(jb, k):   # clamped: compute_at needs the read region of D bounded
            return tirx.max(tirx.min(idx[jb, k], c - 1), 0)

        pacc = te.compute(
            (s.n, nb, oct_, oh, owp),
            lambda n, jb, jl, i, j: te.sum(data[jb, r, jl] * d[n, channel(jb, r), i, j],
                                           axis=r),
            name="pacc")
    inputs = [*sources, wd] + ([bd] if bd is not None else []) + weights
    sch = s_tir.Schedule(epilogue_func(
        inputs, lambda n, o, i, j: pacc[n, o // oct_, o % oct_, i, j], (s.n, co, oh, ow),
        dtype, b, res, act))

    # projection: (n, row tile) in parallel; per panel and row, OCT x pixels accumulators
    blk = sch.get_sblock("pacc")
    n, jb, jl, i, j, rr = sch.get_loops(blk)
    it, ii = sch.split(i, [None, rows])
    jo, jv = sch.split(j, [None, fplan.tile_pixels])
    sch.reorder(n, it, jb, ii, jo, rr, jl, jv)
    sch.set_scope(blk, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, jo)
    if ow % fplan.tile_pixels == 0:
        _, lane = sch.split(sch.get_loops(out)[-1], [None, lanes])
        sch.vectorize(lane)
    sch.vectorize(jv)
    sch.unroll(jl)
    task = sch.fuse(n, it)

    # depthwise: the task's rows of every channel, into D (local to the task)
    dblk = sch.get_sblock("D")
    sch.compute_at(dblk, task)
    dp = depthwise.plan(rows, owp, lanes=lanes)
    dc, *di, dj = _loops_below(sch, dblk, task)   # (channel, row unless 1 row, column)
    djo, djv, djl = sch.split(dj, [None, dp.vecs, dp.lanes])
    if di:                                         # rows of dp.rows per register tile
        dio, dii = sch.split(di[0], [None, dp.rows])
        sch.reorder(dc, dio, djo, dii, djv, djl)
        sch.unroll(dii)
    sch.vectorize(djl)
    sch.unroll(djv)
    ablk = sch.get_sblock("dacc")
    sch.compute_at(ablk, djo)
    sch.set_scope(ablk, 0, "local")
    *spatial, ky, kx = _loops_below(sch, ablk, djo)
    avo, avl = sch.split(spatial[-1], [None, dp.lanes])
    sch.reorder(ky, kx, *spatial[:-1], avo, avl)
    sch.vectorize(avl)
    sch.unroll(avo)
    for lp in spatial[:-1]:
        sch.unroll(lp)
    sch.unroll(kx)
    sch.unroll(ky)
    if expansion is not None:     # blocks of the expansion's channels, each expanded first
        dcb, dc = sch.split(dc, [None, expansion.oct])
    sch.compute_at(sch.get_sblock("pad"), dc)
    if expansion is not None:
        eacc = _schedule_expansion(sch, dcb, lanes)
    sch.parallel(task)
    sch.decompose_reduction(ablk, ky)
    sch.decompose_reduction(blk, rr)
    if expansion is None:
        return vector_pad(
            finish(sch, NAME), s, lanes,
            x_row=lambda lead, py, i: ([lead[0], lead[2]], (lead[1] * rows + i) * sh + py - pt))
    sch.decompose_reduction(eacc, sch.get_loops(eacc)[-3])
    eo = expansion.oct

    def e_row(lead, py, i):   # E's flat offset of input row (t*rows + i)*sh + py - pt
        n, t, ch = lead
        row = (t * rows + i) * sh + py - pt
        return [n, t, ch // eo, ch % eo], row * s.w - e_start(t), row
    return vector_pad(finish(sch, EXPANDED_NAME), s, lanes, x_row=e_row, flat=True)


def _expansion_stage(s: "ConvShape", c: int, rows: int, lanes: int, e: Expansion,
                     dtype: str, tasks: int):
    """The placeholders of the expansion's operands; ``source(n, t, ch, r, q)``, the value
    of input row ``r``, column ``q`` of expanded channel ``ch`` as task ``t`` computes it:
    ``E[n, t, ch // oct, ch % oct, r * W + q - start(t)]``; and ``start(t)``, the first
    pixel task ``t`` expands: its band's first row inside the map, or earlier where the map
    ends first, so that its :func:`expansion_pixels` stay inside X."""
    from tvm import te, tirx

    pixels = expansion_pixels(s, rows, lanes)
    if pixels is None:
        raise ValueError(f"a band of {rows} rows reads more than the {s.h}x{s.w} map")
    hw = s.h * s.w
    cb = -(-c // e.oct)
    x = te.placeholder((s.n, e.k, hw), dtype, name="X")
    we = te.placeholder((cb, e.k, e.oct), dtype, name="We")
    be = te.placeholder((c,), dtype, name="Be") if e.bias else None

    def start(t):
        first = tirx.max(t * (rows * s.stride[0]) - s.padding[0], 0) * s.w
        return tirx.min(first, hw - pixels)

    rk = te.reduce_axis((0, e.k), name="k")
    eacc = te.compute(
        (s.n, tasks, cb, e.oct, pixels),
        lambda n, t, jb, jl, p: te.sum(we[jb, rk, jl] * x[n, rk, start(t) + p], axis=rk),
        name="eacc")

    def e_value(n, t, jb, jl, p):
        v = eacc[n, t, jb, jl, p]
        if be is not None:
            v = v + be[tirx.min(jb * e.oct + jl, c - 1)]
        return clip(v, e.act, dtype)

    ev = te.compute((s.n, tasks, cb, e.oct, pixels), e_value, name="E")

    def source(n, t, ch, r, q):
        # modulo the pixels: the identity where (r, q) is inside the map (the only reads
        # the padding makes), and a read region of all of E's pixels for compute_at, which
        # then computes whole vectors from one start a task (checked below)
        at = tirx.floormod(r * s.w + q - start(t), pixels)
        return ev[n, t, ch // e.oct, ch % e.oct, at]
    return [x, we] + ([be] if be is not None else []), source, start


def _schedule_expansion(sch, dcb, lanes: int):
    """Compute each channel block's expansion at the depthwise step's block loop ``dcb``:
    the block's channels x one vector of pixels per register tile, reducing over the input
    channels (its outermost loop; the accumulator block is returned)."""
    eblk = sch.get_sblock("E")
    sch.compute_at(eblk, dcb)
    ejl, ep = sch.get_loops(eblk)[-2:]
    if int(sch.get(ep).extent) != int(sch.get(eblk).iter_vars[-1].dom.extent):
        raise ValueError("the expansion's pixels are not one whole range a task")
    epo, epl = sch.split(ep, [None, lanes])
    sch.reorder(epo, ejl, epl)
    sch.vectorize(epl)
    ablk = sch.get_sblock("eacc")
    sch.compute_at(ablk, epo)
    sch.set_scope(ablk, 0, "local")
    ajl, ap, ak = sch.get_loops(ablk)[-3:]
    sch.reorder(ak, ajl, ap)
    sch.vectorize(ap)
    sch.unroll(ajl)
    return ablk


def _loops_below(sch, block, loop) -> list:
    """The loops around ``block`` inside ``loop`` (compute_at leaves out loops of extent 1)."""
    loops = sch.get_loops(block)
    at = [sch.get(lp).same_as(sch.get(loop)) for lp in loops].index(True)
    return loops[at + 1:]
