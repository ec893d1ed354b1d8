"""Loading: any model form (an ONNX file or proto, a sparsec Graph, a torch module with
example inputs) -> a static-shaped :class:`~sparsec.ir.graph.Graph`, and ``inspect``'s summary
of one. The first step of the pipeline (``loading -> pruning -> compiling -> running``);
``sparsec.api`` re-exports all of it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from sparsec.analysis.cost import cost
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.errors import BadOptionError
from sparsec.frontends.onnx import InputShapes, load_onnx, parse_input_shapes
from sparsec.ir.graph import Graph
from sparsec.reference import signature

Log = Callable[[str], None]
ModelLike = Any  # path, onnx.ModelProto, sparsec Graph, or torch.nn.Module (with example_inputs)


def _quiet(msg: str) -> None:
    pass


def load(model: ModelLike, input_shapes: InputShapes | str | None = None,
         example_inputs: Sequence[Any] | None = None) -> Graph:
    """Any supported model form -> a static-shaped Graph (the input is never modified)."""
    if isinstance(input_shapes, str):
        input_shapes = parse_input_shapes(input_shapes)
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
        return load_onnx(model, input_shapes)
    if hasattr(model, "forward") and hasattr(model, "parameters"):
        if example_inputs is None:
            raise BadOptionError("a torch module needs example_inputs to be captured")
        from sparsec.frontends.torch import capture
        return capture(model, example_inputs)
    raise BadOptionError(f"cannot load a model from a {type(model).__name__}")


def capture(module, example_inputs: Sequence[Any]) -> Graph:
    """Capture a torch.nn.Module with torch.export at the example inputs' shapes."""
    from sparsec.frontends.torch import capture as _capture
    return _capture(module, example_inputs)


def inspect(model: ModelLike, input_shapes: InputShapes | str | None = None) -> dict:
    """Op histogram, parameters, MACs and channel groups (frozen ones with their reasons)."""
    graph = load(model, input_shapes)
    dg = DependencyGraph(graph)
    c = cost(graph)
    return {
        "name": graph.name,
        "inputs": signature(graph, graph.inputs),
        "outputs": signature(graph, graph.outputs),
        "ops": graph.op_histogram(),
        "params": c.params,
        "macs": c.macs,
        "load": graph.notes,
        "groups": [g.as_dict(graph) for g in dg.groups],
        "prunable_groups": sum(g.prunable for g in dg.groups),
        "hidden_groups": sum(g.hidden_prunable for g in dg.groups),
        "frozen_groups": sum(not g.prunable and not g.hidden_prunable for g in dg.groups),
    }
