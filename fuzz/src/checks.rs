//! The properties the fuzz targets check, shared with `tests/fuzz_corpus.rs`, which replays the
//! seed corpus on stable Rust in every test run, and with `tests/raw_path_props.rs`.
//!
//! `review` and `merge_patch` are differential: the product's path (the raw request text as a
//! lazy document, merged in place, and its own `patch::diff`, as `admission::mutate` runs them)
//! against the plain path (the text parsed into a `serde_json::Value`, `json_patch::diff` and
//! `json_patch::patch`). The pods they give must serialize to the same bytes.

use std::sync::OnceLock;

use pod_template_webhook::admission::{mutate, parse_review, response_body, Decision, Policy};
use pod_template_webhook::doc::{check, Document};
use pod_template_webhook::merge::{compose, merge, merge_pod, merge_pod_reference, Layer, Role};
use pod_template_webhook::names::Names;
use pod_template_webhook::patch;
use pod_template_webhook::store::dir::DirStore;
use pod_template_webhook::template::PodTemplate;
use serde_json::value::RawValue;
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

/// The bytes a pod is compared by: serde_json's (keys sorted, one spelling per value).
fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// `pod` with a JSON Patch (as bytes) applied by `json_patch`.
fn patched(pod: &Value, patch: &[u8]) -> Value {
    let patch: json_patch::Patch = serde_json::from_slice(patch).expect("the patch is a JSON Patch");
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the object");
    pod
}

/// What two decisions must agree on besides the patch.
fn verdict(d: &Decision) -> impl PartialEq + std::fmt::Debug + '_ {
    let r = &d.response;
    (d.outcome, r.allowed, &r.result, &r.warnings, &r.audit_annotations, &d.namespace, &d.pod, &d.template)
}

/// Any bytes as an AdmissionReview body: an error or a response; with the example templates
/// alone, and with `hello_world` as the default template under them. Differential: the same
/// review re-serialized from its `serde_json::Value` (no whitespace, escapes, duplicate keys or
/// number spellings of the original) gets the same decision, and both patches, applied with
/// `json_patch` to the object as a `Value`, give byte-for-byte the same pod. True when the two
/// paths were compared (the corpus replay counts them: a seed refused at the door proves less).
pub fn review(data: &[u8]) -> bool {
    let with_default = Policy { default_template: Some("hello_world".into()), ..Policy::default() };
    let mut compared = false;
    for policy in [Policy::default(), with_default] {
        let Ok(req) = parse_review(data) else { return compared };
        // What parse_review accepts reads as a Value: nothing left to turn into a silent null.
        let object: Option<Value> = req.object.as_ref().map(|o| {
            serde_json::from_str(o.get()).unwrap_or_else(|e| panic!("an accepted object reads as a Value: {e}"))
        });
        // The whole body may sit one level deeper than serde_json's own limit; the object never does.
        let canonical = serde_json::from_slice::<Value>(data).ok().map(|v| bytes(&v));
        let decision = mutate(req, store(), &policy);
        let Ok(decision) = decision else { return compared };
        let body = response_body(&decision);
        assert!(serde_json::from_slice::<Value>(&body).is_ok());
        let raw_pod = match (&decision.response.patch, &object) {
            (Some(patch), Some(object)) => Some(patched(object, patch)),
            (Some(_), None) => panic!("a patch without an object"),
            _ => None,
        };
        let Some(canonical) = canonical else { continue };
        let req = parse_review(&canonical).expect("the re-serialized review parses");
        let plain = mutate(req, store(), &policy).expect("the re-serialized review is decided");
        assert_eq!(verdict(&decision), verdict(&plain), "raw vs re-serialized review");
        let plain_pod = plain.response.patch.as_ref().map(|p| patched(object.as_ref().unwrap(), p));
        match (raw_pod, plain_pod) {
            (Some(a), Some(b)) => assert_eq!(
                String::from_utf8(bytes(&a)).unwrap(),
                String::from_utf8(bytes(&b)).unwrap(),
                "the raw review's patch and the re-serialized one's give different pods"
            ),
            (None, None) => {}
            (a, b) => panic!("one path patches, the other does not: {a:?} vs {b:?}"),
        }
        compared = true;
    }
    compared
}

/// Any text as a template: parsed or refused, never a panic; a template that parses merges into
/// a pod idempotently (merging the result again changes nothing). True when it parsed.
pub fn template(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(template) = PodTemplate::parse(text) else { return false };
    let pod = serde_json::json!({"metadata": {"name": "p", "annotations": {"a": "b"}},
        "spec": {"containers": [{"name": "primary", "image": "i"}, {"name": "side", "image": "i"}]}});
    let merged = merge_pod(&pod, &template).pod;
    assert_eq!(merge_pod(&merged, &template).pod, merged, "merging again changes nothing");
    true
}

/// `<pod JSON>\0<template>[\0<template>…]`: the layers (the first a default when there are
/// several) composed and merged. The pod text goes through the product's path as it was sent
/// (whitespace, escapes, duplicate keys and all): a document, `merge`, `patch::diff`. The plain
/// path parses it into a `Value`, merges that and diffs with `json_patch::diff`. Both patches,
/// applied with `json_patch::patch`, give byte-for-byte the merged pod, as does the merged
/// document written out; merging again changes nothing. True when the paths were compared.
pub fn merge_patch(data: &[u8]) -> bool {
    let mut parts = data.split(|b| *b == 0);
    let Some(Ok(text)) = parts.next().map(std::str::from_utf8) else { return false };
    let Ok(raw) = serde_json::from_str::<Box<RawValue>>(text) else { return false };
    // As a review carries it, two levels deep in the body, past the door check.
    if check(format!("[[{}]]", raw.get()).as_bytes()).is_err() {
        return false;
    }
    let pod: Value = serde_json::from_str(raw.get()).expect("a pod past the door check reads as a Value");
    let mut templates = Vec::new();
    for part in parts.take(4) {
        let Ok(text) = std::str::from_utf8(part) else { return false };
        let Ok(template) = PodTemplate::parse(text) else { return false };
        templates.push(template);
    }
    if templates.is_empty() {
        return false;
    }
    let several = templates.len() > 1;
    let layers: Vec<Layer<'_>> = templates
        .iter()
        .enumerate()
        .map(|(i, template)| Layer { role: if i == 0 && several { Role::Default } else { Role::Named }, template })
        .collect();
    let composition = compose(&layers);

    // The plain path.
    let merged = merge_pod(&pod, &composition.template).pod;
    // The template kept as canonical JSON text merges exactly as its value tree did.
    let reference = merge_pod_reference(&pod, &composition.template);
    assert_eq!(bytes(&reference.pod), bytes(&merged), "the compact template merges another pod than its value tree");
    let mut plain = pod.clone();
    json_patch::patch(&mut plain, &json_patch::diff(&pod, &merged)).expect("json_patch's diff applies");
    assert_eq!(bytes(&plain), bytes(&merged));

    // The product's path, on the text as sent.
    let document = Document::new(&raw);
    let mut doc = document.root();
    merge(&mut doc, &composition.template);
    let (ops, count) = patch::diff(&document.root(), &doc).expect("the product's diff");
    let parsed: Vec<Value> = serde_json::from_slice(&ops).expect("the patch is JSON");
    assert_eq!(parsed.len(), count, "the operation count");
    let product = patched(&pod, &ops);
    assert_eq!(
        String::from_utf8(bytes(&product)).unwrap(),
        String::from_utf8(bytes(&merged)).unwrap(),
        "the product's patch gives another pod than the plain merge; patch: {}",
        String::from_utf8_lossy(&ops)
    );
    let mut written = Vec::new();
    doc.write_json(&mut written);
    let written: Value = serde_json::from_slice(&written).expect("the merged document is JSON");
    assert_eq!(bytes(&written), bytes(&merged), "the merged document written out");

    assert_eq!(merge_pod(&merged, &composition.template).pod, merged, "merging again changes nothing");
    true
}
