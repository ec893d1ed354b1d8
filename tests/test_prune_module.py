"""Pruned torch modules: captured by the FX frontend with the module's own names, pruned on the
IR, written back. They compute what the pruned IR computes, their layer attributes match their
weights, they train, and the original module is untouched."""

from __future__ import annotations

import copy
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


class PoolTo4x4(torch.nn.Module):
    """A CNN that pools its 8x8 map to 4x4 before the classifier (adaptive pool, not 1x1)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 16, 5)

    def forward(self, x):
        y = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), (4, 4))
        return self.fc(torch.flatten(y, 1))


def pool_to_4x4():
    torch.manual_seed(0)
    return PoolTo4x4().eval(), (torch.randn(1, 3, 8, 8),)


MODULES = {**{n: (lambda n=n: zoo.torch_model(n)) for n in zoo.TORCH_MODULES},
           "digits_cnn": digits_cnn, "pool_to_4x4": pool_to_4x4}


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
    before = {k: v.clone() for k, v in module.state_dict().items()}
    pruned, result = sparsec.prune_module(module, (torch.randn(1, 1, 8, 8),), ratio=0.5)
    weights = {k: np.array(v) for k, v in result.graph.initializers.items()}
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
    # training moved the pruned module's weights, not the input module's (no shared memory);
    # the weights pruning made are the pruned module's memory, which the graph views
    # (read-only on its side), the others copies
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    state = pruned.state_dict()
    shared = [k for k in weights if k in state and np.shares_memory(
        result.graph.initializers[k], state[k].numpy())]
    assert shared and all(not np.array_equal(weights[k], state[k]) for k in shared)
    assert all(not np.shares_memory(v.numpy(), state[k].numpy())
               for k, v in module.state_dict().items() if k in state)
    assert not any(a.flags.writeable for a in result.graph.initializers.values())


def test_unsupported_aten_ops_are_listed():
    class Sorts(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=-1).values + torch.cumsum(x, dim=-1)

    with pytest.raises(UnsupportedOpError, match="aten.sort.*aten.cumsum|aten.cumsum.*aten.sort"):
        capture_fx(Sorts(), (torch.randn(2, 5),))


def test_taylor_drops_a_channel_the_loss_does_not_see():
    """fc1's channel 3 has the largest weights, but fc2 reads it with zeros: removing it cannot
    change the loss. Magnitude keeps it; first-order Taylor scores it 0 and drops it."""
    module, (x,) = zoo.torch_model("torch_mlp")
    with torch.no_grad():
        module.fc1.weight[3] *= 20.0
        module.fc2.weight[:, 3] = 0.0
    batches = [torch.randn(6, 20, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    row = module.fc1.weight[3].detach().clone()
    kept = {}
    for criterion in ("l2", "taylor"):
        pruned, result = sparsec.prune_module(module, (x,), ratio=0.5, criterion=criterion,
                                              calibration=batches)
        kept[criterion] = any(torch.equal(r, row) for r in pruned.fc1.weight.detach())
        zoo.assert_consistent(pruned)
    assert kept == {"l2": True, "taylor": False}
    assert module.fc1.weight.grad is None                # gradients came from a copy


def test_taylor_scores_are_the_mean_squared_first_order_change():
    from sparsec.analysis.depgraph import DependencyGraph
    from sparsec.passes.criteria import taylor_scores

    module, (x,) = zoo.torch_model("torch_mlp")
    g = capture_fx(module, (x,))
    grp = next(gr for gr in DependencyGraph(g).groups if gr.sources == ["fc1.weight"])
    batches = [{"x": torch.randn(5, 20, generator=torch.Generator().manual_seed(s)).numpy()}
               for s in range(3)]
    loss_fn = lambda y: (y ** 2).sum()                                      # noqa: E731
    got = taylor_scores(module, g, [grp], batches, loss_fn)[("fc1.weight",)]
    want = np.zeros(48)
    for b in batches:                     # channel c: fc1 row c, fc1 bias c, fc2 column c
        m = copy.deepcopy(module)
        loss_fn(m(torch.from_numpy(b["x"]))).backward()
        s = ((m.fc1.weight * m.fc1.weight.grad).sum(1) + m.fc1.bias * m.fc1.bias.grad
             + (m.fc2.weight * m.fc2.weight.grad).sum(0))
        want += s.detach().double().numpy() ** 2
    np.testing.assert_allclose(got, want / 3, rtol=1e-6)


def test_calibration_from_a_dataloader_of_labelled_batches():
    module, example = digits_cnn()
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    batches = iter(loader)                                  # an iterator: read exactly once
    pruned, result = sparsec.prune_module(module, example, ratio=0.5, reconstruct=True,
                                          criterion="taylor", calibration=batches)
    assert result.passes[-1].details["reconstructed"]
    assert result.passes[-1].measured_on == "8 held-out calibration samples"  # of 32, batch 1


def test_fx_lowering_drops_what_no_output_reads():
    module, example = zoo.transformers_model("hf_bert")       # returns last_hidden_state only
    g = capture_fx(module, example)
    assert not any("pooler" in k for k in g.initializers)
    assert any("pooler" in k for k in module.state_dict())


def test_fx_in_place_ops_and_dunder_ops():
    """``x.add_(y)`` is seen by later readers of x; ``a & b`` leaves a as it was."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            pos, small = x > 0, x < 1
            both = pos & small
            h = self.fc(x)
            h.add_(x)                                   # in place
            return torch.where(both, h, 0.0) + pos.float()

    m = M().eval()
    x = torch.randn(3, 4)
    g = capture_fx(m, (x,))
    with torch.no_grad():
        want = m(x).numpy()
    np.testing.assert_allclose(reference.run(g, {g.inputs[0]: x.numpy()})[0], want, atol=1e-6)


def test_fx_norms_with_explicit_and_default_arguments():
    """layer_norm / group_norm called with weight but no bias or eps, and with eps by keyword."""
    class Norms(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            a = torch.nn.functional.layer_norm(x.flatten(2).transpose(1, 2), (8,), self.w)
            b = torch.nn.functional.group_norm(x, 2, self.w, eps=1e-3)
            return a.sum() + b.sum(dim=(2, 3))

    m = Norms().eval()
    x = torch.randn(2, 8, 3, 3)
    g = capture_fx(m, (x,))
    with torch.no_grad():
        want = m(x).numpy()
    np.testing.assert_allclose(reference.run(g, {g.inputs[0]: x.numpy()})[0], want, rtol=1e-5,
                               atol=1e-5)
