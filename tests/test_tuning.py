"""Tuning: kernel variants timed on this machine, the fastest recorded per (target, kernel)
and used by compile; numerics unchanged (real TVM and ONNX Runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from onnx import helper
from test_targets import assert_matches_ort, compile_and_run, make_model

from sparsec.targets import resolve_target, tuning
from sparsec.targets.host import compile_onnx


def small_net():
    """pointwise conv + ReLU6, depthwise conv, pointwise conv, global pool, linear (12x12
    maps: the depthwise -> pointwise pair stays apart, ``dw_pointwise.MIN_BAND_PIXELS``)."""
    rng = np.random.default_rng(0)
    n = helper.make_node
    inits = {"w1": rng.standard_normal((24, 8, 1, 1)) / 3, "wd": rng.standard_normal((24, 1, 3, 3)),
             "w2": rng.standard_normal((16, 24, 1, 1)) / 5, "fc": rng.standard_normal((16, 10)),
             "lo": np.array(0.0), "hi": np.array(6.0)}
    nodes = [n("Conv", ["x", "w1"], ["c1"]), n("Clip", ["c1", "lo", "hi"], ["r1"]),
             n("Conv", ["r1", "wd"], ["d"], group=24, pads=[1] * 4),
             n("Conv", ["d", "w2"], ["c2"]), n("GlobalAveragePool", ["c2"], ["g"]),
             n("Flatten", ["g"], ["f"]), n("MatMul", ["f", "fc"], ["y"])]
    return make_model(nodes, [("x", [2, 8, 12, 12])], [("y", [2, 10])], inits)


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("SPARSEC_TUNING_CACHE", str(path))
    return path


def test_tune_records_the_fastest_variant_and_compile_uses_it(cache_file, tmp_path):
    host = resolve_target("host")
    model = small_net()
    logs: list[str] = []
    records = tuning.tune(model, host, budget_s=120, log=logs.append, check=False)
    kernels = [r for r in records if r["strategy"] != "choice"]
    choices = [r for r in records if r["strategy"] == "choice"]
    strategies = sorted(r["strategy"] for r in kernels)
    assert strategies == ["conv1x1_nchw", "conv1x1_nchw", "dense_packed", "depthwise_nchw"]
    for r in kernels:   # the recorded knobs are the fastest of the variants timed
        assert r["ms"][json.dumps(r["knobs"], sort_keys=True)] == min(r["ms"].values())
        assert len(r["ms"]) >= 2 and r["default_ms"] is not None
    # each 1x1 conv can also run on the direct conv kernel: both timed, the faster kept
    assert len(choices) == 2
    for c in choices:
        assert set(c["ms"]) == {"conv1x1_nchw", "conv2d_nchw_packed"}
        assert c["choice"] == min(c["ms"], key=c["ms"].__getitem__)
    data = json.loads(cache_file.read_text())
    [entries] = data.values()
    assert len(entries) == 6 and any("tuning 4 kernels" in line for line in logs)
    assert any("tuned 4 kernels and measured 2 strategy choices" in line for line in logs)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    convs = [d for d in facts["decisions"] if d["shape"].get("weight", [0, 0, 0])[2:] == [1, 1]]
    assert sorted(d["chosen"] for d in convs) == sorted(c["choice"] for c in choices)
    assert all(d["chosen_by"] == "measurement" for d in convs)
    for d in facts["decisions"]:   # every knob-tuned kernel that was chosen is built tuned
        if d["chosen"] in ("conv1x1_nchw", "dense_packed", "depthwise_nchw"):
            assert "tuned" in d, d
    assert_matches_ort(model, feeds, outs)
    # a second run finds everything cached and times nothing
    assert tuning.tune(model, host, budget_s=120, log=logs.append) == []


def test_compile_follows_the_cache_and_its_target_key(cache_file, tmp_path):
    """Knobs written into the cache (here deliberately not the defaults) are what compile
    builds, for that target only; the numerics do not depend on them."""
    host = resolve_target("host")
    model = small_net()
    cache = tuning.Cache()
    # 12 x 8 on 16 output channels pads to 24: slower by the cost rule, but the strategy
    # choice must not move with the knobs (else the tuned kernel would not be used at all)
    forced = {"conv1x1_nchw": {"tile": [12, 8]}, "depthwise_nchw": {"max_acc": 4},
              "dense_packed": {"rows": 1}}
    for strategy, shape in tuning.kernels_of(model, host):
        cache.put(tuning.target_key(dict(host.tvm_target)), strategy, shape,
                  {"knobs": forced[strategy], "ms": {}})
    cache.save()
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    got = {(d["chosen"], json.dumps(d["tuned"])) for d in facts["decisions"] if "tuned" in d}
    assert got == {(s, json.dumps(k)) for s, k in forced.items()}
    assert [d["tile"] for d in facts["decisions"] if d["chosen"] == "conv1x1_nchw"] == ["12x8"] * 2
    assert_matches_ort(model, feeds, outs)
    # another target (portable AVX2 rather than this CPU) does not read host's records
    other = compile_onnx(model, resolve_target("x86-avx2"), tmp_path / "avx2.so",
                         log=lambda s: None)
    assert not any("tuned" in d for d in other["decisions"])


def test_tune_cli(cache_file, tmp_path):
    import onnx

    path = tmp_path / "net.onnx"
    onnx.save(small_net(), path)
    env = {**os.environ, "SPARSEC_TUNING_CACHE": str(cache_file)}

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "sparsec", *argv], capture_output=True,
                              text=True, env=env)

    ok = cli("tune", str(path), "--budget", "120", "--keep-all")
    assert ok.returncode == 0, ok.stderr
    assert "tuned 4 kernels" in ok.stdout and cache_file.is_file(), ok.stdout
    pkg = cli("compile", str(path), "-o", str(tmp_path / "pkg"), "--keep-onnx")
    assert pkg.returncode == 0, pkg.stderr
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    decisions = manifest["compile"]["decisions"]
    assert sum(d.get("chosen_by") == "measurement" for d in decisions) == 2
    assert all("tuned" in d for d in decisions
               if d["chosen"] in ("conv1x1_nchw", "dense_packed", "depthwise_nchw"))
    again = cli("tune", str(tmp_path / "pkg"), "--budget", "5")   # a package: its model
    assert again.returncode == 0, again.stderr
    assert "tuned 0 kernels" in again.stdout and "measured 0 strategy" in again.stdout
    cross = cli("tune", str(path), "--target", "aarch64")
    assert cross.returncode == 6 and "not this machine" in cross.stderr
    assert "Traceback" not in cross.stderr
    zero = cli("tune", str(path), "--budget", "0")
    assert zero.returncode == 6 and "budget" in zero.stderr
    cross_compile = cli("compile", str(path), "-o", str(tmp_path / "arm"), "--target",
                        "aarch64", "--tune", "5")
    assert cross_compile.returncode == 6 and "--tune" in cross_compile.stderr
    assert not (tmp_path / "arm").exists()
    env["SPARSEC_TUNING_CACHE"] = "/proc/sparsec-no-such-dir/tuning.json"
    unwritable = cli("tune", str(path), "--budget", "120")
    assert unwritable.returncode == 9 and "tuning cache" in unwritable.stderr
    assert "Traceback" not in unwritable.stderr


def test_measured_choice_between_dense_and_block_sparse(cache_file, tmp_path):
    """A 16x1 block-sparse linear layer can run dense or BSR: tune times both (with real,
    distinct row indices) and compile follows the measurement, whichever it is."""
    import sparsec
    from sparsec.ir.onnx_io import to_onnx

    rng = np.random.default_rng(2)
    n = helper.make_node
    model = make_model([n("MatMul", ["x", "w"], ["y"])], [("x", [1, 256])], [("y", [1, 512])],
                       {"w": rng.standard_normal((256, 512)) / 16})
    model = to_onnx(sparsec.prune(model, sparsity=0.6, sparsity_pattern="16x1").graph)
    host = resolve_target("host")
    records = tuning.tune(model, host, budget_s=120, log=lambda s: None, check=False)
    [choice] = [r for r in records if r["strategy"] == "choice"]
    assert set(choice["ms"]) == {"dense_packed", "bsr_dense"}
    assert choice["choice"] == min(choice["ms"], key=choice["ms"].__getitem__)
    facts, feeds, outs = compile_and_run(model, host, tmp_path)
    [d] = facts["decisions"]
    assert d["chosen"] == choice["choice"] and d["chosen_by"] == "measurement"
    assert facts["kernels"] == {choice["choice"]: 1}
    assert_matches_ort(model, feeds, outs)


@pytest.mark.parametrize("faster", [True, False])
def test_records_are_kept_only_if_the_whole_model_gets_faster(cache_file, monkeypatch, faster):
    """After timing kernels alone, tune times the whole model with and without the session's
    records (here the verdict is forced, to test both paths deterministically): kept, compile
    builds the tuned kernels; not faster, they stay in the cache marked rejected, compile
    ignores them and the next tune does not time them again."""
    host = resolve_target("host")
    model = small_net()
    seen = {}

    def verdict(fns, **_kw):
        seen.update({k: fn() for k, fn in fns.items()})   # both libraries really run
        return {"untuned": 1.0, "tuned": 0.5 if faster else 0.99}

    monkeypatch.setattr(tuning, "interleaved_ms", verdict)
    logs: list[str] = []
    records = tuning.tune(model, host, budget_s=120, log=logs.append)
    [whole] = [r for r in records if r["strategy"] == "whole_model"]
    assert whole["kept"] is faster and set(seen) == {"untuned", "tuned"}
    for a, b in zip(seen["untuned"], seen["tuned"]):   # same model, other knobs: same numbers
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert any(("kept" if faster else "recorded as rejected") in line for line in logs)
    # the session's records are what compile finds (kept) or not (rejected); which kernels
    # the model then uses follows the measured strategy choices, which are timings
    with tuning.using(tuning.Cache(), dict(host.tvm_target)):
        knobs = [tuning.knobs_for(r["strategy"], r["shape"]) for r in records if "knobs" in r]
    assert knobs and all((k is not None) is faster for k in knobs)
    facts = compile_onnx(model, host, cache_file.parent / "m.so", log=lambda s: None)
    assert any("tuned" in d for d in facts["decisions"]) is faster
    assert any(d.get("chosen_by") == "measurement" for d in facts["decisions"]) is faster
    assert tuning.tune(model, host, budget_s=120, log=lambda s: None) == []


def test_whole_model_check_really_times(cache_file):
    """The check with real timing: a verdict either way, consistent with the cache."""
    host = resolve_target("host")
    records = tuning.tune(small_net(), host, budget_s=120, log=lambda s: None)
    [whole] = [r for r in records if r["strategy"] == "whole_model"]
    assert whole["ms"]["untuned"] > 0 and whole["ms"]["tuned"] > 0
    assert whole["kept"] == (whole["ms"]["tuned"] <= whole["ms"]["untuned"]
                             * (1 - tuning.KEEP_MARGIN))
    entries = json.loads(cache_file.read_text())
    rejected = [e for t in entries.values() for e in t.values() if "rejected" in e]
    assert bool(rejected) is not whole["kept"]


def test_fused_depthwise_pointwise_is_tunable(cache_file):
    """``tune`` lists the fused kernel (dense and sparse projection) and every row-tile knob
    it times builds a kernel that computes the same numbers."""
    from test_targets import dw_pointwise_model, random_feeds

    from sparsec.targets.host import load_library

    host = resolve_target("host")
    for sparse in (0.0, 0.75):
        model = dw_pointwise_model(n=1, c=32, h=28, oc=16, sparse=sparse, residual=True)
        [(strategy, shape)] = tuning.kernels_of(model, host)
        assert strategy == "dw_conv1x1_nchw" and ("kept" in shape) is bool(sparse)
        variants = tuning._variants(strategy, shape)
        assert [v["rows"] for v in variants] == [1, 2, 4, 7]
        assert tuning._default_knobs(strategy, shape) in variants
        feeds = random_feeds(model)
        outs = []
        for knobs in (variants[0], variants[-1]):   # one row per task, and seven
            cache = tuning.Cache()
            cache.put(tuning.target_key(host.tvm_target), strategy, shape,
                      {"knobs": knobs, "ms": {}})
            lib = cache_file.parent / f"m{sparse}_{knobs['rows']}.so"   # dlopen caches paths
            facts = compile_onnx(model, host, lib, log=lambda s: None, tuned=cache)
            assert facts["decisions"][1]["tuned"] == knobs
            outs.append(load_library(lib, facts["inputs"]).run(feeds))
        assert_matches_ort(model, feeds, outs[0])
        np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)


def test_fused_pointwise_depthwise_is_tunable(cache_file):
    """``tune`` lists the expansion+depthwise kernel; its band-height and tile-width knobs
    build kernels that compute the same numbers (one row per band: every band expands its
    halo; a 4-channel tile where the default is 8)."""
    from test_targets import pointwise_dw_model, random_feeds

    from sparsec.targets.host import load_library

    host = resolve_target("host")
    model = pointwise_dw_model(n=1, k=8, c=24, h=64, stride=2, tf_pad=True)
    [(strategy, shape)] = tuning.kernels_of(model, host)
    assert strategy == "conv1x1_dw_nchw"
    variants = tuning._variants(strategy, shape)
    assert [v["rows"] for v in variants if "oct" not in v] == [1, 2, 4, 8, 16]
    fplan = tuning._expansion_kernel_plan(shape)[1]
    assert fplan.oct == 4                        # 8 input channels: pointwise_dw.SHORT_K
    assert [(v["rows"], v["oct"]) for v in variants if "oct" in v] == [
        (fplan.rows, 12), (fplan.rows, 8), (fplan.rows, 6)]
    # bands a multiple of the cores, the tallest whose expanded band of one channel fits
    # PLANE_BYTES: 32 output rows in 2 bands of 16 on a 2-core machine
    from sparsec.targets.kernels import pointwise_dw

    default = tuning._default_knobs(strategy, shape)
    s = tuning._expansion_kernel_plan(shape)[0]
    assert default in variants and (32 // default["rows"]) % host.tvm_target["num-cores"] == 0
    assert pointwise_dw.band_rows(s, default["rows"]) * 64 * 4 <= pointwise_dw.PLANE_BYTES
    taller = [v["rows"] for v in variants if v["rows"] > default["rows"]
              and (32 // v["rows"]) % host.tvm_target["num-cores"] == 0]
    assert all(pointwise_dw.band_rows(s, r) * 64 * 4 > pointwise_dw.PLANE_BYTES for r in taller)
    feeds = random_feeds(model)
    for knobs in (variants[0], variants[-1]):
        cache = tuning.Cache()
        cache.put(tuning.target_key(host.tvm_target), strategy, shape, {"knobs": knobs, "ms": {}})
        lib = cache_file.parent / f"pdw_{knobs['rows']}_{knobs.get('oct')}.so"
        facts = compile_onnx(model, host, lib, log=lambda s: None, tuned=cache)
        assert facts["decisions"][1]["tuned"] == knobs
        assert facts["decisions"][1]["tile"].startswith(
            f"{knobs['rows']} rows, {knobs.get('oct', fplan.oct)}x"), facts["decisions"][1]
        assert_matches_ort(model, feeds, load_library(lib, facts["inputs"]).run(feeds))


def test_whole_block_kernel_is_tunable(cache_file):
    """``tune`` lists the whole inverted-residual block kernel with its band heights (bands a
    multiple of the target's cores; one band a core by default); the tallest and the
    shortest band build kernels that compute the same numbers."""
    from test_targets import block_model, random_feeds

    from sparsec.targets.host import load_library

    host = resolve_target("host")
    cores = host.tvm_target["num-cores"]
    model = block_model(n=1, k=16, c=48, oc=16, h=28)
    [(strategy, shape)] = tuning.kernels_of(model, host)
    assert strategy == "conv1x1_dw_conv1x1_nchw"
    variants = tuning._variants(strategy, shape)
    assert variants and all((28 // v["rows"]) % cores == 0 for v in variants)
    assert tuning._default_knobs(strategy, shape) == {"rows": 28 // cores}
    feeds = random_feeds(model)
    for knobs in (variants[0], variants[-1]):
        cache = tuning.Cache()
        cache.put(tuning.target_key(host.tvm_target), strategy, shape, {"knobs": knobs, "ms": {}})
        lib = cache_file.parent / f"block_{knobs['rows']}.so"
        facts = compile_onnx(model, host, lib, log=lambda s: None, tuned=cache)
        assert facts["decisions"][2]["tuned"] == knobs
        assert facts["decisions"][2]["tile"].startswith(f"{knobs['rows']} rows")
        assert_matches_ort(model, feeds, load_library(lib, facts["inputs"]).run(feeds))


def test_a_width_vectorized_conv_can_be_tuned_to_the_channel_blocked_kernel(cache_file):
    """A conv the heuristics give the width-vectorized kernel (a stem: 3 input channels) has
    the channel-blocked kernel as its other variant; either record compiles (the weight is
    packed for the kernel it names), says which kernel it used, and matches ONNX Runtime."""
    from test_targets import random_feeds

    from sparsec.targets.host import load_library

    host = resolve_target("host")
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[7, 7],
                                         strides=[2, 2], pads=[3] * 4)],
                       [("x", [1, 3, 64, 64])], [("y", [1, 24, 32, 32])],
                       {"w": rng.standard_normal((24, 3, 7, 7)) / 10})
    [(strategy, shape)] = tuning.kernels_of(model, host)
    assert strategy == "conv2d_nchw_packed" and shape["variant"] == "width_vectorized"
    variants = tuning._variants(strategy, shape)
    assert variants == [{"kernel": "width_vectorized"}, {"kernel": "oc_blocked"}]
    assert tuning._default_knobs(strategy, shape) == variants[0]
    feeds = random_feeds(model)
    outs = []
    for knobs in variants:
        cache = tuning.Cache()
        cache.put(tuning.target_key(host.tvm_target), strategy, shape, {"knobs": knobs, "ms": {}})
        lib = cache_file.parent / f"stem_{knobs['kernel']}.so"
        facts = compile_onnx(model, host, lib, log=lambda s: None, tuned=cache)
        [d] = facts["decisions"]
        assert d["tuned"] == knobs and d["shape"]["variant"] == knobs["kernel"]
        outs.append(load_library(lib, facts["inputs"]).run(feeds))
        assert_matches_ort(model, feeds, outs[-1])
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
