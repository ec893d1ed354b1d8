"""Magnitude, Wanda and SparseGPT by perplexity: a small GPT-2 trained here (no download), every
weight matrix sparsified at 50 % unstructured and at 2:4, perplexity on held-out text.

No trained GPT-2 ships with the environment and random weights have no perplexity worth
comparing, so a 2-layer GPT-2 (n_embd 128, 4 heads, characters as tokens) is trained for
400 steps on the first sentences of standard-library docstrings (minilm_quality.sentences);
evaluation text comes from other modules (EVAL_MODULES). Sparsified through the ONNX route
(the FX capture at 64 positions, 64 calibration windows of training text), perplexity in ONNX
Runtime over 64-token windows (sparsec.prune's eval_tokens). The token embedding is tied to
the LM head, so it is sparsified by every method (SparseGPT leaves tied weights to magnitude).

Run from the repo root:  PYTHONPATH=. python benchmarks/sparsegpt_gpt2.py
Writes benchmarks/results/sparsegpt_gpt2.json and benchmarks/results/sparsegpt_gpt2.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import publish  # noqa: E402
from minilm_quality import CALIB_MODULES, EVAL_MODULES, sentences  # noqa: E402

SEQ = 64
STEPS = 400
TRAIN_MODULES = CALIB_MODULES + ("typing", "enum", "inspect", "ast", "dis", "types", "abc",
                                 "copy", "pickle", "queue", "sched", "selectors", "struct",
                                 "io", "codecs", "glob", "fnmatch", "filecmp")
PATTERNS = [("50 % unstructured", {"sparsity": 0.5}), ("2:4", {"sparsity_pattern": "2:4"})]
METHODS = ("magnitude", "wanda", "sparsegpt")


def encode(text: str) -> np.ndarray:
    return np.array([min(ord(c), 127) for c in text], dtype=np.int64)


def train(tokens: np.ndarray):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=128, n_positions=SEQ, n_embd=128, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, use_cache=False)
    lm = tf.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        starts = rng.integers(0, len(tokens) - SEQ, 32)
        x = torch.from_numpy(np.stack([tokens[i:i + SEQ] for i in starts]))
        loss = lm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step}: training loss {loss.item():.3f}", flush=True)
    return lm.eval()


def main() -> int:
    import torch

    import sparsec
    from sparsec.evaluate import perplexity
    from sparsec.frontends.fx import capture_fx

    torch.set_num_threads(2)
    train_tokens = encode(" ".join(sentences(TRAIN_MODULES, 4000)))
    eval_tokens = encode(" ".join(sentences(EVAL_MODULES, 400)))
    lm = train(train_tokens)
    graph = capture_fx(lm, (torch.from_numpy(train_tokens[None, :SEQ]),))
    windows = eval_tokens[: len(eval_tokens) // SEQ * SEQ].reshape(-1, SEQ)
    rng = np.random.default_rng(1)
    calib = [{graph.inputs[0]: train_tokens[None, i:i + SEQ]}
             for i in rng.integers(0, len(train_tokens) - SEQ, 64)]
    dense = perplexity(graph, windows)
    print(f"dense perplexity {dense.perplexity:.3f} on {dense.tokens} tokens", flush=True)
    rows = []
    for pattern, kw in PATTERNS:
        for method in METHODS:
            start = time.perf_counter()
            res = sparsec.prune(graph, calibration=calib, sparsity_criterion=method,
                                eval_tokens=windows, **kw)
            rows.append({"pattern": pattern, "method": method,
                         "achieved": res.passes[-1].details["achieved"],
                         "perplexity": res.perplexity["after"],
                         "dense_perplexity": res.perplexity["before"],
                         "holdout_cosine": res.fidelity.cosine,
                         "prune_s": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"GPT-2, 2 layers, n_embd 128, characters as tokens, trained here for {STEPS} steps "
             f"on standard-library docstrings; every weight matrix sparsified (no training "
             f"after). Perplexity on {dense.tokens:,} held-out tokens (other modules' "
             f"docstrings, {SEQ}-token windows): dense {dense.perplexity:.3f}.", "",
             "| pattern | method | zeros | perplexity | held-out fidelity | prune s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['method']} | {r['achieved']:.3f} | "
                     f"{r['perplexity']:.3f} | {r['holdout_cosine']:.4f} | "
                     f"{r['prune_s']:.1f} |")
    publish("sparsegpt_gpt2", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
