"""Raw text corpus -> megatron-core .bin/.idx token shards, resumable, local or SLURM.

    python data_prep/preprocess.py --input PATH [PATH ...] --tokenizer MODEL --output-dir DIR \
        [--workers N] [--launcher local|slurm] [--text-key text] [--valid-fraction F] [--strict]

Inputs: files, directories or globs of .jsonl[.gz|.xz|.zst] and .txt[.gz|.xz|.zst] (documents
separated by blank lines). Output: DIR/shards/*_{train,valid}.{bin,idx} and DIR/manifest.json.
Run it again with the same arguments after an interruption: completed chunks are kept.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.pipeline import LAUNCHERS, RefusedError, preprocess  # re-exported
from data_prep.readers import InputError

__all__ = ["preprocess", "main"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    ap.add_argument("--tokenizer", required=True, help="SentencePiece .model (train_tokenizer.py)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--workers", type=int, default=None, help="processes (per node); default: all cores")
    ap.add_argument("--launcher", choices=LAUNCHERS, default="local")
    ap.add_argument("--text-key", default="text", help="JSON field holding the text")
    ap.add_argument("--valid-fraction", type=float, default=0.001, help="documents sent to valid")
    ap.add_argument("--strict", action="store_true", help="any bad record is an error")
    ap.add_argument("--chunk-mb", type=float, default=None,
                    help="uncompressed MiB per chunk (task); default: total/16384 within [4, 256]")
    ap.add_argument("--max-compressed-chunks", type=int, default=16)
    ap.add_argument("--max-doc-mb", type=float, default=16.0, help="longer documents are rejected")
    ap.add_argument("--merge-mb", type=float, default=8192.0,
                    help="merge chunk shards into shards of ~this many MiB per split; 0: no merge")
    ap.add_argument("--nodes", type=int, default=1, help="slurm: array tasks, each one node")
    ap.add_argument("--partition", default=None, help="slurm partition")
    ap.add_argument("--time-min", type=int, default=24 * 60, help="slurm time limit per task")
    ap.add_argument("--account", default=None, help="slurm account")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    a = ap.parse_args(argv)
    from data_prep.progress import print_summary
    try:
        manifest = preprocess(
            a.input, a.tokenizer, a.output_dir, workers=a.workers, launcher=a.launcher,
            text_key=a.text_key, valid_fraction=a.valid_fraction, strict=a.strict,
            chunk_mb=a.chunk_mb, max_compressed_chunks=a.max_compressed_chunks,
            max_doc_mb=a.max_doc_mb, tasks=a.nodes, merge_mb=a.merge_mb, quiet=a.quiet,
            slurm={"partition": a.partition, "time_min": a.time_min, "account": a.account})
    except (RefusedError, InputError) as e:
        print(f"preprocess: refused: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - strict errors and failed tasks: say what, not a traceback
        if type(e).__name__ in ("StrictError", "TaskFailedError", "WorkerDiedError"):
            print(f"preprocess: failed: {e}", file=sys.stderr)
            return 1
        raise
    print_summary(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
