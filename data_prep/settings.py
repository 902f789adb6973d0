"""The settings of one data-prep run: one typed, keyword-only, picklable dataclass that the
coordinator validates once and hands to the planner, the workers and the SLURM array tasks.

The output bytes depend only on the fields `output_settings()` returns (recorded in
`.work/plan.json` and the manifest, compared on resume); the rest say how the run goes
(encoder, workers, launcher, ...) and may change between a run and its resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Encoder = Literal["auto", "sentencepiece", "fastokens", "tokenizers"]
Launcher = Literal["local", "slurm", "submitit-local"]
ENCODERS: tuple[str, ...] = Encoder.__args__
LAUNCHERS: tuple[str, ...] = Launcher.__args__
VALID_MIN_WINDOWS = 4  # the valid split should hold at least this many windows of eval_length


class SettingsError(ValueError):
    """Settings that cannot run; the message lists every problem with its fix."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True, kw_only=True)
class PrepSettings:
    """Everything a preprocess run needs besides its inputs (see preprocess.py --help)."""

    out_dir: str = ""
    """The output directory (absolute once the coordinator has resolved it)."""
    tokenizer: str = ""
    """The SentencePiece .model file, or a Hugging Face tokenizer.json (data_prep/tokenizer.py)."""
    eod_token: str | None = None
    """The token appended to every document; None: the tokenizer's own end-of-text token."""

    # -- what the output bytes depend on ------------------------------------------------------
    text_key: str = "text"
    """JSON key, or Parquet column, holding the document text."""
    valid_fraction: float = 0.001
    """A document goes to the valid split iff blake2b-64(UTF-8 text) < valid_fraction * 2^64."""
    valid_tokens: int | None = None
    """Target size of the valid split in tokens, instead of valid_fraction: the fraction is
    set to valid_tokens / (the run's token count estimated from a sample of the input)."""
    chunk_mb: float | None = None
    """Uncompressed MiB per chunk (one task); None: total input / 16384 within [4, 256]."""
    max_compressed_chunks: int = 16
    """A compressed stream cannot be entered in the middle: at most this many chunks per file."""
    max_doc_mb: float = 16.0
    """Longer documents are rejected as too_long (bounds a worker's memory)."""
    merge_mb: float = 8192.0
    """Chunk shards are merged into shards of about this many MiB per split; 0: no merge."""

    # -- how the run goes (the output does not depend on these) ---------------------------------
    encoder: Encoder = "auto"
    """auto: for a SentencePiece model, fastokens when it is installed, known to be exact for this
    model and gives SentencePiece's ids on the start-up check, else sentencepiece; for a
    tokenizer.json, tokenizers (the `tokenizers` library)."""
    workers: int | None = None
    """Processes per node (local) or cores per array task (slurm); None: all cores."""
    launcher: Launcher = "local"
    """local: a process pool on this node; slurm: a SLURM job array through submitit;
    submitit-local: the same submitit code path on this node (tests)."""
    tasks: int = 1
    """SLURM array tasks (one node each) for launcher slurm / submitit-local."""
    batch_kb: int = 1024
    """Documents are encoded in batches of about this many KiB."""
    strict: bool = False
    """Any bad record stops the run (default: counted by reason in the manifest)."""
    keep_chunk_shards: bool = False
    """Keep the per-chunk shards after their merged shard is written and verified."""
    eval_length: int = 8192
    """Longest context the valid split will be evaluated at: a valid split with fewer than
    VALID_MIN_WINDOWS windows of it is warned about."""
    quiet: bool = False
    """No progress output."""
    slurm_partition: str | None = None
    """SLURM partition of the array tasks (None: the cluster's default)."""
    slurm_account: str | None = None
    """SLURM account of the array tasks."""
    slurm_time_min: int = 24 * 60
    """Time limit of each array task, minutes."""

    def __post_init__(self):
        errors = []
        if self.encoder not in ENCODERS:
            errors.append(f"encoder={self.encoder!r}: choose one of {', '.join(ENCODERS)}")
        if self.launcher not in LAUNCHERS:
            errors.append(f"launcher={self.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
        if not 0.0 <= self.valid_fraction < 1.0:
            errors.append(f"valid_fraction={self.valid_fraction} is outside [0, 1): pass e.g. 0.001")
        if self.valid_tokens is not None and self.valid_tokens < 0:
            errors.append(f"valid_tokens={self.valid_tokens} is negative")
        for name in ("max_compressed_chunks", "batch_kb", "tasks", "eval_length", "slurm_time_min"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.workers is not None and self.workers < 1:
            errors.append(f"workers={self.workers} must be at least 1 (or None: all cores)")
        if self.chunk_mb is not None and self.chunk_mb <= 0:
            errors.append(f"chunk_mb={self.chunk_mb} must be positive (or None: from the input size)")
        if self.max_doc_mb <= 0 or self.merge_mb < 0:
            errors.append(f"max_doc_mb={self.max_doc_mb} must be positive and merge_mb={self.merge_mb} "
                          f"not negative")
        if errors:
            raise SettingsError(errors)

    @property
    def chunk_bytes(self) -> int:
        assert self.chunk_mb is not None, "chunk_mb is resolved by the coordinator before planning"
        return int(self.chunk_mb * (1 << 20))

    @property
    def max_doc_bytes(self) -> int:
        return int(self.max_doc_mb * (1 << 20))

    @property
    def merge_bytes(self) -> int:
        return int(self.merge_mb * (1 << 20))

    @property
    def batch_bytes(self) -> int:
        return self.batch_kb * 1024

    @property
    def slurm(self) -> dict:
        """submitit's slurm_* parameters of the array tasks."""
        return {k: v for k, v in (("slurm_partition", self.slurm_partition),
                                  ("slurm_account", self.slurm_account)) if v is not None}

    def output_settings(self, dtype: str) -> dict:
        """The settings the output bytes depend on, with the fixed rules (plan.json, manifest)."""
        return {"text_key": self.text_key, "valid_fraction": self.valid_fraction,
                "valid_tokens": self.valid_tokens, "chunk_bytes": self.chunk_bytes,
                "max_compressed_chunks": self.max_compressed_chunks,
                "max_doc_bytes": self.max_doc_bytes, "merge_bytes": self.merge_bytes, "dtype": dtype,
                "eod_after_every_document": True,
                "split_rule": "valid iff blake2b-64(UTF-8 text) < valid_fraction * 2^64"}

    def to_dict(self) -> dict:
        return asdict(self)
