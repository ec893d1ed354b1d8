"""Least-squares reconstruction: exact where the algebra says it must be, always lowering each
refit layer's error, and recovering the accuracy of pruned trained models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import zoo
from conftest import EXAMPLES
from test_quality import accuracy

import sparsec
from sparsec import reference
from sparsec.frontends.onnx import load_onnx
from sparsec.passes.channel_prune import ChannelPrune
from sparsec.passes.manager import PassContext, PassManager


def batches(graph, n=8):
    return [reference.random_inputs(graph, seed=s) for s in range(n)]


def low_rank_matmul_chain() -> onnx.ModelProto:
    """x[16, 6] @ W1[6, 24] @ W2[24, 5] (+ b2): the hidden layer has rank <= 6, so any 12 of its
    24 channels span it and a refit of W2 reproduces the output exactly."""
    r = np.random.default_rng(0)
    nodes = [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]),
             onnx.helper.make_node("MatMul", ["h", "w2"], ["m"]),
             onnx.helper.make_node("Add", ["m", "b2"], ["y"])]
    inits = {"w1": r.standard_normal((6, 24)), "w2": r.standard_normal((24, 5)),
             "b2": r.standard_normal(5)}
    return zoo.make_model(nodes, [("x", [16, 6])], ["y"], inits)


def low_rank_conv_chain(pads, strides, dilations) -> onnx.ModelProto:
    """1x1 conv 3->16 then 3x3 conv 16->4 (no bias): hidden rank <= 3 per pixel."""
    r = np.random.default_rng(1)
    nodes = [onnx.helper.make_node("Conv", ["x", "w1"], ["h"]),
             onnx.helper.make_node("Conv", ["h", "w2"], ["y"], pads=pads, strides=strides,
                                   dilations=dilations)]
    inits = {"w1": r.standard_normal((16, 3, 1, 1)), "w2": r.standard_normal((4, 16, 3, 3))}
    return zoo.make_model(nodes, [("x", [1, 3, 9, 9])], ["y"], inits)


@pytest.mark.parametrize("model", [
    low_rank_matmul_chain(),
    low_rank_conv_chain([1, 1, 1, 1], [1, 1], [1, 1]),
    low_rank_conv_chain([0, 1, 2, 1], [2, 1], [1, 1]),
    low_rank_conv_chain([2, 2, 2, 2], [1, 2], [2, 2]),
], ids=["matmul", "conv_pad", "conv_stride_asym_pad", "conv_dilated"])
def test_refit_is_exact_when_kept_channels_span_the_pruned_ones(model):
    g = load_onnx(model)
    calib = batches(g)
    exact = ChannelPrune(0.5, reconstruct=True, ridge=1e-12)   # no ridge bias: pure algebra
    pruned, [res] = PassManager([exact], calib).run(g)
    [refit] = res.details["reconstructed"]
    assert refit["rel_rmse_before"] > 0.05 and refit["rel_rmse_after"] < 1e-6
    assert res.fidelity.max_rel_err < 1e-4 and res.fidelity.cosine > 0.999999
    without, [raw] = PassManager([ChannelPrune(0.5)], calib).run(g)
    assert raw.fidelity.max_rel_err > 0.05       # pruning alone really did lose information


@pytest.mark.parametrize("name", ["gemm_mlp", "matmul_add_mlp", "torch_rescnn", "hf_resnet",
                                  "hf_bert"])
def test_refit_lowers_every_layer_error(zoo_models, name):
    g = load_onnx(zoo_models(name))
    calib = batches(g)
    pruned, [res] = PassManager([ChannelPrune(0.5, reconstruct=True)], calib).run(g)
    refits = res.details["reconstructed"]
    assert refits
    for r in refits:
        assert r["rel_rmse_after"] <= r["rel_rmse_before"] + 1e-9, r
    _, [raw] = PassManager([ChannelPrune(0.5)], calib).run(g)
    assert res.fidelity.cosine >= raw.fidelity.cosine - 1e-6
    assert "held-out" in res.as_dict()["fidelity"]["measured_on"]
    # the same structure was removed; only weight values (and added biases) differ
    assert {k: v.shape for k, v in pruned.initializers.items() if "__bias" not in k} == \
        {k: v.shape for k, v in _.initializers.items()}


def test_no_pruning_means_nothing_to_refit(zoo_models):
    g = load_onnx(zoo_models("gemm_mlp"))
    pruned, details = ChannelPrune(0.01, reconstruct=True).run(g, PassContext.split(batches(g)))
    assert details["channels_removed"] == 0 and details["reconstructed"] == []


def test_reconstruction_needs_calibration(zoo_models):
    g = load_onnx(zoo_models("gemm_mlp"))
    with pytest.raises(ValueError, match="calibration"):
        ChannelPrune(0.5, reconstruct=True).run(g)


def test_calibration_split_holds_out_every_fourth_batch():
    b = [{"x": np.full(1, i)} for i in range(10)]
    ctx = PassContext.split(b)
    assert [int(x["x"][0]) for x in ctx.holdout] == [3, 7]
    assert len(ctx.fit) == 8 and ctx.held_out
    few = PassContext.split(b[:3])             # too few batches: one sample held out
    assert few.held_out
    assert [int(x["x"][0]) for x in few.fit] == [0, 1]
    assert [int(x["x"][0]) for x in few.holdout] == [2]
    one = PassContext.split(b[:1])              # one sample: nothing to hold out
    assert not one.held_out and one.fit == one.holdout
    assert one.describe().startswith("not measured")


def test_small_calibration_sets_hold_out_samples_not_batches():
    """Two batches of 4 samples: every 4th sample is held out, both sides are batched to 4 by
    repeating their own samples, and no held-out sample is ever fitted to."""
    b = [{"ids": np.arange(4 * k, 4 * k + 4).reshape(4, 1),
          "mask": np.ones((4, 1), np.int64)} for k in range(2)]
    ctx = PassContext.split(b)
    assert ctx.held_out
    held = {int(v) for x in ctx.holdout for v in x["ids"].ravel()}
    fitted = {int(v) for x in ctx.fit for v in x["ids"].ravel()}
    assert held == {3, 7} and fitted == {0, 1, 2, 4, 5, 6}
    assert all(x["ids"].shape == (4, 1) and x["mask"].shape == (4, 1)
               for x in ctx.fit + ctx.holdout)
    # inputs without a common leading axis cannot be split by sample
    odd = [{"a": np.zeros((2, 3)), "b": np.zeros((3, 2))}]
    assert not PassContext.split(odd).held_out


@pytest.mark.parametrize("model, ratio, at_least", [
    ("digits_cnn", 0.3, 0.975), ("digits_cnn", 0.5, 0.95), ("digits_mlp", 0.5, 0.975)])
def test_reconstruction_recovers_accuracy(model, ratio, at_least):
    """The goal: at most 2 points lost at 30 % pruning (CNN from 99.7 %), without retraining.
    Calibration images come from the training split; accuracy is on the held-out test split."""
    kw = dict(ratio=ratio, calibration=EXAMPLES / "digits_calib.npz")
    plain = sparsec.prune(EXAMPLES / f"{model}.onnx", **kw)
    rebuilt = sparsec.prune(EXAMPLES / f"{model}.onnx", reconstruct=True, **kw)
    assert accuracy(rebuilt.graph) >= at_least
    assert accuracy(rebuilt.graph) > accuracy(plain.graph)


@pytest.mark.parametrize("samples", [2, 3, 8, 64])
def test_reconstruction_never_lowers_held_out_fidelity(samples):
    """At every calibration size the refit is kept only if it is at least as good on held-out
    samples as the same pruning without it; both runs are scored on the same held-out data."""
    data = dict(np.load(EXAMPLES / "digits_calib.npz"))
    calib = [{k: v[i] for k, v in data.items()} for i in range(samples)]
    kw = dict(ratio=0.5, calibration=calib)
    plain = sparsec.prune(EXAMPLES / "digits_cnn.onnx", **kw)
    rebuilt = sparsec.prune(EXAMPLES / "digits_cnn.onnx", reconstruct=True, **kw)
    assert plain.held_out and rebuilt.held_out
    guard = rebuilt.passes[-1].details["reconstruction"]
    assert guard["verified"]
    assert rebuilt.fidelity.cosine >= plain.fidelity.cosine - 1e-9
    assert guard["kept"] == (guard["holdout_cosine_with"] >= guard["holdout_cosine_without"])


def test_one_calibration_sample_reports_no_fidelity():
    data = dict(np.load(EXAMPLES / "digits_calib.npz"))
    logs = []
    result = sparsec.prune(EXAMPLES / "digits_cnn.onnx", ratio=0.3, reconstruct=True,
                           calibration=[{k: v[0] for k, v in data.items()}], log=logs.append)
    assert not result.held_out and not result.report()["fidelity"]["held_out"]
    assert any("not measured" in line for line in logs)
    assert result.passes[-1].details["reconstruction"] == {"kept": True, "verified": False}


def test_a_refit_that_hurts_held_out_data_is_dropped(zoo_models):
    from sparsec import reference
    from sparsec.passes.manager import PassContext
    from sparsec.passes.reconstruct import keep_if_better

    g = load_onnx(zoo_models("gemm_mlp"))
    worse = g.copy()
    w = next(n.inputs[1] for n in worse.nodes if n.op_type == "Gemm")
    worse.set_initializer(w, -worse.initializers[w])        # a "refit" that went wrong
    holdout = [reference.random_inputs(g, seed=s) for s in range(2)]
    ctx = PassContext(holdout[:1], holdout)
    kept, info = keep_if_better(g, g, worse, ctx)
    assert kept is g and not info["kept"] and info["holdout_cosine_without"] == 1.0
    kept, info = keep_if_better(g, worse, g, ctx)
    assert kept is g and info["kept"]


def relu_matmul_chain(rows: int = 512, width: int = 16, hidden: int = 64) -> onnx.ModelProto:
    """x[rows, width] @ W1 -> Relu -> @ W2[hidden, 5] + b2: the kept hidden channels do not
    span the pruned ones, so the refit is a genuine least-squares fit."""
    r = np.random.default_rng(3)
    nodes = [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]),
             onnx.helper.make_node("Relu", ["h"], ["hr"]),
             onnx.helper.make_node("MatMul", ["hr", "w2"], ["m"]),
             onnx.helper.make_node("Add", ["m", "b2"], ["y"])]
    inits = {"w1": r.standard_normal((width, hidden)), "w2": r.standard_normal((hidden, 5)),
             "b2": r.standard_normal(5)}
    return zoo.make_model(nodes, [("x", [rows, width])], ["y"], inits)


def test_the_refit_is_the_least_squares_solution_over_all_batches():
    """Summing normal equations batch by batch gives what one lstsq over every calibration
    row (and an intercept) gives."""
    g = load_onnx(relu_matmul_chain(rows=64))
    ctx = PassContext(batches(g, 6), batches(g, 1))
    pruned, details = ChannelPrune(0.5, reconstruct=True, ridge=1e-12).run(g, ctx)
    w1, w1p = g.initializers["w1"], pruned.initializers["w1"]
    kept = [int(np.flatnonzero((w1 == w1p[:, [j]]).all(axis=0))[0]) for j in range(w1p.shape[1])]
    h = [np.maximum(b["x"].astype(np.float64) @ w1, 0) for b in ctx.fit]
    a = np.vstack([np.hstack([x[:, kept], np.ones((len(x), 1))]) for x in h])
    y = np.vstack([x @ g.initializers["w2"] + g.initializers["b2"] for x in h])
    theta = np.linalg.lstsq(a, y, rcond=None)[0]
    np.testing.assert_allclose(pruned.initializers["w2"], theta[:-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pruned.initializers["b2"], theta[-1], rtol=1e-4, atol=1e-4)


def test_refit_memory_does_not_grow_with_calibration_batches(monkeypatch):
    """With the walked tensors on disk (budget 0), the refit's peak allocation is the same for
    4 and 16 calibration batches: it holds normal equations, not every batch's rows (those
    would add 12 x 512 x (33 + 5) x 8 bytes = 1.9 MB here)."""
    import tracemalloc

    monkeypatch.setenv("SPARSEC_CALIBRATION_BYTES", "0")
    g = load_onnx(relu_matmul_chain())
    holdout = batches(g, 1)
    peaks = {}
    for n in (4, 16):
        calib = batches(g, n)
        ChannelPrune(0.5, reconstruct=True).run(g, PassContext(calib, holdout))   # warm up
        tracemalloc.start()
        ChannelPrune(0.5, reconstruct=True).run(g, PassContext(calib, holdout))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[16] < peaks[4] + 300_000, peaks


@pytest.mark.parametrize("samples, per_batch, val", [(6, 2, [3]), (9, 3, [3, 7]), (3, 1, [2]),
                                                     (3, 3, [2]), (1, 1, [])])
def test_design_validates_every_fourth_sample_else_the_last(samples, per_batch, val):
    """Built batch by batch, the validation half holds every 4th calibration sample (the last
    one with fewer than 4; none with one), whichever batch each sample came in."""
    from sparsec.ir.graph import Node
    from sparsec.passes.reconstruct import DesignBuilder

    build = DesignBuilder(Node("MatMul", ["x", "w"], ["y"]))
    for first in range(0, samples, per_batch):      # sample s: 2 rows of value s
        ids = np.arange(first, first + per_batch, dtype=np.float64)
        x = np.repeat(ids[:, None, None], 2, axis=1)              # [batch, 2 rows, 1]
        build.add(x, x, None)
    d = build.build()
    assert (d.val is None) == (not val)
    if val:
        assert d.val.rows == 2 * len(val) and d.val.sy[0] == 2 * sum(val)
    assert d.full.rows == 2 * samples and d.full.sy[0] == 2 * sum(range(samples))
