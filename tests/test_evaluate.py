"""Perplexity (sparsec.evaluate): the token-level NLL transformers' own loss computes, over whole
sequences, padded batches and sliding windows, for torch and for ONNX Runtime."""

import math

import numpy as np
import pytest

from sparsec.errors import BadOptionError
from sparsec.evaluate import perplexity

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_hf_roundtrip import causal_lm, tokens  # noqa: E402

SEQS = [tokens(s, n) for s, n in [(1, 12), (2, 7), (3, 20)]]


def hf_perplexity(lm, window: int, stride: int) -> float:
    """The Hugging Face guide's sliding window on transformers' loss: the context tokens of a
    window are labelled -100; its mean loss times the tokens it scored, summed."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for seq in SEQS:
            scored_to = 0
            for begin in range(0, seq.shape[1], stride):
                end = min(begin + window, seq.shape[1])
                ids = seq[:, begin:end]
                labels = ids.clone()
                labels[:, : ids.shape[1] - (end - scored_to)] = -100
                n = int((labels[:, 1:] != -100).sum())
                if n:
                    nll += lm(input_ids=ids, labels=labels).loss.item() * n
                    count += n
                scored_to = end
                if end == seq.shape[1]:
                    break
    return math.exp(nll / count)


def test_whole_sequences_in_a_padded_batch_match_transformers_loss():
    lm = causal_lm("llama")
    got = perplexity(lm, [s[0] for s in SEQS], batch_size=3)        # padded to 20
    assert got.tokens == 11 + 6 + 19
    assert got.perplexity == pytest.approx(hf_perplexity(lm, 20, 20), rel=1e-4)
    # the mean is over tokens, not over sequences
    per_seq = [perplexity(lm, s).nll / (s.shape[1] - 1) for s in SEQS]
    assert abs(math.log(got.perplexity) - np.mean(per_seq)) > 1e-3


def test_sliding_window_matches_transformers_loss():
    lm = causal_lm("llama")
    got = perplexity(lm, [s[0] for s in SEQS], max_length=8, stride=3, batch_size=2)
    assert got.perplexity == pytest.approx(hf_perplexity(lm, 8, 3), rel=1e-4)
    assert got.tokens == 36
    # no overlap: a window's first token is context only, as in the guide
    apart = perplexity(lm, [s[0] for s in SEQS], max_length=8)
    assert apart.perplexity == pytest.approx(hf_perplexity(lm, 8, 8), rel=1e-4)
    assert apart.tokens == 36 - 1 - 2


def test_onnx_runtime_gives_the_torch_figure(tmp_path):
    """The FX capture has a fixed [1, 8] input: the window is 8, in ONNX Runtime, from a Graph
    and from a file."""
    from sparsec.frontends.fx import capture_fx
    from sparsec.ir.onnx_io import to_onnx

    lm = causal_lm("gpt2")
    lm.config.use_cache = False
    graph = capture_fx(lm, (tokens(0, 8),))
    (tmp_path / "lm.onnx").write_bytes(to_onnx(graph).SerializeToString())
    want = hf_perplexity(lm, 8, 3)
    for model in (graph, tmp_path / "lm.onnx"):
        assert perplexity(model, SEQS, stride=3).perplexity == pytest.approx(want, rel=1e-4)
    with pytest.raises(BadOptionError, match="reads 8 positions"):
        perplexity(graph, SEQS, max_length=16)


def test_texts_go_through_the_tokenizer():
    lm = causal_lm("llama")

    def tokenizer(text):
        return {"input_ids": [1 + b % 63 for b in text.encode()]}

    texts = ["the quick brown fox", "jumps over the lazy dog"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert perplexity(lm, texts, tokenizer=tokenizer).nll == pytest.approx(
        perplexity(lm, ids).nll, rel=1e-6)
    assert perplexity(lm, ids[0]).nll == pytest.approx(perplexity(lm, ids[:1]).nll, rel=1e-9)
    with pytest.raises(BadOptionError, match="tokenizer"):
        perplexity(lm, texts)
    with pytest.raises(BadOptionError, match="does not run on the token ids"):
        perplexity(lm, [[1, 2, 500]])                       # beyond the vocabulary


def test_prune_reports_perplexity_before_and_after(tmp_path):
    """eval_tokens: the result and its report carry the perplexity of the model before and
    after pruning, the figures perplexity() gives; the CLI prints them (--eval-tokens .npy)."""
    import sparsec
    from sparsec.frontends.fx import capture_fx
    from sparsec.ir.onnx_io import to_onnx
    from test_cli import assert_clean_error, sparsec as cli

    lm = causal_lm("gpt2")
    lm.config.use_cache = False
    graph = capture_fx(lm, (tokens(0, 8),))
    evaluation = np.stack([tokens(s, 16)[0].numpy() for s in range(5, 8)])
    calib = [{graph.inputs[0]: tokens(s, 8).numpy()} for s in range(1, 5)]
    result = sparsec.prune(graph, ratio=0.5, head_ratio=0.0, calibration=calib,
                           eval_tokens=evaluation)
    ppl = result.report()["perplexity"]
    assert ppl["before"] == pytest.approx(perplexity(graph, evaluation).perplexity, rel=1e-9)
    assert ppl["after"] == pytest.approx(perplexity(result.graph, evaluation).perplexity,
                                         rel=1e-9)
    assert ppl["tokens"] == 3 * 14 and abs(ppl["after"] - ppl["before"]) > 1e-3

    (tmp_path / "lm.onnx").write_bytes(to_onnx(graph).SerializeToString())
    np.save(tmp_path / "eval.npy", evaluation)
    proc = cli("prune", tmp_path / "lm.onnx", "--ratio", "0.5", "--head-ratio", "0",
               "--eval-tokens", tmp_path / "eval.npy", "-o", tmp_path / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    assert f"perplexity on 42 evaluation tokens: {ppl['before']:.4f} ->" in proc.stdout
    np.save(tmp_path / "bad.npy", evaluation.astype(np.float32))
    assert_clean_error(cli("prune", tmp_path / "lm.onnx", "--ratio", "0.5", "--eval-tokens",
                           tmp_path / "bad.npy", "-o", tmp_path / "bad.onnx"),
                       BadOptionError.exit_code, "eval tokens: token ids must be integer")
    assert not (tmp_path / "bad.onnx").exists()
