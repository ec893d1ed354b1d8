"""IR and frontends: lossless ONNX round trip on many graphs, shape handling, torch capture."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import zoo

from sparsec import reference
from sparsec.errors import BadOptionError, DynamicShapeError, UnsupportedOpError
from sparsec.frontends.onnx import load_onnx, parse_input_shapes
from sparsec.frontends.fx import capture_fx
from sparsec.frontends.torch import capture
from sparsec.ir.onnx_io import to_onnx


@pytest.mark.parametrize("name", zoo.ALL)
def test_onnx_round_trip_is_exact(zoo_models, name):
    original = zoo_models(name)
    graph = load_onnx(original)
    rebuilt = to_onnx(graph)
    onnx.checker.check_model(rebuilt)
    feeds = reference.random_inputs(graph, seed=1)
    expected = reference.run(original, feeds)
    actual = reference.run(rebuilt, feeds)
    assert len(expected) == len(actual) == len(graph.outputs)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
    # every tensor has a static shape; weights are numpy arrays
    assert all(all(isinstance(d, int) and d >= 0 for d in v.shape) for v in graph.values.values())
    assert all(isinstance(a, np.ndarray) for a in graph.initializers.values())


def test_round_trip_does_not_modify_input(zoo_models):
    original = zoo_models("conv_bn_relu_conv")
    before = original.SerializeToString()
    load_onnx(original)
    assert original.SerializeToString() == before


def test_constant_nodes_become_initializers():
    m = zoo.make_model(
        [onnx.helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(
            np.arange(4, dtype=np.float32))),
         onnx.helper.make_node("Add", ["x", "c"], ["y"])],
        [("x", [2, 4])], ["y"], {})
    g = load_onnx(m)
    assert [n.op_type for n in g.nodes] == ["Add"]
    np.testing.assert_array_equal(g.initializers["c"], np.arange(4, dtype=np.float32))


def test_dynamic_input_is_refused_then_fixed_by_input_shapes():
    m = zoo.gemm_mlp()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(DynamicShapeError, match="x\\[batchx16\\].*--input-shapes"):
        load_onnx(m)
    g = load_onnx(m, parse_input_shapes("x:7x16"))
    assert g.shape("x") == (7, 16) and g.shape("y") == (7, 5)


@pytest.mark.parametrize("text, message", [
    ("x:7", "rank 1"), ("nope:1x16", "unknown input"), ("x:0x16", "positive"),
    ("x", "NAME:D1xD2"), ("x:8x15", "model fixes 16")])
def test_bad_input_shapes(text, message):
    m = zoo.gemm_mlp()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(BadOptionError, match=message):
        load_onnx(m, parse_input_shapes(text))


def test_unsupported_ops_are_all_listed():
    nodes = [onnx.helper.make_node("Relu", ["x"], ["a"]),
             onnx.helper.make_node("Hypot", ["a"], ["b"], domain="com.example"),
             onnx.helper.make_node("NonMaxSuppression", ["b"], ["c"]),
             onnx.helper.make_node("NonMaxSuppression", ["c"], ["y"])]
    m = zoo.make_model(nodes, [("x", [2, 4])], ["y"], {})
    with pytest.raises(UnsupportedOpError) as info:
        load_onnx(m)
    assert info.value.ops == {"NonMaxSuppression": 2, "com.example::Hypot": 1}
    assert "NonMaxSuppression (x2)" in str(info.value) and "Hypot" in str(info.value)


def test_shared_constant_initializers_are_untied_exactly():
    """Exporters dedupe equal initializers (all-zero biases); the frontend gives each user its
    own copy so that groups stay independent, while varying-valued ties stay shared."""
    r = np.random.default_rng(0)
    inits = {"w1": r.standard_normal((4, 8)), "w2": r.standard_normal((8, 8)),
             "zero": np.zeros(8), "tied": r.standard_normal(8)}
    nodes = [onnx.helper.make_node("MatMul", ["x", "w1"], ["a"]),
             onnx.helper.make_node("Add", ["a", "zero"], ["b"]),
             onnx.helper.make_node("Add", ["b", "tied"], ["c"]),
             onnx.helper.make_node("MatMul", ["c", "w2"], ["d"]),
             onnx.helper.make_node("Add", ["d", "zero"], ["e"]),
             onnx.helper.make_node("Add", ["e", "tied"], ["y"])]
    m = zoo.make_model(nodes, [("x", [2, 4])], ["y"], inits)
    g = load_onnx(m)
    adds = [n for n in g.nodes if n.op_type == "Add"]
    assert adds[0].inputs[1] == "zero" and adds[2].inputs[1] != "zero"
    assert adds[1].inputs[1] == adds[3].inputs[1] == "tied"
    feeds = reference.random_inputs(g)
    np.testing.assert_array_equal(reference.run(g, feeds)[0], reference.run(m, feeds)[0])


def test_torch_capture_matches_module_and_names_parameters():
    module, example = zoo.torch_model("torch_rescnn")
    g = capture(module, example)
    assert module.training is False
    with torch.no_grad():
        expected = module(*example).numpy()
    out = reference.run(g, {g.inputs[0]: example[0].numpy()})[0]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert "fc.weight" in g.initializers and "stem.weight" in g.initializers
    assert g.param_count() <= sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("frontend", [capture, capture_fx])
def test_torch_capture_restores_each_submodules_mode(frontend):
    module, example = zoo.torch_model("torch_rescnn")
    module.train()
    frozen = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()                           # a mixed-mode module, as in a wrapped HF model
    frontend(module, example)
    assert module.training is True and frozen.training is False


def test_capture_and_onnx_frontend_give_the_same_ir(zoo_files):
    module, example = zoo.torch_model("torch_depthwise")
    a = capture(module, example)
    b = load_onnx(zoo_files("torch_depthwise"))
    assert a.op_histogram() == b.op_histogram()
    assert {k: v.shape for k, v in a.initializers.items()} == \
        {k: v.shape for k, v in b.initializers.items()}
