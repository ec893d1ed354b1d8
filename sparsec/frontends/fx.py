"""FX frontend: a ``torch.export`` program lowered straight to the sparsec IR.

Unlike ``sparsec.frontends.torch`` (which goes through torch's ONNX exporter, and so inherits
its BatchNorm folding, weight transposes and deduplication), this lowering keeps the module's
structure: every weight and buffer becomes an initializer named exactly as in the module's
``state_dict`` (``layer1.0.bn1.running_mean``), Linear weights keep their [out, in] layout (Gemm
with transB=1) and BatchNorm stays a node. That is what lets a pruning plan computed on the IR
be written back into the module (``sparsec.api.prune_module``).

It covers CNN, MLP and transformer models: convolution, linear/addmm, batch/layer norm,
activations, pooling, elementwise arithmetic, view/permute/cat/split/slice/select, embeddings and
scaled-dot-product attention. Everything computed from buffers and constants alone (position
ids, causal masks, rotary tables) is evaluated once with torch and becomes a constant; parameters
are never folded, so every weight keeps its state_dict name. In-place ops (``add_``) are lowered
functionally, and later uses of the mutated tensor see the new value. Anything else is refused
with the full list of unsupported ops; ``sparsec.capture`` (the ONNX path) stays the broad
frontend for compiling.
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
    if isinstance(val, (list, tuple)) and val:   # a multi-output op: each output has its own
        return (), str(val[0].dtype).replace("torch.", "")
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
    # torch lets a 1-D empty tensor join any concat (an empty cache, say): drop it
    parts = [lw.tensor(t) for t in node.args[0]]
    parts = [p for p in parts if lw.values[p].shape != (0,)]
    lw.emit("Concat", parts, out, shape, dtype, axis=dim % len(shape))


def _adaptive_avg_pool2d(lw: _Lowering, node, out, shape, dtype) -> None:
    """To 1x1: a global average pool; to a size that divides the map's: an average pool whose
    window and stride are the quotient (torch's bins are then equal and disjoint)."""
    x = lw.tensor(node.args[0])
    size = [int(s) for s in node.args[1]]
    if size == [1, 1]:
        lw.emit("GlobalAveragePool", [x], out, shape, dtype)
        return
    hw = lw.values[x].shape[-2:]
    if any(s <= 0 or d % s for d, s in zip(hw, size)):
        raise UnsupportedOpError({f"{node.target} from {list(hw)} to {size} (uneven bins)": 1})
    kernel = [d // s for d, s in zip(hw, size)]
    lw.emit("AveragePool", [x], out, shape, dtype, kernel_shape=kernel, strides=kernel,
            pads=[0, 0, 0, 0])


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


def _conv2d_padding(lw: _Lowering, node, out: str, shape, dtype) -> None:
    """conv2d with padding='same' / 'valid' (torch pads 'same' with the odd element last)."""
    defaults = [None, None, None, [1, 1], "valid", [1, 1], 1]
    x, w, b, stride, padding, dilation, groups = [*node.args, *defaults[len(node.args):]]
    kernel = lw.values[lw.tensor(w)].shape[2:]
    dil = _pairs(dilation)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dil, kernel)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        pads = [0, 0, 0, 0]
    inputs = [lw.tensor(x), lw.tensor(w)] + ([lw.tensor(b)] if b is not None else [])
    lw.emit("Conv", inputs, out, shape, dtype, strides=_pairs(stride), pads=pads,
            dilations=dil, group=int(groups), kernel_shape=list(kernel))


def _addmm(lw: _Lowering, node, out: str, shape, dtype) -> None:
    bias, x, w = (lw.tensor(a) for a in node.args[:3])
    beta, alpha = float(node.kwargs.get("beta", 1)), float(node.kwargs.get("alpha", 1))
    lw.emit("Gemm", [x, w, bias], out, shape, dtype, alpha=alpha, beta=beta)


def _matmul_op(lw: _Lowering, node, out: str, shape, dtype) -> None:
    lw.emit("MatMul", [lw.tensor(node.args[0]), lw.tensor(node.args[1])], out, shape, dtype)


def _layer_norm(lw: _Lowering, node, out: str, shape, dtype) -> None:
    defaults = [None, None, None, None, 1e-5]   # layer_norm(x, shape, weight, bias, eps)
    x, normalized, w, b, eps = [*node.args, *defaults[len(node.args):]][:5]
    eps = node.kwargs.get("eps", eps)
    n = len(normalized)
    width = list(shape[-n:])
    inputs = [lw.tensor(x),
              lw.tensor(w) if w is not None else lw.const("ln_scale", np.ones(width)),
              lw.tensor(b) if b is not None else lw.const("ln_bias", np.zeros(width))]
    lw.emit("LayerNormalization", inputs, out, shape, dtype, axis=-n, epsilon=float(eps))


def _group_norm(lw: _Lowering, node, out: str, shape, dtype) -> None:
    """As torch's ONNX exporter writes it: [N, G, -1] -> InstanceNorm -> back -> scale, shift.
    The dependency analysis reads the [N, G, -1] view as blocks of C/G channels."""
    defaults = [None, None, None, None, 1e-5]   # group_norm(x, groups, weight, bias, eps)
    x, groups, w, b, eps = [*node.args, *defaults[len(node.args):]][:5]
    eps = node.kwargs.get("eps", eps)
    groups = int(groups)
    n, c = shape[0], shape[1]
    flat = (n, groups, math.prod(shape) // (n * groups))
    v = lw.emit("Reshape", [lw.tensor(x), lw.const("shape", [0, groups, -1], "int64")],
                lw.fresh(out), flat, dtype)
    v = lw.emit("InstanceNormalization", [v, lw.const("ones", np.ones(groups), dtype),
                                          lw.const("zeros", np.zeros(groups), dtype)],
                lw.fresh(out), flat, dtype, epsilon=float(eps))
    y = lw.emit("Reshape", [v, lw.const("shape", list(shape), "int64")],
                out if w is None and b is None else lw.fresh(out), shape, dtype)
    trailing = list(range(1, len(shape) - 1))      # [C] -> [C, 1, 1]
    for k, (p, op) in enumerate(((w, "Mul"), (b, "Add"))):
        if p is None:
            continue
        pv = lw.emit("Unsqueeze", [lw.tensor(p), lw.const("axes", trailing, "int64")],
                     lw.fresh(out), (c, *[1] * len(trailing)), dtype)
        last = k == 1 or b is None
        y = lw.emit(op, [y, pv], out if last else lw.fresh(out), shape, dtype)


def _pixel_shuffle(lw: _Lowering, node, out: str, shape, dtype) -> None:
    lw.emit("DepthToSpace", [lw.tensor(node.args[0])], out, shape, dtype,
            blocksize=int(node.args[1]), mode="CRD")


def _upsample_nearest(lw: _Lowering, node, out: str, shape, dtype) -> None:
    x = lw.tensor(node.args[0])
    lw.emit("Resize", [x, "", "", lw.const("sizes", list(shape), "int64")], out, shape, dtype,
            mode="nearest", coordinate_transformation_mode="asymmetric",
            nearest_mode="floor")


def _embedding(lw: _Lowering, node, out: str, shape, dtype) -> None:
    lw.emit("Gather", [lw.tensor(node.args[0]), lw.tensor(node.args[1])], out, shape, dtype,
            axis=0)


def _index(lw: _Lowering, node, out: str, shape, dtype) -> None:
    """``x[idx]`` with one index tensor (e.g. a relative-position table read by a buffer)."""
    x, indices = node.args[:2]
    used = [(axis, i) for axis, i in enumerate(indices) if i is not None]
    if len(used) == 1:
        axis, idx = used[0]
        lw.emit("Gather", [lw.tensor(x), lw.tensor(idx)], out, shape, dtype, axis=axis)
        return
    # x[i0, i1, ...] on the leading axes with constant indices (e.g. a padding mask read at
    # [batch, key] positions): one GatherND over the broadcast index tuples
    consts = [lw.inits.get(lw.tensor(i)) for _, i in used]
    if [a for a, _ in used] != list(range(len(used))) or any(c is None for c in consts):
        raise UnsupportedOpError({f"{node.target} with {len(used)} computed index tensors": 1})
    tuples = np.stack(np.broadcast_arrays(*consts), axis=-1).astype(np.int64)
    lw.emit("GatherND", [lw.tensor(x), lw.const("indices", tuples, "int64")], out, shape, dtype)


def _select(lw: _Lowering, node, out: str, shape, dtype) -> None:
    x, dim, index = node.args[:3]
    rank = len(lw.values[lw.tensor(x)].shape)
    size = lw.values[lw.tensor(x)].shape[int(dim) % rank]
    lw.emit("Gather", [lw.tensor(x), lw.const("index", int(index) % size, "int64")], out, shape,
            dtype, axis=int(dim) % rank)


def _slice(lw: _Lowering, node, out: str, shape, dtype) -> None:
    defaults = [None, 0, None, None, 1]
    x, dim, start, end, step = [*node.args, *defaults[len(node.args):]]
    xs = lw.values[lw.tensor(x)].shape
    dim = int(dim) % len(xs)
    start, stop, step = slice(start, end, step).indices(xs[dim])
    lw.emit("Slice", [lw.tensor(x), lw.const("starts", [start], "int64"),
                      lw.const("ends", [stop], "int64"), lw.const("axes", [dim], "int64"),
                      lw.const("steps", [step], "int64")], out, shape, dtype)


def _split(lw: _Lowering, node, out: str, shape, dtype) -> None:
    """Split into ``out__0``, ``out__1``, ... (``getitem`` picks one)."""
    x = lw.tensor(node.args[0])
    xs = lw.values[x].shape
    dim = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(xs)
    parts = [tuple(int(d) for d in v.shape) for v in node.meta["val"]]
    outs = [f"{out}__{i}" for i in range(len(parts))]
    lw.nodes.append(Node("Split", [x, lw.const("split", [p[dim] for p in parts], "int64")],
                         outs, {"axis": dim}, name=f"Split_{out}"))
    for name, part in zip(outs, parts):
        lw.values[name] = Value(name, part, dtype)


def _transpose(lw: _Lowering, node, out: str, shape, dtype) -> None:
    rank = len(shape)
    perm = list(range(rank))
    a, b = int(node.args[1]) % rank, int(node.args[2]) % rank
    perm[a], perm[b] = perm[b], perm[a]
    lw.emit("Transpose", [lw.tensor(node.args[0])], out, shape, dtype, perm=perm)


def _t(lw: _Lowering, node, out: str, shape, dtype) -> None:
    lw.emit("Transpose", [lw.tensor(node.args[0])], out, shape, dtype,
            perm=list(reversed(range(len(shape)))))


def _unsqueeze(lw: _Lowering, node, out: str, shape, dtype) -> None:
    lw.emit("Unsqueeze", [lw.tensor(node.args[0]),
                          lw.const("axes", [int(node.args[1]) % len(shape)], "int64")],
            out, shape, dtype)


def _expand(lw: _Lowering, node, out: str, shape, dtype) -> None:
    lw.emit("Expand", [lw.tensor(node.args[0]), lw.const("shape", list(shape), "int64")], out,
            shape, dtype)


def _pad(lw: _Lowering, node, out: str, shape, dtype) -> None:
    x, pad = lw.tensor(node.args[0]), [int(p) for p in node.args[1]]
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if mode != "constant":
        raise UnsupportedOpError({f"{node.target} in mode '{mode}'": 1})
    rank = len(shape)
    begin, end = [0] * rank, [0] * rank
    for k in range(len(pad) // 2):         # torch lists the last axis first
        begin[rank - 1 - k], end[rank - 1 - k] = pad[2 * k], pad[2 * k + 1]
    lw.emit("Pad", [x, lw.const("pads", begin + end, "int64"),
                    lw.const("value", value or 0.0, dtype)], out, shape, dtype, mode="constant")


def _pow(lw: _Lowering, node, out: str, shape, dtype) -> None:
    x = lw.tensor(node.args[0])
    lw.emit("Pow", [x, lw.const("exponent", node.args[1], dtype)], out, shape, dtype)


def _rsqrt(lw: _Lowering, node, out: str, shape, dtype) -> None:
    root = lw.emit("Sqrt", [lw.tensor(node.args[0])], lw.fresh(out), shape, dtype)
    lw.emit("Reciprocal", [root], out, shape, dtype)


def _softmax(lw: _Lowering, node, out: str, shape, dtype) -> None:
    lw.emit("Softmax", [lw.tensor(node.args[0])], out, shape, dtype,
            axis=int(node.args[1]) % len(shape))


def _cast(lw: _Lowering, node, out: str, shape, dtype) -> None:
    x = lw.tensor(node.args[0])
    if lw.values[x].dtype == dtype:
        lw.emit("Identity", [x], out, shape, dtype)
    else:
        from sparsec.ir.onnx_io import elem_type
        lw.emit("Cast", [x], out, shape, dtype, to=elem_type(dtype))


def _adaptive_avg_pool1d(lw: _Lowering, node, out: str, shape, dtype) -> None:
    if list(node.args[1]) != [1]:
        raise UnsupportedOpError({f"{node.target} to a size other than 1": 1})
    lw.emit("ReduceMean", [lw.tensor(node.args[0]), lw.const("axes", [-1], "int64")], out, shape,
            dtype, keepdims=1)


def _sdpa(lw: _Lowering, node, out: str, shape, dtype) -> None:
    """softmax(q @ k^T * scale + mask) @ v, with the mask made additive (a constant bool mask
    becomes 0 / float-min at lowering time)."""
    import torch

    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    a = {**dict(zip(names, node.args)), **node.kwargs}
    if a.get("enable_gqa"):
        raise UnsupportedOpError({f"{node.target} with enable_gqa": 1})
    q, k, v = (lw.tensor(a[key]) for key in ("query", "key", "value"))
    qs, ks = lw.values[q].shape, lw.values[k].shape
    scale = a.get("scale") or 1.0 / math.sqrt(qs[-1])
    perm = list(range(len(ks)))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = lw.emit("Transpose", [k], lw.fresh(out), tuple(ks[i] for i in perm), dtype, perm=perm)
    score_shape = (*qs[:-1], ks[-2])
    s = lw.emit("MatMul", [q, kt], lw.fresh(out), score_shape, dtype)
    s = lw.emit("Mul", [s, lw.const("scale", scale, dtype)], lw.fresh(out), score_shape, dtype)
    mask = a.get("attn_mask")
    minimum = float(torch.finfo(getattr(torch, dtype)).min)
    if a.get("is_causal"):
        tri = np.triu(np.full((qs[-2], ks[-2]), minimum), k=1)
        s = lw.emit("Add", [s, lw.const("causal", tri, dtype)], lw.fresh(out), score_shape, dtype)
    if mask is not None:
        m = lw.tensor(mask)
        if lw.values[m].dtype == "bool":
            const = lw.inits.get(m)
            if const is not None:
                m = lw.const("mask", np.where(const, 0.0, minimum), dtype)
            else:
                m = lw.emit("Where", [m, lw.const("zero", 0.0, dtype),
                                      lw.const("min", minimum, dtype)], lw.fresh(out),
                            lw.values[m].shape, dtype)
        s = lw.emit("Add", [s, m], lw.fresh(out), score_shape, dtype)
    p = lw.emit("Softmax", [s], lw.fresh(out), score_shape, dtype, axis=-1)
    lw.emit("MatMul", [p, v], out, shape, dtype)


def _reduce(op: str, dim_at: int = 1):
    """Reductions: dims at argument ``dim_at`` (None: all), keepdim right after them."""
    def lower(lw: _Lowering, node, out, shape, dtype) -> None:
        x = lw.tensor(node.args[0])
        rank = len(lw.values[x].shape)
        args = list(node.args)
        dims = args[dim_at] if len(args) > dim_at else node.kwargs.get("dim")
        keep = args[dim_at + 1] if len(args) > dim_at + 1 else node.kwargs.get("keepdim", False)
        dims = list(range(rank)) if dims is None else (
            [dims] if isinstance(dims, int) else list(dims))
        lw.emit(op, [x, lw.const("axes", [int(d) % rank for d in dims], "int64")], out, shape,
                dtype, keepdims=int(bool(keep)))
    return lower


def _vector_norm(lw: _Lowering, node, out, shape, dtype) -> None:
    order = node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", 2)
    if order != 2:
        raise UnsupportedOpError({f"{node.target} with ord={order}": 1})
    _reduce("ReduceL2", dim_at=2)(lw, node, out, shape, dtype)


def _clamp(lw: _Lowering, node, out, shape, dtype) -> None:
    x = lw.tensor(node.args[0])
    target = str(node.target)
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if "clamp_max" in target:
        lo, hi = None, lo
    bounds = [lw.const("min", lo, dtype) if lo is not None else "",
              lw.const("max", hi, dtype) if hi is not None else ""]
    lw.emit("Clip", [x, *bounds], out, shape, dtype)


def _where(lw: _Lowering, node, out, shape, dtype) -> None:
    cond, a, b = node.args[:3]            # a Python scalar takes the result's dtype
    values = [lw.tensor(t) if hasattr(t, "name") else lw.const("value", t, dtype) for t in (a, b)]
    lw.emit("Where", [lw.tensor(cond), *values], out, shape, dtype)


def _filled(value):
    """``new_ones`` / ``zeros_like`` / ...: a constant of the output's shape (only the shape of
    the tensor argument matters, and shapes are static)."""
    def lower(lw: _Lowering, node, out, shape, dtype) -> None:
        fill = value if value is not None else node.args[-1]
        arr = np.full(shape, fill, dtype=np.dtype("bool" if dtype == "bool" else dtype))
        lw.inits[out] = arr
        lw.values[out] = Value(out, tuple(shape), arr.dtype.name)
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
    "aten.add_.Tensor": _binary("Add"),
    "aten.mul_.Tensor": _binary("Mul"),
    "aten.dropout_.default": _identity,
    "aten.detach_.default": _identity,
    "aten.lift_fresh_copy.default": _identity,
    "aten.sub.Tensor": _binary("Sub"),
    "aten.mul.Tensor": _binary("Mul"),
    "aten.div.Tensor": _binary("Div"),
    "aten.flatten.using_ints": _reshape,
    "aten.view.default": _reshape,
    "aten.reshape.default": _reshape,
    "aten.permute.default": _permute,
    "aten.cat.default": _cat,
    "aten.mean.dim": _reduce("ReduceMean"),
    "aten.adaptive_avg_pool2d.default": _adaptive_avg_pool2d,
    "aten.max_pool2d.default": _pool("MaxPool"),
    "aten.avg_pool2d.default": _pool("AveragePool"),
    "aten.dropout.default": _identity,
    "aten.contiguous.default": _identity,
    "aten.clone.default": _identity,
    "aten.alias.default": _identity,
    "aten.detach.default": _identity,
    "aten.conv2d.padding": _conv2d_padding,
    "aten.addmm.default": _addmm,
    "aten.matmul.default": _matmul_op,
    "aten.bmm.default": _matmul_op,
    "aten.mm.default": _matmul_op,
    "aten.layer_norm.default": _layer_norm,
    "aten.embedding.default": _embedding,
    "aten.index.Tensor": _index,
    "aten.select.int": _select,
    "aten.slice.Tensor": _slice,
    "aten.split.Tensor": _split,
    "aten.split_with_sizes.default": _split,
    "aten.transpose.int": _transpose,
    "aten.t.default": _t,
    "aten.unsqueeze.default": _unsqueeze,
    "aten.expand.default": _expand,
    "aten._unsafe_view.default": _reshape,
    "aten.squeeze.dim": _reshape,
    "aten.pad.default": _pad,
    "aten.pow.Tensor_Scalar": _pow,
    "aten.rsqrt.default": _rsqrt,
    "aten.sqrt.default": _unary("Sqrt"),
    "aten.neg.default": _unary("Neg"),
    "aten.exp.default": _unary("Exp"),
    "aten.erf.default": _unary("Erf"),
    "aten.hardsigmoid.default": _unary("HardSigmoid", alpha=1 / 6, beta=0.5),
    "aten.softmax.int": _softmax,
    "aten._softmax.default": _softmax,
    "aten.to.dtype": _cast,
    "aten.to.dtype_layout": _cast,
    "aten.to.device": _cast,
    "aten._to_copy.default": _cast,
    "aten.type_as.default": _cast,
    "aten.adaptive_avg_pool1d.default": _adaptive_avg_pool1d,
    "aten.scaled_dot_product_attention.default": _sdpa,
    "aten.group_norm.default": _group_norm,
    "aten.pixel_shuffle.default": _pixel_shuffle,
    "aten.upsample_nearest2d.vec": _upsample_nearest,
    "aten.sum.dim_IntList": _reduce("ReduceSum"),
    "aten.sum.default": _reduce("ReduceSum"),
    "aten.mean.default": _reduce("ReduceMean"),
    "aten.amax.default": _reduce("ReduceMax"),
    "aten.linalg_vector_norm.default": _vector_norm,
    "aten.clamp.default": _clamp,
    "aten.clamp_min.default": _clamp,
    "aten.clamp_max.default": _clamp,
    "aten.__and__.Tensor": _binary("And"),
    "aten.bitwise_and.Tensor": _binary("And"),
    "aten.__or__.Tensor": _binary("Or"),
    "aten.eq.Scalar": _binary("Equal"),
    "aten.eq.Tensor": _binary("Equal"),
    "aten.gt.Scalar": _binary("Greater"),
    "aten.ge.Scalar": _binary("GreaterOrEqual"),
    "aten.lt.Scalar": _binary("Less"),
    "aten.le.Scalar": _binary("LessOrEqual"),
    "aten.expand_as.default": _expand,
    "aten.where.self": _where,
    "aten.where.ScalarOther": _where,
    "aten.where.ScalarSelf": _where,
    "aten.new_ones.default": _filled(1),
    "aten.new_zeros.default": _filled(0),
    "aten.ones_like.default": _filled(1),
    "aten.zeros_like.default": _filled(0),
    "aten.full_like.default": _filled(None),
}

# ops that only check metadata: nothing to lower
_NO_OUTPUT = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
              "aten.sym_constrain_range_for_size.default"}
# getitem picks one output of a multi-output op (Split)
_GETITEM = "<built-in function getitem>"


def _in_place(target: str) -> bool:
    """``aten.add_.Tensor`` mutates its first argument; ``aten.__and__.Tensor`` does not."""
    op = target.split(".")[1] if target.count(".") >= 2 else ""
    return op.endswith("_") and not op.startswith("__")


def _fold(node, consts: dict[str, Any]):
    """Evaluate ``node`` with torch if every tensor it reads is a known constant, else None."""
    import torch
    from torch.fx.node import map_arg

    tensors = []
    map_arg((node.args, node.kwargs), tensors.append)
    if not all(t.name in consts for t in tensors):
        return None
    args, kwargs = map_arg((node.args, node.kwargs), lambda t: consts[t.name])
    with torch.no_grad():
        return node.target(*args, **kwargs)


def lower_exported(ep) -> Graph:
    """An ``ExportedProgram`` -> Graph whose initializers carry the state_dict names."""
    import torch

    sig = ep.graph_signature
    params = dict(sig.inputs_to_parameters)
    lifted = {**params, **sig.inputs_to_buffers,
              **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    lw = _Lowering()
    consts: dict[str, Any] = {}   # fx name -> torch value, for everything not fed by inputs
    unsupported: Counter = Counter()
    inputs, outputs = [], []

    def materialize(name: str, value) -> None:
        # the module's own memory, read-only (passes replace arrays, never write them): a
        # billion-parameter model is not copied
        arr = value.detach().cpu().numpy()
        arr.flags.writeable = False
        lw.inits[name] = arr
        lw.values[name] = Value(name, tuple(arr.shape), arr.dtype.name)
        lw.names[name] = name

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in lifted:
                fqn = lifted[node.name]
                src = ep.state_dict.get(fqn, ep.constants.get(fqn) if ep.constants else None)
                materialize(fqn, src)
                lw.names[node.name] = fqn
                if node.name not in params:
                    consts[node.name] = src
            else:
                shape, dtype = _meta(node)
                lw.names[node.name] = node.name
                lw.values[node.name] = Value(node.name, shape, dtype)
                inputs.append(node.name)
        elif node.op == "call_function":
            target = str(node.target)
            if target in _NO_OUTPUT:
                continue
            folded = _fold(node, consts)
            if folded is not None:
                consts[node.name] = folded
                if isinstance(folded, torch.Tensor):
                    materialize(node.name, folded)
                continue
            if target not in LOWERINGS and target != _GETITEM:
                unsupported[target] += 1
            if unsupported:
                continue  # keep scanning for the full list, lower nothing more
            if target == _GETITEM:
                lw.names[node.name] = f"{lw.tensor(node.args[0])}__{int(node.args[1])}"
                continue
            shape, dtype = _meta(node)
            lw.names[node.name] = node.name
            LOWERINGS[target](lw, node, node.name, shape, dtype)
            if _in_place(target):                  # later readers see the result
                lw.names[node.args[0].name] = node.name
        elif node.op == "output" and not unsupported:
            outputs = [lw.tensor(a) for a in node.args[0]]
    if unsupported:
        raise UnsupportedOpError(dict(unsupported))
    needed, nodes = set(outputs), []
    for node in reversed(lw.nodes):       # drop what no output reads (e.g. an unused pooler)
        if any(o in needed for o in node.outputs):
            nodes.append(node)
            needed.update(i for i in node.inputs if i)
    lw.nodes = nodes[::-1]
    used = {i for n in lw.nodes for i in n.inputs} | set(outputs)
    # unused initializers: BatchNorm's num_batches_tracked, folded intermediates, dead code
    inits = {k: v for k, v in lw.inits.items() if k in used}
    live = used | set(inputs) | {o for n in lw.nodes for o in n.outputs}
    return Graph(name="model", inputs=inputs, outputs=outputs, nodes=lw.nodes,
                 initializers=inits, values={k: v for k, v in lw.values.items() if k in live},
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
