#!/usr/bin/env bash
# Smoke test for an apiserver started by run-apiserver.sh DIR, using only curl
# with the admin client cert: namespace, ConfigMap, the missing `default`
# ServiceAccount behaviour, a Pod, and a MutatingWebhookConfiguration.
# Usage: tests/tools/smoke-apiserver.sh DIR
set -euo pipefail
DIR="$(cd "$1" && pwd)"
# shellcheck disable=SC1091
source "$DIR/env"

NS="ptw-smoke-$RANDOM"
C=(curl -sS --cacert "$PTW_CA_CERT" --cert "$PTW_ADMIN_CERT" --key "$PTW_ADMIN_KEY" -H 'Content-Type: application/json')
API="$PTW_APISERVER_URL"
fail() {
	echo "FAIL: $*" >&2
	exit 1
}
# req METHOD PATH [BODY] -> prints "HTTP_CODE BODY" ; body on stdout, code in $CODE
req() {
	local out
	out="$("${C[@]}" -X "$1" -w '\n%{http_code}' "$API$2" ${3:+-d "$3"})"
	CODE="${out##*$'\n'}"
	BODY="${out%$'\n'*}"
}
msg() { sed -n 's/.*"message": *"\(\([^"\\]\|\\.\)*\)".*/\1/p' <<<"$BODY"; }
expect() {
	[[ "$CODE" == "$1" ]] || fail "$2: expected HTTP $1, got $CODE: $BODY"
	echo "ok   $2 (HTTP $CODE)"
}

req GET /version
expect 200 "GET /version -> $(grep -o '"gitVersion": *"[^"]*"' <<<"$BODY")"

req POST /api/v1/namespaces "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$NS\"}}"
expect 201 "create namespace $NS"

req POST "/api/v1/namespaces/$NS/configmaps" '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"cm1"},"data":{"k":"v"}}'
expect 201 "create configmap"

POD='{"apiVersion":"v1","kind":"Pod","metadata":{"name":"NAME"},"spec":{AUTOMOUNT"containers":[{"name":"c","image":"registry.k8s.io/pause:3.10"}]}}'

# No kube-controller-manager => no `default` ServiceAccount in new namespaces.
# The ServiceAccount admission plugin looks the SA up even when
# automountServiceAccountToken is false, so both are rejected (403).
p="${POD/NAME/no-sa}"
req POST "/api/v1/namespaces/$NS/pods" "${p/AUTOMOUNT/}"
expect 403 "pod rejected without default SA: $(msg)"
p="${POD/NAME/no-sa-nomount}"
req POST "/api/v1/namespaces/$NS/pods" "${p/AUTOMOUNT/\"automountServiceAccountToken\":false,}"
expect 403 "pod with automountServiceAccountToken=false also rejected"

req POST "/api/v1/namespaces/$NS/serviceaccounts" '{"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"default"}}'
expect 201 "create default serviceaccount"

p="${POD/NAME/p1}"
req POST "/api/v1/namespaces/$NS/pods" "${p/AUTOMOUNT/}"
expect 201 "create pod (stored, no kubelet)"
grep -q '"serviceAccountName": *"default"' <<<"$BODY" || fail "pod has no serviceAccountName=default"
grep -q 'kube-api-access-' <<<"$BODY" && echo "ok   ServiceAccount plugin injected kube-api-access-* token volume"
req GET "/api/v1/namespaces/$NS/pods/p1"
expect 200 "get pod (phase $(grep -o '"phase": *"[^"]*"' <<<"$BODY"))"

# A URL-based webhook (a `service:` clientConfig would need cluster networking).
# failurePolicy Ignore + a selector nothing matches, so it cannot break anything.
MWC="ptw-smoke-$RANDOM"
req POST /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations "$(
	cat <<EOF
{"apiVersion":"admissionregistration.k8s.io/v1","kind":"MutatingWebhookConfiguration",
 "metadata":{"name":"$MWC"},
 "webhooks":[{"name":"smoke.ptw.example.com",
   "clientConfig":{"url":"https://127.0.0.1:1/mutate","caBundle":"$(base64 -w0 <"$PTW_CA_CERT")"},
   "rules":[{"operations":["CREATE"],"apiGroups":[""],"apiVersions":["v1"],"resources":["pods"]}],
   "namespaceSelector":{"matchLabels":{"ptw-smoke-never":"true"}},
   "failurePolicy":"Ignore","sideEffects":"None","admissionReviewVersions":["v1"]}]}
EOF
)"
expect 201 "create mutatingwebhookconfiguration"

req DELETE "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/$MWC"
expect 200 "delete mutatingwebhookconfiguration"
req DELETE "/api/v1/namespaces/$NS"
expect 200 "delete namespace (stays Terminating: no namespace controller)"
echo "smoke test passed"
