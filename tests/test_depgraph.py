"""Channel groups: the basic coupled structures, and frozen groups with their reasons."""

from __future__ import annotations

import zoo

from sparsec.analysis.depgraph import DependencyGraph
from sparsec.frontends.fx import capture_fx
from sparsec.frontends.onnx import load_onnx


def groups(model):
    g = load_onnx(model)
    return g, DependencyGraph(g).groups


def params(group) -> set[tuple[str, int]]:
    """(weight, axis) of every weight member of a group."""
    return {(m.name, m.axis) for m in group.params}


def test_conv_bn_relu_conv_chain():
    _, gs = groups(zoo.conv_bn_relu_conv())
    mid = next(g for g in gs if g.size == 8)
    assert mid.prunable
    assert params(mid) == {("w1", 0), ("b1", 0), ("s", 0), ("bb", 0), ("m", 0), ("v", 0),
                           ("w2", 1)}
    assert [(m.name, m.axis) for m in mid.consumers] == [("w2", 1)]
    out = next(g for g in gs if g.size == 6)
    assert not out.prunable and "graph output" in out.frozen[0]


def test_gemm_chain_both_transposes():
    _, gs = groups(zoo.gemm_mlp())
    h1 = next(g for g in gs if g.size == 32)
    h2 = next(g for g in gs if g.size == 24)
    assert h1.prunable and h2.prunable
    assert params(h1) == {("w1", 0), ("b1", 0), ("w2", 0)}      # transB=1 then transB=0
    assert params(h2) == {("w2", 1), ("b2", 0), ("w3", 1)}


def test_matmul_add_chain_through_erf_gelu():
    _, gs = groups(zoo.matmul_add_mlp())
    hidden = next(g for g in gs if g.size == 40)
    assert hidden.prunable
    assert params(hidden) == {("w1", 1), ("b1", 0), ("w2", 0)}  # scalar constants excluded


def test_residual_add_couples_both_branches():
    _, gs = groups(zoo.residual_convs())
    trunk = next(g for g in gs if ("ws", 0) in params(g))
    # stem output, second conv's output (added to it) and both consumers share one index space
    assert {("ws", 0), ("w2", 0), ("b2", 0), ("w1", 1), ("wh", 1)} <= params(trunk)
    inner = next(g for g in gs if ("w1", 0) in params(g))
    assert inner is not trunk and params(inner) == {("w1", 0), ("w2", 1)}


def test_depthwise_and_grouped_convs_prune_whole_conv_groups():
    _, gs = groups(zoo.grouped_and_depthwise())
    first = next(g for g in gs if ("w0", 0) in params(g))
    # depthwise passes channels through; the group=2 conv maps input block g (4 channels) to
    # output block g, so the group counts conv groups: 2 channels of 4 elements each
    assert params(first) == {("w0", 0), ("wd", 0), ("bd", 0), ("wg", 0), ("w3", 1)}
    assert first.prunable and first.size == 2
    assert {m.name: m.block for m in first.params}["wg"] == 4


def test_layernorm_freezes_hidden_but_not_ffn():
    _, gs = groups(zoo.layernorm_ffn())
    hidden = next(g for g in gs if g.size == 12)
    ffn = next(g for g in gs if g.size == 30)
    assert not hidden.prunable
    assert any("LayerNormalization" in r for r in hidden.frozen)
    assert ffn.prunable and params(ffn) == {("w1", 1), ("w2", 0)}


def test_unknown_rule_freezes_instead_of_guessing():
    nodes = [zoo.helper.make_node("Conv", ["x", "w"], ["c"]),
             zoo.helper.make_node("SpaceToDepth", ["c"], ["d"], blocksize=2),
             zoo.helper.make_node("Conv", ["d", "w2"], ["y"])]
    r = zoo.np.random.default_rng(0)
    m = zoo.make_model(nodes, [("x", [1, 3, 4, 4])], ["y"],
                       {"w": r.standard_normal((8, 3, 1, 1)),
                        "w2": r.standard_normal((2, 32, 1, 1))})
    _, gs = groups(m)
    first = next(g for g in gs if ("w", 0) in params(g))
    assert not first.prunable and any("SpaceToDepth has no dependency rule" in r
                                      for r in first.frozen)


def test_flatten_reshape_records_the_literal_size_edit(zoo_models):
    g = load_onnx(zoo_models("torch_rescnn"))
    gs = DependencyGraph(g).groups
    down = next(x for x in gs if ("down.weight", 0) in params(x))
    assert down.prunable and ("fc.weight", 1) in params(down)


def test_transformers_models_have_expected_groups(zoo_models):
    for name, ffn_groups in (("hf_bert", 2), ("hf_vit", 2)):
        g = load_onnx(zoo_models(name))
        gs = DependencyGraph(g).groups
        ffn = [x for x in gs if x.prunable and x.kind == "channels"]
        assert len(ffn) == ffn_groups, name
        assert all(x.size == 64 for x in ffn)                # the FFN intermediate width
        heads = [x for x in gs if x.kind == "heads"]                 # 2 attention heads
        assert len(heads) == 2 and all(x.prunable and x.size == 2 for x in heads)
    mb = DependencyGraph(load_onnx(zoo_models("hf_mobilenetv2"))).groups
    assert sum(x.prunable for x in mb) >= 10


def test_identity_gather_from_flatten_is_followed_and_rewritten(zoo_models):
    """torch's flatten after adaptive pooling exports as Reshape -> Gather(arange) -> Reshape;
    the Gather is an identity on channels, and pruning re-makes its index."""
    from conftest import EXAMPLES
    from sparsec.passes.channel_prune import ChannelPrune

    g = load_onnx(EXAMPLES / "digits_cnn.onnx")
    assert "Gather" in g.op_histogram()
    wide = next(x for x in DependencyGraph(g).groups if ("wide.0.weight", 0) in params(x))
    assert wide.prunable
    pruned, _ = ChannelPrune(0.5).run(g)
    gather = next(n for n in pruned.nodes if n.op_type == "Gather")
    idx = pruned.initializers[gather.inputs[1]]
    assert idx.size == 32 and (idx.ravel() == range(32)).all()


def spans(group, graph):
    return sorted(group.describe(m, graph) for m in group.params)


def test_nested_concat_gives_one_group_per_branch_at_its_offset():
    g, gs = groups(zoo.nested_concat())
    by_src = {x.sources[0]: x for x in gs if x.prunable}
    assert set(by_src) == {"wa", "wb", "wc"}
    assert spans(by_src["wa"], g) == ["wa[axis 0]", "wh[axis 1 [0:4]]"]
    assert spans(by_src["wb"], g) == ["wb[axis 0]", "wh[axis 1 [4:10]]"]
    assert spans(by_src["wc"], g) == ["bc[axis 0]", "wc[axis 0]", "wh[axis 1 [10:15]]"]


def test_split_cuts_the_producer_into_two_groups():
    g, gs = groups(zoo.split_branches())
    assert sorted(spans(x, g) for x in gs if x.prunable) == [
        ["w[axis 0 [0:5]]", "wp[axis 1]"], ["w[axis 0 [5:12]]", "wq[axis 1]"]]


def test_slice_read_beside_the_full_tensor_gives_three_segments():
    g, gs = groups(zoo.slice_and_full())
    assert sorted(spans(x, g) for x in gs if x.prunable) == [
        ["w[axis 0 [0:2]]", "wf[axis 1 [0:2]]"],
        ["w[axis 0 [2:8]]", "wf[axis 1 [2:8]]", "ws[axis 1]"],
        ["w[axis 0 [8:10]]", "wf[axis 1 [8:10]]"]]


def test_flatten_maps_each_channel_to_a_block_of_features():
    g, gs = groups(zoo.conv_flatten_linear())
    [grp] = [x for x in gs if x.prunable]
    assert grp.size == 6
    assert spans(grp, g) == ["b[axis 0]", "fc[axis 1 x16]", "w[axis 0]"]


def test_squeeze_excite_couples_the_gate_with_the_gated_channels():
    g, gs = groups(zoo.squeeze_excite())
    main = next(x for x in gs if ("w", 0) in params(x))
    assert {("w", 0), ("w2", 0), ("b2", 0), ("w1", 1), ("wh", 1)} <= params(main)
    squeeze = next(x for x in gs if ("w1", 0) in params(x))
    assert squeeze.prunable and params(squeeze) == {("w1", 0), ("b1", 0), ("w2", 1)}


def test_group_norm_and_pixel_shuffle_prune_in_blocks_dcr_is_frozen():
    g, gs = groups(zoo.group_norm_shuffle())
    by_source = {grp.sources[0]: grp for grp in gs}
    gn = by_source["w"]           # 8 channels in 4 norm groups: 4 channels of 2 elements
    assert gn.prunable and gn.size == 4
    assert {m.name: m.block for m in gn.params} == {"w": 2, "s": 2, "b": 2, "w1": 2, "w3": 2}
    crd = by_source["w1"]         # CRD pixel shuffle: output channel c is a block of r*r = 4
    assert crd.prunable and crd.size == 2 and {m.name: m.block for m in crd.params} == \
        {"w1": 4, "w2": 1}
    dcr = by_source["w3"]
    assert not dcr.prunable and any("DCR" in r for r in dcr.frozen)


def test_channel_shuffle_is_frozen_but_its_neighbours_prune():
    module, example = zoo.torch_model("torch_groups_shuffles")
    gs = DependencyGraph(capture_fx(module, example)).groups
    by_source = {grp.sources[0]: grp for grp in gs}
    assert not by_source["side.weight"].prunable            # the strided channel permutation
    assert any("Reshape" in r for r in by_source["side.weight"].frozen)
    stem = by_source["stem.weight"]        # GroupNorm(4, 16) + conv with groups=4 (4 -> 8)
    assert stem.prunable and stem.size == 4
    blocks = {m.name: m.block for m in stem.params}
    assert blocks["stem.weight"] == blocks["gn.weight"] == 4 and blocks["grouped.weight"] == 8
    assert by_source["up.weight"].prunable and by_source["up.weight"].size == 2
