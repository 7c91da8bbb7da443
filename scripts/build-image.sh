#!/usr/bin/env bash
# Build a container image as a docker-archive tarball without Docker, BuildKit or a registry:
# the air-gapped path to the image the Dockerfile describes. The archive loads with
# `docker load -i`, `ctr -n k8s.io images import`, `podman load`, or goes to a private registry
# with `skopeo copy docker-archive:FILE docker://REGISTRY/NAME:TAG`.
#
#   scripts/build-image.sh [--binary PATH] [--tag REF] [--output FILE]
#
# The webhook image (default): the release binary (built with `cargo build --release --locked`
# if --binary is not given and it is missing), the runtime libraries it links (glibc, libm,
# libgcc_s and the loader, copied from this machine, so build on the Debian release the binary
# was linked on), CA certificates, passwd/group entries for uid 65532 (`nonroot`), and the same
# user, entrypoint, command, ports and environment as the Dockerfile's runtime stage
# (tests/image.rs compares them). Default tag: the chart's image repository and appVersion.
#
# Generic use (the tests build their sandbox, task and curl images with it):
#
#   scripts/build-image.sh --tag REF --output FILE --exec SRC[:DEST]... [--file SRC:DEST]...
#       [--entrypoint ARG]... [--cmd ARG]... [--user U] [--env K=V]... [--port P/tcp]...
#
# --exec copies an executable and every library `ldd` lists for it; --file copies a file as is.
# Everything in the layer is owned by root with mtime 0, so the same inputs give the same archive.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[build-image] %s\n' "$*" >&2; }
die() {
	log "$*"
	exit 1
}

app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$ROOT/charts/pod-template-webhook/Chart.yaml")"
repository="$(sed -n '/^image:/,/^[^ ]/s/^  repository: *\(.*\)$/\1/p' "$ROOT/charts/pod-template-webhook/values.yaml")"

tag="" output="" binary="" user="" generic=0
execs=() files=() entrypoint=() cmd=() envs=() ports=()
while (($#)); do
	case "$1" in
	--tag) tag="$2"; shift 2 ;;
	--output | -o) output="$2"; shift 2 ;;
	--binary) binary="$2"; shift 2 ;;
	--exec) execs+=("$2"); generic=1; shift 2 ;;
	--file) files+=("$2"); shift 2 ;;
	--entrypoint) entrypoint+=("$2"); shift 2 ;;
	--cmd) cmd+=("$2"); shift 2 ;;
	--user) user="$2"; shift 2 ;;
	--env) envs+=("$2"); shift 2 ;;
	--port) ports+=("$2"); shift 2 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//;$d'
		exit 0
		;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done

if ((generic == 0)); then
	# The webhook image: what the Dockerfile's runtime stage (distroless cc-debian12:nonroot) has.
	if [[ -z "$binary" ]]; then
		binary="$ROOT/target/release/pod-template-webhook"
		if [[ ! -x "$binary" ]]; then
			log "building the release binary"
			(cd "$ROOT" && cargo build --release --locked --bin pod-template-webhook)
		fi
	fi
	[[ -x "$binary" ]] || die "not an executable: $binary"
	execs=("$binary:/usr/local/bin/pod-template-webhook")
	[[ -f /etc/ssl/certs/ca-certificates.crt ]] || die "no /etc/ssl/certs/ca-certificates.crt (Debian: apt-get install ca-certificates)"
	files+=("/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt")
	[[ -n "$user" ]] || user="65532:65532"
	# From the Dockerfile: USER, EXPOSE, ENV, ENTRYPOINT, CMD (distroless's own PATH and
	# SSL_CERT_FILE first, as the base image sets them).
	((${#entrypoint[@]})) || entrypoint=(/usr/local/bin/pod-template-webhook)
	((${#cmd[@]})) || cmd=(serve)
	envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
		SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
		MIMALLOC_ARENA_EAGER_COMMIT=0 "${envs[@]}")
	((${#ports[@]})) || ports=(8443/tcp 8080/tcp)
	[[ -n "$tag" ]] || tag="$repository:$app_version"
	[[ -n "$output" ]] || output="$ROOT/target/image/pod-template-webhook-$app_version.tar"
else
	[[ -n "$tag" && -n "$output" ]] || die "--exec needs --tag and --output"
	[[ -n "$user" ]] || user="65532:65532"
	((${#envs[@]})) || envs=(PATH=/usr/local/bin:/usr/bin:/bin)
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{etc,tmp,home/nonroot,usr/local/bin} "$work/out"
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/home/nonroot"

# copy SRC DEST: a regular file (symlinks resolved) at DEST in the rootfs.
copy() {
	mkdir -p "$rootfs$(dirname "$2")"
	cp -L "$1" "$rootfs$2"
}
for spec in "${execs[@]}"; do
	src="${spec%%:*}" dest="${spec#*:}"
	[[ "$spec" == *:* ]] || dest="/usr/local/bin/$(basename "$src")"
	[[ -x "$src" ]] || die "not an executable: $src"
	copy "$src" "$dest"
	chmod 0755 "$rootfs$dest"
	# Debug info is not needed at run time (the release profile keeps it for profiling).
	if command -v strip >/dev/null; then strip --strip-debug "$rootfs$dest" 2>/dev/null || true; fi
	# The libraries the dynamic loader will look for, at the paths ldd reports (static: none).
	while read -r lib; do
		[[ -n "$lib" && -e "$lib" ]] && copy "$lib" "$lib"
	done < <(ldd "$src" 2>/dev/null | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) .*/\1/p')
done
for spec in "${files[@]}"; do
	copy "${spec%%:*}" "${spec#*:}"
done
# distroless's users: root, nobody and nonroot (65532).
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"

# The layer: a reproducible tar (sorted, root-owned, mtime 0); /home/nonroot owned by 65532.
layer="$work/layer.tar"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
	--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
	--exclude=./home/nonroot -C "$rootfs" -cf "$layer" .
tar --mtime=@0 --owner=65532 --group=65532 --numeric-owner --format=posix \
	--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
	-C "$rootfs" -rf "$layer" ./home/nonroot
diff_id="$(sha256sum "$layer" | cut -d' ' -f1)"

# JSON helpers (values are plain strings without quotes or backslashes).
json_list() {
	local out="" v
	for v in "$@"; do
		[[ "$v" != *'"'* && "$v" != *'\'* ]] || die "unsupported character in: $v"
		out+="${out:+,}\"$v\""
	done
	printf '[%s]' "$out"
}
json_ports() {
	local out="" p
	for p in "$@"; do out+="${out:+,}\"$p\":{}"; done
	printf '{%s}' "$out"
}

config="$(printf '{"architecture":"amd64","os":"linux","config":{"User":"%s","ExposedPorts":%s,"Env":%s,"Entrypoint":%s,"Cmd":%s,"WorkingDir":"/","Labels":{"org.opencontainers.image.title":"%s","org.opencontainers.image.version":"%s"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"scripts/build-image.sh"}]}' \
	"$user" "$(json_ports "${ports[@]}")" "$(json_list "${envs[@]}")" "$(json_list "${entrypoint[@]}")" \
	"$(json_list "${cmd[@]}")" "${tag%:*}" "${tag##*:}" "$diff_id")"
config_id="$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)"

out="$work/out"
mkdir -p "$out/$diff_id"
mv "$layer" "$out/$diff_id/layer.tar"
printf '%s' "$config" >"$out/$config_id.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' "$config_id" "$tag" "$diff_id" >"$out/manifest.json"
printf '{"%s":{"%s":"%s"}}' "${tag%:*}" "${tag##*:}" "$diff_id" >"$out/repositories"

mkdir -p "$(dirname "$output")"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$out" -cf "$output.tmp" .
mv -f "$output.tmp" "$output"
log "$tag -> $output ($(du -h "$output" | cut -f1), image id sha256:${config_id:0:12})"
