"""Hidden width: the residual stream under LayerNorms is one group, from the embedding (or stem)
to the head that reads it; exact passes leave it alone, ``hidden_ratio`` cuts it (lossy even
for empty channels, and measured), on exports of both torch exporters."""

from __future__ import annotations

import numpy as np
import pytest
import realworld
import zoo

import sparsec
from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.passes.surgery import apply_plan

_CACHE: dict = {}


def model(name: str, exporter: str):
    if (name, exporter) not in _CACHE:
        _CACHE[name, exporter] = sparsec.load(realworld.build(name, exporter))
    return _CACHE[name, exporter]


def hidden_groups(graph):
    return [g for g in DependencyGraph(graph).groups if g.kind == "hidden"]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name, count", [("vit", 1), ("gpt2", 1), ("convnext", 2)])
def test_the_residual_stream_is_one_hidden_group(name, exporter, count):
    graph = model(name, exporter)
    groups = [g for g in hidden_groups(graph) if g.hidden_prunable]
    assert len(groups) == count
    for g in groups:
        assert not g.prunable                       # exact passes never cut it
        assert g.lossy and all("Normalization" in r for r in g.lossy)
        norms = [n for n in graph.nodes if n.op_type == "LayerNormalization"
                 and any(m.name == n.inputs[1] for m in g.params)]
        assert norms                                 # the norms' scales go with the width
        assert g.consumers                           # linear layers read it


def test_a_stream_that_is_the_output_stays_whole():
    """BERT's last hidden state is what the model returns: its width is the contract."""
    graph = model("bert", "legacy")
    stream = [g for g in hidden_groups(graph) if g.size == 32]
    assert stream and not any(g.hidden_prunable for g in stream)
    assert any("graph output" in r for g in stream for r in g.frozen)


def test_removing_a_zero_hidden_channel_is_not_exact_but_valid():
    """A LayerNorm's mean and variance run over every channel: dropping even a zero one changes
    them. The analysis therefore calls the group lossy; the cut model still runs and stays
    close."""
    graph = model("vit", "legacy")
    dg = DependencyGraph(graph)
    g = next(g for g in dg.groups if g.hidden_prunable)
    pruned = apply_plan(graph, dg, {g.id: np.arange(1, g.size)})
    feeds = reference.random_inputs(graph, seed=0)
    fid = reference.compare(reference.run(graph, feeds), reference.run(pruned, feeds))
    assert 0.5 < fid.cosine < 1.0


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["vit", "gpt2"])
def test_hidden_ratio_cuts_the_stream_and_says_what_it_cost(name, exporter):
    graph = model(name, exporter)
    calib = [reference.random_inputs(graph, seed=s) for s in range(8)]
    plain = sparsec.prune(graph, ratio=0.25, calibration=calib)
    result = sparsec.prune(graph, ratio=0.25, hidden_ratio=0.25, criterion="fluctuation",
                           reconstruct=True, calibration=calib)
    details = result.passes[-1].details
    assert details["hidden_removed"] == 8 and plain.passes[-1].details["hidden_removed"] == 0
    assert result.after.params < plain.after.params
    scales = [result.graph.initializers[n.inputs[1]].shape for n in result.graph.nodes
              if n.op_type == "LayerNormalization"]
    assert scales and all(s == (24,) for s in scales)
    assert 0.9 < result.fidelity.cosine < 1.0           # lossy, and measured
    for w, g in zip(reference.run(graph, calib[3]), reference.run(result.graph, calib[3])):
        assert w.shape == g.shape                        # outputs keep their shape


def test_hidden_width_with_the_sensitivity_recipe_and_max_drop():
    graph = model("gpt2", "legacy")
    calib = [reference.random_inputs(graph, seed=s) for s in range(8)]
    result = sparsec.prune(graph, ratio=0.5, hidden_ratio=0.5, criterion="fluctuation",
                           reconstruct=True, sensitivity=True, calibration=calib,
                           max_drop=0.01)
    assert 1 - result.fidelity.cosine <= 0.01
    assert any(not s["within"] for s in result.search)


def test_hidden_ratio_on_the_command_line(tmp_path):
    from sparsec.cli import main

    src = tmp_path / "vit.onnx"
    out = tmp_path / "vit_pruned.onnx"
    import onnx
    onnx.save(realworld.build("vit", "dynamo"), str(src))
    assert main(["-q", "prune", str(src), "-o", str(out), "--hidden-ratio", "0.25"]) == 0
    pruned = sparsec.load(out)
    assert any(a.shape == (24,) for a in pruned.initializers.values())
    assert main(["-q", "prune", str(src), "-o", str(out), "--hidden-ratio", "1.5"]) != 0


def test_zoo_layernorm_stream_into_an_output_is_not_cut():
    graph = sparsec.load(zoo.layernorm_ffn())
    result = sparsec.prune(graph, hidden_ratio=0.5)
    assert result.after.params == result.before.params


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["bert", "t5_encoder"])
def test_an_encoder_keeps_its_output_width_through_an_output_map(name, exporter):
    """The stream is the output: a map after its last norm (identity, so exact) ends the group;
    the cut then slices the map's rows and the refit turns it into the best linear estimate."""
    from sparsec.passes.hidden import keep_output_width

    graph = model(name, exporter)
    mapped, maps = keep_output_width(graph)
    assert len(maps) == 1
    feeds = reference.random_inputs(graph, seed=2)
    for w, g in zip(reference.run(graph, feeds), reference.run(mapped, feeds)):
        np.testing.assert_array_equal(w, g)
    calib = [reference.random_inputs(graph, seed=s) for s in range(8)]
    result = sparsec.prune(graph, hidden_ratio=0.25, criterion="fluctuation", reconstruct=True,
                           calibration=calib)
    details = result.passes[-1].details
    assert details["hidden_removed"] == 8 and details["output_maps"][0]["width"] == 32
    assert [result.graph.shape(o) for o in result.graph.outputs] == \
        [graph.shape(o) for o in graph.outputs]
    weight = details["output_maps"][0]["weight"]
    assert result.graph.initializers[weight].shape == (24, 32)
    assert 0.95 < result.fidelity.cosine < 1.0


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_rmsnorm_written_out_as_ops_is_a_hidden_width(exporter):
    """Llama's RMSNorm comes as Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul(w):
    the mean over the hidden axis is the norm's statistic, so the stream is a hidden width."""
    graph = model("llama", exporter)
    [g] = [g for g in hidden_groups(graph) if g.hidden_prunable]
    assert any("ReduceMean" in r for r in g.lossy)
    calib = [reference.random_inputs(graph, seed=s) for s in range(8)]
    result = sparsec.prune(graph, hidden_ratio=0.25, criterion="fluctuation", reconstruct=True,
                           calibration=calib)
    norms = [a.shape for n, a in result.graph.initializers.items() if "norm" in n.lower()
             and a.ndim == 1]
    assert norms and all(s == (24,) for s in norms)
    assert 0.9 < result.fidelity.cosine <= 1.0


def test_the_torch_route_cuts_a_decoder_and_round_trips_through_save_pretrained(tmp_path):
    """prune_module: LayerNorm / RMSNorm and embedding sizes follow their weights, and the
    Hugging Face config's hidden_size too, so save_pretrained then from_pretrained gives the
    pruned model back."""
    import torch
    import transformers as tf

    module, example = zoo.transformers_model("hf_llama_gqa")
    pruned, result = sparsec.prune_module(module, example, hidden_ratio=0.25)
    assert result.passes[-1].details["hidden_removed"] == 8
    lm = next(m for m in pruned.modules() if isinstance(m, tf.PreTrainedModel))
    assert lm.config.hidden_size == 24 and lm.get_input_embeddings().embedding_dim == 24
    assert next(m for m in module.modules() if isinstance(m, tf.PreTrainedModel)
                ).config.hidden_size == 32                    # the input module is untouched
    lm.save_pretrained(tmp_path)
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(*example).logits.numpy(), lm(*example).logits.numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_the_torch_route_refuses_an_encoder_whose_output_is_the_stream():
    from sparsec.errors import BadOptionError

    module, example = zoo.transformers_model("hf_bert")
    with pytest.raises(BadOptionError, match="hidden stream"):
        sparsec.prune_module(module, example, hidden_ratio=0.25)


def test_the_torch_route_keeps_tied_weights_tied():
    """GPT-2's lm_head is its token embedding: the graph holds the tensor once, under one of
    its names; the write-back must reach it under either name and keep the tie."""
    module, example = zoo.transformers_model("hf_gpt2")
    pruned, result = sparsec.prune_module(module, example, hidden_ratio=0.25)
    lm = pruned.model
    assert result.passes[-1].details["hidden_removed"] == 8
    assert lm.lm_head.weight is lm.transformer.wte.weight
    assert tuple(lm.lm_head.weight.shape) == (100, 24) and lm.config.hidden_size == 24
    assert module.model.lm_head.weight is module.model.transformer.wte.weight
    assert tuple(module.model.lm_head.weight.shape) == (100, 32)   # the input is untouched
