"""Dynamic shapes: a BERT encoder and a Llama decoder (prefill, logits) exported with dynamic
batch and sequence compile once and match ONNX Runtime at every size in the range; sizes
outside it get one clear error; fixed-shape models compile as before."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

from sparsec.package import Package
from sparsec import api, cli, reference
from sparsec.errors import BadOptionError, DynamicShapeError
from sparsec.frontends.dynamic import parse_dynamic, check_sizes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZES = [(b, s) for b in (1, 8) for s in (1, 7, 64, 128, 384)]


class _Out(torch.nn.Module):
    """The model's one output tensor (``key``) for ids and a mask."""

    def __init__(self, model, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, ids, mask):
        extra = {"use_cache": False} if self.key == "logits" else {}
        return getattr(self.model(input_ids=ids, attention_mask=mask, **extra), self.key)


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=512)
    return _Out(transformers.BertModel(cfg).eval(), "last_hidden_state")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, max_position_embeddings=512)
    return _Out(transformers.LlamaForCausalLM(cfg).eval(), "logits")


def _example():
    return torch.ones((2, 16), dtype=torch.int64), torch.ones((2, 16), dtype=torch.int64)


def export_bert(path) -> None:
    """A small BERT (2 layers, 4 heads, hidden 32, vocabulary 120) through the legacy exporter
    with ``dynamic_axes``: inputs input_ids and mask [batch_size, sequence_length], output
    hidden [batch_size, sequence_length, 32]."""
    axes = {0: "batch_size", 1: "sequence_length"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_bert(), _example(), str(path), input_names=["input_ids", "mask"],
                          output_names=["hidden"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": axes, "mask": axes, "hidden": axes})


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    """BERT through the legacy exporter with ``dynamic_axes``."""
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    export_bert(path)
    return path


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    """Llama through the dynamo exporter with ``dynamic_shapes``."""
    from torch.export import Dim

    path = tmp_path_factory.mktemp("llama") / "llama.onnx"
    batch, seq = Dim("batch", min=1, max=32), Dim("seq", min=1, max=512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_llama(), _example(), str(path), input_names=["input_ids", "mask"],
                          output_names=["logits"], dynamo=True, verbose=False,
                          dynamic_shapes={"ids": {0: batch, 1: seq},
                                          "mask": {0: batch, 1: seq}})
    return path


def _feeds(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[0, : seq // 3] = 0           # left padding in one row: the mask path is exercised
    return {"input_ids": rng.integers(0, 120, (batch, seq)).astype(np.int64), "mask": mask}


def _check_all_sizes(pkg, model_path):
    session = reference.session(onnx.load(str(model_path)))
    for i, (batch, seq) in enumerate(SIZES):
        feeds = _feeds(batch, seq, i)
        expected = session.run(None, feeds)[0]
        got = api.run(pkg, feeds)
        out = next(iter(got.values()))
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                                   err_msg=f"batch {batch}, seq {seq}")


def test_bert_legacy_export_compiles_once_for_all_sizes(bert_onnx, tmp_path, capsys):
    pkg = tmp_path / "bert"
    before = bert_onnx.read_bytes()
    assert cli.main(["compile", str(bert_onnx), "-o", str(pkg), "-q",
                     "--dynamic", "batch_size=1..8,sequence_length=1..384"]) == 0
    assert bert_onnx.read_bytes() == before             # the input model is never modified
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["dynamic"]["ranges"] == {"batch_size": [1, 8],
                                             "sequence_length": [1, 384]}
    # checked at both ends of every range while compiling
    checked = [c["sizes"] for c in manifest["dynamic"]["checked"]]
    assert {"batch_size": 1, "sequence_length": 1} in checked
    assert {"batch_size": 8, "sequence_length": 384} in checked
    assert manifest["inputs"][0]["dims"] == [["batch_size", 1, 8], ["sequence_length", 1, 384]]
    # every matmul on one of our kernels with run-time extents: the projections and FFN on
    # the packed dense kernel, attention's two products on batch_matmul
    run_time = [d for d in manifest["compile"]["decisions"]
                if d.get("rows") == "run time" and d["op"] == "matmul"]
    chosen = [d["chosen"] for d in run_time]
    assert chosen.count("dense_packed") == 12 and chosen.count("batch_matmul") == 4
    assert len(run_time) == len([d for d in manifest["compile"]["decisions"]
                                 if d["op"] == "matmul"])
    assert any("residual" in d["epilogue"] for d in run_time if d["chosen"] == "dense_packed")
    assert {"batch": "batch_size * 4", "M": "sequence_length", "K": 8,
            "N": "sequence_length"} in [d["shape"] for d in run_time]
    assert manifest["compile"]["kernels"]["softmax_rows"] == 2    # rows of run-time length
    _check_all_sizes(pkg, bert_onnx)
    # the reference pairs of the other checked sizes are stored (a few hundred KB each)
    stored = [c for c in manifest["dynamic"]["checked"] if c.get("reference")]
    assert len(stored) == len(checked) - 1
    assert {"batch_size": 8, "sequence_length": 384} in [c["sizes"] for c in stored]
    pairs = Package.load(pkg).reference_pairs()
    for sizes, feeds, want in pairs:
        assert feeds["input_ids"].shape == (sizes["batch_size"], sizes["sequence_length"])
        got = next(iter(api.run(pkg, feeds).values()))
        np.testing.assert_allclose(got, next(iter(want.values())), rtol=1e-4, atol=1e-4)
    report = api.validate(pkg)
    n_sizes = len(check_sizes({"batch_size": (1, 8), "sequence_length": (1, 384)}))
    assert report.ok and len(report.outputs) == n_sizes + len(pairs)
    assert sum(o["name"].endswith("(stored pair)") for o in report.outputs) == len(pairs)

    # intermediates planned once at the largest sizes (Relax's planner with the ranges'
    # upper bounds): no allocation per distinct size; attention's scores at 8 x 4 x 384 x 384
    # floats are the largest buffer
    memory = manifest["compile"]["memory"]
    assert memory["at"] == {"batch_size": 8, "sequence_length": 384}
    assert 8 * 4 * 384 * 384 * 4 <= memory["planned_bytes"] < 40 * 8 * 4 * 384 * 384
    assert memory["per_call_allocations"] == 1                   # the output
    capsys.readouterr()
    assert cli.main(["inspect", str(pkg)]) == 0
    out = capsys.readouterr().out
    assert "input_ids [batch_size=1..8, sequence_length=1..384]" in out
    assert f"memory   {memory['planned_bytes']:,} bytes" in out

    # outside the range: one line, the dynamic-shape exit code, no output written
    np.savez(tmp_path / "long.npz", **_feeds(1, 385, 0))
    code = cli.main(["run", str(pkg), "--inputs", str(tmp_path / "long.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == DynamicShapeError.exit_code and len(err) == 1
    assert "sequence_length = 385" in err[0] and "1..384" in err[0]
    with pytest.raises(DynamicShapeError, match="batch_size = 9"):
        api.run(pkg, _feeds(9, 4, 0))
    with pytest.raises(BadOptionError, match="expects"):   # a fixed axis is still fixed
        api.run(pkg, {"input_ids": np.ones((1, 4, 1), np.int64),
                      "mask": np.ones((1, 4), np.int64)})


def test_llama_dynamo_export_prefill_logits(llama_onnx, tmp_path):
    pkg = tmp_path / "llama"
    manifest = api.compile(llama_onnx, pkg, dynamic={"batch": (1, 8), "seq": (1, 384)})
    kernels = manifest["compile"]["kernels"]
    assert kernels["dense_packed"] >= 14 and kernels["batch_matmul"] == 4  # 7 a layer + head
    _check_all_sizes(pkg, llama_onnx)


def test_dynamic_names_are_checked(bert_onnx, tmp_path):
    with pytest.raises(BadOptionError, match=r"unknown dim\(s\) seq .*batch_size, "
                                             r"sequence_length"):
        api.compile(bert_onnx, tmp_path / "p", dynamic="batch_size=1..8,seq=1..64")
    with pytest.raises(DynamicShapeError, match="sequence_length"):
        api.compile(bert_onnx, tmp_path / "p", dynamic={"batch_size": (1, 8)})
    with pytest.raises(BadOptionError, match="give --calib"):      # prunes at its sizes
        api.compile(bert_onnx, tmp_path / "p", dynamic={"batch_size": (1, 8)}, ratio=0.5)
    with pytest.raises(BadOptionError, match="--tune"):
        api.compile(bert_onnx, tmp_path / "p", dynamic={"batch_size": (1, 8)}, tune=10)
    # BERT has 512 positions: a range past them fails in ONNX Runtime, before compiling
    with pytest.raises(DynamicShapeError, match="sequence_length=600 in ONNX Runtime"):
        api.compile(bert_onnx, tmp_path / "p",
                    dynamic={"batch_size": (1, 2), "sequence_length": (1, 600)})
    assert not (tmp_path / "p").exists()
    for bad in ("batch_size=8..1", "batch_size=0..4", "batch_size:1-8"):
        with pytest.raises(BadOptionError):
            parse_dynamic(bad)
    assert parse_dynamic("b=1..32, s=1..512") == {"b": (1, 32), "s": (1, 512)}


def test_fixed_shape_compile_takes_the_static_kernels(bert_onnx, tmp_path):
    """The same model pinned to one shape: every matmul on a static kernel (the attention
    products on batch_matmul), none of the run-time-rows path."""
    manifest = api.compile(bert_onnx, tmp_path / "fixed",
                           input_shapes="input_ids:2x16,mask:2x16")
    decisions = [d for d in manifest["compile"]["decisions"] if d["op"] == "matmul"]
    assert "dynamic" not in manifest
    assert not any(d.get("rows") == "run time" for d in decisions)
    assert [d["chosen"] for d in decisions].count("dense_packed") == 12
    assert [d["chosen"] for d in decisions].count("batch_matmul") == 4


def test_cnn_with_dynamic_batch(tmp_path):
    """Convolutions with a run-time batch run the packed conv kernel, the 1x1 one the pointwise
    kernel (bias, skip connection and ReLU folded in); the output, declared without a shape, gets its dims from the runs."""
    import zoo

    model = zoo.residual_convs()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    pkg = tmp_path / "pkg"
    manifest = api.compile(path, pkg, dynamic="N=1..16")
    convs = [d for d in manifest["compile"]["decisions"] if d["op"] == "conv2d"]
    assert [d["chosen"] for d in convs] == ["conv2d_nchw_packed"] * 3 + ["conv1x1_nchw"]
    assert ["bias", "residual", "relu"] in [d["epilogue"] for d in convs]
    assert manifest["outputs"][0]["dims"] == [["N", 1, 16], None, None, None]
    session = reference.session(model)
    for n in (1, 5, 16):
        x = np.random.default_rng(n).standard_normal((n, 3, 6, 6)).astype(np.float32)
        np.testing.assert_allclose(api.run(pkg, {"x": x})["y"], session.run(None, {"x": x})[0],
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(DynamicShapeError, match="N = 17"):
        api.run(pkg, {"x": np.zeros((17, 3, 6, 6), np.float32)})


@pytest.mark.parametrize("name,want", [
    ("grouped_and_depthwise", {"conv1x1_nchw", "depthwise_nchw", "grouped_conv2d_nchw"}),
    ("small_map_convs", {"conv2d_nchw_packed/width_vectorized"}),
])
def test_conv_kernels_with_dynamic_batch(name, want, tmp_path):
    """Pointwise, depthwise, grouped and small-map convs with a run-time batch take the static
    case's kernels (built with a symbolic N), not the generic schedule or the channel-blocked
    conv, and match ONNX Runtime at both ends of the range."""
    import zoo

    if name == "small_map_convs":     # 3x3 convs on a 16-wide map: the width-vectorized tile
        rng = np.random.default_rng(3)
        nodes = [onnx.helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1] * 4),
                 onnx.helper.make_node("Relu", ["c"], ["r"]),
                 onnx.helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1] * 4, strides=[2, 2])]
        model = zoo.make_model(nodes, [("x", [1, 6, 16, 16])], ["y"],
                               {"w1": rng.standard_normal((8, 6, 3, 3)),
                                "w2": rng.standard_normal((5, 8, 3, 3))})
    else:
        model = getattr(zoo, name)()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    pkg = tmp_path / "pkg"
    manifest = api.compile(path, pkg, dynamic="N=1..9")
    convs = [d for d in manifest["compile"]["decisions"] if d["op"] == "conv2d"]
    chosen = {d["chosen"] + ("/width_vectorized" if d["shape"]["variant"] == "width_vectorized"
                             else "") for d in convs}
    assert chosen == want, chosen
    assert all(d.get("rows") == "run time" for d in convs)
    session = reference.session(model)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    for n in (1, 9):
        x = np.random.default_rng(n).standard_normal((n, *shape)).astype(np.float32)
        np.testing.assert_allclose(api.run(pkg, {"x": x})["y"], session.run(None, {"x": x})[0],
                                   rtol=1e-4, atol=1e-4)


def _calib(lengths, batch: int = 2) -> list[dict[str, np.ndarray]]:
    """Calibration batches of different sequence lengths (all tokens real)."""
    rng = np.random.default_rng(1)
    return [{"input_ids": rng.integers(0, 120, (batch, s)).astype(np.int64),
             "mask": np.ones((batch, s), np.int64)} for s in lengths]


def _weight_widths(path) -> dict[str, list[int]]:
    """The query and FFN-in weights' shapes of a BERT ONNX file (by the node reading them)."""
    m = onnx.load(str(path))
    init = {t.name: list(t.dims) for t in m.graph.initializer}
    ends = ("query/MatMul", "intermediate/dense/MatMul")
    return {n.name: init[n.input[1]] for n in m.graph.node if n.op_type == "MatMul"
            and n.input[1] in init and n.name.endswith(ends)}


def test_prune_dynamic_model_keeps_its_dims_then_compiles_dynamic(bert_onnx, tmp_path):
    """Heads and FFN pruned on calibration batches of lengths 5 to 16 (padded to the longest,
    the padding masked); the pruned ONNX keeps batch_size and sequence_length, and compiled
    with --dynamic it matches ONNX Runtime on the pruned model at length 1 and at the maximum."""
    before = bert_onnx.read_bytes()
    pruned = tmp_path / "pruned.onnx"
    calib = _calib((5, 16, 9, 12, 7, 16, 3)) + _calib((6,), batch=4)     # cut into batches of 2
    result = api.prune(bert_onnx, pruned, ratio=0.5, calibration=calib, calib_mask="mask")
    assert bert_onnx.read_bytes() == before
    assert result.graph.shape("input_ids") == (2, 16)        # pruned at the longest length
    # 9 batches of 2 (the batch of 4 cut in two), every 4th held out; the padding left out
    assert result.measured_on.startswith("4 held-out")
    assert "padding left out" in result.measured_on
    model = onnx.load(str(pruned))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)]
    assert dims == [["batch_size", "sequence_length"]] * 2 + [
        ["batch_size", "sequence_length", 32]]
    widths = _weight_widths(pruned)
    assert sorted(map(tuple, widths.values())) == [(32, 16)] * 2 + [(32, 32)] * 2  # 2 of 4 heads
    assert result.passes[0].fidelity.cosine > 0.9

    pkg = tmp_path / "pkg"
    manifest = api.compile(pruned, pkg, dynamic={"batch_size": (1, 2),
                                                 "sequence_length": (1, 128)})
    assert manifest["dynamic"]["checked"][0]["sizes"] == {"batch_size": 1, "sequence_length": 1}
    session = reference.session(model)
    for batch, seq in ((1, 1), (2, 128)):
        feeds = _feeds(batch, seq, seq)
        want = session.run(None, feeds)[0]
        np.testing.assert_allclose(api.run(pkg, feeds)["hidden"], want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())


def test_compile_dynamic_with_ratio_prunes_first(bert_onnx, tmp_path, capsys):
    """``compile --dynamic --ratio``: one step, the manifest has the pruning report."""
    np.savez(tmp_path / "calib.npz", input_ids=_calib((8,), batch=4)[0]["input_ids"],
             mask=np.ones((4, 8), np.int64))
    pkg = tmp_path / "pkg"
    assert cli.main(["compile", str(bert_onnx), "-o", str(pkg), "-q", "--ratio", "0.5",
                     "--calib", str(tmp_path / "calib.npz"), "--calib-mask", "mask",
                     "--dynamic", "batch_size=1..2,sequence_length=1..32"]) == 0
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["prune"]["after"]["params"] < 0.7 * manifest["prune"]["before"]["params"]
    assert manifest["inputs"][0]["dims"] == [["batch_size", 1, 2], ["sequence_length", 1, 32]]
    assert api.validate(pkg).ok        # model.onnx is the pruned dynamic model


def test_pruning_a_dynamic_model_refuses_what_it_cannot_keep_dynamic(bert_onnx, tmp_path):
    with pytest.raises(DynamicShapeError, match="give calibration data"):
        api.prune(bert_onnx, ratio=0.5)
    with pytest.raises(BadOptionError, match="sequence_length 3..9.*--calib-mask"):
        api.prune(bert_onnx, ratio=0.5, calibration=_calib((3, 9)), calib_mask="")
    with pytest.raises(DynamicShapeError, match="changed the graph's structure"):
        api.prune(bert_onnx, remove_layers=1, calibration=_calib((8, 8, 8, 8)))
    with pytest.raises(DynamicShapeError, match="latency budget is measured at one shape"):
        api.prune(bert_onnx, tmp_path / "p.onnx", latency_budget=0.5,
                  calibration=_calib((8, 8, 8, 8)))
    assert not (tmp_path / "p.onnx").exists()
    # a size given with --input-shapes: such a pass still prunes, at that fixed shape
    result = api.prune(bert_onnx, tmp_path / "p.onnx", remove_layers=1,
                       input_shapes="input_ids:2x8,mask:2x8", calibration=_calib((8,) * 4))
    assert result.onnx is None
    assert [d.dim_value for d in onnx.load(str(tmp_path / "p.onnx")).graph.input[0].type
            .tensor_type.shape.dim] == [2, 8]
