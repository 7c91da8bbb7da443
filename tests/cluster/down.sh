#!/usr/bin/env bash
# Tear down the cluster tests/cluster/up.sh DIR started, completely: processes stopped by PID
# (containers through their cgroups, containerd's shims found by this DIR's socket in their
# command line), mounts under DIR and the pods' network namespaces unmounted, cgroups removed,
# kube-proxy/kubelet iptables chains and the containment chain removed, the bridge deleted,
# conntrack entries of the pod and service ranges dropped, sysctls restored, then DIR deleted
# (kept with PTW_KEEP_DIR=1). Idempotent; safe on a half-started cluster. Exits non-zero if
# anything is left (and says what).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/cluster/common.sh
. "$HERE/common.sh"
[[ $# -eq 1 ]] || {
	echo "usage: $0 DIR" >&2
	exit 2
}
# ours DIR: this machine's cluster record names DIR.
ours() { [[ -f "$CURRENT" && "$(cut -d' ' -f1 "$CURRENT")" == "$1" ]]; }
[[ -d "$1" ]] || {
	ours "$1" && rm -f "$CURRENT"
	exit 0
}
DIR="$(cd "$1" && pwd)"
CD="$DIR/containerd"

# stop NAME [SECONDS]: TERM, then KILL after SECONDS (default 10), by the pid in DIR/NAME.pid.
# shellcheck source=tests/tools/pidfile.sh
. "$HERE/../tools/pidfile.sh"
stop() { stop_pidfile "$DIR/$1.pid" "$1" "${2:-10}"; }

# The pids of the processes in cgroup trees named kubepods* (containers the kubelet started).
pod_cgroups() { find /sys/fs/cgroup/*/kubepods* /sys/fs/cgroup/kubepods* -depth -type d 2>/dev/null; }
pod_pids() {
	local d
	pod_cgroups | while read -r d; do cat "$d/cgroup.procs" 2>/dev/null; done | sort -u
}
# containerd shims serving this DIR's containerd (their command line names its socket).
our_shims() {
	local p
	for p in /proc/[0-9]*; do
		{ tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -q "containerd-shim.*-address $CD/containerd.sock" && echo "${p#/proc/}"
	done
}

# 1. The node agent first (it would restart containers), then the containers and their shims.
stop kubelet 10
for _ in 1 2 3 4 5 6 7 8 9 10; do
	pids="$(pod_pids)"
	[[ -n "$pids" ]] || break
	# shellcheck disable=SC2086
	kill -KILL $pids 2>/dev/null
	sleep 0.3
done
for pid in $(our_shims); do kill -KILL "$pid" 2>/dev/null; done
stop containerd 10
for pid in $(our_shims); do kill -KILL "$pid" 2>/dev/null; done

# 2. The rest of the cluster.
stop kube-proxy 5
stop dns-sync 2
stop dnsmasq 5
stop kube-scheduler 5
stop kube-controller-manager 5
stop kube-apiserver 15
stop etcd 10

# 3. Mounts: everything under DIR (deepest first), the pods' network namespaces, shim sockets.
for _ in 1 2 3; do
	mapfile -t mounts < <(awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
	((${#mounts[@]})) || break
	for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
done
if [[ -f "$DIR/netns.before" ]]; then
	comm -13 "$DIR/netns.before" <(ls -1 /run/netns 2>/dev/null | sort) | while read -r ns; do
		[[ "$ns" == cni-* ]] || continue
		umount "/run/netns/$ns" 2>/dev/null || umount -l "/run/netns/$ns" 2>/dev/null
		rm -f "/run/netns/$ns"
	done
fi
if [[ -d /run/netns && ! -f "$DIR/run-netns.existed" && -f "$DIR/outside-interface" ]]; then
	rmdir /run/netns 2>/dev/null
fi
if [[ -d /run/containerd && ! -f "$DIR/run-containerd.existed" && -f "$DIR/outside-interface" ]]; then
	# Created by this cluster's containerd (shim sockets in /run/containerd/s).
	rm -rf /run/containerd
fi

# 4. Cgroups the kubelet and runc made (empty now; a dying process may hold one a moment longer).
for _ in $(seq 1 20); do
	left="$(pod_cgroups)"
	[[ -n "$left" ]] || break
	# shellcheck disable=SC2046
	kill -KILL $(pod_pids) 2>/dev/null
	while read -r d; do rmdir "$d" 2>/dev/null; done <<<"$left"
	sleep 0.3
done

# 5. iptables: kube-proxy's and kubelet's KUBE-* chains, and the containment chain.
sweep() { # IPTABLES-COMMAND
	local ipt="$1" t rule chain
	command -v "$ipt" >/dev/null || return 0
	for t in filter nat mangle raw; do
		"$ipt" -t "$t" -S >/dev/null 2>&1 || continue
		# Rules that jump to our chains, in any chain.
		"$ipt" -t "$t" -S 2>/dev/null | grep -E -- "-j (KUBE-|$CONTAIN)" | grep -E '^-A' | while read -r rule; do
			eval "$ipt -t $t ${rule/#-A/-D}" 2>/dev/null
		done
		for chain in $("$ipt" -t "$t" -S 2>/dev/null | awk -v c="$CONTAIN" '$1 == "-N" && ($2 ~ /^KUBE-/ || $2 == c) { print $2 }'); do
			"$ipt" -t "$t" -F "$chain" 2>/dev/null
		done
		for chain in $("$ipt" -t "$t" -S 2>/dev/null | awk -v c="$CONTAIN" '$1 == "-N" && ($2 ~ /^KUBE-/ || $2 == c) { print $2 }'); do
			"$ipt" -t "$t" -X "$chain" 2>/dev/null
		done
	done
}
for ipt in iptables ip6tables iptables-legacy ip6tables-legacy; do sweep "$ipt"; done
# kube-proxy's and kubelet's nftables tables, if they made any.
if command -v nft >/dev/null; then
	for fam_table in "ip kube-proxy" "ip6 kube-proxy"; do
		nft list table $fam_table >/dev/null 2>&1 && nft delete table $fam_table
	done
fi

# 6. Network: veths on the bridge, the bridge (and its routes), conntrack entries.
for veth in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{ print $2 }' | cut -d@ -f1); do
	ip link del "$veth" 2>/dev/null
done
ip link del "$BRIDGE" 2>/dev/null
ip route del "$SVC_CIDR" 2>/dev/null
if command -v conntrack >/dev/null; then
	for f in "-s $POD_CIDR" "-d $POD_CIDR" "-d $SVC_CIDR" "-s $SVC_CIDR"; do
		# shellcheck disable=SC2086
		conntrack -D $f >/dev/null 2>&1
	done
fi

# 7. Host settings back as they were.
if [[ -f "$DIR/sysctl.saved" ]]; then
	while IFS='=' read -r key value; do
		[[ "$(sysctl -n "$key" 2>/dev/null)" == "$value" ]] || sysctl -qw "$key=$value" 2>/dev/null
	done <"$DIR/sysctl.saved"
fi

# 8. Check: nothing of this cluster is left.
problems=()
for p in $(our_shims); do problems+=("shim pid $p"); done
for f in "$DIR"/*.pid; do [[ -e "$f" ]] && problems+=("pid file $f"); done
[[ -n "$(pod_pids)" ]] && problems+=("container processes: $(pod_pids | tr '\n' ' ')")
[[ -n "$(pod_cgroups)" ]] && problems+=("cgroups: $(pod_cgroups | head -3 | tr '\n' ' ')")
awk -v d="$DIR/" 'index($2, d) == 1 { found = 1 } END { exit !found }' /proc/self/mounts && problems+=("mounts under $DIR")
ip link show "$BRIDGE" >/dev/null 2>&1 && problems+=("bridge $BRIDGE")
iptables-save 2>/dev/null | grep -qiE "kube|$CONTAIN" && problems+=("iptables rules")
if [[ -f "$DIR/sysctl.saved" ]]; then
	while IFS='=' read -r key value; do
		[[ "$(sysctl -n "$key" 2>/dev/null)" == "$value" ]] || problems+=("sysctl $key")
	done <"$DIR/sysctl.saved"
fi
if ((${#problems[@]})); then
	log "left behind: ${problems[*]}"
	exit 1
fi
ours "$DIR" && rm -f "$CURRENT"
[[ "${PTW_KEEP_DIR:-0}" == 1 ]] || rm -rf "$DIR"
log "torn down: nothing left"
