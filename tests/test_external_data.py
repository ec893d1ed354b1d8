"""ONNX external data, in and out: a model whose weights are in a data file beside it (torch's
exporter writes one) is read, pruned, written with its weights in ``NAME.data`` when over the
threshold (``SPARSEC_EXTERNAL_DATA_BYTES``; forced to 0 here: a real > 2 GB model takes
minutes and 2x its size in memory), compiled and validated, and ONNX Runtime runs every file
written. The paths a model over protobuf's 2 GB takes (shape inference without the weights,
ONNX Runtime from a file) are forced with a lower limit."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_cli import assert_clean_error, digest, sparsec

from sparsec import api, reference
from sparsec.frontends import external_data
from sparsec.frontends.onnx import has_external_data
from sparsec.ir.onnx_io import to_onnx
from sparsec.package import Package


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small MLP exported by torch with its weights as external data (model.onnx.data)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                 torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                 torch.nn.Linear(64, 10)).eval()
    path = tmp_path_factory.mktemp("torch") / "mlp.onnx"
    torch.onnx.export(module, (torch.randn(2, 32),), str(path), dynamo=True,
                      external_data=True, input_names=["x"])
    proto = onnx.load(str(path), load_external_data=False)
    assert has_external_data(proto)
    [data] = {e.value for t in proto.graph.initializer for e in t.external_data
              if e.key == "location"}
    return path, path.parent / data


def _ort(path, feeds):
    """ONNX Runtime on a file by its path (it reads the external data beside it)."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_external_data_in_prune_out_compile_validate(exported, tmp_path, monkeypatch):
    model, data = exported
    before = digest(model), digest(data)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)}
    dense = _ort(model, feeds)[0]
    # read: the same graph as the model with its weights inside
    inline = tmp_path / "inline.onnx"
    onnx.save(onnx.load(str(model)), str(inline))
    np.testing.assert_array_equal(reference.run(api.load(model), feeds)[0],
                                  reference.run(api.load(inline), feeds)[0])

    monkeypatch.setenv("SPARSEC_EXTERNAL_DATA_BYTES", "0")     # every output goes external
    out = tmp_path / "out" / "pruned.onnx"
    result = api.prune(model, out, ratio=0.5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    written = onnx.load(str(out), load_external_data=False)
    assert has_external_data(written)
    assert (out.parent / "pruned.onnx.data").stat().st_size > out.stat().st_size
    want = reference.run(result.graph, feeds)[0]
    np.testing.assert_allclose(_ort(out, feeds)[0], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, dense, atol=1e-3)                   # it was pruned
    # written again (the same bytes), and read back as input
    first = digest(out), digest(out.parent / "pruned.onnx.data")
    api.prune(model, out, ratio=0.5)
    assert (digest(out), digest(out.parent / "pruned.onnx.data")) == first
    np.testing.assert_allclose(reference.run(api.load(out), feeds)[0], want, rtol=1e-5,
                               atol=1e-6)

    # the package keeps the pruned model as model.onnx + model.onnx.data; validate reads both
    pkg = tmp_path / "pkg"
    api.compile(model, pkg, ratio=0.5, keep_onnx=True)
    manifest = Package.load(pkg).manifest
    assert {"model.onnx", "model.onnx.data"} <= set(manifest["files"])
    # the source's record covers its weights too
    assert manifest["source"]["sha256"] == digest(model)
    assert manifest["source"]["external_data"] == {data.name: digest(data)}
    np.testing.assert_allclose(_ort(pkg / "model.onnx", feeds)[0], want, rtol=1e-5, atol=1e-6)
    report = api.validate(pkg, seed=2)
    assert report.ok and report.against == "onnxruntime"
    assert (digest(model), digest(data)) == before                   # the input untouched

    # a small output replacing a large one leaves no stale data file
    monkeypatch.delenv("SPARSEC_EXTERNAL_DATA_BYTES")
    api.prune(model, out, ratio=0.5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx"]
    np.testing.assert_allclose(_ort(out, feeds)[0], want, rtol=1e-5, atol=1e-6)


def test_external_data_errors(exported, tmp_path):
    model, data = exported
    # an output whose data file would be the input's data file is refused, before any work
    (tmp_path / "a.onnx").write_bytes(model.read_bytes())
    (tmp_path / data.name).write_bytes(data.read_bytes())
    before = digest(tmp_path / data.name)
    output = tmp_path / data.name[:-len(".data")]
    assert output.name != "a.onnx" and not output.exists()
    assert_clean_error(sparsec("prune", tmp_path / "a.onnx", "-o", output, "--ratio", "0.5"), 9,
                       "external data")
    assert digest(tmp_path / data.name) == before and not output.exists()
    # a missing data file: one line, exit 4
    lonely = tmp_path / "lonely" / "m.onnx"
    lonely.parent.mkdir()
    lonely.write_bytes(model.read_bytes())
    assert_clean_error(sparsec("inspect", lonely), 4, "m.onnx")


def test_paths_of_a_model_over_two_gigabytes(exported, monkeypatch):
    """With protobuf's limit lowered below this model, loading infers shapes without the
    weights, ONNX Runtime takes a graph's weights in place (no serialized copy at all) and a
    model from a file with external data: the results are those of the ordinary paths."""
    model, _ = exported
    feeds = {"x": np.ones((2, 32), np.float32)}
    small = api.prune(model, ratio=0.5)
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", 1024)
    assert external_data.too_big(to_onnx(api.load(model)))
    used = []       # the real helpers, counted

    def counting(name):
        real = getattr(external_data, name)

        @contextlib.contextmanager
        def wrapper(model):
            used.append(name)
            with real(model) as value:
                yield value
        return wrapper

    for name in ("without_weights", "saved_with_external_data"):
        monkeypatch.setattr(external_data, name, counting(name))
    big = api.prune(model, ratio=0.5)
    assert "without_weights" in used
    np.testing.assert_array_equal(reference.run(big.graph, feeds)[0],
                                  reference.run(small.graph, feeds)[0])
    # a Graph reaches ONNX Runtime without its weights in any serialized model: in place
    proto, weights = reference.skeleton(big.graph)
    assert not external_data.too_big(proto) and proto.ByteSize() < 4096
    assert sum(a.nbytes for a in weights.values()) > 4096
    # a ModelProto over the limit still goes through a file with external data
    with external_data.saved_with_external_data(to_onnx(big.graph)) as path:
        np.testing.assert_array_equal(_ort(path, feeds)[0], reference.run(big.graph, feeds)[0])
