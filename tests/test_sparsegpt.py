"""SparseGPT (sparsity_criterion="sparsegpt"): on correlated inputs, as activations are, its
layer outputs stay closer to the dense ones than Wanda's and magnitude's at 50 % and 2:4; the
masks are exactly the pattern asked for, and the sparse model runs in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import zoo
from onnx import helper, numpy_helper

import sparsec
from sparsec import reference
from sparsec.errors import BadOptionError
from sparsec.passes import sparsify
from sparsec.passes.sparsify import sparsegpt_layer

CRITERIA = ("magnitude", "wanda", "sparsegpt")


def correlated(rng, k: int):
    """A sampler ``rows -> [rows, k]`` of inputs near one 8-dimensional subspace, plus noise,
    the channels at very different scales (as activations are)."""
    basis, scale = rng.standard_normal((8, k)), np.exp(rng.standard_normal(k))

    def sample(rows: int) -> np.ndarray:
        z = rng.standard_normal((rows, 8)) @ basis
        return (z + 0.3 * rng.standard_normal((rows, k))) * scale

    return sample


def n_of_m(w: np.ndarray, n: int = 2, m: int = 4) -> bool:
    """Every run of m consecutive entries along the last axis has at most n nonzeros."""
    return bool(((w != 0).reshape(*w.shape[:-1], -1, m).sum(axis=-1) <= n).all())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_one_layer_error_is_below_wanda_and_magnitude(pattern):
    """||X (W' - W)|| / ||X W|| of one 64 x 256 layer on its own calibration inputs (two column
    blocks, so the lazy update between blocks counts)."""
    rng = np.random.default_rng(0)
    x, w = correlated(rng, 256)(1024), rng.standard_normal((64, 256))
    h = 2 * x.T @ x / len(x)

    def error(new):
        d = new - w
        return np.sqrt(np.einsum("nk,kl,nl->", d, h, d) / np.einsum("nk,kl,nl->", w, h, w))

    def top_half(score):               # the per-output comparison of magnitude and Wanda
        if pattern == "2:4":
            runs = score.reshape(64, -1, 4)
            return (np.argsort(np.argsort(-runs, axis=2), axis=2) < 2).reshape(w.shape)
        return score >= np.median(score, axis=1, keepdims=True)

    errors = {"magnitude": error(w * top_half(np.abs(w))),
              "wanda": error(w * top_half(np.abs(w) * np.linalg.norm(x, axis=0)))}
    kind, nums = ("nm", (2, 4, 1)) if pattern == "2:4" else ("unstructured", None)
    new, keep = sparsegpt_layer(w, h, kind, nums, 0.5)
    errors["sparsegpt"] = error(new)
    assert ((new != 0) <= keep).all() and (new == 0).mean() == pytest.approx(0.5, abs=1e-3)
    if pattern == "2:4":
        assert n_of_m(new)
    assert errors["sparsegpt"] < 0.6 * errors["wanda"] < 0.6 * errors["magnitude"], errors


@pytest.mark.parametrize("rows_per_pass", [None, 2])
def test_the_update_is_optimal_brain_surgeon_column_by_column(rows_per_pass, monkeypatch):
    """Against the textbook form, with no Cholesky and no lazy batches: for each column c in
    turn, F = the columns from c on; a pruned weight w_c is removed with the OBS update
    w_F -= w_c / [H_F^-1]_00 * [H_F^-1]_0,:, and the N:M choice ranks w_c^2 / [H_F^-1]_00.
    Blocks of 4 columns (lazy updates across 5 blocks) must give the same weights, whether
    the rows go through the column loop at once or 2 at a time."""
    if rows_per_pass:
        monkeypatch.setattr(sparsify, "SPARSEGPT_ROWS", rows_per_pass)
    rng = np.random.default_rng(4)
    x, w = correlated(rng, 20)(200), rng.standard_normal((6, 20))
    h = 2 * x.T @ x / len(x)
    got, _ = sparsegpt_layer(w, h, "nm", (2, 4, 1), 0.5, block=4)
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(20)
    d = [np.linalg.inv(hd[c:, c:])[0] for c in range(20)]      # row 0 of each H_F^-1
    want = w.copy()
    for c in range(20):
        if c % 4 == 0:
            score = want[:, c: c + 4] ** 2 / np.array([d[c + i][0] for i in range(4)])
            drop = np.argsort(np.argsort(-score, axis=1), axis=1) >= 2
        pruned = drop[:, c % 4]
        want[pruned, c:] -= np.outer(want[pruned, c] / d[c][0], d[c])
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert n_of_m(got) and np.abs(got - w).max() > 0.1       # the kept weights moved


@pytest.mark.parametrize("kind, nums", [("unstructured", None), ("nm", (2, 4, 4))])
def test_rows_in_passes_give_the_same_weights(kind, nums, monkeypatch):
    """The column loop runs over chunks of rows (``SPARSEGPT_ROWS``; grouped N:M keeps a
    group in one chunk): 40 rows at once or 8 at a time, the same result."""
    rng = np.random.default_rng(5)
    x, w = correlated(rng, 48)(300), rng.standard_normal((40, 48))
    h = 2 * x.T @ x / len(x)
    whole, keep = sparsegpt_layer(w, h, kind, nums, 0.5, block=16)
    monkeypatch.setattr(sparsify, "SPARSEGPT_ROWS", 8)
    chunked, keep8 = sparsegpt_layer(w, h, kind, nums, 0.5, block=16)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-12)
    assert (keep8 == keep).all() and (whole == 0).mean() == pytest.approx(0.5)
    if nums:        # 4 consecutive rows share each run's choice
        assert (keep.reshape(10, 4, 48) == keep.reshape(10, 4, 48)[:, :1]).all()


def test_the_inverse_factor_is_the_cholesky_factor_of_the_inverse():
    """U upper with U^T U = H^-1, from one Cholesky of the reversed H and a triangular inverse
    by halves (600 wide: three levels of halving)."""
    rng = np.random.default_rng(6)
    x = correlated(rng, 600)(900)
    h = 2 * x.T @ x / len(x) + 0.01 * np.eye(600)
    u = sparsify.inverse_upper_factor(h)
    assert np.abs(np.tril(u, -1)).max() == 0
    want = np.linalg.cholesky(np.linalg.inv(h)).T
    np.testing.assert_allclose(u, want, rtol=0, atol=1e-9 * np.abs(want).max())


def mlp() -> onnx.ModelProto:
    """MatMul + bias -> Relu -> Gemm(transB), 64 -> 128 -> 32 on [16, 64]."""
    r = np.random.default_rng(1)
    inits = {"w1": r.standard_normal((64, 128)) / 8, "b1": r.standard_normal(128) * 0.1,
             "w2": r.standard_normal((32, 128)) / 11, "b2": r.standard_normal(32) * 0.1}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]),
             helper.make_node("Add", ["m1", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Gemm", ["a1", "w2", "b2"], ["y"], transB=1)]
    return zoo.make_model(nodes, [("x", [16, 64])], ["y"], inits)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_through_prune_layers_stay_closest_and_onnx_runtime_runs_it(pattern, tmp_path):
    """On held-out batches (every 4th calibration batch is not fitted on), each layer's output
    in the sparse model is closest to the dense one with SparseGPT; the written model runs in
    ONNX Runtime, computes what the graph does, and holds exactly the pattern."""
    import onnxruntime as ort

    model, rng = mlp(), np.random.default_rng(2)
    sample = correlated(rng, 64)
    calib = [{"x": sample(16).astype(np.float32)} for _ in range(16)]
    held = calib[3::4]
    dense = reference.activations(sparsec.load(model), held, ["h1", "y"])
    errors, results = {}, {}
    for crit in CRITERIA:
        res = sparsec.prune(model, tmp_path / f"{crit}.onnx", sparsity=0.5 if pattern ==
                            "unstructured" else 0.0, sparsity_pattern=pattern,
                            sparsity_criterion=crit, calibration=calib)
        got = reference.activations(res.graph, held, ["h1", "y"])
        errors[crit] = {t: float(np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(got[t],
                        dense[t])) / sum((b ** 2).sum() for b in dense[t]))) for t in got}
        results[crit] = res
    for t in ("h1", "y"):
        assert errors["sparsegpt"][t] < min(errors["wanda"][t], errors["magnitude"][t]), errors
    details = results["sparsegpt"].passes[0].details
    assert details["criterion"] == "sparsegpt" and details["achieved"] == pytest.approx(0.5,
                                                                                        abs=0.01)
    assert [r["weight"] for r in details["refit"]] == ["w1", "w2"]
    written = onnx.load(tmp_path / "sparsegpt.onnx")
    weights = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    if pattern == "2:4":
        assert n_of_m(weights["w1"].T) and n_of_m(weights["w2"])     # along the inputs
    session = ort.InferenceSession(str(tmp_path / "sparsegpt.onnx"))
    out = session.run(None, held[0])[0]
    np.testing.assert_allclose(out, reference.run(results["sparsegpt"].graph, held[0])[0],
                               rtol=1e-4, atol=1e-5)


def test_convs_get_n_m_over_input_channels_per_tap():
    """A 3x3 conv's columns come channel-major from im2col; the 2:4 runs must still be four
    consecutive input channels at one tap, as the N:M kernels read them."""
    r = np.random.default_rng(3)
    inits = {"k1": r.standard_normal((16, 8, 3, 3)) / 8, "k2": r.standard_normal((8, 16, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "k1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Conv", ["a1", "k2"], ["y"])]
    model = zoo.make_model(nodes, [("x", [2, 8, 6, 6])], ["y"], inits)
    calib = [{"x": r.standard_normal((2, 8, 6, 6)).astype(np.float32)} for _ in range(4)]
    res = sparsec.prune(model, sparsity_pattern="2:4", sparsity_criterion="sparsegpt",
                        calibration=calib)
    for name in ("k1", "k2"):
        w = np.moveaxis(res.graph.initializers[name], 1, -1)     # [out, kh, kw, in]
        assert n_of_m(w) and (w == 0).mean() == 0.5, name
    assert len(res.passes[0].details["refit"]) == 2


def test_sparsegpt_refuses_blocks_and_lamp():
    model = mlp()
    for kw, msg in [({"sparsity": 0.5, "sparsity_pattern": "4x4"}, "pattern 4x4"),
                    ({"sparsity": 0.5, "lamp": True}, "lamp")]:
        with pytest.raises(BadOptionError, match=msg):
            sparsec.prune(model, sparsity_criterion="sparsegpt", **kw)
