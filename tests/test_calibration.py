"""Calibration that a report can be trusted on: padded positions left out (attention masks),
sensitivity trials that equal pruning, per-layer ridges chosen on data the fit did not see,
and ``max_drop``, a fidelity target instead of a ratio."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch

import sparsec
from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.errors import BadOptionError
from sparsec.frontends.onnx import load_onnx
from sparsec.passes.allocation import Trials
from sparsec.passes.criteria import keep_top, l2
from sparsec.passes.manager import PassContext, positions, rows
from sparsec.passes.reconstruct import Normal, _solve

from conftest import EXAMPLES

BATCH, SEQ = 4, 12


@pytest.fixture(scope="module")
def masked_bert() -> onnx.ModelProto:
    """A 2-layer BERT taking input_ids and attention_mask, last hidden state [B, S, 32] out."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    bert = tf.BertModel(cfg).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((BATCH, SEQ), dtype=torch.int64)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(Hidden().eval(), (ids, torch.ones_like(ids)), buf, dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask"])
    return onnx.load_from_string(buf.getvalue())


def padded_batches(n: int, seed: int = 0, pad_ids_seed: int | None = None) -> list[dict]:
    """Sentences of 3..SEQ tokens padded to SEQ; ``pad_ids_seed`` fills the padded positions
    with other token ids (what a model computes there must not matter)."""
    rng = np.random.default_rng(seed)
    pad = np.random.default_rng(pad_ids_seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(3, SEQ + 1, BATCH)
        mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
        ids = rng.integers(1, 100, (BATCH, SEQ))
        filler = pad.integers(1, 100, (BATCH, SEQ)) if pad_ids_seed is not None else 0
        out.append({"input_ids": np.where(mask == 1, ids, filler).astype(np.int64),
                    "attention_mask": mask})
    return out


def test_positions_follow_the_mask_layout():
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    assert positions((2, 3), mask).tolist() == mask.tolist()
    assert positions((6,), mask).tolist() == mask.ravel().tolist()
    assert positions((2, 4, 3), mask)[:, 2].tolist() == mask.tolist()    # heads in between
    assert positions((2,), mask) is None and positions((2, 5), mask) is None
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert rows(x, mask).tolist() == [x[0, 0].tolist(), x[0, 1].tolist(), x[1, 0].tolist()]
    assert rows(x, None).shape == (6, 4)


def test_padding_changes_nothing_that_is_reported_or_fitted(masked_bert):
    """Token ids at padded positions change what the model computes there; with the mask they
    change neither the pruned weights (criterion statistics, refits, ridges) nor the reported
    fidelity; without it (calib_mask="") they change both."""
    graph = sparsec.load(masked_bert)
    kw = dict(ratio=0.5, criterion="fluctuation", reconstruct=True)
    a = sparsec.prune(graph, calibration=padded_batches(6), **kw)
    b = sparsec.prune(graph, calibration=padded_batches(6, pad_ids_seed=1), **kw)
    assert "attention_mask" in a.measured_on
    assert a.fidelity.cosine == pytest.approx(b.fidelity.cosine, abs=1e-6)
    for name, w in a.graph.initializers.items():
        np.testing.assert_allclose(w, b.graph.initializers[name], rtol=1e-4, atol=1e-5)
    c = sparsec.prune(graph, calibration=padded_batches(6), calib_mask="", **kw)
    d = sparsec.prune(graph, calibration=padded_batches(6, pad_ids_seed=1), calib_mask="", **kw)
    assert "attention_mask" not in c.measured_on
    assert abs(c.fidelity.max_abs_err - d.fidelity.max_abs_err) > 1e-4
    assert any(not np.allclose(w, d.graph.initializers[n], rtol=1e-3, atol=1e-4)
               for n, w in c.graph.initializers.items())
    # the figure is over real tokens only: recompute it by hand on the held-out batches
    ctx = PassContext.split(padded_batches(6))
    want = reference.run_batches(graph, ctx.holdout)
    got = reference.run_batches(a.graph, ctx.holdout)
    cos = min(float(np.sum(w[0][h["attention_mask"] == 1] * g[0][h["attention_mask"] == 1])
                    / np.linalg.norm(w[0][h["attention_mask"] == 1])
                    / np.linalg.norm(g[0][h["attention_mask"] == 1]))
              for w, g, h in zip(want, got, ctx.holdout))
    assert a.fidelity.cosine == pytest.approx(cos, abs=1e-6)


def test_a_named_mask_must_be_a_mask(masked_bert):
    with pytest.raises(BadOptionError, match="calib-mask 'input_ids'"):
        sparsec.prune(masked_bert, ratio=0.5, calibration=padded_batches(2),
                      calib_mask="input_ids")


@pytest.mark.parametrize("name", ["conv_bn_relu_conv", "residual_convs", "concat_branches",
                                  "nested_concat", "split_branches", "slice_and_full",
                                  "conv_flatten_linear", "squeeze_excite", "group_norm_shuffle",
                                  "grouped_and_depthwise", "ffn_stack", "matmul_add_mlp",
                                  "hf_bert", "hf_gpt2", "hf_llama_gqa"])
def test_sensitivity_trials_equal_pruning(zoo_models, name):
    """A trial zeroes what consumers read of the dropped channels; it must compute what the
    pruned model computes, for every prunable group (channels and heads)."""
    graph = load_onnx(zoo_models(name))
    dg = DependencyGraph(graph)
    groups = [g for g in dg.groups if g.prunable]
    assert groups
    trials = Trials(graph, dg, groups, [reference.random_inputs(graph, seed=1)])
    for g in groups:
        trials.check = True
        trials(g, keep_top(l2(graph, g), max(g.size // 2, 1)))
        assert trials.exact, f"group {g.id} ({g.kind}, {g.sources[0]})"


def test_ridge_solution_from_normal_equations_summed_per_batch():
    """Fewer rows than inputs or more: the ridge solution from normal equations summed over
    two batches is the direct one on all rows."""
    rng = np.random.default_rng(0)
    for n in (40, 400):
        a, y = rng.standard_normal((n, 120)), rng.standard_normal((n, 7))
        prior = rng.standard_normal((121, 7))
        a1 = np.hstack([a, np.ones((n, 1))])
        lam = 0.01 * np.sum(a1 ** 2) / 121
        want = np.linalg.solve(a1.T @ a1 + lam * np.eye(121), a1.T @ y + lam * prior)
        normal = Normal(120, 7)
        normal.add(a[: n // 3], y[: n // 3])
        normal.add(a[n // 3:], y[n // 3:])
        np.testing.assert_allclose(_solve(normal, 0.0, True, [0.01], prior)[0], want,
                                   rtol=1e-8, atol=1e-10)


def test_each_layer_gets_the_ridge_its_validation_samples_prefer():
    result = sparsec.prune(EXAMPLES / "digits_cnn.onnx", ratio=0.5, reconstruct=True,
                           calibration=EXAMPLES / "digits_calib.npz")
    refits = result.passes[-1].details["reconstructed"]
    assert refits
    for r in refits:
        scores = r["validation_rel_mse"]
        best = min(scores, key=scores.get)
        assert str(r["ridge"]) == best or f"{r['ridge']:g}" == best


def _accuracy(graph) -> float:
    test = np.load(EXAMPLES / "digits_test.npz")
    sess = reference.session(graph)
    name = graph.inputs[0]
    hits = [int(np.argmax(sess.run(None, {name: x[None]})[0]) == y)
            for x, y in zip(test["image"][:200], test["label"][:200])]
    return float(np.mean(hits))


def test_max_drop_finds_the_largest_ratio_within_it():
    logs = []
    result = sparsec.prune(EXAMPLES / "digits_cnn.onnx", max_drop=0.01, reconstruct=True,
                           calibration=EXAMPLES / "digits_calib.npz", log=logs.append)
    within = [s for s in result.search if s["within"]]
    over = [s for s in result.search if not s["within"]]
    chosen = max(s["ratio"] for s in within)
    assert 1 - result.fidelity.cosine <= 0.01 + 1e-12
    assert over and min(s["ratio"] for s in over) > chosen      # the next step up was too much
    assert result.report()["search"] == result.search
    assert any("chose ratio" in line for line in logs)
    assert result.after.params < result.before.params


def test_max_drop_with_a_metric_of_your_own():
    result = sparsec.prune(EXAMPLES / "digits_cnn.onnx", max_drop=0.02, ratio=0.8,
                           calibration=EXAMPLES / "digits_calib.npz", metric=_accuracy)
    assert _accuracy(load_onnx(EXAMPLES / "digits_cnn.onnx")) - _accuracy(result.graph) <= 0.02
    assert max(s["ratio"] for s in result.search) == 0.8


def test_max_drop_refuses_what_it_cannot_measure():
    one = {"image": np.load(EXAMPLES / "digits_calib.npz")["image"][0]}
    with pytest.raises(BadOptionError, match="held-out"):
        sparsec.prune(EXAMPLES / "digits_cnn.onnx", max_drop=0.05, calibration=one)
    with pytest.raises(BadOptionError, match="max_drop"):
        sparsec.prune(EXAMPLES / "digits_cnn.onnx", ratio=0.5, metric=_accuracy)
    with pytest.raises(BadOptionError, match="in \\(0, 1\\)"):
        sparsec.prune(EXAMPLES / "digits_cnn.onnx", max_drop=1.5)


def test_few_held_out_samples_come_with_a_warning(masked_bert):
    logs = []
    result = sparsec.prune(masked_bert, ratio=0.5, calibration=padded_batches(2),
                           log=logs.append)
    assert result.measured_on.startswith("2 held-out calibration samples")
    assert any("only 2 held-out" in line for line in logs)
    logs.clear()
    sparsec.prune(masked_bert, ratio=0.5, calibration=padded_batches(8), log=logs.append)
    assert not any("held-out calibration samples" in line for line in logs)


def test_long_loops_report_progress_with_the_time_left():
    from sparsec.passes.manager import Progress

    lines = []
    progress = Progress(lines.append, "reconstruct", 3, "layers refit", every=0.0)
    for _ in range(3):
        progress.step()
    assert len(lines) == 2 and lines[0].startswith("  reconstruct: 1/3 layers refit, ")
    assert "s left" in lines[0]                   # the last step needs no line: the pass logs


def test_sensitivity_never_loses_to_the_uniform_widths_it_replaces():
    """On the digits CNN the spread (costs measured one group at a time, assumed to add up)
    is far worse than the same ratio in every group once refit; the pass measures both whole
    plans on held-out data and keeps the uniform one."""
    kw = dict(ratio=0.5, reconstruct=True, calibration=EXAMPLES / "digits_calib.npz")
    spread = sparsec.prune(EXAMPLES / "digits_cnn.onnx", sensitivity=True, **kw)
    uniform = sparsec.prune(EXAMPLES / "digits_cnn.onnx", **kw)
    details = spread.passes[-1].details
    assert details["allocation"] == "uniform"
    assert details["held_out_distortion"]["uniform"] < details["held_out_distortion"][
        "sensitivity"]
    assert spread.fidelity.cosine == pytest.approx(uniform.fidelity.cosine, abs=1e-9)


def test_progress_is_a_bar_on_a_terminal_plain_lines_elsewhere_and_nothing_when_quiet():
    """One Progress, three looks, chosen by the log it reports through."""
    import io

    from sparsec.progress import Log, Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    log = Log(stream=screen)
    assert log.terminal
    with Progress(log, "kernels", 4, "built", every=0.0) as p:
        for i in range(4):
            p.step(detail=f"dense_{i}")
            if i == 1:
                log("a log line while the bar runs")
    text = screen.getvalue()
    assert "kernels:" in text and "3/4 built" in text and "left]" in text   # counts, time left
    assert "\r" in text and "a log line while the bar runs\n" in text
    assert log._bar is None                             # closed with the block

    piped = io.StringIO()                               # not a terminal: plain lines
    with Progress(Log(stream=piped), "kernels", 3, "built", every=0.0) as p:
        for _ in range(3):
            p.step(detail="dense_packed")
    lines = piped.getvalue().splitlines()
    assert lines[0].startswith("  kernels: 1/3 built, ") and "s left (dense_packed)" in lines[0]
    assert len(lines) == 2 and "\r" not in piped.getvalue()

    silent = Terminal()
    with Progress(Log(stream=silent, quiet=True), "kernels", 3, "built", every=0.0) as p:
        for _ in range(3):
            p.step()
    assert silent.getvalue() == ""


def test_in_memory_calibration_is_checked_as_a_calib_file_is(tmp_path):
    """NaN in calibration arrays passed to ``prune`` is refused with the CLI's error and
    nothing is written; a large batch is cut into the model's batches and each is checked."""
    model = EXAMPLES / "digits_cnn.onnx"
    images = np.load(EXAMPLES / "digits_calib.npz")["image"][:8, 0]      # [8, 1, 8, 8]
    bad = images.copy()
    bad[5, 0, 2, 3] = np.nan
    out = tmp_path / "pruned.onnx"
    with pytest.raises(BadOptionError, match=r"calibration batch 0: input 'image' holds NaN "
                                             r"at \[0, 0, 2, 3\]"):
        sparsec.prune(model, out, ratio=0.3, calibration=[{"image": bad}])
    assert not out.exists()
    with pytest.raises(BadOptionError, match="calibration batch 1: input 'image' holds NaN"):
        sparsec.prune(model, out, ratio=0.3,
                      calibration=[torch.from_numpy(images), torch.from_numpy(bad)])
    assert not out.exists()
    file = tmp_path / "bad.npz"
    np.savez(file, image=bad[:, None])
    with pytest.raises(BadOptionError, match="holds NaN"):
        sparsec.prune(model, out, ratio=0.3, calibration=file)
    sparsec.prune(model, out, ratio=0.3, calibration=[torch.from_numpy(images)])
    assert out.exists()


def test_calibration_token_ids_past_the_vocabulary_are_refused(masked_bert, tmp_path):
    """A token id outside the embedding table is a clear input error (ONNX Runtime would
    fail inside the pruning pass), from a file or from memory, and nothing is written."""
    batches = padded_batches(2)
    batches[1]["input_ids"][2, 1] = 100                    # the table has 100 rows
    out = tmp_path / "pruned.onnx"
    with pytest.raises(BadOptionError, match=r"calibration sample 1: input 'input_ids' holds 100 "
                                             r"at \[2, 1\], outside \[-100, 99\]"):
        sparsec.prune(masked_bert, out, ratio=0.3, calibration=batches)
    file = tmp_path / "calib.npz"
    np.savez(file, **{k: np.stack([b[k] for b in batches]) for k in batches[0]})
    with pytest.raises(BadOptionError, match="calibration sample 1: .*outside"):
        sparsec.prune(masked_bert, out, ratio=0.3, calibration=file)
    assert not out.exists()
