"""The ONNX route's companion Hugging Face config (``prune --hf-config``): for a Llama and a
GPT-2 exported with torch.onnx, the config written beside the pruned ONNX file builds a model
whose layer weights have the pruned file's shapes."""

from collections import Counter

import numpy as np
import onnx
import pytest
import zoo
from test_cli import sparsec as run_cli

import sparsec
from sparsec.errors import BadOptionError, OutputError

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

VOCAB = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (model.onnx, its config.json), exported once per module."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = export(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


def export(arch: str, tmp_path):
    """(model.onnx, its config.json) for a 3-layer causal LM, exported as the LLM benchmark
    does (logits only, torch.onnx dynamo)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        lm = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4,
                                              n_positions=64))
    else:
        lm = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    lm.config.use_cache = False
    lm.eval()

    src = tmp_path / "src"
    src.mkdir()
    with torch.no_grad():
        torch.onnx.export(zoo.Logits(lm).eval(), (torch.ones(1, 8, dtype=torch.int64),),
                          str(src / "model.onnx"), dynamo=True, input_names=["input_ids"],
                          optimize=True, verbose=False)
    lm.config.to_json_file(src / "config.json")
    return src / "model.onnx", src / "config.json"


def calibration():
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(1, VOCAB, (1, 8)).astype(np.int64)} for _ in range(8)]


def layer_shapes(shapes) -> Counter:
    """Weight-matrix shapes, either way round, leaving out the vocabulary-sized ones (the
    embeddings and LM head, which the exporter may copy or fold)."""
    return Counter(tuple(sorted(s)) for s in shapes if len(s) == 2 and VOCAB not in s)


def check_config_builds_the_pruned_shapes(pruned_onnx, config_dir):
    config = tf.AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    proto = onnx.load(str(pruned_onnx))
    want = layer_shapes(tuple(t.dims) for t in proto.graph.initializer)
    got = layer_shapes(tuple(p.shape) for p in model.parameters())
    assert want == got
    return config


def test_llama_config_follows_heads_ffn_and_removed_layer(exported, tmp_path):
    model, config = exported("llama")
    out = tmp_path / "out" / "pruned.onnx"
    result = sparsec.prune(model, out, ratio=0.5, head_ratio=0.5, remove_layers=1,
                           calibration=calibration(), hf_config=config)
    assert result.hf_config == out.parent / "config.json"
    cfg = check_config_builds_the_pruned_shapes(out, out.parent)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size) == (2, 2, 1, 8, 32)
    assert tf.AutoConfig.from_pretrained(config.parent).num_hidden_layers == 3   # input kept


def test_gpt2_config_through_the_cli(exported, tmp_path):
    model, config = exported("gpt2")
    np.savez(tmp_path / "calib.npz", input_ids=np.stack([b["input_ids"] for b in calibration()]))
    out = tmp_path / "out" / "pruned.onnx"
    proc = run_cli("prune", model, "-o", out, "--ratio", "0.5", "--head-ratio", "0",
                   "--calib", tmp_path / "calib.npz", "--hf-config", config, "-q")
    assert proc.returncode == 0, proc.stderr
    assert str(out.parent / "config.json") in proc.stdout
    cfg = check_config_builds_the_pruned_shapes(out, out.parent)
    assert (cfg.n_layer, cfg.n_head, cfg.n_inner) == (3, 4, 64)


def test_a_config_that_cannot_describe_the_pruned_model_writes_nothing(exported, tmp_path):
    """GPT-2 sizes its heads as n_embd / n_head: fewer heads of the same width cannot be
    stated, so neither the config nor the pruned model is written. A file that is no config,
    or a config the output would overwrite, is refused before pruning."""
    model, config = exported("gpt2")
    out = tmp_path / "out" / "pruned.onnx"
    with pytest.raises(OutputError, match="cannot describe"):
        sparsec.prune(model, out, ratio=0.5, head_ratio=0.5, calibration=calibration(),
                      hf_config=config)
    assert not out.parent.exists() or not any(out.parent.iterdir())
    (tmp_path / "bad.json").write_text("{\"hidden_size\": 4}")
    with pytest.raises(BadOptionError, match="not a Hugging Face config"):
        sparsec.prune(model, out, ratio=0.5, hf_config=tmp_path / "bad.json")
    with pytest.raises(BadOptionError, match="would overwrite it"):
        sparsec.prune(model, config.parent / "pruned.onnx", ratio=0.5, hf_config=config)


def test_sizes_that_differ_between_layers_are_listed_per_layer(exported, tmp_path):
    model, config = exported("gpt2")
    out = tmp_path / "pruned.onnx"
    logged = []
    sparsec.prune(model, out, ratio=0.5, head_ratio=0.0, layer_ratios={"*h.0.mlp*": 0.25},
                  calibration=calibration(), hf_config=config, log=logged.append)
    proto = onnx.load(str(out))
    widths = [next(list(t.dims)[1] for t in proto.graph.initializer
                   if t.name.endswith(f"h.{i}.mlp.c_fc.weight")) for i in range(3)]
    assert widths == [96, 64, 64]
    cfg = tf.AutoConfig.from_pretrained(tmp_path)
    assert cfg.sparsec_layer_sizes == {"intermediate_size": widths}
    assert any("sparsec_layer_sizes" in line for line in logged)
