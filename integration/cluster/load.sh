#!/usr/bin/env bash
# Copy images from the local Docker engine into the cluster's containerd, as
# `kind load docker-image` does, so pods can run them without any registry.
# Pods must then use imagePullPolicy: Never or IfNotPresent (a `:latest` tag defaults to Always).
# Usage: load.sh IMAGE [IMAGE...]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib.sh"

[[ $# -ge 1 ]] || die "usage: load.sh IMAGE [IMAGE...]"
if [[ -n "${PODTWIN_TEST_KUBECONFIG:-}" ]]; then
    die "PODTWIN_TEST_KUBECONFIG names an external cluster: load images into it by its own means"
fi
if command -v kind >/dev/null && kind get clusters 2>/dev/null | grep -qx podtwin-test; then
    exec kind load docker-image --name podtwin-test "$@"
fi
ctr_k8s version >/dev/null 2>&1 || die "the cluster's containerd is not running: make cluster-up"
for image in "$@"; do
    docker image inspect "$image" >/dev/null || die "no image $image in the local Docker engine"
    log "loading $image"
    # docker save writes a docker-archive tar; ctr imports it as docker.io/<name>:<tag>,
    # which is what the kubelet asks for when a pod says <name>:<tag>.
    docker save "$image" | ctr_k8s images import - >/dev/null
done
