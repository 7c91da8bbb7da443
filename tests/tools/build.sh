#!/usr/bin/env bash
# shellcheck disable=SC2016 # bash -c '...' scripts below expand their own "$1"...
# Build the test tool binaries (kube-apiserver, etcd, helm, promtool, and for the single-node
# cluster kubelet, kube-proxy, kube-controller-manager, kube-scheduler, kubectl) from Go
# modules fetched via the Go module proxy, into a cache directory outside git:
#
#   ${PTW_TOOLS_DIR:-$HOME/.cache/pod-template-webhook/tools}/bin/{kube-apiserver,etcd,helm,promtool,kubelet,...}
#
# Idempotent: a binary is rebuilt only if it is missing or its stamp file
# (pinned version + Go version + ldflags + go.sum hash) differs.
#
# Usage: tests/tools/build.sh [kube-apiserver|etcd|helm|promtool|node ...]   (default: all)
#        (node = kubelet kube-proxy kube-controller-manager kube-scheduler kubectl)
# Env:   PTW_TOOLS_DIR  cache root (default ~/.cache/pod-template-webhook/tools)
#        PTW_FORCE=1    rebuild even if up to date
#
# Pinned versions: kube-apiserver and etcd are pinned by the go.mod files in
# tests/tools/apiserver and tests/tools/etcd; helm by HELM_VERSION and promtool by
# PROMETHEUS_VERSION below.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS_DIR="${PTW_TOOLS_DIR:-$HOME/.cache/pod-template-webhook/tools}"
BIN_DIR="$TOOLS_DIR/bin"
STAMP_DIR="$TOOLS_DIR/stamps"
HELM_VERSION="v3.22.0"
# Prometheus v3.16.0: its Go module is tagged v0.<major*100+minor>.<patch>.
PROMETHEUS_VERSION="v0.316.0"

export CGO_ENABLED=0
# Never let a stray GOFLAGS (e.g. -mod=mod) rewrite the committed go.mod/go.sum;
# builds use -mod=readonly so a stale go.sum is an error, not a silent edit.
export GOFLAGS="-mod=readonly"

mkdir -p "$BIN_DIR" "$STAMP_DIR"

log() { printf '[build.sh] %s\n' "$*" >&2; }

# modver DIR MODULE -> version of MODULE selected by the module in DIR
modver() { (cd "$1" && go list -m -f '{{.Version}}' "$2"); }

sha() { cat "$@" | sha256sum | cut -c1-16; }

# build_one NAME STAMP_KEY CMD...  (CMD must produce $BIN_DIR/NAME.tmp)
# (CMD is `bash -c '...' _ args`: single quotes are intentional.)
build_one() {
	local name="$1" key="$2"
	shift 2
	local bin="$BIN_DIR/$name" stamp="$STAMP_DIR/$name.stamp"
	if [[ "${PTW_FORCE:-0}" != 1 && -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
		log "$name: up to date ($key) -> $bin"
		return 0
	fi
	log "$name: building ($key)"
	local start=$SECONDS
	rm -f "$bin.tmp"
	"$@"
	mv -f "$bin.tmp" "$bin"
	printf '%s\n' "$key" >"$stamp"
	log "$name: built in $((SECONDS - start))s -> $bin ($(du -h "$bin" | cut -f1))"
}

GOVER="$(go env GOVERSION)"

# build_kube NAME: k8s.io/kubernetes/cmd/NAME from the module pinned in ./apiserver.
build_kube() {
	local name="$1" dir="$HERE/apiserver" v
	v="$(modver "$dir" k8s.io/kubernetes)"
	local minor="${v#v1.}"
	minor="${minor%%.*}"
	local ld="-s -w" p
	# Same version stamping as the upstream build (hack/lib/version.sh), so
	# /version reports v1.X.Y instead of v0.0.0-master (which kubectl and helm cannot parse).
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
	done
	local key
	key="k8s.io/kubernetes@$v $GOVER $(sha "$dir/go.mod" "$dir/go.sum") ld=$(printf '%s' "$ld" | sha256sum | cut -c1-8)"
	build_one "$name" "$key" \
		bash -c 'cd "$1" && go build -trimpath -ldflags "$2" -o "$3" "k8s.io/kubernetes/cmd/$4"' \
		_ "$dir" "$ld" "$BIN_DIR/$name.tmp" "$name"
}

build_apiserver() { build_kube kube-apiserver; }

build_etcd() {
	local dir="$HERE/etcd" v
	v="$(modver "$dir" go.etcd.io/etcd/server/v3)"
	local ld="-s -w"
	local key
	key="go.etcd.io/etcd/server/v3@$v $GOVER $(sha "$dir/go.mod" "$dir/go.sum")"
	# `go install go.etcd.io/etcd/server/v3@vX` is refused (its go.mod has
	# replace directives), hence the tiny wrapper module in ./etcd.
	build_one etcd "$key" \
		bash -c 'cd "$1" && go build -trimpath -ldflags "$2" -o "$3" go.etcd.io/etcd/server/v3' \
		_ "$dir" "$ld" "$BIN_DIR/etcd.tmp"
}

build_helm() {
	local v="$HELM_VERSION"
	# Mirror helm's Makefile: version + default .Capabilities.KubeVersion
	# (derived from helm's client-go v0.37.x -> 1.37).
	local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$v -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
	ld+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=37"
	ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37"
	local key
	key="helm.sh/helm/v3@$v $GOVER ld=$(printf '%s' "$ld" | sha256sum | cut -c1-8)"
	# helm's go.mod has no replace directives, so plain `go install pkg@version`
	# works (module checksums verified against sum.golang.org). GOFLAGS must
	# not carry -mod=... for `go install pkg@version`.
	build_one helm "$key" \
		bash -c 'tmp="$(mktemp -d)"; trap "rm -rf \"$tmp\"" EXIT; cd "$tmp" && GOFLAGS= GOBIN="$tmp" go install -trimpath -ldflags "$2" "helm.sh/helm/v3/cmd/helm@$1" && mv "$tmp/helm" "$3"' \
		_ "$v" "$ld" "$BIN_DIR/helm.tmp"
}

# promtool (check and unit-test the chart's alert rules, parse the dashboard's queries).
build_promtool() {
	local v="$PROMETHEUS_VERSION" minor="${PROMETHEUS_VERSION#v0.}"
	minor="${minor%%.*}"
	local semver="$((minor / 100)).$((minor % 100)).${PROMETHEUS_VERSION##*.}"
	local ld="-s -w -X github.com/prometheus/common/version.Version=$semver"
	local key
	key="github.com/prometheus/prometheus@$v $GOVER ld=$(printf '%s' "$ld" | sha256sum | cut -c1-8)"
	# Like helm: no replace directives, so `go install pkg@version` (checksums from sum.golang.org).
	build_one promtool "$key" \
		bash -c 'tmp="$(mktemp -d)"; trap "rm -rf \"$tmp\"" EXIT; cd "$tmp" && GOFLAGS= GOBIN="$tmp" go install -trimpath -ldflags "$2" "github.com/prometheus/prometheus/cmd/promtool@$1" && mv "$tmp/promtool" "$3"' \
		_ "$v" "$ld" "$BIN_DIR/promtool.tmp"
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(kube-apiserver etcd helm promtool node)
total=$SECONDS
for t in "${targets[@]}"; do
	case "$t" in
	kube-apiserver | apiserver) build_apiserver ;;
	etcd) build_etcd ;;
	helm) build_helm ;;
	promtool) build_promtool ;;
	kubelet | kube-proxy | kube-controller-manager | kube-scheduler | kubectl) build_kube "$t" ;;
	node) for n in kubelet kube-proxy kube-controller-manager kube-scheduler kubectl; do build_kube "$n"; done ;;
	*)
		log "unknown target: $t"
		exit 2
		;;
	esac
done
log "done in $((SECONDS - total))s; binaries in $BIN_DIR"
