"""Test models: hand-built ONNX graphs (exact control over structure), small torch modules
(captured with torch.export) and ``transformers`` models from small configs (random weights).

Every builder returns an ``onnx.ModelProto`` with static input shapes."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sparsec.frontends.torch import export_onnx

F = TensorProto.FLOAT


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def make_model(nodes, inputs, outputs, inits: dict[str, np.ndarray], opset: int = 17):
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, F, None) for n in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


# ------------------------------------------------------------------ hand-built ONNX graphs
def conv_bn_relu_conv(c_in=3, c=8, c_out=6, seed=0) -> onnx.ModelProto:
    """conv -> BatchNorm -> relu -> conv (BN kept as a node, not folded)."""
    r = _rng(seed)
    inits = {
        "w1": r.standard_normal((c, c_in, 3, 3)), "b1": r.standard_normal(c),
        "s": r.uniform(0.5, 1.5, c), "bb": r.standard_normal(c),
        "m": r.standard_normal(c) * 0.1, "v": r.uniform(0.5, 1.5, c),
        "w2": r.standard_normal((c_out, c, 1, 1)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"]),
    ]
    return make_model(nodes, [("x", [1, c_in, 8, 8])], ["y"], inits)


def gemm_mlp(seed=0) -> onnx.ModelProto:
    """Gemm(transB) -> relu -> Gemm(transB=0) -> tanh -> Gemm."""
    r = _rng(seed)
    inits = {"w1": r.standard_normal((32, 16)), "b1": r.standard_normal(32),
             "w2": r.standard_normal((32, 24)), "b2": r.standard_normal(24),
             "w3": r.standard_normal((5, 24)), "b3": r.standard_normal(5)}
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"]),
        helper.make_node("Tanh", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], transB=1),
    ]
    return make_model(nodes, [("x", [4, 16])], ["y"], inits)


def matmul_add_mlp(seed=0) -> onnx.ModelProto:
    """MatMul + Add (bias) -> Gelu-by-Erf -> MatMul + Add on a [B, S, D] input."""
    r = _rng(seed)
    inits = {"w1": r.standard_normal((16, 40)), "b1": r.standard_normal(40),
             "w2": r.standard_normal((40, 16)), "b2": r.standard_normal(16),
             "half": np.array(0.5), "one": np.array(1.0), "rs2": np.array(1 / np.sqrt(2))}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["h"]),
        helper.make_node("Mul", ["h", "rs2"], ["hs"]),
        helper.make_node("Erf", ["hs"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["he"]),
        helper.make_node("Mul", ["he", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["y"]),
    ]
    return make_model(nodes, [("x", [2, 5, 16])], ["y"], inits)


def residual_convs(seed=0) -> onnx.ModelProto:
    """stem conv -> relu -> [conv -> relu -> conv] + skip -> relu -> conv head."""
    r = _rng(seed)
    c = 8
    inits = {"ws": r.standard_normal((c, 3, 3, 3)), "w1": r.standard_normal((c, c, 3, 3)),
             "w2": r.standard_normal((c, c, 3, 3)), "b2": r.standard_normal(c),
             "wh": r.standard_normal((4, c, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "ws"], ["s"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["sr"]),
        helper.make_node("Conv", ["sr", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "sr"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["out"]),
        helper.make_node("Conv", ["out", "wh"], ["y"]),
    ]
    return make_model(nodes, [("x", [1, 3, 6, 6])], ["y"], inits)


def grouped_and_depthwise(seed=0) -> onnx.ModelProto:
    """conv -> depthwise conv (channels pass through) -> grouped conv (frozen) -> conv."""
    r = _rng(seed)
    inits = {"w0": r.standard_normal((8, 3, 1, 1)), "wd": r.standard_normal((8, 1, 3, 3)),
             "bd": r.standard_normal(8), "wg": r.standard_normal((8, 4, 1, 1)),
             "w3": r.standard_normal((5, 8, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "wd", "bd"], ["d"], group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["rd"]),
        helper.make_node("Conv", ["rd", "wg"], ["gc"], group=2),
        helper.make_node("Relu", ["gc"], ["rg"]),
        helper.make_node("Conv", ["rg", "w3"], ["y"]),
    ]
    return make_model(nodes, [("x", [1, 3, 6, 6])], ["y"], inits)


def layernorm_ffn(seed=0) -> onnx.ModelProto:
    """LayerNorm -> MatMul (expand) -> relu -> MatMul (project) + residual: hidden frozen."""
    r = _rng(seed)
    inits = {"g": r.uniform(0.5, 1.5, 12), "b": r.standard_normal(12),
             "w1": r.standard_normal((12, 30)), "w2": r.standard_normal((30, 12))}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["p"]),
        helper.make_node("Add", ["p", "x"], ["y"]),
    ]
    return make_model(nodes, [("x", [1, 4, 12])], ["y"], inits)


def ffn_stack(seed=0, blocks=3, d=12, hidden=(24, 20, 28)) -> onnx.ModelProto:
    """Pre-norm residual FFN blocks back to back (an MLP stack, no attention): LayerNorm ->
    MatMul + bias -> GELU by Erf -> MatMul + bias -> + skip; then a linear head."""
    r = _rng(seed)
    inits = {"half": np.array(0.5), "one": np.array(1.0), "rs2": np.array(1 / np.sqrt(2)),
             "head": r.standard_normal((d, 5))}
    nodes, x = [], "x"
    for k in range(blocks):
        h = hidden[k % len(hidden)]
        inits.update({f"g{k}": r.uniform(0.5, 1.5, d), f"be{k}": r.standard_normal(d) * 0.1,
                      f"w{k}a": r.standard_normal((d, h)) / np.sqrt(d),
                      f"b{k}a": r.standard_normal(h) * 0.1,
                      f"w{k}b": r.standard_normal((h, d)) / np.sqrt(h),
                      f"b{k}b": r.standard_normal(d) * 0.1})
        nodes += [
            helper.make_node("LayerNormalization", [x, f"g{k}", f"be{k}"], [f"n{k}"], axis=-1),
            helper.make_node("MatMul", [f"n{k}", f"w{k}a"], [f"m{k}"]),
            helper.make_node("Add", [f"m{k}", f"b{k}a"], [f"u{k}"]),
            helper.make_node("Mul", [f"u{k}", "rs2"], [f"s{k}"]),
            helper.make_node("Erf", [f"s{k}"], [f"e{k}"]),
            helper.make_node("Add", [f"e{k}", "one"], [f"e{k}1"]),
            helper.make_node("Mul", [f"u{k}", f"e{k}1"], [f"p{k}"]),
            helper.make_node("Mul", [f"p{k}", "half"], [f"a{k}"]),
            helper.make_node("MatMul", [f"a{k}", f"w{k}b"], [f"o{k}"]),
            helper.make_node("Add", [f"o{k}", f"b{k}b"], [f"f{k}"]),
            helper.make_node("Add", [x, f"f{k}"], [f"x{k + 1}"]),
        ]
        x = f"x{k + 1}"
    nodes.append(helper.make_node("MatMul", [x, "head"], ["y"]))
    return make_model(nodes, [("x", [2, 4, d])], ["y"], inits)


def concat_branches(seed=0) -> onnx.ModelProto:
    """Two conv branches concatenated on channels (no rule yet: frozen)."""
    r = _rng(seed)
    inits = {"wa": r.standard_normal((4, 3, 1, 1)), "wb": r.standard_normal((6, 3, 1, 1)),
             "wc": r.standard_normal((2, 10, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"]),
        helper.make_node("Conv", ["x", "wb"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
        helper.make_node("Relu", ["cat"], ["r"]),
        helper.make_node("Conv", ["r", "wc"], ["y"]),
    ]
    return make_model(nodes, [("x", [1, 3, 4, 4])], ["y"], inits)


def nested_concat(seed=0) -> onnx.ModelProto:
    """concat(concat(conv a, conv b), conv c) -> relu -> conv: three groups at offsets."""
    r = _rng(seed)
    inits = {"wa": r.standard_normal((4, 3, 1, 1)), "wb": r.standard_normal((6, 3, 3, 3)),
             "wc": r.standard_normal((5, 3, 1, 1)), "bc": r.standard_normal(5),
             "wh": r.standard_normal((2, 15, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"]),
        helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wc", "bc"], ["c"]),
        helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
        helper.make_node("Concat", ["ab", "c"], ["abc"], axis=1),
        helper.make_node("Relu", ["abc"], ["r"]),
        helper.make_node("Conv", ["r", "wh"], ["y"]),
    ]
    return make_model(nodes, [("x", [1, 3, 5, 5])], ["y"], inits)


def split_branches(seed=0) -> onnx.ModelProto:
    """conv (12) -> Split [5, 7] -> two convs to 4 channels -> Add."""
    r = _rng(seed)
    inits = {"w": r.standard_normal((12, 3, 3, 3)), "sizes": np.array([5, 7]),
             "wp": r.standard_normal((4, 5, 1, 1)), "wq": r.standard_normal((4, 7, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["rc"]),
        helper.make_node("Split", ["rc", "sizes"], ["p", "q"], axis=1),
        helper.make_node("Conv", ["p", "wp"], ["pp"]),
        helper.make_node("Conv", ["q", "wq"], ["qq"]),
        helper.make_node("Add", ["pp", "qq"], ["y"]),
    ]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], ["y"], {k: v for k, v in inits.items()
                                                          if k != "sizes"})
    m.graph.initializer.append(numpy_helper.from_array(inits["sizes"].astype(np.int64), "sizes"))
    return m


def slice_and_full(seed=0) -> onnx.ModelProto:
    """conv (10) read whole by one conv and as channels [2:8] by another: three segments."""
    r = _rng(seed)
    inits = {"w": r.standard_normal((10, 3, 1, 1)), "wf": r.standard_normal((4, 10, 1, 1)),
             "ws": r.standard_normal((4, 6, 3, 3))}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Relu", ["c"], ["rc"]),
        helper.make_node("Slice", ["rc", "starts", "ends", "axes"], ["s"]),
        helper.make_node("Conv", ["s", "ws"], ["ss"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["rc", "wf"], ["ff"]),
        helper.make_node("Add", ["ss", "ff"], ["y"]),
    ]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], ["y"], inits)
    for name, v in (("starts", [2]), ("ends", [8]), ("axes", [1])):
        m.graph.initializer.append(numpy_helper.from_array(np.array(v, np.int64), name))
    return m


def conv_flatten_linear(seed=0) -> onnx.ModelProto:
    """conv (6 channels, 4x4) -> relu -> Flatten -> Gemm: each channel is 16 features."""
    r = _rng(seed)
    inits = {"w": r.standard_normal((6, 2, 3, 3)), "b": r.standard_normal(6),
             "fc": r.standard_normal((5, 96)), "fb": r.standard_normal(5)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1),
    ]
    return make_model(nodes, [("x", [2, 2, 4, 4])], ["y"], inits)


def squeeze_excite(seed=0) -> onnx.ModelProto:
    """conv (8) -> relu -> x * sigmoid(conv(relu(conv(GAP(x))))) -> conv: broadcast multiply."""
    r = _rng(seed)
    inits = {"w": r.standard_normal((8, 3, 3, 3)), "w1": r.standard_normal((3, 8, 1, 1)),
             "b1": r.standard_normal(3), "w2": r.standard_normal((8, 3, 1, 1)),
             "b2": r.standard_normal(8), "wh": r.standard_normal((2, 8, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["xr"]),
        helper.make_node("GlobalAveragePool", ["xr"], ["g"]),
        helper.make_node("Conv", ["g", "w1", "b1"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["s1r"]),
        helper.make_node("Conv", ["s1r", "w2", "b2"], ["s2"]),
        helper.make_node("Sigmoid", ["s2"], ["gate"]),
        helper.make_node("Mul", ["xr", "gate"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "wh"], ["y"]),
    ]
    return make_model(nodes, [("x", [1, 3, 5, 5])], ["y"], inits)


def group_norm_shuffle(seed=0) -> onnx.ModelProto:
    """conv (8) -> GroupNormalization (4 groups, opset 21) -> relu -> conv (8) -> DepthToSpace
    CRD (2 channels of 2x2 blocks) -> conv; and a DCR DepthToSpace branch (frozen)."""
    r = _rng(seed)
    inits = {"w": r.standard_normal((8, 3, 3, 3)), "s": r.uniform(0.5, 1.5, 8),
             "b": r.standard_normal(8), "w1": r.standard_normal((8, 8, 1, 1)),
             "w2": r.standard_normal((3, 2, 1, 1)), "w3": r.standard_normal((4, 8, 1, 1)),
             "w4": r.standard_normal((3, 1, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GroupNormalization", ["c", "s", "b"], ["n"], num_groups=4),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Conv", ["r", "w1"], ["c1"]),
        helper.make_node("DepthToSpace", ["c1"], ["d"], blocksize=2, mode="CRD"),
        helper.make_node("Conv", ["d", "w2"], ["y1"]),
        helper.make_node("Conv", ["r", "w3"], ["c3"]),
        helper.make_node("DepthToSpace", ["c3"], ["d3"], blocksize=2, mode="DCR"),
        helper.make_node("Conv", ["d3", "w4"], ["y2"]),
        helper.make_node("Add", ["y1", "y2"], ["y"]),
    ]
    return make_model(nodes, [("x", [1, 3, 4, 4])], ["y"], inits, opset=21)


HAND_BUILT = {
    "group_norm_shuffle": group_norm_shuffle,
    "conv_bn_relu_conv": conv_bn_relu_conv, "gemm_mlp": gemm_mlp,
    "matmul_add_mlp": matmul_add_mlp, "residual_convs": residual_convs,
    "grouped_and_depthwise": grouped_and_depthwise, "layernorm_ffn": layernorm_ffn,
    "concat_branches": concat_branches, "nested_concat": nested_concat,
    "split_branches": split_branches, "slice_and_full": slice_and_full,
    "conv_flatten_linear": conv_flatten_linear, "squeeze_excite": squeeze_excite,
    "ffn_stack": ffn_stack,
}


# ------------------------------------------------------------------ torch modules
class TorchMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 48), nn.Linear(48, 32), nn.Linear(32, 6)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(nn.functional.gelu(self.fc1(x)))))


class TorchResCNN(nn.Module):
    def __init__(self, c=12):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * c, 7)
        for bn in (self.bn1, self.bn2):  # non-trivial running statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(s)))
        y = torch.relu(self.bn2(self.conv2(y)) + s)
        y = torch.relu(self.down(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class TorchDepthwise(nn.Module):
    """MobileNet-style: pointwise expand -> depthwise -> ReLU6 -> pointwise project."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(4, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.project(nn.functional.relu6(self.dw(torch.relu(self.expand(x))))) + x


class TorchChannelsLast(nn.Module):
    """conv -> permute to channels-last -> linear over channels -> sigmoid."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        return torch.sigmoid(self.fc(torch.relu(self.conv(x)).permute(0, 2, 3, 1)))


class TorchGroupsAndShuffles(nn.Module):
    """GroupNorm, a grouped conv with a channel multiplier, pixel shuffle, and a ShuffleNet
    channel shuffle (a strided permutation of channels: frozen, never pruned wrongly)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)   # 4 in -> 8 out per group
        self.up = nn.Conv2d(32, 8, 1)
        self.ps = nn.PixelShuffle(2)                               # 8 -> 2 channels, 2x size
        self.head = nn.Conv2d(2, 4, 1)
        self.side = nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        s = torch.relu(self.gn(self.stem(x)))
        y = self.head(self.ps(self.up(torch.relu(self.grouped(s)))))
        z = self.side(s)                                           # channel shuffle, 2 groups
        n, c, h, w = z.shape
        z = z.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        z = self.mix(torch.relu(z))
        return y + nn.functional.interpolate(z, scale_factor=2.0, mode="nearest")


TORCH_MODULES = {
    "torch_groups_shuffles": (TorchGroupsAndShuffles, (torch.randn(1, 3, 6, 6),)),
    "torch_mlp": (TorchMLP, (torch.randn(3, 20),)),
    "torch_rescnn": (TorchResCNN, (torch.randn(1, 3, 10, 10),)),
    "torch_depthwise": (TorchDepthwise, (torch.randn(1, 4, 6, 6),)),
    "torch_channels_last": (TorchChannelsLast, (torch.randn(2, 3, 5, 5),)),
}


def torch_model(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    cls, example = TORCH_MODULES[name]
    return cls().eval(), example


# ------------------------------------------------------------------ transformers models
def transformers_model(name: str) -> tuple[nn.Module, tuple]:
    """Small random-weight models from transformers configs (no hub access)."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "hf_resnet":
        cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                              layer_type="basic", num_labels=5)
        return tf.ResNetForImageClassification(cfg).eval(), (torch.randn(1, 3, 32, 32),)
    if name == "hf_mobilenetv2":
        cfg = tf.MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=5)
        return tf.MobileNetV2ForImageClassification(cfg).eval(), (torch.randn(1, 3, 32, 32),)
    if name == "hf_vit":
        cfg = tf.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=5)
        return tf.ViTForImageClassification(cfg).eval(), (torch.randn(1, 3, 16, 16),)
    if name == "hf_bert":
        cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=32)
        ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
        return _LastHidden(tf.BertModel(cfg).eval()), (ids,)
    if name == "hf_convnext":
        cfg = tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5,
                                image_size=32)
        return tf.ConvNextForImageClassification(cfg).eval(), (torch.randn(1, 3, 32, 32),)
    if name == "hf_regnet":
        cfg = tf.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                              groups_width=4, num_labels=5)
        return tf.RegNetForImageClassification(cfg).eval(), (torch.randn(1, 3, 32, 32),)
    if name == "hf_efficientnet":
        cfg = tf.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                    hidden_dim=320, num_labels=5)
        return tf.EfficientNetForImageClassification(cfg).eval(), (torch.randn(1, 3, 32, 32),)
    if name == "hf_swin":
        cfg = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                            num_heads=[1, 2], window_size=4, num_labels=5)
        return tf.SwinForImageClassification(cfg).eval(), (torch.randn(1, 3, 32, 32),)
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    if name == "hf_gpt2":
        cfg = tf.GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=0, eos_token_id=0)
        return Logits(tf.GPT2LMHeadModel(cfg).eval()), (ids,)
    if name == "hf_llama_gqa":
        cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=32)
        return Logits(tf.LlamaForCausalLM(cfg).eval()), (ids,)
    raise KeyError(name)


class Logits(nn.Module):
    """Wraps a transformers language model so that it returns its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


class _LastHidden(nn.Module):
    """Wraps a transformers encoder so that it returns one tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


TRANSFORMERS = ("hf_resnet", "hf_mobilenetv2", "hf_vit", "hf_bert")
# more architectures for the pruning acceptance test (not in every parametrized IR test)
TRANSFORMERS_MORE = ("hf_convnext", "hf_regnet", "hf_efficientnet", "hf_swin", "hf_gpt2",
                     "hf_llama_gqa")


def build(name: str) -> onnx.ModelProto:
    """Any zoo model by name, as ONNX."""
    if name in HAND_BUILT:
        return HAND_BUILT[name]()
    if name in TORCH_MODULES:
        module, example = torch_model(name)
    else:
        module, example = transformers_model(name)
    return export_onnx(module, example)


ALL = (*HAND_BUILT, *TORCH_MODULES, *TRANSFORMERS)


def assert_consistent(module: nn.Module) -> None:
    """Every layer's attributes describe its weights (what a pruned torch module must keep)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
            assert m.bias is None or m.bias.shape == (m.out_channels,)
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
            assert m.bias is None or m.bias.shape == (m.out_features,)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,)
        elif isinstance(m, nn.GroupNorm):
            assert m.weight.shape == (m.num_channels,) and m.num_channels % m.num_groups == 0
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            assert tuple(m.weight.shape) == tuple(m.normalized_shape)
        elif isinstance(m, nn.Embedding):
            assert m.weight.shape == (m.num_embeddings, m.embedding_dim)
        elif type(m).__name__ == "Conv1D":          # transformers' GPT-2 linear: [in, out]
            assert m.weight.shape[1] == m.nf == m.bias.shape[0]
        head_dim = getattr(m, "head_dim", None)
        if isinstance(head_dim, int) and hasattr(m, "c_attn"):           # fused QKV
            assert m.c_attn.nf == 3 * m.split_size == 3 * m.num_heads * head_dim
        elif isinstance(head_dim, int) and hasattr(m, "q_proj"):
            heads = getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None)
            assert heads is None or m.q_proj.out_features == heads * head_dim
