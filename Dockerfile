# syntax=docker/dockerfile:1
#
# The pod-template-webhook image: a multi-stage build, distroless and non-root at runtime.
#
#   docker build -t ghcr.io/pod-template-webhook/pod-template-webhook:0.1.0 .
#
# The tag must match the chart's appVersion (charts/pod-template-webhook/Chart.yaml), which is the
# chart's default image tag. This is the registry-connected release recipe (Docker or BuildKit).
# Without either, or air-gapped: scripts/build-image.sh makes the same image (user, entrypoint,
# command, ports, environment; tests/image.rs compares them with this file) as a docker-archive from
# the release binary, and tests/cluster.rs runs that image on a real node with the chart.

# Builder. The Debian release MUST match the runtime image's (distroless cc-debian12 = bookworm,
# glibc 2.36): plain `rust:1.95` now follows the newest Debian (trixie, glibc 2.41), and a binary
# linked there fails to start on bookworm ("GLIBC_2.3x not found").
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir across builds (BuildKit); the binary is copied out
# of the cached target dir.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pod-template-webhook \
 && install -D -m 0755 target/release/pod-template-webhook /out/pod-template-webhook

# Runtime: glibc + libgcc + CA certificates, no shell, no package manager. `nonroot` = uid 65532,
# the user the chart's securityContext expects (runAsNonRoot, runAsUser 65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/pod-template-webhook /usr/local/bin/pod-template-webhook
USER 65532:65532
# The webhook (TLS, POST /mutate) and admin (/healthz, /readyz, /metrics) ports.
EXPOSE 8443 8080
# See charts/pod-template-webhook/templates/deployment.yaml: ~8 MB less resident memory.
ENV MIMALLOC_ARENA_EAGER_COMMIT=0
ENTRYPOINT ["/usr/local/bin/pod-template-webhook"]
CMD ["serve"]
