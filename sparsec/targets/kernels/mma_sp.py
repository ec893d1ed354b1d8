"""``mma_sp_cuda``: Y[M, N] = X[M, K] @ W[K, N] on NVIDIA sparse tensor cores (sm_80+), for a
constant W with at most 2 nonzeros in every 4 consecutive inputs of each output channel (the
2:4 pattern ``--sparsity-pattern 2:4`` makes).

``mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32`` multiplies a 16 x 32 A whose rows
are 2:4 sparse (stored as its 16 x 16 kept values plus 2-bit positions, the "metadata") by a
32 x 8 B, accumulating a 16 x 8 fp32 C, one warp at a time. Here A is W^T (16 output
channels), B is X^T (8 tokens): the tensor cores skip the zeros, and W is read at half its
bytes plus 1/8 for the metadata. Inputs are bf16 (8 bits of mantissa; the compile report says
``"precision": "bf16"`` and the package takes the bf16 tolerance), sums fp32.

Data:
  Wa[OB, KS, 32, 4]  uint32: W's kept values (bf16 pairs) in the A fragment order of each lane
                     of the warp that owns 16 output channels (tile ob) at K step ks (32
                     inputs): one 16-byte load per lane, coalesced. Packed at compile time.
  We[OB, KS, 32]     uint32: the metadata word each lane hands the instruction.
  X[M, K]            fp32, read as B fragments (two neighbouring inputs per word) and rounded
                     to bf16 in the kernel.
  acc[MP, NP]        fp32 C, token-major; then ``Y = act(acc + bias + residual)`` (a second
                     kernel, as every sparsec epilogue).

Fragment layouts (PTX ISA 9.7.16.6, 16-bit types; TVM's test_tir_ptx_mma_sp.py runs the same
maps on GPUs): lane l's A element i (0..7) is compressed A[(i%4)//2*8 + l//4, i//4*8 + l%4*2 +
i%2]; B element i is B[i//2*8 + l%4*2 + i%2, l//4]; C element i is C[i//2*8 + l//4, l%4*2 +
i%2]. Metadata word q*2 + h (lanes 4q and 4q+1 hand it over; selector 0) holds, for rows q
and q+8 (low and high 16 bits), the 2-bit positions of the kept values of K half h, 2 bits per
kept value in order.

No GPU here: :func:`build` with ``emulate=True`` is a CPU twin with the same fragment loads and
stores, lanes as a loop, and the instruction written as TIR loops from the layouts above;
``sparsec compile --target cuda`` checks the model on it (targets/cuda.py), the tests check
it against numpy, and nvcc compiles the real kernel for sm_80 and sm_90.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsec.targets.kernels.common import Activation, epilogue_func, finish

if TYPE_CHECKING:
    import numpy as np
    from tvm import tirx

NAME = "mma_sp_cuda"
TILE_M, TILE_N, TILE_K = 16, 8, 32   # output channels, tokens, inputs of one mma.sp
LANES = 32
WARPS = 4                            # warps of a block, side by side along output channels
MAX_N_TILES = 4                      # token tiles per warp: each A fragment feeds up to 4
MIN_ARCH = 80                        # mma.sp exists from Ampere on
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
    """Geometry: ``nt`` token tiles of 8 per warp; K padded to whole K steps of 32, N (output
    channels) to whole blocks of WARPS x 16, M (tokens) to whole warp tiles."""

    m: int
    k: int
    n: int
    nt: int

    @property
    def kp(self) -> int:
        return -(-self.k // TILE_K) * TILE_K

    @property
    def np_(self) -> int:
        return -(-self.n // (TILE_M * WARPS)) * TILE_M * WARPS

    @property
    def mp(self) -> int:
        return -(-self.m // (TILE_N * self.nt)) * TILE_N * self.nt


def plan(m: int, k: int, n: int) -> Plan:
    """Up to MAX_N_TILES token tiles per warp: each A fragment (weights) feeds that many
    ``mma.sp``."""
    return Plan(m, k, n, min(MAX_N_TILES, -(-m // TILE_N)))


def pack_weight(w_kn: "np.ndarray", p: Plan) -> tuple["np.ndarray", "np.ndarray"]:
    """[K, N] 2:4 fp32 -> (Wa [OB, KS, 32, 4], We [OB, KS, 32]) (module docstring). Each run
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
    lane_meta = meta[:, :, (np.arange(LANES) // 4) * 2 + np.arange(LANES) % 2]
    return np.ascontiguousarray(words.astype(np.uint32)), np.ascontiguousarray(lane_meta)


def weight_bytes(p: Plan) -> int:
    """Bytes the kernel reads for W: 2 per kept value (half of the inputs) plus 4 bytes of
    metadata per lane and K step."""
    return (p.np_ // TILE_M) * (p.kp // TILE_K) * LANES * (4 * 4 + 4)


# --------------------------------------------------------------------------- kernel


def _x_word(x, m: int, k: int, tok, col):
    """Two neighbouring inputs X[tok, col], X[tok, col + 1] as one word of bf16 bits (round to
    nearest even; zero past M or K)."""
    from tvm import tirx

    from sparsec.targets.kernels.amx import bf16_or_zero

    def bits(c):
        return bf16_or_zero(x[tirx.min(tok, m - 1), tirx.min(c, k - 1)],
                            tirx.all(tok < m, c < k))

    return bits(col) | (bits(col + 1) << 16)


def build(m: int, k: int, n: int, dtype: str = "float32", bias: bool = False,
          act: Activation | None = None, residual: bool = False, emulate: bool = False
          ) -> "tirx.PrimFunc":
    """The PrimFunc ``(X[M,K], Wa, We [, B[N]] [, R[M,N]], Y[M,N])`` of :func:`pack_weight`'s
    arrays: CUDA (a warp per 16 output channels x 8*nt tokens), or with ``emulate`` its CPU
    twin (module docstring)."""
    import json

    from tvm import s_tir, te, tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    if dtype != "float32":
        raise ValueError(f"{NAME} takes float32 tensors, not {dtype}")
    p = plan(m, k, n)
    ob, ks = p.np_ // TILE_M, p.kp // TILE_K
    x = te.placeholder((m, k), dtype, name="X")
    wa = te.placeholder((ob, ks, LANES, 4), "uint32", name="Wa")
    we = te.placeholder((ob, ks, LANES), "uint32", name="We")
    b = te.placeholder((n,), dtype, name="B") if bias else None
    res = te.placeholder((m, n), dtype, name="R") if residual else None
    groups = (ob // WARPS, p.mp // (TILE_N * p.nt))

    def loads(xs, was, wes, tile, step, tok0, lane, a_out, e_out, b_out):
        """One lane's fragments at K step ``step``: A words, metadata, B words per token tile."""
        for j in range(4):
            a_out(j, was[tile, step, lane, j])
        e_out(wes[tile, step, lane])
        for t in range(p.nt):
            tok = tok0 + t * TILE_N + lane // 4
            for j in range(4):
                b_out(t, j, _x_word(xs, m, k, tok, step * TILE_K + j * 8 + lane % 4 * 2))

    def stores(accs, tile, tok0, lane, c_in):
        """One lane's C elements into acc[token, channel]."""
        for t in range(p.nt):
            for i in range(4):
                accs[tok0 + t * TILE_N + lane % 4 * 2 + i % 2,
                     tile * TILE_M + i // 2 * 8 + lane // 4] = c_in(t, i)

    def gpu_program(ins, outs):
        xs, was, wes = (T.buffer_proxy(t) for t in ins)
        accs = T.buffer_proxy(outs[0])
        with IRBuilder() as ib:
            bx, by = te.thread_axis("blockIdx.x"), te.thread_axis("blockIdx.y")
            warp, lane = te.thread_axis("threadIdx.y"), te.thread_axis("threadIdx.x")
            with T.frame_scope([T.attr(bx, "thread_extent", groups[0]),
                                T.attr(by, "thread_extent", groups[1]),
                                T.attr(warp, "thread_extent", WARPS),
                                T.attr(lane, "thread_extent", LANES)]):
                tile, tok0 = bx * WARPS + warp, by * (TILE_N * p.nt)
                c = T.buffer_proxy(T.decl_buffer([p.nt, 4], "float32", scope="local"))
                fa = T.buffer_proxy(T.decl_buffer([4], "uint32", scope="local"))
                fe = T.buffer_proxy(T.decl_buffer([1], "uint32", scope="local"))
                fb = T.buffer_proxy(T.decl_buffer([p.nt, 4], "uint32", scope="local"))
                for t in range(p.nt):
                    for i in range(4):
                        c[t, i] = tirx.FloatImm("float32", 0.0)
                with T.serial(0, ks) as step:
                    def set_a(j, v):
                        fa[j] = v

                    def set_e(v):
                        fe[0] = v

                    def set_b(t, j, v):
                        fb[t, j] = v

                    loads(xs, was, wes, tile, step, tok0, lane, set_a, set_e, set_b)
                    for t in range(p.nt):
                        d = [c[t, i] for i in range(4)]
                        T.evaluate(T.ptx.mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32(
                            *d, *(fa[j] for j in range(4)), *(fb[t, j] for j in range(4)),
                            *d, fe[0], 0))
                stores(accs, tile, tok0, lane, lambda t, i: c[t, i])
        return ib.get()

    def cpu_program(ins, outs):
        xs, was, wes = (T.buffer_proxy(t) for t in ins)
        accs = T.buffer_proxy(outs[0])
        with IRBuilder() as ib:
            with T.serial(0, groups[0] * WARPS) as tile, T.serial(0, groups[1]) as grp:
                tok0 = grp * (TILE_N * p.nt)
                c = T.buffer_proxy(T.decl_buffer([p.nt, LANES, 4], "float32"))
                fa = T.buffer_proxy(T.decl_buffer([LANES, 4], "uint32"))
                fe = T.buffer_proxy(T.decl_buffer([LANES], "uint32"))
                fb = T.buffer_proxy(T.decl_buffer([p.nt, LANES, 4], "uint32"))
                with T.grid(p.nt, LANES, 4) as (t, ln, i):
                    c[t, ln, i] = tirx.FloatImm("float32", 0.0)
                with T.serial(0, ks) as step:
                    with T.serial(0, LANES) as ln:
                        def set_a(j, v, ln=ln):
                            fa[ln, j] = v

                        def set_e(v, ln=ln):
                            fe[ln] = v

                        def set_b(t, j, v, ln=ln):
                            fb[t, ln, j] = v

                        loads(xs, was, wes, tile, step, tok0, ln, set_a, set_e, set_b)
                    for t in range(p.nt):
                        _emulate_mma_sp(c, t, fa, fb, fe)
                with T.serial(0, LANES) as ln:
                    stores(accs, tile, tok0, ln, lambda t, i, ln=ln: c[t, ln, i])
        return ib.get()

    acc = te.extern((p.mp, p.np_), [x, wa, we], cpu_program if emulate else gpu_program,
                    name="acc", dtype="float32")
    func = epilogue_func([x, wa, we], lambda i, j: acc[i, j], (m, n), dtype, b, res, act)
    sch = s_tir.Schedule(func)
    if not emulate:
        i, j = sch.get_loops(sch.get_sblock("Y"))
        bx, tx = sch.split(sch.fuse(i, j), [None, 256])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    args = {"m": m, "k": k, "n": n, "bias": bias, "residual": residual,
            "act": None if act is None else [act.low, act.high, act.gelu, act.silu]}
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


def _emulate_mma_sp(c, t: int, fa, fb, fe) -> None:
    """``mma.sp ... m16n8k32 ... bf16`` on warp-wide fragments (lanes as the first index), as
    TIR loops: for each C element, the sum over its row's 16 kept values of A x the B value
    at the K position the metadata gives (module docstring's maps)."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    with T.grid(TILE_M, TILE_N) as (r, col):
        s = T.buffer_proxy(T.decl_buffer([1], "float32", scope="local"))
        c_lane, c_i = (r % 8) * 4 + col // 2, (r // 8) * 2 + col % 2
        s[0] = c[t, c_lane, c_i]
        with T.serial(0, TILE_K // 2) as v:
            a_lane, a_i = (r % 8) * 4 + (v % 8) // 2, (v // 8) * 4 + (r // 8) * 2 + v % 2
            meta = fe[(r % 8) * 4 + v // 8]
            shift = tirx.Cast("uint32", 2 * (v % 8) + 16 * (r // 8))
            kd = (v // 2) * 4 + tirx.Cast("int32", (meta >> shift) & tirx.IntImm("uint32", 3))
            b_lane = col * 4 + (kd % 8) // 2
            s[0] = s[0] + half(fa[a_lane, a_i // 2], a_i % 2 == 1) * half(
                fb[t, b_lane, kd // 8], kd % 2 == 1)
        c[t, c_lane, c_i] = s[0]
