"""The sparsec IR: ``Graph``/``Node``/``Value`` over the core op set (``ops``)."""

from sparsec.ir.graph import Graph, Node, Value

__all__ = ["Graph", "Node", "Value"]
