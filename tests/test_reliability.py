"""Reliability under hostile use: checks that NaN cannot fool, runs killed mid-write, edited or
truncated packages, inputs that are not what the model takes. Each must end in a clean
one-line error (or a correct result), never a crash, an internal error or silent acceptance.
The C API's side is in test_deploy.py."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
import zoo
from conftest import EXAMPLES
from test_cli import assert_clean_error, sparsec

from sparsec import api, reference
from sparsec.package import seal, sha256

REF = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
SPEC = [{"name": "y"}]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_output_is_a_mismatch(bad):
    out = REF.copy()
    out[1] = bad
    fid = reference.compare([REF], [out])
    assert math.isinf(fid.max_abs_err) and fid.cosine == 0.0
    assert not api._compare(SPEC, [REF], [out], 1e-3, 1e-5).ok
    # the same the other way round: the reference is NaN/Inf where the library is finite
    assert not api._compare(SPEC, [out], [REF], 1e-3, 1e-5).ok
    # not even the bf16 cosine escape accepts it
    assert not api._compare(SPEC, [REF], [out], 1e-3, 1e-5, 0.5).ok


def test_non_finite_values_at_the_same_places_match():
    ref = np.array([np.nan, np.inf, -np.inf, 2.0], np.float32)
    out = np.array([np.nan, np.inf, -np.inf, 2.0 + 1e-7], np.float32)
    report = api._compare(SPEC, [ref], [out], 1e-3, 1e-5)
    assert report.ok and report.outputs[0]["peak"] == 2.0        # the bound ignores the inf
    flipped = np.array([np.nan, -np.inf, np.inf, 2.0], np.float32)
    assert not api._compare(SPEC, [ref], [flipped], 1e-3, 1e-5).ok


def test_an_infinite_reference_does_not_widen_the_bound():
    ref = np.array([np.inf, 1.0], np.float32)
    out = np.array([np.inf, 5.0], np.float32)
    assert not api._compare(SPEC, [ref], [out], 1e-3, 1e-5).ok


# ----------------------------------------------------------------------------- staging
KILLED_RUN = r"""
import os, sys, time
from sparsec.package import staging_dir
with staging_dir(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 100)
    print("staging", flush=True)
    time.sleep(60)
"""


def test_a_killed_run_leaves_nothing_the_next_run_keeps(tmp_path):
    """kill -9 while staging: the next run for that output (and ``sparsec clean``) removes
    the leftovers; a live run's staging directory is never touched."""
    import signal
    import subprocess
    import sys

    from sparsec.package import remove_stale_staging, staging_dir

    out = tmp_path / "pkg"
    procs = [subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(out)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "staging"
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    removed = remove_stale_staging(out)
    assert len(removed) == 2                                    # the dead run's dir and lock
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1   # the live run's stays
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    with staging_dir(out) as tmp:                               # the next run cleans up
        (tmp / "ok").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    assert (out / "ok").read_text() == "done"


def test_clean_command_removes_lockless_leftovers(tmp_path):
    import subprocess
    import sys

    (tmp_path / ".pkg.ab12CD_x").mkdir()          # as sparsec before the locks left them
    (tmp_path / ".pkg.ab12CD_x" / "model.so").write_bytes(b"\0")
    (tmp_path / ".pkgs-other").mkdir()            # not ours
    proc = subprocess.run([sys.executable, "-m", "sparsec", "clean", str(tmp_path / "pkg")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "removed" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pkgs-other"]


# ----------------------------------------------------------------------------- hostile use
# Each case: what a user (or an interrupted copy) does to a package or its inputs, and the
# clean one-line error it must get: never a crash, an exit 70 or silent acceptance.


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    onnx.save(zoo.gemm_mlp(), str(root / "gemm_mlp.onnx"))    # another input signature
    for model in (EXAMPLES / "digits_mlp.onnx", EXAMPLES / "digits_cnn.onnx",
                  root / "gemm_mlp.onnx"):
        proc = sparsec("compile", model, "--target", "host", "-o", root / model.stem)
        assert proc.returncode == 0, proc.stderr
    return root


def _copy(pkgs, tmp_path, name="digits_mlp"):
    dst = tmp_path / name
    shutil.copytree(pkgs / name, dst)
    return dst


def _reseal(pkg, edit):
    """Edit the manifest as a determined user would: change it, re-hash files, re-seal."""
    m = json.loads((pkg / "manifest.json").read_text())
    edit(m)
    m["files"] = {k: sha256(pkg / k) for k in m["files"]}
    (pkg / "manifest.json").write_text(json.dumps(seal(m)))


def _inputs(tmp_path, pkg, **arrays):
    m = json.loads((pkg / "manifest.json").read_text())
    spec = m["inputs"][0]
    base = {spec["name"]: np.zeros(spec["shape"], spec["dtype"])}
    path = tmp_path / "x.npz"
    np.savez(path, **{**base, **arrays})
    return path, spec


def test_an_edited_manifest_is_refused(pkgs, tmp_path):
    pkg = _copy(pkgs, tmp_path)
    m = json.loads((pkg / "manifest.json").read_text())
    m["inputs"][0]["shape"][0] = 4                 # "widen" the input
    (pkg / "manifest.json").write_text(json.dumps(m))
    for cmd in ("validate", "inspect"):
        assert_clean_error(sparsec(cmd, pkg), 4, "was edited")


def test_a_resealed_manifest_with_a_renamed_key_names_the_key(pkgs, tmp_path):
    pkg = _copy(pkgs, tmp_path)
    _reseal(pkg, lambda m: m.__setitem__("ins", m.pop("inputs")))
    assert_clean_error(sparsec("inspect", pkg), 4, "key 'inputs'")
    _reseal(pkg, lambda m: (m.__setitem__("inputs", m.pop("ins")),
                            m["inputs"][0].__setitem__("dtype", "complex64")))
    assert_clean_error(sparsec("validate", pkg), 4, "inputs[0].dtype")


def test_a_truncated_library_is_refused_not_mapped(pkgs, tmp_path):
    pkg = _copy(pkgs, tmp_path)
    lib = pkg / "model.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    _reseal(pkg, lambda m: None)
    x = tmp_path / "x.npz"
    np.savez(x, image=np.zeros((1, 1, 8, 8), np.float32))
    for cmd in (("validate", pkg), ("run", pkg, "--inputs", x)):
        assert_clean_error(sparsec(*cmd), 4, "not a complete shared library")


def test_another_models_library_is_refused(pkgs, tmp_path):
    """Same signature: the outputs differ (exit 10); another signature: the library refuses
    the inputs its manifest promises (exit 4), never an internal error."""
    pkg = _copy(pkgs, tmp_path)
    shutil.copy(pkgs / "digits_cnn" / "model.so", pkg / "model.so")
    _reseal(pkg, lambda m: None)
    proc = sparsec("validate", pkg)
    assert proc.returncode == 10 and "FAIL" in proc.stdout, proc.stderr
    shutil.copy(pkgs / "gemm_mlp" / "model.so", pkg / "model.so")
    _reseal(pkg, lambda m: None)
    assert_clean_error(sparsec("validate", pkg), 4, "does not run as its manifest describes")


@pytest.mark.parametrize("case", ["extra", "strings", "complex", "nan", "shape"])
def test_hostile_inputs_get_exit_6(pkgs, tmp_path, case):
    pkg = pkgs / "digits_mlp"
    _, spec = _inputs(tmp_path, pkg)
    shape = spec["shape"]
    arrays = {
        "extra": {"unused": np.zeros(3, np.float32)},
        "strings": {spec["name"]: np.full(shape, "a")},
        "complex": {spec["name"]: np.zeros(shape, np.complex64)},
        "nan": {spec["name"]: np.full(shape, np.nan, np.float32)},
        "shape": {spec["name"]: np.zeros([2, *shape], np.float32)},
    }[case]
    path, _ = _inputs(tmp_path, pkg, **arrays)
    for cmd in ("run", "validate"):
        assert_clean_error(sparsec(cmd, pkg, "--inputs", path), 6)


def test_cast_input_refuses_value_changing_casts():
    from sparsec.errors import BadOptionError

    ids = {"name": "ids", "shape": [2], "dtype": "int64"}
    flags = {"name": "m", "shape": [2], "dtype": "bool"}
    pixels = {"name": "x", "shape": [2], "dtype": "float32"}
    np.testing.assert_array_equal(reference.cast_input("ids", np.array([7.0, -1.0]), ids),
                                  [7, -1])
    np.testing.assert_array_equal(reference.cast_input("x", np.array([2**24, -3]), pixels),
                                  [2**24, -3])           # integers exact in float32 pass
    for bad, spec in ((np.array([7.5, 1.0]), ids), (np.array([np.inf, 1.0]), ids),
                      (np.array([2**40, 1], np.int64), {**ids, "dtype": "int32"}),
                      (np.array([2**40 + 1, 1], np.int64), pixels),   # rounds in float32
                      (np.array([2, 0]), flags), (np.array(["1", "2"]), ids)):
        with pytest.raises(BadOptionError):
            reference.cast_input("x", bad, spec)
