"""The docs name only what exists: every backticked file path, `module.function` (or
`Class.method`, or config key), `test_name` and `--flag` in the READMEs and docs/*.md, and every flag of a
`python SCRIPT ...` command in their code blocks, is checked against the tree (files on disk,
names defined in the module's source, flags in the script's --help)."""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "data_prep" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGES = ("data_prep", "pretrain", "tools")
SECTIONS = ("model", "train", "optim", "parallel", "data", "checkpoint", "validation", "wandb", "hardware")

LIBRARY_FILES = {  # files of the libraries the docs cite (megatron-core, DeepSpeed, transformers, fastokens)
    "gpt_dataset.py", "gpt_layer_specs.py", "p2p_communication.py", "preprocess_data.py", "rotary_pos_embedding.py",
    "stage_1_and_2.py", "modeling_bloom.py", "modeling_falcon.py", "modeling_gpt2.py", "modeling_gpt_neox.py",
    "modeling_mpt.py", "_native.pyi",
}
OTHER_FLAGS = {  # flags of other programs named in the prose (pip, sbatch, srun, pytest)
    "--no-index", "--no-deps", "--target", "--index-url", "--export", "--requeue", "--signal", "--nodes",
    "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--account", "--time", "--partition",
    "--kill-on-bad-exit", "--open-mode", "--durations", "--array", "--no-kill", "--ntasks", "--exclusive",
    "--cpu-bind", "--mem", "--gres", "--wait", "--overlap",
}
PSEUDO_KEYS = {"data.manifest"}  # --allow-config-change's name for data regenerated in place (train.allowed_changes)


def spans(text: str) -> list[str]:
    """The inline code spans of a markdown text (fenced blocks left out)."""
    return re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def commands(text: str) -> list[str]:
    """The `python SCRIPT ...` lines of the fenced code blocks (continuations joined, `$ ` dropped)."""
    out = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ").split("  #")[0]
            out += [cmd.strip() for cmd in line.split("&&") if cmd.strip().startswith("python ")]
    return out


def expand(s: str) -> list[str]:
    """Shell brace expansion: `a_{x,y}.py` -> a_x.py, a_y.py."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", s)
    return [t for alt in m.group(1).split(",") for t in expand(s[: m.start()] + alt + s[m.end():])] if m else [s]


# ---------------------------------------------------------------- what the tree defines


@functools.cache
def sources() -> dict[str, list[Path]]:
    """Module stem (and package name) -> our files of that name."""
    out: dict[str, list[Path]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            stem = path.parent.name if path.name == "__init__.py" else path.stem
            out.setdefault(stem, []).append(path)
    return out


def _members(node: ast.ClassDef) -> set[str]:
    """A class's methods, class attributes and the `self.X` it assigns."""
    names = set()
    for item in ast.walk(node):
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(item.name)
        elif isinstance(item, (ast.Assign, ast.AnnAssign)):
            for t in item.targets if isinstance(item, ast.Assign) else [item.target]:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
                    elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self":
                        names.add(n.attr)
    return names


@functools.cache
def defined(path: Path) -> dict[str, set[str] | None]:
    """Top-level names of a module -> their members (a class) or None (anything else)."""
    out: dict[str, set[str] | None] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = _members(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = None
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update({(a.asname or a.name).split(".")[0]: None for a in node.names})
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                out.update({n.id: None for n in ast.walk(t) if isinstance(n, ast.Name)})
    return out


@functools.cache
def classes() -> dict[str, list[set[str]]]:
    out: dict[str, list[set[str]]] = {}
    for paths in sources().values():
        for path in paths:
            for name, members in defined(path).items():
                if members is not None:
                    out.setdefault(name, []).append(members)
    return out


@functools.cache
def config_keys() -> set[str]:
    from pretrain.config import flatten, load_config, to_dict

    keys = set(flatten(to_dict(load_config(REPO / "configs" / "tiny_alibi.yaml"))))
    return keys | {k.rsplit(".", i)[0] for k in keys for i in (1, 2)} | PSEUDO_KEYS


def resolves(parts: list[str], path: Path) -> bool:
    """`parts` (after the module's name) name something defined in the module at `path`."""
    if not parts:
        return True
    if path.name == "__init__.py" and (path.parent / f"{parts[0]}.py").exists():  # package.module
        return resolves(parts[1:], path.parent / f"{parts[0]}.py")
    if path.name == "__init__.py" and (path.parent / parts[0] / "__init__.py").exists():
        return resolves(parts[1:], path.parent / parts[0] / "__init__.py")
    names = defined(path)
    if parts[0] not in names:
        return False
    members = names[parts[0]]
    return len(parts) == 1 or (members is not None and parts[1] in members and len(parts) == 2)


def name_problem(name: str) -> str | None:
    """Why the dotted `name` (`module.function`, `Class.method`, `section.key`) is not in the tree,
    or None (it is, or it is no name of ours)."""
    parts = name.split("(")[0].split("=")[0].split(".")
    ours = parts[0] in sources() or parts[0] in classes()
    if not ours and parts[0] not in SECTIONS:
        return None  # torch.load, deepspeed.initialize, GPTModel.position_bias: another library's
    if parts[0] in SECTIONS and ".".join(parts) in config_keys():
        return None
    if any(resolves(parts[1:], path) for path in sources().get(parts[0], [])):
        return None
    if len(parts) == 2 and any(parts[1] in members for members in classes().get(parts[0], [])):
        return None
    return f"`{name}`: no such module, function, class member or config key"


@functools.cache
def cited_tests() -> set[str]:
    """The test functions and test modules of tests/ (the docs cite them as evidence)."""
    names = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        names |= {path.stem, *re.findall(r"def (test_\w+)", path.read_text())}
    return names


@functools.cache
def tops() -> set[str]:
    """The repository's top-level folders and files (a path elsewhere is an example, not ours)."""
    return {p.name for p in REPO.iterdir() if not p.name.startswith(".") and p.name != "outputs"}


@functools.cache
def file_names() -> set[str]:
    return {p.name for top in (*PACKAGES, "tests") for p in (REPO / top).rglob("*.py")}


def path_problem(name: str) -> str | None:
    for p in expand(name.rstrip("/")):
        top = p.split("/")[0]
        if p.split("/")[-1] in LIBRARY_FILES:
            continue
        if "/" in p and top in tops() and not ((REPO / p).exists() or "*" in p and any(REPO.glob(p))):
            return f"`{name}`: {p} does not exist"
        if "/" not in p and p.endswith(".py") and p not in file_names():
            return f"`{name}`: no file of that name in the tree"
    return None


@functools.cache
def is_script(word: str) -> bool:
    """`word` is one of our command-line scripts (a file with argparse and a __main__ block)."""
    path = REPO / word
    if not (word.endswith(".py") and word.split("/")[0] in PACKAGES and path.is_file()):
        return False
    text = path.read_text()
    return "argparse" in text and '__name__ == "__main__"' in text


@functools.cache
def help_text(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    return run.stdout if run.returncode == 0 else ""


def script_flags(argv: list[str]) -> set[str]:
    """The flags `--help` lists for `python ARGV` (and for its subcommand, when the next word is one)."""
    text = help_text(*argv[:2]) if argv[0] == "-m" else help_text(argv[0])
    assert text, f"python {' '.join(argv[:2] if argv[0] == '-m' else argv[:1])} --help failed"
    rest = argv[2:] if argv[0] == "-m" else argv[1:]
    if rest and re.fullmatch(r"[a-z]+", rest[0]):
        text += help_text(*(argv[:2] if argv[0] == "-m" else argv[:1]), rest[0])
    return set(re.findall(r"--[\w-]+", text))


@functools.cache
def all_flags() -> set[str]:
    """Every flag string of our code and scripts (for a flag named without its script)."""
    flags = set()
    for path in [*(p for package in PACKAGES for p in (REPO / package).rglob("*.py")), *REPO.glob("slurm/*.sh")]:
        flags |= set(re.findall(r"""["' ](--[a-z][\w-]*)""", path.read_text()))
    return flags | script_flags(["pretrain/train.py"])  # its --steps, --tp, ... are built from FLAGS


def flag_problems(tokens: list[str], known: set[str], where: str) -> list[str]:
    flags = {t.split("=")[0] for t in tokens if re.fullmatch(r"--[a-z][\w-]*(=.*)?", t)}
    return [f"{where}: {f} is no flag of it" for f in sorted(flags - known - OTHER_FLAGS)]


def problems(text: str) -> list[str]:
    out = []
    for span in spans(text):
        words = span.split()
        for word in words:
            word = word.strip(",;:()")
            if re.fullmatch(r"[\w./{},*-]+\.(py|sh|yaml|md|txt|toml|png)", word) or \
                    re.fullmatch(r"[\w.-]+/[\w./-]*", word):
                out.append(path_problem(word))
            if re.fullmatch(r"test_\w+", word) and word not in cited_tests():
                out.append(f"`{word}`: no test function or test file of that name in tests/")
        filename = re.search(r"\.(py|pyi|json|jsonl|yaml|txt|md|sh|lock|log|tmp|index|xxh3_128|JSONL|GZ|ndjson)$", span)
        if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(\(.*\))?", span) and not filename:
            out.append(name_problem(span))
        if len(words) > 1 and re.fullmatch(r"[a-z][\w-]*", words[0]) and words[0] != "python":
            continue  # another program's command line (squeue --me, scancel --batch)
        script = next((w for w in words if is_script(w)), None)
        known = script_flags(words[words.index(script):]) if script else all_flags()
        out += flag_problems(words, known, f"`{span}`")
    for cmd in commands(text):
        argv = cmd.split()[1:]
        if argv[0] == "-m" and argv[1] == "pytest":
            continue
        if argv[0] != "-m":
            out.append(path_problem(argv[0]))
        out += flag_problems(argv, script_flags(argv), f"`{cmd[:60]}`")
    return [p for p in out if p]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_only_what_exists(doc):
    found = problems(doc.read_text())
    assert not found, f"{doc.relative_to(REPO)} names what the tree does not have:\n" + "\n".join(found)


def test_a_stale_name_is_caught():
    """Each kind of stale name, planted in a doc, is reported (and the real ones beside it are not)."""
    planted = ("See `pretrain/gone.py`, `spec.no_such_function`, `Trainer.no_such_method`, "
               "`model.no_such_key`, `test_no_such_test` and `--no-such-flag`; but `pretrain/loop.py`, "
               "`loop.preflight`, `Trainer.train_step`, `model.seq_length`, `test_a_stale_name_is_caught` "
               "and `--dry-run` exist.\n\n"
               "```bash\npython pretrain/train.py --config x.yaml --stale-flag\n```\n")
    found = "\n".join(problems(planted))
    for stale in ("pretrain/gone.py", "spec.no_such_function", "Trainer.no_such_method", "model.no_such_key",
                  "test_no_such_test", "--no-such-flag", "--stale-flag"):
        assert stale in found, (stale, found)
    for real in ("pretrain/loop.py", "loop.preflight", "Trainer.train_step", "model.seq_length",
                 "test_a_stale_name_is_caught"):
        assert f"`{real}`" not in found, (real, found)
    for real in ("--dry-run", "--config"):
        assert f"{real} is no flag" not in found, (real, found)
