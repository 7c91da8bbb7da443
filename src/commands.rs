//! The commands: `serve` hands over to [`crate::startup`]; `mutate`, `render` and `validate` work
//! offline on a template directory, as thin shells around admission.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::Value;

use crate::admission;
use crate::cli::{AuditArgs, Cli, Command, ExplainArgs, LogFormat, Output, TemplateArgs};
use crate::manifest;
use crate::names::Names;
use crate::preview;
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
        Command::Test { names, update, files } => test(&names.policy(), &files, update),
        Command::Audit(args) => tokio::runtime::Runtime::new()?.block_on(audit(&args)),
        Command::Explain(args) => tokio::runtime::Runtime::new()?.block_on(explain(args)),
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
    let pod: Value = yaml::from_str(&text).with_context(|| format!("{pod_path}: not a YAML or JSON pod"))?;
    let policy = args.names.policy();
    let preview = preview::preview(&pod, namespace, &store, &policy).with_context(|| pod_path.to_owned())?;
    for w in preview.warnings() {
        eprintln!("warning: {w}");
    }
    if preview.denied() {
        bail!("denied: {}", preview.decision.response.result.message);
    }
    print!("{}", yaml::to_string(&preview.pod)?);
    if explain {
        print!("{}", preview::explain(&preview, &store, &policy)?.to_comments());
    }
    Ok(())
}

async fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    use crate::explain::{Discovery, Target};
    use crate::store::cluster;
    let c = &args.cluster;
    let client = cluster::client(c.kubeconfig.as_deref(), c.context.as_deref()).await?;
    let target = match (&args.pod, &args.filename) {
        (Some(name), _) => Target::Live(name.clone()),
        (None, Some(path)) => {
            let text = String::from_utf8(read_input(path)?).context("the pod manifest is not UTF-8")?;
            Target::File(yaml::from_str(&text).with_context(|| format!("{path}: not a YAML or JSON pod"))?)
        }
        (None, None) => bail!("give a pod name or -f POD.yaml"),
    };
    let discovery = Discovery { names: args.webhook_configurations.clone(), selector: args.webhook_selector.clone() };
    let inputs = crate::explain::gather(&client, &args.namespace, target, &discovery).await?;
    let store = cluster::load_once(&client, &c.names.names(), &c.watch_namespaces)
        .await
        .context("cannot read the templates")?;
    let report = crate::explain::report(&inputs, &store, &c.names.policy())?;
    match args.output {
        Output::Text => print!("{}", report.to_text()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
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

async fn audit(args: &AuditArgs) -> anyhow::Result<()> {
    use crate::audit::{Class, Scope};
    use crate::store::cluster;
    let cluster_args = &args.cluster;
    let client = cluster::client(cluster_args.kubeconfig.as_deref(), cluster_args.context.as_deref()).await?;
    let scope = match &args.namespace {
        Some(ns) if !args.all_namespaces => Scope::Namespace(ns.clone()),
        _ => Scope::AllNamespaces,
    };
    let policy = cluster_args.names.policy();
    let report = crate::audit::audit(&client, &cluster_args.watch_namespaces, &policy, &scope, args.page_size).await?;
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Text => report.write_text(&mut out)?,
        Output::Json => report.write_json(&mut out)?,
    }
    out.flush()?;
    let fail_on: Vec<Class> = args.fail_on.iter().map(|c| Class::from(*c)).collect();
    let failing: Vec<String> = report
        .in_classes(&fail_on)
        .map(|p| format!("{}/{} ({})", p.namespace, p.name, p.classified.class.as_str()))
        .collect();
    if !failing.is_empty() {
        const SHOWN: usize = 50;
        let more = failing.len().saturating_sub(SHOWN);
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        let classes: Vec<&str> = fail_on.iter().map(|c| c.as_str()).collect();
        eprintln!(
            "error: {} pod(s) {}: {}{more}",
            failing.len(),
            classes.join(" or "),
            failing[..failing.len().min(SHOWN)].join(", ")
        );
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
                if let Err(e) = m.mode(names) {
                    let line = m.lines.get("metadata").map(|l| format!(":{l}")).unwrap_or_default();
                    errors.push(format!("{}{line}: {:?} {}/{}: {e}", file.display(), m.kind(), m.namespace, m.name));
                }
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

/// `test`: exit 0 when every case passes, 1 when one fails, 2 when a suite cannot be run.
fn test(policy: &admission::Policy, files: &[PathBuf], update: bool) -> anyhow::Result<()> {
    let (mut passed, mut failed, mut invalid) = (0, 0, 0);
    let mut out = std::io::stdout().lock();
    for file in files {
        let prefix = if files.len() > 1 { format!("{}: ", file.display()) } else { String::new() };
        let results = match crate::suite::load(file).and_then(|suite| suite.run(policy, update)) {
            Ok(results) => results,
            Err(e) => {
                invalid += 1;
                eprintln!("error: {e}");
                continue;
            }
        };
        for case in results {
            let verdict = if case.passed() { "PASS" } else { "FAIL" };
            writeln!(out, "{verdict} {prefix}{}", case.name)?;
            for failure in &case.failures {
                for line in failure.lines() {
                    writeln!(out, "    {line}")?;
                }
            }
            if let Some(path) = &case.written {
                writeln!(out, "    wrote {}", path.display())?;
            }
            if case.passed() {
                passed += 1;
            } else {
                failed += 1;
            }
        }
    }
    let invalid_note = if invalid > 0 { format!(", {invalid} invalid suite(s)") } else { String::new() };
    writeln!(out, "{passed} passed, {failed} failed{invalid_note}")?;
    out.flush()?;
    match (invalid, failed) {
        (0, 0) => Ok(()),
        (0, _) => std::process::exit(1),
        _ => std::process::exit(2),
    }
}
