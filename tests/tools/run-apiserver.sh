#!/usr/bin/env bash
# Start a throw-away etcd + kube-apiserver on loopback for tests.
#
# Usage: tests/tools/run-apiserver.sh DIR
#
# Everything lives in DIR (created if missing; must not hold a running
# instance): certs in DIR/pki, etcd data in DIR/etcd-data, logs
# DIR/{etcd,kube-apiserver}.log, pids DIR/{etcd,kube-apiserver}.pid,
# admin kubeconfig DIR/kubeconfig, and DIR/env (sourceable):
#   PTW_APISERVER_URL, PTW_APISERVER_PORT, PTW_ETCD_URL, PTW_CA_CERT,
#   PTW_ADMIN_CERT, PTW_ADMIN_KEY, KUBECONFIG
# Both processes keep running after this script exits; stop them with
# tests/tools/stop-apiserver.sh DIR.
#
# Binaries: $PTW_TOOLS_DIR/bin (see build.sh; built on demand if missing).
# No kube-controller-manager/scheduler/kubelet run: pods are only stored.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS_DIR="${PTW_TOOLS_DIR:-$HOME/.cache/pod-template-webhook/tools}"
BIN_DIR="$TOOLS_DIR/bin"
READY_TIMEOUT="${PTW_READY_TIMEOUT:-90}"

[[ $# -eq 1 ]] || {
	echo "usage: $0 DIR" >&2
	exit 2
}
mkdir -p "$1"
DIR="$(cd "$1" && pwd)"
PKI="$DIR/pki"

log() { printf '[run-apiserver] %s\n' "$*" >&2; }

for pidf in "$DIR/etcd.pid" "$DIR/kube-apiserver.pid"; do
	if [[ -f "$pidf" ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
		log "$pidf: process $(cat "$pidf") still running; run stop-apiserver.sh $DIR first"
		exit 1
	fi
done

if [[ ! -x "$BIN_DIR/kube-apiserver" || ! -x "$BIN_DIR/etcd" ]]; then
	log "binaries missing in $BIN_DIR, running build.sh"
	"$HERE/build.sh" kube-apiserver etcd
fi

# --- free loopback ports ------------------------------------------------------
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
declare -a TAKEN=()
free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 40000))
		[[ " ${TAKEN[*]-} " == *" $p "* ]] && continue
		port_in_use "$p" && continue
		TAKEN+=("$p")
		echo "$p"
		return
	done
}
ETCD_CLIENT_PORT="$(free_port)"
TAKEN+=("$ETCD_CLIENT_PORT")
ETCD_PEER_PORT="$(free_port)"
TAKEN+=("$ETCD_PEER_PORT")
APISERVER_PORT="$(free_port)"

# --- certificates -------------------------------------------------------------
gen_certs() {
	mkdir -p "$PKI"
	cd "$PKI"
	openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
		-subj "/CN=ptw-test-ca" \
		-addext "basicConstraints=critical,CA:TRUE" \
		-addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null

	# apiserver serving cert (loopback + in-cluster names + first service IP)
	cat >apiserver.ext <<-'EOF'
		basicConstraints=CA:FALSE
		keyUsage=critical,digitalSignature,keyEncipherment
		extendedKeyUsage=serverAuth
		subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
	EOF
	openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
		-subj "/CN=kube-apiserver" 2>/dev/null
	openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
		-out apiserver.crt -days 3650 -extfile apiserver.ext 2>/dev/null

	# admin client cert: O=system:masters => cluster-admin, bypasses RBAC
	cat >client.ext <<-'EOF'
		basicConstraints=CA:FALSE
		keyUsage=critical,digitalSignature,keyEncipherment
		extendedKeyUsage=clientAuth
	EOF
	openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr \
		-subj "/O=system:masters/CN=ptw-admin" 2>/dev/null
	openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
		-out admin.crt -days 3650 -extfile client.ext 2>/dev/null

	# service-account token signing key pair
	openssl genrsa -out sa.key 2048 2>/dev/null
	openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
	rm -f ./*.csr
	chmod 600 ./*.key
	cd - >/dev/null
}
if [[ -f "$PKI/admin.key" && -f "$PKI/sa.pub" ]]; then
	log "reusing certificates in $PKI"
else
	log "generating certificates in $PKI"
	gen_certs
fi

# On any failure, do not leave a half-started etcd/apiserver behind.
started_ok=0
cleanup_on_failure() {
	if [[ $started_ok != 1 ]]; then
		log "startup failed; stopping anything started (logs kept in $DIR)"
		"$HERE/stop-apiserver.sh" "$DIR" || true
	fi
}
trap cleanup_on_failure EXIT

# --- etcd ---------------------------------------------------------------------
ETCD_URL="http://127.0.0.1:$ETCD_CLIENT_PORT"
log "starting etcd on $ETCD_URL (data $DIR/etcd-data)"
setsid "$BIN_DIR/etcd" \
	--name=ptw \
	--data-dir="$DIR/etcd-data" \
	--listen-client-urls="$ETCD_URL" \
	--advertise-client-urls="$ETCD_URL" \
	--listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
	--initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
	--initial-cluster="ptw=http://127.0.0.1:$ETCD_PEER_PORT" \
	--listen-metrics-urls="" \
	--unsafe-no-fsync \
	--log-level=warn \
	</dev/null >"$DIR/etcd.log" 2>&1 &
echo $! >"$DIR/etcd.pid"

deadline=$((SECONDS + 30))
until curl -fsS "$ETCD_URL/health" 2>/dev/null | grep -q '"health":"true"'; do
	if ! kill -0 "$(cat "$DIR/etcd.pid")" 2>/dev/null || ((SECONDS > deadline)); then
		log "etcd failed to start; last log lines:"
		tail -n 30 "$DIR/etcd.log" >&2
		exit 1
	fi
	sleep 0.2
done

# --- kube-apiserver -----------------------------------------------------------
APISERVER_URL="https://127.0.0.1:$APISERVER_PORT"
log "starting kube-apiserver on $APISERVER_URL"
setsid "$BIN_DIR/kube-apiserver" \
	--etcd-servers="$ETCD_URL" \
	--etcd-prefix=/registry \
	--bind-address=127.0.0.1 \
	--advertise-address=127.0.0.1 \
	--secure-port="$APISERVER_PORT" \
	--cert-dir="$DIR/apiserver-certs" \
	--tls-cert-file="$PKI/apiserver.crt" \
	--tls-private-key-file="$PKI/apiserver.key" \
	--client-ca-file="$PKI/ca.crt" \
	--service-account-issuer=https://kubernetes.default.svc.cluster.local \
	--service-account-key-file="$PKI/sa.pub" \
	--service-account-signing-key-file="$PKI/sa.key" \
	--service-cluster-ip-range=10.0.0.0/24 \
	--authorization-mode=Node,RBAC \
	--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionWebhook \
	--endpoint-reconciler-type=none \
	--profiling=false \
	--v=1 \
	</dev/null >"$DIR/kube-apiserver.log" 2>&1 &
echo $! >"$DIR/kube-apiserver.pid"

CURL=(curl -fsS --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key")
deadline=$((SECONDS + READY_TIMEOUT))
until "${CURL[@]}" "$APISERVER_URL/readyz" >/dev/null 2>&1; do
	if ! kill -0 "$(cat "$DIR/kube-apiserver.pid")" 2>/dev/null || ((SECONDS > deadline)); then
		log "kube-apiserver not ready; /readyz?verbose and last log lines:"
		"${CURL[@]}" "$APISERVER_URL/readyz?verbose" >&2 || true
		tail -n 40 "$DIR/kube-apiserver.log" >&2
		exit 1
	fi
	sleep 0.5
done

# --- kubeconfig + env ---------------------------------------------------------
b64() { base64 -w0 <"$1"; }
cat >"$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ptw
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: ptw-admin
  user:
    client-certificate-data: $(b64 "$PKI/admin.crt")
    client-key-data: $(b64 "$PKI/admin.key")
contexts:
- name: ptw
  context:
    cluster: ptw
    user: ptw-admin
current-context: ptw
EOF
chmod 600 "$DIR/kubeconfig"

cat >"$DIR/env" <<EOF
PTW_APISERVER_URL=$APISERVER_URL
PTW_APISERVER_PORT=$APISERVER_PORT
PTW_ETCD_URL=$ETCD_URL
PTW_CA_CERT=$PKI/ca.crt
PTW_ADMIN_CERT=$PKI/admin.crt
PTW_ADMIN_KEY=$PKI/admin.key
KUBECONFIG=$DIR/kubeconfig
EOF

started_ok=1
log "ready after ${SECONDS}s: $APISERVER_URL (kubeconfig $DIR/kubeconfig, env $DIR/env)"
