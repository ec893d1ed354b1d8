"""Attention heads: found through the attention MatMuls (MHA, fused QKV, grouped-query), removed
consistently from Q, K, V and O, exactly when the head is zero; with GQA a KV head goes together
with its group of query heads, and the pruned torch module keeps valid shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zoo

import sparsec
from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.frontends.fx import capture_fx
from sparsec.analysis.cost import cost
from sparsec.passes.surgery import apply_plan

# model -> (heads per layer as grouped, weight -> elements per group channel)
HEADS = {
    "hf_bert": (2, {"query.weight": 16, "key.weight": 16, "value.weight": 16,
                    "attention.output.dense.weight": 16}),
    "hf_gpt2": (2, {"c_attn.weight": 16, "attn.c_proj.weight": 16}),      # fused QKV
    "hf_llama_gqa": (2, {"q_proj.weight": 16, "k_proj.weight": 8, "v_proj.weight": 8,
                         "o_proj.weight": 16}),          # 4 query heads in 2 KV groups of 2
}


def head_groups(graph):
    return [g for g in DependencyGraph(graph).groups if g.kind == "heads"]


@pytest.mark.parametrize("name", list(HEADS))
def test_heads_are_found_with_their_blocks(name):
    module, example = zoo.transformers_model(name)
    groups = head_groups(capture_fx(module, example))
    size, blocks = HEADS[name]
    assert len(groups) == 2 and all(g.prunable and g.size == size for g in groups)
    for g in groups:
        for suffix, block in blocks.items():
            members = [m for m in g.params if m.name.endswith(suffix)]
            assert members and all(m.block == block for m in members), (suffix, members)
    if name == "hf_gpt2":   # one fused weight, three runs: Q, K and V at their offsets
        starts = sorted(m.start for m in groups[0].params if m.name.endswith("c_attn.weight"))
        assert starts == [0, 32, 64]


@pytest.mark.parametrize("name", list(HEADS))
def test_removing_a_zero_head_is_exact(name):
    module, example = zoo.transformers_model(name)
    g = capture_fx(module, example).copy()
    dg = DependencyGraph(g)
    heads = [grp for grp in dg.groups if grp.kind == "heads"]
    for grp in heads:                          # zero head 1 of every layer, everywhere
        for m in grp.params:
            arr = g.initializers[m.name]
            idx = [slice(None)] * arr.ndim
            idx[m.axis] = slice(m.start + m.block, m.start + 2 * m.block)
            arr[tuple(idx)] = 0.0
    pruned = apply_plan(g, dg, {grp.id: np.array([0]) for grp in heads})
    assert cost(pruned).params < cost(g).params
    feeds = {g.inputs[0]: example[0].numpy()}
    np.testing.assert_allclose(reference.run(pruned, feeds)[0], reference.run(g, feeds)[0],
                               rtol=1e-4, atol=1e-5)


def test_gqa_head_pruning_keeps_torch_and_onnx_runnable():
    module, (ids,) = zoo.transformers_model("hf_llama_gqa")
    pruned, result = sparsec.prune_module(module, (ids,), ratio=0.5)
    attn = pruned.model.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == 8       # 1 KV head left
    assert attn.q_proj.out_features == attn.o_proj.in_features == 16       # its 2 query heads
    assert attn.num_key_value_groups == 2
    with torch.no_grad():
        got = pruned(ids).numpy()
    want = reference.run(result.graph, {result.graph.inputs[0]: ids.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    longer = torch.randint(0, 100, (2, 5))            # the module is not tied to one shape
    assert pruned(longer).shape == (2, 5, 100)


def test_head_ratio_is_separate_from_the_channel_ratio(zoo_models):
    from sparsec.frontends.onnx import load_onnx

    g = load_onnx(zoo_models("hf_bert"))
    only_heads = sparsec.prune(g, ratio=0.0, head_ratio=0.5)
    details = only_heads.passes[-1].details
    assert details["heads_removed"] == 2 and details["channels_removed"] == 2
    only_ffn = sparsec.prune(g, ratio=0.5, head_ratio=0.0)
    assert only_ffn.passes[-1].details["heads_removed"] == 0
    assert only_ffn.passes[-1].details["channels_removed"] > 0
    kinds = {x["kind"] for x in sparsec.inspect(g)["groups"]}
    assert kinds == {"heads", "channels", "hidden"}       # hidden: the stream, cut only by name
    assert only_ffn.passes[-1].details["hidden_removed"] == 0
