#!/usr/bin/env bash
# The cluster-scale benchmark (issue 21; docs/performance.md "Cluster scale"): the real
# kube-apiserver with 1,000 tenant namespaces x 10 realistic template keys and 5,000 unlabelled
# 10 KB ConfigMaps; the webhook binary started as the chart's Deployment starts it; a template
# update, a burst of 3,000 dry-run pod creations from 16 clients with the API server's own
# admission histogram, and the floor (the same creations with the --noop-handler webhook,
# alternating rounds). Several minutes on a 2-core machine.
#
#   scripts/scale-bench.sh
#
# Knobs (environment): PTW_SCALE_FLOOR_ROUNDS (5), PTW_SCALE_FLOOR_PODS (600 per variant and round).
# The test tools (etcd, kube-apiserver, helm) are built on first use by tests/tools/build.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "== $(nproc) cores; load before: $(uptime)" >&2
# --features noop-handler: the floor's baseline webhook (`serve --noop-handler`), never in the
# default build.
cargo test --release --features noop-handler --test scale -- full --ignored --nocapture --test-threads 1
echo "== load after: $(uptime)" >&2
