"""Real-world architectures from ``transformers`` configs (small sizes, random weights, no hub),
exported to ONNX the two ways files in the wild are made: torch's TorchScript exporter
(``dynamo=False``, most existing files) and the dynamo exporter.

``benchmarks/coverage.py`` runs every model here through inspect / prune / compile; the tests
use a few of them (``tests/test_realworld.py``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Callable

import onnx
import torch
from torch import nn

EXPORTERS = ("legacy", "dynamo")


class _Out(nn.Module):
    """A model that returns one tensor: ``logits`` / ``last_hidden_state`` / the first item."""

    def __init__(self, model: nn.Module, key: str | None = None,
                 names: tuple[str, ...] = (), **fixed):
        super().__init__()
        self.model, self.key, self.names, self.fixed = model, key, names, fixed

    def forward(self, *args):
        if self.names:
            out = self.model(**dict(zip(self.names, args)), **self.fixed)
        else:
            out = self.model(*args, **self.fixed)
        if self.key is not None:
            return getattr(out, self.key)
        return out[0] if isinstance(out, (tuple, list)) else out


def _ids(vocab: int = 100, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))


def _lm(model: nn.Module) -> tuple[nn.Module, tuple]:
    """A causal LM called as deployed: token ids and an attention mask, logits out."""
    ids = _ids()
    return (_Out(model, "logits", ("input_ids", "attention_mask"), use_cache=False),
            (ids, torch.ones_like(ids)))


def _image(size: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def _text_encoder(cfg_cls: str, model_cls: str, **kw) -> Callable[[], tuple]:
    def build():
        import transformers as tf
        cfg = getattr(tf, cfg_cls)(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, **kw)
        return _Out(getattr(tf, model_cls)(cfg), "last_hidden_state"), (_ids(),)
    return build


def _causal_lm(cfg_cls: str, model_cls: str, **kw) -> Callable[[], tuple]:
    def build():
        import transformers as tf
        args = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64)
        args.update(kw)
        cfg = getattr(tf, cfg_cls)(**args)
        return _lm(getattr(tf, model_cls)(cfg))
    return build


def _vision(cfg_cls: str, model_cls: str, size: int = 32, **kw) -> Callable[[], tuple]:
    def build():
        import transformers as tf
        cfg = getattr(tf, cfg_cls)(num_labels=5, **kw)
        return _Out(getattr(tf, model_cls)(cfg), "logits"), (_image(size),)
    return build


def _distilbert():
    import transformers as tf
    cfg = tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64)
    return _Out(tf.DistilBertModel(cfg), "last_hidden_state"), (_ids(),)


def _gpt2():
    import transformers as tf
    cfg = tf.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return _lm(tf.GPT2LMHeadModel(cfg))


def _gpt_neo():
    import transformers as tf
    cfg = tf.GPTNeoConfig(vocab_size=100, max_position_embeddings=64, hidden_size=32,
                          num_layers=2, num_heads=4, intermediate_size=64,
                          attention_types=[[["global", "local"], 1]], window_size=8)
    return _lm(tf.GPTNeoForCausalLM(cfg))


def _opt():
    import transformers as tf
    cfg = tf.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    return _lm(tf.OPTForCausalLM(cfg))


def _t5_encoder():
    import transformers as tf
    cfg = tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return _Out(tf.T5EncoderModel(cfg), "last_hidden_state"), (_ids(),)


def _whisper_encoder():
    import transformers as tf
    cfg = tf.WhisperConfig(vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=2,
                           encoder_attention_heads=4, decoder_layers=1,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           max_source_positions=32, pad_token_id=0, bos_token_id=0,
                           eos_token_id=0, decoder_start_token_id=0)
    feats = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    return _Out(tf.WhisperModel(cfg).get_encoder(), "last_hidden_state"), (feats,)


def _wav2vec2():
    import transformers as tf
    cfg = tf.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                            do_stable_layer_norm=True, feat_extract_norm="layer")
    audio = torch.randn(1, 1600, generator=torch.Generator().manual_seed(0))
    return _Out(tf.Wav2Vec2Model(cfg), "last_hidden_state"), (audio,)


def _mobilevit():
    import transformers as tf
    cfg = tf.MobileViTConfig(image_size=32, patch_size=2, hidden_sizes=[16, 24, 32],
                             neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48], num_labels=5)
    return _Out(tf.MobileViTForImageClassification(cfg), "logits"), (_image(32),)


MODELS: dict[str, Callable[[], tuple]] = {
    # encoders
    "bert": _text_encoder("BertConfig", "BertModel"),
    "distilbert": _distilbert,
    "roberta": _text_encoder("RobertaConfig", "RobertaModel", pad_token_id=1),
    "albert": _text_encoder("AlbertConfig", "AlbertModel", embedding_size=16),
    "electra": _text_encoder("ElectraConfig", "ElectraModel", embedding_size=16),
    "deberta_v2": _text_encoder("DebertaV2Config", "DebertaV2Model"),
    "mpnet": _text_encoder("MPNetConfig", "MPNetModel"),
    "t5_encoder": _t5_encoder,
    # decoders (Llama, Mistral, Qwen2: grouped-query attention)
    "gpt2": _gpt2,
    "gpt_neo": _gpt_neo,
    "opt": _opt,
    "llama": _causal_lm("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2),
    "mistral": _causal_lm("MistralConfig", "MistralForCausalLM", num_key_value_heads=2,
                          sliding_window=None),
    "qwen2": _causal_lm("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2),
    "phi": _causal_lm("PhiConfig", "PhiForCausalLM"),
    "gemma": _causal_lm("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=1, head_dim=8),
    # vision transformers
    "vit": _vision("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8,
                   hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64),
    "deit": _vision("DeiTConfig", "DeiTForImageClassification", image_size=32, patch_size=8,
                    hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64),
    "swin": _vision("SwinConfig", "SwinForImageClassification", image_size=32, patch_size=4,
                    embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4),
    "mobilevit": _mobilevit,
    # CNNs
    "resnet": _vision("ResNetConfig", "ResNetForImageClassification", embedding_size=16,
                      hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
    "mobilenetv2": _vision("MobileNetV2Config", "MobileNetV2ForImageClassification",
                           depth_multiplier=0.35, image_size=32),
    "efficientnet": _vision("EfficientNetConfig", "EfficientNetForImageClassification",
                            image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                            hidden_dim=320),
    "regnet": _vision("RegNetConfig", "RegNetForImageClassification", embedding_size=16,
                      hidden_sizes=[16, 32], depths=[1, 1], groups_width=8),
    "convnext": _vision("ConvNextConfig", "ConvNextForImageClassification", num_stages=2,
                        hidden_sizes=[16, 32], depths=[1, 1]),
    "convnextv2": _vision("ConvNextV2Config", "ConvNextV2ForImageClassification", num_stages=2,
                          hidden_sizes=[16, 32], depths=[1, 1]),
    # speech encoders
    "whisper_encoder": _whisper_encoder,
    "wav2vec2": _wav2vec2,
}


def model(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    module, example = MODELS[name]()
    return module.eval(), example


def export(module: nn.Module, example: tuple, exporter: str) -> onnx.ModelProto:
    """ONNX from torch's TorchScript exporter (``legacy``) or the dynamo one."""
    if exporter == "dynamo":
        from sparsec.frontends.torch import export_onnx
        return export_onnx(module, example)
    buf = io.BytesIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buf, dynamo=False, opset_version=17,
                          input_names=[f"input_{i}" for i in range(len(example))])
    return onnx.load_from_string(buf.getvalue())


def build(name: str, exporter: str) -> onnx.ModelProto:
    module, example = model(name)
    return export(module, example, exporter)
