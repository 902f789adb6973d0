"""The embedded default corpus: a few MB of real English text built from the running Python's
standard library, so that nothing is downloaded and every machine can build it.

Documents, in a fixed order (sorted paths), until `max_mb` of UTF-8 text:
  * the language reference topics shipped for `help()` (pydoc_data.topics: real prose);
  * per module, its docstrings (module, classes, functions) joined: technical English;
  * per module, its source code, capped at ~25% of the corpus (LM corpora mix in code).
Documents are dealt round-robin into three inputs covering the formats the preprocessor reads:
`default.jsonl`, `default.jsonl.zst` and `default.txt` (blank-line separated; blank lines
inside a document are collapsed there so they do not split it). The same Python version gives
the same bytes.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import sysconfig
from pathlib import Path

import zstandard

from data_prep.progress import HelpFormatter

CODE_SHARE = 0.25
_BLANK_RUN = re.compile(r"\n\s*\n")


def _module_docs(path: Path) -> tuple[str, str]:
    """(docstrings joined, source) of one stdlib module; ('', '') if it does not parse."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return "", ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                docs.append(doc.strip())
    return "\n\n".join(docs), source


def iter_documents(max_bytes: int):
    """Yield documents (str) until about `max_bytes` of UTF-8 have been produced."""
    total = code = 0
    import pydoc_data.topics as topics

    def take(text: str) -> bool:
        nonlocal total
        total += len(text.encode("utf-8"))
        return total < max_bytes

    for name in sorted(topics.topics):
        text = topics.topics[name].strip()
        if text:
            yield text
            if not take(text):
                return
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in ("site-packages", "dist-packages", "test", "lib2to3") or "tests" in rel.parts:
            continue
        docs, source = _module_docs(path)
        if docs:
            yield docs
            if not take(docs):
                return
        if source.strip() and code < CODE_SHARE * max_bytes:
            code += len(source.encode("utf-8"))
            yield source
            if not take(source):
                return


def build_default_corpus(out_dir: Path, *, max_mb: float = 4.0) -> list[Path]:
    """Write the default corpus (~`max_mb` MB) into `out_dir`; returns the three input paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "default.jsonl", out_dir / "default.jsonl.zst", out_dir / "default.txt"]
    tmp = [p.with_name(p.name + ".tmp") for p in paths]
    with open(tmp[0], "w", encoding="utf-8") as jl, open(tmp[1], "wb") as zraw, \
            open(tmp[2], "w", encoding="utf-8") as txt:
        # One zstd frame per ~256 KiB of text: a multi-frame file, like the ones pzstd writes.
        zbuf: list[str] = []
        zc = zstandard.ZstdCompressor(level=10)
        for i, doc in enumerate(iter_documents(int(max_mb * 1e6))):
            if i % 3 == 0:
                jl.write(json.dumps({"text": doc, "source": "python-stdlib"}) + "\n")
            elif i % 3 == 1:
                zbuf.append(json.dumps({"text": doc}) + "\n")
                if sum(map(len, zbuf)) > 1 << 18:
                    zraw.write(zc.compress("".join(zbuf).encode("utf-8")))
                    zbuf = []
            else:
                txt.write(_BLANK_RUN.sub("\n", doc).strip("\n") + "\n\n")
        if zbuf:
            zraw.write(zc.compress("".join(zbuf).encode("utf-8")))
    for t, p in zip(tmp, paths):
        t.replace(p)
    return paths


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("out_dir", type=Path, help="directory to write default.jsonl, default.jsonl.zst, default.txt into")
    ap.add_argument("--max-mb", type=float, default=4.0, help="MB of UTF-8 text to write (about)")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    for p in build_default_corpus(args.out_dir, max_mb=args.max_mb):
        print(f"{p}  {p.stat().st_size / 1e6:.2f} MB")
    print(f"built from the standard library of Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
