"""The layering the docs promise (docs/architecture.md): data_prep -> pretrain -> tools, no import
cycle between our modules (annotations and package `__init__`s included), no citation of a reference
file outside the repository, and the parallel layout computed in one place (pretrain/layout.py,
`Layout`, a leaf that imports neither torch nor the config)."""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_prep", "pretrain", "tools")
LAYER = {"data_prep": 0, "pretrain": 1, "tools": 2}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> set[str]:
    """Our modules imported anywhere in `path`: at module level, inside functions, and under
    `if TYPE_CHECKING:` (an import for annotations only is still a dependency of the design), each
    with the packages above it (importing `a.b.c` runs `a/b/__init__.py` first)."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        names = [".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)]
        found |= {n for n in names if n.split(".")[0] in packages}
    return found


def our_modules(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}


def import_cycles(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Every import cycle among the modules of `packages` under `root`, as "a -> b -> a"."""
    modules = our_modules(root, packages)
    graph = {name: {m for m in imports(path, root, packages) if m in modules and m != name}
             for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_upward_import():
    upward = []
    for name, path in our_modules().items():
        for imported in imports(path):
            if LAYER[imported.split(".")[0]] > LAYER[name.split(".")[0]]:
                upward.append(f"{name} imports {imported}")
    assert not upward, "data_prep -> pretrain -> tools only:\n" + "\n".join(upward)


def test_no_import_cycle():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("via", ["TYPE_CHECKING", "function", "package"])
def test_a_planted_cycle_is_reported(tmp_path, via):
    """The detector sees a cycle closed by an annotation-only import, by an import inside a
    function, and through a package's `__init__` (importing pkg.sub.x runs pkg/sub/__init__.py)."""
    pkg = tmp_path / "planted"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from planted import a\n")  # reached only through b's import
    (pkg / "sub" / "x.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("from planted import b\n")
    (pkg / "b.py").write_text({
        "TYPE_CHECKING": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from planted.a import A\n",
        "function": "def f():\n    from planted import a\n",
        "package": "from planted.sub.x import X\n"}[via])  # x is innocent: sub/__init__ closes it
    assert import_cycles(tmp_path, ("planted",)), f"a cycle through {via} was not reported"
    (pkg / "b.py").write_text("B = 1\n")  # cut: no cycle left
    assert import_cycles(tmp_path, ("planted",)) == []


def test_layout_is_a_leaf():
    """pretrain/layout.py loads without torch and without the config (--dry-run and the config
    checks use it; the config imports it, not the other way round)."""
    probe = ("import sys, pretrain.layout; "
             "assert not {'torch', 'pretrain.config', 'pretrain.parallel'} & set(sys.modules), sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert imports(REPO / "pretrain" / "layout.py") == set(), "layout.py imports our modules"


def test_no_citation_outside_the_repository():
    name = "REFERENCE" + ".md"  # spelled apart so that this file does not match itself
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    citing = [f for f in files if (REPO / f).suffix in (".py", ".md", ".yaml", ".sh", ".toml")
              and (REPO / f).is_file() and name in (REPO / f).read_text(errors="ignore")]
    assert not citing, f"{citing} cite {name}, which is not in this repository: cite docs/reference.md"
    assert (REPO / "docs" / "reference.md").is_file()


def test_layout_rule_is_written_only_in_layout_py():
    # dp = world / (tp x pp), or world % (tp x pp), written out anywhere else is a second
    # definition of the layout rule that can drift
    pattern = re.compile(r"(world\w*\s*(//|%))|((//|%)\s*\(?\s*[\w.]*(tp|tensor_parallel)[\w.]*\s*\*)")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in our_modules().values() if p.name != "layout.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


ENTRY_POINTS = ["pretrain.train", "tools.main_job", "tools.convert_to_hf", "tools.eval_extrapolation",
                "tools.compare_runs", "tools.bench.attention", "tools.bench.train", "tools.bench.preprocess",
                "tools.bench.reshard",
                "data_prep.preprocess", "data_prep.train_tokenizer", "data_prep.corpus"]


def _parser_of(module: str) -> argparse.ArgumentParser:
    """The ArgumentParser an entry point's main() builds (caught at its parse_args call)."""
    import importlib
    from unittest import mock

    class Caught(Exception):
        pass

    def parse_args(self, *args, **kwargs):
        raise Caught(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args):
        try:
            importlib.import_module(module).main([])
        except Caught as c:
            return c.args[0]
    raise AssertionError(f"{module}.main() did not parse arguments")


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_option_has_a_description_and_help_shows_defaults(module):
    parsers = [_parser_of(module)]
    for action in parsers[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for parser in parsers:
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), parser.prog
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help and action.help != argparse.SUPPRESS, f"{parser.prog} {action.dest}: no help"
        text = parser.format_help()
        assert all(f"(default: {a.default})" in " ".join(text.split()) for a in parser._actions
                   if a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and a.required is False
                   and not isinstance(a.default, list)), text
