"""The layers of docs/architecture.md, held to by the code's own imports.

Each module belongs to a layer; an import may only go down (to a lower layer) or
stay inside its own package. So the config schema never learns about strategies,
components never reach into the server, and no import circle can form. The CLI
alone imports inside functions, to load a command's modules only when it runs.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fedelta"

LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("config",),
    ("tensors", "seeding", "registry"),
    ("lora", "deltas", "protocol", "assets", "gguf_cache", "chat_data", "training"),
    ("data",),
    ("tasks", "compression"),
    ("models", "privacy"),
    ("merging",),
    ("strategies",),
    ("build",),
    ("compatibility",),
    ("client", "server", "deployment"),
    ("simulations",),
    ("cli",),
    ("__main__",),
]
"""Bottom to top: the first part of each module's name below ``fedelta``."""
RANK = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = set(_modules())


def _unit(module: str) -> str:
    """The layer unit of a module: its package, or the module itself at the top level."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported fedelta module, inside a function)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {
        id(node)
        for func in ast.walk(tree)
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(func)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from fedelta import protocol`` imports the module fedelta.protocol
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            names = sorted(submodules & MODULES) or [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(name, id(node) in nested) for name in names if name.startswith("fedelta.")]
    return found


def test_every_module_has_a_layer():
    assert {_unit(m) for m in _modules()} - {""} <= set(RANK)


def test_imports_only_go_down_or_stay_in_their_package():
    upward = []
    for module, path in _modules().items():
        here = _unit(module)
        if not here:
            continue
        for target, _ in _imports(path):
            there = _unit(target)
            if there and there != here and RANK[there] >= RANK[here]:
                upward.append(f"{module} imports {target}")
    assert not upward, "\n".join(upward)


def test_only_the_cli_imports_inside_functions():
    nested = [
        f"{module} imports {target} inside a function"
        for module, path in _modules().items()
        if _unit(module) != "cli"
        for target, inside in _imports(path)
        if inside
    ]
    assert not nested, "\n".join(nested)


def test_no_module_grows_past_500_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_no_file_holds_an_unresolved_merge_conflict():
    repo = ROOT.parent
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    marked = []
    for name in listed:
        path = repo / name
        if path.suffix in (".py", ".md", ".toml", ".yml", ".cfg", ".txt") and path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            if any(line.startswith(("<<<<<<< ", ">>>>>>> ")) for line in lines):
                marked.append(name)
    assert not marked
