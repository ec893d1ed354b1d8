"""The README opens with the two set-up commands, and CI runs the same test command."""

from __future__ import annotations

import re

from conftest import REPO


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_opens_with_main_job_and_test_command():
    main, tests = readme_commands()[:2]
    assert "sparsec compile examples/" in main and "sparsec validate" in main
    assert "pytest" in tests
    for cmd in (main, tests):
        assert cmd.startswith("python3 -m venv .venv") and "-c constraints.txt" in cmd


def test_ci_runs_the_readme_test_command():
    tests = readme_commands()[1]
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()
