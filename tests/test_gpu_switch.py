"""`pretrain.parallel.use_gpu` is the one GPU switch: no other module of ours asks torch whether
CUDA is there. A direct `torch.cuda.is_available()` ignores DS_ACCELERATOR=cpu, so on a GPU machine
the CPU tests (and CPU jobs) would pick up the GPU in that one place and not in the others."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWITCH = REPO / "pretrain" / "parallel.py"


def cuda_checks(path: Path) -> list[int]:
    """Lines of `path` that call `<anything>.cuda.is_available` or import `is_available` from torch.cuda."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and node.attr == "is_available"
                and isinstance(node.value, ast.Attribute) and node.value.attr == "cuda"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.cuda" and \
                any(a.name == "is_available" for a in node.names):
            lines.append(node.lineno)
    return lines


def test_cuda_checks_are_found(tmp_path):
    # the check itself: a planted call in each spelling is seen, and the switch's own
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\nfrom torch.cuda import is_available\nx = torch.cuda.is_available()\n")
    assert cuda_checks(planted) == [2, 3]
    assert cuda_checks(SWITCH)


def test_only_the_gpu_switch_asks_whether_cuda_is_available():
    offenders = [f"{p.relative_to(REPO)}:{line}" for pkg in ("data_prep", "pretrain", "tools")
                 for p in sorted((REPO / pkg).rglob("*.py")) if p != SWITCH for line in cuda_checks(p)]
    assert not offenders, ("torch.cuda.is_available() outside pretrain/parallel.py (use `use_gpu()`, which also "
                           "honours DS_ACCELERATOR=cpu): " + ", ".join(offenders))
