"""Compilation targets: user-facing names -> TVM target dicts.

This module is imported by the CLI before any heavy work, so it must stay light: no tvm, onnx or
numpy at import time. Host CPU detection (which needs TVM's LLVM) happens lazily inside
:func:`resolve_target`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

try:
    from sparsec.errors import UnknownTargetError
except ImportError:  # pragma: no cover - only while sparsec.errors is being written

    class UnknownTargetError(ValueError):  # type: ignore[no-redef]
        """A target name sparsec does not know."""


@dataclass(frozen=True)
class TargetSpec:
    """A resolved compilation target.

    ``tvm_target`` is the JSON dict handed to ``tvm.target.Target`` (TVM 0.27 refuses the old
    ``"llvm -mcpu=..."`` string form). ``channel_multiple`` is the default ``round_to`` of
    pruning for this target: kept channel counts that are multiples of it run measurably
    faster in our kernels (benchmarks/results/round_to.md).
    """

    name: str
    tvm_target: dict = field(hash=False)
    description: str
    channel_multiple: int = 8
    #: GNU triple of a cross target (its toolchain is ``{triple}-g++``); None: this machine
    triple: str | None = None

    @property
    def native(self) -> bool:
        """Whether libraries for this target run on this machine (and so can be validated)."""
        return self.triple is None

    def tool(self, name: str) -> str:
        """The toolchain program ``name`` (``g++``, ``ar``) for this target."""
        return f"{self.triple}-{name}" if self.triple else name


KNOWN_TARGETS: tuple[str, ...] = ("host", "x86-avx2", "llvm", "aarch64", "arm-neon")

#: Debian/Ubuntu package that provides each cross toolchain
CROSS_PACKAGES = {"aarch64-linux-gnu": "g++-aarch64-linux-gnu"}

_FALLBACK_HOST_CPU = "generic"


def _num_cores() -> int:
    return os.cpu_count() or 1


def _host_cpu() -> str:
    """The LLVM name of this machine's CPU (e.g. ``znver3``), via TVM's LLVM host detection."""
    try:
        from tvm.target import codegen  # heavy: imported only when 'host' is asked for

        cpu = str(codegen.llvm_get_system_cpu())
    except Exception:  # noqa: BLE001 - detection is best effort; 'generic' always works
        return _FALLBACK_HOST_CPU
    return cpu or _FALLBACK_HOST_CPU


def resolve_target(name: str) -> TargetSpec:
    """Map a user-facing target name to a :class:`TargetSpec`.

    - ``host``: this CPU (LLVM ``mcpu`` detected), all of its cores.
    - ``x86-avx2``: any x86-64 with AVX2+FMA (``mcpu=haswell``), portable across such machines.
    - ``llvm``: generic LLVM code for the host triple, no CPU-specific vector extensions.
    - ``aarch64`` / ``arm-neon``: 64-bit ARM Linux with NEON, cross-compiled (see ``triple``).
    """
    cores = _num_cores()
    if name == "host":
        cpu = _host_cpu()
        return TargetSpec(
            name="host",
            tvm_target={"kind": "llvm", "mcpu": cpu, "num-cores": cores},
            description=f"this machine's CPU ({cpu}, {cores} cores)",
        )
    if name == "x86-avx2":
        return TargetSpec(
            name="x86-avx2",
            tvm_target={"kind": "llvm", "mcpu": "haswell", "num-cores": cores},
            description=f"x86-64 with AVX2 and FMA (haswell or newer), {cores} cores",
        )
    if name == "llvm":
        return TargetSpec(
            name="llvm",
            tvm_target={"kind": "llvm", "num-cores": cores},
            description=f"generic LLVM code for the host triple, {cores} cores",
            channel_multiple=1,
        )
    if name in ("aarch64", "arm-neon"):
        # a 64-bit ARM Linux device with NEON (every ARMv8-A core: Raspberry Pi 4, Jetson, ...);
        # its core count is the device's, not ours: 4 is the common case, TVM_NUM_THREADS rules
        return TargetSpec(
            name=name,
            tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"],
                        "num-cores": 4},
            description="64-bit ARM Linux with NEON (cross-compiled with aarch64-linux-gnu-g++)",
            channel_multiple=4,
            triple="aarch64-linux-gnu",
        )
    raise UnknownTargetError(f"unknown target '{name}' (known: {', '.join(KNOWN_TARGETS)})")


__all__ = ["CROSS_PACKAGES", "KNOWN_TARGETS", "TargetSpec", "UnknownTargetError", "resolve_target"]
