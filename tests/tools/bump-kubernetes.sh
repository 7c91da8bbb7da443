#!/usr/bin/env bash
# Re-pin tests/tools/apiserver to another k8s.io/kubernetes release:
# regenerates go.mod (require + one replace per staging module that upstream
# maps to ./staging/src/..., pointed at the published v0.X.Y tag), then
# `go mod tidy`. Usage: tests/tools/bump-kubernetes.sh v1.37.3
set -euo pipefail
V="${1:?usage: $0 v1.MINOR.PATCH}"
[[ "$V" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || {
	echo "expected v1.MINOR.PATCH, got $V" >&2
	exit 2
}
STAGING_V="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/apiserver"

upstream_mod="$(cd /tmp && GOFLAGS='' go mod download -json "k8s.io/kubernetes@$V" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')"
go_line="$(grep -m1 '^go ' "$upstream_mod")"
# only staging modules that k8s.io/kubernetes actually requires
mapfile -t staging < <(
	sed -n '/^replace (/,/^)/p' "$upstream_mod" | awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' |
		while read -r m; do grep -qE "^[[:space:]]+$m v0\.0\.0( |$)" "$upstream_mod" && echo "$m"; done
)

{
	echo "module github.com/pod-template-webhook/tests/tools/apiserver"
	echo
	echo "$go_line"
	echo
	echo "require k8s.io/kubernetes $V"
	echo
	echo "// k8s.io/kubernetes replaces its staging modules with ./staging/src/...; map them"
	echo "// to the published $STAGING_V tags of the same release."
	echo "replace ("
	for m in "${staging[@]}"; do printf '\t%s => %s %s\n' "$m" "$m" "$STAGING_V"; done
	echo ")"
} >"$DIR/go.mod"
rm -f "$DIR/go.sum"
(cd "$DIR" && GOFLAGS='' go mod tidy)
echo "pinned k8s.io/kubernetes $V (${#staging[@]} staging modules -> $STAGING_V); now run tests/tools/build.sh" >&2
