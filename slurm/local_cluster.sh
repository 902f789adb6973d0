#!/usr/bin/env bash
# A real one-node SLURM (controller, node daemon, accounting) on a Debian machine, for the tests
# and for trying slurm/*.sh locally. Idempotent: a second `start` with the cluster up returns at once.
#
#   sudo slurm/local_cluster.sh [start]   # install missing Debian packages, start, wait until idle
#   sudo slurm/local_cluster.sh stop      # stop the daemons this script started
#   slurm/local_cluster.sh status         # exit 0 when the node is up
#   slurm/local_cluster.sh env            # print `export SLURM_CONF=...` for your shell
#
# State, config and logs live in $SLURM_LOCAL_DIR (default /tmp/alibi-slurm). No systemd: the daemons
# (munged, mariadbd, slurmdbd, slurmctld, slurmd) run in the background as plain processes.
# Accounting (slurmdbd + MariaDB) is there because submitit reads job states through `sacct`.
# Exit status 3 means "cannot run here" (not root, or packages missing and no apt-get): tests skip.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/alibi-slurm}
DB_PORT=${SLURM_LOCAL_DB_PORT:-6820}
CLUSTER=alibi
export SLURM_CONF=$DIR/etc/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server mariadb-client)
HOST=$(hostname -s)

log() { echo "local_cluster: $*" >&2; }
cannot() { log "$*"; exit 3; }
running() { [[ $(ps -o stat= -p "$1" 2>/dev/null) =~ ^[^Z] ]]; }  # running PID (a zombie is not)
daemon_pid() {  # daemon_pid DIR/NAME.pid: print the pid if it runs and is NAME* (not a reused pid)
  local pid name
  pid=$(cat "$1" 2>/dev/null) && [[ -n $pid ]] || return 1
  name=$(basename "$1" .pid)
  [[ $(ps -o stat=,comm= -p "$pid" 2>/dev/null) =~ ^[^Z][^[:space:]]*[[:space:]]+$name ]] && echo "$pid"
}
alive() { daemon_pid "$1" >/dev/null; }
node_up() { [[ $(timeout 5 sinfo -h -n "$HOST" -o %t 2>/dev/null) =~ ^(idle|mix|alloc) ]]; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll every 0.2 s
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "$what not ready after timeout; logs in $DIR/log"; tail -n 20 "$DIR"/log/*.log "$DIR"/db/mariadb.log "$DIR"/munge/munged.log >&2 2>/dev/null || true; exit 1; }
    sleep 0.2
  done
}

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged slurmdbd mariadbd mariadb-install-db; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  ((${#missing[@]} == 0)) && return 0
  ((EUID == 0)) || cannot "missing ${missing[*]}: run as root (sudo) so that apt-get can install ${PACKAGES[*]}"
  command -v apt-get >/dev/null || cannot "missing ${missing[*]} and no apt-get: install ${PACKAGES[*]} by hand"
  log "installing ${PACKAGES[*]} from Debian (missing: ${missing[*]})"
  local t0=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # keep the packages' init scripts from starting system-wide daemons (no slurm.conf yet): we start
  # our own below. Docker-style images already have this policy; elsewhere it is set for the install.
  local policy=/usr/sbin/policy-rc.d own_policy=""
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
  fi
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null || { [[ -z $own_policy ]] || rm -f "$policy"; exit 1; }
  [[ -z $own_policy ]] || rm -f "$policy"
  log "installed in $((SECONDS - t0)) s"
}

write_config() {
  mkdir -p "$DIR"/{etc,log,run,state,spool,db,munge}
  local node
  node=$(slurmd -C | head -n 1)  # NodeName=vm CPUs=2 Boards=1 ... RealMemory=23960
  cat >"$SLURM_CONF" <<EOF
# Written by slurm/local_cluster.sh: one node, fast scheduling and requeue (see docs/slurm.md).
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job can start as soon as the old job's credential expires (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# so that \`--gpus-per-node=0\` is a valid request on a node without GPUs
GresTypes=gpu
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
MinJobAge=300
KillWait=10
InactiveLimit=0
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  local dbd=$DIR/etc/slurmdbd.conf
  cat >"$dbd" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$dbd"
  # plain `sinfo` works without SLURM_CONF when no other SLURM owns /etc/slurm/slurm.conf
  if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]] && [[ -d /etc/slurm ]]; then
    ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf
  fi
}

start_munge() {
  [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null >/dev/null 2>&1 && return 0
  install -d -o munge -g munge -m 0755 /run/munge
  chown munge:munge "$DIR/munge"
  [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key && chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- munged --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --force
  wait_for 10 munged munge -n
}

start_mariadb() {
  local data=$DIR/db sock=$DIR/db/mysqld.sock
  if ! alive "$data/mariadb.pid"; then
    chown mysql:mysql "$data"
    [[ -d $data/mysql ]] || mariadb-install-db --user=mysql --datadir="$data" --skip-test-db \
      --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1
    setsid mariadbd --user=mysql --datadir="$data" --socket="$sock" --pid-file="$data/mariadb.pid" \
      --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --skip-log-bin \
      --log-error="$data/mariadb.log" </dev/null >/dev/null 2>&1 &
  fi
  wait_for 30 mariadbd mariadb --socket="$sock" -e 'select 1'
  mariadb --socket="$sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start() {
  if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && node_up && sacctmgr -n list cluster >/dev/null 2>&1; then log "already running ($SLURM_CONF)"; return 0; fi
  ((EUID == 0)) || cannot "the cluster is not running and starting its daemons needs root: sudo $0 start"
  install_packages
  local t0=$SECONDS
  write_config
  start_munge
  start_mariadb
  alive "$DIR/run/slurmdbd.pid" || slurmdbd </dev/null >>"$DIR/log/slurmdbd.out" 2>&1
  wait_for 30 slurmdbd sacctmgr -n list cluster
  [[ -n $(sacctmgr -n -P list cluster format=cluster "cluster=$CLUSTER") ]] || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  alive "$DIR/run/slurmctld.pid" || slurmctld </dev/null >>"$DIR/log/slurmctld.out" 2>&1
  alive "$DIR/run/slurmd.pid" || slurmd </dev/null >>"$DIR/log/slurmd.out" 2>&1
  sleep 1
  # a job still completing when the daemons were killed leaves the node 'comp' (or down) in the
  # saved state, and every job then waits on it: no job can run here yet, so clear it
  if [[ $(timeout 5 sinfo -h -n "$HOST" -o %t 2>/dev/null) =~ ^(comp|down|drain) ]]; then
    scontrol update nodename="$HOST" state=down reason="local_cluster.sh restart" &&
      scontrol update nodename="$HOST" state=resume && log "cleared node $HOST left over from a stopped job"
  fi
  wait_for 30 "node $HOST" node_up
  log "ready in $((SECONDS - t0)) s: export SLURM_CONF=$SLURM_CONF"
}

stop() {
  local pidfile pid
  if alive "$DIR/run/slurmctld.pid" && [[ -n $(squeue -h -o %A 2>/dev/null) ]]; then
    scancel --full $(squeue -h -o %A) 2>/dev/null  # jobs end before their daemons do
    for _ in $(seq 100); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.1; done
  fi
  for pidfile in "$DIR"/run/slurmd.pid "$DIR"/run/slurmctld.pid "$DIR"/run/slurmdbd.pid \
    "$DIR"/db/mariadb.pid "$DIR"/munge/munged.pid; do
    pid=$(daemon_pid "$pidfile") || continue
    kill "$pid"
    for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
    log "stopped $(basename "$pidfile" .pid)"
  done
}

case ${1:-start} in
  start) start ;;
  stop) stop ;;
  status) node_up ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 [start|stop|status|env]" >&2; exit 2 ;;
esac
