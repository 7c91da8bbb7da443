//! The local template source: a directory of ConfigMap and PodTemplate manifests (read by
//! [`crate::manifest`]), the same files that `kubectl apply -f DIR` would create, loaded once.

use std::path::Path;

use super::{Catalog, Lookup, ParseProblem, StoreStats, TemplateIndex, TemplateStore};
use crate::manifest::{read_template_sources, ManifestError, SourceManifest};
use crate::names::Names;

/// Templates loaded once from a directory.
#[derive(Debug)]
pub struct DirStore {
    index: TemplateIndex,
    /// Keys that did not parse; they stay in the index as error entries.
    pub problems: Vec<ParseProblem>,
}

impl DirStore {
    pub fn load(path: &Path, names: &Names) -> Result<Self, ManifestError> {
        let store = Self::from_sources(&read_template_sources(path, names)?, names);
        let stats = store.index.stats();
        tracing::info!(path = %path.display(), templates = stats.templates, errors = stats.errors, "templates loaded");
        Ok(store)
    }

    /// The store of template sources already read (`export-policy` reads them once for both).
    pub fn from_sources(sources: &[SourceManifest], names: &Names) -> Self {
        let mut catalog = Catalog::new(names.platform_namespace.clone());
        let mut problems = Vec::new();
        for m in sources {
            problems.extend(catalog.apply_source(&m.namespace, &m.name, None, m.source(), m.mode(names)));
        }
        for p in &problems {
            tracing::error!(problem = %p, "template did not parse");
        }
        DirStore { index: catalog.index(), problems }
    }
}

impl TemplateStore for DirStore {
    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        self.index.lookup(namespace, name)
    }

    fn lookup_shadow(&self, namespace: &str, name: &str) -> Option<std::sync::Arc<super::TemplateEntry>> {
        self.index.lookup_shadow(namespace, name)
    }

    fn snapshot(&self) -> super::Snapshot<'_> {
        super::Snapshot::Fixed(&self.index)
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn stats(&self) -> StoreStats {
        self.index.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::*;
    use crate::store::EntryState;

    #[test]
    fn an_unreadable_path_names_its_cause_once() {
        let err = DirStore::load(Path::new("/nonexistent/templates"), &Names::default()).unwrap_err();
        assert!(std::error::Error::source(&err).is_none(), "the cause is in the message, not also a source");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(chain.matches("No such file or directory").count(), 1, "{chain}");
        assert!(chain.starts_with("cannot read /nonexistent/templates: "), "{chain}");
    }

    #[test]
    fn reads_multi_document_files_with_namespace_and_label_rules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: one, labels: {flyte.org/pod-templates: \"true\"}}\ndata: {t1: '{}'}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: two, namespace: team}\ndata: {t2: '{}'}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.json"),
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"three","namespace":"team","labels":{"flyte.org/pod-templates":"true"}},"data":{"t3":"{}"}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let found = read_template_sources(dir.path(), &Names::default()).unwrap();
        let ids: Vec<_> = found.iter().map(|c| format!("{}/{}", c.namespace, c.name)).collect();
        assert_eq!(ids, ["flyte/one", "team/three"], "unlabelled ConfigMaps and other kinds are skipped");

        let store = DirStore::load(dir.path(), &Names::default()).unwrap();
        assert!(store.lookup("team", "t3").entry.is_some());
        assert!(store.lookup("other", "t3").entry.is_none());
        assert!(store.lookup("other", "t1").entry.is_some());
    }

    #[test]
    fn reads_pod_template_manifests_like_config_maps() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("podtemplates.yaml"),
            "apiVersion: v1\nkind: PodTemplate\nmetadata:\n  name: gpu\n  labels: {flyte.org/pod-templates: \"true\"}\n  \
             annotations: {flyte.org/primary-container-name: main}\ntemplate:\n  metadata:\n    labels: {team: ml}\n  spec:\n    \
             containers:\n    - name: main\n      image: docker.io/rwgrim/docker-noop\n      env: [{name: A, value: b}]\n---\n\
             apiVersion: v1\nkind: PodTemplate\nmetadata: {name: unlabelled}\ntemplate: {spec: {containers: [{name: x, image: y}]}}\n---\n\
             apiVersion: v1\nkind: PodTemplate\nmetadata: {name: broken, namespace: team, labels: {flyte.org/pod-templates: \"true\"}}\n\
             template: {spec: {containers: [{name: x, image: y, evn: []}]}}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pt.json"),
            r#"{"apiVersion":"v1","kind":"PodTemplate","metadata":{"name":"tenant","namespace":"team","labels":{"flyte.org/pod-templates":"true"}},"template":{"metadata":{"labels":{"from":"json"}}}}"#,
        )
        .unwrap();
        let found = read_template_sources(dir.path(), &Names::default()).unwrap();
        let ids: Vec<_> = found.iter().map(|m| format!("{:?} {}/{}", m.kind(), m.namespace, m.name)).collect();
        assert_eq!(
            ids,
            ["PodTemplate flyte/gpu", "PodTemplate team/broken", "PodTemplate team/tenant"],
            "unlabelled ones are skipped"
        );

        let store = DirStore::load(dir.path(), &Names::default()).unwrap();
        let entry = store.lookup("other", "gpu").entry.expect("a platform PodTemplate serves every namespace");
        assert!(entry.source.to_string().starts_with("flyte/podtemplate:gpu/gpu@sha256:"), "{}", entry.source);
        let EntryState::Ready(t) = &entry.state else { panic!("{entry:?}") };
        assert_eq!((t.primary_container_name.as_str(), t.labels["team"].as_str()), ("main", "ml"));
        assert_eq!(t.pod_spec()["containers"][0]["env"][0]["name"], "A");
        assert!(store.lookup("other", "tenant").entry.is_none());
        assert!(matches!(store.lookup("team", "tenant").entry.unwrap().state, EntryState::Ready(_)));
        assert!(matches!(store.lookup("team", "broken").entry.unwrap().state, EntryState::Broken(_)), "an error entry");
        assert_eq!(store.problems.len(), 1);
        assert_eq!(
            store.problems[0].to_string(),
            "PodTemplate team/broken: template.spec.containers[0].evn: unknown field"
        );
        assert!(store.lookup("flyte", "unlabelled").entry.is_none());
        assert_eq!(store.stats(), StoreStats { templates: 2, errors: 1, stale: 0 });
    }

    #[test]
    fn a_config_map_key_wins_over_a_pod_template_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "kind: PodTemplate\nmetadata: {name: t, labels: {flyte.org/pod-templates: \"true\"}}\ntemplate: {metadata: {labels: {from: podtemplate}}}\n---\n\
             kind: ConfigMap\nmetadata: {name: z, labels: {flyte.org/pod-templates: \"true\"}}\ndata: {t: 'labels: {from: configmap}'}\n",
        )
        .unwrap();
        let store = DirStore::load(dir.path(), &Names::default()).unwrap();
        let entry = store.lookup("flyte", "t").entry.unwrap();
        assert_eq!(entry.source.object, "z");
        assert!(store.problems.is_empty());
    }

    #[test]
    fn a_pod_template_without_a_name_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.yaml"), "kind: PodTemplate\nmetadata: {labels: {a: b}}\ntemplate: {}\n")
            .unwrap();
        let err = DirStore::load(dir.path(), &Names::default()).unwrap_err().to_string();
        assert!(err.contains("x.yaml: document 1: PodTemplate without metadata.name"), "{err}");
    }

    #[test]
    fn unreadable_manifest_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.yaml"), "kind: ConfigMap\nmetadata: [\n").unwrap();
        let err = DirStore::load(dir.path(), &Names::default()).unwrap_err().to_string();
        assert!(err.ends_with("x.yaml: unclosed bracket '[' at line 2, column 11"), "{err}");
        let err = DirStore::load(&dir.path().join("missing"), &Names::default()).unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn knows_the_lines_of_data_keys_and_pod_template_fields() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        let label = "labels: {flyte.org/pod-templates: \"true\"}";
        let text = format!(
            "kind: ConfigMap\nmetadata: {{name: a, {label}}}\ndata:\n  other: |\n    mine: nested\n  mine: |\n    labels: [\n\
             ---\n# a comment\nkind: Secret\ndata: [not, a, map]\n---\n\
             kind: PodTemplate\nmetadata:\n  name: t\n  {label}\ntemplate:\n  spec: {{}}\n"
        );
        std::fs::write(&file, text).unwrap();
        let found = read_manifests(&file, "flyte").unwrap();
        let lines: Vec<_> = found.iter().map(|m| m.lines.clone().into_iter().collect::<Vec<_>>()).collect();
        assert_eq!(
            lines,
            [
                vec![("metadata".to_owned(), 2), ("mine".to_owned(), 6), ("other".to_owned(), 4)],
                vec![("metadata".to_owned(), 14), ("template".to_owned(), 17)],
            ],
            "a nested `mine:` is not the key; the Secret between them does not shift the lines"
        );
    }
}
