#!/usr/bin/env bash
# End-to-end load test of `pod-template-webhook serve` over TLS (issue #6; docs/performance.md).
#
#   scripts/load-test.sh            # about 2-3 minutes after the release build
#
# What it does, all on 127.0.0.1, bounded in time:
#   1. installs h2load (Debian nghttp2-client) and wrk if missing, builds --release;
#   2. writes 1,000 template keys (100 ConfigMaps x 10 keys) plus examples/templates to a temp dir;
#   3. starts three servers on that directory, each with a generated self-signed certificate:
#        real     the webhook, RUST_LOG=info (the default: a line for denials and warnings only)
#        verbose  the webhook, RUST_LOG=info,pod_template_webhook=debug (a line for every admission)
#        noop   --noop-handler (cargo feature noop-handler): answers `allowed` with the request uid,
#               reading nothing else (the TLS + HTTP stack alone);
#   4. drives each with the real AdmissionReview (examples/reviews/flyte-task-pod.json):
#        HTTP/2   h2load, keep-alive, $H2_CLIENTS connections x $H2_STREAMS streams
#        HTTP/1.1 wrk with a Lua script POSTing the review, $H1_CONNS keep-alive connections
#      then a rate-limited HTTP/2 pass at $RATE admissions/s against `real`;
#   5. prints req/s, client p50/p99, throughput relative to noop, the server-side latency from
#      the /metrics histogram (bucket deltas before/after each pass), and VmRSS idle and under load;
#   6. against nginx (Debian nginx, installed if missing) answering POST /mutate with the real
#      server's response to the sample, from memory (`return 200 '...'`), on the same certificate
#      (TLS 1.2 and 1.3): HTTP/1.1 keep-alive, wrk -t1 -c $NGINX_CONNS, $NGINX_ROUNDS rounds of
#      real, noop, nginx in turn; the median over rounds of real/nginx and real/noop (issue 21).
#
# Knobs (environment): DURATION (s per pass, 8), WARMUP (s, 1), H2_CLIENTS (4), H2_STREAMS (32),
# H1_CONNS (64), RATE (5000), RATE_CLIENTS (25), ROUNDS (2: each pass runs ROUNDS times, servers
# alternating, and the best round counts), TEMPLATES (1000), NGINX_CONNS (16), NGINX_ROUNDS (3),
# PASSES ("h2 h1 rate nginx": the parts to run), KEEP=1 keeps the temp dir, PERF=1 records `perf`
# on the real server during its first HTTP/2 pass, or during its first pass against nginx when
# HTTP/2 is not run, or during PERF_PASS (e.g. k16.real.1: proto.server.round) (needs perf).
# The servers run with MIMALLOC_ARENA_EAGER_COMMIT=0, as the chart and the image set it.
# The client shares the machine with the server: on a 2-core machine both compete for CPU, so
# read the absolute req/s as a lower bound and the ratio to noop (same run, same client) as the
# figure that compares.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DURATION=${DURATION:-8}
WARMUP=${WARMUP:-1}
H2_CLIENTS=${H2_CLIENTS:-4}
H2_STREAMS=${H2_STREAMS:-32}
H1_CONNS=${H1_CONNS:-64}
RATE=${RATE:-5000}
RATE_CLIENTS=${RATE_CLIENTS:-25}
ROUNDS=${ROUNDS:-2}
TEMPLATES=${TEMPLATES:-1000}
NGINX_CONNS=${NGINX_CONNS:-16}
NGINX_ROUNDS=${NGINX_ROUNDS:-3}
PASSES=${PASSES:-h2 h1 rate nginx}
runs() { [[ " $PASSES " == *" $1 "* ]]; }
REVIEW=${REVIEW:-examples/reviews/flyte-task-pod.json}
BUILT=${CARGO_TARGET_DIR:-target}/release/pod-template-webhook
export MIMALLOC_ARENA_EAGER_COMMIT=${MIMALLOC_ARENA_EAGER_COMMIT:-0}

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'load-test: %s\n' "$*" >&2; exit 1; }

# --- 1. tools and build ------------------------------------------------------------------------
need=()
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
if runs nginx; then command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx); fi
if ((${#need[@]})); then
    say "installing ${need[*]}"
    [[ $(id -u) == 0 ]] || die "need root to apt-get install ${need[*]} (or install them yourself)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

say "cargo build --release --features noop-handler"
# The noop baseline (--noop-handler) exists only with this feature, never in the default build.
cargo build --release --features noop-handler --bin pod-template-webhook >&2

WORK=$(mktemp -d /tmp/ptw-load.XXXXXX)
# A copy: a later build into the same target directory must not change the binary under test.
cp "$BUILT" "$WORK/pod-template-webhook"
BIN=$WORK/pod-template-webhook
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ ${KEEP:-0} == 1 ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 2. templates -----------------------------------------------------------------------------
say "writing $TEMPLATES template keys to $WORK/templates"
mkdir -p "$WORK/templates"
cp examples/templates/*.yaml "$WORK/templates/"
per_cm=10
for ((cm = 0; cm < (TEMPLATES + per_cm - 1) / per_cm; cm++)); do
    {
        printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: load-templates-%03d\n' "$cm"
        # Every tenth ConfigMap lives in a team namespace, the rest in the platform namespace.
        if ((cm % 10 == 9)); then printf '  namespace: team-%d\n' "$cm"; else printf '  namespace: flyte\n'; fi
        printf '  labels:\n    flyte.org/pod-templates: "true"\ndata:\n'
        for ((k = 0; k < per_cm && cm * per_cm + k < TEMPLATES; k++)); do
            n=$((cm * per_cm + k))
            cat <<EOF
  env-$(printf %04d "$n"): |
    primaryContainerName: primary
    labels: {team: t$n}
    annotations: {cost-center: "$n"}
    podSpec:
      containers:
        - name: primary
          env: [{name: TEMPLATE_ID, value: "$n"}, {name: TZ, value: UTC}]
          resources: {requests: {cpu: 500m, memory: 1Gi}}
      imagePullSecrets: [{name: regcred-$n}]
      nodeSelector: {pool: p$n}
      tolerations: [{key: dedicated, operator: Equal, value: t$n, effect: NoSchedule}]
EOF
        done
    } >"$WORK/templates/load-$(printf %03d "$cm").yaml"
done
"$BIN" validate "$WORK/templates" >&2

# --- 3. servers -------------------------------------------------------------------------------
# One certificate for every server, nginx too: ECDSA P-256, like the self-signed one `serve`
# makes without --tls-cert.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
next_port=${BASE_PORT:-$((20000 + RANDOM % 20000))}
free_port() { # sets FREE (no subshell: next_port must advance)
    while ! port_free "$next_port"; do next_port=$((next_port + 1)); done
    FREE=$next_port
    next_port=$((next_port + 1))
}

declare -A PID PORT ADMIN
start() { # name RUST_LOG extra-args...
    local name=$1 level=$2
    shift 2
    free_port
    PORT[$name]=$FREE
    free_port
    ADMIN[$name]=$FREE
    RUST_LOG=$level "$BIN" serve --templates "$WORK/templates" --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" \
        --listen "127.0.0.1:${PORT[$name]}" --admin-listen "127.0.0.1:${ADMIN[$name]}" "$@" \
        2>"$WORK/$name.log" &
    PID[$name]=$!
    PIDS+=("$!")
}
SERVERS=(noop real verbose)
start real info
start verbose 'info,pod_template_webhook=debug'
start noop warn --noop-handler
for name in "${SERVERS[@]}"; do
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:${ADMIN[$name]}/readyz" >/dev/null 2>&1 && break
        kill -0 "${PID[$name]}" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "server $name exited"; }
        sleep 0.1
    done
    curl -sf "http://127.0.0.1:${ADMIN[$name]}/readyz" >/dev/null || die "server $name not ready"
done

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
loaded=$(curl -s "http://127.0.0.1:${ADMIN[real]}/metrics" | awk '/^pod_template_webhook_templates_loaded / {print $2}')
answer=$(curl -sk "https://127.0.0.1:${PORT[real]}/mutate" -H 'content-type: application/json' --data-binary "@$REVIEW")
grep -q '"patchType":"JSONPatch"' <<<"$answer" || die "the real server did not mutate the sample review: $answer"
if runs nginx; then
    # The same bytes the real server answers for the sample, served from memory. `return` text is
    # an nginx string: `$` would start a variable, so a body with one cannot be served this way.
    [[ $answer != *'$'* ]] || die "the sample's answer holds a \$: nginx cannot return it verbatim"
    quoted=${answer//\\/\\\\}
    quoted=${quoted//\'/\\\'}
    free_port
    PORT[nginx]=$FREE
    mkdir -p "$WORK/nginx/tmp"
    cat >"$WORK/nginx/nginx.conf" <<NGINX
daemon off;
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx.log warn;
$([[ $(id -u) == 0 ]] && echo 'user root;')
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    client_max_body_size 3m;
    server {
        listen 127.0.0.1:${PORT[nginx]} ssl;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location = /mutate {
            default_type application/json;
            return 200 '$quoted';
        }
    }
}
NGINX
    nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
    "$nginx_bin" -e "$WORK/nginx.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" 2>>"$WORK/nginx.log" &
    PID[nginx]=$!
    PIDS+=("$!")
    served=""
    for _ in $(seq 100); do
        served=$(curl -sk "https://127.0.0.1:${PORT[nginx]}/mutate" -H 'content-type: application/json' --data-binary "@$REVIEW" || true)
        [[ -n $served ]] && break
        kill -0 "${PID[nginx]}" 2>/dev/null || { cat "$WORK/nginx.log" >&2; die "nginx exited"; }
        sleep 0.1
    done
    [[ $served == "$answer" ]] || die "nginx does not answer the real server's bytes: $served"
fi
sleep 1
IDLE_RSS=$(rss_kb "${PID[real]}")
IDLE_RSS_NOOP=$(rss_kb "${PID[noop]}")
say "servers ready: real :${PORT[real]} verbose :${PORT[verbose]} noop :${PORT[noop]}; templates loaded: $loaded; idle VmRSS real ${IDLE_RSS} kB, noop ${IDLE_RSS_NOOP} kB"

# --- 4. load ----------------------------------------------------------------------------------
cat >"$WORK/post.lua" <<EOF
local f = assert(io.open("$ROOT/$REVIEW", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
EOF

# Samples VmRSS of $1 every 0.2 s into $2 until killed.
sample_rss() { while kill -0 "$1" 2>/dev/null; do rss_kb "$1" >>"$2"; sleep 0.2; done; }
max_of() { sort -n "$1" | tail -1; }

metrics() {
    [[ -n ${ADMIN[$1]:-} ]] || return 0 # nginx
    curl -s "http://127.0.0.1:${ADMIN[$1]}/metrics" | grep '^pod_template_webhook_admission_duration_seconds_bucket' || true; }
# Server-side p50/p99 estimate from the histogram delta between two /metrics snapshots
# (linear interpolation inside a bucket, as Prometheus' histogram_quantile does).
server_quantiles() { # before after
    awk '
        function le(line) { sub(/.*le="/, "", line); sub(/".*/, "", line); return line }
        NR == FNR { before[le($1)] = $2; next }
        { n++; bound[n] = le($1); cum[n] = $2 - before[le($1)] }
        END {
            total = cum[n]
            if (total <= 0) { print "n/a n/a 0"; exit }
            split("0.5 0.99", qs, " ")
            for (i = 1; i <= 2; i++) {
                target = qs[i] * total; prev_b = 0; prev_c = 0; out = ""
                for (j = 1; j <= n; j++) {
                    if (cum[j] >= target) {
                        if (bound[j] == "+Inf") { out = ">" prev_b * 1e6; break }
                        out = sprintf("%.0f", (prev_b + (bound[j] - prev_b) * (target - prev_c) / (cum[j] - prev_c)) * 1e6)
                        break
                    }
                    prev_b = bound[j]; prev_c = cum[j]
                }
                printf "%s ", out
            }
            print total
        }' "$1" "$2"
}

# Client-side percentiles (us) from an h2load --log-file: column 3 is the response time.
log_quantiles() {
    sort -n -k3,3 "$1" | awk '{ d[NR] = $3 } END {
        if (NR == 0) { print "n/a n/a"; exit }
        p50 = d[int(NR * 0.50) + (NR * 0.50 > int(NR * 0.50))]; p99 = d[int(NR * 0.99) + (NR * 0.99 > int(NR * 0.99))]
        print p50, p99 }'
}

declare -A RPS P50 P99 SP50 SP99 RSS_LOAD FAIL
# One pass: proto (h2|h1|rate) and server name. Fills RPS/P50/P99/SP50/SP99/RSS_LOAD[proto.name].
pass() { # proto name round
    local proto=$1 name=$2 key="$1.$2.$3" url="https://127.0.0.1:${PORT[$2]}/mutate" out="$WORK/$1.$2.$3"
    metrics "$name" >"$out.before"
    : >"$out.rss"
    sample_rss "${PID[$name]}" "$out.rss" &
    local sampler=$! perf_pid=""
    if [[ ${PERF:-0} == 1 && $key == "$PERF_PASS" ]] && command -v perf >/dev/null; then
        perf record -F 999 -g -o "$WORK/perf.data" -p "${PID[$name]}" -- sleep "$DURATION" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    case $proto in
    h2 | rate)
        local args=(-c "$H2_CLIENTS" -m "$H2_STREAMS")
        [[ $proto == rate ]] && args=(-c "$RATE_CLIENTS" -m 4 --rps=$((RATE / RATE_CLIENTS)))
        timeout $((DURATION + WARMUP + 20)) h2load "${args[@]}" -D "$DURATION" --warm-up-time="$WARMUP" \
            -H 'content-type: application/json' -d "$REVIEW" --log-file="$out.reqlog" "$url" >"$out.txt" 2>&1 || true
        RPS[$key]=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' "$out.txt")
        read -r P50[$key] P99[$key] < <(log_quantiles "$out.reqlog")
        FAIL[$key]=$(awk '/^requests:/ {f = $10 + $12 + $14} /^status codes:/ {f += $5 + $7 + $9} END {print f + 0}' "$out.txt")
        ;;
    h1 | k16)
        local conns=$H1_CONNS
        [[ $proto == k16 ]] && conns=$NGINX_CONNS
        timeout $((DURATION + 20)) wrk -t1 -c "$conns" -d "${DURATION}s" --timeout 5s --latency -s "$WORK/post.lua" "$url" >"$out.txt" 2>&1 || true
        RPS[$key]=$(awk '/^Requests\/sec:/ {print $2}' "$out.txt")
        local to_us='function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; if (v ~ /s$/) return v * 1e6; return v }'
        P50[$key]=$(awk "$to_us"' $1 == "50%" {print us($2)}' "$out.txt")
        P99[$key]=$(awk "$to_us"' $1 == "99%" {print us($2)}' "$out.txt")
        FAIL[$key]=$(awk '/Non-2xx/ {f += $NF} /Socket errors/ {gsub(",", ""); f += $4 + $6 + $8 + $10} END {print f + 0}' "$out.txt")
        ;;
    esac
    [[ -n $perf_pid ]] && wait "$perf_pid" 2>/dev/null || true
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    RSS_LOAD[$key]=$(max_of "$out.rss")
    metrics "$name" >"$out.after"
    if [[ $name != noop && $name != nginx ]]; then
        read -r SP50[$key] SP99[$key] _ < <(server_quantiles "$out.before" "$out.after")
    else
        SP50[$key]="-" SP99[$key]="-"
    fi
    printf '%-5s %-7s %10s req/s  client p50 %7s us p99 %7s us  server p50 %5s us p99 %5s us  failed %s  max VmRSS %s kB\n' \
        "$proto" "$name" "${RPS[$key]:-?}" "${P50[$key]:-?}" "${P99[$key]:-?}" "${SP50[$key]}" "${SP99[$key]}" "${FAIL[$key]:-?}" "${RSS_LOAD[$key]:-?}" >&2
}

# Keeps, for proto.name, the round with the most req/s (the least disturbed by other load).
best() {
    local proto=$1 name=$2 r bestr=1
    for ((r = 2; r <= ROUNDS; r++)); do
        awk -v a="${RPS[$proto.$name.$r]:-0}" -v b="${RPS[$proto.$name.$bestr]:-0}" 'BEGIN { exit !(a > b) }' && bestr=$r
    done
    local k="$proto.$name.$bestr" f=0
    for ((r = 1; r <= ROUNDS; r++)); do f=$((f + ${FAIL[$proto.$name.$r]:-0})); done
    RPS[$proto.$name]=${RPS[$k]} P50[$proto.$name]=${P50[$k]} P99[$proto.$name]=${P99[$k]}
    SP50[$proto.$name]=${SP50[$k]} SP99[$proto.$name]=${SP99[$k]} RSS_LOAD[$proto.$name]=${RSS_LOAD[$k]} FAIL[$proto.$name]=$f
}
# Servers alternate within a round, so slow phases of a shared machine hit all of them.
if runs h2; then PERF_PASS=${PERF_PASS:-h2.real.1}; else PERF_PASS=${PERF_PASS:-k16.real.1}; fi
if runs h2; then
    say "HTTP/2 (h2load -c $H2_CLIENTS -m $H2_STREAMS, ${DURATION}s, $ROUNDS rounds)"
    for ((round = 1; round <= ROUNDS; round++)); do
        for name in "${SERVERS[@]}"; do pass h2 "$name" "$round"; sleep 1; done
    done
    for name in "${SERVERS[@]}"; do best h2 "$name"; done
fi
if runs h1; then
    say "HTTP/1.1 (wrk -t1 -c $H1_CONNS, keep-alive, ${DURATION}s, $ROUNDS rounds)"
    for ((round = 1; round <= ROUNDS; round++)); do
        for name in "${SERVERS[@]}"; do pass h1 "$name" "$round"; sleep 1; done
    done
    for name in "${SERVERS[@]}"; do best h1 "$name"; done
fi
if runs rate; then
    say "rate-limited HTTP/2 at $RATE req/s (h2load -c $RATE_CLIENTS -m 4 --rps $((RATE / RATE_CLIENTS)), ${DURATION}s)"
    pass rate real 1
    best_rounds=$ROUNDS ROUNDS=1
    best rate real
    ROUNDS=$best_rounds
fi
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
if runs nginx; then
    # Each round's ratios, then their median: a slow phase of the shared machine moves one round.
    say "HTTP/1.1 against nginx (wrk -t1 -c $NGINX_CONNS, keep-alive, ${DURATION}s, $NGINX_ROUNDS rounds of real, noop, nginx)"
    VS_NGINX=() VS_NOOP=()
    for ((round = 1; round <= NGINX_ROUNDS; round++)); do
        for name in real noop nginx; do pass k16 "$name" "$round"; sleep 1; done
        VS_NGINX+=("$(awk -v a="${RPS[k16.real.$round]:-0}" -v b="${RPS[k16.nginx.$round]:-0}" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print 0 }')")
        VS_NOOP+=("$(awk -v a="${RPS[k16.real.$round]:-0}" -v b="${RPS[k16.noop.$round]:-0}" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print 0 }')")
        printf 'round %d: real/nginx %s, real/noop %s\n' "$round" "${VS_NGINX[-1]}" "${VS_NOOP[-1]}" >&2
    done
    for name in real noop nginx; do
        RPS[k16.$name]=$(for ((r = 1; r <= NGINX_ROUNDS; r++)); do echo "${RPS[k16.$name.$r]:-0}"; done | median)
    done
    MEDIAN_VS_NGINX=$(printf '%s\n' "${VS_NGINX[@]}" | median)
    MEDIAN_VS_NOOP=$(printf '%s\n' "${VS_NOOP[@]}" | median)
fi
sleep 1
AFTER_RSS=$(rss_kb "${PID[real]}")
LOG_LINES=$(grep -c ' admission' "$WORK/verbose.log" || true)

# --- 5. report --------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else print "n/a" }'; }
max_load_rss=$(printf '%s\n' "${RSS_LOAD[h2.real]:-0}" "${RSS_LOAD[h1.real]:-0}" "${RSS_LOAD[rate.real]:-0}" | sort -n | tail -1)
{
    echo
    echo "== summary ($(nproc) cores; client and servers share them; review $(wc -c <"$REVIEW") B; $loaded templates loaded)"
    printf '%-44s %14s %14s\n' "figure" "measured" "goal"
    if runs h2; then
        printf '%-44s %14s %14s\n' "HTTP/2 admissions/s (real, default log)" "${RPS[h2.real]}" ">= 25000"
        printf '%-44s %14s %14s\n' "HTTP/2 ratio real/noop" "$(ratio "${RPS[h2.real]}" "${RPS[h2.noop]}")" ">= 0.8"
        printf '%-44s %14s %14s\n' "HTTP/2 ratio verbose(debug)/noop" "$(ratio "${RPS[h2.verbose]}" "${RPS[h2.noop]}")" ""
        printf '%-44s %14s %14s\n' "log cost: h2 verbose(debug)/real(info)" "$(ratio "${RPS[h2.verbose]}" "${RPS[h2.real]}")" ""
    fi
    if runs h1; then
        printf '%-44s %14s %14s\n' "HTTP/1.1 admissions/s (real, default log)" "${RPS[h1.real]}" ">= 25000"
        printf '%-44s %14s %14s\n' "HTTP/1.1 ratio real/noop" "$(ratio "${RPS[h1.real]}" "${RPS[h1.noop]}")" ">= 0.8"
        printf '%-44s %14s %14s\n' "HTTP/1.1 ratio verbose(debug)/noop" "$(ratio "${RPS[h1.verbose]}" "${RPS[h1.noop]}")" ""
        printf '%-44s %14s %14s\n' "log cost: h1 verbose(debug)/real(info)" "$(ratio "${RPS[h1.verbose]}" "${RPS[h1.real]}")" ""
    fi
    if runs rate; then
        printf '%-44s %14s %14s\n' "rate pass achieved req/s" "${RPS[rate.real]}" "$RATE"
        printf '%-44s %14s %14s\n' "server p99 at $RATE/s (us, histogram)" "${SP99[rate.real]}" "< 1000"
        printf '%-44s %14s %14s\n' "server p50 at $RATE/s (us, histogram)" "${SP50[rate.real]}" ""
        printf '%-44s %14s %14s\n' "client p99 at $RATE/s (us, h2load)" "${P99[rate.real]}" ""
    fi
    if runs nginx; then
        printf '%-44s %14s %14s\n' "HTTP/1.1 -c$NGINX_CONNS req/s real (median)" "${RPS[k16.real]}" ""
        printf '%-44s %14s %14s\n' "HTTP/1.1 -c$NGINX_CONNS req/s noop (median)" "${RPS[k16.noop]}" ""
        printf '%-44s %14s %14s\n' "HTTP/1.1 -c$NGINX_CONNS req/s nginx (median)" "${RPS[k16.nginx]}" ""
        printf '%-44s %14s %14s\n' "real/nginx, median of $NGINX_ROUNDS rounds" "$MEDIAN_VS_NGINX" ">= 0.65"
        printf '%-44s %14s %14s\n' "real/noop, median of $NGINX_ROUNDS rounds" "$MEDIAN_VS_NOOP" ">= 0.6"
    fi
    printf '%-44s %14s %14s\n' "VmRSS idle, $loaded templates (MB)" "$(awk -v k="$IDLE_RSS" 'BEGIN {printf "%.1f", k / 1024}')" "< 40"
    printf '%-44s %14s %14s\n' "VmRSS max under load (MB)" "$(awk -v k="$max_load_rss" 'BEGIN {printf "%.1f", k / 1024}')" "< 40"
    printf '%-44s %14s %14s\n' "VmRSS after load (MB)" "$(awk -v k="$AFTER_RSS" 'BEGIN {printf "%.1f", k / 1024}')" "< 40"
    printf '%-44s %14s %14s\n' "VmRSS idle, noop server (MB)" "$(awk -v k="$IDLE_RSS_NOOP" 'BEGIN {printf "%.1f", k / 1024}')" ""
    printf '%-44s %14s %14s\n' "per-admission log lines written (verbose)" "$LOG_LINES" ""
    failed=0
    for k in "${!FAIL[@]}"; do [[ $k == *.[0-9]* ]] && failed=$((failed + ${FAIL[$k]:-0})); done
    printf '%-44s %14s %14s\n' "failed / non-2xx requests, all passes" "$failed" "0"
} | tee "$WORK/summary.txt"

if [[ ${PERF:-0} == 1 && -f $WORK/perf.data ]]; then
    say "perf: top symbols of the real server during its pass $PERF_PASS"
    perf report -i "$WORK/perf.data" --no-children --sort dso,symbol -g none --percent-limit 0.7 --stdio 2>/dev/null |
        grep -v '^#' | grep '%' | cut -c1-150 | head -45 || true
fi
