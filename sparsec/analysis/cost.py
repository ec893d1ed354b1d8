"""Cost model: parameters and multiply-accumulates per op, from static shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparsec.ir.graph import Graph, Node


def node_macs(graph: Graph, n: Node) -> int:
    """Multiply-accumulates of one node (0 for ops that are not Conv/Gemm/MatMul)."""
    if n.op_type == "Conv":
        w = graph.shape(n.inputs[1])  # [O, I/g, k...]
        return math.prod(graph.shape(n.outputs[0])) * math.prod(w[1:])
    if n.op_type == "Gemm":
        a = graph.shape(n.inputs[0])
        k = a[0] if int(n.attr("transA", 0)) else a[1]
        return math.prod(graph.shape(n.outputs[0])) * k
    if n.op_type == "MatMul":
        return math.prod(graph.shape(n.outputs[0])) * graph.shape(n.inputs[0])[-1]
    return 0


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    #: parameters that are not zero: what weight sparsity removes (``params`` stays the same)
    nonzeros: int = 0
    #: bytes of the weights stored densely (zeros included)
    weight_bytes: int = 0

    @property
    def zeros(self) -> int:
        return self.params - self.nonzeros

    def as_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "nonzeros": self.nonzeros,
                "zeros": self.zeros, "weight_bytes": self.weight_bytes}


def cost(graph: Graph) -> Cost:
    weights = [a for a in graph.initializers.values() if a.dtype.kind == "f"]
    nonzeros = int(sum(np.count_nonzero(a) for a in weights))
    return Cost(graph.param_count(), sum(node_macs(graph, n) for n in graph.nodes), nonzeros,
                int(sum(a.nbytes for a in weights)))
