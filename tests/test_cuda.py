"""CUDA targets: names and tags, whole models compiled with nvcc for sm_80 and sm_90, the
package's fatbin and how the runtime is given it. The kernels' numerics need a GPU: the last
tests run the package on one where this machine has it, and are skipped otherwise."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from sparsec import api, reference
from sparsec.errors import ToolchainError, UnknownTargetError
from sparsec.targets import cuda_available, resolve_target

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HAS_NVCC = shutil.which("nvcc") is not None or any(
    Path(d, "nvcc").is_file() for d in ("/usr/local/cuda/bin",))
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc (CUDA toolkit) not installed")
needs_gpu = pytest.mark.skipif(not cuda_available(), reason="no CUDA device on this machine")


def test_cuda_targets_resolve():
    for name, arch in (("cuda-sm80", "sm_80"), ("cuda-sm90", "sm_90")):
        spec = resolve_target(name)
        assert spec.device == "cuda" and spec.tvm_target["arch"] == arch
        assert spec.tvm_target["host"]["kind"] == "llvm" and spec.native
        assert spec.runs_here == cuda_available()
        assert ("no CUDA device" in spec.why_not_here) == (not cuda_available())
    orin = resolve_target("nvidia/jetson-agx-orin-64gb")        # a GPU with an aarch64 host
    assert orin.tvm_target["arch"] == "sm_87" and orin.triple == "aarch64-linux-gnu"
    assert not orin.runs_here and "aarch64" in orin.why_not_here
    assert orin.tvm_target["host"]["mcpu"] == "cortex-a78"
    raw = resolve_target('{"kind": "cuda", "arch": "sm_86"}')
    assert raw.device == "cuda" and raw.tvm_target["thread_warp_size"] == 32
    for name in ('{"kind": "cuda", "arch": "sm_70"}', "nvidia/tegra-x1"):    # too old for nvcc 13
        with pytest.raises(UnknownTargetError, match="sm_75 and newer"):
            resolve_target(name)
    with pytest.raises(UnknownTargetError, match="CPUs .llvm. and NVIDIA GPUs"):
        resolve_target('{"kind": "rocm"}')


@needs_nvcc
@pytest.mark.parametrize("target,arch", [("cuda-sm80", "sm_80"), ("cuda-sm90", "sm_90")])
def test_compile_for_cuda_writes_a_checked_fatbin(target, arch, tmp_path):
    from sparsec.targets.cuda import fatbin_entries

    out = tmp_path / "pkg"
    logs: list[str] = []
    manifest = api.compile(EXAMPLES / "digits_cnn.onnx", target=target, output_dir=out,
                           log=logs.append)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["cpu_twin.so", "kernels.cu", "kernels.fatbin", "manifest.json",
                     "model.so", "pkg.h", "reference"]       # no static archive, no model.onnx
    facts = manifest["compile"]["cuda"]
    number = arch[len("sm_"):]
    assert fatbin_entries((out / "kernels.fatbin").read_bytes()) == [
        f"{arch} SASS", f"compute_{number} PTX"] == facts["fatbin_contents"]
    source = (out / "kernels.cu").read_text()
    assert hashlib.sha256(source.encode()).hexdigest() == facts["source_sha256"]
    kernels = re.findall(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(.*\) \{',
                         source)
    # every kernel was scheduled onto threads (DLight), and ptxas reported each one
    assert kernels and sorted(kernels) == sorted(facts["kernels"])
    rules = manifest["compile"]["kernels"]
    # the convs and the linear layer on tensor cores (tf32, the CUDA default), the rest on
    # DLight's rules
    heavy = [d for d in manifest["compile"]["decisions"] if d["op"] in ("matmul", "conv2d")]
    assert len(heavy) == 7 and all(d["chosen"] == "mma_cuda" for d in heavy)
    assert all(r.startswith("dlight.") for r in set(rules) - {"mma_cuda"})
    assert 0 < sum(rules.values()) <= len(kernels)
    assert all(0 < r["registers"] <= 255 for r in facts["kernels"].values())
    assert manifest["library"]["header"] == "pkg.h" and manifest["library"]["static"] is None
    check = manifest["reference"]["check"]
    assert check["ok"] and manifest["compile"]["precision"] == "tf32"
    assert manifest["reference"]["rtol"] >= api.RTOL_TF32 and check["max_abs_err"] > 0
    if cuda_available():
        assert check["via"] == "cuda"
    else:   # the schedules were checked on this CPU, the binary was not run
        assert check["via"] == "cuda-schedules-on-cpu"
        assert any("no CUDA device" in line and "CPU twin" in line for line in logs)


CUDA_ZOO = ["layernorm_ffn", "matmul_add_mlp", "squeeze_excite", "group_norm_shuffle",
            "grouped_and_depthwise", "residual_convs", "hf_bert", "hf_gpt2", "hf_mobilenetv2"]


@needs_nvcc
@pytest.mark.parametrize("name", CUDA_ZOO)
def test_zoo_models_compile_for_cuda_and_their_schedules_match_ort(zoo_models, name, tmp_path):
    """Norms, GELU, softmax attention, grouped and depthwise convs, squeeze-excite: every op
    of these graphs gets a thread-bound kernel that nvcc compiles for sm_90, and the same
    scheduled kernels, their thread loops run serially on this CPU, match ONNX Runtime
    (within the tf32 tolerance: the linear layers run on tensor cores, mma_cuda)."""
    from sparsec.targets import cuda
    from sparsec.targets.host import load_library

    model = zoo_models(name)
    facts = cuda.compile_onnx(model, resolve_target("cuda-sm90"), tmp_path / "m.so",
                              log=lambda s: None, emulation_lib=tmp_path / "emulated.so")
    assert facts["cuda"]["fatbin_contents"][0] == "sm_90 SASS"
    # a scheduled function may launch more than one kernel
    assert len(facts["cuda"]["kernels"]) >= sum(facts["kernels"].values()) > 0
    feeds = reference.random_feeds(signature(model), seed=0)
    got = load_library(tmp_path / "emulated.so", facts["inputs"]).run(feeds)
    want = reference.run(model, feeds)
    rtol, atol = api.tolerance(facts)
    assert (rtol, atol) == ((api.RTOL_TF32, api.ATOL_TF32) if "mma_cuda" in facts["kernels"]
                            else (api.RTOL, api.ATOL))
    if name in ("hf_bert", "hf_gpt2", "matmul_add_mlp"):   # attention's matmuls too
        matmuls = [d for d in facts["decisions"] if d["op"] == "matmul"]
        assert matmuls and all(d["chosen"] == "mma_cuda" for d in matmuls)
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= atol + rtol * float(np.abs(w).max())


def test_serialized_schedules_keep_stage_order():
    """A kernel whose threads stage data through shared memory (DLight's matmul) keeps its
    stages in order once serialized: no thread binding or GPU scope is left, and the load
    into the staging buffer still comes before the compute that reads it."""
    import tvm
    from tvm import tirx

    from sparsec.targets import cuda
    from sparsec.targets.host import import_onnx

    gpu = tvm.target.Target(resolve_target("cuda-sm80").tvm_target)
    scheduled = cuda.schedule(import_onnx(_matmul(64, 96, 80)), gpu, {})
    kernels = [f for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert any("shared" in f.script() for f in kernels)
    for f in kernels:
        text = cuda.serialize_threads(f).script()
        assert "thread_binding" not in text and 'scope="shared' not in text
        if "_shared" in text:
            assert text.index("_shared[") < text.rindex("_shared[")


def _matmul(m: int, k: int, n: int):
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def signature(model) -> list[dict]:
    from sparsec.ir.onnx_io import tensor_dtype

    init = {t.name for t in model.graph.initializer}
    return [{"name": v.name, "dtype": tensor_dtype(v.type.tensor_type.elem_type),
             "shape": [d.dim_value for d in v.type.tensor_type.shape.dim]}
            for v in model.graph.input if v.name not in init]


def test_ptxas_report_is_parsed():
    from sparsec.targets.cuda import ptxas_resources

    log = """ptxas info    : Compiling entry function 'k1' for 'sm_80'
ptxas info    : Function properties for k1
    8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4608 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'k2' for 'sm_80'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers, 372 bytes cmem[0]"""
    assert ptxas_resources(log) == {
        "k1": {"registers": 255, "spill_bytes": 32, "shared_bytes": 4608},
        "k2": {"registers": 30, "spill_bytes": 0, "shared_bytes": 0}}


@needs_nvcc
def test_runtime_compile_callback_serves_the_prebuilt_fatbin():
    """A CUDA-enabled TVM runtime compiles a library's kernel source when it loads it, through
    ``tvm_callback_cuda_compile``: for the package's own source the callback answers with the
    package's fatbin (no nvcc on the device), anything else is compiled with nvcc; TVM's
    callback is back in place afterwards."""
    import tvm_ffi

    from sparsec.targets.cuda import compile_callback, fatbin_entries

    before = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    known = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n'
    other = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n'
    digest = hashlib.sha256(known.encode()).hexdigest()
    with compile_callback("sm_80", {digest: b"prebuilt"}):
        callback = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
        assert bytes(callback(known)) == b"prebuilt"
        assert fatbin_entries(bytes(callback(other))) == ["sm_80 SASS", "compute_80 PTX"]
    assert tvm_ffi.get_global_func("tvm_callback_cuda_compile").same_as(before)


def _no_system_nvcc(monkeypatch, cuda_toolkit) -> None:
    monkeypatch.setattr(cuda_toolkit, "NVCC_DIRS", ())
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)


def test_cuda_compile_without_nvcc_is_a_toolchain_error(tmp_path, monkeypatch):
    from sparsec.targets import cuda_toolkit

    _no_system_nvcc(monkeypatch, cuda_toolkit)
    with pytest.raises(ToolchainError, match="need nvcc") as info:
        api.compile(EXAMPLES / "digits_cnn.onnx", target="cuda-sm80", output_dir=tmp_path / "o")
    assert info.value.exit_code == 11 and not (tmp_path / "o").exists()


@needs_nvcc
@pytest.mark.parametrize("layout", ["nvidia/cuda_nvcc/bin", "nvidia/cu13/bin"])
def test_nvcc_is_found_in_a_pip_installed_toolkit(layout, tmp_path, monkeypatch):
    """The wheels' layouts (nvidia-cuda-nvcc-cu12, nvidia-cuda-nvcc for CUDA 13) under a
    directory on sys.path: the nvcc there (here a script running this machine's nvcc) is found
    with nothing on PATH, and compiles a kernel; without it the error names the wheels."""
    from sparsec.targets import cuda_toolkit

    real = cuda_toolkit.nvcc()
    _no_system_nvcc(monkeypatch, cuda_toolkit)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")] + sys.path)
    with pytest.raises(ToolchainError, match="pip install nvidia-cuda-nvcc"):
        cuda_toolkit.nvcc()
    tool = tmp_path / "site" / layout / "nvcc"
    tool.parent.mkdir(parents=True)
    tool.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/called\nexec {real} "$@"\n')
    with pytest.raises(ToolchainError):       # not executable: not a program
        cuda_toolkit.nvcc()
    tool.chmod(0o755)
    assert cuda_toolkit.nvcc() == str(tool)
    source = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n'
    cuda_toolkit.compile_fatbin(source, "sm_80", tmp_path / "k.fatbin")
    assert "-fatbin" in (tmp_path / "called").read_text()
    assert cuda_toolkit.fatbin_entries((tmp_path / "k.fatbin").read_bytes()) == [
        "sm_80 SASS", "compute_80 PTX"]


def test_validate_and_run_a_cuda_package_without_a_gpu(tmp_path):
    """No GPU: validate and run load the package's model.so (its code and its weights) with
    its GPU kernels replaced by cpu_twin.so, the same schedules with threads serialized and no
    weights, and say so; tuning stays refused for a GPU."""
    if cuda_available():
        pytest.skip("this machine has a GPU")
    if not HAS_NVCC:
        pytest.skip("nvcc (CUDA toolkit) not installed")
    out = tmp_path / "pkg"
    manifest = api.compile(EXAMPLES / "digits_mlp.onnx", target="cuda-sm80", output_dir=out,
                           keep_onnx=True)
    weights = manifest["prune"]["after"]["weight_bytes"]
    assert manifest["compile"]["cuda"]["cpu_twin"] == "cpu_twin.so"
    assert (out / "cpu_twin.so").stat().st_size < weights / 2    # kernels, not weights
    proc = subprocess.run([sys.executable, "-m", "sparsec", "validate", str(out), "--seed", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "via: cuda-schedules-on-cpu (the CPU twin of the CUDA schedules" in proc.stdout
    assert "against ONNX Runtime" in proc.stdout and "no CUDA device" in proc.stderr
    report = api.validate(out, seed=4)
    assert report.ok and report.via == "cuda-schedules-on-cpu"
    assert report.rtol >= api.RTOL_TF32 and report.max_abs_err > 0    # tensor cores: tf32
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    got = list(api.run(out, {"image": x}).values())[0]
    want = reference.run(onnx.load(str(out / "model.onnx")), {"image": x})[0]
    assert np.abs(got - want).max() <= api.ATOL_TF32 + api.RTOL_TF32 * np.abs(want).max()
    proc = subprocess.run([sys.executable, "-m", "sparsec", "compile", str(out / "model.onnx"),
                           "--target", "cuda-sm80", "--tune", "5", "-o", str(tmp_path / "t")],
                          capture_output=True, text=True)
    assert proc.returncode == 6 and "this machine's CPU" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sparsec", "tune", str(out), "--target",
                           "cuda-sm80"], capture_output=True, text=True)
    assert proc.returncode == 6 and "not this machine's CPU" in proc.stderr


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("example", ["digits_cnn.onnx", "digits_mlp.onnx"])
def test_cuda_package_matches_onnx_runtime_on_the_gpu(example, tmp_path):
    out = tmp_path / "pkg"
    manifest = api.compile(EXAMPLES / example, target="cuda", output_dir=out)
    assert manifest["reference"]["check"]["ok"] and manifest["reference"]["check"]["via"] == "cuda"
    report = api.validate(out, seed=3)
    assert report.ok, json.dumps(report.outputs)
    feeds = {s["name"]: np.random.default_rng(1).standard_normal(s["shape"]).astype(s["dtype"])
             for s in manifest["inputs"]}
    first = api.run(out, feeds)
    assert all(np.isfinite(v).all() for v in first.values())


# --------------------------------------------------------------------------- sparse kernels
def _nm_sparse(k: int, n: int, keep: int, group: int, seed: int = 0) -> np.ndarray:
    """A [K, N] weight keeping the ``keep`` largest of every ``group`` inputs per channel."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    g = w.reshape(k // group, group, n)
    np.put_along_axis(g, np.argsort(-np.abs(g), axis=1)[:, keep:, :], 0, axis=1)
    return g.reshape(k, n)


def _unpack(vals, offs, fmt, k: int) -> np.ndarray:
    """The dense [K, N] weight a compressed one stands for (the format, read independently)."""
    w = np.zeros((k, vals.shape[1]), np.float32)
    for l_ in range(fmt.kept):
        cols = (offs[l_].astype(int) + (l_ // fmt.per_group) * fmt.group if fmt.group
                else offs[l_].astype(int))
        np.add.at(w, (cols, np.arange(vals.shape[1])), vals[l_])
    return w


@pytest.mark.parametrize("pattern,bytes_ratio", [((2, 4), 0.625), ((1, 4), 0.3125),
                                                 ((2, 8), 0.3125), (None, None)])
def test_sparse_formats_round_trip(pattern, bytes_ratio):
    from sparsec.targets.kernels import sparse_cuda

    k, n = 64, 40
    if pattern is None:   # unstructured: absolute int16 indices, padded to the densest channel
        w = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
        w[np.random.default_rng(2).random((k, n)) < 0.85] = 0
    else:
        w = _nm_sparse(k, n, *pattern)
    fmt = sparse_cuda.plan(w)
    vals, offs = sparse_cuda.pack_weight(w, fmt)
    np.testing.assert_array_equal(_unpack(vals, offs, fmt, k), w)
    ratio = sparse_cuda.weight_bytes(fmt, n) / w.nbytes
    if pattern is None:
        assert fmt.group == 0 and offs.dtype == np.int16
        assert fmt.kept == int((w != 0).sum(axis=0).max()) and ratio < 0.4
    else:
        assert (fmt.per_group, fmt.group) == pattern and offs.dtype == np.int8
        assert ratio == bytes_ratio


def _run_emulated(func, args: list[np.ndarray], out_shape) -> np.ndarray:
    import tvm

    from sparsec.targets import cuda

    emulated = cuda.serialize_threads(func).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": emulated}), target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize("m,pattern,epilogue", [(1, (2, 4), "bias+relu"),
                                                (4, None, "bias+residual+gelu"),
                                                (8, (1, 4), "none"), (3, (2, 8), "bias")])
def test_sparse_cuda_kernel_matches_numpy(m, pattern, epilogue, tmp_path):
    """The kernel's schedule, threads serialized on the CPU, against numpy; N = 200 leaves a
    partial thread block; and nvcc compiles it for sm_80 (when installed)."""
    import math

    import tvm

    from sparsec.targets import cuda
    from sparsec.targets.kernels import sparse_cuda
    from sparsec.targets.kernels.common import RELU, Activation

    k, n = 96, 200
    rng = np.random.default_rng(3)
    if pattern is None:
        w = rng.standard_normal((k, n)).astype(np.float32)
        w[rng.random((k, n)) < 0.8] = 0
    else:
        w = _nm_sparse(k, n, *pattern)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    act = {"bias+relu": RELU, "bias+residual+gelu": Activation(gelu=True)}.get(epilogue)
    fmt = sparse_cuda.plan(w)
    func = sparse_cuda.build(m, k, n, fmt, bias="bias" in epilogue, act=act,
                             residual="residual" in epilogue)
    args = [x, *sparse_cuda.pack_weight(w, fmt)] + [bias] * ("bias" in epilogue) + [
        res] * ("residual" in epilogue)
    want = x @ w + (bias if "bias" in epilogue else 0) + (res if "residual" in epilogue else 0)
    if act == RELU:
        want = np.maximum(want, 0)
    elif act is not None:
        want = 0.5 * want * (1 + np.vectorize(math.erf)(want / np.sqrt(2)))
    np.testing.assert_allclose(_run_emulated(func, args, (m, n)), want, rtol=1e-5, atol=1e-5)
    if HAS_NVCC:
        gpu = tvm.target.Target(resolve_target("cuda-sm80").tvm_target)
        ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=gpu)
        resources = cuda.compile_fatbin(cuda.kernel_source(ex), "sm_80", tmp_path / "k.fatbin")
        assert all(r["spill_bytes"] == 0 for r in resources.values())


@needs_nvcc
def test_sparse_model_gets_sparse_cuda_kernels(tmp_path):
    """A 2:4-sparsified MLP compiled for CUDA: its linear layers run nm_sparse_cuda (the
    report says the pattern and the bytes), the package checks out; the dense model keeps
    DLight's kernels."""
    sparse = api.compile(EXAMPLES / "digits_mlp.onnx", tmp_path / "sparse", target="cuda-sm80",
                         sparsity=0.5, sparsity_pattern="2:4")
    chosen = [d for d in sparse["compile"]["decisions"] if d["op"] == "matmul"]
    assert chosen and all(d["chosen"] == "nm_sparse_cuda" and d["pattern"] == "2:4"
                          for d in chosen)
    assert all(d["weight_bytes"]["sparse"] * 8 == d["weight_bytes"]["dense"] * 5 for d in chosen)
    assert sparse["compile"]["kernels"]["nm_sparse_cuda"] == len(chosen)
    assert sparse["reference"]["check"]["ok"]
    dense = api.compile(EXAMPLES / "digits_mlp.onnx", tmp_path / "dense", target="cuda-sm80")
    assert "nm_sparse_cuda" not in dense["compile"]["kernels"]     # dense: tensor cores
    assert all(d["chosen"] == "mma_cuda" for d in dense["compile"]["decisions"])


@needs_nvcc
def test_jetson_package_has_aarch64_host_code_and_sm87_kernels(tmp_path):
    """An edge GPU: TVM's Jetson Orin Nano tag is an sm_87 GPU with an aarch64 host, so the
    library is cross-compiled for aarch64 and the kernels for sm_87."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("needs g++-aarch64-linux-gnu")
    out = tmp_path / "orin"
    manifest = api.compile(EXAMPLES / "digits_cnn.onnx", out, target="nvidia/jetson-orin-nano")
    assert manifest["target"]["triple"] == "aarch64-linux-gnu"
    assert manifest["compile"]["cuda"]["fatbin_contents"] == ["sm_87 SASS", "compute_87 PTX"]
    assert (out / "model.so").read_bytes()[18] == 183          # ELF e_machine: EM_AARCH64
    assert manifest["reference"]["check"]["via"] == "cuda-schedules-on-cpu"
    # the device's runtime: the aarch64 wheel's libraries, the CUDA module loader among them
    rt = tmp_path / "rt"
    proc = subprocess.run([sys.executable, "-m", "sparsec", "runtime", "--target",
                           "nvidia/jetson-orin-nano", "-o", str(rt)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert (rt / "lib" / "libtvm_runtime_cuda.so").read_bytes()[18] == 183


@needs_nvcc
def test_c_api_opens_a_cuda_package_or_says_why_not(tmp_path):
    """A CUDA package has a C header (device type 2) that compiles with the C API against the
    runtime `sparsec runtime --target cuda` writes (which carries libtvm_runtime_cuda.so); a
    program opens it on a GPU and runs the reference pair, and without one sparsec_open fails
    with a message, not a crash. Asking for the static archive is refused."""
    if shutil.which("gcc") is None or shutil.which("g++") is None:
        pytest.skip("needs gcc and g++")
    pkg = tmp_path / "mlp"
    manifest = api.compile(EXAMPLES / "digits_mlp.onnx", pkg, target="cuda-sm80", name="mlp")
    header = (pkg / "mlp.h").read_text()
    ref = manifest["reference"]    # tf32 kernels: the tolerance the compile settled on
    assert manifest["library"]["header"] == "mlp.h" and ref["rtol"] >= api.RTOL_TF32
    assert f"{ref['atol']!r}, {ref['rtol']!r}, 2,\n" in header
    rt = tmp_path / "rt"
    proc = subprocess.run([sys.executable, "-m", "sparsec", "runtime", "--target", "cuda-sm80",
                           "-o", str(rt)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (rt / "lib" / "libtvm_runtime_cuda.so").is_file()
    (tmp_path / "check.c").write_text(CUDA_CHECK)
    inc = ["-I", str(rt / "include"), "-I", str(pkg)]
    for cmd in (["gcc", "-std=c99", "-Wall", "-Werror", "-c", str(tmp_path / "check.c"), "-o",
                 str(tmp_path / "check.o"), *inc],
                ["g++", "-std=c++17", "-O2", "-Wall", "-Werror", "-c",
                 str(rt / "src" / "sparsec_runtime.cc"), "-o", str(tmp_path / "capi.o"), *inc],
                ["g++", str(tmp_path / "check.o"), str(tmp_path / "capi.o"), "-ldl", "-L",
                 str(rt / "lib"), "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{rt / 'lib'}",
                 "-o", str(tmp_path / "check")]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    run = subprocess.run([str(tmp_path / "check"), str(pkg)], capture_output=True, text=True)
    assert "static: a CUDA model opens from its model.so" in run.stdout, run.stdout + run.stderr
    if cuda_available():
        assert run.returncode == 0 and "status 0" in run.stdout, run.stdout
    else:
        assert run.returncode == 1 and "open: " in run.stdout, run.stdout + run.stderr
        assert "cannot load the TVM CUDA runtime" in run.stdout or "CUDA" in run.stdout


CUDA_CHECK = r"""
#include <stdio.h>
#include "mlp.h"

int main(int argc, char** argv) {
  char lib[1024], in[1024], out[1024];
  double err = -1;
  if (argc != 2) return 2;
  if (sparsec_open(&mlp_spec, NULL) == NULL) printf("static: %s\n", sparsec_last_error());
  snprintf(lib, sizeof lib, "%s/model.so", argv[1]);
  snprintf(in, sizeof in, "%s/reference/inputs.bin", argv[1]);
  snprintf(out, sizeof out, "%s/reference/outputs.bin", argv[1]);
  sparsec_model* m = sparsec_open(&mlp_spec, lib);
  if (m == NULL) { printf("open: %s\n", sparsec_last_error()); return 1; }
  int status = sparsec_check_reference(m, in, out, &err);
  printf("status %d err %g '%s'\n", status, err, sparsec_last_error());
  sparsec_close(m);
  return status != 0;
}
"""


@needs_nvcc
def test_two_four_sparse_bert_for_cuda(zoo_files, tmp_path):
    """A BERT encoder 2:4-sparsified and compiled for CUDA: every linear layer (Q, K, V,
    output, FFN) runs nm_sparse_cuda, attention's matmuls of run-time tensors run on tensor
    cores (mma_cuda, tf32), and the package's reference pair matches ONNX Runtime through the
    emulated schedules."""
    manifest = api.compile(zoo_files("hf_bert"), tmp_path / "bert", target="cuda-sm80",
                           sparsity=0.5, sparsity_pattern="2:4")
    matmuls = manifest["compile"]["decisions"]
    sparse = [d for d in matmuls if d["chosen"] == "nm_sparse_cuda"]
    assert len(sparse) == 12 and all(d["pattern"] == "2:4" for d in sparse)   # 2 layers x 6
    assert all(d["chosen"] == "mma_cuda" and d["shape"]["batch"] > 1 for d in matmuls
               if d not in sparse)
    assert manifest["reference"]["check"]["ok"]


@needs_nvcc
def test_cuda_log_counts_the_kernels_nvcc_compiles(zoo_models, tmp_path):
    """GPT-2's attention: DLight schedules 22 functions into 24 kernels (a function may launch
    more than one). The log's "compiling N kernels" is the number nvcc compiles, the number
    ptxas then reports, not the number of functions."""
    from sparsec.targets import cuda
    from sparsec.targets.cuda import kernel_entries

    logs: list[str] = []
    facts = cuda.compile_onnx(zoo_models("hf_gpt2"), resolve_target("cuda-sm80"),
                              tmp_path / "m.so", log=logs.append)
    compiling = [int(m.group(1)) for line in logs
                 if (m := re.search(r"nvcc: compiling (\d+) kernels", line))]
    reported = [int(m.group(1)) for line in logs
                if (m := re.search(r"\); (\d+) kernels, max", line))]
    kernels = len(facts["cuda"]["kernels"])
    assert compiling == reported == [kernels]
    source = (tmp_path / "kernels.cu").read_text()
    assert kernel_entries(source) == sorted(facts["cuda"]["kernels"])
    assert sum(facts["kernels"].values()) < kernels     # the case the count used to get wrong


@needs_nvcc
def test_cuda_compile_reports_what_the_package_is(tmp_path):
    """A model compiled with --precision bf16 for a GPU without bf16 tensor cores (sm_75)
    says it is fp32, in the log and the manifest; and the matmuls DLight schedules carry
    their shapes, MACs and who runs them, not only a fallback estimate of 0 ms."""
    logs: list[str] = []
    manifest = api.compile(EXAMPLES / "digits_cnn.onnx", tmp_path / "pkg",
                           target='{"kind": "cuda", "arch": "sm_75"}', precision="bf16",
                           log=logs.append)
    facts = manifest["compile"]
    assert any("the package is fp32" in line for line in logs)
    assert facts["precision"] == "fp32" and facts["precision_asked"] == "bf16"
    assert "min_cosine" not in manifest["reference"]
    matmuls = [d for d in facts["decisions"] if d["op"] == "matmul"]
    assert matmuls and all(d["chosen"] == "fallback" for d in matmuls)
    for d in matmuls:
        assert d["kernel"].startswith("dlight") and d["dtype"] == "float32"
        x, w = d["shapes"]
        assert d["macs"] == int(np.prod(d["out_shape"])) * x[-1] > 0
        assert d["candidates"]["fallback"] > 0


def _package_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@needs_nvcc
def test_cuda_package_holds_one_copy_of_its_weights(tmp_path):
    """A CUDA package stores each weight once: model.so's constants are the fragment-packed
    tf32 words only (the fp32 originals they were packed from are not kept), and cpu_twin.so
    is the kernels without weights (it runs model.so's constants). Stated margin: the whole
    package (library, twin, fatbin, source, header, manifest, reference pair) within the
    weight bytes + 10 % + 1 MiB. ``keep_onnx`` is the one documented second copy (model.onnx
    for ONNX Runtime): that package breaks the bound, which shows the bound would catch a
    duplicate."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((256, 1024)).astype(np.float32)
    w2 = rng.standard_normal((1024, 512)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 512])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "mlp.onnx"))
    weights = w1.nbytes + w2.nbytes                          # 3 MiB
    bound = 1.1 * weights + (1 << 20)
    lean = api.compile(tmp_path / "mlp.onnx", tmp_path / "pkg", target="cuda-sm80",
                       log=lambda s: None)
    assert [d["chosen"] for d in lean["compile"]["decisions"]] == ["mma_cuda"] * 2
    assert lean["reference"]["check"]["ok"]
    size = _package_bytes(tmp_path / "pkg")
    assert weights <= (tmp_path / "pkg" / "model.so").stat().st_size < weights * 1.1
    assert (tmp_path / "pkg" / "cpu_twin.so").stat().st_size < weights / 4
    assert weights < size <= bound
    api.compile(tmp_path / "mlp.onnx", tmp_path / "with_onnx", target="cuda-sm80",
                keep_onnx=True, log=lambda s: None)
    assert _package_bytes(tmp_path / "with_onnx") > bound


@needs_nvcc
def test_cuda_graph_package_runs_on_the_cpu_twin(tmp_path, capsys):
    """``--cuda-graph``: TVM's RewriteCUDAGraph lifts the digits CNN's static kernel launches
    into a region the CUDA runtime captures once and replays (counted in the manifest); the
    kernels are the same, and without a GPU the region runs eagerly on the CPU twin, so
    compile's check, validate and run work as for any CUDA package. A CPU target refuses the
    flag. (The graphs' speed needs a GPU: not measured.)"""
    out = tmp_path / "pkg"
    proc = subprocess.run([sys.executable, "-m", "sparsec", "compile",
                           str(EXAMPLES / "digits_cnn.onnx"), "--target", "cuda-sm80",
                           "--cuda-graph", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CUDA graphs: 1 region(s)" in proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compile"]["cuda"]["cuda_graph_regions"] == 1
    assert manifest["reference"]["check"]["ok"]
    from sparsec import cli

    assert cli.main(["inspect", str(out)]) == 0
    assert "CUDA graphs 1 region(s)" in capsys.readouterr().out
    report = api.validate(out)      # the reference pair, in this process too
    assert report.ok and report.via == ("cuda" if cuda_available() else
                                        "cuda-schedules-on-cpu")
    if not cuda_available():     # the eager stand-ins must leave a graph-free package alone
        plain = api.compile(EXAMPLES / "digits_cnn.onnx", tmp_path / "plain",
                            target="cuda-sm80", log=lambda s: None)
        assert plain["compile"]["cuda"]["cuda_graph_regions"] == 0
        assert (plain["compile"]["cuda"]["source_sha256"]
                == manifest["compile"]["cuda"]["source_sha256"])      # the same kernels
        assert api.validate(tmp_path / "plain").ok
    with pytest.raises(api.BadOptionError, match="--cuda-graph is for CUDA targets"):
        api.compile(EXAMPLES / "digits_cnn.onnx", tmp_path / "cpu", target="host",
                    cuda_graph=True)
