"""Hidden widths whose stream is the model's output: keep the interface, cut the inside.

An encoder returns its residual stream (BERT's last hidden state, a sentence embedding pooled
from it), so the analysis freezes the stream's group at the graph output: the output's width is
the model's contract with its users. ``keep_output_width`` makes that stream prunable without
breaking the contract: after the stream's last norm it inserts an *output map*, an identity
MatMul plus a zero bias (the same function, exactly), which the stream's group now ends at, as
it ends at any linear layer that reads it. Cutting the hidden width then slices the map's
rows: the output keeps its width, and with ``--reconstruct`` the map is refit like every
consumer, by least squares from the kept channels (and a constant) to the original output, so
each removed output channel becomes its best linear estimate instead of zero.
"""

from __future__ import annotations

import numpy as np

from sparsec.analysis.depgraph import DependencyGraph, Group
from sparsec.ir.graph import Graph, Node, Value

NORMS = ("LayerNormalization", "RMSNormalization")


def keep_output_width(graph: Graph) -> tuple[Graph, list[dict]]:
    """``graph`` with an output map after the last norm of every hidden stream that only the
    graph output (or another consumer the analysis cannot cut) holds whole; the maps that made
    a stream prunable, as report entries. Streams a map does not free are left as they were."""
    added: list[dict] = []
    for _ in range(8):                       # one stream per round; models have one or two
        dg = DependencyGraph(graph)
        held = [g for g in dg.groups if g.kind == "hidden" and not g.hidden_prunable
                and g.size > 1 and not _mapped(g)]
        for group in held:
            norm = _last_norm(graph, group)
            if norm is None:
                continue
            trial, entry = _insert_map(graph, norm, len(added))
            mapped = DependencyGraph(trial).group_of(entry["weight"], 0)
            if mapped is not None and mapped.hidden_prunable:
                graph = trial
                added.append(entry)
                break
        else:
            return graph, added
    return graph, added


def _mapped(group: Group) -> bool:
    return any(m.name.startswith("sparsec_output_map") for m in group.members)


def _last_norm(graph: Graph, group: Group) -> Node | None:
    """The stream's last norm: a LayerNorm / RMSNorm op, or the Mul / Add that applies a
    per-channel vector of the stream (the scale of a norm written out as ops, as T5's is)."""
    params = {m.name for m in group.params if graph.initializers[m.name].ndim == 1}
    norms = [n for n in graph.nodes if (n.op_type in NORMS and len(n.inputs) > 1
                                        and n.inputs[1] in params)
             or (n.op_type in ("Mul", "Add") and any(i in params for i in n.inputs))]
    return norms[-1] if norms else None


def _insert_map(graph: Graph, norm: Node, k: int) -> tuple[Graph, dict]:
    """A copy of ``graph`` where ``norm``'s output y is computed as (y' @ I) + 0 from the norm's
    new output y' (names of everything downstream unchanged)."""
    out = graph.copy()
    node = next(n for n in out.nodes if n.name == norm.name)
    y = node.outputs[0]
    shape, dtype = out.shape(y), out.values[y].dtype
    width = shape[-1]
    prefix = f"sparsec_output_map{k}"
    inner, product = f"{prefix}_in", f"{prefix}_out"
    weight, bias = f"{prefix}_weight", f"{prefix}_bias"
    node.outputs[0] = inner
    out.values[inner] = Value(inner, tuple(shape), dtype)
    out.values[product] = Value(product, tuple(shape), dtype)
    out.set_initializer(weight, np.eye(width, dtype=dtype))
    out.set_initializer(bias, np.zeros(width, dtype=dtype))
    at = out.nodes.index(node) + 1
    out.nodes[at:at] = [Node("MatMul", [inner, weight], [product], name=f"{prefix}_matmul"),
                        Node("Add", [product, bias], [y], name=f"{prefix}_add")]
    return out, {"after": norm.name, "output": y, "width": width, "weight": weight}
