"""CPU back end: targets, hand-scheduled kernels and end-to-end compile/run, against real TVM
and ONNX Runtime (no mocks)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sparsec.errors import SparsecError, UnknownTargetError  # noqa: E402
from sparsec.targets import (KNOWN_TARGETS, TargetSpec, cpu_flags, physical_cores,  # noqa: E402
                             resolve_target)

#: the host's compile target has AVX-512 (the tile choices differ with 32 vector registers)
HAS_AVX512 = "avx512f" in resolve_target("host").cpu_flags

REPO = Path(__file__).resolve().parent.parent
RTOL = ATOL = 1e-4


# --------------------------------------------------------------------------- helpers


def make_model(nodes, inputs, outputs, inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnxruntime 1.31 refuses onnx 1.23's default IR version
    return model


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    return {vi.name: rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim]
                                         ).astype(np.float32)
            for vi in model.graph.input if vi.name not in init}


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture(scope="module")
def host() -> TargetSpec:
    return resolve_target("host")


def compile_and_run(model, host, tmp_path, feeds=None, name="m"):
    from sparsec.targets.host import compile_onnx, load_library

    lib = tmp_path / f"{name}.so"
    logs: list[str] = []
    facts = compile_onnx(model, host, lib, log=logs.append)
    assert lib.is_file() and logs
    feeds = feeds if feeds is not None else random_feeds(model)
    outs = load_library(lib, facts["inputs"]).run(feeds)
    return facts, feeds, outs


def assert_matches_ort(model, feeds, outs) -> None:
    ref = run_ort(model, feeds)
    assert len(outs) == len(ref)
    for got, want in zip(outs, ref):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- targets


def test_unknown_target_lists_known_names():
    with pytest.raises(UnknownTargetError) as info:
        resolve_target("nope")
    msg = str(info.value)
    assert "unknown target 'nope'" in msg
    for name in KNOWN_TARGETS:
        assert name in msg
    assert isinstance(info.value, SparsecError) and info.value.exit_code == 8


def test_known_targets_resolve():
    assert KNOWN_TARGETS == ("host", "x86-avx2", "x86-avx512", "x86-amx", "llvm", "aarch64",
                             "arm-neon", "cuda", "cuda-sm80", "cuda-sm90")
    for name in KNOWN_TARGETS:
        spec = resolve_target(name)
        assert spec.name == name and spec.description
        if spec.device == "cuda":       # tests/test_cuda.py
            continue
        assert spec.tvm_target["kind"] == "llvm"
        if spec.native:
            assert spec.tvm_target["num-cores"] == physical_cores() and spec.tool("g++") == "g++"
    assert resolve_target("host").tvm_target["mcpu"]  # detected, e.g. "znver4"
    assert resolve_target("x86-avx2").tvm_target["mcpu"] == "haswell"
    arm = resolve_target("aarch64")
    assert not arm.native and arm.tool("g++") == "aarch64-linux-gnu-g++"
    assert arm.tvm_target["mtriple"] == "aarch64-linux-gnu" and "+neon" in arm.tvm_target["mattr"]


def test_device_tags_and_raw_json():
    pi = resolve_target("raspberry-pi/4b-aarch64")              # a TVM device tag
    assert pi.triple == "aarch64-linux-gnu" and pi.tvm_target["mcpu"] == "cortex-a72"
    assert pi.tvm_target["num-cores"] == 4 and "+neon" in pi.tvm_target["mattr"]
    raw = resolve_target('{"kind": "llvm", "mcpu": "znver3"}')
    assert raw.native and raw.tvm_target == {"kind": "llvm", "mcpu": "znver3",
                                             "num-cores": physical_cores()}
    cases = {'{"kind": "rocm"}': "is a rocm target",
             "{oops": "not valid TVM target JSON", "acme/box": "unknown device tag",
             '{"kind": "llvm", "mtriple": "riscv64-linux-gnu"}': "not riscv64"}
    for name, why in cases.items():
        with pytest.raises(UnknownTargetError, match=why):
            resolve_target(name)


def test_targets_command_lists_them():
    proc = subprocess.run([sys.executable, "-m", "sparsec", "targets"], capture_output=True,
                          text=True, check=True)
    for name in KNOWN_TARGETS:
        assert name in proc.stdout
    assert "aarch64-linux-gnu" in proc.stdout and "raspberry-pi/4b-aarch64" in proc.stdout


def test_targets_command_imports_no_tvm():
    """`sparsec targets` answers from data: neither TVM nor torch is imported (TVM alone took
    seconds), and what it prints is what resolve_target says."""
    code = ("import sys, runpy; sys.argv = ['sparsec', 'targets']\n"
            "try:\n    runpy.run_module('sparsec', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = sorted({'tvm', 'torch', 'onnx', 'numpy'} & set(sys.modules))\n"
            "print('heavy:', heavy)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env, cwd=REPO)
    assert proc.stdout.strip().splitlines()[-1] == "heavy: []"
    assert "x86-avx512" in proc.stdout and "nvidia/nvidia-h100" in proc.stdout


def test_target_listing_is_what_resolve_target_says():
    from sparsec.targets import cuda_available, listing

    rows = {r["name"]: r for r in listing()}
    assert list(rows) == list(KNOWN_TARGETS)
    for name, row in rows.items():
        spec = resolve_target(name)
        assert row["runs_here"] == spec.runs_here and row["why_not"] == spec.why_not_here, name
        if name != "host":    # host's LLVM mcpu needs TVM: the listing shows the CPU's model
            assert row["description"] == spec.description, name
            assert all(spec.tvm_target[k] == v for k, v in row["tvm"].items()), name
    assert cuda_available() == rows["cuda"]["runs_here"]


def test_static_cpu_flags_match_llvm():
    """The flags the named x86 targets need, kept as data so that listing them needs no TVM,
    are LLVM's features of their mcpu."""
    import json

    from sparsec.targets import _X86_FLAGS, MCPU_FLAGS, llvm_features

    for mcpu, flags in MCPU_FLAGS.items():
        have = llvm_features(json.dumps({"kind": "llvm", "mcpu": mcpu}, sort_keys=True))
        assert flags == {f for feature, f in _X86_FLAGS.items() if feature in have}, mcpu


def test_static_device_tags_match_tvm():
    from sparsec.targets import device_tags
    from sparsec.targets.tags import CPU_TAGS, GPU_TAGS

    tags = device_tags()
    assert list(CPU_TAGS) == [t for t, c in tags.items() if c.get("kind") != "cuda"]
    assert list(GPU_TAGS) == [t for t, c in tags.items() if c.get("kind") == "cuda"]


def test_targets_module_imports_nothing_heavy():
    code = ("import sys, sparsec.targets; "
            "heavy = [m for m in ('tvm', 'onnx', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


# --------------------------------------------------------------------------- dense


def dense_model(form: str, m: int, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w_kn = rng.standard_normal((k, n)) / np.sqrt(k)
    b = rng.standard_normal(n)
    if form == "matmul":
        return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                          [("x", [m, k])], [("y", [m, n])], {"w": w_kn})
    if form == "gemm_transb":  # Gemm(transB=1) -> permute_dims(W) + matmul + add
        return make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
                          [("x", [m, k])], [("y", [m, n])], {"w": w_kn.T.copy(), "b": b})
    if form == "matmul_add_relu":
        return make_model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                           helper.make_node("Add", ["h", "b"], ["a"]),
                           helper.make_node("Relu", ["a"], ["y"])],
                          [("x", [m, k])], [("y", [m, n])], {"w": w_kn, "b": b})
    if form == "rank3":  # [B, S, K] @ [K, N]: leading dims flattened into M
        return make_model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                           helper.make_node("Add", ["h", "b"], ["y"])],
                          [("x", [2, m, k])], [("y", [2, m, n])], {"w": w_kn, "b": b})
    raise ValueError(form)


def dense_reference(model, form: str, feeds) -> np.ndarray:
    """What ``dense_model(form, ...)`` computes, in float64 numpy."""
    x = feeds["x"].astype(np.float64)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    w = inits["w"].T if form == "gemm_transb" else inits["w"]
    want = x @ w + inits.get("b", 0.0)
    return np.maximum(want, 0) if form == "matmul_add_relu" else want


@pytest.mark.parametrize("form,m,k,n", [
    ("matmul", 32, 64, 48),
    ("matmul", 1, 40, 45),      # GEMV, odd N
    ("matmul", 3, 17, 45),      # odd everything
    ("matmul", 128, 32, 16),
    ("gemm_transb", 8, 24, 45),
    ("gemm_transb", 7, 33, 5),  # M prime, N < 16
    ("matmul_add_relu", 5, 20, 33),
    ("rank3", 3, 16, 20),
])
def test_dense_packed_numerics(form, m, k, n, host, tmp_path):
    model = dense_model(form, m, k, n)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"].get("dense_packed") == 1, facts["kernels"]
    np.testing.assert_allclose(outs[0], dense_reference(model, form, feeds), rtol=RTOL,
                               atol=ATOL)
    assert_matches_ort(model, feeds, outs)
    if form in ("gemm_transb", "matmul_add_relu"):  # bias (and relu) folded into the kernel
        dense = [d for d in facts["decisions"] if d["chosen"] == "dense_packed"]
        assert dense[0]["epilogue"][0] == "bias"
        assert facts["kernels"] == {"dense_packed": 1}


def _block_sparse(model, share: float, seed: int = 0):
    """The model with ``share`` of its weight's 16x1 blocks (16 outputs x 1 input) zeroed."""
    import sparsec
    from sparsec.ir.onnx_io import to_onnx

    return to_onnx(sparsec.prune(model, sparsity=share, sparsity_pattern="16x1").graph)


@pytest.mark.parametrize("form,m,k,n", [
    ("matmul", 32, 64, 48),
    ("matmul", 1, 40, 45),      # GEMV, odd N: the last panel is partial
    ("gemm_transb", 7, 33, 45),
    ("matmul_add_relu", 5, 20, 33),
    ("rank3", 3, 16, 20),
])
def test_bsr_numerics(form, m, k, n, host, tmp_path):
    """Block-sparse weights get the BSR kernel, which computes what ONNX Runtime and numpy do
    (bias and relu fused as for the dense kernel)."""
    model = _block_sparse(dense_model(form, m, k, n), 0.8)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"].get("bsr_dense") == 1, facts["kernels"]
    [d] = [d for d in facts["decisions"] if d["chosen"] == "bsr_dense"]
    assert d["rows_kept"] < k
    np.testing.assert_allclose(outs[0], dense_reference(model, form, feeds), rtol=RTOL,
                               atol=ATOL)
    assert_matches_ort(model, feeds, outs)


def test_cost_rule_keeps_dense_when_sparsity_skips_little(host, tmp_path):
    """Unstructured zeros leave every 16-wide panel row with a nonzero: nothing to skip."""
    import sparsec
    from sparsec.ir.onnx_io import to_onnx

    model = to_onnx(sparsec.prune(dense_model("matmul", 32, 64, 48), sparsity=0.5).graph)
    facts, _, _ = compile_and_run(model, host, tmp_path)
    assert facts["kernels"] == {"dense_packed": 1}


def test_dense_kernel_keeps_schedule_next_to_fusible_ops(host, tmp_path):
    """A non-folded elementwise op after the kernel must not be fused into it (the kernel is
    opaque to FuseOps), and its own function gets the fallback schedule."""
    rng = np.random.default_rng(3)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                        helper.make_node("Sigmoid", ["h"], ["y"])],
                       [("x", [4, 16])], [("y", [4, 24])], {"w": rng.standard_normal((16, 24))})
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"] == {"dense_packed": 1, "fallback": 1}
    assert_matches_ort(model, feeds, outs)


# --------------------------------------------------------------------------- conv


def conv_model(n, c, h, w, oc, k, stride, pad, dil=1, group=1, bias=True, relu=False, seed=0,
               clip=None):
    """Conv (+ bias) then Relu, ``Clip(lo, hi)`` (None: that input left out) or Identity;
    ``pad`` is an int or ONNX's [top, left, bottom, right]."""
    rng = np.random.default_rng(seed)
    inits = {"w": rng.standard_normal((oc, c // group, k, k)) / np.sqrt(k * k * c / group)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = rng.standard_normal(oc)
        ins.append("b")
    pads = [pad] * 4 if isinstance(pad, int) else list(pad)
    nodes = [helper.make_node("Conv", ins, ["c"], pads=pads, strides=[stride] * 2,
                              dilations=[dil] * 2, group=group, kernel_shape=[k, k])]
    if clip is not None:
        bounds = []
        for name, v in zip(("lo", "hi"), clip):
            if v is not None:
                inits[name] = np.array(v)
            bounds.append(name if v is not None else "")
        nodes.append(helper.make_node("Clip", ["c", *bounds], ["y"]))
    else:
        nodes.append(helper.make_node("Relu" if relu else "Identity", ["c"], ["y"]))
    oh = (h + pads[0] + pads[2] - dil * (k - 1) - 1) // stride + 1
    ow = (w + pads[1] + pads[3] - dil * (k - 1) - 1) // stride + 1
    return make_model(nodes, [("x", [n, c, h, w])], [("y", [n, oc, oh, ow])], inits)


def _residual_pointwise(n, c, h, w, oc, seed=0):
    """relu(conv1x1(x) + b + x2) with x2 a second input: the kernel's residual epilogue."""
    base = conv_model(n, c, h, w, oc, 1, 1, 0, seed=seed)
    g = base.graph
    g.node[1].op_type, g.node[1].input[:] = "Add", ["c", "x2"]
    g.node[1].output[0] = "s"
    g.node.append(helper.make_node("Relu", ["s"], ["y"]))
    g.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [n, oc, h, w]))
    return base


@pytest.mark.parametrize("args", [
    dict(n=1, c=32, h=8, w=8, oc=48, k=1, stride=1, pad=0, relu=True),   # 64 pixels
    dict(n=2, c=24, h=7, w=7, oc=42, k=1, stride=1, pad=0),              # 49: padded to 64
    dict(n=1, c=96, h=14, w=14, oc=20, k=1, stride=1, pad=0, bias=False),
    dict(n=1, c=16, h=48, w=50, oc=24, k=1, stride=1, pad=0, relu=True),  # 2400: wide tile
    "residual",
])
def test_bsr_pointwise_conv_numerics(args, host, tmp_path):
    """Block-sparse 1x1 convs get the pixel-vectorized sparse kernel (Fast Sparse ConvNets),
    which matches ONNX Runtime with bias, relu, a residual, batches and pixel tails; large
    maps get 64-pixel tiles where the target has AVX-512."""
    import tvm

    from sparsec.targets.kernels import bsr

    model = (_residual_pointwise(1, 40, 6, 6, 36) if args == "residual"
             else conv_model(**args))
    model = _block_sparse(model, 0.8)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"].get("bsr_conv1x1") == 1, facts["kernels"]
    [d] = [d for d in facts["decisions"] if d["chosen"] == "bsr_conv1x1"]
    assert d["rows_kept"] < d["shape"]["weight"][1] and d["shape"]["variant"] == "pointwise"
    pixels = d["shape"]["out"][2] * d["shape"]["out"][3]
    with tvm.target.Target(dict(host.tvm_target)):
        tile = bsr.conv_tile(pixels)
    assert d["tile"] == f"4x{tile.pixels}"
    if "avx512f" in host.cpu_flags and pixels >= bsr.CONV_WIDE_MIN_PIXELS:
        assert tile.pixels == 64
    if args == "residual":
        assert d["epilogue"] == ["bias", "residual", "relu"]
    assert_matches_ort(model, feeds, outs)


def test_dense_pointwise_conv_stays_dense(host, tmp_path):
    """Without whole zero input channels per 4-channel panel there is nothing to skip."""
    import sparsec
    from sparsec.ir.onnx_io import to_onnx

    model = conv_model(n=1, c=32, h=8, w=8, oc=48, k=1, stride=1, pad=0)
    model = to_onnx(sparsec.prune(model, sparsity=0.5).graph)          # unstructured
    facts, _, _ = compile_and_run(model, host, tmp_path)
    # (the graph output is the kernel's [N, C, P] result reshaped: one copy, a fallback kernel)
    assert facts["kernels"].get("conv1x1_nchw") == 1 and "bsr_conv1x1" not in facts["kernels"]


@pytest.mark.parametrize("args,tiles", [
    # (AVX2 tile, AVX-512 tile) where the test pins one
    (dict(n=1, c=16, h=16, w=16, oc=96, k=1, stride=1, pad=0, clip=(0.0, 6.0)),
     ("6x16", "12x16")),
    (dict(n=2, c=5, h=9, w=11, oc=7, k=1, stride=1, pad=0, bias=False), None),  # 99 pixels
    (dict(n=1, c=96, h=14, w=14, oc=24, k=1, stride=1, pad=0, relu=True), None),
    (dict(n=1, c=40, h=7, w=7, oc=36, k=1, stride=1, pad=0), None),   # 49 pixels, padded
    ("residual", ("6x16", "12x16")),   # 64 pixels, 36 channels: six 6- or three 12-channel panels
])
def test_pointwise_conv_numerics(args, tiles, host, tmp_path):
    """Dense 1x1 convs run as a GEMM vectorized along the pixels (whole-vector NCHW stores),
    and match ONNX Runtime with pixel and output-channel tails, batches and every epilogue.
    The register tile follows the target's vector registers (AVX-512: twice the
    accumulators)."""
    import tvm

    from sparsec.targets.kernels import pointwise
    from sparsec.targets.kernels.common import wide_vectors

    model = (_residual_pointwise(1, 40, 8, 8, 36) if args == "residual"
             else conv_model(**args))
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    [d] = [d for d in facts["decisions"] if d["op"] == "conv2d"]
    if d["chosen"] == "conv1x1_nchw":
        oc, hw = d["shape"]["out"][1], d["shape"]["out"][2:]
        with tvm.target.Target(dict(host.tvm_target)):
            t = pointwise.pick_tile(oc, hw[0] * hw[1])
            tile = None if tiles is None else tiles[wide_vectors()]
        assert d["tile"] == f"{t.oct}x{t.pixels}" and (tile is None or d["tile"] == tile)
    else:   # the cost rule may prefer the direct kernel where the pixel tail pads a lot
        assert tiles is None and d["chosen"] == "conv2d_nchw_packed", d
    if args == "residual":
        assert d["epilogue"] == ["bias", "residual", "relu"]
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("args", [
    dict(n=1, c=16, h=14, w=14, oc=32, k=3, stride=1, pad=1, relu=True),
    dict(n=1, c=3, h=17, w=19, oc=45, k=3, stride=2, pad=1),           # odd C/OC/W, stride 2
    dict(n=1, c=8, h=13, w=13, oc=20, k=1, stride=2, pad=0),            # 1x1 stride 2
    dict(n=1, c=6, h=10, w=10, oc=16, k=3, stride=1, pad=2, dil=2),     # dilation
    dict(n=1, c=4, h=12, w=12, oc=9, k=5, stride=1, pad=0, relu=True),  # no padding, 5x5
])
def test_conv2d_packed_numerics(args, host, tmp_path):
    model = conv_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"].get("conv2d_nchw_packed") == 1, facts["kernels"]
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("args", [
    dict(n=1, c=16, h=16, w=16, oc=16, k=3, stride=1, pad=1, relu=True),  # small map
    dict(n=1, c=45, h=16, w=16, oc=45, k=3, stride=1, pad=1),             # odd C/OC
    dict(n=2, c=3, h=33, w=31, oc=24, k=3, stride=2, pad=1, relu=True),   # stem, odd H/W, s2
    dict(n=1, c=5, h=20, w=31, oc=7, k=3, stride=2, pad=2, dil=2),        # s2 + dilation
    dict(n=1, c=8, h=16, w=16, oc=20, k=1, stride=2, pad=0, bias=False),  # 1x1 s2, 8 lanes
    dict(n=1, c=7, h=9, w=8, oc=13, k=5, stride=1, pad=2),                # 5x5, odd OH
    dict(n=1, c=3, h=224, w=224, oc=32, k=3, stride=2, pad=[0, 0, 1, 1],
         clip=(0.0, 6.0)),                           # MobileNetV2's stem: rows of 7 vectors
    dict(n=1, c=3, h=20, w=128, oc=20, k=7, stride=1, pad=3),  # 7x7 stem: rows of 8 vectors
    # ragged channel counts (a pruned conv) on wider maps, AVX-512: rows of 5 and 7 vectors
    pytest.param(dict(n=1, c=12, h=10, w=80, oc=24, k=3, stride=1, pad=1, relu=True),
                 marks=pytest.mark.skipif(not HAS_AVX512, reason="AVX-512 tiling")),
    pytest.param(dict(n=1, c=10, h=12, w=112, oc=20, k=3, stride=2, pad=1),
                 marks=pytest.mark.skipif(not HAS_AVX512, reason="AVX-512 tiling")),
])
def test_conv2d_width_vectorized_numerics(args, host, tmp_path, monkeypatch):
    """Small maps whose output width is whole vectors take the width-vectorized variant (rows
    of 8-lane vectors too, as on a CPU that runs them at the full rate)."""
    from sparsec.targets.kernels import conv2d

    monkeypatch.setattr(conv2d, "narrow_vectors_at_full_rate", lambda: True)
    model = conv_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"].get("conv2d_nchw_packed") == 1, facts["kernels"]
    conv = [d for d in facts["decisions"] if d["chosen"] == "conv2d_nchw_packed"]
    assert conv[0]["shape"]["variant"] == "width_vectorized"
    assert_matches_ort(model, feeds, outs)


def test_width_vectorized_plan_rule():
    """Which convs take the width-vectorized variant: small maps always; with AVX-512 also
    KxK convs of stride 1 with few input channels or whose channel count is not whole 16-lane
    blocks, rows of up to 8 vectors (of 8 lanes only where those run at the full FMA rate:
    Zen 4's double-pumped AVX-512, not Intel's full-width units); never 1x1 strided ones or
    strided (or many-input) whole blocks on wide maps, nor on AVX2 (16 registers)."""
    import tvm

    from sparsec.targets.kernels.conv2d import ConvShape, plan_wvec

    def shape(ic, oc, hw, k, stride):
        return ConvShape(1, ic, hw, hw, oc, k, k, (stride,) * 2, (k // 2,) * 4, (1, 1))

    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}):
        assert plan_wvec(shape(24, 24, 56, 3, 1)).vecs == 7          # 8 lanes
        assert plan_wvec(shape(32, 32, 56, 3, 1)).vecs == 7
    with tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}):
        assert plan_wvec(shape(12, 24, 80, 3, 1)).vecs == 5
        assert plan_wvec(shape(24, 24, 56, 3, 1)) is None            # 8 lanes: half rate
        assert plan_wvec(shape(32, 24, 160, 3, 2)).vecs == 5
        assert plan_wvec(shape(24, 32, 80, 3, 1)).vecs == 5          # stride 1, few inputs
        assert plan_wvec(shape(32, 32, 56, 3, 1)) is None
        assert plan_wvec(shape(64, 64, 56, 3, 1)) is None            # many inputs
        assert plan_wvec(shape(24, 32, 160, 3, 2)) is None           # strided whole blocks
        assert plan_wvec(shape(48, 24, 80, 1, 2)) is None            # 1x1 strided
        assert plan_wvec(shape(12, 24, 160, 3, 1)) is None           # 10 vectors
        assert plan_wvec(shape(16, 16, 32, 3, 1)).vecs == 2          # small map, as before
    with tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}):
        assert plan_wvec(shape(12, 24, 80, 3, 1)) is None


@pytest.mark.parametrize("c,hw", [(24, 16), (45, 8), (32, 32)])
def test_residual_block_width_vectorized(c, hw, host, tmp_path):
    """conv+relu, conv + skip add + relu at small maps and odd channel counts: both convs take
    the width-vectorized variant with bias/residual/relu folded into the write-back."""
    rng = np.random.default_rng(c)
    inits = {"w1": rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c),
             "b1": rng.standard_normal(c) * 0.1,
             "w2": rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c),
             "b2": rng.standard_normal(c) * 0.1}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4), n("Relu", ["c1"], ["r1"]),
             n("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4), n("Add", ["c2", "x"], ["s"]),
             n("Relu", ["s"], ["y"])]
    model = make_model(nodes, [("x", [1, c, hw, hw])], [("y", [1, c, hw, hw])], inits)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"] == {"conv2d_nchw_packed": 2}, facts["kernels"]
    convs = [d for d in facts["decisions"] if d["op"] == "conv2d"]
    assert [d["shape"]["variant"] for d in convs] == ["width_vectorized"] * 2
    assert [d["epilogue"] for d in convs] == [["bias", "relu"], ["bias", "residual", "relu"]]
    assert_matches_ort(model, feeds, outs)


def test_runner_accepts_unaligned_and_noncontiguous_inputs(host, tmp_path):
    """Inputs are borrowed when 64-byte aligned, copied otherwise; outputs never alias them."""
    from sparsec.targets.host import compile_onnx, load_library

    model = conv_model(n=1, c=4, h=8, w=8, oc=4, k=1, stride=1, pad=0, bias=False)
    lib = tmp_path / "m.so"
    facts = compile_onnx(model, host, lib, log=lambda s: None)
    runner = load_library(lib, facts["inputs"])
    x = random_feeds(model)["x"]
    want = run_ort(model, {"x": x})[0]
    def at_offset(extra: int) -> np.ndarray:  # a copy of x starting ``extra`` floats past 64
        buf = np.empty(x.size + 32, np.float32)
        off = (-buf.ctypes.data % 64) // 4 + extra
        view = buf[off:off + x.size].reshape(x.shape)
        view[...] = x
        return view

    aligned, unaligned = at_offset(0), at_offset(1)
    assert aligned.ctypes.data % 64 == 0 and unaligned.ctypes.data % 64 != 0
    noncontig = np.asfortranarray(x)
    for arr in (aligned, unaligned, noncontig):
        got = runner.run({"x": arr})[0]
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        assert not np.shares_memory(got, arr)


@pytest.mark.parametrize("args", [
    dict(n=1, c=12, h=15, w=15, k=3, stride=1, pad=1, relu=True),
    dict(n=1, c=32, h=112, w=112, k=3, stride=1, pad=1, clip=(0.0, 6.0)),  # MobileNetV2 dw1
    dict(n=1, c=24, h=56, w=56, k=3, stride=2, pad=[0, 0, 1, 1], clip=(0.0, 6.0)),  # TF pads
    dict(n=2, c=7, h=13, w=11, k=5, stride=2, pad=2, bias=False),          # 5x5, batch 2
    dict(n=1, c=16, h=9, w=30, k=3, stride=2, pad=0, relu=True),           # no padding
    dict(n=1, c=9, h=20, w=20, k=3, stride=1, pad=2, dil=2, clip=(-0.5, None)),  # dilation
    dict(n=1, c=40, h=7, w=7, k=3, stride=1, pad=1, clip=(None, 1.0)),     # 7x7 map
    dict(n=1, c=8, h=20, w=53, k=3, stride=3, pad=1),   # stride 3: 3 loads a phase vector
])
def test_depthwise_conv_numerics(args, host, tmp_path):
    """Depthwise convs (groups = channels) get their own kernel, with the activation (ReLU,
    ReLU6 and other Clip bounds) folded into the write-back."""
    model = conv_model(oc=args["c"], group=args["c"], **args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"] == {"depthwise_nchw": 1}, facts["kernels"]
    [d] = facts["decisions"]
    assert d["shape"]["variant"] == "depthwise"
    clip = args.get("clip")
    want = (["bias"] if args.get("bias", True) else []) + (
        ["relu"] if args.get("relu") or clip == (0.0, None) else [] if clip is None else
        [f"clip({'-inf' if clip[0] is None else f'{clip[0]:g}'},"
         f"{'inf' if clip[1] is None else f'{clip[1]:g}'})"])
    assert d["epilogue"] == want
    assert_matches_ort(model, feeds, outs)


def dw_pointwise_model(n, c, h, oc, k=3, stride=1, dil=1, dw_bias=True, pw_bias=True,
                       residual=False, relu=False, extra_user=False, sparse=0.0, clip=True,
                       seed=0):
    """MobileNetV2's inverted-residual tail: depthwise conv (+ bias) -> ReLU6 -> 1x1 conv
    (+ bias) [+ skip input] [-> Relu]. ``extra_user``: the ReLU6 output is a second graph
    output, so the depthwise result must be materialized. ``sparse``: that fraction of the
    1x1 conv's (4 output channels x 1 input channel) blocks is zero."""
    rng = np.random.default_rng(seed)
    pad = dil * (k - 1) // 2
    wp = rng.standard_normal((oc, c, 1, 1)) / np.sqrt(c)
    if sparse:
        keep = rng.random((-(-oc // 4), c)) >= sparse
        wp *= np.repeat(keep, 4, axis=0)[:oc, :, None, None]
    inits = {"wd": rng.standard_normal((c, 1, k, k)) / k, "lo": np.array(0.0),
             "hi": np.array(6.0), "wp": wp}
    dw_in, pw_in = ["x", "wd"], ["r", "wp"]
    if dw_bias:
        inits["bd"] = rng.standard_normal(c)
        dw_in.append("bd")
    if pw_bias:
        inits["bp"] = rng.standard_normal(oc)
        pw_in.append("bp")
    mk = helper.make_node
    nodes = [mk("Conv", dw_in, ["d"], group=c, pads=[pad] * 4, strides=[stride] * 2,
                dilations=[dil] * 2, kernel_shape=[k, k]),
             mk("Clip", ["d", "lo", "hi"], ["r"]) if clip else mk("Identity", ["d"], ["r"]),
             mk("Conv", pw_in, ["p"])]
    oh = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    inputs, last = [("x", [n, c, h, h])], "p"
    if residual:
        inputs.append(("skip", [n, oc, oh, oh]))
        nodes.append(mk("Add", ["p", "skip"], ["s"]))
        last = "s"
    if relu:
        nodes.append(mk("Relu", [last], ["y"]))
    else:
        nodes.append(mk("Identity", [last], ["y"]))
    outputs = [("y", [n, oc, oh, oh])] + ([("r", [n, c, oh, oh])] if extra_user else [])
    return make_model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("args", [
    dict(n=1, c=24, h=28, oc=16, residual=True),              # MobileNetV2's 28x28 block
    dict(n=1, c=32, h=56, oc=24, pw_bias=False, relu=True),   # 4-row tiles
    dict(n=2, c=20, h=30, oc=12, dw_bias=False),  # batch 2; width 30 padded to 32
    dict(n=1, c=8, h=33, oc=8, k=5, dil=2, residual=True, relu=True),  # 5x5, dilation 2
    dict(n=1, c=16, h=112, oc=8),                              # 8-row tiles, width 112
    dict(n=1, c=64, h=28, oc=24, sparse=0.8, residual=True),   # sparse projection (ELL)
    dict(n=1, c=48, h=56, oc=10, sparse=0.7, relu=True),       # 4x64 tiles, 2 channels padded
    dict(n=1, c=16, h=28, oc=12, clip=False),                  # linear depthwise conv
])
def test_depthwise_pointwise_fused(args, host, tmp_path):
    """A depthwise conv whose (ReLU6) output only the next 1x1 conv reads becomes one
    ``dw_conv1x1_nchw`` kernel with both epilogues; the depthwise binding is gone."""
    model = dw_pointwise_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"] == {"dw_conv1x1_nchw": 1}, facts["kernels"]
    dw, pw = facts["decisions"]
    assert dw["chosen"] == "depthwise_nchw" and dw["fused_into_next"] == "dw_conv1x1_nchw"
    assert pw["chosen"] == "dw_conv1x1_nchw"
    if args.get("sparse"):   # the projection keeps its sparse kernel's skipped channels
        assert 0 < pw["rows_kept"] < args["c"], pw
    assert pw["fused_depthwise"]["epilogue"] == ["bias"] * args.get("dw_bias", True) + [
        "clip(0,6)"] * args.get("clip", True)
    assert pw["epilogue"] == ["bias"] * args.get("pw_bias", True) + [
        "residual"] * args.get("residual", False) + ["relu"] * args.get("relu", False)
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("args", [
    dict(n=1, c=24, h=28, oc=16, extra_user=True),   # the depthwise output is also an output
    dict(n=1, c=24, h=56, oc=16, stride=2),          # stride 2: kept apart (dw_pointwise.py)
    dict(n=1, c=24, h=10, oc=16),                    # 10x10: under MIN_BAND_PIXELS
])
def test_depthwise_pointwise_kept_apart(args, host, tmp_path):
    model = dw_pointwise_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    k = facts["kernels"]
    assert k["depthwise_nchw"] == 1 and k["conv1x1_nchw"] == 1 and "dw_conv1x1_nchw" not in k
    assert_matches_ort(model, feeds, outs)


def pointwise_dw_model(n, k, c, h, ksize=3, stride=1, tf_pad=False, pw_bias=True,
                       dw_bias=True, clip=True, extra_user=False, seed=0):
    """MobileNetV2's inverted-residual head: 1x1 expansion conv (+ bias) -> ReLU6 ->
    depthwise conv (+ bias) -> ReLU6. ``tf_pad``: TensorFlow's stride-2 padding (bottom and
    right only); ``extra_user``: the expansion is also a graph output."""
    rng = np.random.default_rng(seed)
    pad = [0, 0, 1, 1] if tf_pad else [(ksize - 1) // 2] * 4
    inits = {"we": rng.standard_normal((c, k, 1, 1)) / np.sqrt(k),
             "wd": rng.standard_normal((c, 1, ksize, ksize)) / ksize,
             "lo": np.array(0.0), "hi": np.array(6.0)}
    pw_in, dw_in = ["x", "we"], ["e", "wd"]
    if pw_bias:
        inits["be"] = rng.standard_normal(c)
        pw_in.append("be")
    if dw_bias:
        inits["bd"] = rng.standard_normal(c)
        dw_in.append("bd")
    mk = helper.make_node
    act = (lambda a, b: mk("Clip", [a, "lo", "hi"], [b])) if clip else (
        lambda a, b: mk("Identity", [a], [b]))
    nodes = [mk("Conv", pw_in, ["p"]), act("p", "e"),
             mk("Conv", dw_in, ["d"], group=c, pads=pad, strides=[stride] * 2,
                kernel_shape=[ksize, ksize]), act("d", "y")]
    oh = (h + pad[0] + pad[2] - ksize) // stride + 1
    outputs = [("y", [n, c, oh, oh])] + ([("e", [n, c, h, h])] if extra_user else [])
    return make_model(nodes, [("x", [n, k, h, h])], outputs, inits)


@pytest.mark.parametrize("args", [
    dict(n=1, k=16, c=96, h=112, stride=2, tf_pad=True),   # MobileNetV2's 112x112 block
    dict(n=1, k=24, c=144, h=64),                           # stride 1
    dict(n=2, k=5, c=20, h=64, stride=2, pw_bias=False),    # batch 2; 20 = 12 + 8 padded
    dict(n=1, k=8, c=16, h=64, ksize=5, stride=2, dw_bias=False),   # 5x5, 2-row halo
    dict(n=1, k=8, c=12, h=64, clip=False),                 # linear expansion
])
def test_pointwise_depthwise_fused(args, host, tmp_path):
    """An expansion whose (ReLU6) output only the next depthwise conv reads becomes one
    ``conv1x1_dw_nchw`` kernel with both epilogues; the pointwise binding is gone."""
    model = pointwise_dw_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"] == {"conv1x1_dw_nchw": 1}, facts["kernels"]
    pw, dw = facts["decisions"]
    assert pw["chosen"] == "conv1x1_nchw" and pw["fused_into_next"] == "conv1x1_dw_nchw"
    assert dw["chosen"] == "conv1x1_dw_nchw"
    clip = ["clip(0,6)"] * args.get("clip", True)
    assert dw["fused_pointwise"]["epilogue"] == ["bias"] * args.get("pw_bias", True) + clip
    assert dw["epilogue"] == ["bias"] * args.get("dw_bias", True) + clip
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("args", [
    dict(n=1, k=16, c=32, h=64, extra_user=True),   # the expansion is also an output
    dict(n=1, k=24, c=144, h=56, stride=2),         # 56x56: faster apart (MIN_PIXELS)
    dict(n=1, k=16, c=32, h=28),                    # 28x28: fits in cache apart
    dict(n=1, k=16, c=32, h=66),                    # rows not whole 8-lane vectors
])
def test_pointwise_depthwise_kept_apart(args, host, tmp_path):
    model = pointwise_dw_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    k = facts["kernels"]
    assert k["depthwise_nchw"] == 1 and k["conv1x1_nchw"] == 1 and "conv1x1_dw_nchw" not in k
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("target", ["x86-avx2", "llvm"])
def test_pointwise_depthwise_fused_other_targets(target, tmp_path):
    """The fused expansion + depthwise kernel with 8-lane vectors (AVX2, generic LLVM): rows
    of 64 are whole 8-lane vectors there too."""
    spec = resolve_target(target)
    if not spec.runs_here:
        pytest.skip(f"{target} does not run here: {spec.why_not_here}")
    model = pointwise_dw_model(n=1, k=16, c=24, h=64, stride=2, tf_pad=True)
    facts, feeds, outs = compile_and_run(model, spec, tmp_path)
    assert facts["kernels"] == {"conv1x1_dw_nchw": 1}, facts["kernels"]
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("target", ["x86-avx2", "llvm"])
@pytest.mark.parametrize("sparse", [0.0, 0.75])
def test_depthwise_pointwise_fused_other_targets(target, sparse, tmp_path):
    """The fused kernel with 8-lane vectors (AVX2, generic LLVM), dense and sparse."""
    spec = resolve_target(target)
    if not spec.runs_here:
        pytest.skip(f"{target} does not run here: {spec.why_not_here}")
    model = dw_pointwise_model(n=1, c=20, h=28, oc=12, sparse=sparse, residual=True)
    facts, feeds, outs = compile_and_run(model, spec, tmp_path)
    assert facts["kernels"] == {"dw_conv1x1_nchw": 1}, facts["kernels"]
    assert_matches_ort(model, feeds, outs)


def block_model(n, k, c, oc, h, ksize=3, residual=True, clip=True, extra_user=False, seed=0):
    """MobileNetV2's inverted-residual block: 1x1 expansion (+ bias) -> ReLU6 -> depthwise
    conv (+ bias) -> ReLU6 -> 1x1 projection (+ bias) [+ the block's input]. ``clip``
    False: a linear expansion; ``extra_user``: the expansion is also a graph output."""
    rng = np.random.default_rng(seed)
    pad = (ksize - 1) // 2
    inits = {"we": rng.standard_normal((c, k, 1, 1)) / np.sqrt(k), "be": rng.standard_normal(c),
             "wd": rng.standard_normal((c, 1, ksize, ksize)) / ksize,
             "bd": rng.standard_normal(c), "wp": rng.standard_normal((oc, c, 1, 1)) / np.sqrt(c),
             "bp": rng.standard_normal(oc), "lo": np.array(0.0), "hi": np.array(6.0)}
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "we", "be"], ["p"]),
             mk("Clip", ["p", "lo", "hi"], ["e"]) if clip else mk("Identity", ["p"], ["e"]),
             mk("Conv", ["e", "wd", "bd"], ["d"], group=c, pads=[pad] * 4,
                kernel_shape=[ksize, ksize]),
             mk("Clip", ["d", "lo", "hi"], ["r"]),
             mk("Conv", ["r", "wp", "bp"], ["q"])]
    nodes.append(mk("Add", ["q", "x"], ["y"]) if residual else mk("Identity", ["q"], ["y"]))
    outputs = [("y", [n, oc, h, h])] + ([("e", [n, c, h, h])] if extra_user else [])
    return make_model(nodes, [("x", [n, k, h, h])], outputs, inits)


BLOCK = "conv1x1_dw_conv1x1_nchw"


@pytest.mark.parametrize("args", [
    dict(n=1, k=24, c=112, oc=24, h=14),            # 14x14: c16's zero channels would add
                                                    # 30 % to the work (MAX_PADDED_WORK)
    dict(n=1, k=19, c=116, oc=19, h=14),            # MobileNetV2 pruned at 0.7: 41 %
    dict(n=1, k=16, c=96, oc=16, h=28),             # pruned MobileNetV2's 28x28 block
    dict(n=1, k=32, c=196, oc=48, h=14, residual=False),    # a widening projection
    dict(n=1, k=8, c=20, oc=8, h=28, clip=False),   # linear expansion; 20 = 5 tiles of 4
    dict(n=1, k=8, c=24, oc=8, h=28, ksize=5),      # 5x5: two halo rows a side
    dict(n=2, k=16, c=48, oc=16, h=14),             # batch 2
    dict(n=1, k=12, c=50, oc=20, h=14, residual=False),     # 50: the last 4-channel tile
])                                                           # half padding (pruned widths)
def test_inverted_residual_block_fused(args, host, tmp_path):
    """An expansion whose (ReLU6) output only a fused depthwise -> projection kernel reads
    joins it: the whole block is one ``conv1x1_dw_conv1x1_nchw`` kernel (where
    ``inverted_residual_c16`` does not take it), every epilogue kept, and the result matches
    ONNX Runtime."""
    model = block_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"] == {BLOCK: 1}, facts["kernels"]
    pw, dw, proj = facts["decisions"]
    assert pw["fused_into_next"] == BLOCK and dw["fused_into_next"] == "dw_conv1x1_nchw"
    assert proj["chosen"] == BLOCK
    assert proj["fused_expansion"]["epilogue"] == ["bias"] + ["clip(0,6)"] * args.get("clip", True)
    assert proj["fused_depthwise"]["epilogue"] == ["bias", "clip(0,6)"]
    assert proj["epilogue"] == ["bias"] + ["residual"] * args.get("residual", True)
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("args", [
    dict(n=1, k=12, c=72, oc=12, h=56),              # 56x56: over BLOCK_MAX_PIXELS
    dict(n=1, k=96, c=40, oc=96, h=14),              # halo rows' expansion over MAX_REDONE_MACS
                                                     # (c16's zero channels: +60 % work)
    dict(n=1, k=16, c=48, oc=16, h=14, extra_user=True),    # the expansion is an output too
])
def test_inverted_residual_block_kept_in_two(args, host, tmp_path):
    """Where the whole block would cost more (large maps, expansions whose halo rows weigh)
    or the expansion is needed elsewhere, the expansion stays a conv1x1_nchw kernel before
    the fused depthwise -> projection one."""
    model = block_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"].get("dw_conv1x1_nchw") == 1 and BLOCK not in facts["kernels"], \
        facts["kernels"]
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("target", ["x86-avx2", "llvm"])
def test_inverted_residual_block_other_targets(target, tmp_path):
    """The whole-block kernel with 8-lane vectors (AVX2, generic LLVM)."""
    spec = resolve_target(target)
    if not spec.runs_here:
        pytest.skip(f"{target} does not run here: {spec.why_not_here}")
    model = block_model(n=1, k=16, c=40, oc=16, h=14)
    facts, feeds, outs = compile_and_run(model, spec, tmp_path)
    assert facts["kernels"] == {BLOCK: 1}, facts["kernels"]
    assert_matches_ort(model, feeds, outs)


def test_inverted_residual_block_bands_expand_their_own_pixels(tmp_path):
    """Compiled for 4 cores (run here on this machine's), a 28x28 block has 4 bands of 7
    rows, each expanding 256 pixels (9 rows of 28, in whole vectors) from its first row
    inside the map, the last from 528 (so that it ends at the map's end, 784); the outputs
    match ONNX Runtime, so every band read its halo rows where its expansion put them."""
    import dataclasses

    import tvm

    from sparsec.targets.kernels import dw_pointwise
    from sparsec.targets.kernels.conv2d import ConvShape

    base = resolve_target("host")
    spec = dataclasses.replace(base, tvm_target={**base.tvm_target, "num-cores": 4})
    s = ConvShape(1, 48, 28, 28, 48, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    with tvm.target.Target(dict(spec.tvm_target)):
        fplan, eoct = dw_pointwise.block_plan(s, 16)
        assert (fplan.rows, eoct) == (7, 12)
        assert dw_pointwise.expansion_pixels(s, 7, fplan.lanes) == 256
        text = dw_pointwise.build(s, 16, fplan, expansion=dw_pointwise.Expansion(16, eoct)
                                  ).script()
    assert "T.min(T.max(" in text and ", 528)" in text     # the last band's start, clamped
    model = block_model(n=1, k=16, c=48, oc=16, h=28)
    facts, feeds, outs = compile_and_run(model, spec, tmp_path)
    assert facts["kernels"] == {BLOCK: 1}, facts["kernels"]
    assert facts["decisions"][2]["tile"].startswith("7 rows"), facts["decisions"][2]
    assert_matches_ort(model, feeds, outs)


SMALL_BLOCK = "inverted_residual_c16"


@pytest.mark.parametrize("args", [
    dict(n=1, k=80, c=480, oc=80, h=7),             # pruned MobileNetV2's 7x7 block
    dict(n=1, k=32, c=192, oc=32, h=14),            # its 14x14 block
    dict(n=1, k=32, c=64, oc=48, h=7, residual=False),      # a widening projection
    dict(n=1, k=16, c=64, oc=16, h=7, clip=False),  # linear expansion
    dict(n=2, k=16, c=96, oc=16, h=7),              # batch 2; 3 channel blocks a split
    dict(n=1, k=45, c=269, oc=45, h=14),            # MobileNetV2 pruned at 0.3: 19 zero
                                                    # channels, the last output block 13 wide
    dict(n=2, k=20, c=120, oc=20, h=7, clip=False),     # 8 + 12 zero channels, linear
    dict(n=1, k=16, c=48, oc=16, h=7),              # 16 zero channels (+33 % work) against
                                                    # the kernels apart
    dict(n=1, k=24, c=104, oc=24, h=2),             # 2x2 (MobileNetV2 at 64x64 input)
])
def test_small_map_block_is_one_kernel(args, host, tmp_path):
    """On a map of at most 14x14, expansion -> depthwise -> projection whose expanded
    channels split into whole 16-channel blocks a core (zero channels added where they cost at
    most ``MAX_PADDED_WORK``) is one ``inverted_residual_c16`` kernel (channel blocks inside,
    the cores' partial projections added), every epilogue kept; the result matches ONNX
    Runtime."""
    model = block_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"] == {SMALL_BLOCK: 1}, facts["kernels"]
    pw, dw, proj = facts["decisions"]
    assert pw["fused_into_next"] == SMALL_BLOCK and dw["fused_into_next"] == SMALL_BLOCK
    assert proj["chosen"] == SMALL_BLOCK
    assert proj["fused_expansion"]["epilogue"] == ["bias"] + ["clip(0,6)"] * args.get("clip", True)
    assert proj["fused_depthwise"]["epilogue"] == ["bias", "clip(0,6)"]
    assert proj["epilogue"] == ["bias"] + ["residual"] * args.get("residual", True)
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("args", [
    dict(n=1, k=20, c=36, oc=20, h=7),              # zero channels to whole blocks: 2.2x
                                                    # the work (over MAX_PADDED_WORK)
    dict(n=1, k=16, c=64, oc=16, h=7, ksize=5),     # a 5x5 depthwise conv
    dict(n=1, k=16, c=64, oc=16, h=7, extra_user=True),     # the expansion is an output too
    dict(n=1, k=32, c=192, oc=32, h=1),             # a 1x1 map
    dict(n=2, k=8, c=24, oc=16, h=12, residual=False),  # one channel block a split (padded)
    dict(n=1, k=16, c=32, oc=16, h=7),              # one channel block a split (whole)
])
def test_small_map_block_kept_apart(args, host, tmp_path):
    model = block_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert SMALL_BLOCK not in facts["kernels"], facts["kernels"]
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("target", ["x86-avx2", "llvm"])
def test_small_map_block_other_targets(target, tmp_path):
    """The small-map block kernel with 8-channel blocks (AVX2, generic LLVM)."""
    spec = resolve_target(target)
    if not spec.runs_here:
        pytest.skip(f"{target} does not run here: {spec.why_not_here}")
    model = block_model(n=1, k=16, c=48, oc=24, h=7, residual=False)
    facts, feeds, outs = compile_and_run(model, spec, tmp_path)
    assert facts["kernels"] == {SMALL_BLOCK: 1}, facts["kernels"]
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("c, tile_tail", [
    (128, "4 splits of the expanded channels"),
    (120, "4 splits of the expanded channels (8 zero channels added)"),    # the last split's
])                                                                       # last block half zero
def test_small_map_block_adds_every_cores_part(c, tile_tail, tmp_path):
    """Compiled for 4 cores (run here on this machine's), the block's 128 expanded channels
    (120 and 8 zero ones) split four ways, two 16-channel blocks each, and the four partial
    projections add up to ONNX Runtime's result."""
    import dataclasses

    base = resolve_target("host")
    spec = dataclasses.replace(base, tvm_target={**base.tvm_target, "num-cores": 4})
    model = block_model(n=1, k=32, c=c, oc=32, h=7)
    facts, feeds, outs = compile_and_run(model, spec, tmp_path)
    assert facts["kernels"] == {SMALL_BLOCK: 1}, facts["kernels"]
    assert facts["decisions"][2]["tile"].endswith(tile_tail), facts["decisions"][2]
    assert_matches_ort(model, feeds, outs)


def test_pointwise_tasks_are_pixel_chunks():
    """1x1 conv tasks: (chunk of up to 256 pixels, panel), pixel-major; smaller chunks when a
    whole-map chunk would leave fewer than 8 tasks."""
    import tvm

    from sparsec.targets.kernels import pointwise

    tile = pointwise.Tile(12, 16)
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}):
        for (ci, p, co), tasks in (((16, 12544, 96), 49 * 8),   # 16-tile chunks x 8 panels
                                   ((96, 196, 576), 48),        # one 13-tile chunk x 48
                                   ((32, 196, 12), 13)):        # one panel: single tiles
            script = pointwise.build(1, ci, p, co, tile).script()
            assert re.findall(r"T.parallel\((\d+)\)", script) == [str(tasks)]


@pytest.mark.parametrize("cores", [2, 3, 4])
def test_small_maps_fuse_in_one_band_a_core(cores, tmp_path):
    """Under ``MIN_PIXELS`` a depthwise -> projection pair fuses only where the rows split
    evenly into one band a core (14x14 on 2 cores: 7 rows a task, on 3 cores apart), the
    band's depthwise output fits, and the map has ``MIN_BAND_PIXELS``; the fused 14x14 kernel
    (MobileNetV2's block, with its residual) matches ONNX Runtime."""
    import tvm

    from sparsec.targets.kernels import dw_pointwise
    from sparsec.targets.kernels.conv2d import ConvShape

    def shape(c, h):
        return ConvShape(1, c, h, h, c, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))

    target = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": cores}
    with tvm.target.Target(target):
        fused = dw_pointwise.worth_fusing(shape(576, 14))
        assert fused == (14 % cores == 0)
        if fused:
            assert dw_pointwise.plan(576, 96, 14, 14).rows == 14 // cores
        assert not dw_pointwise.worth_fusing(shape(24, 10))            # 100 pixels
        assert dw_pointwise.worth_fusing(shape(8192, 14)) is False      # D over 512 KB
        assert dw_pointwise.plan(32, 24, 56, 56).rows == dw_pointwise.pick_band(
            56, cores, lambda r: 32 * r * 64 * 4 <= dw_pointwise.MAX_TILE_BYTES)
    if cores == 2:        # compiled for a 2-core target, run here
        import dataclasses

        base = resolve_target("host")
        spec = dataclasses.replace(base, tvm_target={**base.tvm_target, "num-cores": 2})
        for i, sparse in enumerate((0.0, 0.8)):       # dense and sparse (ELL) projections
            model = dw_pointwise_model(n=1, c=48, h=14, oc=16, residual=True, sparse=sparse)
            facts, feeds, outs = compile_and_run(model, spec, tmp_path, name=f"m{i}")
            assert facts["kernels"] == {"dw_conv1x1_nchw": 1}, facts["kernels"]
            assert facts["decisions"][1]["tile"].startswith("7 rows"), facts["decisions"][1]
            assert_matches_ort(model, feeds, outs)


def test_fused_depthwise_pointwise_schedule():
    """The fused kernel's shape: one parallel loop over row tiles; the depthwise taps and the
    projection's pixels are vectorized."""
    import tvm

    from sparsec.targets.kernels import dw_pointwise
    from sparsec.targets.kernels.conv2d import ConvShape

    s = ConvShape(1, 32, 56, 56, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2}):
        fplan = dw_pointwise.plan(32, 24, 56, 56)
        func = dw_pointwise.build(s, 24, fplan)
    assert fplan == dw_pointwise.FusedPlan(rows=14, oct=12, lanes=16)   # 2 row tiles a core
    text = func.script()
    assert text.count("T.parallel(4)") == 1 and text.count("T.parallel") == 1
    assert text.count("T.vectorized(16)") >= 4   # depthwise acc, D, projection, write-back


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_pad_is_vector_code(stride):
    """The padded input plane (stride phases) is copied in vectors: every read of X is a
    contiguous vector load (a strided one compiles to scalar loads), and a stride-2 phase is
    picked out of two loads by a shuffle."""
    import tvm

    from sparsec.targets.kernels import depthwise
    from sparsec.targets.kernels.conv2d import ConvShape

    s = ConvShape(1, 144, 56, 56, 144, 3, 3, (stride, stride), (1, 1, 1, 1), (1, 1))
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}):
        text = depthwise.build(s).script()
    reads = re.findall(r"X\[[^\]]*\]", text)[1:]        # [0]: the block's read region
    assert reads and all("T.Ramp(" in r and r.endswith(", 1, 16)]") or r.endswith(", 1, 8)]")
                         or r.endswith(", 1, 4)]") for r in reads), reads
    assert ("T.Shuffle" in text) == (stride == 2)


@pytest.mark.parametrize("seq,dh,scale_k", [(16, 8, False), (24, 16, False), (10, 8, False),
                                            (21, 12, False), (37, 8, True)])
def test_attention_batch_matmul(seq, dh, scale_k, host, tmp_path):
    """softmax(Q K^T * scale) V over [2, 3] heads: both matmuls multiply two run-time tensors
    and get ``batch_matmul`` (N = seq for Q K^T, N = head dim for P V), N a multiple of 8 or
    not (a zero-padded last panel); the residual add after P V folds into its write-back.
    With ``scale_k`` the scale multiplies K^T (wav2vec2's export), so B is read in place."""
    n = helper.make_node
    nodes = [n("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])]
    if scale_k:
        nodes += [n("Mul", ["kt", "scale"], ["kts"]), n("MatMul", ["q", "kts"], ["ss"])]
    else:
        nodes += [n("MatMul", ["q", "kt"], ["s"]), n("Mul", ["s", "scale"], ["ss"])]
    nodes += [n("Softmax", ["ss"], ["p"], axis=-1), n("MatMul", ["p", "v"], ["o"]),
              n("Add", ["o", "q"], ["y"])]
    shape = [2, 3, seq, dh]
    model = make_model(nodes, [("q", shape), ("k", shape), ("v", shape)], [("y", shape)],
                       {"scale": np.array(dh ** -0.5)})
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    mm = [d for d in facts["decisions"] if d["chosen"] == "batch_matmul"]
    assert facts["kernels"].get("batch_matmul", 0) == 2, facts["kernels"]
    assert [d["shape"]["N"] for d in mm] == [seq, dh]
    assert mm[-1]["epilogue"] == ["residual"]
    # Q @ K^T reads K untransposed (the kernel packs K^T a panel at a time); P @ V does not
    assert [d.get("b_transposed", False) for d in mm] == [not scale_k, False]
    assert_matches_ort(model, feeds, outs)


def test_batch_matmul_3d_with_bias_and_relu(host, tmp_path):
    rng = np.random.default_rng(5)
    n = helper.make_node
    nodes = [n("MatMul", ["a", "b"], ["m"]), n("Add", ["m", "bias"], ["mb"]),
             n("Relu", ["mb"], ["y"])]
    model = make_model(nodes, [("a", [4, 12, 20]), ("b", [4, 20, 24])], [("y", [4, 12, 24])],
                       {"bias": rng.standard_normal(24)})
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"] == {"batch_matmul": 1}, facts["kernels"]
    [d] = facts["decisions"]
    assert d["epilogue"] == ["bias", "relu"] and d["shape"]["batch"] == 4
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("form", ["gelu_op", "erf_decomposed", "tanh_softmax"])
def test_gelu_softmax_fast_math(form, host, tmp_path):
    """ONNX Gelu after a linear layer folds into its write-back (vectorized rational erf); an
    Erf / Tanh / Softmax left over runs TOPI's fast approximations. All match ONNX Runtime."""
    from sparsec.targets.host import load_library

    rng = np.random.default_rng(7)
    n = helper.make_node
    inits = {"w": rng.standard_normal((20, 48)) / 2, "b": rng.standard_normal(48),
             "r2": np.array(2 ** 0.5), "one": np.array(1.0), "half": np.array(0.5)}
    nodes = [n("MatMul", ["x", "w"], ["m"]), n("Add", ["m", "b"], ["h"])]
    if form == "gelu_op":
        nodes.append(n("Gelu", ["h"], ["y"]))
    elif form == "erf_decomposed":
        nodes += [n("Div", ["h", "r2"], ["d"]), n("Erf", ["d"], ["e"]),
                  n("Add", ["e", "one"], ["e1"]), n("Mul", ["h", "e1"], ["he"]),
                  n("Mul", ["he", "half"], ["y"])]
    else:
        nodes += [n("Tanh", ["h"], ["t"]), n("Softmax", ["t"], ["y"], axis=-1)]
    model = make_model(nodes, [("x", [6, 20])], [("y", [6, 48])], inits)
    model.opset_import[0].version = 20      # Gelu is an ONNX op from opset 20
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    [d] = [d for d in facts["decisions"] if d["chosen"] == "dense_packed"]
    assert d["epilogue"] == (["bias", "gelu"] if form == "gelu_op" else ["bias"])
    if form == "gelu_op":
        assert facts["kernels"] == {"dense_packed": 1}, facts["kernels"]
    feeds = {"x": feeds["x"] * 3}           # reach erf's and tanh's tails too
    outs = load_library(tmp_path / "m.so", facts["inputs"]).run(feeds)
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("conv,kernel", [
    ("3x3", "conv2d_nchw_packed"), ("1x1", "conv1x1_nchw"), ("depthwise", "depthwise_nchw"),
    ("grouped", "grouped_conv2d_nchw"), ("gemm", "dense_packed"), ("gate_used_twice", None)])
def test_silu_folds_into_the_write_back(conv, kernel, host, tmp_path):
    """SiLU / Swish as ONNX spells it (``x * Sigmoid(x)`` after a conv or linear layer and its
    bias) becomes the kernel's activation: one kernel, no elementwise pass over the output.
    A sigmoid read by anything else (here also a graph output) stays a separate op. All match
    ONNX Runtime, inputs large enough to reach the exponential's clamp included."""
    from sparsec.targets.host import load_library

    rng = np.random.default_rng(13)
    n = helper.make_node
    if conv == "gemm":
        inits = {"w": rng.standard_normal((20, 48)) / 4, "b": rng.standard_normal(48)}
        nodes, x, y = [n("Gemm", ["x", "w", "b"], ["h"])], [("x", [6, 20])], [6, 48]
    else:
        c, oc, k, groups = {"3x3": (8, 16, 3, 1), "1x1": (16, 32, 1, 1),
                            "depthwise": (16, 16, 3, 16), "grouped": (16, 32, 3, 4),
                            "gate_used_twice": (8, 16, 3, 1)}[conv]
        inits = {"w": rng.standard_normal((oc, c // groups, k, k)) / 4,
                 "b": rng.standard_normal(oc)}
        nodes = [n("Conv", ["x", "w", "b"], ["h"], pads=[k // 2] * 4, group=groups)]
        x, y = [("x", [1, c, 12, 12])], [1, oc, 12, 12]
    nodes += [n("Sigmoid", ["h"], ["s"]), n("Mul", ["h", "s"], ["y"])]
    outputs = [("y", y)] + ([("s", y)] if conv == "gate_used_twice" else [])
    model = make_model(nodes, x, outputs, inits)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    if kernel is None:
        [d] = facts["decisions"]
        assert "silu" not in d.get("epilogue", []) and facts["kernels"].get("fallback"), facts
    else:
        [d] = facts["decisions"]
        assert d["chosen"] == kernel and d["epilogue"] == ["bias", "silu"], d
        # no sigmoid or product left (a lone 1x1 conv keeps one generic kernel, with or
        # without an activation)
        assert facts["kernels"] == {kernel: 1, **({"fallback": 1} if conv == "1x1" else {})}
    assert_matches_ort(model, feeds, outs)
    feeds = {"x": (feeds["x"] * 40).astype(np.float32)}     # |h| past 88: exp's clamp
    outs = load_library(tmp_path / "m.so", facts["inputs"]).run(feeds)
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("case", ["conv_relu", "conv_relu6", "relu", "all_inf", "clip"])
def test_nan_stays_nan_through_relu(case, host, tmp_path):
    """A NaN reaching a ReLU or a Clip (a kernel's epilogue, ReLU6 included, or alone) stays
    NaN, as ONNX Runtime's does: ``max(x, 0)`` had made it 0, so a model that overflowed
    inside (all-Inf input: Inf times weights of both signs) gave finite outputs."""
    rng = np.random.default_rng(5)
    n = helper.make_node
    conv = [n("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])]
    nodes, oc = {"conv_relu": (conv + [n("Relu", ["c"], ["y"])], 16),
                 "all_inf": (conv + [n("Relu", ["c"], ["y"])], 16),
                 "conv_relu6": (conv + [n("Clip", ["c", "lo", "hi"], ["y"])], 16),
                 "relu": ([n("Relu", ["x"], ["y"])], 8),
                 "clip": ([n("Clip", ["x", "lo", "hi"], ["y"])], 8)}[case]
    inits = {"w": rng.standard_normal((16, 8, 3, 3)), "lo": np.array(0.0), "hi": np.array(6.0)}
    used = {i for nd in nodes for i in nd.input}
    model = make_model(nodes, [("x", [1, 8, 12, 12])], [("y", [1, oc, 12, 12])],
                       {k: v for k, v in inits.items() if k in used})
    x = rng.standard_normal((1, 8, 12, 12)).astype(np.float32)
    if case == "all_inf":
        x[:] = np.inf
    else:
        x[0, 0, 5, 5] = x[0, 3, 0, 0] = np.nan
    [want] = run_ort(model, {"x": x})
    _, _, [got] = compile_and_run(model, host, tmp_path, {"x": x})
    assert np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["folded", "gate_first", "output_too", "batch_2",
                                  "big_weights"])
def test_squeeze_excitation_gate_scales_the_weights(case, host, tmp_path):
    """An SE block's ``x * gate`` ([1, C, 1, 1]) read only by convs with our kernels (here a
    1x1 and a 3x3, the two kinds that fold it) is not computed: each conv reads ``x`` and
    scales its packed weight by the gate per call. Not where the product is also a graph
    output, for a batch of 2 (a gate per image), or where the weights outweigh the
    activation. All match ONNX Runtime, the gate's 0..1 range spanned (inputs x4)."""
    from sparsec.targets.host import load_library

    rng = np.random.default_rng(21)
    n = helper.make_node
    c, hw, batch = (96, 2, 1) if case == "big_weights" else (16, 12, 2 if case == "batch_2"
                                                             else 1)
    inits = {"w0": rng.standard_normal((c, 3, 3, 3)) / 4,
             "s1": rng.standard_normal((4, c, 1, 1)) / 2, "s2": rng.standard_normal((c, 4, 1, 1)),
             "wa": rng.standard_normal((24, c, 1, 1)) / 4,
             "wb": rng.standard_normal((8, c, 3, 3)) / 8, "bb": rng.standard_normal(8)}
    mul = ["g", "x1"] if case == "gate_first" else ["x1", "g"]
    nodes = [n("Conv", ["x", "w0"], ["x0"], pads=[1, 1, 1, 1]), n("Relu", ["x0"], ["x1"]),
             n("GlobalAveragePool", ["x1"], ["p"]), n("Conv", ["p", "s1"], ["q"]),
             n("Relu", ["q"], ["r"]), n("Conv", ["r", "s2"], ["t"]),
             n("Sigmoid", ["t"], ["g"]), n("Mul", mul, ["y"]),
             n("Conv", ["y", "wa"], ["ya"]), n("Conv", ["y", "wb", "bb"], ["yb"], pads=[1, 1, 1, 1])]
    outputs = [("ya", [batch, 24, hw, hw]), ("yb", [batch, 8, hw, hw])] + (
        [("y", [batch, c, hw, hw])] if case == "output_too" else [])
    model = make_model(nodes, [("x", [batch, 3, hw, hw])], outputs, inits)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    gated = [d for d in facts["decisions"] if d.get("input_gate")]
    readers = [d for d in facts["decisions"] if d.get("op") == "conv2d"][-2:]
    if case in ("folded", "gate_first"):
        assert gated == readers and len(gated) == 2, facts["decisions"]
        assert {d["chosen"] for d in gated} == {"conv1x1_nchw", "conv2d_nchw_packed"}, gated
    else:
        assert not gated, facts["decisions"]
    assert_matches_ort(model, feeds, outs)
    feeds = {"x": (feeds["x"] * 4).astype(np.float32)}
    assert_matches_ort(model, feeds, load_library(tmp_path / "m.so", facts["inputs"]).run(feeds))


@pytest.mark.parametrize("shape,kernel", [([2, 4, 19], True), ([3, 37], True), ([159, 159], True),
                                          ([4, 32], False), ([6, 8], False)])
def test_softmax_rows_numerics(shape, kernel, host, tmp_path):
    """Softmax over rows that are not whole 16-lane vectors runs ``softmax_rows`` (vector
    code with an overlapping last vector); whole-vector and short rows stay on the generic
    row schedule. Both match ONNX Runtime, a masked (-1e9) column and a large logit
    included."""
    from sparsec.targets.host import load_library

    n = helper.make_node
    model = make_model([n("Mul", ["x", "s"], ["xs"]), n("Softmax", ["xs"], ["y"], axis=-1)],
                       [("x", shape)], [("y", shape)], {"s": np.array(1.0)})
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert ("softmax_rows" in facts["kernels"]) == kernel, facts["kernels"]
    x = (feeds["x"] * 8).astype(np.float32)
    x[..., 0, -1] = -1e9
    x[..., -1, 3] = 90.0
    feeds = {"x": x}
    outs = load_library(tmp_path / "m.so", facts["inputs"]).run(feeds)
    assert_matches_ort(model, feeds, outs)
    np.testing.assert_allclose(outs[0].sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_isnan_legalizes_to_a_bit_test(dtype):
    """``isnan`` is legalized as an integer test of the bits (TVM's intrinsic runs one lane at
    a time): it is true on every NaN (quiet, signalling, negative) and false on infinities,
    zeros, subnormals and the largest finite values, for each float width."""
    import tvm
    from tvm import relax

    from sparsec.targets.host import legalize_isnan

    bits = {"float16": np.uint16, "float32": np.uint32, "float64": np.uint64}[dtype]
    info = np.finfo(dtype)
    special = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, info.max, -info.max,
               info.tiny, info.smallest_subnormal, 1.0, -2.5]
    x = np.array(special, dtype=dtype)
    # a signalling NaN: exponent all ones, quiet bit clear, a payload bit set
    width = np.dtype(dtype).itemsize * 8
    mantissa = {"float16": 10, "float32": 23, "float64": 52}[dtype]
    snan = ((1 << (width - 1)) - 1) ^ (1 << (mantissa - 1))
    x = np.concatenate([x, np.array([snan], dtype=bits).view(dtype)])
    bb = relax.BlockBuilder()
    v = relax.Var("x", relax.TensorType(list(x.shape), dtype))
    with bb.function("main", [v]):
        bb.emit_func_output(bb.emit(relax.op.isnan(v)))
    mod = relax.transform.LegalizeOps({"relax.isnan": legalize_isnan})(bb.get())
    assert "T.isnan" not in mod.script()
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, np.isnan(x))


def test_masked_softmax_keeps_nan_semantics(host, tmp_path):
    """The dynamo exporter's attention softmax, ``where(isnan(softmax(x)), 0, softmax(x))``,
    over rows of one vector (16) and of several (48) gets the row schedule, matches ONNX
    Runtime, and a row holding NaN still comes out as zeros (NaN is not folded away)."""
    from sparsec.targets.host import load_library

    n = helper.make_node
    for width in (16, 48):
        model = make_model([n("Softmax", ["x"], ["s"], axis=-1), n("IsNaN", ["s"], ["nan"]),
                            n("Where", ["nan", "zero", "s"], ["y"])],
                           [("x", [2, 8, width])], [("y", [2, 8, width])],
                           {"zero": np.array(0.0)})
        facts, feeds, outs = compile_and_run(model, host, tmp_path, name=f"m{width}")
        assert_matches_ort(model, feeds, outs)
        x = feeds["x"].copy()
        x[1, 3, 5] = np.nan
        out = load_library(tmp_path / f"m{width}.so", facts["inputs"]).run({"x": x})[0]
        assert (out[1, 3] == 0).all()
        np.testing.assert_allclose(np.delete(out.reshape(16, width), 11, 0).sum(-1), 1.0,
                                   rtol=1e-5)


def test_sigmoid_and_silu_run_fast_exp(host, tmp_path):
    """Sigmoid (alone, and SiLU's x * sigmoid(x) after a conv) becomes 1 / (1 + exp(-x)) with
    TOPI's vectorizable fast_exp before legalization: no sigmoid op is left, and the results
    match ONNX Runtime over a range that reaches fast_exp's clamp (|x| > 88)."""
    from sparsec.targets.host import import_onnx, load_library, sigmoid_pass

    rng = np.random.default_rng(3)
    n = helper.make_node
    inits = {"w": rng.standard_normal((8, 4, 3, 3)) / 3}
    nodes = [n("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), n("Sigmoid", ["c"], ["s"]),
             n("Mul", ["c", "s"], ["y"]), n("Sigmoid", ["x"], ["z"])]
    model = make_model(nodes, [("x", [1, 4, 6, 10])], [("y", [1, 8, 6, 10]), ("z", [1, 4, 6, 10])],
                       inits)
    assert "R.sigmoid" in import_onnx(model).script()
    assert "R.sigmoid" not in sigmoid_pass()(import_onnx(model)).script()
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    feeds = {"x": (feeds["x"] * 60).astype(np.float32)}      # up to |x| ~ 200
    outs = load_library(tmp_path / "m.so", facts["inputs"]).run(feeds)
    assert_matches_ort(model, feeds, outs)


def test_small_kernels_run_serially():
    """``serialize_small`` makes a parallel loop with less work than its limit serial and
    leaves a bigger one alone; ``work`` counts trip counts times arithmetic nodes."""
    from tvm import s_tir, te

    from sparsec.targets import parallel

    def func(rows: int):
        x = te.placeholder((rows, 64), "float32", name="x")
        y = te.compute((rows, 64), lambda i, j: x[i, j] * 2.0 + 1.0, name="y")
        sch = s_tir.Schedule(te.create_prim_func([x, y]))
        sch.parallel(sch.get_loops(sch.get_sblock("y"))[0])
        return sch.mod["main"]

    small, big = func(16), func(16384)      # 2 operations an element: 2k and 2M
    assert parallel.work(small.body) == 16 * 64 * 2
    assert "T.parallel" not in parallel.serialize_small(small, 1e6).script()
    assert "T.parallel" in parallel.serialize_small(big, 1e6).script()
    assert parallel.serialize_small(big, 1e6).same_as(big)


@pytest.mark.parametrize("layers,m,parallel_loops", [(1, 64, True), (1, 4, False), (32, 8, False)])
def test_threads_only_where_kernels_are_big(layers, m, parallel_loops, host):
    """Threads are per model, by the mean work of a parallel kernel call
    (``MIN_PARALLEL_CALL_WORK``): one 64 x 256 x 256 MatMul (8.4 M operations) keeps its
    threads; at 4 rows (0.5 M) it runs serially, and so does a chain of 32 MatMuls of 8 rows
    (1.0 M a call, 34 M in all: more work than the single one, in kernels too small to share)."""
    import tvm

    from sparsec.targets.host import build_pipeline, import_onnx

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]) for i in range(layers)]
    model = make_model(nodes, [("h0", [m, 256])], [(f"h{layers}", [m, 256])],
                       {"w": rng.standard_normal((256, 256)) / 16})
    target = tvm.target.Target(dict(host.tvm_target))
    lowered = build_pipeline(target, 2, [], {})(import_onnx(model))
    texts = [f.script() for _, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("T.parallel" in t for t in texts) == parallel_loops


@pytest.mark.parametrize("form", ["gelu", "residual_relu", "reshape_used_twice"])
def test_epilogue_folds_past_reshapes(form, host, tmp_path):
    """A Linear on a 3-D input as torch exports it (reshape -> Gemm -> reshape) keeps its
    skip connection and activation in the kernel's write-back: elementwise ops commute with
    the reshape, which stays (a view). A reshape whose output has another user blocks the
    fold."""
    rng = np.random.default_rng(11)
    n = helper.make_node
    inits = {"w": rng.standard_normal((24, 40)) / 4, "b": rng.standard_normal(40),
             "w2": rng.standard_normal((40, 8)) / 4}
    nodes = [n("Reshape", ["x", "s2"], ["x2"]), n("Gemm", ["x2", "w", "b"], ["g"]),
             n("Reshape", ["g", "s3"], ["g3"])]
    outputs = [("y", [6, 8])]
    if form == "gelu":
        nodes.append(n("Gelu", ["g3"], ["e"]))
        want = ["bias", "gelu"]
    elif form == "residual_relu":
        nodes += [n("Add", ["g3", "r"], ["a"]), n("Relu", ["a"], ["e"])]
        want = ["bias", "residual", "relu"]
    else:
        nodes += [n("Relu", ["g3"], ["e"]), n("Neg", ["g3"], ["z"])]
        outputs.append(("z", [1, 6, 40]))
        want = ["bias"]
    nodes += [n("Reshape", ["e", "s4"], ["e2"]), n("MatMul", ["e2", "w2"], ["y"])]
    inputs = [("x", [1, 6, 24])] + ([("r", [1, 6, 40])] if form == "residual_relu" else [])
    model = make_model(nodes, inputs, outputs, inits)
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array(v, np.int64), k)
        for k, v in (("s2", [6, 24]), ("s3", [1, 6, 40]), ("s4", [6, 40]))])
    model.opset_import[0].version = 20      # Gelu is an ONNX op from opset 20
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    d = [d for d in facts["decisions"] if d["chosen"] == "dense_packed"]
    assert d[0]["epilogue"] == want
    if form != "reshape_used_twice":      # nothing left between the two kernels
        assert facts["kernels"] == {"dense_packed": 2}, facts["kernels"]
    else:
        assert facts["kernels"]["fallback"] >= 1
    assert_matches_ort(model, feeds, outs)


def test_fallback_inlines_data_moves():
    """Attention's head split (reshape -> transpose -> reshape) fused by FuseTIR into one
    function is scheduled as one loop nest, parallel and vectorized: no intermediate buffers
    are left."""
    import tvm
    from tvm import te, topi

    from sparsec.targets.kernels import fallback

    x = te.placeholder((128, 384), "float32", name="x")
    y = topi.reshape(topi.transpose(topi.reshape(x, (128, 12, 32)), (1, 0, 2)), (12, 128, 32))
    func = te.create_prim_func([x, y])

    def blocks(f):
        sch = tvm.s_tir.Schedule(f)
        return len(sch.get_child_blocks(sch.get_sblock("root")))

    assert blocks(func) == 3
    scheduled = fallback.schedule_generic(func)
    assert blocks(scheduled) == 1
    text = scheduled.script()
    assert "T.parallel(1536)" in text and "T.vectorized(16)" in text, text
    sch = tvm.s_tir.Schedule(scheduled)
    lib = tvm.compile(sch.mod, target={"kind": "llvm"})
    a = np.random.default_rng(0).standard_normal((128, 384)).astype("float32")
    out = tvm.runtime.empty((12, 128, 32), "float32")
    lib["main"](tvm.runtime.tensor(a), out)
    np.testing.assert_array_equal(out.numpy(), a.reshape(128, 12, 32).transpose(1, 0, 2))


def test_fallback_vectorizes_mask_reads_not_mask_writes():
    """An attention mask (a bool read) no longer keeps its block scalar; a block that writes a
    bool buffer still is (TVM 0.27 cannot lower a vectorized bool store), and compiles."""
    import tvm
    from tvm import te, tirx, topi

    from sparsec.targets.kernels import fallback

    m = te.placeholder((1, 1, 8, 64), "bool", name="m")
    x = te.placeholder((1, 4, 8, 64), "float32", name="x")
    c = te.placeholder((), "float32", name="c")
    masked = topi.where(m, topi.multiply(x, tirx.const(0.5, "float32")), c)
    nan = topi.isnan(x)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    rng = np.random.default_rng(4)
    mv, xv = rng.random((1, 1, 8, 64)) > 0.5, rng.standard_normal((1, 4, 8, 64)).astype("f4")
    for args, vectorized, want in (([m, x, c, masked], True, np.where(mv, xv * 0.5, -3.0)),
                                   ([x, nan], False, np.isnan(xv))):
        func = fallback.schedule_function(te.create_prim_func(args), target)
        assert ("T.vectorized" in func.script()) == vectorized
        lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
        out = tvm.runtime.empty(want.shape, str(want.dtype))
        feeds = [mv, xv, np.float32(-3.0)] if vectorized else [xv]
        lib["main"](*[tvm.runtime.tensor(np.asarray(v)) for v in feeds], out)
        np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize("op", ["softmax", "layer_norm", "rms_norm", "masked_softmax",
                                "row_max"])
def test_fallback_row_reductions(op):
    """Softmax and the norms get the row schedule: one parallel loop over rows, reductions
    as 16-lane vector partial sums (rfactor), and match numpy."""
    import tvm
    from tvm import te, topi

    from sparsec.targets.kernels import fallback

    rng = np.random.default_rng(2)
    x = te.placeholder((2, 64, 96), "float32", name="x")
    g = te.placeholder((96,), "float32", name="g")
    b = te.placeholder((96,), "float32", name="b")
    xv = rng.standard_normal((2, 64, 96)).astype("float32") * 3
    gv, bv = rng.standard_normal(96).astype("float32"), rng.standard_normal(96).astype("float32")
    if op == "softmax":
        args, feeds = [x, topi.nn.fast_softmax(x, axis=-1)], [xv]
        e = np.exp(xv - xv.max(-1, keepdims=True))
        want = e / e.sum(-1, keepdims=True)
    elif op == "masked_softmax":   # BERT's: NaN rows (fully masked) become zeros
        zero = te.placeholder((), "float32", name="zero")
        y = topi.nn.fast_softmax(x, axis=-1)
        args, feeds = [x, zero, topi.where(topi.isnan(y), zero, y)], [xv, np.float32(0)]
        e = np.exp(xv - xv.max(-1, keepdims=True))
        want = e / e.sum(-1, keepdims=True)
    elif op == "row_max":          # the reduction is the output block itself
        args, feeds, want = [x, topi.max(x, axis=-1)], [xv], xv.max(-1)
    elif op == "layer_norm":
        args = [x, g, b, topi.nn.layer_norm(x, g, b, axis=[-1], epsilon=1e-5)]
        feeds = [xv, gv, bv]
        mu, var = xv.mean(-1, keepdims=True), xv.var(-1, keepdims=True)
        want = (xv - mu) / np.sqrt(var + 1e-5) * gv + bv
    else:
        args, feeds = [x, g, topi.nn.rms_norm(x, g, axis=[-1], epsilon=1e-5)], [xv, gv]
        want = xv / np.sqrt((xv * xv).mean(-1, keepdims=True) + 1e-5) * gv
    func = te.create_prim_func(args)
    scheduled = fallback.schedule_rows(func)
    assert scheduled is not None
    text = scheduled.script()
    assert "T.parallel(128)" in text and "_rf" in text and "T.vectorized(16)" in text, text
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    lib = tvm.compile(tvm.IRModule({"main": fallback.schedule_function(func, target)}),
                      target=target)
    out = tvm.runtime.empty(want.shape, "float32")
    lib["main"](*[tvm.runtime.tensor(np.asarray(v, dtype="float32")) for v in feeds], out)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=2e-5)
    # not row-wise: a reduction over a leading axis keeps the other rules
    assert fallback.schedule_rows(te.create_prim_func([x, topi.sum(x, axis=1)])) is None


def test_fallback_rows_of_one_vector():
    """A softmax over rows of exactly one vector (16: attention over 16 positions) gets the
    row schedule too, its reductions as two half vectors, and matches numpy."""
    import tvm
    from tvm import te, topi

    from sparsec.targets.kernels import fallback

    xv = np.random.default_rng(5).standard_normal((4, 16, 16)).astype("float32") * 3
    x = te.placeholder(xv.shape, "float32", name="x")
    func = te.create_prim_func([x, topi.nn.fast_softmax(x, axis=-1)])
    scheduled = fallback.schedule_rows(func)
    assert scheduled is not None and "_rf" in scheduled.script()
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.empty(xv.shape, "float32")
    lib["main"](tvm.runtime.tensor(xv), out)
    e = np.exp(xv - xv.max(-1, keepdims=True))
    np.testing.assert_allclose(out.numpy(), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("shape,op,lanes", [((2, 24, 20, 20), "mean", 16),
                                             ((1, 8, 14, 14), "max", 4),
                                             ((3, 40, 96), "sum", 16)])
def test_fallback_trailing_reductions(shape, op, lanes):
    """A reduction over the trailing axes (global pooling, an SE squeeze) walks them as one
    contiguous axis into a vector accumulator (rfactor, 16 lanes or the widest that divides)
    and matches numpy; 7x7 (no lane width divides 49) and a reduction over a leading axis are
    left to the other rules."""
    import tvm
    from tvm import te, topi

    from sparsec.targets.kernels import fallback

    axes = list(range(2, len(shape))) if len(shape) == 4 else [len(shape) - 1]
    x = te.placeholder(shape, "float32", name="x")
    n = float(np.prod([shape[a] for a in axes]))
    y = {"mean": lambda: topi.divide(topi.sum(x, axis=axes, keepdims=True), n),
         "max": lambda: topi.max(x, axis=axes, keepdims=True),
         "sum": lambda: topi.sum(x, axis=axes)}[op]()
    func = te.create_prim_func([x, y])
    scheduled = fallback.schedule_tail_reduction(func)
    assert scheduled is not None
    text = scheduled.script()
    assert "_rf" in text and f"T.vectorized({lanes})" in text, text
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    lib = tvm.compile(tvm.IRModule({"main": fallback.schedule_function(func, target)}),
                      target=target)
    xv = np.random.default_rng(5).standard_normal(shape).astype("float32")
    want = {"mean": lambda: xv.mean(tuple(axes), keepdims=True),
            "max": lambda: xv.max(tuple(axes), keepdims=True),
            "sum": lambda: xv.sum(tuple(axes))}[op]()
    out = tvm.runtime.empty(want.shape, "float32")
    lib["main"](tvm.runtime.tensor(xv), out)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    seven = te.placeholder((1, 8, 7, 7), "float32", name="x")
    assert fallback.schedule_tail_reduction(
        te.create_prim_func([seven, topi.sum(seven, axis=[2, 3])])) is None
    assert fallback.schedule_tail_reduction(
        te.create_prim_func([x, topi.sum(x, axis=1)])) is None


def test_conv_strip_width_follows_the_vector_registers():
    """AVX-512's 32 registers hold 7-8 pixel strips (no wasted column on 7x7 / 14x14 maps)
    and 1x1-conv tiles of up to 16 accumulators; AVX2's 16 and other targets keep the smaller
    tiles; tuning explores what the target holds."""
    import tvm

    from sparsec.targets import tuning
    from sparsec.targets.kernels import conv2d, pointwise

    shape = {"n": 1, "ic": 512, "h": 7, "w": 7, "oc": 512, "kh": 3, "kw": 3,
             "stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "dtype": "float32"}
    for target, widest, seven in (({"kind": "llvm", "mcpu": "skylake-avx512"}, 8, 7),
                                  ({"kind": "llvm", "mcpu": "haswell"}, 6, 4),
                                  ({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, 6, 4)):
        with tvm.target.Target(target):
            assert conv2d.max_tile() == widest
            assert conv2d.pick_width_tile(7) == seven
            assert [v["width_tile"] for v in tuning._variants(conv2d.NAME, shape)] == list(
                range(1, widest + 1))
            assert pointwise.tiles() == (pointwise.TILES_AVX512 if widest == 8
                                         else pointwise.TILES)
            # two 16-channel blocks per tile where 2 x strip accumulators fit
            assert conv2d.pick_oc_vecs(32, seven, 7) == (2 if widest == 8 else 1)
    assert conv2d.max_tile() == conv2d.MAX_TILE     # no target: the conservative choice
    with tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}):
        assert conv2d.pick_oc_vecs(3, 7, 7) == 1      # odd block count
        assert conv2d.pick_oc_vecs(2, 7, 7) == 1      # one block pair x 7 rows: < 8 tasks
        assert conv2d.pick_oc_vecs(2, 7, 14) == 2


@pytest.mark.parametrize("args", [
    dict(n=1, c=24, h=9, w=9, oc=32, k=3, stride=1, pad=1, relu=True),   # 2 blocks, 9 rows
    dict(n=2, c=16, h=7, w=7, oc=20, k=1, stride=1, pad=0),    # 2 blocks, 4 channels padded
    dict(n=1, c=8, h=20, w=20, oc=64, k=3, stride=2, pad=1),   # 2 pairs, stride 2
])
def test_conv_two_channel_blocks_per_tile(args, host, tmp_path):
    """With AVX-512 the direct conv's tile takes two 16-channel blocks (each input broadcast
    feeds both); numerics with padded channels, batches and strides."""
    import tvm

    from sparsec.targets.kernels import conv2d

    model = conv_model(**args)
    shape = conv2d.ConvShape(args["n"], args["c"], args["h"], args["w"], args["oc"], args["k"],
                             args["k"], (args["stride"],) * 2, (args["pad"],) * 4, (1, 1))
    with tvm.target.Target(host.tvm_target):
        script = conv2d.build(shape).script()
    if "avx512f" in host.cpu_flags:    # (n, block pair, output row) tasks
        pairs = -(-args["oc"] // 32)
        assert f"T.parallel({args['n'] * pairs * shape.out_hw[0]})" in script
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"].get("conv2d_nchw_packed") == 1, facts["kernels"]
    assert_matches_ort(model, feeds, outs)


def test_conv_rows_major_rule():
    """A conv's parallel tasks run rows outermost where the rows split evenly into bands of
    at least ``MIN_BAND_ROWS`` a core (each core then reads the band the previous conv wrote),
    channel groups outermost otherwise; never for a batch known only at run time."""
    import tvm
    from tvm import tirx

    from sparsec.targets.kernels import conv2d

    with tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}):
        assert conv2d.rows_major(1, 56) and conv2d.rows_major(1, 28)
        assert not conv2d.rows_major(1, 14)            # 7-row bands
        assert not conv2d.rows_major(1, 7)             # 4 + 3 rows
        assert conv2d.rows_major(4, 7)                 # whole images a core
        assert not conv2d.rows_major(3, 7)             # 21 rows: uneven
        assert conv2d.rows_major(1, 112, unit=2) and not conv2d.rows_major(1, 45, unit=3)
        assert not conv2d.rows_major(tirx.Var("n", "int64"), 56)
    with tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 4}):
        assert conv2d.rows_major(1, 56) and not conv2d.rows_major(1, 28)
    # the kernel follows the rule: rows-major, the input is padded in one band a core (its
    # 14 output rows read 16 padded ones), else in one plane a channel
    shape = conv2d.ConvShape(1, 64, 28, 28, 64, 3, 3, (1, 1), (1,) * 4, (1, 1))
    for cores, pad in ((2, "(1, 2, 64, 1, 1, 16, 30)"), (4, "(1, 64, 30, 30)")):
        with tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": cores}):
            assert f"pad = T.sblock_alloc_buffer({pad})" in conv2d.build(shape).script()


@pytest.mark.parametrize("by_rows", [True, False])
@pytest.mark.parametrize("args", [
    dict(n=1, c=16, h=28, w=28, oc=40, k=3, stride=1, pad=1, relu=True),  # ragged block
    dict(n=2, c=24, h=14, w=13, oc=32, k=3, stride=2, pad=1),     # batch 2, 7 odd rows
    dict(n=1, c=6, h=32, w=30, oc=16, k=3, stride=2, pad=2, dil=2),  # two padded bands, s2+dil
    dict(n=1, c=8, h=60, w=60, oc=64, k=1, stride=2, pad=0, bias=False),  # 1x1 stride 2
    dict(n=1, c=3, h=64, w=64, oc=24, k=3, stride=2, pad=1),      # stem: width-vectorized
    dict(n=2, c=12, h=10, w=80, oc=24, k=3, stride=1, pad=1),     # wvec, batch 2, 10 rows
])
def test_conv_parallel_order_numerics(args, by_rows, host, tmp_path, monkeypatch):
    """Both parallel orders of both direct kernels (rows outermost, or channel groups) compute
    the same conv, on row counts that do and do not split evenly among the cores (rows-major
    channel-blocked convs pad their input in bands, halo rows in both)."""
    from sparsec.targets.kernels import conv2d

    monkeypatch.setattr(conv2d, "rows_major", lambda n, oh, unit=1: by_rows)
    model = conv_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"].get("conv2d_nchw_packed") == 1, facts["kernels"]
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("args", [
    dict(n=1, c=12, h=15, w=15, oc=12, k=3, stride=1, pad=1, group=3, relu=True),  # 4 wide
    dict(n=1, c=16, h=8, w=8, oc=16, k=3, stride=2, pad=1, group=2),     # RegNet's 8 wide
    dict(n=1, c=14, h=9, w=11, oc=21, k=3, stride=1, pad=1, group=7),    # pruned: 3 of 4 lanes
    dict(n=2, c=40, h=6, w=7, oc=40, k=3, stride=1, pad=2, dil=2, group=2,
         clip=(0.0, 6.0)),                                               # 20 wide, batch 2
    dict(n=1, c=6, h=10, w=10, oc=12, k=3, stride=1, pad=1, group=6, bias=False),  # multiplier 2
])
def test_grouped_conv_numerics(args, host, tmp_path):
    """Grouped convs (and depthwise ones with a channel multiplier > 1) run on
    ``grouped_conv2d_nchw``, any group width (not a multiple of the vector width included),
    with the epilogue folded; they match ONNX Runtime."""
    model = conv_model(**args)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    assert facts["kernels"] == {"grouped_conv2d_nchw": 1}, facts["kernels"]
    [d] = facts["decisions"]
    assert d["chosen"] == "grouped_conv2d_nchw"
    assert d["shape"]["groups"] == args["group"]
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("form", ["relu_then_clip", "clip_in_graph_twice", "dense_clip"])
def test_clip_folding(form, host, tmp_path):
    """Clip with constant bounds folds into the kernel after a Relu; a Clip whose input is also
    used elsewhere, or a second Clip after the first, is left to the generic path, and the
    result still matches."""
    rng = np.random.default_rng(3)
    n = helper.make_node
    inits = {"lo": np.array(-1.0), "hi": np.array(2.5)}
    if form == "dense_clip":
        inits["w"] = rng.standard_normal((20, 33)) / 4
        nodes = [n("MatMul", ["x", "w"], ["m"]), n("Clip", ["m", "lo", "hi"], ["y"])]
        model = make_model(nodes, [("x", [4, 20])], [("y", [4, 33])], inits)
    else:
        inits["w"] = rng.standard_normal((8, 1, 3, 3))
        nodes = [n("Conv", ["x", "w"], ["c"], pads=[1] * 4, group=8)]
        if form == "relu_then_clip":
            nodes += [n("Relu", ["c"], ["r"]), n("Clip", ["r", "lo", "hi"], ["y"])]
            outputs = [("y", [1, 8, 10, 10])]
        else:
            nodes += [n("Clip", ["c", "lo", "hi"], ["y"]), n("Clip", ["y", "", "lo"], ["z"])]
            outputs = [("y", [1, 8, 10, 10]), ("z", [1, 8, 10, 10])]
        model = make_model(nodes, [("x", [1, 8, 10, 10])], outputs, inits)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    [d] = [d for d in facts["decisions"] if d["chosen"] != "fallback"]
    want = {"relu_then_clip": ["clip(0,2.5)"], "clip_in_graph_twice": ["clip(-1,2.5)"],
            "dense_clip": ["clip(-1,2.5)"]}[form]
    assert d["epilogue"] == want
    assert_matches_ort(model, feeds, outs)


# --------------------------------------------------------------------------- end to end


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv(3->13, s2)+relu, residual block (conv+relu, conv, add, relu), depthwise conv,
    max pool, global average pool, flatten, Gemm(->10), softmax."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.standard_normal((13, 3, 3, 3)) / 5, "b1": rng.standard_normal(13) * 0.1,
        "w2": rng.standard_normal((13, 13, 3, 3)) / 10, "b2": rng.standard_normal(13) * 0.1,
        "w3": rng.standard_normal((13, 13, 3, 3)) / 10, "b3": rng.standard_normal(13) * 0.1,
        "wd": rng.standard_normal((13, 1, 3, 3)) / 3,
        "fw": rng.standard_normal((10, 13)) / 4, "fb": rng.standard_normal(10) * 0.1,
    }
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, strides=[2, 2]),
        n("Relu", ["c1"], ["r1"]),
        n("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4),
        n("Relu", ["c2"], ["r2"]),
        n("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1] * 4),
        n("Add", ["c3", "r1"], ["s"]),
        n("Relu", ["s"], ["r3"]),
        n("Conv", ["r3", "wd"], ["d"], pads=[1] * 4, group=13),
        n("MaxPool", ["d"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        n("GlobalAveragePool", ["p"], ["g"]),
        n("Flatten", ["g"], ["f"]),
        n("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
        n("Softmax", ["logits"], ["y"], axis=-1),
    ]
    return make_model(nodes, [("x", [2, 3, 24, 24])], [("y", [2, 10])], inits)


@pytest.mark.parametrize("op,attrs,kernel", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), "pool2d_nchw"),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), "pool2d_nchw"),
    ("MaxPool", dict(kernel_shape=[2, 3], strides=[1, 2], dilations=[2, 1]), "pool2d_nchw"),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
     "pool2d_nchw"),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                         count_include_pad=1), "pool2d_nchw"),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0],
                         ceil_mode=1), "pool2d_nchw"),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2]), "pool2d_nchw"),
    # counted padding past a ceil-mode edge: the generic schedule
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         ceil_mode=1, count_include_pad=1), "fallback"),
])
def test_pooling_kernel(host, tmp_path, op, attrs, kernel):
    """Max and average pooling (padding, ceil mode, counted or not, dilation) run as
    ``pool2d_nchw`` and match ONNX Runtime; what it does not take stays on the generic path."""
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, [2, 5, 13, 14])], [helper.make_tensor_value_info(
            "y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    [decision] = facts["decisions"]
    assert decision["chosen"] == kernel, decision
    assert_matches_ort(model, feeds, outs)


def small_mlp(seed: int = 0) -> onnx.ModelProto:
    """Gemm(64->45)+relu, MatMul(45->31)+Add+Tanh, Gemm(31->10); two outputs."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((45, 64)) / 8, "b1": rng.standard_normal(45) * 0.1,
             "w2": rng.standard_normal((45, 31)) / 7, "b2": rng.standard_normal(31) * 0.1,
             "w3": rng.standard_normal((10, 31)) / 6, "b3": rng.standard_normal(10) * 0.1}
    n = helper.make_node
    nodes = [n("Gemm", ["x", "w1", "b1"], ["h1"], transB=1), n("Relu", ["h1"], ["a1"]),
             n("MatMul", ["a1", "w2"], ["h2"]), n("Add", ["h2", "b2"], ["h2b"]),
             n("Tanh", ["h2b"], ["a2"]), n("Gemm", ["a2", "w3", "b3"], ["y"], transB=1)]
    return make_model(nodes, [("x", [5, 64])], [("y", [5, 10]), ("a2", [5, 31])], inits)


def test_end_to_end_cnn(host, tmp_path):
    model = small_cnn()
    facts, feeds, outs = compile_and_run(model, host, tmp_path, name="cnn")
    assert facts["kernels"]["conv2d_nchw_packed"] == 3
    assert facts["kernels"]["dense_packed"] == 1
    assert facts["kernels"]["depthwise_nchw"] == 1
    chosen = [(d["op"], d["chosen"]) for d in facts["decisions"]]
    assert chosen.count(("conv2d", "conv2d_nchw_packed")) == 3
    assert ("conv2d", "depthwise_nchw") in chosen
    epilogues = [d.get("epilogue") for d in facts["decisions"] if d["op"] == "conv2d"]
    # conv+bias+relu, conv+bias+relu, conv+bias+skip-add+relu folded into the kernels
    assert epilogues == [["bias", "relu"], ["bias", "relu"], ["bias", "residual", "relu"], []]
    for d in facts["decisions"]:  # the cost rule's estimates are reported for every choice
        assert d["chosen"] in d["candidates"]
        assert d["candidates"][d["chosen"]] == min(d["candidates"].values())
    assert facts["inputs"] == ["x"] and facts["outputs"] == ["y"]
    assert facts["target"] == host.tvm_target and facts["tvm_version"]
    assert_matches_ort(model, feeds, outs)


def test_end_to_end_mlp_two_inputs_and_outputs(host, tmp_path):
    from sparsec.targets.host import load_library

    mlp = small_mlp()
    # a second graph input, listed first, to check the name -> VM argument order
    g = mlp.graph
    g.node.append(helper.make_node("Mul", ["y", "scale"], ["ys"]))
    g.input.insert(0, helper.make_tensor_value_info("scale", TensorProto.FLOAT, [5, 10]))
    g.output.append(helper.make_tensor_value_info("ys", TensorProto.FLOAT, [5, 10]))
    facts, feeds, outs = compile_and_run(mlp, host, tmp_path, name="mlp")
    assert facts["inputs"] == ["scale", "x"]
    assert facts["outputs"] == ["y", "a2", "ys"]
    assert facts["kernels"]["dense_packed"] == 3
    assert_matches_ort(mlp, feeds, outs)
    # the dict order of the feeds does not matter
    runner = load_library(tmp_path / "mlp.so", facts["inputs"])
    again = runner.run({"x": feeds["x"], "scale": feeds["scale"]})
    for a, b in zip(again, outs):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(KeyError, match="scale"):
        runner.run({"x": feeds["x"]})


def test_compile_writes_atomically(host, tmp_path):
    from sparsec.targets.host import compile_onnx

    out = tmp_path / "lib" / "model.so"
    compile_onnx(dense_model("matmul", 2, 8, 8), host, out, log=lambda s: None)
    assert [p.name for p in out.parent.iterdir()] == ["model.so"]


@pytest.mark.parametrize("target", ["x86-avx2", "x86-avx512", "llvm"])
def test_other_targets_compile_and_run(target, tmp_path):
    spec = resolve_target(target)
    if not spec.runs_here:
        pytest.skip(f"{target} does not run here: {spec.why_not_here}")
    model = small_mlp()
    facts, feeds, outs = compile_and_run(model, spec, tmp_path)
    assert facts["target"] == spec.tvm_target
    assert_matches_ort(model, feeds, outs)
    if target.startswith("x86"):   # the kernels use the extension's registers
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / "m.so")],
                             capture_output=True, text=True, check=True).stdout
        register = "%zmm" if target == "x86-avx512" else "%ymm"
        assert register in asm
        if target == "x86-avx2":
            assert "%zmm" not in asm


def test_cpu_features_decide_where_code_runs():
    assert {"avx512f", "avx512bw", "avx512vl"} <= resolve_target("x86-avx512").cpu_flags
    assert resolve_target("x86-avx2").cpu_flags == {"avx2", "fma"}
    assert resolve_target("llvm").cpu_flags == set()
    assert resolve_target("host").cpu_flags <= cpu_flags() and resolve_target("host").runs_here
    amx = resolve_target('{"kind": "llvm", "mcpu": "sapphirerapids"}')
    assert {"amx_tile", "amx_bf16", "avx512f"} <= amx.cpu_flags
    assert amx.runs_here == (amx.cpu_flags <= cpu_flags())
    if not amx.runs_here:
        assert "this CPU lacks" in amx.why_not_here and "amx_tile" in amx.why_not_here


def test_package_for_a_cpu_this_machine_lacks_is_written_unchecked(tmp_path):
    """Code for CPU features this machine lacks (AMX, or on an AMX machine Granite Rapids'
    AMX-FP16) is compiled, never run: running it would fault. The package is written with a
    warning, its reference pair left to the device. (A CPU named by raw JSON keeps fp32
    kernels; the ``x86-amx`` target's bf16 tile kernels are emulated for the check instead:
    test_amx.py.)"""
    from sparsec import api

    targets = [resolve_target(json.dumps({"kind": "llvm", "mcpu": cpu}))
               for cpu in ("sapphirerapids", "graniterapids")]
    lacking = [t for t in targets if not t.runs_here]
    if not lacking:
        pytest.skip("this CPU has every feature of Granite Rapids")
    logs: list[str] = []
    manifest = api.compile(REPO / "examples" / "digits_mlp.onnx", tmp_path / "pkg",
                           target=lacking[0].name, log=logs.append)
    assert manifest["reference"]["check"] is None
    missing = sorted(lacking[0].cpu_flags - cpu_flags())
    assert missing and any("warning" in line and f"this CPU lacks {missing[0]}" in line
                           for line in logs), logs


def test_bool_mask_kernels_compile_and_match(host, tmp_path):
    """A kernel that writes a bool tensor (attention padding masks do) stays scalar: TVM 0.27
    refuses vectorized bool stores. The mask is an output, so it is a real bool buffer."""
    nodes = [helper.make_node("Greater", ["x", "zero"], ["pos"]),
             helper.make_node("Less", ["x", "one"], ["small"]),
             helper.make_node("And", ["pos", "small"], ["both"]),
             helper.make_node("Expand", ["both", "shape"], ["mask"]),     # [4, 64] -> [2, 4, 64]
             helper.make_node("Where", ["mask", "x", "zero"], ["y"])]
    graph = helper.make_graph(
        nodes, "masks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 64]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 4, 64])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(np.array([2, 4, 64], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    feeds = {"x": np.random.default_rng(0).uniform(-1, 2, (4, 64)).astype(np.float32)}
    _, _, outs = compile_and_run(model, host, tmp_path, feeds, name="masks")
    ref = run_ort(model, feeds)
    np.testing.assert_array_equal(outs[1], ref[1])
    np.testing.assert_allclose(outs[0], ref[0])


def test_gather_with_out_of_range_ids_does_not_crash(host, tmp_path):
    """Gather with run-time indices (token ids -> embedding rows) wraps an out-of-range id
    modulo the table instead of reading out of bounds (``run`` and the C API refuse such ids
    before this: tests/test_deploy.py). Run in a subprocess: a regression would segfault."""
    from sparsec.targets.host import compile_onnx

    emb = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 16])],
        [numpy_helper.from_array(emb, "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    lib = tmp_path / "m.so"
    facts = compile_onnx(model, host, lib, log=lambda s: None)
    ids = np.array([[0, 99, 10**12, -10**12, -3, 7]], np.int64)
    script = (
        "import sys, numpy as np\n"
        "from sparsec.targets.host import load_library\n"
        f"r = load_library({str(lib)!r}, {facts['inputs']!r})\n"
        f"y = r.run({{'ids': np.array({ids.tolist()!r}, np.int64)}})[0]\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    y = np.load(tmp_path / "y.npy")
    # in range (negative ids count from the end, as in ONNX): ONNX Runtime's rows; out of
    # range: a row inside the table (ONNX Runtime refuses those ids)
    wrapped = ids % 100
    assert wrapped.tolist() == [[0, 99, 0, 0, 97, 7]]
    np.testing.assert_array_equal(y, run_ort(model, {"ids": wrapped})[0])


def test_a_shape_function_keeps_the_kernels_noalias():
    """TVM compiles every function of a module without noalias pointers once one function
    lacks ``tirx.noalias`` (Relax's shape function of a model with symbolic shapes): the
    kernels' compute scopes are inlined and their accumulators spill after every FMA.
    ``noalias_shape_func_pass`` marks the one-buffer function, and the kernel keeps noalias."""
    import re

    import tvm
    from tvm.script import tirx as T

    from sparsec.targets.host import noalias_shape_func_pass

    @T.prim_func(s_tir=True)
    def kernel(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        T.func_attr({"global_symbol": "kernel", "tirx.noalias": True})
        for i in range(64):
            b[i] = a[i] * T.float32(2)

    @T.prim_func(s_tir=True)
    def shape_func(h: T.Buffer((T.int64(2),), "int64")):
        T.func_attr({"global_symbol": "shape_func", "tirx.is_host_func": True})
        h[T.int64(1)] = T.int64(3) * h[T.int64(0)]

    def compute_noalias(mod) -> bool:
        ll = tvm.tirx.build(mod, target=tvm.target.Target("llvm")).inspect_source("ll")
        m = re.search(r"define internal [^@]*@kernel_compute_\(([^)]*)\)", ll)
        return m is not None and "noalias" in m.group(1)

    mod = tvm.IRModule({"kernel": kernel, "shape_func": shape_func})
    assert not compute_noalias(mod)                      # TVM's behaviour the pass works around
    assert compute_noalias(noalias_shape_func_pass()(mod))


def _scratch_kernel(sizes: tuple[int, int, int]):
    """A parallel task a row of ``a``; each task fills three scratch buffers of ``sizes``
    floats (the first and last of scope "local", as our accumulator tiles are) with twice the
    row's first values and adds them up into ``b``."""
    from tvm.script import tirx as T

    s0, s1, s2 = sizes
    n = max(sizes)

    @T.prim_func
    def kernel(a: T.Buffer((4, n), "float32"), b: T.Buffer((4,), "float32")):
        T.func_attr({"global_symbol": "kernel", "tirx.noalias": True})
        for i in T.parallel(4):
            b[i] = T.float32(0)
            t0 = T.alloc_buffer((s0,), "float32", scope="local")
            t1 = T.alloc_buffer((s1,), "float32")
            t2 = T.alloc_buffer((s2,), "float32", scope="local")
            for j in range(s0):
                t0[j] = a[i, j] * T.float32(2)
            for j in range(s1):
                t1[j] = a[i, j] * T.float32(2)
            for j in range(s2):
                t2[j] = a[i, j] * T.float32(2)
            for j in range(s0):
                b[i] = b[i] + t0[j]
            for j in range(s1):
                b[i] = b[i] + t1[j]
            for j in range(s2):
                b[i] = b[i] + t2[j]

    return kernel


def _heap_sites(mod, pipeline: str):
    """(call sites of ``TVMBackendAllocWorkspace`` in ``mod`` built with ``pipeline``, the
    library)."""
    import tvm

    lib = tvm.tirx.build(mod, target=tvm.target.Target("llvm"), pipeline=pipeline)
    return lib.inspect_source("ll").count("load ptr, ptr @__TVMBackendAllocWorkspace"), lib


@pytest.mark.parametrize("sizes, budget, heap", [
    ((192, 1024, 8192), None, 1),       # 768 B, 4 KB: stack; 32 KB (over STACK_BYTES): heap
    ((192, 4096, 4096), None, 0),       # 768 B + 16 KB + 16 KB within the 64 KB budget
    ((192, 4096, 4096), 20 * 1024, 1),  # the third buffer would pass the budget: heap
])
def test_kernel_scratch_goes_on_the_stack(sizes, budget, heap, monkeypatch):
    """TVM's default pipeline allocates every one of these per-task buffers from the runtime's
    workspace pool, once per task; ``scratch.tir_pipeline()`` puts those up to
    ``STACK_BYTES`` on the stack while a function's total stays within ``STACK_BUDGET``, and
    the results stay the same."""
    import tvm

    from sparsec.targets import scratch

    if budget is not None:
        monkeypatch.setattr(scratch, "STACK_BUDGET", budget)
    mod = tvm.IRModule({"kernel": _scratch_kernel(sizes)})
    a = np.random.default_rng(0).standard_normal((4, max(sizes))).astype("float32")
    want = sum(2 * a[:, :s].astype("float64").sum(1) for s in sizes)
    for pipeline, sites in (("default", 3), (scratch.tir_pipeline(), heap)):
        found, lib = _heap_sites(mod, pipeline)
        assert found == sites, pipeline
        out = tvm.runtime.tensor(np.zeros(4, "float32"))
        lib["kernel"](tvm.runtime.tensor(a), out)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-2)


def test_accumulator_tiles_stay_off_the_heap():
    """A pointwise conv's accumulator tile (12 x 16 floats, scope "local", one a pixel tile):
    TVM's default pipeline allocates and frees it from the workspace pool for every tile; the
    pipeline every host library is built with keeps it on the stack, where LLVM can hold it in
    registers."""
    import tvm

    from sparsec.targets import scratch
    from sparsec.targets.kernels import pointwise

    with tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}):
        func = pointwise.build(1, 16, 784, 96, pointwise.Tile(12, 16))
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    assert _heap_sites(mod, "default")[0] >= 1
    assert _heap_sites(mod, scratch.tir_pipeline())[0] == 0


def _prefetched_lines(func, task: int) -> set[int]:
    """The 64-byte lines (of the output, its base line-aligned) that ``func``'s parallel
    iteration ``task`` prefetches for writing (``common.prefetch_writes``)."""
    import tvm
    import tvm.sym.analyzer
    import tvm_ffi
    from tvm import tirx

    loops, calls = [], []

    def see_loop(loop):
        if loop.kind == tirx.ForKind.PARALLEL:
            loops.append(loop)
        return loop

    def see_call(stmt):
        if "prefetch" in str(stmt.value):
            calls.append(stmt.value)
        return stmt

    tvm_ffi.structural_map(func.body, [(tirx.For, see_loop), (tirx.Evaluate, see_call)])
    loop = next(lp for lp in loops if any(str(lp.loop_var.name) in str(c) for c in calls))
    analyzer = tvm.sym.analyzer.Analyzer()
    analyzer.bind(loop.loop_var, tirx.IntImm(str(loop.extent.ty), task))
    lines = set()
    for call in calls:
        load = call.args[1].args[0]          # llvm.prefetch(address_of(Y[...]), rw, ...)
        assert int(call.args[2].value) == 1  # for writing
        index = [int(analyzer.simplify(e).value) for e in load.indices]
        flat = 0
        for i, extent in zip(index, load.source.shape):
            flat = flat * int(extent) + i
        lines.add(flat * 4 // 64)
    return lines


def _lines(start: int, count: int) -> set[int]:
    """The 64-byte lines of ``count`` floats from float ``start``."""
    return set(range(start * 4 // 64, ((start + count) * 4 - 1) // 64 + 1))


def test_kernels_prefetch_the_output_a_few_tasks_ahead():
    """A task of the depthwise conv or of a generic elementwise kernel (here the zero pad a
    pointwise conv reads) prefetches for writing exactly the cache lines the task
    ``PREFETCH_AHEAD`` later writes (the last tasks: the last one's), and still computes what
    numpy does; a pure reshape gets none (the VM must still see it as a view)."""
    import tvm
    from tvm import relax, te, topi

    from sparsec.targets.kernels import common, conv2d, depthwise, fallback

    ahead = common.PREFETCH_AHEAD
    s = conv2d.ConvShape(n=1, ic=24, h=7, w=7, oc=24, kh=3, kw=3, stride=(1, 1),
                         padding=(1, 1, 1, 1), dilation=(1, 1))
    with tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}):
        func = depthwise.build(s)
    for task in range(24):          # channel planes of 49 floats, not line-aligned
        assert _prefetched_lines(func, task) == _lines(min(task + ahead, 23) * 49, 49), task
    x = np.random.default_rng(1).standard_normal((1, 24, 7, 7)).astype("float32")
    w = np.random.default_rng(2).standard_normal((24, 3, 3)).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target={"kind": "llvm"})
    out = tvm.runtime.empty((1, 24, 7, 7), "float32")
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = sum(xp[:, :, ky:ky + 7, kx:kx + 7] * w[None, :, ky, kx, None, None]
               for ky in range(3) for kx in range(3))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)

    a = te.placeholder((1, 40, 14, 14), "float32", name="a")
    pad = te.create_prim_func([a, topi.nn.pad(topi.reshape(a, (1, 40, 196)),
                                              (0, 0, 0), (0, 0, 8))])
    scheduled = fallback.schedule_generic(pad)
    for task in range(40):          # rows of 204 floats: some end one line past a 16th float
        assert _prefetched_lines(scheduled, task) == _lines(min(task + ahead, 39) * 204, 204)
    reshape = te.create_prim_func([a, topi.reshape(a, (1, 40, 196))])
    assert relax.analysis.has_reshape_pattern(reshape)
    assert "prefetch" not in fallback.schedule_generic(reshape).script()


def _prefetched_reads(func) -> list:
    """(the loaded buffer, its index expressions, the loops around the prefetch) of each read
    prefetch in ``func`` (``common.prefetch_reads``)."""
    from tvm import tirx

    found, loops = [], []

    def visit(stmt, around):
        if isinstance(stmt, tirx.For):
            visit(stmt.body, around + [stmt])
        elif isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                visit(s, around)
        elif isinstance(stmt, tirx.Evaluate) and "prefetch" in str(stmt.value):
            call = stmt.value
            if int(call.args[2].value) == 0:              # for reading
                load = call.args[1].args[0]
                found.append((load.source, list(load.indices), list(around)))
        else:
            for child in _children(stmt):
                visit(child, around)

    def _children(stmt):     # a block realize's block, a block's body, ...
        return [sub for sub in (getattr(stmt, a, None) for a in ("body", "block"))
                if sub is not None]

    visit(func.body, loops)
    return found


@pytest.mark.parametrize("kernel", ["conv1x1_nchw", "conv2d_nchw_packed"])
def test_small_map_convs_prefetch_their_input_ahead(kernel):
    """The pointwise conv prefetches each input channel's pixel tile ``READ_AHEAD`` tiles on,
    the direct 1x1 conv on a small map the input row ``READ_AHEAD`` channels on; at every
    corner of their loops the address stays inside the input (clamped at its end), and the
    kernels still compute the conv."""
    import itertools

    import tvm
    import tvm.sym.analyzer
    from tvm import tirx

    from sparsec.targets.kernels import conv2d, pointwise

    rng = np.random.default_rng(3)
    ci, co, h = 40, 36, 7
    x = rng.standard_normal((1, ci, h, h)).astype("float32")
    w = rng.standard_normal((co, ci)).astype("float32")
    want = np.einsum("oc,nchw->nohw", w, x)
    with tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}):
        if kernel == "conv1x1_nchw":
            tile = pointwise.pick_tile(co, h * h)
            func = pointwise.build(1, ci, h * h, co, tile)
            pp = tile.padded_pixels(h * h)
            args = [np.pad(x.reshape(1, ci, h * h), ((0, 0), (0, 0), (0, pp - h * h))),
                    pointwise.pack_weight(w, tile.oct)]
            out_shape = (1, co, h * h)
        else:
            s = conv2d.ConvShape(n=1, ic=ci, h=h, w=h, oc=co, kh=1, kw=1, stride=(1, 1),
                                 padding=(0, 0, 0, 0), dilation=(1, 1))
            func = conv2d.build(s)
            args = [x, conv2d.pack_weight(w[:, :, None, None], conv2d.LANES)]
            out_shape = (1, co, h, h)
    reads = _prefetched_reads(func)
    assert reads, func.script()
    for source, index, around in reads:
        assert source.name == "X"
        shape = [int(d) for d in source.shape]
        size = int(np.prod(shape))
        for corner in itertools.product(*[(0, int(lp.extent) - 1) for lp in around]):
            analyzer = tvm.sym.analyzer.Analyzer()
            for lp, v in zip(around, corner):
                analyzer.bind(lp.loop_var, tirx.IntImm(str(lp.extent.ty), v))
            flat = 0
            for e, extent in zip(index, shape):
                flat = flat * extent + int(analyzer.simplify(e).value)
            assert 0 <= flat < size, (corner, flat, size)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target={"kind": "llvm"})
    out = tvm.runtime.empty(out_shape, "float32")
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    np.testing.assert_allclose(out.numpy().reshape(want.shape), want, rtol=1e-4, atol=1e-4)
