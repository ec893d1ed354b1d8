"""sparsec: a compiler for pruned and sparse neural networks.

The public API (``load``, ``capture``, ``inspect``, ``prune``, ``prune_module``,
``compile``, ``run``, ``validate``) lives in ``sparsec.api`` (``Recipe`` in ``sparsec.recipe``)
and is imported lazily, so that
importing sparsec (and ``sparsec --help``) stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = ("load", "capture", "inspect", "prune", "prune_module", "compile", "run", "validate")
__all__ = [*_API, "Recipe", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from sparsec import api
        return getattr(api, name)
    if name == "Recipe":
        from sparsec.recipe import Recipe
        return Recipe
    raise AttributeError(f"module 'sparsec' has no attribute {name!r}")
