"""Intel AMX bf16 tile kernels. ``dense_amx_bf16``: Y[M, N] = X[M, K] @ W[K, N] (+ bias,
residual, activation); the conv, batch-matmul and sparse variants share its tile program.

AMX (Sapphire Rapids and newer) adds eight tile registers of up to 16 rows x 64 bytes and
``tdpbf16ps``, which multiplies a 16 x 32 bf16 tile by a 32 x 16 one and accumulates into a
16 x 16 fp32 tile: 8192 multiply-adds per instruction. Inputs are rounded to bf16 (8 bits of
mantissa), products and sums stay fp32: the kernel is lossy, and the compile report says so.

Data (all packing of W done in numpy at compile time):
  Xb[MP, KP]            X rounded to bf16 (round to nearest even), zero padded: a per-call stage
  Wp[NP/16, KP/32, 16, 32]
                        W in AMX's pair ("VNNI") layout: tile (nb, kb) is one contiguous 1 KB
                        block whose row p holds, for each of 16 output channels c,
                        W[kb*32 + 2p, c] and W[kb*32 + 2p + 1, c] side by side
  acc[MP, NP]           fp32 tiles stored by the tile program, read by the epilogue

Tile program, one parallel task per (mt x nt) block of C tiles (``Plan``):
  ldtilecfg; tilezero C[0 .. mt*nt)
  for kb in KP/32:
    tileloadd A[i] <- Xb[rows of i, kb*32 ..]     (stride KP*2 bytes)
    tileloadd B[j] <- Wp[col block j, kb]          (stride 64 bytes)
    tdpbf16ps C[i, j] += A[i] . B[j]               (mt*nt of them)
  tilestored C -> acc; tilerelease
then ``Y = act(acc + bias + residual)``, vectorized, in parallel over rows.

Nothing on this machine runs AMX, so every tile op has a twin written as TIR loops with the
instruction's semantics (Intel SDM, TDPBF16PS: per output, for each pair, ``acc += a0*b0`` then
``acc += a1*b1`` in fp32; a bf16 x bf16 product is exact in fp32). :func:`build` with
``emulate=True`` runs the same tile program on any CPU: the tests check it against numpy and
ONNX Runtime here, and ``sparsec compile --target x86-amx`` checks the model with it.

``conv2d_amx_bf16`` is the same tile program per image for an NCHW conv: W [OC, IC*KH*KW] is A
(row-major bf16, no pair layout needed), and a per-call stage writes X's im2col matrix in bf16
pairs, one uint32 per (pair of K rows, pixel), whose rows B tiles read in place
(``build_conv``).

``batch_matmul_amx_bf16`` runs it per batch entry on two run-time operands (attention), both
staged per call: A as bf16 rows, B (or B^T) as bf16 pair words (``build_batch``).

``sparse_amx_bf16`` is the same tile program with W compressed as in SparAMX: per B tile, one
32-bit mask per tile row (which of its 32 bf16 values are nonzero) and the nonzero values in
order. Each task expands the tiles it needs into a 1 KB buffer with AVX-512's masked expand
load (``vpexpandw``, one per tile row) and loads the tile from there. The products are the same
as the dense kernel's; what changes is the bytes read: 2 per weight dense, 2 x density + 1/8
(the masks) compressed. That pays where the kernel is memory-bound: a batch-1 (one row tile)
matmul, LLM decoding's regime, which is where SparAMX reports its gains.

Linux gives a process the AMX tile state only after ``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``; both runtimes ask for it (``host.request_amx`` and the C runtime's
``sparsec_open``), and so does the tuner before it times a kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import (Activation, bf16_allowed, epilogue_func, finish,
                                            precision)

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

    from sparsec.targets.kernels.conv2d import ConvShape

NAME = "dense_amx_bf16"
SPARSE_NAME = "sparse_amx_bf16"
TILE_K = 32      # bf16 values in one 64-byte tile row
TILE_N = 16      # fp32 values in one 64-byte tile row
MAX_ROWS = 16    # rows of a tile register
TILES = 8        # tile registers
#: LLVM CPU features the real (not emulated) kernel needs
FEATURES = ("amx-tile", "amx-bf16")

_EMULATE: contextvars.ContextVar[bool] = contextvars.ContextVar("sparsec_amx_emulate",
                                                                default=False)


@contextlib.contextmanager
def emulated():
    """Within the block, AMX kernels are offered on any LLVM target, built with their tile ops
    as TIR loops (module docstring): the same tile program, runnable here. (It implies the
    bf16 precision.)"""
    token = _EMULATE.set(True)
    try:
        with precision("bf16"):
            yield
    finally:
        _EMULATE.reset(token)


def emulating() -> bool:
    return _EMULATE.get()


def available() -> bool:
    """Whether the compile allows bf16 (``--precision bf16``; the ``x86-amx`` target's
    default) and the target being compiled for has AMX bf16, or the tile ops are emulated."""
    import tvm

    from sparsec.targets import llvm_features

    if emulating():
        return True
    if not bf16_allowed():
        return False
    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return False
    return set(FEATURES) <= llvm_features(str(target))


# --------------------------------------------------------------------------- data layout


def bf16_bits(a: "np.ndarray") -> "np.ndarray":
    """fp32 -> bf16 bit patterns (uint16), rounded to nearest even, as the kernel's X stage
    rounds (NaN payloads are not preserved: weights and activations here are finite)."""
    import numpy as np

    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_round(a: "np.ndarray") -> "np.ndarray":
    """``a`` rounded to bf16, as fp32 values (the numbers the tiles multiply)."""
    import numpy as np

    return (bf16_bits(a).astype(np.uint32) << 16).view(np.float32)


def bf16_bits_expr(value: "tirx.PrimExpr") -> "tirx.PrimExpr":
    """:func:`bf16_bits` of one fp32 TIR value, as uint32 (the top 16 bits are zero)."""
    from tvm import tirx

    u = tirx.reinterpret("uint32", value)
    return (u + tirx.IntImm("uint32", 0x7FFF) + ((u >> 16) & tirx.IntImm("uint32", 1))) >> 16


def bf16_or_zero(value: "tirx.PrimExpr", inside: "tirx.PrimExpr", dtype: str = "uint32"
                 ) -> "tirx.PrimExpr":
    """The bf16 bits of ``value`` as ``dtype`` where ``inside`` holds, else 0 (the padding of
    a staged operand; ``value``'s load index must be clamped in bounds all the same: the
    vectorized stage evaluates both sides)."""
    from tvm import tirx

    return tirx.if_then_else(inside, tirx.Cast(dtype, bf16_bits_expr(value)),
                             tirx.IntImm(dtype, 0))


def _bf16_rows(x, m: int, k: int, mp: int, kp: int, name: str):
    """The stage of a run-time A operand ``x[..., M, K]``: bf16 bits ``[..., MP, KP]``, zero
    padded."""
    from tvm import te, tirx

    def bits(*index):
        *lead, i, kk = index
        return bf16_or_zero(x[(*lead, tirx.min(i, m - 1), tirx.min(kk, k - 1))],
                            tirx.all(i < m, kk < k), "uint16")

    return te.compute((*x.shape[:-2], mp, kp), bits, name=name)


@dataclass(frozen=True)
class Plan:
    """Tile geometry: ``rows`` per tile (16, or M when M < 16), and a task's block of ``mt``
    row tiles x ``nt`` column tiles, using mt*nt C + mt A + nt B <= 8 tile registers."""

    m: int
    k: int
    n: int
    rows: int
    mt: int
    nt: int

    @property
    def mp(self) -> int:
        return -(-self.m // (self.rows * self.mt)) * self.rows * self.mt

    @property
    def kp(self) -> int:
        return -(-self.k // TILE_K) * TILE_K

    @property
    def np_(self) -> int:
        return -(-self.n // (TILE_N * self.nt)) * TILE_N * self.nt

    @property
    def tasks(self) -> tuple[int, int]:
        return self.mp // (self.rows * self.mt), self.np_ // (TILE_N * self.nt)

    def tile_rows(self, t: int) -> int:
        """Rows of tile register ``t``: C and A tiles (the first mt*nt + mt) hold ``rows``
        rows; B tiles, and the unused ones, 16 pair rows of K."""
        return TILE_K // 2 if t >= self.mt * self.nt + self.mt else self.rows


def report(p: Plan) -> dict:
    """What the compile report says about an AMX kernel's decision."""
    return {"precision": "bf16", "tiles": f"{p.mt}x{p.nt}",
            **({"emulated": True} if emulating() else {})}


def plan(m: int, k: int, n: int, mt: int | None = None, nt: int | None = None) -> Plan:
    """Default geometry: 2x2 C tiles when there are two row tiles (every loaded tile feeds
    two ``tdpbf16ps``), else one row of up to 3 column tiles; the widest block that divides
    the column tiles, so that no task computes padding columns."""
    rows = min(MAX_ROWS, m)
    row_tiles = -(-m // rows)
    col_tiles = -(-n // TILE_N)
    if mt is None:
        mt = 2 if row_tiles >= 2 else 1
    if nt is None:
        nt = next(t for t in ((2, 1) if mt == 2 else (3, 2, 1)) if col_tiles % t == 0)
    if mt * nt + mt + nt > TILES:
        raise ValueError(f"{mt}x{nt} C tiles need {mt * nt + mt + nt} tile registers (> 8)")
    return Plan(m, k, n, rows, mt, nt)


def pack_weight(w_kn: "np.ndarray", p: Plan) -> "np.ndarray":
    """[K, N] fp32 -> bf16 bits [NP/16, KP/32, 16, 32] in AMX's pair layout (zero padded)."""
    import numpy as np

    k, n = w_kn.shape
    padded = np.zeros((p.kp, p.np_), dtype=np.float32)
    padded[:k, :n] = w_kn
    bits = bf16_bits(padded)                                 # [KP, NP]
    # [KB, 16 pairs, 2, NB, 16] -> [NB, KB, 16 pairs, 16 columns, 2]
    tiles = bits.reshape(p.kp // TILE_K, TILE_K // 2, 2, p.np_ // TILE_N, TILE_N)
    return np.ascontiguousarray(tiles.transpose(3, 0, 1, 4, 2)).reshape(
        p.np_ // TILE_N, p.kp // TILE_K, TILE_K // 2, TILE_K)


@dataclass(frozen=True)
class SparseWeight:
    """W compressed for ``sparse_amx_bf16`` (module docstring)."""

    values: "np.ndarray"    # uint16 [nnz + TILE_K]: the nonzero bf16 values, tile by tile
    masks: "np.ndarray"     # uint32 [NP/16, KP/32, 16]: bit q of row r: value q is kept
    offsets: "np.ndarray"   # int32 [NP/16, KP/32]: where each tile's values start

    @property
    def nnz(self) -> int:
        return int(self.values.size) - TILE_K

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for W."""
        return int(self.values.nbytes + self.masks.nbytes + self.offsets.nbytes)


def pack_sparse(w_kn: "np.ndarray", p: Plan) -> SparseWeight:
    """[K, N] fp32 -> the compressed pair layout: :func:`pack_weight`'s tiles, each row
    reduced to a bit mask and its nonzero values. The values end with one tile row of zeros,
    so that every tile's start is a valid address even when the last tiles are empty."""
    return compress_tiles(pack_weight(w_kn, p))


def compress_tiles(tiles: "np.ndarray") -> SparseWeight:
    """bf16 tiles [NB, KB, 16, 32] (:func:`pack_weight`'s) -> the compressed format."""
    import numpy as np

    kept = (tiles & np.uint16(0x7FFF)) != 0                # +-0 are dropped: exact
    weights = np.uint32(1) << np.arange(TILE_K, dtype=np.uint32)
    masks = (kept * weights).sum(axis=-1, dtype=np.uint64).astype(np.uint32)
    counts = kept.reshape(kept.shape[0], kept.shape[1], -1).sum(axis=-1)
    offsets = np.concatenate([[0], np.cumsum(counts.reshape(-1))[:-1]]).reshape(counts.shape)
    values = np.concatenate([tiles[kept], np.zeros(TILE_K, np.uint16)])
    return SparseWeight(values.astype(np.uint16), masks, offsets.astype(np.int32))


def random_sparse(col_tiles: int, k_tiles: int, nnz: int, seed: int = 0) -> SparseWeight:
    """A compressed weight of ``col_tiles`` x ``k_tiles`` tiles with exactly ``nnz`` kept
    values at random places (what the tuner times a ``sparse_amx_bf16`` kernel with: its
    masks and offsets must agree)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (col_tiles, k_tiles, TILE_K // 2, TILE_K)
    flat = np.zeros(int(np.prod(shape)), np.uint16)
    flat[rng.choice(flat.size, size=nnz, replace=False)] = bf16_bits(
        rng.uniform(0.5, 1.5, nnz).astype(np.float32))
    return compress_tiles(flat.reshape(shape))


def unpack_sparse(sw: SparseWeight) -> "np.ndarray":
    """The dense tiles back from :func:`pack_sparse` (numpy's expand: the format's spec)."""
    import numpy as np

    nb, kb, rows = sw.masks.shape
    kept = ((sw.masks[..., None] >> np.arange(TILE_K, dtype=np.uint32)) & 1).astype(bool)
    tiles = np.zeros((nb, kb, rows, TILE_K), np.uint16)
    tiles[kept] = sw.values[:sw.nnz]
    return tiles


def dense_bytes(p: Plan) -> int:
    """Bytes the dense kernel reads for W (bf16 tiles)."""
    return p.np_ * p.kp * 2


# --------------------------------------------------------------------------- tile ops


class _HardwareTiles:
    """The tile ops as AMX instructions (LLVM intrinsics; tile numbers are immediates)."""

    def __init__(self, p: Plan) -> None:
        self.p = p

    def begin(self) -> None:
        """Allocate and load the tile configuration (palette 1; per-tile rows and bytes)."""
        from tvm.script.ir_builder import tirx as T

        cfg = T.buffer_proxy(T.alloc_buffer([64], "uint8", scope="local"))
        for i in range(64):
            cfg[i] = _u8(0)
        cfg[0] = _u8(1)
        for t in range(TILES):
            cfg[16 + 2 * t] = _u8(64)                         # bytes per row (low byte)
            cfg[48 + t] = _u8(self.p.tile_rows(t))
        self._intrin("ldtilecfg", _address(cfg, 0))

    def zero(self, t: int) -> None:
        self._intrin("tilezero", _i8(t))

    def load(self, t: int, buf, index, stride_bytes: int) -> None:
        from tvm import tirx

        self._intrin("tileloadd64", _i8(t), _flat_address(buf, index),
                     tirx.IntImm("int64", stride_bytes))

    def dot(self, c: int, a: int, b: int) -> None:
        self._intrin("tdpbf16ps", _i8(c), _i8(a), _i8(b))

    def store(self, t: int, buf, index, stride_bytes: int) -> None:
        from tvm import tirx

        self._intrin("tilestored64", _i8(t), _flat_address(buf, index),
                     tirx.IntImm("int64", stride_bytes))

    def end(self) -> None:
        self._intrin("tilerelease")

    @staticmethod
    def _intrin(name: str, *args) -> None:
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        T.evaluate(tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


class _EmulatedTiles:
    """The same tile ops on a per-task tile file in memory, as TIR loops with each
    instruction's semantics: the numerics of the hardware program, on any CPU."""

    def __init__(self, p: Plan) -> None:
        self.p = p

    def begin(self) -> None:
        from tvm.script.ir_builder import tirx as T

        self.bits = T.buffer_proxy(T.alloc_buffer([TILES, MAX_ROWS, TILE_K], "uint16",
                                                  scope="local"))
        self.acc = T.buffer_proxy(T.alloc_buffer([TILES, MAX_ROWS, TILE_N], "float32",
                                                 scope="local"))

    def zero(self, t: int) -> None:
        from tvm.script.ir_builder import tirx as T

        with T.grid(self.p.tile_rows(t), TILE_N) as (r, c):
            self.acc[t, r, c] = _f32(0.0)

    def load(self, t: int, buf, index, stride_bytes: int) -> None:
        """Rows of 64 bytes from ``buf`` (uint16 elements) at ``index``, ``stride_bytes``
        apart: as ``tileloadd``, addressed in bytes from the first element."""
        from tvm.script.ir_builder import tirx as T

        flat = T.buffer_proxy(_flat_view(buf, "uint16"))
        start = _flat_offset(buf, index, "uint16")
        with T.grid(self.p.tile_rows(t), TILE_K) as (r, c):
            self.bits[t, r, c] = flat[start + r * (stride_bytes // 2) + c]

    def dot(self, c: int, a: int, b: int) -> None:
        from tvm.script.ir_builder import tirx as T

        with T.grid(self.p.tile_rows(c), TILE_K // 2, TILE_N) as (r, kp, n):
            for j in range(2):
                self.acc[c, r, n] = self.acc[c, r, n] + (
                    _as_f32(self.bits[a, r, 2 * kp + j]) * _as_f32(self.bits[b, kp, 2 * n + j]))

    def store(self, t: int, buf, index, stride_bytes: int) -> None:
        from tvm.script.ir_builder import tirx as T

        flat = T.buffer_proxy(_flat_view(buf, "float32"))
        start = _flat_offset(buf, index, "float32")
        with T.grid(self.p.tile_rows(t), TILE_N) as (r, c):
            flat[start + r * (stride_bytes // 4) + c] = self.acc[t, r, c]

    def end(self) -> None:
        pass


def _u8(v: int):
    from tvm import tirx

    return tirx.IntImm("uint8", v)


def _i8(v: int):
    from tvm import tirx

    return tirx.IntImm("int8", v)


def _f32(v: float):
    from tvm import tirx

    return tirx.FloatImm("float32", v)


def _as_f32(bits):
    """bf16 bits (uint16) -> the fp32 value they are the top half of."""
    from tvm import tirx

    return tirx.reinterpret("float32", tirx.Cast("uint32", bits) << tirx.IntImm("uint32", 16))


def _address(buf, *index):
    from tvm import tirx

    return tirx.address_of(buf[tuple(index)] if len(index) > 1 else buf[index[0]])


def _flat_address(buf, index):
    """The address of element ``index`` of a buffer proxy, taken through a flat view of its
    memory (:func:`_flat_view`), as the emulated tile ops address it. Not ``&buf[index]``:
    TVM then sees one element of the buffer used, and shrinks an intermediate buffer (the C
    tiles' ``acc``) to the region its other readers use, so a tile store 16 rows tall wrote
    past it (found on the first AMX machine: wrong rows, then a corrupted heap, wherever N
    was not a multiple of 16)."""
    from tvm import tirx

    b = buf.buffer if hasattr(buf, "buffer") else buf
    return tirx.address_of(_flat_view(buf, str(b.dtype))[_flat_offset(buf, index, str(b.dtype))])


def _flat_view(buf, dtype: str):
    """A 1-D view of a buffer proxy's underlying memory as ``dtype`` elements (the tile ops
    address bytes: a uint32 buffer is read as pairs of uint16)."""
    from tvm.script.ir_builder import tirx as T

    b = buf.buffer if hasattr(buf, "buffer") else buf
    size = 1
    for d in b.shape:
        size *= int(d)
    scale = _elem_bits(b.dtype) // _elem_bits(dtype)
    return T.decl_buffer([size * scale], dtype, data=b.data)


def _flat_offset(buf, index, dtype: str):
    """The element ``index`` of a buffer proxy as an offset in ``dtype`` elements."""
    b = buf.buffer if hasattr(buf, "buffer") else buf
    offset = 0
    for i, d in zip(index, b.shape):
        offset = offset * int(d) + i
    return offset * (_elem_bits(b.dtype) // _elem_bits(dtype))


def _elem_bits(dtype) -> int:
    import re

    return int(re.search(r"\d+", str(dtype)).group())


# --------------------------------------------------------------------------- kernel


def _expand_tile(stage, j: int, vals, masks, offs, nb, kb) -> None:
    """Tile (nb, kb) of a :class:`SparseWeight` into ``stage[j]``: per tile row, a masked
    expand load of its kept values (``vpexpandw`` on AVX-512 VBMI2; LLVM lowers it for any
    CPU), then the next row's start is moved on by the mask's popcount."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    u32 = "uint32"
    start = T.buffer_proxy(T.alloc_buffer([1], "int32", scope="local"))
    start[0] = offs[nb, kb]
    lanes = tirx.Ramp(tirx.IntImm(u32, 0), tirx.IntImm(u32, 1), TILE_K)
    one, zero = (tirx.Broadcast(tirx.IntImm(u32, v), TILE_K) for v in (1, 0))
    for r in range(TILE_K // 2):
        mask = masks[nb, kb, r]
        kept = tirx.NE((tirx.Broadcast(mask, TILE_K) >> lanes) & one, zero)
        stage[j, r, tirx.Ramp(0, 1, TILE_K)] = tirx.call_llvm_pure_intrin(
            f"uint16x{TILE_K}", "llvm.masked.expandload", tirx.address_of(vals[start[0]]),
            kept, tirx.Broadcast(tirx.IntImm("uint16", 0), TILE_K))
        start[0] = start[0] + tirx.Cast("int32", tirx.call_llvm_pure_intrin(
            "uint32", "llvm.ctpop", mask))


def _gemm_tasks(p: Plan, tiles, images: int, load_a, load_b, store_c) -> None:
    """The tile program (module docstring) in the IRBuilder scope: one parallel task per
    (image, block of mt x nt C tiles); ``load_a(tile, image, row0, kb)``, ``load_b(tile, j,
    image, column block, kb)`` and ``store_c(tile, image, row0, col0)`` issue the tile ops
    for where the operands live."""
    from tvm.script.ir_builder import tirx as T

    c_tiles = p.mt * p.nt
    a0, b0 = c_tiles, c_tiles + p.mt
    tm, tn = p.tasks
    with T.parallel(0, images * tm * tn) as task:
        img, blk = task // (tm * tn), task % (tm * tn)
        r0 = (blk // tn) * (p.mt * p.rows)
        nb0 = (blk % tn) * p.nt
        tiles.begin()
        for t in range(c_tiles):
            tiles.zero(t)
        with T.serial(0, p.kp // TILE_K) as kb:
            for i in range(p.mt):
                load_a(a0 + i, img, r0 + i * p.rows, kb)
            for j in range(p.nt):
                load_b(b0 + j, j, img, nb0 + j, kb)
            for i in range(p.mt):
                for j in range(p.nt):
                    tiles.dot(i * p.nt + j, a0 + i, b0 + j)
        for i in range(p.mt):
            for j in range(p.nt):
                store_c(i * p.nt + j, img, r0 + i * p.rows, (nb0 + j) * TILE_N)
        tiles.end()


def _staged_program(p: Plan, emulate: bool, images: int, a_at, b_at, b_stride: int):
    """The ``te.extern`` body of a kernel whose A and B tiles are read in place from two
    buffers (``ins``): A rows ``p.kp * 2`` bytes apart at index ``a_at(image, row0, kb)``, B
    pair rows ``b_stride`` bytes apart at ``b_at(image, column block, kb)``; C tiles go to
    ``acc[image, row, column]``."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    def program(ins, outs):
        with IRBuilder() as ib:
            a_buf, b_buf = T.buffer_proxy(ins[0]), T.buffer_proxy(ins[1])
            acc = T.buffer_proxy(outs[0])
            tiles = (_EmulatedTiles if emulate else _HardwareTiles)(p)

            def load_a(t, img, row0, kb):
                tiles.load(t, a_buf, a_at(img, row0, kb), p.kp * 2)

            def load_b(t, _j, img, nb, kb):
                tiles.load(t, b_buf, b_at(img, nb, kb), b_stride)

            def store_c(t, img, row0, col0):
                tiles.store(t, acc, (img, row0, col0), p.np_ * 4)

            _gemm_tasks(p, tiles, images, load_a, load_b, store_c)
        return ib.get()

    return program


def build(m: int, k: int, n: int, dtype: str = "float32", bias: bool = False,
          act: Activation | None = None, residual: bool = False, mt: int | None = None,
          nt: int | None = None, emulate: bool | None = None, nnz: int | None = None
          ) -> "tirx.PrimFunc":
    """The PrimFunc ``(X[M,K], Wp [, B[N]] [, R[M,N]], Y[M,N])``, ``Wp`` from
    :func:`pack_weight` of the same :func:`plan` (``mt``, ``nt``). With ``nnz`` it is
    ``sparse_amx_bf16``, whose W is the three arrays of :func:`pack_sparse` (values of
    ``nnz`` kept weights, masks, offsets) in Wp's place. ``emulate`` (default: the
    :func:`emulated` context) swaps the AMX instructions for their TIR twins."""
    from tvm import s_tir, te
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    name = NAME if nnz is None else SPARSE_NAME
    if dtype != "float32":
        raise ValueError(f"{name} takes float32 tensors, not {dtype}")
    p = plan(m, k, n, mt, nt)
    emulate = emulating() if emulate is None else emulate
    x = te.placeholder((m, k), dtype, name="X")
    grid = (p.np_ // TILE_N, p.kp // TILE_K)
    if nnz is None:
        ws = [te.placeholder(grid + (TILE_K // 2, TILE_K), "uint16", name="Wp")]
    else:
        ws = [te.placeholder((nnz + TILE_K,), "uint16", name="Wv"),
              te.placeholder(grid + (TILE_K // 2,), "uint32", name="Wm"),
              te.placeholder(grid, "int32", name="Wo")]
    b = te.placeholder((n,), dtype, name="B") if bias else None
    res = te.placeholder((m, n), dtype, name="R") if residual else None

    xb = _bf16_rows(x, m, k, p.mp, p.kp, "Xb")

    def tile_program(ins, outs):
        with IRBuilder() as ib:
            xs, acc = T.buffer_proxy(ins[0]), T.buffer_proxy(outs[0])
            wb = [T.buffer_proxy(t) for t in ins[1:]]
            tiles = (_EmulatedTiles if emulate else _HardwareTiles)(p)
            stage = None

            def load_a(t, _img, row0, kb):
                tiles.load(t, xs, (row0, kb * TILE_K), p.kp * 2)

            def load_b(t, j, _img, nb, kb):
                nonlocal stage
                if nnz is None:
                    tiles.load(t, wb[0], (nb, kb, 0, 0), TILE_K * 2)
                    return
                if stage is None:      # the expanded B tiles of this task's K step
                    stage = T.buffer_proxy(T.alloc_buffer([p.nt, TILE_K // 2, TILE_K],
                                                          "uint16", scope="local"))
                _expand_tile(stage, j, *wb, nb, kb)
                tiles.load(t, stage, (j, 0, 0), TILE_K * 2)

            def store_c(t, _img, row0, col0):
                tiles.store(t, acc, (row0, col0), p.np_ * 4)

            _gemm_tasks(p, tiles, 1, load_a, load_b, store_c)
        return ib.get()

    acc = te.extern((p.mp, p.np_), [xb, *ws], tile_program, name="acc", dtype="float32")
    func = epilogue_func([x, *ws], lambda i, j: acc[i, j], (m, n), dtype, b, res, act)
    sch = s_tir.Schedule(func)
    i, kk = sch.get_loops(sch.get_sblock("Xb"))
    _, kv = sch.split(kk, [None, TILE_K])
    sch.vectorize(kv)
    sch.parallel(i)
    oi, oj = sch.get_loops(sch.get_sblock("Y"))
    if n % TILE_N == 0:
        _, jv = sch.split(oj, [None, TILE_N])
        sch.vectorize(jv)
    sch.parallel(oi)
    return finish(sch, name)


# --------------------------------------------------------------------------- convolutions

CONV_NAME = "conv2d_amx_bf16"


def conv_plan(s: "ConvShape", mt: int | None = None, nt: int | None = None) -> Plan:
    """A conv as the GEMM W[OC, IC*KH*KW] @ im2col(X)[IC*KH*KW, OH*OW] per image."""
    oh, ow = s.out_hw
    return plan(s.oc, s.ic * s.kh * s.kw, oh * ow, mt, nt)


def pack_conv_weight(w_oihw: "np.ndarray", p: Plan) -> "np.ndarray":
    """OIHW fp32 -> bf16 bits [MP, KP], row-major (the A tiles: no pair layout for A)."""
    import numpy as np

    oc = w_oihw.shape[0]
    out = np.zeros((p.mp, p.kp), np.uint16)
    out[:oc, :p.k] = bf16_bits(w_oihw.reshape(oc, -1))
    return out


def build_conv(s: "ConvShape", dtype: str = "float32", bias: bool = False,
               act: Activation | None = None, residual: bool = False, mt: int | None = None,
               nt: int | None = None, emulate: bool | None = None) -> "tirx.PrimFunc":
    """``conv2d_amx_bf16``: an NCHW conv (groups 1) ``(X, Wb [, B[OC]] [, R], Y)`` on AMX
    tiles, ``Wb`` from :func:`pack_conv_weight`. The per-call stage writes X's im2col matrix
    in bf16 pairs, ``Xp[n, KP/2, PP, 2]`` (padding, stride and dilation resolved there), so
    each B tile is 16 rows of it read in place (stride PP*4 bytes); the weights are the A
    tiles; C tiles land in ``acc[n, MP, PP]``, NCHW. The stage is two vectorized passes: X
    zero padded, then ``Xp[n, KP/2, rows, OW]`` of uint32 pair words (a B tile's 16 rows are 16
    pair rows of it, ``rows * OW * 4`` bytes apart)."""
    from tvm import s_tir, te, tirx

    if dtype != "float32":
        raise ValueError(f"{CONV_NAME} takes float32 tensors, not {dtype}")
    p = conv_plan(s, mt, nt)
    emulate = emulating() if emulate is None else emulate
    oh, ow = s.out_hw
    (sh, sw), (dh, dw), (pt, pl, _, _) = s.stride, s.dilation, s.padding
    taps = s.kh * s.kw
    x = te.placeholder((s.n, s.ic, s.h, s.w), dtype, name="X")
    wb = te.placeholder((p.mp, p.kp), "uint16", name="Wb")
    b = te.placeholder((s.oc,), dtype, name="B") if bias else None
    res = te.placeholder((s.n, s.oc, oh, ow), dtype, name="R") if residual else None

    # zero padding first, so that the im2col stage reads X rows in place (vector loads)
    hp, wp = s.h + pt + s.padding[2], s.w + pl + s.padding[3]
    if (hp, wp) != (s.h, s.w):
        def padded(img, c, y, z):
            inside = tirx.all(y >= pt, y < pt + s.h, z >= pl, z < pl + s.w)
            v = x[img, c, tirx.max(tirx.min(y - pt, s.h - 1), 0),
                  tirx.max(tirx.min(z - pl, s.w - 1), 0)]
            return tirx.if_then_else(inside, v, tirx.const(0.0, dtype))

        xpad = te.compute((s.n, s.ic, hp, wp), padded, name="Xpad")
    else:
        xpad = x
    # im2col in AMX's pair layout: one uint32 per (pair of K rows, pixel); pixels as
    # (output row, column), rows past OH zero, so that the stage vectorizes along columns
    rows_p = -(-p.np_ // ow)

    def pair_word(img, kk2, oy, ox):
        def bits(kk):
            ci, tap = tirx.min(kk // taps, s.ic - 1), kk % taps
            iy = tirx.min(oy, oh - 1) * sh + (tap // s.kw) * dh
            return bf16_or_zero(xpad[img, ci, iy, ox * sw + (tap % s.kw) * dw],
                                tirx.all(kk < p.k, oy < oh))

        return bits(kk2 * 2) | (bits(kk2 * 2 + 1) << 16)

    xp = te.compute((s.n, p.kp // 2, rows_p, ow), pair_word, name="Xp")

    tile_program = _staged_program(
        p, emulate, s.n, lambda img, row0, kb: (row0, kb * TILE_K),
        lambda img, nb, kb: (img, kb * (TILE_K // 2), nb * TILE_N // ow, nb * TILE_N % ow),
        rows_p * ow * 4)

    acc = te.extern((s.n, p.mp, p.np_), [wb, xp], tile_program, name="acc", dtype="float32")
    func = epilogue_func([x, wb], lambda i, c, y, z: acc[i, c, y * ow + z], (s.n, s.oc, oh, ow),
                         dtype, b, res, act)
    sch = s_tir.Schedule(func)
    if xpad is not x:
        pn, pc, py, pz = sch.get_loops(sch.get_sblock("Xpad"))
        sch.parallel(sch.fuse(pn, pc))
        sch.vectorize(pz)
    img, kk2, oy, ox = sch.get_loops(sch.get_sblock("Xp"))
    sch.parallel(sch.fuse(img, kk2))
    sch.vectorize(ox)
    on, oc, oy, ox = sch.get_loops(sch.get_sblock("Y"))
    sch.parallel(sch.fuse(on, oc))
    if ow % TILE_N == 0:
        _, xv = sch.split(ox, [None, TILE_N])
        sch.vectorize(xv)
    return finish(sch, CONV_NAME)


# --------------------------------------------------------------------------- batch matmul

BATCH_NAME = "batch_matmul_amx_bf16"


def build_batch(batch: int, m: int, k: int, n: int, dtype: str = "float32", bias: bool = False,
                act: Activation | None = None, residual: bool = False,
                b_transposed: bool = False, mt: int | None = None, nt: int | None = None,
                emulate: bool | None = None) -> "tirx.PrimFunc":
    """``batch_matmul_amx_bf16``: ``(A[b,M,K], B[b,K,N] (or [b,N,K] with b_transposed)
    [, bias[N]] [, R[b,M,N]], Y[b,M,N])`` with both operands computed at run time
    (attention's Q @ K^T and P @ V) on AMX tiles. Two per-call stages: A in bf16 rows as
    ``dense_amx_bf16``'s X, and B as uint32 pair words ``Bw[b, KP/2, NP]`` (two neighbouring
    K values of one column: a contiguous pair of B^T's row, or two rows of B), read in place
    as B tiles; the tile program runs per batch entry."""
    from tvm import s_tir, te, tirx

    if dtype != "float32":
        raise ValueError(f"{BATCH_NAME} takes float32 tensors, not {dtype}")
    p = plan(m, k, n, mt, nt)
    emulate = emulating() if emulate is None else emulate
    a = te.placeholder((batch, m, k), dtype, name="A")
    b_in = te.placeholder((batch, n, k) if b_transposed else (batch, k, n), dtype, name="Bin")
    bias_t = te.placeholder((n,), dtype, name="B") if bias else None
    res = te.placeholder((batch, m, n), dtype, name="R") if residual else None

    def b_word(bi, kk2, j):
        def bits(kk):
            c, r = tirx.min(j, n - 1), tirx.min(kk, k - 1)
            return bf16_or_zero(b_in[bi, c, r] if b_transposed else b_in[bi, r, c],
                                tirx.all(kk < k, j < n))

        return bits(kk2 * 2) | (bits(kk2 * 2 + 1) << 16)

    ab = _bf16_rows(a, m, k, p.mp, p.kp, "Ab")
    bw = te.compute((batch, p.kp // 2, p.np_), b_word, name="Bw")

    tile_program = _staged_program(
        p, emulate, batch, lambda img, row0, kb: (img, row0, kb * TILE_K),
        lambda img, nb, kb: (img, kb * (TILE_K // 2), nb * TILE_N), p.np_ * 4)

    acc = te.extern((batch, p.mp, p.np_), [ab, bw], tile_program, name="acc",
                    dtype="float32")
    func = epilogue_func([a, b_in], lambda bi, i, j: acc[bi, i, j], (batch, m, n), dtype,
                         bias_t, res, act, channel_axis=2)
    sch = s_tir.Schedule(func)
    bi, i, kk = sch.get_loops(sch.get_sblock("Ab"))
    sch.parallel(sch.fuse(bi, i))
    _, kv = sch.split(kk, [None, TILE_K])
    sch.vectorize(kv)
    bi, kk2, j = sch.get_loops(sch.get_sblock("Bw"))
    sch.parallel(sch.fuse(bi, kk2))
    _, jv = sch.split(j, [None, TILE_N])
    sch.vectorize(jv)
    yb, yi, yj = sch.get_loops(sch.get_sblock("Y"))
    sch.parallel(sch.fuse(yb, yi))
    if n % TILE_N == 0:
        _, yv = sch.split(yj, [None, TILE_N])
        sch.vectorize(yv)
    return finish(sch, BATCH_NAME)
