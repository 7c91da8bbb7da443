//! The commands: `serve` hands over to [`crate::startup`]; `mutate`, `render` and `validate` work
//! offline on a template directory, as thin shells around admission.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};

use crate::admission::{self, Outcome, Policy};
use crate::cli::{Cli, Command, LogFormat, TemplateArgs};
use crate::manifest;
use crate::names::Names;
use crate::store::dir::DirStore;
use crate::store::TemplateStore;
use crate::yaml;

/// Parses the command line and runs it.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve(args) => tokio::runtime::Runtime::new()?.block_on(crate::startup::serve(args)),
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
    let requested = admission::Requested::from_pod(original, &policy.names)?;
    let plan = admission::plan(namespace, &requested, store, policy).map_err(|r| anyhow::anyhow!(r.message))?;
    let layers: Vec<_> = plan.layers.iter().map(admission::PlannedLayer::layer).collect();
    let (merged, changes) = crate::merge::explain(original, &layers);
    let mut out = String::from("# --explain: JSON path changed <- the layer that set it\n");
    out.push_str(&match &requested {
        admission::Requested::Nothing => "# no template named by the pod (annotation, label or task-name)\n".to_owned(),
        admission::Requested::Annotation(list) => {
            format!("# templates from {}: {}\n", requested.rule(&policy.names), list.join(", "))
        }
        _ => format!("# environment from {}: {}\n", requested.rule(&policy.names), requested.names().join(", ")),
    });
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
    // Read once: the store and the list of what to export come from the same manifests.
    let sources = manifest::read_template_sources(&args.templates, &names)?;
    let store = DirStore::from_sources(&sources, &names);
    let mut found = Vec::new();
    for m in &sources {
        for entry in m.source().entries() {
            let source = entry.source(m.kind(), &m.namespace, &m.name, None);
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
                for object in std::iter::once(&e.policy).chain(&e.bindings) {
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
        for file in manifest::manifest_files(path)? {
            let manifests = match manifest::read_manifests(&file, &names.platform_namespace) {
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
