"""The code's structure: the back ends depend on one interface (``targets/backend.py``), not on
each other, and ``sparsec.api`` stays the façade of the pipeline modules.

Imports are read statically from the source (``ast``), so a cycle is found whether or not a
test happens to run the import. What counts as an import: ``import`` and ``from ... import``
statements anywhere in a module, at module level or inside a function (a function-level import
is a dependency that only runs later, and a circle of them is still a circle). What does not:
imports under ``if TYPE_CHECKING:`` (annotations only, never run). Importing ``a.b.c`` also
imports the packages ``a`` and ``a.b``, so those count as dependencies too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "sparsec"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: str) -> dict[str, Path]:
    """Every module of package ``root`` (``sparsec.targets``) by dotted name."""
    base = PACKAGE.parent.joinpath(*root.split("."))
    return {module_name(p): p for p in sorted(base.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules in ``known`` that the module ``name`` (at ``path``) imports, anywhere in its
    body except under ``if TYPE_CHECKING:``, with their parent packages."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets.add(mod)
            targets.update(f"{mod}.{a.name}" for a in node.names)   # a submodule by name
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out = set()
    for t in targets:
        parts = t.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix != name:
                out.add(prefix)
    return out


def import_graph(mods: dict[str, Path]) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        for dep in imported(path, name, set(mods)):
            g.add_edge(name, dep)
    return g


def cycles(g: nx.DiGraph) -> list[list[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]


def test_no_import_cycle_among_the_back_ends():
    g = import_graph(modules("sparsec.targets"))
    assert cycles(g) == []
    # the interface is below the back ends and the tuner; they do not reach each other
    for user in ("host", "cuda", "tuning"):
        assert g.has_edge(f"sparsec.targets.{user}", "sparsec.targets.backend"), user
    for a, b in (("host", "cuda"), ("cuda", "host"), ("host", "tuning"),
                 ("kernels.rewrite", "tuning")):
        assert not g.has_edge(f"sparsec.targets.{a}", f"sparsec.targets.{b}"), (a, b)
    # the package itself stays a leaf: the CLI imports it before any heavy work
    assert list(g.successors("sparsec.targets")) == []


def test_the_cycle_check_sees_function_level_imports(tmp_path):
    """The checker itself: a circle closed by an import inside a function is found, one closed
    only under TYPE_CHECKING is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from pkg import a\n")
    (pkg / "d.py").write_text("from . import c\n")
    mods = {}
    for p in sorted(pkg.glob("*.py")):
        parts = ["pkg"] + ([] if p.stem == "__init__" else [p.stem])
        mods[".".join(parts)] = p
    g = import_graph(mods)
    assert cycles(g) == [["pkg.a", "pkg.b"]]
    assert not g.has_edge("pkg.c", "pkg.a")
    assert g.has_edge("pkg.d", "pkg.c")


def test_no_import_cycle_among_the_pipeline_modules():
    """loading -> pruning -> compiling -> running, torch write-back beside: each step imports
    only the ones before it (``sparsec.api`` re-exports them all)."""
    names = ["loading", "pruning", "compiling", "running", "torch_writeback"]
    mods = {f"sparsec.{n}": PACKAGE / f"{n}.py" for n in names}
    g = import_graph(mods)
    assert cycles(g) == []
    assert not g.has_edge("sparsec.running", "sparsec.compiling")
    assert not g.has_edge("sparsec.pruning", "sparsec.compiling")


def test_api_is_the_facade_of_the_pipeline_modules():
    """Every name ``sparsec.api`` defined before it was split is still there, and is the same
    object as in the module that holds it now."""
    from sparsec import api, compiling, loading, pruning, running, torch_writeback

    homes = {
        loading: ["load", "capture", "inspect", "Log", "ModelLike", "_quiet"],
        pruning: ["prune", "PruneResult", "RECIPE_KEYS", "SEARCH_STEPS", "as_recipe",
                  "merge_recipe", "ratio_scaler", "_calibration", "_chunks", "_check_ratio",
                  "_check_patterns", "_check_structure", "_check_sparsity", "_search_ratio"],
        compiling: ["compile", "tune", "profile", "check_toolchain", "version",
                    "_dist_version"],
        running: ["run", "validate", "ValidationReport", "RTOL", "ATOL", "RTOL_BF16",
                  "ATOL_BF16", "BF16_MIN_COSINE", "BF16_MARGIN", "uses_bf16", "tolerance",
                  "device_rtol", "_compare", "_raise_if_mismatch", "_load_runner", "_runner",
                  "_run_package", "_library_failed"],
        torch_writeback: ["prune_module", "write_back", "_check_write_back", "_created_bias",
                          "_drop_removed_layers", "_renumber_layers", "_out_features",
                          "_heads_follow_weights", "_hidden_follows_weights"],
    }
    for module, names in homes.items():
        for n in names:
            assert getattr(api, n) is getattr(module, n), f"api.{n}"
    for n in ("Recipe", "Graph", "PassResult", "Cost", "InputShapes", "BadOptionError",
              "ValidationError", "SparsecError", "ToolchainError", "InvalidModelError"):
        assert hasattr(api, n), n
    import sparsec

    # the package's lazy names are the API's functions (no module shadows one)
    for n in sparsec._API:
        assert getattr(sparsec, n) is getattr(api, n), n
