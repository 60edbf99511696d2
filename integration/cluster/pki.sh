#!/usr/bin/env bash
# Certificates and kubeconfigs for the offline cluster (sourced by up.sh). One CA signs every
# certificate: API server, etcd (server, peer and client), kubelet (serving and client), the
# controller-manager, scheduler, kube-proxy and the admin user. Identities follow Kubernetes'
# conventions (CN = user, O = group), so the default RBAC bindings apply unchanged.
# Files are created once and reused: a re-run of cluster-up keeps existing credentials valid.

ssl() { openssl "$@" 2>/dev/null; }

# cert <name> <CN> <O or ""> <SANs or ""> <usage: server|client|both>
cert() {
    local name="$1" cn="$2" org="$3" sans="$4" usage="$5"
    [[ -f "$PKI/$name.crt" ]] && return
    local subj="/CN=$cn"; [[ -n "$org" ]] && subj="/O=$org$subj"
    local ext="$PKI/$name.ext"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        case "$usage" in
            server) echo "extendedKeyUsage=serverAuth" ;;
            client) echo "extendedKeyUsage=clientAuth" ;;
            both) echo "extendedKeyUsage=serverAuth,clientAuth" ;;
        esac
        [[ -n "$sans" ]] && echo "subjectAltName=$sans"
    } > "$ext"
    ssl genrsa -out "$PKI/$name.key" 2048
    ssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr"
    ssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
        -days 365 -sha256 -extfile "$ext" -out "$PKI/$name.crt" || die "signing $name failed"
    rm -f "$PKI/$name.csr" "$ext"
}

# kubeconfig <file> <user> <cert name>
kubeconfig() {
    local file="$1" user="$2" name="$3"
    cat > "$file" <<KC
apiVersion: v1
kind: Config
clusters:
- name: podtwin
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$name.crt")
    client-key-data: $(base64 -w0 < "$PKI/$name.key")
contexts:
- name: podtwin
  context: {cluster: podtwin, user: $user}
current-context: podtwin
KC
    chmod 600 "$file"
}

make_pki() {
    mkdir -p "$PKI"; chmod 700 "$PKI"
    if [[ ! -f "$PKI/ca.crt" ]]; then
        ssl genrsa -out "$PKI/ca.key" 2048
        ssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=podtwin-cluster-ca" -days 3650 -sha256 \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
            -out "$PKI/ca.crt" || die "CA creation failed"
    fi
    local svc_names="DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert apiserver kube-apiserver "" "$svc_names,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP,IP:$KUBERNETES_SVC_IP" server
    cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters "" client
    cert apiserver-etcd-client kube-apiserver-etcd-client "" "" client
    cert etcd etcd "" "DNS:localhost,IP:127.0.0.1" both
    cert admin podtwin-admin system:masters "" client
    cert controller-manager system:kube-controller-manager "" "" client
    cert scheduler system:kube-scheduler "" "" client
    cert kube-proxy system:kube-proxy "" "" client
    cert kubelet-client "system:node:$NODE_NAME" system:nodes "" client
    cert kubelet "$NODE_NAME" "" "DNS:$NODE_NAME,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP" server
    # ServiceAccount tokens: the controller-manager signs with sa.key, the API server verifies
    # with sa.pub.
    if [[ ! -f "$PKI/sa.key" ]]; then
        ssl genrsa -out "$PKI/sa.key" 2048
        ssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"
    fi
    kubeconfig "$KUBECONFIG_ADMIN" podtwin-admin admin
    kubeconfig "$STATE_DIR/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
    kubeconfig "$STATE_DIR/scheduler.kubeconfig" system:kube-scheduler scheduler
    kubeconfig "$STATE_DIR/kube-proxy.kubeconfig" system:kube-proxy kube-proxy
    kubeconfig "$STATE_DIR/kubelet.kubeconfig" "system:node:$NODE_NAME" kubelet-client
}
