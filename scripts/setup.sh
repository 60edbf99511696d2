#!/usr/bin/env bash
# Everything a fresh Debian/Ubuntu machine needs to develop and test podtwin (`make setup`).
# Idempotent and quiet when there is nothing to do; no prompts (runs under CI=true, no stdin).
set -euo pipefail
cd "$(dirname "$0")/.."

# apt needs root; as a normal user go through sudo.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# 1. Host packages. debootstrap + busybox-static build the images; iptables/iproute2/fuse3/sshfs
#    are used by the runner and the tests; python3-venv makes .venv.
echo "[setup] 1/5 host packages"
# etcd-server, containernetworking-plugins, conntrack and socat are for the offline test cluster
# (integration/cluster; containerd and runc come with docker.io).
PKGS="debootstrap busybox-static iptables iproute2 fuse3 sshfs python3-venv etcd-server containernetworking-plugins conntrack socat docker-registry"
MISSING=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || MISSING="$MISSING $p"
done
# Go compiles the test app's static UDP client (images/testapp); use any Go already installed.
if ! command -v go >/dev/null && [ ! -x /usr/local/go/bin/go ]; then MISSING="$MISSING golang-go"; fi
if [ -n "$MISSING" ]; then
    echo "[setup] installing:$MISSING"
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $MISSING </dev/null
else
    echo "[setup] all present"
fi

# 2. The virtualenv, with podtwin installed in editable mode. pip is re-run only when
#    pyproject.toml is newer than the stamp (kept inside .venv, so deleting .venv resets it)
#    or the install is broken.
echo "[setup] 2/5 python environment (.venv)"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
STAMP=.venv/.podtwin-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] \
        || ! .venv/bin/python -c 'import podtwin.runner, pytest, importlinter' 2>/dev/null; then
    .venv/bin/pip install -q -e '.[dev]'
    touch "$STAMP"
else
    echo "[setup] up to date"
fi

# 3. A running Docker engine.
echo "[setup] 3/5 docker engine"
$SUDO scripts/docker-engine.sh

# 4. The images (skips those already built and up to date). debootstrap needs root.
echo "[setup] 4/5 images"
$SUDO .venv/bin/python -m podtwin.runner.tools.images

# 5. Docker Compose v2 for `podtwin compose` (built once from the Go module proxy, cached).
echo "[setup] 5/5 docker compose"
scripts/compose.sh
echo "[setup] done"
