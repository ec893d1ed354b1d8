"""``mma_sp_cuda`` (kernels/mma_sp.py): 2:4 sparse linear layers on NVIDIA sparse tensor cores.

The packing is checked against the fragment and metadata rules as TVM's own GPU test of
``mma.sp`` writes them (loops, lane by lane); the CPU twin, which runs those rules as the
instruction, against numpy; the CUDA kernel is compiled with nvcc for sm_80 and sm_90, and run
against its twin where this machine has a GPU."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
import tvm  # noqa: E402

from sparsec.targets import cuda_available  # noqa: E402
from sparsec.targets.kernels import amx, mma_sp  # noqa: E402
from sparsec.targets.kernels.common import RELU, Activation  # noqa: E402

HAS_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").is_file()
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc (CUDA toolkit) not installed")
MMA_SP = mma_sp.INSTRUCTION


def sparse_2_4(k: int, n: int, seed: int = 0) -> np.ndarray:
    """A random [K, N] weight keeping the 2 largest of every 4 inputs per output channel (and
    a few runs with fewer)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    runs = w[: k // 4 * 4].reshape(k // 4, 4, n)
    order = np.argsort(-np.abs(runs), axis=1)
    keep = np.zeros(runs.shape, bool)
    np.put_along_axis(keep, order[:, :2], True, axis=1)
    keep[0, :, :3] = False                    # empty runs
    keep[1, 1:, 3] = False                    # a run with one value
    w[: k // 4 * 4] = (runs * keep).reshape(-1, n)
    if k % 4:
        w[k // 4 * 4:] = 0.0
    return w


def _run_twin(m, k, n, w, x, mt=None, **flags):
    p = mma_sp.plan(m, k, n, mt)
    wa, we = mma_sp.pack_weight(w, p)
    func = mma_sp.build(m, k, n, emulate=True, mt=mt, **flags)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target({"kind": "llvm"}))
    return lib, [x, wa, we]


def _reference(x, w):
    return amx.bf16_round(x).astype(np.float64) @ amx.bf16_round(w).astype(np.float64)


def test_is_2_4():
    assert mma_sp.is_2_4(sparse_2_4(64, 8))
    assert mma_sp.is_2_4(sparse_2_4(30, 8))               # K padded to whole runs
    w = sparse_2_4(64, 8)
    w[4:7, 5] = 1.0                                        # three in one run
    assert not mma_sp.is_2_4(w)
    with pytest.raises(ValueError, match="not 2:4"):
        mma_sp.pack_weight(w, mma_sp.plan(16, 64, 8))


def test_packing_follows_the_fragment_and_metadata_rules():
    """One 16 x 32 tile, lane by lane, as TVM's GPU test of mma.sp builds its operands:
    A element i of lane l is compressed A[(i%4)//2*8 + l//4, i//4*8 + l%4*2 + i%2]; metadata
    word i*2 + h holds rows i and i+8's positions of K half h; lane l hands word l//4*2 + l%2."""
    w = sparse_2_4(32, 16, seed=3)
    wt = w.T                                               # [16 channels, 32 inputs]
    positions = np.zeros((16, 8, 2), np.uint32)
    compressed = np.zeros((16, 16), np.float32)
    for r in range(16):
        for g in range(8):
            nz = [j for j in range(4) if wt[r, 4 * g + j] != 0]
            pos = sorted((nz + [j for j in range(4) if j not in nz])[:2])
            positions[r, g] = pos
            compressed[r, 2 * g: 2 * g + 2] = wt[r, [4 * g + j for j in pos]]
    meta = np.zeros((8, 2), np.uint32)
    halves = positions.reshape(16, 2, 8)
    for i in range(8):
        for h in range(2):
            base = 1
            for blk in range(2):
                for j in range(8):
                    meta[i, h] |= int(halves[blk * 8 + i, h, j]) * base
                    base <<= 2
    meta = meta.reshape(16)
    wa, we = mma_sp.pack_weight(w, mma_sp.plan(16, 32, 16))
    bits = amx.bf16_bits(compressed)
    for lane in range(32):
        elems = [bits[(i % 4) // 2 * 8 + lane // 4, i // 4 * 8 + lane % 4 * 2 + i % 2]
                 for i in range(8)]
        words = [int(elems[2 * j]) | int(elems[2 * j + 1]) << 16 for j in range(4)]
        assert list(wa[0, 0, lane]) == words
        assert we[0, 0, lane, 0] == meta[lane // 4 * 2 + lane % 2]   # tile 0, K step 0


@pytest.mark.parametrize("m,k,n,mt", [
    (9, 32, 16, None),      # one tile of each, one row past a token tile, one stage
    (16, 64, 200, 4),       # four A tiles per warp, N padded to a block of 256
    (32, 100, 40, None),    # K and N not whole tiles (16-byte copies, the last one zeros)
    (40, 96, 130, 2),       # two token groups, a partial one; two A tiles per warp
    (24, 162, 70, 2),       # K not a multiple of 4 (4-byte copies), three stages (odd)
    (128, 768, 96, None),   # an encoder's projection at 128 tokens
])
def test_twin_matches_numpy(m, k, n, mt):
    """The twin stages X as the kernel does (copies, zero fill, double buffer), reads the
    fragments from the staged tile and runs the instruction's layouts: the product matches
    numpy's on bf16-rounded operands."""
    p = mma_sp.plan(m, k, n, mt)
    assert p.vec == (4 if k % 4 == 0 else 1) and p.mt == (mt or 1)
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = sparse_2_4(k, n, seed=m)
    lib, args = _run_twin(m, k, n, w, x, mt)
    arrays = [tvm.runtime.tensor(a) for a in args + [np.zeros((m, n), np.float32)]]
    lib["main"](*arrays)
    ref = _reference(x, w)
    np.testing.assert_allclose(arrays[-1].numpy(), ref, atol=1e-6 * np.sqrt(k) * np.abs(
        ref).max())


@pytest.mark.parametrize("flags", [{"bias": True, "act": RELU}, {"residual": True},
                                   {"bias": True, "act": Activation(gelu=True)}])
def test_twin_epilogues(flags):
    m, k, n = 24, 64, 48
    rng = np.random.default_rng(9)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    w = sparse_2_4(k, n, seed=9)
    lib, args = _run_twin(m, k, n, w, x, **flags)
    args += ([bias] if flags.get("bias") else []) + ([res] if flags.get("residual") else [])
    arrays = [tvm.runtime.tensor(a) for a in args + [np.zeros((m, n), np.float32)]]
    lib["main"](*arrays)
    ref = _reference(x, w) + (bias if flags.get("bias") else 0) + (
        res if flags.get("residual") else 0)
    act = flags.get("act")
    if act is RELU:
        ref = np.maximum(ref, 0)
    elif act is not None:
        import torch

        ref = torch.nn.functional.gelu(torch.from_numpy(ref)).numpy()
    np.testing.assert_allclose(arrays[-1].numpy(), ref, atol=2e-4 * np.abs(ref).max())


def test_the_twin_of_a_kernel_keeps_its_activation():
    """``twin`` rebuilds a CUDA kernel's CPU twin from the arguments it recorded: a SiLU
    epilogue must survive the round trip (it was dropped, the twin computing no activation)."""
    m, k, n = 24, 64, 48
    rng = np.random.default_rng(11)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = sparse_2_4(k, n, seed=11)
    func = mma_sp.build(m, k, n, act=Activation(silu=True))
    lib = tvm.compile(tvm.IRModule({"main": mma_sp.twin(func).with_attr("global_symbol",
                                                                          "main")}),
                      target=tvm.target.Target({"kind": "llvm"}))
    wa, we = mma_sp.pack_weight(w, mma_sp.plan(m, k, n))
    arrays = [tvm.runtime.tensor(a) for a in (x, wa, we, np.zeros((m, n), np.float32))]
    lib["main"](*arrays)
    ref = _reference(x, w)
    np.testing.assert_allclose(arrays[-1].numpy(), ref / (1 + np.exp(-ref)),
                               atol=2e-4 * np.abs(ref).max())


def test_twin_catches_wrong_metadata():
    """The twin reads the metadata: rows q and q+8 swapped in it give another product."""
    m, k, n = 16, 64, 32
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    w = sparse_2_4(k, n, seed=1)
    lib, args = _run_twin(m, k, n, w, x)
    we = args[2]
    args[2] = ((we >> 16) | (we << 16)).astype(np.uint32)
    arrays = [tvm.runtime.tensor(a) for a in args + [np.zeros((m, n), np.float32)]]
    lib["main"](*arrays)
    assert np.abs(arrays[-1].numpy() - _reference(x, w)).max() > 0.1


@needs_nvcc
@pytest.mark.parametrize("arch,m,k,n,mt", [
    ("sm_80", 128, 768, 3072, 1), ("sm_90", 512, 768, 3072, 4),
    ("sm_80", 40, 162, 70, 1),      # copies past M and K: predicated, zero-filling, 4 bytes
])
def test_kernel_compiles_with_nvcc(arch, m, k, n, mt, tmp_path):
    """A BERT-sized 2:4 layer (768 -> 3072) at 128 and 512 tokens, and a ragged one: X staged
    with cp.async copies (16 bytes, or 4 where K is not a multiple of 4) and barriers, a warp
    tile of ``mt`` A tiles x 4 token tiles (that many mma.sp per K step, unrolled), and
    ptxas spills nothing. (The ragged shape's copy predicates once broke TVM's codegen,
    which read a cast predicate as the "no predicate" constant.)"""
    from sparsec.targets.cuda import compile_fatbin, kernel_source

    p = mma_sp.plan(m, k, n)
    assert (p.mt, p.nt) == (mt, 4)
    func = mma_sp.build(m, k, n, bias=True, act=RELU)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                     target=tvm.target.Target({"kind": "cuda", "arch": arch}))
    source = kernel_source(ex)
    assert source.count(MMA_SP) == 1                     # the instruction's one helper
    helper = re.search(r"void (\w*mma_sp\w*)\(", source).group(1)
    assert source.count(helper + "(") - 1 == mt * p.nt * mma_sp.STEPS   # calls per stage
    copy = "cp.async.cg.shared.global" if k % 4 == 0 else "cp.async.ca.shared.global"
    assert copy in source and "__syncthreads" in source
    assert "*(uint4*)(Wa" in source                      # A fragments: 128-bit loads
    assert "main_kernel_1" not in source                 # bias and ReLU in the GEMM's stores
    resources = compile_fatbin(source, arch, tmp_path / "k.fatbin")
    assert all(r["spill_bytes"] == 0 for r in resources.values())


@needs_nvcc
def test_compile_2_4_linear_for_cuda(tmp_path):
    """A 2:4 linear layer with 40 rows (a partial token block) compiled for sm_80 with
    ``precision="bf16"`` takes the sparse tensor cores; the package records bf16, takes the
    bf16 tolerance, and passes its reference check (on the GPU, or here on the kernel's CPU
    twin)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sparsec import api

    w = sparse_2_4(128, 96, seed=5)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [40, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [40, 96])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "m.onnx"))
    # fp32: the 2:4 layer stays on DLight's exact schedules, with a hint
    logs: list[str] = []
    exact = api.compile(tmp_path / "m.onnx", tmp_path / "fp32", target="cuda-sm80",
                        precision="fp32", log=logs.append)
    assert mma_sp.NAME not in exact["compile"]["kernels"]
    assert exact["reference"]["rtol"] == api.RTOL
    assert "--precision bf16" in exact["compile"]["decisions"][0]["hint"]
    assert any(line.startswith("hint (1 of the matmuls): 2:4 weight") for line in logs)
    manifest = api.compile(tmp_path / "m.onnx", tmp_path / "pkg", target="cuda-sm80",
                           precision="bf16")
    (decision,) = manifest["compile"]["decisions"]
    assert decision["chosen"] == mma_sp.NAME and decision["precision"] == "bf16"
    assert decision["epilogue"] == ["relu"]
    assert decision["warp_tile"] == "16 channels x 32 tokens" and decision["grid"] == [2, 2]
    assert decision["weight_bytes"]["sparse"] < decision["weight_bytes"]["dense"] * 0.7
    ref = manifest["reference"]
    assert (ref["rtol"], ref["atol"]) == (api.RTOL_BF16, api.ATOL_BF16) and ref["check"]["ok"]
    assert ref["check"]["via"] == ("cuda" if cuda_available() else "cuda-schedules-on-cpu")
    assert MMA_SP in (tmp_path / "pkg" / "kernels.cu").read_text()
    # a GPU without sparse tensor cores keeps the dense schedules
    turing = api.compile(tmp_path / "m.onnx", tmp_path / "pkg75",
                         target='{"kind": "cuda", "arch": "sm_75"}', precision="bf16")
    assert mma_sp.NAME not in json.dumps(turing["compile"]["decisions"])
