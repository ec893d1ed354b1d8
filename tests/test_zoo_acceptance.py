"""Model-zoo acceptance: transformers architectures from small configs, through the ONNX path,
pruned at ratio 0.5: the pruned model runs in ONNX Runtime with the original output shapes, and
every prunable group lost its share. Minimum prunable-group counts pin what the analysis finds
today (frozen groups carry their reasons: see `sparsec inspect`)."""

from __future__ import annotations

import pytest

import sparsec
from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.frontends.onnx import load_onnx
from sparsec.passes.channel_prune import kept_count

# model -> prunable groups expected at least (what blocks the rest, for the record)
EXPECTED = {
    "hf_resnet": 4,         # classifier output
    "hf_mobilenetv2": 25,   # classifier output
    "hf_vit": 2,            # hidden: LayerNorm; heads: attention MatMul (issue 4)
    "hf_bert": 2,           # same
    "hf_convnext": 2,       # hidden: LayerNorm
    "hf_regnet": 5,         # grouped convolutions
    "hf_efficientnet": 22,  # squeeze-excite and depthwise blocks all pass
    "hf_swin": 2,           # LayerNorm, window attention
    "hf_gpt2": 2,           # LayerNorm, attention
    "hf_llama_gqa": 2,      # RMSNorm-as-ReduceMean, GQA head Expand (issue 4)
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_zoo_prunes_at_half_and_runs(zoo_models, name):
    g = load_onnx(zoo_models(name))
    groups = DependencyGraph(g).groups
    prunable = [x for x in groups if x.prunable]
    assert len(prunable) >= EXPECTED[name]
    assert all(x.frozen for x in groups if not x.prunable)     # every freeze says why
    result = sparsec.prune(g, ratio=0.5)
    feeds = reference.random_inputs(result.graph)
    out = reference.run(result.graph, feeds)
    assert [o.shape for o in out] == [o.shape for o in reference.run(g, feeds)]
    assert result.after.params < result.before.params
    for grp in prunable:   # each weight that spans a whole group axis lost the group's share
        want = kept_count(grp.size, 0.5)
        for m in grp.params:
            if g.shape(m.name)[m.axis] == grp.size * m.block:
                assert result.graph.initializers[m.name].shape[m.axis] == want * m.block, m
