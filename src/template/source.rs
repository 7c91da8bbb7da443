//! Template sources (SPEC §3, §8): the objects that carry templates — a ConfigMap whose data keys
//! are templates, or a core/v1 `PodTemplate` object that is one — and the one place that turns
//! such an object into parsed entries. The store, `POST /validate` and the `validate` command all
//! read a source through [`SourceObject::entries`].

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::podtemplate::parse_pod_template_object;
use super::{Mode, PodTemplate, SourceKind, TemplateError, TemplateSource};

/// A template source object, borrowed from wherever it was read.
#[derive(Debug, Clone, Copy)]
pub enum SourceObject<'a> {
    /// The data of a ConfigMap carrying the source label: each key is a template.
    ConfigMap(&'a BTreeMap<String, String>),
    /// A PodTemplate object carrying the source label, as JSON (a manifest, an AdmissionReview
    /// object, or the watched object serialized): one template named `name`.
    PodTemplate { name: &'a str, object: &'a Value },
}

/// One template of a source: its name, parsed on demand so that a store can skip what it has
/// already parsed (SPEC §3: parsed once, when its source is seen).
#[derive(Debug, Clone, Copy)]
pub struct SourceEntry<'a> {
    pub name: &'a str,
    content: Content<'a>,
}

#[derive(Debug, Clone, Copy)]
enum Content<'a> {
    Text(&'a str),
    PodTemplate(&'a Value),
}

impl<'a> SourceObject<'a> {
    pub fn kind(&self) -> SourceKind {
        match self {
            SourceObject::ConfigMap(_) => SourceKind::ConfigMap,
            SourceObject::PodTemplate { .. } => SourceKind::PodTemplate,
        }
    }

    /// The templates this object carries, in name order; nothing is parsed yet.
    pub fn entries(&self) -> Vec<SourceEntry<'a>> {
        match *self {
            SourceObject::ConfigMap(data) => {
                data.iter().map(|(key, text)| SourceEntry { name: key, content: Content::Text(text) }).collect()
            }
            SourceObject::PodTemplate { name, object } => {
                vec![SourceEntry { name, content: Content::PodTemplate(object) }]
            }
        }
    }

    /// Every template of the object, parsed: what `/validate` and `validate` check.
    pub fn parse_all(&self) -> Vec<(String, Result<PodTemplate, TemplateError>)> {
        self.entries().into_iter().map(|e| (e.name.to_owned(), e.parse())).collect()
    }
}

impl SourceEntry<'_> {
    /// Parses and validates the template.
    pub fn parse(&self) -> Result<PodTemplate, TemplateError> {
        match self.content {
            Content::Text(text) => PodTemplate::parse(text),
            Content::PodTemplate(object) => parse_pod_template_object(object),
        }
    }

    /// Where this entry comes from: object `object` of `kind` in `namespace`, at `version` (the
    /// object's resourceVersion), else at the hash of its content (a template read from a file).
    pub fn source(&self, kind: SourceKind, namespace: &str, object: &str, version: Option<&str>) -> TemplateSource {
        TemplateSource {
            kind,
            namespace: namespace.to_owned(),
            object: object.to_owned(),
            key: self.name.to_owned(),
            version: version.map_or_else(|| self.content_hash(), str::to_owned),
            mode: Mode::Enforce,
        }
    }

    /// The version of a template read from a file: a hash of what it was parsed from.
    pub fn content_hash(&self) -> String {
        match self.content {
            Content::Text(text) => content_hash(text),
            // The whole object: its template and the primary container annotation.
            Content::PodTemplate(object) => content_hash(&object.to_string()),
        }
    }
}

/// A short, stable content hash: the version of a template read from a file.
pub fn content_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::super::podtemplate::{is_dns_label, PRIMARY_CONTAINER_ANNOTATION};
    use super::*;
    use serde_json::json;

    fn pod_template(name: &str, object: &Value) -> Result<PodTemplate, TemplateError> {
        let entries = SourceObject::PodTemplate { name, object }.parse_all();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0, name);
        entries.into_iter().next().unwrap().1
    }

    #[test]
    fn config_map_keys_are_entries_in_name_order() {
        let data =
            BTreeMap::from([("b".to_owned(), "podspec: {}".to_owned()), ("a".to_owned(), "labels: {x: y}".to_owned())]);
        let source = SourceObject::ConfigMap(&data);
        assert_eq!(source.kind(), SourceKind::ConfigMap);
        let parsed = source.parse_all();
        assert_eq!(parsed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(parsed[0].1.as_ref().unwrap().labels["x"], "y");
        assert!(parsed[1].1.as_ref().unwrap_err().to_string().contains("unknown field `podspec`"));
        assert_eq!(source.entries()[0].content_hash(), content_hash("labels: {x: y}"));
    }

    #[test]
    fn a_pod_template_object_is_one_template() {
        let object = json!({
            "apiVersion": "v1", "kind": "PodTemplate",
            "metadata": {"name": "gpu", "annotations": {PRIMARY_CONTAINER_ANNOTATION: "main", "other": "x"}},
            "template": {
                "metadata": {"labels": {"team": "ml"}, "annotations": {"cost-center": "42"}},
                "spec": {"containers": [{"name": "main", "image": "x:1", "env": [{"name": "A", "value": "b"}],
                         "resources": {"limits": {"nvidia.com/gpu": 1}}}]}
            }
        });
        assert_eq!(SourceObject::PodTemplate { name: "gpu", object: &object }.kind(), SourceKind::PodTemplate);
        let t = pod_template("gpu", &object).unwrap();
        assert_eq!(t.primary_container_name, "main");
        assert!(t.primary_container_name_set);
        assert_eq!(t.labels, BTreeMap::from([("team".to_owned(), "ml".to_owned())]));
        assert_eq!(t.annotations, BTreeMap::from([("cost-center".to_owned(), "42".to_owned())]));
        assert_eq!(t.pod_spec()["containers"][0]["env"][0]["value"], "b");
        assert_eq!(t.pod_spec()["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], "1");
    }

    #[test]
    fn without_the_annotation_the_primary_container_is_primary() {
        for annotations in [json!(null), json!({}), json!({PRIMARY_CONTAINER_ANNOTATION: ""})] {
            let object = json!({"metadata": {"name": "t", "annotations": annotations}, "template": {"spec": {}}});
            let t = pod_template("t", &object).unwrap();
            assert_eq!(t.primary_container_name, "primary");
            assert!(!t.primary_container_name_set);
            assert!(t.pod_spec().is_empty() && t.labels.is_empty());
        }
        let empty = pod_template("t", &json!({"template": {}})).unwrap();
        assert!(empty.pod_spec().is_empty());
    }

    #[test]
    fn the_spec_is_validated_like_a_config_map_podspec_with_its_path_in_the_object() {
        let err = |template: Value| pod_template("t", &json!({"template": template})).unwrap_err().to_string();
        assert_eq!(
            err(json!({"spec": {"containers": [{"name": "p", "evn": []}]}})),
            "template.spec.containers[0].evn: unknown field"
        );
        assert!(err(json!({"spec": {"containers": [{"name": "p", "env": {"a": "b"}}]}}))
            .starts_with("template.spec.containers[0].env:"));
        assert!(err(json!({"spec": {"containers": [{"image": "x"}]}})).contains("template.spec.containers[0].name"));
        assert!(err(json!({"spec": {"initContainers": [{"name": "a"}, {"name": "a"}]}}))
            .contains("duplicate container name"));
        assert_eq!(err(json!({"spec": [1]})), "template.spec: must be a mapping");
        assert_eq!(err(json!({"sepc": {}})), "template.sepc: unknown field");
        let meta = err(json!({"metadata": {"lables": {"a": "b"}}}));
        assert!(meta.starts_with("template.metadata.lables: unknown field `lables`"), "{meta}");
        let meta = err(json!({"metadata": {"labels": {"a": 1}}}));
        assert!(meta.starts_with("template.metadata.labels.a: invalid type"), "{meta}");
        assert!(pod_template("t", &json!({"template": {"metadata": {"name": "ignored", "creationTimestamp": null}}}))
            .is_ok());
    }

    #[test]
    fn a_pod_template_needs_its_template_and_a_valid_primary_name() {
        let err = |object: Value| pod_template("t", &object).unwrap_err().to_string();
        assert!(err(json!({"metadata": {"name": "t"}})).starts_with("template: missing"));
        assert_eq!(err(json!({"template": "x"})), "template: must be a mapping");
        let bad =
            err(json!({"metadata": {"annotations": {PRIMARY_CONTAINER_ANNOTATION: "Main_Container"}}, "template": {}}));
        assert!(bad.starts_with("metadata.annotations[flyte.org/primary-container-name]: \"Main_Container\" is not a valid container name"), "{bad}");
        let bad = err(json!({"metadata": {"annotations": {PRIMARY_CONTAINER_ANNOTATION: 5}}, "template": {}}));
        assert!(bad.ends_with("must be a string"), "{bad}");
    }

    #[test]
    fn values_the_api_server_defaults_are_dropped() {
        // A Flyte PodTemplate as `kubectl get podtemplate -o json` returns it.
        let object = json!({"template": {"spec": {
            "containers": [{
                "name": "default", "image": "docker.io/rwgrim/docker-noop", "imagePullPolicy": "Always",
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "readinessProbe": {"exec": {"command": ["true"]}, "timeoutSeconds": 1, "periodSeconds": 10,
                                   "successThreshold": 1, "failureThreshold": 5},
            }, {
                "name": "sidecar", "image": "proxy:1.2", "imagePullPolicy": "Always",
            }],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "securityContext": {}, "schedulerName": "default-scheduler", "enableServiceLinks": true,
            "nodeSelector": {"gpu": "a100"},
        }}});
        let t = pod_template("t", &object).unwrap();
        assert_eq!(
            Value::Object(t.pod_spec()),
            json!({
                "containers": [
                    {"name": "default", "image": "docker.io/rwgrim/docker-noop",
                     "readinessProbe": {"exec": {"command": ["true"]}, "failureThreshold": 5}},
                    {"name": "sidecar", "image": "proxy:1.2", "imagePullPolicy": "Always"},
                ],
                "nodeSelector": {"gpu": "a100"},
            }),
            "chosen values stay: a non-default probe threshold, Always for a tagged image"
        );
        let chosen =
            json!({"template": {"spec": {"restartPolicy": "OnFailure", "securityContext": {"runAsNonRoot": true}}}});
        let t = pod_template("t", &chosen).unwrap();
        assert_eq!(t.pod_spec()["restartPolicy"], "OnFailure");
        assert_eq!(t.pod_spec()["securityContext"]["runAsNonRoot"], true);
    }

    #[test]
    fn dns_labels() {
        for ok in ["primary", "a", "main-2", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["Main", "a_b", "-a", "a-", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
