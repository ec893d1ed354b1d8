"""Checks that cannot be fooled: NaN and infinities in a comparison are mismatches unless the
reference has the same value at the same place (Python side; the C API's check is in
test_deploy.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparsec import api, reference

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
