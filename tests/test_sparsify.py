"""Weight sparsification: every pattern is exactly the pattern it claims, the share of zeros
is the one asked for, LAMP spreads it unevenly but keeps the total, Wanda listens to the
activations, and the sparse model runs, compiles and validates."""

from __future__ import annotations

import numpy as np
import pytest
import zoo

import sparsec
from sparsec import reference
from sparsec.errors import BadOptionError
from sparsec.frontends.onnx import load_onnx
from sparsec.passes.reorder import nonzero_blocks, weight_matrices
from sparsec.passes.sparsify import _view


def _matrices(g):
    return {w: _view(g.initializers[w], axes) for w, axes in weight_matrices(g).items()}


@pytest.mark.parametrize("name", ["torch_rescnn", "hf_bert", "ffn_stack"])
def test_n_m_keeps_at_most_n_of_every_m_inputs(zoo_models, name):
    g = load_onnx(zoo_models(name))
    result = sparsec.prune(g, sparsity_pattern="2:4")
    d = result.passes[0].details
    for w, m in _matrices(result.graph).items():
        if w in d["skipped"]:
            assert m.shape[1] % 4
            continue
        groups = (m != 0).reshape(m.shape[0], m.shape[1] // 4, 4, m.shape[2]).sum(axis=2)
        assert groups.max() <= 2, w
    assert d["achieved"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("name", ["torch_rescnn", "hf_bert"])
def test_blocks_go_whole_and_the_share_is_met(zoo_models, name):
    g = load_onnx(zoo_models(name))
    result = sparsec.prune(g, sparsity=0.75, sparsity_pattern="4x4")
    for w, m in _matrices(result.graph).items():
        o, i = m.shape[:2]
        nz = np.pad((m != 0).any(axis=2), ((0, -o % 4), (0, -i % 4)))
        blocks = nz.reshape(nz.shape[0] // 4, 4, nz.shape[1] // 4, 4)
        dense = _matrices(g)[w] != 0
        # a block is all zero or has every nonzero the dense weight had there
        kept = blocks.any(axis=(1, 3))
        assert int(kept.sum()) <= int(round(0.25 * kept.size)) + 1, w
        full = np.kron(kept, np.ones((4, 4), bool))[:o, :i]
        assert ((m != 0).any(axis=2) == (full & dense.any(axis=2))).all(), w
    assert nonzero_blocks(result.graph, (4, 4)) < nonzero_blocks(g, (4, 4)) / 3


def test_unstructured_rows_and_lamp_total(zoo_models):
    g = load_onnx(zoo_models("torch_rescnn"))
    uniform = sparsec.prune(g, sparsity=0.6).passes[0].details
    lamp = sparsec.prune(g, sparsity=0.6, lamp=True).passes[0].details
    assert uniform["achieved"] == pytest.approx(0.6, abs=0.01)
    assert lamp["achieved"] == pytest.approx(0.6, abs=0.01)
    assert max(lamp["layers"].values()) - min(lamp["layers"].values()) > 0.1   # adaptive
    assert max(uniform["layers"].values()) - min(uniform["layers"].values()) < 0.02


def test_wanda_keeps_the_weights_of_loud_inputs():
    """Scale input feature 0 up 1000x and its weights down 1000x: the function is the same.
    Magnitude drops all of feature 0's weights; Wanda sees through the scaling and keeps them
    as often as any other (about half), and stays much closer to the model."""
    g = load_onnx(zoo.gemm_mlp()).copy()
    g.initializers["w1"] = g.initializers["w1"].copy()
    g.initializers["w1"][:, 0] *= 1e-3
    calib = []
    for s in range(8):
        x = np.random.default_rng(s).standard_normal((4, 16)).astype(np.float32)
        x[:, 0] *= 1e3
        calib.append({"x": x})
    only_w1 = {"sparsity": 0.5, "calibration": calib, "ignore": ["w2", "w3"]}
    mag = sparsec.prune(g, **only_w1)
    wanda = sparsec.prune(g, sparsity_criterion="wanda", **only_w1)
    assert (mag.graph.initializers["w1"][:, 0] == 0).all()
    assert 0.25 <= (wanda.graph.initializers["w1"][:, 0] != 0).mean() <= 0.75
    assert wanda.fidelity.cosine > mag.fidelity.cosine


def test_sparse_model_compiles_and_validates(zoo_files, tmp_path):
    manifest = sparsec.compile(zoo_files("torch_rescnn"), tmp_path / "pkg", sparsity=0.5,
                               sparsity_pattern="2:4", reorder=True)
    names = [p["name"] for p in manifest["prune"]["passes"]]
    assert names == ["sparsify", "reorder-channels"]
    assert sparsec.validate(tmp_path / "pkg").ok


def test_bad_sparsity_options_fail_clearly(zoo_models):
    g = load_onnx(zoo_models("gemm_mlp"))
    for kw, msg in [({"sparsity_pattern": "4x"}, "unknown sparsity pattern"),
                    ({"sparsity": 0.3, "sparsity_pattern": "2:4"}, "fixes sparsity at 0.5"),
                    ({"sparsity": 0.5, "sparsity_criterion": "l2"}, "unknown sparsity crit"),
                    ({"sparsity_pattern": "2:4", "lamp": True}, "not N:M"),
                    ({"sparsity": 1.0}, r"\[0, 1\)")]:
        with pytest.raises(BadOptionError, match=msg):
            sparsec.prune(g, **kw)
    out = sparsec.prune(g, sparsity=0.5).graph
    assert reference.run(out, reference.random_inputs(out))[0].shape == (4, 5)


def test_reconstruction_refits_kept_weights_and_zeros_stay_zero():
    """Digits CNN at 70 % unstructured sparsity: 16 % accuracy as zeroed, >= 97 % after the
    kept weights are refit on 64 calibration images; every zero stays zero."""
    from conftest import EXAMPLES
    from test_quality import accuracy

    kw = {"sparsity": 0.7, "calibration": EXAMPLES / "digits_calib.npz"}
    plain = sparsec.prune(EXAMPLES / "digits_cnn.onnx", **kw)
    refit = sparsec.prune(EXAMPLES / "digits_cnn.onnx", reconstruct=True, **kw)
    assert accuracy(plain.graph) < 0.5 <= 0.97 <= accuracy(refit.graph)
    report = refit.passes[0].details["refit"]
    assert report and all(r["rel_rmse_after"] < r["rel_rmse_before"] for r in report)
    for w in plain.passes[0].details["layers"]:
        zeros = plain.graph.initializers[w] == 0
        assert (refit.graph.initializers[w][zeros] == 0).all(), w


def test_grouped_n_m_shares_one_pattern_per_16_outputs():
    """1:4g16: each panel of 16 output channels keeps the same 1 of every 4 inputs, so the BSR
    kernel's panels all keep exactly K/4 rows (no padding)."""
    from sparsec.targets.kernels import bsr

    g = load_onnx(zoo.ffn_stack(d=16, hidden=(32, 48, 64)))
    result = sparsec.prune(g, sparsity_pattern="1:4g16", ignore=["head"])
    d = result.passes[0].details
    assert d["achieved"] == pytest.approx(0.75, abs=1e-3) and d["target"] == 0.75
    for w in d["layers"]:
        m = _matrices(result.graph)[w][..., 0] != 0          # [out, in]
        panels = m.reshape(m.shape[0] // 16, 16, m.shape[1])
        assert (panels == panels[:, :1]).all()              # one pattern per 16 outputs
        w_kn = result.graph.initializers[w]                 # MatMul weight: [in, out]
        assert bsr.padded_rows(w_kn) == w_kn.shape[0] // 4


@pytest.mark.parametrize("pattern", ["16x1", "4x4", "2:4"])
def test_depthwise_weights_stay_dense_and_no_layer_is_emptied(zoo_models, pattern):
    """Block / N:M patterns leave one-input-channel weights (the depthwise conv) dense and say
    so, and even at 99 % every layer keeps some weights (8 output channels x 16x1 blocks is
    one block: rounding the share must not drop it)."""
    g = load_onnx(zoo_models("grouped_and_depthwise"))
    share = {} if ":" in pattern else {"sparsity": 0.99}   # N:M fixes its own share
    result = sparsec.prune(g, sparsity_pattern=pattern, **share)
    d = result.passes[0].details
    assert "wd" in d["skipped"]
    np.testing.assert_array_equal(result.graph.initializers["wd"], g.initializers["wd"])
    for w, m in _matrices(result.graph).items():
        assert (m != 0).any(), w
