"""Layer removal: residual layers are found along the trunk (no names needed, masks ignored),
a layer whose residual branches are zero is removed exactly, and the run with the smallest
angular distance is the one removed."""

from __future__ import annotations

import numpy as np
import pytest
import zoo

import sparsec
from sparsec import reference
from sparsec.errors import BadOptionError
from sparsec.frontends.fx import capture_fx
from sparsec.frontends.onnx import load_onnx
from sparsec.passes.layer_removal import angular_distance, find_layers


@pytest.mark.parametrize("name, layers", [("hf_gpt2", 2), ("hf_bert", 2), ("hf_llama_gqa", 2),
                                          ("hf_vit", 2), ("hf_resnet", 1)])
def test_layers_are_found_through_both_frontends(zoo_models, name, layers):
    module, example = zoo.transformers_model(name)
    for g in (capture_fx(module, example), load_onnx(zoo_models(name))):
        found = find_layers(g)
        assert len(found) == layers
        assert all(g.shape(x.start) == g.shape(x.end) for x in found)
        assert all(a.end == b.start for a, b in zip(found, found[1:]))    # consecutive


def test_an_identity_layer_is_the_one_removed_and_exactly():
    """GPT-2 is pre-norm: zero layer 1's attention and MLP output projections and the layer
    adds nothing; its angular distance is 0, it is chosen, and removing it is exact."""
    module, (ids,) = zoo.transformers_model("hf_gpt2")
    g = capture_fx(module, (ids,)).copy()
    for name in [k for k in g.initializers if ".h.1." in k and "c_proj" in k]:
        g.initializers[name][...] = 0.0
    calib = [{"input_ids": np.random.default_rng(s).integers(0, 100, (1, 8))} for s in range(4)]
    result = sparsec.prune(g, remove_layers=1, calibration=calib)
    details = result.passes[0].details
    assert details["removed"] == [1] and details["angular_distance"][1] == 0.0
    assert not any(".h.1." in k for k in result.graph.initializers)
    assert result.after.params < result.before.params
    feeds = {"input_ids": ids.numpy()}
    np.testing.assert_allclose(reference.run(result.graph, feeds)[0], reference.run(g, feeds)[0],
                               rtol=1e-5, atol=1e-5)


def test_removing_a_layer_keeps_bert_runnable_with_its_mask_input(zoo_models):
    g = load_onnx(zoo_models("hf_bert"))
    result = sparsec.prune(g, remove_layers=1)
    assert result.passes[0].details["layers_found"] == 2
    assert result.graph.op_histogram()["Softmax"] == g.op_histogram()["Softmax"] // 2
    out = reference.run(result.graph, reference.random_inputs(result.graph))
    assert out[0].shape == reference.run(g, reference.random_inputs(g))[0].shape
    with pytest.raises(BadOptionError, match="2 removable residual layers"):
        sparsec.prune(g, remove_layers=2)


def test_angular_distance():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert angular_distance(a, a) == 0.0
    assert angular_distance(a, -a) == pytest.approx(1.0)
    assert angular_distance(a, np.array([[0.0, 1.0], [3.0, 0.0]])) == pytest.approx(0.5)


def test_fit_linear_recovers_a_linear_map():
    from sparsec.passes.layer_removal import fit_linear

    rng = np.random.default_rng(0)
    t = rng.standard_normal((6, 6))
    h_in = [rng.standard_normal((3, 10, 6)) for _ in range(4)]
    got = fit_linear(h_in, [h @ t for h in h_in], ridge=0.0)
    np.testing.assert_allclose(got, t, atol=1e-8)


def test_linear_replacement_beats_plain_removal_on_held_out_data(zoo_models):
    g = load_onnx(zoo_models("hf_vit"))
    calib = [reference.random_inputs(g, seed=s) for s in range(8)]
    plain = sparsec.prune(g, remove_layers=1, calibration=calib)
    linear = sparsec.prune(g, remove_layers=1, replace_linear=True, calibration=calib)
    assert linear.graph.op_histogram()["MatMul"] == plain.graph.op_histogram()["MatMul"] + 1
    assert linear.fidelity.max_abs_err < plain.fidelity.max_abs_err
    out = reference.run(linear.graph, calib[0])
    assert out[0].shape == reference.run(g, calib[0])[0].shape


@pytest.mark.parametrize("name, layer_list", [("hf_gpt2", "model.transformer.h"),
                                              ("hf_llama_gqa", "model.model.layers")])
def test_torch_modules_lose_the_removed_layer(name, layer_list):
    import torch

    module, example = zoo.transformers_model(name)
    pruned, result = sparsec.prune_module(module, example, remove_layers=1)
    assert len(pruned.get_submodule(layer_list)) == 1
    assert len(module.get_submodule(layer_list)) == 2                 # the input is untouched
    with torch.no_grad():
        got = pruned(*example)
    want = reference.run(result.graph, {result.graph.inputs[0]: example[0].numpy()})[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama_gqa"])
def test_torch_layer_removal_renumbers_cache_slots_and_config(name):
    """The layers left count from 0 (``layer_idx`` is the KV-cache slot) and the config says
    how many there are, so cached decoding computes what a full forward computes."""
    import torch

    module, (ids,) = zoo.transformers_model(name)
    pruned, _ = sparsec.prune_module(module, (ids,), remove_layers=1)
    lm = pruned.model
    assert lm.config.num_hidden_layers == 1 and module.model.config.num_hidden_layers == 2
    assert [m.layer_idx for m in lm.modules() if isinstance(getattr(m, "layer_idx", None),
                                                            int)] == [0]
    with torch.no_grad():
        past = lm(ids[:, :-1], use_cache=True).past_key_values
        step = lm(ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
        full = lm(ids).logits[:, -1]
    np.testing.assert_allclose(step.numpy(), full.numpy(), rtol=1e-4, atol=1e-5)
