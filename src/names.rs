//! The configurable names of SPEC §2 and §9, shared by the store and the admission logic.

/// Label and annotation names, and the platform namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Pod label naming the environment; its value is the template name.
    pub environment_label: String,
    /// Pod annotation naming a template explicitly; wins over the label.
    pub template_annotation: String,
    /// Label (`"true"`) that marks a ConfigMap as a template source.
    pub source_label: String,
    /// Annotation written on mutated pods: `<namespace>/<configmap>/<key>@<version>`.
    pub applied_annotation: String,
    /// Annotation of a template source (ConfigMap or PodTemplate): `shadow` to evaluate its
    /// templates without applying them, `enforce` (or absent) to apply them (§10).
    pub mode_annotation: String,
    /// Namespace whose templates every pod may use.
    pub platform_namespace: String,
    /// Label (with [`Names::managed_value`]) on the pods Flyte's executor creates (§9).
    pub managed_label: String,
    pub managed_value: String,
    /// Label of a managed pod holding `<environment>.<function>`; empty turns §9 rule 3 off.
    pub task_name_label: String,
}

impl Default for Names {
    fn default() -> Self {
        Names {
            environment_label: "flyte.org/environment".into(),
            template_annotation: "flyte.org/pod-template".into(),
            source_label: "flyte.org/pod-templates".into(),
            applied_annotation: "flyte.org/pod-template-applied".into(),
            mode_annotation: "flyte.org/pod-template-mode".into(),
            platform_namespace: "flyte".into(),
            managed_label: "flyte.org/managed".into(),
            managed_value: "true".into(),
            task_name_label: "task-name".into(),
        }
    }
}
