"""Subnormal floats flushed to zero for the length of a call (``targets/denormals.py``): in
every thread that runs the kernels, with the caller's and the workers' modes put back after
the call, ``--denormals keep`` leaving them alone, on x86 here and on aarch64 under qemu."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import sparsec as sparsec_cli

from sparsec.targets import resolve_target
from sparsec.targets.host import compile_onnx, load_library

#: a subnormal float32 (the smallest normal is 1.18e-38)
TINY = np.float32(1e-39)


def halving_conv(c: int, hw: int):
    """A 1x1 conv by 0.5 x identity: y = x / 2 for every element."""
    w = (np.eye(c, dtype=np.float32) * 0.5).reshape(c, c, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "halve",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def caller_flushes() -> bool:
    """Whether this thread's float modes flush subnormals (numpy computes in this thread)."""
    return float(np.float32(1e-38) * np.float32(0.5)) == 0.0


@pytest.mark.parametrize("hw", [128, 4], ids=["threads", "serial"])
def test_subnormals_flush_in_every_thread_and_the_modes_come_back(hw, tmp_path):
    """A model large enough for threads (and one small enough to run serially): flushed,
    every output of x / 2 on subnormal x is zero, whichever thread computed it; kept, every
    one is x / 2 exactly. After a flushing call the caller does not flush, and a keeping
    library run next in the same process (on the same TVM worker threads) still computes
    subnormals everywhere."""
    model = halving_conv(64, hw)
    x = np.full((1, 64, hw, hw), TINY, np.float32)
    runners, kernels = {}, {}
    for mode in ("flush", "keep"):
        lib = tmp_path / f"{mode}.so"
        facts = compile_onnx(model, resolve_target("host"), lib, log=lambda s: None,
                             denormals=mode)
        assert facts["denormals"] == mode
        kernels[mode] = facts["kernels"]
        runners[mode] = load_library(lib, facts["inputs"])
    assert kernels["flush"] == kernels["keep"]      # the mode switches are not kernels
    assert not caller_flushes()
    for _ in range(2):
        y = runners["flush"].run({"x": x})[0]
        assert not np.any(y), f"{np.count_nonzero(y)} of {y.size} outputs kept subnormal"
        assert not caller_flushes()
        y = runners["keep"].run({"x": x})[0]
        np.testing.assert_array_equal(y, x / 2)   # every thread: gradual underflow again
        assert np.all(y > 0)


def test_compile_records_the_mode_and_refuses_others(tmp_path):
    """The manifest says which mode the library runs in; an unknown mode is a bad option."""
    import sparsec
    from sparsec.errors import BadOptionError

    m = sparsec.compile(_saved(halving_conv(8, 4), tmp_path), tmp_path / "p", target="host")
    assert m["compile"]["denormals"] == "flush"
    assert "subnormals flushed to zero" in sparsec_cli("inspect", tmp_path / "p").stdout
    m = sparsec.compile(_saved(halving_conv(8, 4), tmp_path), tmp_path / "q", target="host",
                        denormals="keep")
    assert m["compile"]["denormals"] == "keep"
    assert "subnormals kept" in sparsec_cli("inspect", tmp_path / "q").stdout
    with pytest.raises(BadOptionError, match="--denormals takes flush or keep"):
        sparsec.compile(_saved(halving_conv(8, 4), tmp_path), tmp_path / "r", target="host",
                        denormals="ftz")
    assert not (tmp_path / "r").exists()


def _saved(model, tmp_path):
    import onnx

    path = tmp_path / "halve.onnx"
    onnx.save(model, str(path))
    return path


def test_aarch64_flushes_under_qemu(tmp_path):
    """The same on AArch64 (FPCR.FZ), cross-compiled and run under qemu: zeros flushed,
    x / 2 kept."""
    if not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")):
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (.ci/run installs them)")
    import sparsec

    x = np.full((1, 8, 4, 4), TINY, np.float32)
    for mode in ("flush", "keep"):
        m = sparsec.compile(_saved(halving_conv(8, 4), tmp_path), tmp_path / mode,
                            target="aarch64", denormals=mode)
        assert m["compile"]["denormals"] == mode
        y = sparsec.run(tmp_path / mode, {"x": x})["y"]
        if mode == "flush":
            assert not np.any(y)
        else:
            np.testing.assert_array_equal(y, x / 2)
