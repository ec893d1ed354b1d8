"""Rotate a hidden stream before cutting it (SliceGPT): drop its least-used directions, not
its least-used channels.

A pre-norm transformer's residual stream passes only through RMS norms, residual adds and
linear layers, and an orthogonal ``Q`` commutes with all of them once each norm's scale is
folded into the layers that read the norm: ``rms(x Q) = rms(x)``, so writing ``x Q`` into the
stream (every writer's weight and bias times ``Q``: embeddings, attention and FFN outputs) and
reading with ``Q^T`` (every reader's weight, after the scale fold) is the same function. With
``Q``'s columns the principal directions of the normalized stream on the calibration data, the
stream's channel ``i`` is its ``i``-th principal component, and cutting the hidden width to
``k`` keeps the ``k`` directions that carry most of it. The norms then average over ``k``
channels instead of ``d``: each norm's scale becomes ``sqrt(d / k)``, which restores the
magnitude whenever the dropped directions carried little.

One ``Q`` for the whole stream (SliceGPT fits one per layer and rotates the skip connections
too); a stream qualifies when nothing else touches it (see :func:`roles`): a LayerNorm (its
mean subtraction does not commute), a per-channel offset or scale that is not a linear
layer's bias or a norm's scale, or a weight read in another way leaves it to the plain cut.
The stream an encoder returns gets the output map of ``sparsec.passes.hidden`` first (a reader
like any other).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph, Group
from sparsec.ir.graph import Graph, Node
from sparsec.passes.hidden import keep_output_width
from sparsec.passes.manager import PassContext, rows
from sparsec.passes.surgery import apply_plan

#: ops a stream value passes through unchanged (as far as its channels go)
_PASS_THROUGH = ("Cast", "Identity")


@dataclass
class Roles:
    """How each weight of a stream's group sees the stream."""

    #: (weight, axis): its axis indexes the channels it writes / reads
    writers: list[tuple[str, int]] = field(default_factory=list)
    readers: list[tuple[str, int]] = field(default_factory=list)
    #: 1-D biases added to a writer's output
    biases: list[str] = field(default_factory=list)
    #: norm scales: (scale, the normalized stream it multiplies, the readers of the product)
    scales: list[tuple[str, str, list[tuple[str, int]]]] = field(default_factory=list)


def _users(graph: Graph) -> dict[str, list[Node]]:
    out: dict[str, list[Node]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            out.setdefault(i, []).append(n)
    return out


def _through(graph: Graph, name: str, users: dict[str, list[Node]]) -> list[tuple[Node, str]]:
    """The nodes reading ``name``, looking through casts: (node, the name it reads)."""
    out = []
    for n in users.get(name, []):
        if n.op_type in _PASS_THROUGH:
            out += _through(graph, n.outputs[0], users)
        else:
            out.append((n, name))
    return out


def _weight_axes(node: Node) -> tuple[int, int] | None:
    """(reading axis, writing axis) of a MatMul / Gemm weight (input 1), or None."""
    if node.op_type == "MatMul":
        return 0, 1
    if node.op_type == "Gemm":
        return (1, 0) if node.attr("transB", 0) else (0, 1)
    return None


def _is_square(graph: Graph, node: Node | None) -> bool:
    """Whether ``node`` squares its input (``Pow(x, 2)`` or ``Mul(x, x)``): an RMS norm's
    mean runs over the square, which a rotation keeps."""
    if node is None:
        return False
    if node.op_type == "Mul":
        return node.inputs[0] == node.inputs[1]
    if node.op_type == "Pow":
        exponent = graph.initializers.get(node.inputs[1])
        return exponent is not None and exponent.size == 1 and float(exponent.ravel()[0]) == 2.0
    return False


def roles(graph: Graph, group: Group) -> Roles | str:
    """The weights' roles if the stream can be rotated, else why not (one line)."""
    users = _users(graph)
    producers = graph.producers()
    tensors = {m.name for m in group.tensors}
    r = Roles()
    for m in group.members:
        if m.start != 0 or m.block != 1:
            return f"{m.name} holds the stream beside other channels"
    for node in graph.nodes:
        if node.op_type in ("LayerNormalization", "GroupNormalization", "InstanceNormalization",
                            "BatchNormalization") and node.inputs[0] in tensors:
            return f"{node.op_type} '{node.name}' centers the stream (only RMS norms rotate)"
        if node.op_type == "ReduceMean" and node.inputs[0] in tensors \
                and not _is_square(graph, producers.get(node.inputs[0])):
            return f"ReduceMean '{node.name}' averages the stream itself (a LayerNorm's mean)"
    for m in group.params:
        w = graph.initializers[m.name]
        for node in users.get(m.name, []):
            if w.ndim == 2 and node.op_type in ("MatMul", "Gemm") and node.inputs[1] == m.name:
                read, write = _weight_axes(node)
                (r.readers if m.axis == read else r.writers).append((m.name, m.axis))
            elif w.ndim == 2 and node.op_type == "Gather" and node.inputs[0] == m.name \
                    and node.attr("axis", 0) == 0 and m.axis == 1:
                r.writers.append((m.name, m.axis))
            elif w.ndim == 1 and node.op_type == "Add":
                other = next(i for i in node.inputs if i != m.name)
                producer = producers.get(other)
                if producer is None or producer.op_type not in ("MatMul", "Gemm", "Gather"):
                    return f"'{m.name}' is a per-channel offset on the stream, not a bias"
                r.biases.append(m.name)
            elif w.ndim == 1 and node.op_type == "Mul":
                x = next(i for i in node.inputs if i != m.name)
                readers = []
                for user, _ in _through(graph, node.outputs[0], users):
                    weight = user.inputs[1] if len(user.inputs) > 1 else None
                    axes = _weight_axes(user)
                    if axes is None or weight not in graph.initializers:
                        return (f"the norm scale '{m.name}' feeds {user.op_type} "
                                f"'{user.name}', not only linear layers")
                    readers.append((weight, axes[0]))
                r.scales.append((m.name, x, readers))
            else:
                return f"'{m.name}' meets the stream in {node.op_type} '{node.name}'"
    if not r.readers or not r.writers:
        return "no linear layer reads or writes the stream"
    return r


def _along(w: np.ndarray, axis: int, q: np.ndarray) -> np.ndarray:
    """``w`` with its ``axis`` (length d) mapped through ``q`` (d x k): w' = w ×_axis q."""
    return np.moveaxis(np.tensordot(np.moveaxis(w, axis, -1), q, axes=([-1], [0])), -1, axis)


def rotate(graph: Graph, r: Roles, q: np.ndarray) -> Graph:
    """``graph`` with its stream rotated by the orthogonal ``q`` (d x d), norm scales folded
    into their readers first (the same function, up to rounding)."""
    out = graph.copy()
    w = {name: np.asarray(v, np.float64) for name, v in out.initializers.items()}
    for scale, _, readers in r.scales:
        for weight, axis in readers:
            shape = [1] * w[weight].ndim
            shape[axis] = -1
            w[weight] = w[weight] * w[scale].reshape(shape)
    for scale, _, _ in r.scales:
        w[scale] = np.ones_like(w[scale])
    for name, axis in r.writers:
        w[name] = _along(w[name], axis, q)
    for name in r.biases:
        w[name] = w[name] @ q
    for name, axis in r.readers:
        w[name] = _along(w[name], axis, q)          # reads x q: its weight becomes q^T w
    changed = {n for n, _ in r.writers + r.readers} | set(r.biases) | {s for s, _, _ in r.scales}
    for name in sorted(changed):
        out.set_initializer(name, w[name].astype(graph.initializers[name].dtype))
    return out


def principal_directions(graph: Graph, r: Roles, ctx: PassContext) -> np.ndarray:
    """Eigenvectors of the normalized stream's second moment over every norm and the fit
    batches (padded positions left out), strongest first (d x d)."""
    names = sorted({x for _, x, _ in r.scales})
    values = reference.activations(graph, ctx.fit, names)
    moment = None
    for i, mask in enumerate(ctx.masks(ctx.fit)):
        for name in names:
            x = rows(np.asarray(values[name][i], np.float64), mask)
            moment = x.T @ x if moment is None else moment + x.T @ x
    vals, vecs = np.linalg.eigh(moment)
    return vecs[:, np.argsort(vals)[::-1]]


@dataclass
class RotateHidden:
    """Cut each hidden stream to ``1 - ratio`` of its width along its principal directions
    (the module docstring); streams that do not qualify are reported and left whole."""

    ratio: float
    name: str = "rotate-hidden"
    exact: bool = False

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        if ctx is None:
            raise ValueError("rotating the hidden width needs calibration data (a PassContext)")
        graph, maps = keep_output_width(graph)
        dg = DependencyGraph(graph)
        plan, report, rotated = {}, [], graph
        scales: list[tuple[str, float]] = []
        for g in [g for g in dg.groups if g.kind == "hidden" and g.hidden_prunable]:
            r = roles(graph, g)
            if isinstance(r, str):
                report.append({"group": g.id, "width": g.size, "rotated": False, "why": r})
                continue
            q = principal_directions(graph, r, ctx)
            keep = max(1, int(round(g.size * (1 - self.ratio))))
            rotated = rotate(rotated, r, q)
            plan[g.id] = np.arange(keep)
            scales += [(s, float(np.sqrt(g.size / keep))) for s, _, _ in r.scales]
            report.append({"group": g.id, "width": g.size, "kept": keep, "rotated": True,
                           "writers": len(r.writers), "readers": len(r.readers),
                           "norms": len(r.scales)})
        if not plan:
            return graph, {"ratio": self.ratio, "streams": report, "output_maps": maps}
        same = DependencyGraph(rotated)          # values changed, structure did not
        out = apply_plan(rotated, same, plan)
        for scale, value in scales:
            out.set_initializer(scale, np.full_like(out.initializers[scale], value))
        return out, {"ratio": self.ratio, "streams": report, "output_maps": maps}
