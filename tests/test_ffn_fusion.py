"""FFN fusion and attention removal.

The fusion's lossy step is only "every FFN of the run reads the run's input" (and, post-norm,
the norms inside the run go); the rest (norm affine folded into the up-projections, up- and
down-projections concatenated) is exact. So the fused graph must equal ``parallel_run``, the
same model rewired by hand, on every architecture: pre-norm and post-norm, LayerNorm and
RMSNorm, GELU and SwiGLU, Gemm (FX) and MatMul + Add (ONNX), equal and unequal widths."""

from __future__ import annotations

import numpy as np
import pytest
import zoo

import sparsec
from sparsec import reference
from sparsec.errors import BadOptionError
from sparsec.frontends.fx import capture_fx
from sparsec.frontends.onnx import load_onnx
from sparsec.passes.ffn_fusion import extract_ffn, fuse_run, fusible, gemm_count, parallel_run
from sparsec.passes.layer_removal import find_blocks, remove_run


def _graph(zoo_models, name: str, frontend: str):
    if frontend == "fx":
        return capture_fx(*zoo.transformers_model(name))
    return load_onnx(zoo_models(name))


def _without_inner_attention(g):
    """Drop the attention blocks that sit between FFN blocks, so the FFNs follow each other."""
    while True:
        blocks = find_blocks(g)
        inner = [b for k, b in enumerate(blocks) if b.attention and k > 0
                 and not blocks[k - 1].attention]
        if not inner:
            return g
        g = remove_run(g, inner[0].start, inner[0].end)


def _outputs(g, feeds):
    return reference.run(g, feeds)[0]


CASES = [("ffn_stack", "onnx"), ("hf_llama_gqa", "onnx"), ("hf_llama_gqa", "fx"),
         ("hf_bert", "onnx"), ("hf_bert", "fx"), ("hf_gpt2", "onnx"), ("hf_gpt2", "fx")]


@pytest.mark.parametrize("name, frontend", CASES)
def test_fused_ffn_equals_the_parallel_form(zoo_models, name, frontend):
    g = _without_inner_attention(_graph(zoo_models, name, frontend))
    blocks = [b for b in find_blocks(g) if not b.attention]
    run = blocks[:3] if name == "ffn_stack" else blocks[:2]
    ffns = fusible(g, run)
    assert ffns is not None, [extract_ffn(g, b) is not None for b in run]
    fused, parallel = fuse_run(g, run, ffns), parallel_run(g, run, ffns)
    feeds = reference.random_inputs(g, seed=1)
    want, got = _outputs(parallel, feeds), _outputs(fused, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    ups = len(ffns[0].ups)
    assert ups == (2 if "llama" in name else 1)           # SwiGLU: gate and up
    assert gemm_count(g) - gemm_count(fused) == (len(run) - 1) * (ups + 1)
    assert not (_outputs(g, feeds) == got).all()          # the lossy step did change something


def test_fusion_concatenates_unequal_widths_and_is_exact_when_earlier_blocks_add_nothing():
    """ffn_stack's blocks are 24, 20 and 28 wide. With the first two down-projections zeroed,
    every block reads x0 anyway, so fusing all three is exact against the original."""
    g = load_onnx(zoo.ffn_stack()).copy()
    for k in (0, 1):
        g.initializers[f"w{k}b"] = np.zeros_like(g.initializers[f"w{k}b"])
        g.initializers[f"b{k}b"] = np.zeros_like(g.initializers[f"b{k}b"])
    blocks = find_blocks(g)
    ffns = fusible(g, blocks)
    assert [f.width for f in ffns] == [24, 20, 28] and [f.norm for f in ffns] == ["layernorm"] * 3
    fused = fuse_run(g, blocks, ffns)
    assert fused.op_histogram()["LayerNormalization"] == 1 and gemm_count(fused) == 3
    feeds = reference.random_inputs(g, seed=2)
    np.testing.assert_allclose(_outputs(fused, feeds), _outputs(g, feeds), rtol=1e-5, atol=1e-5)
    assert g.op_histogram()["LayerNormalization"] == 3                  # input untouched


def test_the_pass_fuses_the_run_that_stays_closest():
    """Zero block 0's output: fusing blocks 0-1 is exact, fusing 1-2 is not; the pass picks 0-1,
    reports distance 0 for it, and channel pruning still works on the wide FFN."""
    g = load_onnx(zoo.ffn_stack()).copy()
    g.initializers["w0b"] = np.zeros_like(g.initializers["w0b"])
    g.initializers["b0b"] = np.zeros_like(g.initializers["b0b"])
    calib = [reference.random_inputs(g, seed=s) for s in range(4)]
    result = sparsec.prune(g, fuse_ffn=2, calibration=calib)
    d = result.passes[0].details
    assert d["fused"] == [0, 1] and d["output_angular_distance"]["0"] < 1e-7
    assert d["output_angular_distance"]["1"] > 1e-4
    assert d["gemms_in_run"] == {"before": 4, "after": 2} and d["width"] == [24, 20]
    assert result.fidelity.max_rel_err < 1e-4
    pruned = sparsec.prune(g, fuse_ffn=2, ratio=0.5, calibration=calib)
    assert pruned.after.params < result.after.params
    assert _outputs(pruned.graph, calib[0]).shape == _outputs(g, calib[0]).shape


def test_remove_attention_then_fuse_keeps_bert_runnable(zoo_models):
    g = load_onnx(zoo_models("hf_bert"))
    result = sparsec.prune(g, remove_attention=1, fuse_ffn=2)
    attn, fuse = (p.details for p in result.passes)
    assert attn["attention_blocks"] == 1 and attn["removed"] == [0]    # the one between FFNs
    assert fuse["gemms_in_run"] == {"before": 4, "after": 2}
    assert result.graph.op_histogram()["Softmax"] == 1
    feeds = reference.random_inputs(g)
    assert _outputs(result.graph, feeds).shape == _outputs(g, feeds).shape
    assert 0.5 < result.fidelity.cosine < 1.0


def test_an_attention_block_that_adds_nothing_is_the_one_removed():
    """Zero GPT-2 layer 1's attention output projection: that block's angular distance is 0,
    it goes, and the model computes what it computed."""
    module, (ids,) = zoo.transformers_model("hf_gpt2")
    g = capture_fx(module, (ids,)).copy()
    for name in [k for k in g.initializers if ".h.1.attn.c_proj" in k]:
        g.initializers[name] = np.zeros_like(g.initializers[name])
    calib = [{"input_ids": np.random.default_rng(s).integers(0, 100, (1, 8))} for s in range(4)]
    result = sparsec.prune(g, remove_attention=1, calibration=calib)
    d = result.passes[0].details
    assert d["removed"] == [1] and d["angular_distance"][1] == 0.0
    assert not any(".h.1.attn." in k for k in result.graph.initializers)
    feeds = {"input_ids": ids.numpy()}
    np.testing.assert_allclose(_outputs(result.graph, feeds), _outputs(g, feeds),
                               rtol=1e-5, atol=1e-5)


def test_impossible_structure_options_fail_with_one_clear_error(zoo_models):
    g = load_onnx(zoo_models("hf_bert"))
    with pytest.raises(BadOptionError, match="no run of 2 consecutive FFN blocks"):
        sparsec.prune(g, fuse_ffn=2)            # attention sits between the FFNs
    with pytest.raises(BadOptionError, match="2 or more"):
        sparsec.prune(g, fuse_ffn=1)
    with pytest.raises(BadOptionError, match="the model has 2"):
        sparsec.prune(g, remove_attention=3)
    with pytest.raises(BadOptionError, match=">= 0"):
        sparsec.prune(g, remove_attention=-1)


def test_fusing_twice_keeps_names_apart():
    """Fuse blocks 0-1 of ffn_stack, then the fused block with block 2: all three in one FFN,
    equal to fusing the three at once (fusion of a parallel form is associative)."""
    g = load_onnx(zoo.ffn_stack())
    blocks = find_blocks(g)
    once = fuse_run(g, blocks, fusible(g, blocks))
    twice = fuse_run(g, blocks[:2], fusible(g, blocks[:2]))
    blocks2 = find_blocks(twice)
    assert len(blocks2) == 2
    twice = fuse_run(twice, blocks2, fusible(twice, blocks2))
    assert gemm_count(twice) == gemm_count(once) == 3
    feeds = reference.random_inputs(g, seed=4)
    np.testing.assert_allclose(_outputs(twice, feeds), _outputs(once, feeds), rtol=1e-5,
                               atol=1e-5)


def test_attention_removal_for_fusion_counts_only_blocks_between_ffns(zoo_models):
    g = load_onnx(zoo_models("hf_bert"))            # A F A F: one attention block between
    with pytest.raises(BadOptionError, match="has 1 between FFN blocks"):
        sparsec.prune(g, remove_attention=2, fuse_ffn=2)
