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
too); a stream qualifies when nothing else touches it (see :func:`roles`): a per-channel
scale that is not a norm's, a norm whose output goes elsewhere than into linear layers (a
post-norm model's residual), or a weight read in another way leaves it to the plain cut.
Pre-norm LayerNorm models (GPT-2, OPT, Phi) are made RMS first, exactly (:func:`as_rms`).
The stream an encoder returns gets the output map of ``sparsec.passes.hidden`` first (a reader
like any other). ``ChannelPrune(rotate=True)`` (``--rotate`` with ``--hidden-ratio``) runs
:func:`prepare` before its plan: the rotated stream's channels are scored strongest first, so
any cut of it keeps the strongest directions, and :func:`rescale` fixes its norms in every
candidate the plan builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparsec import layerwise
from sparsec.analysis.depgraph import DependencyGraph, Group
from sparsec.ir.graph import Graph, Node, Value
from sparsec.passes.manager import PassContext, rows

#: ops a stream value passes through unchanged (as far as its channels go)
_PASS_THROUGH = ("Cast", "Identity")


@dataclass
class Roles:
    """How each weight of a stream's group sees the stream."""

    #: (weight, axis): its axis indexes the channels it writes / reads
    writers: list[tuple[str, int]] = field(default_factory=list)
    readers: list[tuple[str, int]] = field(default_factory=list)
    #: constants added to the stream along their axis: writers' biases, position embeddings
    #: folded to a table, any fixed offset (rotated like a writer's output)
    biases: list[tuple[str, int]] = field(default_factory=list)
    #: norm scales: (scale, the normalized stream it multiplies, the readers of the product)
    scales: list[tuple[str, str, list[tuple[str, int]]]] = field(default_factory=list)
    #: norm offsets (a LayerNorm's bias, added after its scale): (offset, its scale)
    offsets: list[tuple[str, str]] = field(default_factory=list)


def _through(graph: Graph, name: str, users: dict[str, list[Node]]) -> list[tuple[Node, str]]:
    """The nodes reading ``name``, looking through casts and reshapes that keep the channel
    axis last and whole (GPT-2's linear layers flatten the tokens first): (node, the name it
    reads)."""
    out = []
    for n in users.get(name, []):
        if n.op_type in _PASS_THROUGH or (
                n.op_type == "Reshape" and n.inputs[0] == name
                and graph.shape(n.outputs[0])[-1:] == graph.shape(name)[-1:]):
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


def _readers(graph: Graph, name: str, users: dict[str, list[Node]], what: str
             ) -> list[tuple[str, int]] | str:
    """The linear layers reading ``name`` (through casts) as (weight, reading axis), or why
    something else reads it."""
    readers = []
    for user, _ in _through(graph, name, users):
        weight = user.inputs[1] if len(user.inputs) > 1 else None
        axes = _weight_axes(user)
        if axes is None or weight not in graph.initializers:
            return f"{what} feeds {user.op_type} '{user.name}', not only linear layers"
        readers.append((weight, axes[0]))
    return readers


def roles(graph: Graph, group: Group, layernorms: bool = False) -> Roles | str:
    """The weights' roles if the stream can be rotated, else why not (one line). With
    ``layernorms``, LayerNorms that read the stream are allowed (``as_rms`` converts them:
    their scale and bias are then in ``scales`` and ``offsets``)."""
    users = graph.consumers()
    producers = graph.producers()
    tensors = {m.name for m in group.tensors}
    r = Roles()
    for m in group.members:
        if m.start != 0 or m.block != 1:
            return f"{m.name} holds the stream beside other channels"
    for node in graph.nodes:
        if layernorms and node.op_type == "LayerNormalization" and node.inputs[0] in tensors:
            if node.attr("axis", -1) not in (-1, graph.values[node.inputs[0]].rank - 1):
                return f"LayerNormalization '{node.name}' runs over another axis"
            found = _readers(graph, node.outputs[0], users, f"LayerNorm '{node.name}'")
            if isinstance(found, str):
                return found
            r.readers += found
            continue
        if node.op_type in ("LayerNormalization", "GroupNormalization", "InstanceNormalization",
                            "BatchNormalization") and node.inputs[0] in tensors:
            return f"{node.op_type} '{node.name}' centers the stream (only RMS norms rotate)"
        if node.op_type == "ReduceMean" and node.inputs[0] in tensors \
                and not _is_square(graph, producers.get(node.inputs[0])):
            return f"ReduceMean '{node.name}' averages the stream itself (a LayerNorm's mean)"
    scale_of = {}      # the output of a norm-scale Mul -> its scale
    for m in group.params:
        for node in users.get(m.name, []):
            if graph.initializers[m.name].ndim == 1 and node.op_type == "Mul":
                scale_of[node.outputs[0]] = m.name
    for m in group.params:
        w = graph.initializers[m.name]
        for node in users.get(m.name, []):
            if node.op_type == "LayerNormalization" and layernorms:
                continue                                 # as_rms decomposes it
            if w.ndim == 2 and node.op_type in ("MatMul", "Gemm") and node.inputs[1] == m.name:
                read, write = _weight_axes(node)
                (r.readers if m.axis == read else r.writers).append((m.name, m.axis))
            elif w.ndim == 2 and node.op_type == "Gather" and node.inputs[0] == m.name \
                    and node.attr("axis", 0) == 0 and m.axis == 1:
                r.writers.append((m.name, m.axis))
            elif w.ndim == 1 and node.op_type == "Gemm" and node.inputs[2:3] == [m.name] \
                    and node.inputs[1] in graph.initializers:
                r.biases.append((m.name, 0))             # C of a Gemm that writes the stream
            elif node.op_type == "Add":
                other = next(i for i in node.inputs if i != m.name)
                if w.ndim == 1 and other in scale_of:    # a norm's offset, after its scale
                    found = _readers(graph, node.outputs[0], users, f"the norm '{m.name}'")
                    if isinstance(found, str):
                        return found
                    r.offsets.append((m.name, scale_of[other]))
                    continue
                r.biases.append((m.name, m.axis))        # a constant written into the stream
            elif w.ndim == 1 and node.op_type == "Mul":
                x = next(i for i in node.inputs if i != m.name)
                offset = [u for u in users.get(node.outputs[0], []) if u.op_type == "Add"
                          and any(i in graph.initializers for i in u.inputs)]
                readers = _readers(graph, offset[0].outputs[0] if offset else node.outputs[0],
                                   users, f"the norm scale '{m.name}'")
                if isinstance(readers, str):
                    return readers
                r.scales.append((m.name, x, readers))
            else:
                return f"'{m.name}' meets the stream in {node.op_type} '{node.name}'"
    if not r.readers or not r.writers:
        return "no linear layer reads or writes the stream"
    written = {n for n, _ in r.writers}
    for scale, _, readers in r.scales:
        tied = [w for w, _ in readers if w in written]
        if tied:
            return f"'{tied[0]}' is both written and read (tied): the norm scale cannot fold in"
    pairs = dict(r.offsets)
    for offset, scale in r.offsets:
        if not np.array_equal(graph.initializers[scale], graph.initializers[pairs[offset]]):
            return f"'{offset}' is shared by norms of different scales"
    r.offsets = sorted(pairs.items())
    return r


def unshare(graph: Graph, group: Group) -> Graph:
    """``graph`` where each 1-D weight of the stream that several nodes read (exporters
    dedupe equal initializers: every zero bias, every unit norm scale of a fresh model) is a
    copy per reader, so that folding one norm's scale or centering one bias leaves the others
    alone."""
    users = graph.consumers()
    shared = [m.name for m in group.params if graph.initializers[m.name].ndim == 1
              and len(users.get(m.name, [])) > 1]
    if not shared:
        return graph
    out = graph.copy()
    for name in sorted(set(shared)):
        readers = [n for n in out.nodes if name in n.inputs]
        for k, node in enumerate(readers[1:], 1):
            copy = f"{name}__sparsec_copy{k}"
            out.set_initializer(copy, out.initializers[name].copy())
            node.inputs = [copy if i == name else i for i in node.inputs]
    return out


def as_rms(graph: Graph, group: Group) -> Graph | str:
    """``graph`` with the stream's LayerNorms made RMS norms, the same function (SliceGPT's
    first step): every writer is centered (its output has zero mean over the channels, which
    a LayerNorm subtracts anyway), so each LayerNorm's mean is zero and it equals its RMS
    form, written out as ops (``x / sqrt(mean(x*x) + eps) * scale + bias``), which a rotation
    keeps. Why not, where the stream has something else on it."""
    r = roles(graph, group, layernorms=True)
    if isinstance(r, str):
        return r
    norms = [n for n in graph.nodes if n.op_type == "LayerNormalization"
             and n.inputs[0] in {m.name for m in group.tensors}]
    if not norms:
        return graph
    out = graph.copy()
    for name, axis in sorted(set(r.writers)):
        w = np.asarray(out.initializers[name], np.float64)
        out.set_initializer(name, (w - w.mean(axis=axis, keepdims=True)).astype(
            graph.initializers[name].dtype))
    for name, axis in sorted(set(r.biases)):
        b = np.asarray(out.initializers[name], np.float64)
        out.set_initializer(name, (b - b.mean(axis=axis, keepdims=True)).astype(
            graph.initializers[name].dtype))
    opset = out.opsets.get("", 17)
    for ln in norms:
        at = next(i for i, n in enumerate(out.nodes) if n.name == ln.name)
        x, y = ln.inputs[0], ln.outputs[0]
        shape, dtype = out.shape(x), out.values[x].dtype
        stat = tuple(shape[:-1]) + (1,)
        p = f"{ln.name or y}_rms"
        eps = f"{p}_eps"
        out.set_initializer(eps, np.array(ln.attr("epsilon", 1e-5), dtype=dtype))
        names = {k: f"{p}_{k}" for k in ("sq", "ms", "var", "rms", "n", "g")}
        mean = Node("ReduceMean", [names["sq"]], [names["ms"]], {"keepdims": 1},
                    name=f"{p}_mean")
        if opset >= 18:
            axes = f"{p}_axes"
            out.set_initializer(axes, np.array([-1], dtype=np.int64))
            mean.inputs.append(axes)
        else:
            mean.attrs["axes"] = [-1]
        nodes = [Node("Mul", [x, x], [names["sq"]], name=f"{p}_square"), mean,
                 Node("Add", [names["ms"], eps], [names["var"]], name=f"{p}_eps_add"),
                 Node("Sqrt", [names["var"]], [names["rms"]], name=f"{p}_sqrt"),
                 Node("Div", [x, names["rms"]], [names["n"]], name=f"{p}_div")]
        scale = ln.inputs[1] if len(ln.inputs) > 1 and ln.inputs[1] else None
        bias = ln.inputs[2] if len(ln.inputs) > 2 and ln.inputs[2] else None
        last = names["n"]
        if scale is not None:
            nodes.append(Node("Mul", [last, scale], [y if bias is None else names["g"]],
                              name=f"{p}_scale"))
            last = names["g"]
        if bias is not None:
            nodes.append(Node("Add", [last, bias], [y], name=f"{p}_bias"))
        elif scale is None:
            nodes[-1].outputs = [y]
        for k, v in names.items():
            out.values[v] = Value(v, stat if k in ("ms", "var", "rms") else tuple(shape), dtype)
        out.nodes[at:at + 1] = nodes
    return out


def _along(w: np.ndarray, axis: int, q: np.ndarray) -> np.ndarray:
    """``w`` with its ``axis`` (length d) mapped through ``q`` (d x k): w' = w ×_axis q."""
    return np.moveaxis(np.tensordot(np.moveaxis(w, axis, -1), q, axes=([-1], [0])), -1, axis)


def rotate(graph: Graph, r: Roles, q: np.ndarray) -> Graph:
    """``graph`` with its stream rotated by the orthogonal ``q`` (d x d), norm scales folded
    into their readers first (the same function, up to rounding)."""
    out = graph.copy()
    w = {name: np.asarray(v, np.float64) for name, v in out.initializers.items()}
    for offset, scale in r.offsets:          # n*g + b = (n + b/g)*g: b/g rotates with n
        w[offset] = w[offset] / w[scale]
    for scale, _, readers in r.scales:
        for weight, axis in readers:
            shape = [1] * w[weight].ndim
            shape[axis] = -1
            w[weight] = w[weight] * w[scale].reshape(shape)
    for scale, _, _ in r.scales:
        w[scale] = np.ones_like(w[scale])
    for offset, _ in r.offsets:
        w[offset] = w[offset] @ q
    # a weight written and read along one axis (tied embeddings) is turned once: E q both
    # writes x q and reads it (x q (E q)^T = x E^T)
    for name, axis in sorted(set(r.writers) | set(r.readers) | set(r.biases)):
        w[name] = _along(w[name], axis, q)          # a reader of x q: its weight is q^T w
    changed = ({n for n, _ in r.writers + r.readers + r.biases}
               | {s for s, _, _ in r.scales} | {o for o, _ in r.offsets})
    for name in sorted(changed):
        out.set_initializer(name, w[name].astype(graph.initializers[name].dtype))
    return out


def principal_directions(graph: Graph, r: Roles, ctx: PassContext) -> np.ndarray:
    """Eigenvectors of the normalized stream's second moment over every norm and the fit
    batches (padded positions left out), strongest first (d x d)."""
    names = sorted({x for _, x, _ in r.scales})
    masks = ctx.masks(ctx.fit)
    moment: list[np.ndarray] = []

    def add(_name: str, batch: int, value: np.ndarray) -> None:
        x = rows(np.asarray(value, np.float64), masks[batch])
        if moment:
            moment[0] += x.T @ x
        else:
            moment.append(x.T @ x)

    # summed along a layer-wise walk: one norm's input of one batch in memory at a time
    layerwise.collect(graph, ctx.fit, names, add)
    vals, vecs = np.linalg.eigh(moment[0])
    return vecs[:, np.argsort(vals)[::-1]]


@dataclass
class Rotated:
    """A stream :func:`prepare` rotated: its width and the norm scales that cutting it must
    set to ``sqrt(width / kept)``."""

    width: int
    scales: list[str]
    #: its entry in ``prepare``'s report
    entry: dict = field(default_factory=dict)


def prepare(graph: Graph, ctx: PassContext) -> tuple[Graph, dict[tuple, Rotated], list[dict]]:
    """Every hidden stream of ``graph`` that qualifies, rotated to its principal directions
    (its LayerNorms made RMS first where that is exact): the graph, the rotated streams by
    :func:`stream_key`, and one report entry per stream (why not, for the others)."""
    report: list[dict] = []
    rotated: dict[tuple, Rotated] = {}
    seen: set[tuple] = set()
    for _ in range(16):                                   # one stream a round
        stream = next((g for g in DependencyGraph(graph).groups if g.kind == "hidden"
                       and g.hidden_prunable and stream_key(g) not in seen), None)
        if stream is None:
            break
        key = stream_key(stream)
        seen.add(key)
        shared = unshare(graph, stream)
        if shared is not graph:
            graph = shared
            stream = next(g for g in DependencyGraph(graph).groups if stream_key(g) == key)
        r = roles(graph, stream)
        converted = False
        if isinstance(r, str):
            rms = as_rms(graph, stream)
            if isinstance(rms, str):
                report.append({"width": stream.size, "rotated": False, "why": rms})
                continue
            graph, converted = rms, True
            stream = next(g for g in DependencyGraph(graph).groups if stream_key(g) == key)
            r = roles(graph, stream)
            if isinstance(r, str):
                report.append({"width": stream.size, "rotated": False, "why": r})
                continue
        graph = rotate(graph, r, principal_directions(graph, r, ctx))
        report.append({"width": stream.size, "rotated": True, "layernorms_made_rms": converted,
                       "writers": len(set(r.writers)), "readers": len(set(r.readers)),
                       "norms": len(r.scales)})
        rotated[key] = Rotated(stream.size, sorted({sc for sc, _, _ in r.scales}), report[-1])
    return graph, rotated, report


def rescale(graph: Graph, rotated: dict[tuple, Rotated], kept: dict[tuple, int]) -> None:
    """Set the norm scales of each rotated stream cut to ``kept[key]`` channels to
    ``sqrt(width / kept)`` (in place): its norms now average over fewer channels, which carry
    nearly all of the stream."""
    for key, k in kept.items():
        if key in rotated:
            rotated[key].entry["kept"] = k
        if key in rotated and k < rotated[key].width:
            for scale in rotated[key].scales:
                graph.set_initializer(scale, np.full_like(graph.initializers[scale],
                                                          np.sqrt(rotated[key].width / k)))


def stream_key(group: Group) -> tuple:
    """A stream's identity across edits of values and norms: its writers."""
    return (group.kind, tuple(sorted(group.sources)))
