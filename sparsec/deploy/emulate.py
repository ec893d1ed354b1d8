"""Run a cross-compiled package on this machine under user-mode emulation (qemu), through the
same C API a device program uses, so that `compile` and `validate` check it against ONNX
Runtime like a native one.

A small C program (``src/sparsec_run_raw.c`` with the model's header) is built with the
target's compiler against the target's TVM runtime (``sparsec runtime``, cached): it loads
``model.so``, reads the inputs as raw bytes, runs the model once and writes the outputs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sparsec.deploy import SOURCE_DIR
from sparsec.deploy.runtime import MARKER, PARTS, build_runtime, cache_dir
from sparsec.errors import SparsecError, ToolchainError
from sparsec.targets import TargetSpec

#: user-mode emulator and the target's library root (Debian's cross packages) per triple
EMULATORS = {"aarch64-linux-gnu": ("qemu-aarch64", "/usr/aarch64-linux-gnu")}



def emulator(spec: TargetSpec) -> list[str] | None:
    """The command prefix that runs the target's programs here, or None."""
    if spec.native or spec.triple not in EMULATORS:
        return None
    program, root = EMULATORS[spec.triple]
    exe = shutil.which(program)
    return [exe, "-L", root] if exe and Path(root).is_dir() else None


def cached_runtime(spec: TargetSpec, log: Callable[[str], None]) -> Path:
    """``sparsec runtime`` for ``spec`` in the user cache, keyed by the TVM versions, with the
    C API compiled once (``capi.o``)."""
    versions = "-".join(metadata.version(dist) for dist, _, _ in PARTS)
    api = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(SOURCE_DIR.iterdir())))
    key = f"{spec.triple}-{versions}-{api.hexdigest()[:12]}"
    root = cache_dir().parent / "runtimes" / key
    if not (root / MARKER).is_file():
        build_runtime(spec.name, root, log=log)
    if not (root / "capi.o").is_file():
        tmp = root / f".capi.{os.getpid()}.o"
        _tool(spec, "g++", ["-std=c++17", "-O2", "-fPIC", "-c",
                            str(root / "src" / "sparsec_runtime.cc"), "-I",
                            str(root / "include"), "-o", str(tmp)])
        os.replace(tmp, root / "capi.o")
    return root


def _tool(spec: TargetSpec, tool: str, args: Sequence[str]) -> None:
    proc = subprocess.run([spec.tool(tool), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["failed"])[0]
        raise ToolchainError(f"{spec.tool(tool)} failed: {first}")


class EmulatedRunner:
    """``host.Runner``'s interface for a cross-compiled package: ``run(feeds)`` -> outputs."""

    def __init__(self, spec: TargetSpec, package: Path, name: str, inputs: list[dict],
                 outputs: list[dict], log: Callable[[str], None] = lambda msg: None) -> None:
        self.command = emulator(spec)
        if self.command is None:
            program = EMULATORS.get(spec.triple or "", ("an emulator",))[0]
            raise ToolchainError(f"cannot run {spec.name} code here: {program} is not "
                                 f"installed (Debian/Ubuntu: apt install qemu-user)")
        self.package, self.inputs, self.outputs = Path(package), inputs, outputs
        self._dir = tempfile.TemporaryDirectory(prefix="sparsec-emulate-")
        work = Path(self._dir.name)
        runtime = cached_runtime(spec, log)
        self.exe = work / "run"
        _tool(spec, "gcc", ["-std=c99", "-O1", "-c", str(runtime / "src" / "sparsec_run_raw.c"),
                            f'-DSPARSEC_MODEL_HEADER="{name}.h"',
                            f"-DSPARSEC_MODEL_SPEC={name}_spec", "-I", str(runtime / "include"),
                            "-I", str(self.package), "-o", str(work / "run.o")])
        _tool(spec, "g++", [str(work / "run.o"), str(runtime / "capi.o"), "-L",
                            str(runtime / "lib"), "-ltvm_runtime", "-ltvm_ffi", "-ldl",
                            f"-Wl,-rpath,{runtime / 'lib'}", "-o", str(self.exe)])
        self.via = Path(self.command[0]).name

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        work = Path(self._dir.name)
        (work / "in.bin").write_bytes(b"".join(
            np.ascontiguousarray(feeds[s["name"]], np.dtype(s["dtype"]).newbyteorder("<")
                                 ).tobytes() for s in self.inputs))
        proc = subprocess.run([*self.command, str(self.exe), str(self.package / "model.so"),
                               str(work / "in.bin"), str(work / "out.bin")],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
            raise SparsecError(f"the model failed under {self.via}: {why}")
        data = (work / "out.bin").read_bytes()
        out, at = [], 0
        for s in self.outputs:
            dtype = np.dtype(s["dtype"]).newbyteorder("<")
            n = int(np.prod(s["shape"], dtype=np.int64))
            out.append(np.frombuffer(data, dtype, n, at).reshape(s["shape"]).astype(s["dtype"]))
            at += n * dtype.itemsize
        return out
