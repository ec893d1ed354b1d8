"""The compiled package on disk, a directory:

    manifest.json         versions, target, command, signature, hashes, pass and kernel reports
    model.so              shared library (Relax VM executable, weights baked in)
    libNAME.a             the same model as a static archive for system-lib linking
    NAME.h                C header: shapes, dtypes and NAME_spec for the C API (sparsec.h)
    model.onnx            the pruned model, for ONNX Runtime (only with ``keep_onnx``: the
                          library holds the weights; over a size threshold its weights are in
                          model.onnx.data beside it)
    cpu_twin.so           CUDA packages: the GPU kernels built for this CPU, threads serialized
                          (no weights): ``validate``/``run`` without a GPU run model.so on them
    reference/            inputs.bin and the outputs.bin ONNX Runtime gives for them (raw
                          little-endian arrays in signature order, read with the manifest)

Outputs are written atomically (temp file or directory + rename), so a failed run never leaves a
half-written output behind; every file is written deterministically (no timestamps), so the same
input and flags give byte-identical packages."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from sparsec.errors import BadOptionError, InputNotFoundError, InvalidModelError, OutputError
from sparsec.frontends.external_data import data_file, external_files

MANIFEST = "manifest.json"
LIBRARY = "model.so"
MODEL = "model.onnx"
FORMAT = "sparsec-package/4"
#: the manifest's own hash: SHA-256 of its canonical JSON without this key
SEAL = "manifest_sha256"
#: the reference pair, under ``reference/``: raw arrays, as the C API reads them
REFERENCE = ("inputs.bin", "outputs.bin")


def archive_name(name: str) -> str:
    return f"lib{name}.a"


def header_name(name: str) -> str:
    return f"{name}.h"


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_parent(p: Path) -> None:
    """The nearest existing ancestor of ``p`` must be a writable directory (missing directories
    in between are created when the output is written)."""
    ancestor = p.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {p}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise OutputError(f"cannot write {p}: directory {ancestor} is not writable")


def check_writable_file(path: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Fail early (before any heavy work) if ``path`` cannot be written as a file."""
    p = Path(path)
    if source is not None and Path(source).exists() and p.exists() and p.samefile(source):
        raise OutputError(f"refusing to overwrite the input model {p}")
    if source is not None and Path(source).is_file():
        data = data_file(p)
        for f in external_files(source):
            if data.exists() and f.exists() and data.samefile(f):
                raise OutputError(f"refusing to write {p}: its weights would go to {data}, "
                                  f"the input model's external data")
    if p.is_dir():
        raise OutputError(f"output {p} is a directory")
    _check_parent(p)
    return p


def check_writable_dir(path: str | os.PathLike, marker: str = MANIFEST,
                       what: str = "sparsec package") -> Path:
    """An output directory may be created, or replace an earlier one of its kind (which has
    ``marker``), nothing else."""
    p = Path(path)
    _check_parent(p)
    if p.exists() and (not p.is_dir() or (any(p.iterdir()) and not (p / marker).is_file())):
        raise OutputError(f"{p} exists and is not a {what}; remove it or choose another "
                          f"output path")
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    p = Path(path)
    p.absolute().parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_LOCK = ".lock"


@contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A temp directory beside ``final`` that replaces it when the block succeeds.

    The directory ``.NAME.XXXXXXXX`` is owned through an exclusive ``flock`` on its sibling
    ``.NAME.XXXXXXXX.lock``, held while this run lives: the kernel drops it when the process
    dies, even by ``kill -9``, so the next run for the same output (or ``sparsec clean``)
    recognizes the leftovers of a dead run and removes them."""
    import fcntl

    final = Path(final)
    parent = final.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    fd, lock = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_LOCK, dir=parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        tmp = Path(lock[:-len(_LOCK)])
        umask = os.umask(0)
        os.umask(umask)
        tmp.mkdir(0o777 & ~umask)      # an ordinary directory, as the package will be
        try:
            yield tmp
            if final.exists():
                old = Path(f"{tmp}.old")
                old.mkdir()
                os.replace(final, old / "pkg")
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        Path(lock).unlink(missing_ok=True)
        os.close(fd)


def remove_stale_staging(final: str | os.PathLike, legacy: bool = False) -> list[Path]:
    """Remove what runs that died left beside ``final``: staging directories whose lock no
    live process holds. With ``legacy``, also lock-less ``.NAME.XXXXXXXX`` directories (left
    by sparsec versions before the locks; ``sparsec clean`` only). Returns what it removed."""
    import fcntl
    import glob
    import re

    final = Path(final).absolute()
    removed: list[Path] = []
    for lock in sorted(final.parent.glob(f".{glob.escape(final.name)}.*{_LOCK}")):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue                                  # a live run holds it
            base = Path(str(lock)[:-len(_LOCK)])
            for path in (base, Path(f"{base}.old")):
                if path.exists():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            lock.unlink(missing_ok=True)
            removed.append(lock)
        finally:
            os.close(fd)
    if legacy:
        pattern = re.compile(rf"\.{re.escape(final.name)}\.(old\.)?[A-Za-z0-9_]{{8}}")
        for path in sorted(final.parent.glob(f".{glob.escape(final.name)}.*")):
            if (path.is_dir() and pattern.fullmatch(path.name)
                    and not Path(f"{path}{_LOCK}").exists()):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def check_elf(path: Path) -> None:
    """``InvalidModelError`` unless ``path`` is an ELF file whose header, section table and
    loadable segments lie inside it. A truncated library (an interrupted copy) would otherwise
    crash the process that maps it (SIGBUS), not fail."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        bad = InvalidModelError(f"{path} is not a complete shared library ({size:,} bytes): "
                                f"copy the package again")
        if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or \
                head[5] not in (1, 2):
            raise bad
        wide, end = head[4] == 2, "<" if head[5] == 1 else ">"
        if wide and len(head) < 64:
            raise bad
        if wide:
            phoff, shoff = struct.unpack_from(end + "QQ", head, 32)
            phsize, phnum, shsize, shnum = struct.unpack_from(end + "HHHH", head, 54)
        else:
            phoff, shoff = struct.unpack_from(end + "II", head, 28)
            phsize, phnum, shsize, shnum = struct.unpack_from(end + "HHHH", head, 42)
        if phoff + phnum * phsize > size or shoff + shnum * shsize > size:
            raise bad
        f.seek(phoff)
        table = f.read(phnum * phsize)
    for k in range(phnum):
        if wide:
            kind, _, offset, _, _, filesz = struct.unpack_from(end + "IIQQQQ", table, k * phsize)
        else:
            kind, offset, _, _, filesz = struct.unpack_from(end + "IIIII", table, k * phsize)
        if kind == 1 and offset + filesz > size:            # PT_LOAD
            raise bad


def manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, indent=2, sort_keys=True).encode()).hexdigest()


def seal(manifest: dict) -> dict:
    """The manifest with its own hash (``SEAL``): an edit made after compile is refused."""
    return {**manifest, SEAL: manifest_digest(manifest)}


_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


def _check_schema(where: Path, m: dict) -> None:
    """The keys and types every reader of a manifest relies on (``InvalidModelError`` naming
    the first bad key)."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise InvalidModelError(f"{where}: key '{key}' {what}")

    def is_dict(key: str, value) -> dict:
        need(isinstance(value, dict), key, "must be an object")
        return value

    need(isinstance(m.get("name"), str), "name", "must be a string")
    for kind in ("inputs", "outputs"):
        specs = m.get(kind)
        need(isinstance(specs, list) and bool(specs), kind, "must be a non-empty list")
        for i, spec in enumerate(specs):
            key = f"{kind}[{i}]"
            is_dict(key, spec)
            need(isinstance(spec.get("name"), str), f"{key}.name", "must be a string")
            shape = spec.get("shape")
            need(isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape),
                 f"{key}.shape", "must be a list of positive integers")
            need(spec.get("dtype") in _DTYPES, f"{key}.dtype", f"must be one of {_DTYPES}")
            rng = spec.get("range")
            need(rng is None or (isinstance(rng, list) and len(rng) == 2
                                 and all(isinstance(v, int) for v in rng)),
                 f"{key}.range", "must be [lo, hi]")
    need(isinstance(is_dict("target", m.get("target")).get("name"), str), "target.name",
         "must be a string")
    files = is_dict("files", m.get("files"))
    need(all(isinstance(v, str) for v in files.values()), "files", "must map names to hashes")
    ref = is_dict("reference", m.get("reference"))
    for key in ("rtol", "atol"):
        need(isinstance(ref.get(key), (int, float)), f"reference.{key}", "must be a number")
    is_dict("compile", m.get("compile"))
    is_dict("library", m.get("library"))


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_reference(directory: Path, inputs: list[dict], outputs: list[dict],
                    feeds: dict[str, np.ndarray], results: list[np.ndarray]) -> None:
    """The reference pair, stored once: ``inputs.bin`` and ``outputs.bin``, the raw
    little-endian arrays concatenated in signature order (what ``sparsec_check_reference``
    reads; :func:`read_reference` reads them back with the manifest's signature)."""
    directory.mkdir(parents=True, exist_ok=True)
    for (name, specs), arrays in zip(zip(REFERENCE, (inputs, outputs)),
                                     ([feeds[s["name"]] for s in inputs], results)):
        (directory / name).write_bytes(b"".join(
            np.ascontiguousarray(a, np.dtype(s["dtype"]).newbyteorder("<")).tobytes()
            for s, a in zip(specs, arrays)))


def _read_arrays(path: Path, specs: list[dict]) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    arrays, offset = {}, 0
    for s in specs:
        dtype = np.dtype(s["dtype"]).newbyteorder("<")
        count = int(np.prod(s["shape"]))
        if offset + count * dtype.itemsize > len(data):
            raise InvalidModelError(f"{path} is shorter than the manifest's signature")
        arrays[s["name"]] = np.frombuffer(data, dtype, count, offset).reshape(
            s["shape"]).astype(dtype.newbyteorder("="))
        offset += count * dtype.itemsize
    if offset != len(data):
        raise InvalidModelError(f"{path} is longer than the manifest's signature")
    return arrays


def read_reference(directory: Path, inputs: list[dict], outputs: list[dict]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The reference pair :func:`write_reference` wrote: inputs and outputs keyed by name."""
    return (_read_arrays(directory / REFERENCE[0], inputs),
            _read_arrays(directory / REFERENCE[1], outputs))


def file_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` but the manifest, by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): sha256(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


@dataclass
class Package:
    """A compiled package directory, checked on load."""

    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Package":
        p = Path(path)
        if not p.exists():
            raise InputNotFoundError(f"package not found: {p}")
        mf = p / MANIFEST
        if not p.is_dir() or not mf.is_file():
            raise InvalidModelError(f"{p} is not a sparsec package (no {MANIFEST})")
        try:
            manifest = json.loads(mf.read_text())
            fmt = manifest.get("format")
            assert str(fmt).startswith("sparsec-package/")
        except Exception:
            raise InvalidModelError(f"{mf} is not a sparsec manifest") from None
        if fmt != FORMAT:
            raise InvalidModelError(f"{p} is a {fmt} package, this sparsec reads {FORMAT}: "
                                    f"compile it again")
        if manifest.get(SEAL) != manifest_digest(manifest):
            raise InvalidModelError(f"{mf} was edited after compile (its {SEAL} does not "
                                    f"match its content): compile the package again")
        _check_schema(mf, manifest)
        for name, digest in manifest.get("files", {}).items():
            f = p / name
            if not f.is_file():
                raise InvalidModelError(f"package {p} is missing {name}")
            if sha256(f) != digest:
                raise InvalidModelError(f"package {p}: {name} does not match its manifest hash")
        return cls(p, manifest)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    def read_inputs(self, npz: str | os.PathLike) -> dict[str, np.ndarray]:
        return read_npz_inputs(npz, self.inputs)

    def reference(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The reference pair (inputs, ONNX Runtime's outputs at compile time), by name."""
        return read_reference(self.path / "reference", self.inputs, self.outputs)

    def reference_pairs(self) -> list[tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """A dynamic package's reference pairs at its other checked sizes (those of at most
        ``sparsec.dynamic.PAIR_BYTES``): ``(sizes, inputs, outputs)`` each, by name."""
        from sparsec.dynamic import at_sizes

        return [(c["sizes"], *read_reference(self.path / c["reference"],
                                             at_sizes(self.inputs, c["sizes"]),
                                             at_sizes(self.outputs, c["sizes"])))
                for c in self.manifest.get("dynamic", {}).get("checked", [])
                if c.get("reference")]

    @property
    def model(self) -> Path | None:
        """The pruned ONNX model, where the package keeps one (``keep_onnx``)."""
        return self.path / MODEL if MODEL in self.manifest["files"] else None


def _load_npz(path: str | os.PathLike) -> tuple[Path, dict[str, np.ndarray]]:
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"inputs file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as data:
            return p, {k: data[k] for k in data.files}
    except Exception:
        raise InvalidModelError(f"{p} is not a readable .npz file") from None


def _stacked(p: Path, arrays: dict[str, np.ndarray], signature: list[dict]
             ) -> list[dict[str, np.ndarray]]:
    """Batches from arrays that are one input each, or several stacked on a leading axis."""
    from sparsec.reference import cast_input

    batches: list[dict[str, np.ndarray]] = []
    for spec in signature:
        name, shape = spec["name"], list(spec["shape"])
        if name not in arrays:
            raise BadOptionError(f"{p} has no array '{name}' (has: {', '.join(arrays) or '-'})")
        arr = arrays[name]
        if list(arr.shape) == shape:
            items = [arr]
        elif list(arr.shape[1:]) == shape:
            items = list(arr)
        else:
            raise BadOptionError(f"input '{name}' has shape {list(arr.shape)}, the model "
                                 f"expects {shape} or [N, *{shape}]")
        if batches and len(items) != len(batches):
            raise BadOptionError(f"{p}: inputs stack different numbers of samples")
        batches = batches or [{} for _ in items]
        for feeds, item in zip(batches, items):
            try:
                feeds[name] = cast_input(name, item, spec)
            except BadOptionError as e:
                raise BadOptionError(f"{p}: {e}") from None
    return batches


def read_npz_inputs(npz: str | os.PathLike, signature: list[dict]) -> dict[str, np.ndarray]:
    """One set of inputs from an ``.npz`` keyed by input name, checked against ``signature``
    (``reference.check_inputs``: no extra arrays, no value-changing casts)."""
    from sparsec.reference import check_inputs

    p, arrays = _load_npz(npz)
    try:
        return check_inputs(arrays, signature)
    except BadOptionError as e:
        raise BadOptionError(f"{p}: {e}") from None


def read_calibration(npz: str | os.PathLike, signature: list[dict]) -> list[dict[str, np.ndarray]]:
    """Calibration batches: each array is one input, or several stacked on a leading axis."""
    p, arrays = _load_npz(npz)
    return _stacked(p, arrays, signature)
