"""What pruning costs on real trained models (the bundled digits CNN and MLP): accuracy on the
held-out digits. These are the README's numbers; a regression in the criterion shows here."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EXAMPLES

import sparsec
from sparsec import reference


def accuracy(graph) -> float:
    test = np.load(EXAMPLES / "digits_test.npz")
    sess = reference.session(graph)
    preds = [sess.run(None, {"image": x[None]})[0].argmax() for x in test["image"]]
    return float(np.mean(np.array(preds) == test["label"]))


@pytest.mark.parametrize("model, ratio, at_least", [
    ("digits_cnn", 0.0, 0.995), ("digits_cnn", 0.1, 0.97),
    ("digits_mlp", 0.0, 0.985), ("digits_mlp", 0.3, 0.96), ("digits_mlp", 0.5, 0.90)])
def test_accuracy_after_magnitude_pruning(model, ratio, at_least):
    result = sparsec.prune(EXAMPLES / f"{model}.onnx", ratio=ratio,
                           calibration=EXAMPLES / "digits_calib.npz")
    assert accuracy(result.graph) >= at_least
    if ratio:
        assert result.after.params < result.before.params
        assert 0.0 < result.fidelity.cosine < 1.0
