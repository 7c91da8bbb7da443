//! The command line (SPEC §6): what it accepts, nothing more. Every flag is also an environment
//! variable. `commands` runs the offline commands, `serve` builds and runs the server.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::admission::{OnProblem, Policy};
use crate::audit::Class;
use crate::names::Names;
use crate::server::Limits;

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
    /// Which running pods are out of date (read-only): lists the pods the webhook selects (Pending
    /// or Running) in pages and compares each one's applied record with what would be applied now.
    Audit(AuditArgs),
    /// Check template ConfigMaps and PodTemplates; exits non-zero naming file, line, object (and
    /// ConfigMap key) of each error.
    Validate {
        #[command(flatten)]
        names: NameArgs,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run template test suites (YAML: templates, cases of a pod and what to expect); prints
    /// PASS/FAIL per case with a diff; exit 1 when a case fails, 2 when a suite is invalid.
    Test {
        #[command(flatten)]
        names: NameArgs,
        /// Write each case's `expect.pod` file from the actual result (golden files).
        #[arg(long, env = "PTW_TEST_UPDATE")]
        update: bool,
        /// Suite files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Why was (or wasn't) this pod changed: would the webhook's configurations send it, which
    /// templates apply and where they were found, the patch it would get now, its applied record.
    Explain(ExplainArgs),
}

/// `explain`: a pod of the cluster by name, or a pod manifest.
#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Namespace of the pod (a manifest's own namespace wins).
    #[arg(short = 'n', long, env = "PTW_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Name of a pod in the cluster.
    #[arg(required_unless_present = "filename", conflicts_with = "filename")]
    pub pod: Option<String>,
    /// A pod manifest (YAML or JSON; `-` reads stdin), created or not.
    #[arg(short = 'f', long, env = "PTW_FILENAME")]
    pub filename: Option<String>,
    /// MutatingWebhookConfiguration(s) to evaluate, by name; repeatable. Default: those labelled
    /// --webhook-selector.
    #[arg(long = "webhook-configuration", env = "PTW_WEBHOOK_CONFIGURATIONS", value_delimiter = ',')]
    pub webhook_configurations: Vec<String>,
    /// Label selector of the webhook's MutatingWebhookConfigurations (the chart's labels).
    #[arg(long, env = "PTW_WEBHOOK_SELECTOR", default_value = crate::explain::DEFAULT_CONFIGURATION_SELECTOR)]
    pub webhook_selector: String,
    /// Output format.
    #[arg(short = 'o', long, env = "PTW_OUTPUT", value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// How the cluster commands print their report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
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
    /// Annotation of a template ConfigMap or PodTemplate: `shadow` evaluates its templates and
    /// reports what they would change without applying them; `enforce` or absent applies them.
    #[arg(long, env = "PTW_MODE_ANNOTATION", default_value = "flyte.org/pod-template-mode")]
    pub mode_annotation: String,
    /// Label on the pods Flyte's executor creates (SPEC §9); with --managed-value it marks the pods
    /// whose environment may come from their task-name label.
    #[arg(long, env = "PTW_MANAGED_LABEL", default_value = "flyte.org/managed")]
    pub managed_label: String,
    /// Value of --managed-label on a managed pod.
    #[arg(long, env = "PTW_MANAGED_VALUE", default_value = "true")]
    pub managed_value: String,
    /// Label of a managed pod holding `<environment>.<function>`: its part before the first `.` is
    /// the environment when the pod names none. Empty: off.
    #[arg(long, env = "PTW_TASK_NAME_LABEL", default_value = "task-name")]
    pub task_name_label: String,
    /// Namespace of cluster-wide templates [env PTW_PLATFORM_NAMESPACE, else POD_NAMESPACE, else
    /// `flyte`]. The chart sets it when the webhook runs in its own namespace.
    #[arg(long, env = "PTW_PLATFORM_NAMESPACE", default_value_t = default_platform_namespace())]
    pub platform_namespace: String,
    /// A template named by annotation that does not exist: deny the pod, or allow it with a warning.
    #[arg(long, env = "PTW_ON_MISSING_TEMPLATE", value_enum, default_value_t = Problem::Deny)]
    pub on_missing_template: Problem,
    /// A template that applies to the pod and never parsed: deny the pod, or allow it with a
    /// warning (the template is skipped).
    #[arg(long, env = "PTW_ON_BROKEN_TEMPLATE", value_enum, default_value_t = Problem::Deny)]
    pub on_broken_template: Problem,
    /// Two templates a pod names set one field to different values (the later one wins): warn,
    /// or deny the pod.
    #[arg(long, env = "PTW_ON_CONFLICT", value_enum, default_value_t = Problem::Warn)]
    pub on_conflict: Problem,
    /// Template every pod gets first: from the platform namespace, with a template of the same
    /// name in the pod's own namespace on top. Unset: no defaults.
    #[arg(long, env = "PTW_DEFAULT_TEMPLATE")]
    pub default_template: Option<String>,
}

/// [`OnProblem`] as a flag value (the admission module knows nothing of the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Problem {
    /// Deny the pod with a message.
    Deny,
    /// Allow the pod with the message as a warning.
    Warn,
}

impl From<Problem> for OnProblem {
    fn from(p: Problem) -> Self {
        match p {
            Problem::Deny => OnProblem::Deny,
            Problem::Warn => OnProblem::Warn,
        }
    }
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
            mode_annotation: self.mode_annotation.clone(),
            platform_namespace: self.platform_namespace.clone(),
            managed_label: self.managed_label.clone(),
            managed_value: self.managed_value.clone(),
            task_name_label: self.task_name_label.clone(),
        }
    }

    pub fn policy(&self) -> Policy {
        Policy {
            names: self.names(),
            on_missing: self.on_missing_template.into(),
            on_broken: self.on_broken_template.into(),
            on_conflict: self.on_conflict.into(),
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

/// How the read-only commands reach the cluster: like `serve` (`KUBECONFIG`, `~/.kube/config`,
/// else in-cluster) unless told otherwise.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Kubeconfig file [default: $KUBECONFIG, ~/.kube/config, else the in-cluster config].
    #[arg(long, env = "PTW_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Context of the kubeconfig to use [default: its current context].
    #[arg(long, env = "PTW_CONTEXT")]
    pub context: Option<String>,
    /// Read templates only from these namespaces (plus the platform namespace), as `serve
    /// --watch-namespace`; repeatable. Default: all.
    #[arg(long = "watch-namespace", env = "PTW_WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    #[command(flatten)]
    pub names: NameArgs,
}

/// `audit`: where to look, how to print, when to fail.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("scope").required(true).args(["namespace", "all_namespaces"])))]
pub struct AuditArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Audit the pods of this namespace.
    #[arg(short = 'n', long, env = "PTW_NAMESPACE")]
    pub namespace: Option<String>,
    /// Audit the pods of every namespace.
    #[arg(short = 'A', long, env = "PTW_ALL_NAMESPACES")]
    pub all_namespaces: bool,
    /// `text`: a table per template, the pods not current, a summary; `json`: one object per pod
    /// per line, then `{"summary": …}`.
    #[arg(short = 'o', long, env = "PTW_OUTPUT", value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Exit 1 when any pod is in one of these classes (comma-separated), naming them.
    #[arg(long, env = "PTW_FAIL_ON", value_enum, value_delimiter = ',')]
    pub fail_on: Vec<PodClass>,
    /// Pods per LIST request (the `limit`; the rest follows with `continue` tokens).
    #[arg(long, env = "PTW_PAGE_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub page_size: u32,
}

/// [`Class`] as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodClass {
    Current,
    Outdated,
    Missed,
    Untouched,
}

impl From<PodClass> for Class {
    fn from(c: PodClass) -> Self {
        match c {
            PodClass::Current => Class::Current,
            PodClass::Outdated => Class::Outdated,
            PodClass::Missed => Class::Missed,
            PodClass::Untouched => Class::Untouched,
        }
    }
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
