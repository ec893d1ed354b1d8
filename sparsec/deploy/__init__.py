"""Deployment: what a C/C++ build needs next to a compiled package.

* ``include/sparsec.h`` and ``src/sparsec_runtime.cc``: the C API over the TVM runtime;
* ``header.py``: the per-model C header (shapes, dtypes, tolerance) written into each package;
* ``runtime.py``: ``sparsec runtime``, a TVM runtime for a target (the host's, or aarch64's);
* ``cmake/``: ``find_package(sparsec)`` and ``sparsec_add_model``, and a toolchain file for
  cross builds.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
INCLUDE_DIR = HERE / "include"
SOURCE_DIR = HERE / "src"
CMAKE_DIR = HERE / "cmake"
