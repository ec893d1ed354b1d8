"""AMX bf16 tile kernels (``kernels/amx.py``) and the ``x86-amx`` target, against real TVM, numpy,
torch's bf16 rounding and ONNX Runtime.

Every tile program runs twice where the CPU has AMX (Sapphire Rapids or newer): on the AMX
instructions and with each tile op emulated in TIR, both against numpy / torch. Elsewhere the
hardware kernel is compiled and its instructions checked, and the emulated program runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
import tvm  # noqa: E402

from sparsec.targets import cpu_flags, resolve_target  # noqa: E402
from sparsec.targets.kernels import amx  # noqa: E402
from sparsec.targets.kernels.common import RELU, Activation  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402

REPO_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
AMX_OPS = ("ldtilecfg", "tilezero", "tileloadd", "tdpbf16ps", "tilestored", "tilerelease")
HERE = "amx_bf16" in cpu_flags() and "amx_tile" in cpu_flags()
SPR = {"kind": "llvm", "mcpu": "sapphirerapids"}


#: each tile program runs emulated here, and on the AMX instructions where the CPU has them
BOTH = pytest.mark.parametrize("emulate", [
    pytest.param(True, id="emulated"),
    pytest.param(False, id="hardware", marks=pytest.mark.skipif(
        not HERE, reason="this CPU has no AMX: the hardware kernel is only compiled"))])


def _target(emulate: bool) -> dict:
    if not emulate:
        from sparsec.targets.host import request_amx

        assert request_amx()
    return {"kind": "llvm"} if emulate else SPR


def _lib(func, target: dict):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=tvm.target.Target(target))


def _run(lib, *arrays):
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


def _reference(x, w, bias=None, residual=None, act=None):
    """The product of the bf16-rounded operands, summed exactly (float64), then the epilogue."""
    y = amx.bf16_round(x).astype(np.float64) @ amx.bf16_round(w).astype(np.float64)
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = y + residual
    if act is not None and act.low is not None:
        y = np.maximum(y, act.low)
    if act is not None and act.high is not None:
        y = np.minimum(y, act.high)
    if act is not None and act.gelu:
        import torch

        y = torch.nn.functional.gelu(torch.from_numpy(y)).numpy()
    return y


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)).astype(np.float32),
            rng.standard_normal((k, n)).astype(np.float32),
            rng.standard_normal(n).astype(np.float32),
            rng.standard_normal((m, n)).astype(np.float32))


# --------------------------------------------------------------------------- data layout


def test_bf16_rounding_matches_torch():
    """Round to nearest even, ties included, as torch's (and the hardware's) conversion."""
    import torch

    rng = np.random.default_rng(0)
    base = (rng.standard_normal(4096) * 10.0 ** rng.integers(-8, 8, 4096)).astype(np.float32)
    bits = base.view(np.uint32)
    ties = ((bits & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)  # halfway
    x = np.concatenate([base, ties, np.float32([0.0, -0.0, 1.0, 65504.0, 1e-38])])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(amx.bf16_bits(x), want)


def test_pack_weight_is_amx_pair_layout():
    """Tile (nb, kb), row p, column 2c + j holds W[kb*32 + 2p + j, nb*16 + c] (zero padded)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((45, 21)).astype(np.float32)
    p = amx.plan(3, 45, 21)
    packed = amx.pack_weight(w, p)
    assert packed.shape == (p.np_ // 16, p.kp // 32, 16, 32) and packed.dtype == np.uint16
    bits = amx.bf16_bits(w)
    for nb, kb, row, col in np.ndindex(packed.shape):
        kk, nn = kb * 32 + 2 * row + col % 2, nb * 16 + col // 2
        want = bits[kk, nn] if kk < 45 and nn < 21 else 0
        assert packed[nb, kb, row, col] == want


def test_plan_fits_the_tile_registers():
    for m, k, n in [(1, 64, 10), (16, 32, 16), (17, 40, 100), (128, 768, 3072)]:
        p = amx.plan(m, k, n)
        assert p.mt * p.nt + p.mt + p.nt <= amx.TILES
        assert p.mp >= m and p.kp % 32 == 0 and p.np_ % 16 == 0 and p.np_ >= n
    assert (amx.plan(128, 768, 768).mt, amx.plan(128, 768, 768).nt) == (2, 2)
    assert amx.plan(1, 64, 256).rows == 1
    # the widest block that divides the column tiles: no task computes padding
    assert [amx.plan(8, 32, n).nt for n in (48, 64, 80, 16)] == [3, 2, 1, 1]
    assert [amx.plan(64, 32, n).nt for n in (64, 48)] == [2, 1]
    with pytest.raises(ValueError, match="tile registers"):
        amx.plan(64, 64, 64, mt=2, nt=3)


# --------------------------------------------------------------------------- kernel numerics


@pytest.mark.parametrize("m,k,n,tiles", [
    (1, 64, 256, None),          # batch-1 linear: 1-row tiles
    (7, 100, 40, None),          # K and N not whole tiles
    (16, 32, 16, None),          # exactly one tile of each
    (33, 200, 50, None),         # M not whole tiles, 2x2 blocks
    (128, 768, 96, None),        # an encoder's projection
    (40, 96, 64, (1, 3)),
    (40, 96, 64, (2, 1)),
])
@BOTH
def test_tile_kernel_matches_numpy(m, k, n, tiles, emulate):
    x, w, _, _ = _operands(m, k, n)
    mt, nt = tiles or (None, None)
    p = amx.plan(m, k, n, mt, nt)
    lib = _lib(amx.build(m, k, n, mt=mt, nt=nt, emulate=emulate), _target(emulate))
    out = _run(lib, x, amx.pack_weight(w, p), np.zeros((m, n), np.float32))
    ref = _reference(x, w)
    # fp32 sums of exact products: only the summation order differs from float64
    assert np.abs(out - ref).max() <= 1e-6 * np.sqrt(k) * np.abs(ref).max()
    # and bf16 is what makes it differ from the fp32 product
    assert np.abs(out - x @ w).max() > 10 * np.abs(out - ref).max()


@pytest.mark.parametrize("flags", [
    {"bias": True, "act": RELU},
    {"bias": True, "residual": True},
    {"act": Activation(0.0, 6.0)},
    {"bias": True, "act": Activation(gelu=True)},
])
@BOTH
def test_tile_kernel_epilogues(flags, emulate):
    m, k, n = 20, 72, 48
    x, w, bias, res = _operands(m, k, n, seed=3)
    p = amx.plan(m, k, n)
    lib = _lib(amx.build(m, k, n, emulate=emulate, **flags), _target(emulate))
    args = [x, amx.pack_weight(w, p)] + ([bias] if flags.get("bias") else []) + (
        [res] if flags.get("residual") else []) + [np.zeros((m, n), np.float32)]
    out = _run(lib, *args)
    ref = _reference(x, w, bias if flags.get("bias") else None,
                     res if flags.get("residual") else None, flags.get("act"))
    np.testing.assert_allclose(out, ref, atol=2e-4 * np.abs(ref).max())


def test_emulation_catches_a_wrong_pair_layout():
    """The numerics test can fail: weights with the two halves of each pair swapped give
    another product."""
    m, k, n = 16, 64, 32
    x, w, _, _ = _operands(m, k, n, seed=5)
    p = amx.plan(m, k, n)
    swapped = amx.pack_weight(w, p).reshape(-1, 2)[:, ::-1].reshape(
        amx.pack_weight(w, p).shape).copy()
    lib = _lib(amx.build(m, k, n, emulate=True), {"kind": "llvm"})
    out = _run(lib, x, swapped, np.zeros((m, n), np.float32))
    assert np.abs(out - _reference(x, w)).max() > 0.1


# --------------------------------------------------------------------------- sparse (SparAMX)


def _sparse_weight(k, n, density, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random((k, n)) >= density] = 0.0
    return w


def test_sparse_format_round_trip():
    """Masks + kept values expand back to exactly the dense tiles; -0.0 is dropped (exact),
    and the bytes are the values, 4 bytes of mask per 32 weights and one offset per tile."""
    w = _sparse_weight(100, 40, 0.3, seed=2)
    w[0, :5] = -0.0
    p = amx.plan(1, 100, 40)
    sw = amx.pack_sparse(w, p)
    dense = amx.pack_weight(w, p)
    signed_zero = (dense & np.uint16(0x7FFF)) == 0
    np.testing.assert_array_equal(amx.unpack_sparse(sw), np.where(signed_zero, 0, dense))
    assert sw.nnz == int(np.count_nonzero(w))
    tiles = (p.np_ // 16) * (p.kp // 32)
    assert sw.nbytes == 2 * (sw.nnz + 32) + tiles * 16 * 4 + tiles * 4
    assert sw.offsets[0, 0] == 0 and np.all(np.diff(sw.offsets.reshape(-1)) >= 0)


def test_tuner_times_sparse_kernels_on_a_consistent_weight():
    """The tuner's random weight for ``sparse_amx_bf16`` has exactly the kernel's kept count,
    with masks and offsets that agree (random ones would read out of bounds)."""
    from sparsec.targets import tuning

    shape = {"m": 1, "k": 100, "n": 40, "nnz": 700, "dtype": "float32"}
    for knobs in tuning._variants(amx.SPARSE_NAME, shape):     # each tile block's own grid
        with amx.emulated():
            func = tuning.build(amx.SPARSE_NAME, shape, knobs, bias=True, act=RELU)
        _, values, masks, offsets, _, _ = (a.numpy() for a in tuning._random_args(func))
        sw = amx.SparseWeight(values, masks, offsets)
        assert sw.nnz == 700 and np.count_nonzero(amx.unpack_sparse(sw)) == 700
        counts = [bin(int(v)).count("1") for v in masks.reshape(-1)]
        assert list(offsets.reshape(-1)) == list(np.cumsum([0] + counts)[:-1][::16])
        assert tuning.time_kernel(func, {"kind": "llvm"}, min_ms=1) > 0


@pytest.mark.parametrize("m,k,n,density", [
    (1, 768, 384, 0.1),     # a decoding step at 90 % sparsity
    (4, 100, 40, 0.5),      # K and N not whole tiles
    (16, 64, 48, 0.0),      # every tile empty: offsets all point at the zero row
    (3, 64, 200, 1.0),      # nothing to drop
])
@BOTH
def test_sparse_tile_kernel_matches_numpy(m, k, n, density, emulate):
    x, _, bias, _ = _operands(m, k, n, seed=4)
    w = _sparse_weight(k, n, density, seed=4)
    p = amx.plan(m, k, n)
    sw = amx.pack_sparse(w, p)
    func = amx.build(m, k, n, bias=True, act=RELU, emulate=emulate, nnz=sw.nnz)
    out = _run(_lib(func, _target(emulate)), x, sw.values, sw.masks, sw.offsets, bias,
               np.zeros((m, n), np.float32))
    ref = _reference(x, w, bias, act=RELU)
    np.testing.assert_allclose(out, ref, atol=1e-6 * np.sqrt(k) * max(np.abs(ref).max(), 1))


def test_sparse_kernel_expands_with_vpexpandw():
    """The hardware build expands each tile row with one masked expand load; the same
    expansion runs natively in the emulated build on a CPU with AVX-512 VBMI2 (this one)."""
    func = amx.build(1, 768, 768, nnz=1000)
    asm = _asm(func)
    assert asm.count("vpexpandw") == 16 * amx.plan(1, 768, 768).nt    # rows x B tiles
    assert "tdpbf16ps" in asm
    if "avx512_vbmi2" in cpu_flags():
        host = _lib(amx.build(1, 768, 768, nnz=1000, emulate=True),
                    resolve_target("host").tvm_target).mod.inspect_source("asm")
        assert "vpexpandw" in host and "tdpbf16ps" not in host


@pytest.mark.parametrize("batch,m,k,n,transposed", [
    (2, 8, 16, 8, True),          # attention's Q @ K^T, K read untransposed
    (12, 128, 64, 128, True),     # BERT-base at sequence 128
    (12, 128, 128, 64, False),    # P @ V
    (3, 7, 33, 20, False),        # nothing whole
])
@BOTH
def test_tile_batch_matmul_matches_numpy(batch, m, k, n, transposed, emulate):
    rng = np.random.default_rng(batch)
    a = rng.standard_normal((batch, m, k)).astype(np.float32)
    b = rng.standard_normal((batch, k, n)).astype(np.float32)
    res = rng.standard_normal((batch, m, n)).astype(np.float32)
    func = amx.build_batch(batch, m, k, n, residual=True, b_transposed=transposed,
                           emulate=emulate)
    operand = np.ascontiguousarray(b.transpose(0, 2, 1)) if transposed else b
    out = _run(_lib(func, _target(emulate)), a, operand, res,
               np.zeros((batch, m, n), np.float32))
    ref = amx.bf16_round(a).astype(np.float64) @ amx.bf16_round(b).astype(np.float64) + res
    assert np.abs(out - ref).max() <= 1e-6 * np.sqrt(k) * np.abs(ref).max()


# --------------------------------------------------------------------------- convolutions


@pytest.mark.parametrize("geometry", [
    (1, 16, 14, 14, 32, 3, 1, 1, 1),      # 3x3, pad 1
    (2, 3, 17, 19, 20, 3, 2, 1, 1),       # a stem: 3 input channels, stride 2, batch 2
    (1, 24, 8, 8, 8, 1, 1, 0, 1),         # pointwise, fewer than 16 output channels
    (1, 10, 9, 9, 40, 5, 1, 4, 2),        # 5x5, dilation 2
])
@BOTH
def test_tile_conv_matches_torch(geometry, emulate):
    import torch

    from sparsec.targets.kernels.conv2d import ConvShape

    n, ic, h, w, oc, k, stride, pad, dil = geometry
    s = ConvShape(n, ic, h, w, oc, k, k, (stride, stride), (pad,) * 4, (dil, dil))
    rng = np.random.default_rng(ic)
    x = rng.standard_normal((n, ic, h, w)).astype(np.float32)
    wt = rng.standard_normal((oc, ic, k, k)).astype(np.float32)
    bias = rng.standard_normal(oc).astype(np.float32)
    oh, ow = s.out_hw
    res = rng.standard_normal((n, oc, oh, ow)).astype(np.float32)
    func = amx.build_conv(s, bias=True, residual=True, act=RELU, emulate=emulate)
    out = _run(_lib(func, _target(emulate)), x, amx.pack_conv_weight(wt, amx.conv_plan(s)),
               bias, res, np.zeros((n, oc, oh, ow), np.float32))
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(amx.bf16_round(x).astype(np.float64)),
        torch.from_numpy(amx.bf16_round(wt).astype(np.float64)),
        torch.from_numpy(bias.astype(np.float64)), stride=stride, padding=pad,
        dilation=dil).numpy()
    ref = np.maximum(ref + res, 0)
    np.testing.assert_allclose(out, ref, atol=1e-6 * np.sqrt(ic * k * k) * np.abs(ref).max())


def test_hardware_conv_uses_amx_tiles():
    from sparsec.targets.kernels.conv2d import ConvShape

    s = ConvShape(1, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    asm = _asm(amx.build_conv(s, bias=True))
    assert set(re.findall(r"\b(" + "|".join(AMX_OPS) + r")\b", asm)) == set(AMX_OPS)


def test_compile_cnn_for_amx(tmp_path):
    """Every conv of the digits CNN on AMX tiles (the depthwise-free residual CNN: 6 convs),
    checked against ONNX Runtime with the tile ops emulated."""
    from sparsec import api

    manifest = api.compile(REPO_EXAMPLES / "digits_cnn.onnx", tmp_path / "pkg", target="x86-amx")
    convs = [d for d in manifest["compile"]["decisions"] if d["op"] == "conv2d"]
    assert len(convs) == 6 and all(d["chosen"] == amx.CONV_NAME for d in convs)
    assert all(d["precision"] == "bf16" and d["shape"]["variant"] == "im2col" for d in convs)
    assert manifest["reference"]["check"]["ok"]


# --------------------------------------------------------------------------- hardware code


def _asm(func) -> str:
    return _lib(func, SPR).mod.inspect_source("asm")


def test_hardware_kernel_uses_amx_tiles():
    asm = _asm(amx.build(128, 768, 768, bias=True, act=RELU))
    found = set(re.findall(r"\b(" + "|".join(AMX_OPS) + r")\b", asm))
    assert found == set(AMX_OPS)
    # the K loop of a 2x2 block: 4 tile loads feed 4 tdpbf16ps, every C tile in a register
    assert set(re.findall(r"tdpbf16ps\s+%tmm\d, %tmm\d, (%tmm\d)", asm)) == {
        "%tmm0", "%tmm1", "%tmm2", "%tmm3"}
    # the emulated twin is plain vector code
    assert not re.search(r"\b(tdpbf16ps|ldtilecfg)\b", _asm(amx.build(128, 768, 768,
                                                                       emulate=True)))


def _compacted_acc_shape(func) -> list[int]:
    """The shape TVM's buffer compaction (part of every build) leaves the C tiles' ``acc``."""
    from tvm import s_tir

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    mod = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation()])(mod)
    (shape,) = re.findall(r"\bacc = T\.\w+\(\(([^)]*)\)", mod["main"].script())
    return [int(d) for d in shape.split(",")]


@pytest.mark.parametrize("emulate", [False, True])
def test_tile_stores_keep_the_whole_c_buffer(emulate):
    """Tile stores write 16-row tiles with the padded row stride, so ``acc`` must keep its
    padded shape where the epilogue reads less of it (M, N, OC or OH*OW off the tile grid).
    The hardware ops once addressed it as ``&acc[r, c]``, and TVM shrank it to the rows and
    columns read: wrong rows and a corrupted heap on the first AMX machine (runs anywhere)."""
    from sparsec.targets.kernels.conv2d import ConvShape

    p = amx.plan(33, 200, 50)
    assert _compacted_acc_shape(amx.build(33, 200, 50, emulate=emulate)) == [p.mp, p.np_]
    s = ConvShape(1, 5, 9, 9, 20, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    p = amx.conv_plan(s)
    assert _compacted_acc_shape(amx.build_conv(s, emulate=emulate)) == [1, p.mp, p.np_]
    p = amx.plan(20, 40, 24)
    assert _compacted_acc_shape(amx.build_batch(3, 20, 40, 24, emulate=emulate)) == [
        3, p.mp, p.np_]


@pytest.mark.skipif(not HERE, reason="this CPU has no AMX: the hardware kernel is only compiled")
def test_hardware_kernel_matches_its_emulation():
    from sparsec.targets.host import request_amx

    assert request_amx()
    m, k, n = 33, 200, 50
    x, w, bias, _ = _operands(m, k, n, seed=7)
    p = amx.plan(m, k, n)
    args = [x, amx.pack_weight(w, p), bias, np.zeros((m, n), np.float32)]
    hw = _run(_lib(amx.build(m, k, n, bias=True), SPR), *args)
    emu = _run(_lib(amx.build(m, k, n, bias=True, emulate=True), {"kind": "llvm"}), *args)
    np.testing.assert_allclose(hw, emu, rtol=1e-5, atol=1e-5)


def test_request_amx_only_where_the_cpu_has_it():
    from sparsec.targets.host import request_amx

    assert request_amx() is ("amx_tile" in cpu_flags())


# --------------------------------------------------------------------------- the target


def test_x86_amx_target():
    spec = resolve_target("x86-amx")
    assert spec.tvm_target["mcpu"] == "sapphirerapids" and spec.channel_multiple == 16
    assert {"amx_tile", "amx_bf16", "avx512f"} <= spec.cpu_flags and spec.precision == "bf16"
    assert spec.runs_here is HERE and spec.amx_emulated_here is not HERE
    assert not resolve_target("x86-avx512").amx_emulated_here
    # the same CPU named otherwise defaults to fp32
    raw = resolve_target('{"kind": "llvm", "mcpu": "sapphirerapids"}')
    assert raw.precision == "fp32" and resolve_target("host").precision == "fp32"


@pytest.fixture(scope="module")
def amx_package(tmp_path_factory):
    import onnx

    from sparsec import api

    root = tmp_path_factory.mktemp("amx")
    onnx.save(zoo.build("hf_bert"), str(root / "bert.onnx"))
    logs: list[str] = []
    manifest = api.compile(root / "bert.onnx", target="x86-amx", output_dir=root / "pkg",
                           log=logs.append)
    return root / "pkg", manifest, logs


def test_compile_for_amx_checks_the_tile_programs(amx_package):
    """A small BERT compiled for x86-amx: every linear layer on bf16 tiles, the package's
    reference pair checked against ONNX Runtime (natively where the CPU has AMX, else with
    the tile ops emulated) with the bf16 tolerance, which the header records too."""
    from sparsec import api

    pkg, manifest, logs = amx_package
    decisions = [d for d in manifest["compile"]["decisions"] if d["chosen"] == amx.NAME]
    assert len(decisions) == 12 and all(d["precision"] == "bf16" for d in decisions)
    assert manifest["compile"]["kernels"][amx.NAME] == 12
    # attention's Q @ K^T and P @ V: 2 layers x 2
    attention = [d for d in manifest["compile"]["decisions"] if d["chosen"] == amx.BATCH_NAME]
    assert len(attention) == 4 and all(d["precision"] == "bf16" for d in attention)
    ref = manifest["reference"]
    assert (ref["rtol"], ref["atol"]) == (api.RTOL_BF16, api.ATOL_BF16)
    assert ref["min_cosine"] == api.BF16_MIN_COSINE
    want_via = "native" if HERE else "amx-tiles-emulated-on-cpu"
    assert ref["check"]["ok"] and ref["check"]["via"] == want_via
    assert ref["check"]["cosine"] > 0.9999
    assert any("(bf16 kernels: cosine" in line for line in logs)
    header = (pkg / manifest["library"]["header"]).read_text()
    assert f"{api.ATOL_BF16!r}, {api.RTOL_BF16!r}" in header


def test_bf16_check_accepts_rounding_not_garbage():
    """A bf16 output passes within the bf16 tolerance or at cosine >= 0.99 (deep networks
    lose more than 3 % of max|y| to bf16 alone); a wrong one fails either way. The device's
    tolerance then covers 1.5x the error measured."""
    from sparsec import api

    rng = np.random.default_rng(0)
    ref = rng.standard_normal(1000).astype(np.float32)
    spec = [{"name": "y"}]
    rounded = ref + 0.08 * rng.standard_normal(1000).astype(np.float32)   # cosine ~0.997
    args = (api.RTOL_BF16, api.ATOL_BF16)
    assert not api._compare(spec, [ref], [rounded], *args).ok           # beyond the bound
    check = api._compare(spec, [ref], [rounded], *args, api.BF16_MIN_COSINE)
    assert check.ok and check.outputs[0]["cosine"] > 0.99
    rtol = api.device_rtol(check)
    assert api._compare(spec, [ref], [rounded], rtol, api.ATOL_BF16).ok
    assert rtol * np.abs(ref).max() + api.ATOL_BF16 == pytest.approx(
        1.5 * check.outputs[0]["max_abs_err"])
    garbage = rng.standard_normal(1000).astype(np.float32)
    assert not api._compare(spec, [ref], [garbage], *args, api.BF16_MIN_COSINE).ok
    with pytest.raises(api.ValidationError, match="cosine .* < 0.99"):
        api._raise_if_mismatch(api._compare(spec, [ref], [garbage], *args,
                                            api.BF16_MIN_COSINE))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_dense_weights_keep_the_dense_amx_kernel(amx_package):
    """The bytes rule refuses the compressed format where it would not read less."""
    _, manifest, _ = amx_package
    for d in manifest["compile"]["decisions"]:
        assert amx.SPARSE_NAME not in d["candidates"]


def test_compile_sparse_mlp_for_amx(tmp_path):
    """80 % sparse batch-1 linear layers take the SparAMX kernel: the decisions report the
    bytes per weight, and the package passes its bf16 reference check."""
    from sparsec import api

    logs: list[str] = []
    manifest = api.compile(REPO_EXAMPLES / "digits_mlp.onnx", tmp_path / "pkg",
                           target="x86-amx", sparsity=0.8, log=logs.append)
    decisions = manifest["compile"]["decisions"]
    assert [d["chosen"] for d in decisions] == [amx.SPARSE_NAME] * 3
    for d in decisions:
        wb = d["weight_bytes"]
        assert wb["compressed"] * 4 <= wb["dense_bf16"] * 3 and d["bytes_per_weight"] < 1.0
    assert manifest["reference"]["check"]["ok"]
    shown = subprocess.run([sys.executable, "-m", "sparsec", "inspect", str(tmp_path / "pkg")],
                           capture_output=True, text=True, check=True).stdout
    assert "precision bf16 inputs, fp32 sums in 3 kernels (sparse_amx_bf16)" in shown


def test_amx_package_library_has_tile_code(amx_package):
    pkg, manifest, _ = amx_package
    asm = subprocess.run(["objdump", "-d", str(pkg / manifest["library"]["shared"])],
                         capture_output=True, text=True, check=True).stdout
    assert {"tdpbf16ps", "ldtilecfg", "tileloadd"} <= set(re.findall(r"\b(t\w+|ldtilecfg)\b",
                                                                      asm))


def test_amx_package_does_not_run_here_without_amx(amx_package, tmp_path):
    """Without AMX, ``sparsec validate`` says why in one line (exit code, no traceback); with
    it, the package validates on the tiles."""
    pkg, _, _ = amx_package
    proc = subprocess.run([sys.executable, "-m", "sparsec", "validate", str(pkg)],
                          capture_output=True, text=True)
    if HERE:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "lacks amx_bf16" in proc.stderr


@pytest.mark.parametrize("target", ["host", '{"kind": "llvm", "mcpu": "sapphirerapids"}'])
def test_amx_is_opt_in(target, tmp_path):
    """bf16 is lossy, so AMX kernels are opt-in: a host package (on any CPU, Sapphire Rapids
    included) and a package for that CPU named by raw JSON keep fp32 kernels and the fp32
    tolerance; with ``precision="bf16"`` the raw-JSON Sapphire Rapids takes the tiles and is
    checked on their emulation, like x86-amx."""
    import onnx

    from sparsec import api

    onnx.save(zoo.build("gemm_mlp"), str(tmp_path / "mlp.onnx"))
    manifest = api.compile(tmp_path / "mlp.onnx", target=target, output_dir=tmp_path / "pkg")
    text = json.dumps(manifest["compile"]["decisions"])
    assert "amx" not in text and "bf16" not in text
    assert manifest["reference"]["rtol"] == api.RTOL
    with pytest.raises(api.BadOptionError, match="--precision takes fp32 or bf16"):
        api.compile(tmp_path / "mlp.onnx", target=target, output_dir=tmp_path / "x",
                    precision="fp16")
    if target == "host" and not HERE:      # bf16 asked for, but no bf16 kernel applies
        logs: list[str] = []
        manifest = api.compile(tmp_path / "mlp.onnx", target=target,
                               output_dir=tmp_path / "bf16", precision="bf16", log=logs.append)
        assert manifest["reference"]["rtol"] == api.RTOL
        # the package says what it computes in (fp32), and what was allowed
        assert manifest["compile"]["precision"] == "fp32"
        assert manifest["compile"]["precision_asked"] == "bf16"
        assert any("no kernel computes in bf16" in line for line in logs)
    if "sapphirerapids" in target and not HERE:
        manifest = api.compile(tmp_path / "mlp.onnx", target=target,
                               output_dir=tmp_path / "bf16", precision="bf16")
        assert all(d["chosen"] in (amx.NAME, amx.SPARSE_NAME) and d["precision"] == "bf16"
                   for d in manifest["compile"]["decisions"])
        assert manifest["reference"]["check"]["via"] == "amx-tiles-emulated-on-cpu"
