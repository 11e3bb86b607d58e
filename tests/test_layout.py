"""The package's shape stays what ARCHITECTURE.md describes: small files, short functions,
every subpackage shipped, and no task switch outside launcher/tasks/."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "launcher"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_file_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_60_lines():
    long = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_subpackage_is_shipped():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_no_task_switch_outside_tasks():
    """Which task a recipe trains is asked in launcher/tasks/ only (and the recipe's own
    validation); everything else goes through task_for(recipe) or the TASKS table."""
    switch = re.compile(r"\btask\s*[!=]=|\btask\s+(not\s+)?in\s*\(")
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in modules()
        if "tasks" not in p.parts and p.name != "schema.py"
        for i, line in enumerate(p.read_text().splitlines(), start=1)
        if switch.search(line)
    ]
    assert not found, f"task switches outside launcher/tasks/: {found}"


def test_parsers_only_in_cli():
    """Every parser of ``ftlaunch`` is in launcher/cli/; the layers below take typed arguments
    (launcher/data/synthetic.py is the ``python -m`` script that regenerates the test data)."""
    found = [
        str(p.relative_to(ROOT))
        for p in modules()
        if "cli" not in p.relative_to(PACKAGE).parts[:1]
        and p.name != "synthetic.py"
        and re.search(r"\bargparse\b|\.add_argument\(", p.read_text())
    ]
    assert not found, f"argparse outside launcher/cli/: {found}"


HEAVY = ("torch", "transformers", "datasets", "deepspeed", "peft", "pandas")
UNTIL_RAY_STARTS = """
import sys
import launcher.cli, launcher.cli.commands, launcher.driver.launch
from launcher.driver import locations, ray_session
from launcher.recipe import load_recipe
print(" ".join(m for m in {heavy!r} if m in sys.modules))
"""


def test_what_the_launch_runs_before_it_starts_ray_imports_no_ml_library():
    """``ftlaunch train`` starts Ray (seconds of waiting on its processes) while the driver
    validates; everything before that point must stay cheap. Importing torch or transformers
    there (1-3 s on 2 cores) puts it back in front of ``ray.init``."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", UNTIL_RAY_STARTS.format(heavy=HEAVY)], cwd=ROOT,
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert done.stdout.split() == [], done.stdout
