#!/usr/bin/env bash
# Stop the kube-apiserver and etcd started by run-apiserver.sh DIR.
# Usage: tests/tools/stop-apiserver.sh DIR [--clean]   (--clean removes DIR)
set -euo pipefail

[[ $# -ge 1 ]] || {
	echo "usage: $0 DIR [--clean]" >&2
	exit 2
}
DIR="$1"

stop() {
	local pidf="$DIR/$1.pid" pid _
	[[ -f "$pidf" ]] || return 0
	pid="$(cat "$pidf")"
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 1 50); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.2
		done
		if kill -0 "$pid" 2>/dev/null; then
			echo "[stop-apiserver] $1 ($pid) did not exit on TERM, sending KILL" >&2
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	rm -f "$pidf"
}

# apiserver first, so it does not log etcd connection errors while shutting down
stop kube-apiserver
stop etcd

if [[ "${2:-}" == "--clean" ]]; then
	rm -rf "$DIR"
fi
