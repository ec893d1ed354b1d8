"""Load-time normalization: fold what does not depend on input values (exact).

Exporters, the TorchScript one above all, compute shapes, pads, masks and reshape targets at run
time: ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``, ``ConstantOfShape -> ... -> Pad``.
Once sparsec has pinned the input shapes, all of that is a constant. Left in the graph it
freezes channel groups ("Reshape target shape is computed at run time"), hides residual layers
from the block finder and breaks TVM's ONNX importer. ``normalize`` rewrites the graph before
anything else reads it:

1. ``Identity`` nodes are bypassed (a weight reached through ``Identity`` stays one weight).
2. Equal nodes (same op, inputs and attributes) are merged, so that one weight transposed by
   every layer that shares it (ALBERT) folds into one constant, not one copy per layer.
3. Every node whose inputs are all constants, and every ``Shape`` / ``Size`` (the shapes are
   static), is evaluated once by ONNX Runtime and replaced by its value. A value larger than
   ``MAX_FOLDED_ELEMENTS`` that would be bigger than what it is computed from (a broadcast
   SxS mask) stays computed: the graph never grows by more than that cap per tensor.
4. A constant zero ``Pad`` of the spatial axes that feeds only a ``Conv`` moves into the
   Conv's ``pads``.
5. ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` with a scalar or multi-axis constant (not a
   per-channel bias or scale, which is a parameter) that does not broadcast ``x`` are ``x``
   (an all-zero attention mask, folded, leaves the attention MatMul unmasked).
6. A pooling window that covers the whole map (one output pixel, no padding; EfficientNet's
   ``AvgPool2d(1280, ceil_mode=True)`` on a 2x2 map) is the global pool it computes.

The caller proves the result exact on the model at hand (``sparsec.frontends.onnx``).
Initializer names are kept; a folded tensor is named after the value it replaces.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from onnx import AttributeProto

from sparsec.ir.graph import Graph, Node, Value

#: a folded tensor may exceed this many elements only if it is no larger than its inputs
MAX_FOLDED_ELEMENTS = 1 << 16
#: ops never evaluated at load time (their value changes from run to run)
_RANDOM = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                     "Multinomial", "Bernoulli", "Dropout"})


@dataclass
class NormalizeReport:
    """What ``normalize`` changed: folded nodes per op type, and the other rewrites."""

    folded: dict[str, int] = field(default_factory=dict)
    constants: int = 0           # tensors that became initializers
    kept_large: int = 0          # foldable tensors left computed (over the size cap)
    identities: int = 0
    merged: int = 0
    pads_fused: int = 0
    global_pools: int = 0
    neutral_ops: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.folded or self.identities or self.merged or self.pads_fused
                    or self.global_pools or self.neutral_ops)

    def as_dict(self) -> dict:
        return {"folded": dict(sorted(self.folded.items())), "constants": self.constants,
                "kept_large": self.kept_large, "identities": self.identities,
                "merged": self.merged, "pads_fused": self.pads_fused,
                "global_pools": self.global_pools, "neutral_ops": self.neutral_ops}

    def summary(self) -> str:
        parts = []
        if self.folded:
            n = sum(self.folded.values())
            top = ", ".join(f"{op} x{c}" for op, c in
                            sorted(self.folded.items(), key=lambda kv: (-kv[1], kv[0]))[:4])
            parts.append(f"folded {n} node(s) into {self.constants} constant(s) ({top})")
        if self.identities:
            parts.append(f"{self.identities} Identity bypassed")
        if self.merged:
            parts.append(f"{self.merged} duplicate node(s) merged")
        if self.pads_fused:
            parts.append(f"{self.pads_fused} Pad(s) fused into Conv")
        if self.neutral_ops:
            parts.append(f"{self.neutral_ops} x+0 / x*1 removed")
        if self.global_pools:
            parts.append(f"{self.global_pools} whole-map pool(s) made global")
        if self.kept_large:
            parts.append(f"{self.kept_large} large constant(s) left computed")
        return "; ".join(parts)


def normalize(graph: Graph) -> tuple[Graph, NormalizeReport]:
    """A normalized copy of ``graph`` and what changed (the input graph is not modified)."""
    g = graph.copy(arrays=False)       # folding replaces arrays, never writes them
    report = NormalizeReport()
    report.identities = _bypass_identities(g)
    report.merged = _merge_duplicates(g)
    _fold(g, report)
    report.merged += _merge_duplicates(g)
    report.neutral_ops = _drop_neutral_ops(g)
    report.pads_fused = _fuse_pads(g)
    report.global_pools = _global_pools(g)
    _drop_dead(g)
    return g, report


# ----------------------------------------------------------------------------- rewrites
def _rename_uses(g: Graph, old: str, new: str) -> None:
    for node in g.nodes:
        node.inputs = [new if i == old else i for i in node.inputs]


def _bypass_identities(g: Graph) -> int:
    outputs = set(g.outputs)
    count = 0
    for node in list(g.nodes):
        if node.op_type != "Identity" or node.outputs[0] in outputs:
            continue
        _rename_uses(g, node.outputs[0], node.inputs[0])
        g.nodes.remove(node)
        count += 1
    return count


def _attr_key(value) -> object:
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, list):
        return tuple(_attr_key(v) for v in value)
    return value


def _merge_duplicates(g: Graph) -> int:
    """Common subexpressions: a node equal to an earlier one (op, domain, inputs, attributes)
    is dropped and its outputs renamed to the earlier node's. Graph outputs are never renamed."""
    outputs = set(g.outputs)
    seen: dict[tuple, Node] = {}
    renames: dict[str, str] = {}
    kept: list[Node] = []
    for node in g.nodes:
        node.inputs = [renames.get(i, i) for i in node.inputs]
        key = (node.op_type, node.domain, tuple(node.inputs), len(node.outputs),
               tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())))
        first = seen.get(key)
        if (first is None or node.op_type in _RANDOM
                or any(o in outputs for o in node.outputs)):
            seen.setdefault(key, node)
            kept.append(node)
            continue
        renames.update({o: f for o, f in zip(node.outputs, first.outputs) if o})
    dropped = len(g.nodes) - len(kept)
    g.nodes = kept
    return dropped


def _static_value(g: Graph, node: Node) -> np.ndarray | None:
    """``Shape`` / ``Size`` of a tensor whose shape is static: the value, without running."""
    shape = g.shape(node.inputs[0])
    if node.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
    rank = len(shape)
    start = int(node.attr("start", 0))
    end = node.attr("end")
    start = max(0, min(rank, start + rank if start < 0 else start))
    stop = rank if end is None else int(end)
    stop = max(0, min(rank, stop + rank if stop < 0 else stop))
    return np.array(shape[start:stop], dtype=np.int64)


def _fold(g: Graph, report: NormalizeReport) -> None:
    outputs = set(g.outputs)
    const = set(g.initializers)
    foldable: list[Node] = []
    for node in g.nodes:
        if node.op_type in _RANDOM or node.domain not in ("", "ai.onnx"):
            continue
        if any(o in outputs for o in node.outputs):
            continue
        if node.op_type in ("Shape", "Size") or all(not i or i in const for i in node.inputs):
            foldable.append(node)
            const.update(o for o in node.outputs if o)
    if not foldable:
        return
    producer = {o: n for n in foldable for o in n.outputs if o}

    def size(name: str) -> int:
        return int(np.prod(g.shape(name), dtype=np.int64))

    # Values a node that stays reads: materialized unless too large (then their producer stays
    # too, and its inputs are materialized instead).
    folded = {id(n) for n in foldable}
    while True:
        frontier = _frontier(g, foldable, folded)
        too_big = [v for v in frontier if size(v) > MAX_FOLDED_ELEMENTS and size(v) > sum(
            size(i) for i in producer[v].inputs if i)]
        if not too_big:
            break
        for v in too_big:
            folded.discard(id(producer[v]))
            report.kept_large += 1
    frontier = _frontier(g, foldable, folded)
    if not frontier:
        return
    values = _evaluate(g, [n for n in foldable if id(n) in folded], frontier)
    for name, arr in zip(frontier, values):
        want = g.values[name]
        g.set_initializer(name, np.asarray(arr).astype(want.dtype, copy=False).reshape(want.shape))
    report.constants += len(frontier)
    done = [n for n in foldable if id(n) in folded]
    report.folded = dict(Counter(n.op_type for n in done))
    dropped = {id(n) for n in done}
    g.nodes = [n for n in g.nodes if id(n) not in dropped]


def _frontier(g: Graph, foldable: list[Node], folded: set[int]) -> list[str]:
    """Outputs of folded nodes that a node left in the graph reads, in graph order."""
    made = {o for n in foldable if id(n) in folded for o in n.outputs if o}
    seen: dict[str, None] = {}
    for node in g.nodes:
        if id(node) in folded:
            continue
        for i in node.inputs:
            if i in made:
                seen.setdefault(i)
    return list(seen)


def _evaluate(g: Graph, nodes: list[Node], wanted: list[str]) -> list[np.ndarray]:
    """The values of ``wanted`` computed by ``nodes`` from initializers alone (ONNX Runtime)."""
    from sparsec import reference

    sub_nodes: list[Node] = []
    inits: dict[str, np.ndarray] = {}
    for node in nodes:
        if node.op_type in ("Shape", "Size"):
            inits[node.outputs[0]] = _static_value(g, node)
            continue
        sub_nodes.append(node)
        for i in node.inputs:
            if i and i in g.initializers:
                inits[i] = g.initializers[i]
    computed = {o for n in sub_nodes for o in n.outputs}
    direct = {w: inits[w] for w in wanted if w not in computed}
    need = [w for w in wanted if w in computed]
    results: dict[str, np.ndarray] = dict(direct)
    if need:
        values = dict(g.values)
        for name, arr in inits.items():
            values[name] = Value(name, tuple(arr.shape), arr.dtype.name)
        sub = Graph(name="fold", inputs=[], outputs=need, nodes=sub_nodes, initializers=inits,
                    values=values, opsets=dict(g.opsets), ir_version=g.ir_version)
        for name, arr in zip(need, reference.run(sub, {})):
            results[name] = arr
    return [results[w] for w in wanted]


def _fuse_pads(g: Graph) -> int:
    """``Pad(x, constant zeros on H/W) -> Conv`` becomes one Conv with larger ``pads``."""
    consumers = g.consumers()
    outputs = set(g.outputs)
    producers = g.producers()
    fused = 0
    for conv in g.nodes:
        if conv.op_type != "Conv" or conv.attr("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            continue
        pad = producers.get(conv.inputs[0])
        if pad is None or pad.op_type != "Pad" or pad.outputs[0] in outputs:
            continue
        if len(consumers.get(pad.outputs[0], [])) != 1:
            continue
        amounts = _constant_pads(g, pad)
        if amounts is None:
            continue
        rank = len(g.shape(pad.inputs[0]))
        begin, end = amounts[:rank], amounts[rank:]
        if begin[0] or begin[1] or end[0] or end[1] or min(amounts) < 0:
            continue
        spatial = rank - 2
        old = list(conv.attr("pads", [0] * (2 * spatial)))
        conv.attrs["pads"] = [int(old[k] + begin[2 + k]) for k in range(spatial)] + [
            int(old[spatial + k] + end[2 + k]) for k in range(spatial)]
        conv.attr_types.setdefault("pads", AttributeProto.INTS)
        conv.inputs[0] = pad.inputs[0]
        fused += 1
    return fused


_NEUTRAL = {"Add": (0.0, True), "Sub": (0.0, False), "Mul": (1.0, True), "Div": (1.0, False)}


def _drop_neutral_ops(g: Graph) -> int:
    """Add/Sub of constant zeros, Mul/Div by constant ones, where the constant does not change
    ``x``'s shape or dtype: the node goes and its readers read ``x``."""
    outputs = set(g.outputs)
    count = 0
    for node in list(g.nodes):
        rule = _NEUTRAL.get(node.op_type)
        if rule is None or len(node.inputs) != 2 or node.outputs[0] in outputs:
            continue
        value, commutes = rule
        slots = (1, 0) if commutes else (1,)
        for slot in slots:
            const, x = node.inputs[slot], node.inputs[1 - slot]
            arr = g.initializers.get(const)
            if (arr is None or arr.dtype.kind != "f" or not np.all(arr == value)
                    or sum(d > 1 for d in arr.shape) == 1      # a bias or scale vector: a
                    #   parameter (pruned, refit), however it was initialized
                    or g.shape(x) != g.shape(node.outputs[0])
                    or g.values[x].dtype != g.values[node.outputs[0]].dtype):
                continue
            _rename_uses(g, node.outputs[0], x)
            g.nodes.remove(node)
            count += 1
            break
    return count


def _global_pools(g: Graph) -> int:
    """``AveragePool`` / ``MaxPool`` whose one window covers the whole map -> the global pool.

    Exact when nothing is padded: the window then reads every pixel and only them. With
    ``ceil_mode`` it may reach past the map, and the average divides by the pixels inside it
    (ONNX Runtime and torch clip the window to the padded map, so ``count_include_pad`` counts
    no extra pixel when the pads are zero)."""
    count = 0
    for node in g.nodes:
        if node.op_type not in ("AveragePool", "MaxPool") or len(node.outputs) != 1:
            continue
        x, y = g.shape(node.inputs[0]), g.shape(node.outputs[0])
        if len(x) < 3 or any(d != 1 for d in y[2:]):
            continue
        if any(int(p) for p in node.attr("pads", ())) or (
                node.attr("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID")):
            continue
        kernel = [int(k) for k in node.attr("kernel_shape", ())]
        if len(kernel) != len(x) - 2 or any(k < d for k, d in zip(kernel, x[2:])):
            continue
        if any(int(d) != 1 for d in node.attr("dilations", ())):
            continue
        node.op_type = "Global" + node.op_type
        node.attrs, node.attr_types = {}, {}
        count += 1
    return count


def _constant_pads(g: Graph, pad: Node) -> list[int] | None:
    """The full begin+end pad list of a zero-valued constant-mode Pad, else None."""
    mode = pad.attr("mode", "constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    rank = len(g.shape(pad.inputs[0]))
    if len(pad.inputs) > 1:                             # opset >= 11: pads as an input
        if pad.inputs[1] not in g.initializers:
            return None
        raw = [int(v) for v in g.initializers[pad.inputs[1]].ravel()]
        if len(pad.inputs) > 2 and pad.inputs[2]:
            if pad.inputs[2] not in g.initializers:
                return None
            if np.any(g.initializers[pad.inputs[2]] != 0):
                return None
        axes = list(range(rank))
        if len(pad.inputs) > 3 and pad.inputs[3]:
            if pad.inputs[3] not in g.initializers:
                return None
            axes = [int(a) % rank for a in g.initializers[pad.inputs[3]].ravel()]
    else:                                               # opset < 11: attributes
        raw = [int(v) for v in pad.attr("pads", [])]
        if float(pad.attr("value", 0.0)) != 0.0:
            return None
        axes = list(range(rank))
    if len(raw) != 2 * len(axes):
        return None
    full = [0] * (2 * rank)
    for k, a in enumerate(axes):
        full[a], full[rank + a] = raw[k], raw[len(axes) + k]
    return full


def _drop_dead(g: Graph) -> None:
    """Initializers and nodes nothing reads any more (folded inputs, fused pads)."""
    live = set(g.outputs)
    kept: list[Node] = []
    for node in reversed(g.nodes):
        if any(o in live for o in node.outputs if o):
            kept.append(node)
            live.update(i for i in node.inputs if i)
    g.nodes = kept[::-1]
    for name in [n for n in g.initializers if n not in live]:
        del g.initializers[name]
    used = live | {o for n in g.nodes for o in n.outputs} | set(g.inputs)
    for name in [n for n in g.values if n not in used]:
        del g.values[name]
