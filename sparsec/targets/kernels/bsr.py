"""``bsr_dense``: Y[M, N] = X[M, K] @ W[K, N] for a constant W whose zeros come in blocks of
16 output channels x 1 input channel (``--sparsity-pattern 16x1``), the BSR layout of "Fast
Sparse ConvNets" (Elsen et al.) with the block along the vectorized axis.

The sparsity structure is a compile-time constant, so the format is specialised on it: W's
16-wide column panels are packed like ``dense_packed``'s, but each panel keeps only its
nonzero K rows. Panels are padded to the same row count L (ELL), which keeps the loop nest
static: ``idx[NB, L]`` lists each panel's rows, ``data[NB, L, 16]`` their values (padding rows
point at row 0 with zero values). The micro-kernel is the dense one with an indirect load:

  for nb in parallel(NB): for mo in M/MI:
    acc[MI, 16] = 0
    for l in L: for mi in unroll(MI): for ni in vectorize(16):
      acc[mi, ni] += X[mo*MI+mi, idx[nb, l]] * data[nb, l, ni]

so it does L/K of the dense MACs. Panels with very different row counts waste the padding;
the cost rule counts the padded MACs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import Activation, epilogue_func, finish, wide_vectors
from sparsec.targets.kernels import dense, pointwise
from sparsec.targets.kernels.dense import schedule_panels

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

NAME = "bsr_dense"
LANES = 16
ROW_TILES = (4, 6, 5, 3, 2, 1)


def pack_weight(w_kn: "np.ndarray", lanes: int = LANES
                ) -> tuple["np.ndarray", "np.ndarray"]:
    """[K, N] -> (idx [NB, L] int32, data [NB, L, lanes]): each panel's nonzero rows."""
    import numpy as np

    panels = dense.pack_weight(w_kn, lanes)                       # [NB, K, lanes]
    rows = [np.flatnonzero(p.any(axis=1)) for p in panels]
    width = max(1, max(len(r) for r in rows))
    idx = np.zeros((len(panels), width), dtype=np.int32)
    data = np.zeros((len(panels), width, lanes), dtype=w_kn.dtype)
    for j, r in enumerate(rows):
        idx[j, : len(r)] = r
        data[j, : len(r)] = panels[j, r]
    return idx, data


def padded_rows(w_kn: "np.ndarray", lanes: int = LANES) -> int:
    """L of ``pack_weight`` without building the arrays."""
    return max(1, int(dense.pack_weight(w_kn != 0, lanes).any(axis=2).sum(axis=1).max()))


def build(m: int, k: int, n: int, rows: int, dtype: str = "float32", bias: bool = False,
          act: Activation | None = None, residual: bool = False, lanes: int = LANES,
          row_tiles: tuple[int, ...] = ROW_TILES) -> "tirx.PrimFunc":
    """The scheduled PrimFunc ``(X[M,K], idx[NB,L], data[NB,L,lanes] [, B[N]] [, R[M,N]],
    Y[M,N])`` with ``L = rows``."""
    from tvm import s_tir, te

    nb = -(-n // lanes)
    x = te.placeholder((m, k), dtype, name="X")
    idx = te.placeholder((nb, rows), "int32", name="idx")
    data = te.placeholder((nb, rows, lanes), dtype, name="data")
    b = te.placeholder((n,), dtype, name="B") if bias else None
    res = te.placeholder((m, n), dtype, name="R") if residual else None
    r = te.reduce_axis((0, rows), name="l")
    acc = te.compute(
        (m, nb, lanes),
        lambda i, jb, jl: te.sum(x[i, idx[jb, r]] * data[jb, r, jl], axis=r), name="acc")
    sch = s_tir.Schedule(epilogue_func(
        [x, idx, data], lambda i, j: acc[i, j // lanes, j % lanes], (m, n), dtype, b, res,
        act))
    return finish(schedule_panels(sch, m, n, lanes, row_tiles, 1), NAME)


CONV_NAME = "bsr_conv1x1"
#: output channels per panel of the pointwise kernel: 4 channels x 16 pixels is 8 ymm
#: accumulators, dense's 4x16 tile turned around. 16x1 zero blocks are 4x1 blocks too, and the
#: narrower panels pad less (each keeps only its own nonzero rows).
CONV_LANES = 4
CONV_PIXELS = 16
CONV_TILE = pointwise.Tile(CONV_LANES, CONV_PIXELS)
#: with AVX-512, 4 x 16 is only 4 zmm accumulators: large maps take 64-pixel tiles (16 zmm;
#: MobileNetV2's sparse pointwise layers alone at 112x112 341 -> 158 us, at 56x56 128 -> 64);
#: small maps keep 16 (the padding and the fewer parallel tasks cost more: 14x14 31 -> 39)
CONV_TILE_WIDE = pointwise.Tile(CONV_LANES, 64)
CONV_WIDE_MIN_PIXELS = 2048


def conv_tile(p: int) -> "pointwise.Tile":
    """The pointwise kernel's register tile for ``p`` pixels on the current target."""
    return CONV_TILE_WIDE if wide_vectors() and p >= CONV_WIDE_MIN_PIXELS else CONV_TILE


def conv_padded_pixels(p: int) -> int:
    return conv_tile(p).padded_pixels(p)


def build_conv1x1(n: int, ci: int, p: int, co: int, rows: int, dtype: str = "float32",
                  bias: bool = False, act: Activation | None = None, residual: bool = False
                  ) -> "tirx.PrimFunc":
    """Pointwise (1x1, stride 1) conv with weights packed by ``pack_weight(W[CI, CO],
    CONV_LANES)``: the ``conv1x1_nchw`` kernel (kernels/pointwise.py) walking each 4-channel
    panel's kept input channels through ``idx``:

      for (n, panel, po in Pp/PX) in parallel:             # PX: conv_tile(P).pixels
        acc[4, PX] = 0
        for l in L: for c in unroll(4): for q in vectorize(PX):
          acc[c, q] += data[panel, l, c] * X[n, idx[panel, l], po*PX + q]
        Y[n, panel*4 + c, po*PX + q] = epilogue(acc)        # masked at the CO / P tails

    ``X`` is ``[N, CI, Pp]`` with ``Pp`` = P rounded up to PX (the caller pads with zeros),
    ``Y`` is ``[N, CO, P]``; the PrimFunc is ``(X, idx, data [, B[CO]] [, R[N,CO,P]], Y)``."""
    return pointwise.build(n, ci, p, co, conv_tile(p), dtype, bias=bias, act=act,
                           residual=residual, rows=rows, name=CONV_NAME)
