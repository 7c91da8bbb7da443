//! The in-cluster template source: kube-runtime reflectors over the ConfigMaps and the
//! PodTemplates carrying the source label, cluster-wide or in the watched namespaces plus the
//! platform namespace. Templates are parsed on watch events; admissions read the published index
//! and make no API call.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::stream::BoxStream;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplate};
use k8s_openapi::NamespaceResourceScope;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::{Catalog, Lookup, ParseProblem, StoreStats, TemplateIndex, TemplateStore};
use crate::metrics::Metrics;
use crate::names::Names;
use crate::supervise::{supervise, Fatal, Supervision};
use crate::template::{Mode, SourceKind, SourceObject, TemplateError};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The cause is in the message and is not also a `source`, so a chain prints it once.
    #[error("cannot build a Kubernetes client (kubeconfig or in-cluster config): {0}")]
    Client(kube::Error),
    #[error("cannot read the kubeconfig: {0}")]
    Config(String),
}

impl From<kube::Error> for ClusterError {
    fn from(e: kube::Error) -> Self {
        ClusterError::Client(e)
    }
}

/// Templates from the cluster, kept current by a watch.
pub struct ClusterStore {
    index: ArcSwap<TemplateIndex>,
    synced: AtomicBool,
}

impl ClusterStore {
    /// Connects with the default client (kubeconfig, else in-cluster) and starts watching.
    pub async fn start(
        names: &Names,
        watch_namespaces: &[String],
        metrics: Arc<Metrics>,
        fatal: Fatal,
    ) -> Result<Arc<Self>, ClusterError> {
        let client = Client::try_default().await?;
        Ok(Self::spawn_with(client, names.clone(), watch_namespaces, metrics, fatal))
    }

    /// Starts watching with `client`; the store is ready once every initial list is applied.
    pub fn spawn(client: Client, names: Names, watch_namespaces: &[String], metrics: Arc<Metrics>) -> Arc<Self> {
        Self::spawn_with(client, names, watch_namespaces, metrics, Fatal::default())
    }

    /// [`ClusterStore::spawn`], raising `fatal` when the watch keeps stopping.
    pub fn spawn_with(
        client: Client,
        names: Names,
        watch_namespaces: &[String],
        metrics: Arc<Metrics>,
        fatal: Fatal,
    ) -> Arc<Self> {
        let store = Arc::new(ClusterStore { index: ArcSwap::default(), synced: AtomicBool::new(false) });
        let scopes = scopes(&names, watch_namespaces);
        let watched = store.clone();
        let (m, state) = (metrics.clone(), store.clone());
        let run = move || watch(watched.clone(), client.clone(), names.clone(), scopes.clone(), metrics.clone());
        let on_state = move |running: bool| {
            m.template_watch(running);
            if !running {
                // Not ready until the restarted watch has listed everything again; admissions
                // keep the last index meanwhile.
                state.synced.store(false, Ordering::Release);
            }
        };
        let give_up = move || {
            tracing::error!(
                "the template watch keeps stopping; draining, then exiting for the kubelet to restart the process"
            );
            fatal.raise("template watch");
        };
        tokio::spawn(supervise("template watch", run, Supervision::default(), on_state, give_up));
        store
    }
}

impl ClusterStore {
    /// The index published last.
    pub fn current(&self) -> Arc<TemplateIndex> {
        self.index.load_full()
    }
}

impl TemplateStore for ClusterStore {
    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        self.index.load().lookup(namespace, name)
    }

    fn lookup_shadow(&self, namespace: &str, name: &str) -> Option<Arc<super::TemplateEntry>> {
        self.index.load().lookup_shadow(namespace, name)
    }

    fn snapshot(&self) -> super::Snapshot<'_> {
        super::Snapshot::Current(self.current())
    }

    fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn stats(&self) -> StoreStats {
        self.index.load().stats()
    }
}

/// A client as `serve` makes one (`KUBECONFIG` or `~/.kube/config`, else the in-cluster
/// config), or from an explicit kubeconfig file and context (the read-only commands' flags).
pub async fn client(kubeconfig: Option<&std::path::Path>, context: Option<&str>) -> Result<Client, ClusterError> {
    let Some(path) = kubeconfig else {
        if context.is_none() {
            return Ok(Client::try_default().await?);
        }
        let options = kube::config::KubeConfigOptions { context: context.map(str::to_owned), ..Default::default() };
        let config = kube::Config::from_kubeconfig(&options).await.map_err(|e| ClusterError::Config(e.to_string()))?;
        return Ok(Client::try_from(config)?);
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| ClusterError::Config(format!("{}: {e}", path.display())))?;
    let options = kube::config::KubeConfigOptions { context: context.map(str::to_owned), ..Default::default() };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| ClusterError::Config(format!("{}: {e}", path.display())))?;
    Ok(Client::try_from(config)?)
}

/// The templates of the cluster as a watch would load them, read once in pages and never
/// watched: for the read-only commands (`audit`, `explain`), which must not publish Events.
/// `namespaces` empty: every namespace; else those plus the platform namespace.
pub async fn load_once(client: &Client, names: &Names, namespaces: &[String]) -> Result<TemplateIndex, kube::Error> {
    let mut catalog = Catalog::new(names.platform_namespace.clone());
    for scope in scopes(names, namespaces) {
        list_into::<ConfigMap>(client, names, scope.as_deref(), &mut catalog).await?;
        list_into::<PodTemplate>(client, names, scope.as_deref(), &mut catalog).await?;
    }
    Ok(catalog.index())
}

async fn list_into<K: SourceResource>(
    client: &Client,
    names: &Names,
    scope: Option<&str>,
    catalog: &mut Catalog,
) -> Result<(), kube::Error> {
    let api: Api<K> = match scope {
        None => Api::all(client.clone()),
        Some(ns) => Api::namespaced(client.clone(), ns),
    };
    let mut params = kube::api::ListParams::default().labels(&format!("{}=true", names.source_label)).limit(500);
    loop {
        let page = api.list(&params).await?;
        for object in &page.items {
            for problem in object.apply_to(catalog, names) {
                tracing::warn!(problem = %problem, "template did not parse");
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(()),
        }
    }
}

/// The scopes to read: `None` for the whole cluster, else each namespace once, the platform
/// namespace included.
fn scopes(names: &Names, namespaces: &[String]) -> Vec<Option<String>> {
    if namespaces.is_empty() {
        return vec![None];
    }
    let mut namespaces: Vec<String> = namespaces.to_vec();
    namespaces.push(names.platform_namespace.clone());
    namespaces.sort();
    namespaces.dedup();
    namespaces.into_iter().map(Some).collect()
}

/// A kind of template source object the store watches.
trait SourceResource:
    Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: SourceKind;
    /// Adds or replaces the object in the catalog; returns what did not parse.
    fn apply_to(&self, catalog: &mut Catalog, names: &Names) -> Vec<ParseProblem>;

    /// The object's mode (§10), from its annotation.
    fn mode(&self, names: &Names) -> Result<Mode, TemplateError> {
        Mode::read(&names.mode_annotation, self.annotations().get(&names.mode_annotation).map(String::as_str))
    }
}

impl SourceResource for ConfigMap {
    const KIND: SourceKind = SourceKind::ConfigMap;

    fn apply_to(&self, catalog: &mut Catalog, names: &Names) -> Vec<ParseProblem> {
        let data = self.data.clone().unwrap_or_default();
        catalog.apply_source(
            &self.namespace().unwrap_or_default(),
            &self.name_any(),
            self.resource_version().as_deref(),
            SourceObject::ConfigMap(&data),
            self.mode(names),
        )
    }
}

impl SourceResource for PodTemplate {
    const KIND: SourceKind = SourceKind::PodTemplate;

    fn apply_to(&self, catalog: &mut Catalog, names: &Names) -> Vec<ParseProblem> {
        let object = serde_json::to_value(self).expect("a PodTemplate always serializes");
        let name = self.name_any();
        catalog.apply_source(
            &self.namespace().unwrap_or_default(),
            &name,
            self.resource_version().as_deref(),
            SourceObject::PodTemplate { name: &name, object: &object },
            self.mode(names),
        )
    }
}

/// The watches of one kind: a reflector per scope, its events tagged with the scope's index.
struct Watches<K: SourceResource> {
    readers: Vec<reflector::Store<K>>,
    synced: Vec<bool>,
}

type Tagged<K> = (usize, Result<Event<K>, watcher::Error>);

impl<K: SourceResource> Watches<K> {
    fn start(
        client: &Client,
        scopes: &[Option<String>],
        config: &watcher::Config,
    ) -> (Self, BoxStream<'static, Tagged<K>>) {
        let mut readers = Vec::new();
        let mut streams = Vec::new();
        for (i, scope) in scopes.iter().enumerate() {
            let api: Api<K> = match scope {
                None => Api::all(client.clone()),
                Some(ns) => Api::namespaced(client.clone(), ns),
            };
            let (reader, writer) = reflector::store();
            readers.push(reader);
            // Backoff on errors: when the API server goes away the cache keeps serving, and the
            // watch resumes (relisting if needed) when it returns.
            let events = reflector::reflector(writer, watcher::watcher(api, config.clone()).default_backoff());
            streams.push(events.map(move |e| (i, e)).boxed());
        }
        let watches = Watches { readers, synced: vec![false; scopes.len()] };
        (watches, futures::stream::select_all(streams).boxed())
    }

    /// Applies one watch event; true when the catalog may have changed.
    fn handle(
        &mut self,
        (i, event): Tagged<K>,
        scopes: &[Option<String>],
        names: &Names,
        catalog: &mut Catalog,
        recorder: &Recorder,
        metrics: &Metrics,
    ) -> bool {
        match event {
            Ok(Event::Apply(object) | Event::InitApply(object)) => {
                let problems = object.apply_to(catalog, names);
                report(&problems, object.object_ref(&()), recorder, metrics);
                true
            }
            Ok(Event::Delete(object)) => {
                catalog.remove_source(K::KIND, &object.namespace().unwrap_or_default(), &object.name_any())
            }
            Ok(Event::Init) => false,
            Ok(Event::InitDone) => {
                // A relist: objects deleted while the watch was down are gone from the reflector.
                let present: HashSet<ObjectRef<K>> =
                    self.readers[i].state().iter().map(|o| ObjectRef::from_obj(&**o)).collect();
                catalog.retain(K::KIND, scopes[i].as_deref(), |ns, name| {
                    present.contains(&ObjectRef::new(name).within(ns))
                });
                self.synced[i] = true;
                true
            }
            Err(e) => {
                metrics.template_watch_error();
                let namespace = scopes[i].as_deref().unwrap_or("(all)");
                tracing::warn!(error = %e, kind = ?K::KIND, namespace, "template watch failed; serving from cache, retrying with backoff");
                false
            }
        }
    }

    fn synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }
}

/// A watch event of either kind. One is in flight at a time: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Update {
    ConfigMap(Tagged<ConfigMap>),
    PodTemplate(Tagged<PodTemplate>),
}

/// The single writer: applies watch events to the catalog and publishes a new index. Ready once
/// the initial lists of both kinds, in every scope, are applied.
async fn watch(
    store: Arc<ClusterStore>,
    client: Client,
    names: Names,
    scopes: Vec<Option<String>>,
    metrics: Arc<Metrics>,
) {
    let config = watcher::Config::default().labels(&format!("{}=true", names.source_label));
    let (mut config_maps, cm_events) = Watches::<ConfigMap>::start(&client, &scopes, &config);
    let (mut pod_templates, pt_events) = Watches::<PodTemplate>::start(&client, &scopes, &config);
    let mut events = futures::stream::select(cm_events.map(Update::ConfigMap), pt_events.map(Update::PodTemplate));
    let recorder = Recorder::new(
        client,
        Reporter { controller: "pod-template-webhook".into(), instance: std::env::var("POD_NAME").ok() },
    );
    let mut catalog = Catalog::new(names.platform_namespace.clone());
    while let Some(update) = events.next().await {
        let changed = match update {
            Update::ConfigMap(event) => config_maps.handle(event, &scopes, &names, &mut catalog, &recorder, &metrics),
            Update::PodTemplate(event) => {
                pod_templates.handle(event, &scopes, &names, &mut catalog, &recorder, &metrics)
            }
        };
        if changed && config_maps.synced() && pod_templates.synced() {
            store.index.store(Arc::new(catalog.index()));
            metrics.templates_reloaded(0);
            if !store.synced.swap(true, Ordering::AcqRel) {
                let stats = store.stats();
                tracing::info!(
                    templates = stats.templates,
                    errors = stats.errors,
                    "initial template lists applied; ready"
                );
            }
        }
    }
}

/// Logs, counts and publishes an Event on the source object (ConfigMap or PodTemplate) for each
/// template that did not parse.
fn report(
    problems: &[ParseProblem],
    reference: k8s_openapi::api::core::v1::ObjectReference,
    recorder: &Recorder,
    metrics: &Metrics,
) {
    if problems.is_empty() {
        return;
    }
    metrics.templates_reloaded(problems.len());
    for problem in problems {
        tracing::error!(problem = %problem, "template did not parse");
        let what = match problem.source.kind {
            SourceKind::ConfigMap => format!("key {:?}", problem.source.key),
            SourceKind::PodTemplate => "the template".to_owned(),
        };
        let note = if problem.stale {
            format!("{what} does not parse, the last good version keeps serving: {}", problem.error)
        } else {
            format!("{what} does not parse; pods that use it are refused: {}", problem.error)
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "TemplateParseError".into(),
            // The API server caps an Event note at 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: "LoadTemplate".into(),
            secondary: None,
        };
        let (recorder, reference) = (recorder.clone(), reference.clone());
        let object = format!("{} {}", problem.source.describe(), problem.source.version);
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, object, "cannot publish the Event for a template parse error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_error_names_its_cause_once() {
        let cause = serde_json::from_str::<u8>("x").unwrap_err();
        let err = ClusterError::from(kube::Error::SerdeError(cause));
        assert!(std::error::Error::source(&err).is_none(), "the cause is in the message, not also a source");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(chain.matches("expected value").count(), 1, "{chain}");
        assert!(chain.starts_with("cannot build a Kubernetes client"), "{chain}");
    }
}
