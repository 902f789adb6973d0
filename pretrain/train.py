"""Train a GPT (ALiBi / sinusoidal / rope / t5 / kerple / none) with DeepSpeed ZeRO, tensor and pipeline parallelism.

    python pretrain/train.py --config FILE [--run-dir DIR] [--data DIR] [--steps N] [--tp N] [--pp N]
        [--zero-stage N] [--seq-length L] [--micro-batch N] [--save-interval N] [--log-interval N]
        [--dry-run [--world-size N]] [key.path=value ...] [--allow-config-change KEY ...]

Launched by torchrun or srun (one task per GPU; rank and rendezvous from the environment) or
as one plain process. A run directory holding a checkpoint resumes from its newest verified
one; a config change that breaks exact continuation is refused unless --allow-config-change
names it. One trainer per run directory (a lock). SIGUSR1/SIGTERM/SIGINT (Ctrl-C): checkpoint
at the next step boundary, exit 0; a second Ctrl-C exits at once. --dry-run validates the layout
for any world size and prints the per-GPU memory estimate (and, for a run directory with a
checkpoint, the layout change a resume would reshard), touching no GPU and no process group;
with --data it also makes the real run's data checks (vocabulary, shards, sample index size).
A resume on another layout (GPU count, --tp, --pp, --zero-stage, --micro-batch) is accepted:
the model and optimizer state are resharded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pretrain.config import Config, ConfigError, DataSource, flatten, load_config, to_dict
from pretrain.memory import estimate_memory
from pretrain.layout import Layout
from pretrain.rundir import RunDirError
from pretrain.stop import StopRequest

FLAGS = {  # flag -> config path
    "steps": "train.steps", "tp": "parallel.tensor_parallel", "pp": "parallel.pipeline_parallel",
    "zero_stage": "parallel.zero_stage", "seq_length": "model.seq_length",
    "micro_batch": "train.micro_batch_size", "save_interval": "checkpoint.save_interval",
    "log_interval": "train.log_interval",
}


def build_config(args: argparse.Namespace) -> Config:
    flags = {path: flag for flag, path in FLAGS.items() if getattr(args, flag) is not None}
    clashes = [(o, key) for o in args.overrides if (key := o.partition("=")[0].strip()) in flags]
    if clashes:  # the flag would win silently, hiding a typo in the override
        raise ConfigError([f"--{flags[key].replace('_', '-')} {getattr(args, flags[key])} and the override {o!r} "
                           f"both set {key}: give one of them" for o, key in clashes])
    overrides = list(args.overrides) + [f"{path}={getattr(args, flag)}" for path, flag in flags.items()]
    cfg = load_config(args.config, overrides)
    if args.data:
        cfg.data.sources = [DataSource(path=str(Path(args.data).resolve()))]
    return cfg


def allowed_changes(keys: list[str], cfg: Config) -> tuple[str, ...]:
    """--allow-config-change KEY...: each a config key or section, `tokenizer`, or `data.manifest`
    (the data regenerated in place)."""
    known = set(flatten(to_dict(cfg))) | {"tokenizer", "data.manifest"}
    bad = [k for k in keys if not any(n == k or n.startswith(k + ".") for n in known)]
    if bad:
        hint = " (an override after the flag? put key=value overrides before --allow-config-change)" \
            if any("=" in k for k in bad) else ""
        raise ConfigError([f"--allow-config-change {' '.join(bad)}: not a config key or section{hint}; e.g. "
                           "model.seq_length, train.global_batch_size, data.sources, optim, tokenizer"])
    return tuple(keys)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    ap.add_argument("--run-dir", default=None, help="checkpoints, metrics.jsonl, wandb; None: outputs/<config name>")
    ap.add_argument("--data", default=None, help="a data_prep/preprocess.py output directory (replaces the config's data.sources); None: the config's")
    for flag in FLAGS:
        ap.add_argument("--" + flag.replace("_", "-"), type=int, default=None, help=f"sets {FLAGS[flag]}; None: the config's value")
    ap.add_argument("--dry-run", action="store_true", help="validate the layout (and --data), print memory per GPU and, where the run "
                    "directory holds a checkpoint, the layout change a resume would make; exit")
    ap.add_argument("--world-size", type=int, default=None, help="--dry-run: GPUs to plan for; None: the launcher's (WORLD_SIZE or SLURM_NTASKS, else 1)")
    ap.add_argument("overrides", nargs="*", help="key.path=value (YAML value)")
    ap.add_argument("--allow-config-change", nargs="+", default=[], metavar="KEY",
                    help="on resume, accept these config changes that break exact continuation or the data "
                         "position (e.g. model.seq_length train.global_batch_size tokenizer data.manifest)")
    args = ap.parse_args(argv)
    stop = None if args.dry_run else StopRequest()  # before the slow imports: no signal is lost
    try:
        cfg = build_config(args)
        allow = allowed_changes(args.allow_config_change, cfg)
        run_dir = Path(args.run_dir or Path("outputs") / Path(args.config).stem)
        if args.dry_run:
            world = args.world_size or int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
            cfg.validate(world)
            if args.data:  # the real run's data checks (vocabulary, shards, sample index size)
                from pretrain.loop import data_errors

                errors = data_errors(cfg)[1]
                if errors:
                    raise ConfigError(errors)
            layout = Layout.of(cfg, world)
            estimate = estimate_memory(cfg, layout)
            print(f"config {args.config}: valid for {world} GPUs\n")
            print(estimate.table(cfg))
            from pretrain.loop import dry_run_resume

            dry_run_resume(cfg, layout, run_dir)
            if estimate.total_gb > cfg.hardware.gpu_memory_gb:
                raise ConfigError([f"estimated {estimate.total_gb:.1f} GiB per GPU exceeds hardware.gpu_memory_gb="
                                   f"{cfg.hardware.gpu_memory_gb:g}: lower train.micro_batch_size, set "
                                   "train.activation_checkpointing=true, raise zero_stage or tensor_parallel"])
            return 0
        from pretrain.checkpoint import CheckpointError
        from pretrain.data import DamagedShardError
        from pretrain.loop import TrainingError, train
        from pretrain.parallel import LaunchError, read_env

        try:
            return train(cfg, run_dir, read_env(), stop, allow)
        except (TrainingError, DamagedShardError) as e:
            print(f"train.py: {e}", file=sys.stderr)
            return 1
        except (CheckpointError, RunDirError, LaunchError) as e:
            print(f"train.py: {e}", file=sys.stderr)
            return 2
    except ConfigError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C before the stop handler is installed (argument parsing, --dry-run)
        print("train.py: interrupted", file=sys.stderr)
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # torch 2.13 gloo can abort in its exit handlers after a finished run
