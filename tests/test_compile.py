"""`sparsec compile` + `run` + `validate` end to end: real pruning, real TVM, checked against
ONNX Runtime. Compiles are shared per module (each takes seconds)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from conftest import EXAMPLES
from test_cli import assert_clean_error, digest, sparsec

from sparsec import api as sparsec_api
from sparsec import reference
from sparsec.errors import BadOptionError, InvalidModelError
from sparsec.package import Package, seal, sha256

MODELS = {"cnn": EXAMPLES / "digits_cnn.onnx", "mlp": EXAMPLES / "digits_mlp.onnx"}
#: the CNN's package is lean (the default: no model.onnx), the MLP's keeps its pruned model
KEEP_ONNX = {"cnn": (), "mlp": ("--keep-onnx",)}


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgs")
    out = {}
    for name, model in MODELS.items():
        before = digest(model)
        pkg = root / name
        proc = sparsec("compile", model, "--target", "host", "--ratio", "0.3", "-o", pkg,
                       "--calib", EXAMPLES / "digits_calib.npz", *KEEP_ONNX[name])
        assert proc.returncode == 0, proc.stderr
        assert digest(model) == before
        out[name] = pkg
    return out


@pytest.mark.parametrize("name", MODELS)
def test_compile_then_validate(packages, name):
    proc = sparsec("validate", packages[name])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "library matches ONNX Runtime" in proc.stdout


@pytest.mark.parametrize("name", MODELS)
def test_package_contents_and_manifest(packages, name):
    pkg = packages[name]
    onnx_file = ["model.onnx"] if KEEP_ONNX[name] else []
    assert sorted(os.listdir(pkg)) == sorted([f"{name}.h", f"lib{name}.a", "manifest.json",
                                              "model.so", "reference"] + onnx_file)
    assert sorted(os.listdir(pkg / "reference")) == ["inputs.bin", "outputs.bin"]   # once
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["name"] == name          # from the directory name
    assert m["library"] == {"shared": "model.so", "static": f"lib{name}.a",
                            "header": f"{name}.h", "system_lib_prefix": f"{name}_"}
    assert m["sparsec_version"] and m["versions"]["apache-tvm"].startswith("0.27")
    assert m["target"]["name"] == "host" and m["target"]["tvm"]["kind"] == "llvm"
    assert m["command"][:2] == ["sparsec", "compile"] and "--ratio" in m["command"]
    assert m["source"]["sha256"] == sha256(MODELS[name])
    files = [f"{name}.h", f"lib{name}.a", "model.so", "reference/inputs.bin",
             "reference/outputs.bin"] + onnx_file
    assert m["files"] == {f: sha256(pkg / f) for f in sorted(files)}
    assert m["inputs"] == [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert m["outputs"][0]["shape"] == [1, 10]
    [p] = m["prune"]["passes"]
    assert p["name"] == "channel-prune" and p["exact"] is False
    assert p["after"]["params"] < p["before"]["params"]
    assert p["after"]["macs"] < p["before"]["macs"]
    if onnx_file:   # pruned ONNX in the package is what the pass report describes
        pruned = onnx.load(str(pkg / "model.onnx"))
        n_params = sum(int(np.prod(t.dims)) for t in pruned.graph.initializer
                       if t.data_type == onnx.TensorProto.FLOAT)
        assert n_params == p["after"]["params"]
    # the heavy ops went to scheduled kernels, not TVM's unscheduled default
    kernels = m["compile"]["kernels"]
    heavy = "conv2d_nchw_packed" if name == "cnn" else "dense_packed"
    assert kernels.get(heavy, 0) >= (5 if name == "cnn" else 3)


def test_run_matches_onnxruntime_on_real_inputs(packages, tmp_path):
    pkg = packages["mlp"]
    test = np.load(EXAMPLES / "digits_test.npz")
    images = test["image"][:, None]                       # [N, 1, 1, 8, 8]
    pruned = onnx.load(str(pkg / "model.onnx"))
    x = tmp_path / "x.npz"
    np.savez(x, image=images[3])
    y = tmp_path / "y.npz"
    proc = sparsec("run", pkg, "--inputs", x, "--outputs", y)
    assert proc.returncode == 0, proc.stderr
    [got] = np.load(y).values()
    want = reference.run(pruned, {"image": images[3]})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    proc = sparsec("validate", pkg, "--inputs", x)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_run_rejects_wrong_inputs(packages, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((2, 2), np.float32))
    assert_clean_error(sparsec("run", packages["mlp"], "--inputs", bad), 6, "expects [1, 1, 8, 8]")
    np.savez(bad, pixels=np.zeros((1, 1, 8, 8), np.float32))
    assert_clean_error(sparsec("run", packages["mlp"], "--inputs", bad), 6, "no array 'image'")
    assert_clean_error(sparsec("run", tmp_path / "nope", "--inputs", bad), 3)
    assert_clean_error(sparsec("validate", EXAMPLES), 4, "not a sparsec package")


def test_validate_fails_when_library_and_model_disagree(packages, tmp_path):
    """Swap in a differently pruned model.onnx (hashes updated): validate must catch it."""
    pkg = tmp_path / "tampered"
    shutil.copytree(packages["mlp"], pkg)
    proc = sparsec("-q", "prune", MODELS["mlp"], "-o", pkg / "model.onnx", "--ratio", "0.6")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((pkg / "manifest.json").read_text())
    m["files"]["model.onnx"] = sha256(pkg / "model.onnx")
    (pkg / "manifest.json").write_text(json.dumps(seal(m)))   # a deliberate re-seal
    proc = sparsec("validate", pkg)
    assert proc.returncode == 10
    assert "FAIL" in proc.stdout and "max abs err" in proc.stderr


def test_lean_package_validates_on_its_reference_pair(packages, tmp_path):
    """A package without model.onnx (the default) is checked on its one reference pair: a
    re-sealed pair that the library does not reproduce fails; new inputs, a seed and the
    commands that need the model are refused with one line."""
    pkg = packages["cnn"]
    proc = sparsec("validate", pkg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "against the reference pair" in proc.stdout and "via: native" in proc.stdout
    m = json.loads((pkg / "manifest.json").read_text())
    x, y = Package.load(pkg).reference()
    assert list(x) == ["image"] and x["image"].shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(
        y["linear"], np.fromfile(pkg / "reference" / "outputs.bin", "<f4").reshape(1, 10))
    bad = tmp_path / "bad"
    shutil.copytree(pkg, bad)
    (bad / "reference" / "outputs.bin").write_bytes((y["linear"] + 1).astype("<f4").tobytes())
    m["files"]["reference/outputs.bin"] = sha256(bad / "reference" / "outputs.bin")
    (bad / "manifest.json").write_text(json.dumps(seal(m)))   # a deliberate re-seal
    proc = sparsec("validate", bad)
    assert proc.returncode == 10 and "FAIL" in proc.stdout, proc.stdout + proc.stderr
    (bad / "reference" / "outputs.bin").write_bytes(b"\0" * 12)   # shorter than the signature
    m["files"]["reference/outputs.bin"] = sha256(bad / "reference" / "outputs.bin")
    (bad / "manifest.json").write_text(json.dumps(seal(m)))
    with pytest.raises(InvalidModelError, match="shorter than the manifest"):
        sparsec_api.validate(bad)
    assert_clean_error(sparsec("validate", pkg, "--seed", "3"), 6, "--keep-onnx")
    with pytest.raises(BadOptionError, match="--keep-onnx"):
        sparsec_api.profile(pkg)


def test_corrupted_package_is_refused(packages, tmp_path):
    pkg = tmp_path / "corrupt"
    shutil.copytree(packages["mlp"], pkg)
    with open(pkg / "model.so", "ab") as f:
        f.write(b"\0")
    assert_clean_error(sparsec("validate", pkg), 4, "does not match its manifest hash")


def test_recompile_replaces_package_atomically(packages, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(packages["mlp"], pkg)
    old = json.loads((pkg / "manifest.json").read_text())
    proc = sparsec("-q", "compile", MODELS["mlp"], "-o", pkg, "--ratio", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""          # -q silences progress, TVM's native warnings included
    new = json.loads((pkg / "manifest.json").read_text())
    assert new["prune"]["after"]["params"] < old["prune"]["after"]["params"]
    assert sorted(os.listdir(tmp_path)) == ["pkg"]       # no staging or backup dirs left


def test_same_input_and_flags_give_identical_artifacts(packages, tmp_path):
    again = tmp_path / "mlp"
    proc = sparsec("compile", MODELS["mlp"], "--target", "host", "--ratio", "0.3", "-o", again,
                   "--calib", EXAMPLES / "digits_calib.npz", *KEEP_ONNX["mlp"])
    assert proc.returncode == 0, proc.stderr
    first = json.loads((packages["mlp"] / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    assert first["files"] == second["files"]              # every file's hash
    for m in (first, second):
        m.pop("command")
        m.pop("manifest_sha256")                            # it covers the command
    assert first == second


@pytest.mark.parametrize("name", ["hf_bert", "hf_mobilenetv2"])
def test_transformers_models_compile_and_validate(zoo_files, tmp_path, name):
    """Attention, LayerNorm, depthwise convs: pruned (where groups allow) and compiled."""
    import sparsec

    manifest = sparsec.compile(zoo_files(name), tmp_path / "pkg", ratio=0.3)
    [p] = manifest["prune"]["passes"]
    assert p["after"]["params"] < p["before"]["params"]
    assert manifest["compile"]["kernels"].get("dense_packed", 0) >= 1
    report = sparsec.validate(tmp_path / "pkg")
    assert report.ok, report.outputs


def test_torch_module_compiles_through_the_same_api(tmp_path):
    """sparsec.compile takes a torch module + example inputs (torch.export capture)."""
    import torch
    import zoo

    import sparsec

    module, example = zoo.torch_model("torch_rescnn")
    manifest = sparsec.compile(module, tmp_path / "pkg", ratio=0.3, example_inputs=example)
    assert manifest["source"]["model"] == "<TorchResCNN>"
    assert manifest["compile"]["kernels"]["conv2d_nchw_packed"] >= 3
    assert sparsec.validate(tmp_path / "pkg").ok
    # the pruned library computes the pruned model, which is close to the module at ratio 0
    manifest0 = sparsec.compile(module, tmp_path / "dense", example_inputs=example)
    out = sparsec.run(tmp_path / "dense", {manifest0["inputs"][0]["name"]: example[0].numpy()})
    with torch.no_grad():
        want = module(*example).numpy()
    np.testing.assert_allclose(next(iter(out.values())), want, rtol=1e-4, atol=1e-4)


def test_dynamic_model_compiles_with_input_shapes(tmp_path):
    import zoo

    m = zoo.gemm_mlp()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "dyn.onnx"
    onnx.save(m, str(path))
    proc = sparsec("-q", "compile", path, "-o", tmp_path / "pkg", "--ratio", "0.5",
                   "--input-shapes", "x:3x16")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [3, 16] and manifest["outputs"][0]["shape"] == [3, 5]
    assert sparsec("validate", tmp_path / "pkg").returncode == 0


def test_structure_passes_compile_and_validate(zoo_files, tmp_path):
    """Attention removal + FFN fusion + channel pruning + reordering, compiled: the fused FFN's
    wide GEMMs get the packed kernel and the library matches ONNX Runtime."""
    import sparsec

    manifest = sparsec.compile(zoo_files("hf_bert"), tmp_path / "pkg", ratio=0.25,
                               remove_attention=1, fuse_ffn=2, reorder=True)
    names = [p["name"] for p in manifest["prune"]["passes"]]
    assert names == ["remove-attention", "fuse-ffn", "channel-prune", "reorder-channels"]
    assert manifest["compile"]["kernels"].get("dense_packed", 0) >= 2
    assert sparsec.validate(tmp_path / "pkg").ok


def test_profile_names_the_kernels_that_take_the_time(packages, tmp_path):
    """`sparsec profile` (and `compile --profile` into the manifest): every kernel kind with
    its measured share, sparsec's strategies told apart from the generic schedule."""
    proc = sparsec("profile", packages["mlp"], "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    shares = {r["kernel"]: r for r in report["kernels"]}
    assert shares["dense_packed"]["kind"] == "sparsec" and shares["dense_packed"]["calls"] >= 2
    assert abs(sum(r["share"] for r in report["kernels"]) - 1.0) < 1e-3
    assert report["whole_ms"] > 0 and 0.0 <= report["generic_share"] < 1.0
    proc = sparsec("compile", MODELS["cnn"], "--target", "host", "-o", tmp_path / "p",
                   "--profile")
    assert proc.returncode == 0 and "profile: " in proc.stderr + proc.stdout, proc.stderr
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    kinds = {r["kernel"]: r["kind"] for r in m["profile"]["kernels"]}
    assert kinds["conv2d_nchw_packed"] == "sparsec"
    assert "generic schedule" in sparsec("inspect", tmp_path / "p").stdout
    proc = sparsec("compile", MODELS["cnn"], "--target", "aarch64", "-o", tmp_path / "q",
                   "--profile")
    assert_clean_error(proc, 6, "--profile")
