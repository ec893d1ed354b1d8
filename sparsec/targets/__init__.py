"""Compilation targets: user-facing names -> TVM target dicts.

This module is imported by the CLI before any heavy work, so it must stay light: no tvm, onnx or
numpy at import time. Host CPU detection (which needs TVM's LLVM) happens lazily inside
:func:`resolve_target`.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=None)
def physical_cores() -> int:
    """Cores this process may run on, SMT siblings counted once (Linux sysfs topology; the
    logical CPU count where that is unreadable)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topo}/physical_package_id") as pkg, open(f"{topo}/core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _num_cores() -> int:
    return physical_cores()


def _host_cpu() -> str:
    """The LLVM name of this machine's CPU (e.g. ``znver3``), via TVM's LLVM host detection."""
    try:
        from tvm.target import codegen  # heavy: imported only when 'host' is asked for

        cpu = str(codegen.llvm_get_system_cpu())
    except Exception:  # noqa: BLE001 - detection is best effort; 'generic' always works
        return _FALLBACK_HOST_CPU
    return cpu or _FALLBACK_HOST_CPU


#: the keys of a TVM target sparsec keeps (a tag's target also carries derived features)
_LLVM_KEYS = ("kind", "mtriple", "mcpu", "mattr", "num-cores")


def _llvm_spec(name: str, target: dict, description: str) -> TargetSpec:
    """A spec for an LLVM CPU target given as a dict (raw JSON or a TVM tag's target)."""
    target = {k: target[k] for k in _LLVM_KEYS if k in target}
    if target.get("kind") != "llvm":
        raise UnknownTargetError(f"target '{name}' is a {target.get('kind')} target; sparsec "
                                 f"compiles for CPUs (llvm) so far")
    triple = str(target.get("mtriple", ""))
    if triple.startswith("aarch64"):
        target["mtriple"] = "aarch64-linux-gnu"
        target.setdefault("mattr", ["+neon"])
        target.setdefault("num-cores", 4)
        return TargetSpec(name, target, description, channel_multiple=4,
                          triple="aarch64-linux-gnu")
    if triple and not triple.startswith("x86_64"):
        raise UnknownTargetError(f"target '{name}': sparsec cross-compiles for aarch64 only, "
                                 f"not {triple}")
    target.setdefault("num-cores", _num_cores())
    return TargetSpec(name, target, description)


def device_tags(usable: bool = True) -> dict[str, dict]:
    """TVM's device tags with their targets: those sparsec compiles for (aarch64 CPUs, e.g.
    ``raspberry-pi/4b-aarch64``), or with ``usable=False`` all of them."""
    import json

    import tvm.target  # heavy: only when a tag is asked for

    out = {}
    for tag, target in tvm.target.list_tags().items():
        config = json.loads(str(target)) if not isinstance(target, dict) else target
        if not usable or (config.get("kind") == "llvm"
                          and str(config.get("mtriple", "")).startswith("aarch64")):
            out[str(tag)] = config
    return dict(sorted(out.items()))


def resolve_target(name: str) -> TargetSpec:
    """Map a user-facing target name to a :class:`TargetSpec`.

    - ``host``: this CPU (LLVM ``mcpu`` detected), all of its cores.
    - ``x86-avx2``: any x86-64 with AVX2+FMA (``mcpu=haswell``), portable across such machines.
    - ``llvm``: generic LLVM code for the host triple, no CPU-specific vector extensions.
    - ``aarch64`` / ``arm-neon``: 64-bit ARM Linux with NEON, cross-compiled (see ``triple``).
    - a TVM device tag of an aarch64 CPU, e.g. ``raspberry-pi/4b-aarch64`` (its ``mcpu`` and
      core count), or raw TVM target JSON such as ``{"kind": "llvm", "mcpu": "znver3"}``.
    """
    if name.lstrip().startswith("{"):
        import json

        try:
            target = json.loads(name)
            assert isinstance(target, dict)
        except (ValueError, AssertionError):
            raise UnknownTargetError(f"target '{name}' is not valid TVM target JSON") from None
        return _llvm_spec(name, target, "TVM target given as JSON")
    if "/" in name:
        tags = device_tags()
        if name not in tags and name in (every := device_tags(usable=False)):
            _llvm_spec(name, every[name], "")  # raises: a GPU, or a CPU we do not cross to
        if name not in tags:
            raise UnknownTargetError(f"unknown device tag '{name}' (aarch64 CPU tags TVM "
                                     f"knows: {', '.join(tags)})")
        tag = tags[name]
        return _llvm_spec(name, tag, f"{name}: {tag.get('mcpu', 'aarch64')}, "
                                     f"{tag.get('num-cores', 4)} cores (TVM device tag)")
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
    raise UnknownTargetError(f"unknown target '{name}' (known: {', '.join(KNOWN_TARGETS)}, "
                             f"TVM device tags and TVM target JSON: see `sparsec targets`)")


__all__ = ["CROSS_PACKAGES", "KNOWN_TARGETS", "TargetSpec", "UnknownTargetError", "device_tags",
           "resolve_target"]
