"""``mma_sp_cuda``: Y[M, N] = X[M, K] @ W[K, N] on NVIDIA sparse tensor cores (sm_80+), for a
constant W with at most 2 nonzeros in every 4 consecutive inputs of each output channel (the
2:4 pattern ``--sparsity-pattern 2:4`` makes).

``mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32`` multiplies a 16 x 32 A whose rows
are 2:4 sparse (stored as its 16 x 16 kept values plus 2-bit positions, the "metadata") by a
32 x 8 B, accumulating a 16 x 8 fp32 C, one warp at a time. Here A is W^T (16 output
channels), B is X^T (8 tokens): the tensor cores skip the zeros, and W is read at half its
bytes plus 1/8 for the metadata. Inputs are bf16 (8 bits of mantissa; the compile report says
``"precision": "bf16"`` and the package takes the bf16 tolerance), sums fp32.

Data (laid out at compile time in the order the kernel reads it):
  Wa[OB, KS, 32, 4]     uint32: W's kept values (bf16 pairs) in the A fragment order of each
                        lane of the warp that owns 16 output channels (tile ob) at K step ks
                        (32 inputs): one 128-bit load per lane, coalesced.
  We[OW, S, 32, 2 mt]   uint32: the metadata words each lane hands the instruction, for the
                        ``mt`` A tiles of warp tile ow and the STEPS K steps of stage s (word
                        a * STEPS + step): one 64- or 128-bit load per lane and stage.
  X[M, K]               fp32, staged in shared memory (below), rounded there to bf16 (nearest
                        even) once per block, and read as B fragments (two neighbouring inputs
                        per word).
  Y                     ``act(C + bias + residual)``, written by the GEMM's own stores (inside M
                        and N) unless the activation is GELU or SiLU; then C goes to acc[MP, NP]
                        (token-major) and the epilogue is a second kernel, as in ``mma_cuda``.

Schedule: a block of WARPS warps side by side along output channels shares one tile of
8 nt tokens; each warp computes ``mt`` A tiles (16 channels) x ``nt`` token tiles (8), every A
fragment feeding ``nt`` mma.sp and every B fragment ``mt``. ``mt`` is 4 or 2 (the most) where
the grid still has FULL_GRID (``common``) blocks, else 1. K runs in stages of STEPS K steps
(STAGE_K inputs), one ``cp.async`` group each, double-buffered:

  1. each thread copies its runs of 4 inputs of stage s + 1's X tile [8 nt tokens, STAGE_K]
     into an fp32 buffer: one 16-byte ``cp.async`` a run where K is a multiple of 4, else four
     of 4 bytes; a copy past M or K writes zeros instead of reading;
  2. it loads the stage's A fragments and metadata (128-bit loads; in flight meanwhile),
     waits for its own copies of stage s (``cp.async.wait_group 1``), rounds them to bf16 and
     writes each word where its lane's B fragment is read (fragment order: one 128-bit
     shared load per fragment, no bank conflicts);
  3. a barrier, then STEPS x mt x nt ``mma.sp``, and a barrier before the bf16 tile is
     written again.

Static counts (SASS of the main loop, 768 -> 3072 at 128 tokens, sm_80): 7 global load
instructions per 8 ``mma.sp`` with one A tile per warp, 14 per 32 with four; the kernel
before this schedule issued 37 per 4.

Fragment layouts (PTX ISA 9.7.16.6, 16-bit types; TVM's test_tir_ptx_mma_sp.py runs the same
maps on GPUs): lane l's A element i (0..7) is compressed A[(i%4)//2*8 + l//4, i//4*8 + l%4*2 +
i%2]; B element i is B[i//2*8 + l%4*2 + i%2, l//4]; C element i is C[i//2*8 + l//4, l%4*2 +
i%2]. Metadata word q*2 + h (lanes 4q and 4q+1 hand it over; selector 0) holds, for rows q
and q+8 (low and high 16 bits), the 2-bit positions of the kept values of K half h, 2 bits per
kept value in order.

No GPU here: :func:`build` with ``emulate=True`` is a CPU twin with the same staging (the copy
and its zero fill into a double buffer, in the GPU's order), fragment reads and stores, lanes
and warps as loops, and the instruction written as TIR loops from the layouts above;
``sparsec compile --target cuda`` checks the model on it (targets/cuda.py), the tests check it
against numpy, and nvcc compiles the real kernel for sm_80 and sm_90 (ptxas: no spills). Its
speed is unmeasured until a GPU is lent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import (FULL_GRID, Activation, clip, epilogue_func,
                                            finish)

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

NAME = "mma_sp_cuda"
TILE_M, TILE_N, TILE_K = 16, 8, 32   # output channels, tokens, inputs of one mma.sp
LANES = 32
WARPS = 4                            # warps of a block, side by side along output channels
THREADS = WARPS * LANES
MAX_N_TILES = 4                      # token tiles per warp: each A fragment feeds up to 4
STEPS = 2                            # K steps of a stage (one cp.async group, one barrier pair)
STAGE_K = STEPS * TILE_K             # inputs of a stage
MIN_ARCH = 80                        # mma.sp exists from Ampere on
INSTRUCTION = "mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32"
#: the attribute that marks a kernel for its CPU twin (targets/cuda.py): the build arguments
TWIN_ATTR = "sparsec.cpu_twin"


def is_2_4(w_kn: "np.ndarray") -> bool:
    """Whether every run of 4 consecutive inputs holds at most 2 nonzeros per output channel
    (K is padded with zeros to whole runs)."""
    import numpy as np

    k, n = w_kn.shape
    padded = np.zeros((-(-k // 4) * 4, n), dtype=w_kn.dtype)
    padded[:k] = w_kn
    return bool(((padded.reshape(-1, 4, n) != 0).sum(axis=1) <= 2).all())


@dataclass(frozen=True)
class Plan:
    """Geometry: ``mt`` A tiles (16 channels) and ``nt`` token tiles (8) per warp; K padded to
    whole stages of STAGE_K inputs, N (output channels) to whole blocks of WARPS x 16 mt, M
    (tokens) to whole token tiles of the block (8 nt)."""

    m: int
    k: int
    n: int
    nt: int
    mt: int = 1

    @property
    def kp(self) -> int:
        return -(-self.k // STAGE_K) * STAGE_K

    @property
    def stages(self) -> int:
        return self.kp // STAGE_K

    @property
    def block_n(self) -> int:
        return TILE_M * self.mt * WARPS

    @property
    def block_m(self) -> int:
        return TILE_N * self.nt

    @property
    def np_(self) -> int:
        return -(-self.n // self.block_n) * self.block_n

    @property
    def mp(self) -> int:
        return -(-self.m // self.block_m) * self.block_m

    @property
    def grid(self) -> tuple[int, int]:
        return self.np_ // self.block_n, self.mp // self.block_m

    @property
    def vec(self) -> int:
        """Floats per ``cp.async`` of X: 4 (16 bytes) where every row starts 16-byte aligned."""
        return 4 if self.k % 4 == 0 else 1


def plan(m: int, k: int, n: int, mt: int | None = None) -> Plan:
    """Up to MAX_N_TILES token tiles per warp (each A fragment feeds that many ``mma.sp``);
    four or two A tiles per warp (the most) where the grid keeps FULL_GRID (``common``)
    blocks and N pads no further, else one (``mt`` given: that many)."""

    nt = min(MAX_N_TILES, -(-m // TILE_N))
    if mt is not None:
        return Plan(m, k, n, nt, mt)
    narrow = Plan(m, k, n, nt, 1)
    for wide in (Plan(m, k, n, nt, 4), Plan(m, k, n, nt, 2)):
        if wide.grid[0] * wide.grid[1] >= FULL_GRID and wide.np_ == narrow.np_:
            return wide
    return narrow


def pack_weight(w_kn: "np.ndarray", p: Plan) -> tuple["np.ndarray", "np.ndarray"]:
    """[K, N] 2:4 fp32 -> (Wa [OB, KS, 32, 4], We [OW, S, 32, 2 mt]) (module docstring). Each run
    of 4 keeps its nonzeros and, where it has fewer than 2, its first zero positions: two
    increasing positions per run, as the instruction expects."""
    import numpy as np

    from sparsec.targets.kernels.amx import bf16_bits

    if not is_2_4(w_kn):
        raise ValueError("W is not 2:4 sparse along K")
    k, n = w_kn.shape
    wt = np.zeros((p.np_, p.kp), np.float32)                 # W^T, padded
    wt[:n, :k] = w_kn.T
    runs = wt.reshape(p.np_, p.kp // 4, 4)
    # positions: nonzeros first (stable), the first two, then in increasing order
    pos = np.sort(np.argsort(runs == 0, axis=-1, kind="stable")[..., :2], axis=-1)
    kept = np.take_along_axis(runs, pos, axis=-1)            # [NP, KP/4, 2]
    ob, ks = p.np_ // TILE_M, p.kp // TILE_K
    # per tile: compressed A [16 rows, 16 values] and positions [16, 16]
    vals = kept.reshape(ob, TILE_M, ks, TILE_K // 2).transpose(0, 2, 1, 3)
    where = pos.reshape(ob, TILE_M, ks, TILE_K // 2).transpose(0, 2, 1, 3).astype(np.uint32)
    lane, i = np.arange(LANES)[:, None], np.arange(8)[None, :]
    rows, cols = (i % 4) // 2 * 8 + lane // 4, i // 4 * 8 + lane % 4 * 2 + i % 2
    bits = bf16_bits(vals[:, :, rows, cols]).astype(np.uint32)    # [OB, KS, 32, 8]
    words = bits[..., 0::2] | (bits[..., 1::2] << 16)
    # metadata word q*2 + h: rows q (bits 0-15) and q+8 (16-31), values 8h .. 8h+7
    q, h, j = np.arange(8)[:, None, None], np.arange(2)[None, :, None], np.arange(8)
    shifts = (2 * j).astype(np.uint32)                       # 2 bits per kept value
    low = (where[:, :, q, 8 * h + j] << shifts).sum(axis=-1, dtype=np.uint64)
    high = (where[:, :, q + 8, 8 * h + j] << shifts).sum(axis=-1, dtype=np.uint64)
    meta = (low | (high << 16)).astype(np.uint32).reshape(ob, ks, 16)
    lane_meta = meta[:, :, (np.arange(LANES) // 4) * 2 + np.arange(LANES) % 2]   # [OB, KS, 32]
    # per warp tile and stage: word a * STEPS + step of each lane
    by_stage = lane_meta.reshape(ob // p.mt, p.mt, p.stages, STEPS, LANES)
    we = by_stage.transpose(0, 2, 4, 1, 3).reshape(ob // p.mt, p.stages, LANES, p.mt * STEPS)
    return np.ascontiguousarray(words.astype(np.uint32)), np.ascontiguousarray(we)


def weight_bytes(p: Plan) -> int:
    """Bytes the kernel reads for W: 2 per kept value (half of the inputs) plus 4 bytes of
    metadata per lane and K step."""
    return (p.np_ // TILE_M) * (p.kp // TILE_K) * LANES * (4 * 4 + 4)


# --------------------------------------------------------------------------- kernel


def _b_word(pair) -> "tirx.PrimExpr":
    """One B fragment word from two neighbouring inputs (fp32 values that can be
    reinterpreted: loads, or a local variable in CUDA): bf16 bits, nearest even, low first."""
    from sparsec.targets.kernels.amx import bf16_bits_expr

    return bf16_bits_expr(pair[0]) | (bf16_bits_expr(pair[1]) << 16)


def build(m: int, k: int, n: int, dtype: str = "float32", bias: bool = False,
          act: Activation | None = None, residual: bool = False, emulate: bool = False,
          mt: int | None = None) -> "tirx.PrimFunc":
    """The PrimFunc ``(X[M,K], Wa, We [, B[N]] [, R[M,N]], Y[M,N])`` of :func:`pack_weight`'s
    arrays for ``plan(m, k, n, mt)``: CUDA (module docstring's schedule), or with ``emulate``
    its CPU twin."""
    import json

    import tvm
    from tvm import s_tir, te, tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    if dtype != "float32":
        raise ValueError(f"{NAME} takes float32 tensors, not {dtype}")
    p = plan(m, k, n, mt)
    ob, ks, mt, nt = p.np_ // TILE_M, p.kp // TILE_K, p.mt, p.nt
    x = te.placeholder((m, k), dtype, name="X")
    wa = te.placeholder((ob, ks, LANES, 4), "uint32", name="Wa")
    we = te.placeholder((ob // mt, p.stages, LANES, mt * STEPS), "uint32", name="We")
    b = te.placeholder((n,), dtype, name="B") if bias else None
    res = te.placeholder((m, n), dtype, name="R") if residual else None
    zero = tirx.FloatImm("float32", 0.0)
    # the epilogue in the GEMM's own stores, unless GELU or SiLU (TOPI's fast_erf / fast_exp
    # stages, built for a separate kernel)
    fused = not (act is not None and (act.gelu or act.silu))
    units = p.block_m * STAGE_K // 4           # runs of 4 inputs in a stage; nt per thread

    def stage(copy, tid, s, buf, tok0) -> None:
        """Thread ``tid``'s copies of stage ``s`` (X[tok0 .. tok0 + 8 nt, STAGE_K inputs]) into
        fp32 buffer ``buf``: its runs u = i * THREADS + tid (token row u // 16, inputs
        4 (u % 16) ..), each one 16-byte copy or four 4-byte ones (p.vec floats each):
        ``copy(dst, row, col, inside)`` moves X[row, col ..] (clamped in bounds) to staged
        offset ``dst``, or writes zeros where the copy lies past M or K."""
        for i in range(nt):
            u = i * THREADS + tid
            tok = tok0 + u // (STAGE_K // 4)
            for e in range(0, 4, p.vec):
                col = s * STAGE_K + u % (STAGE_K // 4) * 4 + e
                copy((buf * units + u) * 4 + e, tirx.min(tok, m - 1),
                     tirx.min(col, k - p.vec), tirx.all(tok < m, col < k))

    def convert(read4, write, tid, buf) -> None:
        """Thread ``tid`` rounds its own runs of fp32 buffer ``buf`` to bf16 pairs and writes
        each word where the B fragments are read from: word j of lane l's fragment of token
        tile t at K step st of the stage is bf16 word ((t STEPS + st) 32 + l) 4 + j, so a
        lane reads its fragment with one 128-bit load. ``read4(offset)`` gives the run's 4
        values (from one 128-bit load), ``write(index, word)`` stores."""
        for i in range(nt):
            u = i * THREADS + tid
            row, q = u // (STAGE_K // 4), u % (STAGE_K // 4)
            v = read4((buf * units + u) * 4)
            for h in range(2):                 # the two pairs of the run
                pair = 2 * q + h               # inputs 2 pair, 2 pair + 1 of the stage
                st, pp = pair // (TILE_K // 2), pair % (TILE_K // 2)
                lane = row % TILE_N * 4 + pp % 4
                write(((row // TILE_N * STEPS + st) * LANES + lane) * 4 + pp // 4,
                      _b_word((v[2 * h], v[2 * h + 1])))

    def out_index(tile, t, lane, i) -> tuple:
        """(token, channel) of C element ``i`` of token tile ``t`` and A tile ``tile``."""
        return (t * TILE_N + lane % 4 * 2 + i % 2, tile * TILE_M + i // 2 * 8 + lane // 4)

    def store(bufs, tok, ch, value) -> None:
        """A C element into acc, or (fused) finished into Y, inside M and N only."""
        if not fused:
            bufs["out"][tok, ch] = value
            return
        if bias:
            value = value + bufs["B"][ch]
        if residual:
            value = value + bufs["R"][tirx.min(tok, m - 1), tirx.min(ch, n - 1)]
        with T.If(tirx.all(tok < m, ch < n)):
            with T.Then():
                bufs["out"][tok, ch] = clip(value, act, dtype)

    def buffers(ins, outs) -> tuple:
        xs, was, wes, *rest = (T.buffer_proxy(t) for t in ins)
        bufs = {"out": T.buffer_proxy(outs[0])}
        if fused and bias:
            bufs["B"] = rest.pop(0)
        if fused and residual:
            bufs["R"] = rest.pop(0)
        return xs, was, wes, bufs

    def gpu_program(ins, outs):
        xs, was, wes, bufs = buffers(ins, outs)
        x_data = ins[0].data
        with IRBuilder() as ib:
            bx, by = te.thread_axis("blockIdx.x"), te.thread_axis("blockIdx.y")
            warp, lane = te.thread_axis("threadIdx.y"), te.thread_axis("threadIdx.x")
            with T.frame_scope([T.attr(bx, "thread_extent", p.grid[0]),
                                T.attr(by, "thread_extent", p.grid[1]),
                                T.attr(warp, "thread_extent", WARPS),
                                T.attr(lane, "thread_extent", LANES)]):
                tok0, wt = by * p.block_m, bx * WARPS + warp      # wt: the warp's tile
                tid = warp * LANES + lane
                sx = T.decl_buffer([2 * units * 4], "float32", scope="shared")   # fp32 runs
                sb = T.buffer_proxy(T.decl_buffer([units * 2], "uint32", scope="shared"))
                sxp = T.buffer_proxy(sx)
                c = T.buffer_proxy(T.decl_buffer([mt, nt, 4], "float32", scope="local"))
                fa = T.buffer_proxy(T.decl_buffer([mt * STEPS * 4], "uint32", scope="local"))
                fe = T.buffer_proxy(T.decl_buffer([mt * STEPS], "uint32", scope="local"))
                fb = T.buffer_proxy(T.decl_buffer([nt, 4], "uint32", scope="local"))
                xv = T.buffer_proxy(T.decl_buffer([4], "float32", scope="local"))
                for a in range(mt):
                    for t in range(nt):
                        for i in range(4):
                            c[a, t, i] = zero

                def copy(dst, row, col, inside):
                    # the predicate as a select: TVM's codegen reads a Cast's ``value`` as
                    # the "no predicate" constant
                    T.evaluate(tvm.ir.Call(
                        tvm.ir.Op.get("tirx.s_tir.cp_async_raw"),
                        [sx.data, dst, x_data, row * k + col, tirx.IntImm("int32", 4 * p.vec),
                         tirx.Select(inside, tirx.IntImm("int32", 1), tirx.IntImm("int32", 0))],
                        ret_ty=tvm.ir.PrimType("float32")))

                def read4(at):
                    xv[tirx.Ramp(0, 1, 4)] = sxp[tirx.Ramp(at, 1, 4)]
                    return [xv[e] for e in range(4)]

                def write(at, word):
                    sb[at] = word

                stage(copy, tid, 0, 0, tok0)
                T.evaluate(T.ptx.cp.async_.commit_group())
                with T.serial(0, p.stages) as s:
                    with T.If(s + 1 < p.stages):
                        with T.Then():
                            stage(copy, tid, s + 1, (s + 1) % 2, tok0)
                    T.evaluate(T.ptx.cp.async_.commit_group())   # (empty at the last stage)
                    # this stage's A and metadata: 128-bit loads, in flight during the wait
                    for a in range(mt):
                        for st in range(STEPS):
                            fa[tirx.Ramp((a * STEPS + st) * 4, 1, 4)] = was[
                                wt * mt + a, s * STEPS + st, lane, tirx.Ramp(0, 1, 4)]
                    for g in range(0, mt * STEPS, 4):    # 64- or 128-bit loads
                        width = min(4, mt * STEPS)
                        fe[tirx.Ramp(g, 1, width)] = wes[wt, s, lane, tirx.Ramp(g, 1, width)]
                    T.evaluate(T.ptx.cp.async_.wait_group(1))   # this thread's runs of stage s
                    convert(read4, write, tid, s % 2)
                    T.evaluate(T.tvm_storage_sync("shared"))
                    for st in range(STEPS):
                        for t in range(nt):      # a lane's B fragment: one 128-bit load
                            fb[t, tirx.Ramp(0, 1, 4)] = sb[tirx.Ramp(
                                ((t * STEPS + st) * LANES + lane) * 4, 1, 4)]
                        for a in range(mt):
                            for t in range(nt):
                                d = [c[a, t, i] for i in range(4)]
                                T.evaluate(T.ptx.mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16
                                           .bf16.f32(*d, *(fa[(a * STEPS + st) * 4 + j]
                                                           for j in range(4)),
                                                     *(fb[t, j] for j in range(4)), *d,
                                                     fe[a * STEPS + st], 0))
                    T.evaluate(T.tvm_storage_sync("shared"))   # before sb is written again
                for a in range(mt):
                    for t in range(nt):
                        for i in range(4):
                            tok, ch = out_index(wt * mt + a, t, lane, i)
                            store(bufs, tok0 + tok, ch, c[a, t, i])
        return ib.get()

    def cpu_program(ins, outs):
        xs, was, wes, bufs = buffers(ins, outs)
        with IRBuilder() as ib:
            with T.serial(0, p.grid[0]) as bx, T.serial(0, p.grid[1]) as by:
                tok0 = by * p.block_m
                sx = T.buffer_proxy(T.decl_buffer([2 * units * 4], "float32"))
                sb = T.buffer_proxy(T.decl_buffer([units * 2], "uint32"))
                c = T.buffer_proxy(T.decl_buffer([WARPS, mt, nt, LANES, 4], "float32"))
                fa = T.buffer_proxy(T.decl_buffer([mt * STEPS, LANES, 4], "uint32"))
                fe = T.buffer_proxy(T.decl_buffer([mt * STEPS, LANES], "uint32"))
                with T.grid(WARPS, mt, nt, LANES, 4) as (w, a, t, ln, i):
                    c[w, a, t, ln, i] = zero

                def copy(dst, row, col, inside):
                    for e in range(p.vec):
                        sx[dst + e] = tirx.Select(inside, xs[row, col + e], zero)

                def write(at, word):
                    sb[at] = word

                def all_threads(s, buf):
                    with T.serial(0, THREADS) as tid:
                        stage(copy, tid, s, buf, tok0)

                all_threads(0, 0)
                with T.serial(0, p.stages) as s:
                    with T.If(s + 1 < p.stages):
                        with T.Then():
                            all_threads(s + 1, (s + 1) % 2)
                    with T.serial(0, THREADS) as tid:
                        convert(lambda at: [sx[at + e] for e in range(4)], write, tid, s % 2)
                    with T.serial(0, WARPS) as w:
                        wt = bx * WARPS + w
                        with T.serial(0, LANES) as ln:
                            for a in range(mt):
                                for st in range(STEPS):
                                    for j in range(4):
                                        fa[a * STEPS + st, ln, j] = was[wt * mt + a,
                                                                        s * STEPS + st, ln, j]
                                    fe[a * STEPS + st, ln] = wes[wt, s, ln, a * STEPS + st]
                        for st in range(STEPS):
                            for a in range(mt):
                                for t in range(nt):
                                    _emulate_mma_sp(
                                        c, lambda ln, i, a=a, t=t: (w, a, t, ln, i),
                                        lambda ln, jj, a=a: fa[a * STEPS + st, ln, jj],
                                        lambda ln, jj, t=t: sb[
                                            ((t * STEPS + st) * LANES + ln) * 4 + jj],
                                        lambda ln, a=a: fe[a * STEPS + st, ln])
                with T.grid(WARPS, LANES) as (w, ln):
                    for a in range(mt):
                        for t in range(nt):
                            for i in range(4):
                                tok, ch = out_index((bx * WARPS + w) * mt + a, t, ln, i)
                                store(bufs, tok0 + tok, ch, c[w, a, t, ln, i])
        return ib.get()

    # buffers at offset 0 (TVM's default is a free offset): aligned vector loads and copies
    program = cpu_program if emulate else gpu_program
    inputs = [t for t in [x, wa, we] + ([b, res] if fused else []) if t is not None]
    in_buffers = [tirx.decl_buffer(t.shape, t.dtype, t.op.name) for t in inputs]
    args = {"m": m, "k": k, "n": n, "bias": bias, "residual": residual, "mt": mt,
            "act": None if act is None else [act.low, act.high, act.gelu, act.silu]}
    if fused:
        y = te.extern((m, n), inputs, program, name="Y", dtype=dtype, in_buffers=in_buffers,
                      out_buffers=[tirx.decl_buffer((m, n), dtype, "Y")])
        func = finish(s_tir.Schedule(te.create_prim_func(inputs + [y])), NAME)
        return func.with_attr(TWIN_ATTR, json.dumps(args, sort_keys=True))
    acc = te.extern((p.mp, p.np_), inputs, program, name="acc", dtype="float32",
                    in_buffers=in_buffers,
                    out_buffers=[tirx.decl_buffer((p.mp, p.np_), "float32", "acc")])
    func = epilogue_func([x, wa, we], lambda i, j: acc[i, j], (m, n), dtype, b, res, act)
    sch = s_tir.Schedule(func)
    if not emulate:
        i, j = sch.get_loops(sch.get_sblock("Y"))
        bx, tx = sch.split(sch.fuse(i, j), [None, 256])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return finish(sch, NAME).with_attr(TWIN_ATTR, json.dumps(args, sort_keys=True))


def twin(func: "tirx.PrimFunc") -> "tirx.PrimFunc":
    """The CPU twin of a kernel :func:`build` made (its ``TWIN_ATTR`` arguments)."""
    import json

    args = json.loads(str(func.attrs[TWIN_ATTR]))
    act = args.pop("act")
    return build(**args, act=None if act is None else Activation(*act), emulate=True)


def half(word, upper):
    """The bf16 value in the upper (``upper``) or lower half of a 32-bit fragment ``word``, as
    fp32 (TIR): how the CPU twins read packed bf16 operands."""
    from tvm import tirx

    return tirx.reinterpret("float32", tirx.if_then_else(
        upper, word & tirx.IntImm("uint32", 0xFFFF0000), word << 16))


def _emulate_mma_sp(c, c_at, a_word, b_word, e_word) -> None:
    """``mma.sp ... m16n8k32 ... bf16`` on warp-wide fragments, as TIR loops: for each C
    element (``c[c_at(lane, i)]``), the sum over its row's 16 kept values of A x the B value
    at the K position the metadata gives (module docstring's maps). ``a_word(lane, j)``,
    ``b_word(lane, j)`` and ``e_word(lane)`` read the lanes' fragment words."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    with T.grid(TILE_M, TILE_N) as (r, col):
        s = T.buffer_proxy(T.decl_buffer([1], "float32", scope="local"))
        c_lane, c_i = (r % 8) * 4 + col // 2, (r // 8) * 2 + col % 2
        s[0] = c[c_at(c_lane, c_i)]
        with T.serial(0, TILE_K // 2) as v:
            a_lane, a_i = (r % 8) * 4 + (v % 8) // 2, (v // 8) * 4 + (r // 8) * 2 + v % 2
            meta = e_word((r % 8) * 4 + v // 8)
            shift = tirx.Cast("uint32", 2 * (v % 8) + 16 * (r // 8))
            kd = (v // 2) * 4 + tirx.Cast("int32", (meta >> shift) & tirx.IntImm("uint32", 3))
            b_lane = col * 4 + (kd % 8) // 2
            s[0] = s[0] + half(a_word(a_lane, a_i // 2), a_i % 2 == 1) * half(
                b_word(b_lane, kd // 8), kd % 2 == 1)
        c[c_at(c_lane, c_i)] = s[0]
