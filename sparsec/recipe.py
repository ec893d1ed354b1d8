"""Recipes: a compression recipe as a file you can review, keep and re-run.

A recipe holds the pruning options that ``sparsec prune`` / ``compile`` take as flags and
``sparsec.prune`` / ``compile`` / ``prune_module`` as keywords, as plain data, checked on
construction (a bad key or value is a ``BadOptionError`` naming it). As a TOML file:

    # minilm.toml
    [prune]
    ratio = 0.25
    criterion = "fluctuation"
    reconstruct = true
    sensitivity = true
    ignore = ["embeddings.*"]

    [prune.layer_ratios]
    "encoder.layer.5.*" = 0.1

``sparsec compile MODEL --recipe minilm.toml -o DIR`` runs it; flags given beside it override
its keys. The package's manifest records the recipe that ran, and ``sparsec inspect DIR
--recipe`` prints it as such a file, to run again.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from sparsec.errors import BadOptionError


@dataclass(frozen=True)
class Recipe:
    """The options of one pruning run (see ``sparsec.prune`` for what each does)."""

    ratio: float = 0.0
    criterion: str = "l2"
    reconstruct: bool = False
    round_to: int | None = None
    head_ratio: float | None = None
    hidden_ratio: float = 0.0
    rotate: bool = False
    remove_layers: int = 0
    replace_linear: bool = False
    remove_attention: int = 0
    fuse_ffn: int = 0
    sensitivity: bool = False
    sparsity: float = 0.0
    sparsity_pattern: str = "unstructured"
    sparsity_criterion: str = "magnitude"
    lamp: bool = False
    reorder: bool = False
    layer_ratios: dict[str, float] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    remove_dead: bool = False
    calib_mask: str | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = _TYPES[f.name]
            if value is None and f.default is None:
                continue
            if f.name == "ignore":
                if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                    _bad(f.name, value, "a list of glob patterns")
                object.__setattr__(self, "ignore", tuple(value))
            elif f.name == "layer_ratios":
                if not isinstance(value, dict) or not all(
                        isinstance(k, str) and _is_ratio(v) for k, v in value.items()):
                    _bad(f.name, value, "a table of glob pattern = ratio in [0, 1)")
                object.__setattr__(self, "layer_ratios", {k: float(v) for k, v in value.items()})
            elif want is bool:
                if not isinstance(value, bool):
                    _bad(f.name, value, "true or false")
            elif want is int:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    _bad(f.name, value, "a whole number >= 0")
            elif want is str:
                if not isinstance(value, str):
                    _bad(f.name, value, "a string")
            elif f.name.endswith("ratio") or f.name == "sparsity":
                if not _is_ratio(value):
                    _bad(f.name, value, "a number in [0, 1)")
                object.__setattr__(self, f.name, float(value))
            elif f.name == "max_drop":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    _bad(f.name, value, "a number > 0")
                object.__setattr__(self, f.name, float(value))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        """From a mapping of option names (a TOML file's ``[prune]`` table); an unknown key is
        an error that names it and the known ones."""
        if not isinstance(data, dict):
            raise BadOptionError(f"{where}: expected a table of options")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise BadOptionError(f"{where}: unknown key '{key}' (known: "
                                     f"{', '.join(sorted(known))})")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Recipe":
        """A TOML file whose ``[prune]`` table holds the options."""
        try:
            import tomllib
        except ModuleNotFoundError:                                  # Python 3.10
            import tomli as tomllib
        from pathlib import Path

        p = Path(path)
        if not p.is_file():
            from sparsec.errors import InputNotFoundError
            raise InputNotFoundError(f"recipe file not found: {p}")
        try:
            doc = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BadOptionError(f"{p}: not a valid TOML file ({e})") from None
        extra = sorted(set(doc) - {"prune"})
        if extra:
            raise BadOptionError(f"{p}: unknown table '{extra[0]}' (a recipe has [prune])")
        return cls.from_dict(doc.get("prune", {}), where=str(p))

    @classmethod
    def of_keywords(cls, options: dict[str, Any]) -> "Recipe":
        """From keyword values the API has already checked (numpy numbers, truthy flags and
        any sequence of patterns become the plain types a file holds)."""
        plain = {}
        for key, value in options.items():
            want = _TYPES[key]
            if value is None and want in (dict, tuple):
                plain[key] = want()
            elif value is None or want in (str, dict, tuple):
                plain[key] = value
            elif want is bool:
                plain[key] = bool(value)
            else:
                plain[key] = want(value)
        return cls.from_dict(plain)

    def updated(self, **changes: Any) -> "Recipe":
        """This recipe with ``changes`` applied (checked again)."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise BadOptionError(f"unknown recipe key '{bad[0]}'")
        return replace(self, **changes)

    # ------------------------------------------------------------------ output
    def options(self) -> dict[str, Any]:
        """Every option as the keywords ``sparsec.prune`` takes."""
        out = asdict(self)
        out["ignore"] = list(self.ignore)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from their defaults (what a file needs to say)."""
        default = Recipe()
        return {k: v for k, v in self.options().items()
                if v != getattr(default, k) and not (k == "ignore" and not v)}

    def to_toml(self) -> str:
        """The recipe as a TOML file (``from_file`` reads it back to an equal recipe)."""
        plain = {k: v for k, v in self.to_dict().items() if k != "layer_ratios"}
        lines = ["[prune]"] + [f"{k} = {_toml(v)}" for k, v in plain.items()]
        if self.layer_ratios:
            lines += ["", "[prune.layer_ratios]"]
            lines += [f"{_toml(k)} = {_toml(v)}" for k, v in self.layer_ratios.items()]
        return "\n".join(lines) + "\n"


_TYPES = {"ratio": float, "criterion": str, "reconstruct": bool, "round_to": int,
          "head_ratio": float, "hidden_ratio": float, "rotate": bool, "remove_layers": int,
          "replace_linear": bool, "remove_attention": int, "fuse_ffn": int, "sensitivity": bool,
          "sparsity": float, "sparsity_pattern": str, "sparsity_criterion": str, "lamp": bool,
          "reorder": bool, "layer_ratios": dict, "ignore": tuple, "remove_dead": bool,
          "calib_mask": str, "max_drop": float}


def _is_ratio(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 <= v < 1.0


def _bad(key: str, value: Any, want: str) -> None:
    raise BadOptionError(f"recipe key '{key}' takes {want}, not {value!r}")


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")
