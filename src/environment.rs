//! The environment of a pod (SPEC §8 layer 3, §9): which templates a pod names, and the rule that
//! chose them. The one place that decides it; `serve`, `mutate`, `render`, `export-policy` and the
//! chart's selection all follow it.
//!
//! First that applies:
//! 1. the template annotation: a comma-separated list (explicit);
//! 2. the environment label: one name (explicit);
//! 3. a pod Flyte manages (`flyte.org/managed: "true"`): its `task-name` label up to the first
//!    `.` — Flyte 2 registers every task as `<environment>.<function>` and never labels the
//!    environment itself.

use serde_json::Value;

use crate::names::Names;

/// The templates a pod asks for by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// The template annotation: a comma-separated list, applied left to right.
    Annotation(Vec<String>),
    /// The environment label: one name; no template for it is no error.
    Label(String),
    /// A managed pod's task-name label up to its first `.`; no template for it is no error.
    TaskName {
        environment: String,
        task_name: String,
    },
    Nothing,
}

/// The template annotation lists an empty item or a name twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation} = {value:?} lists {problem}: give each template once, separated by commas")]
pub struct BadList {
    pub annotation: String,
    pub value: String,
    pub problem: String,
}

impl Requested {
    /// Reads the pod's metadata: `get(field, key)` is `metadata.<field>.<key>` as a string.
    pub fn read(get: impl Fn(&str, &str) -> Option<String>, names: &Names) -> Result<Self, BadList> {
        let non_empty = |field: &str, key: &str| get(field, key).filter(|v| !v.trim().is_empty());
        if let Some(list) = non_empty("annotations", &names.template_annotation) {
            let items: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
            let problem = if items.iter().any(String::is_empty) {
                Some("an empty item".to_owned())
            } else {
                items.iter().enumerate().find(|(i, n)| items[..*i].contains(n)).map(|(_, n)| format!("{n:?} twice"))
            };
            return match problem {
                Some(problem) => Err(BadList { annotation: names.template_annotation.clone(), value: list, problem }),
                None => Ok(Requested::Annotation(items)),
            };
        }
        if let Some(name) = non_empty("labels", &names.environment_label) {
            return Ok(Requested::Label(name));
        }
        let managed = || get("labels", &names.managed_label).is_some_and(|v| v == names.managed_value);
        if names.task_name_label.is_empty() || !managed() {
            return Ok(Requested::Nothing);
        }
        let task_name = get("labels", &names.task_name_label).unwrap_or_default();
        Ok(match environment_of_task(&task_name) {
            Some(environment) => Requested::TaskName { environment: environment.to_owned(), task_name },
            None => Requested::Nothing,
        })
    }

    /// The same, from a pod as a value.
    pub fn from_pod(pod: &Value, names: &Names) -> Result<Self, BadList> {
        let get = |field: &str, key: &str| pod.get("metadata")?.get(field)?.get(key)?.as_str().map(str::to_owned);
        Self::read(get, names)
    }

    /// The template names, in the order they apply.
    pub fn names(&self) -> &[String] {
        match self {
            Requested::Annotation(list) => list,
            Requested::Label(name) | Requested::TaskName { environment: name, .. } => std::slice::from_ref(name),
            Requested::Nothing => &[],
        }
    }

    /// A name the pod gave explicitly must exist; an environment need not have a template.
    pub fn required(&self) -> bool {
        matches!(self, Requested::Annotation(_))
    }

    /// The rule that chose the names, for messages: `annotation flyte.org/pod-template`,
    /// `label flyte.org/environment`, `task-name ml-gpu.train`.
    pub fn rule(&self, names: &Names) -> String {
        match self {
            Requested::Annotation(_) => format!("annotation {}", names.template_annotation),
            Requested::Label(_) => format!("label {}", names.environment_label),
            Requested::TaskName { task_name, .. } => format!("{} {task_name}", names.task_name_label),
            Requested::Nothing => "no rule".to_owned(),
        }
    }

    /// What the applied record adds after the layers: only the implicit rule, since the explicit
    /// ones are on the pod verbatim (`; environment from task-name ml-gpu.train`).
    pub fn recorded_rule(&self, names: &Names) -> Option<String> {
        match self {
            Requested::TaskName { task_name, .. } => Some(format!("{}{task_name}", recorded_task_name_prefix(names))),
            _ => None,
        }
    }
}

/// The applied record's suffix for §9 rule 3, before the task name: `; environment from task-name `.
pub fn recorded_task_name_prefix(names: &Names) -> String {
    format!("; environment from {} ", names.task_name_label)
}

/// §9 rule 3 on a task-name label value: the part before the first `.`; none without a `.` (a
/// name Flyte cut at 63 characters before the dot, or not a Flyte task name) or when it is empty.
pub fn environment_of_task(task_name: &str) -> Option<&str> {
    task_name.split_once('.').map(|(environment, _)| environment).filter(|e| !e.is_empty())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn read(labels: &[(&str, &str)], annotations: &[(&str, &str)], names: &Names) -> Result<Requested, BadList> {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        let get = |field: &str, key: &str| match field {
            "labels" => labels.get(key).map(|v| v.to_string()),
            "annotations" => annotations.get(key).map(|v| v.to_string()),
            _ => None,
        };
        Requested::read(get, names)
    }

    const MANAGED: (&str, &str) = ("flyte.org/managed", "true");

    fn task(environment: &str, task_name: &str) -> Requested {
        Requested::TaskName { environment: environment.into(), task_name: task_name.into() }
    }

    #[test]
    fn a_managed_pod_gets_the_task_names_environment() {
        let names = Names::default();
        let got = read(&[MANAGED, ("task-name", "ml-gpu.train")], &[], &names).unwrap();
        assert_eq!(got, task("ml-gpu", "ml-gpu.train"));
        assert_eq!(got.names(), ["ml-gpu"]);
        assert!(!got.required(), "an environment without a template is no error");
        assert_eq!(got.recorded_rule(&names).unwrap(), "; environment from task-name ml-gpu.train");
        // snake_case environments, functions with dots of their own (nested names): the first dot.
        let got = read(&[MANAGED, ("task-name", "etl_batch.load.inner")], &[], &names).unwrap();
        assert_eq!(got.names(), ["etl_batch"]);
    }

    #[test]
    fn sanitized_and_cut_task_names() {
        let names = Names::default();
        // Flyte cut `<env>.<function>` at 63 characters: the dot survived, so did the environment.
        let cut = "research-team-feature-store-backfill-2026.recompute_embeddings_";
        assert_eq!(cut.len(), 63);
        assert_eq!(
            read(&[MANAGED, ("task-name", cut)], &[], &names).unwrap().names(),
            ["research-team-feature-store-backfill-2026"]
        );
        // An environment name of 63 characters or more: the cut leaves no dot, so no environment.
        let long = "a".repeat(62) + "x";
        assert_eq!(read(&[MANAGED, ("task-name", &long)], &[], &names).unwrap(), Requested::Nothing);
        // No dot at all, an empty value, an empty environment: nothing.
        for value in ["train", "", ".train"] {
            assert_eq!(read(&[MANAGED, ("task-name", value)], &[], &names).unwrap(), Requested::Nothing, "{value:?}");
        }
    }

    #[test]
    fn only_managed_pods_and_only_the_configured_value() {
        let names = Names::default();
        assert_eq!(read(&[("task-name", "ml-gpu.train")], &[], &names).unwrap(), Requested::Nothing, "not managed");
        let other = [("flyte.org/managed", "false"), ("task-name", "ml-gpu.train")];
        assert_eq!(read(&other, &[], &names).unwrap(), Requested::Nothing, "managed: false");
        let custom = Names {
            managed_label: "example.com/managed-by".into(),
            managed_value: "executor".into(),
            task_name_label: "example.com/task".into(),
            ..Names::default()
        };
        let labels = [("example.com/managed-by", "executor"), ("example.com/task", "ml.train")];
        assert_eq!(read(&labels, &[], &custom).unwrap(), task("ml", "ml.train"));
        assert_eq!(read(&[MANAGED, ("task-name", "ml.train")], &[], &custom).unwrap(), Requested::Nothing);
    }

    #[test]
    fn an_empty_task_name_label_turns_rule_3_off() {
        let names = Names { task_name_label: String::new(), ..Names::default() };
        assert_eq!(read(&[MANAGED, ("task-name", "ml-gpu.train")], &[], &names).unwrap(), Requested::Nothing);
        // A label named "" cannot be read as the rule either.
        assert_eq!(read(&[MANAGED, ("", "ml-gpu.train")], &[], &names).unwrap(), Requested::Nothing);
    }

    #[test]
    fn explicit_names_win_annotation_first() {
        let names = Names::default();
        let flyte = [MANAGED, ("task-name", "ml-gpu.train")];
        let labelled = [flyte[0], flyte[1], ("flyte.org/environment", "etl")];
        assert_eq!(read(&labelled, &[], &names).unwrap(), Requested::Label("etl".into()));
        let annotated = read(&labelled, &[("flyte.org/pod-template", " a, b ")], &names).unwrap();
        assert_eq!(annotated, Requested::Annotation(vec!["a".into(), "b".into()]));
        assert!(annotated.required());
        assert_eq!(annotated.recorded_rule(&names), None, "explicit rules are on the pod itself");
        // Blank explicit values fall through to the next rule.
        let blank = [flyte[0], flyte[1], ("flyte.org/environment", " ")];
        assert_eq!(read(&blank, &[("flyte.org/pod-template", "")], &names).unwrap(), task("ml-gpu", "ml-gpu.train"));
    }

    #[test]
    fn a_bad_list_names_the_problem() {
        let names = Names::default();
        let err = read(&[], &[("flyte.org/pod-template", "a,,b")], &names).unwrap_err();
        assert!(err.to_string().contains("an empty item"), "{err}");
        let err = read(&[], &[("flyte.org/pod-template", "a, b, a")], &names).unwrap_err();
        assert!(err.to_string().contains("\"a\" twice"), "{err}");
    }
}
