"""The per-model C header of a package: ``NAME.h`` declares ``NAME_spec`` (names, dtypes,
shapes and byte sizes of the inputs and outputs, the static archive's symbol prefix, the
reference check's tolerance) for the C API in ``sparsec.h``. A package compiled with
``--dynamic`` also gets each tensor's per-axis least and largest sizes and the names of its
dynamic axes (``sparsec_run_shaped`` checks a call's shapes against them), and one
``NAME_DIM_<DIM>_MIN`` / ``_MAX`` constant pair per dynamic dim."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sparsec.errors import BadOptionError, InvalidModelError

#: numpy dtype name -> sparsec_dtype enumerator (sparsec.h)
C_DTYPES = {"float32": "SPARSEC_FLOAT32", "float16": "SPARSEC_FLOAT16",
            "float64": "SPARSEC_FLOAT64", "int64": "SPARSEC_INT64", "int32": "SPARSEC_INT32",
            "int8": "SPARSEC_INT8", "uint8": "SPARSEC_UINT8", "bool": "SPARSEC_BOOL"}
#: sparsec.h's SPARSEC_API_VERSION this generator writes for
API_VERSION = 4

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def check_name(name: str) -> str:
    """A model name must be a C identifier: it names the header, the archive and symbols."""
    if not _IDENT.match(name):
        raise BadOptionError(f"model name '{name}' is not a C identifier (letters, digits and "
                             f"'_', not starting with a digit)")
    return name


def default_name(stem: str) -> str:
    """A C identifier from a file or directory name: ``digits-cnn.v2`` -> ``digits_cnn_v2``."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem).strip("_") or "model"
    return f"m_{name}" if name[0].isdigit() else name


def _c_string(text: str) -> str:
    """A C string literal of ``text`` (UTF-8; quotes, backslashes and non-printable bytes as
    octal escapes, which unlike hex escapes cannot run into the next character)."""
    out = []
    for byte in text.encode():
        ch = chr(byte)
        out.append(ch if 32 <= byte < 127 and ch not in '"\\?' else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _comment(text: str) -> str:
    """``text`` safe inside a C block comment."""
    return " ".join(text.replace("*/", "* /").split())


def _bounds(spec: dict) -> tuple[list[int], list[int], list[str | None]]:
    """Per axis of a signature entry: the least and largest size and the dynamic dim's name
    (``None`` for a fixed axis; an output axis that varies with no dim of its own, ``"?"``
    in the manifest, is nameless too)."""
    shape = [int(d) for d in spec["shape"]]
    dims = spec.get("dims") or [None] * len(shape)
    lo = [int(d[1]) if d else n for n, d in zip(shape, dims)]
    hi = [int(d[2]) if d else n for n, d in zip(shape, dims)]
    names = [d[0] if d and d[0] != "?" else None for d in dims]
    return lo, hi, names


def _tensors(name: str, kind: str, signature: list[dict]) -> list[str]:
    lines, entries = [], []
    upper = name.upper()
    for i, spec in enumerate(signature):
        if spec["dtype"] not in C_DTYPES:
            raise InvalidModelError(f"{kind} '{spec['name']}' has dtype {spec['dtype']}, which "
                                    f"the C API does not express")
        shape = [int(d) for d in spec["shape"]]
        lo, hi, names = _bounds(spec)
        size = np.dtype(spec["dtype"]).itemsize
        numel = int(np.prod(shape, dtype=np.int64))
        max_numel = int(np.prod(hi, dtype=np.int64))
        base = f"{name}_{kind}{i}"
        sizes = "" if lo == hi else f", sizes {lo} to {hi}"
        lines += [f"/* {kind} {i}: {_comment(repr(spec['name']))}, {spec['dtype']} {shape}"
                  f"{_comment(sizes)} */",
                  f"#define {upper}_{kind.upper()}{i}_NUMEL {numel}",
                  f"#define {upper}_{kind.upper()}{i}_MAX_NUMEL {max_numel}"]
        for suffix, values in (("shape", shape), ("min_shape", lo), ("max_shape", hi)):
            lines.append(f"static const int64_t SPARSEC_UNUSED {base}_{suffix}[] = "
                         f"{{{', '.join(map(str, values)) or '0'}}};")
        dims = "NULL"
        if any(names):
            dims = f"{base}_dims"
            listed = ", ".join(_c_string(n) if n else "NULL" for n in names)
            lines.append(f"static const char* const SPARSEC_UNUSED {dims}[] = {{{listed}}};")
        bounds = "NULL"
        if "range" in spec:
            lo_v, hi_v = (int(v) for v in spec["range"])
            lines.append(f"static const int64_t SPARSEC_UNUSED {base}_range[] = "
                         f"{{{lo_v}, {hi_v}}};")
            bounds = f"{base}_range"
        entries.append(f"    {{{_c_string(spec['name'])}, {C_DTYPES[spec['dtype']]}, "
                       f"{len(shape)}, {base}_shape, {numel * size}, {bounds}, "
                       f"{base}_min_shape, {base}_max_shape, {dims}, {max_numel * size}}},")
    lines += [f"static const sparsec_tensor_spec SPARSEC_UNUSED {name}_{kind}s[] = {{",
              *entries, "};", ""]
    return lines


def _dim_constants(name: str, signature: list[dict]) -> list[str]:
    """``#define NAME_DIM_<DIM>_MIN`` / ``_MAX`` per dynamic dim of the inputs (dim names made
    C identifiers; two names that become the same identifier get ``_2``, ``_3``, ...)."""
    ranges: dict[str, tuple[int, int]] = {}
    for spec in signature:
        for d in spec.get("dims") or []:
            if d and d[0] != "?":
                ranges.setdefault(d[0], (int(d[1]), int(d[2])))
    lines, used = [], set()
    for dim, (lo, hi) in ranges.items():
        ident = re.sub(r"[^A-Za-z0-9_]", "_", dim).upper()
        k, base = 2, ident
        while ident in used:
            ident, k = f"{base}_{k}", k + 1
        used.add(ident)
        lines += [f"/* dynamic dim {_comment(repr(dim))}: any size from {lo} to {hi} */",
                  f"#define {name.upper()}_DIM_{ident}_MIN {lo}",
                  f"#define {name.upper()}_DIM_{ident}_MAX {hi}"]
    return lines + [""] if lines else []


#: sparsec_model_spec.device_type per TargetSpec.device (DLPack's device types)
DEVICE_TYPES = {"cpu": 1, "cuda": 2}


def c_header(name: str, prefix: str, inputs: list[dict], outputs: list[dict], atol: float,
             rtol: float, about: str, device: str = "cpu", library: Path | None = None) -> str:
    """The text of ``NAME.h``; ``about`` is one line on where the model came from, ``device``
    where its kernels run, ``library`` the package's model.so: its size and SHA-256, which
    ``sparsec_open`` checks before loading it."""
    from sparsec.package import sha256

    check_name(name)
    lib_bytes, lib_hash = ((library.stat().st_size, _c_string(sha256(library)))
                           if library is not None else (0, "NULL"))
    guard = f"SPARSEC_MODEL_{name.upper()}_H_"
    upper = name.upper()
    lines = [
        f"/* {name}: {_comment(about)}",
        " * Generated by sparsec; do not edit. The C API is in sparsec.h. */",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        '#include "sparsec.h"',
        "",
        f"#define {upper}_NUM_INPUTS {len(inputs)}",
        f"#define {upper}_NUM_OUTPUTS {len(outputs)}",
        f"#define {upper}_SYSTEM_LIB_PREFIX {_c_string(prefix)}",
        "",
        *_dim_constants(name, inputs),
        *_tensors(name, "input", inputs),
        *_tensors(name, "output", outputs),
        f"static const sparsec_model_spec SPARSEC_UNUSED {name}_spec = {{",
        f"    {API_VERSION}, {_c_string(name)}, {_c_string(prefix)},",
        f"    {len(inputs)}, {name}_inputs, {len(outputs)}, {name}_outputs,",
        f"    {atol!r}, {rtol!r}, {DEVICE_TYPES[device]},",
        f"    {lib_bytes}, {lib_hash}}};",
        "",
        f"#endif /* {guard} */",
        "",
    ]
    return "\n".join(lines)
