"""``softmax_rows``: softmax over the last axis of rows whose length is no multiple of 16.

The generic row schedule (``fallback.schedule_rows``) vectorizes a row's stages with 16-lane
vectors when the row is whole vectors; a row of 159 (attention over wav2vec2's 159 frames)
left every stage scalar, the exponential included: 0.17 ms a call, half of the model. This
kernel writes each row as vector code with an overlapping last vector instead of a scalar tail
(rows of ``N = 16 q + t`` elements, ``N >= 16``):

  for r in rows (parallel):
    vmax = max over the q whole vectors of X[r] and its last vector X[r, N-16 : N]
    m = max over vmax's lanes                      # overlap read twice: max does not mind
    for each whole vector v:  e = exp(X[r, v] - m);  Y[r, v] = e;  vsum += e
    last vector (t > 0):      e = exp(X[r, N-16 : N] - m);  Y[r, N-16 : N] = e
                              vsum += e on its last t lanes only (the others are counted)
    Y[r, v] *= 1 / sum(vsum) for the whole vectors, then on the last t lanes of the last one

The exponential is :func:`vector_exp`, a range reduction to ``2^n * e^r`` (``|r| <= ln2/2``)
and a degree-7 polynomial, about 1e-7 relative error: all vector arithmetic (libm's ``expf``
is scalar).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import OPAQUE_PATTERN, SCHEDULED_ATTR, STRATEGY_ATTR

if TYPE_CHECKING:
    from tvm import tirx

NAME = "softmax_rows"
LANES = 16
#: the exponential's argument is clamped here (e^-87 ~ 1.6e-38, near fp32's smallest normal)
EXP_CLAMP = 87.0


def matches(n: int) -> bool:
    """Whether rows of ``n`` elements take this kernel: at least one whole vector, and not
    whole vectors (the generic row schedule serves those)."""
    return n >= LANES and n % LANES != 0


def vector_exp(v: "tirx.PrimExpr", lanes: int) -> "tirx.PrimExpr":
    """``exp(v)`` for a float32 vector ``v`` of ``lanes`` lanes, in vector arithmetic:
    ``e^v = 2^k e^r`` with ``k = round(v / ln 2)``, ``r = v - k ln 2``; ``e^r`` by its Taylor
    series to degree 7 (error below 6e-9 for ``|r| <= ln 2 / 2``); ``2^k`` built in the
    exponent bits. Arguments are clamped to +-``EXP_CLAMP``."""
    from tvm import tirx

    def c(x: float) -> "tirx.PrimExpr":
        return tirx.Broadcast(tirx.const(x, "float32"), lanes)

    v = tirx.max(tirx.min(v, c(EXP_CLAMP)), c(-EXP_CLAMP))
    k = tirx.floor(v * c(1 / math.log(2)) + c(0.5))
    r = v - k * c(math.log(2))
    poly = c(1 / math.factorial(7))
    for i in range(6, -1, -1):
        poly = poly * r + c(1 / math.factorial(i))
    def ci(x: int) -> "tirx.PrimExpr":
        return tirx.Broadcast(tirx.const(x, "int32"), lanes)

    bits = tirx.shift_left(tirx.Cast(f"int32x{lanes}", k) + ci(127), ci(23))
    return tirx.reinterpret(f"float32x{lanes}", bits) * poly


def build(rows: int, n: int, dtype: str = "float32") -> "tirx.PrimFunc":
    """The PrimFunc ``(X[rows, n], Y[rows, n])``, Y = softmax of each row of X."""
    assert matches(n) and dtype == "float32", (n, dtype)
    return _build(rows, n, dtype, "int32")


def build_dynamic(dtype: str = "float32") -> "tirx.PrimFunc":
    """``build`` for rows and a row length known only at run time (attention's softmax in a
    model with a dynamic sequence): rows of at least 16 take the vector code above (a row of
    whole vectors too: its last vector is then the last whole one, recomputed and counted
    once), shorter ones a scalar loop."""
    from tvm import tirx

    assert dtype == "float32", dtype
    return _build(tirx.Var("rows", "int64"), tirx.Var("n", "int64"), dtype, "int64")


def _build(rows, n, dtype: str, i32: str) -> "tirx.PrimFunc":
    """``build``'s kernel; ``rows`` and ``n`` may be symbolic (``i32`` is then int64)."""
    import tvm
    from tvm import s_tir, te, tirx

    symbolic = not isinstance(n, int)
    q, t = (n // LANES, n % LANES) if symbolic else divmod(n, LANES)
    x = te.placeholder((rows, n), dtype, name="X")
    y = te.compute((rows, n), lambda i, j: x[i, j], name="Y")
    func = te.create_prim_func([x, y])
    sch = s_tir.Schedule(func)
    copy = sch.get(sch.get_sblock("Y"))
    xb, yb = copy.reads[0].source, copy.writes[0].source
    if symbolic:      # the PrimFunc's own size variables, as the buffers hold them
        rows, n = xb.shape
        q, t = n // LANES, n % LANES
    vmax = tirx.decl_buffer((LANES,), dtype, "vmax", scope="local")
    vsum = tirx.decl_buffer((LANES,), dtype, "vsum", scope="local")
    scal = tirx.decl_buffer((2,), dtype, "scalars", scope="local")   # max, 1 / sum
    row = tirx.Var("r", i32)
    lanes = tirx.Ramp(tirx.const(0, i32), 1, LANES)

    def vec(buf, start):
        return tirx.BufferLoad(buf, [row, tirx.Ramp(start, 1, LANES)])

    def store(buf, start, value):
        return tirx.BufferStore(buf, value, [row, tirx.Ramp(start, 1, LANES)])

    def local(buf):
        return tirx.BufferLoad(buf, [lanes])

    def set_local(buf, value):
        return tirx.BufferStore(buf, value, [lanes])

    def loop(extent, make, name="v"):
        v = tirx.Var(name, i32)
        end = tirx.const(extent, i32) if isinstance(extent, int) else extent
        return tirx.For(v, tirx.const(0, i32), end, tirx.ForKind.SERIAL, make(v))

    def bcast(value):
        return tirx.Broadcast(value, LANES)

    zero = tirx.const(0.0, dtype)
    last = n - LANES
    in_tail = tirx.Ramp(tirx.const(0, i32), 1, LANES) >= bcast(
        LANES - t if symbolic else tirx.const(LANES - t, i32))
    m = tirx.BufferLoad(scal, [tirx.const(0, i32)])
    inv = tirx.BufferLoad(scal, [tirx.const(1, i32)])

    def reduce_lanes(buf, slot, combine):
        first = tirx.BufferStore(scal, tirx.BufferLoad(buf, [tirx.const(0, i32)]),
                                 [tirx.const(slot, i32)])
        rest = loop(LANES - 1, lambda l: tirx.BufferStore(
            scal, combine(tirx.BufferLoad(scal, [tirx.const(slot, i32)]),
                          tirx.BufferLoad(buf, [l + 1])), [tirx.const(slot, i32)]), "l")
        return [first, rest]

    def exp_at(start):
        return vector_exp(vec(xb, start) - bcast(m), LANES)

    body = [
        set_local(vmax, vec(xb, tirx.const(last, i32))),
        loop(q, lambda k: set_local(vmax, tirx.max(local(vmax), vec(xb, k * LANES))), "k"),
        *reduce_lanes(vmax, 0, tirx.max),
        set_local(vsum, bcast(zero)),
        loop(q, lambda k: tirx.SeqStmt([
            store(yb, k * LANES, exp_at(k * LANES)),
            set_local(vsum, local(vsum) + vec(yb, k * LANES))]), "k"),
        store(yb, tirx.const(last, i32), exp_at(tirx.const(last, i32))),
        set_local(vsum, local(vsum) + tirx.Select(in_tail, vec(yb, tirx.const(last, i32)),
                                                  bcast(zero))),
        *reduce_lanes(vsum, 1, lambda a, b: a + b),
        tirx.BufferStore(scal, tirx.const(1.0, dtype) / inv, [tirx.const(1, i32)]),
        loop(q, lambda k: store(yb, k * LANES, vec(yb, k * LANES) * bcast(inv)), "k"),
        # the last vector's first lanes lie in the last whole vector: already scaled
        store(yb, tirx.const(last, i32), tirx.Select(
            in_tail, vec(yb, tirx.const(last, i32)) * bcast(inv), vec(yb, tirx.const(last, i32)))),
    ] if not symbolic else None
    if symbolic:
        body = [tirx.IfThenElse(n >= LANES, tirx.SeqStmt(_vector_body(
            xb, yb, row, n, q, in_tail, vmax, vsum, scal, lanes, dtype, reduce_lanes, loop)),
            tirx.SeqStmt(_scalar_body(xb, yb, row, n, scal, dtype, loop)))]

    def region(buf):
        return tirx.BufferRegion(buf, [tvm.ir.Range.from_min_extent(row, 1),
                                       tvm.ir.Range.from_min_extent(0, n)])

    block = s_tir.SBlock([], [region(xb)], [region(yb)], "softmax_row",
                         tirx.SeqStmt(body) if len(body) > 1 else body[0],
                         None, [vmax, vsum, scal])
    rows_loop = tirx.For(row, tirx.const(0, i32),
                         rows if symbolic else tirx.const(rows, i32), tirx.ForKind.PARALLEL,
                         s_tir.SBlockRealize([], True, block))
    root = s_tir.SBlock([], [], [], "root", rows_loop)
    func = func.with_body(s_tir.SBlockRealize([], True, root))
    if "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return (func.with_attr(SCHEDULED_ATTR, True).with_attr("op_pattern", OPAQUE_PATTERN)
            .with_attr(STRATEGY_ATTR, NAME))


def _vector_body(xb, yb, row, n, q, in_tail, vmax, vsum, scal, lanes, dtype, reduce_lanes,
                 loop) -> list:
    """``_build``'s vector code for a row of symbolic length ``n >= LANES``."""
    from tvm import tirx

    def vec(buf, start):
        return tirx.BufferLoad(buf, [row, tirx.Ramp(start, 1, LANES)])

    def store(buf, start, value):
        return tirx.BufferStore(buf, value, [row, tirx.Ramp(start, 1, LANES)])

    def local(buf):
        return tirx.BufferLoad(buf, [lanes])

    def set_local(buf, value):
        return tirx.BufferStore(buf, value, [lanes])

    def bcast(value):
        return tirx.Broadcast(value, LANES)

    i64 = "int64"
    m = tirx.BufferLoad(scal, [tirx.const(0, i64)])
    inv = tirx.BufferLoad(scal, [tirx.const(1, i64)])
    last = n - LANES
    zero = tirx.const(0.0, dtype)

    def exp_at(start):
        return vector_exp(vec(xb, start) - bcast(m), LANES)

    return [
        set_local(vmax, vec(xb, last)),
        loop(q, lambda k: set_local(vmax, tirx.max(local(vmax), vec(xb, k * LANES))), "k"),
        *reduce_lanes(vmax, 0, tirx.max),
        set_local(vsum, bcast(zero)),
        loop(q, lambda k: tirx.SeqStmt([
            store(yb, k * LANES, exp_at(k * LANES)),
            set_local(vsum, local(vsum) + vec(yb, k * LANES))]), "k"),
        store(yb, last, exp_at(last)),
        set_local(vsum, local(vsum) + tirx.Select(in_tail, vec(yb, last), bcast(zero))),
        *reduce_lanes(vsum, 1, lambda a, b: a + b),
        tirx.BufferStore(scal, tirx.const(1.0, dtype) / inv, [tirx.const(1, i64)]),
        loop(q, lambda k: store(yb, k * LANES, vec(yb, k * LANES) * bcast(inv)), "k"),
        store(yb, last, tirx.Select(in_tail, vec(yb, last) * bcast(inv), vec(yb, last))),
    ]


def _scalar_body(xb, yb, row, n, scal, dtype, loop) -> list:
    """``_build``'s code for a row shorter than one vector (symbolic ``n < LANES``)."""
    from tvm import tirx

    i64 = "int64"
    slot = [tirx.const(0, i64)], [tirx.const(1, i64)]
    m = tirx.BufferLoad(scal, slot[0])
    total = tirx.BufferLoad(scal, slot[1])
    return [
        tirx.BufferStore(scal, tirx.BufferLoad(xb, [row, tirx.const(0, i64)]), slot[0]),
        loop(n, lambda j: tirx.BufferStore(scal, tirx.max(m, tirx.BufferLoad(xb, [row, j])),
                                           slot[0]), "j"),
        tirx.BufferStore(scal, tirx.const(0.0, dtype), slot[1]),
        loop(n, lambda j: tirx.SeqStmt([
            tirx.BufferStore(yb, tirx.exp(tirx.BufferLoad(xb, [row, j]) - m), [row, j]),
            tirx.BufferStore(scal, total + tirx.BufferLoad(yb, [row, j]), slot[1])]), "j"),
        tirx.BufferStore(scal, tirx.const(1.0, dtype) / total, slot[1]),
        loop(n, lambda j: tirx.BufferStore(yb, tirx.BufferLoad(yb, [row, j]) * total,
                                           [row, j]), "j"),
    ]
