"""Helpers shared by the hand-scheduled kernels."""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from tvm import s_tir, tirx

    from sparsec.targets.kernels import conv2d

#: Attribute that DLight and our fallback pass read to leave a PrimFunc alone.
SCHEDULED_ATTR = "tirx.is_scheduled"
#: Attribute naming the sparsec strategy that produced a PrimFunc (counted for the manifest).
STRATEGY_ATTR = "sparsec.strategy"
#: ``op_pattern`` value of ``kOpaque``: FuseOps never fuses anything into an opaque function,
#: so a pre-scheduled kernel keeps its schedule (FuseTIR would otherwise merge bodies).
OPAQUE_PATTERN = 8

#: fp32 lanes of one AVX2 ymm register.
VEC_LANES = 8

#: the compile's precision: "fp32" (exact kernels only), "tf32" (CUDA: matmuls by a weight
#: on tensor cores, inputs rounded to tf32) or "bf16" (kernels that round their inputs to
#: bf16 may be chosen: AMX tiles, tensor cores, sparse tensor cores)
PRECISIONS = ("fp32", "tf32", "bf16")
#: thread blocks that fill a GPU (an H100 has 132 SMs): the tensor-core kernels (``mma_cuda``,
#: ``mma_sp_cuda``) widen warp tiles only while the grid keeps this many, and split K below it
FULL_GRID = 132
_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("sparsec_precision",
                                                                 default="fp32")


@contextlib.contextmanager
def precision(name: str):
    """Within the block, the kernel rewrite may choose kernels of precision ``name``."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {name!r}")
    token = _PRECISION.set(name)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def current_precision() -> str:
    """The compile's precision (:func:`precision`)."""
    return _PRECISION.get()


def bf16_allowed() -> bool:
    """Whether the compile allows bf16 kernels (:func:`precision`)."""
    return _PRECISION.get() == "bf16"


def wide_vectors() -> bool:
    """Whether the target being compiled for (``tvm.target.Target.current()``) has AVX-512:
    32 vector registers, 16 fp32 lanes each (AVX2 has 16 of 8), so register tiles can hold
    twice the accumulators. False outside a target scope and for other architectures."""
    import tvm

    from sparsec.targets import llvm_features

    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return False
    return "avx512f" in llvm_features(str(target))


#: LLVM CPUs whose AVX-512 runs a 512-bit FMA as two 256-bit halves (AMD Zen 4), so that 8-lane
#: (256-bit) vectors do as many FMAs a cycle per lane as 16-lane ones; cores with full-width
#: 512-bit FMA units (Intel's server cores) run them at half that rate
HALF_RATE_AVX512 = ("znver4",)


def narrow_vectors_at_full_rate() -> bool:
    """Whether 8-lane vectors reach the target's full FMA rate per lane: without AVX-512
    (they are its widest), and on :data:`HALF_RATE_AVX512` CPUs. Width-vectorized conv tiles
    of 8-lane vectors are chosen only there (Emerald Rapids, one thread, alone: 32->32 3x3 at
    56x56 591 us in rows of 7 8-lane vectors against 331 on the channel-blocked kernel, ONNX
    Runtime 320; on Zen 4 544 against 542)."""
    import tvm

    if not wide_vectors():
        return True
    return tvm.target.Target.current().attrs.get("mcpu") in HALF_RATE_AVX512


def target_cores() -> int:
    """The cores the target being compiled for runs on (its ``num-cores``; this machine's
    outside a target scope or where the target does not say): kernels size their parallel
    tasks by it."""
    import os

    import tvm

    target = tvm.target.Target.current(allow_none=True)
    cores = target.attrs.get("num-cores") if target is not None else None
    return int(cores) if cores else (os.cpu_count() or 1)


def pick_band(oh: int, cores: int, fits=lambda rows: True) -> int:
    """Output rows per parallel task for a kernel that works in bands of whole rows (each band
    re-reads a halo of input rows, so fewer, taller bands do less work): the most rows
    (dividing ``oh``, and accepted by ``fits``) that leave at least two bands per core in a
    multiple of the core count (TVM splits a parallel loop statically: 7 bands on 2 cores
    run as 4 + 3); failing that, at least two bands per core; else one row."""
    rows = [r for r in range(1, oh + 1) if oh % r == 0 and fits(r)]
    for ok in (lambda t: t >= 2 * cores and t % cores == 0, lambda t: t >= 2 * cores):
        good = [r for r in rows if ok(oh // r)]
        if good:
            return max(good)
    return 1


@dataclass(frozen=True)
class Activation:
    """The output activation a kernel applies in its write-back: clip bounds (``None`` leaves
    that side open; ReLU is ``low=0``, ReLU6 ``low=0, high=6``), then optionally GELU (erf
    form, with TOPI's vectorizable rational ``fast_erf``: libm's erf is scalar) or SiLU /
    Swish (``x * sigmoid(x)``, the sigmoid as ``1 / (1 + fast_exp(-x))``, as the unfused ops
    compute it: ``host.sigmoid_pass``)."""

    low: float | None = None
    high: float | None = None
    gelu: bool = False
    silu: bool = False

    @property
    def name(self) -> str:
        """How the compile report names it: ``relu``, ``clip(0,6)``, ``gelu``."""
        if self == RELU:
            return "relu"
        parts = []
        if self.low is not None or self.high is not None:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            parts.append(f"clip({lo},{hi})")
        if self.gelu:
            parts.append("gelu")
        if self.silu:
            parts.append("silu")
        return "+".join(parts)


RELU = Activation(low=0.0)


def pick_row_tile(extent: int, prefer: tuple[int, ...] = (4, 6, 5, 3, 2, 1)) -> int:
    """First tile size in ``prefer`` that divides ``extent`` (so the tile needs no predicate)."""
    for t in prefer:
        if t <= extent and extent % t == 0:
            return t
    return 1


def clip(v: "tirx.PrimExpr", act: "Activation | None", dtype: str) -> "tirx.PrimExpr":
    """``v`` clipped to the activation's bounds (unchanged without any). A NaN stays NaN, as
    in ONNX Runtime: the bound is the first operand (LLVM's ``select(bound > v, bound, v)``,
    one ``maxps``), so an unordered comparison picks ``v``. The other order turned a NaN
    into the bound: a model that overflowed gave finite outputs."""
    from tvm import tirx

    if act is not None and act.low is not None:
        v = tirx.max(tirx.const(act.low, dtype), v)
    if act is not None and act.high is not None:
        v = tirx.min(tirx.const(act.high, dtype), v)
    return v


def clip_bound(x: "te.Tensor", bound, side: int) -> "te.Tensor":
    """ONNX Clip's lower (``side`` 0) or upper (1) bound on ``x``, ``bound`` a 0-d tensor or
    a number, as ``max(bound, x)`` / ``min(bound, x)``: the bound first, so that a NaN in
    ``x`` stays NaN as in ONNX Runtime (TOPI's ``max(x, bound)`` made it the bound). The
    importer's Clip (``backend._clip_converter``) and the kernels' epilogue match
    (``rewrite._clip_bound``) both use this."""
    from tvm import te, tirx

    op = tirx.max if side == 0 else tirx.min
    value = bound() if isinstance(bound, te.Tensor) else tirx.const(bound, x.dtype)
    return te.compute(x.shape, lambda *i: op(value, x(*i)),
                      name="T_maximum" if side == 0 else "T_minimum")


def epilogue_func(inputs: list, value, shape: tuple[int, ...], dtype: str, bias=None,
                  residual=None, act: Activation | None = None, channel_axis: int = 1
                  ) -> "tirx.PrimFunc":
    """The kernel's output stage ``Y = act(value + bias[channel] + residual)`` (each part
    optional) and the unscheduled PrimFunc over ``inputs + [bias] + [residual] + [Y]``;
    ``value(*index)`` reads the accumulator for an output index. Whatever stages the
    activation needs are inlined, so the function has the kernel's blocks and ``Y`` only."""
    from tvm import s_tir, te, tirx, topi

    def pre(*index):
        v = value(*index)
        if bias is not None:
            v = v + bias[index[channel_axis]]
        if residual is not None:
            v = v + residual[index]
        return clip(v, act, dtype)

    inline = []
    if act is not None and act.gelu:
        z = te.compute(shape, pre, name="act_in")
        erf = topi.fast_erf(te.compute(shape, lambda *i: z(*i) * tirx.const(2 ** -0.5, dtype),
                                       name="act_scaled"))
        inline = [z, erf.op.input_tensors[0], erf]
        half = tirx.const(0.5, dtype)
        y = te.compute(shape, lambda *i: z(*i) * half * (erf(*i) + tirx.const(1, dtype)),
                       name="Y")
    elif act is not None and act.silu:
        z = te.compute(shape, pre, name="act_in")
        e = topi.fast_exp(te.compute(shape, lambda *i: -z(*i), name="act_neg"))
        inline = [z, e.op.input_tensors[0], e]
        one = tirx.const(1, dtype)
        y = te.compute(shape, lambda *i: z(*i) * (one / (one + e(*i))), name="Y")
    else:
        y = te.compute(shape, pre, name="Y")
    args = list(inputs) + [t for t in (bias, residual) if t is not None] + [y]
    func = te.create_prim_func(args)
    if not inline:
        return func
    sch = s_tir.Schedule(func)
    for t in reversed(inline):   # consumers first: each inlines into one that is already Y's
        sch.compute_inline(sch.get_sblock(t.op.name))
    return sch.mod["main"]


def finish(sch: "s_tir.Schedule", strategy: str) -> "tirx.PrimFunc":
    """The scheduled PrimFunc, marked so that nothing schedules or fuses it again."""
    func = sch.mod["main"]
    if "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return (
        func.with_attr(SCHEDULED_ATTR, True)
        .with_attr("op_pattern", OPAQUE_PATTERN)
        .with_attr(STRATEGY_ATTR, strategy)
    )


#: parallel iterations ahead whose output a task prefetches for writing (``prefetch_writes``)
PREFETCH_AHEAD = 4
#: cache lines one iteration prefetches at most (a larger box is left to the hardware)
MAX_PREFETCH_LINES = 64
_LINE_BYTES = 64


def prefetch_writes(func: "tirx.PrimFunc", box: "Callable[[tirx.PrimExpr], list]",
                    ahead: int = PREFETCH_AHEAD, output: str = "Y") -> "tirx.PrimFunc":
    """``func`` with a prefetch for writing (``prefetchw`` on x86, ``prfm pstl1keep`` on Arm)
    of each cache line that iteration ``v + ahead`` of the parallel loop writing ``output``
    will write, issued at the top of iteration ``v`` (the last iterations: the last one's).
    ``box(v)`` is that iteration's region of ``output``: ``(start, extent)`` per axis, the
    extents constants; at most ``MAX_PREFETCH_LINES`` lines, else ``func`` is left as it is.

    Why: the static memory plan hands a kernel's output storage that the kernel before it has
    just used, often read by both cores (a pointwise conv split by output channels reads
    every input channel). A store to a line the other core holds waits for that copy to be
    invalidated, and the stores of a small task leave the core too few of them in flight: a
    stride-2 depthwise conv (288 channels, 14x14 -> 7x7, 2 threads) ran 9.6 us on fresh
    memory and 35 us right after the pointwise conv that read its storage. Requested a few
    tasks early, the lines arrive in time: 8.5 us."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    stored = _buffers(func.body, tirx.BufferStore, lambda store: store.buffer)
    buf = next((b for b in stored if b.name == output), None)
    if buf is None:
        return func
    per_line = max(1, _LINE_BYTES * 8 // tvm.DataType(buf.dtype).bits)
    done: list = []

    def prefetch(loop):
        if done or loop.kind != tirx.ForKind.PARALLEL or not any(
                b.same_as(buf) for b in _buffers(loop.body, tirx.BufferStore,
                                                  lambda store: store.buffer)):
            return loop
        done.append(loop)
        dtype = str(loop.extent.ty)
        nxt = tirx.min(loop.loop_var + ahead, loop.min + loop.extent - 1)
        region = [(start, int(extent)) for start, extent in box(nxt)]
        shape = [int(d) if isinstance(d, tirx.IntImm) else None for d in buf.shape]
        # trailing axes the box covers whole are one contiguous run
        inner = len(region) - 1
        while inner > 0 and region[inner][1] == shape[inner] and isinstance(
                region[inner][0], int) and region[inner][0] == 0:
            inner -= 1
        dims = [e for _, e in region[inner:]]
        run = math.prod(dims)
        offsets = [[]]
        for _, extent in region[:inner]:
            offsets = [o + [k] for o in offsets for k in range(extent)]
        steps = sorted({*range(0, run, per_line), run - 1})
        if len(offsets) * len(steps) > MAX_PREFETCH_LINES:
            return loop
        calls = []
        for o in offsets:
            for step in steps:
                within, rest = [], step     # the step's index in the run's axes
                for d in reversed(dims):
                    within.append(rest % d)
                    rest //= d
                index = [start + k for (start, _), k in zip(region, o + within[::-1])]
                calls.append(_prefetch(buf, [tirx.const(i, dtype) if isinstance(i, int) else i
                                             for i in index], write=True))
        return _prepend(loop, calls)

    return func.with_body(tvm_ffi.structural_map(func.body, [(tirx.For, prefetch)]))


def prefetch_reads(func: "tirx.PrimFunc", loop_var, source: str,
                   indices: "Callable[[], list[list]]") -> "tirx.PrimFunc":
    """``func`` with a prefetch for reading of ``source[index]`` for each index of
    ``indices()`` at the top of the body of the loop over ``loop_var`` (expressions in the
    loops around it)."""
    import tvm_ffi
    from tvm import tirx
    from tvm.ir.expr import TensorLoad     # what tirx.BufferLoad makes

    loaded = _buffers(func.body, TensorLoad, lambda load: load.source)
    buf = next((b for b in loaded if b.name == source), None)
    if buf is None:
        return func

    def prefetch(loop):
        if not loop.loop_var.same_as(loop_var):
            return loop
        return _prepend(loop, [_prefetch(buf, index, write=False) for index in indices()])

    return func.with_body(tvm_ffi.structural_map(func.body, [(tirx.For, prefetch)]))


def _buffers(stmt, node_type, buffer_of) -> list:
    """The buffers of the ``node_type`` nodes (stores or loads) in ``stmt``, in order."""
    import tvm_ffi

    seen: list = []

    def see(node):
        seen.append(buffer_of(node))
        return node

    tvm_ffi.structural_map(stmt, [(node_type, see)])
    return seen


def _prefetch(buf, index: list, write: bool) -> "tirx.Stmt":
    """``llvm.prefetch`` of ``buf[index]``: for writing or reading, keep in all caches, data."""
    from tvm import tirx

    addr = tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(buf, index))
    return tirx.Evaluate(tirx.call_llvm_intrin(
        "void", "llvm.prefetch.p0", addr, tirx.const(int(write), "int32"),
        tirx.const(3, "int32"), tirx.const(1, "int32")))


def _prepend(loop, stmts: list):
    """``loop`` with ``stmts`` at the top of its body."""
    from tvm import tirx

    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind,
                    tirx.SeqStmt([*stmts, loop.body]), loop.thread_binding, loop.annotations)


def vector_pad(func: "tirx.PrimFunc", s: "conv2d.ConvShape", lanes: int | None = None,
               x_row: "Callable[..., tuple] | None" = None, fill: float = 0.0,
               flat: bool = False) -> "tirx.PrimFunc":
    """``func`` with its scheduled ``pad`` block (stride phases of the zero-padded input,
    ``P[*lead, py, px, i, j] = X[n, c, row, j*sw + px - pl]`` or 0 outside ``X``) rewritten
    as vector code: TVM scalarizes that block (its bounds test makes the vector loop
    conditional), which cost a stride-2 depthwise conv 3/4 of its time. Here each phase
    row's in-bounds columns are copied in vectors of ``lanes`` (default: a register of the
    target being compiled for, 16 or 8), then halves of it, then scalars,
    and only the border is zeroed; a stride-``sw`` phase is gathered by ``sw`` contiguous
    loads and one shuffle (``vpermt2ps`` on AVX-512), never reading past the row.

    ``x_row(lead, py, i)`` locates phase row ``i`` of phase ``py`` in the block's source
    ``src`` (``X``, or a kernel's own stage), ``lead`` being the pad block's index values
    before ``py``: ``(prefix, row[, conv_row])``, the row being ``src[*prefix, row, :]`` and
    row ``conv_row`` (default ``row``) of the conv's input, zeros outside ``[0, H)``. With
    ``flat`` the source's rows are not an axis: ``row`` is the offset of the row's first
    column on the source's last axis, ``src[*prefix, row + j]``. Without ``x_row`` the block
    is a plain zero pad ``P[n, c, i, j] = X[n, c, i - pt, j - pl]`` (no phase
    axes). ``fill`` is the value outside ``X`` (a max pool pads with the lowest float). The
    block must compute what its ``x_row``, ``s`` and ``fill`` say: this rewrite trusts them."""
    from tvm import s_tir, tirx
    from tvm.tirx import analysis

    if lanes is None:
        lanes = 16 if wide_vectors() else VEC_LANES
    phased = x_row is not None
    if not phased:
        def x_row(lead, py, i):
            return lead[:2], i - s.padding[0]

    def replace(stmt, outer=()):
        if isinstance(stmt, tirx.For):
            inner = stmt.body
            while isinstance(inner, tirx.For):
                inner = inner.body
            if isinstance(inner, s_tir.SBlockRealize) and inner.block.name_hint == "pad":
                nlead = len(inner.block.body.buffer.shape) - 2 - 2 * phased
                lead = inner.iter_values[:nlead]
                used = {v for e in lead for v in analysis.undefined_vars(e)}
                if not any(stmt.loop_var.same_as(v) for v in used):   # (n, c) loops stay
                    # a row phase fused into the (n, c) loops (``conv2d._schedule_pad``
                    # with 3 lead axes): that phase only
                    py = inner.iter_values[nlead] if phased else None
                    bound = py is not None and any(
                        v.same_as(o) for v in analysis.undefined_vars(py) for o in outer)
                    return _pad_block(inner, s, lanes, x_row, nlead, phased, fill,
                                      py if bound else None, flat)
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind,
                            replace(stmt.body, (*outer, stmt.loop_var)), stmt.thread_binding,
                            stmt.annotations)
        if isinstance(stmt, tirx.SeqStmt):
            return tirx.SeqStmt([replace(x, outer) for x in stmt.seq])
        if isinstance(stmt, s_tir.SBlockRealize):
            return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate,
                                       replace(stmt.block, outer))
        if isinstance(stmt, s_tir.SBlock):
            return s_tir.SBlock(stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint,
                                replace(stmt.body, outer), stmt.init, stmt.alloc_buffers,
                                stmt.match_buffers, stmt.annotations)
        return stmt

    body = replace(func.body)
    if body.same_as(func.body):
        raise ValueError("no scheduled 'pad' block to rewrite")
    return func.with_body(body)


def strided_load(x, prefix: list, start, stride: int, lanes: int) -> "tirx.PrimExpr":
    """``lanes`` elements ``x[*prefix, start + stride*k]`` as contiguous vector loads and a
    shuffle: ``stride`` loads of ``lanes``, the last one ending at the last element read (a
    strided vector load otherwise compiles to scalar loads or a gather)."""
    from tvm import tirx

    def load(at):
        return tirx.BufferLoad(x, [*prefix, tirx.Ramp(at, 1, lanes)])

    if stride == 1:
        return load(start)
    last = stride * (lanes - 1) + 1 - lanes
    offsets = [m * lanes for m in range(stride - 1)] + [last]
    split = (stride - 1) * lanes
    picks = [e if e < split else split + e - last for e in range(0, stride * lanes, stride)]
    return tirx.Shuffle([load(start + o) for o in offsets],
                        [tirx.IntImm("int32", p) for p in picks])


def _seq(stmts: list) -> "tirx.Stmt":
    from tvm import tirx

    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)


def _pad_block(realize, s: "conv2d.ConvShape", lanes: int, x_row, nlead: int, phased: bool,
               fill: float, py_bound=None, flat: bool = False):
    """The opaque block that replaces the ``pad`` loop nest (see :func:`vector_pad`): every
    phase's rows, or with ``py_bound`` (the row phase, bound by an outer loop) that phase's."""
    from tvm import ir, s_tir, tirx

    (sh, sw), pl = s.stride if phased else (1, 1), s.padding[1]
    store = realize.block.body
    p = store.buffer
    lead = list(realize.iter_values[:nlead])
    hq, wq = (int(e) for e in p.shape[-2:])
    x = realize.block.reads[0].source
    outside = tirx.const(fill, p.dtype)
    i32 = "int32"

    def loop(name, extent, make):
        v = tirx.Var(name, i32)
        return tirx.For(v, tirx.IntImm(i32, 0), tirx.IntImm(i32, extent),
                        tirx.ForKind.SERIAL, make(v))

    def border(ppre, lo, hi):
        return [] if hi <= lo else [
            loop("jz", hi - lo, lambda j: tirx.BufferStore(p, outside, [*ppre, j + lo]))]

    def phase_row(xpre, base, ppre, px):
        jlo = min(wq, max(0, -(-(pl - px) // sw)))          # first column j with q >= 0
        jhi = max(jlo, min(wq, (s.w - 1 - px + pl) // sw + 1))   # first with q >= W
        out, j, width = border(ppre, 0, jlo), jlo, lanes
        while width >= 4:
            blocks = (jhi - j) // width
            if blocks:
                def copy(b, j=j, width=width):
                    j0 = b * width + j
                    return tirx.BufferStore(
                        p, strided_load(x, xpre, base + j0 * sw + (px - pl), sw, width),
                        [*ppre, tirx.Ramp(j0, 1, width)])
                out.append(loop("jv", blocks, copy))
                j += blocks * width
            width //= 2
        if jhi > j:
            out.append(loop("js", jhi - j, lambda v, j=j: tirx.BufferStore(
                p, tirx.BufferLoad(x, [*xpre, base + (v + j) * sw + (px - pl)]),
                [*ppre, v + j])))
        return out + border(ppre, jhi, wq)

    def row(py, i):
        prefix, r, *conv_row = x_row(lead, py, i)
        conv_row = conv_row[0] if conv_row else r

        def at(px):   # P's indices before the column
            return [*lead, py, px, i] if phased else [*lead, i]
        xpre, base = (list(prefix), r) if flat else ([*prefix, r], 0)
        inside = _seq([st for px in range(sw) for st in phase_row(xpre, base, at(px), px)])
        beyond = _seq([st for px in range(sw) for st in border(at(px), 0, wq)])
        inside_x = tirx.all(conv_row >= 0, conv_row < s.h) if flat else tirx.all(
            conv_row >= 0, conv_row < s.h, r >= 0, r < int(x.shape[-2]))
        return tirx.IfThenElse(inside_x, inside, beyond)

    body = (loop("py", sh, lambda py: loop("i", hq, lambda i: row(py, i))) if py_bound is None
            else loop("i", hq, lambda i: row(py_bound, i)))

    def region(buf, points):   # single points on the leading axes, whole trailing ones
        return tirx.BufferRegion(buf, [ir.Range.from_min_extent(v, 1) for v in points] + [
            ir.Range.from_min_extent(0, int(e)) for e in buf.shape[len(points):]])

    written = lead if py_bound is None else [*lead, py_bound]
    block = s_tir.SBlock([], [region(x, x_row(lead, 0, 0)[0])], [region(p, written)], "pad",
                         body)
    return s_tir.SBlockRealize([], True, block)
