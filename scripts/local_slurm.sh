#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian's slurm-wlm + munge), for the tests of
# experiments/slurm/ (tests/test_slurm_cluster.py) and for trying the sbatch templates by hand:
#
#   sudo scripts/local_slurm.sh install   # apt-get install slurm-wlm munge
#   sudo scripts/local_slurm.sh start     # munged, slurmctld, slurmd; waits until the node is idle
#   sudo scripts/local_slurm.sh stop
#
# Needs root (the daemons run as root). The node offers this machine's cores and memory, no GPUs,
# in one partition `local`. State lives in /var/spool/slurm-arvae; logs in /var/log/slurm-arvae.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurm-arvae
LOGS=/var/log/slurm-arvae

install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge || { apt-get update -q && apt-get install -y -q slurm-wlm munge; }
}

write_conf() {
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    memory=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10))
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
    cat >"$CONF" <<EOF
# written by arvae's scripts/local_slurm.sh: one node, this machine
ClusterName=arvae-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    command -v slurmctld >/dev/null || { echo "slurm-wlm is not installed: run '$0 install' first" >&2; exit 1; }
    write_conf
    [ -s /etc/munge/munge.key ] || mungekey --create --force
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "the SLURM node did not become idle within 60 s; see $LOGS/" >&2
    sinfo >&2 || true
    tail -n 20 "$LOGS"/*.log >&2 || true
    exit 1
}

stop() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
    pkill -x munged || true
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
