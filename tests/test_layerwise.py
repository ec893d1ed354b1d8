"""Layer-wise calibration (``sparsec.layerwise``): walking a graph segment by segment gives what a
whole-model ONNX Runtime run gives, holds no more than what crosses the cut (the same for 2 and
6 blocks), and spilling that to disk changes no result."""

from __future__ import annotations

import numpy as np
import pytest
import zoo

import sparsec
from sparsec import reference
from sparsec.errors import BadOptionError
from sparsec.frontends.onnx import load_onnx
from sparsec.layerwise import BUDGET_ENV, Spilled, Walk, collect, pairs


def _set_budget(monkeypatch, budget: str | None) -> None:
    """``SPARSEC_CALIBRATION_BYTES`` set to ``budget``, or unset for None."""
    if budget is None:
        monkeypatch.delenv(BUDGET_ENV, raising=False)
    else:
        monkeypatch.setenv(BUDGET_ENV, budget)


def _inputs_of_weights(graph):
    return [n for n in graph.nodes if n.op_type == "MatMul" and n.inputs[1] in graph.initializers]


@pytest.mark.parametrize("budget", [None, 0])
def test_a_walk_sees_what_the_whole_model_computes(zoo_models, budget):
    """Every MatMul's input, walking from one to the next (budget 0: all of it on disk)."""
    graph = load_onnx(zoo_models("hf_llama_gqa"))
    batches = [reference.random_inputs(graph, seed=s) for s in range(3)]
    layers = _inputs_of_weights(graph)
    want = reference.activations(graph, batches, [n.inputs[0] for n in layers])
    with Walk(graph, batches, budget=budget) as walk:
        for node in layers:
            walk.advance(walk.index(node.name))
            got = walk.values(node.inputs[0])
            assert len(got) == 3
            for g, w in zip(got, want[node.inputs[0]]):
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
        walk.advance(len(graph.nodes), keep=graph.outputs)
        final = [walk.values(o) for o in graph.outputs]     # read while the walk is open
        for i, feeds in enumerate(batches):
            for got, out in zip(final, reference.run(graph, feeds)):
                np.testing.assert_allclose(got[i], out, rtol=1e-4, atol=1e-5)
    if budget == 0:
        assert walk.spilled_bytes > 0 and walk.peak_bytes == 0
    else:
        assert walk.spilled_bytes == 0 and walk.peak_bytes > 0


def test_what_a_walk_holds_does_not_grow_with_depth():
    """Pre-norm FFN blocks of one width: the most a walk holds (stopping at every weight) is
    the same for 2 blocks and 6, and is the residual stream plus one block's activations."""
    peaks = {}
    for blocks in (2, 6):
        graph = load_onnx(zoo.ffn_stack(blocks=blocks, hidden=(24,) * blocks))
        batches = [reference.random_inputs(graph, seed=s) for s in range(4)]
        with Walk(graph, batches) as walk:
            for node in _inputs_of_weights(graph):
                walk.advance(walk.index(node.name))
            peaks[blocks] = walk.peak_bytes
        x = batches[0][graph.inputs[0]]
        per_token = x.nbytes // x.shape[-1] * len(batches)       # bytes of one channel
    assert peaks[2] == peaks[6]
    assert peaks[6] <= per_token * (2 * 12 + 24)      # residual + its norm + the FFN's hidden


def test_collect_gives_every_named_tensor_once_per_batch(zoo_models):
    graph = load_onnx(zoo_models("hf_llama_gqa"))
    batches = [reference.random_inputs(graph, seed=s) for s in range(2)]
    names = [n.inputs[0] for n in _inputs_of_weights(graph)] + [graph.inputs[0]]
    want = reference.activations(graph, batches, [n for n in names if n not in graph.inputs])
    seen = {}

    def reduce(name, i, value):
        assert (name, i) not in seen
        seen[(name, i)] = value

    collect(graph, batches, names, reduce, budget=0)
    assert set(seen) == {(n, i) for n in set(names) for i in range(2)}
    for name, values in want.items():
        for i, w in enumerate(values):
            np.testing.assert_allclose(seen[(name, i)], w, rtol=1e-4, atol=1e-5)


def test_pairs_of_hidden_states_are_walked_two_at_a_time():
    """``pairs`` (layer removal's angular distances) gives each (start, end) pair of layer
    boundaries what the whole model computes, and holds no more for 6 blocks than for 4
    (windows of two layers: three boundaries at a time), where running the model whole holds
    every boundary of every batch."""
    from sparsec.passes.layer_removal import find_layers

    peaks = {}
    for blocks in (4, 6):
        graph = load_onnx(zoo.ffn_stack(blocks=blocks, hidden=(24,) * blocks))
        batches = [reference.random_inputs(graph, seed=s) for s in range(3)]
        layers = find_layers(graph)
        windows = [(a.start, b.end) for a, b in zip(layers, layers[1:])]
        names = sorted({n for w in windows for n in w if n not in graph.inputs})
        want = reference.activations(graph, batches, names)
        seen = {}

        def reduce(k, i, a, b):
            assert (k, i) not in seen
            seen[(k, i)] = (a, b)

        peaks[blocks] = pairs(graph, batches, windows, reduce)
        assert set(seen) == {(k, i) for k in range(len(windows)) for i in range(3)}
        for (k, i), (a, b) in seen.items():
            for name, got in zip(windows[k], (a, b)):
                w = batches[i][name] if name in graph.inputs else want[name][i]
                np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-5)
        one = sum(v.nbytes for v in want[names[0]])     # one boundary, every batch
    assert len(layers) == 6 and peaks[6] == peaks[4] == 3 * one   # the whole model: 6


def test_spilling_calibration_to_disk_changes_no_weight(zoo_models, monkeypatch):
    """SparseGPT on a GQA Llama with every calibration tensor spilled (budget 0 bytes) gives
    bit for bit the weights it gives in memory; the report says what was spilled."""
    model = zoo_models("hf_llama_gqa")
    graph = load_onnx(model)
    calib = [reference.random_inputs(graph, seed=s) for s in range(4)]
    runs = {}
    for budget in (None, "0"):
        _set_budget(monkeypatch, budget)
        runs[budget] = sparsec.prune(model, sparsity=0.5, sparsity_criterion="sparsegpt",
                                     calibration=calib)
    refit = {b: r.passes[-1].details["refit"] for b, r in runs.items()}
    assert refit[None] and all(r["spilled_bytes"] == 0 and r["held_bytes"] > 0
                               for r in refit[None])
    assert all(r["held_bytes"] == 0 for r in refit["0"]) and refit["0"][-1]["spilled_bytes"] > 0
    a, b = runs[None].graph.initializers, runs["0"].graph.initializers
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_budget_that_is_not_a_number_is_refused(zoo_models, monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "lots")
    graph = load_onnx(zoo_models("hf_llama_gqa"))
    with pytest.raises(BadOptionError, match=BUDGET_ENV):
        sparsec.prune(graph, sparsity=0.5, sparsity_criterion="sparsegpt",
                      calibration=[reference.random_inputs(graph, seed=s) for s in range(2)])


def test_held_out_outputs_past_the_budget_go_to_disk(zoo_models, monkeypatch):
    """Budget 0: the held-out outputs a pass manager compares against are on disk (read back
    when used), and a candidate compared batch by batch scores what it scores in memory."""
    from sparsec.passes.manager import PassContext

    graph = load_onnx(zoo_models("hf_llama_gqa"))
    calib = [reference.random_inputs(graph, seed=s) for s in range(8)]
    other = graph.copy(arrays=False)
    name = next(k for k, v in graph.initializers.items() if v.ndim == 2)
    other.set_initializer(name, graph.initializers[name] * 0.9)
    fids = {}
    for budget in (None, "0"):
        _set_budget(monkeypatch, budget)
        ctx = PassContext.split(calib)
        want = ctx.holdout_outputs(graph)
        assert all(isinstance(o, Spilled) == (budget == "0") for outs in want for o in outs)
        fids[budget] = ctx.compare_graph(want, other)
        assert fids[budget] == ctx.compare(want, reference.run_batches(other, ctx.holdout))
    assert fids[None] == fids["0"] and fids[None].cosine < 1.0


def test_spilled_batches_are_resident_only_while_used(tmp_path):
    """Tensors on disk are mapped while one is read, not for as long as they are held: reading
    128 MiB of spilled batches one by one leaves resident memory where it was (memory maps
    kept open counted every page read through them)."""
    from sparsec.layerwise import to_disk

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    held = [to_disk(np.full((1024, 2048), i, np.float32), str(tmp_path)) for i in range(16)]
    assert all(isinstance(v, Spilled) and v.shape == (1024, 2048) and v.nbytes == 2**23
               for v in held)
    before = rss()
    sums = [float(np.asarray(v, dtype=np.float64).sum()) for v in held[:2]]
    sums += [float(np.asarray(v).sum()) for v in held[2:]]
    assert sums == [1024 * 2048 * i for i in range(16)]
    assert rss() - before < 2**25, (rss() - before) / 2**20
