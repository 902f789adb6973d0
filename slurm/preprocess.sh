#!/usr/bin/env bash
# Tokenize a corpus across nodes. This one-core job coordinates: data_prep/preprocess.py plans the
# chunks and runs them as one SLURM job array through submitit (`--nodes N` array tasks of one node
# each, all cores of it), then merges and writes the manifest.
#
#   sbatch slurm/preprocess.sh --input /data/raw --tokenizer tok/tok.model --output-dir data/tokens --nodes 16
#   bash slurm/preprocess.sh ...        # the same from a login-node shell (blocks until done)
#
# Arguments are preprocess.py's; --partition, --account and --time-min reach the array tasks.
# Failed tasks: preprocess.py prints each failed array task's traceback and log paths; this script
# then runs it again, up to ATTEMPTS times (default 3). Completed chunks are kept on disk, so an
# attempt redoes only the failed ones; for the same reason, after the last attempt (or a cancelled
# coordinator), submitting again with the same arguments resumes the run.
# Environment: ATTEMPTS, PYTHON (python), REPO (the checkout holding this script).
#
#SBATCH --job-name=alibi-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

log() { echo "[preprocess.sh $(date -u +%FT%TZ)${SLURM_JOB_ID:+ job $SLURM_JOB_ID}] $*"; }

ATTEMPTS=${ATTEMPTS:-3}
PYTHON=${PYTHON:-python}
if [[ -n ${SLURM_JOB_ID:-} ]]; then  # sbatch runs a spool copy: find the checkout through the submitted path
  script=$(scontrol show job "$SLURM_JOB_ID" -o | grep -oP '(?<= Command=)\S+' || true)
else
  script=$0
fi
REPO=${REPO:-$(cd "$(dirname "${script:-$PWD/slurm/x}")/.." && pwd)}

status=1
for attempt in $(seq "$ATTEMPTS"); do
  log "attempt $attempt of $ATTEMPTS: $PYTHON $REPO/data_prep/preprocess.py --launcher slurm $*"
  "$PYTHON" "$REPO/data_prep/preprocess.py" --launcher slurm "$@"
  status=$?
  ((status == 0)) && { log "done"; exit 0; }
  # 2: refused (bad arguments, missing tokenizer, foreign output dir): running again cannot help
  ((status == 2)) && { log "refused: fix the arguments above"; exit 2; }
  log "attempt $attempt failed (status $status): the failed array tasks and their logs are listed above;" \
    "completed chunks are kept"
done
log "giving up after $ATTEMPTS attempts; submit again with the same arguments to resume"
exit "$status"
