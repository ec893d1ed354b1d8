"""sparsec's one graph IR: a static-shaped dataflow graph over the core op set.

Nodes use ONNX operator semantics (op type, attributes, opset) restricted to the core op set in
``sparsec.ir.ops``. Every tensor is a named ``Value`` with a concrete shape and dtype; weights are
numpy arrays in ``Graph.initializers``. Analysis and passes are written against this class only;
frontends produce it and back ends consume it.

The graph is a plain container: passes copy it (``Graph.copy``) and edit the copy, never the input.
Weights loaded from ONNX are read-only numpy views; the surgery replaces arrays
(``set_initializer``) rather than writing into them.
"""

from __future__ import annotations

import copy as _copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np


@dataclass
class Value:
    """A tensor flowing through the graph: name, static shape, numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass
class Node:
    """One operator application. ``attrs`` holds plain Python values (ints, floats, bytes, lists,
    numpy arrays for tensor attributes); ``attr_types`` remembers ONNX attribute types so that
    empty lists round-trip exactly."""

    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    domain: str = ""
    attr_types: dict[str, int] = field(default_factory=dict)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


@dataclass
class Graph:
    """A whole model. ``values`` maps every tensor name (inputs, intermediates, outputs) to its
    ``Value``; initializers are values too (their shape mirrors the array)."""

    name: str
    inputs: list[str]
    outputs: list[str]
    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    values: dict[str, Value]
    opsets: dict[str, int] = field(default_factory=lambda: {"": 17})
    ir_version: int = 10
    producer: str = "sparsec"
    metadata: dict[str, str] = field(default_factory=dict)
    #: what the frontend did on load (e.g. ``{"normalize": {...}}``); not written to files
    notes: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    def value(self, name: str) -> Value:
        return self.values[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.values[name].shape

    def is_param(self, name: str) -> bool:
        return name in self.initializers

    def producers(self) -> dict[str, Node]:
        return {out: n for n in self.nodes for out in n.outputs if out}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    users.setdefault(i, []).append(n)
        return users

    def op_histogram(self) -> dict[str, int]:
        return dict(sorted(Counter(n.op_type for n in self.nodes).items()))

    def param_count(self) -> int:
        """Number of floating-point weight elements (shape constants are not parameters)."""
        return int(sum(a.size for a in self.initializers.values() if a.dtype.kind == "f"))

    def iter_values(self, names: list[str]) -> Iterator[Value]:
        return (self.values[n] for n in names)

    # ------------------------------------------------------------------ edits
    def copy(self, arrays: bool = True) -> "Graph":
        """Deep copy: arrays, nodes and values are all fresh, so edits never reach the original.
        ``arrays`` False shares the weight arrays (a billion-parameter model is not copied):
        for a copy whose weights are only ever replaced (``set_initializer``), never written."""
        return Graph(
            name=self.name,
            inputs=list(self.inputs),
            outputs=list(self.outputs),
            nodes=[_copy.deepcopy(n) for n in self.nodes],
            initializers={k: v.copy() if arrays else v for k, v in self.initializers.items()},
            values={k: Value(v.name, tuple(v.shape), v.dtype) for k, v in self.values.items()},
            opsets=dict(self.opsets),
            ir_version=self.ir_version,
            producer=self.producer,
            metadata=dict(self.metadata),
            notes=_copy.deepcopy(self.notes),
        )

    def set_initializer(self, name: str, array: np.ndarray) -> None:
        self.initializers[name] = array
        self.values[name] = Value(name, tuple(int(d) for d in array.shape), array.dtype.name)
