//! Prototypes of the source changes proposed in docs/performance.md, measured side by side with
//! the current code by `benches/merge.rs` (group `proposed`). Nothing here is used by the product;
//! each function is a sketch of what would replace a piece of `src/admission.rs`:
//!
//! - [`parse`]: deserialize the review into a small struct whose `object` is a plain
//!   `serde_json::Value` (no `DynamicObject`: no `#[serde(flatten)]` buffering, no typed
//!   `ObjectMeta`, and no `serde_json::to_value(object)` round trip afterwards).
//! - [`diff_into`]: a JSON Patch diff that skips equal subtrees, aligns arrays on their common
//!   prefix and suffix (so entries the merge prepends become `add` operations instead of a
//!   `replace` of every shifted element), and writes the operations straight to JSON bytes.
//! - [`write_response`]: the AdmissionReview response written directly, the patch base64-encoded
//!   (as Kubernetes' `[]byte` is in JSON) instead of kube-core's array of numbers, without cloning
//!   the response first.
//! - [`admit`]: the three together, with the same lookup, merge and applied annotation as
//!   `admission::mutate` (the Ready path only: enough to measure).

use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::{Map, Value};

use pod_template_webhook::merge::merge_pod;
use pod_template_webhook::names::Names;
use pod_template_webhook::store::{EntryState, TemplateStore};

#[derive(Deserialize)]
pub struct Review {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub request: Option<Request>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub uid: String,
    pub resource: Resource,
    #[serde(default)]
    pub sub_resource: Option<String>,
    pub operation: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub object: Option<Value>,
}

#[derive(Deserialize)]
pub struct Resource {
    #[serde(default)]
    pub group: String,
    pub resource: String,
}

pub fn parse(body: &[u8]) -> Review {
    serde_json::from_slice(body).expect("a valid review")
}

/// Appends `token` to a JSON pointer, escaped (RFC 6901).
fn push_token(path: &mut String, token: &str) {
    path.push('/');
    for c in token.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

fn op(out: &mut Vec<u8>, count: &mut usize, kind: &str, path: &str, value: Option<&Value>) {
    out.push(if *count == 0 { b'[' } else { b',' });
    *count += 1;
    out.extend_from_slice(b"{\"op\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"path\":");
    serde_json::to_writer(&mut *out, path).unwrap();
    if let Some(v) = value {
        out.extend_from_slice(b",\"value\":");
        serde_json::to_writer(&mut *out, v).unwrap();
    }
    out.push(b'}');
}

/// Writes the RFC 6902 operations turning `left` into `right` to `out` (a JSON array once
/// [`finish`]ed); returns nothing, counts operations in `count`.
pub fn diff_into(left: &Value, right: &Value, path: &mut String, out: &mut Vec<u8>, count: &mut usize) {
    match (left, right) {
        (Value::Object(l), Value::Object(r)) => {
            for (k, rv) in r {
                let len = path.len();
                push_token(path, k);
                match l.get(k) {
                    Some(lv) if lv == rv => {}
                    Some(lv) => diff_into(lv, rv, path, out, count),
                    None => op(out, count, "add", path, Some(rv)),
                }
                path.truncate(len);
            }
            for k in l.keys().filter(|k| !r.contains_key(*k)) {
                let len = path.len();
                push_token(path, k);
                op(out, count, "remove", path, None);
                path.truncate(len);
            }
        }
        (Value::Array(l), Value::Array(r)) => {
            let prefix = l.iter().zip(r).take_while(|(a, b)| a == b).count();
            let max_suffix = l.len().min(r.len()) - prefix;
            let suffix = l.iter().rev().zip(r.iter().rev()).take(max_suffix).take_while(|(a, b)| a == b).count();
            let (lm, rm) = (&l[prefix..l.len() - suffix], &r[prefix..r.len() - suffix]);
            let common = lm.len().min(rm.len());
            let len = path.len();
            for i in 0..common {
                if lm[i] != rm[i] {
                    let _ = write!(path, "/{}", prefix + i);
                    diff_into(&lm[i], &rm[i], path, out, count);
                    path.truncate(len);
                }
            }
            for (i, v) in rm.iter().enumerate().skip(common) {
                let _ = write!(path, "/{}", prefix + i);
                op(out, count, "add", path, Some(v));
                path.truncate(len);
            }
            for _ in common..lm.len() {
                let _ = write!(path, "/{}", prefix + common);
                op(out, count, "remove", path, None);
                path.truncate(len);
            }
        }
        _ if left == right => {}
        _ => op(out, count, "replace", path, Some(right)),
    }
}

/// The whole patch as JSON bytes, and its operation count.
pub fn diff(left: &Value, right: &Value) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(256);
    let mut count = 0;
    diff_into(left, right, &mut String::with_capacity(64), &mut out, &mut count);
    out.extend_from_slice(if count == 0 { b"[]" } else { b"]" });
    (out, count)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_into(out: &mut Vec<u8>, data: &[u8]) {
    out.reserve(data.len().div_ceil(3) * 4);
    let mut chunks = data.chunks_exact(3);
    for c in &mut chunks {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        out.extend_from_slice(&[B64[(n >> 18) as usize & 63], B64[(n >> 12) as usize & 63], B64[(n >> 6) as usize & 63], B64[n as usize & 63]]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[B64[(n >> 18) as usize & 63], B64[(n >> 12) as usize & 63], b'=', b'=']);
        }
        [a, b] => {
            let n = (u32::from(a) << 16) | (u32::from(b) << 8);
            out.extend_from_slice(&[B64[(n >> 18) as usize & 63], B64[(n >> 12) as usize & 63], B64[(n >> 6) as usize & 63], b'=']);
        }
        _ => {}
    }
}

/// The response body: `allowed: true`, the patch (if any) base64-encoded, audit annotations.
pub fn write_response(api_version: &str, uid: &str, patch: Option<&[u8]>, applied: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + patch.map_or(0, |p| p.len() * 4 / 3));
    out.extend_from_slice(b"{\"apiVersion\":");
    serde_json::to_writer(&mut out, api_version).unwrap();
    out.extend_from_slice(b",\"kind\":\"AdmissionReview\",\"response\":{\"uid\":");
    serde_json::to_writer(&mut out, uid).unwrap();
    out.extend_from_slice(b",\"allowed\":true");
    if let Some(p) = patch {
        out.extend_from_slice(b",\"patch\":\"");
        base64_into(&mut out, p);
        out.extend_from_slice(b"\",\"patchType\":\"JSONPatch\"");
    }
    if let Some(a) = applied {
        out.extend_from_slice(b",\"auditAnnotations\":{\"applied\":");
        serde_json::to_writer(&mut out, a).unwrap();
        out.push(b'}');
    }
    out.extend_from_slice(b"}}");
    out
}

fn str_at<'a>(meta: &'a Map<String, Value>, field: &str, key: &str) -> Option<&'a str> {
    meta.get(field)?.get(key)?.as_str().filter(|s| !s.is_empty())
}

/// Body in, body out: the proposed admission path for a pod whose template is Ready.
pub fn admit(body: &[u8], store: &dyn TemplateStore, names: &Names) -> (Vec<u8>, usize) {
    let review = parse(body);
    let req = review.request.expect("request");
    assert!(req.resource.group.is_empty() && req.resource.resource == "pods" && req.sub_resource.is_none() && req.operation == "CREATE");
    let mut pod = req.object.expect("object");
    let meta = pod.get_mut("metadata").and_then(Value::as_object_mut).expect("metadata");
    meta.remove("managedFields");
    let name = str_at(meta, "annotations", &names.template_annotation)
        .or_else(|| str_at(meta, "labels", &names.environment_label))
        .expect("a template name")
        .to_owned();
    let namespace = req.namespace.as_deref().or_else(|| meta.get("namespace")?.as_str()).unwrap_or("default");
    let entry = store.lookup(namespace, &name).entry.expect("template exists");
    let EntryState::Ready(template) = &entry.state else { panic!("not ready") };
    let mut after = merge_pod(&pod, template).pod;
    let applied = entry.source.to_string();
    if let Some(meta) = after.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = meta.entry("annotations").or_insert_with(|| Value::Object(Map::new()));
        if let Some(a) = annotations.as_object_mut() {
            a.insert(names.applied_annotation.clone(), Value::String(applied.clone()));
        }
    }
    let (patch, ops) = diff(&pod, &after);
    let body = write_response(&review.api_version, &req.uid, (ops > 0).then_some(patch.as_slice()), Some(&applied));
    (body, ops)
}

/// Decodes standard base64 (for checks only).
pub fn base64_decode(text: &str) -> Vec<u8> {
    let val = |c: u8| B64.iter().position(|&b| b == c).expect("base64") as u32;
    let bytes: Vec<u8> = text.bytes().filter(|&b| b != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}
