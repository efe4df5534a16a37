#!/usr/bin/env bash
# Single-node SLURM "cluster" on localhost for CI, from Debian's slurm-wlm (22.05).
#
#   bash scripts/slurm_localhost.sh start    # install if needed, configure, start, wait for idle node
#   bash scripts/slurm_localhost.sh stop     # stop slurmctld, slurmd and munged
#   bash scripts/slurm_localhost.sh status   # sinfo / squeue
#
# No systemd needed: munged, slurmctld and slurmd run as plain background daemons.
# Needs root (re-executes itself with sudo when available). No cgroups, no accounting.
# `start` is idempotent: when the node already answers as usable it does nothing.
set -euo pipefail

[[ $EUID -eq 0 ]] || { command -v sudo >/dev/null && exec sudo -E bash "$0" "$@"; echo "slurm_localhost: needs root (or sudo)" >&2; exit 1; }

ETC=/etc/slurm                                      # where Debian's slurm looks for slurm.conf
STATE=${SLURM_LOCALHOST_STATE:-/var/spool/slurm-localhost}  # state, pid and log files
TIMEOUT=${SLURM_LOCALHOST_TIMEOUT:-60}              # seconds to wait for the node to come up

die() { echo "slurm_localhost: $*" >&2; exit 1; }
log() { echo "slurm_localhost: $*"; }

# Node state as sinfo reports it ("idle", "down*", ...); empty if slurmctld does not answer.
node_state() { timeout 10 sinfo -h -N -o %T 2>/dev/null | head -n1 || true; }
usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }   # a trailing '*' means not responding

# Is the daemon whose pid is in file $1 alive? (zombies count as dead: a container's PID 1 may not reap them)
alive() {
  local p st; p=$(cat "$1" 2>/dev/null) && [[ -n $p ]] && read -r _ _ st _ < "/proc/$p/stat" 2>/dev/null && [[ $st != Z ]]
}

install_slurm() {
  command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null && return
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  # Refresh the package lists only when they are missing (fresh container).
  compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null || apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
  # Slurm's standard auth. (22.05 still ships auth/none + cred/none, which also work here,
  # but they let any local user act as any other, and later Slurm versions drop them.)
  [[ -s /etc/munge/munge.key ]] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  alive /run/munge/munged.pid && return
  runuser -u munge -- /usr/sbin/munged --force    # --force: ignore a stale socket from a killed run
  munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

write_conf() {
  # Node line from the real hardware: "NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..".
  local node; node=$(slurmd -C | head -n1 | sed 's/ UpTime=.*//')
  [[ $node == NodeName=* ]] || die "slurmd -C failed: $node"
  local host=${node%% *}; host=${host#NodeName=}
  local mem=${node##*RealMemory=} cpus=${node#*CPUs=}; mem=${mem%% *}; cpus=${cpus%% *}
  mkdir -p "$ETC" "$STATE/ctld" "$STATE/d"
  # Addresses are pinned to 127.0.0.1 so the container's hostname need not resolve.
  cat > "$ETC/slurm.conf" <<EOF
# Written by scripts/slurm_localhost.sh -- single node on localhost, for CI.
ClusterName=localhost
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs without --mem get their CPU share of memory, not the whole node (so they can run side by side).
DefMemPerCPU=$((mem / cpus))
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=30
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install_slurm
  # (sinfo hangs for seconds when slurmctld is down, so check its pid first)
  if alive /run/munge/munged.pid && alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && usable; then log "already running ($(node_state))"; return; fi
  start_munge
  write_conf
  alive "$STATE/slurmctld.pid" || slurmctld || die "slurmctld failed to start; see $STATE/slurmctld.log"
  alive "$STATE/slurmd.pid"    || slurmd    || die "slurmd failed to start; see $STATE/slurmd.log"
  local t
  for ((t = 0; t < TIMEOUT; t++)); do
    usable && { log "node is $(node_state) after ${t}s"; sinfo; return; }
    # A node left down/drained by a previous unclean stop: put it back in service.
    if [[ $(node_state) =~ ^(down|drain) ]]; then scontrol update NodeName=ALL State=RESUME 2>/dev/null || true; fi
    sleep 1
  done
  echo "--- sinfo:"; sinfo -N -l 2>&1 || true
  for f in slurmctld slurmd; do echo "--- tail $STATE/$f.log:"; grep -v pmix "$STATE/$f.log" 2>/dev/null | tail -n 15 || true; done
  die "node not usable after ${TIMEOUT}s (state: '$(node_state)')"
}

stop() {
  local f
  for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    alive "$f" || continue
    kill "$(cat "$f")" 2>/dev/null || true
    for _ in {1..30}; do alive "$f" || break; sleep 0.5; done
    ! alive "$f" || kill -9 "$(cat "$f")"
  done
  log "stopped"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
