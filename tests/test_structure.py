"""The layering the docs promise (docs/architecture.md): data_prep -> pretrain -> tools, no import
cycle between our modules, no citation of a reference file outside the repository, and the
data-parallel size computed in one place (pretrain/parallel.py, `Layout`)."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_prep", "pretrain", "tools")
LAYER = {"data_prep": 0, "pretrain": 1, "tools": 2}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Our modules imported anywhere in `path` (module level or inside functions) when it runs."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are for annotations only: not run
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
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
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def test_no_upward_import():
    upward = []
    for name, path in our_modules().items():
        for imported in imports(path):
            if LAYER[imported.split(".")[0]] > LAYER[name.split(".")[0]]:
                upward.append(f"{name} imports {imported}")
    assert not upward, "data_prep -> pretrain -> tools only:\n" + "\n".join(upward)


def test_no_import_cycle():
    modules = our_modules()
    graph = {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in graph[node]:
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_citation_outside_the_repository():
    name = "REFERENCE" + ".md"  # spelled apart so that this file does not match itself
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    citing = [f for f in files if (REPO / f).suffix in (".py", ".md", ".yaml", ".sh", ".toml")
              and (REPO / f).is_file() and name in (REPO / f).read_text(errors="ignore")]
    assert not citing, f"{citing} cite {name}, which is not in this repository: cite docs/reference.md"
    assert (REPO / "docs" / "reference.md").is_file()


def test_data_parallel_size_is_computed_only_in_parallel_py():
    # dp = world / (tp x pp) written out anywhere else is a second definition that can drift
    pattern = re.compile(r"(world\w*\s*//)|(//\s*\(?\s*[\w.]*(tp|tensor_parallel)[\w.]*\s*\*)")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in our_modules().values() if p.name != "parallel.py"
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
