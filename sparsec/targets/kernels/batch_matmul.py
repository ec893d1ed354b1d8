"""``batch_matmul``: Y[b, M, N] = A[b, M, K] @ B[b, K, N] with both operands computed at run
time: attention's Q @ K^T and P @ V.

Nothing can be packed ahead of time, so the kernel reads B in place: a row of B is contiguous
along N, which is the vectorized axis, so a ``lanes``-wide slice of it is one or two vector
loads per k. The micro-kernel is ``dense_packed``'s (rows x lanes accumulators, one broadcast of
A per row and k):

  for (b, n-panel, m-tile) in parallel:
    acc[MI, lanes] = 0
    for k: for mi in unroll(MI): for nl in vectorize(lanes):
      acc[mi, nl] += A[b, mo*MI + mi, k] * B[b, k, panel*lanes + nl]
    Y[b, ...] = epilogue(acc)

With ``b_transposed`` B comes as ``[b, N, K]`` (attention's K before its transpose): each task
takes one (b, n-panel) and first packs that panel of B^T into a ``[K, lanes]`` buffer (a small
transpose that stays in L1), then runs every m-tile over it, so the pack is paid once per
panel instead of a whole-tensor transpose kernel before the matmul.

N that is no multiple of 8 (attention over 159 frames: wav2vec2) packs its panels the same way
in either layout, the columns past N zero (read at a clamped index, so never out of bounds),
and writes back the first N columns only: the generic schedule ran such a Q @ K^T 5-10x slower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import Activation, epilogue_func, finish, pick_row_tile

if TYPE_CHECKING:
    from tvm import tirx

NAME = "batch_matmul"
ROW_TILES = (4, 6, 5, 3, 2, 1)
#: (batch, panel) tasks below which the m-tiles are split across threads too
MIN_PANEL_TASKS = 8


def lanes_for(n: int) -> int | None:
    """Vector width along N: 16 (two ymm) or 8 lanes, or None when N is neither's multiple."""
    return next((v for v in (16, 8) if n % v == 0), None)


def row_tile(m: int, row_tiles: tuple[int, ...] | None = None) -> int:
    """Rows per register tile: the first of ``row_tiles`` that divides M when given (tuned
    knobs); by default a divisor of at least 4 from :data:`ROW_TILES`, else the 6, 5 or 4 that
    pads M the least (159 rows: 5, not the divisor 3, whose 3 x lanes tile does 3 FMAs per 4
    loads); the padded rows compute on row M - 1 and are not written back."""
    if row_tiles is not None:
        return pick_row_tile(m, row_tiles)
    exact = pick_row_tile(m, ROW_TILES)
    padded = [t for t in (6, 5, 4) if t <= m]
    if exact >= 4 or not padded:
        return exact
    return min(padded, key=lambda t: ((-m) % t, -t))


def panel_lanes(n: int) -> int:
    """The panel width: :func:`lanes_for` N, else (a padded last panel) 16 from N = 16 on,
    else 8."""
    return lanes_for(n) or (16 if n >= 16 else 8)


def build(batch: int, m: int, k: int, n: int, dtype: str = "float32", bias: bool = False,
          act: Activation | None = None, residual: bool = False,
          row_tiles: tuple[int, ...] | None = None, b_transposed: bool = False
          ) -> "tirx.PrimFunc":
    """The scheduled PrimFunc ``(A[b,M,K], B[b,K,N] [, bias[N]] [, R[b,M,N]], Y[b,M,N])``;
    with ``b_transposed`` the second operand is ``B^T[b,N,K]``."""
    rows = row_tile(m, row_tiles)
    lanes = panel_lanes(n)
    return _build(batch, m, k, n, rows, -(-m // rows) * rows, lanes, n % lanes != 0,
                  -(-n // lanes), dtype, bias, act, residual, b_transposed)


def build_dynamic(batch: int | None, m: int | None, k: int | None, n: int | None,
                  dtype: str = "float32", bias: bool = False, act: Activation | None = None,
                  residual: bool = False, b_transposed: bool = False) -> "tirx.PrimFunc":
    """``build`` where the dims given as None are known only at run time (a model with
    dynamic batch or sequence: attention's heads x batch, and the sequence in M, N or K):
    symbolic in the PrimFunc. M is rounded up to whole 4-row tiles and a symbolic N is
    handled as a padded last panel (``build``'s clamped reads), so nothing is padded to a
    maximum."""
    from tvm import tirx

    def dim(value, name):
        return tirx.Var(name, "int64") if value is None else value

    batch, m, k, n = dim(batch, "batch"), dim(m, "m"), dim(k, "k"), dim(n, "n")
    if isinstance(m, int):
        rows = row_tile(m)
        mp = -(-m // rows) * rows
    else:
        rows = ROW_TILES[0]
        mp = (m + rows - 1) // rows * rows
    lanes = panel_lanes(n) if isinstance(n, int) else 16
    padded = not isinstance(n, int) or n % lanes != 0
    panels = -(-n // lanes) if isinstance(n, int) else n // lanes + 1  # provably covers N
    return _build(batch, m, k, n, rows, mp, lanes, padded, panels, dtype,
                  bias, act, residual, b_transposed)


def _build(batch, m, k, n, rows: int, mp, lanes: int, padded: bool, panels, dtype: str,
           bias: bool, act: Activation | None, residual: bool, b_transposed: bool
           ) -> "tirx.PrimFunc":
    """``build``'s kernel for a row tile, padded rows ``mp``, panels of ``lanes`` (``padded``:
    the last one partly past N); any extent may be symbolic (``build_dynamic``)."""
    from tvm import s_tir, te, tirx

    static_m = isinstance(m, int) and isinstance(mp, int)
    a = te.placeholder((batch, m, k), dtype, name="A")
    b = te.placeholder((batch, n, k) if b_transposed else (batch, k, n), dtype, name="Bm")
    bias_t = te.placeholder((n,), dtype, name="B") if bias else None
    res = te.placeholder((batch, m, n), dtype, name="R") if residual else None
    r = te.reduce_axis((0, k), name="k")
    packed = b_transposed or padded
    if packed:
        def column(t, jb, kk, jl):
            j = jb * lanes + jl
            if not padded:
                return b[t, j, kk] if b_transposed else b[t, kk, j]
            jc = tirx.min(j, n - 1)          # in bounds even where the select is evaluated
            v = b[t, jc, kk] if b_transposed else b[t, kk, jc]
            return tirx.if_then_else(j < n, v, tirx.const(0, dtype))
        pack = te.compute((batch, panels, k, lanes), column, name="pack")

        def b_at(t, kk, jb, jl):
            return pack[t, jb, kk, jl]
    else:
        def b_at(t, kk, jb, jl):
            return b[t, kk, jb * lanes + jl]

    def a_at(t, i, kk):     # rows past M (a padded last row tile) read row M - 1
        return a[t, i if static_m and mp == m else tirx.min(i, m - 1), kk]
    acc = te.compute(
        (batch, mp, panels, lanes),
        lambda t, i, jb, jl: te.sum(a_at(t, i, r) * b_at(t, r, jb, jl), axis=r), name="acc")
    sch = s_tir.Schedule(epilogue_func(
        [a, b], lambda t, i, j: acc[t, i, j // lanes, j % lanes], (batch, m, n), dtype,
        bias_t, res, act, channel_axis=2))
    blk = sch.get_sblock("acc")
    t, i, jb, jl, kk = sch.get_loops(blk)
    mo, mi = sch.split(i, [None, rows])
    sch.reorder(t, jb, mo, kk, mi, jl)
    sch.set_scope(blk, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, mo)
    if not padded:     # (the last panel's write-back is cut at N: scalar)
        _, lane = sch.split(sch.get_loops(out)[-1], [None, lanes])
        sch.vectorize(lane)
    sch.vectorize(jl)
    sch.unroll(mi)
    # one task per (b, panel), its m-tiles inside, where that leaves enough tasks: the panel
    # of B stays in L1 across the m-tiles (12 heads x 128 tokens: 15-34 % faster than tasks
    # over m-tiles too); a packed panel is made once per task
    many = not all(isinstance(v, int) for v in (batch, panels)) or (
        batch * panels >= MIN_PANEL_TASKS)
    if packed or many:
        task = sch.fuse(t, jb)
        sch.parallel(task)
    else:
        sch.parallel(sch.fuse(t, jb, mo))
    if packed:
        pack_blk = sch.get_sblock("pack")
        sch.compute_at(pack_blk, task)
        if not padded:
            sch.vectorize(sch.get_loops(pack_blk)[-1])
    sch.decompose_reduction(blk, kk)
    return finish(sch, NAME)
