"""prune_module on Hugging Face causal LMs: the returned model's config describes its weights, so
save_pretrained + from_pretrained gives the same model back, and cached generation works."""

import numpy as np
import pytest

import sparsec
from sparsec.errors import OutputError

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

VOCAB = 64


def causal_lm(arch: str, layers: int = 3):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, **common)
        return tf.GPT2LMHeadModel(cfg).eval()
    config, model = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                     "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                     "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
    cfg = config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, **common)
    return model(cfg).eval()


def tokens(seed: int, n: int = 8):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


CALIB = [{"input_ids": tokens(s)} for s in range(1, 5)]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_pruned_causal_lm_round_trips_through_save_pretrained(arch, tmp_path):
    """Heads (not GPT-2's: see below), FFN channels and a layer go; the saved model loads with
    its sizes and gives the same logits, and greedy generation with the KV cache gives the
    tokens a full forward gives (layer_idx renumbered)."""
    lm = causal_lm(arch)
    ids = tokens(0)
    heads = 0.0 if arch == "gpt2" else 0.5
    pruned, _ = sparsec.prune_module(lm, (ids,), ratio=0.5, head_ratio=heads, remove_layers=1,
                                     calibration=CALIB)
    cfg = pruned.config
    assert cfg.num_hidden_layers == 2 and lm.config.num_hidden_layers == 3   # input untouched
    assert lm.config.use_cache is True
    if arch == "gpt2":
        assert cfg.n_inner == 64
        assert tuple(pruned.transformer.h[0].mlp.c_fc.weight.shape) == (32, 64)
    else:
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                cfg.intermediate_size) == (2, 1, 8, 32)
    pruned.save_pretrained(tmp_path)
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(lm)
    assert ({k: v.shape for k, v in back.state_dict().items()}
            == {k: v.shape for k, v in pruned.state_dict().items()})
    prompt = tokens(9, 5)
    with torch.no_grad():
        np.testing.assert_array_equal(back(ids).logits.numpy(), pruned(ids).logits.numpy())
        cached = back.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        seq = prompt
        for _ in range(4):                          # greedy, without a cache
            nxt = back(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert [m.layer_idx for m in back.modules() if isinstance(getattr(m, "layer_idx", None),
                                                              int)][-1] == 1
    np.testing.assert_array_equal(cached.numpy(), seq.numpy())


def test_uneven_layers_refuse_save_pretrained_and_write_nothing(tmp_path):
    """One FFN pruned, the others whole: LlamaConfig cannot state two intermediate sizes, so
    save_pretrained says so instead of writing what from_pretrained cannot load."""
    lm = causal_lm("llama", layers=2)
    ids = tokens(0)
    lines = []
    pruned, _ = sparsec.prune_module(lm, (ids,), layer_ratios={"*layers.0.mlp*": 0.5},
                                     calibration=CALIB, log=lines.append)
    assert [m.mlp.up_proj.out_features for m in pruned.model.layers] == [32, 64]
    assert any("intermediate_size" in line and "[32, 64]" in line for line in lines)
    with pytest.raises(OutputError, match=r"intermediate_size for all layers.*\[32, 64\]"):
        pruned.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    lm.save_pretrained(tmp_path / "dense")                   # the input model still saves


def test_gpt2_with_fewer_heads_refuses_save_pretrained(tmp_path):
    """GPT2Config ties the heads' width to n_embd: pruned heads have no config to go in."""
    lm = causal_lm("gpt2", layers=2)
    pruned, _ = sparsec.prune_module(lm, (tokens(0),), ratio=0.5, calibration=CALIB)
    with pytest.raises(OutputError, match="c_attn"):
        pruned.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_head_count_transformers_refuses_is_refused_before_writing(tmp_path):
    """LlamaConfig's validation wants hidden_size to be a multiple of the head count even with
    head_dim stated (TinyLlama's 2048 with 24 of 32 heads): a clean OutputError, nothing
    written, instead of transformers' traceback halfway through save_pretrained."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64)
    lm = tf.LlamaForCausalLM(cfg).eval()
    pruned, _ = sparsec.prune_module(lm, (tokens(0),), head_ratio=0.25, calibration=CALIB)
    assert pruned.config.num_attention_heads == 3
    with pytest.raises(OutputError, match="multiple of the number of attention heads"):
        pruned.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
