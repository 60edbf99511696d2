#!/usr/bin/env bash
# Docker Compose v2, for `podtwin compose` (the tests and the demo), offline: built from the Go
# module proxy (no GitHub downloads, no registry) into a cache outside the repo, then installed
# as the docker CLI plugin, where `docker compose` finds it. Quiet and quick when in place.
#
# `go install github.com/docker/compose/v2/cmd@v2.40.3` refuses (the module's go.mod has exclude
# directives), so the module is downloaded and built from inside its own directory, where those
# directives apply. About five minutes on two cores the first time.
set -euo pipefail

VERSION="${PODTWIN_COMPOSE_VERSION:-v2.40.3}"
CACHE="${PODTWIN_COMPOSE_CACHE:-$HOME/.cache/podtwin/compose/$VERSION}"
PLUGIN_DIR="${PODTWIN_COMPOSE_PLUGIN_DIR:-/usr/local/lib/docker/cli-plugins}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

have() {  # the installed plugin answers with the version we build
    docker compose version --short 2>/dev/null | grep -qx "${VERSION#v}"
}

if have; then
    echo "[compose] docker compose ${VERSION#v} present"
    exit 0
fi

if [ ! -x "$CACHE/docker-compose" ]; then
    GO="$(command -v go || echo /usr/local/go/bin/go)"
    mkdir -p "$CACHE"
    echo "[compose] building docker compose $VERSION from the Go module proxy (about 5 minutes, once)"
    t0=$SECONDS
    dir="$(GOFLAGS= "$GO" mod download -json "github.com/docker/compose/v2@$VERSION" \
           | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
    # The module cache is read-only; the build writes only its output (and Go's build cache).
    (cd "$dir" && CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false" "$GO" build -trimpath \
        -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=$VERSION" \
        -o "$CACHE/docker-compose.tmp" ./cmd) > "$CACHE/build.log" 2>&1 \
        || { tail -20 "$CACHE/build.log" >&2; echo "[compose] build failed (log: $CACHE/build.log)" >&2; exit 1; }
    mv "$CACHE/docker-compose.tmp" "$CACHE/docker-compose"
    echo "[compose] built in $((SECONDS - t0))s"
fi

$SUDO mkdir -p "$PLUGIN_DIR"
$SUDO install -m 0755 "$CACHE/docker-compose" "$PLUGIN_DIR/docker-compose"
if ! have; then
    echo "[compose] $PLUGIN_DIR/docker-compose installed, but \`docker compose version\` does not answer ${VERSION#v}" >&2
    exit 1
fi
echo "[compose] docker compose ${VERSION#v} installed in $PLUGIN_DIR"
