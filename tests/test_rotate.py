"""Rotation before slicing (SliceGPT): on pre-norm decoders with RMS norms, exported by both
torch exporters, rotating the residual stream by its principal directions is exact, and cutting
the rotated stream loses less than cutting channels; streams a rotation would change (LayerNorm,
per-channel offsets) are reported and left to the plain cut."""

from __future__ import annotations

import numpy as np
import pytest
import realworld

import sparsec
from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.passes import rotate
from sparsec.passes.channel_prune import ChannelPrune
from sparsec.passes.manager import PassContext

_CACHE: dict = {}


def model(name: str, exporter: str):
    if (name, exporter) not in _CACHE:
        _CACHE[name, exporter] = sparsec.load(realworld.build(name, exporter))
    return _CACHE[name, exporter]


def token_batches(graph, n: int = 16, vocab: int = 100) -> list[dict]:
    """Batches of token ids drawn from the whole vocabulary (seeded random inputs draw ids from
    a small range, which a PCA would see as a stream of two directions)."""
    rng = np.random.default_rng(0)
    out = []
    for seed in range(n):
        feeds = reference.random_inputs(graph, seed=seed)
        ints = [k for k in graph.inputs if feeds[k].dtype == np.int64]
        feeds[ints[0]] = rng.integers(0, vocab, feeds[ints[0]].shape)
        for k in ints[1:]:                                  # attention mask: all real
            feeds[k] = np.ones_like(feeds[k])
        out.append(feeds)
    return out


def stream(graph):
    [g] = [g for g in DependencyGraph(graph).groups if g.kind == "hidden" and g.hidden_prunable]
    return g


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma"])
def test_rotating_the_stream_is_exact(name, exporter):
    graph = model(name, exporter)
    r = rotate.roles(graph, stream(graph))
    assert not isinstance(r, str), r
    assert r.writers and r.readers and len(r.scales) == 5       # 2 layers x 2 norms + final
    ctx = PassContext.split(token_batches(graph))
    q = rotate.principal_directions(graph, r, ctx)
    assert np.allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-8)
    rotated = rotate.rotate(graph, r, q)
    assert any(not np.array_equal(rotated.initializers[w], graph.initializers[w])
               for w, _ in r.writers)
    assert_same(graph, rotated, ctx)


def assert_same(graph, changed, ctx):
    want = reference.run_batches(graph, ctx.holdout)
    got = reference.run_batches(changed, ctx.holdout)
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * float(np.abs(x).max()))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["gpt2", "opt", "phi", "gpt_neo"])
def test_pre_norm_layernorms_become_rms_norms_exactly(name, exporter):
    """GPT-2, OPT, Phi, GPT-Neo: writers centered (position embeddings folded to a table
    included), each LayerNorm written out as its RMS form; then rotated at full width: the
    same function."""
    graph = model(name, exporter)
    ctx = PassContext.split(token_batches(graph))
    g = stream(graph)
    assert "centers the stream" in rotate.roles(graph, g)
    rms = rotate.as_rms(rotate.unshare(graph, g), g)
    assert not isinstance(rms, str), rms
    assert not any(n.op_type == "LayerNormalization" for n in rms.nodes)
    assert_same(graph, rms, ctx)
    rotated, report = ChannelPrune(0.0, hidden_ratio=1e-9, rotate=True).run(graph, ctx)
    assert [s["rotated"] and s["layernorms_made_rms"] for s in report["rotation"]] == [True]
    assert_same(graph, rotated, ctx)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "gpt2", "opt"])
def test_a_rotated_cut_loses_less_than_a_channel_cut(name):
    """Same width kept (3/4 of the stream), held-out batches: the principal directions keep
    more of the model than the channels with the largest weights (cosine on these seeds: Llama
    0.89 vs 0.86, Qwen2 0.89 vs 0.86, Gemma 0.96 vs 0.89, GPT-2 0.96 vs 0.89, OPT 0.95 vs
    0.83). The norms' scales become sqrt(d / k)."""
    graph = model(name, "dynamo")
    ctx = PassContext.split(token_batches(graph))
    rotated, report = ChannelPrune(0.0, hidden_ratio=0.25, rotate=True).run(graph, ctx)
    [entry] = report["rotation"]
    assert entry["rotated"] and entry["kept"] == 24 and entry["width"] == 32
    plain, _ = ChannelPrune(0.0, hidden_ratio=0.25).run(graph, ctx)
    want = reference.run_batches(graph, ctx.holdout)
    cos_rot = ctx.compare(want, reference.run_batches(rotated, ctx.holdout)).cosine
    cos_plain = ctx.compare(want, reference.run_batches(plain, ctx.holdout)).cosine
    assert cos_rot > cos_plain + 0.02, (cos_rot, cos_plain)
    assert stream(rotated).size == 24
    scales = [i for n in rotated.nodes if n.op_type == "Mul" for i in n.inputs
              if i in rotated.initializers and rotated.initializers[i].shape == (24,)]
    assert len(scales) >= 5
    for scale in scales:
        np.testing.assert_allclose(rotated.initializers[scale], np.sqrt(32 / 24), rtol=1e-6)


@pytest.mark.parametrize("name, why", [("bert", "not only linear layers"),
                                       ("convnext", "")])
def test_streams_a_rotation_would_change_are_left_whole(name, why):
    """A post-norm encoder's norms feed its residual adds (BERT, with its output mapped);
    ConvNeXt's stream has per-channel layer scales."""
    graph = model(name, "dynamo")
    ctx = PassContext.split([reference.random_inputs(graph, seed=s) for s in range(4)])
    out, report = ChannelPrune(0.0, hidden_ratio=0.25, rotate=True).run(graph, ctx)
    assert report["rotation"] and not any(s["rotated"] for s in report["rotation"])
    assert all(why in s["why"] for s in report["rotation"])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_channel_prune_rotates_inside_its_plan(name):
    """``ChannelPrune(rotate=True)`` cuts the rotated stream beside the FFN and head groups in
    one plan (and refits with reconstruct), better than the same plan without rotation."""
    graph = model(name, "dynamo")
    ctx = PassContext.split(token_batches(graph))
    want = reference.run_batches(graph, ctx.holdout)

    def cosine(g):
        return ctx.compare(want, reference.run_batches(g, ctx.holdout)).cosine

    both, _ = ChannelPrune(0.25, hidden_ratio=0.25, rotate=True, reconstruct=True).run(graph, ctx)
    plain, _ = ChannelPrune(0.25, hidden_ratio=0.25, reconstruct=True).run(graph, ctx)
    assert stream(both).size == stream(plain).size == 24
    assert cosine(both) > cosine(plain)


def test_rotate_through_the_api_compiles_and_validates(tmp_path):
    """``--rotate`` end to end on GPT-2 (LayerNorms made RMS, then rotated): the recipe records
    it, the package matches ONNX Runtime, and it beats the same cut without rotation;
    ``prune_module`` refuses it and ``--rotate`` alone is an error."""
    from sparsec import api
    from sparsec.errors import BadOptionError

    proto = realworld.build("gpt2", "dynamo")
    calib = token_batches(sparsec.load(proto))
    rotated = api.prune(proto, hidden_ratio=0.25, rotate=True, calibration=calib)
    plain = api.prune(proto, hidden_ratio=0.25, calibration=calib)
    assert rotated.recipe.rotate and rotated.fidelity.cosine > plain.fidelity.cosine
    [p] = rotated.passes
    assert p.details["rotation"][0]["rotated"] and p.details["rotation"][0]["kept"] == 24
    m = api.compile(proto, tmp_path / "pkg", hidden_ratio=0.25, rotate=True, calibration=calib)
    assert m["prune"]["recipe"]["rotate"] is True
    assert api.validate(tmp_path / "pkg").ok
    with pytest.raises(BadOptionError, match="--hidden-ratio"):
        api.prune(proto, rotate=True, calibration=calib)
    module, example = realworld.MODELS["gpt2"]()
    with pytest.raises(BadOptionError, match="rotate"):
        api.prune_module(module, example, recipe={"hidden_ratio": 0.25, "rotate": True})
