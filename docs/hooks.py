"""MkDocs hooks: the parts of the site that are generated from the code, so they cannot go stale.

* ``cli.md``: the marker ``<!-- sparsec:cli -->`` becomes the reference of every command and
  flag, rendered from the argparse parser in ``sparsec/cli.py``; ``<!-- sparsec:exit-codes -->``
  becomes the exit-code table from ``sparsec/errors.py``.
* ``results/*.md`` (and the plots beside them): the tables the benchmark scripts write to
  ``benchmarks/results/``, published as they are.

``tests/test_docs.py`` imports this file to check what it renders.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CLI_MARKER = "<!-- sparsec:cli -->"
EXIT_MARKER = "<!-- sparsec:exit-codes -->"
RECIPE_MARKER = "<!-- sparsec:recipe-keys -->"


# --------------------------------------------------------------------------- rendering
def _escape(text: str) -> str:
    """Text for a Markdown table cell: pipes and asterisks escaped outside `code spans`."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):          # even parts are outside code spans
        parts[i] = (parts[i].replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
                    .replace("<", "&lt;").replace("_", "\\_"))
    return "`".join(parts).replace("\n", " ")


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.option_strings and action.nargs != 0:
        names += f" `{action.metavar or action.dest.upper()}`"
    return names


def _details(action: argparse.Action) -> str:
    parts = [(action.help or "").strip()]
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        parts.append("choices: " + ", ".join(f"`{c}`" for c in action.choices))
    if action.required and action.option_strings:
        parts.append("required")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in parts[0].lower():
        parts.append("repeatable")
    default = action.default
    if (action.option_strings and action.nargs != 0 and default not in (None, [], "")
            and default is not argparse.SUPPRESS and "default" not in parts[0].lower()):
        parts.append(f"default `{default}`")
    return _escape("; ".join(p for p in parts if p))


def _usage(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "92"                   # argparse wraps usage at the terminal width
    try:
        usage = parser.format_usage().strip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    # drop "usage: " and the indent argparse gave the continuation lines to match it
    return "\n".join(line[7:] if line.startswith("       ") else line.removeprefix("usage: ")
                     for line in usage.splitlines())


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every subcommand, in the parser's order."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    return [(name, helps.get(name, ""), sp) for name, sp in sub.choices.items()]


def render_cli(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown reference of the ``sparsec`` command line: a summary table of the commands,
    then one section per command with its usage and a table of its arguments."""
    if parser is None:
        sys.path.insert(0, str(REPO))
        from sparsec.cli import build_parser

        parser = build_parser()
    commands = subcommands(parser)
    out = [f"```text\n{_usage(parser)}\n```", "", _escape(parser.description or ""), "",
           "| command | what it does |", "| --- | --- |"]
    out += [f"| [`sparsec {name}`](#sparsec-{name}) | {_escape(text)} |"
            for name, text, _ in commands]
    out += ["", "Global flags, accepted before or after the command:", "",
            "| flag | meaning |", "| --- | --- |"]
    out += [f"| {_flag(a)} | {_details(a)} |" for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]
    for name, text, sp in commands:
        out += ["", f"### sparsec {name}", "", _escape(text) + ".", "",
                f"```text\n{_usage(sp)}\n```", "", "| argument | meaning |", "| --- | --- |"]
        out += [f"| {_flag(a)} | {_details(a)} |" for a in sp._actions
                if not isinstance(a, argparse._HelpAction)
                and a.dest not in ("quiet", "debug")]
    return "\n".join(out) + "\n"


def render_exit_codes() -> str:
    """The exit codes: 0, 2 (argparse), every ``SparsecError`` kind, 70 and 130."""
    sys.path.insert(0, str(REPO))
    from sparsec import errors
    from sparsec.cli import INTERNAL_ERROR

    rows = [(0, "success", "")]
    rows.append((2, "usage", "a flag or argument argparse refuses; also `sparsec` alone"))
    for cls in sorted(errors.SparsecError.__subclasses__(), key=lambda c: c.exit_code):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append((cls.exit_code, cls.kind, f"`{cls.__name__}` {doc}".strip()))
    rows.append((INTERNAL_ERROR, "internal error", "a bug in sparsec: please report it with "
                 "the `--debug` output"))
    rows.append((130, "interrupted", "Ctrl-C"))
    rows.append((141, "output closed", "the program reading the output left "
                 "(`sparsec inspect ... | head`)"))
    lines = ["| exit code | meaning | details |", "| ---: | --- | --- |"]
    lines += [f"| {code} | {kind} | {_escape(what)} |" for code, kind, what in rows]
    return "\n".join(lines) + "\n"


def recipe_flag(key: str) -> str:
    """The ``prune`` / ``compile`` flag a recipe key stands for."""
    return "--layer-ratio" if key == "layer_ratios" else "--" + key.replace("_", "-")


def render_recipe_keys() -> str:
    """Every key of ``sparsec.recipe.Recipe``: its type, default, flag and the flag's help."""
    import dataclasses

    sys.path.insert(0, str(REPO))
    from sparsec.cli import build_parser
    from sparsec.recipe import _TYPES, Recipe

    prune = dict((n, sp) for n, _, sp in subcommands(build_parser()))["prune"]
    flags = {s: a for a in prune._actions for s in a.option_strings}
    kinds = {float: "number", int: "whole number", bool: "true / false", str: "string",
             dict: "table", tuple: "list of strings"}
    lines = ["| key | value | default | flag | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(Recipe):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            shown = "true" if default else "false"
        elif isinstance(default, (dict, tuple)):
            shown = "{}" if isinstance(default, dict) else "[]"
        else:
            shown = "(none)" if default is None else default
        flag = recipe_flag(f.name)
        action = flags[flag]             # a key without a flag is a bug the build reports
        lines.append(f"| `{f.name}` | {kinds[_TYPES[f.name]]} | `{shown}` | `{flag}` | "
                     f"{_escape(action.help or '')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- MkDocs hooks
def on_files(files, config):
    """Publish ``benchmarks/results/`` under ``results/``."""
    from mkdocs.structure.files import File

    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".md", ".svg"):
            files.append(File.generated(config, f"results/{path.name}",
                                        abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files):
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, render_cli())
    if RECIPE_MARKER in markdown:
        markdown = markdown.replace(RECIPE_MARKER, render_recipe_keys())
    if EXIT_MARKER in markdown:
        markdown = markdown.replace(EXIT_MARKER, render_exit_codes())
    return markdown

