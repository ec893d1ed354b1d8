"""The documentation site: it builds with every warning an error, what it generates from the code
covers every command, flag and pass, and every command in the tutorials runs.

Tutorial pages follow three rules, which `page_steps` reads:

* a ```bash block is run (in order, in one scratch directory holding a copy of examples/);
* a block whose first line is ``# save as: NAME`` is written to NAME before the next step;
* a ```text block right after a bash block is that block's output: each of its lines must
  appear in what the commands printed, with every word that holds a digit (sizes, timings,
  figures) matching any word and ``...`` matching anything.

A command that cannot run in a test is marked ``<!-- not run: REASON -->`` on the line above
its block, and the page must say so in words too.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO
from test_deploy import need

DOCS = REPO / "docs"
TUTORIALS = ["getting-started.md", "tutorials/prune-cnn.md", "tutorials/transformer.md",
             "tutorials/deploy-aarch64.md", "tutorials/sparse-kernels.md"]
# programs a page needs beyond Python: missing, its test skips here and fails under CI
NEEDS = {"tutorials/deploy-aarch64.md": ("cmake", "g++", "aarch64-linux-gnu-g++", "qemu-aarch64")}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*$")
SAVE_AS = re.compile(r"#\s*save as:\s*(\S+)")
OUTPUT_FLAGS = re.compile(r"(?:^|\s)(?:-o|--outputs|--prefix|-B)\s+(\S+)")


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- tutorial steps
@dataclass
class Step:
    kind: str                      # "run" or "save"
    text: str
    line: int
    path: str = ""
    expect: list[str] = field(default_factory=list)


def page_steps(page: str) -> tuple[list[Step], list[str]]:
    """The steps of a tutorial page, and the reasons of the blocks marked as not run."""
    text = (DOCS / page).read_text()
    steps: list[Step] = []
    not_run: list[str] = []
    last_end = 0
    for m in FENCE.finditer(text):
        lang, body = m.group(1), m.group(2)
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        between = text[last_end:m.start()]
        last_end = m.end()
        first = body.split("\n", 1)[0]
        if NOT_RUN.search(before):
            not_run.append(NOT_RUN.search(before).group(1))
        elif SAVE_AS.match(first):
            steps.append(Step("save", body, line, path=SAVE_AS.match(first).group(1)))
        elif lang == "bash":
            steps.append(Step("run", body, line))
        elif lang == "text" and steps and steps[-1].kind == "run" and not between.strip():
            steps[-1].expect = body.splitlines()
        elif lang in ("python", "sh", "shell", "console"):
            raise AssertionError(f"{page}:{line}: a ```{lang} block that is neither run, saved "
                                 f"nor marked <!-- not run: ... -->")
    return steps, not_run


def line_pattern(line: str) -> re.Pattern:
    """A shown output line as a pattern: words with digits match any word, ``...`` anything,
    runs of spaces any run of spaces, a table rule (``-----``) a rule of any width (a column
    widens when a timing gains a digit)."""
    words = []
    for word in line.split():
        if set(word) == {"-"}:
            words.append("-+")
        elif "..." in word:
            words.append(".*".join(re.escape(part) for part in word.split("...")))
        elif any(c.isdigit() for c in word):
            words.append(r"\S+")
        else:
            words.append(re.escape(word))
    return re.compile(r"\s+".join(words))


def missing_lines(shown: list[str], output: str) -> list[str]:
    return [ln for ln in shown if ln.strip() and ln.strip() != "..."
            and not ln.startswith("$ ") and not line_pattern(ln).search(output)]


def test_output_lines_match_numbers_loosely_and_words_exactly():
    out = "pass channel-prune: params 56,458 -> 31,978 (-43.4%), lossy, cosine 0.98500\n"
    assert not missing_lines(["pass channel-prune: params 1 -> 2 (-9.9%), lossy, cosine 0.5"], out)
    assert missing_lines(["pass channel-prune: params 1 -> 2 (-9.9%), exact, cosine 0.5"], out)
    assert not missing_lines(["pass channel-prune: ..., cosine 0.9"], out)
    assert missing_lines(["library matches ONNX Runtime"], out)
    table = "kernel        kind\n------------  ----\ndense_packed  sparsec\n"
    assert not missing_lines(["kernel  kind", "------  ----"], table)
    assert missing_lines(["------  ----  ----"], table)


def test_page_steps_reads_the_conventions(tmp_path, monkeypatch):
    page = tmp_path / "p.md"
    page.write_text("<!-- not run: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n"
                    "```toml\n# save as: r.toml\n[prune]\n```\n\n```bash\necho hi\n```\n\n"
                    "```text\nhi\n```\n\n```python\nprint(1)\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", tmp_path)
    with pytest.raises(AssertionError, match="neither run, saved"):
        page_steps("p.md")
    page.write_text(page.read_text().replace("```python\nprint(1)\n```\n", ""))
    steps, not_run = page_steps("p.md")
    assert not_run == ["needs a GPU"]
    assert [(s.kind, s.path) for s in steps] == [("save", "r.toml"), ("run", "")]
    assert steps[1].expect == ["hi"]




@pytest.mark.slow
@pytest.mark.parametrize("page", TUTORIALS)
def test_tutorial_commands_run(page, tmp_path):
    """Every command of the page, in order, in a scratch copy of examples/: exit 0, the outputs
    it names exist, and the output shown on the page is what the commands print."""
    need(*NEEDS.get(page, ()))
    steps, not_run = page_steps(page)
    assert any(s.kind == "run" for s in steps), f"{page} has no command to run"
    for reason in not_run:
        assert "not run" in (DOCS / page).read_text().replace("<!-- not run", ""), \
            f"{page}: a block is not run ({reason}) but the page does not say so"
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get(
               "PYTHONPATH")])]), "HF_HUB_OFFLINE": "1"}
    for step in steps:
        if step.kind == "save":
            (tmp_path / step.path).write_text(step.text)
            continue
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step.text], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=600)
        where = f"{page}:{step.line}"
        assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{proc.stdout[-4000:]}"
        lines = step.text.replace("\\\n", " ").splitlines()
        for cmd in lines:
            for out in OUTPUT_FLAGS.findall(cmd):
                removed = any(ln.strip().startswith("rm ") and out in ln for ln in lines)
                assert removed or (tmp_path / out).exists(), f"{where}: {out} was not written"
        missing = missing_lines(step.expect, proc.stdout)
        assert not missing, (f"{where}: the page shows lines the commands did not print:\n"
                             + "\n".join(missing) + "\n--- printed:\n" + proc.stdout[-4000:])


# --------------------------------------------------------------------------- the site
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(REPO / "mkdocs.yml"), "-d", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


def page_text(site: Path, name: str) -> str:
    html = (site / name / "index.html").read_text()
    return re.sub(r"<[^>]+>", "", html).replace("&quot;", '"').replace("&#39;", "'")


def test_site_builds_with_warnings_as_errors(site):
    for page in ("index.html", "getting-started/index.html", "cli/index.html",
                 "api/index.html", "recipes/index.html", "passes/index.html",
                 "results/models/index.html", "results/models.svg"):
        assert (site / page).is_file(), page


def cli_parser():
    from sparsec.cli import build_parser

    return build_parser()


def test_cli_reference_lists_every_command_and_flag(site):
    hooks = load_hooks()
    text = page_text(site, "cli")
    for name, _, sp in hooks.subcommands(cli_parser()):
        assert f"sparsec {name}" in text, name
        for action in sp._actions:
            for flag in action.option_strings:
                assert flag in text, f"sparsec {name} {flag}"
    assert "validation failed" in text and "missing toolchain" in text     # the exit codes
    # the overview written by hand names every command too
    overview = (DOCS / "cli.md").read_text().split("## Exit codes")[0]
    for name, _, _ in hooks.subcommands(cli_parser()):
        assert f"`sparsec {name}" in overview, f"cli.md's overview lacks sparsec {name}"


def test_cli_reference_renders_a_new_flag():
    """What the page shows comes from the parser, so a new flag appears without an edit."""
    parser = cli_parser()
    sp = dict((n, p) for n, _, p in load_hooks().subcommands(parser))["prune"]
    sp.add_argument("--brand-new", metavar="X", default=3, help="a flag added | just now")
    text = load_hooks().render_cli(parser)
    assert r"| `--brand-new` `X` | a flag added \| just now; default `3` |" in text


def pass_classes() -> dict[str, type]:
    """Every pass in sparsec/passes/: classes with a ``run`` method, a ``name`` and ``exact``."""
    import importlib
    import pkgutil

    import sparsec.passes

    found = {}
    for info in pkgutil.iter_modules(sparsec.passes.__path__):
        module = importlib.import_module(f"sparsec.passes.{info.name}")
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and callable(getattr(cls, "run", None)) \
                    and isinstance(getattr(cls, "name", None), str) \
                    and isinstance(getattr(cls, "exact", None), bool):
                found[cls_name] = cls
    return found


def test_passes_page_documents_every_pass_and_flag(site):
    passes = pass_classes()
    assert len(passes) >= 7
    rows = {m.group(2): m.group(0) for m in re.finditer(
        r"^\| \d+ \| \[`([\w-]+)`\][^|]*\| `(\w+)` \|.*$", (DOCS / "passes.md").read_text(), re.M)}
    for cls_name, cls in passes.items():
        assert cls_name in rows, f"passes.md has no row for {cls_name}"
        assert f"`{cls.name}`" in rows[cls_name]
        assert f"| {'exact' if cls.exact else 'lossy'} |" in rows[cls_name], cls_name
    text = page_text(site, "passes")
    prune = dict((n, p) for n, _, p in load_hooks().subcommands(cli_parser()))["prune"]
    for action in prune._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--quiet", "--debug", "--output"):
                assert flag in text, f"passes page does not mention {flag}"


def test_recipe_page_lists_every_key(site):
    from dataclasses import fields

    from sparsec.recipe import Recipe

    text = page_text(site, "recipes")
    for f in fields(Recipe):
        assert f.name in text and load_hooks().recipe_flag(f.name) in text, f.name


def test_api_reference_is_generated_from_the_code(site):
    text = page_text(site, "api")
    import sparsec

    for name in ("prune", "prune_module", "compile", "validate", "run", "inspect", "load",
                 "capture"):
        assert name in sparsec.__all__
        assert f"sparsec.api.{name}" in text, name
    # a sentence of each docstring, so the page is the code's, not a copy
    assert "Prune the least important channels of every channel group" in text
    assert "Prune a torch.nn.Module" in text


def test_readme_tour_commands_are_run_by_the_tutorials():
    """The README shows commands and their output; each command shown is one that a tutorial
    page runs, so the tour cannot drift from what works."""
    readme = (REPO / "README.md").read_text()
    shown = [ln[2:].strip() for ln in readme.splitlines() if ln.startswith("$ sparsec")]
    assert len(shown) >= 3, "the README's tour shows no commands"
    run = set()
    for page in TUTORIALS:
        for step in page_steps(page)[0]:
            if step.kind == "run":
                run |= {" ".join(ln.split()) for ln in step.text.replace("\\\n", " ").splitlines()}
    for cmd in shown:
        assert " ".join(cmd.split()) in run, f"README shows '{cmd}', which no tutorial runs"

