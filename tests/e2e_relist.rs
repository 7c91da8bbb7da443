//! Relists of the cluster store against a real API server: a relist under churn never publishes an
//! empty or partial index, publishes once, and ends equal to a fresh read of the cluster; a watch
//! that expires (410 Gone after etcd compaction) relists without failing an admission. Each test
//! has its own API server, with a 1 s etcd compaction interval and no watch cache: a watch resumed
//! from a compacted resourceVersion is answered 410 Gone, as a real cluster does after a long
//! outage (or at once, without a watch cache).

mod support;

#[path = "../benches/shared/realistic.rs"]
mod realistic;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, VersionMatch};
use kube::Client;
use pod_template_webhook::admission::Policy;
use pod_template_webhook::metrics::Metrics;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::{self, AppState, Limits};
use pod_template_webhook::store::cluster::{self, ClusterStore, WatchOptions};
use pod_template_webhook::store::{EntryState, TemplateStore};
use pod_template_webhook::supervise::Fatal;
use serde_json::{json, Value};
use tower::ServiceExt;

/// etcd compacts every second and watches are served from etcd: a watch resumed from a
/// resourceVersion older than a second or two (with writes since) gets 410 Gone.
const EXPIRING_WATCHES: [&str; 2] = ["--etcd-compaction-interval=1s", "--watch-cache=false"];

/// The API server ends each of the store's watches after this long; the watcher resumes from its
/// last resourceVersion, which is compacted by then if it saw no event.
const WATCH_TIMEOUT: WatchOptions = WatchOptions { timeout_seconds: Some(2) };

const SAMPLE: &str = include_str!("../examples/reviews/flyte-task-pod.json");

/// A template source ConfigMap named `name` with the templates `keys` (realistic ones, of
/// `tenant`).
fn template_config_map(name: &str, tenant: usize, keys: usize) -> ConfigMap {
    let data: serde_json::Map<String, Value> =
        (0..keys).map(|k| (format!("{name}-k{k}"), realistic::realistic_template(tenant, k).into())).collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"flyte.org/pod-templates": "true"}},
        "data": data,
    }))
    .unwrap()
}

async fn create_all(cms: &Api<ConfigMap>, objects: Vec<ConfigMap>) {
    futures::stream::iter(objects)
        .map(|cm| {
            let cms = cms.clone();
            async move { cms.create(&PostParams::default(), &cm).await }
        })
        .buffer_unordered(16)
        .for_each(|r| async move {
            r.unwrap();
        })
        .await;
}

/// Rewrites an unlabelled ConfigMap until `stop`: etcd's revision moves on, so compaction passes
/// the resourceVersion of a watch that sees none of it.
fn churn_unlabelled(cms: Api<ConfigMap>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "unlabelled-churn"}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let patch = Patch::Merge(json!({"data": {"n": n.to_string()}}));
            cms.patch("unlabelled-churn", &PatchParams::default(), &patch).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// True once etcd compacted past `resource_version` (an exact read there is 410 Gone).
async fn compacted_past(cms: &Api<ConfigMap>, resource_version: &str) -> bool {
    let params = ListParams::default().at(resource_version).matching(VersionMatch::Exact).limit(1);
    match cms.list(&params).await {
        Ok(_) => false,
        Err(kube::Error::Api(status)) if status.code == 410 => true,
        Err(e) => panic!("list at {resource_version}: {e}"),
    }
}

/// Watches of `resource` the API server is serving now (`apiserver_longrunning_requests`).
async fn open_watches(admin: &Client, resource: &str) -> u64 {
    let text = admin.request_text(Request::get("/metrics").body(Vec::new()).unwrap()).await.unwrap();
    let resource = format!("resource=\"{resource}\"");
    text.lines()
        .filter(|l| l.starts_with("apiserver_longrunning_requests{") && l.contains("verb=\"WATCH\""))
        .filter(|l| l.contains(&resource))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

/// Waits for an async condition, checking it every 20 ms; fails naming `what` after `limit`.
async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut cond: impl FnMut() -> F) {
    let started = std::time::Instant::now();
    while !cond().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks, about every millisecond until stopped, that every template of `keys` is found and
/// serves, and that the store stays ready: the relists must never show an empty or partial index.
struct Poller {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Poller {
    fn start(store: Arc<ClusterStore>, keys: Vec<String>) -> Poller {
        let (stop, rounds, failure) =
            (Arc::<AtomicBool>::default(), Arc::<AtomicU64>::default(), Arc::<Mutex<Option<String>>>::default());
        let (s, r, f) = (stop.clone(), rounds.clone(), Arc::clone(&failure));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let index = store.snapshot();
                let missing = keys
                    .iter()
                    .find(|k| !index.lookup("flyte", k).entry.is_some_and(|e| matches!(e.state, EntryState::Ready(_))));
                let problem = match missing {
                    Some(key) => Some(format!("template {key} not found (index has {:?})", index.stats())),
                    None if !store.is_ready() => Some("the store was not ready".to_owned()),
                    None => None,
                };
                if let Some(problem) = problem {
                    f.lock().unwrap().get_or_insert(problem);
                }
                r.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Poller { stop, rounds, failure, thread }
    }

    /// Stops; fails if a round ever failed; returns the rounds made.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        if let Some(failure) = self.failure.lock().unwrap().take() {
            panic!("a lookup failed during the relists: {failure}");
        }
        self.rounds.load(Ordering::Relaxed)
    }
}

fn all_relists(metrics: &Metrics) -> u64 {
    metrics.template_relists("ConfigMap") + metrics.template_relists("PodTemplate")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn a_relist_under_churn_never_serves_a_partial_index_and_publishes_once() {
    let api = support::ApiServer::start_with(&EXPIRING_WATCHES);
    runtime().block_on(async {
        let admin = api.client().await;
        support::ensure_namespace(&admin, "flyte", json!({})).await;
        let cms = Api::<ConfigMap>::namespaced(admin.clone(), "flyte");
        // 300 templates objects that stay (3 keys each), 50 that will be deleted while the store
        // cannot see it.
        let stable: Vec<ConfigMap> = (0..300).map(|i| template_config_map(&format!("s{i}"), i, 3)).collect();
        let doomed: Vec<ConfigMap> = (0..50).map(|i| template_config_map(&format!("d{i}"), i, 2)).collect();
        create_all(&cms, stable).await;
        create_all(&cms, doomed).await;
        let stable_keys: Vec<String> = (0..300).flat_map(|i| (0..3).map(move |k| format!("s{i}-k{k}"))).collect();

        // The store reads as a ServiceAccount, so that its watch can be taken away (RBAC) while
        // the templates change, then given back: it must relist to see what it missed.
        let role: ClusterRole = serde_json::from_value(json!({
            "metadata": {"name": "ptw-templates"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps", "podtemplates"], "verbs": ["get", "list", "watch"]}],
        }))
        .unwrap();
        Api::<ClusterRole>::all(admin.clone()).create(&PostParams::default(), &role).await.unwrap();
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "ptw-templates"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ptw-templates"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "flyte"}],
        }))
        .unwrap();
        let bindings = Api::<ClusterRoleBinding>::all(admin.clone());
        bindings.create(&PostParams::default(), &binding).await.unwrap();
        let token = support::service_account_token(&admin, "flyte", "default").await;
        let sa = support::token_client(&api.url, &api.pki.ca_pem, &token).await;
        let (cm_watches, pt_watches) = (open_watches(&admin, "configmaps").await, open_watches(&admin, "podtemplates").await);

        let metrics = Arc::new(Metrics::default());
        let store = ClusterStore::spawn_with(sa, Names::default(), &[], metrics.clone(), Fatal::default(), WATCH_TIMEOUT);
        support::wait_for("the store is ready", Duration::from_secs(60), || store.is_ready()).await;
        let admin_ref = &admin;
        let fresh = || async move { cluster::load_once(admin_ref, &Names::default(), &[]).await.unwrap() };
        assert!(*store.current() == fresh().await, "the first list equals a fresh read");
        let poller = Poller::start(store.clone(), stable_keys);

        // The store loses its watch: once its current watches end (the 2 s timeout), resuming them
        // is forbidden.
        bindings.delete("ptw-templates", &DeleteParams::default()).await.unwrap();
        let admin_ref = &admin;
        wait_until("the store's watches ended", Duration::from_secs(30), || async move {
            open_watches(admin_ref, "configmaps").await == cm_watches
                && open_watches(admin_ref, "podtemplates").await == pt_watches
        })
        .await;
        let stop_unlabelled = Arc::new(AtomicBool::new(false));
        let unlabelled = churn_unlabelled(cms.clone(), stop_unlabelled.clone());
        // Changes it does not see: deletions, creations, updates.
        for i in 0..50 {
            cms.delete(&format!("d{i}"), &DeleteParams::default()).await.unwrap();
        }
        create_all(&cms, (0..50).map(|i| template_config_map(&format!("n{i}"), i, 2)).collect()).await;
        for i in 0..50 {
            let update = template_config_map(&format!("s{i}"), 1000 + i, 3);
            cms.patch(&format!("s{i}"), &PatchParams::default(), &Patch::Merge(json!({"data": update.data}))).await.unwrap();
        }
        let now = cms.list(&ListParams::default().limit(1)).await.unwrap().metadata.resource_version.unwrap();
        let (cms_ref, now_ref) = (&cms, now.as_str());
        wait_until("etcd compacted past the store's last resourceVersion", Duration::from_secs(60), || {
            compacted_past(cms_ref, now_ref)
        })
        .await;

        // The watch comes back: resumed from a compacted resourceVersion, it is answered 410 Gone
        // and the ConfigMaps are listed again. Churn starts with that list and goes on after it.
        let (reloads, relists) = (metrics.templates_reloads(), all_relists(&metrics));
        let cm_relists = metrics.template_relists("ConfigMap");
        bindings.create(&PostParams::default(), &binding).await.unwrap();
        support::wait_for("the ConfigMaps relist starts", Duration::from_secs(90), || {
            metrics.template_relists("ConfigMap") > cm_relists
        })
        .await;
        let (stop_churn, writes) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let churn = {
            let (cms, stop, writes) = (cms.clone(), stop_churn.clone(), writes.clone());
            tokio::spawn(async move {
                let mut k = 50;
                while !stop.load(Ordering::Relaxed) {
                    cms.create(&PostParams::default(), &template_config_map(&format!("n{k}"), k, 2)).await.unwrap();
                    let update = template_config_map(&format!("s{}", k % 300), 2000 + k, 3);
                    let patch = Patch::Merge(json!({"data": update.data}));
                    cms.patch(&format!("s{}", k % 300), &PatchParams::default(), &patch).await.unwrap();
                    cms.delete(&format!("n{}", k - 50), &DeleteParams::default()).await.unwrap();
                    writes.fetch_add(3, Ordering::Relaxed);
                    k += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        // What was deleted while the store could not see is gone once the relist is done.
        support::wait_for("the relist is done", Duration::from_secs(30), || {
            store.lookup("flyte", "d0-k0").entry.is_none()
        })
        .await;
        let after_relist = writes.load(Ordering::Relaxed);
        support::wait_for("churn after the relist", Duration::from_secs(30), || {
            writes.load(Ordering::Relaxed) >= after_relist + 30
        })
        .await;
        stop_churn.store(true, Ordering::Relaxed);
        churn.await.unwrap();
        stop_unlabelled.store(true, Ordering::Relaxed);
        unlabelled.await.unwrap();
        let expected = fresh().await;
        let (store_ref, expected_ref) = (&store, &expected);
        wait_until("the store equals a fresh read of the cluster", Duration::from_secs(30), || async move {
            *store_ref.current() == *expected_ref
        })
        .await;
        let rounds = poller.finish();

        let publishes = metrics.templates_reloads() - reloads;
        let relisted = all_relists(&metrics) - relists;
        let seen_writes = writes.load(Ordering::Relaxed);
        eprintln!(
            "{publishes} index publishes for {relisted} relists ({} templates in the index) and {seen_writes} writes; {rounds} lookup rounds, none failed",
            expected.stats().templates
        );
        // Each write is at most one batch, each relist one publish at its end (+2: a list of each
        // kind may have been under way, forbidden, when the watch came back). Publishing per listed
        // object would be 350 more (300 stable objects, 50 new ones).
        assert!(publishes <= seen_writes + relisted + 2, "{publishes} publishes");
        assert!(publishes < 350 / 2, "{publishes} publishes: not one per listed object");
        assert!(expected.stats().templates > 900);
    });
}

#[test]
fn a_watch_that_expires_relists_without_failing_an_admission() {
    let api = support::ApiServer::start_with(&EXPIRING_WATCHES);
    runtime().block_on(async {
        let admin = api.client().await;
        support::ensure_namespace(&admin, "flyte", json!({})).await;
        let cms = Api::<ConfigMap>::namespaced(admin.clone(), "flyte");
        create_all(&cms, (0..20).map(|i| template_config_map(&format!("s{i}"), i, 3)).collect()).await;
        let generation = |g: &str| -> ConfigMap {
            serde_json::from_value(json!({
                "metadata": {"name": "platform", "labels": {"flyte.org/pod-templates": "true"}},
                "data": {"hello_world": format!("labels: {{generation: {g}}}")},
            }))
            .unwrap()
        };
        cms.create(&PostParams::default(), &generation("one")).await.unwrap();
        let mut keys: Vec<String> = (0..20).flat_map(|i| (0..3).map(move |k| format!("s{i}-k{k}"))).collect();
        keys.push("hello_world".into());

        let metrics = Arc::new(Metrics::default());
        let store =
            ClusterStore::spawn_with(admin.clone(), Names::default(), &[], metrics.clone(), Fatal::default(), WATCH_TIMEOUT);
        support::wait_for("the store is ready", Duration::from_secs(60), || store.is_ready()).await;
        let state = AppState::new(store.clone(), Policy::default());
        let poller = Poller::start(store.clone(), keys);
        // Admissions through the webhook's own handler, all along.
        let (stop_admissions, admitted) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let admissions = {
            let (state, stop, admitted) = (state.clone(), stop_admissions.clone(), admitted.clone());
            tokio::spawn(async move {
                let mut generations = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let g = mutated_label(&state).await.expect("every admission applies the template");
                    if generations.last() != Some(&g) {
                        generations.push(g);
                    }
                    admitted.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                generations
            })
        };

        // The store sees no event while the revision moves on: each watch it resumes has expired.
        let stop_unlabelled = Arc::new(AtomicBool::new(false));
        let unlabelled = churn_unlabelled(cms.clone(), stop_unlabelled.clone());
        let took = support::wait_for("two relists after 410 Gone", Duration::from_secs(90), || {
            all_relists(&metrics) >= 2
        })
        .await;
        assert!(metrics.template_watch_errors() >= 2, "each relist follows a watch error (the 410)");
        // Still watching after the relists: an update arrives.
        let patch = Patch::Merge(json!({"data": {"hello_world": "labels: {generation: two}"}}));
        cms.patch("platform", &PatchParams::default(), &patch).await.unwrap();
        support::wait_for("the update after the relists", Duration::from_secs(30), || {
            let entry = store.lookup("flyte", "hello_world").entry;
            entry.is_some_and(|e| matches!(&e.state, EntryState::Ready(t) if t.labels["generation"] == "two"))
        })
        .await;
        let seen = admitted.load(Ordering::Relaxed);
        support::wait_for("an admission with the update", Duration::from_secs(10), || {
            admitted.load(Ordering::Relaxed) > seen + 1
        })
        .await;
        stop_admissions.store(true, Ordering::Relaxed);
        let generations = admissions.await.expect("no admission failed");
        stop_unlabelled.store(true, Ordering::Relaxed);
        unlabelled.await.unwrap();
        let rounds = poller.finish();
        assert_eq!(generations, ["one", "two"]);
        eprintln!(
            "{} relists in {took:?} after 410 Gone ({} watch errors), {} admissions and {rounds} lookup rounds, none failed",
            all_relists(&metrics),
            metrics.template_watch_errors(),
            admitted.load(Ordering::Relaxed)
        );
    });
}

/// Admits the sample pod (template `hello_world`) through the webhook's handler; returns the
/// `generation` label the template gave it.
async fn mutated_label(state: &Arc<AppState>) -> Option<String> {
    let req = Request::post("/mutate").header("content-type", "application/json").body(Body::from(SAMPLE)).unwrap();
    let resp = server::webhook_router(state.clone(), &Limits::default()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["allowed"], true, "{review}");
    use base64::Engine as _;
    let patch = base64::engine::general_purpose::STANDARD.decode(review["response"]["patch"].as_str()?).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod: Value = serde_json::from_str::<Value>(SAMPLE).unwrap()["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod["metadata"]["labels"]["generation"].as_str().map(str::to_owned)
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
