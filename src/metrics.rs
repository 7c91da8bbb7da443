//! Prometheus metrics, kept in atomics so the admission path takes no lock (the per-template
//! counters: a lock only the first time an entry of a template is counted, see `templates`).

mod templates;

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use templates::{AdmissionSlot, CellSlot, ShadowEvaluations, TemplateAdmissions};

/// Latency buckets in seconds, sub-millisecond first: admissions take microseconds.
const BUCKETS: [f64; 14] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Where a certificate check can fail: the files (`--tls-cert`), the builtin mode's Secret, or
/// the caBundle patch of the webhook configuration.
pub const CERTIFICATE_ERROR_SOURCES: [&str; 3] = ["files", "secret", "ca_bundle"];

/// The kinds of template source object (their Kubernetes kinds), the `kind` label of the
/// template watch's series.
pub const SOURCE_KINDS: [&str; 2] = ["ConfigMap", "PodTemplate"];

/// Results an admission can end with.
pub const RESULTS: [&str; 4] = ["mutated", "unchanged", "denied", "error"];

#[derive(Debug, Default)]
pub struct Metrics {
    admissions: [AtomicU64; 4],
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_nanos: AtomicU64,
    template_parse_errors: AtomicU64,
    cert_not_after: AtomicI64,
    cert_reload_time: AtomicI64,
    template_reload_time: AtomicI64,
    certificate_errors: [AtomicU64; CERTIFICATE_ERROR_SOURCES.len()],
    tls_handshake_failures: AtomicU64,
    handler_panics: AtomicU64,
    template_watch_errors: AtomicU64,
    /// By source kind, in [`SOURCE_KINDS`] order.
    template_relists: [AtomicU64; 2],
    templates_reloads: AtomicU64,
    template_watch: TaskHealth,
    certificate_watch: TaskHealth,
    /// Admissions by template name and result.
    pub templates: TemplateAdmissions,
    /// Shadow template evaluations by template name and result.
    pub shadows: ShadowEvaluations,
}

/// A supervised task's state: exported only once the process has such a task.
#[derive(Debug, Default)]
struct TaskHealth {
    /// 0 no such task, 1 running, 2 down (restarting).
    state: AtomicI64,
    restarts: AtomicU64,
}

impl TaskHealth {
    fn set(&self, running: bool) {
        self.state.store(if running { 1 } else { 2 }, Relaxed);
        if !running {
            self.restarts.fetch_add(1, Relaxed);
        }
    }

    fn render(&self, out: &mut String, name: &str, what: &str) {
        let state = self.state.load(Relaxed);
        if state == 0 {
            return;
        }
        let (p, up, restarts) = ("pod_template_webhook", i64::from(state == 1), self.restarts.load(Relaxed));
        let _ = writeln!(out, "# HELP {p}_{name}_up The {what} task is running (0: it stopped and is being restarted).\n# TYPE {p}_{name}_up gauge\n{p}_{name}_up {up}");
        let _ = writeln!(out, "# HELP {p}_{name}_restarts_total Times the {what} task stopped (ended or panicked) and was restarted.\n# TYPE {p}_{name}_restarts_total counter\n{p}_{name}_restarts_total {restarts}");
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Metrics {
    /// Counts an error of the template watch (the API server unreachable, a watch that expired):
    /// it keeps serving the cache and retries with backoff.
    pub fn template_watch_error(&self) {
        self.template_watch_errors.fetch_add(1, Relaxed);
    }

    pub fn template_watch_errors(&self) -> u64 {
        self.template_watch_errors.load(Relaxed)
    }

    /// Counts a relist of the template watch of `kind` (one of [`SOURCE_KINDS`]) after its first
    /// list (the watch expired or failed).
    pub fn template_relist(&self, kind: &str) {
        if let Some(i) = SOURCE_KINDS.iter().position(|k| *k == kind) {
            self.template_relists[i].fetch_add(1, Relaxed);
        }
    }

    /// Relists of the template watch of `kind`.
    pub fn template_relists(&self, kind: &str) -> u64 {
        SOURCE_KINDS.iter().position(|k| *k == kind).map_or(0, |i| self.template_relists[i].load(Relaxed))
    }

    /// Counts a TLS handshake that failed or timed out.
    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.fetch_add(1, Relaxed);
    }

    pub fn tls_handshake_failures(&self) -> u64 {
        self.tls_handshake_failures.load(Relaxed)
    }

    /// Counts a request whose handler panicked (answered 500; also an admission with result
    /// `error`): a bug, worth an alert of its own.
    pub fn handler_panicked(&self) {
        self.handler_panics.fetch_add(1, Relaxed);
    }

    pub fn handler_panics(&self) -> u64 {
        self.handler_panics.load(Relaxed)
    }

    /// Counts each template name of an answered admission: through the entry the admission found
    /// for it (no lookup, no lock), or as `other`.
    pub fn count_templates(&self, decision: &crate::admission::Decision) {
        let result = decision.outcome.as_str();
        for found in &decision.found {
            match found {
                Some(entry) => self.templates.count_template(&entry.counters, &entry.source.key, result),
                None => self.templates.count_other(result),
            }
        }
    }

    /// Counts one admission; `result` is one of [`RESULTS`].
    pub fn admission(&self, result: &str, took: Duration) {
        if let Some(i) = RESULTS.iter().position(|r| *r == result) {
            self.admissions[i].fetch_add(1, Relaxed);
        }
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    pub fn admissions(&self, result: &str) -> u64 {
        RESULTS.iter().position(|r| *r == result).map_or(0, |i| self.admissions[i].load(Relaxed))
    }

    pub fn certificate_loaded(&self, not_after: i64) {
        self.cert_not_after.store(not_after, Relaxed);
        self.cert_reload_time.store(now(), Relaxed);
    }

    /// A new template index was published (a load, or a batch of watch events), with
    /// `parse_errors` templates that failed to parse not counted yet.
    pub fn templates_reloaded(&self, parse_errors: usize) {
        self.template_parse_errors(parse_errors);
        self.templates_reloads.fetch_add(1, Relaxed);
        self.template_reload_time.store(now(), Relaxed);
    }

    /// Times a template index was published.
    pub fn templates_reloads(&self) -> u64 {
        self.templates_reloads.load(Relaxed)
    }

    /// Counts templates that failed to parse when loaded.
    pub fn template_parse_errors(&self, count: usize) {
        self.template_parse_errors.fetch_add(count as u64, Relaxed);
    }

    /// The template watch task is running (`true`) or has stopped and is being restarted.
    pub fn template_watch(&self, running: bool) {
        self.template_watch.set(running);
    }

    /// The certificate task (file reload or builtin Secret) is running or being restarted.
    pub fn certificate_watch(&self, running: bool) {
        self.certificate_watch.set(running);
    }

    /// A certificate check failed; `source` is one of [`CERTIFICATE_ERROR_SOURCES`].
    pub fn certificate_error(&self, source: &str) {
        if let Some(i) = CERTIFICATE_ERROR_SOURCES.iter().position(|s| *s == source) {
            self.certificate_errors[i].fetch_add(1, Relaxed);
        }
    }

    /// The Prometheus text exposition; `templates`, `template_errors` and `stale_templates` (the
    /// errors serving a last good version) come from the store. Long on purpose: one flat list of
    /// series in exposition order, each HELP/TYPE beside its values, read top to bottom like the
    /// scrape it produces.
    pub fn render(&self, templates: usize, template_errors: usize, stale_templates: usize) -> String {
        let mut out = String::with_capacity(4096);
        let p = "pod_template_webhook";
        let _ = writeln!(out, "# HELP {p}_admissions_total Admission reviews answered, by result.");
        let _ = writeln!(out, "# TYPE {p}_admissions_total counter");
        for (i, r) in RESULTS.iter().enumerate() {
            let _ = writeln!(out, "{p}_admissions_total{{result=\"{r}\"}} {}", self.admissions[i].load(Relaxed));
        }
        // Only where there is a watch (the cluster store), like template_watch_up.
        if self.template_watch.state.load(Relaxed) != 0 {
            let _ = writeln!(out, "# HELP {p}_template_watch_errors_total Errors of the template watch (API server unreachable, watch expired); the cache keeps serving.");
            let _ = writeln!(out, "# TYPE {p}_template_watch_errors_total counter");
            let _ = writeln!(out, "{p}_template_watch_errors_total {}", self.template_watch_errors.load(Relaxed));
            let _ = writeln!(out, "# HELP {p}_template_relists_total Relists of the template watch after its first list (the watch expired, 410 Gone, or failed), by source kind; the last complete index serves meanwhile.");
            let _ = writeln!(out, "# TYPE {p}_template_relists_total counter");
            for (i, kind) in SOURCE_KINDS.iter().enumerate() {
                let n = self.template_relists[i].load(Relaxed);
                let _ = writeln!(out, "{p}_template_relists_total{{kind=\"{kind}\"}} {n}");
            }
        }
        let _ = writeln!(out, "# HELP {p}_handler_panics_total Requests whose handler panicked (a bug): answered 500, also counted in admissions_total as result \"error\".");
        let _ = writeln!(out, "# TYPE {p}_handler_panics_total counter");
        let _ = writeln!(out, "{p}_handler_panics_total {}", self.handler_panics.load(Relaxed));
        let _ = writeln!(out, "# HELP {p}_tls_handshake_failures_total TLS handshakes that failed or timed out (an untrusted certificate: check the caBundle).");
        let _ = writeln!(out, "# TYPE {p}_tls_handshake_failures_total counter");
        let _ = writeln!(out, "{p}_tls_handshake_failures_total {}", self.tls_handshake_failures.load(Relaxed));
        let _ = writeln!(
            out,
            "# HELP {p}_admission_duration_seconds Time to decide one admission (parse, merge, patch, encode)."
        );
        let _ = writeln!(out, "# TYPE {p}_admission_duration_seconds histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(out, "{p}_admission_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(out, "{p}_admission_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency_sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{p}_admission_duration_seconds_sum {sum}");
        let _ = writeln!(out, "{p}_admission_duration_seconds_count {count}");
        let gauges = [
            ("templates_loaded", "Template keys serving a template.", templates as i64),
            (
                "template_errors",
                "Template keys that do not parse (never parsed, or serving a stale version).",
                template_errors as i64,
            ),
            (
                "templates_stale",
                "Template keys serving their last good version (the current one does not parse).",
                stale_templates as i64,
            ),
            (
                "certificate_not_after_seconds",
                "Expiry of the serving certificate (Unix time).",
                self.cert_not_after.load(Relaxed),
            ),
            (
                "certificate_reload_timestamp_seconds",
                "When the serving certificate was last loaded.",
                self.cert_reload_time.load(Relaxed),
            ),
            (
                "templates_reload_timestamp_seconds",
                "When templates last changed.",
                self.template_reload_time.load(Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {p}_{name} {help}\n# TYPE {p}_{name} gauge\n{p}_{name} {value}");
        }
        let _ = writeln!(out, "# HELP {p}_templates_reloads_total Template indexes published (a load, or a batch of watch events; a relist publishes once, at its end).");
        let _ = writeln!(out, "# TYPE {p}_templates_reloads_total counter");
        let _ = writeln!(out, "{p}_templates_reloads_total {}", self.templates_reloads.load(Relaxed));
        let _ = writeln!(out, "# HELP {p}_template_parse_errors_total Template keys that failed to parse when loaded.");
        let _ = writeln!(out, "# TYPE {p}_template_parse_errors_total counter");
        let _ = writeln!(out, "{p}_template_parse_errors_total {}", self.template_parse_errors.load(Relaxed));
        let _ = writeln!(out, "# HELP {p}_certificate_errors_total Certificate checks that failed (the last good pair keeps serving), by source.");
        let _ = writeln!(out, "# TYPE {p}_certificate_errors_total counter");
        for (i, source) in CERTIFICATE_ERROR_SOURCES.iter().enumerate() {
            let n = self.certificate_errors[i].load(Relaxed);
            let _ = writeln!(out, "{p}_certificate_errors_total{{source=\"{source}\"}} {n}");
        }
        self.template_watch.render(&mut out, "template_watch", "template watch");
        self.certificate_watch.render(&mut out, "certificate_watch", "certificate reload");
        self.templates.render(&mut out, p);
        self.shadows.render(&mut out, p);
        let _ = writeln!(out, "# HELP {p}_build_info Build information.\n# TYPE {p}_build_info gauge");
        let _ = writeln!(out, "{p}_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets_move() {
        let m = Metrics::default();
        m.admission("mutated", Duration::from_micros(80));
        m.admission("denied", Duration::from_millis(3));
        let text = m.render(7, 3, 1);
        assert!(text.contains("pod_template_webhook_admissions_total{result=\"mutated\"} 1"));
        assert!(text.contains("pod_template_webhook_admissions_total{result=\"denied\"} 1"));
        assert!(text.contains("pod_template_webhook_admission_duration_seconds_bucket{le=\"0.0001\"} 1"));
        assert!(text.contains("pod_template_webhook_admission_duration_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("pod_template_webhook_admission_duration_seconds_count 2"));
        assert!(text.contains("pod_template_webhook_templates_loaded 7"));
        assert!(text.contains("pod_template_webhook_template_errors 3"));
        assert!(text.contains("pod_template_webhook_templates_stale 1"));
        assert!(text.contains("pod_template_webhook_templates_reloads_total 0\n"));
        m.templates_reloaded(2);
        let text = m.render(0, 0, 0);
        assert!(text.contains("pod_template_webhook_templates_reloads_total 1\n"), "{text}");
        assert!(text.contains("pod_template_webhook_template_parse_errors_total 2\n"), "{text}");
    }

    #[test]
    fn the_template_watch_state_is_exported_only_where_there_is_a_watch() {
        let m = Metrics::default();
        assert!(!m.render(0, 0, 0).contains("template_watch"), "a directory store has no watch");
        m.template_watch(true);
        assert!(m.render(0, 0, 0).contains("pod_template_webhook_template_watch_up 1\n"));
        m.template_watch_error();
        assert!(m.render(0, 0, 0).contains("pod_template_webhook_template_watch_errors_total 1\n"));
        m.template_relist("PodTemplate");
        let text = m.render(0, 0, 0);
        assert!(text.contains("pod_template_webhook_template_relists_total{kind=\"PodTemplate\"} 1\n"), "{text}");
        assert!(text.contains("pod_template_webhook_template_relists_total{kind=\"ConfigMap\"} 0\n"), "{text}");
        m.template_watch(false);
        let text = m.render(0, 0, 0);
        assert!(text.contains("pod_template_webhook_template_watch_up 0\n"), "{text}");
        assert!(text.contains("pod_template_webhook_template_watch_restarts_total 1\n"), "{text}");
    }

    #[test]
    fn certificate_errors_are_counted_by_source_and_the_watch_state_exported() {
        let m = Metrics::default();
        m.certificate_error("ca_bundle");
        m.certificate_error("ca_bundle");
        m.certificate_error("files");
        m.certificate_error("nonsense");
        let text = m.render(0, 0, 0);
        assert!(text.contains("pod_template_webhook_certificate_errors_total{source=\"ca_bundle\"} 2\n"), "{text}");
        assert!(text.contains("pod_template_webhook_certificate_errors_total{source=\"files\"} 1\n"), "{text}");
        assert!(text.contains("pod_template_webhook_certificate_errors_total{source=\"secret\"} 0\n"), "{text}");
        assert!(!text.contains("certificate_watch"), "no certificate task yet");
        m.certificate_watch(false);
        let text = m.render(0, 0, 0);
        assert!(text.contains("pod_template_webhook_certificate_watch_up 0\n"), "{text}");
        assert!(text.contains("pod_template_webhook_certificate_watch_restarts_total 1\n"), "{text}");
    }
}
