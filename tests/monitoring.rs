//! Monitoring, checked with the real tools:
//!
//! - the chart's alert rules (`metrics.prometheusRule`) pass `promtool check rules` and the unit
//!   tests of `tests/monitoring/alerts.test.yaml` (`promtool test rules`: every alert fires when
//!   it should and stays quiet when it should not), and those tests fail with other thresholds;
//! - every PromQL expression of the rules and of the Grafana dashboard parses (promtool), and
//!   every metric it names is exported by a running server (the binary, its templates from the
//!   real API server, after a pod created there was mutated): a renamed metric fails here;
//! - the per-template series stay bounded with 10,000 template keys and pods naming 20,000
//!   names that are not templates, and the server's RSS stays under 40 MB.
//!
//! `promtool` is built from its Go module (`tests/tools/build.sh promtool`), like helm.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const CRATE: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_pod-template-webhook");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/pod-template-webhook");
const DASHBOARD: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/charts/pod-template-webhook/dashboards/pod-template-webhook.json");
const ALERT_TESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/monitoring/alerts.test.yaml");
/// The release the alert unit tests are written for (its job and namespace are in the series).
const RELEASE: &str = "ptw";
const NAMESPACE: &str = "flyte";

/// Metrics the rules and the dashboard read from elsewhere: kube-prometheus-stack has both.
const EXTERNAL_METRICS: [(&str, &str); 3] = [
    ("up", "Prometheus, one per scrape target"),
    ("kube_deployment_status_replicas_available", "kube-state-metrics"),
    ("kube_deployment_spec_replicas", "kube-state-metrics"),
];

// ---------------------------------------------------------------------------------------------
// tools

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `program` under coreutils `timeout`: every wait in these tests is bounded.
fn bounded(program: &Path) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("120").arg(program).env_remove("KUBECONFIG").stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    let mut cmd = bounded(&support::tool("promtool"));
    cmd.args(args).current_dir(dir);
    run(cmd)
}

/// The chart's PrometheusRule (`helm template` with the rules on, plus `sets`).
fn rendered_rules(sets: &[&str]) -> Value {
    let home = tempfile::tempdir().unwrap();
    let mut args =
        vec!["template", RELEASE, CHART, "--namespace", NAMESPACE, "--show-only", "templates/prometheusrule.yaml"];
    args.extend(["--set", "metrics.prometheusRule.enabled=true"]);
    for s in sets {
        args.extend(["--set", s]);
    }
    let mut cmd = bounded(&support::tool("helm"));
    cmd.args(&args)
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"));
    let out = run(cmd);
    assert!(out.ok, "helm template: {}", out.stderr);
    let [rule]: [Value; 1] = pod_template_webhook::yaml::documents(&out.stdout).unwrap().try_into().unwrap();
    assert_eq!(rule["kind"], "PrometheusRule");
    rule
}

/// A PrometheusRule's spec is a Prometheus rule file (JSON is YAML).
fn write_rule_file(rule: &Value, dir: &Path) {
    std::fs::write(dir.join("rules.yaml"), serde_json::to_vec_pretty(&rule["spec"]).unwrap()).unwrap();
}

fn alerts(rule: &Value) -> Vec<&Value> {
    rule["spec"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect()
}

/// Runs `promtool test rules` on the committed unit tests against `rule`.
fn promtool_test_rules(rule: &Value) -> Output {
    let dir = tempfile::tempdir().unwrap();
    write_rule_file(rule, dir.path());
    std::fs::copy(ALERT_TESTS, dir.path().join("alerts.test.yaml")).unwrap();
    promtool(&["test", "rules", "alerts.test.yaml"], dir.path())
}

// ---------------------------------------------------------------------------------------------
// alert rules

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests_for_every_alert() {
    let rule = rendered_rules(&[]);
    let dir = tempfile::tempdir().unwrap();
    write_rule_file(&rule, dir.path());
    let check = promtool(&["check", "rules", "rules.yaml"], dir.path());
    assert!(check.ok && check.stdout.contains("SUCCESS"), "promtool check rules:\n{}{}", check.stdout, check.stderr);

    let started = Instant::now();
    let test = promtool_test_rules(&rule);
    assert!(test.ok, "promtool test rules:\n{}{}", test.stdout, test.stderr);
    eprintln!(
        "promtool test rules: {} in {:?}",
        test.stdout.split_whitespace().collect::<Vec<_>>().join(" "),
        started.elapsed()
    );

    // Every alert has a case where it fires and one where it stays quiet.
    let tests: Value = pod_template_webhook::yaml::from_str(&std::fs::read_to_string(ALERT_TESTS).unwrap()).unwrap();
    let cases: Vec<&Value> =
        tests["tests"].as_array().unwrap().iter().flat_map(|t| t["alert_rule_test"].as_array().unwrap()).collect();
    let names: BTreeSet<&str> = alerts(&rule).iter().map(|a| a["alert"].as_str().unwrap()).collect();
    for name in &names {
        let of = |fires: bool| {
            cases.iter().filter(|c| c["alertname"] == *name).any(|c| {
                let expected = c.get("exp_alerts").and_then(Value::as_array).map_or(0, Vec::len);
                (expected > 0) == fires
            })
        };
        assert!(of(true), "no unit test where {name} fires");
        assert!(of(false), "no unit test where {name} stays quiet");
    }
    // Severity for each rule, and a runbook that exists: a section of the README.
    let readme = std::fs::read_to_string(Path::new(CRATE).join("README.md")).unwrap();
    let anchors: BTreeSet<String> = readme.lines().filter_map(|l| l.strip_prefix('#')).map(github_anchor).collect();
    for alert in alerts(&rule) {
        let name = alert["alert"].as_str().unwrap();
        assert!(["warning", "critical"].contains(&alert["labels"]["severity"].as_str().unwrap_or_default()), "{alert}");
        let url = alert["annotations"]["runbook_url"].as_str().unwrap();
        let (base, anchor) = url.split_once('#').unwrap();
        assert!(base.ends_with("/README.md"), "{url}");
        assert_eq!(anchor, name.to_lowercase(), "{name}: the runbook section is named after the alert");
        assert!(anchors.contains(anchor), "{name}: README.md has no section #{anchor}");
    }
}

/// GitHub's anchor of a heading line (without its first `#`).
fn github_anchor(heading: &str) -> String {
    heading
        .trim_start_matches('#')
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn the_unit_tests_fail_when_the_thresholds_change() {
    // The thresholds are values; the committed unit tests pin the defaults, so each of these
    // must make some case fail (the tests look at the thresholds, not only at the wiring).
    for set in [
        "metrics.prometheusRule.thresholds.downFor=20m",
        "metrics.prometheusRule.thresholds.targetDownFor=30m",
        "metrics.prometheusRule.thresholds.certificateWarningDays=5",
        "metrics.prometheusRule.thresholds.certificateCriticalDays=0.5",
        "metrics.prometheusRule.thresholds.templateErrorsFor=30m",
        "metrics.prometheusRule.thresholds.templateWatchDownFor=20m",
        "metrics.prometheusRule.thresholds.denialRatio=0.5",
        "metrics.prometheusRule.thresholds.errorRatio=0.05",
        "metrics.prometheusRule.thresholds.rateFor=1h",
        "metrics.prometheusRule.thresholds.latencyP99Seconds=0.5",
        "metrics.prometheusRule.thresholds.latencyFor=1h",
    ] {
        let test = promtool_test_rules(&rendered_rules(&[set]));
        assert!(!test.ok, "the alert unit tests still pass with {set}:\n{}", test.stdout);
    }
}

// ---------------------------------------------------------------------------------------------
// every query parses and names only exported metrics

/// The metric names a PromQL expression reads: identifiers that are not functions, aggregations,
/// keywords or label names (label matchers, `by (...)` lists, strings and ranges are skipped).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const AGGREGATIONS: [&str; 14] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    const KEYWORDS: [&str; 7] = ["bool", "and", "or", "unless", "offset", "inf", "nan"];
    let s: Vec<char> = expr.chars().collect();
    let next_non_space = |mut i: usize| {
        while i < s.len() && s[i].is_whitespace() {
            i += 1;
        }
        i
    };
    // The index after the bracket closing the one at `i`, skipping quoted strings.
    let skip_group = |i: usize, close: char| {
        let mut j = i + 1;
        while j < s.len() && s[j] != close {
            if matches!(s[j], '"' | '\'' | '`') {
                let q = s[j];
                j += 1;
                while j < s.len() && s[j] != q {
                    j += if s[j] == '\\' { 2 } else { 1 };
                }
            }
            j += 1;
        }
        j + 1
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == '{' {
            i = skip_group(i, '}');
        } else if c == '[' {
            i = skip_group(i, ']');
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_group(i, c);
        } else if c.is_ascii_digit() || c == '.' {
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let after = next_non_space(i);
            let call = after < s.len() && s[after] == '(';
            if LABEL_LISTS.contains(&word.as_str()) {
                if call {
                    i = skip_group(after, ')');
                }
            } else if !call
                && !AGGREGATIONS.contains(&word.as_str())
                && !KEYWORDS.contains(&word.to_lowercase().as_str())
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_finds_the_metrics_and_nothing_else() {
    let expr = r#"histogram_quantile(0.99, sum by (namespace, le) (rate(a_bucket{job="x",le!~"0.1|{"}[5m])))
        > on (namespace) group_left (pod) 2 * b:recorded offset 1h or sum(c) without (instance) unless bool_metric
        and absent(d{x='y'} == 1) - time() < 14 * 86400 + topk(3, e) by (job) + count_values("v", f) + 1e3"#;
    let expected = ["a_bucket", "b:recorded", "bool_metric", "c", "d", "e", "f"];
    assert_eq!(metric_names(expr), expected.iter().map(|s| s.to_string()).collect());
}

/// Grafana's variables, replaced so that promtool can parse a dashboard query.
fn without_grafana_variables(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let var = &rest[at + 1..];
        let (name, len) = match var.strip_prefix('{') {
            Some(braced) => (&braced[..braced.find('}').unwrap()], braced.find('}').unwrap() + 2),
            None => {
                let n = var.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(var.len());
                (&var[..n], n)
            }
        };
        // Interval variables stand in a range; every other one in a label value.
        out.push_str(if name.starts_with("__") { "5m" } else { "x" });
        rest = &var[len..];
    }
    out.push_str(rest);
    out
}

/// Every PromQL query of the dashboard: panel targets and the label_values() of its variables.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value.as_str()) {
                        ("expr", Some(expr)) => out.push(expr.to_owned()),
                        ("query", Some(q)) if q.starts_with("label_values(") => {
                            let inner = &q["label_values(".len()..q.rfind(',').unwrap()];
                            out.push(inner.to_owned());
                        }
                        _ => walk(value, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out.iter().map(|q| without_grafana_variables(q)).collect()
}

/// The metric names (samples, so `_bucket` and `_count` too) in a Prometheus text exposition.
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l[..l.find(['{', ' ']).unwrap()].to_owned())
        .collect()
}

/// What is wrong with `queries` against `exported`: names neither exported nor external.
fn unknown_metrics(queries: &[String], exported: &BTreeSet<String>) -> Vec<String> {
    let external: BTreeSet<&str> = EXTERNAL_METRICS.iter().map(|(name, _)| *name).collect();
    let mut unknown = Vec::new();
    for q in queries {
        for name in metric_names(q) {
            if !exported.contains(&name) && !external.contains(name.as_str()) {
                unknown.push(format!("{name} (in {q})"));
            }
        }
    }
    unknown
}

#[test]
fn every_query_of_the_dashboard_and_the_rules_parses_and_names_exported_metrics() {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let rule = rendered_rules(&[]);
    let rule_exprs: Vec<String> = alerts(&rule).iter().map(|a| a["expr"].as_str().unwrap().to_owned()).collect();
    let mut queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "the dashboard's queries were not found: {queries:?}");
    queries.extend(rule_exprs);

    // promtool parses each one, as a recording rule of a scratch rule file.
    let records: Vec<Value> =
        queries.iter().enumerate().map(|(i, q)| json!({"record": format!("query:{i}"), "expr": q})).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = json!({"groups": [{"name": "dashboard-and-alerts", "rules": records}]});
    std::fs::write(dir.path().join("queries.yaml"), serde_json::to_vec(&file).unwrap()).unwrap();
    let check = promtool(&["check", "rules", "queries.yaml"], dir.path());
    assert!(check.ok, "promtool check rules on the queries:\n{}{}", check.stdout, check.stderr);
    assert!(check.stdout.contains(&format!("SUCCESS: {} rules found", queries.len())), "{}", check.stdout);

    let scraped = metrics_of_a_running_server();
    let exported = exported_names(&scraped);
    let unknown = unknown_metrics(&queries, &exported);
    assert!(unknown.is_empty(), "metrics named but not exported:\n{}\n\nexported:\n{exported:#?}", unknown.join("\n"));
    // The check can fail: one metric renamed in the server (here, in its scrape) is caught.
    let renamed = scraped.replace("pod_template_webhook_templates_stale", "pod_template_webhook_stale_templates");
    let caught = unknown_metrics(&queries, &exported_names(&renamed));
    assert!(caught.iter().any(|u| u.starts_with("pod_template_webhook_templates_stale ")), "{caught:?}");
    let used: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    eprintln!(
        "{} queries ({} dashboard) name {} metrics, all exported or external: {used:?}",
        queries.len(),
        queries.len() - alerts(&rule).len(),
        used.len()
    );
}

/// Plain HTTP/1.1 GET on the admin port: (status, body).
fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// The `serve` binary; killed on drop (a failing assertion must not leak a server).
struct Server {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `serve` with `args` and a certificate of `pki`, and waits (bounded) for /readyz.
    fn start(args: &[&str], pki: &support::TestPki, env: &[(&str, &Path)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let leaf = pki.server();
        let (cert, key, log) = (dir.path().join("tls.crt"), dir.path().join("tls.key"), dir.path().join("serve.log"));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        let port = |_| format!("127.0.0.1:{}", support::free_port()).parse::<SocketAddr>().unwrap();
        let (listen, admin) = (port(0), port(1));
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args(args)
            .args(["--listen", &listen.to_string(), "--admin-listen", &admin.to_string()])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .env_remove("RUST_LOG")
            .env_remove("KUBECONFIG")
            // As the chart and the image run it (docs/performance.md: mimalloc's eager arena
            // commit keeps ~8-11 MB more resident for the same memory).
            .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("serve starts");
        let mut server = Server { child, listen, admin, log, _dir: dir };
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("serve exited with {status:?}:\n{}", server.log());
            }
            if let Ok((200, _)) = admin_get(admin, "/readyz") {
                return server;
            }
            assert!(Instant::now() < until, "/readyz not 200 within 60 s:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        let (status, body) = admin_get(self.admin, "/metrics").unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }

    /// (VmRSS, VmHWM) in KiB.
    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| -> u64 {
            let line = status.lines().find_map(|l| l.strip_prefix(name)).unwrap();
            line.trim().trim_end_matches(" kB").parse().unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve` with its templates from the real API server: one template, one pod created through
/// the API server and mutated by it, then its `/metrics`. A watch exists, so its metrics too.
fn metrics_of_a_running_server() -> String {
    use k8s_openapi::api::core::v1::{ConfigMap, Pod};
    use kube::api::{Api, PostParams};
    support::fixture("monitoring", |api, rt| {
        rt.block_on(async {
            let client = api.client().await;
            support::ensure_namespace(&client, NAMESPACE, json!({})).await;
            let cm: ConfigMap = serde_json::from_value(json!({
                "metadata": {"name": "templates", "labels": {"flyte.org/pod-templates": "true"}},
                "data": {"hello_world": "labels: {team: platform}\n"},
            }))
            .unwrap();
            Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE).create(&PostParams::default(), &cm).await.unwrap();
            let pki = support::TestPki::new("monitoring-webhook");
            let server =
                Server::start(&["--platform-namespace", NAMESPACE], &pki, &[("KUBECONFIG", api.kubeconfig.as_path())]);
            let webhooks = Api::all(client.clone());
            webhooks
                .create(&PostParams::default(), &support::mutating_webhook(server.listen.port(), &pki.ca_pem))
                .await
                .unwrap();
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": "demo", "labels": {"flyte.org/environment": "hello_world"}},
                "spec": {"containers": [{"name": "main", "image": "busybox"}]},
            }))
            .unwrap();
            let created = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
                .create(&PostParams::default(), &pod)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
            assert_eq!(created.metadata.labels.unwrap()["team"], "platform", "mutated through the API server");
            webhooks.delete("pod-template-webhook", &Default::default()).await.unwrap();
            let text = server.metrics();
            assert!(text.contains("pod_template_webhook_template_watch_up 1\n"), "{text}");
            assert!(
                text.contains(
                    "pod_template_webhook_template_admissions_total{template=\"hello_world\",result=\"mutated\"} 1"
                ),
                "{text}"
            );
            text
        })
    })
}

// ---------------------------------------------------------------------------------------------
// cardinality and memory with 10,000 templates

const TEMPLATES: usize = 10_000;

/// 100 ConfigMaps of 100 keys each, `t00000` … `t09999`, each a label and an annotation: what
/// is measured is the per-template metric, not the size of templates (the store's cost per
/// template grows with its content: README, Monitoring).
fn write_templates(dir: &Path) {
    let mut text = String::new();
    for cm in 0..TEMPLATES / 100 {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: templates-{cm:03}\n  namespace: flyte\n  labels:\n    flyte.org/pod-templates: \"true\"\ndata:\n"
        ));
        for k in 0..100 {
            let i = cm * 100 + k;
            text.push_str(&format!(
                "  t{i:05}: |\n    labels:\n      team: team-{i}\n    annotations:\n      example.com/template: t{i:05}\n"
            ));
        }
    }
    std::fs::write(dir.join("templates.yaml"), text).unwrap();
}

/// Reviews posted in order on one keep-alive TLS connection; returns the HTTP statuses.
async fn post_all(port: u16, ca_pem: &str, bodies: Vec<Vec<u8>>) -> BTreeMap<u16, usize> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut statuses = BTreeMap::new();
    for body in bodies {
        send.ready().await.unwrap();
        let req = hyper::Request::post("/mutate")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        *statuses.entry(resp.status().as_u16()).or_default() += 1;
        resp.into_body().collect().await.unwrap();
    }
    statuses
}

/// The sample Flyte review with its pod's environment label, and template annotation if any.
fn review(sample: &Value, environment: &str, annotation: Option<&str>) -> Vec<u8> {
    let mut review = sample.clone();
    let meta = &mut review["request"]["object"]["metadata"];
    meta["labels"]["flyte.org/environment"] = json!(environment);
    if let Some(names) = annotation {
        meta["annotations"]["flyte.org/pod-template"] = json!(names);
    }
    serde_json::to_vec(&review).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_template_series_stay_bounded_with_10000_templates_and_rss_stays_under_40_mb() {
    let templates = tempfile::tempdir().unwrap();
    write_templates(templates.path());
    let pki = support::TestPki::new("monitoring-load");
    let dir = templates.path().to_str().unwrap();
    let server = Server::start(&["--templates", dir, "--platform-namespace", "flyte"], &pki, &[]);
    let before = server.metrics();
    assert!(before.contains(&format!("pod_template_webhook_templates_loaded {TEMPLATES}\n")), "{before}");
    let (idle_rss, _) = server.rss_kib();

    let sample: Value =
        serde_json::from_slice(&std::fs::read(Path::new(CRATE).join("examples/reviews/flyte-task-pod.json")).unwrap())
            .unwrap();
    // Every template once by its label; then 10,000 names of no template by the annotation
    // (denied: not found) and 10,000 by the label (no template for that environment: unchanged).
    let mut bodies: Vec<Vec<u8>> = (0..TEMPLATES).map(|i| review(&sample, &format!("t{i:05}"), None)).collect();
    bodies.extend((0..TEMPLATES).map(|i| review(&sample, "t00000", Some(&format!("missing-{i}")))));
    bodies.extend((0..TEMPLATES).map(|i| review(&sample, &format!("no-such-environment-{i}"), None)));
    let started = Instant::now();
    let statuses = post_all(server.listen.port(), &pki.ca_pem, bodies).await;
    let took = started.elapsed();
    assert_eq!(statuses, BTreeMap::from([(200, 3 * TEMPLATES)]), "{}", server.log());

    let text = server.metrics();
    let series: Vec<&str> =
        text.lines().filter(|l| l.starts_with("pod_template_webhook_template_admissions_total{")).collect();
    let labels: BTreeSet<&str> = series.iter().map(|l| l.split('"').nth(1).unwrap()).collect();
    assert_eq!(series.len(), TEMPLATES + 2, "one series per template and result, plus two for `other`");
    assert_eq!(labels.len(), TEMPLATES + 1);
    assert!(labels.iter().all(|l| *l == "other" || l.starts_with('t')), "only template names and `other`");
    for line in [
        "pod_template_webhook_template_admissions_total{template=\"t00000\",result=\"mutated\"} 1",
        "pod_template_webhook_template_admissions_total{template=\"t09999\",result=\"mutated\"} 1",
        "pod_template_webhook_template_admissions_total{template=\"other\",result=\"denied\"} 10000",
        "pod_template_webhook_template_admissions_total{template=\"other\",result=\"unchanged\"} 10000",
    ] {
        assert!(series.contains(&line), "{line} missing");
    }
    let (rss, peak) = server.rss_kib();
    eprintln!(
        "{TEMPLATES} templates: {} admissions in {took:?} ({:.0}/s on one connection); {} per-template series ({} template labels); \
         /metrics {} KB; RSS idle {:.1} MB, after {:.1} MB, peak {:.1} MB",
        3 * TEMPLATES,
        3.0 * TEMPLATES as f64 / took.as_secs_f64(),
        series.len(),
        labels.len(),
        text.len() / 1000,
        idle_rss as f64 / 1024.0,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    assert!(peak * 1024 < 40_000_000, "peak RSS {peak} KiB with {TEMPLATES} templates");
    // What the admissions and their 10,002 series added, scrapes included.
    assert!(peak.saturating_sub(idle_rss) < 8 * 1024, "RSS grew from {idle_rss} to {peak} KiB");
}
