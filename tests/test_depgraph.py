"""Channel groups: the basic coupled structures, and frozen groups with their reasons."""

from __future__ import annotations

import zoo

from sparsec.analysis.depgraph import DependencyGraph
from sparsec.frontends.onnx import load_onnx


def groups(model):
    g = load_onnx(model)
    return g, DependencyGraph(g).groups


def test_conv_bn_relu_conv_chain():
    _, gs = groups(zoo.conv_bn_relu_conv())
    mid = next(g for g in gs if g.size == 8)
    assert mid.prunable
    assert sorted(mid.params) == sorted([("w1", 0), ("b1", 0), ("s", 0), ("bb", 0), ("m", 0),
                                         ("v", 0), ("w2", 1)])
    assert mid.consumer_params == [("w2", 1)]
    out = next(g for g in gs if g.size == 6)
    assert not out.prunable and "graph output" in out.frozen[0]


def test_gemm_chain_both_transposes():
    _, gs = groups(zoo.gemm_mlp())
    h1 = next(g for g in gs if g.size == 32)
    h2 = next(g for g in gs if g.size == 24)
    assert h1.prunable and h2.prunable
    assert set(h1.params) == {("w1", 0), ("b1", 0), ("w2", 0)}      # transB=1 then transB=0
    assert set(h2.params) == {("w2", 1), ("b2", 0), ("w3", 1)}


def test_matmul_add_chain_through_erf_gelu():
    _, gs = groups(zoo.matmul_add_mlp())
    hidden = next(g for g in gs if g.size == 40)
    assert hidden.prunable
    assert set(hidden.params) == {("w1", 1), ("b1", 0), ("w2", 0)}  # scalar constants excluded


def test_residual_add_couples_both_branches():
    _, gs = groups(zoo.residual_convs())
    trunk = next(g for g in gs if ("ws", 0) in g.params)
    # stem output, second conv's output (added to it) and both consumers share one index space
    assert {("ws", 0), ("w2", 0), ("b2", 0), ("w1", 1), ("wh", 1)} <= set(trunk.params)
    inner = next(g for g in gs if ("w1", 0) in g.params)
    assert inner is not trunk and set(inner.params) == {("w1", 0), ("w2", 1)}


def test_depthwise_passes_channels_and_grouped_conv_is_frozen():
    _, gs = groups(zoo.grouped_and_depthwise())
    first = next(g for g in gs if ("w0", 0) in g.params)
    # the grouped conv reads channel c through weight column c % (C/g): not index-aligned,
    # so its weights are not in the group, and the group is frozen at its input
    assert set(first.params) == {("w0", 0), ("wd", 0), ("bd", 0)}
    assert any(e.what == "group" for e in first.edits)
    assert not first.prunable and any("grouped convolution" in r for r in first.frozen)


def test_layernorm_freezes_hidden_but_not_ffn():
    _, gs = groups(zoo.layernorm_ffn())
    hidden = next(g for g in gs if g.size == 12)
    ffn = next(g for g in gs if g.size == 30)
    assert not hidden.prunable
    assert any("LayerNormalization" in r for r in hidden.frozen)
    assert ffn.prunable and set(ffn.params) == {("w1", 1), ("w2", 0)}


def test_unknown_rule_freezes_instead_of_guessing():
    _, gs = groups(zoo.concat_branches())
    assert all(not g.prunable for g in gs)
    assert any("Concat" in r for g in gs for r in g.frozen)


def test_flatten_reshape_records_the_literal_size_edit(zoo_models):
    g = load_onnx(zoo_models("torch_rescnn"))
    gs = DependencyGraph(g).groups
    down = next(x for x in gs if ("down.weight", 0) in x.params)
    assert down.prunable and ("fc.weight", 1) in down.params
    assert any(e.what.startswith("reshape:") for e in down.edits)


def test_transformers_models_have_expected_groups(zoo_models):
    for name, ffn_groups in (("hf_bert", 2), ("hf_vit", 2)):
        g = load_onnx(zoo_models(name))
        gs = DependencyGraph(g).groups
        prunable = [x for x in gs if x.prunable]
        assert len(prunable) == ffn_groups, name
        assert all(x.size == 64 for x in prunable)           # the FFN intermediate width
        assert any("Reshape splits" in r for x in gs for r in x.frozen)   # attention heads
    mb = DependencyGraph(load_onnx(zoo_models("hf_mobilenetv2"))).groups
    assert sum(x.prunable for x in mb) >= 10


def test_identity_gather_from_flatten_is_followed_and_rewritten(zoo_models):
    """torch's flatten after adaptive pooling exports as Reshape -> Gather(arange) -> Reshape;
    the Gather is an identity on channels, and pruning re-makes its index."""
    from conftest import EXAMPLES
    from sparsec.passes.magnitude import MagnitudePrune

    g = load_onnx(EXAMPLES / "digits_cnn.onnx")
    assert "Gather" in g.op_histogram()
    wide = next(x for x in DependencyGraph(g).groups if ("wide.0.weight", 0) in x.params)
    assert wide.prunable and any(e.what.startswith("arange:") for e in wide.edits)
    pruned, _ = MagnitudePrune(0.5).run(g)
    gather = next(n for n in pruned.nodes if n.op_type == "Gather")
    idx = pruned.initializers[gather.inputs[1]]
    assert idx.size == 32 and (idx.ravel() == range(32)).all()
