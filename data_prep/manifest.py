"""The output directory: the one place that names its paths, the atomic writer of its state
files, DIR/manifest.json, and the readers other stages use.

    DIR/manifest.json                       what the run produced (build_manifest)
    DIR/merged/{split}_{k:05d}.{bin,idx}    the shards to train on
    DIR/shards/{chunk}_{split}.{bin,idx}    per-chunk shards; removed once their merged shard is
                                            written and verified (unless --keep-chunk-shards)
    DIR/.work/plan.json                     inputs + output settings: a resume must match it
    DIR/.work/lock                          locked (data_prep/files.py FileLock) by the running coordinator
    DIR/.work/done/{chunk}.json             the result of a complete chunk
    DIR/.work/merged/{split}_{k:05d}.json   a merged shard, verified (its chunk shards may be gone)
    DIR/.work/tokenizer.json                the fast encoder's tokenizer, converted from the .model
    DIR/.work/tokenizer.json.sha256         its model's sha256 and its own: a stale copy is converted again
    DIR/.work/submitit/                     submitit logs of SLURM array tasks

Every state file is written to a temporary name (`name.tmp<pid>`), fsynced and renamed
(`write_json_atomic`: data_prep/files.py's writer), so a kill or a full disk leaves the old
version or the new one, never a torn file; a file that does not parse is treated as absent.
The manifest is assembled from the per-chunk results in chunk order, so everything in it except
the `run` section (timings, worker count, launcher) and `encoder` is identical for identical
inputs and settings.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from data_prep.files import write_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid")
MAX_EXAMPLES = 5  # examples kept per rejection reason


@dataclass(frozen=True)
class OutputDir:
    """Paths of one preprocess output directory (see the module docstring)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    @property
    def work(self) -> Path:
        return self.root / ".work"

    @property
    def plan(self) -> Path:
        return self.work / "plan.json"

    @property
    def lock(self) -> Path:
        return self.work / "lock"

    @property
    def done_dir(self) -> Path:
        return self.work / "done"

    @property
    def merged_marks(self) -> Path:
        return self.work / "merged"

    @property
    def tokenizer_json(self) -> Path:
        return self.work / "tokenizer.json"

    @property
    def tokenizer_json_record(self) -> Path:
        return self.work / "tokenizer.json.sha256"

    @property
    def submitit(self) -> Path:
        return self.work / "submitit"

    @property
    def state_dirs(self) -> tuple[Path, ...]:
        """Directories a run creates up front (merged/ is made by the merge step)."""
        return (self.shards_dir, self.done_dir, self.merged_marks)

    @property
    def tmp_dirs(self) -> tuple[Path, ...]:
        """Directories that may hold `*.tmp<pid>` leftovers of a killed run."""
        return self.state_dirs + (self.merged_dir, self.work)

    def done(self, chunk_id: str) -> Path:
        return self.done_dir / f"{chunk_id}.json"

    @staticmethod
    def chunk_prefix(chunk_id: str, split: str) -> str:
        """Manifest prefix (relative to the root, no .bin/.idx) of a chunk's shard."""
        return f"shards/{chunk_id}_{split}"

    @staticmethod
    def merged_prefix(split: str, k: int) -> str:
        """Manifest prefix of the k-th merged shard of a split."""
        return f"merged/{split}_{k:05d}"

    def path(self, prefix: str) -> Path:
        """Absolute path prefix of a manifest prefix."""
        return self.root / prefix

    def merged_mark(self, prefix: str) -> Path:
        return self.merged_marks / f"{Path(prefix).name}.json"


def write_json_atomic(path: Path, obj) -> None:
    """`obj` as indented JSON, written atomically (files.write_atomic: the old file or the new one)."""
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def read_json(path: Path) -> dict | None:
    """A state file's content, or None when it is absent or does not parse (torn by an older
    version, or damaged): the caller then redoes what the file would have recorded."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def build_manifest(inputs: list[dict], chunks: list, results: dict[str, dict], settings: dict,
                   tokenizer: dict, unreadable: dict[int, str]) -> dict:
    """The manifest from the described inputs, the planned chunks (plan.Chunk) and their results."""
    by_input: dict[int, list] = {}
    for c in chunks:
        by_input.setdefault(c.input_index, []).append(c)
    rejected: dict[str, dict] = {}

    def reject(reason: str, count: int, examples: list[dict]):
        r = rejected.setdefault(reason, {"count": 0, "examples": []})
        r["count"] += count
        r["examples"].extend(examples[: MAX_EXAMPLES - len(r["examples"])])

    manifest_inputs, shards = [], []
    for i, inp in enumerate(inputs):
        entry = {k: inp[k] for k in ("path", "size", "format", "compression")}
        if i in unreadable:
            reject("unreadable_file", 1, [{"file": inp["path"], "line": None, "detail": unreadable[i]}])
            manifest_inputs.append(dict(entry, checksum=None, documents=0, tokens=0, chunks=0))
            continue
        digests, docs, toks, line_base = [], 0, 0, 0
        for c in by_input.get(i, []):
            r = results[c.id]
            digests.append(r["raw_sha256"])
            for reason, rej in sorted(r["rejected"].items()):
                reject(reason, rej["count"], [
                    {"file": inp["path"], "line": line_base + ex["chunk_line"], "detail": ex["detail"]}
                    for ex in rej["examples"]])
            line_base += r["lines"]
            for split in SPLITS:
                s = r["splits"][split]
                docs, toks = docs + s["documents"], toks + s["tokens"]
                shards.append({"prefix": OutputDir.chunk_prefix(c.id, split), "split": split,
                               "chunk": c.id, "documents": s["documents"], "tokens": s["tokens"],
                               "bin_bytes": s["bin_bytes"]})
        checksum = hashlib.sha256("".join(digests).encode()).hexdigest()
        manifest_inputs.append(dict(entry, checksum=f"sha256-of-chunk-sha256:{checksum}",
                                    chunks=len(digests), lines=line_base, documents=docs, tokens=toks))
    splits = {s: {"documents": sum(x["documents"] for x in shards if x["split"] == s),
                  "tokens": sum(x["tokens"] for x in shards if x["split"] == s),
                  "shards": sum(1 for x in shards if x["split"] == s and x["documents"])} for s in SPLITS}
    return {"format_version": FORMAT_VERSION, "tokenizer": tokenizer, "settings": settings,
            "inputs": manifest_inputs, "splits": splits, "shards": shards,
            "rejected": dict(sorted(rejected.items()))}


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = OutputDir(out_dir).manifest
    write_json_atomic(path, manifest)
    return path


def load_manifest(out_dir: str | Path) -> dict:
    """The manifest of a finished preprocess run in `out_dir`."""
    path = OutputDir(out_dir).manifest
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python data_prep/preprocess.py ... "
                                f"--output-dir {out_dir}` first (or it was interrupted: run it again)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: manifest format {manifest.get('format_version')} != {FORMAT_VERSION}")
    for entry in manifest.get("shards", []) + manifest.get("merged", []):
        if not safe_prefix(entry.get("prefix")):
            raise ValueError(f"{path}: shard prefix {entry.get('prefix')!r} is not a file of merged/ or shards/ "
                             f"in {path.parent} (edited or damaged manifest): re-run preprocess")
    return manifest


_PREFIX = re.compile(r"(merged|shards)/[A-Za-z0-9_][A-Za-z0-9_.-]*")


def safe_prefix(prefix) -> bool:
    """A manifest prefix this tool writes: a name inside merged/ or shards/, never `../x` or `/x`."""
    return isinstance(prefix, str) and _PREFIX.fullmatch(prefix) is not None and ".." not in prefix


def shard_prefixes(out_dir: str | Path, split: str, *, merged: bool = True, manifest: dict | None = None) -> list[str]:
    """Absolute shard path prefixes (no .bin/.idx) of `split` ('train' or 'valid'), in
    deterministic order, for megatron-core's IndexedDataset / BlendedMegatronDatasetBuilder.
    merged=True: the few large merged shards; False: the per-chunk shards holding documents
    (only while they exist: preprocess --keep-chunk-shards, or --merge-mb 0).
    `manifest`: out_dir's manifest when the caller already read it (else it is read here)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    layout = OutputDir(Path(out_dir).resolve())
    m = manifest if manifest is not None else load_manifest(out_dir)
    if not merged and m.get("chunk_shards_removed"):
        raise FileNotFoundError(f"{layout.root}: the per-chunk shards were removed after merging; "
                                f"use the merged shards, or rerun preprocess with --keep-chunk-shards")
    return [str(layout.path(s["prefix"])) for s in (m["merged"] if merged else m["shards"])
            if s["split"] == split and s["documents"] > 0]
