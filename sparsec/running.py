"""Running and validating a compiled package: load its library (here, on the GPU, or a cross
target under its emulator), run it on checked inputs, and compare it with ONNX Runtime within
the package's tolerance (looser for bf16 kernels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsec import reference
from sparsec.errors import (BadOptionError, InvalidModelError, SparsecError, ToolchainError,
                            ValidationError)
from sparsec.loading import Log, _quiet
from sparsec.package import LIBRARY, MODEL, Package, check_elf

#: default tolerance of a compiled library against ONNX Runtime: max|y - ref| <= ATOL + RTOL *
#: max|ref| per output (the reference check in the package and its C header use the same)
RTOL, ATOL = 1e-4, 1e-5
#: the tolerance of a library with bf16 kernels (AMX, sparse tensor cores): inputs rounded to
#: 8 mantissa bits. Deep networks lose more than that through bf16 (torch's own bf16 autocast:
#: 17 % of max|y| on an untrained MobileNetV2, cosine 0.987), so an output also passes with
#: cosine >= BF16_MIN_COSINE; the package then records max(RTOL_BF16, BF16_MARGIN x the error
#: measured here) for the device's check of the reference pair.
RTOL_BF16, ATOL_BF16 = 3e-2, 1e-3
BF16_MIN_COSINE = 0.99
BF16_MARGIN = 1.5
#: the tolerance of a library with tf32 kernels (CUDA tensor cores): inputs rounded to 10
#: mantissa bits (a relative error of up to 2^-11 per input, 8x less than bf16); as for bf16,
#: an output also passes with cosine >= TF32_MIN_COSINE, and the package records the error
#: measured here (x BF16_MARGIN) where it is wider
RTOL_TF32, ATOL_TF32 = 5e-3, 1e-4
TF32_MIN_COSINE = 0.999
#: the lossy precisions, least precise first: (rtol, atol, min_cosine)
REDUCED = {"bf16": (RTOL_BF16, ATOL_BF16, BF16_MIN_COSINE),
           "tf32": (RTOL_TF32, ATOL_TF32, TF32_MIN_COSINE)}


def kernel_precision(facts: dict) -> str:
    """The least precise inputs a kernel of the compiled library computes with (its decision
    says ``precision``): "bf16", "tf32", or "fp32" when every kernel is exact."""
    found = {d.get("precision") for d in facts.get("decisions", [])}
    return next((p for p in REDUCED if p in found), "fp32")


def uses_bf16(facts: dict) -> bool:
    """Whether a kernel of the compiled library computes in bf16."""
    return kernel_precision(facts) == "bf16"


def tolerance(facts: dict) -> tuple[float, float]:
    """(rtol, atol) a compiled library is checked with: looser when a kernel computes in bf16
    or tf32."""
    return REDUCED.get(kernel_precision(facts), (RTOL, ATOL, None))[:2]


def min_cosine(facts: dict) -> float | None:
    """The cosine an output of a lossy library passes with (None: exact kernels only)."""
    return REDUCED.get(kernel_precision(facts), (RTOL, ATOL, None))[2]


def _load_runner(spec, directory: Path, name: str, inputs: list[dict], outputs: list[dict],
                 log: Log = _quiet, cuda: dict | None = None):
    """What runs a package's library here: the library itself in this process (on the GPU
    for a CUDA target, ``cuda`` its facts; without a GPU, on the CPU twin of its kernels when
    the package has one), or, for a cross CPU target, a program built for the target under
    its emulator. ``ToolchainError`` if nothing here can run it."""
    from sparsec.targets import cpu_flags
    from sparsec.targets.backend import load_library

    if spec.runs_here:
        return load_library(directory / LIBRARY, [s["name"] for s in inputs], cuda)
    twin = directory / cuda["cpu_twin"] if cuda and "cpu_twin" in cuda else None
    if spec.device == "cuda" and spec.native and twin is not None and not (
            spec.cpu_flags - cpu_flags()):
        log(f"note: {spec.why_not_here}: {LIBRARY} runs on this CPU via the CPU twin of the "
            f"CUDA schedules ({twin.name}: the same kernels, threads serialized; nvcc's "
            f"binary runs only on a GPU)")
        return load_library(directory / LIBRARY, [s["name"] for s in inputs], cuda, twin)
    if spec.native or spec.device != "cpu":
        raise ToolchainError(f"target {spec.name} does not run on this machine: "
                             f"{spec.why_not_here}")
    from sparsec.deploy.emulate import EmulatedRunner

    return EmulatedRunner(spec, directory, name, inputs, outputs, log)


def _runner(pkg: Package, log: Log = _quiet, remote=None):
    from sparsec.targets import resolve_target

    spec = resolve_target(pkg.manifest["target"]["name"])
    check_elf(pkg.path / LIBRARY)
    if remote is not None:     # a device under the key runs it: its checks are there
        if spec.device != "cpu":
            raise BadOptionError(f"running over RPC takes CPU packages; this one is for "
                                 f"{spec.name}")
        from sparsec.remote import RemoteRunner

        return RemoteRunner(remote, pkg.path / LIBRARY, [s["name"] for s in pkg.inputs])
    try:
        return _load_runner(spec, pkg.path, pkg.name, pkg.inputs, pkg.outputs, log,
                            cuda=pkg.manifest["compile"].get("cuda"))
    except SparsecError:
        raise
    except Exception as e:
        raise _library_failed(pkg, e) from None


def _run_package(pkg: Package, feeds: dict[str, np.ndarray], log: Log = _quiet,
                 remote=None) -> tuple[list[np.ndarray], str]:
    """The package's library on checked feeds (here, or with ``remote`` on a device under its
    key), and how it ran (``Runner.via``); a library that fails on inputs matching its
    manifest (another model's library, re-hashed into it) is refused as an invalid
    package."""
    runner = _runner(pkg, log, remote)
    try:
        return runner.run(feeds), runner.via
    except SparsecError:
        raise
    except Exception as e:
        raise _library_failed(pkg, e) from None
    finally:
        if hasattr(runner, "close"):   # a remote device's session: given back now
            runner.close()


def _library_failed(pkg: Package, e: Exception) -> InvalidModelError:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return InvalidModelError(f"package {pkg.path}: its {LIBRARY} does not run as its manifest "
                             f"describes ({first}); compile the package again")


def run(package_dir: str | os.PathLike, inputs: dict[str, np.ndarray] | str | os.PathLike,
        *, rpc: str | None = None, key: str | None = None, rpc_timeout: float | None = None,
        log: Log = _quiet) -> dict[str, np.ndarray]:
    """Run a compiled package on ``inputs`` (dict or .npz path); outputs keyed by name. A CUDA
    package on a machine without a GPU runs on the CPU twin of its schedules (``log`` says
    so). With ``rpc`` (a TVM RPC tracker's HOST:PORT) and ``key``, on a device server
    registered under that key, waiting up to ``rpc_timeout`` seconds for a free one
    (``sparsec.remote``)."""
    remote = _remote(rpc, key, rpc_timeout)
    pkg = Package.load(package_dir)
    feeds = reference.check_inputs(
        inputs if isinstance(inputs, dict) else pkg.read_inputs(inputs), pkg.inputs)
    outs, _ = _run_package(pkg, feeds, log, remote)
    return {spec["name"]: out for spec, out in zip(pkg.outputs, outs)}


def _remote(rpc: str | None, key: str | None, timeout: float | None):
    from sparsec.remote import Remote

    return Remote.of(rpc, key, timeout)


@dataclass
class ValidationReport:
    ok: bool
    outputs: list[dict] = field(default_factory=list)
    rtol: float = RTOL
    atol: float = ATOL
    min_cosine: float | None = None
    #: how the library ran (``native``, ``cuda``, ``cuda-schedules-on-cpu``: the CPU twin of
    #: a CUDA package's schedules where no GPU is, ``qemu-...``, or ``rpc:KEY``)
    via: str = "native"
    #: what it was compared with: ONNX Runtime on the package's model.onnx, or (a package
    #: without one) the reference pair ONNX Runtime gave at compile time
    against: str = "onnxruntime"

    @property
    def max_abs_err(self) -> float:
        return max((o["max_abs_err"] for o in self.outputs), default=0.0)


def device_rtol(check: ValidationReport) -> float:
    """The rtol a bf16 package records for the device's check of its reference pair: its
    own, or wider, so that BF16_MARGIN x the error measured here passes and no more."""
    return max([check.rtol] + [(BF16_MARGIN * o["max_abs_err"] - check.atol) / o["peak"]
                               for o in check.outputs if o["peak"] > 0])


def _compare(outputs: list[dict], expected: list[np.ndarray], actual: list[np.ndarray],
             rtol: float, atol: float, min_cosine: float | None = None) -> ValidationReport:
    """Per output: ok when max|y - ref| <= atol + rtol * max|ref|, or (bf16 packages) when
    the cosine similarity is at least ``min_cosine``."""
    report = ValidationReport(ok=True, rtol=rtol, atol=atol, min_cosine=min_cosine)
    for spec, ref, out in zip(outputs, expected, actual):
        fid = reference.compare([ref], [out])
        ref_abs = np.abs(np.asarray(ref, dtype=np.float64))
        peak = float(ref_abs[np.isfinite(ref_abs)].max(initial=0.0))
        bound = atol + rtol * peak
        ok = fid.max_abs_err <= bound or (min_cosine is not None and fid.cosine >= min_cosine)
        report.ok &= ok
        report.outputs.append({"name": spec["name"], "max_abs_err": fid.max_abs_err,
                               "bound": bound, "peak": peak, "cosine": fid.cosine, "ok": ok})
    return report


def _raise_if_mismatch(report: ValidationReport, flushed: bool = False) -> None:
    """``ValidationError`` naming the worst output where ``report`` failed; ``flushed``: the
    library flushes subnormals to zero (``targets/denormals.py``), which the message names as a
    cause to rule out."""
    if not report.ok:
        worst = max(report.outputs, key=lambda o: o["max_abs_err"] - o["bound"])
        why = (f"max abs err {worst['max_abs_err']:.3g} > bound {worst['bound']:.3g}")
        if report.min_cosine is not None:
            why += (f" and cosine {worst['cosine']:.4f} < {report.min_cosine} (lossy kernels, "
                    f"bf16 or tf32: --precision fp32 keeps every kernel exact)")
        if flushed:
            why += (" (subnormal floats are flushed to zero in the library: a model that "
                    "magnifies values under 1.2e-38, by a log or a division, needs "
                    "--denormals keep)")
        raise ValidationError(f"output '{worst['name']}' differs from ONNX Runtime: {why}")


def validate(package_dir: str | os.PathLike, inputs=None, *, rtol: float | None = None,
             atol: float | None = None, seed: int | None = None, check: bool = False,
             rpc: str | None = None, key: str | None = None,
             rpc_timeout: float | None = None, log: Log = _quiet) -> ValidationReport:
    """Compiled library vs ONNX Runtime on the package's pruned ONNX model.

    An output matches when max|lib - ort| <= atol + rtol * max|ort| (by default the
    package's own tolerance: its manifest's ``reference``), or, for a package with bf16
    kernels, when its cosine similarity is at least the recorded ``min_cosine``. With
    ``check=True`` a mismatch raises ``ValidationError`` (the CLI's non-zero exit).

    A package with ``model.onnx`` (compiled with ``keep_onnx``) is checked on ``inputs``, or on
    random inputs drawn with ``seed`` (default 0); one without is checked on its reference
    pair (``against`` says which), and ``inputs`` or ``seed`` are refused. A CUDA package on
    a machine without a GPU runs on the CPU twin of its schedules (``via``). With ``rpc`` (a
    TVM RPC tracker's HOST:PORT) and ``key`` the library runs on a device server registered
    under that key (``via`` says ``rpc:KEY``); ONNX Runtime runs here."""
    remote = _remote(rpc, key, rpc_timeout)
    pkg = Package.load(package_dir)
    recorded = pkg.manifest.get("reference", {})
    rtol = recorded.get("rtol", RTOL) if rtol is None else rtol
    atol = recorded.get("atol", ATOL) if atol is None else atol
    min_cosine = recorded.get("min_cosine")
    flushed = pkg.manifest.get("compile", {}).get("denormals") == "flush"
    if "dynamic" in pkg.manifest and pkg.model is not None and inputs is None:
        import onnx

        report = _validate_dynamic(pkg, onnx.load(str(pkg.model)),
                                   0 if seed is None else seed, rtol, atol, remote)
        if check:
            _raise_if_mismatch(report, flushed)
        return report
    if pkg.model is None:
        if inputs is not None or seed is not None:
            raise BadOptionError(f"package {pkg.path} has no {MODEL} (compiled without "
                                 f"--keep-onnx): it is checked on its reference pair only, "
                                 f"not on new inputs")
        feeds, want = pkg.reference()
        expected, against = [want[s["name"]] for s in pkg.outputs], "reference"
    else:
        import onnx

        if inputs is None:
            feeds = reference.random_feeds(pkg.inputs, 0 if seed is None else seed)
        else:
            feeds = reference.check_inputs(
                inputs if isinstance(inputs, dict) else pkg.read_inputs(inputs), pkg.inputs)
        expected, against = reference.run(onnx.load(str(pkg.model)), feeds), "onnxruntime"
    actual, via = _run_package(pkg, feeds, log, remote)
    report = _compare(pkg.outputs, expected, actual, rtol, atol, min_cosine)
    report.via, report.against = via, against
    if check:
        _raise_if_mismatch(report, flushed)
    return report


def _validate_dynamic(pkg: Package, model, seed: int, rtol: float, atol: float,
                      remote=None) -> ValidationReport:
    """A dynamic package against ONNX Runtime at both ends of every range and in the middle
    (``sparsec.dynamic``): one report, each output once per size."""
    from sparsec.dynamic import at_sizes
    from sparsec.frontends.dynamic import check_sizes

    runner = _runner(pkg, remote=remote)
    session = reference.session(model)
    report = ValidationReport(ok=True, rtol=rtol, atol=atol, via=runner.via)
    def check(sizes: dict, feeds: dict, expected: list, label: str = "") -> None:
        try:
            actual = runner.run(feeds)
        except SparsecError:
            raise
        except Exception as e:
            raise _library_failed(pkg, e) from None
        part = _compare(pkg.outputs, expected, actual, rtol, atol)
        where = ",".join(f"{k}={v}" for k, v in sorted(sizes.items()))
        report.ok &= part.ok
        report.outputs += [{**o, "name": f"{o['name']} @ {where}{label}"} for o in part.outputs]

    try:
        for i, sizes in enumerate(check_sizes({k: tuple(v) for k, v in
                                               pkg.manifest["dynamic"]["ranges"].items()})):
            feeds = reference.random_feeds(at_sizes(pkg.inputs, sizes), seed + i)
            check(sizes, feeds, session.run(None, feeds))
        # the pairs stored at compile time: what ONNX Runtime gave then, at other sizes
        for sizes, feeds, want in pkg.reference_pairs():
            check(sizes, feeds, [want[s["name"]] for s in pkg.outputs], " (stored pair)")
    finally:
        if hasattr(runner, "close"):
            runner.close()
    return report
