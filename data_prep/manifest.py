"""DIR/manifest.json: what a preprocess run produced, and the readers other stages use.

The manifest is assembled from the per-chunk results in chunk order, so everything in it except
the `run` section (timings, worker count, launcher) is identical for identical inputs and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from data_prep.worker import MAX_EXAMPLES, SPLITS, shard_stem

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def build_manifest(out_dir: Path, inputs: list[dict], chunks: list[dict], results: dict[str, dict],
                   settings: dict, tokenizer: dict, unreadable: dict[int, str]) -> dict:
    out_dir = Path(out_dir)
    by_input: dict[int, list[dict]] = {}
    for c in chunks:
        by_input.setdefault(c["input_index"], []).append(c)
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
            r = results[c["id"]]
            digests.append(r["raw_sha256"])
            for reason, rej in sorted(r["rejected"].items()):
                reject(reason, rej["count"], [
                    {"file": inp["path"], "line": line_base + ex["chunk_line"], "detail": ex["detail"]}
                    for ex in rej["examples"]])
            line_base += r["lines"]
            for split in SPLITS:
                s = r["splits"][split]
                docs, toks = docs + s["documents"], toks + s["tokens"]
                shards.append({"prefix": str(shard_stem(Path("."), c["id"], split)), "split": split,
                               "chunk": c["id"], "documents": s["documents"], "tokens": s["tokens"],
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
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(MANIFEST + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(out_dir: str | Path) -> dict:
    """The manifest of a finished preprocess run in `out_dir`."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python data_prep/preprocess.py ... "
                                f"--output-dir {out_dir}` first (or it was interrupted: run it again)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: manifest format {manifest.get('format_version')} != {FORMAT_VERSION}")
    return manifest


def shard_prefixes(out_dir: str | Path, split: str, *, merged: bool = True, manifest: dict | None = None) -> list[str]:
    """Absolute shard path prefixes (no .bin/.idx) of `split` ('train' or 'valid'), in
    deterministic order, for megatron-core's IndexedDataset / BlendedMegatronDatasetBuilder.
    merged=True: the few large merged shards; False: the per-chunk shards holding documents.
    `manifest`: out_dir's manifest when the caller already read it (else it is read here)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(out_dir).resolve()
    m = manifest if manifest is not None else load_manifest(out_dir)
    return [str(root / s["prefix"]) for s in (m["merged"] if merged else m["shards"])
            if s["split"] == split and s["documents"] > 0]
