"""Compile models while building a Python package (wheel or sdist build, ``pip install .``).

In the project's ``setup.py``::

    from setuptools import setup
    from sparsec.deploy.setuptools import build_py
    setup(cmdclass={"build_py": build_py})

and in its ``pyproject.toml`` (``sparsec`` in ``[build-system] requires``), one table per model::

    [tool.sparsec.models.digits]
    src = "models/digits_cnn.onnx"      # relative to the project root
    package = "myapp"                   # the compiled package goes to myapp/digits/
    target = "host"                     # default: host
    args = ["--ratio", "0.3", "--calib", "models/calib.npz", "--reconstruct"]

The command line is exactly ``sparsec compile SRC --target T --name NAME -o DIR ARGS``, so a
model builds the same here as from the shell or CMake. At run time ``sparsec.run(dir, inputs)``
(or the TVM runtime directly) loads it from the installed package.
"""

from __future__ import annotations

from pathlib import Path

from setuptools.command.build_py import build_py as _build_py

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def models(project: Path) -> dict[str, dict]:
    """The ``[tool.sparsec.models]`` tables of ``project/pyproject.toml``."""
    path = project / "pyproject.toml"
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f).get("tool", {}).get("sparsec", {}).get("models", {})


def command(name: str, spec: dict, project: Path, out: Path) -> list[str]:
    """The ``sparsec`` arguments that compile model ``name`` into ``out``."""
    unknown = set(spec) - {"src", "package", "target", "args"}
    if unknown or "src" not in spec or "package" not in spec:
        raise ValueError(f"[tool.sparsec.models.{name}] needs 'src' and 'package' (and may have "
                         f"'target', 'args'); unknown: {sorted(unknown)}")
    return ["-q", "compile", str(project / spec["src"]), "--target", spec.get("target", "host"),
            "--name", name, "-o", str(out), *map(str, spec.get("args", []))]


class build_py(_build_py):  # noqa: N801 - setuptools' command names are lower case
    """setuptools' build_py, then ``sparsec compile`` for each model of pyproject.toml."""

    def run(self) -> None:
        super().run()
        from setuptools.errors import ExecError

        from sparsec.cli import main

        project = Path.cwd()
        for name, spec in models(project).items():
            out = Path(self.build_lib, *str(spec.get("package", "")).split("."), name)
            self.announce(f"sparsec: compiling {name} -> {out}", level=2)
            code = main(command(name, spec, project, out))
            if code != 0:
                raise ExecError(f"sparsec compile of model '{name}' failed (exit {code})")
