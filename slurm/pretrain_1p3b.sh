#!/usr/bin/env bash
# Pretrain the paper's 1.3B ALiBi model on SLURM, preemption-safe: a run chains through time limits
# with no person involved. Hyperparameters live in the config, never here.
#
#   sbatch slurm/pretrain_1p3b.sh                                  # 16 nodes x 8 GPUs, the 1.3B config
#   sbatch --nodes=2 --export=ALL,CONFIG=configs/x.yaml,RUN_DIR=runs/x,DATA=data/tokens slurm/pretrain_1p3b.sh
#   sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 \
#     --export=ALL,CONFIG=configs/tiny_alibi.yaml,... slurm/pretrain_1p3b.sh   # CPU test cluster (gloo)
#
# Environment: CONFIG, RUN_DIR (default runs/<config name>), DATA (a data_prep/preprocess.py output
# dir; default: the config's), EXTRA_ARGS (more train.py arguments, word-split), MAX_REQUEUES (30),
# PROBE_TIMEOUT_S (30: the test step on each node after a failed step), PYTHON (python), REPO (the
# checkout holding this script).
#
# Preemption: `--signal=B:USR1@300` sends USR1 to this shell 5 min before the time limit. The trap
# forwards it to the training step; train.py saves a checkpoint at the next step boundary and exits 0;
# this shell then runs `scontrol requeue`, and the requeued job (same id, same log, appended)
# resumes from RUN_DIR's latest checkpoint. A preemption by SLURM itself (SIGTERM, then requeue
# through --requeue) takes the same checkpoint path. A failed step (a crash, a lost node) is requeued
# or not by an explicit, logged decision, and the log names the rank that failed first. See
# docs/slurm.md.
#
#SBATCH --job-name=alibi-1p3b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

log() { echo "[pretrain_1p3b.sh $(date -u +%FT%TZ) job $SLURM_JOB_ID] $*"; }

# sbatch runs a copy of this script from its spool: find the checkout through the submitted path
script=$(scontrol show job "$SLURM_JOB_ID" -o | grep -oP '(?<= Command=)\S+' || true)
REPO=${REPO:-$(cd "$(dirname "${script:-$SLURM_SUBMIT_DIR/slurm/x}")/.." && pwd)}
# relative paths are relative to the directory sbatch was called from (the job's working directory)
CONFIG=${CONFIG:-$REPO/configs/gpt_1p3b_alibi_L1024.yaml}
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)}
EXTRA_ARGS=${EXTRA_ARGS:-}
MAX_REQUEUES=${MAX_REQUEUES:-30}
PYTHON=${PYTHON:-python}

# Rendezvous from the allocation: rank 0 runs on the first node; the port is derived from the job id
# (and the restart count, so that a requeued job never meets its predecessor's socket), in
# 10000-29999: below Linux's ephemeral range (32768-60999), where any outgoing connection may hold it.
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
addr=$(scontrol show node "$first" -o | grep -oP '(?<=NodeAddr=)\S+' || true)
# Always derived here: values exported from the submitting shell (--export=ALL) must not leak in.
export MASTER_ADDR=${addr:-$first}
export MASTER_PORT=$((10000 + SLURM_JOB_ID % 5000 * 4 + ${SLURM_RESTART_COUNT:-0} % 4))
# train.py reads rank, world size and local rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID,
# unless torchrun's RANK / WORLD_SIZE are set: same reason.
unset RANK WORLD_SIZE LOCAL_RANK

# NCCL (GPU runs). Defaults that only make failures loud; fabric settings are per cluster, e.g.
# NCCL_SOCKET_IFNAME=ib0 or NCCL_IB_HCA=mlx5 (see docs/slurm.md). Anything set by the user wins.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# megatron's tensor-parallel layers (tp > 1) rely on one GPU work queue so that their all-reduce /
# reduce-scatter is launched before the weight-gradient GEMM it overlaps (Hopper and older)
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# --cpus-per-task=8 per GPU task: FlexAttention's compile workers, NCCL's proxy threads and the
# data loader run beside the training loop (8 x 8 = 64 cores fit every common 8-GPU node)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# srun no longer inherits sbatch's --cpus-per-task (SLURM >= 22.05)
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
# no GPU in the allocation: DeepSpeed's CPU accelerator, and train.py picks gloo
((${SLURM_GPUS_ON_NODE:-0} > 0)) || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

args=(--config "$CONFIG" --run-dir "$RUN_DIR")
[[ -n ${DATA:-} ]] && args+=(--data "$DATA")
# shellcheck disable=SC2206  # EXTRA_ARGS is word-split on purpose
args+=($EXTRA_ARGS)
log "start (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes x $SLURM_NTASKS tasks," \
  "master $MASTER_ADDR:$MASTER_PORT, $PYTHON $REPO/pretrain/train.py ${args[*]}"
mkdir -p "$RUN_DIR"

# Each attempt's failed tasks leave one line each here (slurm/task.sh): the first one is named.
restarts=${SLURM_RESTART_COUNT:-0}
export FAILURE_DIR=$RUN_DIR/failures/$SLURM_JOB_ID.$restarts
rm -rf "$FAILURE_DIR" && mkdir -p "$FAILURE_DIR"
newest_checkpoint() { cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none; }
started_from=$(newest_checkpoint)

signalled="" step=""
forward() {  # forward a signal to the training step; srun relays it to every task
  [[ -n $step ]] || return 0  # the step has ended (e.g. the TERM of this script's own requeue)
  signalled=$1
  log "got SIG$1: asking the trainer to checkpoint and exit"
  kill -s "$1" "$step" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# One task per GPU (per process on CPU); the step runs in the background so the traps fire at once.
# (srun's "Node failure on NODE" errors are also kept: a node SLURM gave up on is a lost node; the
# filter ignores the signals sent to the batch step, which would otherwise break srun's stderr)
srun --kill-on-bad-exit=1 "$REPO/slurm/task.sh" "$PYTHON" "$REPO/pretrain/train.py" "${args[@]}" \
  2> >(trap '' USR1 TERM INT; tee >(grep --line-buffered -oP 'Node failure on \K\S+' >"$FAILURE_DIR/node_failures") >&2) &
step=$!
while kill -0 "$step" 2>/dev/null; do wait "$step"; done  # a trap interrupts `wait`: wait again
wait "$step"  # bash keeps the exit status of a finished background job
status=$? step=""
log "training step exited with status $status"

lost_nodes() {  # the allocation's nodes SLURM marks down or not responding (*), else where a
  # one-task step cannot run (PROBE_TIMEOUT_S each): a dead node is found before SlurmdTimeout
  local lost node
  lost=$( { sinfo -h -N -n "$SLURM_JOB_NODELIST" -o '%N %t' | awk '$2 ~ /[*]$|^down|^fail/ {print $1}'
    cat "$FAILURE_DIR/node_failures" 2>/dev/null; } | sort -u)
  if [[ -z $lost && -z $signalled ]]; then
    lost=$(for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
      timeout "${PROBE_TIMEOUT_S:-30}" srun --nodes=1 --ntasks=1 --cpus-per-task=1 --nodelist="$node" \
        --kill-on-bad-exit=1 true >/dev/null 2>&1 || echo "$node" &
    done | sort)
  fi
  echo $lost
}

first_failure() {  # the earliest line of the tasks' failure records, in words
  local t rank node how last
  IFS=$'\t' read -r t rank node how last < <(sort -n "$FAILURE_DIR"/rank* 2>/dev/null | head -n 1) || true
  if [[ -n ${t:-} ]]; then
    echo "rank $rank on node $node failed first ($how at $(date -u -d "@$t" +%T.%3N)); its last error line: $last"
  fi
}

requeue() {  # requeue WHY...: this job goes back to the queue, same id and log; the first
  # failure, if any, is logged before: the requeue ends this script
  requeued=1
  log "requeueing (restart $((restarts + 1)) of at most $MAX_REQUEUES): $*"
  [[ -z ${first+x} ]] || log "first failure: ${first:-no task left a record (see the srun errors above)}"
  local err
  if ! err=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
    if [[ $err == *"pending execution"* ]]; then
      log "SLURM has already requeued the job (a node failure): it comes back by itself"
    else
      log "requeue refused ($err; --no-requeue or JobRequeue=0?): submit the same command again to resume"
      status=1
    fi
  fi
}

if [[ $signalled == USR1 ]]; then
  if ((status != 0)); then
    log "not requeueing: the step failed after the signal (status $status); see the trainer's log above"
  elif ((restarts >= MAX_REQUEUES)); then
    log "not requeueing: already restarted $restarts times (MAX_REQUEUES=$MAX_REQUEUES); resubmit by hand to go on"
    status=1
  else
    requeue "checkpoint saved after SIGUSR1; a 'CANCELLED ... DUE TO JOB REQUEUE' line from slurmstepd may follow: expected"
  fi
elif ((status != 0)); then
  # A failed step. Whether the job comes back must not depend on who is faster: SLURM requeues a
  # --requeue job for a node failure only once it has marked the node down (SlurmdTimeout), which
  # may come after this script has exited. So decide here, explicitly:
  first=$(first_failure)
  lost=$(lost_nodes)
  now=$(newest_checkpoint)
  refused=$(cut -f5 "$FAILURE_DIR"/rank* 2>/dev/null | grep -m1 '^train.py: ' || true)
  # an attempt that lost a node, or that SLURM ended (node failure, preemption), leaves a note
  before=$(cat "$RUN_DIR/failures/$SLURM_JOB_ID.$((restarts - 1))/ended" 2>/dev/null || true)
  if [[ -n $lost ]]; then echo "lost node(s) $lost" >"$FAILURE_DIR/ended"
  elif [[ -n $signalled ]]; then echo "was ended by SLURM (SIG$signalled)" >"$FAILURE_DIR/ended"; fi
  [[ -n $lost ]] && first="node(s) $lost lost (no step can run there)${first:+; before that was noticed: $first}"
  if [[ $signalled == TERM ]]; then
    log "not requeueing here: SIGTERM came from SLURM (preemption or node failure: SLURM requeues a --requeue job itself; scancel: ended)"
  elif ((restarts >= MAX_REQUEUES)); then
    log "not requeueing: already restarted $restarts times (MAX_REQUEUES=$MAX_REQUEUES); resubmit by hand to go on"
  elif [[ -n $lost ]]; then
    requeue "the allocation lost node(s) $lost; the job waits for the nodes and resumes from the newest verified checkpoint ($now)"
  elif [[ -n $refused ]]; then
    log "not requeueing: the trainer stopped the run itself, not a crash ($refused)"
  elif [[ $now != "$started_from" ]]; then
    requeue "a failed step with a newer checkpoint ($now) than this attempt started from ($started_from); a crash that repeats at the same step is not requeued again"
  elif [[ -n $before ]]; then
    # SLURM sends the lost attempt's termination to a node that was down once it answers again,
    # up to a minute later, and it ends this attempt's tasks there too (same job id)
    requeue "the previous attempt $before, and SLURM's late cleanup of that attempt on a node that returns ends this one's tasks there: once more"
  else
    log "not requeueing: the step failed with no checkpoint newer than the one this attempt started from ($started_from), so a requeue would repeat the same crash; fix the cause and submit the same command again to resume"
  fi
  [[ -n ${requeued:-} ]] || log "first failure: ${first:-no task left a record (see the srun errors above)}"
fi
exit "$status"
