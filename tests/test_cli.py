"""The command line: every bad input gets one clear line, its own exit code, no traceback, no
half-written output, and the input file untouched. ``--help`` stays light."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import numpy_helper
import pytest
import zoo
from conftest import EXAMPLES

from sparsec import reference
from sparsec.errors import (BadOptionError, DynamicShapeError, InputNotFoundError,
                            InvalidModelError, OutputError, ToolchainError, UnknownTargetError,
                            UnsupportedOpError, ValidationError)
from sparsec.frontends.onnx import load_onnx


def sparsec(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsec", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_error(proc, code: int, *fragments: str):
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sparsec: error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    for f in fragments:
        assert f in lines[0], lines[0]


def test_exit_codes_are_distinct():
    from sparsec.errors import DeviceUnreachableError, RemoteError

    codes = [c.exit_code for c in (InputNotFoundError, InvalidModelError, UnsupportedOpError,
                                   BadOptionError, DynamicShapeError, UnknownTargetError,
                                   OutputError, ValidationError, ToolchainError,
                                   DeviceUnreachableError, RemoteError)]
    assert len(set(codes)) == len(codes) and 0 not in codes and 2 not in codes


def test_help_is_light():
    code = ("import sys, sparsec, sparsec.cli; sparsec.cli.build_parser().format_help(); "
            "heavy = {'torch', 'tvm', 'onnx', 'onnxruntime', 'numpy', 'networkx'} & "
            "set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    proc = sparsec("--help")
    assert proc.returncode == 0 and "compile" in proc.stdout and "validate" in proc.stdout


def test_missing_file(tmp_path):
    proc = sparsec("prune", tmp_path / "nope.onnx", "-o", tmp_path / "out.onnx", "--ratio", "0.3")
    assert_clean_error(proc, 3, "not found", "nope.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00garbage\xff" * 100)
    before = digest(bad)
    proc = sparsec("inspect", bad)
    assert_clean_error(proc, 4, "not a valid ONNX model")
    assert digest(bad) == before


def test_unsupported_ops_listed_at_once(tmp_path):
    nodes = [onnx.helper.make_node("NonMaxSuppression", ["x"], ["a"]),
             onnx.helper.make_node("Hypot", ["a"], ["b"], domain="com.example"),
             onnx.helper.make_node("Relu", ["b"], ["y"])]
    path = tmp_path / "unsupported.onnx"
    onnx.save(zoo.make_model(nodes, [("x", [2, 4])], ["y"], {}), str(path))
    before = digest(path)
    out = tmp_path / "pkg"
    proc = sparsec("compile", path, "-o", out, "--ratio", "0.3")
    assert_clean_error(proc, 5, "NonMaxSuppression", "com.example::Hypot")
    assert digest(path) == before
    assert not out.exists() and os.listdir(tmp_path) == ["unsupported.onnx"]


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "7"])
def test_ratio_outside_range(tmp_path, ratio):
    out = tmp_path / "out.onnx"
    proc = sparsec("prune", EXAMPLES / "digits_mlp.onnx", "-o", out, "--ratio", ratio)
    assert_clean_error(proc, 6, "ratio must be in [0, 1)")
    assert not out.exists()


def test_ratio_not_a_number_is_a_usage_error(tmp_path):
    proc = sparsec("prune", EXAMPLES / "digits_mlp.onnx", "-o", tmp_path / "o.onnx",
                   "--ratio", "half")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_dynamic_shape_needs_input_shapes(tmp_path):
    m = zoo.gemm_mlp()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "dyn.onnx"
    onnx.save(m, str(path))
    proc = sparsec("inspect", path)
    assert_clean_error(proc, 7, "dynamic input shape", "--input-shapes")
    proc = sparsec("inspect", path, "--input-shapes", "x:3x16", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["inputs"][0]["shape"] == [3, 16]


def test_unknown_target(tmp_path):
    out = tmp_path / "pkg"
    proc = sparsec("compile", EXAMPLES / "digits_mlp.onnx", "--target", "z80", "-o", out)
    assert_clean_error(proc, 8, "unknown target 'z80'", "host")
    assert not out.exists()


def test_unwritable_outputs(tmp_path):
    model = EXAMPLES / "digits_mlp.onnx"
    before = digest(model)
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory")
    proc = sparsec("prune", model, "-o", a_file / "sub" / "out.onnx", "--ratio", "0.3")
    assert_clean_error(proc, 9, "is not a directory")
    proc = sparsec("prune", model, "-o", tmp_path, "--ratio", "0.3")
    assert_clean_error(proc, 9, "is a directory")
    proc = sparsec("prune", model, "-o", model, "--ratio", "0.3")
    assert_clean_error(proc, 9, "overwrite the input")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    proc = sparsec("compile", model, "-o", occupied)
    assert_clean_error(proc, 9, "not a sparsec package")
    assert os.listdir(occupied) == ["notes.txt"]
    assert digest(model) == before
    assert sorted(os.listdir(tmp_path)) == ["file.txt", "occupied"]


def test_missing_output_directories_are_created(tmp_path):
    out = tmp_path / "build" / "deep" / "small.onnx"
    proc = sparsec("-q", "prune", EXAMPLES / "digits_mlp.onnx", "-o", out, "--ratio", "0.3")
    assert proc.returncode == 0, proc.stderr
    assert onnx.load(str(out)).graph.node


def test_prune_writes_model_and_table(tmp_path):
    out = tmp_path / "small.onnx"
    model = EXAMPLES / "digits_mlp.onnx"
    before = digest(model)
    proc = sparsec("prune", model, "-o", out, "--ratio", "0.5", "--calib",
                   EXAMPLES / "digits_calib.npz")
    assert proc.returncode == 0, proc.stderr
    assert "params" in proc.stdout and "MACs" in proc.stdout and "cosine" in proc.stdout
    assert "pass channel-prune" in proc.stderr           # progress, silenced by -q
    assert digest(model) == before
    pruned = onnx.load(str(out))
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert shapes["net.1.weight"] == [128, 64] and shapes["net.3.weight"] == [64, 128]
    assert sorted(os.listdir(tmp_path)) == ["small.onnx"]   # no temp files left behind
    quiet = sparsec("-q", "prune", model, "-o", out, "--ratio", "0.5")
    assert quiet.returncode == 0 and quiet.stderr == ""
    after = sparsec("prune", model, "-o", out, "--ratio", "0.5", "-q")   # anywhere on the line
    assert after.returncode == 0 and after.stderr == "" and after.stdout == quiet.stdout


def test_inspect_reports_groups_and_reasons():
    proc = sparsec("inspect", EXAMPLES / "digits_cnn.onnx", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["params"] > 50_000 and info["macs"] > 1_000_000
    assert info["ops"]["Conv"] == 6
    assert info["prunable_groups"] >= 3
    frozen = [g for g in info["groups"] if not g["prunable"]]
    assert frozen and all(g["frozen"] for g in frozen)
    text = sparsec("inspect", EXAMPLES / "digits_cnn.onnx")
    assert "channel groups" in text.stdout and "frozen: graph output" in text.stdout


def test_layer_flags(tmp_path):
    model, out = EXAMPLES / "digits_cnn.onnx", tmp_path / "o.onnx"
    proc = sparsec("-q", "prune", model, "-o", out, "--ratio", "0.5", "--ignore", "wide.*",
                   "--layer-ratio", "block1.*=0.25", "--round-to", "8")
    assert proc.returncode == 0, proc.stderr
    shapes = {t.name: list(t.dims) for t in onnx.load(str(out)).graph.initializer}
    assert shapes["wide.0.weight"][0] == 64 and shapes["stem.0.weight"][0] == 24
    assert_clean_error(sparsec("prune", model, "-o", out, "--ignore", "wdie.*"), 6,
                       "matches no prunable channel group", "wide.0.weight")
    bad = sparsec("prune", model, "-o", out, "--layer-ratio", "block1")
    assert bad.returncode == 2 and "PATTERN=RATIO" in bad.stderr


def test_transformer_flags(zoo_files, tmp_path):
    model, out = zoo_files("hf_bert"), tmp_path / "b.onnx"
    proc = sparsec("-q", "prune", model, "-o", out, "--ratio", "0.25", "--head-ratio", "0.5",
                   "--remove-layers", "1", "--sensitivity", "--criterion", "fluctuation")
    assert proc.returncode == 0, proc.stderr
    pruned = onnx.load(str(out))
    ops = [n.op_type for n in pruned.graph.node]
    assert ops.count("Softmax") == 1                          # one of two layers left
    feeds = reference.random_inputs(load_onnx(out))
    assert reference.run(pruned, feeds)[0].shape == (1, 8, 32)
    assert_clean_error(sparsec("prune", model, "-o", out, "--remove-layers", "2"), 6,
                       "2 removable residual layers")


def test_attention_removal_and_ffn_fusion_flags(zoo_files, tmp_path):
    model, out = zoo_files("hf_bert"), tmp_path / "f.onnx"
    proc = sparsec("prune", model, "-o", out, "--remove-attention", "1", "--fuse-ffn", "2")
    assert proc.returncode == 0, proc.stderr
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Softmax") == 1 and ops.count("LayerNormalization") == 5 - 2
    assert reference.run(onnx.load(str(out)), reference.random_inputs(load_onnx(out)))[0].shape \
        == (1, 8, 32)
    out.unlink()
    assert_clean_error(sparsec("prune", model, "-o", out, "--fuse-ffn", "2"), 6,
                       "no run of 2 consecutive FFN blocks")
    assert not out.exists()


def test_sparsity_flags(zoo_files, tmp_path):
    model, out = zoo_files("torch_rescnn"), tmp_path / "s.onnx"
    proc = sparsec("prune", model, "-o", out, "--sparsity", "0.5", "--sparsity-pattern", "4x4",
                   "--lamp", "--reorder")
    assert proc.returncode == 0, proc.stderr
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer]
    conv = [w for w in weights if w.ndim == 4]
    assert sum(int((w == 0).sum()) for w in conv) > 0.4 * sum(w.size for w in conv)
    # the report says what sparsity removed: params stay, nonzeros drop
    row = next(ln.split() for ln in proc.stdout.splitlines() if ln.startswith("nonzero"))
    assert int(row[2].replace(",", "")) < 0.65 * int(row[1].replace(",", ""))
    assert "nonzero" in proc.stderr                       # the pass's log line too
    assert_clean_error(sparsec("prune", model, "-o", out, "--sparsity-pattern", "3:2"), 6,
                       "unknown sparsity pattern")


def test_compile_report_shows_sparsity_and_progress_is_plain_off_a_terminal(tmp_path):
    """Weight sparsity leaves params and MACs (dense counts) as they were: the report also
    shows the zeros and the weights' bytes. stderr is a pipe here, so progress comes as plain
    lines (no bar: no carriage returns or terminal escapes); -q anywhere silences all of it."""
    out = tmp_path / "pkg"
    proc = sparsec("compile", EXAMPLES / "digits_mlp.onnx", "-o", out, "--sparsity", "0.5")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    after = manifest["prune"]["after"]
    assert after["zeros"] == after["params"] - after["nonzeros"] > 0.45 * after["params"]
    assert after["weight_bytes"] == 4 * after["params"]
    line = next(ln for ln in proc.stdout.splitlines() if "zeros" in ln)
    assert (f"zeros 0 (0.0%) -> {after['zeros']:,} ({100 * after['zeros'] / after['params']:.1f}%)"
            in line) and f"weights {after['weight_bytes']:,} -> {after['weight_bytes']:,} bytes" \
        in line
    assert "importing ONNX graph" in proc.stderr
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr
    quiet = sparsec("compile", EXAMPLES / "digits_mlp.onnx", "-o", tmp_path / "q",
                    "--sparsity", "0.5", "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert "zeros" in quiet.stdout                   # the report is output, not progress
