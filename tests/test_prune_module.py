"""Pruned torch modules: captured by the FX frontend with the module's own names, pruned on the
IR, written back. They compute what the pruned IR computes, their layer attributes match their
weights, they train, and the original module is untouched."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import zoo
from conftest import EXAMPLES

import sparsec
from sparsec import reference
from sparsec.errors import UnsupportedOpError
from sparsec.frontends.fx import capture_fx

sys.path.insert(0, str(EXAMPLES))
from make_examples import DigitsCNN  # noqa: E402


def digits_cnn():
    torch.manual_seed(0)
    m = DigitsCNN().eval()
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m, (torch.randn(1, 1, 8, 8),)


MODULES = {**{n: (lambda n=n: zoo.torch_model(n)) for n in zoo.TORCH_MODULES},
           "digits_cnn": digits_cnn}


@pytest.mark.parametrize("name", MODULES)
def test_fx_lowering_matches_torch_and_keeps_names(name):
    module, example = MODULES[name]()
    g = capture_fx(module, example)
    out = reference.run(g, {g.inputs[0]: example[0].numpy()})[0]
    with torch.no_grad():
        want = module(*example).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    names = set(dict(module.named_parameters())) | set(dict(module.named_buffers()))
    assert {k for k in g.initializers if "__" not in k} <= names


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("reconstruct", [False, True])
def test_pruned_module_computes_the_pruned_graph(name, reconstruct):
    module, example = MODULES[name]()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    pruned, result = sparsec.prune_module(module, example, ratio=0.5, reconstruct=reconstruct)
    assert result.after.params < result.before.params
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in module.parameters())
    zoo.assert_consistent(pruned)
    with torch.no_grad():
        got = pruned(*example).numpy()
    want = reference.run(result.graph, {result.graph.inputs[0]: example[0].numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    for k, v in module.state_dict().items():                 # the input module is untouched
        assert torch.equal(v, before[k])


def test_reconstruction_gives_biasless_convs_a_bias():
    module, example = digits_cnn()
    assert module.block1.conv1.bias is None
    pruned, _ = sparsec.prune_module(module, example, ratio=0.5, reconstruct=True)
    consumers = [m for m in pruned.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.bias is not None]
    assert consumers and all(isinstance(m.bias, torch.nn.Parameter) for m in consumers)
    assert module.block1.conv1.bias is None


def test_pruned_module_trains():
    module, _ = digits_cnn()
    pruned, _ = sparsec.prune_module(module, (torch.randn(1, 1, 8, 8),), ratio=0.5)
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    first = None
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(pruned(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert np.isfinite(loss.item()) and loss.item() < first
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters())


def test_unsupported_aten_ops_are_listed():
    class Sorts(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=-1).values + torch.cumsum(x, dim=-1)

    with pytest.raises(UnsupportedOpError, match="aten.sort.*aten.cumsum|aten.cumsum.*aten.sort"):
        capture_fx(Sorts(), (torch.randn(2, 5),))
