"""``mma_cuda`` (kernels/mma.py): dense linear layers on NVIDIA tensor cores, tf32 or bf16
inputs with fp32 sums.

No GPU here: the fragment layouts are checked against TVM's own map of the 16x16 mma operand
(bf16) and the PTX ISA's table (tf32, written out below); the CPU twin, which runs those
layouts as the instruction, against numpy on inputs rounded as the hardware rounds them; the
CUDA kernel is compiled with nvcc for sm_80 and sm_90 (PTX and SASS); and whole models are
compiled for CUDA and checked through the twin against ONNX Runtime."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
import tvm  # noqa: E402

from sparsec.targets.kernels import mma  # noqa: E402
from sparsec.targets.kernels.common import RELU, Activation  # noqa: E402

HAS_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").is_file()
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc (CUDA toolkit) not installed")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_tf32_rounding():
    """Round to nearest, ties away from zero, 10 mantissa bits kept; inf and NaN kept."""
    ulp = 2.0 ** -10
    x = np.array([1 + ulp / 2, 1 + ulp / 2 - 2 ** -20, -(1 + ulp / 2), 1 + 3 * ulp / 2, 3.0,
                  np.inf, -np.inf, np.nan, 0.0], np.float32)
    got = mma.tf32_round(x)
    want = [1 + ulp, 1.0, -(1 + ulp), 1 + 2 * ulp, 3.0, np.inf, -np.inf]
    np.testing.assert_array_equal(got[:7], np.array(want, np.float32))
    assert np.isnan(got[7]) and got[8] == 0.0
    assert (mma.tf32_bits(np.random.default_rng(0).standard_normal(100)) & 0x1FFF == 0).all()


@pytest.mark.parametrize("precision,table", [
    # PTX ISA 9.7.16.5.1, A of m16n8k8 .tf32: (row, column) of a0..a3 as (g, t) + offsets
    ("tf32", [(0, 0), (8, 0), (0, 4), (8, 4)]),
    # A of m16n8k16 .bf16: a0..a7 as (g, 2t) + offsets
    ("bf16", [(0, 0), (0, 1), (8, 0), (8, 1), (0, 8), (0, 9), (8, 8), (8, 9)]),
])
def test_fragment_layouts(precision, table):
    """The A layouts as the PTX ISA's tables write them (g = lane // 4, t = lane % 4); the
    lanes' elements cover the tile, each cell once."""
    cells = set()
    for lane in range(32):
        g, t = lane // 4, lane % 4 * (1 if precision == "tf32" else 2)
        for i, (dr, dc) in enumerate(table):
            cell = mma.a_position(lane, i, precision)
            assert cell == (g + dr, t + dc)
            cells.add(cell)
    assert len(cells) == 16 * mma.TILE_K[precision]


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_packing_round_trips(precision):
    """Wa, read back through the A layout, is W^T rounded to the precision, zero padded."""
    k, n = 40, 20
    w = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    p = mma.plan(3, k, n, precision)
    wa = mma.pack_weight(w, p)
    assert wa.shape == (p.np_ // 16, p.kp // p.tile_k, 32, 4) and wa.dtype == np.uint32
    if precision == "tf32":
        elems = wa.view(np.float32)                                   # [OB, KS, 32, 4]
    else:
        bits = np.stack([wa & 0xFFFF, wa >> 16], axis=-1).reshape(*wa.shape[:3], 8)
        elems = (bits.astype(np.uint32) << 16).view(np.float32)      # [OB, KS, 32, 8]
    back = np.full((p.np_, p.kp), np.nan, np.float32)
    for lane in range(32):
        for i in range(elems.shape[-1]):
            r, c = mma.a_position(lane, i, precision)
            for ob in range(wa.shape[0]):
                back[ob * 16 + r, c::p.tile_k] = elems[ob, :, lane, i]
    want = np.zeros((p.np_, p.kp), np.float32)
    want[:n, :k] = mma.round_to(w, precision).T
    np.testing.assert_array_equal(back, want)


def _twin(m, k, n, precision, **flags):
    func = mma.build(m, k, n, precision, emulate=True, **flags)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                       target=tvm.target.Target({"kind": "llvm"}))


@pytest.mark.parametrize("precision,m,k,n,epilogue", [
    ("tf32", 1, 40, 24, "none"),                  # batch 1: one token of a tile of 8
    ("tf32", 33, 100, 70, "bias+relu"),           # M, K, N all partial tiles; K split 3 ways
    ("bf16", 9, 144, 130, "bias+residual+gelu"),  # K split 2 ways
    ("bf16", 300, 48, 2048, "none"),              # two A tiles per warp (a full grid)
])
def test_twin_matches_numpy(precision, m, k, n, epilogue):
    """The twin against numpy on the rounded inputs (float64 sums): close to that, and
    measurably off the unrounded fp32 product, so the rounding is the hardware's."""
    rng = np.random.default_rng(m + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    act = {"bias+relu": RELU, "bias+residual+gelu": Activation(gelu=True)}.get(epilogue)
    flags = dict(bias="bias" in epilogue, residual="residual" in epilogue, act=act)
    p = mma.plan(m, k, n, precision)
    assert (p.mt, p.splits) == {24: (1, 1), 70: (1, 3), 130: (1, 2), 2048: (2, 1)}[n]
    args = [x, mma.pack_weight(w, p)] + [bias] * flags["bias"] + [res] * flags["residual"]
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    _twin(m, k, n, precision, **flags)["main"](*[tvm.runtime.tensor(a) for a in args], out)

    def finish(acc):
        y = acc + (bias if flags["bias"] else 0) + (res if flags["residual"] else 0)
        if act == RELU:
            return np.maximum(y, 0)
        if act is not None:
            return 0.5 * y * (1 + np.vectorize(math.erf)(y / np.sqrt(2)))
        return y

    rounded = finish(mma.round_to(x, precision).astype(np.float64)
                     @ mma.round_to(w, precision).astype(np.float64))
    exact = finish(x.astype(np.float64) @ w.astype(np.float64))
    peak = np.abs(rounded).max()
    err = np.abs(out.numpy() - rounded).max()
    assert err < 1e-6 * np.sqrt(k) * peak
    assert np.abs(out.numpy() - exact).max() > 10 * err


@pytest.mark.parametrize("precision,conv,epilogue", [
    # stride, asymmetric padding and dilation; two images
    ("tf32", (2, 5, 9, 7, 20, 3, 3, (2, 1), (1, 1, 1, 0), (1, 2)), "bias+relu"),
    ("bf16", (1, 16, 6, 6, 24, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)), "bias+residual"),
])
def test_conv_twin_matches_torch(precision, conv, epilogue):
    """A convolution as an implicit GEMM: the twin against torch's conv2d (float64) on the
    rounded inputs."""
    import torch

    from sparsec.targets.kernels.conv2d import ConvShape

    cs = ConvShape(*conv)
    m, k, n = mma.conv_gemm(cs)
    oh, ow = cs.out_hw
    rng = np.random.default_rng(k)
    x = rng.standard_normal((cs.n, cs.ic, cs.h, cs.w)).astype(np.float32)
    w = rng.standard_normal((cs.oc, cs.ic, cs.kh, cs.kw)).astype(np.float32)
    bias = rng.standard_normal(cs.oc).astype(np.float32)
    res = rng.standard_normal((cs.n, cs.oc, oh, ow)).astype(np.float32)
    flags = dict(bias=True, residual="residual" in epilogue,
                 act=RELU if "relu" in epilogue else None)
    func = mma.twin(mma.build(m, k, n, precision, conv=cs, **flags))   # via its attributes
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target({"kind": "llvm"}))
    args = [x, mma.pack_weight(w.reshape(n, k).T, mma.plan(m, k, n, precision)), bias] + [
        res] * flags["residual"]
    out = tvm.runtime.tensor(np.zeros((cs.n, cs.oc, oh, ow), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    pt, pl, pb, pr = cs.padding
    padded = torch.nn.functional.pad(torch.from_numpy(mma.round_to(x, precision)).double(),
                                     (pl, pr, pt, pb))
    want = torch.nn.functional.conv2d(
        padded, torch.from_numpy(mma.round_to(w, precision)).double(),
        torch.from_numpy(bias).double(), stride=cs.stride, dilation=cs.dilation).numpy()
    want = want + (res if flags["residual"] else 0)
    want = np.maximum(want, 0) if flags["act"] else want
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("precision,batch,m,k,n,transposed", [
    ("tf32", 6, 20, 64, 20, True),      # Q @ K^T: K read in place, untransposed
    ("bf16", 3, 33, 40, 70, False),     # P @ V
])
def test_batched_twin_matches_numpy(precision, batch, m, k, n, transposed):
    """A matmul of two run-time tensors (attention): both operands rounded in the kernel."""
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, m, k)).astype(np.float32)
    w = rng.standard_normal((batch, n, k) if transposed else (batch, k, n)).astype(np.float32)
    func = mma.twin(mma.build(m, k, n, precision, batch=batch, b_transposed=transposed))
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros((batch, m, n), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    w_kn = np.swapaxes(w, 1, 2) if transposed else w
    want = (mma.round_to(x, precision).astype(np.float64)
            @ mma.round_to(w_kn, precision).astype(np.float64))
    err = np.abs(out.numpy() - want).max()
    assert err < 1e-6 * np.sqrt(k) * np.abs(want).max()
    assert np.abs(out.numpy() - x.astype(np.float64) @ w_kn).max() > 10 * err


@needs_nvcc
@pytest.mark.parametrize("precision,arch,conv", [
    ("tf32", "sm_80", None), ("bf16", "sm_90", None),
    ("tf32", "sm_90", (2, 5, 9, 7, 20, 3, 3, (2, 1), (1, 1, 1, 0), (1, 2))),   # padded taps
    ("bf16", "sm_80", "batched"),                                               # attention
])
def test_kernel_compiles_with_nvcc(precision, arch, conv, tmp_path):
    """nvcc compiles the CUDA TVM emits to SASS (ptxas checks the instruction and its
    operands for the architecture) and to PTX, which holds the tensor-core instruction for
    the precision's shape, not the other's; the weights arrive as 128-bit loads."""
    from sparsec.targets.cuda import compile_fatbin, kernel_source, nvcc
    from sparsec.targets.kernels.conv2d import ConvShape

    if conv is None:
        func = mma.build(100, 768, 768, precision, bias=True, act=RELU)   # a partial tile
    elif conv == "batched":
        func = mma.build(100, 64, 100, precision, batch=12, b_transposed=True)
    else:
        cs = ConvShape(*conv)
        func = mma.build(*mma.conv_gemm(cs), precision, bias=True, act=RELU, conv=cs)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                     target=tvm.target.Target({"kind": "cuda", "arch": arch}))
    source = kernel_source(ex)
    assert ("*(uint4*)(Wa_ptr + " in source) == (conv != "batched")
    resources = compile_fatbin(source, arch, tmp_path / "k.fatbin")
    assert all(r["spill_bytes"] == 0 for r in resources.values())
    # the epilogue (bias, ReLU) runs in the GEMM's stores unless K is split: then a second
    # kernel sums the parts
    assert len(resources) == (2 if conv is None else 1)
    (tmp_path / "k.cu").write_text(source)
    subprocess.run([nvcc(), "-ptx", f"-arch={arch}", str(tmp_path / "k.cu"), "-o",
                    str(tmp_path / "k.ptx")], check=True, capture_output=True)
    ptx = (tmp_path / "k.ptx").read_text()
    other = "bf16" if precision == "tf32" else "tf32"
    assert mma.INSTRUCTION[precision] in ptx and mma.INSTRUCTION[other] not in ptx
    assert f".target {arch}" in ptx


def _linear_model(m: int, k: int, n: int, path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


@needs_nvcc
def test_cuda_compile_runs_linear_layers_on_tensor_cores(tmp_path, capsys):
    """tf32 is the CUDA default: the linear layer runs mma_cuda, the report says so per
    kernel and in its log line, and the package takes the tf32 tolerance and passes its
    reference check through the CPU twin; bf16 when asked; fp32 and a GPU without the
    instructions (sm_75) keep DLight's exact schedule."""
    from sparsec import api
    from sparsec.targets import cuda_available

    model = _linear_model(20, 96, 48, tmp_path / "m.onnx")
    logs: list[str] = []
    tf32 = api.compile(model, tmp_path / "tf32", target="cuda-sm80", log=logs.append)
    (decision,) = tf32["compile"]["decisions"]
    assert decision["chosen"] == mma.NAME and decision["precision"] == "tf32"
    assert decision["tensor_cores"] == mma.INSTRUCTION["tf32"] and decision["epilogue"] == ["bias"]
    assert tf32["compile"]["precision"] == "tf32" and "precision_asked" not in tf32["compile"]
    ref = tf32["reference"]
    assert (ref["rtol"], ref["atol"], ref["min_cosine"]) == (
        api.RTOL_TF32, api.ATOL_TF32, api.TF32_MIN_COSINE)
    assert ref["check"]["ok"] and 0 < ref["check"]["max_abs_err"]
    assert ref["check"]["via"] == ("cuda" if cuda_available() else "cuda-schedules-on-cpu")
    assert "tensor cores: 1 of 1 matmuls and convolutions (1 mma_cuda tf32)" in logs
    assert any(line.startswith("precision tf32, the CUDA default") for line in logs)
    assert mma.INSTRUCTION["tf32"] in (tmp_path / "tf32" / "kernels.cu").read_text()
    from sparsec.cli import main

    assert main(["inspect", str(tmp_path / "tf32")]) == 0      # the package says it too
    shown = capsys.readouterr().out
    assert "tensor cores 1 of 1 matmuls and convolutions (1 mma_cuda tf32)" in shown
    assert "precision tf32 inputs, fp32 sums in 1 kernels (mma_cuda)" in shown

    bf16 = api.compile(model, tmp_path / "bf16", target="cuda-sm90", precision="bf16")
    assert bf16["compile"]["decisions"][0]["precision"] == "bf16"
    assert bf16["compile"]["precision"] == "bf16" and bf16["reference"]["check"]["ok"]
    assert bf16["reference"]["rtol"] >= api.RTOL_BF16

    from sparsec.targets.cuda import tensor_core_summary

    # a conv none of sparsec's kernels takes keeps the Relax op's name in its decision
    assert tensor_core_summary([{"op": "nn.conv2d", "chosen": "fallback"}] + tf32["compile"][
        "decisions"]) == ("1 of 2 matmuls and convolutions (1 mma_cuda tf32); fp32 without "
                          "tensor cores: 1 conv2d on DLight")
    fp32 = api.compile(model, tmp_path / "fp32", target="cuda-sm80", precision="fp32")
    assert fp32["compile"]["decisions"][0]["chosen"] == "fallback"
    assert fp32["reference"]["rtol"] == api.RTOL and "min_cosine" not in fp32["reference"]
    assert fp32["reference"]["check"]["max_abs_err"] < ref["check"]["max_abs_err"]

    logs.clear()
    turing = api.compile(model, tmp_path / "sm75", target='{"kind": "cuda", "arch": "sm_75"}',
                         log=logs.append)
    assert turing["compile"]["precision"] == "fp32"
    assert turing["compile"]["precision_asked"] == "tf32"
    assert any("no kernel computes in tf32" in line for line in logs)


def test_tf32_is_for_cuda_targets(tmp_path):
    from sparsec import api
    from sparsec.errors import BadOptionError

    with pytest.raises(BadOptionError, match="tf32 is for CUDA targets") as info:
        api.compile(EXAMPLES / "digits_mlp.onnx", tmp_path / "o", precision="tf32")
    assert info.value.exit_code == 6 and not (tmp_path / "o").exists()
