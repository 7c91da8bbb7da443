# shellcheck shell=bash
# Shared by up.sh and down.sh: the cluster's fixed names and addresses.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" # iptables, conntrack, dnsmasq, ip
BRIDGE=ptw0                   # the CNI bridge; its address is the node's
NODE_IP=10.244.0.1
POD_CIDR=10.244.0.0/24
SVC_CIDR=10.96.0.0/24
KUBERNETES_SVC_IP=10.96.0.1
NODE_NAME=ptw-node
CONTAIN=PTW-CONTAIN           # mangle chain dropping pod/service traffic toward the outside
PAUSE_IMAGE=ptw.local/pause:1
CNI_BIN=/usr/lib/cni
CURRENT=/run/ptw-cluster.current
# Host settings kubelet and kube-proxy may change (and ip_forward, which up.sh sets).
SYSCTLS=(net.ipv4.ip_forward kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom
	kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.conf.all.route_localnet
	net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
	net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_tcp_timeout_established
	net.netfilter.nf_conntrack_tcp_timeout_close_wait net.netfilter.nf_conntrack_tcp_be_liberal)
log() { printf '[cluster] %s\n' "$*" >&2; }
die() {
	log "$*"
	exit 1
}
