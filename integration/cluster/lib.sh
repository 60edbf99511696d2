# Shared settings for the offline test cluster scripts (sourced, not run).
# Everything the cluster needs at run time lives in three places, all outside the repo:
#   $CACHE      built binaries and image tars (kept across cluster-down: a rebuild takes long)
#   $STATE_DIR  certificates, configs, etcd data, containerd root, logs (removed by cluster-down)
#   $RUN_DIR    sockets and pid files (removed by cluster-down)

# Kubernetes 1.33.x: the newest minor whose kubelet still runs on cgroup v1 by default
# settings we can keep (failCgroupV1: false) and whose every staging module resolves through
# the module proxy here; v1.33.13 / v0.33.13 resolved completely (v1.33.5 did not).
K8S_VERSION="${PODTWIN_K8S_VERSION:-v1.33.13}"
# CoreDNS v1.12.0 is the version kubeadm 1.33 deploys.
COREDNS_VERSION="${PODTWIN_COREDNS_VERSION:-v1.12.0}"

CACHE="${PODTWIN_CLUSTER_CACHE:-$HOME/.cache/podtwin/cluster/$K8S_VERSION}"
BIN="$CACHE/bin"
IMAGES="$CACHE/images"
STATE_DIR="${PODTWIN_CLUSTER_STATE:-/var/lib/podtwin-cluster}"
RUN_DIR="${PODTWIN_CLUSTER_RUN:-/run/podtwin-cluster}"
LOG_DIR="$STATE_DIR/logs"
PKI="$STATE_DIR/pki"
KUBECONFIG_ADMIN="$STATE_DIR/admin.kubeconfig"

# Addresses: all on loopback or on the pod bridge this cluster creates. The CIDRs avoid
# Docker's (172.17-31.x, 192.168.x).
NODE_NAME="podtwin-node"
POD_CIDR="10.244.0.0/16"
POD_SUBNET="10.244.0.0/24"      # the single node's share of POD_CIDR
POD_GATEWAY="10.244.0.1"        # the address of the pod bridge on the host
# Pods get an IPv6 address too (dual-stack pods; Services stay IPv4): a unique local range.
POD_SUBNET6="fd00:10:244::/64"
POD_GATEWAY6="fd00:10:244::1"
# The API server, kubelet and kube-proxy serve on the pod bridge's address, not on 0.0.0.0
# (nothing is exposed on the machine's real interfaces) and not on 127.0.0.1 (pods must reach
# the API server through the `kubernetes` Service, and 127.0.0.1 in a pod is the pod itself).
# cluster-up creates the bridge with this address before the API server starts.
NODE_IP="$POD_GATEWAY"
SERVICE_CIDR="10.96.0.0/16"
KUBERNETES_SVC_IP="10.96.0.1"
DNS_SVC_IP="10.96.0.10"
CNI_BRIDGE="podtwin0"
CNI_NETWORK="podtwin-cluster"
CONTAINERD_SOCK="$RUN_DIR/containerd.sock"
CNI_BIN_DIR="/usr/lib/cni"      # Debian's containernetworking-plugins
ETCD_PORT=23790                 # not 2379: leave the default to any other etcd on the machine
ETCD_PEER_PORT=23800
API_PORT=6443

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ctr_k8s() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }
