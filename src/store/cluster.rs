//! The in-cluster template source: a kube-runtime reflector over ConfigMaps carrying the source
//! label, cluster-wide or in the watched namespaces plus the platform namespace. Templates are
//! parsed on watch events; admissions read the published index and make no API call.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};

use super::{Catalog, Lookup, ParseProblem, StoreStats, TemplateIndex, TemplateStore};
use crate::metrics::Metrics;
use crate::names::Names;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot build a Kubernetes client (kubeconfig or in-cluster config): {0}")]
    Client(#[from] kube::Error),
}

/// Templates from the cluster, kept current by a watch.
pub struct ClusterStore {
    index: ArcSwap<TemplateIndex>,
    synced: AtomicBool,
}

impl ClusterStore {
    /// Connects with the default client (kubeconfig, else in-cluster) and starts watching.
    pub async fn start(names: &Names, watch_namespaces: &[String], metrics: Arc<Metrics>) -> Result<Arc<Self>, ClusterError> {
        let client = Client::try_default().await?;
        Ok(Self::spawn(client, names.clone(), watch_namespaces, metrics))
    }

    /// Starts watching with `client`; the store is ready once every initial list is applied.
    pub fn spawn(client: Client, names: Names, watch_namespaces: &[String], metrics: Arc<Metrics>) -> Arc<Self> {
        let store = Arc::new(ClusterStore { index: ArcSwap::default(), synced: AtomicBool::new(false) });
        let scopes: Vec<Option<String>> = if watch_namespaces.is_empty() {
            vec![None]
        } else {
            let mut namespaces: Vec<String> = watch_namespaces.to_vec();
            namespaces.push(names.platform_namespace.clone());
            namespaces.sort();
            namespaces.dedup();
            namespaces.into_iter().map(Some).collect()
        };
        tokio::spawn(watch(store.clone(), client, names, scopes, metrics));
        store
    }
}

impl TemplateStore for ClusterStore {
    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        self.index.load().lookup(namespace, name)
    }

    fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn stats(&self) -> StoreStats {
        self.index.load().stats()
    }
}

/// The single writer: applies watch events to the catalog and publishes a new index.
async fn watch(store: Arc<ClusterStore>, client: Client, names: Names, scopes: Vec<Option<String>>, metrics: Arc<Metrics>) {
    let config = watcher::Config::default().labels(&format!("{}=true", names.source_label));
    let mut readers = Vec::new();
    let mut streams = Vec::new();
    for (i, scope) in scopes.iter().enumerate() {
        let api: Api<ConfigMap> = match scope {
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
    let recorder = Recorder::new(client, Reporter {
        controller: "pod-template-webhook".into(),
        instance: std::env::var("POD_NAME").ok(),
    });
    let mut events = futures::stream::select_all(streams);
    let mut catalog = Catalog::new(names.platform_namespace.clone());
    let mut synced = vec![false; scopes.len()];
    while let Some((i, event)) = events.next().await {
        let changed = match event {
            Ok(Event::Apply(cm) | Event::InitApply(cm)) => {
                let problems = catalog.apply(
                    &cm.namespace().unwrap_or_default(),
                    &cm.name_any(),
                    cm.resource_version().as_deref(),
                    &cm.data.clone().unwrap_or_default(),
                );
                report(&problems, &cm, &recorder, &metrics);
                true
            }
            Ok(Event::Delete(cm)) => catalog.remove(&cm.namespace().unwrap_or_default(), &cm.name_any()),
            Ok(Event::Init) => false,
            Ok(Event::InitDone) => {
                // A relist: ConfigMaps deleted while the watch was down are gone from the reflector.
                let present: HashSet<ObjectRef<ConfigMap>> = readers[i].state().iter().map(|cm| ObjectRef::from_obj(&**cm)).collect();
                catalog.retain(scopes[i].as_deref(), |ns, name| present.contains(&ObjectRef::new(name).within(ns)));
                synced[i] = true;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "ConfigMap watch failed; serving from cache, retrying with backoff");
                false
            }
        };
        let all_synced = synced.iter().all(|s| *s);
        if changed && all_synced {
            store.index.store(Arc::new(catalog.index()));
            metrics.templates_reloaded(0);
            if !store.synced.swap(true, Ordering::AcqRel) {
                let stats = store.stats();
                tracing::info!(templates = stats.templates, errors = stats.errors, "initial template list applied; ready");
            }
        }
    }
}

/// Logs, counts and publishes an Event on the ConfigMap for each key that did not parse.
fn report(problems: &[ParseProblem], cm: &ConfigMap, recorder: &Recorder, metrics: &Metrics) {
    if problems.is_empty() {
        return;
    }
    metrics.templates_reloaded(problems.len());
    let reference = cm.object_ref(&());
    for problem in problems {
        tracing::error!(problem = %problem, "template did not parse");
        let note = if problem.stale {
            format!("key {:?} does not parse, the last good version keeps serving: {}", problem.key, problem.error)
        } else {
            format!("key {:?} does not parse; pods that use it are refused: {}", problem.key, problem.error)
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
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, "cannot publish the Event for a template parse error");
            }
        });
    }
}
