"""Models as they come in the wild: TorchScript-exported (``dynamo=False``) transformers files,
load-time folding (exact, per model), and files that must be refused with a clear error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import realworld
import zoo
from onnx import TensorProto, helper

import sparsec
from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.errors import InvalidModelError
from sparsec.frontends.onnx import infer_shapes, load_onnx
from sparsec.ir.onnx_io import from_onnx
from sparsec.passes.layer_removal import find_blocks, find_layers

_CACHE: dict = {}


def legacy(name: str) -> onnx.ModelProto:
    if name not in _CACHE:
        _CACHE[name] = realworld.build(name, "legacy")
    return _CACHE[name]


def unfolded(proto: onnx.ModelProto):
    """The graph as the file has it (no normalization): what the analysis saw before."""
    return from_onnx(infer_shapes(proto))


def assert_same_function(proto: onnx.ModelProto, graph) -> None:
    feeds = reference.random_inputs(graph, seed=3)
    want = reference.run(proto, feeds)
    got = reference.run(graph, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama", "mobilenetv2", "swin", "albert",
                                  "efficientnet"])
def test_legacy_exports_fold_exactly(name):
    proto = legacy(name)
    graph = load_onnx(proto)
    report = graph.notes["normalize"]
    assert sum(report["folded"].values()) > 0
    ops = graph.op_histogram()
    assert "Shape" not in ops and "ConstantOfShape" not in ops
    assert len(graph.nodes) < len(unfolded(proto).nodes)
    assert_same_function(proto, graph)


@pytest.mark.slow
def test_legacy_mobilenetv2_prunes_like_the_dynamo_export():
    proto = legacy("mobilenetv2")
    before = DependencyGraph(unfolded(proto)).groups
    assert sum(g.prunable for g in before) <= 2          # run-time pads froze nearly all
    graph = load_onnx(proto)
    assert graph.notes["normalize"]["pads_fused"] > 0 and "Pad" not in graph.op_histogram()
    result = sparsec.prune(graph, ratio=0.5)
    assert result.after.params / result.before.params <= 0.3
    out = reference.run(result.graph, reference.random_inputs(result.graph))[0]
    assert np.isfinite(out).all()


@pytest.mark.slow
def test_legacy_albert_shared_weights_become_prunable():
    graph = load_onnx(legacy("albert"))
    groups = DependencyGraph(graph).groups
    assert any(g.prunable for g in groups)
    result = sparsec.prune(graph, ratio=0.5)
    assert result.after.params < result.before.params


@pytest.mark.slow
def test_legacy_bert_compiles_and_validates(tmp_path):
    path = tmp_path / "bert.onnx"
    onnx.save(legacy("bert"), str(path))
    sparsec.compile(path, tmp_path / "pkg", target="host", ratio=0.25)
    assert sparsec.validate(tmp_path / "pkg").ok


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_legacy_layers_are_found(name):
    """Layer removal and FFN fusion see every layer of a TorchScript export (run-time mask
    and shape subgraphs hid all but one before folding)."""
    graph = load_onnx(legacy(name))
    blocks = find_blocks(graph)
    assert len(find_layers(graph, blocks)) == 2
    assert "".join("A" if b.attention else "F" for b in blocks) == "AFAF"


# ----------------------------------------------------------------------------- normalize
def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    """A model from ValueInfos and initializers of any dtype."""
    graph = helper.make_graph(nodes, "m", inputs, outputs,
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fold_keeps_a_large_broadcast_computed():
    """A constant that would be bigger than what it is made of (an SxS mask) stays computed;
    the small shape vector it is made from is folded."""
    s = 512
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, s])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [s, s])
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Concat", ["sh1", "sh1"], ["dims"], axis=0),
             helper.make_node("Slice", ["sh", "one", "two"], ["sh1"]),
             helper.make_node("ConstantOfShape", ["dims"], ["mask"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Add", ["mask", "x"], ["y"])]
    nodes = [nodes[0], nodes[2], nodes[1], nodes[3], nodes[4]]
    inits = {"one": np.array([1], np.int64), "two": np.array([2], np.int64)}
    g = load_onnx(_model(nodes, [x], [y], inits))
    assert g.op_histogram() == {"Add": 1, "ConstantOfShape": 1}
    assert g.notes["normalize"]["kept_large"] == 1
    assert max(a.size for a in g.initializers.values()) < s * s
    feeds = {"x": np.random.default_rng(0).standard_normal((1, s)).astype(np.float32)}
    np.testing.assert_allclose(reference.run(g, feeds)[0], 1.0 + feeds["x"] + np.zeros((s, s)))


def test_pad_fuses_into_conv_exactly():
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "w"], ["y"], pads=[1, 0, 0, 1])]
    inits = {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 0], np.int64),
             "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    proto = _model(nodes, [x], [y], inits)
    g = load_onnx(proto)
    assert g.op_histogram() == {"Conv": 1}
    assert g.nodes[0].attrs["pads"] == [2, 2, 2, 1]
    assert_same_function(proto, g)


def test_nonzero_or_reflect_pad_is_not_fused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = np.ones((4, 3, 3, 3), np.float32)
    for attrs, extra in (({"mode": "reflect"}, []), ({}, ["val"])):
        nodes = [helper.make_node("Pad", ["x", "pads", *extra], ["p"], **attrs),
                 helper.make_node("Conv", ["p", "w"], ["y"])]
        inits = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w": w,
                 "val": np.array(0.5, np.float32)}
        g = load_onnx(_model(nodes, [x], [y], inits))
        assert g.op_histogram() == {"Conv": 1, "Pad": 1}


def test_normalize_merges_one_weight_transposed_per_layer():
    """ALBERT-style sharing: every layer transposes the same weight; after folding, one
    constant serves all of them (not one copy per layer)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = []
    prev = "x"
    for i in range(3):
        nodes += [helper.make_node("Identity", ["w"], [f"wi{i}"]),
                  helper.make_node("Transpose", [f"wi{i}"], [f"wt{i}"], perm=[1, 0]),
                  helper.make_node("MatMul", [prev, f"wt{i}"], [f"h{i}"]),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}" if i < 2 else "y"])]
        prev = f"r{i}"
    proto = _model(nodes, [x], [y], {"w": rng.standard_normal((8, 8)).astype("f4")})
    g = load_onnx(proto)
    assert g.op_histogram() == {"MatMul": 3, "Relu": 3}
    weights = {n.inputs[1] for n in g.nodes if n.op_type == "MatMul"}
    assert len(weights) == 1 and g.param_count() == 64
    assert_same_function(proto, g)


# ----------------------------------------------------------------------------- the analysis
def _computed_shape_model(op: str):
    """``op`` whose shape / pads input is computed from an integer graph input's values."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1, 1])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 4, 1, 1)).astype("f4"),
             "w2": rng.standard_normal((4, 4, 1, 1)).astype("f4")}
    inits["one"] = np.ones(4, np.int64)
    last = helper.make_node(op, ["h", "n1"], ["e"])
    if op == "Pad":
        inits["z"] = np.zeros(4, np.int64)
        last = helper.make_node("Pad", ["h", "nn"], ["e"])
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]),
             helper.make_node("Add", ["n", "one"], ["n1"])]
    if op == "Pad":
        nodes.append(helper.make_node("Concat", ["z", "n"], ["nn"], axis=0))
    nodes += [last, helper.make_node("Conv", ["e", "w2"], ["y"])]
    return _model(nodes, [x, n], [y], inits)


@pytest.mark.parametrize("op", ["Expand", "Pad"])
def test_computed_expand_or_pad_freezes_both_sides(op):
    proto = _computed_shape_model(op)
    graph = from_onnx(infer_shapes(proto))
    groups = DependencyGraph(graph).groups
    first = next(g for g in groups if "w" in g.sources)
    assert not first.prunable
    assert any("computed at run time" in r for r in first.frozen)
    # both sides: no prunable group reaches the op's input or output
    for g in groups:
        if {m.name for m in g.tensors} & {"h", "e"}:
            assert not g.prunable


# ----------------------------------------------------------------------------- bad files
def _gemm_with(**attrs):
    m = zoo.gemm_mlp()
    node = next(n for n in m.graph.node if n.op_type == "Gemm")
    kept = [a for a in node.attribute if a.name not in attrs]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in attrs.items()])
    return m


def _conv_model(**attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    return _model([node], [x], [y], {"w": np.ones((4, 4, 3, 3), np.float32)})


def _simple(op, shape, **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _model([helper.make_node(op, ["x"], ["y"], **attrs)], [x], [y], {})


def _mixed_types(op):
    """A float32 input meets a float64 weight in one node (ONNX Runtime refuses the file)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inputs = ["x", "w"] if op != "Concat" else ["x", "x", "w"]
    node = helper.make_node(op, inputs, ["y"], **({"axis": 0} if op == "Concat" else {}))
    return _model([node], [x], [y], {"w": np.ones((4, 4) if op != "Add" else (2, 4))})


BAD_FILES = {
    "matmul float and double": (lambda: _mixed_types("MatMul"), "'x' .float32. and 'w' .float64."),
    "add float and double": (lambda: _mixed_types("Add"), "one element type"),
    "concat float and double": (lambda: _mixed_types("Concat"), "one element type"),
    "gemm transB 7": (lambda: _gemm_with(transB=7), "transB is 7"),
    "gemm transA -1": (lambda: _gemm_with(transA=-1), "transA is -1"),
    "conv negative pads": (lambda: _conv_model(pads=[-1, 0, 0, 0]), "pads"),
    "conv zero stride": (lambda: _conv_model(strides=[0, 1]), "strides"),
    "conv kernel_shape vs weight": (lambda: _conv_model(kernel_shape=[2, 2]), "kernel_shape"),
    "conv group": (lambda: _conv_model(group=3), "group"),
    "conv auto_pad": (lambda: _conv_model(auto_pad="SOMETIMES"), "auto_pad"),
    "softmax axis": (lambda: _simple("Softmax", [2, 3], axis=5), "axis"),
    "transpose perm": (lambda: _simple("Transpose", [2, 3], perm=[0, 0]), "perm"),
    "reduce keepdims": (lambda: _simple("ReduceMax", [2, 3], keepdims=3), "keepdims"),
    "maxpool kernel": (lambda: _simple("MaxPool", [1, 2, 4, 4], kernel_shape=[0, 2]),
                       "kernel_shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_attribute_values_are_refused(case, tmp_path):
    make, needle = BAD_FILES[case]
    path = tmp_path / "bad.onnx"
    onnx.save(make(), str(path))
    with pytest.raises(InvalidModelError, match=needle) as info:
        sparsec.load(path)
    assert "\n" not in str(info.value)


def test_checker_failure_is_one_line(tmp_path):
    m = zoo.gemm_mlp()
    m.graph.node[0].input[1] = "no_such_tensor"
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    with pytest.raises(InvalidModelError) as info:
        sparsec.load(path)
    assert "\n" not in str(info.value)


def test_a_pruned_graph_onnx_runtime_refuses_is_our_bug_not_the_input():
    """The input ran; if the surgery's output does not, sparsec says so (exit 70), it does
    not call the user's model invalid."""
    from sparsec.passes import surgery

    graph = load_onnx(zoo.conv_bn_relu_conv())
    broken = graph.copy()
    broken.nodes[0].inputs[1] = broken.nodes[-1].outputs[0]      # a cycle
    with pytest.raises(RuntimeError, match="pruned graph"):
        surgery.reinfer_shapes(broken)


@pytest.mark.parametrize("op, attrs, becomes", [
    ("AveragePool", {"kernel_shape": [1280, 1280], "strides": [1280, 1280], "ceil_mode": 1},
     "GlobalAveragePool"),                                   # EfficientNet's head
    ("AveragePool", {"kernel_shape": [2, 3]}, "GlobalAveragePool"),
    ("MaxPool", {"kernel_shape": [4, 4], "strides": [4, 4], "ceil_mode": 1}, "GlobalMaxPool"),
    ("AveragePool", {"kernel_shape": [4, 4], "strides": [4, 4], "ceil_mode": 1,
                     "count_include_pad": 1}, "GlobalAveragePool"),   # torch's default
    ("AveragePool", {"kernel_shape": [3, 4], "pads": [1, 1, 0, 0]}, "AveragePool"),  # padded
])
def test_whole_map_pools_become_global_pools(op, attrs, becomes):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    proto = _model([helper.make_node(op, ["x"], ["y"], **attrs)], [x], [y], {})
    g = load_onnx(proto)
    assert [n.op_type for n in g.nodes] == [becomes]
    assert_same_function(proto, g)


@pytest.mark.slow
def test_conv1d_layers_run_on_the_conv_kernels(tmp_path):
    """Speech models' Conv1d (stride 2, padding, groups) compile as 2-D convs over a unit
    height, on sparsec's conv kernels, and match ONNX Runtime."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], kernel_shape=[3], pads=[1, 1],
                              strides=[2]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[5], pads=[2, 2],
                              group=2, dilations=[1])]
    inits = {"w1": rng.standard_normal((16, 8, 3)).astype("f4"),
             "b1": rng.standard_normal(16).astype("f4"),
             "w2": rng.standard_normal((16, 8, 5)).astype("f4")}
    path = tmp_path / "conv1d.onnx"
    onnx.save(_model(nodes, [x], [y], inits), str(path))
    manifest = sparsec.compile(path, tmp_path / "pkg", target="host", keep_onnx=True)
    assert manifest["compile"]["kernels"].get("conv2d_nchw_packed", 0) >= 1
    assert sparsec.validate(tmp_path / "pkg", seed=1).ok        # new inputs: needs model.onnx


def test_adding_zeros_and_multiplying_by_ones_are_removed_unless_they_broadcast():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Add", ["zeros", "x"], ["a"]),        # zero mask, either side
             helper.make_node("Mul", ["a", "one"], ["b"]),
             helper.make_node("Div", ["one", "b"], ["c"]),           # 1 / b: not neutral
             helper.make_node("Add", ["c", "bias"], ["d"]),          # a zero bias: a parameter
             helper.make_node("Add", ["d", "wide"], ["y"])]          # broadcasts: stays
    inits = {"zeros": np.zeros((2, 3), np.float32), "one": np.ones((), np.float32),
             "bias": np.zeros(3, np.float32), "wide": np.zeros((4, 2, 3), np.float32)}
    proto = _model(nodes, [x], [y], inits)
    g = load_onnx(proto)
    assert [n.op_type for n in g.nodes] == ["Div", "Add", "Add"]
    assert g.notes["normalize"]["neutral_ops"] == 2
    assert_same_function(proto, g)
