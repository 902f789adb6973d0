#!/usr/bin/env bash
# A real SLURM (controller, node daemons, accounting) on one Debian machine, for the tests and for
# trying slurm/*.sh locally: one node (the machine), or two (`--nodes 2`: two slurmd on 127.0.0.1,
# n1 and n2, sharing the machine's cores). Idempotent: `start` with the cluster up returns at once.
#
#   sudo slurm/local_cluster.sh [--nodes 2] [start]   # install missing Debian packages, start, wait until idle
#   sudo slurm/local_cluster.sh [--nodes 2] stop      # stop the daemons this script started
#   slurm/local_cluster.sh [--nodes 2] status         # one line; exit 0 when nodes and accounting are up
#   slurm/local_cluster.sh [--nodes 2] env            # print `export SLURM_CONF=...` for your shell
#
# Each cluster has its own state, config and logs in $SLURM_LOCAL_DIR (default /tmp/alibi-slurm for
# one node, /tmp/alibi-slurm-2n for two) and its own ports (one node: SLURM's defaults 6817-6819 and
# MariaDB on 6820; two nodes: 7817-7822 and its own munged socket), so both can run at once.
# No systemd: the daemons (munged, mariadbd, slurmdbd, slurmctld, slurmd) run as plain processes.
# Accounting (slurmdbd + MariaDB) is there because submitit reads job states through `sacct`.
# Exit status 3 means "cannot run here" (not root, or packages missing and no apt-get): tests skip.
set -euo pipefail

NODES=1 ACTION=start
while (($#)); do
  case $1 in
    --nodes) NODES=${2:?--nodes needs 1 or 2}; shift 2 ;;
    --nodes=*) NODES=${1#*=}; shift ;;
    *) ACTION=$1; shift ;;
  esac
done
[[ $NODES == 1 || $NODES == 2 ]] || { echo "local_cluster: --nodes $NODES: only 1 or 2 nodes" >&2; exit 2; }
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server mariadb-client)
if ((NODES == 1)); then
  DIR=${SLURM_LOCAL_DIR:-/tmp/alibi-slurm}
  DB_PORT=${SLURM_LOCAL_DB_PORT:-6820}
  CLUSTER=alibi
  HOST=$(hostname -s)
  NODE_NAMES=("$HOST")
  MUNGE_SOCKET=/run/munge/munge.socket.2  # the machine's munged, started if none runs
else
  DIR=${SLURM_LOCAL_DIR:-/tmp/alibi-slurm-2n}
  PORT=${SLURM_LOCAL_PORT:-7817}  # slurmctld; slurmdbd +1, MariaDB +2, slurmd n1 +3, n2 +4
  DB_PORT=$((PORT + 2))
  CLUSTER=alibi2n
  NODE_NAMES=(n1 n2)
  MUNGE_SOCKET=$DIR/munge/munge.socket  # its own munged: stopping another cluster never cuts this one off
fi
export SLURM_CONF=$DIR/etc/slurm.conf

log() { echo "local_cluster: $*" >&2; }
cannot() { log "$*"; exit 3; }
running() { [[ $(ps -o stat= -p "$1" 2>/dev/null) =~ ^[^Z] ]]; }  # running PID (a zombie is not)
daemon_pid() {  # daemon_pid DIR/NAME.pid: print the pid if it runs and is NAME* (not a reused pid)
  local pid name
  pid=$(cat "$1" 2>/dev/null) && [[ -n $pid ]] || return 1
  name=$(basename "$1" .pid)
  name=${name%%.*}  # slurmd.n1.pid: slurmd
  [[ $(ps -o stat=,comm= -p "$pid" 2>/dev/null) =~ ^[^Z][^[:space:]]*[[:space:]]+$name ]] && echo "$pid"
}
alive() { daemon_pid "$1" >/dev/null; }
node_state() { timeout 5 sinfo -h -N -n "$1" -o %t 2>/dev/null | head -n 1; }
node_up() {  # every node answers and can take jobs
  local n
  for n in "${NODE_NAMES[@]}"; do [[ $(node_state "$n") =~ ^(idle|mix|alloc) ]] || return 1; done
}
accounting_up() { timeout 10 sacctmgr -n list cluster >/dev/null 2>&1; }
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
  local auth="" common nodes
  [[ $NODES == 1 ]] || auth=",socket=$MUNGE_SOCKET"
  # shared by both shapes; cred_expire=10: a requeued job can start as soon as the old job's
  # credential expires (default 120 s)
  common="SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10$auth
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
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
InactiveLimit=0"
  if ((NODES == 1)); then
    local node
    node=$(slurmd -C | head -n 1)  # NodeName=vm CPUs=2 Boards=1 ... RealMemory=23960
    nodes="ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log
KillWait=10
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  else
    # Two slurmd on one machine (Debian's slurmd is built with multiple-slurmd; %n is the node
    # name). CPUs need not match the hardware (config_overrides): both nodes share the real cores.
    # SlurmdTimeout=10: a node that stops answering is marked down ~15 s later.
    local cpus=$(($(nproc) < 2 ? 2 : $(nproc)))
    nodes="ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 3))
AccountingStoragePort=$((PORT + 1))
# the munged socket for talking to slurmdbd (AuthInfo's is not used for that)
AccountingStoragePass=$MUNGE_SOCKET
SlurmdParameters=config_overrides
SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmdTimeout=10
SlurmctldTimeout=10
# job ids (and so the jobs' MASTER_PORTs) apart from the one-node cluster's
FirstJobId=2501
# longer than KillWait: a slurmd answers a job's termination only after killing it, and an
# answer that times out makes slurmctld send the termination again a minute later (same job
# id: it would end the requeued job's tasks too)
MessageTimeout=20
KillWait=5
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=localhost Port=$((PORT + 3)) CPUs=$cpus RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=localhost Port=$((PORT + 4)) CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=main Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP"
    mkdir -p "$DIR"/spool/{n1,n2}
  fi
  printf '# Written by slurm/local_cluster.sh: %s node(s), fast scheduling and requeue (see docs/slurm.md).\n%s\n%s\n' \
    "$NODES" "$nodes" "$common" >"$SLURM_CONF"
  local dbd=$DIR/etc/slurmdbd.conf
  {
    echo "AuthType=auth/munge"
    [[ -z $auth ]] || echo "AuthInfo=${auth#,}"
    [[ $NODES == 1 ]] || echo "DbdPort=$((PORT + 1))"
    cat <<EOF
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
  } >"$dbd"
  chmod 600 "$dbd"
  # plain `sinfo` works without SLURM_CONF when no other SLURM owns /etc/slurm/slurm.conf
  if ((NODES == 1)) && [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]] && [[ -d /etc/slurm ]]; then
    ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf
  fi
}

munge_ok() { munge -n -S "$MUNGE_SOCKET" </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
  munge_ok && return 0
  install -d -o munge -g munge -m 0755 /run/munge
  chown munge:munge "$DIR/munge"
  [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key && chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" --force
  wait_for 10 munged munge_ok
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

slurmd_pidfile() {  # slurmd_pidfile NODE
  if ((NODES == 1)); then echo "$DIR/run/slurmd.pid"; else echo "$DIR/run/slurmd.$1.pid"; fi
}

daemons_up() {
  local n
  alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmdbd.pid" || return 1
  for n in "${NODE_NAMES[@]}"; do alive "$(slurmd_pidfile "$n")" || return 1; done
}

start() {
  if daemons_up && node_up && accounting_up; then log "already running ($SLURM_CONF)"; return 0; fi
  ((EUID == 0)) || cannot "the cluster is not running and starting its daemons needs root: sudo $0 start"
  install_packages
  local t0=$SECONDS n
  write_config
  start_munge
  start_mariadb
  alive "$DIR/run/slurmdbd.pid" || slurmdbd </dev/null >>"$DIR/log/slurmdbd.out" 2>&1
  wait_for 30 slurmdbd accounting_up
  [[ -n $(sacctmgr -n -P list cluster format=cluster "cluster=$CLUSTER") ]] || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  alive "$DIR/run/slurmctld.pid" || slurmctld </dev/null >>"$DIR/log/slurmctld.out" 2>&1
  for n in "${NODE_NAMES[@]}"; do
    alive "$(slurmd_pidfile "$n")" && continue
    if ((NODES == 1)); then slurmd; else slurmd -N "$n"; fi </dev/null >>"$DIR/log/slurmd.$n.out" 2>&1
  done
  sleep 1
  # a job still completing when the daemons were killed leaves a node 'comp' (or down) in the
  # saved state, and every job then waits on it: no job can run here yet, so clear it
  for n in "${NODE_NAMES[@]}"; do
    if [[ $(node_state "$n") =~ ^(comp|down|drain) ]]; then
      scontrol update nodename="$n" state=down reason="local_cluster.sh restart" &&
        scontrol update nodename="$n" state=resume && log "cleared node $n left over from a stopped job"
    fi
  done
  wait_for 30 "nodes ${NODE_NAMES[*]}" node_up
  log "ready in $((SECONDS - t0)) s: export SLURM_CONF=$SLURM_CONF"
}

stop() {
  local pidfile pid n pidfiles=()
  if alive "$DIR/run/slurmctld.pid" && [[ -n $(squeue -h -o %A 2>/dev/null) ]]; then
    scancel --full $(squeue -h -o %A) 2>/dev/null  # jobs end before their daemons do
    for _ in $(seq 100); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.1; done
  fi
  for n in "${NODE_NAMES[@]}"; do pidfiles+=("$(slurmd_pidfile "$n")"); done
  for pidfile in "${pidfiles[@]}" "$DIR"/run/slurmctld.pid "$DIR"/run/slurmdbd.pid \
    "$DIR"/db/mariadb.pid "$DIR"/munge/munged.pid; do
    pid=$(daemon_pid "$pidfile") || continue
    kill "$pid"
    for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
    log "stopped $(basename "$pidfile" .pid)"
  done
}

status() {  # one line: each node's state and whether accounting answers; exit 0 when all are up
  local n states="" ok=0 acct="accounting up (slurmdbd, mariadbd)"
  for n in "${NODE_NAMES[@]}"; do states+=" $n=$(node_state "$n" || true)"; done
  node_up || ok=1
  if ! accounting_up; then
    ok=1 acct="accounting DOWN:"
    alive "$DIR/run/slurmdbd.pid" || acct+=" slurmdbd not running"
    alive "$DIR/db/mariadb.pid" || acct+=" mariadbd not running"
    acct+=" (sacct and submitit cannot see jobs; restart: sudo $0 --nodes $NODES start)"
  fi
  echo "local_cluster ($NODES node(s), $SLURM_CONF):$states; $acct"
  return $ok
}

case $ACTION in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 [--nodes 1|2] [start|stop|status|env]" >&2; exit 2 ;;
esac
