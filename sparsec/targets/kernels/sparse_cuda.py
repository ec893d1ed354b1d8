"""``nm_sparse_cuda``: Y[M, N] = X[M, K] @ W[K, N] on a CUDA GPU for a constant W whose zeros
follow an N:M pattern along K per output channel (2:4, 1:4, 2:8, ... from ``--sparsity-pattern``),
or any pattern at all, for few rows M (batch-1 and small-batch inference: the memory-bound
regime, where a GPU matmul waits on the weights and fewer weight bytes is the speed-up).

Format (specialised at compile time, as every sparse format in sparsec): each output channel
keeps its nonzeros only, stored K-major so that neighbouring threads (channels) read
neighbouring words:

  vals[L, N]   the kept values of each channel, in K order (zero padded to L per channel)
  offs[L, N]   where each one sits: ``int8`` offset inside its group of ``group`` inputs
               (N:M patterns: value ``l`` of a channel lies in group ``l // per_group``), or
               an ``int16`` / ``int32`` input index (any other pattern: ``group`` 0)

so a 2:4 weight costs 4 + 1 bytes per kept value, 0.625x the dense bytes, and an 80 %
unstructured one (4 + 2) / 5 = 0.3x.

Schedule: one thread per output channel, 128 channels per block; every thread walks its L
values (coalesced across the warp) and gathers the matching X entries into M register
accumulators; the epilogue (bias, residual, activation) runs in the thread. X is M x K floats,
read by every block: it stays in L1/L2 (staging it in shared memory needs the gather's
extent, which TIR's compute_at cannot bound for a data-dependent index). The loop nest is
static; the kernel's numerics are checked on the CPU with its thread loops serialized
(targets/cuda.py); its speed needs a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import Activation, epilogue_func, finish

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

NAME = "nm_sparse_cuda"
THREADS = 128
#: most X rows the kernel takes: beyond it a dense GEMM reuses each weight over enough rows
MAX_ROWS = 8


@dataclass(frozen=True)
class Format:
    """How a weight is compressed: ``kept`` values per channel (L), and ``group`` inputs per
    N:M group with ``per_group`` kept in each (0, 0: absolute indices)."""

    kept: int
    group: int = 0
    per_group: int = 0
    index_dtype: str = "int8"


def nm_pattern(w_kn: "np.ndarray", candidates: tuple[int, ...] = (4, 8, 16)
               ) -> tuple[int, int] | None:
    """The tightest (N, M) such that every group of M consecutive inputs holds at most N
    nonzeros of every output channel, with N <= M / 2; None if no candidate M qualifies."""
    k, n = w_kn.shape
    best = None
    for m in candidates:
        if k % m:
            continue
        per = int((w_kn.reshape(k // m, m, n) != 0).sum(axis=1).max())
        if per * 2 <= m and (best is None or per / m < best[0] / best[1]):
            best = (max(per, 1), m)
    return best


def plan(w_kn: "np.ndarray") -> Format:
    """The compressed format of ``w_kn`` that reads fewer bytes: N:M when a pattern fits,
    or absolute indices (``int16`` where K allows), whose padding follows the densest
    channel rather than the densest group."""
    import numpy as np

    k, n = w_kn.shape
    formats = [Format(kept=max(1, int((w_kn != 0).sum(axis=0).max())),
                      index_dtype="int16" if k <= np.iinfo(np.int16).max else "int32")]
    pattern = nm_pattern(w_kn)
    if pattern is not None:
        per, group = pattern
        formats.append(Format(kept=per * (k // group), group=group, per_group=per))
    return min(formats, key=lambda f: weight_bytes(f, n))


def pack_weight(w_kn: "np.ndarray", fmt: Format) -> tuple["np.ndarray", "np.ndarray"]:
    """[K, N] -> (vals [L, N], offs [L, N]) in ``fmt`` (module docstring)."""
    import numpy as np

    k, n = w_kn.shape
    # nonzeros first, in K order (a stable sort of "is zero"); padding picks up zeros
    if fmt.group:
        groups = w_kn.reshape(k // fmt.group, fmt.group, n)
        order = np.argsort(groups == 0, axis=1, kind="stable")[:, : fmt.per_group]
        vals = np.take_along_axis(groups, order, axis=1).reshape(fmt.kept, n)
        offs = order.reshape(fmt.kept, n)
    else:
        offs = np.argsort(w_kn == 0, axis=0, kind="stable")[: fmt.kept]
        vals = np.take_along_axis(w_kn, offs, axis=0)
    return np.ascontiguousarray(vals), np.ascontiguousarray(offs.astype(fmt.index_dtype))


def weight_bytes(fmt: Format, n: int, itemsize: int = 4) -> int:
    """Bytes the kernel reads for the weight: values plus indices."""
    import numpy as np

    return fmt.kept * n * (itemsize + np.dtype(fmt.index_dtype).itemsize)


def build(m: int, k: int, n: int, fmt: Format, dtype: str = "float32", bias: bool = False,
          act: Activation | None = None, residual: bool = False) -> "tirx.PrimFunc":
    """The scheduled PrimFunc ``(X[M,K], vals[L,N], offs[L,N] [, B[N]] [, R[M,N]], Y[M,N])``."""
    from tvm import s_tir, te

    x = te.placeholder((m, k), dtype, name="X")
    vals = te.placeholder((fmt.kept, n), dtype, name="vals")
    offs = te.placeholder((fmt.kept, n), fmt.index_dtype, name="offs")
    b = te.placeholder((n,), dtype, name="B") if bias else None
    res = te.placeholder((m, n), dtype, name="R") if residual else None
    r = te.reduce_axis((0, fmt.kept), name="l")

    def column(kept, j):
        off = offs[kept, j].astype("int32")
        if fmt.group:
            return (kept // fmt.per_group) * fmt.group + off
        return off

    acc = te.compute((m, n), lambda i, j: te.sum(vals[r, j] * x[i, column(r, j)], axis=r),
                     name="acc")
    sch = s_tir.Schedule(epilogue_func([x, vals, offs], lambda i, j: acc[i, j], (m, n), dtype,
                                       b, res, act))
    out = sch.get_sblock("Y")
    i, j = sch.get_loops(out)
    sch.reorder(j, i)
    bx, tx = sch.split(j, [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    blk = sch.get_sblock("acc")
    sch.compute_at(blk, tx)
    sch.set_scope(blk, 0, "local")
    if m > 1:   # l outer, rows inner: each value read feeds M accumulators
        rows, kept = sch.get_loops(blk)[2:]
        sch.reorder(kept, rows)
        sch.unroll(rows)
    sch.decompose_reduction(blk, sch.get_loops(blk)[2])
    return finish(sch, NAME)
