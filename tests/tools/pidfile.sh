# shellcheck shell=bash
# Sourced by tests/tools/stop-apiserver.sh and tests/cluster/down.sh: stopping a process the
# scripts started, by the pid file they wrote.

# stop_pidfile PIDFILE NAME [SECONDS]: TERM the process, KILL it if it still runs after SECONDS
# (default 10), remove PIDFILE. Nothing to do when PIDFILE is absent or the process is gone.
stop_pidfile() {
	local pidf="$1" name="$2" seconds="${3:-10}" pid i
	[[ -f "$pidf" ]] || return 0
	pid="$(cat "$pidf")"
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < seconds * 10; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			echo "[$(basename "$0")] $name ($pid) did not exit on TERM, sending KILL" >&2
			kill -KILL "$pid" 2>/dev/null || true
			sleep 0.2
		fi
	fi
	rm -f "$pidf"
}
