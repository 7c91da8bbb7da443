//! The in-cluster template source: a kube-runtime watcher per scope (cluster-wide, or each watched
//! namespace plus the platform namespace) over the ConfigMaps and the PodTemplates carrying the
//! source label. One writer applies the watch events to a [`Catalog`], parsing each template once,
//! and publishes `catalog.index()`; admissions read the published index and make no API call.
//!
//! Publishing is batched: the events ready at once (a burst of updates, a listed page) are
//! applied, then one index is published. Nothing is published while any watch lists (the first
//! list, or a relist after a watch expired with 410 Gone or failed): admissions keep the last
//! complete index, and at the list's end the objects it did not show are removed and one index is
//! published. No reflector cache: only the names a running list showed are kept, to find those
//! deletions.
use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplate};
use k8s_openapi::NamespaceResourceScope;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
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

/// How the store watches; the default is kube's.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchOptions {
    /// Seconds after which the API server ends each watch request, which the watcher then resumes
    /// from its last resourceVersion (relisting if that expired); `None`: kube's default (290).
    pub timeout_seconds: Option<u32>,
}

/// Objects per page of the store's lists (see `watch`).
const LIST_PAGE_SIZE: u32 = 100;

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
        Ok(Self::spawn_with(client, names.clone(), watch_namespaces, metrics, fatal, WatchOptions::default()))
    }

    /// Starts watching with `client`; the store is ready once every initial list is applied.
    pub fn spawn(client: Client, names: Names, watch_namespaces: &[String], metrics: Arc<Metrics>) -> Arc<Self> {
        Self::spawn_with(client, names, watch_namespaces, metrics, Fatal::default(), WatchOptions::default())
    }

    /// [`ClusterStore::spawn`], raising `fatal` when the watch keeps stopping, watching as
    /// `options` say.
    pub fn spawn_with(
        client: Client,
        names: Names,
        watch_namespaces: &[String],
        metrics: Arc<Metrics>,
        fatal: Fatal,
        options: WatchOptions,
    ) -> Arc<Self> {
        let store = Arc::new(ClusterStore { index: ArcSwap::default(), synced: AtomicBool::new(false) });
        let scopes = scopes(&names, watch_namespaces);
        let watched = store.clone();
        let (m, state) = (metrics.clone(), store.clone());
        let run =
            move || watch(watched.clone(), client.clone(), names.clone(), scopes.clone(), metrics.clone(), options);
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
    let mut params =
        kube::api::ListParams::default().labels(&format!("{}=true", names.source_label)).limit(LIST_PAGE_SIZE);
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

/// Object names by namespace.
type Seen = HashMap<String, HashSet<String>>;

/// What one watch (one kind in one scope) has listed. A list (`Init` … `InitDone`) comes first and
/// again after a watch expires (410 Gone) or fails: while it runs, the objects it shows are
/// applied over the old ones and only their names are kept, so that at its end the objects it did
/// not show (deleted meanwhile) are removed at once and the index is complete again.
#[derive(Debug, Default)]
struct ListState {
    /// While a list runs: the names of the objects it showed so far, by namespace.
    listing: Option<Seen>,
    /// A list has completed at least once.
    listed: bool,
}

impl ListState {
    /// An `Init`: a list starts (again, if one failed midway). True when it is a relist: a list
    /// completed before and the watch was running.
    fn start(&mut self) -> bool {
        let relist = self.listed && self.listing.is_none();
        self.listing = Some(Seen::new());
        relist
    }

    /// An object the running list showed.
    fn saw(&mut self, namespace: String, name: String) {
        if let Some(seen) = &mut self.listing {
            seen.entry(namespace).or_default().insert(name);
        }
    }

    /// An `InitDone`: the objects the list showed; the list is over.
    fn done(&mut self) -> Seen {
        self.listed = true;
        self.listing.take().unwrap_or_default()
    }

    /// Listed and not listing: what the catalog holds of this watch is complete.
    fn complete(&self) -> bool {
        self.listed && self.listing.is_none()
    }
}

/// Removes from `catalog` the objects of `kind` in `scope` that a list did not show.
fn remove_unseen(catalog: &mut Catalog, kind: SourceKind, scope: Option<&str>, seen: &Seen) {
    catalog.retain(kind, scope, |ns, name| seen.get(ns).is_some_and(|names| names.contains(name)));
}

/// The watches of one kind: a watcher per scope, its events tagged with the scope's index.
struct Watches<K: SourceResource> {
    lists: Vec<ListState>,
    _kind: std::marker::PhantomData<K>,
}

type Tagged<K> = (usize, Result<Event<K>, watcher::Error>);

impl<K: SourceResource> Watches<K> {
    fn start(
        client: &Client,
        scopes: &[Option<String>],
        config: &watcher::Config,
    ) -> (Self, BoxStream<'static, Tagged<K>>) {
        let mut streams = Vec::new();
        for (i, scope) in scopes.iter().enumerate() {
            let api: Api<K> = match scope {
                None => Api::all(client.clone()),
                Some(ns) => Api::namespaced(client.clone(), ns),
            };
            // No reflector: the catalog is the only copy of what was seen (a reflector would keep
            // every object whole, data and managedFields, just to find deletions after a relist).
            // Backoff on errors: when the API server goes away the cache keeps serving, and the
            // watch resumes (relisting if needed) when it returns.
            let events = watcher::watcher(api, config.clone()).default_backoff();
            streams.push(events.map(move |e| (i, e)).boxed());
        }
        let lists = scopes.iter().map(|_| ListState::default()).collect();
        (Watches { lists, _kind: std::marker::PhantomData }, futures::stream::select_all(streams).boxed())
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
        let namespace = || scopes[i].as_deref().unwrap_or("(all)");
        match event {
            Ok(Event::Apply(object) | Event::InitApply(object)) => {
                let problems = object.apply_to(catalog, names);
                report(&problems, object.object_ref(&()), recorder, metrics);
                self.lists[i].saw(object.namespace().unwrap_or_default(), object.name_any());
                true
            }
            Ok(Event::Delete(object)) => {
                catalog.remove_source(K::KIND, &object.namespace().unwrap_or_default(), &object.name_any())
            }
            Ok(Event::Init) => {
                if self.lists[i].start() {
                    metrics.template_relist(&K::kind(&()));
                    tracing::info!(kind = ?K::KIND, namespace = namespace(), "relisting the templates; the last complete index serves until the list is done");
                }
                false
            }
            Ok(Event::InitDone) => {
                // Objects deleted while the watch was down are those the list did not show.
                remove_unseen(catalog, K::KIND, scopes[i].as_deref(), &self.lists[i].done());
                true
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                metrics.template_watch_error();
                tracing::info!(kind = ?K::KIND, namespace = namespace(), message = %status.message, "template watch expired (410 Gone); relisting");
                false
            }
            Err(e) => {
                metrics.template_watch_error();
                tracing::warn!(error = %e, kind = ?K::KIND, namespace = namespace(), "template watch failed; serving from cache, retrying with backoff");
                false
            }
        }
    }

    /// Every scope listed and none relisting.
    fn complete(&self) -> bool {
        self.lists.iter().all(ListState::complete)
    }
}

/// A watch event of either kind. One is in flight at a time: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Update {
    ConfigMap(Tagged<ConfigMap>),
    PodTemplate(Tagged<PodTemplate>),
}

/// The most events applied before an index is published: a burst is one publish, and a flood
/// that never pauses still publishes now and then.
const MAX_BATCH: usize = 1024;

/// The single writer: applies watch events to the catalog and publishes a new index. Ready once
/// the initial lists of both kinds, in every scope, are applied. Publishes once per batch of the
/// events ready at once, and never while a list runs: admissions keep the last complete index.
async fn watch(
    store: Arc<ClusterStore>,
    client: Client,
    names: Names,
    scopes: Vec<Option<String>>,
    metrics: Arc<Metrics>,
    options: WatchOptions,
) {
    // Pages of 100 rather than kube's 500: a template ConfigMap can hold kilobytes per key, and a
    // page is decoded whole, so the page size is the transient memory of a list (a 500-object page
    // of 10-key ConfigMaps is ~7 MB of JSON); a few more LIST calls at start cost little.
    let mut config =
        watcher::Config::default().labels(&format!("{}=true", names.source_label)).page_size(LIST_PAGE_SIZE);
    if let Some(seconds) = options.timeout_seconds {
        config = config.timeout(seconds);
    }
    let (mut config_maps, cm_events) = Watches::<ConfigMap>::start(&client, &scopes, &config);
    let (mut pod_templates, pt_events) = Watches::<PodTemplate>::start(&client, &scopes, &config);
    let mut events = futures::stream::select(cm_events.map(Update::ConfigMap), pt_events.map(Update::PodTemplate));
    let recorder = Recorder::new(
        client,
        Reporter { controller: "pod-template-webhook".into(), instance: std::env::var("POD_NAME").ok() },
    );
    let mut catalog = Catalog::new(names.platform_namespace.clone());
    let mut changed = false;
    while let Some(first) = events.next().await {
        let (mut next, mut applied) = (Some(first), 0);
        while let Some(update) = next.take() {
            changed |= match update {
                Update::ConfigMap(event) => {
                    config_maps.handle(event, &scopes, &names, &mut catalog, &recorder, &metrics)
                }
                Update::PodTemplate(event) => {
                    pod_templates.handle(event, &scopes, &names, &mut catalog, &recorder, &metrics)
                }
            };
            applied += 1;
            // The next event if it is ready now: the rest of a burst, or of a listed page.
            if applied < MAX_BATCH {
                next = events.next().now_or_never().flatten();
            }
        }
        if changed && config_maps.complete() && pod_templates.complete() {
            changed = false;
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
    metrics.template_parse_errors(problems.len());
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

    fn names_of(seen: &Seen) -> Vec<(String, String)> {
        let mut all: Vec<_> =
            seen.iter().flat_map(|(ns, names)| names.iter().map(move |n| (ns.clone(), n.clone()))).collect();
        all.sort();
        all
    }

    #[test]
    fn the_first_list_is_not_a_relist_and_completes_the_watch() {
        let mut list = ListState::default();
        assert!(!list.complete(), "not listed yet");
        assert!(!list.start(), "the first list is not a relist");
        list.saw("a".into(), "x".into());
        assert!(!list.complete(), "listing");
        assert_eq!(names_of(&list.done()), [("a".to_owned(), "x".to_owned())]);
        assert!(list.complete());
    }

    #[test]
    fn a_relist_is_counted_once_and_keeps_only_what_its_last_attempt_showed() {
        let mut list = ListState::default();
        list.start();
        list.saw("a".into(), "old".into());
        list.done();
        // Watch events between lists are not a list's: nothing is kept.
        list.saw("a".into(), "watched".into());
        assert!(list.start(), "a list after a completed one is a relist");
        assert!(!list.complete(), "nothing publishes while it runs");
        list.saw("a".into(), "gone".into());
        // The list failed midway and starts again: the same relist, and what it showed is void.
        assert!(!list.start());
        list.saw("b".into(), "x".into());
        list.saw("a".into(), "y".into());
        let seen = list.done();
        assert_eq!(names_of(&seen), [("a".to_owned(), "y".to_owned()), ("b".to_owned(), "x".to_owned())]);
        assert!(list.complete());
    }

    #[test]
    fn a_relist_removes_what_it_did_not_show_and_only_in_its_scope() {
        use std::collections::BTreeMap;
        let data = BTreeMap::from([("t".to_owned(), "{}".to_owned())]);
        let mut catalog = Catalog::new("flyte");
        for (ns, name) in [("a", "kept"), ("a", "deleted"), ("b", "other-scope")] {
            catalog.apply(ns, name, Some("1"), &data);
        }
        let mut list = ListState::default();
        list.start();
        list.saw("a".into(), "kept".into());
        remove_unseen(&mut catalog, SourceKind::ConfigMap, Some("a"), &list.done());
        let index = catalog.index();
        assert!(index.lookup("a", "t").entry.is_some_and(|e| e.source.object == "kept"));
        assert_eq!(index.stats().templates, 2, "a/deleted is gone, b/other-scope stays");
    }
}
