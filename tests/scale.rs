//! The cluster-scale benchmark (issue 21) against the real kube-apiserver: tenant namespaces with
//! realistic templates plus unlabelled 10 KB ConfigMaps, the webhook run as the chart runs it (the
//! real binary, `serve` with the Deployment's arguments and environment, the chart's
//! MutatingWebhookConfiguration pointed at it on loopback), then dry-run pod creations through the
//! API server.
//!
//! `small` runs in `cargo test` and asserts correctness only: ready, every pod got its namespace's
//! template, a template update reaches the next pod, no failed creation. `full` (ignored; run by
//! `scripts/scale-bench.sh`) is the same scenario at 1,000 namespaces; it prints the figures, and
//! with the cargo feature `noop-handler` also the floor: the same pod creations through the API
//! server with the `--noop-handler` webhook, alternating rounds. Timings are printed, never asserted.

mod support;

#[path = "../benches/shared/realistic.rs"]
mod realistic;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use realistic::realistic_template;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The release namespace the chart is rendered for (also the platform namespace).
const RELEASE: &str = "flyte";
/// The chart's webhook entry for pods with the environment label (values.yaml `webhook.name`).
const WEBHOOK: &str = "pod-templates.flyte.org";
const SOURCE_LABEL: &str = "flyte.org/pod-templates";
const APPLIED: &str = "flyte.org/pod-template-applied";
const CM_NAME: &str = "pod-templates";
/// Requests in flight while the objects are created.
const CREATE_CONCURRENCY: usize = 24;
const LIMIT: Duration = Duration::from_secs(60);
/// The API server's histogram of its calls to admission webhooks (stable metric).
const ADMISSION_HISTOGRAM: &str = "apiserver_admission_webhook_admission_duration_seconds_bucket{";

struct Size {
    namespaces: usize,
    keys: usize,
    unlabelled: usize,
    unlabelled_bytes: usize,
    burst: usize,
    clients: usize,
    /// Creations from one client, one at a time: the webhook call without a saturated machine.
    sequential: usize,
    /// The floor (webhook vs `--noop-handler` webhook): rounds and pods per variant and round.
    floor: Option<(usize, usize)>,
}

#[test]
fn small() {
    let size = Size {
        namespaces: 20,
        keys: 10,
        unlabelled: 50,
        unlabelled_bytes: 10 * 1024,
        burst: 200,
        clients: 16,
        sequential: 20,
        floor: None,
    };
    run(&size);
}

#[test]
#[ignore = "minutes: the cluster-scale benchmark, run by scripts/scale-bench.sh"]
fn full() {
    let size = Size {
        namespaces: 1000,
        keys: 10,
        unlabelled: 5000,
        unlabelled_bytes: 10 * 1024,
        burst: 3000,
        clients: 16,
        sequential: 300,
        floor: Some((env_usize("PTW_SCALE_FLOOR_ROUNDS", 5), env_usize("PTW_SCALE_FLOOR_PODS", 600))),
    };
    run(&size);
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
        .unwrap_or(default)
}

/// The API server and etcd live on this (the test's) thread, and so does the webhook process:
/// all die with it (PR_SET_PDEATHSIG).
fn run(size: &Size) {
    let api = support::ApiServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let report = rt.block_on(scenario(&api, size));
    println!("{report}");
    assert!(report.failures.is_empty(), "failed creations: {:?}", &report.failures[..report.failures.len().min(10)]);
}

fn tenant(i: usize) -> String {
    format!("tenant-{i:04}")
}

fn env_name(key: usize) -> String {
    format!("env-{key}")
}

/// The value of VAR_0 in template `key` of tenant `t` (`realistic_template`), which names both.
fn var0(t: usize, key: usize) -> String {
    format!("value-{t}-{key}-0")
}

fn template_map(t: usize, keys: usize) -> BTreeMap<String, String> {
    (0..keys).map(|k| (env_name(k), realistic_template(t, k))).collect()
}

async fn create_objects(admin: &kube::Client, size: &Size, extra: &[(&str, usize)]) {
    let started = Instant::now();
    let mut namespaces: Vec<String> = (0..size.namespaces).map(tenant).collect();
    namespaces.extend(extra.iter().map(|(ns, _)| ns.to_string()));
    namespaces.push(RELEASE.into());
    futures::stream::iter(&namespaces)
        .for_each_concurrent(CREATE_CONCURRENCY, |ns| support::ensure_namespace(admin, ns, json!({})))
        .await;
    let mut maps: Vec<(String, ConfigMap)> = Vec::new();
    let labelled = (0..size.namespaces).map(|t| (tenant(t), t)).chain(extra.iter().map(|(ns, t)| (ns.to_string(), *t)));
    for (ns, t) in labelled {
        let cm = json!({"metadata": {"name": CM_NAME, "labels": {SOURCE_LABEL: "true"}}, "data": template_map(t, size.keys)});
        maps.push((ns, serde_json::from_value(cm).unwrap()));
    }
    for j in 0..size.unlabelled {
        // Distinct contents, so nothing along the way can share them.
        let blob: String = format!("{j:08}").repeat(size.unlabelled_bytes / 8);
        let cm = json!({"metadata": {"name": format!("blob-{j:05}"), "labels": {"app": "unrelated"}}, "data": {"blob": blob}});
        maps.push((tenant(j % size.namespaces), serde_json::from_value(cm).unwrap()));
    }
    let count = maps.len();
    futures::stream::iter(maps)
        .for_each_concurrent(CREATE_CONCURRENCY, |(ns, cm)| async move {
            Api::<ConfigMap>::namespaced(admin.clone(), &ns)
                .create(&PostParams::default(), &cm)
                .await
                .unwrap_or_else(|e| panic!("create ConfigMap {ns}/{:?}: {e}", cm.metadata.name));
        })
        .await;
    eprintln!("created {} namespaces and {count} ConfigMaps in {:?}", namespaces.len(), started.elapsed());
}

/// `helm template` arguments shared by the Deployment and the webhook configuration: the
/// certificate comes from files (`existingSecret` mode), as a webhook outside the cluster needs.
fn chart_sets(ca_pem: &str) -> Vec<String> {
    vec![
        "certs.mode=existingSecret".into(),
        "certs.existingSecret.name=ptw-scale-tls".into(),
        format!("certs.existingSecret.caBundle={}", support::b64(ca_pem)),
    ]
}

/// The webhook binary as a child process, killed when dropped.
struct Webhook {
    child: Child,
    port: u16,
    admin: u16,
    started: Instant,
    log: PathBuf,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Webhook {
    /// `serve` with the arguments and environment of the chart's Deployment (fieldRefs resolved as
    /// the kubelet would), listening on loopback, reaching the API server through `KUBECONFIG`.
    fn start(dir: &Path, kubeconfig: &Path, pki: &support::TestPki, name: &str, extra_args: &[&str]) -> Webhook {
        let sets = chart_sets(&pki.ca_pem);
        let mut args = vec!["--show-only", "templates/deployment.yaml"];
        for set in &sets {
            args.extend(["--set", set.as_str()]);
        }
        let deployment = support::helm_template(RELEASE, &args).pop().expect("the chart renders a Deployment");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let leaf = pki.server();
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        let (port, admin) = (support::free_port(), support::free_port());
        let overrides = BTreeMap::from([
            ("PTW_LISTEN", format!("127.0.0.1:{port}")),
            ("PTW_ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
            ("PTW_TLS_CERT", cert.display().to_string()),
            ("PTW_TLS_KEY", key.display().to_string()),
        ]);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pod-template-webhook"));
        cmd.env_clear().env("KUBECONFIG", kubeconfig);
        for arg in container["args"].as_array().expect("args") {
            cmd.arg(arg.as_str().unwrap());
        }
        cmd.args(extra_args);
        for e in container["env"].as_array().expect("env") {
            let var = e["name"].as_str().unwrap();
            let value = match (&e["value"], e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Value::String(v), _) => v.clone(),
                (_, Some("metadata.namespace")) => RELEASE.into(),
                (_, Some("metadata.name")) => format!("ptw-{name}"),
                _ => panic!("the Deployment's env {e}: no value the test knows how to give"),
            };
            cmd.env(var, overrides.get(var).cloned().unwrap_or(value));
        }
        let rendered: Vec<&str> =
            container["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        for var in overrides.keys() {
            assert!(rendered.contains(var), "the chart's Deployment no longer sets {var}");
        }
        assert!(
            rendered.contains(&"MIMALLOC_ARENA_EAGER_COMMIT"),
            "the chart runs the binary with MIMALLOC_ARENA_EAGER_COMMIT"
        );
        let log = dir.join(format!("{name}.log"));
        let started = Instant::now();
        let child = support::spawn_tied(&mut cmd, &log);
        Webhook { child, port, admin, started, log }
    }

    /// Polls `/readyz` on the admin port; returns the time from the process start to the first 200.
    async fn ready(&mut self) -> Duration {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the webhook exited ({status}): {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            if http_get(self.admin, "/readyz").await.is_some_and(|(status, _)| status == 200) {
                return self.started.elapsed();
            }
            assert!(self.started.elapsed() < LIMIT, "the webhook not ready within {LIMIT:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `(VmRSS, VmHWM)` in kB, from /proc.
    fn rss_kb(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {status}"));
            line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// A plain HTTP GET on loopback (the admin listener): status and body.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()))
}

/// A pod of environment `key`, its container named as the templates' primary container.
fn pod(name: &str, key: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"flyte.org/environment": env_name(key)}},
        "spec": {"containers": [{"name": "primary", "image": "registry.k8s.io/pause:3.10"}]},
    }))
    .unwrap()
}

fn dry_run() -> PostParams {
    PostParams { dry_run: true, ..PostParams::default() }
}

fn var0_of(pod: &Pod) -> Option<&str> {
    let primary = pod.spec.as_ref()?.containers.iter().find(|c| c.name == "primary")?;
    primary.env.as_ref()?.iter().find(|e| e.name == "VAR_0")?.value.as_deref()
}

/// What a created pod must show: VAR_0 of its template, and the record of that template.
fn check(pod: &Pod, ns: &str, key: usize, var0: &str) -> Result<(), String> {
    let applied = pod.metadata.annotations.as_ref().and_then(|a| a.get(APPLIED)).map(String::as_str);
    let source = format!("{ns}/{CM_NAME}/{}@", env_name(key));
    match (var0_of(pod), applied) {
        (Some(v), Some(a)) if v == var0 && a.starts_with(&source) => Ok(()),
        (v, a) => Err(format!("{ns} {}: VAR_0 {v:?} (want {var0}), {APPLIED} {a:?}", env_name(key))),
    }
}

/// One pod creation to make: where, which environment, and the VAR_0 it must get (None: the
/// webhook answering it does not merge).
#[derive(Clone)]
struct Target {
    ns: String,
    key: usize,
    expect: Option<String>,
    /// The pod to send instead of `pod(name, key)`.
    body: Option<Arc<Pod>>,
}

struct Creations {
    wall: Duration,
    latencies: Vec<Duration>,
    failures: Vec<String>,
}

impl Creations {
    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted.get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default()
    }
}

/// Dry-run creations of `targets` from `clients`, each client one request at a time.
async fn create_pods(clients: &[kube::Client], targets: Vec<Target>) -> Creations {
    let targets = Arc::new(targets);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers = clients.iter().map(|client| {
        let (targets, next, client) = (targets.clone(), next.clone(), client.clone());
        tokio::spawn(async move {
            let (mut latencies, mut failures) = (Vec::new(), Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(t) = targets.get(i) else { break };
                let sent = Instant::now();
                let created = Api::<Pod>::namespaced(client.clone(), &t.ns)
                    .create(
                        &dry_run(),
                        &t.body.as_ref().map_or_else(|| pod(&format!("bench-{i}"), t.key), |b| (**b).clone()),
                    )
                    .await;
                latencies.push(sent.elapsed());
                let outcome = match (created, &t.expect) {
                    (Err(e), _) => Err(format!("{}/bench-{i}: {e}", t.ns)),
                    (Ok(p), Some(want)) => check(&p, &t.ns, t.key, want),
                    (Ok(_), None) => Ok(()),
                };
                if let Err(e) = outcome {
                    failures.push(e);
                }
            }
            (latencies, failures)
        })
    });
    let mut out = Creations { wall: Duration::ZERO, latencies: Vec::new(), failures: Vec::new() };
    for done in futures::future::join_all(workers).await {
        let (latencies, failures) = done.unwrap();
        out.latencies.extend(latencies);
        out.failures.extend(failures);
    }
    out.wall = started.elapsed();
    out
}

/// The API server's `apiserver_admission_webhook_admission_duration_seconds` buckets for the
/// webhook entry `name`, summed over the other labels: (upper bound, cumulative count).
async fn admission_buckets(admin: &kube::Client, name: &str) -> Vec<(f64, f64)> {
    let request = axum::http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = admin.request_text(request).await.unwrap();
    let mut buckets: BTreeMap<String, f64> = BTreeMap::new();
    let label = format!("name=\"{name}\"");
    for line in text.lines().filter(|l| l.starts_with(ADMISSION_HISTOGRAM) && l.contains(&label)) {
        let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_owned();
        let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *buckets.entry(le).or_default() += count;
    }
    let mut out: Vec<(f64, f64)> = buckets
        .into_iter()
        .map(|(le, c)| (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, c))
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The delta of two bucket snapshots: total calls, and the upper bounds of the buckets holding
/// the p50 and the p99 (all a histogram can say).
struct Histogram {
    calls: f64,
    p50: f64,
    p99: f64,
    buckets: Vec<(f64, f64)>,
}

fn histogram_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Histogram {
    let prior = |le: f64| before.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
    let buckets: Vec<(f64, f64)> = after.iter().map(|(le, c)| (*le, c - prior(*le))).collect();
    let calls = buckets.last().map_or(0.0, |(_, c)| *c);
    let bound = |q: f64| buckets.iter().find(|(_, c)| *c >= q * calls && calls > 0.0).map_or(f64::NAN, |(le, _)| *le);
    Histogram { calls, p50: bound(0.5), p99: bound(0.99), buckets }
}

impl Histogram {
    fn counts(&self) -> String {
        let counts: Vec<String> = self.buckets.iter().map(|(le, c)| format!("{}: {c}", bucket_text(*le))).collect();
        counts.join(", ")
    }
}

fn bucket_text(le: f64) -> String {
    if le.is_infinite() {
        "+Inf".into()
    } else {
        format!("≤ {} ms", le * 1000.0)
    }
}

/// Dry-run creates pods of `ns`/`key` until `done` holds for one; returns it and the time taken.
async fn probe_until(admin: &kube::Client, ns: &str, key: usize, done: impl Fn(&Pod) -> bool) -> (Pod, Duration) {
    let started = Instant::now();
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);
    loop {
        // A webhook not called yet (the API server's configuration informer) fails the creation
        // (failurePolicy Fail) or leaves the pod alone: both mean "not yet".
        if let Ok(p) = pods.create(&dry_run(), &pod("probe", key)).await {
            if done(&p) {
                return (p, started.elapsed());
            }
        }
        assert!(started.elapsed() < LIMIT, "{ns} {}: not within {LIMIT:?}", env_name(key));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Report {
    size: String,
    ready: Duration,
    idle_kb: u64,
    after_kb: (u64, u64),
    update: Duration,
    burst: Creations,
    histogram: Histogram,
    sequential: (Creations, Histogram),
    floor: Option<String>,
    failures: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |kb: u64| kb as f64 / 1024.0;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let b = &self.burst;
        writeln!(f, "\n== scale benchmark: {}", self.size)?;
        writeln!(f, "{:<52} {:>16}  goal", "figure", "measured")?;
        writeln!(f, "{:<52} {:>13.0} ms  ≤ 5000 ms", "start to ready (/readyz 200)", ms(self.ready))?;
        writeln!(f, "{:<52} {:>13.1} MB", "idle VmRSS (at ready)", mb(self.idle_kb))?;
        writeln!(f, "{:<52} {:>13.1} MB", "VmRSS after the load", mb(self.after_kb.0))?;
        writeln!(f, "{:<52} {:>13.1} MB", "peak VmRSS (VmHWM)", mb(self.after_kb.1))?;
        writeln!(f, "{:<52} {:>13.0} ms  ≤ 2000 ms", "template update to the next pod", ms(self.update))?;
        writeln!(f, "{:<52} {:>16}  0", "failed creations (burst)", b.failures.len())?;
        writeln!(
            f,
            "{:<52} {:>11.0} /s",
            format!("burst: {} dry-run creations, wall", b.latencies.len()),
            b.per_second()
        )?;
        writeln!(
            f,
            "{:<52} {:>10.1} / {:.1} ms",
            "burst: client latency p50 / p99",
            ms(b.quantile(0.5)),
            ms(b.quantile(0.99))
        )?;
        let h = &self.histogram;
        writeln!(
            f,
            "{:<52} {:>16}  ≤ 25 ms bucket (aim ≤ 5 ms)",
            format!("API server p99 for {WEBHOOK} ({} calls)", h.calls),
            bucket_text(h.p99)
        )?;
        writeln!(f, "{:<52} {:>16}", "API server p50", bucket_text(h.p50))?;
        writeln!(f, "  API server buckets (cumulative): {}", h.counts())?;
        let (c, h) = &self.sequential;
        writeln!(
            f,
            "{:<52} {:>10.1} / {:.1} ms",
            format!("one client, {} creations: latency p50 / p99", c.latencies.len()),
            ms(c.quantile(0.5)),
            ms(c.quantile(0.99))
        )?;
        writeln!(
            f,
            "{:<52} {:>16}",
            "  API server p99 / p50",
            format!("{} / {}", bucket_text(h.p99), bucket_text(h.p50))
        )?;
        writeln!(f, "  API server buckets (cumulative): {}", h.counts())?;
        if let Some(floor) = &self.floor {
            write!(f, "{floor}")?;
        }
        Ok(())
    }
}

async fn scenario(api: &support::ApiServer, size: &Size) -> Report {
    let admin = api.client().await;
    // The floor's namespaces: pods there are answered by the real webhook, by the no-op one, by
    // none; the first two hold the same templates (those of an extra tenant).
    let floor_tenant = size.namespaces;
    let floor_ns: &[(&str, usize)] = if size.floor.is_some() {
        &[("floor-real", floor_tenant), ("floor-noop", floor_tenant), ("floor-none", floor_tenant)]
    } else {
        &[]
    };
    create_objects(&admin, size, floor_ns).await;

    // The chart's configuration, installed before the webhook starts (as `helm install` does).
    let pki = support::TestPki::new("ptw-scale-ca");
    let mut sets = chart_sets(&pki.ca_pem);
    if size.floor.is_some() {
        sets.push("webhook.excludeNamespaces={floor-noop,floor-none}".into());
    }
    let webhook_dir = tempfile::Builder::new().prefix("ptw-scale-").tempdir().unwrap();
    let mut webhook = Webhook::start(webhook_dir.path(), &api.kubeconfig, &pki, "webhook", &[]);
    let set_refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let config = support::chart_mutating_webhook(webhook.port, &pki.ca_pem, &set_refs);
    let configs = Api::<MutatingWebhookConfiguration>::all(admin.clone());
    configs.create(&PostParams::default(), &config).await.unwrap();
    let ready = webhook.ready().await;
    let (idle_kb, _) = webhook.rss_kb();

    // The API server calls the webhook once its informer has the configuration.
    let first = tenant(0);
    let (_, calling) = probe_until(&admin, &first, 0, |p| var0_of(p) == Some(var0(0, 0).as_str())).await;
    eprintln!("the API server calls the webhook {calling:?} after it is ready");

    // A template update, timed from the patch to the first pod that gets it.
    let updated_key = 1;
    let new_value = format!("updated-0-{updated_key}-0");
    let text = realistic_template(0, updated_key).replace(&var0(0, updated_key), &new_value);
    assert_ne!(text, realistic_template(0, updated_key));
    let patch = Patch::Merge(json!({"data": {env_name(updated_key): text}}));
    let patched = Instant::now();
    Api::<ConfigMap>::namespaced(admin.clone(), &first).patch(CM_NAME, &PatchParams::default(), &patch).await.unwrap();
    probe_until(&admin, &first, updated_key, |p| var0_of(p) == Some(new_value.as_str())).await;
    let update = patched.elapsed();

    // The burst: every tenant and key in turn, 16 clients of their own.
    let mut clients = Vec::new();
    for _ in 0..size.clients {
        clients.push(api.client().await);
    }
    let expect = |t: usize, key: usize| if (t, key) == (0, updated_key) { new_value.clone() } else { var0(t, key) };
    let targets: Vec<Target> = (0..size.burst)
        .map(|i| {
            let (t, key) = (i % size.namespaces, (i / size.namespaces) % size.keys);
            Target { ns: tenant(t), key, expect: Some(expect(t, key)), body: None }
        })
        .collect();
    let before = admission_buckets(&admin, WEBHOOK).await;
    let burst = create_pods(&clients, targets).await;
    let histogram = histogram_delta(&before, &admission_buckets(&admin, WEBHOOK).await);
    assert!(histogram.calls >= size.burst as f64, "the API server counted {} calls to {WEBHOOK}", histogram.calls);
    let targets: Vec<Target> = (0..size.sequential)
        .map(|i| {
            let (t, key) = ((i * 7) % size.namespaces, i % size.keys);
            Target { ns: tenant(t), key, expect: Some(expect(t, key)), body: None }
        })
        .collect();
    let before = admission_buckets(&admin, WEBHOOK).await;
    let sequential = create_pods(&clients[..1], targets).await;
    let sequential = (sequential, histogram_delta(&before, &admission_buckets(&admin, WEBHOOK).await));

    let floor = match size.floor {
        Some((rounds, pods)) => Some(
            floor(api, &admin, &pki, webhook_dir.path(), &clients, floor_tenant, rounds, pods, webhook.child.id())
                .await,
        ),
        None => None,
    };
    let after_kb = webhook.rss_kb();
    let size_text = format!(
        "{} namespaces × {} keys ({} templates) + {} unlabelled {} KB ConfigMaps, {} dry-run creations from {} clients",
        size.namespaces,
        size.keys,
        size.namespaces * size.keys,
        size.unlabelled,
        size.unlabelled_bytes / 1024,
        size.burst,
        size.clients
    );
    let failures = burst.failures.iter().chain(&sequential.0.failures).cloned().collect();
    Report { size: size_text, ready, idle_kb, after_kb, update, burst, histogram, sequential, floor, failures }
}

/// CPU time (user + system) a process has used so far, from /proc.
#[cfg(feature = "noop-handler")]
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks
}

/// The floor as the API server sees it: the same dry-run creations answered by the webhook, by
/// the `--noop-handler` webhook (the TLS and HTTP stack alone) and by no webhook, alternating
/// rounds in one run; with 16 clients and with one, and the CPU each process spent per creation.
#[cfg(feature = "noop-handler")]
#[allow(clippy::too_many_arguments)]
async fn floor(
    api: &support::ApiServer,
    admin: &kube::Client,
    pki: &support::TestPki,
    dir: &Path,
    clients: &[kube::Client],
    floor_tenant: usize,
    rounds: usize,
    pods: usize,
    webhook_pid: u32,
) -> String {
    const NOOP: &str = "noop.pod-templates.flyte.org";
    let mut noop = Webhook::start(dir, &api.kubeconfig, pki, "noop", &["--noop-handler"]);
    let mut sets = chart_sets(&pki.ca_pem);
    sets.extend([
        "webhook.configurationName=ptw-scale-noop".into(),
        format!("webhook.name={NOOP}"),
        r"webhook.namespaceSelector.matchLabels.kubernetes\.io/metadata\.name=floor-noop".into(),
    ]);
    let set_refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let config = support::chart_mutating_webhook(noop.port, &pki.ca_pem, &set_refs);
    Api::<MutatingWebhookConfiguration>::all(admin.clone()).create(&PostParams::default(), &config).await.unwrap();
    noop.ready().await;
    // The no-op webhook changes nothing: wait until the API server counts calls to it.
    let total = |b: Vec<(f64, f64)>| b.last().map_or(0.0, |(_, c)| *c);
    let started = Instant::now();
    while total(admission_buckets(admin, NOOP).await) == 0.0 {
        let _ = Api::<Pod>::namespaced(admin.clone(), "floor-noop").create(&dry_run(), &pod("probe", 0)).await;
        assert!(started.elapsed() < LIMIT, "the API server does not call the no-op webhook");
    }
    probe_until(admin, "floor-real", 0, |p| var0_of(p) == Some(var0(floor_tenant, 0).as_str())).await;

    let (apiserver, etcd) = api.pids();
    let processes = [
        ("kube-apiserver", apiserver.to_string()),
        ("etcd", etcd.to_string()),
        ("webhook", webhook_pid.to_string()),
        ("noop", noop.child.id().to_string()),
        ("clients", "self".to_string()),
    ];
    // `merged`: the pods as the webhook returns them, sent where no webhook is called: what the
    // bigger pod costs the API server without any webhook call or patch.
    let mut merged_pods = Vec::new();
    for key in 0..10 {
        let (p, _) =
            probe_until(admin, "floor-real", key, |p| var0_of(p) == Some(var0(floor_tenant, key).as_str())).await;
        merged_pods.push(Arc::new(as_sent(p)));
    }
    let variants =
        [("webhook", "floor-real"), ("noop", "floor-noop"), ("none", "floor-none"), ("merged", "floor-none")];
    let targets = |name: &str, ns: &str, pods: usize| -> Vec<Target> {
        (0..pods)
            .map(|i| Target {
                ns: ns.into(),
                key: i % 10,
                expect: (name == "webhook").then(|| var0(floor_tenant, i % 10)),
                body: (name == "merged").then(|| merged_pods[i % 10].clone()),
            })
            .collect()
    };
    // A warm-up pass of each, not counted.
    for (name, ns) in variants {
        let warm = create_pods(clients, targets(name, ns, pods / 4)).await;
        assert!(warm.failures.is_empty(), "{:?}", &warm.failures[..warm.failures.len().min(5)]);
    }
    let mut out = String::new();
    let before = (admission_buckets(admin, WEBHOOK).await, admission_buckets(admin, NOOP).await);
    for (clients, pods) in [(clients, pods), (&clients[..1], pods / 3)] {
        let mut results: BTreeMap<&str, Vec<Creations>> = BTreeMap::new();
        let mut cpu: BTreeMap<(&str, &str), f64> = BTreeMap::new();
        for round in 0..rounds {
            // The order rotates, so no variant always follows the same one.
            for v in 0..variants.len() {
                let (name, ns) = variants[(round + v) % variants.len()];
                let used: Vec<f64> = processes.iter().map(|(_, pid)| cpu_seconds(pid)).collect();
                let done = create_pods(clients, targets(name, ns, pods)).await;
                for ((process, pid), used) in processes.iter().zip(used) {
                    *cpu.entry((name, process)).or_default() += cpu_seconds(pid) - used;
                }
                assert!(done.failures.is_empty(), "{name}: {:?}", &done.failures[..done.failures.len().min(5)]);
                results.entry(name).or_default().push(done);
            }
        }
        out += &floor_text(
            &results,
            &cpu,
            &processes.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            rounds,
            pods,
            clients.len(),
        );
    }
    let calls = (
        histogram_delta(&before.0, &admission_buckets(admin, WEBHOOK).await),
        histogram_delta(&before.1, &admission_buckets(admin, NOOP).await),
    );
    for (name, h) in [("webhook", &calls.0), ("noop", &calls.1)] {
        out += &format!(
            "API server, its calls to {name} in all rounds: p50 {}, p99 {}; {}\n",
            bucket_text(h.p50),
            bucket_text(h.p99),
            h.counts()
        );
    }
    let (rss, hwm) = noop.rss_kb();
    out += &format!("no-op webhook VmRSS {:.1} MB (peak {:.1} MB)\n", rss as f64 / 1024.0, hwm as f64 / 1024.0);
    out
}

/// A dry-run answer as a client would send it again: no server-set metadata, no status, and
/// without what the ServiceAccount admission adds (it adds it again).
#[cfg(feature = "noop-handler")]
fn as_sent(mut p: Pod) -> Pod {
    p.metadata = kube::api::ObjectMeta {
        name: p.metadata.name.take(),
        labels: p.metadata.labels.take(),
        annotations: p.metadata.annotations.take(),
        ..Default::default()
    };
    p.status = None;
    let spec = p.spec.as_mut().unwrap();
    let token = |name: &str| name.starts_with("kube-api-access-");
    spec.volumes.as_mut().unwrap().retain(|v| !token(&v.name));
    for c in &mut spec.containers {
        c.volume_mounts.as_mut().unwrap().retain(|m| !token(&m.name));
    }
    p
}

#[cfg(feature = "noop-handler")]
fn floor_text(
    results: &BTreeMap<&str, Vec<Creations>>,
    cpu: &BTreeMap<(&str, &str), f64>,
    processes: &[&str],
    rounds: usize,
    pods: usize,
    clients: usize,
) -> String {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let per_round = |a: &str, b: &str, f: &dyn Fn(&Creations, &Creations) -> f64| {
        median(results[a].iter().zip(&results[b]).map(|(x, y)| f(x, y)).collect())
    };
    let mut out = format!(
        "-- the floor, {clients} client(s): {rounds} rounds × {pods} dry-run creations per variant, variants alternating\n"
    );
    for name in ["webhook", "noop", "none", "merged"] {
        let r = &results[name];
        let rates: Vec<String> = r.iter().map(|c| format!("{:.0}", c.per_second())).collect();
        let creations = (rounds * pods) as f64;
        let cpus: Vec<String> =
            processes.iter().map(|p| format!("{p} {:.3}", cpu[&(name, *p)] * 1000.0 / creations)).collect();
        out += &format!(
            "{:<8} creations/s median {:>5.0} (rounds: {}); latency p50 {:.2} ms, p99 {:.2} ms (medians of rounds)\n         CPU ms per creation: {}\n",
            name,
            median(r.iter().map(Creations::per_second).collect()),
            rates.join(" "),
            median(r.iter().map(|c| ms(c.quantile(0.5))).collect()),
            median(r.iter().map(|c| ms(c.quantile(0.99))).collect()),
            cpus.join(", "),
        );
    }
    let throughput = per_round("noop", "webhook", &|noop, real| noop.per_second() / real.per_second());
    let latency = per_round("webhook", "noop", &|real, noop| ms(real.quantile(0.5)) / ms(noop.quantile(0.5)));
    let none = per_round("none", "webhook", &|none, real| none.per_second() / real.per_second());
    let merged = per_round("merged", "webhook", &|merged, real| merged.per_second() / real.per_second());
    out += &format!(
        "{:<52} {:>15.3}×  ≤ 1.1×\n{:<52} {:>15.3}×  ≤ 1.1×\n{:<52} {:>15.3}×\n{:<52} {:>15.3}×\n",
        "webhook vs no-op: time per creation (median of rounds)",
        throughput,
        "webhook vs no-op: median latency (median of rounds)",
        latency,
        "webhook vs no webhook: time per creation",
        none,
        "webhook vs the merged pod sent, no webhook",
        merged
    );
    out
}

#[cfg(not(feature = "noop-handler"))]
#[allow(clippy::too_many_arguments)]
async fn floor(
    _: &support::ApiServer,
    _: &kube::Client,
    _: &support::TestPki,
    _: &Path,
    _: &[kube::Client],
    _: usize,
    _: usize,
    _: usize,
    _: u32,
) -> String {
    "-- the floor: skipped (build with --features noop-handler: scripts/scale-bench.sh)\n".into()
}
