"""``grouped_conv2d_nchw``: NCHW/OIHW conv2d with ``1 < groups`` (and not depthwise with
multiplier 1, which ``depthwise_nchw`` serves), constant weights: RegNet / ResNeXt's grouped
3x3 convs, wav2vec2's grouped positional-embedding conv, channel multipliers > 1.

It is ``conv2d_nchw_packed``'s channel-blocked micro-kernel with a group axis: group ``g``'s
``OCg = OC / groups`` output channels read only its ``ICg = IC / groups`` input channels, so
each block of ``L`` output channels lies inside one group (padded with zero filters up to a
whole number of blocks per group) and reduces over that group's input channels only:

  W[OC, ICg, KH, KW] packed at compile time to [G * CBg, ICg, KH, KW, L]   (CBg = ceil(OCg/L))
  pad X once (plus right padding so OW rounds up to a multiple of T)
  for (n, g, cb, oh) in parallel:
    for owo in OWp/T:
      acc[T, L] = 0                                       # T vector accumulators
      for ic < ICg: for kh: for kw in unroll: for t in unroll(T): for l in vectorize(L):
        acc[t, l] += Xpad[n, g*ICg + ic, oh*s + kh*d, (owo*T + t)*s + kw*d]
                     * Wp[g*CBg + cb, ic, kh, kw, l]
      Y[n, g*OCg + cb*L + l, oh, owo*T + t] = epilogue(acc)    # masked at block / OW tails

``L`` is 16 (AVX-512), 8 or 4 lanes (:func:`pick_lanes`; 8 for RegNet's 8-wide groups: a
16-lane block would span two groups), so pruned groups whose width is not a multiple of 16
keep the kernel (a width no lane count divides writes back in a second pass: TVM cannot place
that write-back inside the tile). The generic schedule ran these convs 10-30x slower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import (Activation, epilogue_func, finish, vector_pad,
                                            wide_vectors)
from sparsec.targets.kernels.conv2d import (ConvShape, _schedule_pad, _zero_pad,
                                            pick_width_tile)

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

NAME = "grouped_conv2d_nchw"
#: accumulator vectors a strip may use (of 16 ymm / 32 zmm: the rest hold the input
#: broadcast and the weight vector)
MAX_STRIP = 8


def matches(s: ConvShape, groups: int) -> bool:
    """Whether the conv is grouped and splits its channels evenly (any group width)."""
    return groups > 1 and s.ic % groups == 0 and s.oc % groups == 0


def pick_lanes(ocg: int) -> int:
    """Output channels per vector block, of 16 (AVX-512 only), 8, 4 lanes: the widest that
    divides ``ocg`` (the write-back then runs inside the tile), else the width that covers
    the group in the fewest blocks (FMAs per tap), then pads the fewest zero filters."""
    options = (16, 8, 4) if wide_vectors() else (8, 4)
    exact = [lanes for lanes in options if ocg % lanes == 0]
    if exact:
        return exact[0]
    return min(options, key=lambda lanes: (-(-ocg // lanes), (-ocg) % lanes))


def pack_weight(w: "np.ndarray", groups: int, lanes: int) -> "np.ndarray":
    """[OC, ICg, KH, KW] -> [G * CBg, ICg, KH, KW, lanes]: each group's filters in blocks of
    ``lanes``, the group's last block zero padded."""
    import numpy as np

    oc, icg, kh, kw = w.shape
    ocg = oc // groups
    cbg = -(-ocg // lanes)
    padded = np.zeros((groups, cbg * lanes, icg, kh, kw), dtype=w.dtype)
    padded[:, :ocg] = w.reshape(groups, ocg, icg, kh, kw)
    blocks = padded.reshape(groups * cbg, lanes, icg, kh, kw)
    return np.ascontiguousarray(blocks.transpose(0, 2, 3, 4, 1))


def build(s: ConvShape, groups: int, dtype: str = "float32", bias: bool = False,
          act: Activation | None = None, residual: bool = False,
          width_tile: int | None = None) -> "tirx.PrimFunc":
    """The scheduled PrimFunc ``(X[N,IC,H,W], Wp[G*CBg,ICg,KH,KW,L] [, B[OC]]
    [, R[N,OC,OH,OW]], Y[N,OC,OH,OW])``, ``L`` = :func:`pick_lanes` of the group width."""
    from tvm import s_tir, te

    assert matches(s, groups), (s, groups)
    (sh, sw), (dh, dw) = s.stride, s.dilation
    pt, pl, pb, pr = s.padding
    oh, ow = s.out_hw
    icg, ocg = s.ic // groups, s.oc // groups
    lanes = pick_lanes(ocg)
    cbg = -(-ocg // lanes)
    t = width_tile or pick_width_tile(ow, MAX_STRIP)
    owp = -(-ow // t) * t
    hp = max(s.h + pt + pb, (oh - 1) * sh + (s.kh - 1) * dh + 1)
    wp = max(s.w + pl + pr, (owp - 1) * sw + (s.kw - 1) * dw + 1)

    x = te.placeholder((s.n, s.ic, s.h, s.w), dtype, name="X")
    w = te.placeholder((groups * cbg, icg, s.kh, s.kw, lanes), dtype, name="Wp")
    b = te.placeholder((s.oc,), dtype, name="B") if bias else None
    res = te.placeholder((s.n, s.oc, oh, ow), dtype, name="R") if residual else None
    needs_pad = (hp, wp) != (s.h, s.w)
    xp = _zero_pad(x, s, hp, wp, pt, pl, dtype) if needs_pad else x
    rc = te.reduce_axis((0, icg), name="rc")
    ry = te.reduce_axis((0, s.kh), name="ry")
    rx = te.reduce_axis((0, s.kw), name="rx")
    acc = te.compute(
        (s.n, groups * cbg, oh, owp, lanes),
        lambda n, cb, i, j, cl: te.sum(
            xp[n, (cb // cbg) * icg + rc, i * sh + ry * dh, j * sw + rx * dw]
            * w[cb, rc, ry, rx, cl], axis=[rc, ry, rx]),
        name="acc")

    def value(n, c, i, j):   # output channel c: group c // OCg, block and lane inside it
        if cbg * lanes == ocg:
            return acc[n, c // lanes, i, j, c % lanes]
        within = c % ocg
        return acc[n, (c // ocg) * cbg + within // lanes, i, j, within % lanes]

    sch = s_tir.Schedule(epilogue_func([x, w], value, (s.n, s.oc, oh, ow), dtype, b, res, act))
    blk = sch.get_sblock("acc")
    n, cb, i, j, cl, kc, ky, kx = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, t])
    sch.reorder(n, cb, i, jo, kc, ky, kx, ji, cl)
    out = sch.get_sblock("Y")
    if cbg * lanes == ocg:
        sch.set_scope(blk, 0, "local")
        sch.reverse_compute_at(out, jo)
    else:
        # a padded group's channel index is no affine map of the tile's: TVM cannot place
        # the write-back inside the tile, so it is a second pass over an acc in memory
        yn, yc = sch.get_loops(out)[:2]
        sch.parallel(sch.fuse(yn, yc))
    sch.vectorize(cl)
    sch.unroll(ji)
    sch.unroll(kx)
    sch.parallel(sch.fuse(n, cb, i))
    if needs_pad:
        _schedule_pad(sch)
    sch.decompose_reduction(blk, kc)
    return vector_pad(finish(sch, NAME), s) if needs_pad else finish(sch, NAME)

