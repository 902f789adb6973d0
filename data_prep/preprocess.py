"""Raw text corpus -> megatron-core .bin/.idx token shards, resumable, local or SLURM.

    python data_prep/preprocess.py --input PATH [PATH ...] --tokenizer MODEL --output-dir DIR \
        [--workers N] [--launcher local|slurm] [--encoder auto] [--valid-tokens N] [--strict] [--eod-token NAME]

MODEL: a SentencePiece .model or a Hugging Face tokenizer.json (or a folder holding one); every
document is its ids, then the end-of-text id (data_prep/tokenizer.py says which).

Inputs: files, directories or globs of .jsonl (.ndjson), .txt (documents separated by blank
lines), each optionally .gz/.xz/.zst/.bz2, .json.gz & co., and .parquet; files a directory holds
but that are not read are listed with the reason. Output: DIR/merged/*.{bin,idx} and
DIR/manifest.json. Run it again with the same arguments after an interruption (Ctrl-C, kill -9, a
full disk): completed chunks are kept.
"""

from __future__ import annotations

import argparse
import logging
import sys

from data_prep.pipeline import DiskFullError, EmptyValidError, RefusedError, preprocess
from data_prep.progress import HelpFormatter, print_summary
from data_prep.readers import InputError
from data_prep.settings import ENCODERS, LAUNCHERS, SettingsError

__all__ = ["preprocess", "main"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="input files, directories or globs")
    ap.add_argument("--tokenizer", required=True,
                    help="SentencePiece .model (data_prep/train_tokenizer.py), or a Hugging Face tokenizer.json "
                         "(or a folder holding one)")
    ap.add_argument("--eod-token", default=None, metavar="NAME",
                    help="token appended to every document (default: the tokenizer's end-of-text token: "
                         "SentencePiece's eos, or <|endoftext|>, </s>, ... of a tokenizer.json)")
    ap.add_argument("--output-dir", required=True, help="where the shards and manifest.json go")
    ap.add_argument("--workers", type=int, default=None, help="processes per node (default: all cores)")
    ap.add_argument("--launcher", choices=LAUNCHERS, default="local",
                    help="local: this node; slurm: a SLURM job array of --nodes tasks (through submitit)")
    ap.add_argument("--encoder", choices=ENCODERS, default="auto",
                    help="auto: for a .model, fastokens where it is exact (checked against SentencePiece at "
                         "start-up), else sentencepiece (the output is the same either way); for a tokenizer.json, "
                         "tokenizers")
    ap.add_argument("--text-key", default="text", help="JSON key or Parquet column holding the text")
    valid = ap.add_mutually_exclusive_group()
    valid.add_argument("--valid-fraction", type=float, default=0.001,
                       help="share of documents in the valid split (an empty valid split fails the run; 0: none)")
    valid.add_argument("--valid-tokens", type=int, default=None,
                       help="target size of the valid split in tokens (instead of --valid-fraction)")
    ap.add_argument("--eval-length", type=int, default=8192,
                    help="longest context you will evaluate at: a valid split of fewer than 4 such windows is "
                         "warned about")
    ap.add_argument("--strict", action="store_true", help="any bad record is an error")
    ap.add_argument("--chunk-mb", type=float, default=None,
                    help="uncompressed MiB per chunk (task) (default: total / 16384, within [4, 256])")
    ap.add_argument("--max-compressed-chunks", type=int, default=16,
                    help="chunks per compressed file at most (each decompresses from the start)")
    ap.add_argument("--max-doc-mb", type=float, default=16.0,
                    help="longer documents (lines) are rejected as too_long (bounds memory, even for a "
                         "decompression bomb)")
    ap.add_argument("--merge-mb", type=float, default=8192.0,
                    help="merge chunk shards into shards of ~this many MiB per split; 0: no merge")
    ap.add_argument("--keep-chunk-shards", action="store_true",
                    help="keep the per-chunk shards after merging (else removed once their merged shard is verified)")
    ap.add_argument("--nodes", type=int, default=1, help="slurm: array tasks, each one node")
    ap.add_argument("--partition", default=None, help="slurm partition (default: the cluster's)")
    ap.add_argument("--time-min", type=int, default=24 * 60, help="slurm time limit per task, minutes")
    ap.add_argument("--account", default=None, help="slurm account")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    log = logging.getLogger("data_prep")  # our messages only (megatron-core logs at INFO on the root logger)
    if not log.handlers:
        log.addHandler(handler := logging.StreamHandler())
        handler.setFormatter(logging.Formatter("preprocess: %(message)s"))
    log.setLevel(logging.WARNING if a.quiet else logging.INFO)
    try:
        manifest = preprocess(
            a.input, a.tokenizer, a.output_dir, eod_token=a.eod_token, workers=a.workers, launcher=a.launcher, encoder=a.encoder,
            text_key=a.text_key, valid_fraction=a.valid_fraction, valid_tokens=a.valid_tokens,
            eval_length=a.eval_length, strict=a.strict, chunk_mb=a.chunk_mb,
            max_compressed_chunks=a.max_compressed_chunks, max_doc_mb=a.max_doc_mb, merge_mb=a.merge_mb,
            keep_chunk_shards=a.keep_chunk_shards, tasks=a.nodes, quiet=a.quiet,
            slurm_partition=a.partition, slurm_time_min=a.time_min, slurm_account=a.account)
    except (RefusedError, InputError, SettingsError) as e:
        print(f"preprocess: refused: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the workers ignore SIGINT; the running chunks end, the rest never start
        print("preprocess: interrupted: completed chunks are kept: run the same command again to resume",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - strict errors, failed tasks, full disk: say what, not a traceback
        if isinstance(e, (DiskFullError, EmptyValidError)) or \
                type(e).__name__ in ("StrictError", "TaskFailedError", "WorkerDiedError"):
            print(f"preprocess: failed: {e}", file=sys.stderr)
            return 1
        raise
    print_summary(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
