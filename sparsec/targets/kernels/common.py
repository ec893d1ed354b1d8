"""Helpers shared by the hand-scheduled kernels."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm import s_tir, tirx

#: Attribute that DLight and our fallback pass read to leave a PrimFunc alone.
SCHEDULED_ATTR = "tirx.is_scheduled"
#: Attribute naming the sparsec strategy that produced a PrimFunc (counted for the manifest).
STRATEGY_ATTR = "sparsec.strategy"
#: ``op_pattern`` value of ``kOpaque``: FuseOps never fuses anything into an opaque function,
#: so a pre-scheduled kernel keeps its schedule (FuseTIR would otherwise merge bodies).
OPAQUE_PATTERN = 8

#: fp32 lanes of one AVX2 ymm register.
VEC_LANES = 8

#: the compile's precision: "fp32" (exact kernels only) or "bf16" (kernels that round their
#: inputs to bf16 may be chosen: AMX tiles, sparse tensor cores)
PRECISIONS = ("fp32", "bf16")
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


@dataclass(frozen=True)
class Activation:
    """The output activation a kernel applies in its write-back: clip bounds (``None`` leaves
    that side open; ReLU is ``low=0``, ReLU6 ``low=0, high=6``), then optionally GELU (erf
    form, with TOPI's vectorizable rational ``fast_erf``: libm's erf is scalar)."""

    low: float | None = None
    high: float | None = None
    gelu: bool = False

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
        return "+".join(parts)


RELU = Activation(low=0.0)


def pick_row_tile(extent: int, prefer: tuple[int, ...] = (4, 6, 5, 3, 2, 1)) -> int:
    """First tile size in ``prefer`` that divides ``extent`` (so the tile needs no predicate)."""
    for t in prefer:
        if t <= extent and extent % t == 0:
            return t
    return 1


def clip(v: "tirx.PrimExpr", act: "Activation | None", dtype: str) -> "tirx.PrimExpr":
    """``v`` clipped to the activation's bounds (unchanged without any)."""
    from tvm import tirx

    if act is not None and act.low is not None:
        v = tirx.max(v, tirx.const(act.low, dtype))
    if act is not None and act.high is not None:
        v = tirx.min(v, tirx.const(act.high, dtype))
    return v


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
