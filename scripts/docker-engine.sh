#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine.
# There is no systemd here (nor on many CI hosts), so when no engine answers we
# start dockerd ourselves, fully detached so it outlives this script and `make`.
# Idempotent: does nothing when `docker info` already answers.
set -euo pipefail

LOG=/var/log/podtwin-dockerd.log

if docker info >/dev/null 2>&1; then
    echo "[docker] engine is running"
    exit 0
fi

# Debian's docker.io (20.10) brings dockerd, containerd and runc.
if ! command -v dockerd >/dev/null 2>&1; then
    echo "[docker] dockerd missing: installing docker.io with apt-get"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io
    # Where an init system exists, the package has started the engine already.
    if docker info >/dev/null 2>&1; then echo "[docker] engine is running"; exit 0; fi
fi

# A pid file left by a dead dockerd would make the new one refuse to start.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
fi

DPID=""
if [ -f /var/run/docker.pid ]; then
    echo "[docker] dockerd (pid $(cat /var/run/docker.pid)) is starting; waiting for it"
else
    echo "[docker] starting dockerd in the background (log: $LOG)"
    # setsid+nohup: own session, no controlling tty, immune to SIGHUP when make exits.
    # The log is appended to, never truncated, so earlier failures stay readable.
    setsid nohup dockerd >>"$LOG" 2>&1 </dev/null &
    DPID=$!
fi

for i in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
        echo "[docker] engine is up after ${i}s (dockerd pid $(cat /var/run/docker.pid 2>/dev/null || echo '?'))"
        exit 0
    fi
    if [ -n "$DPID" ] && ! kill -0 "$DPID" 2>/dev/null; then
        echo "[docker] ERROR: dockerd exited at start-up; see $LOG" >&2
        exit 1
    fi
    if [ $((i % 10)) -eq 0 ]; then echo "[docker] still waiting for dockerd (${i}s)..."; fi
    sleep 1
done

echo "[docker] ERROR: dockerd did not answer within 60 s; see $LOG" >&2
exit 1
