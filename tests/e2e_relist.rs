//! Relists of the cluster store against a real API server: a relist under churn never publishes an
//! empty or partial index and ends equal to a fresh read of the cluster; a watch that expires
//! (410 Gone after etcd compaction) relists without failing a lookup. Each test has its own API
//! server, started with a short etcd compaction interval and no watch cache, so that a watch
//! resumed from an old resourceVersion is answered 410 Gone.

mod support;

#[path = "../benches/shared/realistic.rs"]
mod realistic;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use pod_template_webhook::metrics::Metrics;
use pod_template_webhook::names::Names;
use pod_template_webhook::store::cluster::ClusterStore;
use pod_template_webhook::store::TemplateStore;
use serde_json::json;

/// A template source ConfigMap named `name` with `keys` realistic templates.
fn template_config_map(name: &str, tenant: usize, keys: usize) -> ConfigMap {
    let data: serde_json::Map<String, serde_json::Value> =
        (0..keys).map(|k| (format!("{name}-k{k}"), realistic::realistic_template(tenant, k).into())).collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"flyte.org/pod-templates": "true"}},
        "data": data,
    }))
    .unwrap()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The store's resident memory for 1,000 ConfigMaps × 10 realistic keys: RSS of this process
/// after the store is ready, minus before it started (glibc's free memory trimmed both times).
/// A figure, not a test: `cargo test --release --test e2e_relist -- --ignored --nocapture rss`.
#[test]
#[ignore]
fn rss_of_the_store_for_1000_config_maps_of_10_keys() {
    let api = support::ApiServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let admin = api.client().await;
        support::ensure_namespace(&admin, "flyte", json!({})).await;
        let cms = Api::<ConfigMap>::namespaced(admin.clone(), "flyte");
        futures::stream::iter(0..1000)
            .map(|i| {
                let cms = cms.clone();
                async move { cms.create(&PostParams::default(), &template_config_map(&format!("t{i}"), i, 10)).await }
            })
            .buffer_unordered(16)
            .for_each(|r| async move {
                r.unwrap();
            })
            .await;
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe { libc::malloc_trim(0) };
        let before = rss_kib();
        let metrics = Arc::new(Metrics::default());
        let store = ClusterStore::spawn(admin.clone(), Names::default(), &[], metrics.clone());
        support::wait_for("the store is ready", Duration::from_secs(120), || store.is_ready()).await;
        assert_eq!(store.stats().templates, 10_000);
        // SAFETY: as above.
        unsafe { libc::malloc_trim(0) };
        let after = rss_kib();
        eprintln!(
            "store RSS: {} KiB before, {} KiB after ready: {} KiB for 10,000 templates",
            before,
            after,
            after.saturating_sub(before)
        );
    });
}
