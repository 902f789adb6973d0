"""What the data-prep commands print: live progress (MB/s, tokens/s, ETA), the final summary
table (rich), and the --help format.

On a terminal: a rich progress bar. Elsewhere (SLURM logs, CI): one line every `every_s` seconds.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default, except where there is none (None, or a flag that is off)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Reporter:
    def __init__(self, total_bytes: int, done_bytes: int = 0, every_s: float = 10.0, quiet: bool = False):
        self.total, self.done0, self.bytes, self.tokens = max(total_bytes, 1), done_bytes, done_bytes, 0
        self.t0 = self.last = time.time()
        self.every_s, self.quiet = every_s, quiet
        self.console = Console(stderr=True)
        self.bar = None
        if not quiet and self.console.is_terminal:
            self.bar = Progress(TextColumn("tokenizing"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                                TextColumn("{task.fields[rates]}"), console=self.console, transient=False)
            self.task = self.bar.add_task("", total=self.total, completed=done_bytes, rates="")
            self.bar.start()

    def rates(self) -> str:
        dt = max(time.time() - self.t0, 1e-6)
        mbs, toks = (self.bytes - self.done0) / dt / 1e6, self.tokens / dt
        left = max(self.total - self.bytes, 0)
        eta = left / (mbs * 1e6) if mbs > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta and eta < 86400 * 30 else "?"
        return f"{mbs:6.2f} MB/s  {toks / 1e6:6.2f} M tok/s  ETA {eta_s}"

    def advance(self, nbytes: int, ntokens: int) -> None:
        self.bytes += nbytes
        self.tokens += ntokens
        now = time.time()
        if self.bar is not None:
            self.bar.update(self.task, completed=min(self.bytes, self.total), rates=self.rates())
        elif not self.quiet and now - self.last >= self.every_s:
            self.last = now
            print(f"preprocess: {100 * min(self.bytes / self.total, 1):5.1f}%  {self.rates()}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def print_summary(manifest: dict, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"preprocess -> {manifest['output_dir']}")
    for col in ("split", "documents", "tokens", "shards"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for split, s in manifest["splits"].items():
        t.add_row(split, f"{s['documents']:,}", f"{s['tokens']:,}", str(s["shards"]))
    console.print(t)
    if manifest["rejected"]:
        r = Table(title="rejected input (all examples in manifest.json)")
        r.add_column("reason")
        r.add_column("count", justify="right")
        for reason, v in manifest["rejected"].items():
            r.add_row(reason, f"{v['count']:,}")
        console.print(r)
        for reason, v in manifest["rejected"].items():  # plain lines: paths stay whole and greppable
            for ex in v["examples"][:3]:
                print(f"  {reason}: {ex['file']}:{ex['line']}: {ex['detail'][:120]}")
    if skipped := manifest.get("skipped_inputs"):
        print(f"{len(skipped)} file(s) found but not read (`skipped_inputs` in manifest.json):")
        for x in skipped:
            print(f"  skipped: {x['file']}: {x['reason']}")
    enc = manifest.get("encoder") or {}
    if enc.get("fallback"):
        console.print(f"encoder: sentencepiece ({enc['requested']} requested; fastokens not used: {enc['fallback']})",
                      markup=False)
    elif enc:
        console.print(f"encoder: {enc['used']}" + (f" {enc['version']}" if enc.get("version") else ""))
    run = manifest["run"]
    console.print(f"{run['bytes'] / 1e6:,.1f} MB in {run['elapsed_s']:.1f} s: {run['mb_per_s']:.2f} MB/s, "
                  f"{run['tokens_per_s'] / 1e6:.2f} M tokens/s, {run['workers']} workers ({run['launcher']}); "
                  f"{run['chunks_resumed']}/{run['chunks']} chunks were already complete")
    if manifest.get("warnings"):
        console.print(f"{len(manifest['warnings'])} warning(s): see above, or `warnings` in manifest.json")
