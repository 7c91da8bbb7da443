//! The properties the fuzz targets check, shared with `tests/fuzz_corpus.rs`, which replays the
//! seed corpus on stable Rust in every test run.

use std::sync::OnceLock;

use pod_template_webhook::admission::{mutate, parse_review, response_body, Policy};
use pod_template_webhook::merge::{compose, merge_pod, Layer, Role};
use pod_template_webhook::names::Names;
use pod_template_webhook::store::dir::DirStore;
use pod_template_webhook::template::PodTemplate;
use serde_json::Value;

fn store() -> &'static DirStore {
    static STORE: OnceLock<DirStore> = OnceLock::new();
    STORE.get_or_init(|| {
        // Built as the fuzz crate (fuzz/) or included by the main crate's test (the root).
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = [root.join("examples/templates"), root.join("../examples/templates")]
            .into_iter()
            .find(|d| d.is_dir())
            .unwrap();
        DirStore::load(&dir, &Names::default()).unwrap()
    })
}

/// Any bytes as an AdmissionReview body: an error or a response, and a patch that applies —
/// with the example templates alone, and with `hello_world` as the default template under them.
pub fn review(data: &[u8]) {
    let with_default = Policy { default_template: Some("hello_world".into()), ..Policy::default() };
    for policy in [Policy::default(), with_default] {
        let Ok(req) = parse_review(data) else { return };
        let object: Option<Value> = req.object.as_ref().and_then(|o| serde_json::from_str(o.get()).ok());
        let Ok(decision) = mutate(req, store(), &policy) else { return };
        let body = response_body(&decision);
        assert!(serde_json::from_slice::<Value>(&body).is_ok());
        if let (Some(patch), Some(object)) = (&decision.response.patch, object) {
            let patch: json_patch::Patch = serde_json::from_slice(patch).unwrap();
            let mut pod = object;
            if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("managedFields");
            }
            json_patch::patch(&mut pod, &patch).expect("the patch applies to the object");
        }
    }
}

/// Any text as a template: parsed or refused, never a panic.
pub fn template(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = PodTemplate::parse(text);
    }
}

/// `<pod JSON>\0<template>[\0<template>…]`: the layers (the first a default when there are
/// several) composed and merged; the patch turns the pod into the merge, and merging is
/// idempotent.
pub fn merge_patch(data: &[u8]) {
    let mut parts = data.split(|b| *b == 0);
    let Some(Ok(pod)) = parts.next().map(serde_json::from_slice::<Value>) else { return };
    let mut templates = Vec::new();
    for part in parts.take(4) {
        let Ok(text) = std::str::from_utf8(part) else { return };
        let Ok(template) = PodTemplate::parse(text) else { return };
        templates.push(template);
    }
    if templates.is_empty() {
        return;
    }
    let several = templates.len() > 1;
    let layers: Vec<Layer<'_>> = templates
        .iter()
        .enumerate()
        .map(|(i, template)| Layer { role: if i == 0 && several { Role::Default } else { Role::Named }, template })
        .collect();
    let composition = compose(&layers);
    let merged = merge_pod(&pod, &composition.template).pod;
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &json_patch::diff(&pod, &merged)).expect("the diff applies");
    assert_eq!(patched, merged);
    assert_eq!(merge_pod(&merged, &composition.template).pod, merged, "merging again changes nothing");
}
