"""Helpers shared by the hand-scheduled kernels."""

from __future__ import annotations

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

#: Clip bounds ``(low, high)`` of the output activation a kernel may apply in its write-back;
#: ``None`` leaves that side open. ReLU is ``(0, None)``, ReLU6 ``(0, 6)``.
Clip = tuple[float | None, float | None]
RELU: Clip = (0.0, None)


def pick_row_tile(extent: int, prefer: tuple[int, ...] = (4, 6, 5, 3, 2, 1)) -> int:
    """First tile size in ``prefer`` that divides ``extent`` (so the tile needs no predicate)."""
    for t in prefer:
        if t <= extent and extent % t == 0:
            return t
    return 1


def epilogue_func(inputs: list, value, shape: tuple[int, ...], dtype: str, bias=None,
                  residual=None, clip: Clip | None = None, channel_axis: int = 1
                  ) -> "tirx.PrimFunc":
    """The kernel's output stage ``Y = clip(value + bias[channel] + residual)`` (each part
    optional; ``clip`` bounds as in :data:`RELU`) and the unscheduled PrimFunc over
    ``inputs + [bias] + [residual] + [Y]``; ``value(*index)`` reads the accumulator for an
    output index."""
    from tvm import te, tirx

    def compute(*index):
        v = value(*index)
        if bias is not None:
            v = v + bias[index[channel_axis]]
        if residual is not None:
            v = v + residual[index]
        if clip is not None and clip[0] is not None:
            v = tirx.max(v, tirx.const(clip[0], dtype))
        if clip is not None and clip[1] is not None:
            v = tirx.min(v, tirx.const(clip[1], dtype))
        return v

    y = te.compute(shape, compute, name="Y")
    args = list(inputs) + [t for t in (bias, residual) if t is not None] + [y]
    return te.create_prim_func(args)


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
