"""The CUDA toolkit as the back ends use it: find nvcc, compile CUDA source to a fatbin (SASS
for the target's ``arch`` plus PTX), read ptxas' per-kernel resources and a fatbin's entries,
and answer TVM's ``tvm_callback_cuda_compile`` (with nvcc, or with a package's prebuilt fatbin
for the source it was built from, so a device needs no nvcc).

It imports no back end: the CUDA back end (``cuda.py``) compiles with it, and the runner
(``backend.py``) loads a CUDA package's library under :func:`serve_fatbin`.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from sparsec.errors import ToolchainError

#: the files a CUDA package carries beside its library: the kernels' source and nvcc's build
SOURCE = "kernels.cu"
FATBIN = "kernels.fatbin"
#: the kernels built for the CPU, threads serialized (``cuda.emulation_module``), no weights
TWIN = "cpu_twin.so"
#: where the CUDA toolkit puts nvcc when it is not on PATH
NVCC_DIRS = ("/usr/local/cuda/bin",)
#: where NVIDIA's pip wheels put nvcc inside a site-packages directory: ``nvidia-cuda-nvcc``
#: (CUDA 13 and later, all toolkit wheels under ``nvidia/cu13``) and ``nvidia-cuda-nvcc-cu12``
PIP_NVCC = ("nvidia/cu13/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc")
#: what the missing-nvcc error tells the user to install
PIP_PACKAGES = "pip install nvidia-cuda-nvcc (CUDA 13) or nvidia-cuda-nvcc-cu12"


def _site_dirs() -> list[str]:
    """The directories Python imports packages from (where pip puts wheels), in order."""
    import site
    import sys

    dirs = list(sys.path)
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:      # a virtualenv's old site module
        pass
    return list(dict.fromkeys(d for d in dirs if d))


def find_nvcc() -> str | None:
    """nvcc on PATH, in ``$CUDA_HOME/bin`` (or ``$CUDA_PATH``), in :data:`NVCC_DIRS`, or in a
    pip-installed toolkit (:data:`PIP_NVCC` under any site-packages directory); ``None``."""
    import os

    found = shutil.which("nvcc")
    if found is not None:
        return found
    homes = [os.environ[k] + "/bin" for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    candidates = [Path(d, "nvcc") for d in (*homes, *NVCC_DIRS)]
    candidates += [Path(d, rel) for d in _site_dirs() for rel in PIP_NVCC]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def nvcc() -> str:
    """The nvcc program (``ToolchainError``, exit 11, when it is not installed)."""
    found = find_nvcc()
    if found is None:
        raise ToolchainError(f"CUDA targets need nvcc, which is not installed ({PIP_PACKAGES}; "
                             f"or the CUDA toolkit: https://developer.nvidia.com/cuda-downloads, "
                             f"apt install nvidia-cuda-toolkit)")
    return found


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
