"""``mma_cuda``: Y[M, N] = X[M, K] @ W[K, N] on NVIDIA tensor cores (sm_80+) for a constant W
(every linear layer and matmul by a weight; convolutions as implicit GEMMs; and, with W read
at run time, attention's batched matmuls): ``mma.sync`` with fp32 accumulation, inputs in

  tf32   ``mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`` (10 mantissa bits: the CUDA
         default, as ONNX Runtime's and TensorRT's; ``--precision tf32``)
  bf16   ``mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`` (7 mantissa bits, half the
         weight bytes; ``--precision bf16``)

As in ``mma_sp_cuda`` (kernels/mma_sp.py), A is W^T (16 output channels) and B is X^T (8
tokens), so a batch-1 call pads its one token to 8, not 16.

Data:
  Wa[OB, KS, 32, 4]  uint32: W rounded to the precision (tf32: round to nearest, ties away,
                     as ``cvt.rna.tf32.f32``; bf16: nearest even, two per word) in the A
                     fragment order of each lane of the warp that owns 16 output channels
                     (tile ob) at K step ks: one 128-bit load per lane and step, coalesced.
                     Converted and laid out at compile time.
  X[M, K]            fp32, read as B fragments and rounded the same way in the kernel.
  Y                  ``act(C + bias + residual)``, written by the GEMM's own stores (inside
                     M and N) where K is not split and the activation is none, ReLU or a
                     clip; else
  acc[S, MP, NP]     fp32 C per part of a split K (S = 1 unless split), token-major, and
                     ``Y = act(sum of parts + bias + residual)`` is a second kernel (GELU and
                     SiLU as every sparsec epilogue computes them).

Fragment layouts (PTX ISA 9.7.16.5.1, g = lane // 4, t = lane % 4): C element i (0..3) is
C[g + 8 (i // 2), 2t + i % 2] for both shapes.
  tf32 m16n8k8: A element i (one word each) is A[g + 8 (i % 2), t + 4 (i // 2)]; B element i
  is B[t + 4 i, g].
  bf16 m16n8k16: A element i (0..7, two per word, low half first) is A[g + 8 ((i // 2) % 2),
  2t + i % 2 + 8 (i // 4)] (TVM's ``shared_16x16_to_ldmatrix_32x8_layout``); B element i
  (0..3) is B[2t + i % 2 + 8 (i // 2), g].

Schedule: a block of WARPS warps side by side along output channels, each warp ``mt`` A tiles
(16 channels) x ``nt`` B tiles (8 tokens), every A fragment feeding ``nt`` mma and every B
fragment ``mt``; ``mt`` is 2 where that still leaves a block per SM (a wide layer, many
tokens), else 1, and a grid still short of FULL_GRID blocks splits K across blocks
(``blockIdx.z``; acc holds one [MP, NP] part per split, which the epilogue sums in order). X
is read straight from global memory (L1/L2: all warps of a block read the same rows); staging
it in shared memory with ``cp.async`` is not done yet.

A convolution (groups 1, NCHW) is the same kernel as an implicit GEMM: tokens are output
pixels, K runs over (input channel, ky, kx), and a B value is the input pixel that tap sees
(zero in the padding); no im2col buffer. A matmul of two run-time tensors (attention's
Q @ K^T, P @ V) has no Wa: each lane gathers its A fragment's elements from the second operand
(K^T read in place from K) and rounds them in the kernel; ``blockIdx.z`` is the batch entry
(batch x heads), and K is not split.

No GPU here: :func:`build` with ``emulate=True`` is the CPU twin: the same loads, roundings
and stores, lanes as a loop, and the instruction written as TIR loops from the layouts above;
``sparsec compile --target cuda`` checks the model on it (targets/cuda.py), the tests check it
against numpy, and nvcc compiles the real kernel for sm_80 and sm_90.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import (FULL_GRID, Activation, clip, epilogue_func,
                                            finish)
from sparsec.targets.kernels.mma_sp import TWIN_ATTR   # the CPU twin's build arguments
from sparsec.targets.kernels.mma_sp import half        # a packed bf16 half as fp32

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

    from sparsec.targets.kernels.conv2d import ConvShape

NAME = "mma_cuda"
PRECISIONS = ("tf32", "bf16")
TILE_M, TILE_N = 16, 8               # output channels, tokens of one mma
TILE_K = {"tf32": 8, "bf16": 16}     # inputs of one mma
B_WORDS = 2                          # uint32 words of a lane's B fragment (both precisions)
LANES = 32
WARPS = 4                            # warps of a block, side by side along output channels
MAX_N_TILES = 4                      # token tiles per warp
MIN_ARCH = 80                        # tf32 and bf16 mma exist from Ampere on
MAX_SPLITS = 16                      # split-K: most parts of K
MIN_SPLIT_STEPS = 4                  # split-K: fewest K steps a part keeps
INSTRUCTION = {"tf32": "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
               "bf16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"}


@dataclass(frozen=True)
class Plan:
    """Geometry: ``mt`` A tiles (16 channels) and ``nt`` token tiles (8) per warp; K in
    ``splits`` parts of ``split_steps`` K steps each (split-K: a block per part, the parts
    summed by the epilogue), padded with zero weights; N padded to whole blocks, M to whole
    warp tiles."""

    m: int
    k: int
    n: int
    precision: str
    mt: int
    nt: int
    splits: int = 1

    @property
    def tile_k(self) -> int:
        return TILE_K[self.precision]

    @property
    def split_steps(self) -> int:
        return -(-self.k // (self.tile_k * self.splits))

    @property
    def kp(self) -> int:
        return self.split_steps * self.splits * self.tile_k

    @property
    def block_n(self) -> int:
        return TILE_M * self.mt * WARPS

    @property
    def np_(self) -> int:
        return -(-self.n // self.block_n) * self.block_n

    @property
    def mp(self) -> int:
        return -(-self.m // (TILE_N * self.nt)) * TILE_N * self.nt

    @property
    def grid(self) -> tuple[int, int]:
        return self.np_ // self.block_n, self.mp // (TILE_N * self.nt)


def plan(m: int, k: int, n: int, precision: str = "tf32", batch: int = 0) -> Plan:
    """Up to MAX_N_TILES token tiles per warp; two A tiles per warp where the grid keeps
    FULL_GRID blocks and N pads no further, else one, and K split in up to MAX_SPLITS parts
    (of at least MIN_SPLIT_STEPS K steps) until the grid has FULL_GRID blocks: a batch-1
    layer of 768 outputs is 12 blocks unsplit, 132 split 11 ways. A batched product
    (``batch`` > 0, both operands at run time) counts its batch in the grid and is not
    split."""
    if precision not in PRECISIONS:
        raise ValueError(f"{NAME} computes in {' or '.join(PRECISIONS)}, not {precision}")
    nt = min(MAX_N_TILES, -(-m // TILE_N))
    wide, p = Plan(m, k, n, precision, 2, nt), Plan(m, k, n, precision, 1, nt)
    if wide.grid[0] * wide.grid[1] * max(batch, 1) >= FULL_GRID and wide.np_ == p.np_:
        return wide          # (not where its wider blocks would pad N further: 64 channels)
    if batch:
        return p
    blocks, steps = p.grid[0] * p.grid[1], p.kp // p.tile_k
    splits = min(MAX_SPLITS, -(-FULL_GRID // blocks), max(1, steps // MIN_SPLIT_STEPS))
    per = -(-steps // splits)
    return Plan(m, k, n, precision, 1, nt, -(-steps // per))     # no part of padding only


def tf32_bits(a: "np.ndarray") -> "np.ndarray":
    """fp32 -> the uint32 bits of its tf32 rounding (nearest, ties away from zero, as
    ``cvt.rna.tf32.f32``; the low 13 bits zero). Infinities and NaNs are kept."""
    import numpy as np

    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where((u & np.uint32(0x7F800000)) == np.uint32(0x7F800000), u, rounded)


def tf32_round(a: "np.ndarray") -> "np.ndarray":
    """``a`` rounded to tf32, as fp32 values (the numbers the tensor cores multiply)."""
    return tf32_bits(a).view("float32")


def round_to(a: "np.ndarray", precision: str) -> "np.ndarray":
    """``a`` rounded as the kernel rounds its inputs in ``precision``."""
    from sparsec.targets.kernels.amx import bf16_round

    return tf32_round(a) if precision == "tf32" else bf16_round(a)


def a_position(lane, i: int, precision: str) -> tuple:
    """(row, column) of the A tile (16 channels x TILE_K inputs) that element ``i`` of lane
    ``lane``'s A fragment holds (module docstring); works on ints and numpy arrays."""
    g, t = lane // 4, lane % 4
    if precision == "tf32":
        return g + 8 * (i % 2), t + 4 * (i // 2)
    return g + 8 * ((i // 2) % 2), 2 * t + i % 2 + 8 * (i // 4)


def pack_weight(w_kn: "np.ndarray", p: Plan) -> "np.ndarray":
    """[K, N] fp32 -> Wa [OB, KS, 32, 4] uint32 (module docstring), zero padded."""
    import numpy as np

    from sparsec.targets.kernels.amx import bf16_bits

    k, n = w_kn.shape
    wt = np.zeros((p.np_, p.kp), np.float32)                 # W^T, padded
    wt[:n, :k] = w_kn.T
    ob, ks = p.np_ // TILE_M, p.kp // p.tile_k
    tiles = wt.reshape(ob, TILE_M, ks, p.tile_k).transpose(0, 2, 1, 3)   # [OB, KS, 16, TK]
    lane = np.arange(LANES)[:, None]
    if p.precision == "tf32":
        rows, cols = a_position(lane, np.arange(4)[None, :], "tf32")
        words = tf32_bits(tiles[:, :, rows, cols])                         # [OB, KS, 32, 4]
    else:
        rows, cols = a_position(lane, np.arange(8)[None, :], "bf16")
        bits = bf16_bits(tiles[:, :, rows, cols]).astype(np.uint32)        # [OB, KS, 32, 8]
        words = bits[..., 0::2] | (bits[..., 1::2] << 16)
    return np.ascontiguousarray(words.astype(np.uint32))


def weight_bytes(p: Plan) -> int:
    """Bytes the kernel reads for W: 16 per lane and K step of each A tile."""
    return (p.np_ // TILE_M) * (p.kp // p.tile_k) * LANES * 16


# --------------------------------------------------------------------------- kernel


def _tf32_bits_expr(value: "tirx.PrimExpr") -> "tirx.PrimExpr":
    """:func:`tf32_bits` of one fp32 TIR value, branch-free."""
    from tvm import tirx

    u = tirx.reinterpret("uint32", value)
    special = (u & tirx.IntImm("uint32", 0x7F800000)) == tirx.IntImm("uint32", 0x7F800000)
    return tirx.Select(special, u, (u + tirx.IntImm("uint32", 0x1000))
                       & tirx.IntImm("uint32", 0xFFFFE000))


def _reader(x, m: int, k: int, conv: "ConvShape | None", bi=None):
    """``value(tok, col)``: entry (tok, col) of the GEMM's [M, K] operand, zero outside it (a
    select: the load index is clamped in bounds, so there is no branch). A linear layer reads
    X[tok, col]; a convolution (implicit GEMM) reads the input pixel that output pixel ``tok``
    (image, row, column) sees through filter tap ``col`` (input channel, ky, kx), zero in the
    padding. A batched product reads X[bi, tok, col]."""
    from tvm import tirx

    zero = tirx.FloatImm("float32", 0.0)
    if conv is None:
        def value(tok, col):
            at = (tirx.min(tok, m - 1), tirx.min(col, k - 1))
            return tirx.Select(tirx.all(tok < m, col < k),
                               x[at] if bi is None else x[(bi, *at)], zero)
        return value
    oh, ow = conv.out_hw
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    pt, pl = conv.padding[:2]

    def value(tok, col):
        tok, col = tirx.min(tok, m - 1), tirx.min(col, k - 1)
        b, oy, ox = tok // (oh * ow), tok // ow % oh, tok % ow
        c, ky, kx = col // (conv.kh * conv.kw), col // conv.kw % conv.kh, col % conv.kw
        iy, ix = oy * sh + ky * dh - pt, ox * sw + kx * dw - pl
        inside = tirx.all(iy >= 0, iy < conv.h, ix >= 0, ix < conv.w)
        clamp = tirx.max(tirx.min(iy, conv.h - 1), 0), tirx.max(tirx.min(ix, conv.w - 1), 0)
        return tirx.Select(inside, x[b, c, clamp[0], clamp[1]], zero)

    def guarded(tok, col):
        return tirx.Select(tirx.all(tok < m, col < k), value(tok, col), zero)
    return guarded


def _word(element, precision: str, staged) -> "tirx.PrimExpr":
    """One fragment word from ``element(e)``, its values: e = 0 as tf32 bits, or e = 0 and 1
    as two bf16 halves (low first). The values are first stored to ``staged`` (2 local
    floats) and their bits read from there, as CUDA reinterprets only a variable, not an
    expression."""
    from sparsec.targets.kernels.amx import bf16_bits_expr

    staged[0] = element(0)
    if precision == "tf32":
        return _tf32_bits_expr(staged[0])
    staged[1] = element(1)
    return bf16_bits_expr(staged[0]) | (bf16_bits_expr(staged[1]) << 16)


def _b_word(value, tok, col, precision: str, staged) -> "tirx.PrimExpr":
    """A word of a lane's B fragment, given its first input column ``col``: value(tok, col)
    (tf32), or value(tok, col) and value(tok, col + 1) (bf16)."""
    return _word(lambda e: value(tok, col + e), precision, staged)


def _a_word(w, bi, n: int, k: int, tile, step, lane, j: int, precision: str,
            transposed: bool, staged) -> "tirx.PrimExpr":
    """Word ``j`` of a lane's A fragment read at run time (a batched product's second operand,
    W[bi, K, N], or W[bi, N, K] when ``transposed``) and rounded as :func:`pack_weight`
    rounds a constant W; zero past N or K."""
    from tvm import tirx

    def value(i):
        row, col = a_position(lane, i, precision)
        ch, kc = tile * TILE_M + row, step * TILE_K[precision] + col
        at = (tirx.min(ch, n - 1), tirx.min(kc, k - 1))
        return tirx.Select(tirx.all(ch < n, kc < k),
                           w[(bi, *at)] if transposed else w[bi, at[1], at[0]],
                           tirx.FloatImm("float32", 0.0))

    return _word(lambda e: value(j if precision == "tf32" else 2 * j + e), precision, staged)


def _b_column(lane, j: int, precision: str):
    """The first input (inside the K step) of word ``j`` of lane ``lane``'s B fragment."""
    if precision == "tf32":
        return lane % 4 + 4 * j
    return 2 * (lane % 4) + 8 * j


def conv_gemm(conv: "ConvShape") -> tuple[int, int, int]:
    """(M, K, N) of a convolution as a GEMM: output pixels, filter taps, output channels."""
    oh, ow = conv.out_hw
    return conv.n * oh * ow, conv.ic * conv.kh * conv.kw, conv.oc


def build(m: int, k: int, n: int, precision: str = "tf32", dtype: str = "float32",
          bias: bool = False, act: Activation | None = None, residual: bool = False,
          emulate: bool = False, conv: "ConvShape | None" = None, batch: int = 0,
          b_transposed: bool = False) -> "tirx.PrimFunc":
    """The PrimFunc ``(X[M,K], Wa [, B[N]] [, R[M,N]], Y[M,N])`` of :func:`pack_weight`'s array:
    CUDA, or with ``emulate`` its CPU twin (module docstring). With ``conv`` (groups 1, NCHW;
    ``m, k, n`` its :func:`conv_gemm`): ``(X[N,C,H,W], Wa [, B[OC]] [, R], Y[N,OC,OH,OW])``,
    the convolution as an implicit GEMM, W ``[OC, C*KH*KW]`` packed as ``W^T``. With ``batch``
    (attention's matmuls of two run-time tensors): ``(X[batch,M,K], W[batch,K,N] (or
    [batch,N,K] with b_transposed) [, B[N]] [, R], Y[batch,M,N])``, the A fragments read from
    W and rounded in the kernel, a block row of the grid (``blockIdx.z``) per batch entry."""
    import dataclasses

    from tvm import s_tir, te, tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    if dtype != "float32":
        raise ValueError(f"{NAME} takes float32 tensors, not {dtype}")
    p = plan(m, k, n, precision, batch)
    ob, ks = p.np_ // TILE_M, p.kp // p.tile_k
    if batch:
        out_shape, channel_axis = (batch, m, n), 2
        x = te.placeholder((batch, m, k), dtype, name="X")
        wa = te.placeholder((batch, n, k) if b_transposed else (batch, k, n), dtype, name="W")
    elif conv is None:
        out_shape, channel_axis = (m, n), 1
        x = te.placeholder((m, k), dtype, name="X")
    else:
        out_shape, channel_axis = (conv.n, conv.oc, *conv.out_hw), 1
        x = te.placeholder((conv.n, conv.ic, conv.h, conv.w), dtype, name="X")
    if not batch:
        wa = te.placeholder((ob, ks, LANES, 4), "uint32", name="Wa")
    depth = batch or p.splits       # acc's first axis: batch entries, or parts of a split K
    args = {"m": m, "k": k, "n": n, "precision": precision, "bias": bias,
            "residual": residual, "act": None if act is None else [act.low, act.high,
                                                                    act.gelu, act.silu],
            "conv": None if conv is None else dataclasses.asdict(conv),
            "batch": batch, "b_transposed": b_transposed}
    b = te.placeholder((n,), dtype, name="B") if bias else None
    res = te.placeholder(out_shape, dtype, name="R") if residual else None
    zero = tirx.FloatImm("float32", 0.0)

    def b_word(xs, bi, tok0, t, lane, step, j, staged):
        return _b_word(_reader(xs, m, k, conv, bi), tok0 + t * TILE_N + lane // 4,
                       step * p.tile_k + _b_column(lane, j, precision), precision, staged)

    def a_word(ws, bi, tile, step, lane, j, staged):
        return _a_word(ws, bi, n, k, tile, step, lane, j, precision, b_transposed, staged)

    # the epilogue in the GEMM's own stores where it is one (no split K to sum, no GELU or
    # SiLU: their fast_erf / fast_exp stages are TOPI's, built for a separate kernel)
    fused = p.splits == 1 and not (act is not None and (act.gelu or act.silu))

    def out_index(bi, tok, ch) -> tuple:
        """Y's index of GEMM element (tok, ch)."""
        if batch:
            return bi, tok, ch
        if conv is None:
            return tok, ch
        oh, ow = conv.out_hw
        return tok // (oh * ow), ch, tok // ow % oh, tok % ow

    def store(bufs, part, tile, tok0, t, lane, i, value):
        """C element ``i`` of token tile ``t``: into acc, or (fused) finished into Y, inside
        M and N only."""
        tok = tok0 + t * TILE_N + lane % 4 * 2 + i % 2
        ch = tile * TILE_M + i // 2 * 8 + lane // 4
        if not fused:
            bufs["out"][part, tok, ch] = value
            return
        at = out_index(part if batch else None, tok, ch)
        if bias:
            value = value + bufs["B"][ch]
        if residual:
            value = value + bufs["R"][at]
        with T.If(tirx.all(tok < m, ch < n)):
            with T.Then():
                bufs["out"][at] = clip(value, act, dtype)

    def buffers(ins, outs) -> tuple:
        xs, was, *rest = (T.buffer_proxy(t) for t in ins)
        bufs = {"out": T.buffer_proxy(outs[0])}
        if fused and bias:
            bufs["B"] = rest.pop(0)
        if fused and residual:
            bufs["R"] = rest.pop(0)
        return xs, was, bufs

    # INSTRUCTION[precision] as TVM's PTX builder spells it: d, a, b, c operands
    shape = getattr(T.ptx.mma.sync.aligned, "m16n8k8" if precision == "tf32" else "m16n8k16")
    instruction = getattr(getattr(shape.row.col.f32, precision), precision).f32

    def gpu_program(ins, outs):
        xs, was, accs = buffers(ins, outs)
        with IRBuilder() as ib:
            bx, by = te.thread_axis("blockIdx.x"), te.thread_axis("blockIdx.y")
            bz = te.thread_axis("blockIdx.z")
            warp, lane = te.thread_axis("threadIdx.y"), te.thread_axis("threadIdx.x")
            with T.frame_scope([T.attr(bx, "thread_extent", p.grid[0]),
                                T.attr(by, "thread_extent", p.grid[1]),
                                T.attr(bz, "thread_extent", depth),
                                T.attr(warp, "thread_extent", WARPS),
                                T.attr(lane, "thread_extent", LANES)]):
                tile0, tok0 = (bx * WARPS + warp) * p.mt, by * (TILE_N * p.nt)
                c = T.buffer_proxy(T.decl_buffer([p.mt, p.nt, 4], "float32", scope="local"))
                fa = T.buffer_proxy(T.decl_buffer([p.mt * 4], "uint32", scope="local"))
                fb = T.buffer_proxy(T.decl_buffer([p.nt, B_WORDS], "uint32", scope="local"))
                xv = T.buffer_proxy(T.decl_buffer([2], "float32", scope="local"))
                for a in range(p.mt):
                    for t in range(p.nt):
                        for i in range(4):
                            c[a, t, i] = zero
                bi = bz if batch else None
                with T.serial(0, p.split_steps) as s:
                    step = s if batch else bz * p.split_steps + s
                    for a in range(p.mt):
                        if batch:              # read and rounded here
                            for j in range(4):
                                fa[a * 4 + j] = a_word(was, bi, tile0 + a, step, lane, j, xv)
                        else:                  # one 128-bit load per lane and A tile
                            fa[tirx.Ramp(a * 4, 1, 4)] = was[tile0 + a, step, lane,
                                                             tirx.Ramp(0, 1, 4)]
                    for t in range(p.nt):
                        for j in range(B_WORDS):
                            fb[t, j] = b_word(xs, bi, tok0, t, lane, step, j, xv)
                    for a in range(p.mt):
                        for t in range(p.nt):
                            d = [c[a, t, i] for i in range(4)]
                            T.evaluate(instruction(*d, *(fa[a * 4 + j] for j in range(4)),
                                                   *(fb[t, j] for j in range(B_WORDS)), *d))
                for a in range(p.mt):
                    for t in range(p.nt):
                        for i in range(4):
                            store(accs, bz, tile0 + a, tok0, t, lane, i, c[a, t, i])
        return ib.get()

    def cpu_program(ins, outs):
        xs, was, accs = buffers(ins, outs)
        with IRBuilder() as ib:
            with T.serial(0, p.grid[0] * WARPS) as wid, T.serial(0, p.grid[1]) as grp, \
                    T.serial(0, depth) as part:
                tile0, tok0 = wid * p.mt, grp * (TILE_N * p.nt)
                c = T.buffer_proxy(T.decl_buffer([p.mt, p.nt, LANES, 4], "float32"))
                fa = T.buffer_proxy(T.decl_buffer([p.mt, LANES, 4], "uint32"))
                fb = T.buffer_proxy(T.decl_buffer([p.nt, LANES, B_WORDS], "uint32"))
                xv = T.buffer_proxy(T.decl_buffer([2], "float32"))
                with T.grid(p.mt, p.nt, LANES, 4) as (a, t, ln, i):
                    c[a, t, ln, i] = zero
                bi = part if batch else None
                with T.serial(0, p.split_steps) as s:
                    step = s if batch else part * p.split_steps + s
                    with T.serial(0, LANES) as ln:
                        for a in range(p.mt):
                            for j in range(4):
                                fa[a, ln, j] = (a_word(was, bi, tile0 + a, step, ln, j, xv)
                                                if batch else was[tile0 + a, step, ln, j])
                        for t in range(p.nt):
                            for j in range(B_WORDS):
                                fb[t, ln, j] = b_word(xs, bi, tok0, t, ln, step, j, xv)
                    for a in range(p.mt):
                        for t in range(p.nt):
                            _emulate_mma(c, a, t, fa, fb, precision)
                with T.serial(0, LANES) as ln:
                    for a in range(p.mt):
                        for t in range(p.nt):
                            for i in range(4):
                                store(accs, part, tile0 + a, tok0, t, ln, i, c[a, t, ln, i])
        return ib.get()

    # buffers at offset 0 (TVM's default is a free offset): the A fragments' 128-bit loads
    # are then aligned vector loads, not gathers
    program = cpu_program if emulate else gpu_program
    inputs = [x, wa] + ([b, res] if fused else [])
    inputs = [t for t in inputs if t is not None]
    in_buffers = [tirx.decl_buffer(t.shape, t.dtype, t.op.name) for t in inputs]
    if fused:
        y = te.extern(out_shape, inputs, program, name="Y", dtype=dtype, in_buffers=in_buffers,
                      out_buffers=[tirx.decl_buffer(out_shape, dtype, "Y")])
        return _finish(te.create_prim_func(inputs + [y]), args)
    acc = te.extern((depth, p.mp, p.np_), inputs, program, name="acc", dtype="float32",
                    in_buffers=in_buffers,
                    out_buffers=[tirx.decl_buffer((depth, p.mp, p.np_), "float32", "acc")])

    def summed(i, j):      # the parts of a split K, in order
        total = acc[0, i, j]
        for part in range(1, p.splits):
            total = total + acc[part, i, j]
        return total

    if batch:
        def value(bi, i, j):
            return acc[bi, i, j]
    elif conv is None:
        value = summed
    else:
        oh, ow = conv.out_hw

        def value(img, o, y, xx):
            return summed((img * oh + y) * ow + xx, o)
    func = epilogue_func([x, wa], value, out_shape, dtype, b, res, act, channel_axis)
    if emulate:
        return _finish(func, args)
    sch = s_tir.Schedule(func)
    bx, tx = sch.split(sch.fuse(*sch.get_loops(sch.get_sblock("Y"))), [None, 256])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return _finish(sch.mod["main"], args)


def _finish(func: "tirx.PrimFunc", args: dict) -> "tirx.PrimFunc":
    """The kernel, marked as scheduled (``finish``) and with its build arguments for the CPU
    twin."""
    import json

    from tvm import s_tir

    return finish(s_tir.Schedule(func), NAME).with_attr(TWIN_ATTR,
                                                        json.dumps(args, sort_keys=True))


def twin(func: "tirx.PrimFunc") -> "tirx.PrimFunc":
    """The CPU twin of a kernel :func:`build` made (its ``TWIN_ATTR`` arguments)."""
    import json

    from sparsec.targets.kernels.conv2d import ConvShape

    args = json.loads(str(func.attrs[TWIN_ATTR]))
    act, conv = args.pop("act"), args.pop("conv")
    if conv is not None:
        conv = ConvShape(**{key: tuple(v) if isinstance(v, list) else v
                            for key, v in conv.items()})
    return build(**args, act=None if act is None else Activation(*act), emulate=True,
                 conv=conv)


def _emulate_mma(c, a: int, t: int, fa, fb, precision: str) -> None:
    """The ``mma.sync`` of A tile ``a`` and token tile ``t`` on warp-wide fragments (lanes as
    the first index after the tile), as TIR loops: each C element plus the sum over K of
    A x B, the operands read from the lanes and elements the layouts give (module docstring).
    The operands are tf32 or bf16 values, so their products are exact in fp32."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    with T.grid(TILE_M, TILE_N) as (r, col):
        s = T.buffer_proxy(T.decl_buffer([1], "float32", scope="local"))
        c_lane, c_i = (r % 8) * 4 + col // 2, (r // 8) * 2 + col % 2
        s[0] = c[a, t, c_lane, c_i]
        with T.serial(0, TILE_K[precision]) as kk:
            if precision == "tf32":
                av = tirx.reinterpret("float32",
                                      fa[a, (r % 8) * 4 + kk % 4, r // 8 + 2 * (kk // 4)])
                bv = tirx.reinterpret("float32", fb[t, col * 4 + kk % 4, kk // 4])
            else:
                a_i = (kk // 8) * 4 + (r // 8) * 2 + kk % 2
                av = half(fa[a, (r % 8) * 4 + (kk % 8) // 2, a_i // 2], a_i % 2 == 1)
                bv = half(fb[t, col * 4 + (kk % 8) // 2, kk // 8], kk % 2 == 1)
            s[0] = s[0] + av * bv
        c[a, t, c_lane, c_i] = s[0]
