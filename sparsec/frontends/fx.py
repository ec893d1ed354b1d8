"""FX frontend: a ``torch.export`` program lowered straight to the sparsec IR.

Unlike ``sparsec.frontends.torch`` (which goes through torch's ONNX exporter, and so inherits
its BatchNorm folding, weight transposes and deduplication), this lowering keeps the module's
structure: every weight and buffer becomes an initializer named exactly as in the module's
``state_dict`` (``layer1.0.bn1.running_mean``), Linear weights keep their [out, in] layout (Gemm
with transB=1) and BatchNorm stays a node. That is what lets a pruning plan computed on the IR
be written back into the module (``sparsec.api.prune_module``).

It covers the ops of CNN and MLP models (convolution, linear, batch norm, activations, pooling,
elementwise arithmetic, flatten/view/permute/cat/mean); anything else is refused with the full
list of unsupported ops, and ``sparsec.capture`` (the ONNX path) remains the broad frontend.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from sparsec.errors import InvalidModelError, UnsupportedOpError
from sparsec.ir.graph import Graph, Node, Value

OPSET = 20  # Gelu needs opset 20


class _Lowering:
    """State of one lowering: the IR being built and the FX-name -> IR-name map."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.inits: dict[str, np.ndarray] = {}
        self.values: dict[str, Value] = {}
        self.names: dict[str, str] = {}     # fx node name -> IR tensor name
        self.counter = 0

    # ------------------------------------------------------------------ helpers
    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}__{self.counter}"

    def const(self, base: str, value, dtype="float32") -> str:
        name = self.fresh(base)
        arr = np.asarray(value, dtype=dtype)
        self.inits[name] = arr
        self.values[name] = Value(name, tuple(arr.shape), arr.dtype.name)
        return name

    def tensor(self, arg) -> str:
        return self.names[arg.name]

    def operand(self, arg, like: str) -> str:
        """A tensor argument, or a Python scalar as a constant of ``like``'s dtype."""
        if hasattr(arg, "name") and arg.name in self.names:
            return self.tensor(arg)
        return self.const("scalar", arg, self.values[like].dtype)

    def emit(self, op: str, inputs: list[str], out: str, shape, dtype: str, **attrs) -> str:
        self.nodes.append(Node(op, inputs, [out], attrs, name=f"{op}_{out}"))
        self.values[out] = Value(out, tuple(int(d) for d in shape), dtype)
        return out


def _meta(node) -> tuple[tuple[int, ...], str]:
    val = node.meta.get("val")
    if val is None or not hasattr(val, "shape"):
        raise InvalidModelError(f"torch.export gave no tensor metadata for {node.name}")
    return tuple(int(d) for d in val.shape), str(val.dtype).replace("torch.", "")


def _pairs(v, n=2) -> list[int]:
    return list(v) * (n if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else [int(v)] * n


# ---------------------------------------------------------------------- op lowerings
def _conv2d(lw: _Lowering, node, out: str, shape, dtype) -> None:
    defaults = [None, None, None, [1, 1], [0, 0], [1, 1], 1]  # conv2d's signature
    x, w, b, stride, padding, dilation, groups = [*node.args, *defaults[len(node.args):]]
    if isinstance(padding, str):
        raise UnsupportedOpError({f"{node.target} with padding='{padding}'": 1})
    pad = _pairs(padding)
    inputs = [lw.tensor(x), lw.tensor(w)] + ([lw.tensor(b)] if b is not None else [])
    lw.emit("Conv", inputs, out, shape, dtype, strides=_pairs(stride), pads=pad + pad,
            dilations=_pairs(dilation), group=int(groups),
            kernel_shape=list(lw.values[lw.tensor(w)].shape[2:]))


def _linear(lw: _Lowering, node, out: str, shape, dtype) -> None:
    x, w = lw.tensor(node.args[0]), lw.tensor(node.args[1])
    b = lw.tensor(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
    xs = lw.values[x].shape
    inputs = [x, w] + ([b] if b else [])
    if len(xs) == 2:
        lw.emit("Gemm", inputs, out, shape, dtype, transB=1)
        return
    flat = lw.emit("Reshape", [x, lw.const("shape", [-1, xs[-1]], "int64")], lw.fresh(out),
                   (math.prod(xs[:-1]), xs[-1]), dtype)
    inputs[0] = flat
    mm = lw.emit("Gemm", inputs, lw.fresh(out), (math.prod(xs[:-1]), shape[-1]), dtype,
                 transB=1)
    lw.emit("Reshape", [mm, lw.const("shape", list(shape), "int64")], out, shape, dtype)


def _batch_norm(lw: _Lowering, node, out: str, shape, dtype) -> None:
    x, w, b, mean, var = node.args[:5]
    eps = float(node.args[7]) if len(node.args) > 7 else 1e-5
    c = shape[1]
    inputs = [lw.tensor(x),
              lw.tensor(w) if w is not None else lw.const("bn_scale", np.ones(c)),
              lw.tensor(b) if b is not None else lw.const("bn_bias", np.zeros(c)),
              lw.tensor(mean), lw.tensor(var)]
    lw.emit("BatchNormalization", inputs, out, shape, dtype, epsilon=eps)


def _clip(lo: float | None, hi: float | None):
    def lower(lw: _Lowering, node, out, shape, dtype) -> None:
        x = lw.tensor(node.args[0])
        lo_, hi_ = (node.args[1:3] if len(node.args) >= 3 else (lo, hi))
        lw.emit("Clip", [x, lw.const("min", lo_, dtype), lw.const("max", hi_, dtype)], out,
                shape, dtype)
    return lower


def _unary(op: str, **attrs):
    def lower(lw: _Lowering, node, out, shape, dtype) -> None:
        extra = {}
        if op == "Gelu":
            extra["approximate"] = str(node.kwargs.get("approximate", "none"))
        if op == "LeakyRelu" and len(node.args) > 1:
            extra["alpha"] = float(node.args[1])
        lw.emit(op, [lw.tensor(node.args[0])], out, shape, dtype, **attrs, **extra)
    return lower


def _silu(lw: _Lowering, node, out, shape, dtype) -> None:
    x = lw.tensor(node.args[0])
    gate = lw.emit("Sigmoid", [x], lw.fresh(out), shape, dtype)
    lw.emit("Mul", [x, gate], out, shape, dtype)


def _binary(op: str):
    def lower(lw: _Lowering, node, out, shape, dtype) -> None:
        a, b = node.args[:2]
        alpha = node.kwargs.get("alpha", 1)
        ref = lw.tensor(a) if hasattr(a, "name") else lw.tensor(b)
        bn = lw.operand(b, ref)
        if alpha != 1:
            bn = lw.emit("Mul", [bn, lw.const("alpha", alpha, dtype)], lw.fresh(out),
                         lw.values[bn].shape, dtype)
        lw.emit(op, [lw.operand(a, ref), bn], out, shape, dtype)
    return lower


def _reshape(lw: _Lowering, node, out, shape, dtype) -> None:
    lw.emit("Reshape", [lw.tensor(node.args[0]), lw.const("shape", list(shape), "int64")], out,
            shape, dtype)


def _permute(lw: _Lowering, node, out, shape, dtype) -> None:
    rank = len(shape)
    lw.emit("Transpose", [lw.tensor(node.args[0])], out, shape, dtype,
            perm=[int(d) % rank for d in node.args[1]])


def _cat(lw: _Lowering, node, out, shape, dtype) -> None:
    dim = int(node.args[1]) if len(node.args) > 1 else 0
    lw.emit("Concat", [lw.tensor(t) for t in node.args[0]], out, shape, dtype,
            axis=dim % len(shape))


def _mean(lw: _Lowering, node, out, shape, dtype) -> None:
    x = lw.tensor(node.args[0])
    rank = len(lw.values[x].shape)
    axes = [int(d) % rank for d in node.args[1]]
    keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    lw.emit("ReduceMean", [x, lw.const("axes", axes, "int64")], out, shape, dtype,
            keepdims=int(keep))


def _adaptive_avg_pool2d(lw: _Lowering, node, out, shape, dtype) -> None:
    if list(node.args[1]) != [1, 1]:
        raise UnsupportedOpError({f"{node.target} to a size other than 1x1": 1})
    lw.emit("GlobalAveragePool", [lw.tensor(node.args[0])], out, shape, dtype)


def _pool(op: str):
    def lower(lw: _Lowering, node, out, shape, dtype) -> None:
        args = list(node.args) + [None] * 6
        kernel = _pairs(args[1])
        stride = _pairs(args[2]) if args[2] else kernel
        pad = _pairs(args[3] if args[3] is not None else 0)
        attrs = dict(kernel_shape=kernel, strides=stride, pads=pad + pad,
                     ceil_mode=int(bool(args[5] if op == "MaxPool" else args[4])))
        if op == "MaxPool":
            attrs["dilations"] = _pairs(args[4] if args[4] is not None else 1)
        else:
            attrs["count_include_pad"] = int(args[5] if args[5] is not None else True)
        lw.emit(op, [lw.tensor(node.args[0])], out, shape, dtype, **attrs)
    return lower


def _identity(lw: _Lowering, node, out, shape, dtype) -> None:
    lw.emit("Identity", [lw.tensor(node.args[0])], out, shape, dtype)


LOWERINGS: dict[str, Callable] = {
    "aten.conv2d.default": _conv2d,
    "aten.linear.default": _linear,
    "aten.batch_norm.default": _batch_norm,
    "aten.relu.default": _unary("Relu"),
    "aten.sigmoid.default": _unary("Sigmoid"),
    "aten.tanh.default": _unary("Tanh"),
    "aten.gelu.default": _unary("Gelu"),
    "aten.leaky_relu.default": _unary("LeakyRelu"),
    "aten.hardswish.default": _unary("HardSwish"),
    "aten.silu.default": _silu,
    "aten.relu6.default": _clip(0.0, 6.0),
    "aten.hardtanh.default": _clip(-1.0, 1.0),
    "aten.add.Tensor": _binary("Add"),
    "aten.sub.Tensor": _binary("Sub"),
    "aten.mul.Tensor": _binary("Mul"),
    "aten.div.Tensor": _binary("Div"),
    "aten.flatten.using_ints": _reshape,
    "aten.view.default": _reshape,
    "aten.reshape.default": _reshape,
    "aten.permute.default": _permute,
    "aten.cat.default": _cat,
    "aten.mean.dim": _mean,
    "aten.adaptive_avg_pool2d.default": _adaptive_avg_pool2d,
    "aten.max_pool2d.default": _pool("MaxPool"),
    "aten.avg_pool2d.default": _pool("AveragePool"),
    "aten.dropout.default": _identity,
    "aten.contiguous.default": _identity,
    "aten.clone.default": _identity,
}


def lower_exported(ep) -> Graph:
    """An ``ExportedProgram`` -> Graph whose initializers carry the state_dict names."""
    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    unsupported = Counter(str(n.target) for n in ep.graph.nodes
                          if n.op == "call_function" and str(n.target) not in LOWERINGS)
    if unsupported:
        raise UnsupportedOpError(dict(unsupported))
    lw = _Lowering()
    inputs, outputs = [], []
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            shape, dtype = _meta(node)
            if node.name in lifted:
                fqn = lifted[node.name]
                src = ep.state_dict.get(fqn, ep.constants.get(fqn) if ep.constants else None)
                arr = src.detach().cpu().numpy().copy()
                lw.inits[fqn] = arr
                lw.values[fqn] = Value(fqn, tuple(arr.shape), arr.dtype.name)
                lw.names[node.name] = fqn
            else:
                lw.names[node.name] = node.name
                lw.values[node.name] = Value(node.name, shape, dtype)
                inputs.append(node.name)
        elif node.op == "call_function":
            shape, dtype = _meta(node)
            lw.names[node.name] = node.name
            LOWERINGS[str(node.target)](lw, node, node.name, shape, dtype)
        elif node.op == "output":
            outputs = [lw.tensor(a) for a in node.args[0]]
    used = {i for n in lw.nodes for i in n.inputs}
    unused = {k for k in lw.inits if k not in used}  # e.g. BatchNorm's num_batches_tracked
    return Graph(name="model", inputs=inputs, outputs=outputs, nodes=lw.nodes,
                 initializers={k: v for k, v in lw.inits.items() if k not in unused},
                 values={k: v for k, v in lw.values.items() if k not in unused},
                 opsets={"": OPSET}, producer="sparsec.fx")


def capture_fx(module, example_inputs: Sequence[Any]) -> Graph:
    """torch.export ``module`` (in eval mode, restored after) and lower it to the IR."""
    import torch

    from sparsec.frontends.torch import _eval_mode

    with _eval_mode(module), torch.no_grad():
        try:
            ep = torch.export.export(module, tuple(example_inputs))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidModelError(f"torch.export could not capture the module: {first}") from None
    return lower_exported(ep)
