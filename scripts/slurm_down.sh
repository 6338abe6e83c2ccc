#!/usr/bin/env bash
# Stop the daemons started by scripts/slurm_up.sh, by the PIDs it recorded.
set -uo pipefail

DIR="${MPIEP_SLURM_DIR:-/tmp/mpiep-slurm}"

stop() {
    local name="$1" pidfile="$2" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "slurm_down: $name ($pid) ignored SIGTERM, sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
        echo "slurm_down: stopped $name ($pid)" >&2
    fi
    rm -f "$pidfile"
}

stop slurmd "$DIR/run/slurmd.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
stop munged "$DIR/munge/munged.pid"
exit 0
