#!/usr/bin/env bash
# Stop the kube-apiserver and etcd started by run-apiserver.sh DIR.
# Usage: tests/tools/stop-apiserver.sh DIR [--clean]   (--clean removes DIR)
set -euo pipefail

[[ $# -ge 1 ]] || {
	echo "usage: $0 DIR [--clean]" >&2
	exit 2
}
DIR="$1"

# shellcheck source=tests/tools/pidfile.sh
. "$(dirname "${BASH_SOURCE[0]}")/pidfile.sh"
stop() { stop_pidfile "$DIR/$1.pid" "$1"; }

# apiserver first, so it does not log etcd connection errors while shutting down
stop kube-apiserver
stop etcd

if [[ "${2:-}" == "--clean" ]]; then
	rm -rf "$DIR"
fi
