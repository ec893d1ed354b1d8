"""CUDA back end: static-shaped ONNX model -> shared library with CUDA kernels, compiled ahead
of time with nvcc.

Pipeline: from_onnx -> SparsecSafeTake -> TVM's CUDA pipeline (LegalizeOps, FuseOps, FuseTIR,
then DLight's default GPU schedules: Matmul, GEMV, Reduction, GeneralReduction, Fallback) ->
the VM's host code (LLVM, for the target's host CPU) and one CUDA C++ source for the kernels.

TVM's wheel is built without the CUDA runtime: its code generator keeps the kernels as CUDA
source inside the library, and a CUDA-enabled TVM runtime compiles that source when it loads
the library (``tvm_callback_cuda_compile``). sparsec compiles the same source here with nvcc
for the target's architecture (SASS, plus PTX for newer GPUs), so the package carries:

  kernels.cu        the CUDA source of every kernel (what the library holds)
  kernels.fatbin    nvcc's build of it for the target's ``arch``

and :func:`serve_fatbin` answers the runtime's compile callback with the fatbin when the
source is the one it was built from: a device needs no nvcc, and what runs is what was
checked here. ptxas' per-kernel register and spill counts go to the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sparsec.errors import ToolchainError
from sparsec.targets import TargetSpec

if TYPE_CHECKING:
    import onnx
    from tvm import ir

SOURCE = "kernels.cu"
FATBIN = "kernels.fatbin"
STRATEGY = "dlight"
#: where the CUDA toolkit puts nvcc when it is not on PATH
NVCC_DIRS = ("/usr/local/cuda/bin",)


def nvcc() -> str:
    """The nvcc program (``ToolchainError``, exit 11, when it is not installed)."""
    found = shutil.which("nvcc")
    if found is None:
        for root in NVCC_DIRS:
            if Path(root, "nvcc").is_file():
                return str(Path(root, "nvcc"))
        raise ToolchainError("CUDA targets need nvcc, which is not installed (the CUDA "
                             "toolkit: https://developer.nvidia.com/cuda-downloads, or "
                             "apt install nvidia-cuda-toolkit)")
    return found


def build_pipeline(target: "object", counts: dict[str, int]):
    """The Relax pipeline for a CUDA target (module docstring)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda

    from sparsec.targets.host import safe_take_pass

    @tvm.transform.module_pass(opt_level=0, name="SparsecRecordKernels")
    def record(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        from tvm import tirx

        counts[STRATEGY] = sum(isinstance(f, tirx.PrimFunc) for _, f in mod.functions_items())
        return mod

    @tvm.transform.module_pass(opt_level=0, name="SparsecCUDAPipeline")
    def _pipeline(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        with target:
            seq = tvm.transform.Sequential(
                [safe_take_pass(), relax.transform.DeadCodeElimination()]
                + cuda.library_dispatch_passes(target)
                + cuda.legalize_passes(target) + [record]
                + cuda.dataflow_lower_passes(target)
                + cuda.finalize_passes(target))
            return seq(mod)

    return _pipeline


def kernel_source(ex) -> str:
    """The CUDA source a built executable holds (its one CUDA module)."""
    def walk(module):
        if module.kind == "cuda":
            return module.inspect_source("")
        for sub in module.imports:
            found = walk(sub)
            if found is not None:
                return found
        return None

    source = walk(ex.mod)
    if not source:
        raise RuntimeError("the CUDA build holds no kernel source")   # a TVM change: a bug
    return source


def gencode(arch: str) -> list[str]:
    """nvcc flags for ``arch`` (``sm_80``, ``sm_90a``): its SASS, and its PTX so that newer
    GPUs can JIT it."""
    virtual = "compute_" + arch[len("sm_"):]
    return ["-gencode", f"arch={virtual},code=[{arch},{virtual}]"]


def compile_fatbin(source: str, arch: str, out: Path) -> dict[str, dict]:
    """Compile ``source`` with nvcc to a fatbin at ``out``; per kernel, ptxas' registers,
    spill bytes and static shared memory. A failure is a ``ToolchainError`` with nvcc's first
    error line (TVM generated code that nvcc refuses: a bug to report)."""
    with tempfile.TemporaryDirectory() as work:
        cu = Path(work) / SOURCE
        cu.write_text(source)
        proc = subprocess.run([nvcc(), "-fatbin", "-O3", *gencode(arch), "-Xptxas", "-v",
                               "-o", str(out), str(cu)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln] or [proc.stderr]
        raise ToolchainError(f"nvcc failed for {arch}: {lines[0].strip()[:300]}")
    return ptxas_resources(proc.stderr)


def fatbin_entries(data: bytes) -> list[str]:
    """What a fatbin holds, e.g. ``["sm_90 SASS", "compute_90 PTX"]``: its entries' kind
    (1 PTX, 2 ELF cubin) and architecture, read from the fatbin's headers (magic 0xBA55ED50,
    then per entry a header whose size says where the next begins)."""
    import struct

    magic, _version, header, size = struct.unpack_from("<IHHQ", data, 0)
    if magic != 0xBA55ED50:
        raise ValueError("not a CUDA fatbin")
    out, offset = [], header
    while offset < header + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, offset)
        arch = struct.unpack_from("<I", data, offset + 28)[0]
        out.append({1: f"compute_{arch} PTX", 2: f"sm_{arch} SASS"}.get(kind, f"kind {kind}"))
        offset += entry_header + payload
    return out


def ptxas_resources(log: str) -> dict[str, dict]:
    """ptxas -v's report, per kernel: ``registers``, ``spill_bytes`` (stores + loads) and
    ``shared_bytes`` (static shared memory) of the SASS build."""
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line):
            current = kernels.setdefault(m.group(1), {"registers": 0, "spill_bytes": 0,
                                                      "shared_bytes": 0})
        elif current is None:
            continue
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current["shared_bytes"] = int(s.group(1))
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current["spill_bytes"] = int(m.group(1)) + int(m.group(2))
    return kernels


def compile_onnx(model: "onnx.ModelProto", target: TargetSpec, lib_path: str | Path,
                 log: Callable[[str], None] = print) -> dict:
    """Compile ``model`` for a CUDA target: the library at ``lib_path`` and, beside it,
    ``kernels.cu`` and ``kernels.fatbin`` (module docstring). Returns the manifest's facts,
    as :func:`sparsec.targets.host.compile_onnx` does, with ``cuda``: arch, nvcc's version,
    the source's sha256 and ptxas' per-kernel resources."""
    import tvm
    from tvm import relax

    from sparsec.targets.host import (
        _atomic_path,
        graph_input_names,
        import_onnx,
        native_stderr_to,
    )

    tool = nvcc()   # before any work: a missing toolkit is the user's first error
    tvm_target = tvm.target.Target(dict(target.tvm_target))
    arch = str(target.tvm_target["arch"])
    log(f"importing ONNX graph ({len(model.graph.node)} nodes) into Relax")
    mod = import_onnx(model)
    counts: dict[str, int] = {}
    log(f"compiling for {target.name} ({target.description})")
    with native_stderr_to(log), tvm_target, compile_callback(arch):
        lowered = build_pipeline(tvm_target, counts)(mod)
        ex = relax.build(lowered, tvm_target, relax_pipeline=None)
    source = kernel_source(ex)
    fcompile = None
    if not target.native:
        from tvm.support import cc

        fcompile = cc.cross_compiler(target.tool("g++"))
    lib_path = Path(lib_path)
    with _atomic_path(lib_path) as tmp:
        ex.export_library(str(tmp), fcompile=fcompile)
    with _atomic_path(lib_path.parent / SOURCE) as tmp:
        tmp.write_text(source)
        tmp.chmod(0o644)
    log(f"nvcc: compiling {counts.get(STRATEGY, 0)} kernels for {arch}")
    with _atomic_path(lib_path.parent / FATBIN) as tmp:
        resources = compile_fatbin(source, arch, tmp)
        tmp.chmod(0o644)
    contents = fatbin_entries((lib_path.parent / FATBIN).read_bytes())
    spilling = sorted(k for k, r in resources.items() if r["spill_bytes"])
    registers = max((r["registers"] for r in resources.values()), default=0)
    log(f"library {lib_path.stat().st_size:,} bytes, fatbin "
        f"{(lib_path.parent / FATBIN).stat().st_size:,} bytes ({', '.join(contents)}); "
        f"{len(resources)} kernels, max {registers} registers, {len(spilling)} spilling")
    return {
        "tvm_version": tvm.__version__,
        "target": dict(target.tvm_target),
        "kernels": counts,
        "decisions": [],
        "inputs": graph_input_names(model),
        "outputs": [o.name for o in model.graph.output],
        "cuda": {"arch": arch, "nvcc": nvcc_version(tool), "source": SOURCE, "fatbin": FATBIN,
                 "fatbin_contents": contents,
                 "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
                 "kernels": resources},
    }


def nvcc_version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "unknown"


@contextlib.contextmanager
def compile_callback(arch: str, prebuilt: dict[str, bytes] | None = None):
    """Within the block TVM compiles CUDA source (``tvm_callback_cuda_compile``: on a machine
    with a GPU the code generator and the loader both call it) with nvcc for ``arch``, or,
    for a source whose sha256 is in ``prebuilt``, answers with that binary."""
    import tvm.support.nvcc  # noqa: F401 - registers TVM's own callback, restored after us
    import tvm_ffi

    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_source(code, *_target) -> bytes:
        code = str(code)
        digest = hashlib.sha256(code.encode()).hexdigest()
        if prebuilt and digest in prebuilt:
            return prebuilt[digest]
        with tempfile.TemporaryDirectory() as work:
            out = Path(work) / FATBIN
            compile_fatbin(code, arch, out)
            return out.read_bytes()

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_source, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


def serve_fatbin(package_dir: Path, cuda: dict):
    """The :func:`compile_callback` a package's library loads under (``cuda``: the
    manifest's ``compile.cuda``): its fatbin for its source, nvcc for anything else."""
    fatbin = (Path(package_dir) / cuda["fatbin"]).read_bytes()
    return compile_callback(cuda["arch"], {cuda["source_sha256"]: fatbin})
