"""``dense_packed``: Y[M, N] = X[M, K] @ W[K, N] (+ bias, residual, activation), W packed.

Packing: W is rewritten at compile time to ``[ceil(N/16), K, 16]`` (zero padded), so the 16
output channels of one block are contiguous for every k: the micro-kernel reads them as two
aligned 8-lane vectors while it walks k.

Schedule (per output tile of ``MI x 16``; ``MI`` divides M, 4 when it can):
  for nb in parallel(ceil(N/16)):          # independent column panels, one W panel each
    for mo in M/MI:
      acc[MI, 16] = 0                      # local -> lives in MI*2 ymm registers
      for ko in K/KU: for ki in unroll(KU): for mi in unroll(MI): for ni in vectorize(16):
        acc[mi, ni] += X[mo*MI+mi, k] * Wp[nb, k, ni]     # broadcast x FMA
      Y[rows, cols] = epilogue(acc)        # write-back, masked where N % 16 != 0
A 4x16 tile holds 8 accumulators, leaving registers for the 2 W vectors and the broadcasts of
AVX2's 16; wider tiles spill (measured: 8x16 and 2x16 are both slower on znver3).

With AVX-512 (32 registers of 16 lanes) the blocks are 32 wide and the tile 8 rows: 16
accumulators, 2 W loads and 8 broadcasts per 16 FMAs. A 4x16 tile there is 4 accumulators and
5 loads per 4 FMAs, which a core with two 512-bit FMA units cannot feed (Emerald Rapids, one
thread, against ONNX Runtime's MatMul: 32x1024x4096 4531 -> 2961 us, ORT 2857; 128x768x3072
8329 -> 4354 us, ORT 4115; 128x3072x768 8001 -> 4354, ORT 4147).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import (Activation, epilogue_func, finish, pick_row_tile,
                                            wide_vectors)

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

NAME = "dense_packed"
LANES = 16  # output channels per packed block: two fp32 ymm vectors
ROW_TILES = (4, 6, 5, 3, 2, 1)
#: row tiles with AVX-512 (32-wide blocks: 8 rows are 16 accumulators of the 32 registers)
ROW_TILES_AVX512 = (8, 4, 6, 5, 3, 2, 1)
K_UNROLL = 4


def lanes_for(m: int) -> int:
    """Packed block width for ``m`` rows (of the target being compiled for). One or two rows
    (batch-1 inference) give a tile of one or two vectors, a single chain of dependent FMAs
    per vector: 32-wide blocks double the independent chains (768x3072 at M=1 on znver4,
    2 threads: 0.087 -> 0.058 ms; at M=4 no change). With AVX-512 blocks are always 32 wide
    (module docstring)."""
    return 32 if m <= 2 or wide_vectors() else LANES


def row_tiles() -> tuple[int, ...]:
    """The preferred row tiles of the target being compiled for (first dividing M wins)."""
    return ROW_TILES_AVX512 if wide_vectors() else ROW_TILES


def pack_weight(w_kn: "np.ndarray", lanes: int = LANES) -> "np.ndarray":
    """[K, N] -> [ceil(N/lanes), K, lanes], zero padded on N."""
    import numpy as np

    k, n = w_kn.shape
    nb = -(-n // lanes)
    padded = np.zeros((k, nb * lanes), dtype=w_kn.dtype)
    padded[:, :n] = w_kn
    return np.ascontiguousarray(padded.reshape(k, nb, lanes).transpose(1, 0, 2))


def build(m: int, k: int, n: int, dtype: str = "float32", bias: bool = False,
          act: Activation | None = None, residual: bool = False, lanes: int | None = None,
          rows: tuple[int, ...] | None = None) -> "tirx.PrimFunc":
    """The scheduled PrimFunc ``(X[M,K], Wp[NB,K,lanes] [, B[N]] [, R[M,N]], Y[M,N])``.

    ``lanes`` is the packed block width (``lanes_for(m)`` by default: W must be packed the
    same way); ``rows`` the preferred row-tile sizes (first that divides M wins; default
    :func:`row_tiles`)."""
    from tvm import s_tir, te

    lanes = lanes or lanes_for(m)
    rows = rows or row_tiles()

    x, w, b, res = _operands(m, k, n, lanes, dtype, bias, residual)
    nb = w.shape[0]
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (m, nb, lanes), lambda i, jb, jl: te.sum(x[i, r] * w[jb, r, jl], axis=r), name="acc"
    )

    sch = s_tir.Schedule(epilogue_func(
        [x, w], lambda i, j: acc[i, j // lanes, j % lanes], (m, n), dtype, b, res, act))

    ku = K_UNROLL if k % K_UNROLL == 0 else 1
    return finish(schedule_panels(sch, m, n, lanes, rows, ku), NAME)


def _operands(m, k: int, n: int, lanes: int, dtype: str, bias: bool, residual: bool):
    """X [m, k], the packed W [ceil(n / lanes), k, lanes], and the optional bias [n] and
    residual [m, n] placeholders of a dense kernel (``m`` a number or a symbolic var)."""
    from tvm import te

    x = te.placeholder((m, k), dtype, name="X")
    w = te.placeholder((-(-n // lanes), k, lanes), dtype, name="Wp")
    b = te.placeholder((n,), dtype, name="B") if bias else None
    res = te.placeholder((m, n), dtype, name="R") if residual else None
    return x, w, b, res


def build_dynamic(k: int, n: int, dtype: str = "float32", bias: bool = False,
                  act: Activation | None = None, residual: bool = False,
                  row_tile: int = ROW_TILES[0]) -> "tirx.PrimFunc":
    """``build`` for a row count ``M`` known only at run time (a model with dynamic batch or
    sequence: rows = batch x seq): the PrimFunc has a symbolic ``m``; W is packed as for
    ``build`` (``LANES`` wide). The accumulator covers M rounded up to whole ``row_tile``
    tiles, the rows past M reading row M - 1 (at most ``row_tile - 1`` rows computed and
    never written: no padding to a maximum); the write-back stops at M. The register tile and
    its loop order are ``build``'s."""
    from tvm import s_tir, te, tirx

    lanes = LANES
    m = tirx.Var("m", "int64")
    rows = (m + row_tile - 1) // row_tile * row_tile
    x, w, b, res = _operands(m, k, n, lanes, dtype, bias, residual)
    nb = w.shape[0]
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (rows, nb, lanes),
        lambda i, jb, jl: te.sum(x[tirx.min(i, m - 1), r] * w[jb, r, jl], axis=r), name="acc")
    sch = s_tir.Schedule(epilogue_func(
        [x, w], lambda i, j: acc[i, j // lanes, j % lanes], (m, n), dtype, b, res, act))
    ku = K_UNROLL if k % K_UNROLL == 0 else 1
    return finish(schedule_panels(sch, m, n, lanes, (row_tile,), ku, row_tile=row_tile),
                  NAME)


def schedule_panels(sch, m: int, n: int, lanes: int, rows: tuple[int, ...], k_unroll: int,
                    row_tile: int | None = None):
    """The register-tiled schedule of an ``acc[M, NB, lanes]`` reduction block and its ``Y``
    epilogue (module docstring): shared by every kernel that walks packed column panels.
    ``row_tile`` fixes the row tile (``build_dynamic``: M is symbolic)."""
    nb = -(-n // lanes)
    mi_size = row_tile or pick_row_tile(m, rows)
    blk = sch.get_sblock("acc")
    i, jb, jl, kk = sch.get_loops(blk)
    mo, mi = sch.split(i, [None, mi_size])
    ko, ki = sch.split(kk, [None, k_unroll])
    sch.reorder(jb, mo, ko, ki, mi, jl)
    sch.set_scope(blk, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, mo)
    oj = sch.get_loops(out)[-1]
    if n % lanes == 0:
        _, oj_in = sch.split(oj, [None, lanes])
        sch.vectorize(oj_in)
    sch.vectorize(jl)
    sch.unroll(mi)
    sch.unroll(ki)
    if nb >= 2 * 2 or (row_tile is None and m // mi_size == 1):
        sch.parallel(jb)
    else:  # few column panels (small N): parallelise over row tiles too
        sch.parallel(sch.fuse(jb, mo))
    # decompose last: vectorize/unroll need the reduction block still whole.
    sch.decompose_reduction(blk, ko)
    return sch
