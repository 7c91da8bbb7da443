#!/usr/bin/env bash
# Development certificates for pod-template-webhook: a CA and a serving certificate signed by it,
# made with openssl. For `serve --tls-cert/--tls-key`, a webhook configuration's caBundle, or a TLS
# Secret for the chart's `certs.mode=existingSecret`. NOT for production (use the chart's builtin or
# certManager modes there).
#
# Usage: certs/dev-certs.sh OUT_DIR [DNS_NAME_OR_IP ...]
#   Default names: localhost 127.0.0.1 ::1. Add e.g.
#   pod-template-webhook.flyte.svc for a webhook reached through its Service.
#
# Writes into OUT_DIR (created; existing files are replaced):
#   ca.crt  ca.key        the CA (keep ca.key private; re-run to make a new pair)
#   tls.crt tls.key       the serving certificate (ECDSA P-256, 90 days) and its key (PKCS#8)
#   ca-bundle.b64         base64 of ca.crt on one line: the caBundle value
#
# Private keys are never committed: the repository's .gitignore ignores *.key and *.pem.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
	sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
	exit 2
fi
out="$1"
shift
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(localhost 127.0.0.1 ::1)
days="${PTW_CERT_DAYS:-90}"
command -v openssl >/dev/null || {
	echo "dev-certs.sh: openssl not found" >&2
	exit 1
}

mkdir -p "$out"
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

san=""
for n in "${names[@]}"; do
	if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then
		san+="${san:+,}IP:$n"
	else
		san+="${san:+,}DNS:$n"
	fi
done

# CA: self-signed, may sign leaf certificates only (pathlen 0).
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/ca.key" 2>/dev/null
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days "$((days * 4))" \
	-subj "/CN=pod-template-webhook dev CA" \
	-addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
	-addext "keyUsage=critical,keyCertSign,cRLSign" \
	-addext "subjectKeyIdentifier=hash" \
	-out "$tmp/ca.crt"

# Serving certificate: the first name is the subject, every name is a SAN (clients check SANs only).
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/tls.key" 2>/dev/null
openssl req -new -key "$tmp/tls.key" -subj "/CN=${names[0]}" -out "$tmp/tls.csr"
cat >"$tmp/leaf.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
authorityKeyIdentifier=keyid
subjectKeyIdentifier=hash
EXT
openssl x509 -req -in "$tmp/tls.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" -CAcreateserial \
	-sha256 -days "$days" -extfile "$tmp/leaf.ext" -out "$tmp/tls.crt" 2>/dev/null
openssl verify -CAfile "$tmp/ca.crt" "$tmp/tls.crt" >/dev/null

base64 <"$tmp/ca.crt" | tr -d '\n' >"$tmp/ca-bundle.b64"
chmod 0644 "$tmp/ca.crt" "$tmp/tls.crt" "$tmp/ca-bundle.b64"
chmod 0600 "$tmp/ca.key" "$tmp/tls.key"
for f in ca.crt ca.key tls.crt tls.key ca-bundle.b64; do
	mv -f "$tmp/$f" "$out/$f"
done

echo "wrote $out/{ca.crt,ca.key,tls.crt,tls.key,ca-bundle.b64} for: ${names[*]} (valid $days days)"
