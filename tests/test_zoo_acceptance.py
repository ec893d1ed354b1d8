"""Model-zoo acceptance: transformers architectures from small configs, pruned at ratio 0.5
through both paths.

* ONNX path: torch.onnx export -> ONNX frontend -> prune; the pruned model runs in ONNX Runtime
  with the original output shapes.
* torch path: ``sparsec.prune_module`` (FX frontend, write-back into a copy of the module); the
  pruned module runs in torch, computes what the pruned graph computes in ONNX Runtime, and its
  layer attributes match its weights.

In both, every prunable group lost its share. Minimum prunable-group counts pin what the analysis
finds today; frozen groups carry their reasons (see `sparsec inspect` and the README table)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zoo

import sparsec
from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.frontends.fx import capture_fx
from sparsec.frontends.onnx import load_onnx
from sparsec.passes.channel_prune import kept_count

# model -> prunable groups expected at least (what blocks the rest, for the record)
EXPECTED = {
    "hf_resnet": 4,         # classifier output
    "hf_mobilenetv2": 25,   # classifier output
    "hf_vit": 2,            # hidden: LayerNorm; heads: attention MatMul (issue 4)
    "hf_bert": 2,           # same
    "hf_convnext": 2,       # hidden: LayerNorm
    "hf_regnet": 7,         # grouped convs prune whole conv groups
    "hf_efficientnet": 22,  # squeeze-excite and depthwise blocks all pass
    "hf_swin": 2,           # LayerNorm, window attention
    "hf_gpt2": 2,           # LayerNorm, attention
    "hf_llama_gqa": 2,      # RMSNorm-as-ReduceMean, GQA head Expand (issue 4)
}


def check_groups(graph, result, ratio=0.5):
    """The analysis finds the expected groups, and each prunable one lost its share."""
    groups = DependencyGraph(graph).groups
    prunable = [x for x in groups if x.prunable]
    assert all(x.frozen for x in groups if not x.prunable)     # every freeze says why
    assert result.after.params < result.before.params
    for grp in prunable:   # each weight that spans a whole group axis lost the group's share
        want = kept_count(grp.size, ratio)
        for m in grp.params:
            if graph.shape(m.name)[m.axis] == grp.size * m.block:
                assert result.graph.initializers[m.name].shape[m.axis] == want * m.block, m
    return prunable


@pytest.mark.parametrize("name", list(EXPECTED))
def test_zoo_onnx_path(zoo_models, name):
    g = load_onnx(zoo_models(name))
    result = sparsec.prune(g, ratio=0.5)
    assert len(check_groups(g, result)) >= EXPECTED[name]
    feeds = reference.random_inputs(result.graph)
    out = reference.run(result.graph, feeds)
    assert [o.shape for o in out] == [o.shape for o in reference.run(g, feeds)]


def _tensor(out):
    return (out.logits if hasattr(out, "logits") else out).detach()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_zoo_torch_path(name):
    module, example = zoo.transformers_model(name)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    g = capture_fx(module, example)
    with torch.no_grad():
        dense = _tensor(module(*example))
    np.testing.assert_allclose(reference.run(g, {g.inputs[0]: example[0].numpy()})[0],
                               dense.numpy(), rtol=1e-4, atol=1e-5)   # the lowering is exact
    pruned, result = sparsec.prune_module(module, example, ratio=0.5)
    assert len(check_groups(g, result)) >= EXPECTED[name]
    zoo.assert_consistent(pruned)
    with torch.no_grad():
        got = _tensor(pruned(*example))
    assert got.shape == dense.shape
    want = reference.run(result.graph, {result.graph.inputs[0]: example[0].numpy()})[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in module.parameters())
    for k, v in module.state_dict().items():                 # the input module is untouched
        assert torch.equal(v, before[k])


def test_pruned_transformer_trains():
    module, (ids,) = zoo.transformers_model("hf_llama_gqa")
    pruned, _ = sparsec.prune_module(module, (ids,), ratio=0.5)
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.05)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        logits = pruned(ids)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
