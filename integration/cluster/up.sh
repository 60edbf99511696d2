#!/usr/bin/env bash
# Bring up the offline single-node test cluster (idempotent). Runs every component as a plain
# host process with its own pid file in $RUN_DIR: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, a private containerd, the kubelet and kube-proxy; CoreDNS runs as a pod.
# Components that are already running are left alone, dead ones are restarted; if the API
# server still does not come up, the cluster is torn down and recreated.
# Last line of output: `export KUBECONFIG=<admin kubeconfig>`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib.sh"
source "$HERE/pki.sh"

[[ $EUID -eq 0 ]] || die "the offline cluster needs root (containerd, kubelet, iptables)"

# The kubelet and kube-proxy change these; cluster-down puts the saved values back.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
         kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.conf.all.route_localnet
         net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_tcp_timeout_established
         net.netfilter.nf_conntrack_tcp_timeout_close_wait)

preflight() {
    local missing=()
    for tool in containerd runc ctr etcd iptables openssl ip curl docker; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    for plugin in bridge host-local loopback portmap firewall; do
        [[ -x "$CNI_BIN_DIR/$plugin" ]] || missing+=("cni:$plugin")
    done
    [[ ${#missing[@]} -eq 0 ]] || die "missing: ${missing[*]} (apt-get install containerd runc etcd-server containernetworking-plugins iptables openssl iproute2 curl)"
    local need_build=0
    for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl coredns; do
        [[ -x "$BIN/$b" ]] || need_build=1
    done
    [[ -f "$IMAGES/pause.tar" && -f "$IMAGES/coredns.tar" ]] || need_build=1
    if [[ $need_build -eq 1 ]]; then
        log "binaries or images missing from $CACHE: building (long on a fresh machine)"
        "$HERE/build.sh"
    fi
}

save_sysctls() {
    # Only the first cluster-up saves: later ones would see the kubelet's values.
    [[ -f "$STATE_DIR/sysctls.saved" ]] && return
    for s in "${SYSCTLS[@]}"; do
        local v; v="$(sysctl -n "$s" 2>/dev/null)" || continue
        echo "$s=$v"
    done > "$STATE_DIR/sysctls.saved.tmp"
    mv "$STATE_DIR/sysctls.saved.tmp" "$STATE_DIR/sysctls.saved"
    cp "$STATE_DIR/sysctls.saved" "$CACHE/sysctls.before"   # for leftovers.sh
}

alive() {  # alive <name>: its pid file names a live process running our binary
    local pf="$RUN_DIR/$1.pid"
    [[ -f "$pf" ]] || return 1
    local pid; pid="$(cat "$pf")"
    [[ -d "/proc/$pid" ]] && [[ "$(tr '\0' ' ' < "/proc/$pid/cmdline")" == *"$1"* ]]
}

start() {  # start <name> <command...>: run detached, log to $LOG_DIR/<name>.log, pid file
    local name="$1"; shift
    if alive "$name"; then return; fi
    log "starting $name"
    # setsid: its own session, so it outlives this script and `make`.
    setsid "$@" >> "$LOG_DIR/$name.log" 2>&1 < /dev/null &
    echo $! > "$RUN_DIR/$name.pid"
}

wait_for() {  # wait_for <what> <seconds> <command...>
    local what="$1" t="$2"; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        [[ $SECONDS -lt $end ]] || return 1
        sleep 1
    done
    log "$what: ok"
}

# --- network: the pod bridge, created first so the API server can bind to its address -------
make_bridge() {
    if ! ip link show "$CNI_BRIDGE" >/dev/null 2>&1; then
        ip link add "$CNI_BRIDGE" type bridge
    fi
    local addrs; addrs="$(ip -4 addr show dev "$CNI_BRIDGE")"
    [[ "$addrs" == *"inet $POD_GATEWAY/"* ]] || ip addr add "$POD_GATEWAY/24" dev "$CNI_BRIDGE"
    if [[ -e /proc/sys/net/ipv6 ]]; then   # dual-stack pods where the kernel has IPv6
        sysctl -qw "net.ipv6.conf.$CNI_BRIDGE.disable_ipv6=0" || true
        [[ "$(ip -6 addr show dev "$CNI_BRIDGE")" == *"inet6 $POD_GATEWAY6/"* ]] \
            || ip -6 addr add "$POD_GATEWAY6/64" dev "$CNI_BRIDGE" nodad || true
    fi
    ip link set "$CNI_BRIDGE" up
}

# put <file>: write stdin to <file> only if the content differs. kube-proxy exits when its
# config file is rewritten, and a re-run of cluster-up must not disturb running components.
put() {
    local tmp; tmp="$(mktemp "$1.XXXXXX")"
    cat > "$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

write_configs() {
    mkdir -p "$STATE_DIR/cni/net.d" "$STATE_DIR/containerd" "$STATE_DIR/kubelet"
    # Pods get routes only to the pod and Service ranges -- no default route -- so nothing a
    # pod does can leave this machine. The firewall plugin accepts pod traffic in FORWARD,
    # whose policy Docker sets to DROP.
    local POD_RANGE6=""
    [[ -e /proc/sys/net/ipv6 ]] && POD_RANGE6=", [{\"subnet\": \"$POD_SUBNET6\", \"gateway\": \"$POD_GATEWAY6\"}]"
    put "$STATE_DIR/cni/net.d/10-podtwin.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge", "bridge": "$CNI_BRIDGE", "isGateway": true, "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_SUBNET", "gateway": "$POD_GATEWAY"}]$POD_RANGE6],
        "routes": [{"dst": "$POD_CIDR"}, {"dst": "$SERVICE_CIDR"}],
        "dataDir": "$STATE_DIR/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "firewall", "backend": "iptables"}
  ]
}
JSON
    # containerd: our own instance (not Docker's), with its own root, state and socket.
    put "$STATE_DIR/containerd/config.toml" <<TOML
version = 2
root = "$STATE_DIR/containerd/root"
state = "$RUN_DIR/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$RUN_DIR/containerd/ttrpc.sock"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  # Loaded from a tar at cluster-up, never pulled.
  sandbox_image = "docker.io/podtwin-cluster/pause:3.10"
  # root here lacks CAP_SYS_RESOURCE: without this, runc fails to lower oom_score_adj.
  restrict_oom_score_adj = true
  # Pod network namespaces under our state dir (not /var/run/netns), so cluster-down finds
  # exactly ours.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$STATE_DIR/cni/net.d"
    max_conf_num = 1
TOML
    # Pods with dnsPolicy Default (CoreDNS) get this file: no nameserver, so nothing is ever
    # forwarded to the host's resolver.
    echo "# podtwin test cluster: no upstream resolver on purpose" | put "$STATE_DIR/resolv.conf"
    put "$STATE_DIR/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
# cgroup v1 hierarchies, no systemd: cgroupfs driver; and 1.31+ refuses cgroup v1 unless told.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
clusterDNS: [$DNS_SVC_IP]
clusterDomain: cluster.local
resolvConf: $STATE_DIR/resolv.conf
podLogsDir: $STATE_DIR/pod-logs
# ConfigMap and Secret volumes are refreshed on each pod sync: every 10 s here (1 min by default),
# so a test of a live update waits seconds, not minutes.
syncFrequency: 10s
# Imported images cannot be pulled again: never garbage-collect them, never evict for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
staticPodPath: ""
rotateCertificates: false
serverTLSBootstrap: false
YAML
    put "$STATE_DIR/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE_DIR/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$POD_GATEWAY/32"]
# Leave the conntrack sysctls and route_localnet alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false}
YAML
}

start_control_plane() {
    start etcd etcd --name podtwin --data-dir "$STATE_DIR/etcd" \
        --listen-client-urls "https://127.0.0.1:$ETCD_PORT" --advertise-client-urls "https://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "https://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "https://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "podtwin=https://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
        --cert-file "$PKI/etcd.crt" --key-file "$PKI/etcd.key" --client-cert-auth --trusted-ca-file "$PKI/ca.crt" \
        --peer-cert-file "$PKI/etcd.crt" --peer-key-file "$PKI/etcd.key" --peer-client-cert-auth --peer-trusted-ca-file "$PKI/ca.crt"
    start kube-apiserver "$BIN/kube-apiserver" \
        --advertise-address "$NODE_IP" --bind-address "$NODE_IP" --secure-port "$API_PORT" \
        --etcd-servers "https://127.0.0.1:$ETCD_PORT" --etcd-cafile "$PKI/ca.crt" \
        --etcd-certfile "$PKI/apiserver-etcd-client.crt" --etcd-keyfile "$PKI/apiserver-etcd-client.key" \
        --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
        --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
        --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
        --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range "$SERVICE_CIDR" --authorization-mode Node,RBAC \
        --enable-admission-plugins NodeRestriction --allow-privileged=true --profiling=false
    wait_for "etcd" 60 etcdctl_health || die "etcd did not come up (see $LOG_DIR/etcd.log)"
    if ! wait_for "kube-apiserver /readyz" 120 kubectl get --raw /readyz; then
        return 1
    fi
    start kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig "$STATE_DIR/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$STATE_DIR/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$STATE_DIR/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials \
        --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
        --root-ca-file "$PKI/ca.crt" --service-account-private-key-file "$PKI/sa.key" \
        --service-cluster-ip-range "$SERVICE_CIDR" --cluster-cidr "$POD_CIDR" --allocate-node-cidrs=false \
        --flex-volume-plugin-dir "$STATE_DIR/volume-plugins" --profiling=false
    start kube-scheduler "$BIN/kube-scheduler" \
        --kubeconfig "$STATE_DIR/scheduler.kubeconfig" \
        --authentication-kubeconfig "$STATE_DIR/scheduler.kubeconfig" \
        --authorization-kubeconfig "$STATE_DIR/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --leader-elect=false --profiling=false
}

etcdctl_health() {
    curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/apiserver-etcd-client.crt" --key "$PKI/apiserver-etcd-client.key" \
        "https://127.0.0.1:$ETCD_PORT/health"
}

kubectl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

start_node() {
    # Any pull attempt goes to a dead proxy on loopback instead of the internet (and
    # resolving registry names would itself be a query to the host's outside resolver).
    start containerd env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
        containerd --config "$STATE_DIR/containerd/config.toml"
    wait_for "containerd" 30 ctr_k8s version || die "containerd did not come up (see $LOG_DIR/containerd.log)"
    local present; present="$(ctr_k8s images ls -q)"   # (not piped into grep -q: SIGPIPE + pipefail)
    for img in pause coredns; do
        local ref; ref="$(tar -xOf "$IMAGES/$img.tar" manifest.json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["RepoTags"][0])')"
        if ! grep -qx "docker.io/$ref" <<< "$present"; then
            log "importing $ref into containerd"
            ctr_k8s images import "$IMAGES/$img.tar" >/dev/null
        fi
    done
    start kubelet "$BIN/kubelet" --config "$STATE_DIR/kubelet/config.yaml" \
        --kubeconfig "$STATE_DIR/kubelet.kubeconfig" --root-dir "$STATE_DIR/kubelet" \
        --cert-dir "$STATE_DIR/kubelet/pki" --volume-plugin-dir "$STATE_DIR/volume-plugins" \
        --node-ip "$NODE_IP" --hostname-override "$NODE_NAME"
    start kube-proxy "$BIN/kube-proxy" --config "$STATE_DIR/kube-proxy.yaml"
    wait_for "node $NODE_NAME Ready" 120 kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s ||
        die "node did not become Ready (see $LOG_DIR/kubelet.log)"
}

deploy_coredns() {
    sed -e "s|@DNS_SVC_IP@|$DNS_SVC_IP|g" -e "s|@COREDNS_VERSION@|$COREDNS_VERSION|g" \
        "$HERE/coredns.yaml" | kubectl apply -f - >/dev/null
    wait_for "CoreDNS" 120 kubectl -n kube-system rollout status deployment/coredns --timeout=5s ||
        die "CoreDNS did not become ready (kubectl -n kube-system describe pod -l k8s-app=kube-dns)"
}

main() {
    local t0=$SECONDS
    if [[ -n "${PODTWIN_TEST_KUBECONFIG:-}" ]]; then
        log "using the existing cluster from PODTWIN_TEST_KUBECONFIG (not managed here)"
        echo "export KUBECONFIG=$PODTWIN_TEST_KUBECONFIG"
        return
    fi
    if command -v kind >/dev/null && kind_image="$(docker image ls --format '{{.Repository}}:{{.Tag}}' kindest/node | head -1)" \
            && [[ -n "$kind_image" ]]; then
        # kind, when installed with its node image already in Docker (nothing to pull).
        mkdir -p "$STATE_DIR"
        kind get clusters 2>/dev/null | grep -qx podtwin-test ||
            kind create cluster --name podtwin-test --image "$kind_image" --kubeconfig "$STATE_DIR/kind.kubeconfig" >&2
        echo "export KUBECONFIG=$STATE_DIR/kind.kubeconfig"
        return
    fi
    preflight
    mkdir -p "$STATE_DIR" "$RUN_DIR" "$LOG_DIR"
    save_sysctls
    make_pki
    make_bridge
    write_configs
    if ! start_control_plane; then
        [[ -z "${PODTWIN_CLUSTER_RECREATED:-}" ]] || die "the API server did not come up (see $LOG_DIR/kube-apiserver.log)"
        log "the API server did not come up: recreating the cluster from scratch"
        "$HERE/down.sh"
        PODTWIN_CLUSTER_RECREATED=1 exec "$0" "$@"
    fi
    start_node
    deploy_coredns
    log "cluster up in $((SECONDS - t0))s"
    echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
}
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then main "$@"; fi
