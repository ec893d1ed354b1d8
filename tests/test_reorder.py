"""Channel reordering: any order of a group's channels, applied to every member weight, leaves
the model's function unchanged (on every zoo model); the clustering order brings scrambled
block-sparse weights back to their blocks; pruning never adds gathers."""

from __future__ import annotations

import numpy as np
import pytest
import zoo

import sparsec
from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.frontends.onnx import load_onnx
from sparsec.passes.reorder import cluster_order, nonzero_blocks
from sparsec.passes.surgery import apply_order

GATHERS = ("Gather", "GatherND", "GatherElements", "ScatterND", "ScatterElements")


def _shuffled(g, seed=0):
    """Every prunable group in a random order that moves something."""
    rng = np.random.default_rng(seed)
    dg = DependencyGraph(g)
    orders = {}
    for group in dg.groups:
        if group.prunable:
            perm = rng.permutation(group.size)
            orders[group.id] = perm[::-1] if (perm == np.arange(group.size)).all() else perm
    return apply_order(g, dg, orders), orders


@pytest.mark.parametrize("name", (*zoo.ALL, *zoo.TRANSFORMERS_MORE))
def test_any_channel_order_is_exact(zoo_models, name):
    g = load_onnx(zoo_models(name))
    shuffled, orders = _shuffled(g)
    assert orders, "every zoo model has a prunable group"
    moved = [k for k in g.initializers
             if not np.array_equal(g.initializers[k], shuffled.initializers[k])]
    assert moved                                           # weights really moved
    feeds = reference.random_inputs(g, seed=3)
    for want, got in zip(reference.run(g, feeds), reference.run(shuffled, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert shuffled.op_histogram() == g.op_histogram()     # no gather, no copy: weights only


def test_orders_that_are_not_permutations_are_refused():
    g = load_onnx(zoo.gemm_mlp())
    dg = DependencyGraph(g)
    gid = next(x.id for x in dg.groups if x.prunable)
    with pytest.raises(ValueError, match="permutation"):
        apply_order(g, dg, {gid: np.zeros(dg.groups[gid].size, dtype=int)})


def _block_sparse_mlp(seed=0):
    """gemm_mlp with 4x4 block-sparse weights ([out, in] view), hidden channels scrambled."""
    rng = np.random.default_rng(seed)
    g = load_onnx(zoo.gemm_mlp()).copy()

    def mask(out, inp, p):
        return np.kron(rng.random((out // 4, inp // 4)) < p, np.ones((4, 4)))

    g.initializers["w1"] = (g.initializers["w1"] * mask(32, 16, 0.3)).astype(np.float32)
    g.initializers["w2"] = (g.initializers["w2"] * mask(24, 32, 0.3).T).astype(np.float32)
    return g, _shuffled(g, seed)[0]


def test_clustering_recovers_scrambled_blocks_exactly():
    blocky, scrambled = _block_sparse_mlp()
    before, after = nonzero_blocks(blocky, (4, 4)), nonzero_blocks(scrambled, (4, 4))
    assert after > 2 * before                              # scrambling spread the blocks out
    clustered, orders = cluster_order(scrambled)
    assert nonzero_blocks(clustered, (4, 4)) <= before and len(orders) == 2
    feeds = reference.random_inputs(blocky, seed=1)
    np.testing.assert_allclose(reference.run(clustered, feeds)[0],
                               reference.run(scrambled, feeds)[0], rtol=1e-5, atol=1e-4)


def test_reorder_option_reports_blocks_and_leaves_dense_models_alone():
    _, scrambled = _block_sparse_mlp(seed=1)
    result = sparsec.prune(scrambled, reorder=True)
    d = result.passes[0].details
    assert d["nonzero_blocks"]["after"] < d["nonzero_blocks"]["before"]
    assert d["gathers_added"] == 0 and result.passes[0].exact
    dense = sparsec.prune(load_onnx(zoo.gemm_mlp()), reorder=True).passes[0].details
    assert dense["groups_reordered"] == 0


@pytest.mark.parametrize("name", ("residual_convs", "nested_concat", "hf_bert", "hf_llama_gqa"))
def test_pruning_adds_no_gather(zoo_models, name):
    """Coupled slices go together, so no consumer needs a gather to find its channels."""
    g = load_onnx(zoo_models(name))
    pruned = sparsec.prune(g, ratio=0.5).graph
    count = [sum(h.get(op, 0) for op in GATHERS) for h in (g.op_histogram(),
                                                          pruned.op_histogram())]
    assert count[1] == count[0]
