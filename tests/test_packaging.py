"""What pyproject.toml promises: every third-party package our code imports is a declared
dependency (xxhash was imported but not declared), and the Python floor it states is the one the
README states and the code's syntax needs (it said 3.10 while the checkpoint code used 3.11's
hashlib.file_digest)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_prep", "pretrain", "tools")
OPTIONAL = {"flash_attn": "FlashAttention kernels, used when installed on a GPU machine (attention_backend auto/fa2)"}
NEWER_STDLIB = {"file_digest": 11, "tomllib": 11, "StrEnum": 11, "TaskGroup": 11, "add_note": 11,
                "ExceptionGroup": 11, "getLevelNamesMapping": 11, "exp2": 11, "cbrt": 11}
"""Standard-library names added in Python 3.11 (the ones code like ours reaches for)."""
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_packages() -> set[str]:
    """Top-level names of the packages imported anywhere in our code (module level or inside functions)."""
    names = set()
    for path in (p for package in PACKAGES for p in (REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in PACKAGES and n != "__future__"}


def test_every_imported_package_is_a_declared_dependency():
    declared = {_norm(re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0]) for d in PROJECT["dependencies"]}
    owners = packages_distributions()
    undeclared = {name: sorted(owners.get(name, [name])) for name in imported_packages() - set(OPTIONAL)
                  if not {_norm(d) for d in owners.get(name, [name])} & declared}
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"


def test_the_python_floor_is_stated_once_and_holds():
    floor = re.fullmatch(r">=3\.(\d+)", PROJECT["requires-python"].strip())
    assert floor, PROJECT["requires-python"]
    minor = int(floor[1])
    assert f"Python >= 3.{minor})" in (REPO / "README.md").read_text()
    assert sys.version_info[:2] >= (3, minor)
    newer = []
    for path in (p for package in PACKAGES for p in (REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path), feature_version=(3, minor))  # no newer syntax
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        newer += [f"{path.relative_to(REPO)}: {n}" for n in sorted(names) if NEWER_STDLIB.get(n, 0) > minor]
    assert not newer, f"Python 3.{minor} lacks: {newer}"
