"""``sparsec runtime``: the TVM runtime a program needs to run a package, for one target.

    DIR/lib/libtvm_runtime.so, libtvm_ffi.so   the runtime (about 5 MB); for a CUDA target
                                               also libtvm_runtime_cuda.so
    DIR/include/                               TVM runtime + tvm-ffi + DLPack headers, sparsec.h
    DIR/src/sparsec_runtime.cc                 the C API (compiled into the program)
    DIR/runtime.json                           versions, where the libraries came from, hashes

For this machine the libraries are the installed apache-tvm / apache-tvm-ffi wheels' own. For a
cross target they are the same releases' manylinux wheels for that architecture (what `pip
install apache-tvm` installs on the device), fetched with pip, or taken from ``wheel_dir``. The
wheels are release builds, made by the TVM project; building the runtime from the sources in the
wheel is not possible (they lack ``tvm/support`` headers the runtime includes), and the versions
match the compiler that wrote the package by construction.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable

from sparsec.deploy import INCLUDE_DIR, SOURCE_DIR
from sparsec.errors import ToolchainError
from sparsec.package import check_writable_dir, sha256, staging_dir, write_json
from sparsec.targets import TargetSpec, resolve_target

MARKER = "runtime.json"
FORMAT = "sparsec-runtime/1"
#: pip platform tag of the manylinux wheels for each cross triple
PLATFORMS = {"aarch64-linux-gnu": "manylinux_2_28_aarch64"}
#: (distribution, library inside its wheel, header directory inside its wheel)
PARTS = (("apache-tvm", "tvm/lib/libtvm_runtime.so", "tvm/include"),
         ("apache-tvm-ffi", "tvm_ffi/lib/libtvm_ffi.so", "tvm_ffi/include"))
#: the apache-tvm wheel's CUDA runtime sidecar, shipped for CUDA targets
CUDA_PART = "tvm/lib/libtvm_runtime_cuda.so"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsec" / "wheels"


def _wheels(spec: TargetSpec, wheel_dir: Path | None, log: Callable[[str], None]
            ) -> dict[str, Path]:
    """The target's wheel of each part: from ``wheel_dir``, the cache, or downloaded by pip."""
    platform = PLATFORMS[spec.triple]
    pins = {dist: metadata.version(dist) for dist, _, _ in PARTS}
    where = wheel_dir or cache_dir()

    def find() -> dict[str, Path]:
        found = {}
        for dist, version in pins.items():
            stem = f"{dist.replace('-', '_')}-{version}-"
            hits = sorted(p for p in where.glob(f"{stem}*.whl")
                          if platform.rsplit("_", 1)[-1] in p.name)
            if hits:
                found[dist] = hits[-1]
        return found

    found = find() if where.is_dir() else {}
    missing = [f"{d}=={v}" for d, v in pins.items() if d not in found]
    if missing and wheel_dir is not None:
        raise ToolchainError(f"{wheel_dir} has no {platform} wheel of {', '.join(missing)}")
    if missing:
        where.mkdir(parents=True, exist_ok=True)
        log(f"downloading {', '.join(missing)} for {platform} into {where}")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--platform", platform,
               "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
               "--dest", str(where), *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ToolchainError(f"cannot download the {spec.name} TVM runtime "
                                 f"({', '.join(missing)}): {last}; download those wheels where "
                                 f"there is a network and pass --wheel-dir")
        found = find()
    return found


def build_runtime(target: str, out_dir: str | os.PathLike, *, wheel_dir: str | None = None,
                  log: Callable[[str], None] = lambda msg: None) -> dict:
    """Write the runtime directory for ``target`` (see the module docstring); returns its
    ``runtime.json``."""
    spec = resolve_target(target)
    out = check_writable_dir(out_dir, MARKER, "sparsec runtime")
    with staging_dir(out) as tmp:
        (tmp / "lib").mkdir()
        sources = {}
        if spec.native:
            import tvm
            import tvm_ffi

            roots = {"apache-tvm": Path(tvm.__file__).parent.parent,
                     "apache-tvm-ffi": Path(tvm_ffi.__file__).parent.parent}
            for dist, lib, include in PARTS:
                shutil.copyfile(roots[dist] / lib, tmp / "lib" / Path(lib).name)
                shutil.copytree(roots[dist] / include, tmp / "include", dirs_exist_ok=True)
                sources[dist] = {"installed": metadata.version(dist)}
            if spec.device == "cuda":   # the CUDA module loader (needs the CUDA driver to load)
                cuda = roots["apache-tvm"] / CUDA_PART
                shutil.copyfile(cuda, tmp / "lib" / cuda.name)
        else:
            wheels = _wheels(spec, Path(wheel_dir) if wheel_dir else None, log)
            for dist, lib, include in PARTS:
                wheel = wheels[dist]
                with zipfile.ZipFile(wheel) as z:
                    (tmp / "lib" / Path(lib).name).write_bytes(z.read(lib))
                    if dist == "apache-tvm" and spec.device == "cuda":
                        (tmp / "lib" / Path(CUDA_PART).name).write_bytes(z.read(CUDA_PART))
                    for name in sorted(z.namelist()):
                        if name.startswith(include + "/") and not name.endswith("/"):
                            dest = tmp / "include" / name[len(include) + 1:]
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            dest.write_bytes(z.read(name))
                sources[dist] = {"wheel": wheel.name, "sha256": sha256(wheel)}
        shutil.copyfile(INCLUDE_DIR / "sparsec.h", tmp / "include" / "sparsec.h")
        shutil.copytree(SOURCE_DIR, tmp / "src")
        info = {
            "format": FORMAT,
            "target": {"name": spec.name, "triple": spec.triple},
            "tvm": {dist: metadata.version(dist) for dist, _, _ in PARTS},
            "sources": sources,
            "libraries": {p.name: sha256(p) for p in sorted((tmp / "lib").iterdir())},
        }
        write_json(tmp / MARKER, info)
    log(f"wrote {out}")
    return info
