//! "Where did this value come from" (SPEC §8 "Seeing it"): every JSON path the merge changed
//! and the layer that set it. For tools, not the admission path: it merges once per layer.
//!
//! The pod is merged with the first k layers for every k. A changed value was set by the last
//! layer before which it was still different — found by the value's identity (container and
//! keyed-list entries by key, union-list entries by value), not by array index, because a layer
//! may insert entries in front of it.

use std::borrow::Cow;

use serde_json::Value;

use super::rules::{EntryKey, CONTAINER_KEY};
use super::{compose, list_rule, merge_pod, Layer, ListRule};
use crate::doc::Node;

/// One JSON path of the merged pod that the merge added or changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// A JSON Pointer into the merged pod.
    pub path: String,
    /// Index (into the layers) of the layer that set it.
    pub layer: usize,
}

/// The pod merged with `layers`, and what each layer changed, in the merged pod's order.
pub fn explain(pod: &Value, layers: &[Layer<'_>]) -> (Value, Vec<Change>) {
    let stages: Vec<Value> = (0..=layers.len())
        .map(|k| if k == 0 { pod.clone() } else { merge_pod(pod, &compose(&layers[..k]).template).pod })
        .collect();
    let changes = changes(&stages);
    (stages.into_iter().next_back().expect("stage 0 is the pod"), changes)
}

/// Every JSON path where `after` differs from `before`, found by identity like [`explain`] and
/// cut to the unit a layer sets: what is added or changed (pointers into `after`), then what is
/// gone (pointers into `before`). What a shadow template would change (§10).
pub fn differences(before: &Value, after: &Value) -> Vec<String> {
    let mut paths: Vec<String> = changes(&[before.clone(), after.clone()]).into_iter().map(|c| c.path).collect();
    // A template that replaces one setting more leaves less: what `after` lacks, seen backwards.
    for c in changes(&[after.clone(), before.clone()]) {
        let gone = identity(before, &c.path).is_some_and(|(_, _, steps)| resolve(after, &steps).is_none());
        if gone {
            paths.push(c.path);
        }
    }
    paths
}

/// What each stage after the first changed, up to the last: the changes of the diff between
/// the first and the last stage, each given to the stage that set it.
fn changes(stages: &[Value]) -> Vec<Change> {
    let (first, merged) = (&stages[0], stages.last().expect("at least one stage"));
    let mut changes = Vec::new();
    for op in json_patch::diff(first, merged).iter() {
        let path = match op {
            json_patch::PatchOperation::Add(op) => op.path.to_string(),
            json_patch::PatchOperation::Replace(op) => op.path.to_string(),
            _ => continue, // the merge only adds and fills in
        };
        let Some((path, field, steps)) = identity(merged, &path) else {
            continue;
        };
        if changes.iter().any(|c: &Change| c.path == path) {
            continue;
        }
        let value = resolve(merged, &steps).expect("the path is in the merged pod");
        changes.extend(attribute(stages, path, field, steps, value));
    }
    changes
}

/// The changes inside `value` (at `path`, identified by `steps`; `field` is the key it sits
/// under): one change when a single layer set all of it, else one per part. An entry of a list
/// other than containers is set whole by one layer (§4), so it is not taken apart.
fn attribute(stages: &[Value], path: String, field: &str, steps: Vec<Step>, value: &Value) -> Vec<Change> {
    let whole_entry = matches!(steps.last(), Some(Step::Entry(..) | Step::Member(_))) && !is_container_list(field);
    let children: Vec<(String, &str, Step, &Value)> = match value {
        _ if whole_entry => Vec::new(),
        Value::Object(map) => map.iter().map(|(k, v)| (escape(k), k.as_str(), Step::Key(k.clone()), v)).collect(),
        Value::Array(items) if !matches!(list_rule(field), ListRule::Atomic) => {
            items.iter().enumerate().map(|(i, item)| (i.to_string(), field, element(field, item), item)).collect()
        }
        _ => Vec::new(),
    };
    if children.is_empty() {
        let now = resolve(&stages[stages.len() - 1], &steps);
        // The last stage where the value was not yet what it is now: the next layer set it.
        let layer = (0..stages.len() - 1).rev().find(|&k| resolve(&stages[k], &steps) != now);
        return layer.map(|layer| Change { path, layer }).into_iter().collect();
    }
    let mut parts = Vec::new();
    let count = children.len();
    for (token, key, step, child) in children {
        let mut child_steps = steps.clone();
        child_steps.push(step);
        parts.extend(attribute(stages, format!("{path}/{token}"), key, child_steps, child));
    }
    match parts.first() {
        Some(first) if parts.len() == count && parts.iter().all(|p| p.layer == first.layer) => {
            vec![Change { path, layer: first.layer }]
        }
        _ => parts,
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// One step of a path that survives entries being inserted before it.
#[derive(Clone)]
enum Step {
    Key(String),
    /// An entry of a keyed list (containers by name, env by name, …).
    Entry(EntryKey, String),
    /// An entry of a union list, by its value.
    Member(Value),
}

/// How an entry of the list under `field` is found again.
fn element(field: &str, item: &Value) -> Step {
    let keyed = match list_rule(field) {
        _ if is_container_list(field) => Some(CONTAINER_KEY),
        ListRule::Keyed(entry_key) => Some(entry_key),
        _ => None,
    };
    match keyed.and_then(|entry_key| Some((entry_key, entry_key.of(&Node::Value(Cow::Borrowed(item)))?))) {
        Some((entry_key, key)) => Step::Entry(entry_key, key),
        None => Step::Member(item.clone()),
    }
}

/// The identity of the value at JSON Pointer `pointer` in `root`, cut to the unit a layer sets
/// (an atomic list, an entry of a list other than containers): the pointer to that unit, the key
/// it sits under, and its steps.
fn identity<'v>(root: &'v Value, pointer: &str) -> Option<(String, &'v str, Vec<Step>)> {
    let mut steps = Vec::new();
    let mut at = root;
    let mut field = "";
    let mut unit = String::new();
    for raw in pointer.split('/').skip(1) {
        let token = raw.replace("~1", "/").replace("~0", "~");
        at = match at {
            Value::Object(map) => {
                let (key, value) = map.get_key_value(&token)?;
                steps.push(Step::Key(token));
                field = key;
                value
            }
            Value::Array(_) if matches!(list_rule(field), ListRule::Atomic) => break,
            Value::Array(items) => {
                let item = items.get(raw.parse::<usize>().ok()?)?;
                steps.push(element(field, item));
                if !is_container_list(field) {
                    unit.push('/');
                    unit.push_str(raw);
                    break;
                }
                item
            }
            _ => return None,
        };
        unit.push('/');
        unit.push_str(raw);
    }
    Some((unit, field, steps))
}

fn is_container_list(field: &str) -> bool {
    matches!(field, "containers" | "initContainers" | "ephemeralContainers")
}

fn resolve<'v>(root: &'v Value, steps: &[Step]) -> Option<&'v Value> {
    let mut at = root;
    for step in steps {
        at = match (step, at) {
            (Step::Key(key), Value::Object(map)) => map.get(key)?,
            (Step::Entry(entry_key, key), Value::Array(items)) => items
                .iter()
                .find(|item| entry_key.of(&Node::Value(Cow::Borrowed(item))).as_deref() == Some(key.as_str()))?,
            (Step::Member(value), Value::Array(items)) => items.iter().find(|item| *item == value)?,
            _ => return None,
        };
    }
    Some(at)
}
