#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, for tests/cluster.rs and by hand:
#
#   tests/cluster/up.sh DIR      # start; prints "ready" and leaves DIR/env (KUBECONFIG=...)
#   tests/cluster/down.sh DIR    # stop by PID, unmount, remove network, iptables and sysctl changes
#
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler (built by tests/tools/build.sh from
# the pinned k8s.io/kubernetes module), containerd + runc from Debian with its own config, state
# and root under DIR (restrict_oom_score_adj: this VM lacks CAP_SYS_RESOURCE), kubelet (cgroupfs
# driver, cgroup v1 allowed, swap allowed), kube-proxy (iptables, localhostNodePorts false), a CNI
# bridge without masquerade, dnsmasq answering <service>.<namespace>.svc names, and a sandbox
# (pause) image built locally. Root only; one cluster per machine (fixed bridge name).
#
# Network containment: pods (10.244.0.0/24) and services (10.96.0.0/24) exist only inside this
# machine. The node address is the bridge's own 10.244.0.1 (nothing listens on the outside
# interface), service addresses route into the bridge, nothing is masqueraded, and the chain
# PTW-CONTAIN (mangle FORWARD and POSTROUTING) drops any pod or service traffic toward the outside
# interface. down.sh removes it all, also after a failed start (up.sh calls it) and for a DIR left
# behind by a killed run (the next up.sh calls it).
#
# Needs (Debian): containerd runc containernetworking-plugins iptables conntrack dnsmasq-base
# iproute2 openssl curl gcc (for the pause binary). Times out after PTW_READY_TIMEOUT (120) s.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TOOLS_DIR="${PTW_TOOLS_DIR:-$HOME/.cache/pod-template-webhook/tools}"
BIN="$TOOLS_DIR/bin"
READY_TIMEOUT="${PTW_READY_TIMEOUT:-120}"
# shellcheck source=tests/cluster/common.sh
. "$HERE/common.sh"

[[ $# -eq 1 ]] || {
	echo "usage: $0 DIR" >&2
	exit 2
}
[[ $(id -u) == 0 ]] || die "needs root (containerd, kubelet, iptables, mounts)"
mkdir -p "$1"
DIR="$(cd "$1" && pwd)"
((${#DIR} <= 60)) || die "DIR too long for unix socket paths: $DIR"

# One cluster per machine: $CURRENT ("DIR OWNER-PID") is created atomically by the cluster that
# runs. Another one whose owner (the test process, PTW_CLUSTER_OWNER, else this script's parent)
# still runs is waited for (PTW_CLUSTER_WAIT seconds, default 1200); one whose owner is gone was
# left by a killed run and is torn down first.
owner="${PTW_CLUSTER_OWNER:-$PPID}"
wait_limit=$((SECONDS + ${PTW_CLUSTER_WAIT:-1200}))
while ! (set -C && echo "$DIR $owner" >"$CURRENT") 2>/dev/null; do
	read -r other other_owner <"$CURRENT" 2>/dev/null || true
	if [[ -n "${other:-}" && -n "${other_owner:-}" ]] && ! kill -0 "$other_owner" 2>/dev/null; then
		log "tearing down the cluster left in $other (its owner $other_owner is gone)"
		"$HERE/down.sh" "$other" || true
		rm -f "$CURRENT"
		continue
	fi
	((SECONDS < wait_limit)) || die "another cluster (${other:-?}, owner ${other_owner:-?}) still runs on this machine"
	log "waiting for the cluster in ${other:-?} (owner ${other_owner:-?}) to be torn down"
	sleep 5
done

for cmd in containerd containerd-shim-runc-v2 runc ctr iptables conntrack dnsmasq ip openssl curl cc; do
	command -v "$cmd" >/dev/null || die "missing $cmd (see the Debian packages in this script's header)"
done
[[ -x "$CNI_BIN/bridge" && -x "$CNI_BIN/host-local" && -x "$CNI_BIN/loopback" ]] || die "missing CNI plugins in $CNI_BIN (containernetworking-plugins)"
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
	[[ -x "$BIN/$b" ]] || {
		log "building the tools"
		bash "$ROOT/tests/tools/build.sh" kube-apiserver etcd node
		break
	}
done

started_ok=0
on_exit() {
	if [[ $started_ok != 1 ]]; then
		log "start failed; tearing down (logs kept in $DIR)"
		for f in kubelet containerd kube-apiserver kube-proxy; do
			[[ -f "$DIR/$f.log" ]] && { echo "--- $f.log (last lines)"; tail -n 15 "$DIR/$f.log"; } >&2
		done
		PTW_KEEP_DIR=1 "$HERE/down.sh" "$DIR" || true
	fi
}
trap on_exit EXIT
ip link show "$BRIDGE" >/dev/null 2>&1 && die "bridge $BRIDGE exists, left by a cluster nobody owns: tests/cluster/down.sh cleans it"
start=$SECONDS

# --- what is changed on the host, saved for down.sh -------------------------------------------
: >"$DIR/sysctl.saved"
for key in "${SYSCTLS[@]}"; do
	v="$(sysctl -n "$key" 2>/dev/null)" && printf '%s=%s\n' "$key" "$v" >>"$DIR/sysctl.saved"
done
ls -1 /run/netns 2>/dev/null | sort >"$DIR/netns.before" || true
[[ -d /run/containerd ]] && touch "$DIR/run-containerd.existed"
[[ -d /run/netns ]] && touch "$DIR/run-netns.existed"
sysctl -qw net.ipv4.ip_forward=1

# --- network: the bridge (node address), service route sink, containment ---------------------
OUT_IF="$(ip -o route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit }}')"
echo "$OUT_IF" >"$DIR/outside-interface"
ip link add "$BRIDGE" type bridge
ip addr add "$NODE_IP/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
ip route add "$SVC_CIDR" dev "$BRIDGE"
iptables -t mangle -N "$CONTAIN"
if [[ -n "$OUT_IF" ]]; then
	for m in "-s $POD_CIDR" "-d $POD_CIDR" "-s $SVC_CIDR" "-d $SVC_CIDR" "-i $BRIDGE"; do
		# shellcheck disable=SC2086 # $m is two words on purpose
		iptables -t mangle -A "$CONTAIN" -o "$OUT_IF" $m -j DROP
	done
fi
iptables -t mangle -I FORWARD 1 -j "$CONTAIN"
iptables -t mangle -I POSTROUTING 1 -j "$CONTAIN"

# --- certificates and kubeconfigs --------------------------------------------------------------
PKI="$DIR/pki"
mkdir -p "$PKI"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 30 \
	-subj "/CN=ptw-cluster-ca" -addext "basicConstraints=critical,CA:TRUE" \
	-addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
# leaf NAME SUBJECT USAGE [SANS]
leaf() {
	printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n%s\n' \
		"$3" "${4:+subjectAltName=$4}" >"$PKI/$1.ext"
	openssl req -newkey rsa:2048 -nodes -keyout "$PKI/$1.key" -out "$PKI/$1.csr" -subj "$2" 2>/dev/null
	openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
		-out "$PKI/$1.crt" -days 30 -extfile "$PKI/$1.ext" 2>/dev/null
}
leaf apiserver "/CN=kube-apiserver" serverAuth \
	"IP:$NODE_IP,IP:$KUBERNETES_SVC_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
leaf admin "/O=system:masters/CN=ptw-admin" clientAuth
leaf node "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
leaf kube-proxy "/CN=system:kube-proxy" clientAuth
leaf controller-manager "/CN=system:kube-controller-manager" clientAuth
leaf scheduler "/CN=system:kube-scheduler" clientAuth
openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
rm -f "$PKI"/*.csr
chmod 600 "$PKI"/*.key

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 40000))
		port_in_use "$p" || { echo "$p"; return; }
	done
}
ETCD_PORT="$(free_port)"
ETCD_PEER_PORT="$(free_port)"
API_PORT="$(free_port)"
[[ "$ETCD_PORT" != "$ETCD_PEER_PORT" && "$API_PORT" != "$ETCD_PORT" && "$API_PORT" != "$ETCD_PEER_PORT" ]] || die "port clash, retry"
API_URL="https://$NODE_IP:$API_PORT"

kubeconfig() { # NAME -> DIR/NAME.kubeconfig with PKI/NAME.{crt,key}
	cat >"$DIR/$1.kubeconfig" <<-EOF
		apiVersion: v1
		kind: Config
		clusters:
		- name: ptw
		  cluster: {server: "$API_URL", certificate-authority: "$PKI/ca.crt"}
		users:
		- name: $1
		  user: {client-certificate: "$PKI/$1.crt", client-key: "$PKI/$1.key"}
		contexts:
		- name: ptw
		  context: {cluster: ptw, user: $1}
		current-context: ptw
	EOF
	chmod 600 "$DIR/$1.kubeconfig"
}
for n in admin node kube-proxy controller-manager scheduler; do kubeconfig "$n"; done

# spawn NAME CMD...: a process in its own session, its pid in DIR/NAME.pid, output in DIR/NAME.log
spawn() {
	local name="$1"
	shift
	setsid "$@" </dev/null >"$DIR/$name.log" 2>&1 &
	echo $! >"$DIR/$name.pid"
}
alive() { kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null || die "$1 exited; see $DIR/$1.log"; }
wait_for() { # WHAT SECONDS CMD...
	local what="$1" limit=$((SECONDS + $2))
	shift 2
	until "$@" >/dev/null 2>&1; do
		((SECONDS < limit)) || die "timed out waiting for $what"
		sleep 0.2
	done
}

# --- etcd + kube-apiserver ---------------------------------------------------------------------
spawn etcd "$BIN/etcd" --name=ptw --data-dir="$DIR/etcd" \
	--listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
	--listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
	--initial-cluster="ptw=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls="" --unsafe-no-fsync --log-level=warn
spawn kube-apiserver "$BIN/kube-apiserver" \
	--etcd-servers="http://127.0.0.1:$ETCD_PORT" \
	--bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" \
	--cert-dir="$DIR/apiserver-certs" \
	--tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
	--client-ca-file="$PKI/ca.crt" \
	--kubelet-client-certificate="$PKI/admin.crt" --kubelet-client-key="$PKI/admin.key" \
	--service-account-issuer=https://kubernetes.default.svc.cluster.local \
	--service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
	--service-cluster-ip-range="$SVC_CIDR" \
	--authorization-mode=Node,RBAC \
	--enable-admission-plugins=NodeRestriction \
	--kubelet-preferred-address-types=InternalIP \
	--allow-privileged=true --profiling=false --v=1
CURL=(curl -fsS --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key")
wait_for kube-apiserver "$READY_TIMEOUT" "${CURL[@]}" "$API_URL/readyz"
log "kube-apiserver ready at $API_URL after $((SECONDS - start))s"

# --- controller-manager, scheduler -------------------------------------------------------------
spawn kube-controller-manager "$BIN/kube-controller-manager" \
	--kubeconfig="$DIR/controller-manager.kubeconfig" \
	--authentication-kubeconfig="$DIR/controller-manager.kubeconfig" \
	--authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \
	--service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
	--use-service-account-credentials=true --leader-elect=false \
	--cluster-cidr="$POD_CIDR" --service-cluster-ip-range="$SVC_CIDR" \
	--bind-address=127.0.0.1 --secure-port=0 --v=1
spawn kube-scheduler "$BIN/kube-scheduler" \
	--kubeconfig="$DIR/scheduler.kubeconfig" \
	--authentication-kubeconfig="$DIR/scheduler.kubeconfig" \
	--authorization-kubeconfig="$DIR/scheduler.kubeconfig" \
	--leader-elect=false --bind-address=127.0.0.1 --secure-port=0 --v=1

# --- containerd, with the locally built sandbox image ------------------------------------------
CD="$DIR/containerd"
mkdir -p "$CD" "$DIR/cni/net.d" "$DIR/cni/ipam"
cat >"$CD/config.toml" <<EOF
version = 2
root = "$CD/root"
state = "$CD/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$CD/containerd.sock"
[ttrpc]
  address = "$CD/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$CD/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$DIR/cni/net.d"
EOF
cat >"$DIR/cni/net.d/10-ptw.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "ptw",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$DIR/cni/ipam"
      }
    }
  ]
}
EOF
spawn containerd containerd --config "$CD/config.toml"
wait_for containerd 30 ctr --address "$CD/containerd.sock" version

# The sandbox image: a static pause binary (waits for a signal, reaps children).
mkdir -p "$DIR/images"
cc -static -Os -o "$DIR/images/pause" "$HERE/pause.c"
bash "$ROOT/scripts/build-image.sh" --tag "$PAUSE_IMAGE" --output "$DIR/images/pause.tar" \
	--exec "$DIR/images/pause:/pause" --entrypoint /pause --user 65535:65535 2>/dev/null
ctr --address "$CD/containerd.sock" -n k8s.io images import "$DIR/images/pause.tar" >/dev/null

# --- DNS for <service>.<namespace>.svc: dnsmasq on the node address, fed from the Services ------
mkdir -p "$DIR/dns"
chmod 755 "$DIR" "$DIR/dns"
printf 'nameserver %s\nsearch cluster.local\noptions ndots:5\n' "$NODE_IP" >"$DIR/resolv.conf"
spawn dnsmasq dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-dhcp-interface="$BRIDGE" \
	--listen-address="$NODE_IP" --bind-interfaces --port=53 --hostsdir="$DIR/dns" \
	--local=/cluster.local/ --user=root --pid-file="" --log-facility=-
# shellcheck disable=SC2016 # expanded by the inner bash
spawn dns-sync bash -c '
	while :; do
		"$1" --kubeconfig "$2" get services -A --no-headers \
			-o custom-columns=NS:.metadata.namespace,NAME:.metadata.name,IP:.spec.clusterIP 2>/dev/null |
			awk '\''$3 ~ /^[0-9.]+$/ { print $3, $2 "." $1 ".svc.cluster.local", $2 "." $1 ".svc" }'\'' >"$3/hosts.tmp" &&
			{ cmp -s "$3/hosts.tmp" "$3/hosts" || mv -f "$3/hosts.tmp" "$3/hosts"; }
		sleep 1
	done' _ "$BIN/kubectl" "$DIR/admin.kubeconfig" "$DIR/dns"

# --- kubelet ------------------------------------------------------------------------------------
mkdir -p "$DIR/kubelet" "$DIR/pod-logs"
cat >"$DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: "unix://$CD/containerd.sock"
clusterDNS: ["$NODE_IP"]
clusterDomain: cluster.local
resolvConf: "$DIR/resolv.conf"
podLogsDir: "$DIR/pod-logs"
staticPodPath: ""
protectKernelDefaults: false
serializeImagePulls: false
# The disk may be fuller than a node's: never garbage-collect the imported images, never evict.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
EOF
spawn kubelet "$BIN/kubelet" --config="$DIR/kubelet.yaml" --kubeconfig="$DIR/node.kubeconfig" \
	--hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --root-dir="$DIR/kubelet" \
	--cert-dir="$DIR/kubelet/pki" --v=1

# --- kube-proxy ---------------------------------------------------------------------------------
cat >"$DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$DIR/kube-proxy.kubeconfig"}
mode: iptables
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
iptables: {localhostNodePorts: false, masqueradeAll: false, syncPeriod: 30s, minSyncPeriod: 0s}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
nodePortAddresses: ["$NODE_IP/32"]
EOF
spawn kube-proxy "$BIN/kube-proxy" --config="$DIR/kube-proxy.yaml" --v=1

# --- node Ready -----------------------------------------------------------------------------------
K=("$BIN/kubectl" --kubeconfig "$DIR/admin.kubeconfig")
node_ready() { [[ "$("${K[@]}" get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]; }
limit=$((SECONDS + READY_TIMEOUT))
until node_ready; do
	for p in kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy dnsmasq; do alive "$p"; done
	((SECONDS < limit)) || die "node not Ready within ${READY_TIMEOUT}s"
	sleep 0.5
done
# The default ServiceAccount exists once the controller-manager runs (pods need it).
wait_for "the default ServiceAccount" 60 "${K[@]}" get serviceaccount default -n default

cat >"$DIR/env" <<EOF
KUBECONFIG=$DIR/admin.kubeconfig
PTW_CLUSTER_DIR=$DIR
PTW_APISERVER_URL=$API_URL
PTW_CONTAINERD_ADDRESS=$CD/containerd.sock
PTW_NODE_NAME=$NODE_NAME
EOF
started_ok=1
log "ready: node $NODE_NAME Ready $((SECONDS - start))s after start (KUBECONFIG=$DIR/admin.kubeconfig)"
