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
