"""Deployable packages: the C header and C API over the real TVM runtime, static and shared
linking, the reference pair, `sparsec runtime`, the CMake module and its example built and run
natively and cross-compiled for aarch64 under qemu. Programs are built with the system's real
compilers; nothing is mocked.

The aarch64 tests need Debian's g++-aarch64-linux-gnu and qemu-user (.ci/run installs them) and
pip access to PyPI for the aarch64 TVM wheels; without them they skip here, and fail under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import EXAMPLES, REPO
from test_cli import assert_clean_error, sparsec

from sparsec import api as sparsec_api
from sparsec import reference
from sparsec.deploy import CMAKE_DIR
from sparsec.ir.onnx_io import to_onnx

CALIB = EXAMPLES / "digits_calib.npz"
SPARSEC_BIN = Path(sys.executable).parent / "sparsec"
CROSS = ("aarch64-linux-gnu-g++", "qemu-aarch64")


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        why = f"needs {', '.join(missing)} (apt install g++-aarch64-linux-gnu qemu-user cmake)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600,
                          **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """The digits CNN and MLP compiled for the host, as packages named cnn and mlp."""
    root = tmp_path_factory.mktemp("deploy")
    for name in ("cnn", "mlp"):
        proc = sparsec("-q", "compile", EXAMPLES / f"digits_{name}.onnx", "--ratio", "0.3",
                       "--calib", CALIB, "--name", name, "-o", root / name)
        assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture(scope="module")
def host_runtime(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "host"
    proc = sparsec("runtime", "--target", "host", "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out


CHECK_PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include "cnn.h"
#include "mlp.h"

static int check(const sparsec_model_spec* spec, const char* lib, const char* dir) {
  char in[1024], out[1024];
  double err = -1;
  sparsec_model* m = sparsec_open(spec, lib);
  if (!m) { printf("%s open: %s\n", spec->name, sparsec_last_error()); return 1; }
  snprintf(in, sizeof in, "%s/%s/reference/inputs.bin", dir, spec->name);
  snprintf(out, sizeof out, "%s/%s/reference/outputs.bin", dir, spec->name);
  int status = sparsec_check_reference(m, in, out, &err);
  printf("%s status %d err %g msg '%s'\n", spec->name, status, err, sparsec_last_error());
  sparsec_close(m);
  return status != 0;
}

int main(int argc, char** argv) {
  /* argv[1]: packages dir; argv[2]: "static", or the cnn model.so to load */
  if (argc != 3) return 2;
  const char* lib = strcmp(argv[2], "static") == 0 ? NULL : argv[2];
  int bad = check(&cnn_spec, lib, argv[1]);
  if (lib == NULL) bad |= check(&mlp_spec, NULL, argv[1]);
  return bad;
}
"""


def build_check(packages: Path, runtime: Path, tmp: Path, static: bool) -> Path:
    """The C program above, with the C API, against the TVM runtime; both models' archives
    linked in when ``static``."""
    (tmp / "check.c").write_text(CHECK_PROGRAM)
    inc = ["-I", runtime / "include", "-I", packages / "cnn", "-I", packages / "mlp"]
    run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-c", tmp / "check.c", "-o",
         tmp / "check.o", *inc])
    run(["g++", "-std=c++17", "-O2", "-Wall", "-Werror", "-c",
         runtime / "src" / "sparsec_runtime.cc", "-o", tmp / "capi.o", *inc])
    archives = ["-Wl,--whole-archive", packages / "cnn" / "libcnn.a",
                packages / "mlp" / "libmlp.a", "-Wl,--no-whole-archive"] if static else []
    exe = tmp / ("check_static" if static else "check_shared")
    run(["g++", tmp / "check.o", tmp / "capi.o", *archives, "-L", runtime / "lib",
         "-Wl,--as-needed", "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{runtime / 'lib'}",
         "-o", exe])
    return exe


# --------------------------------------------------------------------------- the package
def test_header_matches_manifest(packages):
    m = json.loads((packages / "cnn" / "manifest.json").read_text())
    header = (packages / "cnn" / "cnn.h").read_text()
    assert '#define CNN_SYSTEM_LIB_PREFIX "cnn_"' in header
    assert "#define CNN_INPUT0_NUMEL 64" in header and "#define CNN_OUTPUT0_NUMEL 10" in header
    # a fixed shape: its least and largest sizes are that shape
    assert ("{\"image\", SPARSEC_FLOAT32, 4, cnn_input0_shape, 256, NULL, cnn_input0_min_shape, "
            "cnn_input0_max_shape, NULL, 256}") in header
    assert "cnn_input0_max_shape[] = {1, 1, 8, 8};" in header and "_DIM_" not in header
    assert m["inputs"] == [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}]


def test_reference_pair_is_onnxruntime_on_the_pruned_model(packages):
    """The pair is stored once, as the raw arrays the C API reads; the package holds no
    model.onnx (the library has the weights), so the pruned model is made again here."""
    from sparsec.package import Package

    pkg = packages / "cnn"
    assert not (pkg / "model.onnx").exists()
    x, y = Package.load(pkg).reference()
    # a real calibration sample, not random numbers
    assert any(np.array_equal(x["image"][0], s) for s in np.load(CALIB)["image"].reshape(
        -1, 1, 8, 8))
    pruned = sparsec_api.prune(EXAMPLES / "digits_cnn.onnx", ratio=0.3, calibration=CALIB,
                               round_to=8).graph
    want = reference.run(to_onnx(pruned), x)[0]
    np.testing.assert_array_equal(y["linear"], want)
    assert (pkg / "reference" / "inputs.bin").read_bytes() == x["image"].astype("<f4").tobytes()
    assert (pkg / "reference" / "outputs.bin").read_bytes() == want.astype("<f4").tobytes()
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["reference"]["from"] == "calibration" and m["reference"]["check"]["ok"]


def test_inspect_package(packages):
    proc = sparsec("inspect", packages / "cnn")
    assert proc.returncode == 0, proc.stderr
    for text in ("model 'cnn'", "target   host", "cnn.h, libcnn.a (prefix 'cnn_')",
                 "reference pair from calibration", "channel-prune: lossy"):
        assert text in proc.stdout
    proc = sparsec("inspect", packages / "cnn", "--json")
    assert json.loads(proc.stdout) == json.loads((packages / "cnn" / "manifest.json").read_text())


def test_bad_name_is_refused(tmp_path):
    proc = sparsec("compile", EXAMPLES / "digits_mlp.onnx", "--name", "9lives", "-o",
                   tmp_path / "p")
    assert_clean_error(proc, 6, "not a C identifier")
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- the C API
def test_runtime_dir(host_runtime):
    info = json.loads((host_runtime / "runtime.json").read_text())
    assert info["target"] == {"name": "host", "triple": None}
    assert sorted(p.name for p in (host_runtime / "lib").iterdir()) == [
        "libtvm_ffi.so", "libtvm_runtime.so"]
    for header in ("sparsec.h", "dlpack/dlpack.h", "tvm/ffi/function.h",
                   "tvm/runtime/c_backend_api.h"):
        assert (host_runtime / "include" / header).is_file()
    # it replaces an earlier runtime, nothing else
    assert sparsec("runtime", "-o", host_runtime).returncode == 0
    assert_clean_error(sparsec("runtime", "-o", EXAMPLES), 9, "is not a sparsec runtime")


def test_c_api_static_two_models_in_one_program(packages, host_runtime, tmp_path):
    exe = build_check(packages, host_runtime, tmp_path, static=True)
    proc = subprocess.run([exe, packages, "static"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cnn status 0" in proc.stdout and "mlp status 0" in proc.stdout


def test_c_api_shared_library(packages, host_runtime, tmp_path):
    exe = build_check(packages, host_runtime, tmp_path, static=False)
    proc = subprocess.run([exe, packages, packages / "cnn" / "model.so"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # errors come back as messages: no such file; no model linked under that prefix
    proc = subprocess.run([exe, packages, tmp_path / "none.so"], capture_output=True, text=True)
    assert proc.returncode == 1 and "cnn open:" in proc.stdout and "none.so" in proc.stdout
    proc = subprocess.run([exe, packages, "static"], capture_output=True, text=True)
    assert proc.returncode == 1 and "no model with prefix 'cnn_' is linked in" in proc.stdout


def test_c_api_reference_check_catches_differences(packages, host_runtime, tmp_path):
    exe = build_check(packages, host_runtime, tmp_path, static=False)
    bad = tmp_path / "bad"
    shutil.copytree(packages / "cnn", bad / "cnn")
    ref = bad / "cnn" / "reference" / "outputs.bin"
    y = np.frombuffer(ref.read_bytes(), "<f4").copy()
    y[3] += 1e-2 * np.abs(y).max()
    ref.write_bytes(y.tobytes())
    proc = subprocess.run([exe, bad, packages / "cnn" / "model.so"], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "cnn status 1" in proc.stdout
    assert "output linear: max abs err" in proc.stdout
    for odd in (np.nan, np.inf):        # a NaN / Inf where the library is finite: a mismatch
        z = np.frombuffer((packages / "cnn" / "reference" / "outputs.bin").read_bytes(),
                          "<f4").copy()
        z[3] = odd
        ref.write_bytes(z.tobytes())
        proc = subprocess.run([exe, bad, packages / "cnn" / "model.so"], capture_output=True,
                              text=True)
        assert proc.returncode == 1 and "cnn status 1" in proc.stdout, (odd, proc.stdout)
        assert "max abs err inf" in proc.stdout
    ref.write_bytes(y[:5].tobytes())
    proc = subprocess.run([exe, bad, packages / "cnn" / "model.so"], capture_output=True,
                          text=True)
    assert "cnn status -1" in proc.stdout and "has 20 bytes, the model's spec needs 40" \
        in proc.stdout


HOSTILE_PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include "mlp.h"

#define EXPECT_FAIL(call, what) do { \
    int rc_ = (call); \
    printf("%s -> %d '%s'\n", what, rc_, sparsec_last_error()); \
    if (rc_ == 0) bad = 1; } while (0)

int main(int argc, char** argv) {
  /* argv[1]: mlp's model.so, argv[2]: a truncated copy, argv[3]: another model's library */
  int bad = 0;
  if (argc != 4) return 2;
  static float x[MLP_INPUT0_NUMEL], y[MLP_OUTPUT0_NUMEL];
  const void* in[1] = {x};
  void* out[1] = {y};
  const void* null_in[1] = {NULL};
  void* null_out[1] = {NULL};
  size_t in_ok[1] = {sizeof x}, in_short[1] = {sizeof x - 4};
  size_t out_ok[1] = {sizeof y}, out_short[1] = {sizeof y / 2};
  for (int i = 2; i <= 3; ++i) {
    sparsec_model* wrong = sparsec_open(&mlp_spec, argv[i]);
    printf("open %s -> %s '%s'\n", i == 2 ? "truncated" : "foreign", wrong ? "model" : "NULL",
           sparsec_last_error());
    if (wrong) { bad = 1; sparsec_close(wrong); }
  }
  if (sparsec_open(NULL, argv[1]) != NULL) bad = 1;
  sparsec_model* m = sparsec_open(&mlp_spec, argv[1]);
  if (!m) { printf("open: %s\n", sparsec_last_error()); return 3; }
  EXPECT_FAIL(sparsec_run(m, NULL, out), "NULL inputs");
  EXPECT_FAIL(sparsec_run(m, in, NULL), "NULL outputs");
  EXPECT_FAIL(sparsec_run(m, null_in, out), "NULL input buffer");
  EXPECT_FAIL(sparsec_run(m, in, null_out), "NULL output buffer");
  EXPECT_FAIL(sparsec_run(NULL, in, out), "NULL model");
  EXPECT_FAIL(sparsec_run_sized(m, in, in_short, out, out_ok), "short input");
  EXPECT_FAIL(sparsec_run_sized(m, in, in_ok, out, out_short), "short output");
  EXPECT_FAIL(sparsec_check_reference(m, NULL, NULL, NULL), "NULL reference paths");
  x[5] = 0.0f / 0.0f;
  EXPECT_FAIL(sparsec_run(m, in, out), "NaN input");
  x[5] = 0.0f;
  int ok = sparsec_run_sized(m, in, in_ok, out, out_ok);
  printf("sized run -> %d\n", ok);
  sparsec_close(m);
  sparsec_close(NULL);
  return bad || ok != 0;
}
"""


def test_c_api_reports_every_misuse_without_crashing(packages, host_runtime, tmp_path):
    """NULLs everywhere, short buffers, a truncated copy of model.so (an interrupted copy to a
    device) and another model's library: each an error message, never a signal."""
    (tmp_path / "hostile.c").write_text(HOSTILE_PROGRAM)
    inc = ["-I", host_runtime / "include", "-I", packages / "mlp"]
    run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-c", tmp_path / "hostile.c", "-o",
         tmp_path / "hostile.o", *inc])
    run(["g++", "-std=c++17", "-O2", "-c", host_runtime / "src" / "sparsec_runtime.cc", "-o",
         tmp_path / "capi.o", *inc])
    exe = tmp_path / "hostile"
    run(["g++", tmp_path / "hostile.o", tmp_path / "capi.o", "-L", host_runtime / "lib",
         "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{host_runtime / 'lib'}", "-o", exe])
    lib = packages / "mlp" / "model.so"
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(lib.read_bytes()[: lib.stat().st_size // 3])
    proc = subprocess.run([exe, lib, truncated, packages / "cnn" / "model.so"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr     # a signal is negative
    assert "open truncated -> NULL" in proc.stdout and "bytes" in proc.stdout
    assert "open foreign -> NULL" in proc.stdout
    assert proc.stdout.count("-> -1") == 7 and "sized run -> 0" in proc.stdout
    assert proc.stdout.count("-> -3") == 2      # the short buffers: SPARSEC_ERROR_BUFFER
    assert "holds NaN at element 5" in proc.stdout


DYNAMIC_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include "bert.h"

static int64_t ids[BERT_INPUT0_MAX_NUMEL], mask[BERT_INPUT1_MAX_NUMEL];
static float y[BERT_OUTPUT0_MAX_NUMEL];

static void report(const char* what, int rc) {
  printf("%s -> %d '%s'\n", what, rc, sparsec_last_error());
}

int main(int argc, char** argv) {
  /* argv[1]: the package, argv[2]: a directory with in_BxS.bin (ids, then mask) for every
   * size BxS in argv[3..]; writes out_BxS.bin there, then makes the calls that must fail */
  int64_t shape[2], out_shape[3], other[2] = {1, 3};
  char path[1024], ref_out[1024];
  sparsec_input in[2] = {{ids, sizeof ids, shape}, {mask, sizeof mask, shape}};
  sparsec_output out[1] = {{y, sizeof y, out_shape}};
  if (argc < 4) return 2;
  snprintf(path, sizeof path, "%s/model.so", argv[1]);
  sparsec_model* m = sparsec_open(&bert_spec, path);
  if (!m) { printf("open: %s\n", sparsec_last_error()); return 2; }
  for (int i = 3; i < argc; ++i) {
    long long b, s;
    if (sscanf(argv[i], "%lldx%lld", &b, &s) != 2) return 2;
    shape[0] = b, shape[1] = s;
    snprintf(path, sizeof path, "%s/in_%s.bin", argv[2], argv[i]);
    FILE* f = fopen(path, "rb");
    if (!f || fread(ids, 8, b * s, f) != (size_t)(b * s) ||
        fread(mask, 8, b * s, f) != (size_t)(b * s)) return 3;
    fclose(f);
    int rc = sparsec_run_shaped(m, in, out);
    size_t n = out_shape[0] * out_shape[1] * out_shape[2];
    printf("%s -> %d shape %lld %lld %lld\n", argv[i], rc, (long long)out_shape[0],
           (long long)out_shape[1], (long long)out_shape[2]);
    snprintf(path, sizeof path, "%s/out_%s.bin", argv[2], argv[i]);
    f = fopen(path, "wb");
    if (rc != 0 || !f || fwrite(y, 4, n, f) != n) return 4;
    fclose(f);
  }
  shape[0] = BERT_DIM_BATCH_SIZE_MAX + 1, shape[1] = 4;
  report("batch past the range", sparsec_run_shaped(m, in, out));
  shape[0] = 1, shape[1] = BERT_DIM_SEQUENCE_LENGTH_MAX + 1;
  report("sequence past the range", sparsec_run_shaped(m, in, out));
  shape[1] = 0;
  report("empty sequence", sparsec_run_shaped(m, in, out));
  shape[1] = 4;
  in[1].shape = other;
  report("inputs disagree", sparsec_run_shaped(m, in, out));
  in[1].shape = shape;
  in[0].nbytes = 3 * 8;
  report("short input", sparsec_run_shaped(m, in, out));
  in[0].nbytes = sizeof ids;
  out[0].nbytes = 4 * 32 * 4 - 4;
  report("short output", sparsec_run_shaped(m, in, out));
  out[0].nbytes = 4 * 32 * 4;
  report("exact output", sparsec_run_shaped(m, in, out));
  /* the fixed-shape calls run the header's sizes: the reference pair */
  double err = -1;
  snprintf(path, sizeof path, "%s/reference/inputs.bin", argv[1]);
  snprintf(ref_out, sizeof ref_out, "%s/reference/outputs.bin", argv[1]);
  report("reference pair", sparsec_check_reference(m, path, ref_out, &err));
  sparsec_close(m);
  return 0;
}
"""


def test_c_api_runs_a_dynamic_package_at_every_size(host_runtime, tmp_path):
    """A BERT encoder compiled with dynamic batch and sequence, run from C at both ends of its
    ranges and in between (one process, sizes changing between calls), matches ONNX Runtime;
    sizes outside the ranges, inputs that disagree on a dim and short buffers get their own
    status and a message; the header's fixed shape still runs the reference pair."""
    from test_dynamic import export_bert

    src = tmp_path / "bert.onnx"
    export_bert(src)
    pkg = tmp_path / "bert"
    manifest = sparsec_api.compile(src, pkg, name="bert",
                                   dynamic={"batch_size": (1, 4), "sequence_length": (1, 64)})
    header = (pkg / "bert.h").read_text()
    assert manifest["inputs"][1]["dims"] == [["batch_size", 1, 4], ["sequence_length", 1, 64]]
    for line in ("#define BERT_DIM_BATCH_SIZE_MIN 1", "#define BERT_DIM_BATCH_SIZE_MAX 4",
                 "#define BERT_DIM_SEQUENCE_LENGTH_MAX 64", "#define BERT_OUTPUT0_MAX_NUMEL 8192",
                 "bert_output0_max_shape[] = {4, 64, 32};",
                 'bert_output0_dims[] = {"batch_size", "sequence_length", NULL};'):
        assert line in header, line
    (tmp_path / "dyn.c").write_text(DYNAMIC_PROGRAM)
    inc = ["-I", host_runtime / "include", "-I", pkg]
    run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-c", tmp_path / "dyn.c", "-o",
         tmp_path / "dyn.o", *inc])
    run(["g++", "-std=c++17", "-O2", "-c", host_runtime / "src" / "sparsec_runtime.cc", "-o",
         tmp_path / "capi.o", *inc])
    exe = tmp_path / "dyn"
    run(["g++", tmp_path / "dyn.o", tmp_path / "capi.o", "-L", host_runtime / "lib",
         "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{host_runtime / 'lib'}", "-o", exe])
    sizes = [(1, 1), (4, 64), (2, 7)]
    rng = np.random.default_rng(0)
    feeds = {}
    for b, s in sizes:
        mask = np.ones((b, s), np.int64)
        mask[0, : s // 3] = 0
        feeds[b, s] = {"input_ids": rng.integers(0, 120, (b, s)).astype(np.int64),
                       "mask": mask}
        (tmp_path / f"in_{b}x{s}.bin").write_bytes(
            feeds[b, s]["input_ids"].tobytes() + mask.tobytes())
    proc = subprocess.run([exe, pkg, tmp_path, *(f"{b}x{s}" for b, s in sizes)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    session = reference.session(onnx.load(str(src)))
    for b, s in sizes:
        assert f"{b}x{s} -> 0 shape {b} {s} 32" in proc.stdout
        want = session.run(None, feeds[b, s])[0]
        got = np.fromfile(tmp_path / f"out_{b}x{s}.bin", np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    lines = dict(line.split(" -> ", 1) for line in proc.stdout.splitlines()[len(sizes):])
    assert lines["batch past the range"] == (
        "-2 'input input_ids has shape [5, 4]: batch_size = 5 (axis 0) is outside the range "
        "1..4 the model was compiled for'")
    assert lines["sequence past the range"].startswith(
        "-2 'input input_ids has shape [1, 65]: sequence_length = 65 (axis 1)")
    assert lines["empty sequence"].startswith("-2 ") and "= 0 (axis 1)" in lines[
        "empty sequence"]
    assert lines["inputs disagree"] == ("-2 'inputs disagree on sequence_length: 4 (input_ids "
                                        "axis 1) and 3 (mask axis 1)'")
    assert lines["short input"] == ("-3 'input input_ids holds 24 bytes, its shape [1, 4] "
                                    "needs 32'")
    assert lines["short output"] == ("-3 'output hidden has room for 508 bytes, its result "
                                     "[1, 4, 32] needs 512'")
    assert lines["exact output"] == "0 ''" and lines["reference pair"] == "0 ''"


def embedding_model():
    """ids [1, 6] -> Gather from a 100-row table -> Relu."""
    from onnx import TensorProto, helper, numpy_helper

    emb = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("Relu", ["e"],
                                                                             ["y"])], "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 16])],
        [numpy_helper.from_array(emb, "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


EMBED_PROGRAM = r"""
#include <stdio.h>
#include "embed.h"

int main(int argc, char** argv) {
  /* argv[1]: model.so; the ids: valid ones (negative ones count from the end), then one past
   * the table */
  int64_t good[6] = {0, 5, 99, -1, -100, 42}, bad[6] = {0, 5, 100, 1, 2, 3};
  float y[6 * 16];
  const void* in[1] = {good};
  void* out[1] = {y};
  sparsec_model* m = argc == 2 ? sparsec_open(&embed_spec, argv[1]) : NULL;
  if (!m) { printf("open: %s\n", sparsec_last_error()); return 2; }
  int ok = sparsec_run(m, in, out);
  printf("good %d y[3*16] %g\n", ok, y[3 * 16]);
  in[0] = bad;
  int refused = sparsec_run(m, in, out);
  printf("bad %d '%s'\n", refused, sparsec_last_error());
  sparsec_close(m);
  return ok != 0 || refused == 0;
}
"""


def test_index_inputs_out_of_range_are_refused(host_runtime, tmp_path):
    """Token ids outside the embedding table: ONNX Runtime refuses them, so do sparsec.run,
    validate and the C API (the range is in the manifest and the C header); ids inside it,
    negative ones too, match ONNX Runtime."""
    import sparsec as api
    from sparsec.errors import BadOptionError

    src = tmp_path / "embed.onnx"
    onnx.save(embedding_model(), str(src))
    pkg = tmp_path / "embed"
    manifest = api.compile(src, pkg, name="embed")
    assert manifest["inputs"][0]["range"] == [-100, 99]
    assert "embed_input0_range[] = {-100, 99}" in (pkg / "embed.h").read_text()
    good = {"ids": np.array([[0, 5, 99, -1, -100, 42]], np.int64)}
    want = reference_run(src, good)
    np.testing.assert_array_equal(api.run(pkg, good)["y"], want)
    with pytest.raises(BadOptionError, match=r"'ids' holds 100 at \[0, 2\], outside \[-100, 99\]"):
        api.run(pkg, {"ids": np.array([[0, 5, 100, 1, 2, -101]], np.int64)})
    np.savez(tmp_path / "bad.npz", ids=np.array([[0, 0, 0, 0, 0, -101]], np.int64))
    proc = sparsec("run", pkg, "--inputs", tmp_path / "bad.npz")
    assert_clean_error(proc, 6, "'ids' holds -101 at [0, 5]")
    (tmp_path / "embed.c").write_text(EMBED_PROGRAM)
    inc = ["-I", host_runtime / "include", "-I", pkg]
    run(["gcc", "-std=c99", "-Wall", "-Werror", "-c", tmp_path / "embed.c", "-o",
         tmp_path / "embed.o", *inc])
    run(["g++", "-std=c++17", "-O2", "-c", host_runtime / "src" / "sparsec_runtime.cc", "-o",
         tmp_path / "capi.o", *inc])
    exe = tmp_path / "embed_check"
    run(["g++", tmp_path / "embed.o", tmp_path / "capi.o", "-L", host_runtime / "lib",
         "-Wl,--as-needed", "-ltvm_runtime", "-ltvm_ffi",
         f"-Wl,-rpath,{host_runtime / 'lib'}", "-o", exe])
    proc = subprocess.run([exe, pkg / "model.so"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"y[3*16] {float(want[0, 3, 0]):g}" in proc.stdout      # id -1: the table's last row
    assert "bad -1 'input ids holds 100 at element 2, outside [-100, 99]" in proc.stdout


def reference_run(path: Path, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None,
                                                                                  feeds)[0]


# --------------------------------------------------------------------------- CMake
def cmake_build(build: Path, *defs: str, toolchain: bool = False) -> str:
    need("cmake")
    extra = [f"-DCMAKE_TOOLCHAIN_FILE={CMAKE_DIR / 'aarch64-linux-gnu.cmake'}"] if toolchain \
        else []
    run(["cmake", "-S", REPO / "examples" / "cpp", "-B", build, f"-Dsparsec_DIR={CMAKE_DIR}",
         f"-DSPARSEC_EXECUTABLE={SPARSEC_BIN}", *extra, *defs])
    return run(["cmake", "--build", build, "-j2"]).stdout


def ctest(build: Path) -> str:
    return run(["ctest", "--test-dir", build, "--output-on-failure", "-V"]).stdout


def test_cmake_example_builds_runs_and_tracks_dependencies(tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copyfile(EXAMPLES / "digits_cnn.onnx", model)
    build = tmp_path / "build"
    out = cmake_build(build, f"-DDIGITS_MODEL={model}")
    assert "sparsec: compiling digits for host" in out
    assert "reference check: max abs err" in ctest(build) and "-> ok" in ctest(build)
    m = json.loads((build / "digits" / "manifest.json").read_text())
    assert m["name"] == "digits" and "--reconstruct" in m["command"]
    # nothing changed: no recompile; a newer model or a new flag: recompile
    assert "sparsec: compiling" not in cmake_build(build)
    newer = (build / "digits" / "manifest.json").stat().st_mtime + 5
    os.utime(model, (newer, newer))
    assert "sparsec: compiling" in cmake_build(build)
    assert "sparsec: compiling" in cmake_build(build, "-DDIGITS_RATIO=0.5")
    m2 = json.loads((build / "digits" / "manifest.json").read_text())
    assert m2["prune"]["after"]["params"] < m["prune"]["after"]["params"]
    assert "-> ok" in ctest(build)


def test_cmake_example_cross_compiled_for_aarch64_runs_under_qemu(tmp_path):
    need("cmake", *CROSS)
    build = tmp_path / "build"
    # a TVM device tag: aarch64 code tuned for the Pi 4's Cortex-A72
    out = cmake_build(build, "-DSPARSEC_TARGET=raspberry-pi/4b-aarch64", toolchain=True)
    assert "sparsec: compiling digits for raspberry-pi/4b-aarch64" in out
    exe = build / "digits_check"
    assert exe.read_bytes()[18] == 183            # ELF e_machine: EM_AARCH64
    out = ctest(build)                            # runs under qemu-aarch64
    assert "reference check: max abs err" in out and "-> ok" in out
    runtime = build / "sparsec-runtime-raspberry_pi_4b_aarch64"
    info = json.loads((runtime / "runtime.json").read_text())
    assert info["target"]["triple"] == "aarch64-linux-gnu"
    for lib in (runtime / "lib").iterdir():
        assert lib.read_bytes()[18] == 183, lib
    # compile checked the reference pair under qemu; validate runs it the same way
    m = json.loads((build / "digits" / "manifest.json").read_text())
    assert m["reference"]["check"]["ok"] and m["reference"]["check"]["via"] == "qemu-aarch64"
    assert m["target"]["tvm"]["mcpu"] == "cortex-a72"
    proc = sparsec("validate", build / "digits")
    assert proc.returncode == 0 and "library matches ONNX Runtime" in proc.stdout, proc.stderr
    # installed (sparsec_install), copied elsewhere, run with no LD_LIBRARY_PATH: the program
    # finds the runtime through its RUNPATH, $ORIGIN/lib
    run(["cmake", "--install", build, "--prefix", tmp_path / "out"])
    device = tmp_path / "device"
    shutil.copytree(tmp_path / "out" / "bin", device)
    shutil.copytree(build / "digits", device / "digits")
    shutil.rmtree(build)                                  # nothing of the build tree is left
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LD_", "QEMU_"))}
    proc = subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu",
                           device / "digits_check", device / "digits"], capture_output=True,
                          text=True, env=env, cwd="/", timeout=300)
    assert proc.returncode == 0 and "-> ok" in proc.stdout, proc.stdout + proc.stderr


C_ONLY_PROJECT = """
cmake_minimum_required(VERSION 3.24)
project(c_only C)
find_package(sparsec REQUIRED)
sparsec_add_model(mlp SRC "@MODEL@")
add_executable(app main.c)
target_link_libraries(app PRIVATE mlp)
"""

C_ONLY_MAIN = r"""
#include <stdio.h>
#include "mlp.h"
int main(int argc, char** argv) {
  char in[512], out[512];
  double err = -1;
  sparsec_model* m = sparsec_open(&mlp_spec, NULL);
  if (!m || argc != 2) { printf("open: %s\n", sparsec_last_error()); return 1; }
  snprintf(in, sizeof in, "%s/reference/inputs.bin", argv[1]);
  snprintf(out, sizeof out, "%s/reference/outputs.bin", argv[1]);
  int status = sparsec_check_reference(m, in, out, &err);
  printf("status %d err %g\n", status, err);
  sparsec_close(m);
  return status;
}
"""


def test_c_only_cmake_project_configures_builds_and_runs(tmp_path):
    """project(x C) with no C++: the module enables C++ for the C API itself."""
    need("cmake")
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        C_ONLY_PROJECT.replace("@MODEL@", str(EXAMPLES / "digits_mlp.onnx")))
    (src / "main.c").write_text(C_ONLY_MAIN)
    build = tmp_path / "build"
    run(["cmake", "-S", src, "-B", build, f"-Dsparsec_DIR={CMAKE_DIR}",
         f"-DSPARSEC_EXECUTABLE={SPARSEC_BIN}"])
    run(["cmake", "--build", build, "-j2"])
    proc = run([build / "app", build / "mlp"])
    assert "status 0" in proc.stdout


@pytest.mark.parametrize("case", ["mlp_bsr", "hf_bert", "hf_mobilenetv2", "expand_dw"])
def test_aarch64_kernels_match_onnxruntime_under_qemu(zoo_files, tmp_path, case):
    """Every kernel strategy cross-compiled for aarch64 and run under qemu against ONNX
    Runtime: packed dense and BSR (16x1 blocks at 90 %), attention and norms (BERT),
    depthwise convs with their stride phases (NEON shuffles), the fused expansion and
    depthwise conv."""
    need(*CROSS)
    import onnx

    import sparsec as api

    if case == "mlp_bsr":
        m = api.compile(EXAMPLES / "digits_mlp.onnx", tmp_path / "p", target="aarch64",
                        sparsity=0.9, sparsity_pattern="16x1", calibration=CALIB,
                        keep_onnx=True)
        assert m["compile"]["kernels"].get("bsr_dense", 0) >= 1
    elif case == "expand_dw":
        from test_targets import pointwise_dw_model

        onnx.save(pointwise_dw_model(n=1, k=8, c=20, h=64, stride=2, tf_pad=True),
                  tmp_path / "m.onnx")
        m = api.compile(tmp_path / "m.onnx", tmp_path / "p", target="aarch64", keep_onnx=True)
        assert m["compile"]["kernels"] == {"conv1x1_dw_nchw": 1}
    else:
        m = api.compile(zoo_files(case), tmp_path / "p", target="aarch64", ratio=0.25,
                        keep_onnx=True)
    assert m["reference"]["check"]["ok"] and m["reference"]["check"]["via"] == "qemu-aarch64"
    report = api.validate(tmp_path / "p", seed=1)      # new inputs: the package keeps its ONNX
    assert report.ok, report.outputs


def test_aarch64_without_qemu_compiles_unchecked(tmp_path):
    need("aarch64-linux-gnu-g++")
    bin_dir = tmp_path / "bin"            # the system's programs but no qemu
    bin_dir.mkdir()
    for exe in Path("/usr/bin").iterdir():
        if not exe.name.startswith("qemu-"):
            os.symlink(exe, bin_dir / exe.name)
    env = dict(os.environ, PATH=str(bin_dir))
    cmd = [sys.executable, "-m", "sparsec", "compile", str(EXAMPLES / "digits_mlp.onnx"),
           "--target", "aarch64", "-o", str(tmp_path / "p")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "warning: reference pair not checked here" in proc.stderr
    assert "apt install qemu-user" in proc.stderr
    assert "to be checked on the device" in sparsec("inspect", tmp_path / "p").stdout
    proc = subprocess.run([sys.executable, "-m", "sparsec", "validate", str(tmp_path / "p")],
                          capture_output=True, text=True, env=env)
    assert_clean_error(proc, 11, "qemu-aarch64 is not installed")


# --------------------------------------------------------------------------- errors
def test_missing_cross_toolchain_is_a_clear_error(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path / "empty"))
    out = tmp_path / "pkg"
    proc = subprocess.run([sys.executable, "-m", "sparsec", "compile",
                           str(EXAMPLES / "digits_mlp.onnx"), "--target", "aarch64", "-o",
                           str(out)], capture_output=True, text=True, env=env)
    assert_clean_error(proc, 11, "aarch64-linux-gnu-g++", "apt install g++-aarch64-linux-gnu")
    assert not out.exists()


def test_runtime_from_an_empty_wheel_dir_is_a_clear_error(tmp_path):
    (tmp_path / "wheels").mkdir()
    proc = sparsec("runtime", "--target", "aarch64", "--wheel-dir", tmp_path / "wheels", "-o",
                   tmp_path / "rt")
    assert_clean_error(proc, 11, "no manylinux_2_28_aarch64 wheel of apache-tvm==")
    assert not (tmp_path / "rt").exists()


# --------------------------------------------------------------------------- Python builds
def test_python_build_hook_compiles_models_into_the_wheel(tmp_path):
    import zipfile

    project = tmp_path / "proj"
    (project / "myapp").mkdir(parents=True)
    (project / "myapp" / "__init__.py").write_text("")
    shutil.copyfile(EXAMPLES / "digits_mlp.onnx", project / "mlp.onnx")
    (project / "setup.py").write_text(
        "from setuptools import setup\n"
        "from sparsec.deploy.setuptools import build_py\n"
        "setup(cmdclass={'build_py': build_py})\n")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "myapp"\nversion = "1.0"\n'
        '[tool.setuptools]\npackages = ["myapp"]\n'
        '[tool.sparsec.models.digits]\nsrc = "mlp.onnx"\npackage = "myapp"\n'
        'args = ["--ratio", "0.25"]\n')
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", tmp_path / "dist", project])
    [wheel] = (tmp_path / "dist").glob("myapp-1.0-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("manifest.json", "model.so", "digits.h", "libdigits.a", "reference/inputs.bin"):
        assert f"myapp/digits/{f}" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    proc = sparsec("validate", site / "myapp" / "digits")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--ratio" in json.loads((site / "myapp" / "digits" / "manifest.json").read_text())[
        "command"]
