//! The JSON Patch (RFC 6902) between the pod as sent and the merged pod, written straight to
//! bytes. Unlike a naive index-by-index array diff it lines arrays up on their common start and
//! end, so template entries added in front of a list cost one `add` each instead of rewriting
//! every entry behind them (1,500 env vars: 19 operations, not 3,019).

use std::fmt::Write as _;

use crate::doc::{Kind, Node};

/// The operations turning `before` into `after`, as a JSON array, and their count; an error
/// when a part of either does not split (text serde_json did not check): never a patch that
/// silently leaves something out.
pub fn diff<'a>(before: &Node<'a>, after: &Node<'a>) -> Result<(Vec<u8>, usize), Unsplittable> {
    let mut patch = Patch { out: Vec::with_capacity(256), count: 0, failed: None };
    patch.diff(before, after, &mut String::with_capacity(64));
    if let Some(path) = patch.failed {
        return Err(Unsplittable(path));
    }
    patch.out.extend_from_slice(if patch.count == 0 { b"[]" } else { b"]" });
    Ok((patch.out, patch.count))
}

/// The JSON pointer of a value the diff could not look into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot diff the pod: the value at {0:?} does not split into entries")]
pub struct Unsplittable(pub String);

struct Patch {
    out: Vec<u8>,
    count: usize,
    /// The first path that did not split.
    failed: Option<String>,
}

impl Patch {
    fn diff<'a>(&mut self, left: &Node<'a>, right: &Node<'a>, path: &mut String) {
        if let (Node::Raw(l), Node::Raw(r)) = (left, right) {
            if l.same(r) {
                return; // a part the merge never opened
            }
        }
        match (left.kind(), right.kind()) {
            (Kind::Object, Kind::Object) => self.diff_objects(left, right, path),
            (Kind::Array, Kind::Array) => self.diff_arrays(left, right, path),
            _ if left.equals(right) => {}
            _ => self.op("replace", path, Some(right)),
        }
    }

    /// Keys of the right object: added or diffed; keys only on the left: removed.
    fn diff_objects<'a>(&mut self, left: &Node<'a>, right: &Node<'a>, path: &mut String) {
        let (Some(l), Some(r)) = (left.entries_beside(right), right.entries_beside(left)) else {
            return self.fail(path);
        };
        let (l_index, r_index) = (l.index(), r.index());
        for (key, rv) in r.iter() {
            let lv = l_index.get(key);
            if let (Some(Node::Raw(a)), Node::Raw(b)) = (lv, rv) {
                if a.same(b) {
                    continue; // before building its path
                }
            }
            let len = push_token(path, key);
            match lv {
                Some(lv) => self.diff(lv, rv, path),
                None => self.op("add", path, Some(rv)),
            }
            path.truncate(len);
        }
        for (key, _) in l.iter().filter(|(k, _)| !r_index.contains_key(k)) {
            let len = push_token(path, key);
            self.op("remove", path, None);
            path.truncate(len);
        }
    }

    /// Lists lined up on their common start and end; the middle diffed by index, the rest added
    /// or removed.
    fn diff_arrays<'a>(&mut self, left: &Node<'a>, right: &Node<'a>, path: &mut String) {
        let (Some(l), Some(r)) = (left.elements_beside(right), right.elements_beside(left)) else {
            return self.fail(path);
        };
        let prefix = l.iter().zip(r.iter()).take_while(|(a, b)| a.equals(b)).count();
        let max_suffix = l.len().min(r.len()) - prefix;
        let suffix = l.iter().rev().zip(r.iter().rev()).take(max_suffix).take_while(|(a, b)| a.equals(b)).count();
        let (lm, rm) = (&l[prefix..l.len() - suffix], &r[prefix..r.len() - suffix]);
        let common = lm.len().min(rm.len());
        let len = path.len();
        for (i, (lv, rv)) in lm.iter().zip(rm).enumerate() {
            let _ = write!(path, "/{}", prefix + i);
            self.diff(lv, rv, path);
            path.truncate(len);
        }
        for (i, v) in rm.iter().enumerate().skip(common) {
            let _ = write!(path, "/{}", prefix + i);
            self.op("add", path, Some(v));
            path.truncate(len);
        }
        // Each removal shifts the rest down: remove at the same index.
        let _ = write!(path, "/{}", prefix + common);
        for _ in common..lm.len() {
            self.op("remove", path, None);
        }
        path.truncate(len);
    }

    fn fail(&mut self, path: &str) {
        self.failed.get_or_insert_with(|| path.to_owned());
    }

    fn op(&mut self, kind: &str, path: &str, value: Option<&Node<'_>>) {
        self.out.push(if self.count == 0 { b'[' } else { b',' });
        self.count += 1;
        self.out.extend_from_slice(b"{\"op\":\"");
        self.out.extend_from_slice(kind.as_bytes());
        self.out.extend_from_slice(b"\",\"path\":");
        serde_json::to_writer(&mut self.out, path).expect("writing to a Vec cannot fail");
        if let Some(v) = value {
            self.out.extend_from_slice(b",\"value\":");
            v.write_json(&mut self.out);
        }
        self.out.push(b'}');
    }
}

/// Appends `/token` escaped as RFC 6901 says (`~` → `~0`, `/` → `~1`); returns the old length.
fn push_token(path: &mut String, token: &str) -> usize {
    let len = path.len();
    path.push('/');
    if !token.contains(['~', '/']) {
        path.push_str(token);
        return len;
    }
    for c in token.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
    len
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use serde_json::value::RawValue;
    use serde_json::Value;

    use super::*;

    /// The diff of two documents given as JSON, both raw (as a request) and as template values.
    fn diff_values(before: &Value, after: &Value) -> (Vec<u8>, usize) {
        let raw = RawValue::from_string(before.to_string()).unwrap();
        let from_raw =
            diff(&crate::doc::Document::new(&raw).root(), &Node::Value(std::borrow::Cow::Borrowed(after))).unwrap();
        let from_values =
            diff(&Node::Value(std::borrow::Cow::Borrowed(before)), &Node::Value(std::borrow::Cow::Borrowed(after)))
                .unwrap();
        assert_eq!(from_raw, from_values);
        from_raw
    }

    fn check(before: Value, after: Value) -> Vec<Value> {
        let (bytes, count) = diff_values(&before, &after);
        let ops: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(ops.len(), count);
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut patched = before;
        json_patch::patch(&mut patched, &patch).unwrap();
        assert_eq!(patched, after);
        ops
    }

    #[test]
    fn equal_values_give_an_empty_patch() {
        assert_eq!(diff_values(&json!({"a": [1]}), &json!({"a": [1]})), (b"[]".to_vec(), 0));
    }

    #[test]
    fn text_that_does_not_split_is_an_error_not_an_empty_patch() {
        // Not JSON a review could carry (serde_json checks it first): the diff must say so.
        let raw = RawValue::from_string(r#"{"a": {"b": 1}}"#.to_owned()).unwrap();
        let document = crate::doc::Document::new(&raw);
        let mut pod = document.root();
        let a = pod.as_object_mut().unwrap().get_mut("a").unwrap();
        *a = Node::Value(std::borrow::Cow::Owned(json!({"b": 2})));
        assert!(diff(&document.root(), &pod).is_ok());
        let broken = RawValue::from_string(r#"{"a": {"b" 1}}"#.to_owned());
        assert!(broken.is_err(), "serde_json refuses it, so only a bug gets here");
        let after = json!({"a": {"b": 2}});
        let unsplit = crate::doc::Document::over(r#"{"a": {"b" 1}}"#);
        let err = diff(&unsplit.root(), &Node::Value(std::borrow::Cow::Borrowed(&after))).unwrap_err();
        assert_eq!(err, Unsplittable("/a".into()));
        assert!(err.to_string().contains("does not split"));
    }

    #[test]
    fn keys_are_escaped() {
        let ops = check(json!({"l": {}}), json!({"l": {"a/b~c": "v"}}));
        assert_eq!(ops, [json!({"op": "add", "path": "/l/a~1b~0c", "value": "v"})]);
    }

    #[test]
    fn entries_added_in_front_cost_one_add_each() {
        let before: Vec<Value> = (0..1500).map(|i| json!({"name": format!("E{i}")})).collect();
        let mut after = vec![json!({"name": "T1"}), json!({"name": "T2"})];
        after.extend(before.iter().cloned());
        let ops = check(json!({"env": before}), json!({"env": after}));
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0]["path"], "/env/0");
    }

    #[test]
    fn objects_with_many_keys_diff_through_an_index() {
        let before: serde_json::Map<String, Value> = (0..2000).map(|i| (format!("k{i}"), json!(i))).collect();
        let mut after = before.clone();
        after.remove("k7");
        after.insert("k7/new".into(), json!("x"));
        after.insert("k9".into(), json!({"changed": true}));
        let ops = check(json!({"labels": before}), json!({"labels": after}));
        assert_eq!(ops.len(), 3, "{ops:?}");
    }

    #[test]
    fn middle_changes_removals_and_replacements() {
        check(json!([1, 2, 3, 4, 5]), json!([1, 9, 9, 9, 5]));
        check(json!([1, 2, 3, 4, 5]), json!([1, 5]));
        check(json!([1, 2]), json!([3, 1, 2, 4]));
        check(json!({"a": 1, "b": {"c": [1, {"d": 2}]}}), json!({"b": {"c": [1, {"d": 3}, 4]}, "e": null}));
        check(json!({"a": [1, 2]}), json!({"a": "scalar"}));
    }
}
