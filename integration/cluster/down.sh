#!/usr/bin/env bash
# Remove the offline test cluster entirely (idempotent): processes (by their pid files, and
# the containerd shims our containerd started), containers, pod network namespaces, CNI
# interfaces, the iptables rules of kube-proxy and the CNI plugins, mounts, cgroups, state
# directories, and the sysctls the kubelet changed. The build cache is kept.
# Never touches Docker: its containerd, bridges and iptables chains are left as they are.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib.sh"

if [[ -n "${PODTWIN_TEST_KUBECONFIG:-}" ]]; then
    log "PODTWIN_TEST_KUBECONFIG names an existing cluster: not tearing anything down"
    exit 0
fi
[[ $EUID -eq 0 ]] || die "needs root"

stop() {  # stop <name>: SIGTERM the pid in its pid file, SIGKILL after 10 s
    local pf="$RUN_DIR/$1.pid"
    [[ -f "$pf" ]] || return 0
    local pid; pid="$(cat "$pf")"
    if [[ -d "/proc/$pid" ]] && [[ "$(tr '\0' ' ' < "/proc/$pid/cmdline")" == *"$1"* ]]; then
        log "stopping $1 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 20); do [[ -d "/proc/$pid" ]] || break; sleep 0.5; done
        [[ -d "/proc/$pid" ]] && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pf"
}

# Our shims: containerd-shim-runc-v2 processes whose -address is our containerd socket.
# (Docker's shims name Docker's socket, so they never match.)
our_shims() {
    for p in /proc/[0-9]*; do
        local cmd; cmd="$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)" || continue
        [[ "$cmd" == *containerd-shim*"-address $CONTAINERD_SOCK"* ]] && echo "${p#/proc/}"
    done
}

remove_containers() {
    [[ -S "$CONTAINERD_SOCK" ]] || return 0
    alive_containerd=0
    ctr_k8s version >/dev/null 2>&1 && alive_containerd=1
    [[ $alive_containerd -eq 1 ]] || return 0
    # SIGKILL every task (pods are disposable), then delete tasks and containers.
    for id in $(ctr_k8s tasks ls -q 2>/dev/null); do
        ctr_k8s tasks kill -s SIGKILL "$id" >/dev/null 2>&1
    done
    sleep 1
    for id in $(ctr_k8s tasks ls -q 2>/dev/null); do ctr_k8s tasks delete -f "$id" >/dev/null 2>&1; done
    for id in $(ctr_k8s containers ls -q 2>/dev/null); do ctr_k8s containers delete "$id" >/dev/null 2>&1; done
}

remove_network() {
    # Veths whose host end is on our bridge, then the bridge.
    for dev in $(ip -o link show master "$CNI_BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
        ip link del "$dev" 2>/dev/null
    done
    ip link del "$CNI_BRIDGE" 2>/dev/null
    # Pod network namespaces are bind mounts under containerd's state dir, in $RUN_DIR:
    # unmount_all removes them.
    # kube-proxy knows its own rules.
    if [[ -x "$BIN/kube-proxy" ]]; then
        "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
    fi
    # Then every chain named KUBE-* (kube-proxy's and the kubelet's canaries/firewall) or CNI-*
    # (the firewall, portmap and bridge plugins), in IPv4 and IPv6, with the rules jumping to
    # them. Docker's chains are named DOCKER*, so they are never matched.
    for ipt in iptables ip6tables; do
        for table in filter nat mangle; do
            local chains
            chains="$($ipt -t "$table" -S 2>/dev/null | awk '/^-N (KUBE|CNI)-/ {print $2}')"
            [[ -n "$chains" ]] || continue
            $ipt -t "$table" -S 2>/dev/null | grep -E -- '-j (KUBE|CNI)-' | grep '^-A' | while read -r rule; do
                # shellcheck disable=SC2086
                eval "$ipt -t $table ${rule/-A/-D}" 2>/dev/null
            done
            for c in $chains; do $ipt -t "$table" -F "$c" 2>/dev/null; done
            for c in $chains; do $ipt -t "$table" -X "$c" 2>/dev/null; done
        done
    done
}

unmount_all() {  # everything mounted under our state and run dirs, deepest first
    local dirs=("$STATE_DIR" "$RUN_DIR")
    for _ in 1 2 3; do
        local mps
        mps="$(awk '{print $2}' /proc/self/mounts | grep -E "^($STATE_DIR|$RUN_DIR)(/|$)" | sort -r)"
        [[ -n "$mps" ]] || return 0
        for m in $mps; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
    done
}

remove_cgroups() {  # the kubelet's kubepods tree (and containerd's under it), leaves first
    # Container processes still in it (only when containerd died and could not stop them):
    # they are our pods' processes, killed by PID.
    if [[ -d /sys/fs/cgroup/pids/kubepods ]]; then
        for pid in $(find /sys/fs/cgroup/pids/kubepods -name cgroup.procs -exec cat {} + 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null
        done
        sleep 1
    fi
    for ctl in /sys/fs/cgroup/*/; do
        [[ -d "$ctl/kubepods" ]] || continue
        find "$ctl/kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
}

restore_sysctls() {
    [[ -f "$STATE_DIR/sysctls.saved" ]] || return 0
    while IFS='=' read -r k v; do
        [[ -n "$k" ]] && sysctl -qw "$k=$v" 2>/dev/null
    done < "$STATE_DIR/sysctls.saved"
    log "sysctls restored"
}

main() {
    if command -v kind >/dev/null && kind get clusters 2>/dev/null | grep -qx podtwin-test; then
        kind delete cluster --name podtwin-test
    fi
    for c in kube-proxy kubelet kube-scheduler kube-controller-manager; do stop "$c"; done
    remove_containers
    stop containerd
    for pid in $(our_shims); do kill -KILL "$pid" 2>/dev/null; done
    stop kube-apiserver
    stop etcd
    remove_network
    unmount_all
    remove_cgroups
    restore_sysctls
    rm -rf "$STATE_DIR" "$RUN_DIR"
    log "cluster removed"
}
main "$@"
