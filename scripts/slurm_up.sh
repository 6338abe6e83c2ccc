#!/usr/bin/env bash
# Start a throw-away single-node Slurm (munge + slurmctld + slurmd) on this machine.
#
# Used by tests/test_slurm_real.py and CI. Idempotent: if the daemons started by a
# previous run are alive and the node answers, it only rewrites the env file.
#
#   scripts/slurm_up.sh            # state in $MPIEP_SLURM_DIR (default /tmp/mpiep-slurm)
#   source /tmp/mpiep-slurm/env.sh # exports SLURM_CONF for sbatch/srun/squeue/sinfo
#   scripts/slurm_down.sh          # stops what this script started, by PID
#
# Installs slurm-wlm and munge with apt-get when they are missing and we are root.
# Exit codes: 0 ready, 3 cannot install or start (message on stderr), 4 timed out.
set -euo pipefail

DIR="${MPIEP_SLURM_DIR:-/tmp/mpiep-slurm}"
WAIT_S="${MPIEP_SLURM_WAIT_S:-60}"
mkdir -p "$DIR"/{state,spool,log,run,munge}
CONF="$DIR/slurm.conf"
ENV_FILE="$DIR/env.sh"

die() { echo "slurm_up: $*" >&2; exit "${2:-3}"; }
log() { echo "slurm_up: $*" >&2; }

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "slurm-wlm/munge are not installed and we are not root"
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get install -y -q slurm-wlm munge >"$DIR/log/apt.log" 2>&1 \
        || { timeout 300 apt-get update -q >>"$DIR/log/apt.log" 2>&1 \
            && timeout 600 apt-get install -y -q slurm-wlm munge >>"$DIR/log/apt.log" 2>&1; } \
        || die "apt-get install slurm-wlm munge failed (see $DIR/log/apt.log)"
}

write_env() {
    cat >"$ENV_FILE" <<EOF
# written by scripts/slurm_up.sh
export SLURM_CONF=$CONF
export MPIEP_SLURM_DIR=$DIR
EOF
    cat "$ENV_FILE"
}

node_idle() {
    local state
    state="$(SLURM_CONF="$CONF" timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)"
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && node_idle; then
    log "already running"
    write_env
    exit 0
fi

[[ $EUID -eq 0 ]] || die "must run as root to start munged/slurmctld/slurmd"
install_if_missing

HOST="$(hostname -s)"
CPUS="$(nproc --all)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"

# --- munge -----------------------------------------------------------------------------
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge "$MUNGE_DIR"
chmod 0755 /run/munge "$MUNGE_DIR"
if ! alive "$MUNGE_DIR/munged.pid"; then
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    runuser -u munge -- /usr/sbin/munged --force --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        || die "munged did not start (see $MUNGE_DIR/munged.log)"
fi
for _ in $(seq 50); do [[ -S "$MUNGE_SOCKET" ]] && break; sleep 0.1; done
[[ -S "$MUNGE_SOCKET" ]] || die "munged socket $MUNGE_SOCKET did not appear"
# Slurm's auth/munge plugin finds the socket through AuthInfo below.

# --- slurm.conf ------------------------------------------------------------------------
cat >"$CONF" <<EOF
# one-node Slurm for mpiep tests, written by scripts/slurm_up.sh
ClusterName=mpiep
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${MPIEP_SLURMCTLD_PORT:-6817}
SlurmdPort=${MPIEP_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF

export SLURM_CONF="$CONF"
alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF" \
    || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF" \
    || die "slurmd did not start (see $DIR/log/slurmd.log)"

for _ in $(seq "$((WAIT_S * 2))"); do
    if node_idle; then
        log "node $HOST ready ($CPUS CPUs)"
        write_env
        exit 0
    fi
    # A node left DOWN by an earlier run comes back with an explicit resume.
    timeout 5 scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 0.5
done
tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
die "node $HOST not idle after ${WAIT_S}s" 4
