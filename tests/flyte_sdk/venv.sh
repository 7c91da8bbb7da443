#!/usr/bin/env bash
# Creates, or reuses, the virtualenv with the pinned Flyte SDK (requirements.txt beside this file)
# that tests/flyte_sdk.rs runs, in a cache directory outside git:
#
#   ${PTW_TOOLS_DIR:-$HOME/.cache/pod-template-webhook/tools}/flyte-venv
#
# Reused while its stamp (requirements.txt hash + Python version) matches; made anew otherwise.
# Prints the virtualenv's python on stdout; logs go to stderr.
# Env: PTW_PYTHON  the Python 3 that makes the virtualenv (default python3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS_DIR="${PTW_TOOLS_DIR:-$HOME/.cache/pod-template-webhook/tools}"
VENV="$TOOLS_DIR/flyte-venv"
PYTHON="${PTW_PYTHON:-python3}"

log() { printf '[flyte-venv] %s\n' "$*" >&2; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
	log "$PYTHON not found: the Flyte SDK test needs Python 3 with the venv module (Debian: apt-get install python3 python3-venv; .ci/run installs them)"
	exit 2
fi
# Debian's python3 has venv but not ensurepip until python3-venv is installed; `-m venv` needs both.
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
	log "$PYTHON ($(command -v "$PYTHON")) lacks the venv/ensurepip modules (Debian: apt-get install python3-venv; .ci/run installs it)"
	exit 2
fi

mkdir -p "$TOOLS_DIR"
# Serialize concurrent callers (test threads, test binaries, .ci/run).
exec 9>"$TOOLS_DIR/flyte-venv.lock"
flock 9

key="$(grep -v '^#' "$HERE/requirements.txt" | sha256sum | cut -c1-16) $("$PYTHON" -c 'import platform; print(platform.python_version())')"
if [[ -x "$VENV/bin/python" && -f "$VENV/ptw.stamp" && "$(cat "$VENV/ptw.stamp")" == "$key" ]]; then
	log "up to date ($key) -> $VENV"
else
	log "creating $VENV ($key)"
	start=$SECONDS
	rm -rf "$VENV"
	"$PYTHON" -m venv "$VENV"
	"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$HERE/requirements.txt"
	printf '%s\n' "$key" >"$VENV/ptw.stamp"
	log "created in $((SECONDS - start))s: $("$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -E '^(flyte|kubernetes) ' | tr -s ' ' | paste -sd ',')"
fi
printf '%s\n' "$VENV/bin/python"
