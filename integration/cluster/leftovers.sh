#!/usr/bin/env bash
# List whatever of the offline cluster is still on this machine; prints nothing and exits 0
# when cluster-down left nothing behind. (The build cache in $CACHE is meant to stay.)
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib.sh"
found=0
say() { echo "leftover: $*"; found=1; }

for p in /proc/[0-9]*; do
    cmd="$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)" || continue
    case "$cmd" in
        *"$BIN/"*|*"$STATE_DIR"*|*"$CONTAINERD_SOCK"*|*"etcd --name podtwin "*) say "process ${p#/proc/}: $cmd" ;;
    esac
done
[[ -e "$STATE_DIR" ]] && say "directory $STATE_DIR"
[[ -e "$RUN_DIR" ]] && say "directory $RUN_DIR"
grep -E " ($STATE_DIR|$RUN_DIR)" /proc/self/mounts | while read -r l; do echo "leftover: mount $l"; done
grep -qE " ($STATE_DIR|$RUN_DIR)" /proc/self/mounts && found=1
ip link show "$CNI_BRIDGE" >/dev/null 2>&1 && say "interface $CNI_BRIDGE"
for ipt in iptables ip6tables; do
    for t in filter nat mangle; do
        n="$($ipt -t "$t" -S 2>/dev/null | grep -cE '(KUBE|CNI)-')"
        [[ "$n" -gt 0 ]] && say "$ipt -t $t: $n KUBE-/CNI- rules or chains"
    done
done
for c in /sys/fs/cgroup/*/kubepods; do [[ -d "$c" ]] && say "cgroup $c"; done
[[ -d /var/log/pods ]] && [[ -n "$(ls -A /var/log/pods 2>/dev/null)" ]] && say "/var/log/pods is not empty"
if [[ -f "$CACHE/sysctls.before" ]]; then
    while IFS='=' read -r k v; do
        now="$(sysctl -n "$k" 2>/dev/null)"
        [[ "$now" == "$v" ]] || say "sysctl $k=$now (was $v)"
    done < "$CACHE/sysctls.before"
fi
exit $found
