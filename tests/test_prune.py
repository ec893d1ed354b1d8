"""Pruning: ratio 0 is the identity, zero groups prune exactly, real pruning shrinks models
and stays runnable in ONNX Runtime, and the pass manager reports what each pass did."""

from __future__ import annotations

import numpy as np
import pytest
import zoo

import sparsec
from sparsec import reference
from sparsec.analysis.cost import cost
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.frontends.onnx import load_onnx
from sparsec.passes.dead_channels import RemoveDeadChannels
from sparsec.passes.channel_prune import ChannelPrune
from sparsec.passes.manager import PassManager
from sparsec.passes.surgery import apply_plan

PRUNABLE = list(zoo.ALL)


def outputs(graph, seed=0):
    return reference.run(graph, reference.random_inputs(graph, seed))


@pytest.mark.parametrize("name", zoo.ALL)
def test_ratio_zero_is_identity(zoo_models, name):
    g = load_onnx(zoo_models(name))
    result = sparsec.prune(g, ratio=0.0)
    assert result.graph.op_histogram() == g.op_histogram()
    assert result.graph.initializers.keys() == g.initializers.keys()
    for k, v in g.initializers.items():
        np.testing.assert_array_equal(result.graph.initializers[k], v)
    assert result.fidelity.max_abs_err == 0.0 and result.passes == []


def zero_channels(arr, member, channels, value=0.0):
    """Set a group member's slices of ``channels`` (each a block of elements) to ``value``."""
    elems = (member.start + np.asarray(channels)[:, None] * member.block
             + np.arange(member.block)).ravel()
    idx = [slice(None)] * arr.ndim
    idx[member.axis] = elems
    arr[tuple(idx)] = value


def zero_whole_groups(graph, ratio):
    """Zero every parameter slice of the first floor(size*ratio) channels of each prunable
    group (in place on a copy); returns the copy and the expected kept channels."""
    g = graph.copy()
    dg = DependencyGraph(g)
    expected = {}
    for grp in dg.groups:
        n = int(np.floor(grp.size * ratio))
        if not grp.prunable or n == 0:
            continue
        dead = np.arange(0, grp.size, 2)[:n]  # spread out, not only a prefix
        for m in grp.params:
            zero_channels(g.initializers[m.name], m, dead)
        expected[grp.id] = grp.size - n
    return g, expected


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("name", PRUNABLE)
def test_pruning_zero_groups_is_exact(zoo_models, name, ratio):
    g, expected = zero_whole_groups(load_onnx(zoo_models(name)), ratio)
    if not expected:
        assert ratio < 0.5, "model has prunable groups"
        pytest.skip("every group is too small to lose a channel at this ratio")
    pruned, _ = ChannelPrune(ratio).run(g)
    assert cost(pruned).params < cost(g).params
    for seed in range(2):
        for a, b in zip(outputs(g, seed), outputs(pruned, seed)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(a).max()))


@pytest.mark.parametrize("name", ["conv_bn_relu_conv", "gemm_mlp", "torch_mlp",
                                  "residual_convs", "torch_rescnn", "hf_resnet", "hf_bert"])
def test_remove_dead_channels_is_exact_and_removes_them(zoo_models, name):
    """Only the producer side is zero here: consumers still read the (zero) channel."""
    g = load_onnx(zoo_models(name)).copy()
    dg = DependencyGraph(g)
    killed = 0
    for grp in dg.groups:
        if not grp.prunable:
            continue
        for m in grp.params:
            if m in grp.consumers:
                continue
            # BatchNorm variance must stay positive; zero means/shifts/weights
            zero_channels(g.initializers[m.name], m, [1],
                          1.0 if m.name.endswith(("v", "running_var")) else 0.0)
        killed += 1
    pm = PassManager([RemoveDeadChannels()])  # raises if outputs move: the pass claims exact
    pruned, [res] = pm.run(g)
    assert res.exact and res.fidelity.max_rel_err <= 1e-4
    # (models whose path maps 0 to 0 op by op; an Erf-decomposed GELU adds 1.0 and is not)
    assert res.details["channels_removed"] >= 1
    assert cost(pruned).params < cost(g).params


@pytest.mark.parametrize("name", PRUNABLE)
def test_magnitude_prune_shrinks_and_runs(zoo_models, name):
    g = load_onnx(zoo_models(name))
    result = sparsec.prune(g, ratio=0.5)
    [res] = result.passes
    assert not res.exact and res.name == "channel-prune"
    assert result.after.params < result.before.params
    assert result.after.macs <= result.before.macs
    assert res.details["channels_removed"] > 0
    # outputs keep their shapes, the pruned graph runs in ONNX Runtime, fidelity is measured
    out = outputs(result.graph)
    assert [o.shape for o in out] == [o.shape for o in outputs(g)]
    assert np.isfinite(result.fidelity.cosine) and -1.0 <= result.fidelity.cosine <= 1.0
    for grp in DependencyGraph(g).groups:
        if grp.prunable:   # every weight member lost its share (whole-axis members shown)
            full = [m for m in grp.params if g.shape(m.name)[m.axis] == grp.size * m.block]
            assert {result.graph.initializers[m.name].shape[m.axis] // m.block
                    for m in full} <= {grp.size - grp.size // 2}


def test_magnitude_keeps_the_largest_channels():
    g = load_onnx(zoo.gemm_mlp()).copy()  # loaded weights are read-only; a copy is ours
    dg = DependencyGraph(g)
    grp = next(x for x in dg.groups if x.size == 32)
    w1 = g.initializers["w1"]
    w1 *= 1e-3
    w1[[3, 17, 30]] *= 1e6      # these three rows dominate the group's L2 norm
    pruned, details = ChannelPrune(0.9).run(g)
    assert pruned.initializers["w1"].shape == (4, 16)
    kept = [i for i in range(32) if any(np.allclose(pruned.initializers["w1"][j], w1[i])
                                        for j in range(4))]
    assert {3, 17, 30} <= set(kept)
    assert details["pruned_groups"] == 2 and details["channels_removed"] == 28 + 21
    assert grp.size == 32


def test_apply_plan_refuses_frozen_groups():
    g = load_onnx(zoo.grouped_and_depthwise())
    dg = DependencyGraph(g)
    frozen = next(x for x in dg.groups if x.frozen)
    with pytest.raises(ValueError, match="frozen"):
        apply_plan(g, dg, {frozen.id: np.array([0, 1])})


def test_prune_never_edits_its_input(zoo_models):
    g = load_onnx(zoo_models("residual_convs"))
    snapshot = {k: v.copy() for k, v in g.initializers.items()}
    sparsec.prune(g, ratio=0.5)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(g.initializers[k], v)


def test_pass_report_counts(zoo_models):
    g = load_onnx(zoo_models("torch_mlp"))
    result = sparsec.prune(g, ratio=0.5)
    rep = result.report()
    [p] = rep["passes"]
    assert p["before"]["params"] == cost(g).params
    assert p["after"]["params"] == result.after.params
    # fc1 48 -> 24, fc2 32 -> 16: params 20*48+48 + 48*32+32 + 32*6+6 -> 20*24+24+24*16+16+16*6+6
    assert p["after"]["params"] == 20 * 24 + 24 + 24 * 16 + 16 + 16 * 6 + 6
    assert p["after"]["macs"] == 3 * (20 * 24 + 24 * 16 + 16 * 6)


@pytest.mark.parametrize("size, ratio, round_to, kept", [
    (32, 0.3, 1, 23), (32, 0.3, 8, 24), (32, 0.3, 16, 32), (32, 0.5, 16, 16), (32, 0.9, 8, 8),
    (6, 0.5, 8, 3), (64, 0.0, 16, 64), (10, 0.95, 1, 1), (45, 0.5, 8, 24), (40, 0.1, 8, 40)])
def test_kept_count_rounding(size, ratio, round_to, kept):
    from sparsec.passes.channel_prune import kept_count

    assert kept_count(size, ratio, round_to) == kept


def test_layer_ratios_ignore_and_round_to(zoo_models):
    from conftest import EXAMPLES

    g = load_onnx(EXAMPLES / "digits_cnn.onnx")
    result = sparsec.prune(g, ratio=0.5, round_to=8, ignore=["wide.*"],
                           layer_ratios={"block1.conv1.*": 0.25, "block1.*": 0.75})
    w = result.graph.initializers
    assert w["wide.0.weight"].shape[0] == 64              # ignored: whole
    assert w["block1.conv1.weight"].shape[0] == 24        # first match: 32 * 0.75 kept = 24
    assert w["block2.conv1.weight"].shape[0] == 16        # global 0.5
    assert w["stem.0.weight"].shape[0] == 8               # trunk matches block1.* (conv2): 0.75
    [p] = result.report()["passes"]
    assert p["details"]["ignored_groups"] == 1 and p["details"]["round_to"] == 8


def test_layer_ratio_alone_prunes(zoo_models):
    g = load_onnx(zoo_models("gemm_mlp"))
    result = sparsec.prune(g, layer_ratios={"w1": 0.5})
    assert result.graph.initializers["w1"].shape == (16, 16)
    assert result.graph.initializers["w2"].shape == (16, 24)  # its consumer, not its group


@pytest.mark.parametrize("kwargs, message", [
    ({"ignore": ["nope.*"]}, "matches no prunable channel group"),
    ({"layer_ratios": {"w1": 1.0}}, "ratio must be in"),
    ({"round_to": 0}, "round_to must be a positive integer")])
def test_bad_layer_options(zoo_models, kwargs, message):
    from sparsec.errors import BadOptionError

    with pytest.raises(BadOptionError, match=message):
        sparsec.prune(load_onnx(zoo_models("gemm_mlp")), ratio=0.3, **kwargs)


@pytest.mark.parametrize("criterion", ["wanda", "activation"])
def test_data_criteria_drop_a_dead_channel_that_magnitude_keeps(zoo_models, criterion):
    """Hidden channel 5 has the largest weights but a bias that keeps it below zero, so ReLU
    silences it on real inputs: magnitude keeps it, the activation-aware criteria drop it."""
    from sparsec.passes.manager import PassContext

    g = load_onnx(zoo_models("gemm_mlp")).copy()
    g.initializers["w1"][5] *= 50.0                    # large producer weights ...
    g.initializers["b1"][5] = -1e4                      # ... but never active after ReLU
    g.initializers["w2"][5] *= 50.0                     # and large consumer weights
    ctx = PassContext.split([reference.random_inputs(g, seed=s) for s in range(8)])
    row5 = g.initializers["w1"][5]
    has_row5 = lambda p: any(np.array_equal(r, row5) for r in p.initializers["w1"])  # noqa: E731
    for magnitude in ("l2", "l1"):
        assert has_row5(ChannelPrune(0.5, criterion=magnitude).run(g, ctx)[0])
    kept, details = ChannelPrune(0.5, criterion=criterion).run(g, ctx)
    assert not has_row5(kept) and details["criterion"] == criterion


def test_l1_and_l2_rank_by_their_norms():
    from sparsec.passes.criteria import l1, l2

    g = load_onnx(zoo.gemm_mlp())
    grp = next(x for x in DependencyGraph(g).groups if x.sources == ["w1"])
    w = np.concatenate([g.initializers["w1"], g.initializers["b1"][:, None],
                        g.initializers["w2"]], axis=1).astype(np.float64)
    np.testing.assert_allclose(l1(g, grp), np.abs(w).sum(axis=1))
    np.testing.assert_allclose(l2(g, grp), np.sqrt((w ** 2).sum(axis=1)))


@pytest.mark.parametrize("criterion", ["wanda", "activation"])
def test_data_criteria_need_calibration(zoo_models, criterion):
    with pytest.raises(ValueError, match="calibration"):
        ChannelPrune(0.5, criterion=criterion).run(load_onnx(zoo_models("gemm_mlp")))


def test_taylor_needs_a_torch_module(zoo_models):
    from sparsec.errors import BadOptionError

    with pytest.raises(BadOptionError, match="prune_module"):
        sparsec.prune(load_onnx(zoo_models("gemm_mlp")), ratio=0.5, criterion="taylor")


def two_hidden_layers(seed=0):
    """x -> W1 (16) -> relu -> W2 (16) -> relu -> W3: W2 is tiny and b2 large, so what the
    first hidden layer carries barely reaches the output, while the second layer's does."""
    from onnx import helper

    r = np.random.default_rng(seed)
    inits = {"w1": r.standard_normal((8, 16)), "b1": r.standard_normal(16),
             "w2": r.standard_normal((16, 16)) * 1e-3, "b2": r.uniform(1.0, 2.0, 16),
             "w3": r.standard_normal((16, 4)), "b3": np.zeros(4)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]),
             helper.make_node("Add", ["h1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
             helper.make_node("Add", ["h2", "b2"], ["a2"]),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["h3"]),
             helper.make_node("Add", ["h3", "b3"], ["y"])]
    return zoo.make_model(nodes, [("x", [32, 8])], ["y"], inits)


def test_sensitivity_moves_pruning_to_where_it_costs_least():
    from sparsec.passes.manager import PassContext

    g = load_onnx(two_hidden_layers())
    ctx = PassContext.split([reference.random_inputs(g, seed=s) for s in range(8)])
    uniform, _ = ChannelPrune(0.25).run(g, ctx)
    spread, details = ChannelPrune(0.25, sensitivity=True).run(g, ctx)
    assert details["sensitivity"] and details["channels_removed"] == 8          # same budget
    assert uniform.initializers["w1"].shape[1] == uniform.initializers["w2"].shape[1] == 12
    assert spread.initializers["w1"].shape[1] < spread.initializers["w2"].shape[1]
    ref = reference.run_batches(g, ctx.holdout)

    def err(model):
        out = reference.run_batches(model, ctx.holdout)
        return sum(float(np.sum((o[0] - r[0]) ** 2)) for o, r in zip(out, ref))
    assert err(spread) < err(uniform)
