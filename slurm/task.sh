#!/usr/bin/env bash
# One task of a training step: slurm/pretrain_1p3b.sh runs `srun ... slurm/task.sh python train.py ...`.
# It runs the command, passes SIGUSR1/SIGTERM on to it, and when the command fails (an error, a
# crash, a kill) writes one line to $FAILURE_DIR/rank<N>: the time it ended, its rank, its node,
# how it ended and the last line it wrote to stderr. The batch script reads these lines to name
# the rank that failed first (the others usually fail after it, on a broken connection).
set -uo pipefail

err=$(mktemp)
# stderr still reaches the job's log, and a copy gives the last line; tee ignores the signals that
# SLURM sends to every process of the step (a dead tee would break the trainer's stderr)
exec 3> >(trap '' USR1 TERM INT; exec tee "$err" >&2)
tee_pid=$!
"$@" 2>&3 3>&- &
child=$!
trap 'kill -s USR1 "$child" 2>/dev/null' USR1
trap 'kill -s TERM "$child" 2>/dev/null' TERM
while kill -0 "$child" 2>/dev/null; do wait "$child"; done  # a trap interrupts `wait`: wait again
wait "$child"
status=$?
ended=$(date +%s.%N)
exec 3>&-
wait "$tee_pid" 2>/dev/null
if ((status != 0)) && [[ -n ${FAILURE_DIR:-} ]]; then
  if ((status > 128)); then how="killed by SIG$(kill -l $((status - 128)))"; else how="exit status $status"; fi
  # the last line that reads as an error (progress bars redraw with \r), else the last line
  lines=$(tr '\r\t' '\n ' <"$err" | grep -v '^[[:space:]]*$')
  last=$(grep -E 'Error|Exception|error|train\.py: ' <<<"$lines" | tail -n 1)
  last=${last:-$(tail -n 1 <<<"$lines")}
  printf '%s\t%s\t%s\t%s\t%s\n' "$ended" "${SLURM_PROCID:-?}" "${SLURMD_NODENAME:-$(hostname)}" "$how" \
    "${last:-(nothing on stderr)}" >"$FAILURE_DIR/rank${SLURM_PROCID:-0}"
fi
rm -f "$err"
exit "$status"
