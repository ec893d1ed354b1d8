"""Compilation targets: user-facing names -> TVM target dicts.

This module is imported by the CLI before any heavy work, so it must stay light: no tvm, onnx or
numpy at import time. Host CPU detection (which needs TVM's LLVM) happens lazily inside
:func:`resolve_target`; :func:`listing` (``sparsec targets``) needs no TVM at all.
"""

from __future__ import annotations

import functools
import json
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
    #: where the kernels run: ``cpu``, or ``cuda`` (the host code then only launches them)
    device: str = "cpu"
    #: the default precision of its kernels: "fp32", "tf32" (CUDA targets: matmuls by a
    #: weight on tensor cores, as ONNX Runtime and TensorRT default to) or "bf16" (kernels
    #: that round their inputs to bf16 may be chosen: AMX tiles). ``x86-amx`` is the one bf16
    #: target; any other, a CPU with AMX included, takes bf16 only when asked
    precision: str = "fp32"

    @property
    def native(self) -> bool:
        """Whether the host code is built for this machine's architecture (no cross
        toolchain); whether it can also run here is :attr:`runs_here`."""
        return self.triple is None

    @property
    def runs_here(self) -> bool:
        """Whether libraries for this target run on this machine (and so can be validated):
        the host architecture, the CPU features the code needs, and the device."""
        if not self.native or not self.cpu_flags <= cpu_flags():
            return False
        return self.device == "cpu" or (self.device == "cuda" and cuda_available())

    @property
    def amx_emulated_here(self) -> bool:
        """Whether this x86-64 target's AMX tile kernels cannot run on this CPU, so that its
        reference check runs them with their tile ops emulated (``kernels/amx.py``)."""
        return (self.native and self.device == "cpu" and "amx_bf16" in self.cpu_flags
                and not self.runs_here)

    @property
    def why_not_here(self) -> str:
        """Why :attr:`runs_here` is false, in words ('' when it is true)."""
        if not self.native:
            return f"its code is for {self.triple}"
        missing = sorted(self.cpu_flags - cpu_flags())
        if missing:
            return f"this CPU lacks {', '.join(missing)}"
        if self.device == "cuda" and not cuda_available():
            return "this machine has no CUDA device"
        return ""

    @functools.cached_property
    def cpu_flags(self) -> frozenset[str]:
        """The instruction-set extensions the host code may use (LLVM's features of the
        target's ``mcpu`` / ``mattr``), as ``/proc/cpuinfo`` names them: ``avx512f``, ..."""
        host = self.tvm_target.get("host", self.tvm_target)
        if self.triple is not None or not (host.get("mcpu") or host.get("mattr")):
            return frozenset()
        if set(host) <= {"kind", "mcpu", "num-cores"} and host.get("mcpu") in MCPU_FLAGS:
            return MCPU_FLAGS[host["mcpu"]]
        have = llvm_features(json.dumps({k: v for k, v in host.items() if k != "num-cores"},
                                        sort_keys=True))
        return frozenset(flag for feature, flag in _X86_FLAGS.items() if feature in have)

    def tool(self, name: str) -> str:
        """The toolchain program ``name`` (``g++``, ``ar``) for this target."""
        return f"{self.triple}-{name}" if self.triple else name


#: LLVM's names of the x86 extensions whose absence makes code fault -> /proc/cpuinfo's names.
#: An ``mcpu`` lets LLVM use any of its CPU's features; these are the ones that tell the CPUs
#: sparsec targets apart (Sapphire Rapids' AVX512-FP16 and Granite Rapids' AMX-FP16 included: a
#: package for Granite Rapids does not run on Emerald Rapids). Not every feature LLVM knows:
#: a VM that hides one from the guest would otherwise make its own host target "foreign".
_X86_FLAGS = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw",
              "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni",
              "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "amx-tile": "amx_tile",
              "amx-bf16": "amx_bf16", "amx-int8": "amx_int8", "amx-fp16": "amx_fp16"}

#: the flags of the named x86 targets' CPUs, as :attr:`TargetSpec.cpu_flags` reads them from
#: LLVM (which needs TVM, seconds to import): ``sparsec targets`` says what runs here without
#: it. tests/test_targets.py checks them against LLVM's features.
MCPU_FLAGS: dict[str, frozenset[str]] = {
    "haswell": frozenset({"avx2", "fma"}),
    "skylake-avx512": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}),
    "sapphirerapids": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                                 "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                                 "amx_bf16", "amx_int8"}),
}

KNOWN_TARGETS: tuple[str, ...] = ("host", "x86-avx2", "x86-avx512", "x86-amx", "llvm", "aarch64",
                                   "arm-neon", "cuda", "cuda-sm80", "cuda-sm90")

#: GPU architecture of the plain ``cuda`` target where no GPU is present to ask: Ampere, the
#: oldest with sparse tensor cores (``mma.sp``) and the oldest nvcc 13 still fully supports
DEFAULT_CUDA_ARCH = "sm_80"

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


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux reports them (``avx2``, ``avx512f``, ``amx_tile``);
    empty where ``/proc/cpuinfo`` is unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def llvm_features(target_json: str) -> frozenset[str]:
    """LLVM's CPU features (``avx2``, ``avx512f``, ``amx-tile``, ...) of an LLVM target given
    as TVM's JSON text."""
    import tvm
    from tvm.target import codegen

    return frozenset(str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(
        target_json)))


def _gpu_device_nodes() -> bool:
    """Whether the OS shows an NVIDIA GPU to this process at all: the driver's device files
    (``/dev/nvidia0``, ...), or WSL2's GPU device. Without them no CUDA runtime finds one."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """Whether a CUDA device is present (asked through TVM's runtime: no device, no driver or
    a TVM runtime without CUDA all say no). Where the OS shows no NVIDIA device the answer is
    no without importing TVM."""
    if not _gpu_device_nodes():
        return False
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - any failure to reach a GPU means there is none
        return False


def _cpu_model() -> str:
    """This CPU's model name as ``/proc/cpuinfo`` gives it ('' where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return ""


def listing() -> list[dict]:
    """The named targets as ``sparsec targets`` shows them: name, the TVM target's main keys,
    whether it runs here (and why not) and what it is, without importing TVM. Everything is
    what :func:`resolve_target` gives, except ``host``'s LLVM ``mcpu``, which only TVM's LLVM
    detects: it is shown as this CPU's model name (LLVM's name for it is in a compile's log
    and its package's manifest)."""
    rows = []
    for name in KNOWN_TARGETS:
        if name == "host":
            cores = _num_cores()
            model = _cpu_model() or "this CPU"
            rows.append({"name": name, "tvm": {"kind": "llvm", "mcpu": f"<{model}>"},
                         "runs_here": True, "why_not": "",
                         "description": f"this machine's CPU ({model}, {cores} cores)"})
            continue
        spec = resolve_target(name)
        rows.append({"name": name,
                     "tvm": {k: v for k, v in spec.tvm_target.items()
                             if k in ("kind", "mcpu", "mtriple", "mattr", "arch")},
                     "runs_here": spec.runs_here, "why_not": spec.why_not_here,
                     "description": spec.description})
    return rows


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


def _spec_from_dict(name: str, target: dict, description: str) -> TargetSpec:
    """A spec for a target given as a dict (raw JSON or a TVM tag's target): an LLVM CPU, or
    a CUDA GPU (:func:`_cuda_spec`)."""
    if target.get("kind") == "cuda":
        return _cuda_spec(name, target, description)
    target = {k: target[k] for k in _LLVM_KEYS if k in target}
    if target.get("kind") != "llvm":
        raise UnknownTargetError(f"target '{name}' is a {target.get('kind')} target; sparsec "
                                 f"compiles for CPUs (llvm) and NVIDIA GPUs (cuda)")
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


#: the keys of a TVM cuda target sparsec keeps, with the defaults of every NVIDIA GPU since
#: Volta (TVM's own tags say the same); ``arch`` is the one that matters to nvcc
_CUDA_DEFAULTS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                  "thread_warp_size": 32}
#: the oldest GPU architecture nvcc 13 compiles for
MIN_CUDA_ARCH = 75


def _cuda_spec(name: str, target: dict, description: str) -> TargetSpec:
    """A spec for an NVIDIA GPU: the kernels are CUDA (compiled with nvcc), the host code
    that launches them is LLVM code for ``target["host"]`` (this machine's architecture when
    absent: generic x86-64; a Jetson's tag names its aarch64 CPU, which makes it a cross
    target)."""
    import re

    arch = str(target.get("arch", DEFAULT_CUDA_ARCH))
    match = re.fullmatch(r"sm_(\d+)[af]?", arch)
    if match is None or int(match.group(1)) < MIN_CUDA_ARCH:
        raise UnknownTargetError(f"target '{name}': CUDA arch '{arch}' is not supported (nvcc "
                                 f"13 compiles for sm_{MIN_CUDA_ARCH} and newer, e.g. sm_80)")
    out = {"kind": "cuda", "arch": arch}
    out.update({k: target.get(k, v) for k, v in _CUDA_DEFAULTS.items()})
    host = target.get("host") or {"kind": "llvm"}
    host = _spec_from_dict(name, json_dict(host), "")
    out["host"] = host.tvm_target
    return TargetSpec(name, out, description or f"NVIDIA GPU {arch} (CUDA, nvcc)",
                      channel_multiple=8, triple=host.triple, device="cuda", precision="tf32")


def json_dict(value) -> dict:
    """A TVM target's JSON (a dict, a ``Target`` or its JSON string) as a plain dict."""
    import json

    return value if isinstance(value, dict) else json.loads(str(value))


def device_tags(usable: bool = True) -> dict[str, dict]:
    """TVM's device tags with their targets: those sparsec compiles for (aarch64 CPUs, e.g.
    ``raspberry-pi/4b-aarch64``, and NVIDIA GPUs from sm_75 on, e.g.
    ``nvidia/jetson-agx-orin-64gb``), or with ``usable=False`` all of them."""
    import tvm.target  # heavy: only when a tag is asked for

    out = {}
    for tag, target in tvm.target.list_tags().items():
        config = json_dict(target)
        if not usable:
            out[str(tag)] = config
            continue
        try:
            _spec_from_dict(str(tag), config, "")
        except UnknownTargetError:
            continue
        out[str(tag)] = config
    return dict(sorted(out.items()))


def _local_cuda_arch() -> str | None:
    """``sm_XY`` of this machine's first GPU, or None without one."""
    if not cuda_available():
        return None
    import tvm

    return "sm_" + str(tvm.cuda(0).compute_version).replace(".", "")


def resolve_target(name: str) -> TargetSpec:
    """Map a user-facing target name to a :class:`TargetSpec`.

    - ``host``: this CPU (LLVM ``mcpu`` detected), all of its cores.
    - ``x86-avx2``: any x86-64 with AVX2+FMA (``mcpu=haswell``), portable across such machines.
    - ``x86-avx512``: any x86-64 with AVX-512 F/BW/DQ/VL (``mcpu=skylake-avx512``).
    - ``x86-amx``: Intel AMX (``mcpu=sapphirerapids``): matmuls by constant weights run on
      bf16 tiles (``kernels/amx.py``; lossy: bf16 inputs, fp32 sums), the rest as AVX-512.
    - ``llvm``: generic LLVM code for the host triple, no CPU-specific vector extensions.
    - ``cuda``: this machine's NVIDIA GPU (``sm_80`` without one); ``cuda-sm80`` and
      ``cuda-sm90`` name the architecture. Kernels are CUDA compiled with nvcc.
    - ``aarch64`` / ``arm-neon``: 64-bit ARM Linux with NEON, cross-compiled (see ``triple``).
    - a TVM device tag of an aarch64 CPU, e.g. ``raspberry-pi/4b-aarch64`` (its ``mcpu`` and
      core count) or of an NVIDIA GPU, e.g. ``nvidia/jetson-agx-orin-64gb`` (sm_87 with an
      aarch64 host), or raw TVM target JSON such as ``{"kind": "llvm", "mcpu": "znver3"}`` or
      ``{"kind": "cuda", "arch": "sm_86"}``.
    """
    if name.lstrip().startswith("{"):
        import json

        try:
            target = json.loads(name)
            assert isinstance(target, dict)
        except (ValueError, AssertionError):
            raise UnknownTargetError(f"target '{name}' is not valid TVM target JSON") from None
        return _spec_from_dict(name, target, "TVM target given as JSON")
    if "/" in name:
        tags = device_tags()
        if name not in tags and name in (every := device_tags(usable=False)):
            _spec_from_dict(name, every[name], "")  # raises: an old GPU, a CPU we cannot reach
        if name not in tags:
            raise UnknownTargetError(f"unknown device tag '{name}' (`sparsec targets` lists "
                                     f"the {len(tags)} tags sparsec compiles for)")
        tag = tags[name]
        if tag.get("kind") == "cuda":
            return _spec_from_dict(name, tag, f"{name}: NVIDIA {tag.get('arch')} (TVM device tag)")
        return _spec_from_dict(name, tag, f"{name}: {tag.get('mcpu', 'aarch64')}, "
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
    if name == "x86-avx512":
        return TargetSpec(
            name="x86-avx512",
            tvm_target={"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": cores},
            description=f"x86-64 with AVX-512 F/BW/DQ/VL (Skylake-SP, Ice Lake, Sapphire Rapids, "
                        f"Zen 4 or newer), {cores} cores",
        )
    if name == "x86-amx":
        return TargetSpec(
            name="x86-amx",
            tvm_target={"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": cores},
            description=f"x86-64 with AMX bf16 tiles (Sapphire Rapids or newer): matmuls and "
                        f"convs in bf16 with fp32 sums, the rest AVX-512, {cores} cores",
            channel_multiple=16,
            precision="bf16",
        )
    if name == "cuda":
        arch = _local_cuda_arch()
        where = "this machine's GPU" if arch else f"no GPU here: {DEFAULT_CUDA_ARCH}"
        return _cuda_spec(name, {"kind": "cuda", "arch": arch or DEFAULT_CUDA_ARCH},
                          f"NVIDIA GPU ({where}), CUDA kernels compiled with nvcc")
    if name in ("cuda-sm80", "cuda-sm90"):
        arch = "sm_" + name[len("cuda-sm"):]
        gpus = {"sm_80": "Ampere: A100, A30", "sm_90": "Hopper: H100, H200"}[arch]
        return _cuda_spec(name, {"kind": "cuda", "arch": arch},
                          f"NVIDIA {arch} ({gpus}), CUDA kernels compiled with nvcc")
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


__all__ = ["CROSS_PACKAGES", "KNOWN_TARGETS", "TargetSpec", "UnknownTargetError", "cpu_flags",
           "cuda_available", "device_tags", "listing", "resolve_target"]
