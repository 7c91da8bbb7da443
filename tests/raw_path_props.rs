//! The raw-document path against the plain `serde_json::Value` path, in every `cargo test`: the
//! fuzz targets' differential oracle (`fuzz/src/checks.rs`) on generated pods written as odd but
//! valid JSON — whitespace everywhere, `\u` escapes and surrogate pairs, duplicate keys (the last
//! wins), big, negative and float numbers in several spellings, nesting down to the limit.

#[allow(dead_code)]
#[path = "../fuzz/src/checks.rs"]
mod checks;

use pod_template_webhook::doc::check;
use pod_template_webhook::template::PodTemplate;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Templates that touch labels, annotations, scalars with API defaults, keyed and atomic lists,
/// maps and objects, with non-ASCII keys and values.
const TEMPLATES: [&str; 4] = [
    "labels: {team: ml, \"a/b~c\": x}\nannotations: {note: \"é😀\\u2028\"}\npodSpec:\n  terminationGracePeriodSeconds: 60\n  nodeSelector: {disk: ssd}\n  containers:\n  - name: default\n    env: [{name: TZ, value: UTC}]\n",
    "primaryContainerName: main\npodSpec:\n  tolerations: [{key: gpu, operator: Exists}]\n  containers:\n  - name: main\n    resources: {limits: {cpu: 2, memory: 1Gi}}\n    env: [{name: MODE, value: fast}, {name: A, value: t}]\n  - name: side\n    image: busybox\n  initContainers:\n  - name: init\n    image: busybox\n",
    "podSpec:\n  priority: 5\n  securityContext: {runAsUser: 1000}\n  containers:\n  - name: primary\n    args: [\"--x\"]\n    ports: [{containerPort: 8080}]\n    env: [{name: \"é\", value: \"😀\"}]\n",
    "labels: {lKeyA: lValA}\npodSpec:\n  imagePullSecrets: [{name: regcred}]\n  containers:\n  - name: primary\n    env: [{name: hello, value: world}]\n",
];

const CHARS: [char; 16] =
    ['a', 'Z', '0', ' ', '/', '~', '"', '\\', '\u{0}', '\n', '\u{1f}', 'é', '\u{2028}', '\u{ffff}', '😀', '𝄞'];

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(&CHARS[..]), 0..6).prop_map(|c| c.into_iter().collect())
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(&[0i64, 1, -1, 30, 8080][..]).prop_map(Value::from),
        prop::num::f64::NORMAL.prop_map(Value::from),
        prop::sample::select(&[0.0, -0.0, 1.0, 30.0, 0.1, 1e300, -2.5e-300, 1.8446744073709552e19, 5e-324][..])
            .prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf =
        prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::from), number(), text().prop_map(Value::from)];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn string_map() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(prop_oneof![text(), Just("team".to_owned()), Just("a/b~c".to_owned())], text(), 0..4)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k, Value::from(v))).collect())
}

fn container() -> impl Strategy<Value = Value> {
    let names = prop::sample::select(&["primary", "main", "side", "init", "x\"/é"][..]);
    let env = prop::collection::vec((prop::sample::select(&["TZ", "MODE", "A", "hello", "é"][..]), text()), 0..4);
    (names, env, prop::option::of(value()), prop::option::of(number())).prop_map(|(name, env, extra, port)| {
        let mut c = json!({"name": name, "image": "img:1"});
        if !env.is_empty() {
            c["env"] = env.into_iter().map(|(n, v)| json!({"name": n, "value": v})).collect();
        }
        if let Some(extra) = extra {
            c["extra"] = extra;
        }
        if let Some(port) = port {
            c["ports"] = json!([{"containerPort": port}]);
        }
        c
    })
}

/// A pod the example templates apply to, with arbitrary values where the merge goes and beside it.
fn pod() -> impl Strategy<Value = Value> {
    (
        string_map(),
        string_map(),
        prop::collection::vec(container(), 0..3),
        prop::collection::vec(container(), 0..2),
        prop::option::of(number()),
        prop::option::of(number()),
        prop::option::of(value()),
        prop::option::of(value()),
    )
        .prop_map(|(mut labels, annotations, containers, init, grace, priority, node_selector, status)| {
            labels.insert("flyte.org/environment".into(), "hello_world".into());
            let mut spec = json!({"containers": containers});
            if !init.is_empty() {
                spec["initContainers"] = init.into();
            }
            for (key, v) in
                [("terminationGracePeriodSeconds", grace), ("priority", priority), ("nodeSelector", node_selector)]
            {
                if let Some(v) = v {
                    spec[key] = v;
                }
            }
            let mut pod =
                json!({"metadata": {"name": "p", "labels": labels, "annotations": annotations}, "spec": spec});
            if let Some(status) = status {
                pod["status"] = status;
            }
            pod
        })
}

/// Writes `v` as valid JSON that reads back as `v`, each choice of spelling taken from `knobs`.
struct Writer<'k> {
    out: String,
    knobs: std::iter::Cycle<std::slice::Iter<'k, u8>>,
}

impl Writer<'_> {
    fn knob(&mut self) -> u8 {
        *self.knobs.next().unwrap_or(&0)
    }

    fn ws(&mut self) {
        let ws = match self.knob() % 10 {
            0 => " ",
            1 => "\n  ",
            2 => "\t",
            3 => "\r\n",
            _ => "",
        };
        self.out.push_str(ws);
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            let escape = self.knob().is_multiple_of(3);
            match c {
                '"' => self.out.push_str(if escape { "\\u0022" } else { "\\\"" }),
                '\\' => self.out.push_str(if escape { "\\u005C" } else { "\\\\" }),
                '\n' if !escape => self.out.push_str("\\n"),
                '/' if escape => self.out.push_str("\\/"),
                c if escape || (c as u32) < 0x20 => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let upper = self.knob().is_multiple_of(2);
                        self.out.push_str(&if upper { format!("\\u{unit:04X}") } else { format!("\\u{unit:04x}") });
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn number(&mut self, n: &serde_json::Number) {
        let text = match n.as_f64().filter(|_| n.is_f64()) {
            Some(f) => match self.knob() % 4 {
                0 => format!("{f:e}"),
                1 => format!("{f:E}"),
                // An integral float beyond 64 bits as all its digits: an integer serde_json reads as
                // that f64 (it has no integer type that wide).
                2 if f.fract() == 0.0 && f.abs() >= 18446744073709551616.0 => format!("{f:.0}"),
                _ => n.to_string(),
            },
            None => n.to_string(),
        };
        self.out.push_str(&text);
    }

    fn value(&mut self, v: &Value) {
        self.ws();
        match v {
            Value::Null => self.out.push_str("null"),
            Value::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => self.number(n),
            Value::String(s) => self.string(s),
            Value::Array(items) => {
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.value(item);
                }
                self.ws();
                self.out.push(']');
            }
            Value::Object(map) => {
                self.out.push('{');
                let mut first = true;
                for (k, item) in map {
                    // A decoy under the same key first: the last of duplicates wins.
                    if self.knob().is_multiple_of(5) {
                        self.entry(&mut first, k, &json!(["decoy", 1]));
                    }
                    self.entry(&mut first, k, item);
                }
                self.ws();
                self.out.push('}');
            }
        }
        self.ws();
    }

    fn entry(&mut self, first: &mut bool, k: &str, v: &Value) {
        if !std::mem::take(first) {
            self.out.push(',');
        }
        self.ws();
        self.string(k);
        self.ws();
        self.out.push(':');
        self.value(v);
    }
}

fn odd_json(v: &Value, knobs: &[u8]) -> String {
    let mut w = Writer { out: String::new(), knobs: knobs.iter().cycle() };
    w.value(v);
    let text = w.out;
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), *v, "{text}");
    assert_eq!(check(text.as_bytes()), Ok(()), "{text}");
    text
}

#[test]
fn the_templates_parse() {
    for t in TEMPLATES {
        PodTemplate::parse(t).unwrap();
    }
}

#[test]
fn the_writer_writes_odd_json() {
    let v = json!({"k": ["a\"/\\\n😀", 1e300, -0.0, 1.8446744073709552e19, u64::MAX, i64::MIN]});
    let seen: std::collections::BTreeSet<String> =
        (0..=255u8).map(|k| odd_json(&v, &[k, k / 3, k / 7, 5, 0])).collect();
    assert!(seen.len() > 20, "{seen:?}");
    let all = seen.into_iter().collect::<String>();
    for spelling in ["\\uD83D\\uDE00", "\\ud83d\\ude00", "\\/", "\\u0022", "18446744073709551616", "\n"] {
        assert!(all.contains(spelling), "no {spelling} in {all}");
    }
}

/// A pod nested to the deepest the door lets through (126 levels: the body adds two): the same
/// on both paths.
#[test]
fn nesting_down_to_the_limit_is_the_same_on_both_paths() {
    let deep = (0..122).fold(json!("leaf"), |v, i| if i % 2 == 0 { json!([v]) } else { json!({"k": v}) });
    let pod = json!({"metadata": {"labels": {"flyte.org/environment": "hello_world"}}, "spec": {"containers": [{"name": "primary", "deep": deep}]}});
    let text = odd_json(&pod, &[1, 2, 3, 4, 5, 6, 7]);
    for template in TEMPLATES {
        assert!(checks::merge_patch(format!("{text}\0{template}").as_bytes()), "the two paths were compared");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// The merge_patch fuzz target's oracle: the product's patch on the text as written and the
    /// plain merge of its `Value` give byte-for-byte the same pod.
    #[test]
    fn raw_path_equals_value_path(
        pod in pod(),
        knobs in prop::collection::vec(any::<u8>(), 1..64),
        layers in prop::sample::subsequence(&[0usize, 1, 2, 3][..], 1..=3),
    ) {
        let text = odd_json(&pod, &knobs);
        let mut input = text.into_bytes();
        for i in layers {
            input.push(0);
            input.extend_from_slice(TEMPLATES[i].as_bytes());
        }
        prop_assert!(checks::merge_patch(&input), "the two paths were compared, not skipped");
    }

    /// The review fuzz target's oracle: a review with an oddly written pod and its re-serialized
    /// form get the same decision and, patched, the same pod.
    #[test]
    fn raw_review_equals_reserialized_review(
        pod in pod(),
        knobs in prop::collection::vec(any::<u8>(), 1..64),
        gpu in any::<bool>(),
    ) {
        let mut pod = pod;
        if gpu {
            pod["metadata"]["labels"]["flyte.org/environment"] = json!("gpu");
        }
        // The envelope plain (a duplicate `uid` is refused, as it should be), the pod odd.
        let body = format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","resource":{{"group":"","version":"v1","resource":"pods"}},"operation":"CREATE","namespace":"flyte","object":{}}}}}"#,
            odd_json(&pod, &knobs)
        );
        prop_assert!(pod_template_webhook::admission::parse_review(body.as_bytes()).is_ok());
        prop_assert!(checks::review(body.as_bytes()), "the raw and re-serialized reviews were compared");
    }
}
