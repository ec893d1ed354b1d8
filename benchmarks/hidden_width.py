"""Hidden-width pruning side by side with Torch-Pruning, on the same random-init ConvNeXt.

A ConvNeXt (transformers config: 4 stages, widths 32/64/128/256, depths 2/2/2/2) is pruned at
ratio 0.5 by Torch-Pruning (``MagnitudePruner``, L2 importance, uniform, the classifier left
whole: its documented recipe) and by sparsec on the ONNX export (``--ratio 0.5 --hidden-ratio
0.5``, which cuts the residual width under the LayerNorms too; with and without calibration
and reconstruction). Reported: parameters kept, and fidelity, the cosine of the logits to the
original's on 32 random images neither tool saw (sparsec's own held-out figure beside it).

Run from the repo root:  PYTHONPATH=. python benchmarks/hidden_width.py
Needs ``pip install torch-pruning``. Writes benchmarks/results/hidden_width.{json,md}.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import publish  # noqa: E402

RATIO = 0.5


def convnext() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.ConvNextConfig(num_stages=4, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2],
                            num_labels=10, image_size=64)
    return tf.ConvNextForImageClassification(cfg).eval()


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> int:
    import torch_pruning as tp

    import sparsec
    from sparsec import reference
    from sparsec.frontends.torch import export_onnx

    model = Logits(convnext())
    gen = torch.Generator().manual_seed(1)
    test = torch.randn(32, 3, 64, 64, generator=gen)
    calib = [{"x": torch.randn(1, 3, 64, 64, generator=gen).numpy()} for _ in range(32)]
    with torch.no_grad():
        want = model(test).numpy()
    rows = [{"tool": "original", "params": params(model), "kept": 1.0, "cosine": 1.0}]

    pruned = copy.deepcopy(model)
    example = torch.randn(1, 3, 64, 64)
    pruner = tp.pruner.MagnitudePruner(pruned, example,
                                       importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=RATIO,
                                       ignored_layers=[pruned.model.classifier])
    pruner.step()
    with torch.no_grad():
        got = pruned(test).numpy()
    rows.append({"tool": "Torch-Pruning 1.6 (L2, uniform, ratio 0.5)", "params": params(pruned),
                 "kept": params(pruned) / params(model), "cosine": cosine(want, got)})

    proto = export_onnx(model, (example,), ["x"])
    graph = sparsec.load(proto)

    def logits(g) -> np.ndarray:
        sess = reference.session(g)
        return np.concatenate([sess.run(None, {"x": x[None].numpy()})[0] for x in test])

    for label, kw in [("sparsec --ratio 0.5 (l2)", {}),
                      ("sparsec --ratio 0.5 --hidden-ratio 0.5 (l2)", {"hidden_ratio": RATIO}),
                      ("sparsec --ratio 0.5 --hidden-ratio 0.5, fluctuation + reconstruct",
                       {"hidden_ratio": RATIO, "criterion": "fluctuation",
                        "reconstruct": True})]:
        res = sparsec.prune(graph, ratio=RATIO, calibration=calib, **kw)
        rows.append({"tool": label, "params": res.after.params,
                     "kept": res.after.params / res.before.params,
                     "cosine": cosine(want, logits(res.graph)),
                     "reported": res.fidelity.cosine})
        print(rows[-1], flush=True)
    lines = ["Random-init ConvNeXt (widths 32/64/128/256, depths 2/2/2/2, 64x64 images, 10 "
             "classes), ratio 0.5. Cosine: logits vs the original's on 32 random images no "
             "tool saw; reported: sparsec's own held-out figure.", "",
             "| pruning | parameters | kept | cosine | reported |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        rep = f"{r['reported']:.4f}" if "reported" in r else "-"
        lines.append(f"| {r['tool']} | {r['params']:,} | {r['kept']:.3f} | {r['cosine']:.4f} "
                     f"| {rep} |")
    publish("hidden_width", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
