#!/usr/bin/env bash
# Start a Docker daemon for CI / the docker tests, if none answers yet.
#
# The daemon runs WITHOUT the default bridge network: `--bridge=none --iptables=false
# --ip-masq=false`. The default docker0 bridge would claim a private address range, which is
# not allowed on the CI/dev machines. Consequences: containers get only `--network none`
# (isolated) or `--network host`; builds must use `docker build --network host`.
#
# Idempotent: if `docker info` already works, it does nothing. Otherwise it starts dockerd in
# the background (nohup, log in $DOCKERD_LOG) and waits up to $DOCKERD_WAIT_S seconds.
#
# Variables (all optional):
#   DOCKERD_LOG     dockerd log file              (default /var/log/dockerd-ci.log)
#   DOCKERD_WAIT_S  seconds to wait for the daemon (default 60)
#   DOCKERD_ARGS    extra dockerd arguments        (default empty; e.g. "--data-root /mnt/docker")
#
# Exit status: 0 when `docker info` works at the end, 1 otherwise (dockerd log tail printed).
set -euo pipefail

DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd-ci.log}"
DOCKERD_WAIT_S="${DOCKERD_WAIT_S:-60}"
DOCKERD_ARGS="${DOCKERD_ARGS:-}"

log() { printf '[start-dockerd] %s\n' "$*" >&2; }

if ! command -v docker >/dev/null 2>&1; then
    log "docker CLI not found (apt-get install -y docker.io)"
    exit 1
fi

if docker info >/dev/null 2>&1; then
    log "a Docker daemon already answers; nothing to do"
    if ip link show docker0 >/dev/null 2>&1; then
        log "WARNING: a docker0 bridge exists: this daemon was started with the default bridge;"
        log "WARNING: it should run with --bridge=none (see this script). Not touching it."
    fi
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
    log "dockerd not found (apt-get install -y docker.io)"
    exit 1
fi

if ip link show docker0 >/dev/null 2>&1; then
    log "ERROR: a docker0 bridge exists but no daemon answers; something is wrong."
    log "ERROR: remove it (ip link delete docker0) after checking what created it."
    exit 1
fi

pidfile=/var/run/docker.pid

# The pid in pid file $1 if that process is alive and named $2: not a zombie (a killed
# daemon whose parent does not reap it still answers `kill -0`), and the right program
# (pids get reused).
live_pid() {
    local pid state
    pid="$(cat "$1" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == "$2" ]] || return 1
    echo "$pid"
}
dockerd_pid() { live_pid "$pidfile" dockerd; }

# 0: the daemon answers; 1: timeout; 2: the dockerd process is gone.
wait_for_daemon() {
    local deadline=$((SECONDS + DOCKERD_WAIT_S))
    until docker info >/dev/null 2>&1; do
        dockerd_pid >/dev/null || return 2
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

rc=2
if pid="$(dockerd_pid)"; then
    log "dockerd (pid $pid) runs but does not answer yet; waiting up to ${DOCKERD_WAIT_S}s"
    wait_for_daemon && rc=0 || rc=$?
fi
# Up to 3 tries: right after a daemon was killed, its containerd may linger for a moment and
# make the new dockerd give up ("timeout waiting for containerd to start").
containerd_pidfile=/var/run/docker/containerd/containerd.pid
for attempt in 1 2 3; do
    ((rc == 2)) || break
    if [[ -e "$pidfile" ]]; then
        log "removing stale $pidfile"
        rm -f "$pidfile"
    fi
    if [[ -e "$containerd_pidfile" ]] && ! live_pid "$containerd_pidfile" containerd >/dev/null; then
        log "removing stale $containerd_pidfile"
        rm -f "$containerd_pidfile"
    fi
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    log "starting dockerd --bridge=none --iptables=false --ip-masq=false (try $attempt, log: $DOCKERD_LOG)"
    # shellcheck disable=SC2086  # DOCKERD_ARGS is intentionally word-split
    nohup dockerd --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
        $DOCKERD_ARGS >>"$DOCKERD_LOG" 2>&1 </dev/null &
    disown || true
    # give it a moment to write its pid file before wait_for_daemon looks for the process
    for _ in $(seq 50); do
        dockerd_pid >/dev/null && break
        sleep 0.1
    done
    wait_for_daemon && rc=0 || rc=$?
    if ((rc == 2 && attempt < 3)); then sleep 3; fi
done
if ((rc != 0)); then
    if ((rc == 1)); then
        log "dockerd did not answer within ${DOCKERD_WAIT_S}s; last log lines:"
    else
        log "dockerd exited; last log lines:"
    fi
    tail -n 30 "$DOCKERD_LOG" >&2 || true
    exit 1
fi

if ip link show docker0 >/dev/null 2>&1; then
    log "ERROR: docker0 bridge appeared although dockerd ran with --bridge=none"
    exit 1
fi
log "dockerd ready after ${SECONDS}s ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
