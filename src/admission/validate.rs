//! `POST /validate`: template sources refused at apply time when their templates do not parse.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Decision, OnProblem, Refusal, Request};
use crate::names::Names;

/// A string at `object.metadata.<field>.<key>`.
fn meta_str<'a>(object: &'a Value, field: &str, key: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.get(key)?.as_str()
}

/// The validating webhook for template sources (`POST /validate`): a labelled ConfigMap or
/// PodTemplate whose templates do not parse is refused at apply time, naming each template and
/// its error.
pub fn validate_templates(req: &Request, names: &Names) -> Decision {
    use crate::template::SourceKind;
    use crate::template::SourceObject;
    let mut decision = Decision::unchanged(req);
    let kind = match (req.resource.group.as_str(), req.resource.resource.as_str(), &req.sub_resource) {
        ("", "configmaps", None) => SourceKind::ConfigMap,
        ("", "podtemplates", None) => SourceKind::PodTemplate,
        _ => return decision,
    };
    let Some(raw) = req.object.as_ref() else {
        return decision;
    };
    // parse_review already checked the body; an object that still cannot be read is refused,
    // never waved through unvalidated.
    let object = match serde_json::from_str::<Value>(raw.get()) {
        Ok(object) => object,
        Err(e) => {
            let message = format!("cannot read the {} object: {e}", req.resource.resource);
            return Refusal::new(OnProblem::Deny, 400, "BadRequest", message).apply(decision);
        }
    };
    let labelled = meta_str(&object, "labels", &names.source_label) == Some("true");
    if !labelled || !matches!(req.operation.as_str(), "CREATE" | "UPDATE") {
        return decision;
    }
    let name = object.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or(&req.name);
    let data: BTreeMap<String, String>;
    let source = match kind {
        SourceKind::ConfigMap => {
            let pairs = object.get("data").and_then(Value::as_object).into_iter().flatten();
            data = pairs.map(|(key, text)| (key.clone(), text.as_str().unwrap_or_default().to_owned())).collect();
            SourceObject::ConfigMap(&data)
        }
        SourceKind::PodTemplate => SourceObject::PodTemplate { name, object: &object },
    };
    let mode =
        crate::template::Mode::read(&names.mode_annotation, meta_str(&object, "annotations", &names.mode_annotation));
    let errors: Vec<String> = mode
        .err()
        .map(|e| e.to_string())
        .into_iter()
        .chain(source.parse_all().into_iter().filter_map(|(key, parsed)| match kind {
            SourceKind::ConfigMap => parsed.err().map(|e| format!("key {key:?}: {e}")),
            SourceKind::PodTemplate => parsed.err().map(|e| e.to_string()),
        }))
        .collect();
    if !errors.is_empty() {
        let what = match kind {
            SourceKind::ConfigMap => "ConfigMap",
            SourceKind::PodTemplate => "PodTemplate",
        };
        let message = format!("template {what} {}/{name} does not parse: {}", decision.namespace, errors.join("; "));
        decision = Refusal::new(OnProblem::Deny, 422, "Invalid", message).apply(decision);
    }
    decision
}
