//! The command line (SPEC §6). Every flag is also an environment variable.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::admission::{self, OnProblem, Outcome, Policy};
use crate::names::Names;
use crate::server::{self, AppState, Limits};
use crate::store::dir::{self, DirStore};
use crate::store::{cluster, TemplateStore};
use crate::{certs, tls, yaml};

#[derive(Parser, Debug)]
#[command(
    name = "pod-template-webhook",
    version,
    about = "Merges pod templates from ConfigMaps into pods: a Kubernetes mutating admission webhook"
)]
pub struct Cli {
    /// Log format (logs go to stderr; the level comes from RUST_LOG, default info).
    #[arg(long, env = "PTW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of the Serve variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the webhook server.
    Serve(ServeArgs),
    /// Answer one AdmissionReview request (file or `-` for stdin) exactly as `serve` would.
    Mutate {
        #[command(flatten)]
        templates: TemplateArgs,
        /// AdmissionReview JSON; `-` reads stdin.
        #[arg(default_value = "-")]
        review: String,
    },
    /// Print a pod (YAML or JSON file, or `-`) with its template applied, as YAML.
    Render {
        #[command(flatten)]
        templates: TemplateArgs,
        /// Namespace of the pod when its manifest has none.
        #[arg(long, env = "PTW_NAMESPACE", default_value = "default")]
        namespace: String,
        /// After the pod, list (as YAML comments) every JSON path changed and the layer that set it.
        #[arg(long)]
        explain: bool,
        pod: String,
    },
    /// Print each template as a MutatingAdmissionPolicy and its binding (YAML), for the API server
    /// to apply in-tree; exits non-zero naming each template that is broken or cannot be exported.
    ExportPolicy {
        #[command(flatten)]
        templates: TemplateArgs,
        /// Templates to export, `NAME` (in every namespace) or `NAMESPACE/NAME`; default: all.
        names: Vec<String>,
    },
    /// Check template ConfigMaps and PodTemplates; exits non-zero naming file, line, object (and
    /// ConfigMap key) of each error.
    Validate {
        #[command(flatten)]
        names: NameArgs,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Names and policy shared by every command (SPEC §2, §5).
#[derive(Args, Debug, Clone)]
pub struct NameArgs {
    /// Pod label naming the environment (its value is the template name).
    #[arg(long, env = "PTW_ENVIRONMENT_LABEL", default_value = "flyte.org/environment")]
    pub environment_label: String,
    /// Pod annotation naming a template explicitly.
    #[arg(long, env = "PTW_TEMPLATE_ANNOTATION", default_value = "flyte.org/pod-template")]
    pub template_annotation: String,
    /// Label (value "true") that marks a ConfigMap as a template source.
    #[arg(long, env = "PTW_SOURCE_LABEL", default_value = "flyte.org/pod-templates")]
    pub source_label: String,
    /// Annotation written on mutated pods naming what was applied.
    #[arg(long, env = "PTW_APPLIED_ANNOTATION", default_value = "flyte.org/pod-template-applied")]
    pub applied_annotation: String,
    /// Namespace of cluster-wide templates [env PTW_PLATFORM_NAMESPACE, else POD_NAMESPACE, else
    /// `flyte`]. The chart sets it when the webhook runs in its own namespace.
    #[arg(long, env = "PTW_PLATFORM_NAMESPACE", default_value_t = default_platform_namespace())]
    pub platform_namespace: String,
    /// A template named by annotation that does not exist: deny the pod, or allow it with a warning.
    #[arg(long, env = "PTW_ON_MISSING_TEMPLATE", value_enum, default_value_t = OnProblem::Deny)]
    pub on_missing_template: OnProblem,
    /// A template that applies to the pod and never parsed: deny the pod, or allow it with a
    /// warning (the template is skipped).
    #[arg(long, env = "PTW_ON_BROKEN_TEMPLATE", value_enum, default_value_t = OnProblem::Deny)]
    pub on_broken_template: OnProblem,
    /// Two templates a pod names set one field to different values (the later one wins): warn,
    /// or deny the pod.
    #[arg(long, env = "PTW_ON_CONFLICT", value_enum, default_value_t = OnProblem::Warn)]
    pub on_conflict: OnProblem,
    /// Template every pod gets first: from the platform namespace, with a template of the same
    /// name in the pod's own namespace on top. Unset: no defaults.
    #[arg(long, env = "PTW_DEFAULT_TEMPLATE")]
    pub default_template: Option<String>,
}

/// `POD_NAMESPACE` (the webhook's own namespace, from the downward API), else `flyte`.
fn default_platform_namespace() -> String {
    std::env::var("POD_NAMESPACE").ok().filter(|ns| !ns.is_empty()).unwrap_or_else(|| "flyte".into())
}

impl NameArgs {
    pub fn names(&self) -> Names {
        Names {
            environment_label: self.environment_label.clone(),
            template_annotation: self.template_annotation.clone(),
            source_label: self.source_label.clone(),
            applied_annotation: self.applied_annotation.clone(),
            platform_namespace: self.platform_namespace.clone(),
        }
    }

    pub fn policy(&self) -> Policy {
        Policy {
            names: self.names(),
            on_missing: self.on_missing_template,
            on_broken: self.on_broken_template,
            on_conflict: self.on_conflict,
            default_template: self.default_template.clone().filter(|t| !t.is_empty()),
        }
    }
}

/// A local template directory, required by the offline commands.
#[derive(Args, Debug, Clone)]
pub struct TemplateArgs {
    /// Directory (or file) of template ConfigMap manifests.
    #[arg(long, env = "PTW_TEMPLATES")]
    pub templates: PathBuf,
    #[command(flatten)]
    pub names: NameArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TLS listener for `POST /mutate`.
    #[arg(long, env = "PTW_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain HTTP listener for `/healthz`, `/readyz`, `/metrics`.
    #[arg(long, env = "PTW_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,
    /// PEM certificate chain; reloaded when it changes. Without it a self-signed one is generated.
    #[arg(long, env = "PTW_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching --tls-cert.
    #[arg(long, env = "PTW_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Builtin certificates: keep a CA and serving certificate in this Secret of the platform
    /// namespace (created if absent), patch the caBundle, renew before expiry.
    #[arg(long, env = "PTW_CERT_SECRET", conflicts_with = "tls_cert")]
    pub cert_secret: Option<String>,
    /// Subject alternative names of the builtin serving certificate (comma-separated).
    #[arg(long, env = "PTW_CERT_DNS_NAMES", value_delimiter = ',')]
    pub cert_dns_names: Vec<String>,
    /// Webhook configuration(s) (mutating, and validating of the same name) whose caBundle the
    /// builtin mode keeps current.
    #[arg(long, env = "PTW_WEBHOOK_CONFIGURATION")]
    pub webhook_configuration: Option<String>,
    /// Lifetime of a builtin serving certificate in seconds; renewed when a third remains.
    #[arg(long, env = "PTW_CERT_VALIDITY_SECONDS", default_value_t = 365 * 24 * 3600)]
    pub cert_validity_seconds: u64,
    /// How often the builtin mode checks the Secret and the caBundle, in seconds.
    #[arg(long, env = "PTW_CERT_CHECK_SECONDS", default_value_t = 10)]
    pub cert_check_seconds: u64,
    /// How often the certificate files are checked for changes, in seconds.
    #[arg(long, env = "PTW_CERT_RELOAD_SECONDS", default_value_t = 2)]
    pub cert_reload_seconds: u64,
    /// Read templates from this directory (or file) of ConfigMap manifests instead of the cluster.
    #[arg(long, env = "PTW_TEMPLATES")]
    pub templates: Option<PathBuf>,
    /// Watch only these namespaces (plus the platform namespace); repeatable. Default: all.
    #[arg(long = "watch-namespace", env = "PTW_WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Largest accepted AdmissionReview body in bytes; larger ones get 413.
    #[arg(long, env = "PTW_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Seconds a client has to complete the TLS handshake and send request headers.
    #[arg(long, env = "PTW_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 5)]
    pub header_read_timeout_seconds: u64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "PTW_DRAIN_TIMEOUT_SECONDS", default_value_t = 20)]
    pub drain_timeout_seconds: u64,
    /// Requests handled at once; more get 503 at once.
    #[arg(long, env = "PTW_MAX_CONCURRENT_REQUESTS", default_value_t = Limits::default().max_concurrent_requests)]
    pub max_concurrent_requests: usize,
    /// Seconds a request (body included) may take; keep it below the webhook's timeoutSeconds.
    #[arg(long, env = "PTW_REQUEST_TIMEOUT_SECONDS", default_value_t = 4)]
    pub request_timeout_seconds: u64,
    /// Load-test baseline: answer every review `allowed` (its uid echoed) without merging. Only in
    /// builds with the cargo feature `noop-handler` (scripts/load-test.sh), never the default one.
    #[cfg(feature = "noop-handler")]
    #[arg(long, hide = true)]
    pub noop_handler: bool,
    #[command(flatten)]
    pub names: NameArgs,
}

/// Parses the command line and runs it.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve(args) => tokio::runtime::Runtime::new()?.block_on(serve(args)),
        Command::Mutate { templates, review } => mutate(&templates, &review),
        Command::Render { templates, namespace, explain, pod } => render(&templates, &namespace, &pod, explain),
        Command::Validate { names, paths } => validate(&names.names(), &paths),
        Command::ExportPolicy { templates, names } => export_policy(&templates, &names),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

fn read_input(path: &str) -> anyhow::Result<Vec<u8>> {
    if path == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).context("cannot read stdin")?;
        Ok(buf)
    } else {
        std::fs::read(path).with_context(|| format!("cannot read {path}"))
    }
}

fn load_dir(args: &TemplateArgs) -> anyhow::Result<DirStore> {
    Ok(DirStore::load(&args.templates, &args.names.names())?)
}

fn mutate(args: &TemplateArgs, review: &str) -> anyhow::Result<()> {
    let store = load_dir(args)?;
    let body = read_input(review)?;
    let req = admission::parse_review(&body)?;
    let decision = admission::mutate(req, &store, &args.names.policy())?;
    let mut out = std::io::stdout().lock();
    out.write_all(&admission::response_body(&decision))?;
    out.write_all(b"\n")?;
    Ok(())
}

fn render(args: &TemplateArgs, namespace: &str, pod_path: &str, explain: bool) -> anyhow::Result<()> {
    let store = load_dir(args)?;
    let text = String::from_utf8(read_input(pod_path)?).context("the pod manifest is not UTF-8")?;
    let mut pod: Value = yaml::from_str(&text).with_context(|| format!("{pod_path}: not a YAML or JSON pod"))?;
    if pod.get("kind").and_then(Value::as_str) != Some("Pod") {
        bail!("{pod_path}: expected a manifest of kind Pod");
    }
    let namespace = pod.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(namespace).to_owned();
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "render", "operation": "CREATE", "namespace": namespace,
            "name": pod.pointer("/metadata/name").cloned().unwrap_or_default(),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {}, "object": pod,
        }
    });
    let policy = args.names.policy();
    let req = admission::parse_review(&serde_json::to_vec(&review)?)?;
    let decision = admission::mutate(req, &store, &policy)?;
    for w in decision.response.warnings.iter().flatten() {
        eprintln!("warning: {w}");
    }
    if decision.outcome == Outcome::Denied {
        bail!("denied: {}", decision.response.result.message);
    }
    let original = pod.clone();
    if let Some(patch) = &decision.response.patch {
        let patch: json_patch::Patch = serde_json::from_slice(patch)?;
        json_patch::patch(&mut pod, &patch).context("the patch does not apply to the pod")?;
    }
    print!("{}", yaml::to_string(&pod)?);
    if explain {
        print!("{}", explanation(&original, &pod, &namespace, &store, &policy)?);
    }
    Ok(())
}

/// `render --explain`: YAML comments naming, for every JSON path the webhook changed, the layer
/// that set it — or the webhook itself for the applied annotation.
fn explanation(
    original: &Value,
    rendered: &Value,
    namespace: &str,
    store: &DirStore,
    policy: &Policy,
) -> anyhow::Result<String> {
    let requested = admission::Requested::from_pod(original, &policy.names).map_err(|r| anyhow::anyhow!(r.message))?;
    let plan = admission::plan(namespace, &requested, store, policy).map_err(|r| anyhow::anyhow!(r.message))?;
    let layers: Vec<_> = plan.layers.iter().map(admission::PlannedLayer::layer).collect();
    let (merged, changes) = crate::merge::explain(original, &layers);
    let mut out = String::from("# --explain: JSON path changed <- the layer that set it\n");
    if plan.layers.is_empty() {
        out.push_str("# (no template applies to this pod)\n");
    }
    let record =
        format!("/metadata/annotations/{}", policy.names.applied_annotation.replace('~', "~0").replace('/', "~1"));
    let recorded = rendered.pointer(&record).is_some() && merged.pointer(&record) != rendered.pointer(&record);
    let mut lines: Vec<(&str, String)> = changes
        .iter()
        .map(|c| (c.path.as_str(), plan.layers[c.layer].describe(&policy.names.platform_namespace)))
        .collect();
    if recorded {
        lines.push((&record, "the webhook: the record of the layers applied".to_owned()));
    }
    let width = lines.iter().map(|(path, _)| path.len()).max().unwrap_or(0);
    for (path, by) in lines {
        out.push_str(&format!("# {path:width$}  <- {by}\n"));
    }
    Ok(out)
}

fn export_policy(args: &TemplateArgs, wanted: &[String]) -> anyhow::Result<()> {
    use crate::export::{export_all, Found, FoundState};
    use crate::store::EntryState;
    let names = args.names.names();
    let store = load_dir(args)?;
    let mut found = Vec::new();
    for m in dir::read_template_sources(&args.templates, &names)? {
        for entry in m.source().entries() {
            let source = crate::template::TemplateSource {
                kind: m.kind(),
                namespace: m.namespace.clone(),
                object: m.name.clone(),
                key: entry.name.to_owned(),
                version: entry.content_hash(),
            };
            let served = store.lookup(&m.namespace, entry.name).entry.context("a loaded template is in the store")?;
            let state = match &served.state {
                _ if served.source != source => FoundState::Shadowed { by: served.source.clone() },
                EntryState::Ready(t) | EntryState::Stale { template: t, .. } => FoundState::Ready(t.clone()),
                EntryState::Broken(e) => FoundState::Broken(e.clone()),
            };
            found.push(Found { source, state });
        }
    }
    let names_it =
        |w: &String, f: &Found| *w == f.source.key || *w == format!("{}/{}", f.source.namespace, f.source.key);
    let selected = |f: &Found| wanted.is_empty() || wanted.iter().any(|w| names_it(w, f));
    if let Some(w) = wanted.iter().find(|w| !found.iter().any(|f| names_it(w, f))) {
        bail!("no template {w:?} in {}", args.templates.display());
    }
    // Every template stays in view for the namespace rules; only the selected ones are printed.
    let exported = export_all(&found, &names, args.names.default_template.as_deref());
    let mut refused = 0;
    let mut out = std::io::stdout().lock();
    for ((source, result), f) in exported.iter().zip(&found) {
        if !selected(f) {
            continue;
        }
        match result {
            Ok(e) => {
                for object in [&e.policy, &e.binding] {
                    write!(out, "---\n{}", yaml::to_string(object)?)?;
                }
            }
            Err(refusal) => {
                refused += 1;
                eprintln!(
                    "error: template {}/{} ({}): not exported: {refusal}",
                    source.namespace,
                    source.key,
                    source.describe()
                );
            }
        }
    }
    out.flush()?;
    if refused > 0 {
        eprintln!("{refused} template(s) not exported; keep them on the webhook");
        std::process::exit(1);
    }
    Ok(())
}

fn validate(names: &Names, paths: &[PathBuf]) -> anyhow::Result<()> {
    use crate::template::{SourceKind, TemplateError};
    let (mut ok, mut errors) = (0usize, Vec::new());
    for path in paths {
        for file in dir::manifest_files(path)? {
            let manifests = match dir::read_manifests(&file, &names.platform_namespace) {
                Ok(found) => found,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            for m in manifests.iter().filter(|m| m.labels.get(&names.source_label).is_some_and(|v| v == "true")) {
                for (key, parsed) in m.source().parse_all() {
                    let Err(e) = parsed else {
                        ok += 1;
                        continue;
                    };
                    let (line, what) = match m.kind() {
                        SourceKind::ConfigMap => {
                            (m.lines.get(&key), format!("ConfigMap {}/{} key {key:?}", m.namespace, m.name))
                        }
                        SourceKind::PodTemplate => {
                            let field = match &e {
                                TemplateError::Field { path, .. } if path.starts_with("metadata") => "metadata",
                                _ => "template",
                            };
                            (m.lines.get(field), format!("PodTemplate {}/{}", m.namespace, m.name))
                        }
                    };
                    let at = line.map(|l| format!(":{l}")).unwrap_or_default();
                    errors.push(format!("{}{at}: {what}: {e}", file.display()));
                }
            }
        }
    }
    for e in &errors {
        eprintln!("error: {e}");
    }
    println!("{ok} template(s) valid, {} error(s)", errors.len());
    if !errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let policy = args.names.policy();
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let store: Arc<dyn TemplateStore> = match &args.templates {
        Some(path) => {
            let store = DirStore::load(path, &policy.names)?;
            metrics.templates_reloaded(store.problems.len());
            Arc::new(store)
        }
        None => cluster::ClusterStore::start(&policy.names, &args.watch_namespaces, metrics.clone()).await?,
    };
    let platform_namespace = policy.names.platform_namespace.clone();
    let state = AppState::with_metrics(store, policy, metrics.clone());

    let resolver = serving_certificate(&args, &state, platform_namespace).await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(resolver));

    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        header_read_timeout: Duration::from_secs(args.header_read_timeout_seconds),
        drain_timeout: Duration::from_secs(args.drain_timeout_seconds),
        max_concurrent_requests: args.max_concurrent_requests.max(1),
        request_timeout: Duration::from_secs(args.request_timeout_seconds.max(1)),
        keep_alive_timeout: Limits::default().keep_alive_timeout,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.admin_listen))?;
    tracing::info!(listen = %listener.local_addr()?, admin = %admin.local_addr()?, "serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let admin_app = server::admin_router(state.clone());
    let admin_task =
        tokio::spawn(async move { axum::serve(admin, admin_app).with_graceful_shutdown(admin_stop).await });
    let drain_state = state.clone();
    let shutdown = async move {
        shutdown_signal().await;
        drain_state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("shutting down: readiness is now false");
        // A second signal means: now.
        tokio::spawn(async {
            shutdown_signal().await;
            tracing::warn!("second signal: exiting at once");
            std::process::exit(130);
        });
    };
    #[cfg(feature = "noop-handler")]
    let app = if args.noop_handler { server::noop_router(&limits) } else { server::webhook_router(state, &limits) };
    #[cfg(not(feature = "noop-handler"))]
    let app = server::webhook_router(state, &limits);
    server::serve_tls(listener, acceptor, app, limits, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// The certificate the TLS listener serves, kept current: files reloaded on change, the builtin
/// Secret-backed pair, or a self-signed one for local use.
async fn serving_certificate(
    args: &ServeArgs,
    state: &AppState,
    platform_namespace: String,
) -> anyhow::Result<Arc<tls::CertResolver>> {
    let metrics = &state.metrics;
    let (cert, files) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let (loaded, bytes) = tls::load_files(cert, key)?;
            (loaded, Some((cert.clone(), key.clone(), bytes)))
        }
        _ if args.cert_secret.is_some() => (tls::self_signed()?.0, None),
        _ => {
            let (loaded, _) = tls::self_signed()?;
            tracing::warn!("no --tls-cert/--tls-key: serving a generated SELF-SIGNED certificate for localhost; for local use only");
            (loaded, None)
        }
    };
    metrics.certificate_loaded(cert.not_after);
    let resolver = tls::CertResolver::new(cert.key);
    if let Some(secret) = &args.cert_secret {
        // Until the Secret's pair is served and the caBundle patched, the placeholder
        // self-signed certificate above is not trusted by anyone: stay unready.
        state.certificate_ready.store(false, std::sync::atomic::Ordering::Release);
        let cfg = certs::BuiltinConfig {
            // The Secret lives in the webhook's own namespace (where the chart grants access to it),
            // which need not be the platform namespace.
            namespace: std::env::var("POD_NAMESPACE").ok().filter(|ns| !ns.is_empty()).unwrap_or(platform_namespace),
            secret: secret.clone(),
            dns_names: args.cert_dns_names.clone(),
            webhook_configuration: args.webhook_configuration.clone(),
            validity: Duration::from_secs(args.cert_validity_seconds.max(60)),
            check_every: Duration::from_secs(args.cert_check_seconds.max(1)),
        };
        let client = kube::Client::try_default().await.context("builtin certificates need the Kubernetes API")?;
        let m = metrics.clone();
        let task = certs::BuiltinCerts::new(client, cfg, resolver.clone());
        tokio::spawn(task.run(state.certificate_ready.clone(), move |c| m.certificate_loaded(c.not_after)));
    } else if let Some((cert, key, bytes)) = files {
        let every = Duration::from_secs(args.cert_reload_seconds.max(1));
        let m = metrics.clone();
        tokio::spawn(tls::watch_files(cert, key, bytes, resolver.clone(), every, move |c| {
            m.certificate_loaded(c.not_after)
        }));
    }
    Ok(resolver)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
