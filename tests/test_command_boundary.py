"""The library imports no command line: argparse and the modules of `pursamere_fast.commands` are
imported only by `commands/` and `cli.py`; no module of the package imports a private name of
another; the package has no import cycle; every subcommand resolves.

Read from the source (every import statement, function-level ones included), as
tests/test_import_boundary.py checks the core by running it.
"""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from pursamere_fast import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pursamere_fast"
COMMAND_SIDE = ("pursamere_fast.commands", "pursamere_fast.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(imported module, imported name or None) of every import statement of the module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                yield target, alias.name


def _on_command_side(name: str) -> bool:
    return name == "pursamere_fast.cli" or name.startswith("pursamere_fast.commands")


def test_only_commands_import_argparse_or_a_command():
    bad = []
    for name, path in MODULES.items():
        if _on_command_side(name):
            continue
        for target, item in _imports(name, path):
            full = f"{target}.{item}" if item else target
            if target == "argparse" or _on_command_side(target) or _on_command_side(full):
                bad.append(f"{name} imports {full}")
    assert not bad, bad


def test_no_module_imports_a_private_name_of_another_module():
    bad = []
    for name, path in MODULES.items():
        for target, item in _imports(name, path):
            if item and item.startswith("_") and not item.startswith("__") and f"{target}.{item}" not in MODULES:
                bad.append(f"{name} imports {item} from {target}")
    assert not bad, bad


def test_package_has_no_import_cycle():
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for target, item in _imports(name, path):
            full = f"{target}.{item}" if item else target
            hit = full if full in MODULES else target
            # A module's own package (`from . import checks`) is its parent, not a dependency.
            if hit in MODULES and hit != name and not name.startswith(hit + "."):
                edges.add(hit)
        graph[name] = edges
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_resolves_and_takes_help(command, capsys):
    module, function = cli.COMMANDS[command]
    assert callable(getattr(importlib.import_module(f"pursamere_fast.commands.{module}"), function))
    try:
        code = cli.main([command, "--help"])
    except SystemExit as e:  # argparse's --help
        code = e.code
    assert code == 0
    assert f"pursamere-fast {command}" in capsys.readouterr().out


def test_the_package_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "pursamere_fast.cli", "--help"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0 and "summarise" in proc.stdout


def test_python_files_stay_under_600_lines():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").glob("*.py"), *(ROOT / "reference").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_results_hold_no_adversarial_examples():
    # Suite runs write them to their run directory (results/README.md says how to regenerate them).
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "results").rglob("adv") if p.is_dir()]
    assert not found, found
